"""Tests for SMAC. They make their own small data; run with `python -m pytest -q` (CPU, a few minutes)."""

import functools
import http.server
import os
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest
import torch

import smac

OBS_DIM, ACT_DIM = 11, 3  # Hopper-v4
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
    base = dict(env="hopper-medium-v2", dataset_path=str(dataset), total_updates=30, batch_size=32, hidden_dim=32,
                eval_freq=0, eval_episodes=1, log_freq=10, run_dir=str(tmp_path / "runs"), cuda=False)
    return smac.Args(**{**base, **kw})


class ExactCritic:
    """Q(s, a) = alpha * log pi(a|s) + f(s): the critic that satisfies the score equation exactly."""

    def __init__(self, actor, alpha):
        self.actor, self.alpha = actor, alpha

    def value_and_action_grad(self, obs, actions):
        actions = actions.detach().requires_grad_(True)
        mean, log_std = self.actor(obs)
        q = self.alpha * smac.tanh_gaussian_log_prob(mean, log_std, torch.atanh(actions)) + obs.sin().sum(-1)
        grad = torch.autograd.grad(q.sum(), actions)[0]
        return q.expand(2, -1), grad.expand(2, -1, -1)


# ---------------------------------------------------------------- the method
@pytest.mark.parametrize("space", ["pretanh", "action"])
def test_score_matches_finite_differences_of_log_density(space):
    torch.manual_seed(0)
    mean, log_std = torch.randn(5, ACT_DIM, dtype=torch.float64), 0.5 * torch.randn(5, ACT_DIM, dtype=torch.float64)
    u = mean + log_std.exp() * torch.randn(5, ACT_DIM, dtype=torch.float64)
    score = smac.tanh_gaussian_score(mean, log_std, u, space)
    # independent computation: central differences of log pi, in u, or in a = tanh(u) (then u = atanh(a))
    x = u if space == "pretanh" else torch.tanh(u)
    to_u = (lambda v: v) if space == "pretanh" else torch.atanh
    eps, fd = 1e-6, torch.zeros_like(u)
    for j in range(ACT_DIM):
        step = torch.zeros_like(x)
        step[:, j] = eps
        up = smac.tanh_gaussian_log_prob(mean, log_std, to_u(x + step))
        down = smac.tanh_gaussian_log_prob(mean, log_std, to_u(x - step))
        fd[:, j] = (up - down) / (2 * eps)
    torch.testing.assert_close(score, fd, rtol=1e-5, atol=1e-5)


def test_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    mean, log_std = torch.randn(8, ACT_DIM), 0.3 * torch.randn(8, ACT_DIM)
    u = mean + log_std.exp() * torch.randn(8, ACT_DIM)
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()), [torch.distributions.TanhTransform()]
    )
    expected = dist.log_prob(torch.tanh(u).clamp(-0.99999, 0.99999)).sum(-1)
    torch.testing.assert_close(smac.tanh_gaussian_log_prob(mean, log_std, u), expected, rtol=1e-3, atol=1e-3)


def test_twin_critic_equals_two_separate_mlps_and_its_closed_form_gradient_equals_autograd():
    torch.manual_seed(0)
    critic = smac.TwinCritic(OBS_DIM, ACT_DIM, 64)
    obs, actions = torch.randn(40, OBS_DIM), torch.rand(40, ACT_DIM) * 2 - 1
    separate = torch.stack([q(torch.cat([obs, actions], -1)).squeeze(-1) for q in critic.qs])
    torch.testing.assert_close(critic(obs, actions), separate)

    per_critic = actions.expand(2, -1, -1).clone().requires_grad_(True)
    autograd_grad = torch.autograd.grad(critic(obs, per_critic).sum(), per_critic)[0]
    q, closed_form = critic.value_and_action_grad(obs, actions)
    torch.testing.assert_close(q, separate)
    torch.testing.assert_close(closed_form, autograd_grad)
    # and its gradient w.r.t. the weights equals double backprop's
    per_critic = actions.expand(2, -1, -1).clone().requires_grad_(True)
    double = torch.autograd.grad(critic(obs, per_critic).sum(), per_critic, create_graph=True)[0]
    params = list(critic.parameters())
    g_double = torch.autograd.grad(double.pow(2).sum(), params, allow_unused=True, materialize_grads=True)
    g_closed = torch.autograd.grad(closed_form.pow(2).sum(), params, allow_unused=True, materialize_grads=True)
    for a, b in zip(g_double, g_closed):
        torch.testing.assert_close(a, b)


def test_density_head_closed_form_gradient_equals_autograd_and_can_satisfy_the_score_equation_exactly():
    torch.manual_seed(0)
    critic = smac.TwinCritic(OBS_DIM, ACT_DIM, 32, density_scale=0.2)
    obs, actions = torch.randn(40, OBS_DIM), torch.rand(40, ACT_DIM) * 1.8 - 0.9
    per_critic = actions.expand(2, -1, -1).clone().requires_grad_(True)
    q_autograd = critic(obs, per_critic)
    double = torch.autograd.grad(q_autograd.sum(), per_critic, create_graph=True)[0]
    q, closed_form = critic.value_and_action_grad(obs, actions)
    torch.testing.assert_close(q, q_autograd)
    torch.testing.assert_close(closed_form, double)
    params = list(critic.parameters())
    g_double = torch.autograd.grad(double.pow(2).sum(), params, allow_unused=True, materialize_grads=True)
    g_closed = torch.autograd.grad(closed_form.pow(2).sum(), params, allow_unused=True, materialize_grads=True)
    for a, b in zip(g_double, g_closed):
        torch.testing.assert_close(a, b)
    # head = the actor and flat MLPs: Q = alpha log pi + const, so the residual vanishes; a random head's does not
    actor = smac.Actor(OBS_DIM, ACT_DIM, 32)
    mean, log_std = actor(obs)
    pre_tanh = torch.atanh(actions)
    _, residual, _ = smac.score_residual(critic, obs, pre_tanh, mean, log_std, 0.2, "pretanh")
    random_head = residual.pow(2).sum(-1).mean()
    critic.density.load_state_dict(actor.net.state_dict())
    with torch.no_grad():
        for q_net in critic.qs:
            q_net[4].weight.zero_()
    _, residual, grad_q = smac.score_residual(critic, obs, pre_tanh, mean, log_std, 0.2, "pretanh")
    assert residual.pow(2).sum(-1).mean() < 1e-8 * grad_q.pow(2).sum(-1).mean() < 1e-6 * random_head


@pytest.mark.parametrize("space", ["pretanh", "action"])
def test_regularizer_vanishes_for_soft_optimal_critic_and_not_otherwise(space):
    torch.manual_seed(0)
    actor = smac.Actor(OBS_DIM, ACT_DIM, 32)
    obs, pre_tanh = torch.randn(64, OBS_DIM), torch.randn(64, ACT_DIM)
    mean, log_std = actor(obs)
    _, residual, grad_q = smac.score_residual(ExactCritic(actor, 0.2), obs, pre_tanh, mean, log_std, 0.2, space)
    assert residual.pow(2).sum(-1).mean() < 1e-8 * grad_q.pow(2).sum(-1).mean()
    other_critic = smac.TwinCritic(OBS_DIM, ACT_DIM, 32)
    _, residual, _ = smac.score_residual(other_critic, obs, pre_tanh, mean, log_std, 0.2, space)
    assert residual.pow(2).sum(-1).mean() > 1e-2


def test_regularizer_gradient_reaches_critic_not_actor():
    torch.manual_seed(0)
    actor, critic = smac.Actor(OBS_DIM, ACT_DIM, 32), smac.TwinCritic(OBS_DIM, ACT_DIM, 32)
    obs, pre_tanh = torch.randn(64, OBS_DIM), torch.randn(64, ACT_DIM)
    mean, log_std = actor(obs)
    _, residual, _ = smac.score_residual(critic, obs, pre_tanh, mean, log_std, 0.2, "pretanh")
    residual.pow(2).sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in actor.parameters())
    assert sum(p.grad.abs().sum() for p in critic.parameters() if p.grad is not None) > 0


# ---------------------------------------------------------------- D4RL data
def test_names_urls_and_scores():
    assert smac.dataset_url("hopper-medium-replay-v2").endswith("gym_mujoco_v2/hopper_medium_replay-v2.hdf5")
    assert smac.gym_id("walker2d-expert-v2") == "Walker2d-v4"
    assert smac.normalized_score("hopper-medium-v2", 3234.3) == pytest.approx(100.0)
    assert smac.normalized_score("halfcheetah-medium-v2", -280.178953) == pytest.approx(0.0)
    assert len(smac.D4RL_NAMES) == 15


def test_loader_reads_d4rl_layout_and_timeouts_are_not_terminal(tmp_path):
    path = write_hdf5(tmp_path / "d.hdf5")
    data = smac.load_dataset("hopper-medium-v2", str(path), OBS_DIM, ACT_DIM)
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
        smac.load_dataset("hopper-medium-v2", str(path), OBS_DIM, ACT_DIM)


def test_unknown_env_lists_the_valid_names():
    with pytest.raises(smac.SMACError, match="hopper-medium-replay-v2"):
        smac.check_env_name("hopper-mediun-v2")


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/served."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_download_into_cache_then_reuse(tmp_path, http_server, monkeypatch):
    served, base = http_server
    write_hdf5(served / "hopper_medium-v2.hdf5")
    cache = tmp_path / "cache"
    monkeypatch.setenv("D4RL_DATASET_DIR", str(cache))
    monkeypatch.setattr(smac, "D4RL_URL", base + "/{}_{}-v2.hdf5")
    data = smac.load_dataset("hopper-medium-v2", None, OBS_DIM, ACT_DIM)
    assert os.listdir(cache) == ["hopper_medium-v2.hdf5"]
    assert (cache / "hopper_medium-v2.hdf5").read_bytes() == (served / "hopper_medium-v2.hdf5").read_bytes()
    (served / "hopper_medium-v2.hdf5").unlink()  # the cache is used from now on
    again = smac.load_dataset("hopper-medium-v2", None, OBS_DIM, ACT_DIM)
    np.testing.assert_array_equal(again["actions"], data["actions"])


def test_download_404_gives_clear_error_and_leaves_no_partial_file(tmp_path, http_server, monkeypatch):
    _, base = http_server
    cache = tmp_path / "cache"
    monkeypatch.setenv("D4RL_DATASET_DIR", str(cache))
    monkeypatch.setattr(smac, "D4RL_URL", base + "/{}_{}-v2.hdf5")
    with pytest.raises(smac.SMACError, match=r"404.*--dataset-path|--dataset-path.*404") as err:
        smac.load_dataset("hopper-medium-v2", None, OBS_DIM, ACT_DIM)
    assert "hopper_medium-v2.hdf5" in str(err.value)
    assert os.listdir(cache) == []


def test_no_network_names_the_url_and_dataset_path(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(smac, "D4RL_URL", "http://127.0.0.1:9/{}_{}-v2.hdf5")  # port 9: nothing listens
    with pytest.raises(smac.SMACError, match="127.0.0.1:9/hopper_medium-v2.hdf5.*--dataset-path"):
        smac.load_dataset("hopper-medium-v2", None, OBS_DIM, ACT_DIM)


# ---------------------------------------------------------------- the offline loop, end to end
@pytest.mark.parametrize("extra", [dict(), dict(score_coef=0.0), dict(optimizer="muon", score_actions="dataset"),
                                   dict(critic_density=False)])
def test_short_offline_run_writes_a_weights_only_checkpoint(tmp_path, extra):
    result = smac.train(small_args(tmp_path, write_hdf5(tmp_path / "d.hdf5"), **extra))
    ckpt = torch.load(os.path.join(result["run_dir"], "smac.pt"), weights_only=True)
    assert ckpt["format"] == smac.CHECKPOINT_FORMAT and ckpt["env"] == "hopper-medium-v2"
    assert ckpt["update"] == 30 and ckpt["normalized_score"] == result["normalized_score"]
    for key in ("score_residual_rel", "sac_actor_grad_norm"):
        assert np.isfinite(ckpt["diagnostics"][key]) and ckpt["diagnostics"][key] > 0
    assert ckpt["obs_mean"].shape == (OBS_DIM,) and ckpt["alpha"] == 0.2
    _, actor, _, _ = smac.load_checkpoint(os.path.join(result["run_dir"], "smac.pt"), torch.device("cpu"))
    torch.testing.assert_close(actor.state_dict()["net.0.weight"], ckpt["actor"]["net.0.weight"])


def test_non_finite_loss_stops_naming_the_update_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls, original = [0], smac.soft_td_target

    def poisoned(*args, **kw):
        calls[0] += 1
        y = original(*args, **kw)
        return y * float("nan") if calls[0] > 20 else y

    monkeypatch.setattr(smac, "soft_td_target", poisoned)
    args = small_args(tmp_path, write_hdf5(tmp_path / "d.hdf5"), eval_freq=10)
    with pytest.raises(smac.SMACError, match="critic loss became nan at update 21"):
        smac.train(args)
    (run,) = os.listdir(tmp_path / "runs")
    ckpt = torch.load(tmp_path / "runs" / run / "smac.pt", weights_only=True)
    assert ckpt["update"] == 20 and all(torch.isfinite(v).all() for v in ckpt["critic"].values())


def test_command_line_error_is_one_line_without_traceback():
    out = subprocess.run([sys.executable, "smac.py", "--env", "hopper-mediun-v2"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode != 0
    assert "error: unknown env 'hopper-mediun-v2'" in out.stderr and "Traceback" not in out.stderr


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


@pytest.mark.parametrize("module, extra", [(sac_finetune, dict(offline_ratio=0.5)), (td3_finetune, dict(bc_coef=0.4)),
                                           (sac_finetune, dict()), (td3_finetune, dict()),
                                           (sac_finetune, dict(optimizer="muon")),
                                           (td3_finetune, dict(optimizer="muon"))])
def test_finetuner_opens_with_the_offline_score_and_writes_metrics_and_final_checkpoint(
        tmp_path, offline_checkpoint, module, extra):
    path, offline = offline_checkpoint
    result = module.train(online_args(module, tmp_path, path, **extra))
    with open(os.path.join(result["run_dir"], "metrics.csv")) as f:
        rows = list(__import__("csv").DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 150, 300]
    # step 0 is evaluated before any update with smac.py's eval seeds: the same score as smac.py's final evaluation
    assert float(rows[0]["normalized_score"]) == pytest.approx(offline["normalized_score"], abs=1e-3)
    scores = [float(r["normalized_score"]) for r in rows]
    assert result["drop"] == pytest.approx(max(0.0, scores[0] - min(scores[:1])), abs=1e-3)  # 10% of 300: step 0
    assert result["final_score"] == pytest.approx(scores[-1], abs=1e-3) and 0 < result["train_episodes"]
    ckpt, actor, _, _ = smac.load_checkpoint(os.path.join(result["run_dir"], "final.pt"), torch.device("cpu"))
    assert ckpt["env"] == "hopper-medium-v2" and ckpt["summary"]["regret"] == pytest.approx(result["regret"])


def test_drop_and_regret_definitions(tmp_path):
    log = sac_finetune.OnlineLog(str(tmp_path), "hopper-medium-v2", 1000, type("W", (), {"add_scalar": print})())
    log.evals = [(0, 50.0), (50, 45.0), (100, 30.0), (150, 10.0), (1000, 60.0)]  # the 10.0 is after the first 10%
    expert = 3234.3
    log.train_scores = [smac.normalized_score("hopper-medium-v2", r) for r in (expert, expert / 2)]
    summary = log.summary()
    assert summary["drop"] == pytest.approx(20.0) and summary["final_score"] == 60.0
    half = smac.normalized_score("hopper-medium-v2", expert / 2)
    assert summary["regret"] == pytest.approx((0.0 + (1 - half / 100)) / 2)


def test_from_scratch_runs_without_checkpoint(tmp_path):
    result = sac_finetune.train(online_args(sac_finetune, tmp_path, None, env="hopper-medium-v2", total_timesteps=200,
                                            learning_starts=150, eval_freq=200, eval_episodes=1))
    assert os.path.exists(os.path.join(result["run_dir"], "final.pt"))


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
    td3_finetune.train(online_args(td3_finetune, tmp_path, path, total_timesteps=5, learning_starts=10, eval_freq=5,
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


def test_env_that_disagrees_with_the_checkpoint(tmp_path, offline_checkpoint):
    with pytest.raises(smac.SMACError, match="differs from the checkpoint's env hopper-medium-v2"):
        sac_finetune.train(online_args(sac_finetune, tmp_path, offline_checkpoint[0], env="walker2d-medium-v2"))
