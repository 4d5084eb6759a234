"""Online SAC fine-tuning of a SMAC checkpoint.

    python sac_finetune.py --checkpoint runs/<run_name>/smac.pt

The online phase is SAC (CleanRL's sac_continuous_action.py, acting with the loaded policy from the first step) whose
critic loss keeps SMAC's penalty, kappa_t * L_SM with the checkpoint's frozen diffusion model: without it (plain SAC,
--score-coef 0) online TD rewrites the critic's action structure within 100 updates and the policy falls; kept whole
(--score-coef-final 10) it holds the policy where it started. So kappa_t is released, geometrically from the
checkpoint's kappa to kappa / 100 over the first 15k updates (README). The flags both fine-tuners share, and what the
loop calls `run.` for (envs, replay buffer, evaluations, files), are in smac.py: FinetuneArgs and OnlineRun.
"""

import math
from dataclasses import dataclass

import torch

import smac


@dataclass(kw_only=True)
class Args(smac.FinetuneArgs):
    exp_name: str = "sac_finetune"
    """the name of this experiment (first part of the run name)"""
    policy_frequency: int = 2
    """the actor (and alpha) is updated every this many steps, that many times (delayed updates, as CleanRL)"""
    autotune: bool = True
    """if toggled, alpha (starting from the checkpoint's) is tuned toward the target entropy -act_dim"""

    def __post_init__(self):
        super().__post_init__()
        smac.check_flags(self, smac.AT_LEAST_1, "policy_frequency")


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
    run.evaluate(step=0)  # the offline policy opens the curve

    critic_loss = actor_loss = torch.zeros(())
    for step in smac.progress(range(1, args.total_timesteps + 1), "online steps"):
        with torch.no_grad():
            action = actor.act(torch.as_tensor(run.obs, device=device)[None])[0].cpu().numpy()
        run.env_step(step, action)

        # ALGO LOGIC: training
        if step > args.learning_starts:
            update = step - args.learning_starts  # online updates since the hand-over
            smac.warm_up_lr({actor_opt: args.policy_lr, critic_opt: args.q_lr}, update, args.lr_warmup)
            batch = run.buffer.sample(args.batch_size)
            # L_Q = sum_i E (Q_i(s, a) - y)^2,  y = r + gamma (1 - d) (min_i Q'_i(s', a') - alpha log pi(a'|s'))
            y = smac.soft_td_target(actor, target_critic, batch, args.gamma, alpha)
            critic_loss = smac.td_loss(critic, batch, y)
            if (kappa := run.score_coef_at(update)) > 0:  # + kappa_t L_SM: SMAC's penalty kept online, released
                critic_loss = critic_loss + kappa * run.score_matching_penalty(batch["observations"])
            critic_opt.zero_grad()
            critic_loss.backward()
            run.record_critic_grad_norm()
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
