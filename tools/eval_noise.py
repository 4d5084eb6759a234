"""How noisy is an evaluation? One checkpoint's deterministic policy over disjoint sets of episode seeds: the spread
of the per-set mean normalized score is what a fixed policy's evaluation varies by (the fine-tuners use seeds 0..E-1;
any online update changes the policy enough to redraw its episodes).

    python tools/eval_noise.py runs/<run>/smac.pt --sets 10 --episodes 5
"""

import os
import sys
from dataclasses import dataclass
from typing import List

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import smac  # noqa: E402


@dataclass
class Args:
    checkpoints: tyro.conf.Positional[List[str]]
    """smac.pt or final.pt files"""
    sets: int = 10
    """disjoint sets of episode seeds"""
    episodes: int = 5
    """episodes per set (the evaluation size under test)"""


@torch.no_grad()
def set_means(path: str, sets: int, episodes: int) -> np.ndarray:
    ckpt, actor, _, _ = smac.load_checkpoint(path, torch.device("cpu"))
    env = smac.make_env(ckpt["task"], ckpt["obs_mean"].numpy(), ckpt["obs_std"].numpy())
    scores = []
    for seed in range(sets * episodes):
        (obs, _), done, total = env.reset(seed=seed), False, 0.0
        while not done:
            action = actor.act(torch.as_tensor(obs)[None], deterministic=True)[0].numpy()
            obs, reward, terminated, truncated, _ = env.step(action)
            total, done = total + float(reward), terminated or truncated
        scores.append(smac.normalized_score(ckpt["task"], total))
    return np.array(scores).reshape(sets, episodes).mean(1)


def main(args: Args) -> None:
    for path in args.checkpoints:
        means = set_means(path, args.sets, args.episodes)
        print(f"{path}: {args.episodes}-episode means {np.round(means, 1).tolist()}; std {means.std():.1f}, "
              f"range {means.min():.1f}-{means.max():.1f}")


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except smac.SMACError as e:
        sys.exit(f"error: {e}")
