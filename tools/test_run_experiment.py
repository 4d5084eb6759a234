"""The experiment runner on a tiny sweep: two seeds, a few hundred steps, the local process pool."""

import csv
import os
import shutil
import sys

import pytest

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TOOLS, os.path.dirname(TOOLS)]
import run_experiment  # noqa: E402
from test_smac import write_hdf5  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is out of date")


def tiny_args(tmp_path, dataset, **kw):
    base = dict(name="tiny", tasks=[f"hopper-medium-v2:{dataset}"], seeds=[1, 2], offline_updates=40,
                online_steps=300, offline_eval_freq=20, online_eval_freq=100, eval_episodes=1, workers=2,
                smac_flags="--hidden-dim 32 --batch-size 32 --no-cuda --score-model-updates 20",
                finetune_flags="--batch-size 32 --learning-starts 100 --no-cuda",
                results_dir=str(tmp_path / "results"), run_root=str(tmp_path / "runs"))
    return run_experiment.Args(**{**base, **kw})


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def result_files(root):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f == "result.json")


def test_tiny_sweep_writes_summary_and_plots_resumes_and_reproduces(tmp_path, capsys):
    dataset = write_hdf5(tmp_path / "tiny-local.hdf5", n=600)
    args = tiny_args(tmp_path, dataset)
    assert run_experiment.main(args) == 0
    out = tmp_path / "results" / "tiny"
    rows = read_rows(out / "summary.csv")
    assert len(rows) == 2 * 2 * 2  # methods x fine-tuners x seeds
    assert {(r["method"], r["finetuner"], r["seed"]) for r in rows} == {
        (m, t, s) for m in ("smac", "baseline") for t in ("sac", "td3") for s in ("1", "2")}
    assert all(r["dataset"] == "tiny-local" for r in rows)
    for r in rows:  # the fine-tuner starts from the offline policy: same eval seeds, same score
        assert float(r["step0_score"]) == pytest.approx(float(r["offline_score"]), abs=1e-3)
        assert float(r["drop"]) == pytest.approx(max(0.0, float(r["step0_score"]) - float(r["lowest_early_score"])),
                                                 abs=1e-3)
    assert (out / "tiny-local_sac.png").stat().st_size > 0 and (out / "tiny-local_td3.png").stat().st_size > 0
    assert (out / "table.md").read_text().count("| tiny-local |") == 4

    # repeated command: nothing runs again, the summary is the same
    finished = tmp_path / "results" / "tiny" / "finished"  # result.json files, committed; run folders are not
    stamps = {p: os.path.getmtime(p) for p in result_files(finished)}
    assert len(stamps) == 4 + 8
    capsys.readouterr()
    assert run_experiment.main(args) == 0
    assert "start:" not in capsys.readouterr().out
    assert {p: os.path.getmtime(p) for p in result_files(finished)} == stamps
    assert read_rows(out / "summary.csv") == rows

    # an interrupted run (no result.json) is run again, and only it
    interrupted = [p for p in stamps if os.sep + "sac" + os.sep in p][0]
    interrupted_dir = os.path.dirname(interrupted).replace(str(finished), str(tmp_path / "runs" / "tiny"))
    os.remove(interrupted)
    assert run_experiment.main(args) == 0
    started = [line for line in capsys.readouterr().out.splitlines() if line.startswith("start:")]
    assert started == [f"start: {interrupted_dir}"]
    assert read_rows(out / "summary.csv") == rows  # CPU runs are deterministic

    # a fresh clone has the committed result.json files but no run folders: an offline run is made again only if
    # one of its online runs is unfinished, and gives the same numbers
    shutil.rmtree(tmp_path / "runs")
    os.remove(interrupted)
    assert run_experiment.main(args) == 0
    started = [line for line in capsys.readouterr().out.splitlines() if line.startswith("start:")]
    assert started == [f"start: {interrupted_dir.replace(os.sep + 'sac', os.sep + 'offline')}",
                       f"start: {interrupted_dir}"]
    assert read_rows(out / "summary.csv") == rows

    # the same seed in a fresh folder gives the same numbers
    again = tiny_args(tmp_path, dataset, seeds=[2], methods=["smac"], finetuners=["td3"],
                      run_root=str(tmp_path / "runs2"), results_dir=str(tmp_path / "results2"))
    assert run_experiment.main(again) == 0
    (row,) = read_rows(tmp_path / "results2" / "tiny" / "summary.csv")
    assert row in rows


def test_bad_task_gives_one_clear_error(tmp_path):
    with pytest.raises(run_experiment.smac.SMACError, match="does not exist"):
        run_experiment.main(tiny_args(tmp_path, tmp_path / "missing.hdf5"))
    with pytest.raises(run_experiment.smac.SMACError, match="unknown dataset"):
        run_experiment.main(tiny_args(tmp_path, "x", tasks=["hopper-mediun-v2"]))


def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path):
    dataset = write_hdf5(tmp_path / "tiny-local.hdf5", n=600)
    args = tiny_args(tmp_path, dataset, seeds=[1], finetuners=["sac"], smac_flags="--hidden-dim 32 --optimizer sgd")
    assert run_experiment.main(args) == 1  # every offline run fails: nothing to fine-tune, exit code 1
    assert read_rows(tmp_path / "results" / "tiny" / "summary.csv") == []
