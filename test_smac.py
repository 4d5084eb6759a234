"""Tests for SMAC in smac.py's order: the method, the offline loop, online, then the plumbing. They make their own
small data: `OMP_NUM_THREADS=1 python -m pytest -q test_smac.py` (CPU, well under 3 minutes)."""

import contextlib
import csv
import fcntl
import functools
import glob
import hashlib
import http.server
import json
import math
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import types
import urllib.parse

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sac_finetune
import smac
import td3_finetune

OBS_DIM, ACT_DIM = 11, 3  # Hopper-v4
CPU, HERE, NAN = torch.device("cpu"), os.path.dirname(os.path.abspath(__file__)), float("nan")
os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the real hub (a subprocess test points it at a local one)
torch.set_num_threads(1)  # small networks: one thread is as fast, and immune to a busy machine's oversubscription
pytestmark = pytest.mark.filterwarnings("ignore:.*is out of date")  # v4 on purpose: the model of D4RL's v3 envs

def write_hdf5(path, n=400, obs_dim=OBS_DIM, act_dim=ACT_DIM, drop=None, **override):
    """A small D4RL-format file: random transitions, a terminal at t % 100 == 49, a timeout at t % 100 == 99."""
    rng = np.random.default_rng(0)
    data = {"observations": rng.normal(size=(n, obs_dim)), "actions": rng.uniform(-1, 1, size=(n, act_dim)),
            "rewards": rng.normal(size=n), "next_observations": rng.normal(size=(n, obs_dim))}
    data = {k: v.astype(np.float32) for k, v in data.items()}
    data.update(terminals=np.arange(n) % 100 == 49, timeouts=np.arange(n) % 100 == 99)
    data["actions"][::7] = 1.0  # saturated actions, as in real data
    with h5py.File(path, "w") as f:
        for key, value in {**data, **override}.items():
            if key != drop:
                f[key] = value
    return path

def small_args(tmp_path, dataset, **kw):
    return smac.Args(**{**dict(env="hopper-medium-v2", dataset_path=dataset and str(dataset), total_updates=30,
                               batch_size=32, hidden_dim=32, eval_episodes=1, cuda=False, score_model_updates=20,
                               run_dir=str(tmp_path / "runs")), **kw})

def online_args(module, tmp_path, checkpoint, **kw):
    return module.Args(**{**dict(checkpoint=str(checkpoint), total_timesteps=300, learning_starts=100, eval_freq=150,
                                 eval_episodes=2, batch_size=32, run_dir=str(tmp_path / "online"), cuda=False), **kw})

@pytest.fixture(scope="module")
def offline_checkpoint(tmp_path_factory):
    """(smac.pt, train's result, its dataset) of a 30-update SMAC run (kappa 10), evaluated on 2 episodes."""
    dataset = write_hdf5(tmp_path_factory.mktemp("offline") / "d.hdf5", n=600)
    result = smac.train(small_args(dataset.parent, dataset, eval_episodes=2))
    return os.path.join(result["run_dir"], "smac.pt"), result, str(dataset)

def read_csv(path, key=None):
    with open(path) as f:
        return [float(r[key]) for r in csv.DictReader(f)] if key else list(csv.DictReader(f))

# ---------------------------------------------------------------- networks
def test_log_prob_matches_torch_distributions_and_the_twin_critic_two_mlps_and_finite_differences():
    torch.manual_seed(0)
    mean, log_std = torch.randn(8, ACT_DIM), 0.3 * torch.randn(8, ACT_DIM)
    actions, log_pi = smac.tanh_gaussian_sample(mean, log_std)
    dist = torch.distributions.TransformedDistribution(torch.distributions.Normal(mean, log_std.exp()),
                                                       [torch.distributions.TanhTransform()])
    torch.testing.assert_close(log_pi, dist.log_prob(actions.clamp(-0.99999, 0.99999)).sum(-1), rtol=1e-3, atol=1e-3)
    critic, scale = smac.TwinCritic(OBS_DIM, ACT_DIM, 64).double(), smac.ScoreScale(OBS_DIM, 8).double()
    for p in [p for m in critic.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]:
        nn.init.normal_(p)  # each critic's own LayerNorm weights, not the 1s and 0s they start at
    obs, actions = torch.randn(40, OBS_DIM).double(), (torch.rand(40, ACT_DIM) * 2 - 1).double()
    for net in (critic, smac.TwinCritic(OBS_DIM, ACT_DIM, 64, layer_norm=False).double()):  # and without LayerNorm
        assert torch.allclose(net(obs, actions), torch.stack([q(torch.cat([obs, actions], -1))[:, 0] for q in net.qs]))
        assert sum(isinstance(m, nn.LayerNorm) for m in net.modules()) == (4 if net is critic else 0)
    zero_score = types.SimpleNamespace(score=lambda obs, actions, w: torch.zeros_like(actions))
    residual, grad, _ = smac.score_matching_residual(critic, scale, zero_score, obs, actions, None)
    assert grad.shape == (2, 40, ACT_DIM) and torch.equal(residual, grad)  # a zero score: the residual is grad_a Q
    for j in range(ACT_DIM):
        step = 1e-6 * F.one_hot(torch.tensor(j), ACT_DIM).double()
        fd = (critic(obs, actions + step) - critic(obs, actions - step)) / 2e-6
        torch.testing.assert_close(grad[..., j], fd, rtol=1e-4, atol=1e-6)

# ---------------------------------------------------------------- the score model and its return conditioning w
def test_score_model_at_k1_points_along_the_data_score_and_follows_the_return():
    """a ~ N(mu, sigma^2), mu = 0.4 s_0 + 0.5 (2w - 1), w in {0, 1}: blurred by the first noise step it is N(mu,
    sigma^2 + (1 - abar) / abar), whose score the model must give, along the data's own -(a - mu) / sigma^2."""
    g, n, sigma = torch.Generator().manual_seed(0), 20000, 0.15
    obs, w = torch.randn(n, 2, generator=g), torch.randint(0, 2, (n, 1), generator=g).float()
    actions = (0.4 * obs[:, :1] + 0.5 * (2 * w - 1) + sigma * torch.randn(n, 1, generator=g)).clamp(-1, 1)
    torch.manual_seed(0)
    model = smac.ScoreModel(2, 1, 64, steps=5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(1500):
        idx = torch.randint(0, n, (256,))
        opt.zero_grad()
        model.loss(obs[idx], actions[idx], w[idx]).backward()
        opt.step()
    q_obs, q_actions, abar = torch.randn(2000, 2, generator=g), torch.rand(2000, 1, generator=g) * 2 - 1, model.abar[0]
    for q_w in (torch.zeros(2000, 1), torch.ones(2000, 1)):
        offset = q_actions - (0.4 * q_obs[:, :1] + 0.5 * (2 * q_w - 1))
        true = -offset / (sigma**2 + (1 - abar) / abar)
        est = model.score(q_obs, q_actions, q_w).detach()
        assert F.cosine_similarity(est.T, true.T).item() > 0.95  # same field, up to a scale
        assert (est - true).abs().mean() < 0.3 * true.abs().mean()  # and the scale -eps / sqrt(1 - abar_1) is right
        far = offset.abs() > 0.1  # the sign right wherever the model can tell (not at the mode itself)
        assert (est[far].sign() == -offset[far].sign()).float().mean() > 0.97  # (all three fail if w is ignored)

def test_episode_return_w_ends_episodes_at_terminals_timeouts_jumps_and_the_end():
    obs = np.arange(11, dtype=np.float32)[:, None]  # next_observations[t] = observations[t + 1], but a jump at t = 6
    data = {"observations": obs[:-1], "next_observations": np.where(obs[1:] == 7, 100, obs[1:]),
            "rewards": np.array([1, 1, 1, 0, 0, 5, 0, 1, 1, 0], np.float32),
            "dones": np.eye(10)[2], "timeouts": np.eye(10)[4]}  # a terminal at t = 2, a timeout at t = 4
    # episodes [0, 2], [3, 4], [5, 6], [7, 9]: returns 3, 0, 5, 2, normalized over the episodes
    np.testing.assert_allclose(smac.episode_return_w(data), [0.6] * 3 + [0.0] * 2 + [1.0] * 2 + [0.4] * 3, rtol=1e-6)

# ---------------------------------------------------------------- the penalty
def test_penalty_vanishes_when_grad_q_is_a_multiple_of_the_data_score_trains_only_critic_and_scale_at_b_of_a():
    torch.manual_seed(0)
    obs, mean, log_std = torch.randn(64, OBS_DIM), torch.randn(64, ACT_DIM), torch.zeros(64, ACT_DIM)
    scale = smac.ScoreScale(OBS_DIM, 16, init=0.7)
    score = types.SimpleNamespace(score=lambda obs, actions, w: -(actions - obs[:, :ACT_DIM]) / 0.3**2)
    matched, off = (smac.score_matching_penalty(  # Q_i = c log N(a; s[:3], 0.3^2) + f(s): grad_a Q_i = c * score
        lambda s, a: c * (-0.5 * ((a - s[:, :ACT_DIM]) / 0.3) ** 2).sum(-1) + s.sin().sum(-1), scale, score, obs,
        mean, log_std, 1.0) for c in (0.7, 2.0))
    assert off > 1.0 and matched < 1e-8 * off
    # the penalty's gradient reaches the critic and alpha_psi, never the score model (a fixed target) or the actor
    actor, critic = smac.Actor(OBS_DIM, ACT_DIM, 32), smac.TwinCritic(OBS_DIM, ACT_DIM, 32)
    score_model = smac.ScoreModel(OBS_DIM, ACT_DIM, 32)
    smac.score_matching_penalty(critic, scale, score_model, obs, *actor(obs), 0.9).backward()
    assert all(p.grad is None for p in [*actor.parameters(), *score_model.parameters()])
    assert all(sum(p.grad.abs().sum() for p in m.parameters() if p.grad is not None) > 0 for m in (critic, scale))
    mean, log_std = torch.full((20000, ACT_DIM), 0.3), torch.full((20000, ACT_DIM), -4.0)  # B(A), a policy ~ tanh(0.3)
    actions = smac.penalty_actions(mean, log_std)
    near_policy = ((actions - math.tanh(0.3)).abs() < 0.1).all(-1).float().mean().item()
    assert 0.49 < near_policy < 0.51 + 0.001  # half from the policy (+ the few uniform ones that land there)
    assert actions.min() >= -1 and actions.max() <= 1 and (actions < 0).float().mean() > 0.2

# ---------------------------------------------------------------- the offline loop
@pytest.mark.parametrize("score_coef", [10.0, 0.0])
def test_short_offline_run_writes_metrics_and_a_weights_only_checkpoint(tmp_path, score_coef, monkeypatch):
    states, penalty = [], smac.score_matching_penalty
    monkeypatch.setattr(smac, "score_matching_penalty", lambda *a: states.append(len(a[3])) or penalty(*a))
    result = smac.train(small_args(tmp_path, write_hdf5(tmp_path / "d.hdf5"), eval_freq_updates=15,
                                   score_coef=score_coef, penalty_states=8))
    assert states == ([8] * 30 if score_coef else [])  # the penalty at --penalty-states states, at every update
    assert set(result) == {"run_dir", "sps", "normalized_score"} and result["sps"] > 0
    ckpt = torch.load(path := os.path.join(result["run_dir"], "smac.pt"), weights_only=True)
    assert set(ckpt) == {"format", "actor", "critic", "target_critic", "update", *smac.CHECKPOINT_INFO}
    assert ckpt["format"] == smac.CHECKPOINT_FORMAT and ckpt["env"] == "hopper-medium-v2" and ckpt["update"] == 30
    assert ckpt["alpha"] == 0.2 and ckpt["obs_mean"].shape == (OBS_DIM,) and 0 <= ckpt["w_query"] <= 1
    rows = read_csv(os.path.join(result["run_dir"], "metrics.csv"))
    assert [r["update"] for r in rows] == ["15", "30"]
    assert float(rows[-1]["normalized_score"]) == pytest.approx(result["normalized_score"], abs=1e-3)
    # the diffusion model and alpha_psi travel with a SMAC checkpoint, frozen, for the fine-tuners' penalty
    assert (ckpt["score_model"] is None) == (ckpt["score_scale"] is None) == (score_coef == 0)
    if score_coef:
        assert not any(p.requires_grad for net in smac.load_score_nets(ckpt, path, CPU) for p in net.parameters())
    else:  # a baseline checkpoint fine-tunes plain (its kappa is 0); asking for the penalty is an error
        assert sac_finetune.train(online_args(sac_finetune, tmp_path, path, eval_episodes=1))["train_episodes"] > 0
        with pytest.raises(smac.SMACError, match="--score-coef > 0 needs a SMAC checkpoint; .* --score-coef 0"):
            sac_finetune.train(online_args(sac_finetune, tmp_path, path, score_coef=1.0))

def test_a_failed_offline_run_names_its_update_and_keeps_only_a_finite_checkpoint(tmp_path, monkeypatch):
    # lr 1e6: the weights are NaN within 50 updates, long before the first loss check at update 1000
    with pytest.raises(smac.SMACError, match=r"non-finite \(NaN or inf\) by update 50; the last good checkpoint is "
                                             "kept: none was written"):
        smac.train(small_args(tmp_path / "lr", write_hdf5(tmp_path / "d.hdf5"), q_lr=1e6, policy_lr=1e6,
                              total_updates=200, eval_freq_updates=50))
    (run,) = glob.glob(str(tmp_path / "lr" / "runs" / "*"))
    assert not {"smac.pt", "metrics.csv"} & set(os.listdir(run))  # no NaN score reported either
    calls, original = [], smac.soft_td_target
    monkeypatch.setattr(smac, "soft_td_target",  # NaN targets from update 16 on
                        lambda *a: original(*a) * (NAN if calls.append(None) or len(calls) > 15 else 1.0))
    monkeypatch.setattr(smac, "LOG_FREQ", 10)  # checked at log steps only
    with pytest.raises(smac.SMACError, match="td_loss became nan by offline step 20; the last good checkpoint is kept"):
        smac.train(small_args(tmp_path, tmp_path / "d.hdf5", eval_freq_updates=10, critic_layer_norm=False))
    (run,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert read_csv(os.path.join(run, "metrics.csv"), "update") == [10]
    assert smac.load_checkpoint(os.path.join(run, "smac.pt"), CPU)[0]["update"] == 10  # finite, no LayerNorm: loads

def test_a_deeper_mlp_above_the_banner_trains_saves_loads_and_fine_tunes(tmp_path, monkeypatch):
    monkeypatch.setattr(smac, "mlp", lambda i, o, h, activation=nn.ReLU, layer_norm=False: nn.Sequential(
        nn.Linear(i, h), activation(), nn.Linear(h, h), activation(), nn.Linear(h, h), activation(), nn.Linear(h, o)))
    result = smac.train(small_args(tmp_path, write_hdf5(tmp_path / "d.hdf5"), total_updates=5))
    ckpt, actor, critic, _ = smac.load_checkpoint(path := os.path.join(result["run_dir"], "smac.pt"), CPU)
    assert (ckpt["obs_dim"], ckpt["act_dim"], ckpt["hidden_dim"]) == (OBS_DIM, ACT_DIM, 32) and len(actor.net) == 7
    obs, actions = torch.randn(4, OBS_DIM), torch.rand(4, ACT_DIM) * 2 - 1
    q_1 = critic.qs[0](torch.cat([obs, actions], -1)).squeeze(-1)  # the batched forward equals the plain MLP
    torch.testing.assert_close(critic(obs, actions)[0], q_1)
    online = sac_finetune.train(online_args(sac_finetune, tmp_path, path, total_timesteps=150, eval_episodes=1))
    assert online["step0_score"] == pytest.approx(result["normalized_score"], abs=1e-3)

# ---------------------------------------------------------------- online: kappa_t and the transfer metrics
def test_released_score_coef_falls_geometrically_to_the_final_kappa_and_then_stays(tmp_path):
    coef = functools.partial(smac.released_score_coef, 10.0)  # from kappa_0 = 10, over 1000 updates
    assert [coef(0.1, 1000, t) for t in (0, 500, 1000, 50_000)] == pytest.approx([10.0, 1.0, 0.1, 0.1])  # log-linear
    assert coef(0.0, 1000, 999) == pytest.approx(10.0 / 1000 ** 0.999) and coef(0.0, 1000, 1000) == 0.0  # then off
    assert coef(10.0, 1000, 10) == 10.0 and smac.released_score_coef(0.0, 0.0, 1000, 10) == 0.0  # nothing to release
    for flags, coefs in ((dict(), (10.0, 0.1)), (dict(score_coef=1.0), (1.0, 0.01)), (dict(score_coef=0.0), (0, 0)),
                         (dict(score_coef_final=10.0), (10.0, 10.0))):  # default; kappa_0 given; plain; the anchor
        args = online_args(sac_finetune, tmp_path, "smac.pt", **flags)
        assert smac.online_score_coefs(args, 10.0) == pytest.approx(coefs) and args.score_release_updates == 15_000

def test_drop_counts_updates_from_the_hand_over_and_regret_is_the_mean_shortfall(tmp_path):
    # the held-out case: 67.0 at the hand-over, 2.3 after 1000 updates (a window of steps, not updates, missed it)
    evals = [(0, 67.0), (0, 67.0), (100, 40.0), (1000, 2.3), (4000, 20.0), (9000, 50.0)]
    train_scores = [smac.normalized_score({"name": "h", "ref_scores": (-20.27, 3234.3)}, r) for r in (3234.3, 1607.0)]
    metrics = smac.transfer_metrics(evals, train_scores, drop_window=5000)
    assert metrics.pop("regret_from") == "return" and metrics == pytest.approx(dict(step0_score=67.0, drop=64.7,
        lowest_early_score=2.3, final_score=50.0, train_episodes=2, regret=(0.0 + 1 - train_scores[1] / 100) / 2))
    outside = smac.transfer_metrics(evals, [], drop_window=500)  # the fall is outside; no episode: no regret
    assert outside["drop"] == pytest.approx(27.0) and math.isnan(outside["regret"])
    assert smac.transfer_metrics([(0, 40.0), (50, 45.0)], [], drop_window=500)["drop"] == 0.0  # a climb is no drop
    nan_eval = smac.transfer_metrics([(0, 40.0), (100, NAN), (200, 41.0)], [], drop_window=500)
    assert math.isnan(nan_eval["drop"]) and math.isnan(nan_eval["step0_score"])  # min() would have skipped the NaN
    evals = [(0, 50.0), (5000, 40.0), (19_900, 30.0), (20_000, 10.0)]  # default window: max(5000, 10% of the updates)
    for window, updates, drop in ((None, 10_000, 10.0), (None, 199_000, 20.0), (7, 199_000, 0.0)):
        assert smac.transfer_metrics(evals, [], window, updates)["drop"] == drop

# ---------------------------------------------------------------- the fine-tuners
@pytest.mark.parametrize("module, extra", [(sac_finetune, {}), (td3_finetune, {}), (td3_finetune, dict(bc_coef=0.4))])
def test_finetuner_opens_with_the_offline_score_writes_its_records_and_a_final_pt_that_fine_tunes_again(
        tmp_path, offline_checkpoint, module, extra):
    path, offline, _ = offline_checkpoint
    result = module.train(online_args(module, tmp_path, path, **extra))
    rows = read_csv(os.path.join(result["run_dir"], "metrics.csv"))
    assert list(rows[0]) == ["step", "normalized_score", "updates", "score_coef"]
    assert [(int(r["step"]), int(r["updates"])) for r in rows] == [(0, 0), (150, 50), (300, 200)]
    assert [float(r["score_coef"]) for r in rows] == pytest.approx(
        [10.0, *(smac.released_score_coef(10.0, 0.1, 15_000, u) for u in (50, 200))], rel=1e-4)  # the default release
    scores = [float(r["normalized_score"]) for r in rows]  # step 0, before any update, with smac.py's evaluation
    assert scores[0] == pytest.approx(offline["normalized_score"], abs=1e-3)  # seeds: smac.py's final score
    assert result["drop"] == pytest.approx(max(0.0, scores[0] - min(scores)), abs=1e-3)  # the window: 5000 updates
    assert result["final_score"] == pytest.approx(scores[-1], abs=1e-3)
    episodes, task = read_csv(os.path.join(result["run_dir"], "episodes.csv")), torch.load(path)["task"]
    assert len(episodes) == result["train_episodes"] > 0 and list(episodes[0]) == ["step", "return", "normalized_score"]
    assert [float(e["normalized_score"]) for e in episodes] == pytest.approx(
        [smac.normalized_score(task, float(e["return"])) for e in episodes], abs=1e-3)
    regret = np.mean([1 - float(e["normalized_score"]) / 100 for e in episodes])  # recomputable from episodes.csv
    assert result["regret"] == pytest.approx(regret, rel=1e-4)
    (summary,), keys = read_csv(os.path.join(result["run_dir"], "summary.csv")), list(result)[1:]  # after run_dir
    names = "step0_score lowest_early_score drop regret regret_from final_score train_episodes".split()
    assert list(summary) == keys == names and summary.pop("regret_from") == "return"  # locomotion: from returns
    assert [float(summary[k]) for k in summary] == pytest.approx([result[k] for k in summary], rel=1e-4)
    ckpt = smac.load_checkpoint(final := os.path.join(result["run_dir"], "final.pt"), CPU)[0]
    assert ckpt["env"] == "hopper-medium-v2" and ckpt["step"] == 300 and ckpt["online_args"]["total_timesteps"] == 300
    assert (ckpt["alpha"] == 0.2) == (module is td3_finetune)  # SAC's alpha as tuned online; TD3 keeps the offline one
    if module is td3_finetune and not extra:  # SAC from TD3's final.pt: the same policy, and the penalty's nets
        again = sac_finetune.train(online_args(sac_finetune, tmp_path, final, total_timesteps=150))
        assert again["step0_score"] == pytest.approx(result["final_score"], abs=1e-3)

def score_residual(path: str, dataset: str) -> float:  # ||grad_a Q_i - alpha_psi s|| / ||alpha_psi s||, data states
    ckpt, actor, critic, _ = smac.load_checkpoint(path, CPU)
    score_model, score_scale = smac.load_score_nets(ckpt, path, CPU)
    obs = torch.as_tensor(smac.load_dataset("hopper-medium-v2", dataset)["observations"])
    obs, w = (obs - ckpt["obs_mean"]).float() / ckpt["obs_std"].float(), torch.full((len(obs), 1), ckpt["w_query"])
    torch.manual_seed(0)
    residual, _, data_score = smac.score_matching_residual(critic, score_scale, score_model, obs,
                                                           smac.penalty_actions(*actor(obs)), w)
    return (residual.norm() / (score_scale(obs) * data_score).norm()).item()

@pytest.mark.parametrize("module", [sac_finetune, td3_finetune])
def test_the_penalty_kept_online_holds_the_critic_near_the_dataset_score_and_a_release_to_zero_stops_it(
        tmp_path, offline_checkpoint, module, monkeypatch):
    (path, _, dataset), calls, penalty = offline_checkpoint, [], smac.score_matching_penalty
    monkeypatch.setattr(smac, "score_matching_penalty", lambda *a: calls.append(None) or penalty(*a))
    runs = [module.train(online_args(module, tmp_path, path, total_timesteps=400, q_lr=3e-3, **flags)) for flags in (
        dict(score_coef=0.0), dict(score_coef_final=10.0), dict(score_coef_final=0.0, score_release_updates=50))]
    assert len(calls) == 0 + 300 + 49  # none; every update; updates 1..49: from the 50th kappa_t is 0, and no cost
    plain, kept, _ = (score_residual(os.path.join(r["run_dir"], "final.pt"), dataset) for r in runs)
    assert kept < 0.9 * plain  # same seed and data, only the penalty differs (kept / plain: SAC 0.85, TD3 0.86)

def test_td3_first_action_is_tanh_of_the_offline_mean(tmp_path, offline_checkpoint, monkeypatch):
    added, add = [], smac.ReplayBuffer.add
    monkeypatch.setattr(smac.ReplayBuffer, "add", lambda self, **t: added.append(t) or add(self, **t))
    td3_finetune.train(online_args(td3_finetune, tmp_path, offline_checkpoint[0], total_timesteps=5, learning_starts=4,
                                   eval_freq=5, eval_episodes=1, exploration_noise=0.0))
    mean = smac.load_checkpoint(offline_checkpoint[0], CPU)[1](torch.as_tensor(added[0]["observations"]))[0]
    np.testing.assert_allclose(added[0]["actions"], torch.tanh(mean).detach().numpy(), rtol=1e-6)  # at env.reset's

@pytest.mark.parametrize("module", [sac_finetune, td3_finetune])
def test_a_diverged_fine_tune_stops_and_never_reports_a_finite_drop(tmp_path, offline_checkpoint, module, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where MuJoCo logs the NaN actions it is given until the next check
    with pytest.raises(smac.SMACError, match=r"non-finite \(NaN or inf\) by step 150; .* kept: none was written"):
        module.train(online_args(module, tmp_path, offline_checkpoint[0], q_lr=1e6, policy_lr=1e6))
    (run,) = glob.glob(str(tmp_path / "online" / "*"))
    assert sorted(f for f in os.listdir(run) if not f.startswith("events")) == ["episodes.csv", "metrics.csv"]
    assert read_csv(os.path.join(run, "metrics.csv"), "step") == [0]  # no final.pt, no summary.csv, no NaN score

# ---------------------------------------------------------------- flags
@pytest.mark.parametrize("module, flags, message", [(smac, *case) for case in [
    (dict(total_updates=0), "--total-updates must be >= 1, got 0"), (dict(total_updates=-5), "--total-updates"),
    (dict(batch_size=0), "--batch-size must be >= 1"), (dict(batch_size=-3), "--batch-size"),
    (dict(policy_lr=NAN), "--policy-lr must be a finite number > 0, got nan"),
    (dict(eval_episodes=0), "--eval-episodes must be >= 1"), (dict(hidden_dim=0), "--hidden-dim must be >= 1"),
    (dict(gamma=2.0), r"--gamma must be in \[0, 1\], got 2.0"), (dict(tau=0.0), r"--tau must be in \(0, 1\]"),
    (dict(penalty_states=0), r"--penalty-states must be in \[1, --batch-size\], got 0"), (dict(alpha=0), "--alpha"),
    (dict(penalty_states=33), r"--penalty-states must be in \[1, --batch-size\], got 33"), (dict(seed=-1), "--seed"),
    (dict(score_coef=-1.0), "--score-coef must be a finite number >= 0"), (dict(diffusion_steps=0), "--diffusion"),
    (dict(eval_freq_updates=-1), "--eval-freq-updates must be >= 1"), (dict(return_quantile=1.5), "--return-quan"),
    (dict(score_model_updates=-1), "--score-model-updates must be >= 0"), (dict(score_scale_floor=NAN), "--score-sc"),
    (dict(run_dir="afile"), "--run-dir must be a folder, not a file, got .*afile")]] + [
    (m, *case) for m in (sac_finetune, td3_finetune) for case in [
    (dict(total_timesteps=-5), "--total-timesteps must be >= 1"), (dict(total_timesteps=0), "--total-timesteps"),
    (dict(total_timesteps=100), r"--learning-starts must be below --total-timesteps \(no update\), got 100$"),
    (dict(eval_freq=0), "--eval-freq must be >= 1"), (dict(batch_size=0), "--batch-size must be >= 1"),
    (dict(learning_starts=-5), "--learning-starts must be >= 1"), (dict(q_lr=float("inf")), "--q-lr"),
    (dict(score_coef=NAN), "--score-coef must be a finite number >= 0"), (dict(score_coef_final=-1.0), "-final"),
    (dict(drop_window=-1), "--drop-window"), (dict(buffer_size=0), "--buffer-size"),
    (dict(score_release_updates=0), "--score-release-updates"), (dict(policy_frequency=0), "--policy-frequency"),
    (dict(score_coef=0.0, score_coef_final=5.0), r"--score-coef-final 5 is above kappa_0 = 0 \(--score-coef"),
    (dict(score_coef_final=20.0), "--score-coef-final 20 is above kappa_0 = 10 "),  # the checkpoint's kappa 10
    (dict(run_dir="afile"), "a folder, not a file")]] + [(td3_finetune, dict(exploration_noise=-0.1), "--explor"),
    (td3_finetune, dict(policy_noise=NAN), "--policy-noise"), (td3_finetune, dict(noise_clip=-1.0), "--noise-clip"),
    (td3_finetune, dict(bc_coef=-0.4), "--bc-coef must be a finite number >= 0")])
def test_bad_flags_give_one_clear_error_and_write_nothing(tmp_path, offline_checkpoint, module, flags, message):
    (tmp_path / "afile").write_text("x")
    flags = {k: str(tmp_path / v) if k == "run_dir" else v for k, v in flags.items()}
    with pytest.raises(smac.SMACError, match=message):
        module.train(small_args(tmp_path, write_hdf5(tmp_path / "d.hdf5"), **flags) if module is smac else
                     online_args(module, tmp_path, offline_checkpoint[0], **flags))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "online").exists()

# ---------------------------------------------------------------- data loading
def test_loader_reads_the_d4rl_layout_converted_columns_and_timeouts_are_not_terminal(tmp_path):
    data = smac.load_dataset("hopper-medium-v2", str(path := write_hdf5(tmp_path / "d.hdf5")))
    assert data["observations"].shape == (400, OBS_DIM) and data["actions"].shape == (400, ACT_DIM)
    assert data["dones"][49] == 1 and data["dones"][99] == 0 and data["dones"].sum() == 4 and "terminals" not in data
    with h5py.File(path) as f:
        np.testing.assert_array_equal(data["rewards"], f["rewards"][()])
    assert data["task"]["name"] == "hopper-medium-v2" and "Hopper-v4" in data["task"]["env_spec"]  # v4: D4RL's model
    assert smac.normalized_score(data["task"], 3234.3) == pytest.approx(100.0)
    column = dict(rewards=np.ones((400, 1), np.float32), terminals=np.zeros((400, 1), bool))  # converted files
    data = smac.load_dataset("hopper-medium-v2", str(write_hdf5(tmp_path / "col.hdf5", **column)))
    assert data["rewards"].shape == (400,) and data["dones"].shape == (400,) and data["rewards"].dtype == np.float32

@pytest.mark.parametrize("name, change, message", [("hopper-medium-v2", *case) for case in [
    (dict(drop="rewards"), r"lacks the D4RL key\(s\) \['rewards'\]$"),
    (dict(rewards=np.zeros(399, np.float32)), r"the keys have different lengths \[399, 400\]"),
    (dict(rewards=np.full(400, NAN, np.float32)), "rewards contains NaN or inf values"),
    (dict(terminals=np.full(400, NAN)), "terminals contains NaN or inf values"),
    (dict(terminals=np.full(400, 2.0)), r"terminals and timeouts must be 0 or 1 \(True or False\)"),
    (dict(timeouts=np.full(400, -1)), "terminals and timeouts must be 0 or 1"),
    (dict(rewards=np.array([b"1.0"] * 400)), r"rewards holds \|S3 values, not numbers"),
    (dict(obs_dim=5), r"observations has shape \(400, 5\), the env Hopper-v4 needs \(N, 11\)"),
    (dict(act_dim=6), r"actions has shape \(400, 6\)"), (dict(rewards=np.ones((400, 2))), r"rewards has shape \(400,"),
    (dict(n=0), "holds no transitions"), ("folder", "is a folder, not a file"), ("missing", "does not exist"),
    ("garbage", "cannot read .* as HDF5")]] + [
    ("hopper-mediun-v2", {}, "unknown dataset 'hopper-mediun-v2': give a D4RL name .*medium-replay.*-v2 or a Minari "
                             "id such as mujoco/hopper/medium-v0"),
    ("mujoco/hopper/tiny-v0", {}, "--dataset-path is for D4RL-format files; the Minari dataset mujoco/hopper/tiny-v0"),
])
def test_bad_datasets_give_one_clear_error(tmp_path, name, change, message):
    path = write_hdf5(tmp_path / "bad.hdf5", **change) if isinstance(change, dict) else tmp_path / change
    path.mkdir() if change == "folder" else path.write_text("not HDF5") if change == "garbage" else None
    with pytest.raises(smac.SMACError, match=message) as err:
        smac.load_dataset(name, str(path))
    assert "\n" not in str(err.value) and len(str(err.value).replace(str(path), "")) < 200  # a terminal's line

def test_a_tiny_dataset_is_an_error_and_actions_outside_the_action_space_a_warning(tmp_path, monkeypatch):
    with pytest.raises(smac.SMACError, match="holds 1 transitions, fewer than one minibatch: .*--batch-size .*32"):
        smac.train(small_args(tmp_path, write_hdf5(tmp_path / "one.hdf5", n=1), total_updates=2))
    actions, buffers, dataset_buffer = np.zeros((400, ACT_DIM), np.float32), [], smac.dataset_buffer
    actions[:4] = 1.5
    monkeypatch.setattr(smac, "dataset_buffer", lambda *a: buffers.append(dataset_buffer(*a)) or buffers[-1])
    with pytest.warns(UserWarning, match=r"1.00% of the action entries lie outside .*up to 1.5.*clipped"):
        smac.train(small_args(tmp_path, write_hdf5(tmp_path / "wide.hdf5", actions=actions), total_updates=2))
    assert buffers[0].data["actions"].abs().max() == 1.0  # what the score model and the critic are trained on

# ---------------------------------------------------------------- D4RL downloads (servers on 127.0.0.1 only)
class Handler(http.server.BaseHTTPRequestHandler):
    def send(self, code, body=b"", headers=(), length=None):
        self.send_response(code)
        for key, value in [("Content-Length", str(len(body) if length is None else length)), *headers]:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body if self.command == "GET" else b"")

    def log_message(self, *args):
        pass

class D4RLMirror(Handler):
    """Serves server.files {path: bytes}; with server.half, announces a whole file, sends half and closes."""
    def do_GET(self):
        if (body := self.server.files.get(self.path.lstrip("/"))) is None:
            return self.send(404)
        self.send(200, body[: len(body) // 2] if self.server.half else body, length=len(body))
        self.close_connection = True

def serve(handler, **attributes):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.__dict__.update(attributes, url=f"http://127.0.0.1:{server.server_port}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server

@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A D4RL mirror as $D4RL_URL, and as $D4RL_DATASET_DIR a cache folder that does not exist yet."""
    server = serve(D4RLMirror, files={}, half=False)
    monkeypatch.setenv("D4RL_URL", server.url)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    yield server
    server.shutdown()

def test_a_download_enters_the_cache_whole_is_trained_on_and_read_from_there_and_a_bad_one_named(tmp_path, mirror):
    mirror.files["hopper_medium-v2.hdf5"] = write_hdf5(tmp_path / "d.hdf5").read_bytes()
    smac.train(small_args(tmp_path, None))
    cached = tmp_path / "cache" / "hopper_medium-v2.hdf5"
    assert os.listdir(cached.parent) == [cached.name] and cached.read_bytes() == mirror.files.pop(cached.name)
    np.testing.assert_array_equal(smac.load_dataset("hopper-medium-v2", None)["rewards"],  # the mirror has it no more
                                  smac.load_dataset("hopper-medium-v2", str(cached))["rewards"])
    for content, message in ((b"from an older download", "cannot read {} as HDF5 .*; delete it and it is downloaded "
                              "again$"), (None, r"{} lacks the D4RL key\(s\) \['actions'\]; delete it$")):
        cached.write_bytes(content) if content else write_hdf5(cached, drop="actions")
        with pytest.raises(smac.SMACError, match=message.format(re.escape(str(cached)))):
            smac.load_dataset("hopper-medium-v2", None)

@pytest.mark.parametrize("url, served", [
    ("{mirror}", b"<html>mirror maintenance</html>"),  # an error page sent with status 200
    ("{mirror}", "half"),  # the connection closed half-way
    ("{mirror}", None),  # 404
    ("{mirror}/{{env}}_{{dataset}}-v2.hdf5", b"x"),  # $D4RL_URL in its old template form: 404
    ("http://127.0.0.1:9", None),  # port 9: nothing listens, as with no network
    ("notaurl", None)])  # checked before torch.hub, which would leave its .partial file
def test_a_download_that_is_not_a_whole_hdf5_file_names_the_url_and_leaves_nothing(tmp_path, mirror, url, served,
                                                                                     monkeypatch):
    mirror.half = served == "half"
    mirror.files["hopper_medium-v2.hdf5"] = write_hdf5(tmp_path / "d.hdf5").read_bytes() if mirror.half else served
    monkeypatch.setenv("D4RL_URL", url := url.format(mirror=mirror.url))
    with pytest.raises(smac.SMACError, match="could not download .* as a whole HDF5 file .*; nothing was kept; .*"
                                             "--dataset-path") as err:
        smac.train(small_args(tmp_path, None))
    assert f"{url}/hopper_medium-v2.hdf5" in str(err.value) and "\n" not in str(err.value)
    assert os.listdir(tmp_path / "cache") == [] and not (tmp_path / "runs").exists()

# ---------------------------------------------------------------- Minari data
def record_minari(name, env_id, episodes=6, steps=60, refs=(-100.0, 900.0), successes=None, eval_env=None, **kwargs):
    """Random-action episodes of a real env made the Minari dataset `name` by minari (infos['success'] as
    successes(episode, T + 1) says, so the test knows which steps succeeded)."""
    import minari
    from minari.data_collector import EpisodeBuffer
    env, rng, buffers = smac.gym.make(env_id, max_episode_steps=steps, **kwargs), np.random.default_rng(0), []
    for i in range(episodes):
        obs, actions, rewards, ends = [env.reset(seed=i)[0]], [], [], [(False, False)]
        while not any(ends[-1]):
            actions.append(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
            obs.append((step := env.step(actions[-1]))[0]), rewards.append(step[1]), ends.append(step[2:4])
        flags = successes and successes(i, len(obs))  # None: the episode's infos hold no success
        infos = {} if flags is None else {"infos": {"success": flags}}
        space = env.observation_space  # dictionary observations (kitchen) stacked per key, as minari stores them
        obs = smac.gym.vector.utils.concatenate(space, obs, smac.gym.vector.utils.create_empty_array(space, len(obs)))
        buffers.append(EpisodeBuffer(id=i, observations=obs, actions=np.array(actions), rewards=rewards, **infos,
                                     terminations=np.array(ends[1:])[:, 0], truncations=np.array(ends[1:])[:, 1]))
    minari.create_dataset_from_buffers(name, buffers, env=env.spec, eval_env=eval_env or env.spec,
                                       ref_min_score=refs[0], ref_max_score=refs[1], algorithm_name="uniform")
    return buffers

@pytest.fixture
def minari_dataset(tmp_path, monkeypatch):
    """Six Hopper-v4 episodes of 60 steps at most, made a Minari dataset by minari in $MINARI_DATASETS_PATH."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("MINARI_REMOTE", "hf://127.0.0.1-no-such-remote")  # a missing id must not reach a network
    return "mujoco/hopper/tiny-v0", record_minari("mujoco/hopper/tiny-v0", "Hopper-v4")

def test_minari_dataset_trains_and_the_fine_tuner_needs_nothing_else(tmp_path, minari_dataset):
    (name, episodes), first = minari_dataset, minari_dataset[1][0]
    data = smac.load_dataset(name, None)
    np.testing.assert_allclose(data["observations"][: len(first.actions)], first.observations[:-1], rtol=1e-6)
    np.testing.assert_allclose(data["next_observations"][: len(first.actions)], first.observations[1:], rtol=1e-6)
    assert len(data["rewards"]) == sum(len(e.actions) for e in episodes) and data["task"]["ref_scores"] == [-100, 900]
    assert data["dones"].sum() == sum(e.terminations.sum() for e in episodes) > 0  # truncations are not terminal
    result = smac.train(small_args(tmp_path, None, env=name))  # scored with the dataset's own references, -100 and 900
    ckpt, actor, _, _ = smac.load_checkpoint(path := os.path.join(result["run_dir"], "smac.pt"), CPU)
    assert ckpt["env"] == name and ckpt["task"] == data["task"] and "/mujoco_hopper_tiny-v0__smac__" in path
    env = smac.make_env(ckpt["task"], ckpt["obs_mean"].numpy(), ckpt["obs_std"].numpy())
    (episode_return,), (success,) = smac.evaluate(actor, env, 1, CPU)
    assert env.spec.id == "Hopper-v4" and success is None  # locomotion: no success signal
    assert result["normalized_score"] == pytest.approx((episode_return + 100) / 10)
    online = sac_finetune.train(online_args(sac_finetune, tmp_path, path, eval_episodes=1))
    assert online["step0_score"] == pytest.approx(result["normalized_score"], abs=1e-3)
    with pytest.raises(smac.SMACError, match=r"cannot load the Minari dataset mujoco/hopper/absent-v0 \(Offline"):
        smac.load_dataset("mujoco/hopper/absent-v0", None)  # neither on disk nor reachable ($HF_HUB_OFFLINE)

@pytest.fixture
def robotics(tmp_path, monkeypatch):  # gymnasium-robotics' envs, registered and fixed as smac.make_env does
    import gymnasium_robotics
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    smac.gym.register_envs(gymnasium_robotics)
    smac.fix_robotics_joint_types()

def fine_tune_both(tmp_path, checkpoint):  # (summary, episodes.csv, metrics.csv) of a short SAC and TD3 run
    for module in (sac_finetune, td3_finetune):
        run = module.train(online_args(module, tmp_path, checkpoint, total_timesteps=60, learning_starts=20,
                                       eval_freq=30, batch_size=16))["run_dir"]
        yield *[read_csv(os.path.join(run, f)) for f in ("summary.csv", "episodes.csv", "metrics.csv")],

def test_the_binary_reward_follows_the_recorded_success_offline_and_online_and_regret_counts_successes(
        tmp_path, robotics, monkeypatch):
    name = "D4RL/door/cloned-v2"  # the paper's id, a tiny recording; the test writes success at 3 known steps
    record_minari(name, "AdroitHandDoor-v1", 3, 20, (0.0, 4.0), lambda i, n: (np.arange(n) >= n - 3) & (i == 1))
    dense, binary = (smac.load_dataset(name, None, b) for b in (False, True))
    assert binary["rewards"].tolist() == [0.0] * 37 + [1.0] * 3 + [0.0] * 20 and (dense["rewards"] != 0).all()
    assert binary["task"]["binary_reward"] and not dense["task"]["binary_reward"]
    result = smac.train(small_args(tmp_path, None, env=name, binary_reward=True, batch_size=16))
    ckpt = smac.load_checkpoint(path := os.path.join(result["run_dir"], "smac.pt"), CPU)[0]
    assert ckpt["task"]["binary_reward"] and read_csv(os.path.join(result["run_dir"], "metrics.csv"), "success_rate")
    env = smac.make_env(ckpt["task"], 0.0, 1.0)
    env.reset(seed=0)
    env.unwrapped.data.qpos[env.unwrapped.door_hinge_addrs] = 1.5  # the door opened: a success
    assert smac.step_success(env.step(np.zeros(env.action_space.shape, np.float32))[-1]) is True
    assert smac.step_success({"success": np.False_}) is False and smac.step_success({}) is None  # no signal
    kitchen = [dict(tasks_to_complete=[], episode_task_completions=["kettle"]),  # tasks removed when done, or kept:
               dict(tasks_to_complete=["kettle"], episode_task_completions=["kettle"]),
               dict(tasks_to_complete=["kettle", "microwave"], episode_task_completions=["kettle"])]
    assert [smac.step_success(info) for info in kitchen] == [True, True, False]
    added, add = [], smac.ReplayBuffer.add
    monkeypatch.setattr(smac.ReplayBuffer, "add", lambda self, **t: added.extend(t["rewards"]) or add(self, **t))
    for (summary,), episodes, evals in fine_tune_both(tmp_path, path):  # a random policy never opens the door
        assert (summary["regret_from"], summary["regret"], len(episodes)) == ("success", "1", 3)
        assert [e["success"] for e in episodes] == ["0"] * 3 and [e["success_rate"] for e in evals] == ["0"] * 3
        assert float(episodes[0]["return"]) < 0  # the env's dense return is scored, the 0/1 reward learned from
    assert set(added) == {0.0} and len(added) == 2 * 60
    assert smac.transfer_metrics([(0, 1.0)], [5.0] * 4, 10, 0, [True, False, True, True])["regret"] == 0.25

def test_an_env_whose_actions_are_not_in_minus_1_1_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    record_minari("mujoco/humanoid/tiny-v0", "Humanoid-v4", 1, 5)  # Humanoid's actions: [-0.4, 0.4]
    with pytest.raises(smac.SMACError, match=r"Humanoid-v4's actions are Box\(-0.4, 0.4.*live in \[-1, 1\]"):
        smac.load_dataset("mujoco/humanoid/tiny-v0", None)


@pytest.mark.parametrize("env_id, successes, message", [
    ("Hopper-v4", lambda i, n: np.zeros(n, bool), "--binary-reward needs an env that reports success online; Hopper"),
    ("AdroitHandDoor-v1", lambda i, n: np.full(n, 2), r"infos\['success'\] must be True or False at each step"),
    ("AdroitHandDoor-v1", lambda i, n: np.zeros(n - 2, bool), r"infos\['success'\] must be True or False at each"),
    ("AdroitHandDoor-v1", lambda i, n: None if i else np.zeros(n, bool), "success at every step of every episode")])
def test_a_binary_reward_the_data_or_env_cannot_give_is_one_clear_error(tmp_path, robotics, env_id, successes, message):
    record_minari("test/success/bad-v0", env_id, 2, 5, successes=successes)
    with pytest.raises(smac.SMACError, match=message):
        smac.load_dataset("test/success/bad-v0", None, binary_reward=True)

def test_kitchen_dictionary_observations_read_as_online_and_a_dataset_unlike_its_env_is_refused(tmp_path, robotics):
    name, tasks = "D4RL/kitchen/partial-v2", ["microwave", "kettle", "light switch", "slide cabinet"]  # partial's
    record_minari(name, "FrankaKitchen-v1", 2, 20, (0.0, 4.0), tasks_to_complete=tasks)
    data = smac.load_dataset(name, None)
    assert data["observations"].shape == (40, 59 + 2 * (1 + 7 + 2 + 1))  # the robot, achieved and desired goals
    reset = smac.make_env(data["task"], 0.0, 1.0).reset(seed=0)[0]  # the recorded episode 0 began there
    np.testing.assert_allclose(data["observations"][0], reset, rtol=1e-6)
    with pytest.raises(smac.SMACError, match="--binary-reward needs the env's success"):
        smac.load_dataset(name, None, binary_reward=True)
    result = smac.train(small_args(tmp_path, None, env=name, batch_size=16))
    for (summary,), _, evals in fine_tune_both(tmp_path, os.path.join(result["run_dir"], "smac.pt")):
        assert summary["regret_from"] == "success" and summary["regret"] == "1" and "success_rate" in evals[0]
    unlike = smac.gym.make("FrankaKitchen-v1", tasks_to_complete=["microwave"]).spec
    record_minari("D4RL/kitchen/unlike-v2", "FrankaKitchen-v1", 1, 5, eval_env=unlike, tasks_to_complete=tasks)
    with pytest.raises(smac.SMACError, match=r"unlike-v2 records observations Dict.* its env FrankaKitchen-v1 has"):
        smac.load_dataset("D4RL/kitchen/unlike-v2", None)

class FakeHub(Handler):
    """The few Hugging Face Hub routes minari's download uses ($HF_ENDPOINT), serving repos from server.root."""
    def do_GET(self):
        root, url, sha = self.server.root, urllib.parse.urlparse(self.path), "0" * 40
        parts = url.path.strip("/").split("/")
        repo = os.path.join(root, *parts[3:4]) if parts[:2] == ["api", "datasets"] else ""
        if parts == ["api", "datasets"]:  # list_datasets(author=..., search=...)
            query = urllib.parse.parse_qs(url.query)
            body = [{"id": f"{query['author'][0]}/{r}", "_id": r, "private": False, "tags": []}
                    for r in sorted(os.listdir(root)) if query.get("search", [""])[0] in r]
        elif parts[4:5] == ["revision"]:  # snapshot_download: the repo's commit
            body = {"id": "/".join(parts[2:4]), "sha": sha, "siblings": []}
        elif parts[4:5] == ["tree"]:  # ... and its files
            body = [{"type": "file", "path": os.path.relpath(f, repo), "size": os.path.getsize(f), "oid": sha}
                    for f in (os.path.join(d, f) for d, _, names in os.walk(repo) for f in names)]
        elif parts[0] == "datasets" and parts[3] == "resolve":  # /datasets/{author}/{repo}/resolve/{rev}/{path}
            if not os.path.isfile(path := os.path.join(root, parts[2], *parts[5:])):
                return self.send(404, b"", [("X-Error-Code", "EntryNotFound")])
            body = open(path, "rb").read()
            return self.send(200, body, [("ETag", f'"{hashlib.sha1(body).hexdigest()}"'), ("X-Repo-Commit", sha)])
        else:
            return self.send(404, b"", [("X-Error-Code", "RepoNotFound")])
        self.send(200, json.dumps(body).encode(), [("Content-Type", "application/json")])

    do_HEAD = do_GET

def test_minari_downloads_from_a_hub_unknown_ids_and_a_missing_extra_are_told_apart(tmp_path, minari_dataset):
    # minari_dataset's folder becomes the hub's repo farama-minari/mujoco, with the namespace metadata an upload writes
    name, episodes = minari_dataset
    shutil.copytree(tmp_path / "minari", hub_root := tmp_path / "hub")
    meta = hub_root / "mujoco" / "namespace_metadata.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "datasets": [name], "namespaces": ["mujoco/hopper"]}))
    server = serve(FakeHub, root=str(hub_root))
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "MINARI_REMOTE": "hf://farama-minari", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1",
           "MINARI_DATASETS_PATH": str(tmp_path / "home" / ".minari" / "ds")}  # empty: a fresh machine
    def load(*dataset_ids, block_hub_client=False):  # in a fresh process: each id's transitions, or its error
        code = ("import sys, smac\n" + ("sys.modules['huggingface_hub'] = None\n" if block_hub_client else "") +
                "for i in sys.argv[1:]:\n    try:\n        print(len(smac.load_dataset(i, None)['rewards']))\n"
                "    except smac.SMACError as e:\n        print('error:', e)")
        out = subprocess.run([sys.executable, "-c", code, *dataset_ids], capture_output=True, text=True, env=env,
                             cwd=HERE, timeout=120).stdout  # minari's own lines (Dataset ... downloaded to ...) aside
        return [line for line in out.splitlines() if line.startswith("error:") or line.isdigit()]
    transitions = str(sum(len(e.actions) for e in episodes))
    assert load(name, block_hub_client=True) == [f"error: cannot load the Minari dataset {name} (it is not on disk, "
                                                 "and downloading it needs huggingface_hub: pip install 'minari[hf]')"]
    assert load("mujoco/hopper/absent-v0", name) == [
        "error: cannot load the Minari dataset mujoco/hopper/absent-v0 (unknown: neither in $MINARI_DATASETS_PATH nor "
        "on hf://farama-minari)", transitions]  # and the known one downloaded, then read
    assert (tmp_path / "home" / ".minari" / "ds" / "mujoco" / "hopper" / "tiny-v0" / "data" / "main_data.hdf5").exists()
    server.shutdown()
    assert load(name, block_hub_client=True) == [transitions]  # from now on read from disk, with the hub gone

# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("module", [sac_finetune, td3_finetune])
@pytest.mark.parametrize("make_bad, message", [(lambda p, c: None, "checkpoint .*bad.pt does not exist"),
    (lambda p, c: p.mkdir(), "checkpoint .*bad.pt is a folder, not a file"),
    (lambda p, c: p.write_bytes(b"not a checkpoint at all"), "cannot read .* not a weights-only torch file"),
    (lambda p, c: torch.save({"payload": type("Exploit", (), {"__reduce__": lambda self: (os.system, (
        "echo pwned",))})()}, p), "cannot read .* not a weights-only torch file"),  # pickled code, never run
    (lambda p, c: torch.save({"weights": torch.zeros(2)}, p), "not a SMAC checkpoint of this version"),
    (lambda p, c: torch.save({**c, "format": "smac-checkpoint-v5"}, p), "not a SMAC checkpoint of this version"),
    (lambda p, c: torch.save({"format": smac.CHECKPOINT_FORMAT, "actor": {}}, p), "incomplete SMAC checkpoint"),
    (lambda p, c: torch.save({k: v for k, v in c.items() if k != "w_query"}, p), r"lacks \['w_query'\]"),
    (lambda p, c: torch.save({**c, "critic": {**c["critic"], "qs.0.0.weight": c["critic"]["qs.0.0.weight"] * NAN}},
                             p), "holds non-finite"),
    (lambda p, c: torch.save({**c, "hidden_dim": 16}, p), "the networks do not match the recorded shapes"),
    (lambda p, c: torch.save({**c, "obs_std": torch.zeros(OBS_DIM)}, p), "observation statistics"),
    (lambda p, c: torch.save({**c, "task": {**c["task"], "ref_scores": [5.0, 5.0]}}, p), "expert's not above"),
    (lambda p, c: torch.save({**c, "env": "walker2d-medium-v2"}, p), "and its task 'hopper-medium-v2' disagree"),
    (lambda p, c: torch.save({**c, "obs_mean": torch.full((OBS_DIM,), NAN)}, p), "observation statistics"),
    (lambda p, c: torch.save({**c, "obs_mean": torch.zeros(5), "obs_std": torch.ones(5)}, p), "observation statistics"),
])
def test_bad_checkpoints_give_one_clear_error(tmp_path, offline_checkpoint, module, make_bad, message, capfd):
    make_bad(path := tmp_path / "bad.pt", torch.load(offline_checkpoint[0], weights_only=True))
    with pytest.raises(smac.SMACError, match=message) as err:
        module.train(online_args(module, tmp_path, path))
    assert "weights_only=False" not in str(err.value) and "pwned" not in capfd.readouterr().out  # nor torch's advice
    assert not (tmp_path / "online").exists()

def test_run_log_names_its_folder_and_writes_a_checkpoint_only_whole_and_finite(tmp_path, monkeypatch):
    monkeypatch.setattr(smac.time, "time", lambda: 1234.0)
    log, second = (smac.RunLog(small_args(tmp_path, None), "mujoco/hopper/medium-v0") for _ in range(2))
    assert log.run_name == "mujoco_hopper_medium-v0__smac__1__1234" and os.path.isdir(log.dir)
    assert second.run_name == f"{log.run_name}_{os.getpid()}" and os.path.isdir(second.dir)  # in the same second
    actor, critic, save = smac.Actor(OBS_DIM, ACT_DIM, 8), smac.TwinCritic(OBS_DIM, ACT_DIM, 8), torch.save
    log.save("smac.pt", actor, critic, critic, update=1, score_model=smac.ScoreScale(OBS_DIM, 8))
    saved = torch.load(path := os.path.join(log.dir, "smac.pt"), weights_only=True)
    assert saved["update"] == 1 and saved["format"] == smac.CHECKPOINT_FORMAT and "net.0.weight" in saved["score_model"]
    for fault in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        def failing_save(obj, f, fault=fault):  # the temporary file written, or half of it, then the fault
            save(obj, f)
            raise fault
        monkeypatch.setattr(torch, "save", failing_save)
        with pytest.raises(type(fault)):
            log.save("smac.pt", actor, critic, critic, update=2)
        assert [f for f in os.listdir(log.dir) if not f.startswith("events")] == ["smac.pt"]  # not renamed: removed
        assert torch.load(path, weights_only=True)["update"] == 1 and log.last_checkpoint == path
    monkeypatch.setattr(torch, "save", save)
    actor.net[0].weight.data[0, 0] = NAN
    with pytest.raises(smac.SMACError, match=re.escape(f"non-finite (NaN or inf) by the checkpoint {path}; the last "
                                                       f"good checkpoint is kept: {path}")):
        log.save("smac.pt", actor, critic, critic, update=3)
    assert torch.load(path, weights_only=True)["update"] == 1
    log.writer.close(), second.writer.close()

def cli(module, argv, monkeypatch, capsys):  # a script's command line in this process: (its error or None, output)
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # pytest's own SIGTERM handling stays
    try:
        return smac.main(module.train, module.Args), capsys.readouterr().out
    except SystemExit as e:
        return str(e.code), capsys.readouterr().out

def argv(tmp_path, checkpoint=None, **flags) -> list:
    """A small run's command line: smac.py's, or with a checkpoint a fine-tuner's (a flag None is left out)."""
    defaults = dict(checkpoint=checkpoint, total_timesteps=300, learning_starts=100, run_dir=tmp_path / "online") \
        if checkpoint else dict(env="hopper-medium-v2", dataset_path=write_hdf5(tmp_path / "d.hdf5"), total_updates=30,
                                hidden_dim=32, score_model_updates=10, run_dir=tmp_path / "runs")
    return [x for k, v in {**defaults, "batch_size": 32, "eval_episodes": 1, **flags}.items() if v is not None
            for x in ([f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)]))] + ["--no-cuda"]

@pytest.mark.parametrize("module", [smac, sac_finetune, td3_finetune])
def test_full_disk_is_one_line_and_help_names_variables(tmp_path, offline_checkpoint, module, monkeypatch, capsys):
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    error, _ = cli(module, argv(tmp_path, None if module is smac else offline_checkpoint[0]), monkeypatch, capsys)
    shown = subprocess.run([sys.executable, f"{module.__name__}.py", "--help"], capture_output=True, text=True).stdout
    assert error == "error: [Errno 28] No space left on device" and "OMP_NUM_THREADS=1" in shown
    assert ("$D4RL_DATASET_DIR" in shown and "$MINARI_DATASETS_PATH" in shown) == (module is smac)

def test_logs_say_only_what_is_true(tmp_path, offline_checkpoint, monkeypatch, capsys):
    error, printed = cli(smac, argv(tmp_path, score_coef=0), monkeypatch, capsys)
    assert error is None and "offline step=30 " in printed  # a run shorter than LOG_FREQ prints its losses once
    assert "score_model step" not in printed and "nan" not in printed  # the baseline trains no diffusion model
    monkeypatch.setattr(smac, "LOG_FREQ", 50)
    for module in (sac_finetune, td3_finetune):
        _, printed = cli(module, argv(tmp_path, offline_checkpoint[0]), monkeypatch, capsys)
        online_lines = [line for line in printed.splitlines() if line.startswith("online step=")]
        assert [line.split()[1] for line in online_lines] == ["step=150", "step=200", "step=250", "step=300"]
        assert all(("alpha=" in line) == (module is sac_finetune) for line in online_lines)  # TD3 has no alpha
        losses = [dict(kv.split("=") for kv in line.split()[2:]) for line in online_lines]
        assert all("td_loss" in line and float(line["score_loss"]) > 0 for line in losses)  # L_TD, L_SM apart
        assert [line.split()[1] for line in printed.splitlines() if line.startswith("eval ")] == ["step=0", "step=300"]

# ---------------------------------------------------------------- logs and the command line
@pytest.mark.parametrize("module, flags, env, error", [
    (m, *case) for m in (smac, sac_finetune, td3_finetune) for case in [
    (dict(run_dir="{tmp}/afile/sub"), {}, "error: [Errno 20] Not a directory: '{tmp}/afile/sub'"),
    (dict(run_dir="/proc/x"), {}, "error: [Errno 2] No such file or directory: '/proc/x'"),
    (dict(seed=-1), {}, "error: --seed must be in [0, 2**32 - 1], got -1"),
    (dict(track=True), {}, "error: --track needs Weights and Biases: pip install")]] + [(smac, *case) for case in [
    (dict(hidden_dim=2**22), {}, "error: out of memory"),  # 64 TiB of weights; the message names --hidden-dim
    (dict(env="hopper-mediun-v2"), {}, "error: unknown dataset 'hopper-mediun-v2': give a D4RL name"),
    (dict(dataset_path=None), dict(D4RL_DATASET_DIR="/proc/x/cache"), "error: [Errno 2] No such file or directory")]])
def test_set_up_mistakes_and_faults_are_one_line_without_traceback(tmp_path, offline_checkpoint, module, flags, env,
                                                                    error, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as when it is not installed
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    flags = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in flags.items()}
    message, _ = cli(module, argv(tmp_path, None if module is smac else offline_checkpoint[0], **flags), monkeypatch,
                     capsys)
    assert message.startswith(error.format(tmp=tmp_path)) and "\n" not in message
    assert ("--hidden-dim" in message) == ("out of memory" in error)
    if "--" in error:  # a flag's mistake: found before any folder is made
        assert not (tmp_path / "runs").exists() and not (tmp_path / "online").exists()

def run_script(args, stop_when_exists=None, tty=False, stop_signal=signal.SIGINT):
    """Runs a script as a user would: (exit code, stdout, stderr); sends stop_signal once stop_when_exists exists."""
    master, slave = pty.openpty() if tty else (None, subprocess.PIPE)
    if tty:  # a terminal of 80 columns (a new pty has 0, and tqdm draws a bar as wide as the terminal)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=HERE, stdout=subprocess.PIPE, stderr=slave,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},  # a background shell's children ignore
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # SIGINT: undone
    deadline = time.time() + 120
    while stop_when_exists and not glob.glob(stop_when_exists) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    if stop_when_exists:
        proc.send_signal(stop_signal)
    if not tty:
        out, err = proc.communicate(timeout=300)
        return proc.returncode, out.decode(), err.decode()
    os.close(slave)
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the script has ended
        while chunk := os.read(master, 1 << 16):
            chunks.append(chunk)
    stdout = proc.stdout.read().decode()
    return proc.wait(), stdout, b"".join(chunks).decode(errors="replace")

@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_keep_the_last_checkpoint_and_say_where_in_one_line(tmp_path, stop_signal):
    offline = ["smac.py", *argv(tmp_path, dataset_path=write_hdf5(tmp_path / "d.hdf5", n=600), total_updates=100000,
                                eval_freq_updates=20)]
    code, _, err = run_script(offline, str(tmp_path / "runs" / "*" / "smac.pt"), stop_signal=stop_signal)
    (path,) = glob.glob(str(tmp_path / "runs" / "*" / "smac.pt"))
    assert code == 1 and "Traceback" not in err and err.endswith(f"interrupted; the last checkpoint is kept: {path}\n")
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".")]  # no temporary file left
    smac.load_checkpoint(path, CPU)
    if stop_signal == signal.SIGINT:  # and a fine-tune, stopped, can be evaluated or fine-tuned again
        online = ["sac_finetune.py", *argv(tmp_path, path, total_timesteps=100000, eval_freq=50, learning_starts=20)]
        code, _, err = run_script(online, str(tmp_path / "online" / "*" / "final.pt"))
        (final,) = glob.glob(str(tmp_path / "online" / "*" / "final.pt"))
        assert code == 1 and "Traceback" not in err and err.endswith(f"the last checkpoint is kept: {final}\n")
        smac.load_checkpoint(final, CPU)

@pytest.mark.parametrize("tty", [False, True])
def test_progress_bar_on_a_terminal_only(tmp_path, tty):
    code, stdout, stderr = run_script(["smac.py", *argv(tmp_path)], tty=tty)
    assert code == 0, stderr
    bar = "offline updates: 100%" in stderr and "it/s" in stderr  # tqdm draws on stderr when it is a terminal
    assert bar == tty and ("\r" in stdout + stderr) == tty
