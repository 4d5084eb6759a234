"""Tests for SMAC. They make their own small data; run with `python -m pytest -q` (CPU, a few minutes)."""

import csv
import fcntl
import functools
import glob
import http.server
import math
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import hashlib
import json
import urllib.parse

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import smac

OBS_DIM, ACT_DIM = 11, 3  # Hopper-v4
os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the real hub (a subprocess test points it at a local one)
torch.set_num_threads(1)  # small networks: one thread is as fast, and immune to a busy machine's oversubscription
pytestmark = pytest.mark.filterwarnings("ignore:.*is out of date")  # v4 on purpose: the model of D4RL's v3 envs


# ---------------------------------------------------------------- helpers
def write_hdf5(path, n=400, obs_dim=OBS_DIM, act_dim=ACT_DIM, seed=0, drop=None, **override):
    """A small D4RL-format file: random transitions, an episode end every 100 steps."""
    rng = np.random.default_rng(seed)
    data = {
        "observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "next_observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "terminals": (np.arange(n) % 100 == 49),
        "timeouts": (np.arange(n) % 100 == 99),
    }
    data["actions"][::7] = 1.0  # saturated actions, as in real data
    data.update(override)
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            if key != drop:
                f[key] = value
    return path


def small_args(tmp_path, dataset, **kw):
    base = dict(env="hopper-medium-v2", dataset_path=dataset and str(dataset), total_updates=30, batch_size=32,
                hidden_dim=32, eval_freq=max(1, kw.get("total_updates", 30)), eval_episodes=1, cuda=False,
                run_dir=str(tmp_path / "runs"), score_model_updates=20)
    return smac.Args(**{**base, **kw})


# ---------------------------------------------------------------- the method
def test_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    mean, log_std = torch.randn(8, ACT_DIM), 0.3 * torch.randn(8, ACT_DIM)
    torch.manual_seed(1)
    actions, log_pi = smac.tanh_gaussian_sample(mean, log_std)
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()), [torch.distributions.TanhTransform()]
    )
    expected = dist.log_prob(actions.clamp(-0.99999, 0.99999)).sum(-1)
    torch.testing.assert_close(log_pi, expected, rtol=1e-3, atol=1e-3)


def test_twin_critic_equals_two_separate_mlps_and_action_grad_equals_finite_differences():
    torch.manual_seed(0)
    critic = smac.TwinCritic(OBS_DIM, ACT_DIM, 64).double()
    obs, actions = torch.randn(40, OBS_DIM).double(), (torch.rand(40, ACT_DIM) * 2 - 1).double()
    separate = torch.stack([q(torch.cat([obs, actions], -1)).squeeze(-1) for q in critic.qs])
    torch.testing.assert_close(critic(obs, actions), separate)
    grad = smac.critic_action_grad(critic, obs, actions)
    assert grad.shape == (2, 40, ACT_DIM)
    for j in range(ACT_DIM):
        step = torch.zeros_like(actions)
        step[:, j] = 1e-6
        fd = (critic(obs, actions + step) - critic(obs, actions - step)) / 2e-6
        torch.testing.assert_close(grad[..., j], fd, rtol=1e-4, atol=1e-6)


def train_score_model(obs, actions, w, updates=1500, seed=0):
    torch.manual_seed(seed)
    model = smac.ScoreModel(obs.shape[1], actions.shape[1], 64, steps=5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(updates):
        idx = torch.randint(0, len(obs), (256,))
        loss = model.loss(obs[idx], actions[idx], w[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_score_model_at_k1_points_along_the_data_score_and_follows_the_return():
    """Data with a known score: a ~ N(mu(s, w), sigma^2), mu = 0.4 s_0 + 0.5 (2w - 1), w in {0, 1}. Blurred by the
    first noise step it is N(mu, sigma^2 + (1 - abar) / abar), whose score the model must give; it points along the
    data's own score -(a - mu) / sigma^2 everywhere (same centre, a wider spread)."""
    g = torch.Generator().manual_seed(0)
    n, sigma = 20000, 0.15
    obs = torch.randn(n, 2, generator=g)
    w = torch.randint(0, 2, (n, 1), generator=g).float()
    mu = 0.4 * obs[:, :1] + 0.5 * (2 * w - 1)
    actions = (mu + sigma * torch.randn(n, 1, generator=g)).clamp(-1, 1)
    model = train_score_model(obs, actions, w)
    alpha_bar = model.alpha_bars[0]
    q_obs = torch.randn(2000, 2, generator=g)
    q_actions = torch.rand(2000, 1, generator=g) * 2 - 1
    for w_value in (0.0, 1.0):
        q_w = torch.full((2000, 1), w_value)
        q_mu = 0.4 * q_obs[:, :1] + 0.5 * (2 * q_w - 1)
        true = -(q_actions - q_mu) / (sigma**2 + (1 - alpha_bar) / alpha_bar)
        with torch.no_grad():
            est = model.score(q_obs, q_actions, q_w)
        assert F.cosine_similarity(est.T, true.T).item() > 0.95  # same field, up to a scale
        assert (est - true).abs().mean() < 0.3 * true.abs().mean()  # and the scale -eps / sqrt(1 - abar_1) is right
        data_score = -(q_actions - q_mu) / sigma**2
        far = (q_actions - q_mu).abs() > 0.1  # the sign right wherever the model can tell (not at the mode itself)
        assert (est[far].sign() == data_score[far].sign()).float().mean() > 0.97
    # the return matters: at w = 1 the score at a = 0 points up (toward +0.5), at w = 0 down
    zero, s0 = torch.zeros(500, 1), torch.zeros(500, 2)
    with torch.no_grad():
        assert model.score(s0, zero, torch.ones(500, 1)).mean() > 1.0 > -1.0 > model.score(s0, zero, zero).mean()


class LogDensityCritic(nn.Module):
    """Q_i(s, a) = c * log N(a; mu(s), sigma^2) + f(s): a critic whose action-gradient is c times a known score."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, obs, actions):
        return self.c * (-0.5 * ((actions - obs[..., :ACT_DIM]) / 0.3) ** 2).sum(-1) + obs.sin().sum(-1)


class GaussianScore:
    def score(self, obs, actions, w):
        return -(actions - obs[:, :ACT_DIM]) / 0.09


def test_penalty_vanishes_when_grad_q_is_a_multiple_of_the_data_score_and_trains_only_critic_and_scale():
    torch.manual_seed(0)
    obs, actions, w = torch.randn(64, OBS_DIM), torch.rand(64, ACT_DIM) * 2 - 1, torch.ones(64, 1)
    scale = smac.ScoreScale(OBS_DIM, 16, init=0.7)
    residual, grad_q, _ = smac.score_matching_residual(LogDensityCritic(0.7), scale, GaussianScore(), obs, actions, w)
    assert smac.score_matching_loss(residual) < 1e-8 * grad_q.pow(2).sum()
    residual, _, _ = smac.score_matching_residual(LogDensityCritic(2.0), scale, GaussianScore(), obs, actions, w)
    assert smac.score_matching_loss(residual) > 1.0
    # the penalty's gradient reaches the critic and alpha_psi, never the score model (a fixed target) or the actor
    actor, critic = smac.Actor(OBS_DIM, ACT_DIM, 32), smac.TwinCritic(OBS_DIM, ACT_DIM, 32)
    score_model = smac.ScoreModel(OBS_DIM, ACT_DIM, 32)
    mean, log_std = actor(obs)
    actions = smac.penalty_actions(mean, log_std)
    residual, _, _ = smac.score_matching_residual(critic, scale, score_model, obs, actions, w)
    smac.score_matching_loss(residual).backward()
    assert all(p.grad is None for p in [*actor.parameters(), *score_model.parameters()])
    for module in (critic, scale):
        assert sum(p.grad.abs().sum() for p in module.parameters() if p.grad is not None) > 0


def test_penalty_actions_are_half_policy_samples_half_uniform():
    torch.manual_seed(0)
    mean, log_std = torch.full((20000, ACT_DIM), 0.3), torch.full((20000, ACT_DIM), -4.0)  # policy: a ~= tanh(0.3)
    actions = smac.penalty_actions(mean, log_std)
    near_policy = ((actions - math.tanh(0.3)).abs() < 0.1).all(-1).float().mean().item()
    assert 0.49 < near_policy < 0.51 + 0.001  # half from the policy (+ the few uniform ones that land there)
    assert actions.min() >= -1 and actions.max() <= 1 and (actions < 0).float().mean() > 0.2


def test_episode_return_w_is_each_transitions_episode_return_normalized(tmp_path):
    rewards = np.ones(400, np.float32)
    rewards[100:200] = 3.0  # episodes: [0,50) terminal, [50,100) timeout, [100,150), [150,200), ... of 50 steps
    w = smac.episode_return_w(smac.load_dataset("hopper-medium-v2", str(write_hdf5(tmp_path / "d.hdf5",
                                                                                   rewards=rewards))))
    assert w[0] == w[49] == 0.0 and w[100] == w[199] == 1.0 and len(np.unique(w)) == 2


def test_gaussian_kl():
    p, q = torch.distributions.Normal(0.2, 0.5), torch.distributions.Normal(-0.1, 0.8)
    expected = torch.distributions.kl_divergence(p, q) * ACT_DIM
    full = lambda v: torch.full((1, ACT_DIM), float(v))  # noqa: E731
    kl = smac.gaussian_kl(full(0.2), full(math.log(0.5)), full(-0.1), full(math.log(0.8)))
    torch.testing.assert_close(kl, expected.reshape(1))


# ---------------------------------------------------------------- D4RL data
def test_names_urls_and_scores():
    assert smac.dataset_url("hopper-medium-replay-v2").endswith("gym_mujoco_v2/hopper_medium_replay-v2.hdf5")
    assert smac.make_env(smac.d4rl_task("walker2d-expert-v2"), 0.0, 1.0).spec.id == "Walker2d-v4"
    assert smac.normalized_score(smac.d4rl_task("hopper-medium-v2"), 3234.3) == pytest.approx(100.0)
    assert smac.normalized_score(smac.d4rl_task("halfcheetah-medium-v2"), -280.178953) == pytest.approx(0.0)
    assert len(smac.D4RL_NAMES) == 15


def test_loader_reads_d4rl_layout_and_timeouts_are_not_terminal(tmp_path):
    path = write_hdf5(tmp_path / "d.hdf5")
    data = smac.load_dataset("hopper-medium-v2", str(path))
    assert data["observations"].shape == (400, OBS_DIM) and data["actions"].shape == (400, ACT_DIM)
    assert data["dones"][49] == 1 and data["dones"][99] == 0 and data["dones"].sum() == 4
    with h5py.File(path) as f:
        np.testing.assert_array_equal(data["rewards"], f["rewards"][()])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(drop="rewards"), "lacks the D4RL key"),
        (dict(rewards=np.zeros(399, np.float32)), "different lengths"),
        (dict(rewards=np.full(400, np.nan, np.float32)), "NaN or inf"),
        (dict(obs_dim=5), "observations has shape"),
        (dict(act_dim=6), "actions has shape"),
    ],
)
def test_bad_dataset_files_give_one_clear_error(tmp_path, change, message):
    path = write_hdf5(tmp_path / "bad.hdf5", **change)
    with pytest.raises(smac.SMACError, match=message):
        smac.load_dataset("hopper-medium-v2", str(path))


def test_unknown_env_lists_the_valid_names():
    with pytest.raises(smac.SMACError, match="hopper.*medium-replay.*-v2 or a Minari id such as mujoco/hopper/medium-v0"
                       ) as err:
        smac.check_env_name("hopper-mediun-v2")
    assert len(str(err.value)) < 200  # one line a terminal shows whole
    assert smac.check_env_name("mujoco/hopper/medium-v0") == "mujoco/hopper/medium-v0"


# ---------------------------------------------------------------- Minari data
@pytest.fixture
def minari_dataset(tmp_path, monkeypatch):
    """A small Minari dataset of Hopper-v4 episodes, made with minari's own tools in a temporary
    MINARI_DATASETS_PATH, with made-up reference scores; nothing is downloaded."""
    import minari
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("MINARI_REMOTE", "hf://127.0.0.1-no-such-remote")  # a missing id must not reach a network
    env, rng, episodes = smac.gym.make("Hopper-v4"), np.random.default_rng(0), []
    for i in range(6):
        obs, _ = env.reset(seed=i)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        for t in range(60):
            action = rng.uniform(-1, 1, 3).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs), actions.append(action), rewards.append(reward)
            terminations.append(terminated), truncations.append(truncated or (t == 59 and not terminated))
            if terminations[-1] or truncations[-1]:
                break
        episodes.append(EpisodeBuffer(id=i, observations=np.array(observations), actions=np.array(actions),
                                      rewards=np.array(rewards), terminations=np.array(terminations),
                                      truncations=np.array(truncations)))
    minari.create_dataset_from_buffers("mujoco/hopper/tiny-v0", episodes, env="Hopper-v4", eval_env="Hopper-v4",
                                       ref_min_score=-100.0, ref_max_score=900.0, algorithm_name="uniform")
    return "mujoco/hopper/tiny-v0", episodes


def test_minari_dataset_trains_and_the_fine_tuner_needs_nothing_else(tmp_path, minari_dataset):
    name, episodes = minari_dataset
    data = smac.load_dataset(name, None)
    first = episodes[0]
    np.testing.assert_allclose(data["observations"][: len(first.actions)], first.observations[:-1], rtol=1e-6)
    np.testing.assert_allclose(data["next_observations"][: len(first.actions)], first.observations[1:], rtol=1e-6)
    assert len(data["rewards"]) == sum(len(e.actions) for e in episodes)
    assert data["dones"].sum() == sum(e.terminations.sum() for e in episodes)  # truncations are not terminal
    assert data["task"]["ref_scores"] == [-100.0, 900.0]
    assert smac.normalized_score(data["task"], 400.0) == pytest.approx(50.0)  # the dataset's own references

    result = smac.train(small_args(tmp_path, None, env=name))
    ckpt, actor, _, _ = smac.load_checkpoint(os.path.join(result["run_dir"], "smac.pt"), torch.device("cpu"))
    assert ckpt["env"] == name and ckpt["task"] == data["task"]
    env = smac.make_env(ckpt["task"], ckpt["obs_mean"].numpy(), ckpt["obs_std"].numpy())
    (episode_return,) = smac.evaluate(actor, env, 1, torch.device("cpu"))
    assert env.spec.id == "Hopper-v4" and result["normalized_score"] == pytest.approx((episode_return + 100) / 10)

    online = sac_finetune.train(online_args(sac_finetune, tmp_path, os.path.join(result["run_dir"], "smac.pt"),
                                            eval_episodes=1))
    assert online["step0_score"] == pytest.approx(result["normalized_score"], abs=1e-3)


def test_minari_problems_give_one_clear_error(tmp_path, minari_dataset):
    name, _ = minari_dataset
    with pytest.raises(smac.SMACError, match="--dataset-path is for D4RL-format files"):
        smac.load_dataset(name, str(tmp_path / "x.hdf5"))
    with pytest.raises(smac.SMACError, match="cannot load the Minari dataset mujoco/hopper/absent-v0"):
        smac.load_dataset("mujoco/hopper/absent-v0", None)


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The few Hugging Face Hub routes that minari's download uses, serving dataset repos from server.root: the hub
    client is pointed at it with $HF_ENDPOINT, minari with $MINARI_REMOTE=hf://farama-minari."""

    def send(self, code, body=b"", headers=()):
        self.send_response(code)
        for key, value in [("Content-Length", str(len(body))), *headers]:
            self.send_header(key, value)
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def json(self, obj):
        self.send(200, json.dumps(obj).encode(), [("Content-Type", "application/json")])

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        root, url, sha = self.server.root, urllib.parse.urlparse(self.path), "0" * 40
        parts = url.path.strip("/").split("/")
        repo = os.path.join(root, *parts[3:4]) if parts[:2] == ["api", "datasets"] else ""
        files = [os.path.join(d, f) for d, _, names in os.walk(repo) for f in names] if repo else []
        if parts == ["api", "datasets"]:  # list_datasets(author=..., search=...)
            query = urllib.parse.parse_qs(url.query)
            self.json([{"id": f"{query['author'][0]}/{r}", "_id": r, "private": False, "tags": []}
                       for r in sorted(os.listdir(root)) if query.get("search", [""])[0] in r])
        elif parts[4:5] == ["revision"]:  # snapshot_download: the repo's commit
            self.json({"id": "/".join(parts[2:4]), "sha": sha, "siblings": []})
        elif parts[4:5] == ["tree"]:  # ... and its files
            self.json([{"type": "file", "path": os.path.relpath(f, repo), "size": os.path.getsize(f), "oid": sha}
                       for f in files])
        elif parts[0] == "datasets" and parts[3] == "resolve":  # /datasets/{author}/{repo}/resolve/{rev}/{path}
            path = os.path.join(root, parts[2], *parts[5:])
            if not os.path.isfile(path):
                return self.send(404, b"", [("X-Error-Code", "EntryNotFound")])
            body = open(path, "rb").read()
            self.send(200, body, [("ETag", f'"{hashlib.sha1(body).hexdigest()}"'), ("X-Repo-Commit", sha)])
        else:
            self.send(404, b"", [("X-Error-Code", "RepoNotFound")])

    def log_message(self, *args):
        pass


def test_minari_downloads_from_a_hub_unknown_ids_and_a_missing_extra_are_told_apart(tmp_path, minari_dataset):
    """minari_dataset's folder becomes the hub's repo farama-minari/mujoco (with the namespace metadata an upload
    writes); a fresh process with an empty $MINARI_DATASETS_PATH downloads it through minari and trains on it."""
    name, _ = minari_dataset
    hub_root = tmp_path / "hub"
    shutil.copytree(tmp_path / "minari", hub_root)
    namespace = json.loads((hub_root / "mujoco" / "namespace_metadata.json").read_text())
    namespace.update(datasets=[name], namespaces=["mujoco/hopper"])
    (hub_root / "mujoco" / "namespace_metadata.json").write_text(json.dumps(namespace))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.root = str(hub_root)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "0", "MINARI_REMOTE": "hf://farama-minari",
           "MINARI_DATASETS_PATH": str(tmp_path / "home" / ".minari" / "ds"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}

    def load(dataset_id, block_hub_client=False):
        code = ("import sys, smac\n" + ("sys.modules['huggingface_hub'] = None\n" if block_hub_client else "") +
                "try:\n    print(len(smac.load_dataset(sys.argv[1], None)['rewards']))\n"
                "except smac.SMACError as e:\n    print('error:', e)")
        return subprocess.run([sys.executable, "-c", code, dataset_id], capture_output=True, text=True, env=env,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=120).stdout.splitlines()[-1]

    missing_extra = load(name, block_hub_client=True)
    assert "downloading it needs huggingface_hub: pip install 'minari[hf]'" in missing_extra
    unknown = load("mujoco/hopper/absent-v0")
    assert "unknown Minari dataset mujoco/hopper/absent-v0" in unknown and "hf://farama-minari" in unknown
    assert not (tmp_path / "home").exists()  # the failed loads left no empty dataset folders
    transitions = str(sum(len(e.actions) for e in minari_dataset[1]))
    assert load(name) == transitions  # downloaded, then read
    assert (tmp_path / "home" / ".minari" / "ds" / "mujoco" / "hopper" / "tiny-v0" / "data" / "main_data.hdf5").exists()
    server.shutdown()
    assert load(name) == transitions  # from now on read from disk, with the hub gone


class HalfThenClose(http.server.SimpleHTTPRequestHandler):
    """Announces the whole file, sends half of it, and closes the connection."""

    def do_GET(self):
        body = (self.server.served / os.path.basename(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture(params=["whole", "half"])
def http_server(tmp_path, monkeypatch, request):
    """A real HTTP server on 127.0.0.1 serving tmp_path/served (or half of each file), set as $D4RL_URL, with
    an empty cache folder that does not exist yet as $D4RL_DATASET_DIR."""
    served = tmp_path / "served"
    served.mkdir()
    handler = (functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
               if request.param == "whole" else HalfThenClose)
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.served = served
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("D4RL_URL", f"http://127.0.0.1:{server.server_port}/{{env}}_{{dataset}}-v2.hdf5")
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    yield served, request.param
    server.shutdown()


def test_download_into_cache_then_train_on_it_or_a_clear_error_and_nothing_left(tmp_path, http_server):
    served, mode = http_server
    write_hdf5(served / "hopper_medium-v2.hdf5")
    cache = tmp_path / "cache"
    args = small_args(tmp_path, None)
    if mode == "half":  # the server closes the connection half-way
        with pytest.raises(smac.SMACError, match=r"closed after \d+ of \d+ bytes; nothing was kept.*--dataset-path"):
            smac.train(args)
        assert not cache.exists() and not (tmp_path / "runs").exists()  # no partial file, no empty cache folder
        return
    result = smac.train(args)  # smac.py downloads the file into the cache and trains on it
    assert os.listdir(cache) == ["hopper_medium-v2.hdf5"]
    assert (cache / "hopper_medium-v2.hdf5").read_bytes() == (served / "hopper_medium-v2.hdf5").read_bytes()
    (served / "hopper_medium-v2.hdf5").unlink()  # the cache is used from now on
    assert smac.train(args)["normalized_score"] == pytest.approx(result["normalized_score"])


@pytest.mark.parametrize("http_server", ["whole"], indirect=True)
def test_download_404_gives_clear_error_and_leaves_no_partial_file(tmp_path, http_server):
    with pytest.raises(smac.SMACError, match=r"404.*--dataset-path|--dataset-path.*404") as err:
        smac.load_dataset("hopper-medium-v2", None)
    assert "hopper_medium-v2.hdf5" in str(err.value) and not (tmp_path / "cache").exists()


def test_no_network_names_the_url_and_dataset_path(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("D4RL_URL", "http://127.0.0.1:9/{env}_{dataset}-v2.hdf5")  # port 9: nothing listens
    with pytest.raises(smac.SMACError, match="127.0.0.1:9/hopper_medium-v2.hdf5.*--dataset-path"):
        smac.load_dataset("hopper-medium-v2", None)


def test_empty_dataset_and_actions_outside_the_action_space(tmp_path, monkeypatch):
    with pytest.raises(smac.SMACError, match="holds no transitions"):
        smac.load_dataset("hopper-medium-v2", str(write_hdf5(tmp_path / "empty.hdf5", n=0)))
    actions = np.zeros((400, ACT_DIM), np.float32)
    actions[:4] = 1.5
    buffers, dataset_buffer = [], smac.dataset_buffer
    monkeypatch.setattr(smac, "dataset_buffer", lambda *a: buffers.append(dataset_buffer(*a)) or buffers[-1])
    with pytest.warns(UserWarning, match=r"1.00% of the action entries lie outside .*up to 1.5.*clipped"):
        smac.train(small_args(tmp_path, write_hdf5(tmp_path / "wide.hdf5", actions=actions), total_updates=2))
    assert buffers[0].data["actions"].abs().max() == 1.0  # what the score model and the critic are trained on


@pytest.mark.parametrize("flags, message", [
    (dict(total_updates=0), "--total-updates must be >= 1, got 0"), (dict(total_updates=-5), "--total-updates"),
    (dict(batch_size=0), "--batch-size must be >= 1"), (dict(batch_size=-3), "--batch-size"),
    (dict(policy_lr=float("nan")), "--policy-lr must be a finite number > 0, got nan"),
    (dict(eval_episodes=0), "--eval-episodes must be >= 1"), (dict(hidden_dim=0), "--hidden-dim must be >= 1"),
    (dict(gamma=2.0), "--gamma must be in \\[0, 1\\], got 2.0"), (dict(score_batch_size=0), "--score-batch-size"),
    (dict(score_coef=-1.0), "--score-coef must be a finite number >= 0"), (dict(eval_freq=-1), "--eval-freq"),
])
def test_bad_offline_flags_give_one_clear_error_and_write_nothing(tmp_path, flags, message):
    with pytest.raises(smac.SMACError, match=message):
        smac.train(small_args(tmp_path, write_hdf5(tmp_path / "d.hdf5"), **flags))
    assert not (tmp_path / "runs").exists()


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(smac.SMACError, match="is a file, not a folder"):
        smac.train(small_args(tmp_path, write_hdf5(tmp_path / "d.hdf5")))


# ---------------------------------------------------------------- the offline loop, end to end
@pytest.mark.parametrize("extra", [dict(), dict(score_coef=0.0)])
def test_short_offline_run_writes_metrics_and_a_weights_only_checkpoint(tmp_path, extra):
    result = smac.train(small_args(tmp_path, write_hdf5(tmp_path / "d.hdf5"), eval_freq=15, **extra))
    ckpt = torch.load(os.path.join(result["run_dir"], "smac.pt"), weights_only=True)
    assert ckpt["format"] == smac.CHECKPOINT_FORMAT and ckpt["env"] == "hopper-medium-v2"
    assert set(smac.CHECKPOINT_KEYS) <= set(ckpt) and ckpt["alpha"] == 0.2 and ckpt["obs_mean"].shape == (OBS_DIM,)
    assert ckpt["probe_obs"].shape == (400, OBS_DIM) and ckpt["td_grad_norm"] == result["td_grad_norm"] > 0
    with open(os.path.join(result["run_dir"], "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["update"]) for r in rows] == [15, 30] and float(rows[-1]["normalized_score"]) == pytest.approx(
        result["normalized_score"], abs=1e-3)
    keys = ["sac_actor_grad_norm", "td_grad_norm"] + (["score_residual_rel", "alpha_psi_mean"] if not extra else [])
    for key in keys:
        assert np.isfinite(float(rows[-1][key])) and float(rows[-1][key]) > 0
    _, actor, _, _ = smac.load_checkpoint(os.path.join(result["run_dir"], "smac.pt"), torch.device("cpu"))
    torch.testing.assert_close(actor.state_dict()["net.0.weight"], ckpt["actor"]["net.0.weight"])
    # the diffusion model and alpha_psi travel with a SMAC checkpoint, for the fine-tuners' --score-coef
    assert (ckpt["score_model"] is None) == (ckpt["score_scale"] is None) == bool(extra) and 0 <= ckpt["w_query"] <= 1
    if extra:  # a baseline checkpoint fine-tunes plain (its kappa is 0); asking for the penalty is an error
        path = os.path.join(result["run_dir"], "smac.pt")
        assert sac_finetune.train(online_args(sac_finetune, tmp_path, path, total_timesteps=150))["train_episodes"] > 0
        with pytest.raises(smac.SMACError, match="--score-coef needs a SMAC checkpoint"):
            sac_finetune.train(online_args(sac_finetune, tmp_path, path, score_coef=1.0))


def test_non_finite_loss_stops_naming_the_update_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls, original = [0], smac.soft_td_target

    def poisoned(*args, **kw):
        calls[0] += 1
        y = original(*args, **kw)
        return y * float("nan") if calls[0] > 20 else y

    monkeypatch.setattr(smac, "soft_td_target", poisoned)
    monkeypatch.setattr(smac, "LOG_FREQ", 10)  # checked at log steps only
    args = small_args(tmp_path, write_hdf5(tmp_path / "d.hdf5"), eval_freq=10)
    with pytest.raises(smac.SMACError, match="td_loss became nan by offline step 20"):
        smac.train(args)
    (run,) = os.listdir(tmp_path / "runs")
    ckpt = torch.load(tmp_path / "runs" / run / "smac.pt", weights_only=True)
    with open(tmp_path / "runs" / run / "metrics.csv") as f:
        # poisoned from update 11 on (the diagnostics at update 10 call it too), detected at the log step 20
        assert [int(r["update"]) for r in csv.DictReader(f)] == [10]
    assert all(torch.isfinite(v).all() for v in ckpt["critic"].values())


def test_two_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(smac.time, "time", lambda: 1234.0)
    args = small_args(tmp_path, None)
    first, second = smac.RunLog(args, args.env), smac.RunLog(args, args.env)
    assert first.dir != second.dir and os.path.isdir(first.dir) and os.path.isdir(second.dir)


def test_command_line_error_is_one_line_without_traceback():
    out = subprocess.run([sys.executable, "smac.py", "--env", "hopper-mediun-v2"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode != 0
    assert "error: unknown dataset 'hopper-mediun-v2'" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------- online fine-tuning
import sac_finetune  # noqa: E402
import td3_finetune  # noqa: E402


@pytest.fixture(scope="module")
def offline_checkpoint(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("offline")
    result = smac.train(small_args(tmp_path, write_hdf5(tmp_path / "d.hdf5", n=600), eval_episodes=2))
    return os.path.join(result["run_dir"], "smac.pt"), result


def online_args(module, tmp_path, checkpoint, **kw):
    base = dict(checkpoint=checkpoint, total_timesteps=300, learning_starts=100, eval_freq=150, eval_episodes=2,
                batch_size=32, run_dir=str(tmp_path / "online"), cuda=False)
    return module.Args(**{**base, **kw})


@pytest.mark.parametrize("module, extra", [(sac_finetune, dict()), (td3_finetune, dict()),
                                           (td3_finetune, dict(bc_coef=0.4))])
def test_finetuner_opens_with_the_offline_score_and_writes_metrics_and_final_checkpoint(
        tmp_path, offline_checkpoint, module, extra):
    path, offline = offline_checkpoint
    result = module.train(online_args(module, tmp_path, path, **extra))
    with open(os.path.join(result["run_dir"], "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 150, 200, 300]  # 200: 100 updates after the hand-over
    assert [int(r["updates"]) for r in rows] == [0, 50, 100, 200] and float(rows[0]["kl_to_offline"]) == 0.0
    assert float(rows[-1]["kl_to_offline"]) > 0 and result["kl_100"] == pytest.approx(float(rows[2]["kl_to_offline"]),
                                                                                     rel=1e-3)
    assert np.isfinite(result["td_grad_ratio"]) and result["td_grad_ratio"] > 0
    # step 0 is evaluated before any update with smac.py's eval seeds: the same score as smac.py's final evaluation
    assert float(rows[0]["normalized_score"]) == pytest.approx(offline["normalized_score"], abs=1e-3)
    scores = [float(r["normalized_score"]) for r in rows]
    assert result["drop"] == pytest.approx(max(0.0, scores[0] - min(scores)), abs=1e-3)  # the window: 5000 updates
    assert result["final_score"] == pytest.approx(scores[-1], abs=1e-3) and 0 < result["train_episodes"]
    with open(os.path.join(result["run_dir"], "summary.csv")) as f:
        (summary,) = list(csv.DictReader(f))
    assert float(summary["regret"]) == pytest.approx(result["regret"], rel=1e-3)
    ckpt, actor, _, _ = smac.load_checkpoint(os.path.join(result["run_dir"], "final.pt"), torch.device("cpu"))
    assert ckpt["env"] == "hopper-medium-v2" and ckpt["online_args"]["total_timesteps"] == 300


def test_lr_warmup_ramps_the_learning_rates_and_slows_the_first_online_moves(tmp_path, offline_checkpoint):
    net = nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1.0)
    lrs = []
    for update in (1, 50, 100, 500):
        smac.warm_up_lr({opt: 3e-4}, update, warmup=100)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([3e-6, 1.5e-4, 3e-4, 3e-4])
    smac.warm_up_lr({opt: 3e-4}, 1, warmup=0)
    assert opt.param_groups[0]["lr"] == 3e-4  # 0: no warm-up
    for module in (sac_finetune, td3_finetune):  # same seed, same data: only the step sizes differ
        plain = module.train(online_args(module, tmp_path, offline_checkpoint[0]))
        ramped = module.train(online_args(module, tmp_path, offline_checkpoint[0], lr_warmup=10_000))
        assert 0 < ramped["kl_100"] < plain["kl_100"] / 10


def score_residual(path: str) -> float:
    """||grad_a Q_i - alpha_psi grad_a log pi^D|| / ||alpha_psi grad_a log pi^D|| of a checkpoint's critic, at its
    probe states and B(A) actions, against the offline run's diffusion model and alpha_psi."""
    ckpt, actor, critic, _ = smac.load_checkpoint(path, torch.device("cpu"))
    score_model = smac.ScoreModel(OBS_DIM, ACT_DIM)
    score_scale = smac.ScoreScale(OBS_DIM, 32, ckpt["args"]["score_scale_floor"])
    score_model.load_state_dict(ckpt["score_model"])
    score_scale.load_state_dict(ckpt["score_scale"])
    torch.manual_seed(0)
    obs = ckpt["probe_obs"]
    w = torch.full((len(obs), 1), ckpt["w_query"])
    residual, _, data_score = smac.score_matching_residual(critic, score_scale, score_model, obs,
                                                           smac.penalty_actions(*actor(obs)), w)
    return (residual.norm() / (score_scale(obs) * data_score).norm()).item()


@pytest.mark.parametrize("module", [sac_finetune, td3_finetune])
def test_the_penalty_kept_online_holds_the_critic_near_the_dataset_score(tmp_path, offline_checkpoint, module):
    path = offline_checkpoint[0]
    plain = module.train(online_args(module, tmp_path, path, total_timesteps=400, q_lr=3e-3, score_coef=0.0))
    kept = module.train(online_args(module, tmp_path, path, total_timesteps=400, q_lr=3e-3))  # the checkpoint's 10
    plain_res, kept_res = (score_residual(os.path.join(r["run_dir"], "final.pt")) for r in (plain, kept))
    assert kept_res < 0.85 * plain_res  # 300 updates, the same seed and data: only the penalty differs


def test_a_deeper_mlp_above_the_banner_trains_saves_loads_and_fine_tunes(tmp_path, monkeypatch):
    """A forker's change to the networks' layout needs no change below the banner: the checkpoint records its shapes
    and the twin critic runs whatever Linear layers mlp builds."""
    def deeper_mlp(in_dim, out_dim, hidden, activation=nn.ReLU):
        return nn.Sequential(nn.Linear(in_dim, hidden), activation(), nn.Linear(hidden, hidden), activation(),
                             nn.Linear(hidden, hidden), activation(), nn.Linear(hidden, out_dim))

    monkeypatch.setattr(smac, "mlp", deeper_mlp)
    result = smac.train(small_args(tmp_path, write_hdf5(tmp_path / "d.hdf5"), total_updates=5))
    path = os.path.join(result["run_dir"], "smac.pt")
    ckpt, actor, critic, _ = smac.load_checkpoint(path, torch.device("cpu"))
    assert (ckpt["obs_dim"], ckpt["act_dim"], ckpt["hidden_dim"]) == (OBS_DIM, ACT_DIM, 32) and len(actor.net) == 7
    obs, actions = torch.randn(4, OBS_DIM), torch.rand(4, ACT_DIM) * 2 - 1
    q_1 = critic.qs[0](torch.cat([obs, actions], -1)).squeeze(-1)  # the batched forward equals the plain MLP
    torch.testing.assert_close(critic(obs, actions)[0], q_1)
    assert sac_finetune.train(online_args(sac_finetune, tmp_path, path, total_timesteps=150))["train_episodes"] >= 0


def test_released_score_coef_falls_geometrically_to_the_final_kappa_and_then_stays():
    assert smac.released_score_coef(10.0, 0.1, 1000, 0) == pytest.approx(10.0)
    assert smac.released_score_coef(10.0, 0.1, 1000, 500) == pytest.approx(1.0)  # halfway in log-kappa
    assert smac.released_score_coef(10.0, 0.1, 1000, 1000) == 0.1
    assert smac.released_score_coef(10.0, 0.1, 1000, 50_000) == 0.1
    assert smac.released_score_coef(10.0, 0.0, 1000, 999) == pytest.approx(10.0 / 1000 ** 0.999)  # toward start/1000,
    assert smac.released_score_coef(10.0, 0.0, 1000, 1000) == 0.0  # then off
    assert smac.released_score_coef(10.0, 10.0, 1000, 10) == 10.0  # no release
    assert smac.released_score_coef(0.0, 0.0, 1000, 10) == 0.0



def test_the_default_release_ends_at_a_hundredth_of_the_checkpoints_kappa(tmp_path, offline_checkpoint):
    run = smac.OnlineRun(online_args(sac_finetune, tmp_path, offline_checkpoint[0], eval_episodes=1),
                         torch.device("cpu"))
    assert (run.score_coef, run.score_coef_final, run.args.score_release_updates) == (10.0, 0.1, 15_000)
    for flags, final in ((dict(score_coef=0.0), 0.0), (dict(score_coef_final=10.0), 10.0)):  # plain; the anchor
        run = smac.OnlineRun(online_args(sac_finetune, tmp_path, offline_checkpoint[0], eval_episodes=1, **flags),
                             torch.device("cpu"))
        assert run.score_coef_final == final


@pytest.mark.parametrize("module", [sac_finetune, td3_finetune])
def test_a_release_to_zero_stops_computing_the_penalty(tmp_path, offline_checkpoint, module, monkeypatch):
    kappas = []
    penalty = smac.score_matching_penalty

    def recording_penalty(*a, **kw):
        kappas.append(None)
        return penalty(*a, **kw)

    monkeypatch.setattr(smac, "score_matching_penalty", recording_penalty)
    module.train(online_args(module, tmp_path, offline_checkpoint[0]))  # 200 updates, kappa kept
    assert len(kappas) == 200
    kappas.clear()
    module.train(online_args(module, tmp_path, offline_checkpoint[0], score_coef_final=0.0, score_release_updates=50))
    assert len(kappas) == 49  # updates 1..49; from the 50th kappa_t is 0 and the penalty costs nothing


def test_drop_and_regret_definitions():
    evals = [(0, 50.0), (50, 45.0), (100, 30.0), (150, 10.0), (1000, 60.0)]  # (updates, score); 10.0 after 150 updates
    expert = 3234.3
    task = smac.d4rl_task("hopper-medium-v2")
    train_scores = [smac.normalized_score(task, r) for r in (expert, expert / 2)]
    summary = smac.transfer_metrics(evals, train_scores, drop_window=100)
    assert summary["drop"] == pytest.approx(20.0) and summary["final_score"] == 60.0
    half = smac.normalized_score(task, expert / 2)
    assert summary["regret"] == pytest.approx((0.0 + (1 - half / 100)) / 2)


def test_drop_counts_updates_from_the_hand_over_so_a_fall_after_learning_starts_is_seen(tmp_path, offline_checkpoint):
    """The held-out case: 10k online steps, updates from step 1000, 67.0 at the start and 2.3 after 1000 updates.
    The old window (the first 10% of steps, here the 1000 steps before any update) reported drop 0."""
    evals = [(0, 67.0), (0, 67.0), (100, 40.0), (1000, 2.3), (4000, 20.0), (9000, 50.0)]
    assert smac.transfer_metrics(evals, [], drop_window=5000)["drop"] == pytest.approx(64.7)
    assert smac.transfer_metrics(evals, [], drop_window=500)["drop"] == pytest.approx(27.0)  # the fall is outside
    run = smac.OnlineRun(online_args(sac_finetune, tmp_path, offline_checkpoint[0], total_timesteps=10_000,
                                     learning_starts=1000, eval_episodes=1), torch.device("cpu"))
    assert run.drop_window == 5000  # max(5000, 10% of 9000 updates)
    run = smac.OnlineRun(online_args(sac_finetune, tmp_path, offline_checkpoint[0], total_timesteps=200_000,
                                     learning_starts=1000, eval_episodes=1), torch.device("cpu"))
    assert run.drop_window == 19_900


def test_td3_first_action_is_tanh_of_the_offline_mean(tmp_path, offline_checkpoint, monkeypatch):
    path, _ = offline_checkpoint
    recorded, make_env = {}, smac.make_env

    def recording_make_env(*a, **kw):
        env = make_env(*a, **kw)
        if not recorded:  # the first env made is the training env
            recorded["env"] = env
            reset, step = env.reset, env.step
            env.reset = lambda **k: recorded.setdefault("reset", reset(**k))
            env.step = lambda action: (recorded.setdefault("action", action), step(action))[1]
        return env

    monkeypatch.setattr(smac, "make_env", recording_make_env)
    td3_finetune.train(online_args(td3_finetune, tmp_path, path, total_timesteps=5, learning_starts=4, eval_freq=5,
                                   eval_episodes=1, exploration_noise=0.0))
    _, actor, _, _ = smac.load_checkpoint(path, torch.device("cpu"))
    first_obs = torch.as_tensor(recorded["reset"][0])[None]
    np.testing.assert_allclose(recorded["action"], torch.tanh(actor(first_obs)[0])[0].detach().numpy(), rtol=1e-6)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("module", [sac_finetune, td3_finetune])
@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b"not a checkpoint at all"), "cannot read"),
        (lambda p: torch.save({"weights": torch.zeros(2)}, p), "not a SMAC checkpoint"),
        (lambda p: torch.save({"format": smac.CHECKPOINT_FORMAT, "actor": {}}, p), "incomplete SMAC checkpoint"),
        (lambda p: torch.save({"payload": Exploit()}, p), "cannot read"),  # weights_only refuses to run code
    ],
)
def test_bad_checkpoints_give_one_clear_error(tmp_path, module, make_bad, message):
    path = tmp_path / "bad.pt"
    make_bad(path)
    with pytest.raises(smac.SMACError, match=message):
        module.train(online_args(module, tmp_path, str(path)))


@pytest.mark.parametrize("module", [sac_finetune, td3_finetune])
@pytest.mark.parametrize("flags, message", [
    (dict(total_timesteps=-5), "--total-timesteps must be >= 1"),
    (dict(total_timesteps=0), "--total-timesteps must be >= 1"),
    (dict(total_timesteps=100), r"--learning-starts \(100\) must be smaller than --total-timesteps \(100\)"),
    (dict(eval_freq=0), "--eval-freq must be >= 1"), (dict(batch_size=0), "--batch-size must be >= 1"),
    (dict(learning_starts=-5), "--learning-starts must be >= 1"), (dict(q_lr=float("inf")), "--q-lr"),
    (dict(score_coef=float("nan")), "--score-coef must be a finite number >= 0"),
])
def test_bad_online_flags_give_one_clear_error_and_write_nothing(tmp_path, offline_checkpoint, module, flags, message):
    with pytest.raises(smac.SMACError, match=message):
        module.train(online_args(module, tmp_path, offline_checkpoint[0], **flags))
    assert not (tmp_path / "online").exists()


@pytest.mark.parametrize("change, message", [
    (lambda c: {"critic": {**c["critic"], "qs.0.0.weight": c["critic"]["qs.0.0.weight"] * float("nan")}},
     "non-finite"),
    (lambda c: {"obs_mean": torch.zeros(5), "obs_std": torch.ones(5)}, "do not match|observation statistics"),
])
def test_checkpoints_with_bad_contents_give_one_clear_error(tmp_path, offline_checkpoint, change, message):
    ckpt = torch.load(offline_checkpoint[0], weights_only=True)
    torch.save({**ckpt, **change(ckpt)}, tmp_path / "bad.pt")
    with pytest.raises(smac.SMACError, match=message):
        sac_finetune.train(online_args(sac_finetune, tmp_path, str(tmp_path / "bad.pt")))


def run_script(args, tmp_path, stop_when_exists=None, tty=False, stop_signal=signal.SIGINT):
    """Runs a script as a user would; with stop_when_exists, sends Ctrl-C (SIGINT, or stop_signal) once that file
    appears."""
    master, slave = pty.openpty() if tty else (None, None)
    if tty:  # a terminal of 80 columns (a new pty has 0, and tqdm draws a bar as wide as the terminal)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen([sys.executable, *args], cwd=os.path.dirname(os.path.abspath(__file__)),
                            stdout=subprocess.PIPE, stderr=slave if tty else subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},  # a background shell ignores SIGINT:
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # undo that
    if stop_when_exists:
        deadline = time.time() + 120
        while not glob.glob(stop_when_exists) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(stop_signal)
    if tty:
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        stdout, stderr = proc.stdout.read().decode(), b"".join(chunks).decode(errors="replace")
        proc.wait()
        return proc.returncode, stdout, stderr
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout.decode(), stderr.decode()


def test_ctrl_c_keeps_the_last_checkpoint_and_says_where_in_one_line(tmp_path):
    dataset = write_hdf5(tmp_path / "d.hdf5", n=600)
    offline = ["smac.py", "--env", "hopper-medium-v2", "--dataset-path", str(dataset), "--total-updates", "100000",
               "--eval-freq", "20", "--eval-episodes", "1", "--hidden-dim", "32", "--batch-size", "32",
               "--score-model-updates", "10", "--run-dir", str(tmp_path / "runs"), "--no-cuda"]
    code, _, stderr = run_script(offline, tmp_path, stop_when_exists=str(tmp_path / "runs" / "*" / "smac.pt"))
    (path,) = glob.glob(str(tmp_path / "runs" / "*" / "smac.pt"))
    assert code != 0 and "Traceback" not in stderr and f"interrupted; the last checkpoint is kept: {path}" in stderr
    smac.load_checkpoint(path, torch.device("cpu"))
    online = ["sac_finetune.py", "--checkpoint", path, "--total-timesteps", "100000", "--eval-freq", "50",
              "--learning-starts", "20", "--eval-episodes", "1", "--batch-size", "32", "--run-dir",
              str(tmp_path / "online"), "--no-cuda"]
    code, _, stderr = run_script(online, tmp_path, stop_when_exists=str(tmp_path / "online" / "*" / "final.pt"))
    (final,) = glob.glob(str(tmp_path / "online" / "*" / "final.pt"))
    assert code != 0 and "Traceback" not in stderr and f"the last checkpoint is kept: {final}" in stderr
    smac.load_checkpoint(final, torch.device("cpu"))  # a fine-tune can be evaluated (or resumed) after Ctrl-C


@pytest.mark.parametrize("tty", [False, True])
def test_progress_bar_on_a_terminal_only(tmp_path, tty):
    command = ["smac.py", "--env", "hopper-medium-v2", "--dataset-path", str(write_hdf5(tmp_path / "d.hdf5")),
               "--total-updates", "30", "--eval-episodes", "1", "--hidden-dim", "32", "--batch-size", "32",
               "--score-model-updates", "10", "--run-dir", str(tmp_path / "runs"), "--no-cuda"]
    code, stdout, stderr = run_script(command, tmp_path, tty=tty)
    assert code == 0, stderr
    bar = "offline updates: 100%" in stderr and "it/s" in stderr  # tqdm draws on stderr when it is a terminal
    assert bar == tty and ("\r" in stdout + stderr) == tty


def test_a_swallowed_ctrl_c_still_stops_the_training_loop_at_its_next_step(monkeypatch):
    monkeypatch.setattr(smac, "ctrl_c_pressed", False)
    steps = []
    with pytest.raises(KeyboardInterrupt):
        for step in smac.progress(range(10), "updates"):
            steps.append(step)
            if step == 2:
                try:
                    smac.on_ctrl_c(signal.SIGINT, None)
                except KeyboardInterrupt:
                    pass  # as Python does with an exception raised inside a __del__
    assert steps == [0, 1, 2]


# ---------------------------------------------------------------- set-up mistakes, faults and diverged runs
def cli(module, argv, monkeypatch, capsys):
    """Runs a script's command line in this process: (its error line or None, what it printed)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, argv)])
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        module.main(module.train, module.Args) if module is smac else smac.main(module.train, module.Args)
        message = None
    except SystemExit as e:
        message = str(e.code)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    return message, capsys.readouterr().out


def offline_argv(tmp_path, **flags):
    flags = {"env": "hopper-medium-v2", "dataset_path": write_hdf5(tmp_path / "d.hdf5"), "total_updates": 30,
             "batch_size": 32, "hidden_dim": 32, "eval_episodes": 1, "score_model_updates": 10,
             "run_dir": tmp_path / "runs", **flags}
    return [x for k, v in flags.items() if v is not None for x in (f"--{k.replace('_', '-')}", str(v))] + ["--no-cuda"]


def test_a_diverged_offline_run_never_writes_a_non_finite_checkpoint(tmp_path):
    """lr 1e6: the weights are NaN within 50 updates, long before the first loss check at update 1000."""
    with pytest.raises(smac.SMACError, match="non-finite .* by update 50; the last good checkpoint is kept: none"):
        smac.train(small_args(tmp_path, write_hdf5(tmp_path / "d.hdf5"), q_lr=1e6, policy_lr=1e6,
                              total_updates=200, eval_freq=50))
    assert glob.glob(str(tmp_path / "runs" / "*" / "smac.pt")) == []
    assert glob.glob(str(tmp_path / "runs" / "*" / "metrics.csv")) == []  # no NaN score reported either


@pytest.mark.parametrize("module", [sac_finetune, td3_finetune])
def test_a_diverged_fine_tune_stops_and_never_reports_a_finite_drop(tmp_path, offline_checkpoint, module):
    with pytest.raises(smac.SMACError, match="non-finite"):
        module.train(online_args(module, tmp_path, offline_checkpoint[0], q_lr=1e6, policy_lr=1e6))
    assert glob.glob(str(tmp_path / "online" / "*" / "summary.csv")) == []
    for final in glob.glob(str(tmp_path / "online" / "*" / "final.pt")):
        smac.load_checkpoint(final, torch.device("cpu"))  # whatever was kept is finite
    summary = smac.transfer_metrics([(0, 40.0), (100, math.nan), (200, 41.0)], [], drop_window=500)
    assert math.isnan(summary["drop"]) and math.isnan(summary["step0_score"])  # min() would have skipped the NaN


def test_dataset_faults_give_one_clear_error_or_a_word(tmp_path):
    with pytest.raises(smac.SMACError, match="terminals contains NaN"):
        smac.load_dataset("hopper-medium-v2", str(write_hdf5(tmp_path / "nan.hdf5", terminals=np.full(400, np.nan))))
    with pytest.warns(UserWarning, match="holds 1 transitions, fewer than one minibatch"):
        smac.train(small_args(tmp_path, write_hdf5(tmp_path / "one.hdf5", n=1), total_updates=2))
    column = dict(rewards=np.ones((400, 1), np.float32), terminals=np.zeros((400, 1), bool))  # converted files
    data = smac.load_dataset("hopper-medium-v2", str(write_hdf5(tmp_path / "col.hdf5", **column)))
    assert data["rewards"].shape == (400,) and data["dones"].shape == (400,)
    with pytest.raises(smac.SMACError, match=r"rewards has shape \(400, 2\)"):
        smac.load_dataset("hopper-medium-v2", str(write_hdf5(tmp_path / "two.hdf5", rewards=np.ones((400, 2)))))
    with pytest.raises(smac.SMACError, match="is a folder, not a file"):
        smac.load_dataset("hopper-medium-v2", str(tmp_path))


@pytest.mark.parametrize("module", [smac, sac_finetune, td3_finetune])
def test_run_dirs_that_cannot_be_made_are_one_line_and_leave_nothing(tmp_path, offline_checkpoint, module,
                                                                       monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    for run_dir, message in ((tmp_path / "afile" / "sub", "which is a file"), ("/proc/x", "/proc/x")):
        argv = offline_argv(tmp_path, run_dir=run_dir) if module is smac else [
            "--checkpoint", offline_checkpoint[0], "--total-timesteps", 300, "--learning-starts", 100,
            "--run-dir", run_dir, "--no-cuda"]
        error, _ = cli(module, argv, monkeypatch, capsys)
        assert error.startswith("error: ") and message in error and "\n" not in error


def test_bad_seed_batch_and_cache_are_one_line(tmp_path, monkeypatch, capsys):
    error, _ = cli(smac, offline_argv(tmp_path, seed=-1), monkeypatch, capsys)
    assert error == "error: --seed must be in [0, 2**32 - 1], got -1"
    error, _ = cli(smac, offline_argv(tmp_path, batch_size=2**42), monkeypatch, capsys)  # 32 TiB of indices
    assert error.startswith("error: out of memory") and "--batch-size" in error
    assert not (tmp_path / "runs").exists()  # the failed run's folder (only TensorBoard's file in it) is gone
    monkeypatch.setenv("D4RL_DATASET_DIR", "/proc/x/cache")
    error, _ = cli(smac, offline_argv(tmp_path, dataset_path=None), monkeypatch, capsys)
    assert error.startswith("error: cannot create the folder /proc/x/cache")
    for url, message in (("http://127.0.0.1:9/{foo}.hdf5", "only the placeholders {env} and {dataset}"),
                         ("notaurl", "is not a URL")):
        monkeypatch.setenv("D4RL_URL", url)
        with pytest.raises(smac.SMACError, match=message):
            smac.dataset_url("hopper-medium-v2")


@pytest.mark.parametrize("http_server", ["whole"], indirect=True)
def test_a_download_that_is_not_hdf5_never_enters_the_cache_and_a_bad_cached_file_is_named(tmp_path, http_server):
    served, _ = http_server
    (served / "hopper_medium-v2.hdf5").write_text("<html>mirror maintenance</html>")  # served with status 200
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "home" / ".d4rl" / "datasets"))
    with pytest.raises(smac.SMACError, match="did not send an HDF5 file.*nothing was kept"):
        smac.load_dataset("hopper-medium-v2", None)
    assert not (tmp_path / "home").exists()  # nor the cache folders the download created
    cached = tmp_path / "home" / ".d4rl" / "datasets" / "hopper_medium-v2.hdf5"
    cached.parent.mkdir(parents=True)
    cached.write_text("garbage from an older download")
    with pytest.raises(smac.SMACError, match=f"cannot read {cached} as HDF5.*delete it and it is downloaded again"):
        smac.load_dataset("hopper-medium-v2", None)
    monkeypatch.undo()


def test_checkpoint_faults_and_messages(tmp_path, offline_checkpoint):
    with pytest.raises(smac.SMACError, match="is a folder, not a file"):
        sac_finetune.train(online_args(sac_finetune, tmp_path, str(tmp_path)))
    path = tmp_path / "exploit.pt"
    torch.save({"payload": Exploit()}, path)
    with pytest.raises(smac.SMACError, match="not a weights-only torch file") as err:
        smac.load_checkpoint(str(path), torch.device("cpu"))
    assert "weights_only=False" not in str(err.value)  # torch's advice to load it unsafely is never shown
    ckpt = torch.load(offline_checkpoint[0], weights_only=True)
    result = sac_finetune.train(online_args(sac_finetune, tmp_path, offline_checkpoint[0]))
    final = torch.load(os.path.join(result["run_dir"], "final.pt"), weights_only=True)
    assert ckpt["update"] == 30 and final["step"] == 300  # each checkpoint says what it holds


def test_a_checkpoint_is_on_disk_only_once_it_is_whole(tmp_path, monkeypatch):
    """A SIGKILL cannot be caught; what can be done is to keep the file's time on disk short: the checkpoint is
    serialized in memory and only then written, so a kill during the (slow) serialization leaves nothing."""
    seen, save = [], torch.save

    def watching_save(obj, f, *a, **kw):
        save(obj, f, *a, **kw)
        seen.append(sorted(os.listdir(tmp_path)))  # serialized: is anything on disk yet?

    monkeypatch.setattr(torch, "save", watching_save)
    net = nn.Linear(2, 2)
    smac.save_checkpoint(str(tmp_path / "smac.pt"), net, net, net)
    assert seen == [[]] and os.listdir(tmp_path) == ["smac.pt"]


def test_sigterm_stops_like_ctrl_c(tmp_path):
    dataset = write_hdf5(tmp_path / "d.hdf5", n=600)
    command = ["smac.py", *offline_argv(tmp_path, dataset_path=dataset, total_updates=100000, eval_freq=20)]
    code, _, stderr = run_script(command, tmp_path, stop_when_exists=str(tmp_path / "runs" / "*" / "smac.pt"),
                                 stop_signal=signal.SIGTERM)
    (path,) = glob.glob(str(tmp_path / "runs" / "*" / "smac.pt"))
    assert code == 1 and "Traceback" not in stderr and f"interrupted; the last checkpoint is kept: {path}" in stderr


def test_logs_say_only_what_is_true(tmp_path, offline_checkpoint, monkeypatch, capsys):
    _, printed = cli(smac, offline_argv(tmp_path, score_coef=0), monkeypatch, capsys)
    assert "offline step=30 " in printed  # a run shorter than LOG_FREQ still prints its losses once
    assert "score_residual_rel" not in printed and "nan" not in printed  # the baseline has no penalty to report
    monkeypatch.setattr(smac, "LOG_FREQ", 50)
    for module in (sac_finetune, td3_finetune):
        _, printed = cli(module, ["--checkpoint", offline_checkpoint[0], "--total-timesteps", 300, "--learning-starts",
                                  100, "--eval-episodes", 1, "--run-dir", tmp_path / "online", "--no-cuda"],
                         monkeypatch, capsys)
        online_lines = [line for line in printed.splitlines() if line.startswith("online step=")]
        assert [line.split()[1] for line in online_lines] == ["step=150", "step=200", "step=250", "step=300"]
        assert all(("alpha=" in line) == (module is sac_finetune) for line in online_lines)  # TD3 has no alpha
    help_text = subprocess.run([sys.executable, "tools/run_experiment.py", "--help"], capture_output=True, text=True,
                               cwd=os.path.dirname(os.path.abspath(__file__))).stdout
    assert "--bc-coef" not in help_text  # a flag smac.py no longer has
