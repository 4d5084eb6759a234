"""Online TD3 (or TD3+BC with --bc-coef) fine-tuning of a SMAC checkpoint.

    python td3_finetune.py --checkpoint runs/<run_name>/smac.pt

The deterministic actor is mu(s) = tanh(mean(s)) of the loaded Gaussian actor, so the first online policy is exactly
the offline policy's mean action; the twin critics and their targets are the loaded ones. The rest is CleanRL's
td3_continuous_action.py, with SMAC's penalty kept in the critic loss as in sac_finetune.py (--score-coef 0: plain TD3).
The flags both fine-tuners share, and what the loop calls `run.` for, are in smac.py: FinetuneArgs and OnlineRun.
"""

import copy
from dataclasses import dataclass

import torch

import smac


@dataclass(kw_only=True)
class Args(smac.FinetuneArgs):
    exp_name: str = "td3_finetune"
    """the name of this experiment (first part of the run name)"""
    policy_frequency: int = 2
    """the actor and the targets are updated every this many steps (TD3's delay)"""
    exploration_noise: float = 0.1
    """std of the Gaussian exploration noise added to mu(s)"""
    policy_noise: float = 0.2
    """std of the target-policy smoothing noise"""
    noise_clip: float = 0.5
    """the target-policy smoothing noise is clipped to [-noise_clip, noise_clip]"""
    bc_coef: float = 0.0
    """> 0: online TD3+BC, actor loss -Q/mean|Q| + bc_coef * ||mu(s) - a||^2 (TD3+BC's alpha = 2.5 is 0.4)"""

    def __post_init__(self):
        super().__post_init__()
        smac.check_flags(self, smac.AT_LEAST_1, "policy_frequency")
        smac.check_flags(self, smac.NON_NEGATIVE, "exploration_noise", "policy_noise", "noise_clip", "bc_coef")


def deterministic_action(actor: smac.Actor, obs: torch.Tensor) -> torch.Tensor:
    return torch.tanh(actor(obs)[0])  # mu(s) = tanh(mean(s))


def train(args: Args) -> dict:
    smac.seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    run = smac.OnlineRun(args, device)
    actor, critic, target_critic = run.actor, run.critic, run.target_critic
    target_actor = copy.deepcopy(actor)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.q_lr)
    run.evaluate(step=0)  # the offline policy opens the curve

    critic_loss = actor_loss = torch.zeros(())
    for step in smac.progress(range(1, args.total_timesteps + 1), "online steps"):
        with torch.no_grad():
            action = deterministic_action(actor, torch.as_tensor(run.obs, device=device)[None])[0]
            action = (action + args.exploration_noise * torch.randn_like(action)).clamp(-1, 1).cpu().numpy()
        run.env_step(step, action)

        # ALGO LOGIC: training
        if step > args.learning_starts:
            update = step - args.learning_starts  # online updates since the hand-over
            smac.warm_up_lr({actor_opt: args.policy_lr, critic_opt: args.q_lr}, update, args.lr_warmup)
            batch = run.buffer.sample(args.batch_size)
            with torch.no_grad():
                # y = r + gamma (1 - d) min_i Q'_i(s', clip(mu'(s') + clip(eps, -c, c), -1, 1)),  eps ~ N(0, sigma^2)
                noise = torch.randn_like(batch["actions"]) * args.policy_noise
                noise = noise.clamp(-args.noise_clip, args.noise_clip)
                next_actions = (deterministic_action(target_actor, batch["next_observations"]) + noise).clamp(-1, 1)
                next_q = target_critic(batch["next_observations"], next_actions).min(0).values
                y = batch["rewards"].squeeze(-1) + args.gamma * (1 - batch["dones"].squeeze(-1)) * next_q
            # L_Q = sum_i E (Q_i(s, a) - y)^2
            critic_loss = smac.td_loss(critic, batch, y)
            if (kappa := run.score_coef_at(update)) > 0:  # + kappa_t L_SM: SMAC's penalty kept online, released
                critic_loss = critic_loss + kappa * run.score_matching_penalty(batch["observations"])
            critic_opt.zero_grad()
            critic_loss.backward()
            run.record_critic_grad_norm()
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
                smac.soft_update(actor, target_actor, args.tau)
                smac.soft_update(critic, target_critic, args.tau)
        run.end_step(step, critic_loss=critic_loss, actor_loss=actor_loss)
    return run.finish()


if __name__ == "__main__":
    smac.main(train, Args)
