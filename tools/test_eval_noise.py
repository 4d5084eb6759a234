"""tools/eval_noise.py on a tiny checkpoint."""

import os
import sys

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
