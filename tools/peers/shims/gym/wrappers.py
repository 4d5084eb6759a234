"""The old gym wrappers CORL uses: TransformObservation(env, f) and TransformReward(env, f)."""


class Wrapper:
    def __init__(self, env):
        self.env = env

    def __getattr__(self, name):  # seed, get_normalized_score, _max_episode_steps, spaces: the wrapped env's
        return getattr(self.env, name)


class TransformObservation(Wrapper):
    def __init__(self, env, f):
        super().__init__(env)
        self.f = f

    def reset(self):
        return self.f(self.env.reset())

    def step(self, action):
        obs, reward, done, info = self.env.step(action)
        return self.f(obs), reward, done, info


class TransformReward(Wrapper):
    def __init__(self, env, f):
        super().__init__(env)
        self.f = f

    def reset(self):
        return self.env.reset()

    def step(self, action):
        obs, reward, done, info = self.env.step(action)
        return obs, self.f(reward), done, info
