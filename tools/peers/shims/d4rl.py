"""Stand-in for the `d4rl` package (which needs mujoco-py): what CORL's scripts call, read from a local D4RL-format
HDF5 file named by $SMAC_PEER_DATASET through smac.py's own reader, so a peer trains on exactly SMAC's data."""

import os

import numpy as np

import smac


def qlearning_dataset(env, dataset=None, terminate_on_end=False, **kwargs):
    """D4RL's flat transition arrays. Every transition of the file is kept, its next_observations included, as
    smac.py keeps them (D4RL's own function drops the transition at each timeout, for want of next_observations)."""
    data = smac.load_dataset(env.unwrapped.name, os.environ["SMAC_PEER_DATASET"])
    keys = ("observations", "actions", "next_observations", "rewards")
    return {**{k: data[k].astype(np.float32) for k in keys}, "terminals": data["dones"].astype(np.float32)}
