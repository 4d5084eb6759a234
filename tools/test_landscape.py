"""The landscape path tool: its ends reproduce the two checkpoints' evaluations; mismatched pairs are refused."""

import csv
import os
import sys

import pytest
import torch

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TOOLS, os.path.dirname(TOOLS)]
import landscape  # noqa: E402
import sac_finetune  # noqa: E402
import smac  # noqa: E402
from test_smac import online_args, small_args, write_hdf5  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is out of date")


@pytest.fixture(scope="module")
def run_pair(tmp_path_factory):
    """An offline checkpoint and its SAC fine-tuned checkpoint, from tiny runs."""
    tmp_path = tmp_path_factory.mktemp("pair")
    offline = smac.train(small_args(tmp_path, write_hdf5(tmp_path / "d.hdf5", n=600), eval_episodes=2))
    online = sac_finetune.train(online_args(sac_finetune, tmp_path, os.path.join(offline["run_dir"], "smac.pt")))
    return os.path.join(offline["run_dir"], "smac.pt"), os.path.join(online["run_dir"], "final.pt")


def test_ends_of_the_path_reproduce_each_checkpoints_evaluation(tmp_path, run_pair):
    offline_path, finetuned_path = run_pair
    out = str(tmp_path / "path")
    args = landscape.Args(offline=[offline_path], finetuned=[finetuned_path], labels=["smac"], points=3,
                          t_min=-0.5, t_max=1.5, episodes=2, out=out, cuda=False)
    landscape.main(args)
    with open(f"{out}.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["t"]) for r in rows] == [-0.5, 0.5, 1.5] and os.path.getsize(f"{out}.png") > 0

    landscape.main(landscape.Args(offline=[offline_path], finetuned=[finetuned_path], points=2, episodes=2,
                                  out=out, cuda=False))
    with open(f"{out}.csv") as f:
        start, end = list(csv.DictReader(f))
    device = torch.device("cpu")
    for path, row in ((offline_path, start), (finetuned_path, end)):
        ckpt, actor, _, _ = smac.load_checkpoint(path, device)
        env = smac.make_env(ckpt["task"], ckpt["obs_mean"].numpy(), ckpt["obs_std"].numpy())
        returns = smac.evaluate(actor, env, 2, device)[0]
        expected = sum(smac.normalized_score(ckpt["task"], r) for r in returns) / 2
        assert float(row["normalized_score_mean"]) == pytest.approx(expected, abs=1e-3)
    # and the offline end is the score smac.py itself recorded
    with open(os.path.join(os.path.dirname(offline_path), "metrics.csv")) as f:
        recorded = float(list(csv.DictReader(f))[-1]["normalized_score"])
    assert float(start["normalized_score_mean"]) == pytest.approx(recorded, abs=1e-3)
    assert start["normalized_score_mean"] != end["normalized_score_mean"]  # the two ends are different actors


def altered(path, tmp_path, **changes):
    ckpt = torch.load(path, weights_only=True)
    ckpt.update(changes)
    new_path = str(tmp_path / "altered.pt")
    torch.save(ckpt, new_path)
    return new_path


@pytest.mark.parametrize("change, message", [
    (lambda c: dict(env="walker2d-medium-v2", task={**c["task"], "name": "walker2d-medium-v2"}),
     "is for walker2d-medium-v2"),
    (lambda c: dict(args={**c["args"], "hidden_dim": 16}, hidden_dim=16, actor=smac.Actor(11, 3, 16).state_dict(),
                    critic=smac.TwinCritic(11, 3, 16).state_dict(),
                    target_critic=smac.TwinCritic(11, 3, 16).state_dict()),
     "different shapes"),
    (lambda c: dict(obs_mean=c["obs_mean"] + 1.0), "normalize observations differently"),
])
def test_mismatched_checkpoints_give_one_clear_error(tmp_path, run_pair, change, message):
    offline_path, finetuned_path = run_pair
    bad = altered(finetuned_path, tmp_path, **change(torch.load(finetuned_path, weights_only=True)))
    args = landscape.Args(offline=[offline_path], finetuned=[bad], points=2, episodes=1, out=str(tmp_path / "x"),
                          cuda=False)
    with pytest.raises(smac.SMACError, match=message):
        landscape.main(args)
    assert not os.path.exists(tmp_path / "x.csv")


def test_unpaired_arguments(tmp_path, run_pair):
    with pytest.raises(smac.SMACError, match="as many --finetuned"):
        landscape.main(landscape.Args(offline=[run_pair[0]], finetuned=[], out=str(tmp_path / "x")))
