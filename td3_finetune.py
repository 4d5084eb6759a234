"""Online TD3 (or TD3+BC with --bc-coef) fine-tuning of a SMAC checkpoint: CleanRL's td3_continuous_action.py with
the deterministic actor mu(s) = tanh(mean(s)) of the loaded Gaussian actor (so the first online policy is the offline
policy's mean action) and the loaded twin critics, whose loss keeps SMAC's penalty as in sac_finetune.py.

    python td3_finetune.py --checkpoint runs/<run_name>/smac.pt
"""

import copy
import os
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import smac


@dataclass(kw_only=True)
class Args(smac.FinetuneArgs):
    """Online TD3 from a SMAC checkpoint. On a CPU set OMP_NUM_THREADS=1 (or 2): small networks."""
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
    """> 0: TD3+BC's actor loss online, -Q/mean|Q| + bc_coef * ||mu(s) - a||^2, a from the online buffer (TD3+BC's
    alpha = 2.5 is 0.4 here)"""


def train(args: Args) -> dict:
    smac.seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    ckpt, actor, critic, target_critic = smac.load_checkpoint(args.checkpoint, device)
    target_actor = copy.deepcopy(actor)
    kappa_0, kappa_final = smac.online_score_coefs(args, ckpt["args"]["score_coef"])
    if max(kappa_0, kappa_final) > 0:  # SMAC's penalty online: the checkpoint's frozen score model and alpha_psi
        score_model, score_scale = smac.load_score_nets(ckpt, args.checkpoint, device)
    task, obs_mean, obs_std = ckpt["task"], ckpt["obs_mean"].numpy(), ckpt["obs_std"].numpy()
    env, eval_env = smac.make_env(task, obs_mean, obs_std), smac.make_env(task, obs_mean, obs_std)
    rb = smac.ReplayBuffer(min(args.buffer_size, args.total_timesteps), len(obs_mean), ckpt["act_dim"], device)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.q_lr)

    with smac.RunLog(args, ckpt["env"]) as log:
        obs, _ = env.reset(seed=args.seed)
        kappa, success = kappa_0, None
        actor_loss = torch.zeros(())
        evals = [(0, log.evaluation("step", 0, actor, eval_env, args.eval_episodes, task, updates=0,
                                    score_coef=kappa))]  # the offline policy opens the curve
        for step in tqdm(range(1, args.total_timesteps + 1), "online steps", disable=None):
            with torch.no_grad():
                action = actor.act(torch.as_tensor(obs, device=device)[None], deterministic=True)[0]
                action = (action + args.exploration_noise * torch.randn_like(action)).clamp(-1, 1).cpu().numpy()
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
                with torch.no_grad():
                    # y = r + gamma (1 - d) min_i Q'_i(s', clip(mu'(s') + clip(eps, -c, c), -1, 1)), eps ~ N(0, sigma^2)
                    noise = torch.randn_like(batch["actions"]) * args.policy_noise
                    noise = noise.clamp(-args.noise_clip, args.noise_clip)
                    next_mu = target_actor.act(batch["next_observations"], deterministic=True)
                    next_actions = (next_mu + noise).clamp(-1, 1)
                    next_q = target_critic(batch["next_observations"], next_actions).min(0).values
                    y = batch["rewards"].squeeze(-1) + args.gamma * (1 - batch["dones"].squeeze(-1)) * next_q
                critic_loss = critic_td_loss = smac.td_loss(critic, batch, y)  # L_TD = sum_i E (Q_i(s, a) - y)^2
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
                    mu = actor.act(batch["observations"], deterministic=True)
                    critic.requires_grad_(False)
                    q_1 = critic(batch["observations"], mu)[0]
                    critic.requires_grad_(True)
                    if args.bc_coef > 0:  # TD3+BC: L = -Q_1(s, mu(s)) / mean|Q_1| + bc_coef * ||mu(s) - a||^2
                        bc_loss = (mu - batch["actions"]).pow(2).mean()
                        actor_loss = -q_1.mean() / q_1.abs().mean().detach() + args.bc_coef * bc_loss
                    else:  # TD3: L = -Q_1(s, mu(s))
                        actor_loss = -q_1.mean()
                    actor_opt.zero_grad()
                    actor_loss.backward()
                    actor_opt.step()
                    smac.soft_update(actor, target_actor, args.tau)
                    smac.soft_update(critic, target_critic, args.tau)
                log.losses("online", step, args.total_timesteps, td_loss=critic_td_loss, score_loss=sm_loss,
                           actor_loss=actor_loss, score_coef=kappa)

            if step % args.eval_freq == 0 or step == args.total_timesteps:
                updates_done = max(0, step - args.learning_starts)
                eval_score = log.evaluation("step", step, actor, eval_env, args.eval_episodes, task,
                                            updates=updates_done, score_coef=kappa)
                evals.append((updates_done, eval_score))
                log.save("final.pt", actor, critic, target_critic, **{k: ckpt[k] for k in smac.CHECKPOINT_INFO},
                         step=step, online_args=asdict(args))  # alpha: the offline one, for a later SAC fine-tune
        total_updates = args.total_timesteps - args.learning_starts  # the drop window's default is 10% of them
        summary = smac.transfer_metrics(evals, log.train_scores, args.drop_window, total_updates,
                                        log.train_successes or None)
        smac.append_csv(os.path.join(log.dir, "summary.csv"), summary)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()),
              f"\nfine-tuned checkpoint: {log.last_checkpoint}")
    return {"run_dir": log.dir, **summary}


if __name__ == "__main__":
    smac.main(train, Args)
