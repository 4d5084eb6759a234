"""Speed benchmark: offline updates per second of smac.py with and without the regularizer, and online steps per
second of sac_finetune.py. Configurations are interleaved over repeats and medians reported, since this machine is
noisy. Evaluation time is excluded from the offline figures.

    python tools/benchmark.py --dataset-path ../shared/datasets/hopper_medium-local.hdf5
"""

import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sac_finetune  # noqa: E402
import smac  # noqa: E402


@dataclass
class Args:
    dataset_path: str
    """D4RL-format HDF5 file (hopper)"""
    env: str = "hopper-medium-replay-v2"
    """D4RL name of the dataset's task"""
    updates: int = 3000
    """offline updates per measurement"""
    repeats: int = 3
    """measurements per configuration, interleaved"""
    online_steps: int = 3000
    """online SAC steps to time (0 skips the online benchmark)"""


CONFIGS = {  # the diffusion model's own training (--score-model-updates) is timed apart by smac.py's log
    "score-coef 0 (baseline)": dict(score_coef=0.0),
    "SMAC (defaults)": dict(),
}


def main(args: Args) -> None:
    out = tempfile.mkdtemp(prefix="smac_bench_")
    common = dict(env=args.env, dataset_path=args.dataset_path, total_updates=args.updates, eval_freq=0,
                  score_model_updates=10,
                  eval_episodes=1, run_dir=out, cuda=False)
    sps = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name, extra in CONFIGS.items():
            sps[name].append(smac.train(smac.Args(**common, **extra))["sps"])
    base = np.median(sps["score-coef 0 (baseline)"])
    print("\n| offline configuration | updates/s (median) | all | update time vs baseline |\n|---|---|---|---|")
    for name, values in sps.items():
        print(f"| {name} | {np.median(values):.0f} | {values} | {base / np.median(values):.2f}x |")
    if args.online_steps:  # wall time of the whole online run, updates from the first step, two 1-episode evals
        ckpt = smac.train(smac.Args(**{**common, "total_updates": 200}))["run_dir"]
        start = time.time()
        online = sac_finetune.Args(checkpoint=os.path.join(ckpt, "smac.pt"), total_timesteps=args.online_steps,
                                   learning_starts=1, eval_freq=10**9, eval_episodes=1, run_dir=out, cuda=False)
        sac_finetune.train(online)
        print(f"\nonline SAC fine-tuning (sac_finetune.py, batch 256, 256x256, policy delay 2): "
              f"{args.online_steps / (time.time() - start):.0f} env steps/s")


if __name__ == "__main__":
    main(tyro.cli(Args))
