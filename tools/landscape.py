"""Return along the straight line from an offline actor (smac.pt) to its fine-tuned actor (final.pt).

    python tools/landscape.py --offline runs/A/smac.pt --finetuned runs/B/final.pt --labels smac-seed1 \
        --out results/landscape/hopper

theta(t) = (1 - t) * theta_offline + t * theta_online, evaluated with deterministic episodes on fixed seeds and the
checkpoints' observation normalization. A dip between t = 0 and t = 1 is the low-reward valley that fine-tuning
had to cross; a rising curve is a path without one. Several pairs (SMAC and baseline, several seeds) share a figure.
Writes <out>.csv (label, t, mean and std of the normalized return) and <out>.png.
"""

import copy
import csv
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import smac  # noqa: E402


@dataclass
class Args:
    offline: List[str] = field(default_factory=list)
    """offline checkpoints (smac.pt), one per run"""
    finetuned: List[str] = field(default_factory=list)
    """fine-tuned checkpoints (final.pt), in the same order as --offline"""
    labels: Optional[List[str]] = None
    """legend label of each run (default run1, run2, ...)"""
    t_min: float = 0.0
    """first point of the grid; below 0 extrapolates beyond the offline actor"""
    t_max: float = 1.0
    """last point of the grid; above 1 extrapolates beyond the fine-tuned actor"""
    points: int = 11
    """number of evenly spaced values of t"""
    episodes: int = 10
    """deterministic evaluation episodes per point (episode i reset with seed i, as in smac.py and the fine-tuners)"""
    out: str = "results/landscape/landscape"
    """output path without extension: <out>.csv and <out>.png"""
    cuda: bool = True
    """if toggled, CUDA is used when available"""


def load_pair(offline_path: str, finetuned_path: str, device: torch.device):
    """Both checkpoints, after checking that their actors live in the same task and parameter space."""
    offline, offline_actor, _, _ = smac.load_checkpoint(offline_path, device)
    online, online_actor, _, _ = smac.load_checkpoint(finetuned_path, device)
    if offline["env"] != online["env"]:
        raise smac.SMACError(f"{offline_path} is for {offline['env']} but {finetuned_path} is for {online['env']}")
    shapes = {k: tuple(v.shape) for k, v in offline["actor"].items()}
    if shapes != {k: tuple(v.shape) for k, v in online["actor"].items()}:
        raise smac.SMACError(f"the actors of {offline_path} and {finetuned_path} have different shapes")
    same_normalization = all(torch.equal(offline[k], online[k]) for k in ("obs_mean", "obs_std"))
    if not same_normalization:
        raise smac.SMACError(f"{offline_path} and {finetuned_path} normalize observations differently: "
                             "they are not the offline and fine-tuned checkpoints of one run")
    return offline, offline_actor, online_actor


def interpolate(actor_0: smac.Actor, actor_1: smac.Actor, t: float, into: smac.Actor) -> smac.Actor:
    # theta(t) = (1 - t) theta_0 + t theta_1
    with torch.no_grad():
        for p, p0, p1 in zip(into.parameters(), actor_0.parameters(), actor_1.parameters()):
            p.copy_(p0 + t * (p1 - p0))
    return into


def path_scores(offline_path: str, finetuned_path: str, ts, episodes: int, device) -> List[tuple]:
    """[(t, mean, std of the normalized return)] along the line between the two actors."""
    ckpt, actor_0, actor_1 = load_pair(offline_path, finetuned_path, device)
    env = smac.make_env(ckpt["task"], ckpt["obs_mean"].numpy(), ckpt["obs_std"].numpy())
    actor = copy.deepcopy(actor_0)
    rows = []
    for t in ts:
        returns = smac.evaluate(interpolate(actor_0, actor_1, float(t), actor), env, episodes, device)[0]
        scores = [smac.normalized_score(ckpt["task"], r) for r in returns]
        rows.append((float(t), float(np.mean(scores)), float(np.std(scores))))
        print(f"t={t:+.2f} normalized_score={np.mean(scores):.1f} ± {np.std(scores):.1f}", flush=True)
    env.close()
    return rows


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for label, rows in results.items():
        t, mean, std = np.array(rows).T
        line, = ax.plot(t, mean, marker="o", markersize=3, label=label)
        ax.fill_between(t, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    for x, name in ((0.0, "offline"), (1.0, "fine-tuned")):
        ax.axvline(x, color="gray", linestyle=":", linewidth=1)
        ax.text(x, ax.get_ylim()[0], f" {name}", va="bottom", fontsize=8)
    ax.set_xlabel("t   (actor = (1 - t) offline + t fine-tuned)")
    ax.set_ylabel("normalized return (mean ± std over episodes)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves cross everywhere
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: Args) -> dict:
    if not args.offline or len(args.offline) != len(args.finetuned):
        raise smac.SMACError(f"give as many --finetuned as --offline checkpoints (got {len(args.offline)} and "
                             f"{len(args.finetuned)}, at least one)")
    labels = args.labels or [f"run{i + 1}" for i in range(len(args.offline))]
    if len(labels) != len(args.offline):
        raise smac.SMACError(f"{len(labels)} --labels for {len(args.offline)} runs")
    if args.points < 2 or args.t_max <= args.t_min:
        raise smac.SMACError("the grid needs --points >= 2 and --t-max > --t-min")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    for offline_path, finetuned_path in zip(args.offline, args.finetuned):  # all inputs checked before any episode
        load_pair(offline_path, finetuned_path, device)
    ts = np.linspace(args.t_min, args.t_max, args.points)
    results = {}
    for label, offline_path, finetuned_path in zip(labels, args.offline, args.finetuned):
        print(f"{label}: {offline_path} -> {finetuned_path}")
        results[label] = path_scores(offline_path, finetuned_path, ts, args.episodes, device)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(f"{args.out}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "t", "normalized_score_mean", "normalized_score_std"])
        for label, rows in results.items():
            writer.writerows([label, f"{t:.4f}", f"{m:.4f}", f"{s:.4f}"] for t, m, s in rows)
    plot(results, f"{args.out}.png")
    print(f"wrote {args.out}.csv and {args.out}.png")
    return results


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except smac.SMACError as e:
        sys.exit(f"error: {e}")
