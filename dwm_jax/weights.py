"""Reading weights from a workdir: a run of ours (``train.py``) or the authors' checkpoint
converted by ``python -m dwm_jax.convert``. The one place that reads encoders and weights.

    encoder, stats, config = load_encoder("workdirs/m2d_as_released")   # what Embedder uses
    weights = read_weights("workdirs/demo")                             # params, target, ...

Both kinds of workdir hold Orbax checkpoints with the same ``meta`` (config, normalisation
statistics, array signature, fingerprint); a training run's state also has the optimizer
state, a converted one only ``params`` (and ``target`` for M2D). Only the arrays asked for
are read (Orbax partial restore): no optimizer is built and its state is never read.
"""

from __future__ import annotations

from dwm_jax._extras import require

require("train", "flax", "orbax", "ml_collections")

import dataclasses

import jax
from flax import nnx

from dwm_jax import build, checkpointing
from dwm_jax import config as config_lib
from dwm_jax.normalisation import NormStats


@dataclasses.dataclass
class Weights:
    """Arrays read from one checkpoint of a workdir, with its description."""

    params: dict            # {'encoder': ..., 'predictor' | 'decoder': ...} (what is stored)
    target: dict            # M2D's target ({} when there is none)
    norm_stats: NormStats
    config: dict            # the config the checkpoint was written with
    meta: dict
    step: int
    workdir: str


def _select(node, keep, prefix: str = ""):
    """The leaves of a tree of dicts whose 'a/b/c' path passes ``keep``; None if none."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            sub = _select(v, keep, f"{prefix}{k}/")
            if sub is not None:
                out[k] = sub
        return out or None
    return node if keep(prefix[:-1]) else None


def _wanted_arrays(meta: dict, parts: tuple[str, ...], where: str) -> dict:
    """The arrays of the checkpoint's own config under ``parts`` that it stores, as shapes;
    a converted encoder-only checkpoint has no predictor, a training run more than asked."""
    abstract = build.abstract_weights(config_lib.from_stored(meta["config"]))
    stored = meta["signature"]
    have = {p: v for p, v in stored.items() if any(p.startswith(q + "/") for q in parts)}
    subset = _select(abstract, lambda path: path in have) or {}
    wanted = checkpointing.tree_signature(subset)
    if wanted != have:
        diffs = "; ".join(checkpointing.signature_differences(have, wanted))
        raise checkpointing.CheckpointMismatchError(
            f"{where}: the stored arrays do not match its own config ({diffs})")
    return subset


def read_weights(workdir: str, step: int | None = None,
                 parts: tuple[str, ...] = ("params", "target"), *, device=None) -> Weights:
    """Reads the arrays under ``parts`` ('params', 'params/encoder', 'target', ...) that the
    checkpoint holds (latest unless ``step``) onto ``device`` (default: this process's first
    device), whatever mesh wrote them. Raises FileNotFoundError when there is no checkpoint,
    CheckpointMismatchError when the arrays do not match the checkpoint's own config, and
    CheckpointDamagedError when they cannot be read or fail their fingerprint."""
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {ckpt.directory}")
        if step not in ckpt.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} under {ckpt.directory}")
        meta = ckpt.read_meta(step)
        subset = _wanted_arrays(meta, parts, f"{ckpt.directory}/{step}")
        device = device or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), subset)
        state, _ = ckpt.restore(step, target, partial=True)
    finally:
        ckpt.close()
    return Weights(params=state.get("params", {}), target=state.get("target", {}),
                   norm_stats=NormStats(**meta["norm_stats"]), config=meta["config"],
                   meta=meta, step=step, workdir=workdir)


def load_encoder(workdir: str, step: int | None = None):
    """-> (encoder nnx module with the checkpoint's weights, NormStats, config dict)."""
    w = read_weights(workdir, step, ("params/encoder",))
    if "encoder" not in w.params:
        raise checkpointing.CheckpointMismatchError(
            f"{workdir}: checkpoint {w.step} holds no encoder parameters")
    abstract = build.abstract_objective(config_lib.from_stored(w.config)).encoder
    graphdef, _ = nnx.split(abstract, nnx.Param)
    return nnx.merge(graphdef, w.params["encoder"]), w.norm_stats, w.config
