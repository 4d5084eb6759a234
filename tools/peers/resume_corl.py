"""Run CORL's cal_ql.py as `python cal_ql.py FLAGS` does, its trainer first restored from one of its own checkpoints.

    python tools/peers/resume_corl.py SCRIPT CHECKPOINT_OR_EMPTY FLAGS...

A Cal-QL run at 50k offline updates takes longer than a working session here, so tools/peers/run_peer.py continues it
from CORL's checkpoints. CORL's own --load_model cannot: torch.load (weights only since torch 2.6) refuses its files,
which pickle the two temperature modules whole, and its load_state_dict swaps those modules for the loaded ones, which
the temperature optimizers do not hold, so the temperatures would stop learning. This restores the trainer in place
right after CORL builds it, with CORL's own load_state_dict, and puts the optimizers' temperature modules back holding
the loaded values. Each checkpoint also carries the random generators' states (CORL seeds them once, at its start,
and draws minibatches and actions from them) and the online replay buffer's transitions, restored with the trainer:
continued in its offline phase, a run goes on with the uncut run's draws, bit for bit; continued in its online phase,
it also has the transitions collected so far, and starts a new episode (the one under way when the run was cut is in
the buffer but not among the training episodes that regret counts). The script itself runs unchanged; a run is
always started through here, so its checkpoints pickle one module name.
"""

import importlib.util
import os
import random
import sys

import numpy as np
import torch

script, checkpoint, *flags = sys.argv[1:]
sys.argv, sys.path[0] = [script, *flags], os.path.dirname(os.path.abspath(script))  # as `python SCRIPT FLAGS` sees
spec = importlib.util.spec_from_file_location("corl_script", script)
corl = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = corl  # the name the checkpoints pickle the temperature modules under
spec.loader.exec_module(corl)

save = corl.CalQL.state_dict
BUFFER = ("_states", "_actions", "_rewards", "_next_states", "_dones", "_mc_returns")  # CORL's ReplayBuffer's tensors


def state_dict_generators_and_online_data(trainer):
    generators = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if torch.cuda.is_available():
        generators["cuda"] = torch.cuda.get_rng_state_all()
    online = sys._getframe(1).f_locals["online_buffer"]  # a local of CORL's train(), which saves the checkpoints
    online_data = {"size": online._size, "pointer": online._pointer,
                   **{name: getattr(online, name)[:online._size].clone() for name in BUFFER}}
    return {**save(trainer), "generators": generators, "online_data": online_data}


corl.CalQL.state_dict = state_dict_generators_and_online_data
if checkpoint:
    build = corl.CalQL.__init__

    def build_and_restore(trainer, *args, **kwargs):
        build(trainer, *args, **kwargs)
        held = {name: getattr(trainer, name) for name in ("log_alpha", "log_alpha_prime")}
        state = torch.load(checkpoint, weights_only=False)  # CORL's file and CORL's loader
        trainer.load_state_dict(state)
        for name, module in held.items():
            if module is not None:
                module.load_state_dict(getattr(trainer, name).state_dict())
                setattr(trainer, name, module)
        generators = state["generators"]  # after CORL's set_seed: the draws go on where the checkpoint left them
        torch.set_rng_state(generators["torch"])
        np.random.set_state(generators["numpy"])
        random.setstate(generators["random"])
        if "cuda" in generators:
            torch.cuda.set_rng_state_all(generators["cuda"])
        online, online_data = sys._getframe(1).f_locals["online_buffer"], state.get("online_data")  # train() built it
        if online_data is not None:  # (absent from the first offline checkpoints, written before it was kept)
            for name in BUFFER:
                getattr(online, name)[:online_data["size"]] = online_data[name]
            online._size, online._pointer = online_data["size"], online_data["pointer"]

    corl.CalQL.__init__ = build_and_restore
corl.train()
