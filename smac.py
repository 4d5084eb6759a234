"""SMAC, Score-Matched Actor-Critic (de Lara and Shkurti, arXiv 2602.17632): the offline phase, in one file.

SAC's soft-optimal policy is pi*(a|s) = exp(Q*(s,a) / alpha) / Z(s), so grad_a Q*(s,a) = alpha * grad_a log pi*(a|s).
SMAC asks the offline critic to respect this with the DATASET's score (a return-conditioned diffusion model) times a
learned scale alpha_psi(s), at actions B(A) (per state a policy sample or a uniform action, even odds); the actor
keeps SAC's own loss:
    L_Q = L_TD + kappa * sum_i E_{s~D, a~B(A)} || grad_a Q_i(s,a) - alpha_psi(s) * grad_a log pi^D(a|s,w) ||^2
Ours, not the authors': the fine-tuners keep kappa_t * L_SM online, released to kappa / 100 over 15k updates.
Every piece of the method is above the banner (the fine-tuners' online loops call it); below it, plumbing only.
Words: "score" is grad_a log pi^D (ScoreModel, score_coef, L_SM); the D4RL 0-100 return is the "normalized score".
"""

import contextlib
import copy
import csv
import math
import os
import random
import re
import signal
import sys
import time
import types
import warnings
from dataclasses import asdict, dataclass

import gymnasium as gym
import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
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
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    run_dir: str = "runs"
    """folder of the run folders {run_name}/ (TensorBoard logs, metrics.csv, checkpoints)"""
    batch_size: int = 256
    """minibatch size of transitions"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target smoothing coefficient"""
    policy_lr: float = 3e-4
    """learning rate of the actor"""
    q_lr: float = 3e-4
    """learning rate of the critics, alpha_psi (offline) and SAC's alpha (in sac_finetune.py)"""
    eval_episodes: int = 10
    """number of deterministic evaluation episodes (episode i reset with seed i)"""

    def __post_init__(self):
        check_args(self)  # one clear error for a flag that cannot work, before anything is written


@dataclass(kw_only=True)
class Args(RunArgs):
    """SMAC's offline phase. Data: $D4RL_DATASET_DIR (the D4RL cache, default ~/.d4rl/datasets), $D4RL_URL (a mirror),
    $MINARI_DATASETS_PATH and $MINARI_REMOTE (Minari's). On a CPU set OMP_NUM_THREADS=1 (or 2): small networks."""
    env: str = "hopper-medium-replay-v2"
    """the dataset (its env follows): a D4RL name like the default, or a Minari id such as mujoco/hopper/medium-v0"""
    dataset_path: str | None = None
    """local D4RL-format HDF5 file to read instead of the download cache (D4RL names only)"""
    exp_name: str = "smac"
    """the name of this experiment (first part of the run name)"""
    total_updates: int = 1_000_000
    """number of offline actor-critic updates"""
    eval_freq_updates: int = 10_000
    """evaluate (and write the checkpoint) every this many updates, and after the last"""
    hidden_dim: int = 256
    """width of the hidden layers of the actor and the critics"""
    alpha: float = 0.2
    """SAC's entropy temperature in the soft TD target and the actor loss (fixed offline)"""
    critic_layer_norm: bool = True
    """LayerNorm before each SiLU in the critics (RLPD's; off: this project's critics before it became the default)"""
    # ---- SMAC arguments
    score_coef: float = 10.0
    """kappa, weight of the score-matching penalty (0: the baseline, offline SAC, with no diffusion model)"""
    penalty_states: int | None = None
    """states of each minibatch at which the penalty is estimated (default all; fewer: cheaper, noisier)"""
    score_model_updates: int = 100_000
    """updates of the diffusion model of the dataset's actions, trained before the actor-critic"""
    diffusion_steps: int = 10
    """K, noise steps of the diffusion model (more steps: a sharper score at k = 1)"""
    score_scale_floor: float = 1.0
    """alpha_psi(s) >= this floor (left free, alpha_psi shrinks to 0 and the critic goes flat in the action)"""
    return_quantile: float = 0.9
    """the score is queried at w = this quantile of the normalized episode returns over transitions (by length)"""
    binary_reward: bool = False
    """reward 1 at the steps the env reports success, else 0, in the data and (the checkpoint says) online; Adroit's"""


# ---- networks
def mlp(in_dim: int, out_dim: int, hidden: int, activation=nn.ReLU, layer_norm: bool = False) -> nn.Sequential:
    blocks = [[nn.Linear(i, hidden), *[nn.LayerNorm(hidden)][:layer_norm], activation()] for i in (in_dim, hidden)]
    return nn.Sequential(*blocks[0], *blocks[1], nn.Linear(hidden, out_dim))


class Actor(nn.Module):
    """Tanh-squashed Gaussian: u ~ N(mu(s), sigma(s)^2), a = tanh(u); tanh(mu(s)) is the deterministic action."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim, hidden)

    def forward(self, obs: torch.Tensor):
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(-5.0, 2.0)  # sigma in [e^-5, e^2]: CleanRL's bounds (it maps into them by tanh)

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
    """Q_1, Q_2: SiLU MLPs on [s, a] (LayerNorm before each SiLU, as RLPD), one batched matmul per layer. SiLU, not
    ReLU: a ReLU critic's action-gradient is piecewise constant, it cannot follow a smooth score."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, layer_norm: bool = True):
        super().__init__()
        self.qs = nn.ModuleList([mlp(obs_dim + act_dim, 1, hidden, nn.SiLU, layer_norm) for _ in range(2)])

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q_i(s, a), shape (2, B); actions (B, a) shared by both critics or (2, B, a), one set per critic. The same
        numbers as running self.qs[0] and self.qs[1] apart, in half the kernel calls."""
        x = torch.cat([obs.expand(2, *obs.shape), actions.expand(2, *actions.shape[-2:])], dim=-1)
        for layer_1, layer_2 in zip(*self.qs):  # layer j of Q_1 and of Q_2, at once
            if isinstance(layer_1, nn.SiLU):
                x = F.silu(x)
                continue
            weight, bias = (torch.stack([getattr(layer_1, k), getattr(layer_2, k)]) for k in ("weight", "bias"))
            if isinstance(layer_1, nn.Linear):
                x = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
            else:  # LayerNorm: normalized, then each critic's own affine weights
                x = torch.addcmul(bias.unsqueeze(1), F.layer_norm(x, x.shape[-1:]), weight.unsqueeze(1))
        return x.squeeze(-1)


# ---- SMAC: the dataset's score pi^D(a|s, w), the penalty
class ScoreModel(nn.Module):
    """eps_omega(s, a_k, w, k): IDQL's diffusion model of the dataset's actions, conditioned on the episode return w;
    after k of K noise steps a_k = sqrt(abar_k) a + sqrt(1 - abar_k) n, n ~ N(0, I) (abar_k: DDPM's alpha-bar)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 128, steps: int = 10, blocks: int = 2):
        super().__init__()  # IDQL: 256 wide, 3 blocks; smaller to fit a CPU
        k = torch.arange(1, steps + 1, dtype=torch.float32)  # IDQL's variance-preserving schedule, beta 0.1 .. 10:
        betas = 1.0 - torch.exp(-0.1 / steps - 0.5 * (10.0 - 0.1) * (2 * k - 1) / steps**2)
        self.register_buffer("abar", torch.cumprod(1.0 - betas, 0))
        self.inp = nn.Linear(act_dim + obs_dim + 1 + 16, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.Mish(),
                                                  nn.Linear(4 * hidden, hidden)) for _ in range(blocks))
        self.out = nn.Linear(hidden, act_dim)

    def forward(self, obs, noisy_actions, w, k):
        angle = k[:, None].float() * torch.exp(torch.linspace(0.0, math.log(100.0), 8, device=obs.device))
        x = self.inp(torch.cat([noisy_actions, obs, w, angle.sin(), angle.cos()], -1))  # k embedded sinusoidally
        for block in self.blocks:
            x = x + block(x)
        return self.out(F.mish(x))

    def loss(self, obs, actions, w):
        # L_omega = E_{k, eps} || eps_omega(s, sqrt(abar_k) a + sqrt(1 - abar_k) eps, w, k) - eps ||^2
        k = torch.randint(1, len(self.abar) + 1, (len(obs),), device=obs.device)  # k ~ U{1, ..., K}
        abar = self.abar[k - 1][:, None]
        eps = torch.randn_like(actions)
        return (self(obs, abar.sqrt() * actions + (1 - abar).sqrt() * eps, w, k) - eps).pow(2).mean()

    def score(self, obs, actions, w):
        # grad_a log q(sqrt(abar_1) a | s,w) = -sqrt(abar_1) eps_omega(s, sqrt(abar_1) a, w, 1) / sqrt(1 - abar_1):
        # q = pi^D after the first noise step (blurred), asked at sqrt(abar_1) a so the field is centred on the data's
        # actions; the leading sqrt(abar_1) is the chain rule through x = sqrt(abar_1) a
        abar, k = self.abar[0], torch.ones(len(obs), dtype=torch.long, device=obs.device)
        return -abar.sqrt() * self(obs, abar.sqrt() * actions, w, k) / (1.0 - abar).sqrt()


def episode_return_w(data: dict) -> np.ndarray:
    """w: each transition's episode return, normalized over the dataset's episodes."""
    ends = (data["dones"] > 0) | (data["timeouts"] > 0)  # an episode ends at a terminal, a timeout,
    ends[:-1] |= np.any(data["next_observations"][:-1] != data["observations"][1:], axis=1)  # a jump s'_t != s_t+1
    ends[-1] = True  # or the data's end
    episode = np.concatenate([[0], np.cumsum(ends)[:-1]])
    returns = np.bincount(episode, weights=data["rewards"])  # w = (R - min R) / (max R - min R) over episodes
    return ((returns - returns.min()) / max(np.ptp(returns), 1e-8))[episode].astype(np.float32)


class ScoreScale(nn.Module):
    """alpha_psi(s) = floor + softplus(g_psi(s)), grad_a Q's learned scale to the dataset's score; floor + init at
    the start (2 with the default floor 1)."""

    def __init__(self, obs_dim: int, hidden: int = 256, floor: float = 0.0, init: float = 1.0):
        super().__init__()
        self.floor, self.net = floor, mlp(obs_dim, 1, hidden)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, math.log(math.expm1(init)))  # softplus(bias) = init at the start

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.floor + F.softplus(self.net(obs))  # (B, 1)


def penalty_actions(mean, log_std) -> torch.Tensor:
    # B(A): per state, a policy sample a ~ pi(.|s) or a uniform a ~ U[-1, 1]^d, each with probability 1/2
    policy_actions = tanh_gaussian_sample(mean, log_std)[0].detach()
    uniform_actions = torch.rand_like(policy_actions) * 2.0 - 1.0
    from_policy = torch.rand(len(mean), 1, device=mean.device) < 0.5
    return torch.where(from_policy, policy_actions, uniform_actions)


def score_matching_residual(critic, score_scale, score_model, obs, actions, w):
    """residual_i = grad_a Q_i(s, a) - alpha_psi(s) * grad_a log pi^D(a|s, w), shape (2, B, a), and its two parts."""
    data_score = score_model.score(obs, actions, w).detach()  # a fixed target: the score model is trained first
    actions = actions.detach().expand(2, *actions.shape).clone().requires_grad_(True)  # a copy per critic: each
    # gets its own grad_a Q_i (one shared tensor would get grad_a (Q_1 + Q_2))
    grad_q = torch.autograd.grad(critic(obs, actions).sum(), actions, create_graph=True)[0]  # double backprop
    return grad_q - score_scale(obs) * data_score, grad_q, data_score


def score_matching_penalty(critic, score_scale, score_model, obs, mean, log_std, w_query: float) -> torch.Tensor:
    """L_SM (unweighted) at the states obs and B(A) actions, the score asked at w = w_query."""
    w = torch.full((len(obs), 1), w_query, device=obs.device)
    residual = score_matching_residual(critic, score_scale, score_model, obs, penalty_actions(mean, log_std), w)[0]
    return residual.pow(2).sum(-1).mean(1).sum()  # L_SM = sum_i E_{s~D, a~B(A)} || residual_i(s, a) ||^2


# ---- SAC's losses, offline and online
def soft_td_target(actor, target_critic, batch: dict, gamma: float, alpha) -> torch.Tensor:
    # y = r + gamma * (1 - done) * (min_i Q'_i(s', a') - alpha * log pi(a'|s')),  a' ~ pi(.|s')
    with torch.no_grad():
        next_actions, next_log_pi = tanh_gaussian_sample(*actor(batch["next_observations"]))
        next_v = target_critic(batch["next_observations"], next_actions).min(0).values - alpha * next_log_pi
        return batch["rewards"].squeeze(-1) + gamma * (1.0 - batch["dones"].squeeze(-1)) * next_v


def td_loss(critic, batch: dict, y: torch.Tensor) -> torch.Tensor:
    return (critic(batch["observations"], batch["actions"]) - y).pow(2).mean(1).sum()  # L_TD = sum_i E_D (Q_i - y)^2


def sac_actor_loss(mean, log_std, obs, critic: TwinCritic, alpha) -> torch.Tensor:
    actions, log_pi = tanh_gaussian_sample(mean, log_std)
    critic.requires_grad_(False)  # L_pi needs grad_a Q only: no backward into the critic's weights
    q = critic(obs, actions).min(0).values
    critic.requires_grad_(True)
    return (alpha * log_pi - q).mean()  # L_pi = E_s E_{a~pi} [alpha * log pi(a|s) - min_i Q_i(s, a)]


def soft_update(net: nn.Module, target: nn.Module, tau: float) -> None:
    with torch.no_grad():  # theta' <- tau theta + (1 - tau) theta'
        for param, target_param in zip(net.parameters(), target.parameters()):
            target_param.lerp_(param, tau)


# ---- the offline loop
def train(args: Args) -> dict:
    seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    data = load_dataset(args.env, args.dataset_path, args.binary_reward)
    data["actions"] = data["actions"].clip(-1.0, 1.0)  # where tanh policies and B(A)'s uniform actions live
    data["w"] = episode_return_w(data)  # the return each transition's action is conditioned on
    w_query = float(np.quantile(data["w"], args.return_quantile))  # w at which the score is asked
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    obs_mean, obs_std = data["observations"].mean(0), data["observations"].std(0) + 1e-3  # CORL's normalization
    buffer = dataset_buffer(data, obs_mean, obs_std, device, args.batch_size)  # minibatches of tensors (B, .):
    # normalized observations and next_observations, actions in [-1, 1], rewards, dones (terminals only), w in [0, 1]

    actor = Actor(obs_dim, act_dim, args.hidden_dim).to(device)
    critic = TwinCritic(obs_dim, act_dim, args.hidden_dim, args.critic_layer_norm).to(device)
    target_critic = copy.deepcopy(critic)
    score_model = ScoreModel(obs_dim, act_dim, steps=args.diffusion_steps).to(device)
    score_scale = ScoreScale(obs_dim, args.hidden_dim, args.score_scale_floor).to(device)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    critic_opt = torch.optim.Adam([*critic.parameters(), *score_scale.parameters()], lr=args.q_lr)  # alpha_psi: by L_SM
    score_model_opt = torch.optim.Adam(score_model.parameters(), lr=3e-4)
    eval_env = make_env(data["task"], obs_mean, obs_std)
    with RunLog(args, args.env) as log:
        print(f"{log.run_name}: {buffer.size} transitions, obs {obs_dim}, act {act_dim}, {device}, w {w_query:.3f}")

        # ALGO LOGIC, phase 1: the diffusion model of the dataset's actions, pi^D(a|s, w) (none when kappa = 0)
        score_model_updates = args.score_model_updates if args.score_coef > 0 else 0
        for update in tqdm(range(1, score_model_updates + 1), "score model", disable=None):  # a bar on terminals only
            batch = buffer.sample(args.batch_size)
            diffusion_loss = score_model.loss(batch["observations"], batch["actions"], batch["w"])
            score_model_opt.zero_grad()
            diffusion_loss.backward()
            score_model_opt.step()
            log.losses("score_model", update, score_model_updates, diffusion_loss=diffusion_loss)
        score_model.requires_grad_(False)

        # ALGO LOGIC, phase 2: the actor-critic
        log.start_clock()
        n = args.penalty_states or args.batch_size  # L_SM's states: the first n of each (iid) minibatch
        for update in tqdm(range(1, args.total_updates + 1), "offline updates", disable=None):
            batch = buffer.sample(args.batch_size)
            obs = batch["observations"]
            mean, log_std = actor(obs)

            y = soft_td_target(actor, target_critic, batch, args.gamma, args.alpha)
            critic_td_loss = td_loss(critic, batch, y)
            sm_loss = (score_matching_penalty(critic, score_scale, score_model, obs[:n], mean[:n], log_std[:n], w_query)
                       if args.score_coef > 0 else torch.zeros((), device=device))  # SMAC's penalty, at s ~ D
            critic_loss = critic_td_loss + args.score_coef * sm_loss  # the critic's L_Q = L_TD + kappa * L_SM
            critic_opt.zero_grad()
            critic_loss.backward()
            critic_opt.step()

            # the actor: SAC's loss, unchanged (mean, log_std from before the critic's step: the actor has not moved)
            actor_loss = sac_actor_loss(mean, log_std, obs, critic, args.alpha)
            actor_opt.zero_grad()
            actor_loss.backward()
            actor_opt.step()
            soft_update(critic, target_critic, args.tau)

            log.losses("offline", update, args.total_updates, td_loss=critic_td_loss, score_loss=sm_loss,
                       actor_loss=actor_loss, td_target=y)
            if update % args.eval_freq_updates == 0 or update == args.total_updates:
                eval_score = log.evaluation("update", update, actor, eval_env, args.eval_episodes, data["task"])
                has_penalty = args.score_coef > 0  # what the fine-tuners need beside the networks:
                log.save("smac.pt", actor, critic, target_critic, obs_dim=obs_dim, act_dim=act_dim, args=asdict(args),
                         hidden_dim=args.hidden_dim, env=args.env, task=data["task"], alpha=args.alpha, update=update,
                         obs_mean=torch.as_tensor(obs_mean), obs_std=torch.as_tensor(obs_std), w_query=w_query,
                         score_model=score_model if has_penalty else None,
                         score_scale=score_scale if has_penalty else None)
        print(f"{(sps := log.sps(args.total_updates))} updates/s; checkpoint: {log.last_checkpoint}")
    return {"run_dir": log.dir, "sps": sps, "normalized_score": eval_score}


# ---- online: kappa_t, the penalty's release
@dataclass(kw_only=True)
class FinetuneArgs(RunArgs):
    """The flags both fine-tuners have (each adds its algorithm's own)."""
    checkpoint: str
    """SMAC checkpoint (runs/<run_name>/smac.pt) to fine-tune"""
    total_timesteps: int = 250_000
    """online environment steps"""
    eval_freq: int = 5000
    """evaluate (and write final.pt) every this many steps, at step 0 and at the last"""
    buffer_size: int = 1_000_000
    """capacity of the online replay buffer"""
    learning_starts: int = 1000
    """online steps collected by the offline policy before updates begin"""
    score_coef: float | None = None
    """kappa_0, the penalty's weight at the hand-over; default the checkpoint's kappa (0: plain online RL)"""
    score_coef_final: float | None = None
    """kappa after the release, at most kappa_0 (default kappa_0 / 100; = kappa_0: no release, the anchor kept)"""
    score_release_updates: int = 15_000
    """online updates over which kappa_t falls from kappa_0 to --score-coef-final"""
    drop_window: int | None = None
    """drop = step-0 score - lowest evaluation within this many updates; default max(5000, 10% of the updates)"""


def online_score_coefs(args, checkpoint_kappa: float) -> tuple:
    """(kappa_0, final kappa): by default the checkpoint's kappa, released to a hundredth of it."""
    start = checkpoint_kappa if args.score_coef is None else args.score_coef
    final = start / 100 if args.score_coef_final is None else args.score_coef_final
    if final > start:
        raise SMACError(f"--score-coef-final {final:g} is above kappa_0 = {start:g} (--score-coef, default the "
                        "checkpoint's kappa): the release only lowers the penalty")
    return start, final


def released_score_coef(start: float, final: float, release_updates: int, update: int) -> float:
    """kappa_t at online update t: geometric from kappa_0 to the final kappa over release_updates, then the final one
    (a final 0 is approached as kappa_0 / 1000, then switched off, so the penalty's cost ends too)."""
    if update >= release_updates or start == 0 or start == final:  # from kappa 0 there is nothing to release
        return final
    # kappa_t = kappa_0 * (kappa_f / kappa_0)^(t / T), kappa_f floored at kappa_0 / 1000 (a geometric path never hits 0)
    return start * (max(final, start / 1000) / start) ** (update / release_updates)


# ======================================================================================================================
# TRY NOT TO MODIFY: the plumbing. Flag checks, D4RL and Minari data, envs, replay, logs, checkpoints, main.
# ======================================================================================================================

# D4RL's v2 data came from MuJoCo's v3 envs; gymnasium's v4 have their model (v5 changed it).
warnings.filterwarnings("ignore", message=".*is out of date. You should consider upgrading to version `v5`")
D4RL_ENVS = {"halfcheetah": "HalfCheetah-v4", "hopper": "Hopper-v4", "walker2d": "Walker2d-v4"}
D4RL_DATASETS = ("random", "medium", "medium-replay", "medium-expert", "expert")
D4RL_NAMES = [f"{e}-{d}-v2" for e in D4RL_ENVS for d in D4RL_DATASETS]
REF_RETURNS = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3)}
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2"  # or $D4RL_URL, a mirror
MINARI_ID = re.compile(r"[\w.-]+(/[\w.-]+)+-v\d+")  # namespace/.../name-vN
DATASET_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
LOG_FREQ = 1000  # updates (offline) or steps (online) between log lines
CHECKPOINT_FORMAT = "smac-checkpoint-v7"
CHECKPOINT_INFO = ("obs_dim", "act_dim", "hidden_dim", "env", "task", "alpha", "obs_mean", "obs_std", "args",
                   "w_query", "score_model", "score_scale")  # beside the three networks' weights
AT_LEAST_0, AT_LEAST_1 = (lambda v: v >= 0, ">= 0"), (lambda v: v >= 1, ">= 1")
NON_NEGATIVE = (lambda v: v is None or math.isfinite(v) and v >= 0, "a finite number >= 0")


class SMACError(Exception):
    """Bad input or a failed run: its one line (main prints it) says what and how to fix it."""


def check_flags(args, rule: tuple, *names: str) -> None:
    test, need = rule
    for name in names:
        if hasattr(args, name) and not test(value := getattr(args, name)):
            raise SMACError(f"--{name.replace('_', '-')} must be {need}, got {value}")


def check_args(args) -> None:
    """The limits of the three scripts' flags (a flag has one meaning in all of them)."""
    check_flags(args, AT_LEAST_1, "batch_size", "eval_episodes", "total_updates", "eval_freq_updates", "hidden_dim",
                "diffusion_steps", "total_timesteps", "eval_freq", "buffer_size", "learning_starts",
                "score_release_updates", "policy_frequency")
    check_flags(args, AT_LEAST_0, "score_model_updates")
    check_flags(args, (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"), "policy_lr", "q_lr", "alpha")
    check_flags(args, NON_NEGATIVE, "score_coef", "score_scale_floor", "score_coef_final", "drop_window",
                "exploration_noise", "policy_noise", "noise_clip", "bc_coef")
    check_flags(args, (lambda v: 0 <= v <= 1, "in [0, 1]"), "gamma", "return_quantile")
    check_flags(args, (lambda v: 0 < v <= 1, "in (0, 1]"), "tau")
    check_flags(args, (lambda v: 0 <= v < 2**32, "in [0, 2**32 - 1]"), "seed")
    check_flags(args, (lambda v: v is None or 1 <= v <= args.batch_size, "in [1, --batch-size]"), "penalty_states")
    check_flags(args, (lambda v: v < args.total_timesteps, "below --total-timesteps (no update)"), "learning_starts")
    check_flags(args, (lambda v: not os.path.isfile(v), "a folder, not a file"), "run_dir")


def normalized_score(task: dict, episode_return: float) -> float:
    low, high = task["ref_scores"]  # D4RL's: score = 100 * (R - R_random) / (R_expert - R_random)
    if not high > low:
        raise SMACError(f"{task['name']}: reference returns {task['ref_scores']}, the expert's not above the random's")
    return 100.0 * (episode_return - low) / (high - low)


def read_d4rl_file(name: str, path: str | None) -> tuple:
    """The D4RL-format HDF5 file at path, else in $D4RL_DATASET_DIR, downloaded there if absent (kept only if whole)."""
    fix = ""
    if path is None:
        file = name[:-3].replace("-", "_") + "-v2.hdf5"  # hopper-medium-replay-v2: hopper_medium_replay-v2
        path, fix = os.path.join(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets"), file), "; delete it"
        path, url = os.path.expanduser(path), f"{os.environ.get('D4RL_URL', D4RL_URL)}/{file}"
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                if not re.match(r"(https?|ftp|file)://", url):  # checked first: torch.hub would leave a .partial
                    raise ValueError("not a URL: $D4RL_URL needs http://, https://, ftp:// or file://")
                torch.hub.download_url_to_file(url, path, progress=sys.stderr.isatty())
                h5py.File(path, "r").close()  # a page sent instead, or a truncated file, fails
            except (OSError, ValueError) as e:  # URLError is an OSError
                if os.path.exists(path):
                    os.remove(path)
                raise SMACError(f"could not download {url} as a whole HDF5 file ({str(e)[:200]}); nothing was kept; "
                                "with no network, give a local file: --dataset-path") from e
    if not os.path.isfile(path):
        raise SMACError(f"dataset file {path} {'is a folder, not a file' if os.path.isdir(path) else 'does not exist'}")
    try:
        with h5py.File(path, "r") as f:
            if missing := [k for k in DATASET_KEYS if k not in f]:
                raise SMACError(f"{path} lacks the D4RL key(s) {missing}{fix}")
            data = {k: f[k][()] for k in DATASET_KEYS}
    except OSError as e:
        raise SMACError(f"cannot read {path} as HDF5 ({e}){fix and fix + ' and it is downloaded again'}") from e
    for key in ("rewards", "terminals", "timeouts"):  # (N,) in D4RL; (N, 1) in many converted files
        data[key] = data[key][:, 0] if data[key].shape[1:] == (1,) else data[key]
        if data[key].ndim != 1:
            raise SMACError(f"{path}: {key} has shape {data[key].shape}, D4RL's layout is (N,)")
    env = name.split("-")[0]  # the task: eval env spec, reference returns
    return data, {"name": name, "env_spec": gym.spec(D4RL_ENVS[env]).to_json(), "ref_scores": list(REF_RETURNS[env])}


def read_minari(name: str) -> tuple:
    """A Minari dataset ($MINARI_DATASETS_PATH; minari downloads it when absent) as D4RL's flat arrays, its task."""
    import minari  # only Minari ids need it

    try:
        dataset = minari.load_dataset(name, download=True)
        if "gymnasium_robotics" in str(dataset.storage.metadata):  # its env is one of gymnasium-robotics'
            fix_robotics_joint_types()
        env = dataset.recover_environment(eval_env=True)  # its evaluation env
    except Exception as e:  # several types: unknown ids, failed downloads, missing envs
        why = f"{type(e).__name__}: {str(e)[:300]}"
        if "huggingface_hub is not installed" in str(e):
            why = "it is not on disk, and downloading it needs huggingface_hub: pip install 'minari[hf]'"
        elif "Couldn't find any version" in str(e) or "doesn't exist in the remote" in str(e):
            why = f"unknown: neither in $MINARI_DATASETS_PATH nor on {os.environ.get('MINARI_REMOTE', 'the hub')}"
        raise SMACError(f"cannot load the Minari dataset {name} ({why})") from e
    episodes, obs_space, act_space = list(dataset.iterate_episodes()), dataset.observation_space, dataset.action_space
    if None in (refs := [dataset.storage.metadata.get(k) for k in ("ref_min_score", "ref_max_score")]):
        raise SMACError(f"the Minari dataset {name} has no ref_min_score and ref_max_score for the normalized score")
    if (obs_space, act_space) != (env.observation_space, env.action_space):
        raise SMACError(f"the Minari dataset {name} records observations {obs_space} and actions {act_space}; its env "
                        f"{env.spec.id} has {env.observation_space}, {env.action_space}")
    if not isinstance(obs_space, (gym.spaces.Box, gym.spaces.Dict)) or not isinstance(act_space, gym.spaces.Box):
        raise SMACError(f"the Minari dataset {name} has {obs_space} observations and {act_space} actions; SMAC reads "
                        "Box observations (or dictionaries of them) and Box actions")
    observations = [flatten_steps(env.observation_space, e.observations) for e in episodes]
    parts = {"observations": [o[:-1] for o in observations], "actions": [e.actions for e in episodes],
             "rewards": [e.rewards for e in episodes], "next_observations": [o[1:] for o in observations],
             "terminals": [e.terminations for e in episodes], "timeouts": [e.truncations for e in episodes]}
    if all("success" in (e.infos or {}) for e in episodes):  # the steps' infos, the reset's first or not
        success = [(np.ravel(e.infos["success"]), len(e.actions)) for e in episodes]
        if not all(len(s) - t in (0, 1) and np.isin(s, (0, 1)).all() for s, t in success):
            raise SMACError(f"the Minari dataset {name}'s infos['success'] must be True or False at each step")
        parts["success"] = [s[-t:] for s, t in success]
    task = {"name": name, "env_spec": env.spec.to_json(), "ref_scores": refs}
    return {k: np.concatenate(v) if episodes else np.zeros((0,)) for k, v in parts.items()}, task


def flatten_steps(space: gym.Space, observations) -> np.ndarray:
    """An episode's observations as (steps, obs_dim): a dictionary's arrays side by side in the space's key order (and
    nested dictionaries alike), the layout gymnasium's FlattenObservation gives the env's observations online."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten_steps(space[key], observations[key]) for key in space.keys()], axis=1)
    return np.asarray(observations).reshape(len(observations), -1)


def load_dataset(name: str, path: str | None, binary_reward: bool = False) -> dict:
    """D4RL's flat float32 arrays ("terminals" as "dones") and the task (eval env, reference returns); or SMACError."""
    if name not in D4RL_NAMES and not MINARI_ID.fullmatch(name):
        raise SMACError(f"unknown dataset {name!r}: give a D4RL name {{{','.join(D4RL_ENVS)}}}-"
                        f"{{{','.join(D4RL_DATASETS)}}}-v2 or a Minari id such as mujoco/hopper/medium-v0")
    if name not in D4RL_NAMES and path is not None:
        raise SMACError(f"--dataset-path is for D4RL-format files; the Minari dataset {name} is read from "
                        "$MINARI_DATASETS_PATH (default ~/.minari/datasets)")
    data, task = read_d4rl_file(name, path) if name in D4RL_NAMES else read_minari(name)
    where, success, task["binary_reward"] = path or name, data.pop("success", None), binary_reward
    if binary_reward and success is None:
        raise SMACError(f"--binary-reward needs the env's success at every step of every episode (Minari's "
                        f"infos['success']): {where} lacks it")
    data["rewards"] = success if binary_reward else data["rewards"]  # r = 1 where the step succeeded, else 0
    if len(lengths := {len(v) for v in data.values()}) != 1:
        raise SMACError(f"{where}: the keys have different lengths {sorted(lengths)}")
    if lengths == {0}:
        raise SMACError(f"{where} holds no transitions")
    env, _ = make_env(task, 0.0, 1.0), normalized_score(task, 0.0)  # the env and its references work
    if not isinstance(space := env.action_space, gym.spaces.Box) or (space.low != -1).any() or (space.high != 1).any():
        raise SMACError(f"{env.spec.id}'s actions are {space}, but the tanh actor and B(A)'s uniform actions live in "
                        "[-1, 1]: rescale them in a fork (gymnasium's RescaleAction, and the data's actions alike)")
    if binary_reward:  # online, the fine-tuners take the reward from the env's success
        env.reset(seed=0)
        if step_success(env.step(env.action_space.sample())[-1]) is None:
            raise SMACError(f"--binary-reward needs an env that reports success online; {env.spec.id} reports none")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    for key, dim in (("observations", obs_dim), ("next_observations", obs_dim), ("actions", act_dim)):
        if data[key].ndim != 2 or data[key].shape[1] != dim:
            raise SMACError(f"{where}: {key} has shape {data[key].shape}, the env {env.spec.id} needs (N, {dim})")
    for key in DATASET_KEYS:
        if not np.issubdtype(data[key].dtype, np.number) and data[key].dtype != bool:
            raise SMACError(f"{where}: {key} holds {data[key].dtype} values, not numbers")
        if not np.isfinite(data[key]).all():
            raise SMACError(f"{where}: {key} contains NaN or inf values")
    if not np.isin(data["terminals"], (0, 1)).all() or not np.isin(data["timeouts"], (0, 1)).all():
        raise SMACError(f"{where}: terminals and timeouts must be 0 or 1 (True or False)")
    if (outside := np.abs(data["actions"]) > 1.0).any():
        warnings.warn(f"{where}: {outside.mean():.2%} of the action entries lie outside the action space [-1, 1] "
                      f"(up to {np.abs(data['actions']).max():.4g}); they are clipped to it")
    data = {k: v.astype(np.float32) for k, v in data.items()}
    data["dones"] = data.pop("terminals")  # a timeout is not terminal: no bootstrap cut
    return {**data, "task": task}


def make_env(task: dict, obs_mean: np.ndarray, obs_std: np.ndarray) -> gym.Env:
    """The task's gymnasium env (dictionary observations flattened), observing (obs - dataset mean) / dataset std."""
    spec = gym.envs.registration.EnvSpec.from_json(task["env_spec"])
    if str(spec.entry_point).startswith("gymnasium_robotics"):
        fix_robotics_joint_types()
    env = gym.make(spec)
    env = gym.wrappers.FlattenObservation(env) if isinstance(env.observation_space, gym.spaces.Dict) else env
    env = gym.wrappers.TransformObservation(env, lambda o: ((o - obs_mean) / obs_std).astype(np.float32), None)
    return gym.wrappers.RecordEpisodeStatistics(env)


def step_success(info: dict) -> bool | None:
    """The env's success at a step; None: the env reports none (locomotion)."""
    if "success" in info:  # Adroit
        return bool(info["success"])
    if "tasks_to_complete" in info:  # the kitchen: all its tasks done (done ones leave the list, or stay in it)
        return set(info["tasks_to_complete"]) <= set(info["episode_task_completions"])
    return None


def fix_robotics_joint_types() -> None:
    """gymnasium-robotics 1.4.2's `joint_type in (HINGE, SLIDE)` fails on mujoco 4's enums (kitchen envs): ints pass."""
    import mujoco
    from gymnasium_robotics.utils import mujoco_utils

    joints = {k: int(getattr(mujoco.mjtJoint, k)) for k in dir(mujoco.mjtJoint) if k.startswith("mjJNT_")}
    mujoco_utils.mujoco = types.SimpleNamespace(**{**vars(mujoco), "mjtJoint": types.SimpleNamespace(**joints)})


@torch.no_grad()
def evaluate(actor: Actor, env: gym.Env, episodes: int, device: torch.device) -> tuple:
    """Returns of deterministic episodes (action tanh(mean)), episode i reset with seed i, and their success (at any
    step; None: the env has none)."""
    returns, successes = [], []
    for i in range(episodes):
        (obs, _), done, total, success = env.reset(seed=i), False, 0.0, None
        while not done:
            action = actor.act(torch.as_tensor(obs, device=device)[None], deterministic=True)[0].cpu().numpy()
            obs, reward, terminated, truncated, info = env.step(action)
            total, success, done = total + float(reward), success or step_success(info), terminated or truncated
        returns.append(total)
        successes.append(success)
    return returns, successes


class ReplayBuffer:
    """Transitions kept as device tensors, so a minibatch is one randint and a few index_selects."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device, extra: tuple = ()):
        shapes = {"observations": obs_dim, "actions": act_dim, "rewards": 1, "next_observations": obs_dim, "dones": 1,
                  **dict.fromkeys(extra, 1)}
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
    if (n := len(data["rewards"])) < batch_size:
        raise SMACError(f"the dataset holds {n} transitions, fewer than one minibatch: give --batch-size {n} or less "
                        f"(now {batch_size})")
    buffer = ReplayBuffer(n, len(obs_mean), data["actions"].shape[1], device, extra=("w",))
    buffer.add(observations=(data["observations"] - obs_mean) / obs_std, actions=data["actions"], dones=data["dones"],
               next_observations=(data["next_observations"] - obs_mean) / obs_std, rewards=data["rewards"], w=data["w"])
    return buffer


def seed_everything(seed: int, torch_deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def load_checkpoint(path: str, device: torch.device) -> tuple:
    """(checkpoint dict, actor, critic, target critic). weights_only=True: loading runs no code."""
    if not os.path.isfile(path):
        raise SMACError(f"checkpoint {path} {'is a folder, not a file' if os.path.isdir(path) else 'does not exist'}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file or pickled code (torch's advice, weights_only=False, unsaid)
        raise SMACError(f"cannot read {path}: it is not a weights-only torch file ({type(e).__name__})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SMACError(f"{path} is not a SMAC checkpoint of this version (no format {CHECKPOINT_FORMAT!r})")
    if missing := [k for k in ("actor", "critic", "target_critic", *CHECKPOINT_INFO) if k not in ckpt]:
        raise SMACError(f"{path} is an incomplete SMAC checkpoint: it lacks {missing}")
    if ckpt["task"].get("name") != ckpt["env"]:
        raise SMACError(f"{path}: its dataset {ckpt['env']!r} and its task {ckpt['task'].get('name')!r} disagree")
    normalized_score(ckpt["task"], 0.0)  # its reference returns can normalize a score
    mean, std, dim = ckpt["obs_mean"], ckpt["obs_std"], ckpt["obs_dim"]
    if not (mean.shape == std.shape == (dim,) and torch.stack([mean, std]).isfinite().all() and (std > 0).all()):
        raise SMACError(f"{path}: its observation statistics are not {dim} finite numbers (std > 0)")
    actor = Actor(dim, ckpt["act_dim"], ckpt["hidden_dim"])
    critic = TwinCritic(dim, ckpt["act_dim"], ckpt["hidden_dim"], ckpt["args"]["critic_layer_norm"])
    return ckpt, *load_weights(path, ckpt, device, actor=actor, critic=critic, target_critic=copy.deepcopy(critic))


def load_score_nets(ckpt: dict, path: str, device: torch.device) -> tuple:
    """The checkpoint's diffusion model and alpha_psi, frozen: SMAC's penalty online."""
    if ckpt["score_model"] is None:
        raise SMACError(f"--score-coef > 0 needs a SMAC checkpoint; {path} was trained with --score-coef 0")
    score_model = ScoreModel(ckpt["obs_dim"], ckpt["act_dim"], steps=ckpt["args"]["diffusion_steps"])
    score_scale = ScoreScale(ckpt["obs_dim"], ckpt["hidden_dim"], ckpt["args"]["score_scale_floor"])
    nets = load_weights(path, ckpt, device, score_model=score_model, score_scale=score_scale)
    return [net.requires_grad_(False) for net in nets]


def load_weights(path: str, ckpt: dict, device: torch.device, **nets: nn.Module) -> list:
    """The nets with the checkpoint's weights of the same names, on the device."""
    try:
        for key, net in nets.items():
            net.load_state_dict(ckpt[key])
    except (RuntimeError, TypeError, AttributeError) as e:  # load_state_dict names the weights
        raise SMACError(f"{path}: the networks do not match the recorded shapes ({str(e)[:200]})") from e
    if not all(p.isfinite().all() for net in nets.values() for p in net.parameters()):
        raise SMACError(f"{path} holds non-finite (NaN or inf) weights")
    return [net.to(device) for net in nets.values()]


class RunLog(contextlib.AbstractContextManager):
    """runs/{run_name}/: TensorBoard scalars (W&B with --track), metrics.csv (a row per evaluation), checkpoints.
    `with RunLog(...) as log:` ends a run stopped by Ctrl-C or SIGTERM with one line naming its last checkpoint."""

    def __init__(self, args, dataset_name: str):
        self.run_name = f"{dataset_name.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        if os.path.exists(os.path.join(args.run_dir, self.run_name)):  # two runs started in the same second
            self.run_name += f"_{os.getpid()}"
        self.dir, self.last_checkpoint = os.path.join(args.run_dir, self.run_name), None
        self.train_scores, self.train_successes = [], []  # the online training episodes' (regret's data)
        if args.track:
            try:
                import wandb
            except ImportError:
                raise SMACError("--track needs Weights and Biases: pip install wandb") from None
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=vars(args), name=self.run_name, save_code=True)
        self.writer = SummaryWriter(self.dir)
        table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        self.start_clock()

    def __exit__(self, kind, error, traceback):
        self.writer.close()
        if kind is KeyboardInterrupt:
            raise KeyboardInterrupt(f"the last checkpoint is kept: {self.last_checkpoint or 'none was written yet'}")

    def start_clock(self) -> None:
        self.start_time, self.eval_seconds = time.time(), 0.0

    def sps(self, step: int) -> int:
        return int(step / (time.time() - self.start_time - self.eval_seconds))

    def failure(self, what: str) -> SMACError:  # the run stops; what it has written stays
        return SMACError(f"{what}; the last good checkpoint is kept: {self.last_checkpoint or 'none was written'}")

    def losses(self, phase: str, step: int, total: int, **losses) -> None:
        """At every LOG_FREQ-th step and the phase's last (total-th): NaN checks, TensorBoard, a printed line."""
        if step % LOG_FREQ != 0 and step != total:
            return
        scalars = {k: torch.as_tensor(v).mean().item() for k, v in losses.items()}
        if bad := [f"the {k} became {v} by {phase} step {step}" for k, v in scalars.items() if not math.isfinite(v)]:
            raise self.failure(bad[0])
        for name, value in {**scalars, "SPS": self.sps(step)}.items():
            self.writer.add_scalar(f"{phase}/{name}", value, step)
        print(" ".join([f"{phase} step={step}"] + [f"{k}={v:.4g}" for k, v in scalars.items()]), flush=True)

    def evaluation(self, step_name: str, step: int, actor: Actor, env: gym.Env, episodes: int, task: dict,
                   **metrics) -> float:
        """Mean normalized score of `evaluate`'s episodes: with success_rate and `metrics`, metrics.csv, TensorBoard."""
        self.check_finite_weights(f"{step_name} {step}", actor)  # a NaN policy is never reported
        start, (returns, successes) = time.time(), evaluate(actor, env, episodes, next(actor.parameters()).device)
        score = float(np.mean([normalized_score(task, r) for r in returns]))
        success = {} if None in successes else {"success_rate": float(np.mean(successes))}  # goal tasks only
        row = {step_name: step, "normalized_score": score, **success, **metrics}
        for name, value in row.items():
            self.writer.add_scalar(f"eval/{name}", value, step)
        print("eval " + " ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
        append_csv(os.path.join(self.dir, "metrics.csv"), row)
        self.eval_seconds += time.time() - start
        return score

    def episode(self, step: int, info: dict, success: bool | None, task: dict) -> None:
        """An online training episode's end: its return (and success), TensorBoard, episodes.csv, kept for regret."""
        row = {"step": step, "return": float(info["episode"]["r"])}
        row["normalized_score"] = normalized_score(task, row["return"])
        self.train_scores.append(row["normalized_score"])
        if success is not None:
            self.train_successes.append(success)
            row["success"] = int(success)
        self.writer.add_scalar("charts/episodic_return", row["return"], step)
        append_csv(os.path.join(self.dir, "episodes.csv"), row)

    def check_finite_weights(self, when: str, *nets: nn.Module) -> None:
        if not all(p.isfinite().all() for net in nets for p in net.parameters()):
            raise self.failure(f"the weights became non-finite (NaN or inf) by {when}")

    def save(self, name: str, actor, critic, target_critic, **info) -> None:
        """Weights-only checkpoint runs/{run_name}/{name}, written to a temporary file and renamed: never half-seen."""
        path, tmp = os.path.join(self.dir, name), os.path.join(self.dir, f".{name}.tmp{os.getpid()}")
        self.check_finite_weights(f"the checkpoint {path}", actor, critic, target_critic)
        content = {k: {n: w.detach().cpu() for n, w in v.state_dict().items()} if isinstance(v, nn.Module) else v
                   for k, v in dict(info, actor=actor, critic=critic, target_critic=target_critic).items()}
        try:
            torch.save({"format": CHECKPOINT_FORMAT, **content}, tmp)
            os.replace(tmp, path)
            self.last_checkpoint = path
        finally:  # a failed or interrupted write: the old checkpoint stays
            if os.path.exists(tmp):
                os.remove(tmp)


def append_csv(path: str, row: dict) -> None:
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, list(row))
        if f.tell() == 0:  # a new file
            writer.writeheader()
        writer.writerow({k: f"{v:.5g}" if isinstance(v, float) else v for k, v in row.items()})


def transfer_metrics(evals: list, train_scores: list, drop_window: int | None, updates: int = 0,
                     train_successes: list | None = None) -> dict:
    """evals: (updates since the hand-over, normalized score), step 0 first; a fall the updates cause is in the window.
    drop   = max(0, step-0 score - lowest evaluation within drop_window updates)
    regret = mean over online training episodes of 1 - normalized return / 100 (Cal-QL, CORL), or of 1 - success"""
    drop_window = max(5000, updates // 10) if drop_window is None else drop_window  # 10% of the updates, >= 5000
    start, lowest = evals[0][1], min(score for done, score in evals if done <= drop_window)
    if not all(math.isfinite(score) for _, score in evals):  # min() would skip a NaN: never a finite drop from one
        start = lowest = math.nan
    losses = [1.0 - s / 100.0 for s in train_scores] if train_successes is None else [1.0 - s for s in train_successes]
    regret = float(np.mean(losses)) if losses else math.nan
    drop = start - lowest if math.isnan(start) else max(0.0, start - lowest)
    return {"step0_score": start, "lowest_early_score": lowest, "drop": drop, "regret": regret,
            "regret_from": "return" if train_successes is None else "success", "final_score": evals[-1][1],
            "train_episodes": len(train_scores)}


def main(train_fn, args_class) -> None:
    """The scripts' command line: one line, no traceback, on bad input, Ctrl-C, SIGTERM, an OSError, out of memory."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's stop ends a run as Ctrl-C does
    try:
        train_fn(tyro.cli(args_class))
    except KeyboardInterrupt as e:
        sys.exit(f"\ninterrupted; {e.args[0] if e.args else 'no checkpoint was written yet'}")
    except (SMACError, OSError) as e:
        sys.exit(f"error: {e}")
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "memory" not in str(e):
            raise  # a bug: its traceback is the useful report
        sys.exit(f"error: out of memory ({str(e).splitlines()[0][:200]}); try a smaller --batch-size or --hidden-dim")


if __name__ == "__main__":
    main(train, Args)
