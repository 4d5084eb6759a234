"""Run CORL's cal_ql.py as `python cal_ql.py FLAGS` does, its trainer first restored from one of its own checkpoints.

    python tools/peers/resume_corl.py SCRIPT CHECKPOINT_OR_EMPTY FLAGS...

A Cal-QL run at 50k offline updates takes longer than a working session here, so tools/peers/run_peer.py continues it
from CORL's checkpoints. CORL's own --load_model cannot: torch.load (weights only since torch 2.6) refuses its files,
which pickle the two temperature modules whole, and its load_state_dict swaps those modules for the loaded ones, which
the temperature optimizers do not hold, so the temperatures would stop learning. This restores the trainer in place
right after CORL builds it, with CORL's own load_state_dict, and puts the optimizers' temperature modules back holding
the loaded values. The script itself runs unchanged; the run is always started through here so that its checkpoints
pickle the same module name.
"""

import importlib.util
import os
import sys

import torch

script, checkpoint, *flags = sys.argv[1:]
sys.argv, sys.path[0] = [script, *flags], os.path.dirname(os.path.abspath(script))  # as `python SCRIPT FLAGS` sees
spec = importlib.util.spec_from_file_location("corl_script", script)
corl = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = corl  # the name the checkpoints pickle the temperature modules under
spec.loader.exec_module(corl)

if checkpoint:
    build = corl.CalQL.__init__

    def build_and_restore(trainer, *args, **kwargs):
        build(trainer, *args, **kwargs)
        held = {name: getattr(trainer, name) for name in ("log_alpha", "log_alpha_prime")}
        trainer.load_state_dict(torch.load(checkpoint, weights_only=False))  # CORL's file and CORL's loader
        for name, module in held.items():
            if module is not None:
                module.load_state_dict(getattr(trainer, name).state_dict())
                setattr(trainer, name, module)

    corl.CalQL.__init__ = build_and_restore
corl.train()
