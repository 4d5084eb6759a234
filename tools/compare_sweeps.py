"""Side by side: the transfer metrics of several sweeps (summary.csv files of tools/run_experiment.py), mean ± std
(sample, ddof 1) over seeds per dataset x fine-tuner x method, one row per sweep, and the per-fine-tuner targets of
issue 12 (SMAC's mean drop, and its regret relative to the baseline's, over all datasets); for a sweep with
smac-anchor rows, issue 21's (no drop and a climb: SMAC's drop, its score at 30k against smac-anchor's and
smac-plain's); for a sweep with peer rows, SMAC's regret against every peer's per dataset and fine-tuner, the best
first, with Welch's t-test across seeds (issue 35: a "below" the test does not support is not a claim); for a sweep
with smac-plain rows, SMAC against plain online RL in drop, score_30k and regret, with the same test; for a sweep
with smac-plain rows and offline_rest.py's columns, issue 31's (the offline runs at rest; per dataset and fine-tuner
the drop of smac-plain or smac within a fixed policy's floor; SMAC's score_30k against today's and against
smac-plain's).

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
    readme: bool = False
    """print only the README's results table of the one file given (a test checks README.md's against handover-50k's)"""


def read(path: str) -> list:
    if not os.path.isfile(path):
        raise smac.SMACError(f"{path} does not exist")
    with open(path) as f:
        return list(csv.DictReader(f))


def column(rows: list, metric: str, **match) -> np.ndarray:
    """The values of metric over the rows whose fields have match's values, e.g. column(rows, "regret", method="smac",
    dataset=d). Blank and non-finite cells are left out, so it can be shorter than the rows that match (table() and
    climb_targets() instead show a mean with a missing value as "-")."""
    values = np.array([float(r[metric]) for r in rows if all(r[k] == v for k, v in match.items())
                       and r.get(metric) not in ("", None)])
    return values[np.isfinite(values)]


def table(args: Args) -> str:
    if args.readme:
        if len(args.summaries) != 1:
            raise smac.SMACError(f"--readme prints one sweep's table: give one summary.csv, not {len(args.summaries)}")
        return readme_table(read(args.summaries[0]))
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
        rows = read(path)
        lines += climb_targets(label, rows) + peer_tests(label, rows) + plain_tests(label, rows) + rest_targets(
            label, rows)
    return "\n".join(lines)


def peer_tests(label: str, rows: list) -> list:
    """Per dataset and fine-tuner: SMAC's regret against every peer's, the best (lowest mean regret) first, each as
    mean ± sample std [per-seed range], with Welch's t-test across seeds (two-sided; unequal variances). One p per
    comparison, not corrected for the others; with one seed a side there is no test and the row says so."""
    peers = sorted({r["method"] for r in rows if r["finetuner"] == "own"})
    if not peers:
        return []

    def cell(values):
        std = f"{values.std(ddof=1):.3f}" if len(values) > 1 else "-"
        return f"{values.mean():.3f} ± {std} [{values.min():.3f}, {values.max():.3f}] (n {len(values)})"

    lines = ["", f"| sweep {label} | dataset | fine-tuner | SMAC regret | peer: regret | SMAC vs the peer | "
             "Welch's t, p (two-sided) |", "|---|---|---|---|---|---|---|"]
    for dataset in sorted({r["dataset"] for r in rows}):
        ran = sorted(((column(rows, "regret", method=p, dataset=dataset), p) for p in peers), key=lambda vp: (
            not len(vp[0]), vp[0].mean() if len(vp[0]) else 0, vp[1]))  # the best first, peers with no run last
        for tuner in sorted({r["finetuner"] for r in rows} - {"own"}):
            ours = column(rows, "regret", method="smac", finetuner=tuner, dataset=dataset)
            if not len(ours):
                continue
            for theirs, peer in ran:
                if not len(theirs):
                    lines.append(f"| {label} | {dataset} | {tuner} | {cell(ours)} | {peer}: no run yet | - | - |")
                    continue
                versus, test = relative(ours.mean(), theirs.mean()), welch(ours, theirs)
                if test == "-":
                    versus += ", untested"
                lines.append(f"| {label} | {dataset} | {tuner} | {cell(ours)} | {peer}: {cell(theirs)} | {versus} | "
                             f"{test} |")
    return lines


def welch(ours, theirs) -> str:
    """Welch's t-test across seeds (two-sided; unequal variances), or "-" with fewer than two seeds a side."""
    if len(ours) < 2 or len(theirs) < 2:
        return "-"
    t, p = stats.ttest_ind(ours, theirs, equal_var=False)
    return f"t {t:.2f}, p {p:.3f}" if np.isfinite(p) else "-"


def plain_tests(label: str, rows: list) -> list:
    """Per dataset and fine-tuner: SMAC (the penalty released online) against plain online RL from the same
    checkpoints (smac-plain, the paper's protocol) in drop, score_30k and regret, means over seeds with Welch's t."""
    tuners = sorted({r["finetuner"] for r in rows if r["method"] == "smac-plain"})
    metrics = ("drop", "score_30k", "regret")
    lines = ["", f"| sweep {label} | dataset | fine-tuner | " + " | ".join(f"{m}: smac vs smac-plain" for m in metrics)
             + " |", "|---" * (3 + len(metrics)) + "|"] if tuners else []
    for dataset in sorted({r["dataset"] for r in rows}):
        for tuner in tuners:
            cells = []
            for metric in metrics:
                ours, plain = (column(rows, metric, method=m, finetuner=tuner, dataset=dataset)
                               for m in ("smac", "smac-plain"))
                digits = 3 if metric == "regret" else 1
                cells.append(f"{ours.mean():.{digits}f} vs {plain.mean():.{digits}f} ({welch(ours, plain)})"
                             if len(ours) and len(plain) else "-")
            lines.append(f"| {label} | {dataset} | {tuner} | " + " | ".join(cells) + " |")
    return lines


def relative(ours: float, best: float) -> str:
    """SMAC's regret against the best peer's, as a share of the peer's: "40% below" or "36% above"."""
    share = 1 - ours / best
    return f"{100 * abs(share):.0f}% {'below' if share >= 0 else 'above'}"


# Issue 31's bars: a fixed policy's online drop floor per dataset (tools/eval_noise.py), SMAC's score_30k in climb-30k
DROP_FLOOR = {"hopper": 0.9, "walker2d": 6.0}
SCORE_30K_TODAY = {"sac": 57.7, "td3": 61.1}


def spread(values) -> str:
    std = f"{values.std(ddof=1):.1f}" if len(values) > 1 else "-"
    return f"{values.mean():.1f} ± {std} [{values.min():.1f}, {values.max():.1f}]" if len(values) else "-"


def rest_targets(label: str, rows: list) -> list:
    """Issue 31: how many offline runs are at rest (offline_rest.py), per dataset and fine-tuner the mean drop of
    smac-plain and smac against the dataset's floor, and per fine-tuner SMAC's score_30k (mean over the datasets)
    against today's and, per dataset, against smac-plain's."""
    if not any(r["method"] == "smac-plain" for r in rows) or not any(r.get("offline_at_rest") for r in rows):
        return []

    datasets, tuners = sorted({r["dataset"] for r in rows}), sorted({r["finetuner"] for r in rows} - {"own"})
    lines = ["", f"| sweep {label} | dataset | offline runs at rest | continuation drop | spread std |",
             "|---|---|---|---|---|"]
    for dataset in datasets:
        offline = {r["seed"]: r for r in rows if r["dataset"] == dataset and r["method"] == "smac"
                   and r.get("offline_at_rest")}.values()  # one row per seed: its online runs share one offline run
        if not offline:
            continue
        lines.append(f"| {label} | {dataset} | {sum(r['offline_at_rest'] == 'True' for r in offline)} of "
                     f"{len(offline)} | {spread(np.array([float(r['offline_continuation_drop']) for r in offline]))} | "
                     f"{spread(np.array([float(r['offline_rest_spread_std']) for r in offline]))} |")
    lines += ["", f"| sweep {label} | dataset | fine-tuner | smac-plain drop | smac drop | floor | within the floor |",
              "|---|---|---|---|---|---|---|"]
    for dataset in datasets:
        floor = DROP_FLOOR.get(dataset.split("_")[0].split("-")[0])
        for tuner in tuners:
            plain, ours = (column(rows, "drop", method=m, finetuner=tuner, dataset=dataset)
                           for m in ("smac-plain", "smac"))
            held = [m for m, v in (("smac-plain", plain), ("smac", ours)) if floor is not None and len(v)
                    and v.mean() <= floor]
            verdict = ", ".join(held) or ("neither" if floor is not None and len(plain) and len(ours) else "-")
            lines.append(f"| {label} | {dataset} | {tuner} | {spread(plain)} | {spread(ours)} | "
                         f"{'-' if floor is None else floor} | {verdict} |")
    lines += ["", f"| sweep {label} | fine-tuner | SMAC score_30k (mean of datasets) | today's | "
              "dataset: SMAC vs smac-plain score_30k |", "|---|---|---|---|---|"]
    for tuner in tuners:
        per_dataset = [(d, column(rows, "score_30k", method="smac", finetuner=tuner, dataset=d),
                        column(rows, "score_30k", method="smac-plain", finetuner=tuner, dataset=d)) for d in datasets]
        means = [ours.mean() for _, ours, _ in per_dataset if len(ours)]
        versus = "; ".join(f"{d}: {ours.mean():.1f} vs {plain.mean():.1f}" for d, ours, plain in per_dataset
                           if len(ours) and len(plain))
        lines.append(f"| {label} | {tuner} | {np.mean(means) if means else float('nan'):.1f} ({len(means)} datasets) | "
                     f"{SCORE_30K_TODAY.get(tuner, '-')} | {versus or '-'} |")
    return lines


def climb_targets(label: str, rows: list) -> list:
    """Issue 21, per fine-tuner over the sweep's datasets: SMAC's mean drop (<= 2) and its mean score_30k against
    smac-anchor's (>= 1.25x) and smac-plain's (>=). SMAC against the peers: peer_tests, with its test."""
    if not any(r["method"] == "smac-anchor" for r in rows):
        return []

    def mean(metric, **match):
        values = [float(r.get(metric) or "nan")  # a blank or absent column: none
                  for r in rows if all(r[k] == v for k, v in match.items())]
        return float(np.mean(values)) if values else float("nan")

    def number(value, fmt):
        return format(value, fmt) if np.isfinite(value) else "-"

    lines = ["", f"| sweep {label} | fine-tuner | SMAC drop | SMAC score_30k | anchor score_30k (x) | "
             "plain score_30k |", "|---|---|---|---|---|---|"]
    for tuner in sorted({r["finetuner"] for r in rows} - {"own"}):
        smac_30k, anchor_30k = mean("score_30k", method="smac", finetuner=tuner), mean(
            "score_30k", method="smac-anchor", finetuner=tuner)
        ratio = smac_30k / anchor_30k if anchor_30k else float("nan")
        anchor = f"{anchor_30k:.1f} ({ratio:.2f}x)" if np.isfinite(ratio) else number(anchor_30k, ".1f")
        lines.append(f"| {label} | {tuner} | {number(mean('drop', method='smac', finetuner=tuner), '.2f')} | "
                     f"{number(smac_30k, '.1f')} | {anchor} | "
                     f"{number(mean('score_30k', method='smac-plain', finetuner=tuner), '.1f')} |")
    return lines


PEER_NAMES = {"calql": "Cal-QL", "iql": "IQL", "spot": "SPOT"}


def readme_table(rows: list) -> str:
    """The README's results table: per dataset and fine-tuner the means over seeds of SMAC (released), plain online
    and the anchor from the same checkpoints, the baseline's regret and every peer's. A cell whose means have fewer
    values than the sweep has seeds says how many (the fewest of its metrics), a metric with none is "-"
    (compare_sweeps' full output has the spreads and the tests)."""
    seeds = len({r["seed"] for r in rows})
    peers = sorted({r["method"] for r in rows if r["finetuner"] == "own"})

    def means(method, metrics, **match):
        if not len(column(rows, "seed", method=method, **match)):
            return "not run yet"
        values = [column(rows, metric, method=method, **match) for metric in metrics]
        text = " / ".join(format(v.mean(), ".3f" if metric == "regret" else ".1f") if len(v) else "-"
                          for v, metric in zip(values, metrics))
        fewest = min((len(v) for v in values if len(v)), default=0)
        return text + (f" ({fewest} seed{'s' * (fewest > 1)})" if 0 < fewest < seeds else "")

    lines = ["| dataset | fine-tuner | SMAC (released): drop / score_30k / regret | plain online: drop / score_30k / "
             "regret | anchor kept: score_30k / regret | baseline regret | "
             + " | ".join(f"{PEER_NAMES.get(p, p)} regret" for p in peers) + " |", "|---" * (6 + len(peers)) + "|"]
    for dataset in sorted({r["dataset"] for r in rows}):
        for tuner in sorted({r["finetuner"] for r in rows} - {"own"}):
            at = dict(dataset=dataset, finetuner=tuner)
            cells = [means("smac", ("drop", "score_30k", "regret"), **at),
                     means("smac-plain", ("drop", "score_30k", "regret"), **at),
                     means("smac-anchor", ("score_30k", "regret"), **at), means("baseline", ("regret",), **at),
                     *(means(p, ("regret",), dataset=dataset) for p in peers)]
            lines.append(f"| {dataset} | {tuner.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        print(table(tyro.cli(Args)))
    except smac.SMACError as e:
        sys.exit(f"error: {e}")
