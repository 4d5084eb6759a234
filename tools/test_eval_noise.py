"""tools/eval_noise.py on a tiny checkpoint."""

import os
import sys

import numpy as np
import pytest

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TOOLS, os.path.dirname(TOOLS)]
import eval_noise  # noqa: E402
from test_smac import small_args, write_hdf5  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is out of date")


def test_eval_noise_sets_are_the_evaluations_own_episodes(tmp_path):
    """The first set (seeds 0..E-1) is exactly what smac.evaluate scores, so the spread is of real evaluations."""
    result = eval_noise.smac.train(small_args(tmp_path, write_hdf5(tmp_path / "d.hdf5"), eval_episodes=3))
    means = eval_noise.set_means(os.path.join(result["run_dir"], "smac.pt"), sets=2, episodes=3)
    assert means.shape == (2,) and means[0] == pytest.approx(result["normalized_score"], abs=1e-4)


def test_drop_floor_is_the_expected_fall_between_fresh_draws():
    """Two sets 0 and 10, one window evaluation: the first draw is 10 and the other 0 half the time, so 5; equal sets
    never drop; more window evaluations can only lower the minimum."""
    assert eval_noise.drop_floor(np.array([0.0, 10.0]), 1, draws=20_000) == pytest.approx(5.0, abs=0.2)
    assert eval_noise.drop_floor(np.full(5, 3.0), 4, draws=100) == 0.0
    spread = np.random.default_rng(1).normal(30, 5, 30)
    assert eval_noise.drop_floor(spread, 7, 20_000) > eval_noise.drop_floor(spread, 1, 20_000) > 0
    with pytest.raises(eval_noise.smac.SMACError, match="needs at least 8 sets"):
        eval_noise.drop_floor(spread[:7], 7, 100)


@pytest.mark.parametrize("flags, message", [({"sets": 0}, "--sets"), ({"episodes": 0}, "--episodes"),
                                            ({"window_evals": -1}, "--window-evals"),
                                            ({"sets": 7, "window_evals": 7}, "needs at least 8 sets")])
def test_bad_flags_fail_before_any_episode(flags, message):
    with pytest.raises(eval_noise.smac.SMACError, match=message):
        eval_noise.Args(checkpoints=["does-not-matter.pt"], **flags)
