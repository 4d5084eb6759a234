"""Where one offline SMAC update spends its time: each part of smac.py's update timed on its own (random data of the
hopper shapes, the default networks), median over repeats. Prints a table in milliseconds.

    OMP_NUM_THREADS=1 python tools/profile_update.py --penalty-states 256
"""

import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import smac  # noqa: E402


@dataclass
class Args:
    batch_size: int = 256
    """minibatch size"""
    penalty_states: int = 256
    """states at which the penalty is estimated"""
    repeats: int = 200
    """timed repetitions of each part"""
    obs_dim: int = 11
    """observation size (hopper)"""
    act_dim: int = 3
    """action size (hopper)"""


def timed(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main(args: Args) -> None:
    torch.manual_seed(0)
    n, b = args.penalty_states, args.batch_size
    actor, critic = smac.Actor(args.obs_dim, args.act_dim), smac.TwinCritic(args.obs_dim, args.act_dim)
    target_critic = smac.TwinCritic(args.obs_dim, args.act_dim)
    score_model = smac.ScoreModel(args.obs_dim, args.act_dim)
    score_model.requires_grad_(False)
    score_scale = smac.ScoreScale(args.obs_dim, floor=0.2)
    batch = {"observations": torch.randn(b, args.obs_dim), "actions": torch.rand(b, args.act_dim) * 2 - 1,
             "rewards": torch.randn(b, 1), "next_observations": torch.randn(b, args.obs_dim),
             "dones": torch.zeros(b, 1)}
    obs, w = batch["observations"], torch.full((n, 1), 0.7)
    actor_opt = torch.optim.Adam(actor.parameters())
    critic_opt = torch.optim.Adam([*critic.parameters(), *score_scale.parameters()])

    def td():
        y = smac.soft_td_target(actor, target_critic, batch, 0.99, 0.2)
        smac.td_loss(critic, batch, y).backward()

    def penalty():
        mean, log_std = actor(obs[:n])
        smac.score_matching_penalty(critic, score_scale, score_model, obs[:n], mean, log_std, 0.7).backward()

    def score_query():
        with torch.no_grad():
            score_model.score(obs[:n], batch["actions"][:n], w)

    def actor_step():
        smac.sac_actor_loss(*actor(obs), obs, critic, 0.2).backward()

    parts = {"TD target + TD loss, forward and backward": td, "penalty: all of it": penalty,
             "  of which the diffusion model's score query": score_query,
             "SAC actor loss, forward and backward": actor_step,
             "optimizer steps (actor, critic + alpha_psi)": lambda: (actor_opt.step(), critic_opt.step()),
             "target critic update": lambda: smac.soft_update(critic, target_critic, 0.005)}
    results = {name: timed(fn, args.repeats) for name, fn in parts.items()}
    total = sum(v for k, v in results.items() if not k.startswith("  "))
    threads = torch.get_num_threads()
    print(f"\n| part of one update (batch {b}, penalty at {n} states, {threads} thread(s)) | ms | share |")
    print("|---|---|---|")
    for name, ms in results.items():
        print(f"| {name} | {ms:.2f} | {100 * ms / total:.0f}% |")
    print(f"| sum | {total:.2f} | |")
    ratio = total / (total - results["penalty: all of it"])
    print(f"penalty cost ratio estimate: sum / (sum - penalty) = {ratio:.2f}x")


if __name__ == "__main__":
    main(tyro.cli(Args))
