"""How noisy is an evaluation? One checkpoint's deterministic policy over disjoint sets of episode seeds: the spread
of the per-set mean normalized score is what a fixed policy's evaluation varies by (the fine-tuners use seeds 0..E-1;
any online update changes the policy enough to redraw its episodes). With --window-evals K, also the drop a policy
that never changes would show: the step-0 evaluation and K more in the drop window, drawn as distinct sets.

    python tools/eval_noise.py runs/<run>/smac.pt --sets 30 --episodes 5 --window-evals 7
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
    window_evals: int = 0
    """evaluations in the drop window after step 0 (0: skip the drop floor; climb-30k's protocol has 7)"""
    draws: int = 20_000
    """random draws of the sets that estimate the drop floor"""

    def __post_init__(self):  # before any episode runs: bad flags cost nothing
        smac.check_flags(self, smac.AT_LEAST_1, "sets", "episodes", "draws")
        smac.check_flags(self, smac.AT_LEAST_0, "window_evals")
        check_enough_sets(self.sets, self.window_evals)


def check_enough_sets(sets: int, window_evals: int) -> None:
    if sets < window_evals + 1:
        raise smac.SMACError(f"--window-evals {window_evals} needs at least {window_evals + 1} sets, got {sets}")


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


def drop_floor(means: np.ndarray, window_evals: int, draws: int, seed: int = 0) -> float:
    """E[max(0, X_0 - min(X_1..X_K))] over K + 1 distinct sets X drawn at random: the drop (transfer_metrics) of a
    policy whose score distribution never moves, each evaluation a fresh draw of its episodes."""
    check_enough_sets(len(means), window_evals)
    rng = np.random.default_rng(seed)
    picks = means[np.argsort(rng.random((draws, len(means))), axis=1)[:, :window_evals + 1]]
    return float(np.maximum(0.0, picks[:, 0] - picks[:, 1:].min(1)).mean())


def main(args: Args) -> None:
    for path in args.checkpoints:
        means = set_means(path, args.sets, args.episodes)
        floor = (f"; drop of an unchanged policy over {args.window_evals} window evaluations "
                 f"{drop_floor(means, args.window_evals, args.draws):.2f}" if args.window_evals else "")
        print(f"{path}: {args.episodes}-episode means {np.round(means, 1).tolist()}; std {means.std():.1f}, "
              f"range {means.min():.1f}-{means.max():.1f}{floor}")


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except smac.SMACError as e:
        sys.exit(f"error: {e}")
