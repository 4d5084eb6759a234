"""Transfer experiment: offline SMAC and its baseline, then online SAC and TD3 from every checkpoint; CORL's peers.

    python tools/run_experiment.py --name hopper-transfer \
        --tasks hopper-medium-v2:../shared/datasets/hopper_medium-local.hdf5 --seeds 1 2 3 \
        --methods smac smac-anchor smac-plain baseline [--peers calql iql --corl-dir ~/CORL]

For each task x seed it runs smac.py (offline method "smac": the defaults; "baseline": the same command with
--score-coef 0), then sac_finetune.py and td3_finetune.py from that checkpoint, once per method that starts from it
(METHODS: smac-anchor and smac-plain are SMAC's checkpoints fine-tuned with other online flags). Each peer (CORL's
Cal-QL, IQL, SPOT, through tools/peers/run_peer.py) is one run, offline then its own online algorithm (finetuner
"own"). Each run lives in its own fixed folder under --run-root (checkpoints, logs: not committed); when it
finishes, its result.json (curve and metrics, a few kB) goes to results/<name>/finished/ (committed). A repeated
command skips the runs that have one, so an interrupted sweep resumes, also on a fresh clone (an offline run
whose checkpoint is gone is made again, bitwise, when one of its online runs still has to run). results/<name>/
gets summary.csv, table.md and one plot per task and fine-tuner. Engines: a local process pool (--workers), or
Slurm through submitit (--engine slurm) with the same command line.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import List, Literal, Optional

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import smac  # noqa: E402

OFFLINE_FLAGS = {"smac": [], "baseline": ["--score-coef", "0"]}  # the baseline is the same code without SMAC
METHODS = {  # method: (its offline run, the fine-tuners' flags for it)
    "smac": ("smac", []),  # the defaults, offline and online
    "smac-anchor": ("smac", ["--score-coef-final", "10"]),  # smac.py's kappa 10 kept online, never released
    "smac-plain": ("smac", ["--score-coef", "0", "--score-coef-final", "0"]),  # plain SAC / TD3 online
    "baseline": ("baseline", []),  # offline SAC without SMAC (kappa 0), then plain SAC / TD3
}
FINETUNERS = {"sac": "sac_finetune.py", "td3": "td3_finetune.py"}
PEER_SCRIPT = os.path.join("tools", "peers", "run_peer.py")
OFFLINE_DIAGNOSTICS = ["score_residual_rel", "score_cosine", "alpha_psi_mean", "sac_actor_grad_norm"]
ONLINE_METRICS = ["step0_score", "lowest_early_score", "drop", "regret", "final_score", "online_steps", "score_10k",
                  "score_30k", "td_grad_ratio", "kl_100", "kl_500", "kl_1000"]
SUMMARY_COLUMNS = ["dataset", "env", "method", "finetuner", "seed", "offline_score", *ONLINE_METRICS,
                   *OFFLINE_DIAGNOSTICS]


@dataclass
class Args:
    name: str = "hopper-transfer"
    """experiment name: results go to <results-dir>/<name>/, runs to <run-root>/<name>/"""
    tasks: List[str] = field(default_factory=lambda: ["hopper-medium-v2:../shared/datasets/hopper_medium-local.hdf5"])
    """D4RL env name, optionally ':' and a local D4RL-format HDF5 (named in the results by its file name)"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds; each seeds the offline run and both fine-tuning runs"""
    methods: List[Literal["smac", "smac-anchor", "smac-plain", "baseline"]] = field(
        default_factory=lambda: ["smac", "baseline"])
    """methods (METHODS): smac.py's defaults, the same with --score-coef 0 (baseline), SMAC's checkpoints fine-tuned
    with kappa kept (smac-anchor) or plain (smac-plain)"""
    peers: List[Literal["calql", "iql", "spot"]] = field(default_factory=list)
    """CORL's offline-to-online scripts run on the same data, seeds and budget (needs --corl-dir)"""
    corl_dir: Optional[str] = None
    """a CORL checkout (github.com/corl-team/CORL), for --peers"""
    finetuners: List[Literal["sac", "td3"]] = field(default_factory=lambda: ["sac", "td3"])
    """online algorithms run from every offline checkpoint"""
    offline_updates: int = 50_000
    """offline gradient updates per run (the full protocol: 1M)"""
    online_steps: int = 50_000
    """online environment steps per run (the full protocol: 250k or more)"""
    offline_eval_freq: int = 5000
    """offline evaluation interval in updates"""
    online_eval_freq: int = 1000
    """online evaluation interval in steps (the fine-tuners also evaluate 100, 500 and 1000 updates in)"""
    eval_episodes: int = 10
    """evaluation episodes per point"""
    smac_flags: str = ""
    """extra flags for smac.py, for both methods; write them with '=': --smac-flags='--score-coef 1'"""
    finetune_flags: str = ""
    """extra flags for both fine-tuners"""
    engine: Literal["local", "slurm", "submitit-local"] = "local"
    """local: a process pool; slurm: one submitit job per run; submitit-local: submitit's local executor"""
    workers: int = os.cpu_count() or 1
    """parallel runs of the local pool"""
    threads_per_run: int = 1
    """torch/OpenMP threads of each run (workers x threads should not exceed the cores)"""
    slurm_partition: Optional[str] = None
    """Slurm partition (engine slurm)"""
    slurm_timeout_min: int = 24 * 60
    """Slurm time limit per run, in minutes"""
    slurm_gpus_per_run: int = 0
    """GPUs per Slurm job (smac.py uses CUDA when it finds one)"""
    results_dir: str = os.path.join(ROOT, "results")
    """where results/<name>/ (summary.csv, table.md, plots) is written"""
    run_root: str = os.path.join(ROOT, "runs", "experiments")
    """where the raw run folders go (not committed)"""
    collect_only: bool = False
    """if toggled, run nothing: rebuild summary.csv, table.md and the plots from the finished runs"""


def parse_task(task: str):
    env, _, path = task.partition(":")
    smac.check_env_name(env)
    if path and not os.path.isfile(path):
        raise smac.SMACError(f"dataset file {path} (task {task!r}) does not exist")
    label = os.path.splitext(os.path.basename(path))[0] if path else env.replace("/", "_")
    return env, (os.path.abspath(path) if path else None), label


# ---------------------------------------------------------------- one run (executed in a worker or a Slurm job)
def run_job(job: dict) -> dict:
    """Run one script into job["dir"] and write job["result"] (result.json); returns the result."""
    out_dir = job["dir"]
    if os.path.isdir(out_dir):  # a run interrupted before result.json: start it again from nothing
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    command = [sys.executable, os.path.join(ROOT, job["script"]), *job["argv"], "--run-dir", out_dir]
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"])}
    with open(os.path.join(out_dir, "log.txt"), "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {code}); see {out_dir}/log.txt")
    (run_dir,) = [os.path.join(out_dir, d) for d in os.listdir(out_dir) if os.path.isdir(os.path.join(out_dir, d))]
    with open(os.path.join(run_dir, "metrics.csv")) as f:  # the run's own record, one row per evaluation
        rows = list(csv.DictReader(f))
    if job["kind"] == "offline":
        result = {"checkpoint": os.path.join(run_dir, "smac.pt"), "offline_score": float(rows[-1]["normalized_score"]),
                  "curve": [[int(r["update"]), float(r["normalized_score"])] for r in rows],
                  **{k: float(rows[-1][k]) for k in OFFLINE_DIAGNOSTICS}}
    elif job["kind"] == "peer":  # offline then online in one run: both curves, the summary
        with open(os.path.join(run_dir, "summary.csv")) as f:
            (summary,) = list(csv.DictReader(f))
        with open(os.path.join(run_dir, "offline_metrics.csv")) as f:
            offline_curve = [[int(r["update"]), float(r["normalized_score"])] for r in csv.DictReader(f)]
        result = {"checkpoint": None, "offline_curve": offline_curve, **{k: float(v) for k, v in summary.items()},
                  "curve": [[int(r["step"]), float(r["normalized_score"])] for r in rows]}
    else:
        with open(os.path.join(run_dir, "summary.csv")) as f:
            (summary,) = list(csv.DictReader(f))
        result = {"checkpoint": os.path.join(run_dir, "final.pt"),
                  "curve": [[int(r["step"]), float(r["normalized_score"])] for r in rows],
                  **{k: float(v) for k, v in summary.items()}}
    os.makedirs(os.path.dirname(job["result"]), exist_ok=True)
    tmp = job["result"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=0)
    os.replace(tmp, job["result"])
    return result


def read_result(job: dict) -> Optional[dict]:
    path = job["result"]
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------- the sweep
def locate(args: Args, *parts: str) -> dict:
    """A run's folder under --run-root and its result.json under results/<name>/finished/, at the same relative path."""
    return dict(parts=parts, dir=os.path.join(args.run_root, args.name, *parts),
                result=os.path.join(args.results_dir, args.name, "finished", *parts, "result.json"))


def plan(args: Args):
    """Offline jobs (each followed by the online jobs that need its checkpoint) and peer jobs."""
    jobs = []
    offline_methods = [m for m in OFFLINE_FLAGS if any(METHODS[v][0] == m for v in args.methods)]
    for task in args.tasks:
        env, path, label = parse_task(task)
        for seed in args.seeds:  # seed-major: a sweep stopped half-way has every method for the same seeds
            for method in offline_methods:
                argv = ["--env", env, "--seed", str(seed), "--total-updates", str(args.offline_updates),
                        "--eval-freq", str(args.offline_eval_freq), "--eval-episodes", str(args.eval_episodes),
                        "--exp-name", f"{method}", *OFFLINE_FLAGS[method], *args.smac_flags.split()]
                if path:
                    argv += ["--dataset-path", path]
                key = dict(dataset=label, env=env, method=method, seed=seed)
                jobs.append(dict(kind="offline", script="smac.py", argv=argv, key=key, threads=args.threads_per_run,
                                 **locate(args, label, method, f"seed{seed}", "offline")))
            for peer in args.peers:
                argv = ["--algo", peer, "--corl-dir", args.corl_dir or "", "--env", env, "--dataset-path", path or "",
                        "--seed", str(seed), "--offline-updates", str(args.offline_updates), "--online-steps",
                        str(args.online_steps), "--eval-freq", str(args.online_eval_freq), "--eval-episodes",
                        str(args.eval_episodes)]
                key = dict(dataset=label, env=env, method=peer, seed=seed, finetuner="own")
                jobs.append(dict(kind="peer", script=PEER_SCRIPT, argv=argv, key=key, threads=args.threads_per_run,
                                 **locate(args, label, peer, f"seed{seed}", "peer")))
    return jobs


def online_jobs_for(offline_job: dict, checkpoint: str, args: Args):
    jobs = []
    for method in [m for m in args.methods if METHODS[m][0] == offline_job["key"]["method"]]:
        for tuner in args.finetuners:
            argv = ["--checkpoint", checkpoint, "--seed", str(offline_job["key"]["seed"]),
                    "--total-timesteps", str(args.online_steps), "--eval-freq", str(args.online_eval_freq),
                    "--eval-episodes", str(args.eval_episodes), *METHODS[method][1], *args.finetune_flags.split()]
            key = {**offline_job["key"], "method": method, "finetuner": tuner}
            folder = tuner if method == offline_job["key"]["method"] else f"{tuner}-{method}"  # e.g. sac-smac-plain
            jobs.append(dict(kind="online", script=FINETUNERS[tuner], argv=argv, key=key, threads=args.threads_per_run,
                             **locate(args, *offline_job["parts"][:-1], folder)))
    return jobs


def make_executor(args: Args):
    if args.engine == "local":
        return ProcessPoolExecutor(max_workers=args.workers)
    import submitit

    folder = os.path.join(args.run_root, args.name, "submitit", "%j")
    executor = submitit.AutoExecutor(folder=folder, cluster="local" if args.engine == "submitit-local" else "slurm")
    executor.update_parameters(timeout_min=args.slurm_timeout_min, cpus_per_task=args.threads_per_run)
    if args.engine == "slurm":
        executor.update_parameters(slurm_partition=args.slurm_partition, gpus_per_node=args.slurm_gpus_per_run)
    return executor


def run_sweep(args: Args) -> List[str]:
    """Runs every unfinished job (online jobs as soon as their checkpoint exists); returns the failures."""
    executor, pending, failures = make_executor(args), [], []

    def schedule(job):
        result = read_result(job)
        if result is not None and job["kind"] == "offline" and not os.path.isfile(result["checkpoint"]) and any(
                read_result(j) is None for j in online_jobs_for(job, result["checkpoint"], args)):
            print(f"checkpoint gone (a fresh clone?), made again: {job['dir']}")  # CPU runs are deterministic
            result = None
        if result is not None:
            print(f"done already: {job['dir']}")
            return finished(job, result)
        print(f"start: {job['dir']}", flush=True)
        pending.append((executor.submit(run_job, job), job))

    def finished(job, result):
        if job["kind"] == "offline":
            for online_job in online_jobs_for(job, result["checkpoint"], args):
                schedule(online_job)

    for job in plan(args):
        schedule(job)
    while pending:
        time.sleep(0.5)
        for future, job in [p for p in pending if p[0].done()]:
            pending.remove((future, job))
            try:
                result = future.result()
            except Exception as e:  # one failed run does not stop the others
                failures.append(f"{job['dir']}: {e}")
                print(f"FAILED: {job['dir']}: {e}", flush=True)
                continue
            print(f"finished: {job['dir']}", flush=True)
            finished(job, result)
            collect(args)
    if hasattr(executor, "shutdown"):
        executor.shutdown()
    return failures


# ---------------------------------------------------------------- summary, table and plots
def finished_runs(args: Args):
    """(key, offline curve, offline result, online result) for every finished online run and peer run."""
    for job in plan(args):
        result = read_result(job)
        if result is None:
            continue
        if job["kind"] == "peer":
            yield job["key"], result["offline_curve"], result, result
            continue
        for online_job in online_jobs_for(job, result["checkpoint"], args):
            if (online := read_result(online_job)) is not None:
                yield online_job["key"], result["curve"], result, online


def collect(args: Args) -> List[dict]:
    out = os.path.join(args.results_dir, args.name)
    os.makedirs(out, exist_ok=True)
    rows = []
    for key, _, offline, result in finished_runs(args):
        rows.append({**key, "offline_score": offline["offline_score"],
                     **{k: offline.get(k, float("nan")) for k in OFFLINE_DIAGNOSTICS},
                     **{k: result.get(k, float("nan")) for k in ONLINE_METRICS}})
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, SUMMARY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})
    write_table(rows, os.path.join(out, "table.md"))
    plot(args, out)
    return rows


def write_table(rows: List[dict], path: str) -> None:
    """Mean and std over seeds per dataset x fine-tuner x method, as a Markdown table."""
    metrics = ["offline_score", "step0_score", "lowest_early_score", "drop", "regret", "final_score", "score_10k",
               "score_30k", "kl_1000"]
    lines = ["| dataset | fine-tuner | method | seeds | " + " | ".join(metrics) + " |",
             "|---|---|---|---|" + "---|" * len(metrics)]
    groups = sorted({(r["dataset"], r["finetuner"], r["method"]) for r in rows})
    for dataset, tuner, method in groups:
        group = [r for r in rows if (r["dataset"], r["finetuner"], r["method"]) == (dataset, tuner, method)]
        cells = []
        for m in metrics:
            values = np.array([r[m] for r in group], dtype=float)
            digits = 3 if m in ("regret", "kl_1000") else 1
            cells.append(f"{values.mean():.{digits}f} ± {values.std():.{digits}f}")
        lines.append(f"| {dataset} | {tuner} | {method} | {len(group)} | " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(args: Args, out: str) -> None:
    """Per dataset and fine-tuner: offline curve, then online curve after the hand-over; mean and std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}  # (dataset, tuner, method) -> list of (steps, scores), one per seed
    for key, offline_curve, _, result in finished_runs(args):
        offline_curve = np.array(offline_curve, dtype=float).reshape(-1, 2)
        online_curve = np.array(result["curve"], dtype=float)
        online_curve[:, 0] += args.offline_updates  # online step 0 is the hand-over
        curve = np.concatenate([offline_curve, online_curve[1:]])  # step 0 repeats the offline final score
        for tuner in args.finetuners if key["finetuner"] == "own" else [key["finetuner"]]:  # a peer on every plot
            curves.setdefault((key["dataset"], tuner, key["method"]), []).append(curve)
    colors = {"smac": "tab:blue", "smac-anchor": "tab:cyan", "smac-plain": "tab:purple", "baseline": "tab:orange",
              "calql": "tab:red", "iql": "tab:green", "spot": "tab:brown"}
    for dataset, tuner in sorted({k[:2] for k in curves}):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for method in [*args.methods, *args.peers]:
            runs = curves.get((dataset, tuner, method), [])
            if not runs:
                continue
            length = min(len(c) for c in runs)  # unfinished seeds are not plotted beyond their shortest common part
            steps, scores = runs[0][:length, 0], np.stack([c[:length, 1] for c in runs])
            mean, std = scores.mean(0), scores.std(0)
            label = f"{method}{' (own online)' if method in args.peers else ''} (n={len(runs)})"
            ax.plot(steps, mean, color=colors[method], label=label)
            ax.fill_between(steps, mean - std, mean + std, color=colors[method], alpha=0.2)
        ax.axvline(args.offline_updates, color="black", linestyle="--", linewidth=1)
        ax.text(args.offline_updates, ax.get_ylim()[1], f" hand-over to {tuner.upper()}", va="top", fontsize=9)
        ax.set_xlabel("offline updates, then online environment steps")
        ax.set_ylabel("normalized score")
        ax.set_title(f"{dataset}: offline then online {tuner.upper()} (mean ± std over seeds)")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{dataset}_{tuner}.png"), dpi=110)
        plt.close(fig)


def main(args: Args) -> int:
    for task in args.tasks:
        if not parse_task(task)[1] and args.peers:
            raise smac.SMACError(f"task {task}: the peers read a local D4RL-format file; give env:path")
    if args.peers and not (args.corl_dir and os.path.isdir(args.corl_dir)):
        raise smac.SMACError(f"--peers needs --corl-dir, a CORL checkout (got {args.corl_dir!r})")
    if args.peers and (args.offline_updates % args.online_eval_freq or args.online_steps % args.online_eval_freq):
        raise smac.SMACError(f"--peers: --online-eval-freq {args.online_eval_freq} must divide --offline-updates and "
                             "--online-steps (CORL evaluates every eval_freq iterations, offline and online)")
    failures = [] if args.collect_only else run_sweep(args)
    rows = collect(args)
    print(f"{len(rows)} finished online runs in {os.path.join(args.results_dir, args.name, 'summary.csv')}")
    for failure in failures:
        print(f"failed: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main(tyro.cli(Args)))
    except smac.SMACError as e:
        sys.exit(f"error: {e}")
