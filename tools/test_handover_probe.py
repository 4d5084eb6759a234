"""The hand-over probe: a critic that does not move keeps its preferences exactly; TD updates change them."""

import os
import sys

import pytest

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TOOLS, os.path.dirname(TOOLS)]
import handover_probe  # noqa: E402
import smac  # noqa: E402
from test_smac import small_args, write_hdf5  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is out of date")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("probe")
    offline = smac.train(small_args(tmp_path, write_hdf5(tmp_path / "d.hdf5", n=600), eval_episodes=1))
    return os.path.join(offline["run_dir"], "smac.pt")


def test_an_unmoved_critic_keeps_its_preferences_and_td_updates_change_them(checkpoint):
    args = handover_probe.Args([checkpoint], updates=[3, 20], online_steps=50, states=16, samples=8)
    frozen = handover_probe.probe(checkpoint, handover_probe.Args(**{**vars(args), "q_lr": 0.0}))
    assert [r["updates"] for r in frozen] == [3, 20]
    for r in frozen:  # lr 0: the critic is the offline one, whatever the TD loss says
        assert r["preference_corr"] == pytest.approx(1.0, abs=1e-5)
        assert r["actor_grad_cos"] == pytest.approx(1.0, abs=1e-5)
        assert r["actor_grad_ratio"] == pytest.approx(1.0, abs=1e-5)
        assert r["action_spread_after"] == pytest.approx(r["action_spread"], rel=1e-5)
    moved = handover_probe.probe(checkpoint, handover_probe.Args(**{**vars(args), "q_lr": 1e-2}))
    assert moved[-1]["preference_corr"] < 0.99 and moved[-1]["actor_grad_cos"] < 0.99
    kept = handover_probe.probe(checkpoint, handover_probe.Args(**{**vars(args), "q_lr": 1e-2, "score_coef": 10.0}))
    assert kept[-1]["preference_corr"] != pytest.approx(moved[-1]["preference_corr"], abs=1e-4)  # the penalty acts
    table = handover_probe.main(args)
    assert table.count("\n") == 3 and os.path.basename(os.path.dirname(checkpoint)) in table


def test_bad_input_is_one_clear_error(checkpoint, tmp_path):
    with pytest.raises(smac.SMACError, match="--samples"):
        handover_probe.main(handover_probe.Args([checkpoint], samples=1))
    with pytest.raises(smac.SMACError, match="--q-lr"):
        handover_probe.main(handover_probe.Args([checkpoint], q_lr=-1.0))
    with pytest.raises(smac.SMACError, match="--score-coef"):
        handover_probe.main(handover_probe.Args([checkpoint], score_coef=float("nan")))
    with pytest.raises(smac.SMACError, match="does not exist"):
        handover_probe.main(handover_probe.Args([str(tmp_path / "missing.pt")], updates=[1]))
