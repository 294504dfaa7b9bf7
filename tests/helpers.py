"""Helpers the test files share: a micro training config, what a run wrote, and ways to
damage a checkpoint on purpose."""

import json
import os

import jax
import numpy as np
from flax import nnx

from dwm_jax import config as config_lib
from dwm_jax import weights


def micro_config(data_dir, objective="m2d", masker="dispersion", **overrides):
    c = config_lib.base(objective, masker)
    c.batch_size = 8
    c.total_steps = 12
    c.data.update(data_dir=data_dir, name="synthetic_sounds/small", worker_count=0)
    c.model.update(size="micro", input_shape=(80, 64), decoder=dict(dim=32, depth=1, heads=2))
    c.optim.update(base_lr=2e-3, warmup_epochs=1)
    c.masking.hint.update(start_epoch=0)
    c.log_every = 1
    c.log_data_fingerprint = True
    c.ckpt_every = 4
    for path, value in overrides.items():
        config_lib.override(c, path, value)
    return c


def read_params(workdir):
    enc, _, _ = weights.load_encoder(workdir)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(enc, nnx.Param)))


def read_metrics(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r for r in rows}


def state_data_files(step_dir):
    return [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
            for f in fs if "/d/" in os.path.join(d, f) + "/"]


def flip_middle_bytes(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(64)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0x5A for b in chunk))


def damage_largest_state_file(step_dir):
    path = max(state_data_files(step_dir), key=os.path.getsize)
    flip_middle_bytes(path)
    return path


def damage_state_files(step_dir, every=16384):
    """Flips 64 bytes every ``every`` bytes of every data file of the state (so every array
    larger than that is hit, whichever file holds it)."""
    for path in state_data_files(step_dir):
        with open(path, "r+b") as f:
            for offset in range(every // 2, os.path.getsize(path), every):
                f.seek(offset)
                chunk = f.read(64)
                f.seek(offset)
                f.write(bytes(b ^ 0x5A for b in chunk))
