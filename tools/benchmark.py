"""Speed benchmark: offline updates per second of smac.py with and without the regularizer, of CORL's td3_bc.py on the
same data (optional), and online steps per second of sac_finetune.py (plain SAC, --score-coef 0, against CleanRL; and
its default, SMAC's penalty kept online). Configurations are interleaved over repeats
and medians reported, since this machine is noisy. Evaluation time is excluded from the offline figures.

    python tools/benchmark.py --dataset-path ../shared/datasets/hopper_medium-local.hdf5 \
        [--corl-td3-bc path/to/CORL/algorithms/offline/td3_bc.py]

CORL's file is run as it is: its ReplayBuffer and TD3_BC trainer, built as its train() builds them, on this dataset
(read with smac.load_dataset, normalized as CORL does); its d4rl, gym, pyrallis and wandb imports, used only outside
the timed loop, are replaced by empty modules (wandb.log by a no-op).
"""

import importlib.util
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sac_finetune  # noqa: E402
import smac  # noqa: E402


@dataclass
class Args:
    dataset_path: str
    """D4RL-format HDF5 file (hopper)"""
    env: str = "hopper-medium-replay-v2"
    """D4RL name of the dataset's task"""
    updates: int = 3000
    """offline updates per measurement"""
    repeats: int = 3
    """measurements per configuration, interleaved"""
    online_steps: int = 3000
    """online SAC steps to time (0 skips the online benchmark)"""
    corl_td3_bc: Optional[str] = None
    """path of CORL's algorithms/offline/td3_bc.py, to time its updates on the same data"""
    cleanrl_sac: Optional[str] = None
    """path of CleanRL's cleanrl/sac_continuous_action.py (cleanrl_utils/buffers.py beside it), to time its online
    steps against sac_finetune.py's, both updating from the first step"""
    corl_dir: Optional[str] = None
    """a CORL checkout: times its finetune/cal_ql.py and iql.py (tools/peers/run_peer.py) on the same data"""
    peer_iterations: int = 500
    """offline updates (and as many online steps) per peer measurement"""
    memory_transitions: int = 1_000_000
    """peak memory of smac.py on a generated dataset of this many transitions (D4RL medium-expert: ~2M for hopper,
    2M for halfcheetah; 0 skips)"""


def peak_memory_mb(transitions: int, folder: str) -> float:
    """Peak resident memory of a short smac.py run (CPU, SMAC defaults, 200 updates) on a generated D4RL-format
    file of `transitions` hopper transitions, measured in a fresh process."""
    import h5py

    path, rng = os.path.join(folder, "generated.hdf5"), np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        obs = rng.standard_normal((transitions + 1, 11), dtype=np.float32)
        f["observations"], f["next_observations"] = obs[:-1], obs[1:]
        f["actions"] = rng.uniform(-1, 1, (transitions, 3)).astype(np.float32)
        f["rewards"] = rng.standard_normal(transitions, dtype=np.float32)
        f["terminals"] = np.zeros(transitions, bool)
        f["timeouts"] = (np.arange(transitions) % 1000) == 999
    del obs
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "smac.py")
    subprocess.run([sys.executable, script, "--env", "hopper-medium-expert-v2", "--dataset-path", path,
                    "--total-updates", "200", "--score-model-updates", "200", "--eval-episodes", "1", "--no-cuda",
                    "--run-dir", folder], check=True, stdout=subprocess.DEVNULL)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux reports KiB


def corl_td3_bc_sps(path: str, args: Args) -> float:
    """Updates per second of CORL's TD3+BC (its own classes and update), as its train() loop runs them."""
    for name in ("d4rl", "gym", "pyrallis", "wandb"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["wandb"].log = lambda *a, **k: None
    sys.modules["gym"].Env = object  # used in a type hint only
    sys.modules["pyrallis"].wrap = lambda *a, **k: (lambda f: f)
    spec = importlib.util.spec_from_file_location("corl_td3_bc", path)
    corl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corl)
    data = smac.load_dataset(args.env, args.dataset_path)
    mean, std = corl.compute_mean_std(data["observations"], eps=1e-3)
    dataset = {"observations": corl.normalize_states(data["observations"], mean, std), "actions": data["actions"],
               "rewards": data["rewards"], "terminals": data["dones"],
               "next_observations": corl.normalize_states(data["next_observations"], mean, std)}
    obs_dim, act_dim = dataset["observations"].shape[1], dataset["actions"].shape[1]
    buffer = corl.ReplayBuffer(obs_dim, act_dim, len(dataset["rewards"]), "cpu")
    buffer.load_d4rl_dataset(dataset)
    config = corl.TrainConfig(device="cpu")
    actor, critic_1, critic_2 = corl.Actor(obs_dim, act_dim, 1.0), corl.Critic(obs_dim, act_dim), corl.Critic(obs_dim,
                                                                                                              act_dim)
    trainer = corl.TD3_BC(max_action=1.0, actor=actor, actor_optimizer=torch.optim.Adam(actor.parameters(), lr=3e-4),
                          critic_1=critic_1, critic_1_optimizer=torch.optim.Adam(critic_1.parameters(), lr=3e-4),
                          critic_2=critic_2, critic_2_optimizer=torch.optim.Adam(critic_2.parameters(), lr=3e-4),
                          discount=config.discount, tau=config.tau, device="cpu", policy_noise=config.policy_noise,
                          noise_clip=config.noise_clip, policy_freq=config.policy_freq, alpha=config.alpha)
    start = time.time()
    for _ in range(args.updates):  # the body of CORL's training loop, evaluation aside
        batch = [b.to("cpu") for b in buffer.sample(config.batch_size)]
        sys.modules["wandb"].log(trainer.train(batch), step=trainer.total_it)
    return args.updates / (time.time() - start)


CONFIGS = {  # the diffusion model's own training (--score-model-updates) is timed apart by smac.py's log
    "score-coef 0 (baseline)": dict(score_coef=0.0),
    "SMAC (defaults)": dict(),
    "SMAC, --penalty-states 64": dict(penalty_states=64),
    "SMAC, --penalty-states 32": dict(penalty_states=32),
}


def main(args: Args) -> None:
    out = tempfile.mkdtemp(prefix="smac_bench_")
    if args.memory_transitions:
        print(f"peak memory of smac.py with {args.memory_transitions} transitions (CPU, 200 updates): "
              f"{peak_memory_mb(args.memory_transitions, out):.0f} MB", flush=True)
    common = dict(env=args.env, dataset_path=args.dataset_path, total_updates=args.updates,
                  eval_freq_updates=args.updates, score_model_updates=10, eval_episodes=1, run_dir=out, cuda=False)
    sps = {name: [] for name in CONFIGS}
    if args.corl_td3_bc:
        sps["CORL td3_bc.py"] = []
    for _ in range(args.repeats):
        for name, extra in CONFIGS.items():
            sps[name].append(smac.train(smac.Args(**common, **extra))["sps"])
        if args.corl_td3_bc:
            sps["CORL td3_bc.py"].append(round(corl_td3_bc_sps(args.corl_td3_bc, args)))
    base, corl = np.median(sps["score-coef 0 (baseline)"]), np.median(sps.get("CORL td3_bc.py", [np.nan]))
    print("\n| offline configuration | updates/s (median) | all | update time vs --score-coef 0 | speed vs CORL "
          "td3_bc |\n|---|---|---|---|---|")
    for name, values in sps.items():
        print(f"| {name} | {np.median(values):.0f} | {values} | {base / np.median(values):.2f}x | "
              f"{np.median(values) / corl:.2f}x |")
    if args.online_steps:  # wall time of the whole online run, updates from the first step, two 1-episode evals
        ckpt = smac.train(smac.Args(**{**common, "total_updates": 200}))["run_dir"]
        online = {"sac_finetune.py --score-coef 0 (plain SAC)": 0.0,
                  "sac_finetune.py (defaults: the penalty, released over 15k updates)": None}
        online_sps = {**{name: [] for name in online},
                      **({"CleanRL sac_continuous_action.py": []} if args.cleanrl_sac else {})}
        for _ in range(args.repeats):
            for name, score_coef in online.items():
                start = time.time()
                sac_finetune.train(sac_finetune.Args(checkpoint=os.path.join(ckpt, "smac.pt"), learning_starts=1,
                                                     total_timesteps=args.online_steps, eval_freq=10**9,
                                                     eval_episodes=1, run_dir=out, cuda=False, score_coef=score_coef))
                online_sps[name].append(round(args.online_steps / (time.time() - start)))
            if args.cleanrl_sac:
                online_sps["CleanRL sac_continuous_action.py"].append(cleanrl_sac_sps(args.cleanrl_sac, args, out))
        cleanrl = np.median(online_sps.get("CleanRL sac_continuous_action.py", [np.nan]))
        print("\n| online SAC (Hopper-v4, batch 256, 256x256, policy delay 2) | env steps/s (median) | all | "
              "speed vs CleanRL |\n|---|---|---|---|")
        for name, values in online_sps.items():
            print(f"| {name} | {np.median(values):.0f} | {values} | {np.median(values) / cleanrl:.2f}x |")
    if args.corl_dir:  # the peers' iterations: CORL does one env step per online update, so steps/s = iterations/s
        peers = {f"CORL {algo}": [] for algo in ("iql", "calql")}
        for _ in range(args.repeats):
            for name in peers:
                peers[name].append(round(peer_sps(name.split()[1], args, out), 1))
        print("\n| CORL peer (offline update, or online env step + update) | iterations/s (median) | all |\n"
              "|---|---|---|")
        for name, values in peers.items():
            print(f"| {name} | {np.median(values):.1f} | {values} |")


def peer_sps(algo: str, args: Args, out: str) -> float:
    """Iterations per second of a CORL peer (an offline update, or an online env step with its update), from two runs
    of n and 2n iterations per phase, each evaluated once per phase (1 episode): their difference leaves out
    start-up and evaluation."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from peers import run_peer

    seconds = []
    for n in (args.peer_iterations, 2 * args.peer_iterations):
        start = time.time()
        run_peer.main(run_peer.Args(algo=algo, corl_dir=args.corl_dir, dataset_path=args.dataset_path, env=args.env,
                                    offline_updates=n, online_steps=n, eval_freq=n, eval_episodes=1, run_dir=out))
        seconds.append(time.time() - start)
    return 2 * args.peer_iterations / (seconds[1] - seconds[0])


def cleanrl_sac_sps(path: str, args: Args, out: str) -> float:
    """Env steps per second of CleanRL's SAC script run as it is, learning from its second step: its own SPS line,
    (steps so far) / (time so far), printed every 100 steps."""
    command = [sys.executable, os.path.abspath(path), "--env-id", "Hopper-v4", "--learning-starts", "1",
               "--total-timesteps", str(args.online_steps), "--no-cuda"]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(path)))}
    text = subprocess.run(command, cwd=out, env=env, check=True, capture_output=True, text=True).stdout
    return int([line for line in text.splitlines() if line.startswith("SPS:")][-1].split()[-1])


if __name__ == "__main__":
    main(tyro.cli(Args))
