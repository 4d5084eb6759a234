"""Side by side: the transfer metrics of several sweeps (summary.csv files of tools/run_experiment.py), mean ± std
(sample, ddof 1) over seeds per dataset x fine-tuner x method, one row per sweep, and the per-fine-tuner targets of
issue 12 (SMAC's mean drop, and its regret relative to the baseline's, over all datasets); for a sweep with
smac-anchor rows, issue 21's (no drop and a climb: SMAC's drop, its score at 30k against smac-anchor's and
smac-plain's, its regret against every peer's on each dataset); for a sweep with peer rows, SMAC's regret against the
best peer's per dataset and fine-tuner with Welch's t-test across seeds (issue 35: a "below" the test does not
support is not a claim).

    python tools/compare_sweeps.py results/hopper-smac-15k/summary.csv results/hopper-smac-15k-warmup/summary.csv \
        --labels plain lr-warmup
"""

import csv
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import List

import numpy as np
import tyro
from scipy import stats

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import smac  # noqa: E402


@dataclass
class Args:
    summaries: tyro.conf.Positional[List[str]]
    """summary.csv files to compare"""
    labels: List[str] = field(default_factory=list)
    """one label per file (default: the folder names)"""
    metrics: List[str] = field(default_factory=lambda: ["offline_score", "drop", "lowest_early_score", "regret",
                                                         "final_score", "score_30k"])
    """columns to show"""


def read(path: str) -> list:
    if not os.path.isfile(path):
        raise smac.SMACError(f"{path} does not exist")
    with open(path) as f:
        return list(csv.DictReader(f))


def table(args: Args) -> str:
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.summaries]
    if len(labels) != len(args.summaries):
        raise smac.SMACError(f"{len(args.summaries)} files but {len(labels)} labels")
    groups = defaultdict(list)  # (dataset, finetuner, method, label) -> rows
    for label, path in zip(labels, args.summaries):
        for row in read(path):
            groups[(row["dataset"], row["finetuner"], row["method"], label)].append(row)
    lines = ["| dataset | fine-tuner | method | sweep | seeds | " + " | ".join(args.metrics) + " |",
             "|---" * (5 + len(args.metrics)) + "|"]
    for (dataset, tuner, method, label), rows in sorted(groups.items(), key=lambda kv: (*kv[0][:3],
                                                                                          labels.index(kv[0][3]))):
        cells = []
        for metric in args.metrics:
            values = np.array([float(r.get(metric) or "nan") for r in rows])  # older sweeps lack some columns
            std = f"{values.std(ddof=1):.2g}" if len(values) > 1 else "-"  # the sample std over seeds
            cells.append(f"{values.mean():.3g} ± {std}" if np.isfinite(values).all() else "-")
        lines.append(f"| {dataset} | {tuner} | {method} | {label} | {len(rows)} | " + " | ".join(cells) + " |")
    lines += ["", "| sweep | fine-tuner | SMAC mean drop | baseline mean drop | SMAC regret | baseline regret | "
              "regret below the baseline's |", "|---|---|---|---|---|---|---|"]
    for label in labels:
        for tuner in sorted({k[1] for k in groups}):
            mean = {}  # (method, metric) -> mean over the sweep's datasets and seeds; absent when it has no such runs
            for method in ("smac", "baseline"):
                rows = [r for k, group in groups.items() if k[1:] == (tuner, method, label) for r in group]
                mean.update({(method, m): np.mean([float(r[m]) for r in rows]) for m in ("drop", "regret") if rows})

            def cell(key, fmt):
                return format(mean[key], fmt) if key in mean else "-"

            below = (f"{100 * (1 - mean['smac', 'regret'] / mean['baseline', 'regret']):.1f}%"
                     if ("smac", "regret") in mean and ("baseline", "regret") in mean else "-")
            lines.append(f"| {label} | {tuner} | {cell(('smac', 'drop'), '.2f')} | {cell(('baseline', 'drop'), '.2f')} "
                         f"| {cell(('smac', 'regret'), '.3f')} | {cell(('baseline', 'regret'), '.3f')} | {below} |")
    for label, path in zip(labels, args.summaries):
        lines += climb_targets(label, read(path)) + peer_tests(label, read(path))
    return "\n".join(lines)


def peer_tests(label: str, rows: list) -> list:
    """Per dataset and fine-tuner: SMAC's regret against the best peer's (lowest mean regret on that dataset), each
    as mean ± sample std [per-seed range], with Welch's t-test across seeds (two-sided; unequal variances)."""
    peers = sorted({r["method"] for r in rows if r["finetuner"] == "own"})
    if not peers:
        return []

    def regrets(**match):
        return np.array([float(r["regret"]) for r in rows if all(r[k] == v for k, v in match.items())
                         and r["regret"] not in ("", None) and np.isfinite(float(r["regret"]))])

    def cell(values):
        std = f"{values.std(ddof=1):.3f}" if len(values) > 1 else "-"
        return f"{values.mean():.3f} ± {std} [{values.min():.3f}, {values.max():.3f}] (n {len(values)})"

    lines = ["", f"| sweep {label} | dataset | fine-tuner | SMAC regret | best peer: regret | SMAC below by | "
             "Welch's t, p (two-sided) |", "|---|---|---|---|---|---|---|"]
    for dataset in sorted({r["dataset"] for r in rows}):
        ran = [(regrets(method=p, dataset=dataset), p) for p in peers]
        ran = [(v, p) for v, p in ran if len(v)]
        if not ran:
            continue
        best, peer = min(ran, key=lambda vp: vp[0].mean())
        for tuner in sorted({r["finetuner"] for r in rows} - {"own"}):
            ours = regrets(method="smac", finetuner=tuner, dataset=dataset)
            if not len(ours):
                continue
            test = "-"
            if len(ours) > 1 and len(best) > 1:
                t, p = stats.ttest_ind(ours, best, equal_var=False)
                test = f"t {t:.2f}, p {p:.3f}" if np.isfinite(p) else "-"
            lines.append(f"| {label} | {dataset} | {tuner} | {cell(ours)} | {peer}: {cell(best)} | "
                         f"{100 * (1 - ours.mean() / best.mean()):.0f}% | {test} |")
    return lines


def climb_targets(label: str, rows: list) -> list:
    """Issue 21, per fine-tuner over the sweep's datasets: SMAC's mean drop (<= 2), its mean score_30k against
    smac-anchor's (>= 1.25x) and smac-plain's (>=), and per dataset its regret against the best peer's (lower)."""
    if not any(r["method"] == "smac-anchor" for r in rows):
        return []

    def mean(metric, **match):
        values = [float(r[metric] or "nan") for r in rows if all(r[k] == v for k, v in match.items())]  # blank: none
        return float(np.mean(values)) if values else float("nan")

    peers = sorted({r["method"] for r in rows if r["finetuner"] == "own"})
    lines = ["", f"| sweep {label} | fine-tuner | SMAC drop | SMAC score_30k | anchor score_30k (x) | plain score_30k "
             "| dataset: SMAC regret vs best peer's (below by) |", "|---|---|---|---|---|---|---|"]
    for tuner in sorted({r["finetuner"] for r in rows} - {"own"}):
        smac_30k, anchor_30k = mean("score_30k", method="smac", finetuner=tuner), mean(
            "score_30k", method="smac-anchor", finetuner=tuner)
        versus = []
        for dataset in sorted({r["dataset"] for r in rows}):
            regret = mean("regret", method="smac", finetuner=tuner, dataset=dataset)
            ran = [(mean("regret", method=p, dataset=dataset), p) for p in peers]  # a peer with no row here: NaN
            best = min([(r, p) for r, p in ran if np.isfinite(r)], default=(float("nan"), "-"))
            versus.append(f"{dataset}: {regret:.3f} vs {best[1]} {best[0]:.3f} ({100 * (1 - regret / best[0]):.0f}%)")
        lines.append(f"| {label} | {tuner} | {mean('drop', method='smac', finetuner=tuner):.2f} | {smac_30k:.1f} | "
                     f"{anchor_30k:.1f} ({smac_30k / anchor_30k:.2f}x) | "
                     f"{mean('score_30k', method='smac-plain', finetuner=tuner):.1f} | {'; '.join(versus)} |")
    return lines


if __name__ == "__main__":
    try:
        print(table(tyro.cli(Args)))
    except smac.SMACError as e:
        sys.exit(f"error: {e}")
