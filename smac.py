"""SMAC, Score-Matched Actor-Critic (de Lara and Shkurti, arXiv 2602.17632): the offline phase, in one file.

SAC's soft-optimal policy is pi*(a|s) = exp(Q*(s,a) / alpha) / Z(s), so
    grad_a Q*(s,a) = alpha * grad_a log pi*(a|s).                                        (the score equation)
SMAC asks the offline critic to respect it with the DATASET's score in place of pi*'s: a return-conditioned
diffusion model estimates grad_a log pi^D(a|s, w), and the critic loss gets
    kappa * E_{s~D, a~B(A)} || grad_a Q(s,a) - alpha_psi(s) * grad_a log pi^D(a|s, w) ||^2
with alpha_psi(s) a learned state-dependent scale and B(A) half policy samples, half uniform actions. The actor keeps
SAC's own loss. An online SAC or TD3 taking over then starts from a critic whose action-gradient already points where
the data (and so the offline policy) is, instead of being pulled away from it.

Run:  python smac.py --env hopper-medium-replay-v2 [--dataset-path file.hdf5]
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
    env: str = "hopper-medium-replay-v2"
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
    """number of offline actor-critic updates"""
    batch_size: int = 256
    """minibatch size of transitions"""
    hidden_dim: int = 256
    """width of the hidden layers of every network"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target critic smoothing coefficient"""
    actor_lr: float = 3e-4
    """learning rate of the actor"""
    critic_lr: float = 3e-4
    """learning rate of the critics (and of alpha_psi)"""
    optimizer: Literal["adam", "muon"] = "adam"
    """adam, or muon: Muon (float32 Newton-Schulz) on hidden weight matrices and Adam on the rest"""
    alpha: float = 0.2
    """entropy temperature of the soft TD target and the SAC actor loss (fixed offline)"""
    critic_activation: Literal["relu", "silu"] = "silu"
    """activation of the critics: a ReLU critic's action-gradient is piecewise constant, a SiLU one's is smooth"""
    # ---- SMAC arguments
    score_coef: float = 10.0
    """kappa, weight of the score-matching penalty (0: the same offline SAC without SMAC, the baseline)"""
    score_model_updates: int = 100_000
    """updates of the diffusion model of the dataset's actions, trained before the actor-critic"""
    diffusion_steps: int = 10
    """K, noise steps of the diffusion model (IDQL's variance-preserving schedule; more steps: a sharper k=1 score)"""
    score_scale_floor: float = 0.2
    """alpha_psi(s) >= this floor (here alpha: the critic's action-gradient is at least alpha times the data's score)"""
    return_quantile: float = 0.9
    """the score is queried at w = this quantile of the dataset's episode returns (w is normalized to [0, 1])"""
    eval_freq: int = 10_000
    """evaluate (and save the checkpoint) every this many updates; 0 evaluates only at the end"""
    eval_episodes: int = 10
    """number of deterministic evaluation episodes"""
    eval_seed: int = 0
    """evaluation episode i is reset with seed eval_seed + i (same seeds in the fine-tuners)"""
    log_freq: int = 1000
    """write training losses to TensorBoard every this many updates"""


# ---------------------------------------------------------------- networks
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}


def mlp(in_dim: int, out_dim: int, hidden: int, activation: str = "relu") -> nn.Sequential:
    act = ACTIVATIONS[activation]
    return nn.Sequential(nn.Linear(in_dim, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, out_dim))


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
    """Q_1 and Q_2 as two ordinary MLPs on [s, a], evaluated together as one batched matmul per layer."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, activation: str = "relu"):
        super().__init__()
        self.activation = activation
        self.qs = nn.ModuleList([mlp(obs_dim + act_dim, 1, hidden, activation) for _ in range(2)])

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q_i(s, a), shape (2, B); actions (B, a) shared by both critics or (2, B, a), one set per critic."""
        x = torch.cat([obs.expand(2, *obs.shape), actions.expand(2, *actions.shape[-2:])], dim=-1)
        act = F.relu if self.activation == "relu" else F.silu
        for i in (0, 2, 4):
            weight = torch.stack([q[i].weight for q in self.qs]).transpose(1, 2)
            x = torch.baddbmm(torch.stack([q[i].bias for q in self.qs]).unsqueeze(1), x, weight)
            x = act(x) if i < 4 else x
        return x.squeeze(-1)


class ScoreModel(nn.Module):
    """The behaviour score model: a conditional diffusion model eps_omega(s, a_k, w, k) of the dataset's actions, in
    IDQL's style (a residual MLP with LayerNorm), conditioned on a trajectory-level return w as in Reinforcement via
    Supervision. Noising: a_k = sqrt(abar_k) a + sqrt(1 - abar_k) eps, k = 1..K."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, steps: int = 5, blocks: int = 2):
        super().__init__()
        self.steps = steps
        # IDQL's variance-preserving betas: 1 - exp(-b_min / K - (b_max - b_min) (2k - 1) / (2 K^2)), b = 0.1 .. 10
        k = torch.arange(1, steps + 1, dtype=torch.float32)
        betas = 1.0 - torch.exp(-0.1 / steps - 0.5 * (10.0 - 0.1) * (2 * k - 1) / steps**2)
        self.register_buffer("alpha_bars", torch.cumprod(1.0 - betas, 0))
        self.inp = nn.Linear(act_dim + obs_dim + 1 + 16, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.Mish(), nn.Linear(4 * hidden, hidden))
            for _ in range(blocks))
        self.out = nn.Linear(hidden, act_dim)

    def forward(self, obs, noisy_actions, w, k):
        """eps_omega(s, a_k, w, k); w (B, 1) in [0, 1], k (B,) integer noise steps in 1..K."""
        freqs = torch.exp(torch.linspace(0.0, math.log(100.0), 8, device=obs.device))
        angle = k[:, None].float() * freqs  # a sinusoidal embedding of the noise step
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
        # grad_a log p~(a|s, w), p~ = the data's actions blurred by the first noise step: a_1 = sqrt(abar_1) (a + n),
        # n ~ N(0, (1 - abar_1) / abar_1), so grad_a log p~(a) = -sqrt(abar_1) eps_omega(s, sqrt(abar_1) a, w, 1) /
        # sqrt(1 - abar_1). Querying at sqrt(abar_1) a rather than at a keeps the field centred on the data's actions
        # (eps_omega at a itself points to sqrt(abar_1) times them, shrunk toward 0); smooth enough for a critic.
        k = torch.ones(len(obs), dtype=torch.long, device=obs.device)
        alpha_bar = self.alpha_bars[0]
        return -alpha_bar.sqrt() * self(obs, alpha_bar.sqrt() * actions, w, k) / (1.0 - alpha_bar).sqrt()


class ScoreScale(nn.Module):
    """alpha_psi(s) = floor + softplus(g_psi(s)), the learned state-dependent proportion between grad_a Q and the
    dataset's score. Left free (floor 0), the penalty is also minimized by alpha_psi -> 0 and a critic flat in a."""

    def __init__(self, obs_dim: int, hidden: int = 256, floor: float = 0.0, init: float = 1.0):
        super().__init__()
        self.floor, self.net = floor, mlp(obs_dim, 1, hidden)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, math.log(math.expm1(init)))  # softplus(bias) = init at the start

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.floor + F.softplus(self.net(obs))  # (B, 1)


# ---------------------------------------------------------------- the losses (the offline trainer's and the fine-tuners')
def soft_td_target(actor, target_critic, batch: dict, gamma: float, alpha) -> torch.Tensor:
    # y = r + gamma * (1 - done) * (min_i Q'_i(s', a') - alpha * log pi(a'|s')),  a' ~ pi(.|s')
    with torch.no_grad():
        next_actions, next_log_pi = tanh_gaussian_sample(*actor(batch["next_observations"]))
        next_v = target_critic(batch["next_observations"], next_actions).min(0).values - alpha * next_log_pi
        return batch["rewards"].squeeze(-1) + gamma * (1.0 - batch["dones"].squeeze(-1)) * next_v


def td_loss(critic, batch: dict, y: torch.Tensor) -> torch.Tensor:
    # L_TD = sum_i E_D (Q_i(s, a) - y)^2
    return (critic(batch["observations"], batch["actions"]) - y).pow(2).mean(1).sum()


def critic_action_grad(critic: TwinCritic, obs, actions, create_graph: bool = True) -> torch.Tensor:
    """grad_a Q_i(s, a) for both critics, shape (2, B, a); differentiable w.r.t. the critic (double backprop)."""
    actions = actions.detach().expand(2, *actions.shape).clone().requires_grad_(True)
    q = critic(obs, actions)
    return torch.autograd.grad(q.sum(), actions, create_graph=create_graph)[0]


def penalty_actions(mean, log_std) -> torch.Tensor:
    # B(A): each state gets a policy sample a ~ pi(.|s) or a uniform action a ~ U[-1, 1]^d, with probability 1/2
    policy_actions = tanh_gaussian_sample(mean, log_std)[0].detach()
    uniform_actions = torch.rand_like(policy_actions) * 2.0 - 1.0
    from_policy = torch.rand(len(mean), 1, device=mean.device) < 0.5
    return torch.where(from_policy, policy_actions, uniform_actions)


def score_matching_residual(critic, score_scale, score_model, obs, actions, w):
    """residual_i = grad_a Q_i(s, a) - alpha_psi(s) * grad_a log pi^D(a|s, w), shape (2, B, a), and its parts."""
    with torch.no_grad():
        data_score = score_model.score(obs, actions, w)  # a fixed target: the score model is trained beforehand
    grad_q = critic_action_grad(critic, obs, actions)
    return grad_q - score_scale(obs) * data_score, grad_q, data_score


def score_matching_loss(residual: torch.Tensor) -> torch.Tensor:
    # L_SM = sum_i E_{s~D, a~B(A)} || grad_a Q_i(s,a) - alpha_psi(s) grad_a log pi^D(a|s, w) ||^2
    return residual.pow(2).sum(-1).mean(1).sum()


def sac_actor_loss(mean, log_std, obs, critic: TwinCritic, alpha) -> torch.Tensor:
    # L_pi = E_s E_{a~pi} [alpha * log pi(a|s) - min_i Q_i(s, a)]   (SAC's actor loss, offline and online alike)
    actions, log_pi = tanh_gaussian_sample(mean, log_std)
    return (alpha * log_pi - critic(obs, actions).min(0).values).mean()


# ---------------------------------------------------------------- the offline loop
def train(args: Args) -> dict:
    check_args(args)
    if args.dataset_path:  # the checkpoint keeps it, so it must not depend on the cwd
        args = replace(args, dataset_path=os.path.abspath(args.dataset_path))
    run_name = f"{args.env}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.run_dir, run_name)
    seed_everything(args.seed, args.torch_deterministic)
    device = pick_device(args.cuda)

    probe = gym.make(gym_id(args.env))
    obs_dim, act_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
    data = load_dataset(args.env, args.dataset_path, obs_dim, act_dim)
    obs_mean, obs_std = data["observations"].mean(0), data["observations"].std(0) + 1e-3
    buffer = dataset_buffer(data, obs_mean, obs_std, device)
    w_query = float(np.quantile(data["episode_return_w"], args.return_quantile))
    eval_env = make_env(args.env, obs_mean, obs_std)

    actor = Actor(obs_dim, act_dim, args.hidden_dim).to(device)
    critic = TwinCritic(obs_dim, act_dim, args.hidden_dim, args.critic_activation).to(device)
    target_critic = TwinCritic(obs_dim, act_dim, args.hidden_dim, args.critic_activation).to(device)
    target_critic.load_state_dict(critic.state_dict())
    score_model = ScoreModel(obs_dim, act_dim, 128, args.diffusion_steps).to(device)  # IDQL: 256 wide; 128 on a CPU
    score_scale = ScoreScale(obs_dim, args.hidden_dim, args.score_scale_floor).to(device)
    actor_opt = make_optimizer([actor], args.actor_lr, args.optimizer)
    critic_opt = make_optimizer([critic, score_scale], args.critic_lr, args.optimizer)
    score_model_opt = torch.optim.Adam(score_model.parameters(), lr=3e-4)
    alpha = args.alpha

    os.makedirs(run_dir, exist_ok=True)
    writer = start_logging(args, run_name, run_dir)
    print(f"{run_name}: {buffer.size} transitions, obs {obs_dim}, act {act_dim}, device {device}, w_query {w_query:.3f}")

    # phase 1: the diffusion model of the dataset's actions, pi^D(a|s, w)
    start_time = time.time()
    for update in range(1, (args.score_model_updates if args.score_coef > 0 else 0) + 1):
        batch = buffer.sample(args.batch_size)
        diffusion_loss = score_model.loss(batch["observations"], batch["actions"], batch["w"])
        score_model_opt.zero_grad()
        diffusion_loss.backward()
        score_model_opt.step()
        if update % args.log_freq == 0:
            writer.add_scalar("score_model/diffusion_loss", diffusion_loss.item(), update)
            print(f"score model update={update} diffusion_loss={diffusion_loss.item():.4f} "
                  f"SPS={int(update / (time.time() - start_time))}", flush=True)
    score_model.requires_grad_(False)

    # phase 2: the actor-critic
    history, start_time, eval_seconds = [], time.time(), 0.0
    for update in range(1, args.total_updates + 1):
        batch = buffer.sample(args.batch_size)
        obs = batch["observations"]
        mean, log_std = actor(obs)

        # critic: L_Q = L_TD + kappa * L_SM  (SMAC)
        y = soft_td_target(actor, target_critic, batch, args.gamma, alpha)
        critic_td_loss = td_loss(critic, batch, y)
        if args.score_coef > 0:
            actions = penalty_actions(mean, log_std)
            w = torch.full((len(obs), 1), w_query, device=device)
            residual, grad_q, data_score = score_matching_residual(critic, score_scale, score_model, obs, actions, w)
            sm_loss = score_matching_loss(residual)
        else:
            sm_loss = torch.zeros((), device=device)
        critic_loss = critic_td_loss + args.score_coef * sm_loss
        critic_opt.zero_grad()
        critic_loss.backward()
        critic_opt.step()

        # actor: L_pi = E_s E_{a~pi}[alpha log pi(a|s) - min_i Q_i(s,a)], SAC's loss unchanged
        critic.requires_grad_(False)  # the actor loss needs dQ/da only, not the critic's weight gradients
        actor_loss = sac_actor_loss(mean, log_std, obs, critic, alpha)
        critic.requires_grad_(True)
        actor_opt.zero_grad()
        actor_loss.backward()
        actor_opt.step()

        with torch.no_grad():  # Q' <- tau Q + (1 - tau) Q'
            for param, target_param in zip(critic.parameters(), target_critic.parameters()):
                target_param.lerp_(param, args.tau)

        last = update == args.total_updates or (args.eval_freq > 0 and update % args.eval_freq == 0)
        if update % args.log_freq == 0 or last:  # checked here only: a check per update syncs a GPU every step
            check_finite({"the critic loss": critic_loss, "the actor loss": actor_loss}, update)
        if update % args.log_freq == 0:
            sps = int(update / (time.time() - start_time - eval_seconds))  # updates per second, evaluation excluded
            scalars = dict(td_loss=critic_td_loss.item(), score_loss=sm_loss.item(), actor_loss=actor_loss.item(),
                           q_values=y.mean().item(), SPS=sps)
            if args.score_coef > 0:
                scalars["alpha_psi_mean"] = score_scale(obs).mean().item()
            for name, value in scalars.items():
                writer.add_scalar(f"offline/{name}", value, update)
            print(" ".join([f"update={update}"] + [f"{k}={v:.4g}" for k, v in scalars.items()]), flush=True)

        if last:
            eval_start = time.time()
            returns = evaluate(actor, eval_env, args.eval_episodes, args.eval_seed, device)
            score = float(np.mean([normalized_score(args.env, r) for r in returns]))
            diag = diagnostics(actor, critic, target_critic, score_scale, score_model, buffer, alpha, args, w_query)
            history.append([update, score])
            for name, value in [("normalized_score", score), *diag.items()]:
                writer.add_scalar(f"eval/{name}", value, update)
            print(f"eval update={update} normalized_score={score:.1f} return={np.mean(returns):.1f} "
                  + " ".join(f"{k}={v:.3f}" for k, v in diag.items()), flush=True)
            save_checkpoint(os.path.join(run_dir, "smac.pt"), actor=cpu_state(actor), critic=cpu_state(critic),
                            target_critic=cpu_state(target_critic), alpha=float(alpha), env=args.env,
                            obs_mean=torch.as_tensor(obs_mean), obs_std=torch.as_tensor(obs_std), obs_dim=obs_dim,
                            act_dim=act_dim, hidden_dim=args.hidden_dim, critic_activation=args.critic_activation,
                            probe_obs=probe_states(buffer).cpu(), args=asdict(args), normalized_score=score,
                            update=update, diagnostics=diag, eval_history=history)
            eval_seconds += time.time() - eval_start
    sps = int(args.total_updates / (time.time() - start_time - eval_seconds))
    writer.close()
    eval_env.close()
    print(f"checkpoint: {os.path.join(run_dir, 'smac.pt')}")
    return {"run_dir": run_dir, "normalized_score": score, "sps": sps, **diag}


@torch.no_grad()
def diagnostics(actor, critic, target_critic, score_scale, score_model, buffer, alpha, args, w_query,
                batches: int = 10) -> dict:
    """Where the offline actor-critic stands, averaged over fixed minibatches of dataset states:
    score_residual_rel   ||grad_a Q_i - alpha_psi grad_a log pi^D|| / ||grad_a Q_i|| at B(A) actions
    score_cosine         cos(grad_a Q_i, grad_a log pi^D) at B(A) actions; alpha_psi_mean its scale
    sac_actor_grad_norm  norm of SAC's actor-loss gradient: the distance from a stationary point of online SAC
    td_grad_norm         norm of the TD loss's critic gradient; the fine-tuners compare theirs with it."""
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(12345)  # the same minibatches every call, and training's random stream is left as it was
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
            out["sac_actor_grad_norm"].append(grad_norm(sac_actor_loss(mean, log_std, obs, critic, alpha), actor))
            y = soft_td_target(actor, target_critic, batch, args.gamma, alpha)
            out["td_grad_norm"].append(grad_norm(td_loss(critic, batch, y), critic))
    torch.random.set_rng_state(rng_state)
    return {k: float(np.mean(v)) if v else math.nan for k, v in out.items()}


def grad_norm(loss: torch.Tensor, module: nn.Module) -> float:
    grads = torch.autograd.grad(loss, list(module.parameters()))
    return torch.sqrt(sum((g**2).sum() for g in grads)).item()


def probe_states(buffer, n: int = 1024) -> torch.Tensor:
    """A fixed set of dataset states (normalized) at which the fine-tuners measure KL(pi_offline || pi_t)."""
    idx = torch.linspace(0, buffer.size - 1, min(n, buffer.size), device=buffer.device).long()
    return buffer.data["observations"][idx]


def gaussian_kl(mean_p, log_std_p, mean_q, log_std_q) -> torch.Tensor:
    # KL(pi_p || pi_q) of two tanh-Gaussians = KL of their Gaussians (tanh is a bijection); summed over dimensions
    var_ratio = torch.exp(2 * (log_std_p - log_std_q))
    return 0.5 * (var_ratio + ((mean_p - mean_q) / log_std_q.exp()) ** 2 - 1.0 - torch.log(var_ratio)).sum(-1)


# ======================================================================================================================
# Plumbing below: argument checks, D4RL data without the d4rl package, evaluation, replay, optimizers, checkpoints.
# ======================================================================================================================

# D4RL's v2 data came from the v3 MuJoCo envs; gymnasium's v4 envs have the same model (v5 changed it), so v4 it is.
warnings.filterwarnings("ignore", message=".*is out of date. You should consider upgrading to version `v5`")


class SMACError(Exception):
    """Bad input or a failed run: the message says what and how to fix it."""


def check_args(args: Args) -> None:
    check_env_name(args.env)
    if not 0.0 <= args.return_quantile <= 1.0:
        raise SMACError(f"--return-quantile must be in [0, 1], got {args.return_quantile}")
    if args.score_coef < 0 or args.diffusion_steps < 1 or args.score_model_updates < 0:
        raise SMACError("--score-coef and --score-model-updates must be >= 0 and --diffusion-steps >= 1")


def check_finite(losses: dict, update: int) -> None:
    for what, loss in losses.items():
        if not torch.isfinite(loss):
            raise SMACError(f"{what} became {loss.item()} by update {update}; the last good checkpoint is kept")


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
    """Read a D4RL-format HDF5 file; every check gives one clear SMACError. Adds episode_return_w: the return of
    each transition's episode, min-max normalized over the dataset's episodes (the score model's w)."""
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
    data["episode_return_w"] = episode_returns(data)
    return data


def episode_returns(data: dict) -> np.ndarray:
    """Per transition, its episode's return, min-max normalized to [0, 1] over the dataset's episodes. An episode
    ends at a terminal, a timeout, a jump between next_observations[t] and observations[t+1], or the file's end."""
    ends = (data["dones"] > 0) | (data["timeouts"] > 0)
    ends[:-1] |= np.any(data["next_observations"][:-1] != data["observations"][1:], axis=1)
    ends[-1] = True
    episode = np.concatenate([[0], np.cumsum(ends)[:-1]])
    returns = np.bincount(episode, weights=data["rewards"])
    low, high = returns.min(), returns.max()
    return ((returns - low) / max(high - low, 1e-8))[episode].astype(np.float32)


def make_env(name: str, obs_mean: np.ndarray, obs_std: np.ndarray) -> gym.Env:
    """The gymnasium env of a D4RL name, observing (obs - dataset mean) / dataset std."""
    env = gym.make(gym_id(name))
    env = gym.wrappers.TransformObservation(env, lambda o: ((o - obs_mean) / obs_std).astype(np.float32), None)
    return gym.wrappers.RecordEpisodeStatistics(env)


@torch.no_grad()
def evaluate(actor: Actor, env: gym.Env, episodes: int, eval_seed: int, device: torch.device) -> list:
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
    """Transitions kept as device tensors, so a minibatch is one randint and a few index_selects."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device, extra: tuple = ()):
        shapes = {"observations": obs_dim, "actions": act_dim, "rewards": 1, "next_observations": obs_dim, "dones": 1}
        shapes.update({k: 1 for k in extra})
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


def dataset_buffer(data: dict, obs_mean, obs_std, device: torch.device) -> ReplayBuffer:
    """The dataset as a replay buffer, observations normalized, with each transition's episode return w."""
    buffer = ReplayBuffer(len(data["rewards"]), len(obs_mean), data["actions"].shape[1], device, extra=("w",))
    buffer.add(observations=(data["observations"] - obs_mean) / obs_std, rewards=data["rewards"],
               actions=data["actions"].clip(-1.0, 1.0), dones=data["dones"], w=data["episode_return_w"],
               next_observations=(data["next_observations"] - obs_mean) / obs_std)
    return buffer


def make_optimizer(modules: list, lr: float, kind: str) -> torch.optim.Optimizer:
    params = [p for m in modules for p in m.parameters()]
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    matrices = [p for p in params if p.ndim == 2 and min(p.shape) > 1]  # hidden and input matrices; not 1-row heads
    others = [p for p in params if not (p.ndim == 2 and min(p.shape) > 1)]
    return MultiOptimizer(Muon(matrices, lr=lr), torch.optim.Adam(others, lr=lr))


class Muon(torch.optim.Optimizer):
    """Muon: SGD with Nesterov momentum whose update of each weight matrix is orthogonalized by a Newton-Schulz
    iteration, scaled to Adam's step size (0.2 sqrt(max(m, n)), as torch.optim.Muon's match_rms_adamw). Written out
    because torch.optim.Muon iterates in bfloat16, which is ~200x slower than float32 on a CPU."""

    def __init__(self, params, lr: float, momentum: float = 0.95, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"])  # Nesterov
                x = update / (update.norm() + 1e-7)
                transposed = x.shape[0] > x.shape[1]
                x = x.T if transposed else x
                for _ in range(group["ns_steps"]):  # X <- a X + (b X X^T + c (X X^T)^2) X, coefficients of Muon
                    gram = x @ x.T
                    x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
                x = x.T if transposed else x
                p.add_(x, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))


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


CHECKPOINT_FORMAT = "smac-checkpoint-v2"
CHECKPOINT_KEYS = ("actor", "critic", "target_critic", "alpha", "env", "obs_mean", "obs_std", "obs_dim", "act_dim",
                   "hidden_dim", "critic_activation", "probe_obs", "args")


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
    obs_dim, act_dim, hidden, activation = ckpt["obs_dim"], ckpt["act_dim"], ckpt["hidden_dim"], ckpt["critic_activation"]
    actor = Actor(obs_dim, act_dim, hidden).to(device)
    critic = TwinCritic(obs_dim, act_dim, hidden, activation).to(device)
    target_critic = TwinCritic(obs_dim, act_dim, hidden, activation).to(device)
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


if __name__ == "__main__":
    try:
        train(tyro.cli(Args))
    except SMACError as e:
        sys.exit(f"error: {e}")
