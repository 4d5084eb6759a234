"""The experiment runner on a tiny sweep: two seeds, a few hundred steps, the local process pool."""

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TOOLS, os.path.dirname(TOOLS)]
import run_experiment  # noqa: E402
from test_smac import write_hdf5  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is out of date")
RESULTS = os.path.join(os.path.dirname(TOOLS), "results")


def tree_hashes(root):
    """Every file under root with its bytes' SHA-256."""
    return {os.path.join(d, f): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture(autouse=True)
def committed_results_untouched():
    """After every runner test, the project's results/ is byte for byte what it was (the tests write to tmp_path)."""
    before = tree_hashes(RESULTS)
    yield
    assert tree_hashes(RESULTS) == before


def tiny_args(tmp_path, dataset, **kw):
    base = dict(name="tiny", tasks=[f"hopper-medium-v2:{dataset}"], seeds=[1, 2], offline_updates=40, rest_updates=20,
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
        assert r["offline_rest_updates"] == "20" and r["offline_at_rest"] in ("True", "False")  # offline_rest.py ran
        assert float(r["offline_continuation_drop"]) >= 0 and float(r["offline_rest_floor_drop"]) >= 0
        assert r["regret_from"] == "return" and r["final_success_rate"] == ""  # locomotion: no success signal
    assert (out / "tiny-local_sac.png").stat().st_size > 0 and (out / "tiny-local_td3.png").stat().st_size > 0
    assert (out / "table.md").read_text().count("| tiny-local |") == 4

    # repeated command: nothing runs again, the summary is the same
    finished = tmp_path / "results" / "tiny" / "finished"  # result.json files, committed; run folders are not
    stamps = {p: os.path.getmtime(p) for p in result_files(finished)}
    assert len(stamps) == 4 + 4 + 8  # offline, rest, online
    for path in [p for p in stamps if os.sep + "rest" + os.sep in p]:  # update 0 of offline_rest.py: the hand-over
        offline = json.load(open(path.replace(os.sep + "rest" + os.sep, os.sep + "offline" + os.sep)))
        assert json.load(open(path))["step0"] == pytest.approx(offline["offline_score"], abs=1e-3)
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


# ---------------------------------------------------------------- bad input, kept results, lock, signals (no training)
def fake_flags(tmp_path, **over):
    """A sweep of hopper-medium-v2 x seeds 1 2 x smac x sac, as command-line flags; over: flag -> values ([]: none)."""
    flags = dict(name="fake", tasks=["hopper-medium-v2"], seeds=[1, 2], methods=["smac"], finetuners=["sac"],
                 offline_updates=200, online_steps=1200, offline_eval_freq=100, online_eval_freq=600, eval_episodes=1,
                 workers=1, results_dir=tmp_path / "results", run_root=tmp_path / "runs")
    flags.update(over)
    argv = []
    for flag, values in flags.items():
        if values is True:
            argv.append(f"--{flag.replace('_', '-')}")
        elif isinstance(values, str) and values.startswith("-"):  # flags for the scripts, written with '='
            argv.append(f"--{flag.replace('_', '-')}={values}")
        elif values is not None:
            argv += [f"--{flag.replace('_', '-')}", *map(str, values if isinstance(values, list) else [values])]
    return argv


def run_cli(capsys, argv):
    code = run_experiment.cli(argv)
    out, err = capsys.readouterr()
    return code, out, err


SETTINGS = dict(offline_updates=200, online_steps=1200, offline_eval_freq=100, online_eval_freq=600, eval_episodes=1,
                smac_flags=[], finetune_flags=[])


def fake_finished(results, seeds=(1, 2), settings=None, name="fake"):
    """finished/ as that sweep leaves it (checkpoints gone, as on a fresh clone); settings: recorded in result.json,
    as this runner does, or not, as in the committed results/ (made before it did, and without rest results)."""
    for seed in seeds:
        folder = results / name / "finished" / "hopper-medium-v2" / "smac" / f"seed{seed}"
        offline = {"checkpoint": "/gone/smac.pt", "offline_score": 40.0 + seed, "score_cosine": 0.5,
                   "curve": [[100, 30.0], [200, 40.0 + seed]], "score_residual_rel": float("nan")}
        online = {"checkpoint": "/gone/final.pt", "curve": [[0, 40.0 + seed], [600, 35.0], [1200, 60.0]],
                  "step0_score": 40.0 + seed, "lowest_early_score": 35.0, "drop": 5.0 + seed, "regret": 0.5,
                  "final_score": 60.0, "kl_100": 0.25, "td_grad_ratio": float("nan"), "regret_from": "success",
                  "final_success_rate": 0.2 * seed}
        rest = {"continuation_drop": 2.0 + seed, "spread_std": 1.25, "floor_drop": 0.75, "floor_std": 0.5,
                "at_rest": True, "rest_updates": 5000, "scores": [40.0 + seed, 38.0 - seed]}
        for part, result in (("offline", offline), ("sac", online), ("rest", rest)):
            os.makedirs(folder / part)
            with open(folder / part / "result.json", "w") as f:
                json.dump({**result, **({"settings": settings} if settings else {})}, f)


def snapshot(folder):
    return {p: open(p, "rb").read() for p in sorted(map(str, folder.iterdir())) if os.path.isfile(p)}


@pytest.mark.parametrize("over, message", [
    (dict(workers=0), "--workers must be >= 1, got 0"),
    (dict(workers=-1), "--workers must be >= 1, got -1"),
    (dict(threads_per_run=0), "--threads-per-run must be >= 1, got 0"),
    (dict(rest_updates=-1), "--rest-updates must be >= 0, got -1"),
    (dict(defer=["calql"]), "--defer calql: not among this sweep's --methods or --peers"),
    (dict(online_eval_freq=0, peers=["iql"], corl_dir="."), "--online-eval-freq must be >= 1, got 0"),
    (dict(results_dir="FILE/sub"), "--results-dir FILE/sub: cannot write FILE/sub/fake: FILE is a file, not a folder"),
    (dict(seeds=[]), "--seeds must be one or more integers in [0, 2**32 - 1], got []"),
    (dict(tasks=[]), "--tasks must be one or more values, got []"),
    (dict(methods=[]), "--methods and --peers are both empty: nothing to run"),
    (dict(engine="slurm"), "--engine slurm needs Slurm (no srun on PATH); on this machine use --engine local"),
    (dict(name=""), "--name '' must be one plain folder name"),
    (dict(name="../../escape"), "--name '../../escape' must be one plain folder name"),
    (dict(name="a/b"), "--name 'a/b' must be one plain folder name"),
    (dict(name=".hidden"), "--name '.hidden' must be one plain folder name"),
    (dict(methods=["smac-anchor"], smac_flags="--score-coef 1"), "smac-anchor keeps smac.py's default kappa 10"),
])
def test_a_bad_flag_gives_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch, over, message):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun here
    (tmp_path / "FILE").write_text("")
    over = {k: str(tmp_path / v) if k == "results_dir" else v for k, v in over.items()}
    code, out, err = run_cli(capsys, fake_flags(tmp_path, **over))
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.replace(str(tmp_path) + os.sep, "").startswith(f"error: {message}")
    assert sorted(os.listdir(tmp_path)) == ["FILE"] and not (tmp_path.parent / "escape").exists()  # nothing written


def test_collect_only_rebuilds_the_summary_with_blanks_and_budget_scores(tmp_path, capsys):
    fake_finished(tmp_path / "results")
    code, out, err = run_cli(capsys, fake_flags(tmp_path, collect_only=True))
    assert (code, err) == (0, "") and "2 finished online runs" in out
    text = (tmp_path / "results" / "fake" / "summary.csv").read_text()
    assert "nan" not in text.lower()  # a value that does not exist is blank
    rows = read_rows(tmp_path / "results" / "fake" / "summary.csv")
    assert [(r["seed"], r["drop"], r["kl_100"], r["kl_500"], r["td_grad_ratio"], r["score_cosine"],
             r["score_residual_rel"], r["online_steps"], r["score_10k"], r["regret_from"], r["final_success_rate"])
            for r in rows] == [("1", "6.0000", "0.2500", "", "", "0.5000", "", "1200.0000", "", "success", "0.2000"),
                               ("2", "7.0000", "0.2500", "", "", "0.5000", "", "1200.0000", "", "success", "0.4000")]
    table = (tmp_path / "results" / "fake" / "table.md").read_text()
    assert "| hopper-medium-v2 | sac | smac | 2 | 41.5 ± 0.7 [41.0, 42.0] |" in table  # sample std, seed range
    assert "| - |" in table and "nan" not in table  # score_10k: the runs are shorter


def test_one_seed_shows_no_std_in_the_table_rather_than_nan(tmp_path, capsys):
    fake_finished(tmp_path / "results", seeds=(1,))
    assert run_cli(capsys, fake_flags(tmp_path, collect_only=True, seeds=[1]))[0] == 0
    table = (tmp_path / "results" / "fake" / "table.md").read_text()
    assert "| hopper-medium-v2 | sac | smac | 1 | 41.0 ± - [41.0, 41.0] |" in table and "nan" not in table


def test_collect_only_fills_the_offline_rest_columns_next_to_the_drop(tmp_path, capsys):
    fake_finished(tmp_path / "results")
    assert run_cli(capsys, fake_flags(tmp_path, collect_only=True, rest_updates=0))[0] == 0  # collected whatever flag
    rows = read_rows(tmp_path / "results" / "fake" / "summary.csv")
    assert [list(r.values())[8:15] for r in rows] == [
        ["6.0000", "3.0000", "1.2500", "0.7500", "0.5000", "True", "5000"],
        ["7.0000", "4.0000", "1.2500", "0.7500", "0.5000", "True", "5000"]]
    assert list(rows[0])[8:15] == ["drop", "offline_continuation_drop", "offline_rest_spread_std",
                                   "offline_rest_floor_drop", "offline_rest_floor_std", "offline_at_rest",
                                   "offline_rest_updates"]
    assert "| drop | offline_continuation_drop |" in (tmp_path / "results" / "fake" / "table.md").read_text()
    assert "6.5 ± 0.7 [6.0, 7.0] | 3.5 ± 0.7 [3.0, 4.0] |" in (tmp_path / "results" / "fake" / "table.md").read_text()
    for seed in (1, 2):  # a sweep made before the rest runs (the committed ones): blank cells, '-' in the table
        os.remove(tmp_path / "results" / "fake" / "finished" / "hopper-medium-v2" / "smac" / f"seed{seed}" / "rest" /
                  "result.json")
    assert run_cli(capsys, fake_flags(tmp_path, collect_only=True))[0] == 0
    assert [list(r.values())[9:15] for r in read_rows(tmp_path / "results" / "fake" / "summary.csv")] == [[""] * 6] * 2
    assert "6.5 ± 0.7 [6.0, 7.0] | - |" in (tmp_path / "results" / "fake" / "table.md").read_text()


def fake_jobs(monkeypatch):
    """run_job without training: each kind's result.json as run_job writes it; returns the list of the jobs run."""
    started = []

    def run_job(job):
        started.append(job)
        os.makedirs(job["dir"], exist_ok=True)
        open(os.path.join(job["dir"], "smac.pt"), "w").close()
        result = {"checkpoint": os.path.join(job["dir"], "smac.pt"), "offline_score": 40.0, "curve": [[1200, 40.0]]}
        if job["kind"] == "rest":
            result = {"continuation_drop": 3.0 + job["key"]["seed"], "spread_std": 1.5, "floor_drop": 0.5,
                      "floor_std": 0.25, "at_rest": False, "rest_updates": int(job["argv"][2])}
        elif job["kind"] != "offline":
            result = {**result, "curve": [[0, 40.0], [1200, 50.0]], "drop": 2.0, "offline_curve": [[1200, 40.0]]}
        os.makedirs(os.path.dirname(job["result"]), exist_ok=True)
        with open(job["result"] + ".tmp", "w") as f:  # whole or absent, as run_job writes it (jobs run in threads)
            json.dump({**result, "settings": job["settings"]}, f)
        os.replace(job["result"] + ".tmp", job["result"])
        return result
    monkeypatch.setattr(run_experiment, "run_job", run_job)
    return started


def test_a_methods_own_flags_come_after_the_extra_flags_and_win(tmp_path, capsys, monkeypatch):
    started = fake_jobs(monkeypatch)
    flags = dict(methods=["smac", "smac-plain", "baseline"], smac_flags="--score-coef 1", seeds=[1], rest_updates=0,
                 finetune_flags="--score-coef-final 0.1")
    assert run_cli(capsys, fake_flags(tmp_path, **flags))[0] == 0
    argv = {(j["kind"], j["key"]["method"]): j["argv"] for j in started}
    assert argv["offline", "smac"][-2:] == ["--score-coef", "1"]  # the extra flags set SMAC's kappa,
    assert argv["offline", "baseline"][-4:] == ["--score-coef", "1", "--score-coef", "0"]  # not the baseline's: 0
    assert argv["online", "smac"][-2:] == ["--score-coef-final", "0.1"]
    assert argv["online", "smac-plain"][-4:] == ["--score-coef", "0", "--score-coef-final", "0"]  # plain stays plain


def test_deferred_runs_are_not_started_yet_stay_in_the_sweep_and_run_later(tmp_path, capsys, monkeypatch):
    started = fake_jobs(monkeypatch)
    (tmp_path / "d.hdf5").write_text("")
    flags = dict(tasks=[f"hopper-medium-v2:{tmp_path / 'd.hdf5'}"], methods=["smac", "smac-plain"], peers=["iql"],
                 corl_dir=tmp_path, offline_updates=1200, seeds=[1], rest_updates=0)
    code, out, _ = run_cli(capsys, fake_flags(tmp_path, defer=["iql", "smac-plain"], **flags))
    assert code == 0 and [(j["kind"], j["key"]["method"]) for j in started] == [("offline", "smac"), ("online", "smac")]
    assert out.count("deferred (--defer): ") == 2
    assert [r["method"] for r in read_rows(tmp_path / "results" / "fake" / "summary.csv")] == ["smac"]
    started.clear()  # the same sweep without --defer: only the deferred runs start, and the summary holds all three
    assert run_cli(capsys, fake_flags(tmp_path, **flags))[0] == 0
    assert sorted((j["kind"], j["key"]["method"]) for j in started) == [("online", "smac-plain"), ("peer", "iql")]
    assert sorted(r["method"] for r in read_rows(tmp_path / "results" / "fake" / "summary.csv")) == [
        "iql", "smac", "smac-plain"]


def test_a_rest_job_follows_each_offline_run_not_the_peers_and_fills_its_rows(tmp_path, capsys, monkeypatch):
    started = fake_jobs(monkeypatch)
    (tmp_path / "d.hdf5").write_text("")
    flags = dict(tasks=[f"hopper-medium-v2:{tmp_path / 'd.hdf5'}"], methods=["smac", "baseline"], peers=["iql"],
                 corl_dir=tmp_path, offline_updates=1200)
    assert run_cli(capsys, fake_flags(tmp_path, **flags))[0] == 0
    rest = {(j["key"]["method"], j["key"]["seed"]): j["argv"] for j in started if j["kind"] == "rest"}
    assert sorted(rest) == [("baseline", 1), ("baseline", 2), ("smac", 1), ("smac", 2)]  # none for the peer
    folder = tmp_path / "runs" / "fake" / "d" / "smac" / "seed2"
    assert rest["smac", 2] == [str(folder / "offline" / "smac.pt"), "--updates", "5000", "--eval-freq", "500",
                               "--eval-episodes", "1", "--seed", "2", "--out", str(folder / "rest/offline_rest.csv")]
    summary = tmp_path / "results" / "fake" / "summary.csv"
    cells = {(r["method"], r["seed"]): list(r.values())[9:15] for r in read_rows(summary)}
    assert cells == {**{(m, s): [f"{3 + int(s)}.0000", "1.5000", "0.5000", "0.2500", "False", "5000"]
                        for s in ("1", "2") for m in ("smac", "baseline")},
                     ("iql", "1"): [""] * 6, ("iql", "2"): [""] * 6}

    # resumed with --rest-updates 0 nothing runs and the rest results stay; with another value, a missing one is made
    # with it and the summary says which (offline_rest_updates): never a silent mix
    started.clear()
    assert run_cli(capsys, fake_flags(tmp_path, rest_updates=0, **flags))[0] == 0 and started == []
    assert {k: v[:5] for k, v in cells.items()} == {(r["method"], r["seed"]): list(r.values())[9:14]
                                                    for r in read_rows(summary)}
    os.remove(tmp_path / "results" / "fake" / "finished" / "d" / "smac" / "seed2" / "rest" / "result.json")
    assert run_cli(capsys, fake_flags(tmp_path, rest_updates=30, **flags))[0] == 0
    assert [(j["kind"], j["argv"][1:5]) for j in started] == [("rest", ["--updates", "30", "--eval-freq", "3"])]
    assert sorted(r["offline_rest_updates"] for r in read_rows(summary)) == ["", "", "30", "5000", "5000", "5000"]

    # --rest-updates 0 on a new sweep: no rest job, blank cells
    started.clear()
    assert run_cli(capsys, fake_flags(tmp_path, name="norest", rest_updates=0, **flags))[0] == 0
    assert {j["kind"] for j in started} == {"offline", "online", "peer"}
    assert {r["offline_continuation_drop"] for r in read_rows(tmp_path / "results" / "norest" / "summary.csv")} == {""}


def test_a_checkpoints_followers_run_before_the_jobs_still_waiting(tmp_path, capsys, monkeypatch):
    started = fake_jobs(monkeypatch)  # one worker: the order is the schedule's
    (tmp_path / "d.hdf5").write_text("")
    flags = dict(tasks=[f"hopper-medium-v2:{tmp_path / 'd.hdf5'}"], peers=["iql"], corl_dir=tmp_path,
                 offline_updates=1200, finetuners=["sac", "td3"])
    assert run_cli(capsys, fake_flags(tmp_path, **flags))[0] == 0
    assert [(j["kind"], j["key"]["seed"]) for j in started] == [
        ("offline", 1), ("online", 1), ("online", 1), ("rest", 1), ("peer", 1),
        ("offline", 2), ("online", 2), ("online", 2), ("rest", 2), ("peer", 2)]
    for seed in (1, 2):  # resumed with both checkpoints made: their followers in the plan's order, then the rest
        shutil.rmtree(tmp_path / "results" / "fake" / "finished" / "d" / "smac" / f"seed{seed}" / "sac")
        os.remove(tmp_path / "results" / "fake" / "finished" / "d" / "iql" / f"seed{seed}" / "peer" / "result.json")
    started.clear()
    assert run_cli(capsys, fake_flags(tmp_path, **flags))[0] == 0
    assert [(j["kind"], j["key"]["seed"]) for j in started] == [("online", 1), ("online", 2), ("peer", 1), ("peer", 2)]


@pytest.mark.parametrize("curve, budget, score", [
    ([[0, 1.0], [9000, 2.0], [12000, 3.0], [30000, 4.0]], 10_000, 2.0),  # the last evaluation at or before it
    ([[0, 1.0], [9000, 2.0], [12000, 3.0], [30000, 4.0]], 30_000, 4.0),
    ([[0, 1.0], [10000, 2.0], [11000, 3.0]], 10_000, 2.0),
    ([[0, 1.0], [9000, 2.0]], 10_000, None),  # the run is shorter: no score at that budget
])
def test_score_at_a_budget(curve, budget, score):
    assert run_experiment.score_at(curve, budget) == score


@pytest.mark.parametrize("over, message", [
    (dict(collect_only=True, tasks=["walker2d-medium-v2"], seeds=None, methods=None, finetuners=None),  # other lists
     "summary.csv holds 2 runs this command would drop (e.g. hopper-medium-v2 smac sac 1)"),
    (dict(collect_only=True, seeds=[1]),
     "summary.csv holds 1 runs this command would drop (e.g. hopper-medium-v2 smac sac 2)"),
    (dict(collect_only=True, methods=["baseline"]), "summary.csv holds 2 runs this command would drop"),
    (dict(), "holds runs but no record of their settings (sweep.json): it can only be collected (--collect-only)"),
])
def test_a_command_never_shrinks_a_summary_nor_reuses_unrecorded_runs(tmp_path, capsys, over, message):
    fake_finished(tmp_path / "results")  # committed runs: no settings recorded
    assert run_cli(capsys, fake_flags(tmp_path, collect_only=True))[0] == 0
    before = snapshot(tmp_path / "results" / "fake")
    code, out, err = run_cli(capsys, fake_flags(tmp_path, **over))
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert "start:" not in out and snapshot(tmp_path / "results" / "fake") == before


@pytest.mark.parametrize("over, message", [
    (dict(offline_updates=400, online_steps=2400),
     "--offline-updates 200 (this command: 400), --online-steps 1200 (this command: 2400)"),
    (dict(online_eval_freq=300), "--online-eval-freq 600 (this command: 300)"),
    (dict(offline_eval_freq=50), "--offline-eval-freq 100 (this command: 50)"),
    (dict(eval_episodes=5), "--eval-episodes 1 (this command: 5)"),
    (dict(smac_flags="--score-coef=1"), "--smac-flags '' (this command: '--score-coef=1')"),
    (dict(finetune_flags="--lr-warmup=10"), "--finetune-flags '' (this command: '--lr-warmup=10')"),
    (dict(online_steps=2400, collect_only=True), "--online-steps 1200 (this command: 2400)"),
])
@pytest.mark.parametrize("record", ["sweep.json", "result.json"])
def test_other_settings_are_refused(tmp_path, capsys, over, message, record):
    fake_finished(tmp_path / "results", settings=SETTINGS)
    code, out, _ = run_cli(capsys, fake_flags(tmp_path))  # the same settings: everything is done already
    assert code == 0 and "start:" not in out and "done already" in out
    assert json.loads((tmp_path / "results" / "fake" / "sweep.json").read_text()) == {"settings": SETTINGS}
    if record == "result.json":  # a clone that lost sweep.json: the finished runs record their settings too
        os.remove(tmp_path / "results" / "fake" / "sweep.json")
    before = snapshot(tmp_path / "results" / "fake")
    code, out, err = run_cli(capsys, fake_flags(tmp_path, **over))
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("error: ") and "was made with other settings: " + message in err
    assert "choose another --name" in err and snapshot(tmp_path / "results" / "fake") == before


@pytest.mark.parametrize("holder, refused", [("self", True), ("dead", False), ("empty", True)])
def test_one_sweep_per_name(tmp_path, capsys, holder, refused):
    fake_finished(tmp_path / "results", settings=SETTINGS)
    lock = tmp_path / "runs" / "fake" / "sweep.lock"
    os.makedirs(lock.parent)
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text({"self": str(os.getpid()), "dead": str(dead.pid), "empty": ""}[holder])
    code, out, err = run_cli(capsys, fake_flags(tmp_path))
    if refused:  # a running sweep's runs are not started again (their folders deleted) by a second one
        assert code == 1 and out == "" and err.count("\n") == 1
        assert err.startswith("error: a sweep named fake is running (PID ") and lock.exists()
    else:  # a stale lock (its sweep was killed) is taken over, and released at the end
        assert code == 0 and "done already" in out and not lock.exists()


FAKE_RUN = """import os, subprocess, sys, time
run_dir = sys.argv[sys.argv.index("--run-dir") + 1]
grandchild = subprocess.Popen(["sleep", "120"])  # as run_peer.py starts CORL's script
with open(os.path.join(run_dir, "pids.tmp"), "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}")
os.replace(os.path.join(run_dir, "pids.tmp"), os.path.join(run_dir, "pids"))
time.sleep(120)
"""


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"  # a zombie has ended
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_every_run_and_says_the_same_command_resumes(tmp_path, signum, code):
    (tmp_path / "fake_run.py").write_text(FAKE_RUN)
    argv = fake_flags(tmp_path, workers=2)
    code_line = (f"import sys; sys.path.insert(0, {TOOLS!r}); import run_experiment as r; "
                 f"r.OFFLINE_SCRIPT = {str(tmp_path / 'fake_run.py')!r}; sys.exit(r.cli({argv!r}))")
    runner = subprocess.Popen([sys.executable, "-c", code_line], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    pids_files = [tmp_path / "runs" / "fake" / "hopper-medium-v2" / "smac" / f"seed{s}" / "offline" / "pids"
                  for s in (1, 2)]
    deadline = time.time() + 60
    while not all(p.exists() for p in pids_files):  # both offline runs (and their own children) are running
        assert runner.poll() is None and time.time() < deadline, runner.communicate()
        time.sleep(0.2)
    pids = [int(pid) for p in pids_files for pid in p.read_text().split()]
    assert not any(gone(pid) for pid in pids)
    runner.send_signal(signum)
    out, err = runner.communicate(timeout=60)
    assert runner.returncode == code, err
    (line,) = err.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"interrupted ({signal.Signals(signum).name}): the runs were stopped; every finished run "
                           "is kept in") and line.endswith("and the same command resumes")
    deadline = time.time() + 10
    while not all(gone(pid) for pid in pids):  # no orphan: the runs and what they started
        assert time.time() < deadline, [pid for pid in pids if not gone(pid)]
        time.sleep(0.1)
    assert not (tmp_path / "runs" / "fake" / "sweep.lock").exists()
