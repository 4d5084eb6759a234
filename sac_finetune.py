"""Online SAC fine-tuning of a SMAC checkpoint.

    python sac_finetune.py --checkpoint runs/<run_name>/smac.pt

The online phase is SAC (CleanRL's sac_continuous_action.py, acting with the loaded policy from the first step) whose
critic loss keeps SMAC's penalty, kappa_t * L_SM with the checkpoint's frozen diffusion model: without it (plain SAC,
--score-coef 0) online TD rewrites the critic's action structure within 100 updates and the policy falls; kept whole
(--score-coef-final 10) it holds the policy where it started. So kappa_t is released, geometrically from the
checkpoint's kappa to kappa / 100 over the first 15k updates (README).
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch

import smac


@dataclass
class Args:
    checkpoint: str
    """SMAC checkpoint (runs/<run_name>/smac.pt) to fine-tune"""
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
    """folder in which runs/{run_name}/ (TensorBoard logs, metrics.csv, summary.csv, final.pt) is written"""
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
    learning_starts: int = 1000
    """online steps collected by the offline policy before updates begin"""
    lr_warmup: int = 0
    """the learning rates rise linearly from 0 over this many updates after the hand-over (0: none)"""
    policy_frequency: int = 2
    """the actor (and alpha) is updated every this many steps, that many times (delayed updates, as CleanRL)"""
    autotune: bool = True
    """if toggled, alpha (starting from the checkpoint's) is tuned toward the target entropy -act_dim"""
    score_coef: Optional[float] = None
    """kappa of SMAC's penalty kept in the online critic loss; default the checkpoint's (0: plain online RL)"""
    score_coef_final: Optional[float] = None
    """kappa after the release, to which kappa_t falls geometrically over --score-release-updates (default: kappa
    / 100; = --score-coef: no release, the anchor kept)"""
    score_release_updates: int = 15_000
    """online updates over which kappa_t falls from --score-coef to --score-coef-final"""
    score_release_gate: bool = False
    """if toggled, the release advances only while recent training episodes score at least the offline policy's"""
    offline_ratio: float = 0.0
    """fraction of each online minibatch drawn from the offline dataset (RLPD and Cal-QL: 0.5; 0: online data only)"""
    eval_freq: int = 5000
    """evaluate every this many online steps (also at step 0 and after 100, 500 and 1000 updates)"""
    eval_episodes: int = 10
    """number of deterministic evaluation episodes (episode i reset with seed i, as in smac.py)"""
    drop_window: Optional[int] = None
    """drop = step-0 score - lowest evaluation within this many updates; default max(5000, 10% of the updates)"""


def train(args: Args) -> dict:
    smac.seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    run = smac.OnlineRun(args, device)
    actor, critic, target_critic = run.actor, run.critic, run.target_critic
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.q_lr)
    log_alpha = torch.tensor(math.log(run.ckpt["alpha"]), device=device, requires_grad=True)
    alpha, alpha_opt = log_alpha.exp().item(), torch.optim.Adam([log_alpha], lr=args.q_lr)
    target_entropy = -float(run.env.action_space.shape[0])

    critic_loss = actor_loss = torch.zeros(())
    for step in smac.progress(range(1, args.total_timesteps + 1), "online steps"):
        with torch.no_grad():
            action = actor.act(torch.as_tensor(run.obs, device=device)[None])[0].cpu().numpy()
        run.env_step(step, action)

        # ALGO LOGIC: training
        if step > args.learning_starts:
            update = step - args.learning_starts  # online updates since the hand-over
            smac.warm_up_lr({actor_opt: args.policy_lr, critic_opt: args.q_lr}, update, args.lr_warmup)
            batch = run.sample(args.batch_size)
            # L_Q = sum_i E (Q_i(s, a) - y)^2,  y = r + gamma (1 - d) (min_i Q'_i(s', a') - alpha log pi(a'|s'))
            y = smac.soft_td_target(actor, target_critic, batch, args.gamma, alpha)
            # [+ kappa_t L_SM: SMAC's penalty kept online, then released]
            critic_loss = smac.td_loss(critic, batch, y) + run.score_penalty(batch["observations"], update)
            critic_opt.zero_grad()
            critic_loss.backward()
            run.critic_step()
            critic_opt.step()

            if step % args.policy_frequency == 0:
                for _ in range(args.policy_frequency):
                    # L_pi = E_s E_{a~pi} [alpha log pi(a|s) - min_i Q_i(s, a)]
                    obs = batch["observations"]
                    actor_loss = smac.sac_actor_loss(*actor(obs), obs, critic, alpha)
                    actor_opt.zero_grad()
                    actor_loss.backward()
                    actor_opt.step()
                    if args.autotune:
                        # L_alpha = E_{a~pi} [-alpha (log pi(a|s) + target_entropy)], a from the updated actor
                        with torch.no_grad():
                            _, log_pi = smac.tanh_gaussian_sample(*actor(batch["observations"]))
                        alpha_loss = (-log_alpha.exp() * (log_pi + target_entropy)).mean()
                        alpha_opt.zero_grad()
                        alpha_loss.backward()
                        alpha_opt.step()
                        alpha = log_alpha.exp().item()
            smac.soft_update(critic, target_critic, args.tau)
        run.end_step(step, alpha, critic_loss=critic_loss, actor_loss=actor_loss)
    return run.finish()


if __name__ == "__main__":
    smac.main(train, Args)
