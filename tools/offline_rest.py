"""Is the offline learner at rest when it is handed over? Continue its OFFLINE training from the checkpoint (smac.py's
update, unchanged: L_TD + kappa * L_SM with the checkpoint's frozen diffusion model and alpha_psi trained with the
critic, SAC's actor loss, Polyak targets) with fresh Adam optimizers at the fine-tuners' learning rates, so a decayed
rate cannot fake rest, and evaluate it at update 0 and every --eval-freq updates (episode i with seed i, the sweep's
protocol). The reference is the checkpoint's FIXED actor scored on distinct episode-seed sets of the same size, as
tools/eval_noise.py --window-evals does: what K + 1 evaluations of a policy whose score never moves show.

"At rest" (issue 31's definition) means: more offline training moves the score little more than evaluation noise does,
    continuation_drop <= floor_drop + 2 points  and  spread_std <= 1.5 * floor_std,
floor_drop and floor_std being the fixed policy's mean drop (step-0 score minus the lowest later one, clipped at 0, the
fine-tuners' drop) and mean sample std of K + 1 evaluations, over random draws of K + 1 distinct sets. The drop asks
whether the score falls (the hand-over question); the std catches any other motion, a climb or a swing.
`noise_test` is the strict version: drop and std each within the fixed policy's 97.5th percentile (drop_limit,
std_limit), so a policy that does not move fails it at most 5% of the time; it says whether ANY motion is seen.

    python tools/offline_rest.py runs/<run>/smac.pt --updates 5000 --eval-freq 500 --eval-episodes 5
"""

import csv
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import tyro

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TOOLS, os.path.dirname(TOOLS)]
import eval_noise  # noqa: E402
import smac  # noqa: E402

DRAWS = 20_000  # random draws of K + 1 distinct seed sets that estimate the fixed policy's drop and spread
COLUMNS = ("run", "checkpoint", "offline_update", "seed", "policy_lr", "q_lr", "row", "update", "score", "step0",
           "lowest", "continuation_drop", "spread_std", "spread_range", "floor_drop", "floor_std", "floor_range",
           "drop_limit", "std_limit", "noise_test", "at_rest")
LEARNING_RATE = (lambda v: np.isfinite(v) and v >= 0, "a finite number >= 0")


@dataclass
class Args:
    checkpoint: tyro.conf.Positional[str]
    """the offline checkpoint, runs/<run>/smac.pt"""
    updates: int = 5000
    """offline updates to continue for"""
    eval_freq: int = 500
    """evaluate every this many updates (and at update 0)"""
    eval_episodes: int = 5
    """deterministic episodes per evaluation (episode i reset with seed i)"""
    policy_lr: float = 3e-4
    """learning rate of the fresh actor optimizer (0 freezes the actor: the control that must show no drop)"""
    q_lr: float = 3e-4
    """learning rate of the fresh critic and alpha_psi optimizer"""
    seed: int = 1
    """seed of the minibatches and of the policy and penalty samples"""
    floor_sets: int = 30
    """distinct episode-seed sets of --eval-episodes each on which the fixed policy is scored"""
    out: Optional[str] = None
    """CSV the curve and the summary are appended to (default <checkpoint dir>/offline_rest.csv)"""

    def __post_init__(self):  # before anything is loaded or trained: bad flags cost nothing
        smac.check_flags(self, smac.AT_LEAST_1, "updates", "eval_freq", "eval_episodes", "floor_sets")
        smac.check_flags(self, LEARNING_RATE, "policy_lr", "q_lr")
        if self.eval_freq > self.updates:
            raise smac.SMACError(f"--eval-freq {self.eval_freq} exceeds --updates {self.updates}: no evaluation after "
                                 "update 0")
        eval_noise.check_enough_sets(self.floor_sets, self.updates // self.eval_freq)
        self.out = self.out or os.path.join(os.path.dirname(os.path.abspath(self.checkpoint)), "offline_rest.csv")


def fixed_policy_draws(means: np.ndarray, window_evals: int, draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    """(draws, K + 1) evaluations of the fixed policy, each row K + 1 distinct sets: eval_noise.drop_floor's picks."""
    rng = np.random.default_rng(seed)
    return means[np.argsort(rng.random((draws, len(means))), axis=1)[:, :window_evals + 1]]


def rest_summary(scores: list, picks: np.ndarray) -> dict:
    """The continued curve's drop and spread beside the fixed policy's (picks: fixed_policy_draws), and the verdicts."""
    floor_drops, floor_stds = np.maximum(0.0, picks[:, 0] - picks[:, 1:].min(1)), picks.std(1, ddof=1)
    summary = dict(step0=scores[0], lowest=min(scores[1:]), continuation_drop=max(0.0, scores[0] - min(scores[1:])),
                   spread_std=float(np.std(scores, ddof=1)), spread_range=max(scores) - min(scores),
                   floor_drop=float(floor_drops.mean()), floor_std=float(floor_stds.mean()),
                   floor_range=float(np.ptp(picks, axis=1).mean()),
                   drop_limit=float(np.percentile(floor_drops, 97.5)), std_limit=float(np.percentile(floor_stds, 97.5)))
    summary["noise_test"] = bool(summary["continuation_drop"] <= summary["drop_limit"]
                                 and summary["spread_std"] <= summary["std_limit"])
    summary["at_rest"] = bool(summary["continuation_drop"] <= summary["floor_drop"] + 2.0
                              and summary["spread_std"] <= 1.5 * summary["floor_std"])
    return summary


def open_csv(path: str):
    """A csv writer appending to path; one clear error, before any training, for a path that cannot take it or that
    holds another table. Each row is flushed as written: a killed run keeps every evaluation it made."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, newline="") as f:
                if next(csv.reader(f), None) != list(COLUMNS):
                    raise smac.SMACError(f"--out {path} holds another table (its header is not {','.join(COLUMNS)})")
        f = open(path, "a", newline="")
    except OSError as e:
        raise smac.SMACError(f"cannot write --out {path}: {e.strerror or e}") from e
    writer = csv.DictWriter(f, COLUMNS)
    if f.tell() == 0:
        writer.writeheader()

    def write_row(**row) -> None:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
        f.flush()
    return f, write_row


def run(args: Args) -> dict:
    ckpt, actor, critic, target_critic = smac.load_checkpoint(args.checkpoint, torch.device("cpu"))
    off = ckpt["args"]  # the offline run's own settings: the update continued is exactly its update
    kappa, n = off["score_coef"], off["penalty_states"] or off["batch_size"]
    if kappa > 0:
        score_model, score_scale = smac.load_score_nets(ckpt, args.checkpoint, torch.device("cpu"))
        score_scale.requires_grad_(True)  # alpha_psi is trained with the critic offline; the diffusion model is not
    obs_mean, obs_std = ckpt["obs_mean"].numpy(), ckpt["obs_std"].numpy()
    data = smac.load_dataset(ckpt["env"], off["dataset_path"], off.get("binary_reward", False))  # its rewards
    data["actions"] = data["actions"].clip(-1.0, 1.0)
    data["w"] = smac.episode_return_w(data)
    buffer = smac.dataset_buffer(data, obs_mean, obs_std, torch.device("cpu"), off["batch_size"])
    env, (f, write_row) = smac.make_env(ckpt["task"], obs_mean, obs_std), open_csv(args.out)
    smac.seed_everything(args.seed, True)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)  # fresh: no decayed rate, no Adam state
    critic_opt = torch.optim.Adam([*critic.parameters(), *(score_scale.parameters() if kappa > 0 else [])],
                                  lr=args.q_lr)
    tag = dict(run=f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}", checkpoint=args.checkpoint,
               offline_update=ckpt.get("update"), seed=args.seed, policy_lr=args.policy_lr, q_lr=args.q_lr)

    scores = []
    for update in range(args.updates + 1):
        if update % args.eval_freq == 0:
            returns = smac.evaluate(actor, env, args.eval_episodes, torch.device("cpu"))[0]
            scores.append(float(np.mean([smac.normalized_score(ckpt["task"], r) for r in returns])))
            write_row(**tag, row="eval", update=update, score=scores[-1])
            print(f"update={update} score={scores[-1]:.2f}", flush=True)
            if not np.isfinite(scores[-1]):
                raise smac.SMACError(f"the score became {scores[-1]} by continued update {update}")
        if update == args.updates:
            break
        batch = buffer.sample(off["batch_size"])  # smac.train's offline update, as it is
        obs = batch["observations"]
        mean, log_std = actor(obs)
        y = smac.soft_td_target(actor, target_critic, batch, off["gamma"], ckpt["alpha"])
        critic_loss = smac.td_loss(critic, batch, y)
        if kappa > 0:
            critic_loss = critic_loss + kappa * smac.score_matching_penalty(
                critic, score_scale, score_model, obs[:n], mean[:n], log_std[:n], ckpt["w_query"])
        critic_opt.zero_grad()
        critic_loss.backward()
        critic_opt.step()
        actor_loss = smac.sac_actor_loss(mean, log_std, obs, critic, ckpt["alpha"])
        actor_opt.zero_grad()
        actor_loss.backward()
        actor_opt.step()
        smac.soft_update(critic, target_critic, off["tau"])

    # the fixed actor on distinct seed sets: the drop and spread of K + 1 evaluations of a policy that never moves
    picks = fixed_policy_draws(eval_noise.set_means(args.checkpoint, args.floor_sets, args.eval_episodes),
                               len(scores) - 1)
    summary = rest_summary(scores, picks)
    write_row(**tag, row="summary", update=args.updates, **summary)
    f.close()
    print(f"checkpoint={args.checkpoint} update={ckpt.get('update')}+{args.updates} " + " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()) + f" (csv: {args.out})")
    return {**summary, "scores": scores, "out": args.out}


if __name__ == "__main__":
    smac.main(run, Args)
