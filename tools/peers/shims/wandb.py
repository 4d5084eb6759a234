"""Stand-in for `wandb`: the evaluation and training-episode entries of wandb.log go, one JSON object per line, to
$SMAC_PEER_LOG (per-update losses are left out: tens of thousands of lines nobody reads)."""

import json
import os


class Run:
    def save(self, *args, **kwargs):
        pass


run = Run()


def init(*args, config=None, **kwargs):
    open(os.environ["SMAC_PEER_LOG"], "w").close()
    return run


def log(data: dict, step=None, **kwargs):
    if any(key.startswith(("eval/", "train/")) for key in data):
        with open(os.environ["SMAC_PEER_LOG"], "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in data.items()}}) + "\n")


def finish(*args, **kwargs):
    pass
