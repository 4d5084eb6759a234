"""Run a CORL offline-to-online script (Cal-QL, IQL or SPOT) on a local D4RL-format file, measured as SMAC is.

    python tools/peers/run_peer.py --algo iql --corl-dir ~/CORL --env hopper-medium-replay-v2 \
        --dataset-path ../shared/datasets/hopper_medium_replay-local.hdf5 --offline-updates 15000 --online-steps 30000

CORL's script runs unchanged, as its authors wrote it, with CORL's own settings for the dataset where CORL has a config
file for its name (configs/finetune/<algo>/, else the offline algorithm's configs/offline/<algo>/: the values the script
has a flag for, other than the budget, seed, evaluation, device and logging), its defaults for the rest, and the budget,
seed and evaluation schedule given here; `peer_config.json` in the run folder records what was applied. What a fresh
machine lacks is stood in for by tools/peers/shims/ (put first on its PYTHONPATH): `d4rl` reads the file through
smac.py's reader, `gym` is the old API over gymnasium's v4 envs, `wandb` writes the evaluations and training episodes to
a JSON-lines file. From that file this script writes the fine-tuners' metrics.csv and summary.csv, with drop, regret and
the budget scores from smac.py's own functions: the step-0 score is CORL's evaluation at the end of its offline phase,
and regret counts its online training episodes. A Cal-QL run outlasts a working session here: with --resume-dir it is
started through tools/peers/resume_corl.py and, run again, continues from its latest checkpoint.
Needs: pip install -r tools/requirements-peers.txt (pyrallis).
"""

import ast
import glob
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import tyro
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import smac  # noqa: E402

SHIMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shims")
RESUME = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resume_corl.py")
SCRIPTS = {"calql": "algorithms/finetune/cal_ql.py", "iql": "algorithms/finetune/iql.py",
           "spot": "algorithms/finetune/spot.py"}
CONFIG_DIRS = {"calql": ("configs/finetune/cal_ql", "configs/offline/cql"),  # Cal-QL's offline phase is CQL's
               "iql": ("configs/finetune/iql", "configs/offline/iql"), "spot": ("configs/finetune/spot",)}
NOT_FROM_CONFIG = {"env", "seed", "eval_seed", "device", "eval_freq", "n_episodes", "offline_iterations",  # set here
                   "online_iterations", "max_timesteps", "checkpoints_path", "load_model", "buffer_size", "project",
                   "group", "name"}


@dataclass
class Args:
    algo: Literal["calql", "iql", "spot"]
    """the CORL algorithm: Cal-QL, IQL (fine-tuned with AWR) or SPOT"""
    corl_dir: str
    """a checkout of github.com/corl-team/CORL (its algorithms/finetune/ scripts are run as they are)"""
    dataset_path: str
    """local D4RL-format HDF5 file"""
    env: str = "hopper-medium-replay-v2"
    """the D4RL name of the data (its env and reference returns)"""
    seed: int = 1
    """CORL's --seed"""
    offline_updates: int = 15_000
    """CORL's --offline_iterations"""
    online_steps: int = 30_000
    """CORL's --online_iterations: one env step and one update each"""
    eval_freq: int = 1000
    """evaluate every this many iterations (offline and online); must divide --offline-updates and --online-steps"""
    eval_episodes: int = 5
    """CORL's --n_episodes"""
    drop_window: Optional[int] = None
    """drop = step-0 score - lowest evaluation within this many updates; default max(5000, 10% of the updates)"""
    run_dir: str = "runs"
    """folder in which runs/{run_name}/ (log.txt, corl_log.jsonl, metrics.csv, offline_metrics.csv, summary.csv) goes"""
    corl_flags: str = ""
    """extra flags for CORL's script, e.g. '--cql_alpha_online 5' (after the dataset's config: they win)"""
    dataset_config: bool = True
    """apply CORL's own config file for this dataset name where CORL has one (off: the script's defaults only)"""
    resume_dir: Optional[str] = None
    """Cal-QL only: a folder kept between attempts for CORL's checkpoints; the same command run again continues from
    the latest one (online: with the transitions so far, in a new episode); removed when the run ends"""


def check(args: Args) -> str:
    script = os.path.join(args.corl_dir, SCRIPTS[args.algo])
    if not os.path.isfile(script):
        raise smac.SMACError(f"--corl-dir {args.corl_dir}: no {SCRIPTS[args.algo]} there (a CORL checkout?)")
    if not os.path.isfile(args.dataset_path):
        raise smac.SMACError(f"--dataset-path {args.dataset_path} is not a file")
    if args.env not in smac.D4RL_NAMES:
        raise smac.SMACError(f"--env {args.env}: CORL's scripts take D4RL names ({smac.D4RL_NAMES[0]}, ...)")
    if min(args.offline_updates, args.online_steps, args.eval_freq, args.eval_episodes) < 1:
        raise smac.SMACError("--offline-updates, --online-steps, --eval-freq and --eval-episodes must be >= 1")
    if args.offline_updates % args.eval_freq or args.online_steps % args.eval_freq:
        raise smac.SMACError(f"--eval-freq {args.eval_freq} must divide --offline-updates {args.offline_updates} and "
                             f"--online-steps {args.online_steps} (CORL evaluates every eval_freq iterations; the "
                             "step-0 score is its evaluation at the end of the offline phase)")
    if args.resume_dir and args.algo != "calql":
        raise smac.SMACError(f"--resume-dir: only Cal-QL's runs continue from checkpoints, not {args.algo}'s")
    for name, folder in (("--run-dir", args.run_dir), ("--resume-dir", args.resume_dir)):
        if folder and os.path.isfile(folder):
            raise smac.SMACError(f"{name} {folder} is a file, not a folder")
        parent = os.path.abspath(folder or ".")
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if folder and not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
            raise smac.SMACError(f"{name} {folder}: {parent} is not a folder this user can write to")
    return script


def dataset_config(corl_dir: str, algo: str, env: str) -> tuple:
    """(the config file CORL has for this dataset name or None, {flag: value} of it that the script takes)."""
    domain, dataset = env.split("-", 1)  # hopper-medium-replay-v2: configs/.../hopper/medium_replay_v2.yaml
    for folder in CONFIG_DIRS[algo]:
        path = os.path.join(corl_dir, folder, domain, dataset.replace("-", "_") + ".yaml")
        if os.path.isfile(path):
            break
    else:
        return None, {}
    with open(os.path.join(corl_dir, SCRIPTS[algo])) as f:  # the script's TrainConfig fields, read without running it
        train_config = next(node for node in ast.walk(ast.parse(f.read()))
                            if isinstance(node, ast.ClassDef) and node.name == "TrainConfig")
    fields = {node.target.id for node in train_config.body if isinstance(node, ast.AnnAssign)}
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise smac.SMACError(f"{path}: not a YAML mapping of flags")
    return os.path.relpath(path, corl_dir), {k: v for k, v in config.items() if k in fields - NOT_FROM_CONFIG}


def resume_point(folder: str, identity: dict) -> tuple:
    """(updates done, its file) of the latest whole checkpoint in the attempt folders folder/from-<updates>/ whose
    evaluation is in its attempt's log ((0, ""): none). Later attempts and the other checkpoints are removed. A folder
    of another command (identity: CORL's flags, data, script) is refused, never overwritten."""
    record = os.path.join(folder, "command.json")
    if os.path.isdir(folder) and os.listdir(folder) and not os.path.isfile(record):
        raise smac.SMACError(f"--resume-dir {folder} is not empty and is not a resume folder (no command.json)")
    if os.path.isfile(record):
        try:
            with open(record) as f:
                recorded = json.load(f)
        except ValueError:
            recorded = None
        if recorded != identity:
            raise smac.SMACError(f"--resume-dir {folder} holds the checkpoints of another command, data or CORL "
                                 f"script (its command.json); remove it to start this run again from update 0")
    os.makedirs(folder, exist_ok=True)
    with open(record + ".tmp", "w") as f:
        json.dump(identity, f)
    os.replace(record + ".tmp", record)
    attempts, checkpoints, usable = attempt_starts(folder), [], {}
    for start, attempt in attempts.items():
        evaluated = {entry["step"] for entry in log_entries(os.path.join(attempt, "corl_log.jsonl"))
                     if "eval/d4rl_normalized_score" in entry}  # CORL saves a checkpoint, then logs its evaluation
        for path in glob.glob(os.path.join(attempt, "*", "*.pt")):
            updates = start + int(path[:-3].rsplit("_", 1)[1]) + 1  # CORL names it by the attempt's own iteration
            checkpoints.append(path)
            if updates in evaluated and zipfile.is_zipfile(path):
                usable[updates] = path
    done = max(usable, default=0)
    for start, attempt in attempts.items():
        if start >= done:
            shutil.rmtree(attempt)
    for path in checkpoints:
        if path != usable.get(done) and os.path.isfile(path):
            os.remove(path)
    return done, usable.get(done, "")


def attempt_starts(folder: str) -> dict:
    """{updates done when it started: folder} of each attempt at a resumable run."""
    return {int(path.rsplit("-", 1)[1]): path for path in glob.glob(os.path.join(folder, "from-*"))}


def log_entries(path: str) -> list:
    """The entries of a CORL log written by the wandb stand-in; a line cut off by a kill is left out."""
    entries = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    pass
    return entries


def merge_attempts(folder: str, path: str):
    """Write the attempts' logs as one to path, each up to where the next one took over, and remove the folder."""
    starts = sorted(attempt_starts(folder))
    with open(path, "w") as out:
        for start, end in zip(starts, starts[1:] + [math.inf]):
            out.writelines(json.dumps(entry) + "\n" for entry in log_entries(os.path.join(folder, f"from-{start}",
                                                                                           "corl_log.jsonl"))
                           if start < entry["step"] <= end)
    for start in starts:  # what this script made there, and the folder if nothing else is in it
        shutil.rmtree(os.path.join(folder, f"from-{start}"))
    os.remove(os.path.join(folder, "command.json"))
    if not os.listdir(folder):
        os.rmdir(folder)


def read_corl_log(path: str, offline_updates: int):
    """CORL's evaluations split at the hand-over, [(offline update, score)] and [(online step, score)] with the
    hand-over evaluation as online step 0, and its online training episodes as episodes.csv's rows (step at the end,
    return, normalized score)."""
    offline, online, episodes = [], [], []
    with open(path) as f:
        for entry in map(json.loads, f):
            if "eval/d4rl_normalized_score" in entry:  # logged at step = updates so far (total_it)
                step, score = int(entry["step"]), entry["eval/d4rl_normalized_score"]
                (offline if step <= offline_updates else online).append((step, score))
            if "train/d4rl_normalized_episode_return" in entry:
                episodes.append({"step": int(entry["step"]) - offline_updates,
                                 "return": entry.get("train/episode_return", ""),
                                 "normalized_score": entry["train/d4rl_normalized_episode_return"]})
    if not offline or offline[-1][0] != offline_updates:
        raise smac.SMACError(f"{path}: no evaluation at the end of the offline phase (update {offline_updates})")
    online = [(0, offline[-1][1])] + [(step - offline_updates, score) for step, score in online]
    return offline, online, episodes


def main(args: Args) -> dict:
    script = check(args)
    run_name = f"{args.env}__{args.algo}__{args.seed}__{int(time.time())}"
    run_dir = os.path.abspath(os.path.join(args.run_dir, run_name))  # CORL runs in --corl-dir: its paths are absolute
    os.makedirs(run_dir)
    corl_log = os.path.join(run_dir, "corl_log.jsonl")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config_file, config = dataset_config(args.corl_dir, args.algo, args.env) if args.dataset_config else (None, {})
    record = {"config_file": config_file, "applied": config, "corl_flags": args.corl_flags}

    def flags(offline_iterations: int, online_iterations: int) -> list:
        return ["--offline_iterations", str(offline_iterations), "--env", args.env, "--seed", str(args.seed),
                "--online_iterations", str(online_iterations), "--eval_freq", str(args.eval_freq), "--n_episodes",
                str(args.eval_episodes), "--device", device, *[f"--{k}={v}" for k, v in config.items()],
                *args.corl_flags.split()]  # =: a value may be "-inf"

    command, done = [sys.executable, script, *flags(args.offline_updates, args.online_steps)], 0
    if args.resume_dir:  # the iterations left, from the checkpoint that did the rest
        if re.search(r"use_automatic_entropy_tuning[= ](False|false|0)\b", " ".join(command)):
            raise smac.SMACError("--resume-dir: CORL's Cal-QL cannot save a checkpoint with "
                                 "use_automatic_entropy_tuning False")
        with open(script, "rb") as f:
            identity = {"flags": command[2:], "dataset": os.path.abspath(args.dataset_path),
                        "script_sha256": hashlib.sha256(f.read()).hexdigest()}
        args.resume_dir = os.path.abspath(args.resume_dir)
        done, checkpoint = resume_point(args.resume_dir, identity)
        attempt = os.path.join(args.resume_dir, f"from-{done}")
        os.makedirs(attempt)
        left = flags(max(0, args.offline_updates - done), args.online_steps - max(0, done - args.offline_updates))
        command = [sys.executable, RESUME, script, checkpoint, *left, "--checkpoints_path", attempt]
        corl_log = os.path.join(attempt, "corl_log.jsonl")
        record["continued_at_update"] = sorted(attempt_starts(args.resume_dir))[1:]
    with open(os.path.join(run_dir, "peer_config.json"), "w") as f:
        json.dump(record, f, indent=1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SHIMS, ROOT, os.environ.get("PYTHONPATH", "")]),
           "SMAC_PEER_DATASET": os.path.abspath(args.dataset_path), "SMAC_PEER_LOG": corl_log}
    print(f"{run_name}: {' '.join(command)}", flush=True)
    start = time.time()
    with open(os.path.join(run_dir, "log.txt"), "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=args.corl_dir).returncode
    if code != 0:
        raise smac.SMACError(f"CORL's {SCRIPTS[args.algo]} failed (exit {code}); see {run_dir}/log.txt")
    seconds = time.time() - start
    if args.resume_dir:
        corl_log = os.path.join(run_dir, "corl_log.jsonl")
        merge_attempts(args.resume_dir, corl_log)

    offline, online, episodes = read_corl_log(corl_log, args.offline_updates)
    for episode in episodes:  # as the fine-tuners' episodes.csv: regret can be recomputed from it
        smac.append_csv(os.path.join(run_dir, "episodes.csv"), episode)
    train_scores = [e["normalized_score"] for e in episodes]
    for update, score in offline:
        smac.append_csv(os.path.join(run_dir, "offline_metrics.csv"), {"update": update, "normalized_score": score})
    for step, score in online:  # CORL: one update per env step from the first, so step = updates since hand-over
        smac.append_csv(os.path.join(run_dir, "metrics.csv"), {"step": step, "normalized_score": score,
                                                                "updates": step})
    summary = smac.transfer_metrics(online, train_scores, args.drop_window, args.online_steps)  # SMAC's window
    summary.update(online_steps=args.online_steps, offline_score=offline[-1][1],
                   updates_per_second=(args.offline_updates + args.online_steps - done) / seconds)
    smac.append_csv(os.path.join(run_dir, "summary.csv"), summary)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return {"run_dir": run_dir, **summary}


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except smac.SMACError as e:
        sys.exit(f"error: {e}")
