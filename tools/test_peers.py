"""The peers' stand-ins and runner, without CORL: a small script makes the calls CORL's finetune scripts make."""

import csv
import glob
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TOOLS, os.path.dirname(TOOLS)]
import run_experiment  # noqa: E402
from peers import run_peer  # noqa: E402
from test_smac import write_hdf5  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is out of date")

# What CORL's algorithms/finetune/iql.py and cal_ql.py call, in the same order, with a made-up learner whose
# evaluation scores are known: offline 10, 20, ...; online the hand-over score minus 5 per evaluation, then up. Its
# trainer has Cal-QL's checkpoint calls, the swap of the temperature module in load_state_dict included.
STAND_IN = textwrap.dedent('''
    import argparse
    import json
    import os
    import uuid
    from dataclasses import dataclass

    import d4rl
    import gym
    import numpy as np
    import torch
    import wandb

    @dataclass
    class TrainConfig:  # a few of the fields CORL's scripts have (run_peer reads them from this source)
        seed: int = 0
        tau: float = 0.005
        iql_deterministic: bool = False

    class Scalar(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = torch.nn.Parameter(torch.tensor(value))

        def forward(self):
            return self.value

    class ReplayBuffer:  # CORL's fields
        def __init__(self, state_dim, action_dim, buffer_size):
            self._buffer_size, self._pointer, self._size = buffer_size, 0, 0
            self._states, self._next_states = torch.zeros(buffer_size, state_dim), torch.zeros(buffer_size, state_dim)
            self._actions = torch.zeros(buffer_size, action_dim)
            self._rewards, self._dones, self._mc_returns = (torch.zeros(buffer_size, 1) for _ in range(3))

        def add_transition(self, state, action, reward, next_state, done):
            i = self._pointer
            self._states[i], self._actions[i] = torch.as_tensor(state), torch.as_tensor(action)
            self._next_states[i], self._rewards[i], self._dones[i] = torch.as_tensor(next_state), reward, done
            self._pointer, self._size = i + 1, i + 1

    class CalQL:
        def __init__(self):
            self.log_alpha, self.log_alpha_prime, self.total_it, self.handover = Scalar(0.0), None, 0, None
            self.alpha_optimizer = torch.optim.Adam(self.log_alpha.parameters(), lr=1e-3)

        def train(self):  # a target drawn from torch's and numpy's generators, as CORL's minibatches and actions are
            self.alpha_optimizer.zero_grad()
            ((self.log_alpha() - 1.0 - 0.1 * torch.randn(()) - 0.1 * np.random.randn()) ** 2).backward()
            self.alpha_optimizer.step()
            self.total_it += 1

        def state_dict(self):
            return {"sac_log_alpha": self.log_alpha, "sac_log_alpha_optim": self.alpha_optimizer.state_dict(),
                    "cql_log_alpha": self.log_alpha_prime, "total_it": self.total_it, "handover": self.handover}

        def load_state_dict(self, state_dict):
            self.log_alpha = state_dict["sac_log_alpha"]
            self.alpha_optimizer.load_state_dict(state_dict["sac_log_alpha_optim"])
            self.log_alpha_prime = state_dict["cql_log_alpha"]
            self.total_it, self.handover = state_dict["total_it"], state_dict["handover"]

    def train():
        parser = argparse.ArgumentParser()  # CORL parses these with pyrallis
        for flag in ("env", "device", "checkpoints_path"):
            parser.add_argument(f"--{flag}")
        for flag in ("seed", "offline_iterations", "online_iterations", "eval_freq", "n_episodes"):
            parser.add_argument(f"--{flag}", type=int)
        config, from_dataset_config = parser.parse_known_args()
        json.dump(from_dataset_config, open("received_flags.json", "w"))
        env, eval_env = gym.make(config.env), gym.make(config.env)
        max_steps = env._max_episode_steps
        dataset = d4rl.qlearning_dataset(env)
        mean, std = dataset["observations"].mean(0), dataset["observations"].std(0) + 1e-3
        env = gym.wrappers.TransformObservation(env, lambda s: (s - mean) / std)
        env = gym.wrappers.TransformReward(env, lambda r: r)
        eval_env = gym.wrappers.TransformObservation(eval_env, lambda s: (s - mean) / std)
        env.seed(config.seed)
        eval_env.seed(0)
        online_buffer = ReplayBuffer(env.observation_space.shape[0], env.action_space.shape[0], 10_000)
        torch.manual_seed(config.seed)  # CORL's set_seed, before the trainer is built
        np.random.seed(config.seed)
        trainer = CalQL()
        if config.checkpoints_path:  # as CORL's TrainConfig does
            config.checkpoints_path = os.path.join(config.checkpoints_path, f"stand-in-{uuid.uuid4().hex[:8]}")
            os.makedirs(config.checkpoints_path)
        wandb.init(config=vars(config), project="CORL", group="stand-in", name="stand-in", id="x")
        wandb.run.save()
        state, done, episode_return, episode_step = env.reset(), False, 0.0, 0
        assert state.shape == env.observation_space.shape and abs(float(state.mean())) < 10
        for t in range(config.offline_iterations + config.online_iterations):
            online_log = {}
            if t == config.offline_iterations and trainer.handover is None:  # as CORL's switch_calibration
                trainer.handover = trainer.total_it
            if t >= config.offline_iterations:
                episode_step += 1
                action = np.zeros(env.action_space.shape)
                next_state, reward, done, info = env.step(action)
                online_buffer.add_transition(state, action, reward, next_state, done)
                state = next_state
                episode_return += reward
                if done:
                    online_log["train/d4rl_normalized_episode_return"] = 100 * eval_env.get_normalized_score(
                        episode_return)
                    state, done, episode_return, episode_step = env.reset(), False, 0.0, 0
            trainer.train()
            if trainer.total_it == int(os.environ.get("STAND_IN_KILLED_AT", -1)):
                os._exit(9)
            wandb.log({"loss": 1.0, **online_log}, step=trainer.total_it)
            if (t + 1) % config.eval_freq == 0:
                evals = trainer.total_it // config.eval_freq
                handover_evals = (trainer.handover or 10**9) // config.eval_freq
                score = (10.0 * evals if evals <= handover_evals
                         else 10.0 * handover_evals - 5.0 * (evals - handover_evals))
                wandb.log({"eval/d4rl_normalized_score": score, "eval/log_alpha": trainer.log_alpha().item(),
                           "eval/online_transitions": online_buffer._size},
                          step=trainer.total_it)
                if config.checkpoints_path:
                    torch.save(trainer.state_dict(), os.path.join(config.checkpoints_path, f"checkpoint_{t}.pt"))

    if __name__ == "__main__":
        train()
''')


@pytest.fixture
def corl_dir(tmp_path):
    folder = tmp_path / "corl" / "algorithms" / "finetune"
    folder.mkdir(parents=True)
    for script in ("iql.py", "cal_ql.py"):
        (folder / script).write_text(STAND_IN)
    return tmp_path / "corl"


def test_the_stand_ins_give_the_old_gym_api_and_smacs_data(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(run_peer.SHIMS)
    dataset = write_hdf5(tmp_path / "d.hdf5")
    monkeypatch.setenv("SMAC_PEER_DATASET", str(dataset))
    monkeypatch.setenv("SMAC_PEER_LOG", str(tmp_path / "log.jsonl"))
    import d4rl
    import gym
    import wandb

    env = gym.make("hopper-medium-v2")
    data = d4rl.qlearning_dataset(env)
    smac_data = run_peer.smac.load_dataset("hopper-medium-v2", str(dataset))
    np.testing.assert_array_equal(data["observations"], smac_data["observations"])
    np.testing.assert_array_equal(data["terminals"], smac_data["dones"])  # the same transitions, timeouts included
    env.seed(3)  # the first call seeds the next reset only (the training env's stream)
    reference = run_peer.smac.make_env(smac_data["task"], 0.0, 1.0)
    np.testing.assert_array_equal(env.reset(), reference.reset(seed=3)[0])
    assert not np.array_equal(env.reset(), reference.reset(seed=3)[0])
    for _ in range(2):  # every later call (CORL's eval_actor): episodes reset with seeds 0, 1, ... (smac.evaluate's)
        env.seed(7)
        for i in range(3):
            np.testing.assert_array_equal(env.reset(), reference.reset(seed=i)[0])
    obs, reward, done, info = env.step(np.zeros(3))
    assert obs.shape == (11,) and isinstance(reward, float) and isinstance(done, bool)
    assert env._max_episode_steps == 1000 and env.get_normalized_score(3234.3) == pytest.approx(1.0)
    wrapped = gym.wrappers.TransformReward(gym.wrappers.TransformObservation(env, lambda s: s * 0), lambda r: 2 * r)
    assert not wrapped.reset().any() and wrapped.get_normalized_score(-20.272305) == pytest.approx(0.0)
    wandb.init(config={})
    wandb.log({"loss": 1.0}, step=1)
    wandb.log({"eval/d4rl_normalized_score": np.float32(5.0)}, step=2)
    assert [json.loads(line) for line in open(tmp_path / "log.jsonl")] == [
        {"step": 2, "eval/d4rl_normalized_score": 5.0}]  # losses are left out


def test_a_peer_run_is_measured_with_smacs_metrics(tmp_path, corl_dir):
    dataset = write_hdf5(tmp_path / "d.hdf5")
    result = run_peer.main(run_peer.Args(algo="iql", corl_dir=str(corl_dir), dataset_path=str(dataset),
                                         env="hopper-medium-v2", offline_updates=300, online_steps=500, eval_freq=100,
                                         run_dir=str(tmp_path / "runs")))
    with open(os.path.join(result["run_dir"], "metrics.csv")) as f:
        rows = [(int(r["step"]), float(r["normalized_score"])) for r in csv.DictReader(f)]
    assert rows == [(0, 30.0), (100, 25.0), (200, 20.0), (300, 15.0), (400, 10.0), (500, 5.0)]
    assert result["step0_score"] == 30.0 and result["drop"] == 25.0 and result["final_score"] == 5.0
    with open(os.path.join(result["run_dir"], "corl_log.jsonl")) as f:
        train = [e["train/d4rl_normalized_episode_return"] for e in map(json.loads, f)
                 if "train/d4rl_normalized_episode_return" in e]
    assert len(train) > 0 and result["regret"] == pytest.approx(np.mean([1 - s / 100 for s in train]))
    with open(os.path.join(result["run_dir"], "episodes.csv")) as f:  # the training episodes, as the fine-tuners'
        assert [float(r["normalized_score"]) for r in csv.DictReader(f)] == pytest.approx(train, rel=1e-4)
    assert "score_10k" not in result and result["online_steps"] == 500  # budget scores: the runner's, from the curve
    with pytest.raises(run_peer.smac.SMACError, match="must divide"):
        run_peer.main(run_peer.Args(algo="iql", corl_dir=str(corl_dir), dataset_path=str(dataset),
                                    offline_updates=250, eval_freq=100))
    with pytest.raises(run_peer.smac.SMACError, match="no algorithms/finetune/spot.py"):
        run_peer.main(run_peer.Args(algo="spot", corl_dir=str(corl_dir), dataset_path=str(dataset)))
    out = subprocess.run([sys.executable, "tools/peers/run_peer.py", "--algo", "iql", "--corl-dir", str(tmp_path),
                          "--dataset-path", str(dataset)], capture_output=True, text=True, cwd=os.path.dirname(TOOLS))
    assert out.returncode != 0 and out.stderr.startswith("error: --corl-dir") and "Traceback" not in out.stderr


def test_a_calql_run_cut_short_continues_from_its_checkpoints_as_the_uncut_run(tmp_path, corl_dir, monkeypatch):
    dataset = write_hdf5(tmp_path / "d.hdf5")

    def run(**kwargs):
        return run_peer.main(run_peer.Args(algo="calql", corl_dir=str(corl_dir), dataset_path=str(dataset),
                                           env="hopper-medium-v2", offline_updates=300, online_steps=500, eval_freq=100,
                                           run_dir=str(tmp_path / "runs"), **kwargs))

    def log(result):
        with open(os.path.join(result["run_dir"], "corl_log.jsonl")) as f:
            return [json.loads(line) for line in f]

    uncut, resume = run(), tmp_path / "resume"
    for killed_at in (250, 450):  # offline: continues from update 200; online (hand-over at 300): from 400
        monkeypatch.setenv("STAND_IN_KILLED_AT", str(killed_at))
        with pytest.raises(run_peer.smac.SMACError, match="failed"):
            run(resume_dir=str(resume))
    monkeypatch.delenv("STAND_IN_KILLED_AT")
    cut = run(resume_dir=str(resume))
    assert json.load(open(os.path.join(cut["run_dir"], "peer_config.json")))["continued_at_update"] == [200, 400]
    assert [e for e in log(cut) if e["step"] <= 400] == [e for e in log(uncut) if e["step"] <= 400]
    evaluations = [[e for e in log(run) if "eval/log_alpha" in e] for run in (cut, uncut)]
    assert evaluations[0] == evaluations[1]  # the temperature learning on, the online data kept, after each start
    assert evaluations[0][-1]["eval/log_alpha"] > 0.5 and evaluations[0][-1]["eval/online_transitions"] == 500
    assert not resume.exists() and cut["offline_score"] == uncut["offline_score"] and cut["train_episodes"] > 0
    with pytest.raises(run_peer.smac.SMACError, match="only Cal-QL"):
        run_peer.main(run_peer.Args(algo="iql", corl_dir=str(corl_dir), dataset_path=str(dataset),
                                    resume_dir=str(resume)))
    with pytest.raises(run_peer.smac.SMACError, match="not a folder this user can write to"):
        run(resume_dir=str(dataset / "resume"))
    with pytest.raises(run_peer.smac.SMACError, match="cannot save a checkpoint"):  # CORL's state_dict would fail
        run(resume_dir=str(resume), corl_flags="--use_automatic_entropy_tuning False")


def test_a_run_continues_from_its_latest_whole_evaluated_checkpoint_of_the_same_command(tmp_path):
    import torch

    def write(attempt, t, whole=True, evaluated=True):
        os.makedirs(folder / attempt / "a", exist_ok=True)
        path = folder / attempt / "a" / f"checkpoint_{t}.pt"
        torch.save({}, path) if whole else path.write_bytes(b"PK\x03\x04 cut off while written")
        if evaluated:
            with open(folder / attempt / "corl_log.jsonl", "a") as f:
                f.write(json.dumps({"step": int(attempt[5:]) + t + 1, "eval/d4rl_normalized_score": 1.0}) + "\n")

    folder, command = tmp_path / "resume", {"flags": ["--seed", "1"]}
    folder.mkdir()
    (folder / "command.json").write_text(json.dumps(command))
    for t in (99, 199, 299):
        write("from-0", t)
    write("from-0", 399, whole=False)
    write("from-300", 99)  # began at the hand-over (300 updates) and was cut online
    assert run_peer.resume_point(str(folder), command) == (400, str(folder / "from-300" / "a" / "checkpoint_99.pt"))
    assert sorted(os.listdir(folder)) == ["command.json", "from-0", "from-300"] and not os.listdir(
        folder / "from-0" / "a")
    write("from-400", 99, evaluated=False)  # killed between CORL's checkpoint and the evaluation it logs after it
    assert run_peer.resume_point(str(folder), command)[0] == 400 and not (folder / "from-400").exists()
    write("from-300", 99, whole=False)
    with open(folder / "from-300" / "corl_log.jsonl", "a") as f:
        f.write('{"step": 401, "eval/d4')  # a line cut off by a kill
    assert run_peer.resume_point(str(folder), command) == (0, "")
    assert os.listdir(folder) == ["command.json"]
    write("from-0", 99)
    for other in ({"flags": ["--seed", "2"]}, "not json"):
        (folder / "command.json").write_text(json.dumps(other) if isinstance(other, dict) else other)
        with pytest.raises(run_peer.smac.SMACError, match="another command"):
            run_peer.resume_point(str(folder), command)
        assert (folder / "from-0" / "a" / "checkpoint_99.pt").is_file()  # refused, nothing removed
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    with pytest.raises(run_peer.smac.SMACError, match="not a resume folder"):
        run_peer.resume_point(str(tmp_path / "mine"), command)


def test_corls_config_for_the_dataset_name_is_applied_where_it_has_one_and_recorded(tmp_path, corl_dir):
    dataset = write_hdf5(tmp_path / "d.hdf5")
    folder = corl_dir / "configs" / "offline" / "iql" / "hopper"
    folder.mkdir(parents=True)
    (folder / "medium_v2.yaml").write_text("tau: 0.001\niql_deterministic: true\nseed: 0\nmax_timesteps: 1000000\n"
                                           "env: hopper-medium-v2\nnot_a_flag_of_the_script: 5\n")
    for algo, use_config, applied in (("iql", True, {"tau": 0.001, "iql_deterministic": True}),
                                      ("iql", False, {}), ("calql", True, {})):  # CORL has no cql config here
        result = run_peer.main(run_peer.Args(algo=algo, corl_dir=str(corl_dir), dataset_path=str(dataset),
                                             env="hopper-medium-v2", offline_updates=100, online_steps=100,
                                             eval_freq=100, dataset_config=use_config, run_dir=str(tmp_path / "runs")))
        record = json.loads(open(os.path.join(result["run_dir"], "peer_config.json")).read())
        assert record["applied"] == applied and json.load(open(corl_dir / "received_flags.json")) == [
            f"--{k}={v}" for k, v in applied.items()]  # the script got exactly these, the seed stays the run's
        assert record["config_file"] == ("configs/offline/iql/hopper/medium_v2.yaml" if applied else None)


def test_the_runner_puts_peers_and_online_methods_beside_smac(tmp_path, corl_dir):
    dataset = write_hdf5(tmp_path / "tiny-local.hdf5", n=600)
    args = run_experiment.Args(
        name="tiny", tasks=[f"hopper-medium-v2:{dataset}"], seeds=[1], offline_updates=100, online_steps=300,
        offline_eval_freq=20, online_eval_freq=100, eval_episodes=1, workers=2, finetuners=["sac"],
        methods=["smac", "smac-anchor", "smac-plain"], peers=["iql", "calql"], corl_dir=str(corl_dir),
        smac_flags="--hidden-dim 32 --batch-size 32 --no-cuda --score-model-updates 20",
        finetune_flags="--batch-size 32 --learning-starts 100 --no-cuda --score-release-updates 100 "
                       "--score-coef-final 0.1",
        results_dir=str(tmp_path / "results"), run_root=str(tmp_path / "runs"))
    assert run_experiment.main(args) == 0
    with open(tmp_path / "results" / "tiny" / "summary.csv") as f:
        rows = {(r["method"], r["finetuner"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("smac", "sac"), ("smac-anchor", "sac"), ("smac-plain", "sac"), ("iql", "own"),
                         ("calql", "own")}
    assert rows["iql", "own"]["step0_score"] == rows["iql", "own"]["offline_score"] == "10.0000"
    smac_rows = [rows[m, "sac"] for m in ("smac", "smac-anchor", "smac-plain")]
    assert len({r["offline_score"] for r in smac_rows}) == 1  # one SMAC checkpoint, three online methods
    assert len({r["final_score"] for r in smac_rows}) > 1
    committed = sorted(os.path.relpath(p, tmp_path / "results" / "tiny" / "finished") for p in glob.glob(
        str(tmp_path / "results" / "tiny" / "finished" / "**" / "episodes.csv"), recursive=True))
    assert len(committed) == 5 and any("iql" in p for p in committed)  # each online run's and peer's episodes
    configs = glob.glob(str(tmp_path / "results" / "tiny" / "finished" / "**" / "peer_config.json"), recursive=True)
    assert sorted(json.load(open(p))["config_file"] is None for p in configs) == [True, True]  # each peer's, kept
    table = (tmp_path / "results" / "tiny" / "table.md").read_text()
    assert "| tiny-local | own | iql | 1 |" in table and "score_30k" in table
    assert (tmp_path / "results" / "tiny" / "tiny-local_sac.png").stat().st_size > 0
    with pytest.raises(run_experiment.smac.SMACError, match="--peers needs --corl-dir"):
        run_experiment.main(run_experiment.Args(**{**vars(args), "corl_dir": None}))
