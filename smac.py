"""SMAC, Score-Matched Actor-Critic (de Lara and Shkurti, arXiv 2602.17632): the offline phase, in one file.

SAC's soft-optimal policy is pi*(a|s) = exp(Q*(s,a) / alpha) / Z(s), so grad_a Q*(s,a) = alpha * grad_a log pi*(a|s).
SMAC asks the offline critic to respect this with the DATASET's score, estimated by a return-conditioned diffusion
model, and a learned state-dependent scale alpha_psi(s); the actor keeps SAC's own loss:
    L_Q = L_TD + kappa * sum_i E_{s~D, a~B(A)} || grad_a Q_i(s,a) - alpha_psi(s) * grad_a log pi^D(a|s,w) ||^2
with B(A) half policy samples, half uniform actions. Online SAC or TD3 then starts from a critic whose action-gradient
already points where the data is; the fine-tuners keep kappa_t * L_SM in their critic loss (ours: without it they
fall), kappa_t released from kappa to kappa / 100 over the first 15k online updates (kept whole, it stops the climb).

    python smac.py --env hopper-medium-replay-v2 [--dataset-path file.hdf5]
    python sac_finetune.py --checkpoint runs/<run_name>/smac.pt      (or td3_finetune.py)

Above the banner further down: the whole method, offline and the part the fine-tuners use online. Below it: plumbing.
"""

import copy
import csv
import http.client
import io
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import gymnasium as gym
import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from gymnasium.envs.registration import EnvSpec
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class RunArgs:
    """The flags smac.py and the two fine-tuners share, with one meaning in all three."""
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
    run_dir: str = "runs"
    """folder in which runs/{run_name}/ (TensorBoard logs, metrics.csv, checkpoints) is written"""
    batch_size: int = 256
    """minibatch size of transitions"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target smoothing coefficient"""
    policy_lr: float = 3e-4
    """learning rate of the actor"""
    q_lr: float = 3e-4
    """learning rate of the critics and of what is learned beside them (alpha_psi offline, SAC's alpha online)"""
    eval_episodes: int = 10
    """number of deterministic evaluation episodes (episode i reset with seed i)"""

    def __post_init__(self):  # one clear error for a flag that cannot work, before anything is written
        check_flags(self, AT_LEAST_1, "batch_size", "eval_episodes", "eval_freq")
        check_flags(self, POSITIVE, "policy_lr", "q_lr")
        check_flags(self, (lambda v: 0 <= v < 2**32, "in [0, 2**32 - 1]"), "seed")
        check_flags(self, UNIT, "gamma")
        check_flags(self, (lambda v: 0 < v <= 1, "in (0, 1]"), "tau")
        check_run_dir(self.run_dir)


@dataclass(kw_only=True)
class Args(RunArgs):
    env: str = "hopper-medium-replay-v2"
    """a D4RL name, {halfcheetah,hopper,walker2d}-{random,medium,...}-v2, or a Minari id (mujoco/hopper/medium-v0)"""
    dataset_path: Optional[str] = None
    """local D4RL-format HDF5 file to use instead of the download/cache (D4RL names only)"""
    exp_name: str = "smac"
    """the name of this experiment (first part of the run name)"""
    total_updates: int = 1_000_000
    """number of offline actor-critic updates"""
    eval_freq: int = 10_000
    """evaluate (and write the checkpoint) every this many updates, and after the last"""
    hidden_dim: int = 256
    """width of the hidden layers of the actor and the critics"""
    alpha: float = 0.2
    """entropy temperature of the soft TD target and the SAC actor loss (fixed offline)"""
    # ---- SMAC arguments
    score_coef: float = 10.0
    """kappa, weight of the score-matching penalty (0: the baseline, offline SAC, and no diffusion model is trained)"""
    score_batch_size: Optional[int] = None
    """states of each minibatch at which the penalty is estimated (default all; fewer: cheaper, noisier)"""
    score_model_updates: int = 100_000
    """updates of the diffusion model of the dataset's actions, trained before the actor-critic"""
    diffusion_steps: int = 10
    """K, noise steps of the diffusion model (more steps: a sharper score at k = 1)"""
    score_scale_floor: float = 1.0
    """alpha_psi(s) >= this floor (left free, alpha_psi shrinks to 0 and the critic goes flat in the action)"""
    return_quantile: float = 0.9
    """the score is queried at w = this quantile of the dataset's normalized episode returns"""

    def __post_init__(self):
        super().__post_init__()
        check_flags(self, AT_LEAST_1, "total_updates", "hidden_dim", "diffusion_steps")
        check_flags(self, AT_LEAST_0, "score_model_updates")
        check_flags(self, POSITIVE, "alpha")
        check_flags(self, NON_NEGATIVE, "score_coef", "score_scale_floor")
        check_flags(self, UNIT, "return_quantile")
        check_flags(self, (lambda v: v is None or 1 <= v <= self.batch_size, "in [1, --batch-size]"),
                    "score_batch_size")


# ---------------------------------------------------------------- networks
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def mlp(in_dim: int, out_dim: int, hidden: int, activation=nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), activation(), nn.Linear(hidden, hidden), activation(),
                         nn.Linear(hidden, out_dim))


class Actor(nn.Module):
    """Tanh-squashed Gaussian: u ~ N(mu(s), sigma(s)^2), a = tanh(u)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim, hidden)

    def forward(self, obs: torch.Tensor):
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        mean, log_std = self(obs)
        return torch.tanh(mean if deterministic else mean + log_std.exp() * torch.randn_like(mean))


def tanh_gaussian_sample(mean: torch.Tensor, log_std: torch.Tensor):
    # a = tanh(u), u = mu + sigma * eps;  log pi(a|s) = log N(u; mu, sigma^2) - sum_i log(1 - tanh(u_i)^2)
    eps = torch.randn_like(mean)
    u = mean + log_std.exp() * eps
    log_normal = -0.5 * eps**2 - log_std - 0.5 * math.log(2 * math.pi)
    log_jacobian = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))  # log(1 - tanh(u)^2), finite for large |u|
    return torch.tanh(u), (log_normal - log_jacobian).sum(-1)


class TwinCritic(nn.Module):
    """Q_1 and Q_2, two SiLU MLPs on [s, a] run as one batched matmul per layer. SiLU, not ReLU: a ReLU critic's
    action-gradient is piecewise constant and cannot follow a smooth score field."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.qs = nn.ModuleList([mlp(obs_dim + act_dim, 1, hidden, nn.SiLU) for _ in range(2)])

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q_i(s, a), shape (2, B); actions (B, a) shared by both critics or (2, B, a), one set per critic."""
        x = torch.cat([obs.expand(2, *obs.shape), actions.expand(2, *actions.shape[-2:])], dim=-1)
        layers = list(zip(*([m for m in q if isinstance(m, nn.Linear)] for q in self.qs)))  # (Q_1's, Q_2's) layer j
        for j, pair in enumerate(layers):
            weight = torch.stack([layer.weight for layer in pair]).transpose(1, 2)
            x = torch.baddbmm(torch.stack([layer.bias for layer in pair]).unsqueeze(1), x, weight)
            x = F.silu(x) if j < len(layers) - 1 else x  # SiLU between layers, as mlp(..., nn.SiLU) builds them
        return x.squeeze(-1)


# ---------------------------------------------------------------- SMAC: the dataset's score, pi^D(a|s, w)
class ScoreModel(nn.Module):
    """eps_omega(s, a_k, w, k), a diffusion model of the dataset's actions in IDQL's style (a LayerNorm residual MLP),
    conditioned on a trajectory-level return w (Reinforcement via Supervision). After k of K noise steps an action a
    is a_k = sqrt(abar_k) a + sqrt(1 - abar_k) n, n ~ N(0, I)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 128, steps: int = 10, blocks: int = 2):
        super().__init__()  # IDQL: 256 wide, 3 blocks; smaller to fit a CPU
        k = torch.arange(1, steps + 1, dtype=torch.float32)  # IDQL's variance-preserving schedule, b = 0.1 .. 10:
        betas = 1.0 - torch.exp(-0.1 / steps - 0.5 * (10.0 - 0.1) * (2 * k - 1) / steps**2)
        self.steps = steps
        self.register_buffer("alpha_bars", torch.cumprod(1.0 - betas, 0))
        self.inp = nn.Linear(act_dim + obs_dim + 1 + 16, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.Mish(), nn.Linear(4 * hidden, hidden))
            for _ in range(blocks))
        self.out = nn.Linear(hidden, act_dim)

    def forward(self, obs, noisy_actions, w, k):
        freqs = torch.exp(torch.linspace(0.0, math.log(100.0), 8, device=obs.device))
        angle = k[:, None].float() * freqs  # a sinusoidal embedding of the noise step k
        x = self.inp(torch.cat([noisy_actions, obs, w, angle.sin(), angle.cos()], -1))
        for block in self.blocks:
            x = x + block(x)
        return self.out(F.mish(x))

    def loss(self, obs, actions, w):
        # L_omega = E_{k, eps} || eps_omega(s, sqrt(abar_k) a + sqrt(1 - abar_k) eps, w, k) - eps ||^2
        k = torch.randint(1, self.steps + 1, (len(obs),), device=obs.device)
        alpha_bar = self.alpha_bars[k - 1][:, None]
        eps = torch.randn_like(actions)
        return (self(obs, alpha_bar.sqrt() * actions + (1 - alpha_bar).sqrt() * eps, w, k) - eps).pow(2).mean()

    def score(self, obs, actions, w):
        # grad_a log p~(a|s,w) = -sqrt(abar_1) eps_omega(s, sqrt(abar_1) a, w, 1) / sqrt(1 - abar_1), p~ = the data's
        # actions blurred by std sqrt((1 - abar_1) / abar_1). Queried at sqrt(abar_1) a, not at a, so the field is
        # centred on the data's actions (at a it points to sqrt(abar_1) times them).
        alpha_bar, k = self.alpha_bars[0], torch.ones(len(obs), dtype=torch.long, device=obs.device)
        return -alpha_bar.sqrt() * self(obs, alpha_bar.sqrt() * actions, w, k) / (1.0 - alpha_bar).sqrt()


def episode_return_w(data: dict) -> np.ndarray:
    """w of each transition: the return of its episode, normalized over the dataset's episodes (the conditioning).
    An episode ends at a terminal, a timeout, a jump from next_observations[t] to observations[t+1], or the end."""
    ends = (data["dones"] > 0) | (data["timeouts"] > 0)
    ends[:-1] |= np.any(data["next_observations"][:-1] != data["observations"][1:], axis=1)
    ends[-1] = True
    episode = np.concatenate([[0], np.cumsum(ends)[:-1]])
    returns = np.bincount(episode, weights=data["rewards"])  # w = (R - min R) / (max R - min R) over episodes
    return ((returns - returns.min()) / max(np.ptp(returns), 1e-8))[episode].astype(np.float32)


class ScoreScale(nn.Module):
    """alpha_psi(s) = floor + softplus(g_psi(s)), the learned proportion between grad_a Q and the dataset's score."""

    def __init__(self, obs_dim: int, hidden: int = 256, floor: float = 0.0, init: float = 1.0):
        super().__init__()
        self.floor, self.net = floor, mlp(obs_dim, 1, hidden)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, math.log(math.expm1(init)))  # softplus(bias) = init at the start

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.floor + F.softplus(self.net(obs))  # (B, 1)


# ---------------------------------------------------------------- SMAC: the score-matching penalty
def critic_action_grad(critic: TwinCritic, obs, actions) -> torch.Tensor:
    """grad_a Q_i(s, a) for both critics, shape (2, B, a); differentiable w.r.t. the critic (double backprop)."""
    actions = actions.detach().expand(2, *actions.shape).clone().requires_grad_(True)
    return torch.autograd.grad(critic(obs, actions).sum(), actions, create_graph=True)[0]


def penalty_actions(mean, log_std) -> torch.Tensor:
    # B(A): each state gets a policy sample a ~ pi(.|s) or a uniform action a ~ U[-1, 1]^d, with probability 1/2
    policy_actions = tanh_gaussian_sample(mean, log_std)[0].detach()
    uniform_actions = torch.rand_like(policy_actions) * 2.0 - 1.0
    from_policy = torch.rand(len(mean), 1, device=mean.device) < 0.5
    return torch.where(from_policy, policy_actions, uniform_actions)


def score_matching_residual(critic, score_scale, score_model, obs, actions, w):
    """residual_i = grad_a Q_i(s, a) - alpha_psi(s) * grad_a log pi^D(a|s, w), shape (2, B, a), and its two parts."""
    with torch.no_grad():
        data_score = score_model.score(obs, actions, w)  # a fixed target: the score model is trained beforehand
    grad_q = critic_action_grad(critic, obs, actions)
    return grad_q - score_scale(obs) * data_score, grad_q, data_score


def score_matching_loss(residual: torch.Tensor) -> torch.Tensor:
    # L_SM = sum_i E_{s~D, a~B(A)} || grad_a Q_i(s,a) - alpha_psi(s) grad_a log pi^D(a|s, w) ||^2
    return residual.pow(2).sum(-1).mean(1).sum()


def score_matching_penalty(critic, score_scale, score_model, obs, mean, log_std, w_query: float) -> torch.Tensor:
    """L_SM (unweighted) at the states obs and B(A) actions, the score asked at w = w_query, offline and online."""
    w = torch.full((len(obs), 1), w_query, device=obs.device)
    actions = penalty_actions(mean, log_std)
    return score_matching_loss(score_matching_residual(critic, score_scale, score_model, obs, actions, w)[0])


# ---------------------------------------------------------------- SAC's losses (offline, and online in the fine-tuners)
def soft_td_target(actor, target_critic, batch: dict, gamma: float, alpha) -> torch.Tensor:
    # y = r + gamma * (1 - done) * (min_i Q'_i(s', a') - alpha * log pi(a'|s')),  a' ~ pi(.|s')
    with torch.no_grad():
        next_actions, next_log_pi = tanh_gaussian_sample(*actor(batch["next_observations"]))
        next_v = target_critic(batch["next_observations"], next_actions).min(0).values - alpha * next_log_pi
        return batch["rewards"].squeeze(-1) + gamma * (1.0 - batch["dones"].squeeze(-1)) * next_v


def td_loss(critic, batch: dict, y: torch.Tensor) -> torch.Tensor:
    # L_TD = sum_i E_D (Q_i(s, a) - y)^2
    return (critic(batch["observations"], batch["actions"]) - y).pow(2).mean(1).sum()


def sac_actor_loss(mean, log_std, obs, critic: TwinCritic, alpha) -> torch.Tensor:
    # L_pi = E_s E_{a~pi} [alpha * log pi(a|s) - min_i Q_i(s, a)]; the critic's weights get no gradient from it
    actions, log_pi = tanh_gaussian_sample(mean, log_std)
    critic.requires_grad_(False)
    q = critic(obs, actions).min(0).values
    critic.requires_grad_(True)
    return (alpha * log_pi - q).mean()


def soft_update(net: nn.Module, target: nn.Module, tau: float) -> None:
    with torch.no_grad():  # theta' <- tau theta + (1 - tau) theta'
        for param, target_param in zip(net.parameters(), target.parameters()):
            target_param.lerp_(param, tau)


# ---------------------------------------------------------------- the offline loop
def train(args: Args) -> dict:
    """The two offline phases. What it calls from below the banner (data, buffer, env, logs, diagnostics, checkpoint)
    is plumbing: it reads, records and writes, and changes nothing in the method."""
    seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    data = load_dataset(args.env, args.dataset_path)
    data["actions"] = data["actions"].clip(-1.0, 1.0)  # where tanh policies and B(A)'s uniform actions live
    data["w"] = episode_return_w(data)  # the return each transition's action is conditioned on
    w_query = float(np.quantile(data["w"], args.return_quantile))  # w at which the score is asked
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    obs_mean, obs_std = data["observations"].mean(0), data["observations"].std(0) + 1e-3
    buffer = dataset_buffer(data, obs_mean, obs_std, device, args.batch_size)

    actor = Actor(obs_dim, act_dim, args.hidden_dim).to(device)
    critic = TwinCritic(obs_dim, act_dim, args.hidden_dim).to(device)
    target_critic = copy.deepcopy(critic)
    score_model = ScoreModel(obs_dim, act_dim, steps=args.diffusion_steps).to(device)
    score_scale = ScoreScale(obs_dim, args.hidden_dim, args.score_scale_floor).to(device)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    critic_opt = torch.optim.Adam([*critic.parameters(), *score_scale.parameters()], lr=args.q_lr)
    score_model_opt = torch.optim.Adam(score_model.parameters(), lr=3e-4)
    log, eval_env = RunLog(args, args.env), make_env(data["task"], obs_mean, obs_std)
    print(f"{log.run_name}: {buffer.size} transitions, obs {obs_dim}, act {act_dim}, {device}, w_query {w_query:.3f}")

    # ALGO LOGIC, phase 1: the diffusion model of the dataset's actions, pi^D(a|s, w) (not needed when kappa = 0)
    for update in progress(range(1, (args.score_model_updates if args.score_coef > 0 else 0) + 1), "score model"):
        batch = buffer.sample(args.batch_size)
        diffusion_loss = score_model.loss(batch["observations"], batch["actions"], batch["w"])
        score_model_opt.zero_grad()
        diffusion_loss.backward()
        score_model_opt.step()
        log.losses("score_model", update, args.score_model_updates, diffusion_loss=diffusion_loss)
    score_model.requires_grad_(False)

    # ALGO LOGIC, phase 2: the actor-critic
    log.start_time = time.time()
    for update in progress(range(1, args.total_updates + 1), "offline updates"):
        batch = buffer.sample(args.batch_size)
        obs = batch["observations"]
        mean, log_std = actor(obs)

        # critic: L_Q = L_TD + kappa * L_SM
        y = soft_td_target(actor, target_critic, batch, args.gamma, args.alpha)
        critic_td_loss = td_loss(critic, batch, y)
        sm_loss = torch.zeros((), device=device)
        if args.score_coef > 0:  # SMAC, at s ~ D: the first score_batch_size states of the (iid) minibatch
            n = args.score_batch_size or args.batch_size
            sm_loss = score_matching_penalty(critic, score_scale, score_model, obs[:n], mean[:n], log_std[:n], w_query)
        critic_loss = critic_td_loss + args.score_coef * sm_loss
        critic_opt.zero_grad()
        critic_loss.backward()
        critic_opt.step()

        # actor: SAC's loss, unchanged
        actor_loss = sac_actor_loss(mean, log_std, obs, critic, args.alpha)
        actor_opt.zero_grad()
        actor_loss.backward()
        actor_opt.step()
        soft_update(critic, target_critic, args.tau)

        log.losses("offline", update, args.total_updates, td_loss=critic_td_loss, score_loss=sm_loss,
                   actor_loss=actor_loss, td_target=y)
        if update % args.eval_freq == 0 or update == args.total_updates:
            diag = diagnostics(actor, critic, target_critic, score_scale, score_model, buffer, args, w_query)
            result = log.evaluation("update", update, actor, eval_env, args.eval_episodes, data["task"], **diag)
            save_offline_checkpoint(log, args, data, buffer, w_query, update, diag, actor, critic, target_critic,
                                    score_model, score_scale)
    log.writer.close()
    print(f"{(sps := log.sps(args.total_updates))} updates/s; checkpoint: {os.path.join(log.dir, 'smac.pt')}")
    return {"run_dir": log.dir, "sps": sps, **result}


# ---------------------------------------------------------------- online: what the fine-tuners add to SAC and TD3
@dataclass(kw_only=True)
class FinetuneArgs(RunArgs):
    """The flags both fine-tuners have (each adds its algorithm's own)."""
    checkpoint: str
    """SMAC checkpoint (runs/<run_name>/smac.pt) to fine-tune"""
    total_timesteps: int = 250_000
    """online environment steps"""
    eval_freq: int = 5000
    """evaluate (and write final.pt) every this many online steps, at step 0 and after 100, 500 and 1000 updates"""
    buffer_size: int = 1_000_000
    """capacity of the online replay buffer"""
    learning_starts: int = 1000
    """online steps collected by the offline policy before updates begin"""
    lr_warmup: int = 0
    """the learning rates rise linearly from 0 over this many updates after the hand-over (0: none)"""
    score_coef: Optional[float] = None
    """kappa of SMAC's penalty kept in the online critic loss; default the checkpoint's (0: plain online RL)"""
    score_coef_final: Optional[float] = None
    """kappa after the release, to which kappa_t falls geometrically over --score-release-updates (default: kappa
    / 100; = --score-coef: no release, the anchor kept)"""
    score_release_updates: int = 15_000
    """online updates over which kappa_t falls from --score-coef to --score-coef-final"""
    drop_window: Optional[int] = None
    """drop = step-0 score - lowest evaluation within this many updates; default max(5000, 10% of the updates)"""

    def __post_init__(self):
        super().__post_init__()
        check_flags(self, AT_LEAST_1, "total_timesteps", "buffer_size", "learning_starts", "score_release_updates")
        check_flags(self, AT_LEAST_0, "lr_warmup")
        check_flags(self, NON_NEGATIVE, "score_coef", "score_coef_final", "drop_window")
        if self.total_timesteps <= self.learning_starts:
            raise SMACError(f"--learning-starts ({self.learning_starts}) must be smaller than --total-timesteps "
                            f"({self.total_timesteps}): no update would happen")


def online_score_coefs(args: FinetuneArgs, checkpoint_kappa: float) -> tuple:
    """(kappa at the hand-over, kappa after the release). Default: the checkpoint's kappa, released to a hundredth of
    it; kept whole, the anchor holds the policy where it started (dev log, session 11)."""
    start = checkpoint_kappa if args.score_coef is None else args.score_coef
    return start, start / 100 if args.score_coef_final is None else args.score_coef_final


def released_score_coef(start: float, final: float, release_updates: int, update: int) -> float:
    """kappa_t, the online weight of SMAC's penalty at the t-th update: geometric from the checkpoint's kappa to the
    final one over release_updates, then the final one. A final 0 is approached as start / 1000, then switched off,
    so the penalty's cost ends too. Geometric because the online behaviour changes with the order of kappa (10 holds
    the offline policy, 1 lets it drift, 0.1 lets it climb; dev log, session 10)."""
    if update >= release_updates or start in (0, final):  # from kappa 0 there is nothing to release
        return final
    end = max(final, start / 1000)
    return start * (end / start) ** (update / release_updates)


def warm_up_lr(optimizers: dict, update: int, warmup: int) -> None:
    """lr_t = lr * min(1, t / warmup) at the t-th online update, for each {optimizer: lr}. Why: a fresh Adam's first
    steps have full size whatever the gradient's size (m / sqrt(v) ~ +-1). Counted in updates, not in optimizer
    steps (SAC's actor steps every other update), so by hand rather than with a LambdaLR."""
    for optimizer, lr in optimizers.items():
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, update / warmup) if warmup > 0 else lr


def transfer_metrics(evals: list, train_scores: list, drop_window: int) -> dict:
    """evals: (updates since the hand-over, normalized score), step 0 first. drop is counted in updates from the
    step at which updates begin, so a fall the updates cause is always inside the window.
    drop   = max(0, step-0 score - lowest evaluation within drop_window updates)
    regret = mean over online training episodes of (1 - normalized return / 100)   (as Cal-QL and CORL)"""
    start, lowest = evals[0][1], min(score for updates, score in evals if updates <= drop_window)
    if not all(math.isfinite(score) for _, score in evals):  # min() would skip a NaN: never a finite drop from one
        start = lowest = math.nan
    regret = float(np.mean([1.0 - s / 100.0 for s in train_scores])) if train_scores else math.nan
    drop = start - lowest if math.isnan(start) else max(0.0, start - lowest)
    return {"step0_score": start, "lowest_early_score": lowest, "drop": drop, "regret": regret,
            "final_score": evals[-1][1], "train_episodes": len(train_scores)}


SCORE_BUDGETS = (10_000, 30_000)  # online env steps at which summary.csv reports the score (score_10k, score_30k)


def budget_scores(step_scores: list, total_steps: int) -> dict:
    """score_10k, score_30k: the last evaluation at or before that many online env steps (NaN if the run is shorter),
    so runs of different lengths are compared at the same budget, never by their final score."""
    return {f"score_{b // 1000}k": max((s, x) for s, x in step_scores if s <= b)[1] if total_steps >= b else math.nan
            for b in SCORE_BUDGETS}


# ======================================================================================================================
# TRY NOT TO MODIFY: the plumbing. Flag checks, D4RL and Minari data, envs, replay, logs, checkpoints, OnlineRun.
# ======================================================================================================================

# D4RL's v2 data came from the v3 MuJoCo envs; gymnasium's v4 envs have the same model (v5 changed it), so v4 it is.
warnings.filterwarnings("ignore", message=".*is out of date. You should consider upgrading to version `v5`")
D4RL_ENVS = {"halfcheetah": "HalfCheetah-v4", "hopper": "Hopper-v4", "walker2d": "Walker2d-v4"}
D4RL_DATASETS = ("random", "medium", "medium-replay", "medium-expert", "expert")
D4RL_NAMES = [f"{e}-{d}-v2" for e in D4RL_ENVS for d in D4RL_DATASETS]
REF_RETURNS = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3)}
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/{env}_{dataset}-v2.hdf5"
MINARI_ID = re.compile(r"[\w.-]+(/[\w.-]+)+-v\d+")  # namespace/.../name-vN
DATASET_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
LOG_FREQ = 1000  # updates (offline) or steps (online) between log lines
HANDOVER_UPDATES = (100, 500, 1000)  # the fine-tuners' extra evaluations after the hand-over
CHECKPOINT_FORMAT = "smac-checkpoint-v5"
NETWORKS = ("actor", "critic", "target_critic")  # the weights of a checkpoint; below, what else it holds
CHECKPOINT_INFO = ("obs_dim", "act_dim", "hidden_dim", "env", "task", "alpha", "obs_mean", "obs_std", "probe_obs",
                   "td_grad_norm", "args", "w_query", "score_model", "score_scale")
CHECKPOINT_KEYS = NETWORKS + CHECKPOINT_INFO
AT_LEAST_0, AT_LEAST_1 = (lambda v: v >= 0, ">= 0"), (lambda v: v >= 1, ">= 1")
POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = (lambda v: v is None or math.isfinite(v) and v >= 0, "a finite number >= 0")
UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")
last_checkpoint = None  # the path of the last checkpoint written, named when a run is interrupted
ctrl_c_pressed = False
current_run = None  # the RunLog of this process's run, whose folder a failure before any evaluation removes


class SMACError(Exception):
    """Bad input or a failed run: the message says what and how to fix it (main prints it as one line)."""


def check_flags(args, rule: tuple, *names: str) -> None:
    test, need = rule
    for name in names:
        if not test(value := getattr(args, name)):
            raise SMACError(f"--{name.replace('_', '-')} must be {need}, got {value}")


def check_run_dir(folder: str) -> None:
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SMACError(f"--run-dir {folder} is a file, not a folder")
    check_writable_folder(folder, "--run-dir")


def check_writable_folder(folder: str, what: str) -> None:
    """One clear error now, not a traceback later, for a folder that cannot be created or written."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SMACError(f"{what} {folder} lies under {existing}, which is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SMACError(f"{what} {folder}: {existing} is not writable")


def check_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise SMACError(f"{what} {path} {'is a folder, not a file' if os.path.isdir(path) else 'does not exist'}")


def make_folders(folder: str) -> Optional[str]:
    """os.makedirs that returns the top-most folder it created (None if none), which a failure can remove whole."""
    top, parent = None, os.path.abspath(folder)
    while not os.path.exists(parent):
        top, parent = parent, os.path.dirname(parent)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise SMACError(f"cannot create the folder {folder}: {e.strerror or e}") from e
    return top


def check_env_name(name: str) -> str:
    if name not in D4RL_NAMES and not MINARI_ID.fullmatch(name):
        raise SMACError(f"unknown dataset {name!r}: give a D4RL name {{{','.join(D4RL_ENVS)}}}-"
                        f"{{{','.join(D4RL_DATASETS)}}}-v2 or a Minari id such as mujoco/hopper/medium-v0")
    return name


def d4rl_task(name: str) -> dict:
    """What evaluation needs of a dataset (the checkpoint keeps it): its env as a JSON EnvSpec, reference returns."""
    env = check_env_name(name).split("-")[0]
    return {"name": name, "env_spec": gym.spec(D4RL_ENVS[env]).to_json(), "ref_scores": list(REF_RETURNS[env])}


def normalized_score(task: dict, episode_return: float) -> float:
    low, high = task["ref_scores"]  # D4RL (and Minari): score = 100 * (R - R_random) / (R_expert - R_random)
    return 100.0 * (episode_return - low) / (high - low)


def dataset_url(name: str) -> str:
    """The file's URL; $D4RL_URL (a template with {env} and {dataset}) points elsewhere, e.g. to a mirror."""
    env, dataset = check_env_name(name)[: -len("-v2")].split("-", 1)
    template = os.environ.get("D4RL_URL", D4RL_URL)
    try:
        url = template.format(env=env, dataset=dataset.replace("-", "_"))
    except (KeyError, IndexError, ValueError) as e:
        raise SMACError(f"$D4RL_URL {template!r} may hold only the placeholders {{env}} and {{dataset}}") from e
    if urllib.parse.urlparse(url).scheme not in ("http", "https", "ftp", "file"):
        raise SMACError(f"$D4RL_URL {template!r} is not a URL (it needs http://, https://, ftp:// or file://)")
    return url


def download(url: str, path: str) -> None:
    """Into a temporary file beside `path`, renamed into place once whole and HDF5; on failure nothing is left (not
    even the cache folders this call created)."""
    folder = os.path.dirname(path) or "."
    check_writable_folder(folder, "the dataset cache ($D4RL_DATASET_DIR)")
    created = make_folders(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
    total = done = 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response, os.fdopen(fd, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            with tqdm.wrapattr(response, "read", total=total, desc=f"downloading {os.path.basename(path)}",
                               disable=None) as source:
                shutil.copyfileobj(source, out)
            done = out.tell()
        if total and done != total:  # urllib (and torch.hub's download) return what came before the server closed
            raise http.client.IncompleteRead(b"", total - done)
        if not h5py.is_hdf5(tmp):  # e.g. an HTML error page sent with status 200: it never enters the cache
            raise SMACError(f"{url} did not send an HDF5 file ({done} bytes; nothing was kept); check the URL or "
                            "give a local file: --dataset-path")
        os.replace(tmp, path)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        closed = isinstance(e, http.client.IncompleteRead)
        what = f"the connection closed after {done} of {total} bytes" if closed else str(e)
        raise SMACError(f"could not download {url} ({what}; nothing was kept); with no network, give a local "
                        "file: --dataset-path") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if created and not os.path.exists(path):
            shutil.rmtree(created)


def read_d4rl_file(name: str, path: Optional[str]) -> tuple:
    """The D4RL-format HDF5 file (without a path, downloaded into $D4RL_DATASET_DIR, default ~/.d4rl/datasets):
    (data, where it came from)."""
    cached = path is None
    if cached:
        cache = os.environ.get("D4RL_DATASET_DIR", os.path.expanduser("~/.d4rl/datasets"))
        path = os.path.join(cache, os.path.basename(dataset_url(name)))
        if not os.path.exists(path):
            download(dataset_url(name), path)
    check_file(path, "dataset file")
    fix = "; delete it and it is downloaded again" if cached else ""
    try:
        with h5py.File(path, "r") as f:
            if missing := [k for k in DATASET_KEYS if k not in f]:
                raise SMACError(f"{path} lacks the D4RL key(s) {missing}{fix}")
            data = {k: f[k][()] for k in DATASET_KEYS}
    except OSError as e:
        raise SMACError(f"cannot read {path} as HDF5 ({e}){fix}") from e
    for key in ("rewards", "terminals", "timeouts"):  # (N,) in D4RL; (N, 1) in many converted files
        if data[key].ndim == 2 and data[key].shape[1] == 1:
            data[key] = data[key][:, 0]
        elif data[key].ndim != 1:
            raise SMACError(f"{path}: {key} has shape {data[key].shape}, D4RL's layout is (N,)")
    return data, path


def read_minari(name: str) -> tuple:
    """A Minari dataset ($MINARI_DATASETS_PATH; minari downloads it when absent) as D4RL's flat arrays, its task."""
    import minari  # only Minari ids need it

    root = os.path.abspath(os.environ.get("MINARI_DATASETS_PATH", os.path.expanduser("~/.minari/datasets")))
    existed = {d for d, _, _ in os.walk(root)}
    try:
        dataset = minari.load_dataset(name, download=True)
        spec = dataset.recover_environment(eval_env=True).spec  # the env the dataset names for evaluation
    except Exception as e:  # minari raises several types for unknown ids, failed downloads and missing envs
        for folder in sorted({d for d, _, _ in os.walk(root)} - existed, reverse=True):  # what minari made: if empty,
            if not os.listdir(folder):  # it goes, as do the empty folders above it that did not exist before
                os.removedirs(folder)
        remote = os.environ.get("MINARI_REMOTE", "hf://farama-minari")
        if "huggingface_hub is not installed" in str(e):
            raise SMACError(f"the Minari dataset {name} is not in {root}, and downloading it needs huggingface_hub: "
                            "pip install 'minari[hf]'") from e
        if "Couldn't find any version" in str(e) or "doesn't exist in the remote" in str(e):
            raise SMACError(f"unknown Minari dataset {name}: it is neither in {root} ($MINARI_DATASETS_PATH) nor on "
                            f"{remote} ($MINARI_REMOTE)") from e
        raise SMACError(f"cannot load the Minari dataset {name} ({type(e).__name__}: {str(e)[:300]})") from e
    meta, episodes = dataset.storage.metadata, list(dataset.iterate_episodes())
    if meta.get("ref_min_score") is None or meta.get("ref_max_score") is None:
        raise SMACError(f"the Minari dataset {name} has no reference scores (ref_min_score, ref_max_score): the "
                        "normalized score needs them")
    if not all(isinstance(e.observations, np.ndarray) and isinstance(e.actions, np.ndarray) for e in episodes):
        raise SMACError(f"the Minari dataset {name} has structured (dict or tuple) observations or actions; SMAC here "
                        "reads flat vectors only")
    parts = {"observations": [e.observations[:-1] for e in episodes], "actions": [e.actions for e in episodes],
             "rewards": [e.rewards for e in episodes], "next_observations": [e.observations[1:] for e in episodes],
             "terminals": [e.terminations for e in episodes], "timeouts": [e.truncations for e in episodes]}
    task = {"name": name, "env_spec": spec.to_json(),
            "ref_scores": [float(meta["ref_min_score"]), float(meta["ref_max_score"])]}
    return {k: np.concatenate(v) if episodes else np.zeros((0,)) for k, v in parts.items()}, task


def load_dataset(name: str, path: Optional[str]) -> dict:
    """A D4RL file or a Minari dataset as D4RL's flat float32 arrays ("terminals" renamed "dones"), with one clear
    SMACError per problem, plus the task: the evaluation env and the reference returns."""
    if check_env_name(name) in D4RL_NAMES:
        (data, path), task = read_d4rl_file(name, path), d4rl_task(name)
    elif path is not None:
        raise SMACError(f"--dataset-path is for D4RL-format files; the Minari dataset {name} is read from "
                        "$MINARI_DATASETS_PATH (default ~/.minari/datasets)")
    else:
        (data, task), path = read_minari(name), name
    if len(lengths := {len(v) for v in data.values()}) != 1:
        raise SMACError(f"{path}: the keys have different lengths {sorted(lengths)}")
    if lengths == {0}:
        raise SMACError(f"{path} holds no transitions")
    env = make_env(task, 0.0, 1.0)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    for key, dim in (("observations", obs_dim), ("next_observations", obs_dim), ("actions", act_dim)):
        if data[key].ndim != 2 or data[key].shape[1] != dim:
            raise SMACError(f"{path}: {key} has shape {data[key].shape}, the env {env.spec.id} needs (N, {dim})")
    for key in DATASET_KEYS:
        if not np.isfinite(data[key]).all():
            raise SMACError(f"{path}: {key} contains NaN or inf values")
    if (outside := np.abs(data["actions"]) > 1.0).any():
        warnings.warn(f"{path}: {outside.mean():.2%} of the action entries lie outside the action space [-1, 1] "
                      f"(up to {np.abs(data['actions']).max():.4g}); they are clipped to it")
    data = {k: v.astype(np.float32) for k, v in data.items()}
    data["dones"] = data.pop("terminals")  # a timeout ends the episode but is not a terminal state: no bootstrap cut
    return {**data, "task": task}


def progress(iterable, desc: str):
    """The training loops' iterator: a progress bar when stderr is a terminal (tqdm's disable=None), and a stop at the
    next step after a Ctrl-C whose KeyboardInterrupt was swallowed (Python only prints one raised inside a __del__)."""
    for item in tqdm(iterable, desc=desc, disable=None, dynamic_ncols=True):
        if ctrl_c_pressed:
            raise KeyboardInterrupt
        yield item


def make_env(task: dict, obs_mean: np.ndarray, obs_std: np.ndarray) -> gym.Env:
    """The task's gymnasium env, observing (obs - dataset mean) / dataset std."""
    env = gym.make(EnvSpec.from_json(task["env_spec"]))
    env = gym.wrappers.TransformObservation(env, lambda o: ((o - obs_mean) / obs_std).astype(np.float32), None)
    return gym.wrappers.RecordEpisodeStatistics(env)


@torch.no_grad()
def evaluate(actor: Actor, env: gym.Env, episodes: int, device: torch.device) -> list:
    """Returns of deterministic episodes (action tanh(mean)), episode i reset with seed i."""
    returns = []
    for i in range(episodes):
        (obs, _), done, total = env.reset(seed=i), False, 0.0
        while not done:
            action = actor.act(torch.as_tensor(obs, device=device)[None], deterministic=True)[0].cpu().numpy()
            obs, reward, terminated, truncated, _ = env.step(action)
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    return returns


class ReplayBuffer:
    """Transitions kept as device tensors, so a minibatch is one randint and a few index_selects."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device, extra: tuple = ()):
        shapes = {"observations": obs_dim, "actions": act_dim, "rewards": 1, "next_observations": obs_dim, "dones": 1}
        shapes.update(dict.fromkeys(extra, 1))
        self.data = {k: torch.zeros(capacity, d, device=device) for k, d in shapes.items()}
        self.capacity, self.size, self.pos, self.device = capacity, 0, 0, device

    def add(self, **transitions: np.ndarray) -> None:
        n = len(transitions["observations"])
        idx = torch.arange(self.pos, self.pos + n, device=self.device) % self.capacity
        for k, v in transitions.items():
            self.data[k][idx] = torch.as_tensor(np.asarray(v, dtype=np.float32), device=self.device).reshape(n, -1)
        self.pos, self.size = (self.pos + n) % self.capacity, min(self.size + n, self.capacity)

    def sample(self, batch_size: int) -> dict:
        idx = torch.randint(0, self.size, (batch_size,), device=self.device)
        return {k: v[idx] for k, v in self.data.items()}


def dataset_buffer(data: dict, obs_mean, obs_std, device: torch.device, batch_size: int = 1) -> ReplayBuffer:
    """The offline dataset, observations normalized, as a ReplayBuffer with the return conditioning w."""
    if len(data["rewards"]) < batch_size:
        warnings.warn(f"the dataset holds {len(data['rewards'])} transitions, fewer than one minibatch (--batch-size "
                      f"{batch_size}): each minibatch repeats transitions")
    buffer = ReplayBuffer(len(data["rewards"]), len(obs_mean), data["actions"].shape[1], device, extra=("w",))
    buffer.add(observations=(data["observations"] - obs_mean) / obs_std, rewards=data["rewards"],
               actions=data["actions"], dones=data["dones"], w=data["w"],
               next_observations=(data["next_observations"] - obs_mean) / obs_std)
    return buffer


def seed_everything(seed: int, torch_deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def grad_norm(loss: torch.Tensor, module: nn.Module) -> float:
    return torch.sqrt(sum((g**2).sum() for g in torch.autograd.grad(loss, list(module.parameters())))).item()


@torch.no_grad()
def diagnostics(actor, critic, target_critic, score_scale, score_model, buffer, args, w_query, batches=10) -> dict:
    """Where the offline actor-critic stands, averaged over fixed minibatches of dataset states:
    score_residual_rel   ||grad_a Q_i - alpha_psi grad_a log pi^D|| / ||grad_a Q_i|| at B(A) actions
    score_cosine         cos(grad_a Q_i, grad_a log pi^D) at B(A) actions; alpha_psi_mean its scale
    sac_actor_grad_norm  norm of SAC's actor-loss gradient: the distance from a stationary point of online SAC
    td_grad_norm         norm of the TD loss's critic gradient; the fine-tuners compare theirs with it."""
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(12345)  # the same minibatches every call; training's random stream is restored below
    out = {k: [] for k in ("score_residual_rel", "score_cosine", "alpha_psi_mean", "sac_actor_grad_norm",
                           "td_grad_norm")}
    with torch.enable_grad():
        for _ in range(batches):
            batch = buffer.sample(256)
            obs = batch["observations"]
            mean, log_std = actor(obs)
            if args.score_coef > 0:
                w = torch.full((len(obs), 1), w_query, device=obs.device)
                residual, grad_q, data_score = score_matching_residual(
                    critic, score_scale, score_model, obs, penalty_actions(mean, log_std), w)
                out["score_residual_rel"].append((residual.norm() / grad_q.norm().clamp_min(1e-8)).item())
                out["score_cosine"].append(F.cosine_similarity(grad_q, data_score.expand_as(grad_q), -1).mean().item())
                out["alpha_psi_mean"].append(score_scale(obs).mean().item())
            out["sac_actor_grad_norm"].append(grad_norm(sac_actor_loss(mean, log_std, obs, critic, args.alpha), actor))
            y = soft_td_target(actor, target_critic, batch, args.gamma, args.alpha)
            out["td_grad_norm"].append(grad_norm(td_loss(critic, batch, y), critic))
    torch.random.set_rng_state(rng_state)
    return {k: float(np.mean(v)) if v else math.nan for k, v in out.items()}


class RunLog:
    """A run's folder runs/{run_name}/: TensorBoard scalars (and W&B with --track), metrics.csv with a row per
    evaluation as it happens, checkpoints. Losses are checked for NaN at log steps only (a check per update would sync
    a GPU every step); SPS leaves the evaluations out."""

    def __init__(self, args, env_name: str):
        global current_run, last_checkpoint
        last_checkpoint = None  # a new run: an earlier run's checkpoint (same process) is not this one's
        base = self.run_name = f"{env_name.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        for n in range(2, 10**6):  # two runs started in the same second must not share (and overwrite) a folder
            if not os.path.exists(os.path.join(args.run_dir, self.run_name)):
                break
            self.run_name = f"{base}_{n}"
        self.dir = os.path.join(args.run_dir, self.run_name)
        self.created = make_folders(self.dir)  # removed again if the run fails before its first evaluation
        current_run = self
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=vars(args), name=self.run_name, save_code=True)
        self.writer = SummaryWriter(self.dir)
        table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        self.start_time, self.eval_seconds = time.time(), 0.0

    def discard_if_unused(self) -> None:
        """After a failure: the folders this run created go if no evaluation was written (only TensorBoard's file)."""
        self.writer.close()
        if self.created and not os.path.exists(os.path.join(self.dir, "metrics.csv")):
            shutil.rmtree(self.created, ignore_errors=True)

    def sps(self, step: int) -> int:
        return int(step / (time.time() - self.start_time - self.eval_seconds))

    def losses(self, phase: str, step: int, total: int, **losses) -> None:
        """At every LOG_FREQ-th step and the phase's last (total-th): NaN checks, TensorBoard, a printed line."""
        if step % LOG_FREQ != 0 and step != total:
            return
        for name, value in losses.items():
            if not torch.isfinite(torch.as_tensor(value)).all():
                raise SMACError(f"the {name} became {torch.as_tensor(value).mean().item()} by {phase} step {step}; "
                                f"the last good checkpoint is kept: {last_checkpoint or 'none was written'}")
        scalars = {**{k: torch.as_tensor(v).mean().item() for k, v in losses.items()}, "SPS": self.sps(step)}
        for name, value in scalars.items():
            self.writer.add_scalar(f"{phase}/{name}", value, step)
        print(" ".join([f"{phase} step={step}"] + [f"{k}={v:.4g}" for k, v in scalars.items()]), flush=True)

    def evaluation(self, step_name: str, step: int, actor: Actor, env: gym.Env, episodes: int, task: dict,
                   **metrics) -> dict:
        """Mean normalized score of deterministic episodes; a row of metrics.csv with `metrics`, in TensorBoard."""
        check_finite_weights(f"{step_name} {step}", actor)  # a NaN policy is never evaluated, nor its score reported
        start, device = time.time(), next(actor.parameters()).device
        score = float(np.mean([normalized_score(task, r) for r in evaluate(actor, env, episodes, device)]))
        row = {step_name: step, "normalized_score": score, **metrics}
        for name, value in row.items():
            if isinstance(value, float):
                self.writer.add_scalar(f"eval/{name}", value, step)
        shown = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not math.isnan(v)}  # nan: n/a
        print("eval " + " ".join(f"{k}={v:.4g}" for k, v in shown.items()), flush=True)
        append_csv(os.path.join(self.dir, "metrics.csv"), row)
        self.eval_seconds += time.time() - start
        return row


def append_csv(path: str, row: dict) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, list(row))
        if new:
            writer.writeheader()
        writer.writerow({k: f"{v:.5g}" if isinstance(v, float) else v for k, v in row.items()})


def cpu_state(net: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def check_finite_weights(when: str, *nets: nn.Module) -> None:
    if not all(torch.isfinite(p).all() for net in nets for p in net.parameters()):
        raise SMACError(f"the weights became non-finite (NaN or inf) by {when}; the last good checkpoint is kept: "
                        f"{last_checkpoint or 'none was written'}")


def save_checkpoint(path: str, actor, critic, target_critic, **content) -> None:
    """Weights and what the fine-tuners need, serialized in memory, written to a temporary file and renamed: never
    seen half-written, never non-finite."""
    global last_checkpoint
    check_finite_weights(f"the checkpoint {path}", actor, critic, target_critic)
    state = {"actor": cpu_state(actor), "critic": cpu_state(critic), "target_critic": cpu_state(target_critic)}
    payload = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state, **content}, payload)
    tmp = f"{path}.tmp{os.getpid()}"  # only a SIGKILL during the write itself can leave it behind
    try:
        with open(tmp, "wb") as f:
            f.write(payload.getbuffer())
        os.replace(tmp, path)
        last_checkpoint = path
    finally:  # interrupted mid-write: the old checkpoint stays, the partial one goes
        if os.path.exists(tmp):
            os.remove(tmp)


def save_offline_checkpoint(log, args, data, buffer, w_query, update, diag, actor, critic, target_critic,
                            score_model, score_scale) -> None:
    """smac.pt: the networks, their shapes, the observation statistics, the diffusion model and alpha_psi (SMAC only),
    and probe_obs, 1024 dataset states at which the fine-tuners measure their KL from the offline policy."""
    probe = torch.linspace(0, buffer.size - 1, min(1024, buffer.size), device=buffer.device).long()
    smac_only = args.score_coef > 0
    obs_mean, obs_std = data["observations"].mean(0), data["observations"].std(0) + 1e-3
    save_checkpoint(os.path.join(log.dir, "smac.pt"), actor, critic, target_critic, obs_dim=len(obs_mean),
                    act_dim=data["actions"].shape[1], hidden_dim=args.hidden_dim, env=args.env, task=data["task"],
                    alpha=args.alpha, obs_mean=torch.as_tensor(obs_mean), obs_std=torch.as_tensor(obs_std),
                    probe_obs=buffer.data["observations"][probe].cpu(), td_grad_norm=diag["td_grad_norm"],
                    args=asdict(args), w_query=w_query, update=update,
                    score_model=cpu_state(score_model) if smac_only else None,
                    score_scale=cpu_state(score_scale) if smac_only else None)


def load_checkpoint(path: str, device: torch.device):
    """Checkpoint dict and its actor, critic and target critic; weights_only=True: loading runs no code."""
    check_file(path, "checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt files and for pickled code; its message
        raise SMACError(f"cannot read {path} as a SMAC checkpoint: it is not a weights-only torch file "  # advises an
                        f"({type(e).__name__})") from e  # unsafe weights_only=False: never shown
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SMACError(f"{path} is not a SMAC checkpoint of this version (no format {CHECKPOINT_FORMAT!r})")
    if missing := [k for k in CHECKPOINT_KEYS if k not in ckpt]:
        raise SMACError(f"{path} is an incomplete SMAC checkpoint: it lacks {missing}")
    try:
        shape = ckpt["obs_dim"], ckpt["act_dim"], ckpt["hidden_dim"]
        actor, critic = Actor(*shape).to(device), TwinCritic(*shape).to(device)
        target_critic = copy.deepcopy(critic)
        for net, key in ((actor, "actor"), (critic, "critic"), (target_critic, "target_critic")):
            net.load_state_dict(ckpt[key])
    except (RuntimeError, KeyError, TypeError) as e:  # missing or mis-shaped weights
        raise SMACError(f"{path}: the networks do not match the recorded shapes ({str(e)[:200]})") from e
    if not all(torch.isfinite(p).all() for net in (actor, critic, target_critic) for p in net.parameters()):
        raise SMACError(f"{path} holds non-finite (NaN or inf) weights")
    return ckpt, actor, critic, target_critic


def load_score_nets(ckpt: dict, path: str, device: torch.device):
    """The checkpoint's diffusion model and alpha_psi, frozen: SMAC's penalty online."""
    if ckpt["score_model"] is None:
        raise SMACError(f"--score-coef needs a SMAC checkpoint; {path} was trained with --score-coef 0 (no diffusion "
                        "model)")
    score_model = ScoreModel(ckpt["obs_dim"], ckpt["act_dim"], steps=ckpt["args"]["diffusion_steps"]).to(device)
    score_scale = ScoreScale(ckpt["obs_dim"], ckpt["hidden_dim"], ckpt["args"]["score_scale_floor"]).to(device)
    for net, key in ((score_model, "score_model"), (score_scale, "score_scale")):
        net.load_state_dict(ckpt[key])
        net.requires_grad_(False)
    return score_model, score_scale


class OnlineRun:
    """The fine-tuners' shared plumbing: the checkpoint's networks and envs, the online replay buffer and training
    episodes, SMAC's penalty with its released kappa_t, and the evaluations (step 0, every --eval-freq steps, 100, 500
    and 1000 updates after the hand-over) with kl_to_offline = mean KL(pi_offline || pi_t) at the checkpoint's dataset
    states, final.pt written at each. finish() writes summary.csv: transfer_metrics, the scores at fixed budgets, and
    td_grad_ratio (the critic-loss gradient norm of the first 10 online updates, penalty included, over the offline
    TD-gradient norm)."""

    def __init__(self, args: FinetuneArgs, device: torch.device):
        self.ckpt, self.actor, self.critic, self.target_critic = load_checkpoint(args.checkpoint, device)
        self.args, self.device, self.task = args, device, self.ckpt["task"]
        obs_mean, obs_std = self.ckpt["obs_mean"].numpy(), self.ckpt["obs_std"].numpy()
        self.env, self.eval_env = make_env(self.task, obs_mean, obs_std), make_env(self.task, obs_mean, obs_std)
        if self.env.observation_space.shape != obs_mean.shape:
            raise SMACError(f"{args.checkpoint}: its observation statistics have shape {obs_mean.shape}, the env "
                            f"{self.env.spec.id} observes {self.env.observation_space.shape}")
        self.offline_actor, self.probe_obs = copy.deepcopy(self.actor), self.ckpt["probe_obs"].to(device)
        self.score_coef, self.score_coef_final = online_score_coefs(args, self.ckpt["args"]["score_coef"])
        if max(self.score_coef, self.score_coef_final) > 0:  # SMAC's penalty kept online
            self.score_model, self.score_scale = load_score_nets(self.ckpt, args.checkpoint, device)
        self.kappa = self.score_coef
        self.buffer = ReplayBuffer(min(args.buffer_size, args.total_timesteps), len(obs_mean),
                                   self.env.action_space.shape[0], device)
        self.log = RunLog(args, check_env_name(self.ckpt["env"]))  # after every check: a bad input writes nothing
        updates = args.total_timesteps - args.learning_starts
        self.drop_window = args.drop_window if args.drop_window is not None else max(5000, updates // 10)
        self.evals, self.step_scores, self.kl, self.train_scores, self.new_returns = [], [], {}, [], []
        self.critic_grad_norms = []
        self.obs, _ = self.env.reset(seed=args.seed)

    def env_step(self, step: int, action: np.ndarray) -> None:
        """One step of the training env with `action`, stored in the replay buffer; episode ends logged."""
        next_obs, reward, terminated, truncated, info = self.env.step(action)
        self.buffer.add(observations=self.obs[None], actions=action[None], rewards=[reward],
                        next_observations=next_obs[None], dones=[terminated])  # a time-limit end still bootstraps
        self.obs = next_obs
        if terminated or truncated:
            self.train_scores.append(normalized_score(self.task, float(info["episode"]["r"])))
            self.new_returns.append(float(info["episode"]["r"]))
            self.log.writer.add_scalar("charts/episodic_return", self.new_returns[-1], step)
            self.obs, _ = self.env.reset()

    def score_coef_at(self, update: int) -> float:
        """kappa_t at the update-th online update (released_score_coef), logged and written with each evaluation."""
        self.kappa = released_score_coef(self.score_coef, self.score_coef_final, self.args.score_release_updates,
                                         update)
        if update % LOG_FREQ == 0:
            self.log.writer.add_scalar("online/score_coef", self.kappa, update)
        return self.kappa

    def score_matching_penalty(self, obs: torch.Tensor) -> torch.Tensor:
        """L_SM (unweighted, as offline) at the online minibatch's states, with the checkpoint's frozen score nets."""
        with torch.no_grad():
            mean, log_std = self.actor(obs)
        return score_matching_penalty(self.critic, self.score_scale, self.score_model, obs, mean, log_std,
                                      self.ckpt["w_query"])

    def record_critic_grad_norm(self) -> None:
        """Reads the critic's gradient (call it after the critic loss's backward) for td_grad_ratio."""
        if len(self.critic_grad_norms) < 10:
            self.critic_grad_norms.append(torch.sqrt(sum((p.grad**2).sum() for p in self.critic.parameters())).item())

    def end_step(self, step: int, alpha: Optional[float] = None, **losses) -> None:
        """After each env step: the losses' log line once updates have begun, evaluations when due. alpha: SAC's
        temperature (None for TD3, which has none)."""
        if step > self.args.learning_starts:
            self.log.losses("online", step, self.args.total_timesteps, **losses,
                            **({} if alpha is None else {"alpha": alpha}))
        handover = step - self.args.learning_starts in HANDOVER_UPDATES
        if step % self.args.eval_freq == 0 or step == self.args.total_timesteps or handover:
            self.evaluate(step, alpha)

    def evaluate(self, step: int, alpha: Optional[float] = None) -> None:
        """A row of metrics.csv and final.pt; at step 0 the offline policy's own score, which opens the curve."""
        with torch.no_grad():
            offline, online = self.offline_actor(self.probe_obs), self.actor(self.probe_obs)
            kl = gaussian_kl(*offline, *online).mean().item()
        updates = max(0, step - self.args.learning_starts)
        returns = " ".join(f"{r:.2f}" for r in self.new_returns)  # the training episodes since the last row
        row = self.log.evaluation("step", step, self.actor, self.eval_env, self.args.eval_episodes, self.task,
                                  updates=updates, kl_to_offline=kl, score_coef=float(self.kappa),
                                  train_episode_returns=returns)
        self.evals.append((updates, row["normalized_score"]))
        self.step_scores.append((step, row["normalized_score"]))
        self.kl[updates], self.new_returns = kl, []
        save_checkpoint(os.path.join(self.log.dir, "final.pt"), self.actor, self.critic, self.target_critic,
                        **{k: self.ckpt[k] for k in CHECKPOINT_INFO if k != "alpha"}, step=step,
                        alpha=float(self.ckpt["alpha"] if alpha is None else alpha),  # TD3 keeps the offline one,
                        online_args=asdict(self.args))  # which a later SAC fine-tune of final.pt starts from

    def finish(self) -> dict:
        summary = transfer_metrics(self.evals, self.train_scores, self.drop_window)
        summary["td_grad_ratio"] = float(np.mean(self.critic_grad_norms)) / self.ckpt["td_grad_norm"]
        summary.update(online_steps=self.args.total_timesteps,
                       **budget_scores(self.step_scores, self.args.total_timesteps))
        summary.update({f"kl_{u}": self.kl.get(u, math.nan) for u in HANDOVER_UPDATES})
        append_csv(os.path.join(self.log.dir, "summary.csv"), summary)
        for key, value in summary.items():
            self.log.writer.add_scalar(f"summary/{key}", value, self.args.total_timesteps)
        self.log.writer.close()
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
        print(f"fine-tuned checkpoint: {os.path.join(self.log.dir, 'final.pt')}")
        return {"run_dir": self.log.dir, **summary}


def gaussian_kl(mean_p, log_std_p, mean_q, log_std_q) -> torch.Tensor:
    # KL(pi_p || pi_q) of two tanh-Gaussians = KL of their Gaussians (tanh is a bijection); summed over dimensions
    p = torch.distributions.Normal(mean_p, log_std_p.exp(), validate_args=False)  # unvalidated: a NaN policy gives a
    q = torch.distributions.Normal(mean_q, log_std_q.exp(), validate_args=False)  # NaN KL; the weights check names it
    return torch.distributions.kl_divergence(p, q).sum(-1)


def on_ctrl_c(signum, frame) -> None:
    global ctrl_c_pressed
    ctrl_c_pressed = True
    raise KeyboardInterrupt


def main(train_fn, args_class) -> None:
    """The command line of the three scripts: one clear line, no traceback, for bad input and for Ctrl-C."""
    signal.signal(signal.SIGINT, on_ctrl_c)
    signal.signal(signal.SIGTERM, on_ctrl_c)  # what Slurm and other schedulers send before they kill a job
    try:
        train_fn(tyro.cli(args_class))
    except (SMACError, KeyboardInterrupt, MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "memory" not in str(e):
            raise  # a bug: its traceback is the useful report
        if current_run is not None:
            current_run.discard_if_unused()
        if isinstance(e, KeyboardInterrupt):
            sys.exit(f"\ninterrupted; the last checkpoint is kept: {last_checkpoint or 'none was written yet'}")
        if isinstance(e, SMACError):
            sys.exit(f"error: {e}")
        sys.exit(f"error: out of memory ({str(e).splitlines()[0][:200]}); try a smaller --batch-size or --hidden-dim")


if __name__ == "__main__":
    main(train, Args)
