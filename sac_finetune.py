"""Online SAC fine-tuning of a SMAC checkpoint; without --checkpoint, plain online SAC from scratch.

    python sac_finetune.py --checkpoint runs/<run_name>/smac.pt

The online phase is plain SAC: the SMAC regularizer is not used here. What SMAC changes is where SAC starts.
This file also holds the online helpers that td3_finetune.py imports: set-up from a checkpoint, the evaluation log
with drop and regret, and the final checkpoint.
"""

import copy
import csv
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import tyro

import smac


@dataclass
class Args:
    checkpoint: Optional[str] = None
    """SMAC checkpoint (smac.pt) to fine-tune; without it, SAC learns from scratch on --env"""
    env: Optional[str] = None
    """D4RL name of the task; taken from the checkpoint when one is given (and must then agree with it)"""
    dataset_path: Optional[str] = None
    """D4RL-format HDF5 for --offline-ratio; default: the checkpoint's dataset path or the D4RL cache"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, CUDA is used when available (CPU otherwise)"""
    track: bool = False
    """if toggled, the run is tracked with Weights and Biases"""
    wandb_project_name: str = "smac"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    exp_name: str = "sac_finetune"
    """the name of this experiment (first part of the run name)"""
    run_dir: str = "runs"
    """folder in which runs/{run_name}/ (TensorBoard logs, metrics.csv, final.pt) is written"""
    total_timesteps: int = 250_000
    """online environment steps"""
    buffer_size: int = 1_000_000
    """capacity of the online replay buffer"""
    batch_size: int = 256
    """minibatch size"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target critic smoothing coefficient"""
    policy_lr: float = 3e-4
    """learning rate of the actor"""
    q_lr: float = 3e-4
    """learning rate of the critics"""
    optimizer: Literal["adam", "muon"] = "adam"
    """adam, or muon: torch.optim.Muon on 2-D weight matrices and AdamW on the rest (as smac.py --optimizer)"""
    policy_frequency: int = 2
    """the actor (and alpha) is updated every this many steps, that many times (delayed updates, as CleanRL)"""
    learning_starts: Optional[int] = None
    """online steps before updates begin; default 5000 from scratch (random actions), 1000 with a checkpoint"""
    alpha: Optional[float] = None
    """initial entropy temperature; default: the checkpoint's alpha (0.2 from scratch)"""
    autotune: bool = True
    """if toggled, alpha is tuned toward the target entropy; otherwise it stays fixed"""
    target_entropy: Optional[float] = None
    """target entropy of the alpha tuning; default -act_dim"""
    offline_ratio: float = 0.0
    """fraction of each minibatch drawn from the checkpoint's offline dataset (0: online data only)"""
    eval_freq: int = 5000
    """evaluate every this many online steps (also at step 0 and after 100, 500 and 1000 updates)"""
    drop_window: Optional[int] = None
    """drop = step-0 score - lowest evaluation within this many updates; default max(5000, 10% of the updates)"""
    eval_episodes: int = 10
    """number of deterministic evaluation episodes"""
    eval_seed: int = 0
    """evaluation episode i is reset with seed eval_seed + i (as in smac.py)"""


# ---------------------------------------------------------------- online helpers, shared with td3_finetune.py
def setup_online(args, device: torch.device) -> dict:
    """Networks, env and normalization from the checkpoint, or fresh ones for learning from scratch."""
    if args.checkpoint is None:
        if args.env is None:
            raise smac.SMACError("give --checkpoint runs/<run>/smac.pt, or --env <D4RL name> to learn from scratch")
        probe = smac.make_env(args.env, 0.0, 1.0)
        obs_dim, act_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
        obs_mean, obs_std = np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32)
        actor, critic = smac.Actor(obs_dim, act_dim).to(device), smac.TwinCritic(obs_dim, act_dim).to(device)
        target_critic = smac.TwinCritic(obs_dim, act_dim).to(device)
        target_critic.load_state_dict(critic.state_dict())
        ckpt = {"env": args.env, "alpha": 0.2, "obs_mean": obs_mean, "obs_std": obs_std,
                "probe_obs": torch.zeros(0, obs_dim)}  # no offline policy: KL to it is nan
    else:
        ckpt, actor, critic, target_critic = smac.load_checkpoint(args.checkpoint, device)
        if args.env is not None and args.env != ckpt["env"]:
            raise smac.SMACError(f"--env {args.env} differs from the checkpoint's env {ckpt['env']}")
        obs_mean, obs_std = np.asarray(ckpt["obs_mean"]), np.asarray(ckpt["obs_std"])
    env_name = smac.check_env_name(ckpt["env"])
    env, eval_env = smac.make_env(env_name, obs_mean, obs_std), smac.make_env(env_name, obs_mean, obs_std)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    offline = None
    if args.offline_ratio > 0:
        if args.checkpoint is None:
            raise smac.SMACError("--offline-ratio needs a --checkpoint (its dataset and normalization)")
        path = args.dataset_path or ckpt["args"]["dataset_path"]
        data = smac.load_dataset(env_name, path, obs_dim, act_dim)
        offline = smac.dataset_buffer(data, obs_mean, obs_std, device)
    learning_starts = args.learning_starts
    if learning_starts is None:
        learning_starts = 5000 if args.checkpoint is None else 1000
    return dict(ckpt=ckpt, env_name=env_name, env=env, eval_env=eval_env, actor=actor, critic=critic,
                target_critic=target_critic, obs_mean=obs_mean, obs_std=obs_std, obs_dim=obs_dim, act_dim=act_dim,
                offline=offline, learning_starts=learning_starts,
                probe_obs=ckpt["probe_obs"].to(device))


def sample_batch(online: smac.ReplayBuffer, offline: Optional[smac.ReplayBuffer], args) -> dict:
    """A minibatch with round(offline_ratio * batch_size) transitions from the offline data."""
    n_offline = round(args.offline_ratio * args.batch_size) if offline is not None else 0
    if n_offline == 0:
        return online.sample(args.batch_size)
    a, b = online.sample(args.batch_size - n_offline), offline.sample(n_offline)
    return {k: torch.cat([a[k], b[k]]) for k in a}


HANDOVER_UPDATES = (100, 500, 1000)  # extra evaluations (score and KL to the offline policy) after the hand-over


class OnlineLog:
    """Evaluations, training episodes, metrics.csv and the transfer metrics of one online run.
    drop   = max(0, score at step 0 - lowest evaluation within the first drop_window updates), normalized points;
             counted in updates, from the step at which updates begin, so a fall caused by them is always seen
    regret = mean over online training episodes of (1 - normalized return / 100)   (as Cal-QL and CORL)
    The hand-over diagnostics: kl_to_offline = mean KL(pi_offline || pi_t) at the checkpoint's probe dataset states
    at each evaluation; td_grad_ratio = norm of the critic's TD-loss gradient over the first 10 online updates,
    relative to its offline value on the dataset."""

    def __init__(self, run_dir: str, env_name: str, args, setup: dict, writer):
        self.path, self.env_name, self.writer = os.path.join(run_dir, "metrics.csv"), env_name, writer
        self.learning_starts = setup["learning_starts"]
        updates = max(0, args.total_timesteps - self.learning_starts)
        self.drop_window = args.drop_window if args.drop_window is not None else max(5000, updates // 10)
        if self.drop_window < 0:
            raise smac.SMACError(f"--drop-window must be >= 0, got {self.drop_window}")
        self.eval_steps = {self.learning_starts + u for u in HANDOVER_UPDATES if self.learning_starts + u < args.total_timesteps}
        self.offline_actor = copy.deepcopy(setup["actor"]).requires_grad_(False)
        self.probe_obs = setup["probe_obs"]
        self.offline_td_grad_norm = setup["ckpt"].get("diagnostics", {}).get("td_grad_norm", math.nan)
        self.evals, self.train_scores, self.pending, self.td_grad_norms, self.kl = [], [], [], [], {}
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerow(["step", "updates", "normalized_score", "kl_to_offline", "train_episode_returns"])

    def episode(self, step: int, episode_return: float) -> None:
        score = smac.normalized_score(self.env_name, episode_return)
        self.train_scores.append(score)
        self.pending.append(episode_return)
        self.writer.add_scalar("charts/episodic_return", episode_return, step)
        self.writer.add_scalar("charts/normalized_return", score, step)

    def critic_step(self, critic) -> None:
        """Call after the critic's backward: records the TD-gradient norm of the first 10 online updates."""
        if len(self.td_grad_norms) < 10:
            self.td_grad_norms.append(torch.sqrt(sum((p.grad**2).sum() for p in critic.parameters())).item())

    @torch.no_grad()
    def kl_to_offline(self, actor) -> float:
        if len(self.probe_obs) == 0:
            return math.nan
        return smac.gaussian_kl(*self.offline_actor(self.probe_obs), *actor(self.probe_obs)).mean().item()

    def due(self, step: int, args) -> bool:
        return step % args.eval_freq == 0 or step == args.total_timesteps or step in self.eval_steps

    def evaluate(self, step: int, actor, eval_env, args, device) -> float:
        returns = smac.evaluate(actor, eval_env, args.eval_episodes, args.eval_seed, device)
        score = float(np.mean([smac.normalized_score(self.env_name, r) for r in returns]))
        updates, kl = max(0, step - self.learning_starts), self.kl_to_offline(actor)
        self.evals.append((step, score))
        self.kl[updates] = kl
        with open(self.path, "a", newline="") as f:  # one row per evaluation, written as it happens
            csv.writer(f).writerow([step, updates, f"{score:.4f}", f"{kl:.5g}", " ".join(f"{r:.2f}" for r in self.pending)])
        self.pending = []
        self.writer.add_scalar("eval/normalized_score", score, step)
        self.writer.add_scalar("eval/kl_to_offline", kl, step)
        print(f"eval step={step} updates={updates} normalized_score={score:.1f} kl_to_offline={kl:.4g}", flush=True)
        return score

    def summary(self) -> dict:
        start = self.evals[0][1]
        early = [score for step, score in self.evals if step <= self.learning_starts + self.drop_window]
        regret = float(np.mean([1.0 - s / 100.0 for s in self.train_scores])) if self.train_scores else math.nan
        td_ratio = float(np.mean(self.td_grad_norms)) / self.offline_td_grad_norm if self.td_grad_norms else math.nan
        return {"step0_score": start, "lowest_early_score": min(early), "drop": max(0.0, start - min(early)),
                "regret": regret, "final_score": self.evals[-1][1], "train_episodes": len(self.train_scores),
                "td_grad_ratio": td_ratio, **{f"kl_{u}": self.kl.get(u, math.nan) for u in HANDOVER_UPDATES}}


def finish(setup: dict, args, log: OnlineLog, run_dir: str, alpha: float, writer) -> dict:
    """Write the fine-tuned actor-critic as final.pt (same format as smac.pt) and print the summary line."""
    summary = log.summary()
    ckpt = setup["ckpt"]
    smac.save_checkpoint(
        os.path.join(run_dir, "final.pt"), actor=smac.cpu_state(setup["actor"]), critic=smac.cpu_state(setup["critic"]),
        target_critic=smac.cpu_state(setup["target_critic"]), alpha=float(alpha), env=setup["env_name"],
        obs_mean=torch.as_tensor(setup["obs_mean"]), obs_std=torch.as_tensor(setup["obs_std"]),
        obs_dim=setup["obs_dim"], act_dim=setup["act_dim"], hidden_dim=setup["actor"].net[0].out_features,
        critic_activation=setup["critic"].activation, probe_obs=setup["probe_obs"].cpu(),
        args=ckpt.get("args", {}), online_args=asdict(args), normalized_score=summary["final_score"],
        update=args.total_timesteps, summary=summary)
    for key, value in summary.items():
        writer.add_scalar(f"summary/{key}", value, args.total_timesteps)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    print(f"fine-tuned checkpoint: {os.path.join(run_dir, 'final.pt')}")
    writer.close()
    return {"run_dir": run_dir, **summary}


def online_run_name(args, setup) -> str:
    return f"{setup['env_name']}__{args.exp_name}__{args.seed}__{int(time.time())}"


# ---------------------------------------------------------------- SAC
def train(args: Args) -> dict:
    smac.seed_everything(args.seed, args.torch_deterministic)
    device = smac.pick_device(args.cuda)
    setup = setup_online(args, device)
    env, actor, critic, target_critic = setup["env"], setup["actor"], setup["critic"], setup["target_critic"]
    run_name = online_run_name(args, setup)
    run_dir = os.path.join(args.run_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)
    writer = smac.start_logging(args, run_name, run_dir)

    actor_opt = smac.make_optimizer([actor], args.policy_lr, args.optimizer)
    critic_opt = smac.make_optimizer([critic], args.q_lr, args.optimizer)
    log_alpha = torch.tensor(math.log(args.alpha or setup["ckpt"]["alpha"]), device=device, requires_grad=True)
    alpha = log_alpha.exp().item()
    alpha_opt = torch.optim.Adam([log_alpha], lr=args.q_lr)
    target_entropy = args.target_entropy if args.target_entropy is not None else -float(setup["act_dim"])
    buffer = smac.ReplayBuffer(min(args.buffer_size, args.total_timesteps), setup["obs_dim"], setup["act_dim"], device)
    log = OnlineLog(run_dir, setup["env_name"], args, setup, writer)
    log.evaluate(0, actor, setup["eval_env"], args, device)  # the offline policy opens the curve

    obs, _ = env.reset(seed=args.seed)
    actor_loss, start_time = torch.zeros(()), time.time()
    for step in range(1, args.total_timesteps + 1):
        if args.checkpoint is None and step <= setup["learning_starts"]:
            action = env.action_space.sample()  # random warm-up only when learning from scratch
        else:
            with torch.no_grad():
                action = actor.act(torch.as_tensor(obs, device=device)[None])[0].cpu().numpy()
        next_obs, reward, terminated, truncated, info = env.step(action)
        buffer.add(observations=obs[None], actions=action[None], rewards=[reward], next_observations=next_obs[None],
                   dones=[terminated])  # a time-limit end is not terminal: the target still bootstraps
        obs = next_obs
        if terminated or truncated:
            log.episode(step, float(info["episode"]["r"]))
            obs, _ = env.reset()

        if step > setup["learning_starts"]:
            batch = sample_batch(buffer, setup["offline"], args)
            # y = r + gamma (1 - d) (min_i Q'_i(s', a') - alpha log pi(a'|s')),   a' ~ pi(.|s')
            y = smac.soft_td_target(actor, target_critic, batch, args.gamma, alpha)
            critic_loss = (critic(batch["observations"], batch["actions"]) - y).pow(2).mean(1).sum()
            critic_opt.zero_grad()
            critic_loss.backward()
            log.critic_step(critic)
            critic_opt.step()

            if step % args.policy_frequency == 0:
                for _ in range(args.policy_frequency):
                    # L_pi = E_s E_{a~pi} [alpha log pi(a|s) - min_i Q_i(s, a)]
                    mean, log_std = actor(batch["observations"])
                    critic.requires_grad_(False)
                    actor_loss = smac.sac_actor_loss(mean, log_std, batch["observations"], critic, alpha)
                    critic.requires_grad_(True)
                    actor_opt.zero_grad()
                    actor_loss.backward()
                    actor_opt.step()
                    if args.autotune:
                        # L_alpha = E_{a~pi} [-alpha (log pi(a|s) + target_entropy)]
                        with torch.no_grad():
                            _, log_pi = smac.tanh_gaussian_sample(mean, log_std)
                        alpha_loss = (-log_alpha.exp() * (log_pi + target_entropy)).mean()
                        alpha_opt.zero_grad()
                        alpha_loss.backward()
                        alpha_opt.step()
                        alpha = log_alpha.exp().item()

            with torch.no_grad():  # Q' <- tau Q + (1 - tau) Q'
                for param, target_param in zip(critic.parameters(), target_critic.parameters()):
                    target_param.lerp_(param, args.tau)

            if step % 1000 == 0:
                writer.add_scalar("losses/critic_loss", critic_loss.item(), step)
                writer.add_scalar("losses/actor_loss", actor_loss.item(), step)
                writer.add_scalar("losses/alpha", alpha, step)
        if step % 1000 == 0:
            sps = int(step / (time.time() - start_time))
            writer.add_scalar("charts/SPS", sps, step)
            print(f"step={step} SPS={sps}", flush=True)
        if log.due(step, args):
            log.evaluate(step, actor, setup["eval_env"], args, device)
    return finish(setup, args, log, run_dir, alpha, writer)


if __name__ == "__main__":
    try:
        train(tyro.cli(Args))
    except smac.SMACError as e:
        sys.exit(f"error: {e}")
