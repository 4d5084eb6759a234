"""SMAC, Score-Matched Actor-Critic: the offline phase, in one file.

SAC's soft-optimal policy is pi(a|s) ~ exp(Q(s,a) / alpha), so at that optimum
    grad_a Q(s,a) = alpha * grad_a log pi(a|s).                                   (the score equation)
SMAC trains an offline actor-critic whose critic is regularized toward this first-order condition, so that an online
SAC (or TD3) taking over starts near a stationary point instead of being pulled away from the offline policy.

Run:  python smac.py --env hopper-medium-v2 [--dataset-path file.hdf5]
Then: python sac_finetune.py --checkpoint runs/<run_name>/smac.pt   (or td3_finetune.py)
"""

import math
import os
import random
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Literal, Optional

import gymnasium as gym
import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    env: str = "hopper-medium-v2"
    """D4RL dataset name, {halfcheetah,hopper,walker2d}-{random,medium,medium-replay,medium-expert,expert}-v2"""
    dataset_path: Optional[str] = None
    """local D4RL-format HDF5 file to use instead of the download/cache"""
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
    exp_name: str = "smac"
    """the name of this experiment (first part of the run name)"""
    run_dir: str = "runs"
    """folder in which runs/{run_name}/ (TensorBoard logs and smac.pt) is written"""
    total_updates: int = 1_000_000
    """number of offline gradient updates"""
    batch_size: int = 256
    """minibatch size of transitions"""
    hidden_dim: int = 256
    """width of the two hidden layers of every network"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target critic smoothing coefficient"""
    actor_lr: float = 3e-4
    """learning rate of the actor"""
    critic_lr: float = 3e-4
    """learning rate of the critics"""
    optimizer: Literal["adam", "muon"] = "adam"
    """adam, or muon: torch.optim.Muon on 2-D weight matrices and AdamW on the rest"""
    alpha: float = 0.2
    """entropy temperature of the soft TD target and actor loss; also the alpha of the score equation"""
    score_coef: float = 10.0
    """lambda, weight of the score-matching regularizer (0: the same algorithm without SMAC, the baseline)"""
    score_actions: Literal["dataset", "policy", "both"] = "both"
    """actions at which the score equation is imposed: dataset actions, fresh policy samples, or both"""
    score_space: Literal["pretanh", "action"] = "pretanh"
    """match gradients w.r.t. the pre-tanh action u (saturation-safe) or w.r.t. the action a = tanh(u)"""
    bc_coef: float = 10.0
    """weight of the behaviour-cloning term -log pi(a_data|s) in the actor loss (at 1 the baseline collapsed)"""
    critic_density: bool = True
    """each critic adds alpha * log N_tanh(a; m(s), s(s)^2) with a learned head (m, s): see TwinCritic"""
    action_clip: float = 0.999
    """dataset actions are clipped to [-action_clip, action_clip] so that atanh stays finite"""
    eval_freq: int = 10_000
    """evaluate (and save the checkpoint) every this many updates; 0 evaluates only at the end"""
    eval_episodes: int = 10
    """number of deterministic evaluation episodes"""
    eval_seed: int = 0
    """evaluation episode i is reset with seed eval_seed + i (same seeds in the fine-tuners)"""
    log_freq: int = 1000
    """write training losses to TensorBoard every this many updates"""


# D4RL's v2 data came from the v3 MuJoCo envs; gymnasium's v4 envs have the same model (v5 changed it), so v4 it is.
warnings.filterwarnings("ignore", message=".*is out of date. You should consider upgrading to version `v5`")


class SMACError(Exception):
    """Bad input or a failed run: the message says what and how to fix it."""


# ---------------------------------------------------------------- D4RL datasets, without the d4rl package
D4RL_ENVS = {"halfcheetah": "HalfCheetah-v4", "hopper": "Hopper-v4", "walker2d": "Walker2d-v4"}
D4RL_DATASETS = ("random", "medium", "medium-replay", "medium-expert", "expert")
D4RL_NAMES = [f"{e}-{d}-v2" for e in D4RL_ENVS for d in D4RL_DATASETS]
REF_RETURNS = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3)}
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/{}_{}-v2.hdf5"
DATASET_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")


def check_env_name(name: str) -> str:
    if name not in D4RL_NAMES:
        raise SMACError(f"unknown env {name!r}; valid names: {', '.join(D4RL_NAMES)}")
    return name


def gym_id(name: str) -> str:
    return D4RL_ENVS[check_env_name(name).split("-")[0]]


def normalized_score(name: str, episode_return: float) -> float:
    # D4RL: score = 100 * (R - R_random) / (R_expert - R_random)
    low, high = REF_RETURNS[check_env_name(name).split("-")[0]]
    return 100.0 * (episode_return - low) / (high - low)


def dataset_url(name: str) -> str:
    env, dataset = check_env_name(name)[: -len("-v2")].split("-", 1)
    return D4RL_URL.format(env, dataset.replace("-", "_"))


def cached_dataset_path(name: str) -> str:
    cache = os.environ.get("D4RL_DATASET_DIR", os.path.expanduser("~/.d4rl/datasets"))
    return os.path.join(cache, os.path.basename(dataset_url(name)))


def download(url: str, path: str) -> None:
    """Download into a temporary file beside `path`, renamed into place only once complete."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, os.fdopen(fd, "wb") as out:
            total, done = int(response.headers.get("Content-Length") or 0), 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                progress = f"{100 * done / total:5.1f}%" if total else f"{done >> 20} MB"
                print(f"\rdownloading {url}: {progress}", end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
        if total and done != total:
            raise SMACError(f"download of {url} stopped after {done} of {total} bytes")
        os.replace(tmp, path)
    except (urllib.error.URLError, OSError) as e:
        raise SMACError(f"could not download {url} ({e}); with no network, give a local file: --dataset-path") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_dataset(name: str, path: Optional[str], obs_dim: int, act_dim: int) -> dict:
    """Read a D4RL-format HDF5 file; every check gives one clear SMACError."""
    if path is None:
        path = cached_dataset_path(name)
        if not os.path.exists(path):
            download(dataset_url(name), path)
    if not os.path.isfile(path):
        raise SMACError(f"dataset file {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in DATASET_KEYS if k not in f]
            if missing:
                raise SMACError(f"{path} lacks the D4RL key(s) {missing}")
            data = {k: f[k][()] for k in DATASET_KEYS}
    except OSError as e:
        raise SMACError(f"cannot read {path} as HDF5: {e}") from e
    lengths = {k: len(v) for k, v in data.items()}
    if len(set(lengths.values())) != 1:
        raise SMACError(f"{path}: the keys have different lengths {lengths}")
    for key, dim in (("observations", obs_dim), ("next_observations", obs_dim), ("actions", act_dim)):
        if data[key].ndim != 2 or data[key].shape[1] != dim:
            raise SMACError(f"{path}: {key} has shape {data[key].shape}, the env {gym_id(name)} needs (N, {dim})")
    for key in ("observations", "actions", "rewards", "next_observations"):
        if not np.isfinite(data[key]).all():
            raise SMACError(f"{path}: {key} contains NaN or inf values")
    data = {k: v.astype(np.float32) for k, v in data.items()}
    data["dones"] = data.pop("terminals")  # a timeout ends the episode but is not a terminal state: no bootstrap cut
    return data


# ---------------------------------------------------------------- environment, evaluation, replay
def make_env(name: str, obs_mean: np.ndarray, obs_std: np.ndarray) -> gym.Env:
    """The gymnasium env of a D4RL name, observing (obs - dataset mean) / dataset std."""
    env = gym.make(gym_id(name))
    env = gym.wrappers.TransformObservation(env, lambda o: ((o - obs_mean) / obs_std).astype(np.float32), None)
    return gym.wrappers.RecordEpisodeStatistics(env)


@torch.no_grad()
def evaluate(actor: "Actor", env: gym.Env, episodes: int, eval_seed: int, device: torch.device) -> list:
    """Returns of deterministic episodes (action tanh(mean)), episode i reset with seed eval_seed + i."""
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=eval_seed + i)
        done, total = False, 0.0
        while not done:
            action = actor.act(torch.as_tensor(obs, device=device)[None], deterministic=True)[0].cpu().numpy()
            obs, reward, terminated, truncated, _ = env.step(action)
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    return returns


class ReplayBuffer:
    """Transitions kept as device tensors, so a minibatch is one randint and six index_selects."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        shapes = {"observations": obs_dim, "actions": act_dim, "rewards": 1, "next_observations": obs_dim, "dones": 1}
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


def dataset_buffer(data: dict, obs_mean, obs_std, action_clip: float, device: torch.device) -> ReplayBuffer:
    """The dataset as a replay buffer: observations normalized, actions clipped just inside (-1, 1) for atanh."""
    buffer = ReplayBuffer(len(data["rewards"]), len(obs_mean), data["actions"].shape[1], device)
    buffer.add(observations=(data["observations"] - obs_mean) / obs_std, rewards=data["rewards"],
               actions=data["actions"].clip(-action_clip, action_clip), dones=data["dones"],
               next_observations=(data["next_observations"] - obs_mean) / obs_std)
    return buffer


# ---------------------------------------------------------------- networks
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def mlp(in_dim: int, out_dim: int, hidden: int) -> nn.Sequential:
    layers = [nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)]
    return nn.Sequential(*layers)


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
    """Reparameterized sample a = tanh(mean + std * eps) with its log-density log pi(a|s)."""
    u = mean + log_std.exp() * torch.randn_like(mean)
    return torch.tanh(u), tanh_gaussian_log_prob(mean, log_std, u)


def tanh_gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    # log pi(a|s) = log N(u; mu, sigma^2) - sum_i log(1 - tanh(u_i)^2),  a = tanh(u)
    # with log(1 - tanh(u)^2) = 2 * (log 2 - u - softplus(-2u)), which stays finite for large |u|
    log_normal = -0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    log_jacobian = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
    return (log_normal - log_jacobian).sum(-1)


def tanh_gaussian_score(mean: torch.Tensor, log_std: torch.Tensor, u: torch.Tensor, space: str) -> torch.Tensor:
    """grad of log pi(tanh(u)|s) w.r.t. u ("pretanh") or w.r.t. a = tanh(u) ("action"), in closed form."""
    # d/du log pi(tanh u) = -(u - mu) / sigma^2 + 2 tanh(u)          (the second term is the log-Jacobian's)
    score_u = -(u - mean) * torch.exp(-2.0 * log_std) + 2.0 * torch.tanh(u)
    # d/da = (d/du) / (da/du),  da/du = 1 - a^2
    return score_u if space == "pretanh" else score_u / (1.0 - torch.tanh(u) ** 2)


class TwinCritic(nn.Module):
    """Q_1 and Q_2 as two ordinary MLPs, evaluated together as one batched matmul per layer.
    With density_scale c > 0 both also get a shared state-only head (m(s), log s(s)) and a term of a tanh-Gaussian's
    log-density:  Q_i(s, a) = MLP_i(s, a) + c * log N_tanh(a; m(s), s(s)^2).  A ReLU MLP has a piecewise-constant
    action gradient, so it fits the linear-in-u score -(u - mu)/sigma^2 poorly; this term can equal
    alpha * log pi(a|s) exactly (m = mu, s = sigma, c = alpha) and leaves the MLP a flat action gradient to learn."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, density_scale: float = 0.0):
        super().__init__()
        self.obs_dim, self.density_scale = obs_dim, density_scale
        self.qs = nn.ModuleList([mlp(obs_dim + act_dim, 1, hidden) for _ in range(2)])
        self.density = mlp(obs_dim, 2 * act_dim, hidden) if density_scale > 0 else None

    def _hidden(self, obs: torch.Tensor, actions: torch.Tensor):
        """obs (B, o); actions (B, a) shared by both critics or (2, B, a), one set per critic."""
        x = torch.cat([obs.expand(2, *obs.shape), actions.expand(2, *actions.shape[-2:])], dim=-1)
        (w1, b1), (w2, b2), (w3, b3) = [
            (torch.stack([q[i].weight for q in self.qs]), torch.stack([q[i].bias for q in self.qs]).unsqueeze(1))
            for i in (0, 2, 4)
        ]
        h1 = F.relu(torch.baddbmm(b1, x, w1.transpose(1, 2)))
        h2 = F.relu(torch.baddbmm(b2, h1, w2.transpose(1, 2)))
        return h1, h2, (w1, w2, w3, b3)

    def _density_term(self, obs: torch.Tensor, actions: torch.Tensor):
        """c * log N_tanh(a; m(s), s(s)^2) and its gradient w.r.t. a; zeros without the head."""
        if self.density is None:
            return torch.zeros((), device=obs.device), torch.zeros((), device=obs.device)
        m, log_s = self.density(obs).chunk(2, dim=-1)
        u = torch.atanh(actions.clamp(-1.0 + 1e-6, 1.0 - 1e-6))  # float32 tanh can round to exactly +-1
        log_s = log_s.clamp(LOG_STD_MIN, LOG_STD_MAX)
        c = self.density_scale
        return c * tanh_gaussian_log_prob(m, log_s, u), c * tanh_gaussian_score(m, log_s, u, "action")

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q_i(s, a) for both critics, shape (2, B)."""
        _, h2, (_, _, w3, b3) = self._hidden(obs, actions)
        return torch.baddbmm(b3, h2, w3.transpose(1, 2)).squeeze(-1) + self._density_term(obs, actions)[0]

    def value_and_action_grad(self, obs: torch.Tensor, actions: torch.Tensor):
        """Q_i(s, a), shape (2, B), and grad_a Q_i(s, a), shape (2, B, a), as one differentiable expression.
        For Q = w3 . relu(W2 relu(W1 [s, a] + b1) + b2) + b3 the action gradient is the backward pass written out,
            grad_a Q = W1[:, a]^T (1[h1 > 0] * (W2^T (1[h2 > 0] * w3))),
        so a loss on it trains the critic with one ordinary backward (relu'' = 0: the masks are constants);
        cheaper than double backprop through autograd.grad(create_graph=True), and equal to it (a test checks)."""
        h1, h2, (w1, w2, w3, b3) = self._hidden(obs, actions)
        q = torch.baddbmm(b3, h2, w3.transpose(1, 2)).squeeze(-1)
        grad_h2 = w3 * (h2 > 0)  # (2, B, hidden)
        grad_h1 = torch.bmm(grad_h2, w2) * (h1 > 0)
        density_value, density_grad = self._density_term(obs, actions)
        return q + density_value, torch.bmm(grad_h1, w1[:, :, self.obs_dim:]) + density_grad


# ---------------------------------------------------------------- the losses
def soft_td_target(actor, target_critic, batch: dict, gamma: float, alpha) -> torch.Tensor:
    # y = r + gamma * (1 - done) * (min_i Q'_i(s', a') - alpha * log pi(a'|s')),  a' ~ pi(.|s')
    with torch.no_grad():
        next_actions, next_log_pi = tanh_gaussian_sample(*actor(batch["next_observations"]))
        next_v = target_critic(batch["next_observations"], next_actions).min(0).values - alpha * next_log_pi
        return batch["rewards"].squeeze(-1) + gamma * (1.0 - batch["dones"].squeeze(-1)) * next_v


def score_residual(critic: TwinCritic, obs, pre_tanh, mean, log_std, alpha: float, space: str):
    """Q at a = tanh(u) and, per critic, the residual grad Q_i - alpha * grad log pi; shapes (2, B), (2, B, a).
    Gradients are taken w.r.t. u ("pretanh") or w.r.t. a ("action")."""
    actions = torch.tanh(pre_tanh)
    q, grad_q = critic.value_and_action_grad(obs, actions)
    if space == "pretanh":
        grad_q = grad_q * (1.0 - actions**2)  # chain rule: dQ/du = dQ/da * (1 - tanh(u)^2)
    # the policy score is a fixed target: no gradient reaches the actor through the regularizer
    target = alpha * tanh_gaussian_score(mean.detach(), log_std.detach(), pre_tanh.detach(), space)
    return q, grad_q - target, grad_q


def sac_actor_loss(mean, log_std, obs, critic: TwinCritic, alpha) -> torch.Tensor:
    # L_pi = E_s E_{a~pi} [alpha * log pi(a|s) - min_i Q_i(s, a)]   (online SAC's actor loss, no behaviour term)
    actions, log_pi = tanh_gaussian_sample(mean, log_std)
    return (alpha * log_pi - critic(obs, actions).min(0).values).mean()


@torch.no_grad()
def diagnostics(actor, critic, buffer: ReplayBuffer, alpha: float, space: str, batches: int = 20) -> dict:
    """Did SMAC do its job? Averaged over `batches` fixed minibatches of dataset transitions:
    score_residual_rel   ||grad Q_i - alpha grad log pi|| / ||grad Q_i|| at dataset actions (in the matching space);
    sac_actor_grad_norm  norm of online SAC's actor-loss gradient at dataset states: the distance of the offline
                         actor-critic from a stationary point of online SAC."""
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(12345)  # the same minibatches every call, and training's random stream is left as it was
    residuals, grad_norms = [], []
    with torch.enable_grad():  # the actor-loss gradient needs autograd
        for _ in range(batches):
            batch = buffer.sample(256)
            obs, pre_tanh = batch["observations"], torch.atanh(batch["actions"])
            mean, log_std = actor(obs)
            _, residual, grad_q = score_residual(critic, obs, pre_tanh, mean, log_std, alpha, space)
            residuals.append((residual.norm() / grad_q.norm().clamp_min(1e-8)).item())
            grads = torch.autograd.grad(sac_actor_loss(mean, log_std, obs, critic, alpha), list(actor.parameters()))
            grad_norms.append(torch.sqrt(sum((g**2).sum() for g in grads)).item())
    torch.random.set_rng_state(rng_state)
    return {"score_residual_rel": float(np.mean(residuals)), "sac_actor_grad_norm": float(np.mean(grad_norms))}


def check_finite(loss: torch.Tensor, what: str, update: int) -> None:
    if not torch.isfinite(loss):
        raise SMACError(f"{what} became {loss.item()} at update {update}; the last good checkpoint is kept")


def make_optimizer(module: nn.Module, lr: float, kind: str) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(module.parameters(), lr=lr)
    # Muon orthogonalizes the update of each 2-D weight matrix; biases (1-D) go to AdamW. match_rms_adamw rescales
    # Muon's step so that the same learning rate means the same step size as AdamW's.
    matrices = [p for p in module.parameters() if p.ndim == 2]
    others = [p for p in module.parameters() if p.ndim != 2]
    return MultiOptimizer(
        torch.optim.Muon(matrices, lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW(others, lr=lr, weight_decay=0.0),
    )


class MultiOptimizer:
    """Steps several optimizers as one."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def zero_grad(self):
        for opt in self.optimizers:
            opt.zero_grad()

    def step(self):
        for opt in self.optimizers:
            opt.step()


# ---------------------------------------------------------------- checkpoints
CHECKPOINT_FORMAT = "smac-checkpoint-v1"
CHECKPOINT_KEYS = ("actor", "critic", "target_critic", "alpha", "env", "obs_mean", "obs_std", "obs_dim", "act_dim",
                   "hidden_dim", "args")


def save_checkpoint(path: str, **content) -> None:
    """torch.save to a temporary file, renamed into place: a reader never sees a half-written checkpoint."""
    content = {"format": CHECKPOINT_FORMAT, **content}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(content, tmp)
    os.replace(tmp, path)


def cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def load_checkpoint(path: str, device: torch.device):
    """Checkpoint dict and its networks (actor, critic, target critic); weights_only=True: loading runs no code."""
    if not os.path.isfile(path):
        raise SMACError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt files and for pickled code
        raise SMACError(f"cannot read {path} as a SMAC checkpoint ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SMACError(f"{path} is not a SMAC checkpoint (no format {CHECKPOINT_FORMAT!r})")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise SMACError(f"{path} is an incomplete SMAC checkpoint: it lacks {missing}")
    obs_dim, act_dim, hidden = ckpt["obs_dim"], ckpt["act_dim"], ckpt["hidden_dim"]
    density_scale = ckpt.get("critic_density_scale", 0.0)
    actor = Actor(obs_dim, act_dim, hidden).to(device)
    critic = TwinCritic(obs_dim, act_dim, hidden, density_scale).to(device)
    target_critic = TwinCritic(obs_dim, act_dim, hidden, density_scale).to(device)
    try:
        actor.load_state_dict(ckpt["actor"])
        critic.load_state_dict(ckpt["critic"])
        target_critic.load_state_dict(ckpt["target_critic"])
    except RuntimeError as e:  # missing or mis-shaped weights
        raise SMACError(f"{path}: the networks do not match the recorded shapes ({str(e)[:200]})") from e
    return ckpt, actor, critic, target_critic


def seed_everything(seed: int, torch_deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def pick_device(cuda: bool) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and cuda else "cpu")


def start_logging(args, run_name: str, run_dir: str) -> SummaryWriter:
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    writer = SummaryWriter(run_dir)
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return writer


# ---------------------------------------------------------------- the offline loop
def train(args: Args) -> dict:
    check_env_name(args.env)
    if args.dataset_path:  # the checkpoint keeps it (for --offline-ratio), so it must not depend on the cwd
        args = replace(args, dataset_path=os.path.abspath(args.dataset_path))
    run_name = f"{args.env}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.run_dir, run_name)
    seed_everything(args.seed, args.torch_deterministic)
    device = pick_device(args.cuda)

    probe = gym.make(gym_id(args.env))
    obs_dim, act_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
    data = load_dataset(args.env, args.dataset_path, obs_dim, act_dim)
    obs_mean, obs_std = data["observations"].mean(0), data["observations"].std(0) + 1e-3
    buffer = dataset_buffer(data, obs_mean, obs_std, args.action_clip, device)
    eval_env = make_env(args.env, obs_mean, obs_std)

    actor = Actor(obs_dim, act_dim, args.hidden_dim).to(device)
    density_scale = args.alpha if args.critic_density else 0.0
    critic = TwinCritic(obs_dim, act_dim, args.hidden_dim, density_scale).to(device)
    target_critic = TwinCritic(obs_dim, act_dim, args.hidden_dim, density_scale).to(device)
    target_critic.load_state_dict(critic.state_dict())
    actor_opt = make_optimizer(actor, args.actor_lr, args.optimizer)
    critic_opt = make_optimizer(critic, args.critic_lr, args.optimizer)
    alpha, pre_tanh_max = args.alpha, math.atanh(args.action_clip)

    os.makedirs(run_dir, exist_ok=True)
    writer = start_logging(args, run_name, run_dir)
    print(f"{run_name}: {buffer.size} transitions, obs {obs_dim}, act {act_dim}, device {device}")
    history, start_time, eval_seconds = [], time.time(), 0.0
    for update in range(1, args.total_updates + 1):
        batch = buffer.sample(args.batch_size)
        obs, pre_tanh_data = batch["observations"], torch.atanh(batch["actions"])
        mean, log_std = actor(obs)

        # critic: soft TD loss  sum_i E_D (Q_i(s,a) - y)^2,
        #         y = r + gamma (1 - d) (min_i Q'_i(s',a') - alpha log pi(a'|s')),  a' ~ pi(.|s')
        y = soft_td_target(actor, target_critic, batch, args.gamma, alpha)
        if args.score_coef > 0:
            # + lambda * sum_i E || grad Q_i(s,a) - alpha grad log pi(a|s) ||^2  at dataset and/or policy actions
            pre_tanh_pi = (mean + log_std.exp() * torch.randn_like(mean)).detach().clamp(-pre_tanh_max, pre_tanh_max)
            pre_tanh = pre_tanh_data if args.score_actions == "dataset" else torch.cat([pre_tanh_data, pre_tanh_pi])
            repeat = len(pre_tanh) // len(obs)
            q, residual, _ = score_residual(critic, obs.repeat(repeat, 1), pre_tanh, mean.repeat(repeat, 1),
                                            log_std.repeat(repeat, 1), alpha, args.score_space)
            q_data = q[:, : len(obs)]
            residual = residual[:, len(obs):] if args.score_actions == "policy" else residual
            score_loss = residual.pow(2).sum(-1).mean(1).sum()
        else:
            q_data, score_loss = critic(obs, batch["actions"]), torch.zeros((), device=device)
        td_loss = (q_data - y).pow(2).mean(1).sum()
        critic_loss = td_loss + args.score_coef * score_loss
        check_finite(critic_loss, "the critic loss", update)
        critic_opt.zero_grad()
        critic_loss.backward()
        critic_opt.step()

        # actor: L_pi = E_s E_{a~pi}[alpha log pi(a|s) - min_i Q_i(s,a)] - bc_coef * E_D log pi(a_data|s)
        critic.requires_grad_(False)  # the actor loss needs dQ/da only, not the critic's weight gradients
        sac_loss = sac_actor_loss(mean, log_std, obs, critic, alpha)
        bc_loss = -tanh_gaussian_log_prob(mean, log_std, pre_tanh_data).mean()
        actor_loss = sac_loss + args.bc_coef * bc_loss
        critic.requires_grad_(True)
        check_finite(actor_loss, "the actor loss", update)
        actor_opt.zero_grad()
        actor_loss.backward()
        actor_opt.step()

        with torch.no_grad():  # Q' <- tau Q + (1 - tau) Q'
            for param, target_param in zip(critic.parameters(), target_critic.parameters()):
                target_param.lerp_(param, args.tau)

        if update % args.log_freq == 0:
            sps = int(update / (time.time() - start_time - eval_seconds))  # updates per second, evaluation excluded
            scalars = dict(td_loss=td_loss.item(), score_loss=score_loss.item(), q_values=q_data.mean().item(),
                           actor_loss=sac_loss.item(), bc_loss=bc_loss.item(), alpha=alpha, SPS=sps)
            for name, value in scalars.items():
                writer.add_scalar(f"offline/{name}", value, update)
            print(f"update={update} td={scalars['td_loss']:.3f} score={scalars['score_loss']:.3f} SPS={sps}")

        if update == args.total_updates or (args.eval_freq > 0 and update % args.eval_freq == 0):
            eval_start = time.time()
            returns = evaluate(actor, eval_env, args.eval_episodes, args.eval_seed, device)
            score = float(np.mean([normalized_score(args.env, r) for r in returns]))
            diag = diagnostics(actor, critic, buffer, alpha, args.score_space)
            history.append([update, score])
            for name, value in [("normalized_score", score), *diag.items()]:
                writer.add_scalar(f"eval/{name}", value, update)
            print(f"eval update={update} normalized_score={score:.1f} return={np.mean(returns):.1f} "
                  f"score_residual_rel={diag['score_residual_rel']:.3f} "
                  f"sac_actor_grad_norm={diag['sac_actor_grad_norm']:.3f}")
            save_checkpoint(os.path.join(run_dir, "smac.pt"), actor=cpu_state(actor), critic=cpu_state(critic),
                            target_critic=cpu_state(target_critic), alpha=float(alpha), env=args.env,
                            obs_mean=torch.as_tensor(obs_mean), obs_std=torch.as_tensor(obs_std), obs_dim=obs_dim,
                            act_dim=act_dim, hidden_dim=args.hidden_dim, critic_density_scale=density_scale,
                            args=asdict(args), normalized_score=score,
                            update=update, diagnostics=diag, eval_history=history)
            eval_seconds += time.time() - eval_start
    sps = int(args.total_updates / (time.time() - start_time - eval_seconds))
    writer.close()
    eval_env.close()
    print(f"checkpoint: {os.path.join(run_dir, 'smac.pt')}")
    return {"run_dir": run_dir, "normalized_score": score, "sps": sps, **diag}


if __name__ == "__main__":
    try:
        train(tyro.cli(Args))
    except SMACError as e:
        sys.exit(f"error: {e}")
