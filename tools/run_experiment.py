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
command skips the runs that have one, so an interrupted sweep (Ctrl-C, SIGTERM: its runs are stopped) resumes, also
on a fresh clone (an offline run whose checkpoint is gone is made again, bitwise, when one of its online runs still
has to run; an interrupted Cal-QL run continues from its latest checkpoint). results/<name>/ gets
sweep.json (the settings every run of it is made with: a command with other settings is refused), summary.csv,
table.md and one plot per task and fine-tuner; a command that would drop a run from them is refused. After each
offline run, tools/offline_rest.py continues it offline for --rest-updates (issue 31: how much of an online drop the
offline learner makes alone); its summary (finished/*/rest/result.json, with the rest_updates it was made with: not a
sweep setting, as it changes no online run) fills the offline_* columns of the online rows. One sweep per name at a
time (a lock in --run-root). Engines: local threads, each running one run's process (--workers), or Slurm through
submitit (--engine slurm) with the same command line.
"""

import csv
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
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
OFFLINE_SCRIPT = "smac.py"
FINETUNERS = {"sac": "sac_finetune.py", "td3": "td3_finetune.py"}
PEER_SCRIPT = os.path.join("tools", "peers", "run_peer.py")
REST_SCRIPT = os.path.join("tools", "offline_rest.py")
REST_SUMMARY = ["step0", "lowest", "continuation_drop", "spread_std", "spread_range", "floor_drop", "floor_std",
                "floor_range", "drop_limit", "std_limit", "noise_test", "at_rest"]  # offline_rest.py's summary row
REST_COLUMNS = {  # summary.csv column: the rest result's value
    "offline_continuation_drop": "continuation_drop", "offline_rest_spread_std": "spread_std",
    "offline_rest_floor_drop": "floor_drop", "offline_rest_floor_std": "floor_std", "offline_at_rest": "at_rest",
    "offline_rest_updates": "rest_updates"}
OFFLINE_DIAGNOSTICS = ["score_residual_rel", "score_cosine", "alpha_psi_mean", "sac_actor_grad_norm"]
ONLINE_METRICS = ["step0_score", "lowest_early_score", "drop", "regret", "regret_from", "final_score",
                  "final_success_rate", "online_steps", "score_10k", "score_30k", "td_grad_ratio", "kl_100", "kl_500",
                  "kl_1000"]  # regret_from: "success" (goal tasks) or "return"
SUMMARY_COLUMNS = ["dataset", "env", "method", "finetuner", "seed", "offline_score", *ONLINE_METRICS[:3], *REST_COLUMNS,
                   *ONLINE_METRICS[3:], *OFFLINE_DIAGNOSTICS]  # all but the key and offline_score may be absent: blank
SETTINGS = ["offline_updates", "online_steps", "offline_eval_freq", "online_eval_freq", "eval_episodes", "smac_flags",
            "finetune_flags"]  # what changes a run's result (threads and engine only change bits, not the protocol)
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # one plain folder under --results-dir and --run-root
RUNNING, GUARD, STOP = set(), threading.Lock(), threading.Event()  # the local runs' processes; set: start no more


@dataclass
class Args:
    name: str = "hopper-transfer"
    """experiment name ([A-Za-z0-9._-], not starting with '.'): results go to <results-dir>/<name>/, runs to
    <run-root>/<name>/"""
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
    """online evaluation interval in steps (the fine-tuners also evaluate at step 0 and at the last step; score_10k and
    score_30k are the last evaluation at or before 10k and 30k steps)"""
    eval_episodes: int = 10
    """evaluation episodes per point"""
    smac_flags: str = ""
    """extra flags for smac.py, for both offline runs; write them with '=': --smac-flags='--hidden-dim 128'. A method's
    own flags come after them and win (the baseline stays kappa 0)"""
    finetune_flags: str = ""
    """extra flags for both fine-tuners; smac-anchor's and smac-plain's own flags come after them and win"""
    defer: List[Literal["smac", "smac-anchor", "smac-plain", "baseline", "calql", "iql", "spot"]] = field(
        default_factory=list)
    """methods or peers whose unfinished runs this command does not start (they stay in the sweep and its summary;
    a later command without them runs them), e.g. --defer calql to spend a session on the runs that fit in it;
    smac or baseline: its offline run, so also every run that needs its checkpoint"""
    rest_updates: int = 5000
    """continued offline updates of tools/offline_rest.py after each offline run (evaluated every tenth of them);
    0: not measured. Not a sweep setting: a sweep resumed with another value keeps the rest results it has, each
    showing its own (summary.csv's offline_rest_updates)"""
    engine: Literal["local", "slurm", "submitit-local"] = "local"
    """local: --workers runs at a time on this machine; slurm: one submitit job per run; submitit-local: its local
    executor"""
    workers: int = os.cpu_count() or 1
    """parallel runs of the local engine"""
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
    """if toggled, run nothing: rebuild summary.csv, table.md and the plots from the finished runs (give the sweep's
    own --tasks, --seeds, --methods, --peers, --finetuners: a command that would drop a run is refused)"""


def parse_task(task: str):
    env, _, path = task.partition(":")
    if env not in smac.D4RL_NAMES and not smac.MINARI_ID.fullmatch(env):
        raise smac.SMACError(f"unknown dataset {env!r} (task {task!r}): give a D4RL name such as hopper-medium-v2 or a "
                             "Minari id such as mujoco/hopper/medium-v0")
    if path and not os.path.isfile(path):
        raise smac.SMACError(f"dataset file {path} (task {task!r}) does not exist")
    label = os.path.splitext(os.path.basename(path))[0] if path else env.replace("/", "_")
    return env, (os.path.abspath(path) if path else None), label


# ---------------------------------------------------------------- one run (executed in a thread or a Slurm job)
def run_job(job: dict) -> dict:
    """Run one script into job["dir"] and write job["result"] (result.json); returns the result."""
    out_dir = job["dir"]
    if os.path.isdir(out_dir):  # a run interrupted before result.json: start it again from nothing
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    command = [sys.executable, os.path.join(ROOT, job["script"]), *job["argv"],
               *([] if job["kind"] == "rest" else ["--run-dir", out_dir])]  # offline_rest.py writes only its --out
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"])}
    with open(os.path.join(out_dir, "log.txt"), "w") as log, GUARD:
        if STOP.is_set():
            raise RuntimeError("not started: the sweep is stopping")
        # its own process group: a signal to the sweep stops it with whatever it started (CORL's script)
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                 start_new_session=True)
        RUNNING.add(child)
    code = child.wait()
    with GUARD:
        RUNNING.discard(child)
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {code}); see {out_dir}/log.txt")
    if job["kind"] != "rest":
        (run_dir,) = [os.path.join(out_dir, d) for d in os.listdir(out_dir) if os.path.isdir(os.path.join(out_dir, d))]

    def curve(name, x):  # a metrics file's (x, normalized score) rows, one per evaluation
        with open(os.path.join(run_dir, name)) as f:
            rows = list(csv.DictReader(f))
        return rows, [[int(r[x]), float(r["normalized_score"])] for r in rows]

    if job["kind"] == "offline":  # the diagnostics are optional: newer smac.py versions do not write them
        rows, points = curve("metrics.csv", "update")
        result = {"checkpoint": os.path.join(run_dir, "smac.pt"), "offline_score": points[-1][1], "curve": points,
                  **{k: float(v) for k, v in rows[-1].items() if k in OFFLINE_DIAGNOSTICS and v}}
    elif job["kind"] == "rest":  # its summary row and the scores of its evaluations
        with open(os.path.join(out_dir, "offline_rest.csv")) as f:
            *evals, summary = list(csv.DictReader(f))
        result = {**{k: summary[k] == "True" if k in ("at_rest", "noise_test") else float(summary[k])
                     for k in REST_SUMMARY},
                  "rest_updates": int(summary["update"]), "scores": [float(r["score"]) for r in evals]}
    else:  # a fine-tuner or a peer (offline then online in one run): its summary, whatever columns it has
        with open(os.path.join(run_dir, "summary.csv")) as f:
            (summary,) = list(csv.DictReader(f))
        rows, points = curve("metrics.csv", "step")
        result = {"checkpoint": None if job["kind"] == "peer" else os.path.join(run_dir, "final.pt"),
                  **{k: v if k == "regret_from" else float(v) for k, v in summary.items() if v}, "curve": points}
        if rows[-1].get("success_rate"):  # goal tasks: the last evaluation's success rate
            result["final_success_rate"] = float(rows[-1]["success_rate"])
        if job["kind"] == "peer":
            result["offline_curve"] = curve("offline_metrics.csv", "update")[1]
    result["settings"] = job["settings"]  # so a results folder that lost its sweep.json is still checked
    os.makedirs(os.path.dirname(job["result"]), exist_ok=True)
    for kept in ("episodes.csv", "peer_config.json"):  # regret's data; what a peer ran with (CORL's config values)
        if job["kind"] in ("online", "peer") and os.path.isfile(os.path.join(run_dir, kept)):
            shutil.copyfile(os.path.join(run_dir, kept), os.path.join(os.path.dirname(job["result"]), kept))
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
def settings(args: Args) -> dict:
    return {k: getattr(args, k).split() if k.endswith("_flags") else getattr(args, k) for k in SETTINGS}


def locate(args: Args, *parts: str) -> dict:
    """A run's folder under --run-root and its result.json under results/<name>/finished/, at the same relative path."""
    return dict(parts=parts, dir=os.path.join(args.run_root, args.name, *parts), settings=settings(args),
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
                        "--eval-freq-updates", str(args.offline_eval_freq), "--eval-episodes", str(args.eval_episodes),
                        "--exp-name", f"{method}", *args.smac_flags.split(), *OFFLINE_FLAGS[method]]
                if path:
                    argv += ["--dataset-path", path]
                key = dict(dataset=label, env=env, method=method, seed=seed)
                jobs.append(dict(kind="offline", script=OFFLINE_SCRIPT, argv=argv, key=key,
                                 threads=args.threads_per_run, **locate(args, label, method, f"seed{seed}", "offline")))
            for peer in args.peers:
                argv = ["--algo", peer, "--corl-dir", args.corl_dir or "", "--env", env, "--dataset-path", path or "",
                        "--seed", str(seed), "--offline-updates", str(args.offline_updates), "--online-steps",
                        str(args.online_steps), "--eval-freq", str(args.online_eval_freq), "--eval-episodes",
                        str(args.eval_episodes)]
                key, where = dict(dataset=label, env=env, method=peer, seed=seed, finetuner="own"), locate(
                    args, label, peer, f"seed{seed}", "peer")
                if peer == "calql":  # hours long: its checkpoints outlive the run folder, which a rerun starts afresh
                    argv += ["--resume-dir", where["dir"] + "-resume"]
                jobs.append(dict(kind="peer", script=PEER_SCRIPT, argv=argv, key=key, threads=args.threads_per_run,
                                 **where))
    return jobs


def online_jobs_for(offline_job: dict, checkpoint: str, args: Args):
    jobs = []
    for method in [m for m in args.methods if METHODS[m][0] == offline_job["key"]["method"]]:
        for tuner in args.finetuners:
            argv = ["--checkpoint", checkpoint, "--seed", str(offline_job["key"]["seed"]),
                    "--total-timesteps", str(args.online_steps), "--eval-freq", str(args.online_eval_freq),
                    "--eval-episodes", str(args.eval_episodes), *args.finetune_flags.split(), *METHODS[method][1]]
            key = {**offline_job["key"], "method": method, "finetuner": tuner}
            folder = tuner if method == offline_job["key"]["method"] else f"{tuner}-{method}"  # e.g. sac-smac-plain
            jobs.append(dict(kind="online", script=FINETUNERS[tuner], argv=argv, key=key, threads=args.threads_per_run,
                             **locate(args, *offline_job["parts"][:-1], folder)))
    return jobs


def followers(offline_job: dict, checkpoint: str, args: Args):
    """The jobs that need an offline checkpoint: its online runs, then offline_rest.py on it (--rest-updates)."""
    rest = [rest_job_for(offline_job, checkpoint, args)] if args.rest_updates else []
    return online_jobs_for(offline_job, checkpoint, args) + rest


def rest_job_for(offline_job: dict, checkpoint: str, args: Args) -> dict:
    where = locate(args, *offline_job["parts"][:-1], "rest")
    argv = [checkpoint, "--updates", str(args.rest_updates), "--eval-freq", str(max(1, args.rest_updates // 10)),
            "--eval-episodes", str(args.eval_episodes), "--seed", str(offline_job["key"]["seed"]), "--out",
            os.path.join(where["dir"], "offline_rest.csv")]
    return dict(kind="rest", script=REST_SCRIPT, argv=argv, key=offline_job["key"], threads=args.threads_per_run,
                **where)


def make_executor(args: Args):
    if args.engine == "local":
        return ThreadPoolExecutor(max_workers=args.workers)  # threads suffice: each run is a process of its own
    import submitit

    folder = os.path.join(args.run_root, args.name, "submitit", "%j")
    executor = submitit.AutoExecutor(folder=folder, cluster="local" if args.engine == "submitit-local" else "slurm")
    executor.update_parameters(timeout_min=args.slurm_timeout_min, cpus_per_task=args.threads_per_run)
    if args.engine == "slurm":
        executor.update_parameters(slurm_partition=args.slurm_partition, gpus_per_node=args.slurm_gpus_per_run)
    return executor


def run_sweep(args: Args) -> List[str]:
    """Runs every unfinished job, a checkpoint's followers (online runs, rest) before the jobs still waiting, so a
    task's results come in while later tasks' long runs wait; returns the failures."""
    executor, pending, failures = make_executor(args), [], []
    waiting = {"followers": [], "plan": []}  # each in its order; the followers first
    capacity = args.workers if args.engine == "local" else math.inf  # a cluster takes every job at once
    STOP.clear()

    def schedule(job, first=False):
        result = read_result(job)
        if result is not None and job["kind"] == "offline" and not os.path.isfile(result["checkpoint"]) and any(
                read_result(j) is None for j in followers(job, result["checkpoint"], args)):
            print(f"checkpoint gone (a fresh clone?), made again: {job['dir']}")  # CPU runs are deterministic
            result = None
        if result is not None:
            print(f"done already: {job['dir']}" + (f" (made with --rest-updates {result['rest_updates']})"
                                                     if job["kind"] == "rest" else ""))
            return finished(job, result)
        if job["key"]["method"] in args.defer:
            return print(f"deferred (--defer): {job['dir']}")
        waiting["followers" if first else "plan"].append(job)

    def finished(job, result):
        if job["kind"] == "offline":
            for follower in followers(job, result["checkpoint"], args):
                schedule(follower, first=True)

    def start_waiting():
        while (queue := waiting["followers"] or waiting["plan"]) and len(pending) < capacity:
            job = queue.pop(0)
            print(f"start: {job['dir']}", flush=True)
            pending.append((executor.submit(run_job, job), job))

    try:
        for job in plan(args):
            schedule(job)
        start_waiting()
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
            start_waiting()
    except BaseException:  # a signal (Interrupted) or a bug: no run may go on without the sweep
        stop_runs(pending)
        raise
    finally:
        if hasattr(executor, "shutdown"):
            executor.shutdown(cancel_futures=True)
    return failures


def stop_runs(pending: list) -> None:
    """Stops the queued runs, the Slurm jobs (scancel) and the local runs' process groups (SIGKILL after 30 s)."""
    with GUARD:
        STOP.set()  # a local run that is about to start does not
        children = list(RUNNING)
    for future, _ in pending:
        future.cancel()
    for child in children:
        with suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)  # smac.py keeps its last checkpoint and exits
    for child in children:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM (what Slurm and other schedulers send before they kill a job)."""


def interrupt(signum, frame):
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the stopping of the runs short
    raise Interrupted(signum)


@contextmanager
def sweep_lock(args: Args):
    """One sweep per name: a second one would start the first one's running runs again (deleting their folders)."""
    path = os.path.join(args.run_root, args.name, "sweep.lock")  # not in results/: a lock must never be committed
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            with open(path) as f:
                pid = f.read().strip()
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:  # stale: its sweep was killed (SIGKILL, a reboot) before it could remove it
                os.remove(path)
                continue
            except (PermissionError, ValueError):  # another user's process; no PID yet: its sweep is writing it
                pass
            raise smac.SMACError(f"a sweep named {args.name} is running (PID {pid or '?'}); wait for it or stop it "
                                 f"(if no such sweep runs, remove {path})") from None
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        os.remove(path)


def check_args(args: Args) -> None:
    """Every flag, before anything is written or run: one line each, never a traceback half-way through a sweep."""
    if not NAME.fullmatch(args.name):
        raise smac.SMACError(f"--name {args.name!r} must be one plain folder name: letters, digits, '.', '_', '-', "
                             "not starting with '.'")
    smac.check_flags(args, smac.AT_LEAST_1, "offline_updates", "online_steps", "offline_eval_freq", "online_eval_freq",
                     "eval_episodes", "workers", "threads_per_run", "slurm_timeout_min")
    smac.check_flags(args, smac.AT_LEAST_0, "slurm_gpus_per_run", "rest_updates")
    if "smac-anchor" in args.methods and re.search(r"--score-coef(=|\s|$)", args.smac_flags):
        raise smac.SMACError("smac-anchor keeps smac.py's default kappa 10 online; with --smac-flags setting "
                             "--score-coef it would not be the offline kappa kept: run smac-anchor without it")
    if stray := [m for m in args.defer if m not in args.methods + args.peers]:
        raise smac.SMACError(f"--defer {' '.join(stray)}: not among this sweep's --methods or --peers")
    smac.check_flags(args, (len, "one or more values"), "tasks", "finetuners")
    smac.check_flags(args, (lambda v: v and all(0 <= s < 2**32 for s in v), "one or more integers in [0, 2**32 - 1]"),
                     "seeds")
    if not args.methods and not args.peers:
        raise smac.SMACError("--methods and --peers are both empty: nothing to run")
    for task in args.tasks:
        if not parse_task(task)[1] and args.peers:
            raise smac.SMACError(f"task {task}: the peers read a local D4RL-format file; give env:path")
    if args.peers and not (args.corl_dir and os.path.isdir(args.corl_dir)):
        raise smac.SMACError(f"--peers needs --corl-dir, a CORL checkout (got {args.corl_dir!r})")
    if args.peers and (args.offline_updates % args.online_eval_freq or args.online_steps % args.online_eval_freq):
        raise smac.SMACError(f"--peers: --online-eval-freq {args.online_eval_freq} must divide --offline-updates and "
                             "--online-steps (CORL evaluates every eval_freq iterations, offline and online)")
    for folder, flag in ((args.results_dir, "--results-dir"), (args.run_root, "--run-root")):
        existing = os.path.abspath(os.path.join(folder, args.name))  # its nearest existing part: a writable folder
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not (os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)):
            raise smac.SMACError(f"{flag} {folder}: cannot write {os.path.join(folder, args.name)}: {existing} is "
                                 f"{'not writable' if os.path.isdir(existing) else 'a file, not a folder'}")
    if args.engine == "slurm" and not args.collect_only and not shutil.which("srun"):
        raise smac.SMACError("--engine slurm needs Slurm (no srun on PATH); on this machine use --engine local")


def check_results(args: Args, out: str) -> None:
    """Never lose a result: refuse a command whose runs were made with other settings, or that would drop a run."""
    summary, recorded = os.path.join(out, "summary.csv"), None
    finished = sorted(glob.glob(os.path.join(out, "finished", "**", "result.json"), recursive=True))
    for path in [os.path.join(out, "sweep.json"), *finished]:
        if recorded is None and os.path.isfile(path):  # sweep.json, else a result.json that records them
            with open(path) as f:
                recorded = json.load(f).get("settings")
    held = set()
    if os.path.isfile(summary):
        with open(summary) as f:
            held = {(r["dataset"], r["method"], r["finetuner"], r["seed"]) for r in csv.DictReader(f)}
    if recorded is None and (held or finished) and not args.collect_only:
        raise smac.SMACError(f"{out} holds runs but no record of their settings (sweep.json): it can only be collected "
                             "(--collect-only); for new runs choose another --name")
    if recorded is not None and (differ := [k for k in SETTINGS if recorded.get(k) != settings(args)[k]]):
        shown = {k: repr(" ".join(v)) if isinstance(v, list) else v for k, v in recorded.items()}
        raise smac.SMACError(f"{out} was made with other settings: " + ", ".join(
            f"--{k.replace('_', '-')} {shown.get(k)} (this command: {getattr(args, k)!r})" for k in differ) +
            "; give those to resume it, or choose another --name")
    if args.collect_only:  # the runs finished now; a sweep also makes again those whose result.json is gone
        keys = [key for key, *_ in finished_runs(args)]
    else:
        keys = [j["key"] for job in plan(args) for j in ([job] if job["kind"] == "peer" else
                                                          online_jobs_for(job, "", args))]
    if dropped := held - {(k["dataset"], k["method"], k["finetuner"], str(k["seed"])) for k in keys}:
        raise smac.SMACError(f"{summary} holds {len(dropped)} runs this command would drop (e.g. "
                             f"{' '.join(min(dropped))}): give the sweep's own --tasks, --seeds, --methods, --peers "
                             "and --finetuners, or choose another --name")


# ---------------------------------------------------------------- summary, table and plots
def finished_runs(args: Args):
    """(key, offline curve, offline result (its "rest": offline_rest.py's, or None), online result) for every finished
    online run and peer run."""
    for job in plan(args):
        result = read_result(job)
        if result is None:
            continue
        if job["kind"] == "peer":
            yield job["key"], result["offline_curve"], result, result
            continue
        result["rest"] = read_result(rest_job_for(job, result["checkpoint"], args))  # whatever --rest-updates
        for online_job in online_jobs_for(job, result["checkpoint"], args):
            if (online := read_result(online_job)) is not None:
                yield online_job["key"], result["curve"], result, online


def score_at(curve: list, budget: int) -> Optional[float]:
    """The last evaluation at or before `budget` online steps; None if the run is shorter."""
    return float([score for step, score in curve if step <= budget][-1]) if curve[-1][0] >= budget else None


def collect(args: Args) -> List[dict]:
    out = os.path.join(args.results_dir, args.name)
    os.makedirs(out, exist_ok=True)
    rows = []
    for key, _, offline, result in finished_runs(args):
        curve = result["curve"]
        row = {**key, "offline_score": offline["offline_score"], **{k: offline.get(k) for k in OFFLINE_DIAGNOSTICS},
               **{k: result.get(k) for k in ONLINE_METRICS}, "online_steps": float(curve[-1][0]),
               **{k: (offline.get("rest") or {}).get(v) for k, v in REST_COLUMNS.items()},
               "score_10k": score_at(curve, 10_000), "score_30k": score_at(curve, 30_000)}
        rows.append({k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in row.items()})
    with open(os.path.join(out, "summary.csv.tmp"), "w", newline="") as f:  # replaced whole: never half-written
        writer = csv.DictWriter(f, SUMMARY_COLUMNS)
        writer.writeheader()
        for row in rows:  # a value that does not exist (a peer's KL, a run shorter than 30k steps) is blank
            writer.writerow({k: "" if v is None else f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})
    os.replace(os.path.join(out, "summary.csv.tmp"), os.path.join(out, "summary.csv"))
    write_table(rows, os.path.join(out, "table.md"))
    plot(args, out)
    return rows


def write_table(rows: List[dict], path: str) -> None:
    """Per dataset x fine-tuner x method: mean ± sample std over seeds (ddof 1) [lowest, highest seed], as a Markdown
    table ('-': a value does not exist; '± -': one seed, no std)."""
    metrics = ["offline_score", "step0_score", "lowest_early_score", "drop", "offline_continuation_drop", "regret",
               "final_score", "final_success_rate", "score_10k", "score_30k"]
    lines = ["| dataset | fine-tuner | method | seeds | " + " | ".join(metrics) + " |",
             "|---|---|---|---|" + "---|" * len(metrics)]
    groups = sorted({(r["dataset"], r["finetuner"], r["method"]) for r in rows})
    for dataset, tuner, method in groups:
        group = [r for r in rows if (r["dataset"], r["finetuner"], r["method"]) == (dataset, tuner, method)]
        cells = []
        for m in metrics:
            values = np.array([r[m] for r in group], dtype=float)  # None: NaN
            d = 3 if m == "regret" else 1
            std = f"{values.std(ddof=1):.{d}f}" if len(values) > 1 else "-"
            cells.append(f"{values.mean():.{d}f} ± {std} [{values.min():.{d}f}, {values.max():.{d}f}]"
                         if all(values == values) else "-")
        lines.append(f"| {dataset} | {tuner} | {method} | {len(group)} | " + " | ".join(cells) + " |")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)


def plot(args: Args, out: str) -> None:
    """Per dataset and fine-tuner: offline curve, then online curve after the hand-over; mean and std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, handover = {}, {}  # (dataset, tuner, method) -> one (steps, scores) per seed; (dataset, tuner) -> its x
    for key, offline_curve, _, result in finished_runs(args):
        offline_curve = np.array(offline_curve, dtype=float).reshape(-1, 2)
        online_curve = np.array(result["curve"], dtype=float)
        start = offline_curve[-1, 0] if len(offline_curve) else 0  # the last offline update: the runs' own budget
        online_curve[:, 0] += start  # online step 0 is the hand-over
        curve = np.concatenate([offline_curve, online_curve[1:]])  # step 0 repeats the offline final score
        for tuner in args.finetuners if key["finetuner"] == "own" else [key["finetuner"]]:  # a peer on every plot
            curves.setdefault((key["dataset"], tuner, key["method"]), []).append(curve)
            handover[key["dataset"], tuner] = start
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
        ax.axvline(handover[dataset, tuner], color="black", linestyle="--", linewidth=1)
        ax.text(handover[dataset, tuner], ax.get_ylim()[1], f" hand-over to {tuner.upper()}", va="top", fontsize=9)
        ax.set_xlabel("offline updates, then online environment steps")
        ax.set_ylabel("normalized score")
        ax.set_title(f"{dataset}: offline then online {tuner.upper()} (mean ± std over seeds)")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, f"{dataset}_{tuner}.png")
        fig.savefig(path + ".tmp", dpi=110, format="png")
        os.replace(path + ".tmp", path)
        plt.close(fig)


def main(args: Args) -> int:
    check_args(args)
    out = os.path.join(args.results_dir, args.name)
    if args.collect_only:
        check_results(args, out)
        failures = []
    else:
        with sweep_lock(args):
            check_results(args, out)
            if not os.path.isfile(os.path.join(out, "sweep.json")):  # the settings every run of this sweep is made with
                os.makedirs(out, exist_ok=True)
                with open(os.path.join(out, "sweep.json"), "w") as f:
                    json.dump({"settings": settings(args)}, f, indent=1)
            failures = run_sweep(args)
    rows = collect(args)
    print(f"{len(rows)} finished online runs in {os.path.join(out, 'summary.csv')}")
    for failure in failures:
        print(f"failed: {failure}")
    return 1 if failures else 0


def cli(argv: Optional[List[str]] = None) -> int:
    """The command line: one line, no traceback, for bad input (exit 1) and for SIGINT / SIGTERM (128 + its number)."""
    args = tyro.cli(Args, args=argv)
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return main(args)
    except smac.SMACError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"\ninterrupted ({signal.Signals(e.args[0]).name}): the runs were stopped; every finished run is kept in "
              f"{os.path.join(args.results_dir, args.name, 'finished')}, and the same command resumes", file=sys.stderr)
        return 128 + e.args[0]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(cli())
