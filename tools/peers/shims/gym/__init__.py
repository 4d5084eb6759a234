"""Stand-in for the old `gym` API (<= 0.23) that CORL's scripts use, over gymnasium's v4 MuJoCo envs: reset()
returns the observation, step() four values (done = terminated or truncated, as the old TimeLimit), env.seed(s)
seeds the next reset, and a D4RL name gives its env with D4RL's reference returns (get_normalized_score)."""

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
        self.next_seed = None

    @property
    def unwrapped(self):
        return self

    def seed(self, seed=None):
        self.next_seed = seed

    def reset(self):
        obs, _ = self.env.reset(seed=self.next_seed)
        self.next_seed = None
        return obs

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, float(reward), terminated or truncated, info

    def get_normalized_score(self, episode_return):
        return (episode_return - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)  # D4RL: a fraction


def make(name: str, **kwargs):
    return D4RLEnv(name)
