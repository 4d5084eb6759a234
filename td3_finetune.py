"""Online TD3 (or TD3+BC with --bc-coef) fine-tuning of a SMAC checkpoint; without --checkpoint, TD3 from scratch.

    python td3_finetune.py --checkpoint runs/<run_name>/smac.pt

The deterministic actor is mu(s) = tanh(mean(s)) of the loaded Gaussian actor, so the first online policy is exactly
the offline policy's mean action; the twin critics and their targets are the loaded ones.
"""

import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import tyro

import smac
from sac_finetune import OnlineLog, finish, online_run_name, sample_batch, setup_online


@dataclass
class Args:
    checkpoint: Optional[str] = None
    """SMAC checkpoint (smac.pt) to fine-tune; without it, TD3 learns from scratch on --env"""
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
    exp_name: str = "td3_finetune"
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
    """target smoothing coefficient"""
    policy_lr: float = 3e-4
    """learning rate of the actor"""
    q_lr: float = 3e-4
    """learning rate of the critics"""
    optimizer: Literal["adam", "muon"] = "adam"
    """adam, or muon: torch.optim.Muon on 2-D weight matrices and AdamW on the rest (as smac.py --optimizer)"""
    policy_frequency: int = 2
    """the actor and the targets are updated every this many steps (TD3's delay)"""
    exploration_noise: float = 0.1
    """std of the Gaussian exploration noise added to mu(s)"""
    policy_noise: float = 0.2
    """std of the target-policy smoothing noise"""
    noise_clip: float = 0.5
    """the target-policy smoothing noise is clipped to [-noise_clip, noise_clip]"""
    bc_coef: float = 0.0
    """> 0 gives online TD3+BC: actor loss -Q/mean|Q| + bc_coef * ||mu(s) - a||^2 (TD3+BC's alpha=2.5 is 0.4)"""
    learning_starts: Optional[int] = None
    """online steps before updates begin; default 5000 from scratch (random actions), 1000 with a checkpoint"""
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


def deterministic_action(actor: smac.Actor, obs: torch.Tensor) -> torch.Tensor:
    return torch.tanh(actor(obs)[0])  # mu(s) = tanh(mean(s))


def train(args: Args) -> dict:
    smac.seed_everything(args.seed, args.torch_deterministic)
    device = smac.pick_device(args.cuda)
    setup = setup_online(args, device)
    env, actor, critic, target_critic = setup["env"], setup["actor"], setup["critic"], setup["target_critic"]
    target_actor = copy.deepcopy(actor)
    run_name = online_run_name(args, setup)
    run_dir = os.path.join(args.run_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)
    writer = smac.start_logging(args, run_name, run_dir)

    actor_opt = smac.make_optimizer([actor], args.policy_lr, args.optimizer)
    critic_opt = smac.make_optimizer([critic], args.q_lr, args.optimizer)
    buffer = smac.ReplayBuffer(min(args.buffer_size, args.total_timesteps), setup["obs_dim"], setup["act_dim"], device)
    log = OnlineLog(run_dir, setup["env_name"], args, setup, writer)
    log.evaluate(0, actor, setup["eval_env"], args, device)  # the offline policy's mean action opens the curve

    obs, _ = env.reset(seed=args.seed)
    actor_loss, start_time = torch.zeros(()), time.time()
    for step in range(1, args.total_timesteps + 1):
        if args.checkpoint is None and step <= setup["learning_starts"]:
            action = env.action_space.sample()  # random warm-up only when learning from scratch
        else:
            with torch.no_grad():
                action = deterministic_action(actor, torch.as_tensor(obs, device=device)[None])[0]
                action = (action + args.exploration_noise * torch.randn_like(action)).clamp(-1, 1).cpu().numpy()
        next_obs, reward, terminated, truncated, info = env.step(action)
        buffer.add(observations=obs[None], actions=action[None], rewards=[reward], next_observations=next_obs[None],
                   dones=[terminated])
        obs = next_obs
        if terminated or truncated:
            log.episode(step, float(info["episode"]["r"]))
            obs, _ = env.reset()

        if step > setup["learning_starts"]:
            batch = sample_batch(buffer, setup["offline"], args)
            with torch.no_grad():
                # y = r + gamma (1 - d) min_i Q'_i(s', clip(mu'(s') + clip(eps, -c, c), -1, 1)),  eps ~ N(0, sigma^2)
                next_obs_b = batch["next_observations"]
                noise = torch.randn_like(batch["actions"]) * args.policy_noise
                noise = noise.clamp(-args.noise_clip, args.noise_clip)
                next_actions = (deterministic_action(target_actor, next_obs_b) + noise).clamp(-1, 1)
                next_q = target_critic(next_obs_b, next_actions).min(0).values
                y = batch["rewards"].squeeze(-1) + args.gamma * (1 - batch["dones"].squeeze(-1)) * next_q
            critic_loss = (critic(batch["observations"], batch["actions"]) - y).pow(2).mean(1).sum()
            critic_opt.zero_grad()
            critic_loss.backward()
            log.critic_step(critic)
            critic_opt.step()

            if step % args.policy_frequency == 0:
                mu = deterministic_action(actor, batch["observations"])
                critic.requires_grad_(False)
                q1 = critic(batch["observations"], mu)[0]
                critic.requires_grad_(True)
                if args.bc_coef > 0:  # TD3+BC: L = -Q_1(s, mu(s)) / mean|Q_1| + bc_coef * ||mu(s) - a||^2
                    bc_loss = (mu - batch["actions"]).pow(2).mean()
                    actor_loss = -q1.mean() / q1.abs().mean().detach() + args.bc_coef * bc_loss
                else:  # TD3: L = -Q_1(s, mu(s))
                    actor_loss = -q1.mean()
                actor_opt.zero_grad()
                actor_loss.backward()
                actor_opt.step()
                with torch.no_grad():  # theta' <- tau theta + (1 - tau) theta', for the actor and the critics
                    for net, target in ((actor, target_actor), (critic, target_critic)):
                        for param, target_param in zip(net.parameters(), target.parameters()):
                            target_param.lerp_(param, args.tau)

            if step % 1000 == 0:
                writer.add_scalar("losses/critic_loss", critic_loss.item(), step)
                writer.add_scalar("losses/actor_loss", actor_loss.item(), step)
        if step % 1000 == 0:
            sps = int(step / (time.time() - start_time))
            writer.add_scalar("charts/SPS", sps, step)
            print(f"step={step} SPS={sps}", flush=True)
        if log.due(step, args):
            log.evaluate(step, actor, setup["eval_env"], args, device)
    return finish(setup, args, log, run_dir, setup["ckpt"]["alpha"], writer)


if __name__ == "__main__":
    try:
        train(tyro.cli(Args))
    except smac.SMACError as e:
        sys.exit(f"error: {e}")
