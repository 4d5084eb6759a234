"""tools/offline_rest.py on a tiny checkpoint trained on a tiny random Hopper dataset."""

import csv
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TOOLS, os.path.dirname(TOOLS)]
import eval_noise  # noqa: E402
import offline_rest  # noqa: E402

smac = offline_rest.smac
pytestmark = pytest.mark.filterwarnings("ignore:.*is out of date")  # Hopper-v4 on purpose, as in test_smac.py
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A SMAC checkpoint (kappa > 0, so the penalty and alpha_psi are in the continued update) of 30 updates."""
    folder = tmp_path_factory.mktemp("offline_rest")
    rng, n = np.random.default_rng(0), 300
    with h5py.File(folder / "d.hdf5", "w") as f:  # D4RL's layout: random Hopper-v4 transitions, an end every 100
        f["observations"], f["next_observations"] = rng.normal(size=(2, n, 11)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
        f["rewards"] = rng.normal(size=n).astype(np.float32)
        f["terminals"], f["timeouts"] = np.arange(n) % 100 == 49, np.arange(n) % 100 == 99
    result = smac.train(smac.Args(env="hopper-medium-v2", dataset_path=str(folder / "d.hdf5"), total_updates=30,
                                  eval_freq_updates=30, batch_size=32, hidden_dim=32, score_model_updates=20,
                                  eval_episodes=1, cuda=False, run_dir=str(folder / "runs")))
    return os.path.join(result["run_dir"], "smac.pt")


def rest(checkpoint, tmp_path, **flags):
    base = dict(checkpoint=checkpoint, updates=40, eval_freq=20, eval_episodes=2, floor_sets=6,
                out=str(tmp_path / "rest.csv"))
    return offline_rest.run(offline_rest.Args(**{**base, **flags}))


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_curve_and_summary_rows_and_the_drop_from_the_csv(checkpoint, tmp_path):
    result = rest(checkpoint, tmp_path)
    rows = read_rows(tmp_path / "rest.csv")
    curve, summary = [r for r in rows if r["row"] == "eval"], [r for r in rows if r["row"] == "summary"]
    assert [int(r["update"]) for r in curve] == [0, 20, 40] and len(summary) == 1
    scores = [float(r["score"]) for r in curve]
    assert float(summary[0]["continuation_drop"]) == pytest.approx(max(0.0, scores[0] - min(scores[1:])), abs=1e-4)
    assert float(summary[0]["spread_std"]) == pytest.approx(np.std(scores, ddof=1), abs=1e-4)
    assert float(summary[0]["step0"]) == pytest.approx(scores[0], abs=1e-4)
    # the step-0 evaluation is the fixed policy's first seed set, and the floor's mean drop is eval_noise's
    means = eval_noise.set_means(checkpoint, 6, 2)
    assert scores[0] == pytest.approx(means[0], abs=1e-4)
    assert result["floor_drop"] == pytest.approx(eval_noise.drop_floor(means, 2, offline_rest.DRAWS), abs=1e-9)
    assert result["scores"] != [scores[0]] * 3  # training moves the policy: the zero-rate control below is not vacuous
    rest(checkpoint, tmp_path, seed=2)  # a second run appends to the same table under the same header
    assert [r["row"] for r in read_rows(tmp_path / "rest.csv")].count("summary") == 2


def test_zero_learning_rates_stay_exactly_at_rest(checkpoint, tmp_path):
    """Adam at rate 0 never moves the actor: every evaluation replays step 0's episodes, no drop, no spread."""
    result = rest(checkpoint, tmp_path, policy_lr=0.0, q_lr=0.0)
    assert result["scores"] == [result["scores"][0]] * 3
    assert result["continuation_drop"] == 0.0 and result["spread_std"] == 0.0 and result["spread_range"] == 0.0
    assert result["at_rest"] is True


def test_the_continuation_reads_the_data_as_the_offline_run_did(checkpoint, tmp_path):
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["args"]["binary_reward"] = True  # as a goal task's: its rewards come from the data's success, which is absent
    torch.save(ckpt, path := str(tmp_path / "binary.pt"))
    with pytest.raises(smac.SMACError, match="--binary-reward needs the env's success"):
        rest(path, tmp_path)


def test_fixed_policy_draws_are_distinct_sets():
    picks = offline_rest.fixed_policy_draws(np.arange(8.0), 3, draws=500)
    assert picks.shape == (500, 4) and all(len(set(row)) == 4 for row in picks)


@pytest.mark.parametrize("flags, message", [
    ({"updates": 0}, "--updates must be >= 1"), ({"eval_freq": 0}, "--eval-freq must be >= 1"),
    ({"eval_freq": 41}, "exceeds --updates"), ({"eval_episodes": 0}, "--eval-episodes must be >= 1"),
    ({"policy_lr": -1.0}, "--policy-lr must be a finite number >= 0"), ({"floor_sets": 2}, "needs at least 3 sets"),
])
def test_bad_flags_fail_before_anything_is_loaded(flags, message):
    with pytest.raises(smac.SMACError, match=message):
        offline_rest.Args(**{"checkpoint": "missing.pt", "updates": 40, "eval_freq": 20, **flags})


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.pt", "does not exist"),
    (lambda d: (d / "x.pt").write_text("not torch") and d / "x.pt", "cannot read"),
    (lambda d: torch.save({"format": "other"}, d / "o.pt") or d / "o.pt", "not a SMAC checkpoint"),
])
def test_bad_checkpoints_give_one_line_and_write_nothing(tmp_path, make, message):
    path = make(tmp_path)
    out = subprocess.run([sys.executable, os.path.join(TOOLS, "offline_rest.py"), str(path), "--updates", "2",
                          "--eval-freq", "1", "--out", str(tmp_path / "rest.csv")], capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0 and message in out.stderr
    assert out.stderr.startswith("error: ") and not (tmp_path / "rest.csv").exists()


def test_an_out_file_holding_another_table_is_refused_untouched(checkpoint, tmp_path):
    (tmp_path / "rest.csv").write_text("a,b\n1,2\n")
    with pytest.raises(smac.SMACError, match="holds another table"):
        rest(checkpoint, tmp_path)
    assert (tmp_path / "rest.csv").read_text() == "a,b\n1,2\n"


@pytest.mark.parametrize("scores, at_rest", [
    ([10.0, 9.0, 10.0, 11.0], True),  # drop 1, std 0.82: within the fixed policy's 2 + 2 and 1.5 x 1.05
    ([10.0, 10.0, 12.0, 13.0], True),  # a climb, std 1.50
    ([10.0, 10.0, 12.5, 13.5], False),  # a larger climb: std 1.73 > 1.58
    ([10.0, 5.9, 10.0, 10.0], False)])  # drop 4.1 > 4
def test_at_rest_is_issue_31s_floor_plus_2_points_and_1_5_times_the_fixed_spread(scores, at_rest):
    picks = np.array([[10.0, 9.0, 11.0, 10.0], [11.0, 10.0, 9.0, 8.0]])  # the fixed policy: drops 1 and 3
    summary = offline_rest.rest_summary(scores, picks)
    assert summary["floor_drop"] == pytest.approx(2.0)
    assert summary["floor_std"] == pytest.approx(np.mean([np.std(p, ddof=1) for p in picks]))
    assert summary["at_rest"] is at_rest
