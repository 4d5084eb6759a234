"""Stand-in for the old `gym` API (<= 0.23) that CORL's scripts use, over gymnasium's v4 MuJoCo envs: reset()
returns the observation, step() four values (done = terminated or truncated, as the old TimeLimit), and a D4RL name
gives its env with D4RL's reference returns (get_normalized_score). env.seed(s) follows smac's protocol: the first call
seeds the next reset (CORL's set_seed at the start: the training env's stream, as smac's fine-tuners start theirs);
every later call (CORL's eval_actor, before each evaluation) makes the next episodes reset with seeds 0, 1, 2, ...:
smac's evaluation episodes, the same for every method and run."""

import itertools

import gymnasium

import smac

from . import wrappers  # noqa: F401  (gym.wrappers.TransformObservation, TransformReward)

Env = gymnasium.Env


class D4RLEnv:
    def __init__(self, name: str):
        env = name.split("-")[0]  # as smac.read_d4rl_file makes a D4RL name's task
        task = {"name": name, "env_spec": gymnasium.spec(smac.D4RL_ENVS[env]).to_json()}
        self.name, self.env = name, smac.make_env(task, 0.0, 1.0)
        self.observation_space, self.action_space = self.env.observation_space, self.env.action_space
        self._max_episode_steps = self.env.spec.max_episode_steps
        self.ref_min_score, self.ref_max_score = smac.REF_RETURNS[env]
        self.next_seed, self.seed_calls, self.episode_seeds = None, 0, None

    @property
    def unwrapped(self):
        return self

    def seed(self, seed=None):
        self.seed_calls += 1
        if self.seed_calls == 1:
            self.next_seed = seed
        else:
            self.episode_seeds = itertools.count()  # episode i of the evaluation: seed i, as smac.evaluate

    def reset(self):
        seed = next(self.episode_seeds) if self.episode_seeds is not None else self.next_seed
        obs, _ = self.env.reset(seed=seed)
        self.next_seed = None
        return obs

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, float(reward), terminated or truncated, info

    def get_normalized_score(self, episode_return):
        return (episode_return - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)  # D4RL: a fraction


def make(name: str, **kwargs):
    return D4RLEnv(name)
