"""What the first online TD updates do to an offline critic's preferences among actions, before the actor moves: a
probe of the hand-over that costs seconds instead of a fine-tuning run (dev log, session 9).

From each checkpoint, the offline policy collects --online-steps transitions (as the fine-tuners' learning-starts),
then the critic alone takes TD updates on them as `sac_finetune.py --score-coef 0` would (fresh Adam, --q-lr, the
checkpoint's alpha, soft target updates); with --score-coef, TD + kappa * L_SM, as the fine-tuners' default does.
At the checkpoint's dataset states, with policy samples at each state:
  action_spread     std over a state's policy samples of min_i Q(s, a), mean over states (offline -> after)
  uniform_spread    the same over uniform actions, offline
  preference_corr   correlation over a state's samples of the offline and the updated min_i Q(s, .), mean over
                    states: 1, the critic still ranks the policy's actions as offline; ~0, TD has rewritten them
  actor_grad_cos    cosine of SAC's actor-loss gradients under the offline and the updated critic
  actor_grad_ratio  their norms, updated / offline
It reads the first ~100 updates only: a critic that keeps its ranking there can still lead the policy down later.

    python tools/handover_probe.py runs/<run>/smac.pt [other.pt ...] --updates 25 100 500
"""

import os
import sys
from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import smac  # noqa: E402


@dataclass
class Args:
    checkpoints: tyro.conf.Positional[List[str]]
    """smac.pt files to probe"""
    updates: List[int] = field(default_factory=lambda: [25, 100, 500])
    """report after this many TD updates of the critic"""
    online_steps: int = 1000
    """transitions the offline policy collects before the updates (the fine-tuners' --learning-starts)"""
    states: int = 256
    """dataset states (evenly spaced over the dataset) at which the critic is compared"""
    samples: int = 16
    """policy samples per state"""
    q_lr: float = 3e-4
    """learning rate of the critic's updates (the fine-tuners' --q-lr)"""
    score_coef: float = 0.0
    """kappa of SMAC's penalty in the critic's updates (0: plain TD; the fine-tuners' default is the checkpoint's)"""
    seed: int = 1
    """seed of the rollout, the samples and the updates"""


def actor_gradient(actor, critic, obs, alpha) -> torch.Tensor:
    torch.manual_seed(0)  # the same policy samples under both critics
    loss = smac.sac_actor_loss(*actor(obs), obs, critic, alpha)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(actor.parameters()))])


def probe(path: str, args: Args) -> List[dict]:
    smac.seed_everything(args.seed, True)
    device = torch.device("cpu")
    ckpt, actor, critic, target_critic = smac.load_checkpoint(path, device)
    env = smac.make_env(ckpt["task"], ckpt["obs_mean"].numpy(), ckpt["obs_std"].numpy())
    buffer = smac.ReplayBuffer(args.online_steps, len(ckpt["obs_mean"]), env.action_space.shape[0], device)
    obs, _ = env.reset(seed=args.seed)
    for _ in range(args.online_steps):
        with torch.no_grad():
            action = actor.act(torch.as_tensor(obs)[None])[0].numpy()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buffer.add(observations=obs[None], actions=action[None], rewards=[reward], next_observations=next_obs[None],
                   dones=[terminated])
        obs = env.reset()[0] if terminated or truncated else next_obs

    data = smac.load_dataset(ckpt["env"], ckpt["args"]["dataset_path"])  # evenly spaced dataset states
    idx = np.linspace(0, len(data["observations"]) - 1, args.states).astype(int)
    obs_mean, obs_std = ckpt["obs_mean"].numpy(), ckpt["obs_std"].numpy()
    states = torch.as_tensor((data["observations"][idx] - obs_mean) / obs_std, dtype=torch.float32)
    with torch.no_grad():  # (samples, states) grids of actions and of the offline critic's values
        mean, log_std = actor(states)
        actions = smac.tanh_gaussian_sample(mean.repeat(args.samples, 1), log_std.repeat(args.samples, 1))[0]
        uniform = torch.rand_like(actions) * 2.0 - 1.0
        repeated = states.repeat(args.samples, 1)
        q_offline = critic(repeated, actions).min(0).values.view(args.samples, -1)
        uniform_spread = critic(repeated, uniform).min(0).values.view(args.samples, -1).std(0).mean().item()
    grad_offline = actor_gradient(actor, critic, states, ckpt["alpha"])

    critic_opt, rows = torch.optim.Adam(critic.parameters(), lr=args.q_lr), []
    if args.score_coef > 0:
        score_model, score_scale = smac.load_score_nets(ckpt, path, device)
    for update in range(1, max(args.updates) + 1):
        batch = buffer.sample(256)
        loss = smac.td_loss(critic, batch, smac.soft_td_target(actor, target_critic, batch, 0.99, ckpt["alpha"]))
        if args.score_coef > 0:  # as the fine-tuners' --score-coef: kappa * L_SM at the batch's states
            with torch.no_grad():
                mean, log_std = actor(batch["observations"])
            loss = loss + args.score_coef * smac.score_matching_penalty(
                critic, score_scale, score_model, batch["observations"], mean, log_std, ckpt["w_query"])
        critic_opt.zero_grad()
        loss.backward()
        critic_opt.step()
        smac.soft_update(critic, target_critic, 0.005)
        if update in args.updates:
            with torch.no_grad():
                q_now = critic(repeated, actions).min(0).values.view(args.samples, -1)
            before, after = q_offline - q_offline.mean(0), q_now - q_now.mean(0)
            corr = (before * after).sum(0) / (before.norm(dim=0) * after.norm(dim=0)).clamp_min(1e-8)
            grad_now = actor_gradient(actor, critic, states, ckpt["alpha"])
            rows.append({"updates": update, "action_spread": q_offline.std(0).mean().item(),
                         "action_spread_after": q_now.std(0).mean().item(), "uniform_spread": uniform_spread,
                         "preference_corr": corr.mean().item(),
                         "actor_grad_cos": F.cosine_similarity(grad_offline, grad_now, 0).item(),
                         "actor_grad_ratio": (grad_now.norm() / grad_offline.norm().clamp_min(1e-12)).item()})
    return rows


def main(args: Args) -> str:
    if not args.updates or min(args.updates) < 1 or args.online_steps < 1 or args.states < 1 or args.samples < 2:
        raise smac.SMACError("--updates must be >= 1, --online-steps and --states >= 1, --samples >= 2")
    if not args.q_lr >= 0 or not args.score_coef >= 0:
        raise smac.SMACError(f"--q-lr and --score-coef must be >= 0, got {args.q_lr}, {args.score_coef}")
    torch.set_num_threads(1)
    lines = ["| run | updates | action spread (offline -> after) | uniform spread | preference corr | "
             "actor grad cos | actor grad ratio |", "|---|---|---|---|---|---|---|"]
    for path in args.checkpoints:
        run = os.path.basename(os.path.dirname(os.path.abspath(path)))
        for r in probe(path, args):
            lines.append(f"| {run} | {r['updates']} | {r['action_spread']:.3f} -> {r['action_spread_after']:.3f} | "
                         f"{r['uniform_spread']:.3f} | {r['preference_corr']:.2f} | {r['actor_grad_cos']:.2f} | "
                         f"{r['actor_grad_ratio']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        print(main(tyro.cli(Args)))
    except smac.SMACError as e:
        sys.exit(f"error: {e}")
