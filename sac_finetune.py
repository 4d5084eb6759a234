"""Online SAC fine-tuning of a SMAC checkpoint: CleanRL's sac_continuous_action.py, acting with the loaded policy from
the first step, whose critic loss keeps SMAC's penalty kappa_t * L_SM (the checkpoint's frozen diffusion model),
released from the checkpoint's kappa to kappa / 100 over the first 15k updates (--score-coef 0: plain SAC).

    python sac_finetune.py --checkpoint runs/<run_name>/smac.pt
"""

import math
import os
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import smac


@dataclass(kw_only=True)
class Args(smac.FinetuneArgs):
    """Online SAC from a SMAC checkpoint. On a CPU set OMP_NUM_THREADS=1 (or 2): small networks."""
    exp_name: str = "sac_finetune"
    """the name of this experiment (first part of the run name)"""
    policy_frequency: int = 2
    """the actor (and alpha) is updated every this many steps, that many times (delayed updates, as CleanRL)"""
    autotune: bool = True
    """if toggled, alpha (starting from the checkpoint's) is tuned toward the target entropy -act_dim"""


def train(args: Args) -> dict:
    smac.seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    ckpt, actor, critic, target_critic = smac.load_checkpoint(args.checkpoint, device)
    kappa_0, kappa_final = smac.online_score_coefs(args, ckpt["args"]["score_coef"])
    if max(kappa_0, kappa_final) > 0:  # SMAC's penalty online: the checkpoint's frozen score model and alpha_psi
        score_model, score_scale = smac.load_score_nets(ckpt, args.checkpoint, device)
    task, obs_mean, obs_std = ckpt["task"], ckpt["obs_mean"].numpy(), ckpt["obs_std"].numpy()
    env, eval_env = smac.make_env(task, obs_mean, obs_std), smac.make_env(task, obs_mean, obs_std)
    rb = smac.ReplayBuffer(min(args.buffer_size, args.total_timesteps), len(obs_mean), ckpt["act_dim"], device)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.q_lr)
    log_alpha = torch.tensor(math.log(ckpt["alpha"]), device=device, requires_grad=True)
    alpha, alpha_opt = log_alpha.exp().item(), torch.optim.Adam([log_alpha], lr=args.q_lr)
    target_entropy = -float(ckpt["act_dim"])

    with smac.RunLog(args, ckpt["env"]) as log:
        obs, _ = env.reset(seed=args.seed)
        kappa, success = kappa_0, None
        actor_loss = torch.zeros(())
        evals = [(0, log.evaluation("step", 0, actor, eval_env, args.eval_episodes, task, updates=0,
                                    score_coef=kappa))]  # the offline policy opens the curve
        for step in tqdm(range(1, args.total_timesteps + 1), "online steps", disable=None):
            with torch.no_grad():
                action = actor.act(torch.as_tensor(obs, device=device)[None])[0].cpu().numpy()
            next_obs, reward, terminated, truncated, info = env.step(action)
            if task.get("binary_reward"):  # trained with --binary-reward: r = 1 where the env reports success, else 0
                reward = float(bool(smac.step_success(info)))
            # a time-limit end (truncated) is not a terminal state: its target still bootstraps
            rb.add(observations=obs[None], actions=action[None], rewards=[reward], next_observations=next_obs[None],
                   dones=[terminated])
            obs, success = next_obs, success or smac.step_success(info)  # success: at any step (goal tasks)
            if terminated or truncated:  # the episode's return (and success): TensorBoard, episodes.csv for regret
                log.episode(step, info, success, task)
                (obs, _), success = env.reset(), None

            # ALGO LOGIC: training
            if step > args.learning_starts:
                update = step - args.learning_starts  # online updates since the hand-over
                batch = rb.sample(args.batch_size)
                # L_TD = sum_i E (Q_i(s, a) - y)^2,  y = r + gamma (1 - d) (min_i Q'_i(s', a') - alpha log pi(a'|s'))
                y = smac.soft_td_target(actor, target_critic, batch, args.gamma, alpha)
                critic_loss = critic_td_loss = smac.td_loss(critic, batch, y)
                sm_loss = torch.zeros(())
                kappa = smac.released_score_coef(kappa_0, kappa_final, args.score_release_updates, update)
                if kappa > 0:  # + kappa_t L_SM: SMAC's penalty, at the minibatch's states
                    with torch.no_grad():
                        mean, log_std = actor(batch["observations"])
                    sm_loss = smac.score_matching_penalty(
                        critic, score_scale, score_model, batch["observations"], mean, log_std, ckpt["w_query"])
                    critic_loss = critic_td_loss + kappa * sm_loss
                critic_opt.zero_grad()
                critic_loss.backward()
                critic_opt.step()

                if step % args.policy_frequency == 0:
                    for _ in range(args.policy_frequency):
                        # L_pi = E_s E_{a~pi} [alpha log pi(a|s) - min_i Q_i(s, a)]
                        obs_batch = batch["observations"]
                        actor_loss = smac.sac_actor_loss(*actor(obs_batch), obs_batch, critic, alpha)
                        actor_opt.zero_grad()
                        actor_loss.backward()
                        actor_opt.step()
                        if args.autotune:
                            # L_alpha = E_{a~pi} [-alpha (log pi(a|s) + target_entropy)], a from the updated actor
                            with torch.no_grad():
                                _, log_pi = smac.tanh_gaussian_sample(*actor(obs_batch))
                            alpha_loss = (-log_alpha.exp() * (log_pi + target_entropy)).mean()
                            alpha_opt.zero_grad()
                            alpha_loss.backward()
                            alpha_opt.step()
                            alpha = log_alpha.exp().item()
                smac.soft_update(critic, target_critic, args.tau)
                log.losses("online", step, args.total_timesteps, td_loss=critic_td_loss, score_loss=sm_loss,
                           actor_loss=actor_loss, alpha=alpha, score_coef=kappa)

            if step % args.eval_freq == 0 or step == args.total_timesteps:
                updates_done = max(0, step - args.learning_starts)
                eval_score = log.evaluation("step", step, actor, eval_env, args.eval_episodes, task,
                                            updates=updates_done, score_coef=kappa)
                evals.append((updates_done, eval_score))
                ckpt_info = {k: ckpt[k] for k in smac.CHECKPOINT_INFO if k != "alpha"}  # alpha: SAC's, tuned online
                log.save("final.pt", actor, critic, target_critic, **ckpt_info, alpha=alpha, step=step,
                         online_args=asdict(args))
        total_updates = args.total_timesteps - args.learning_starts  # the drop window's default is 10% of them
        summary = smac.transfer_metrics(evals, log.train_scores, args.drop_window, total_updates,
                                        log.train_successes or None)
        smac.append_csv(os.path.join(log.dir, "summary.csv"), summary)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()),
              f"\nfine-tuned checkpoint: {log.last_checkpoint}")
    return {"run_dir": log.dir, **summary}


if __name__ == "__main__":
    smac.main(train, Args)
