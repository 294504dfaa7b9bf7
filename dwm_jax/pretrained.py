"""Pretrained weights from a workdir: a run of ours (``train.py``) or the authors' checkpoint
converted by ``python -m dwm_jax.convert``. The one place that reads encoders and weights.

    encoder, stats, config = load_encoder("workdirs/m2d_as_released")   # what Embedder uses
    weights = read_weights("workdirs/demo")                             # params, target, ...

Both kinds of workdir hold Orbax checkpoints with the same ``meta`` (config, normalisation
statistics, array signature, fingerprint); a training run's state also has the optimizer
state, a converted one only ``params`` (and ``target`` for M2D). Only the arrays asked for
are read (Orbax partial restore), so loading an encoder never reads the optimizer state.

:func:`start_from` is ``config.init_from``: a new run starts from another workdir's encoder,
and from its predictor / decoder and M2D target when they fit, as continued pretraining.
"""

from __future__ import annotations

from dwm_jax._extras import require

require("train", "flax", "orbax", "ml_collections")

import dataclasses
import os
import jax
import ml_collections
import numpy as np
from flax import nnx

from dwm_jax import checkpointing, validation
from dwm_jax import data as data_lib
from dwm_jax.models import vit


@dataclasses.dataclass
class Weights:
    """Arrays read from one checkpoint of a workdir, with its description."""

    params: dict            # {'encoder': ..., 'predictor' | 'decoder': ...} (what is stored)
    target: dict            # M2D's target ({} when there is none)
    norm_stats: data_lib.NormStats
    config: dict            # the config the checkpoint was written with
    meta: dict
    step: int
    workdir: str


def abstract_objective(cfg):
    """The objective module a config describes, as shapes only (nothing allocated)."""
    from dwm_jax import trainer  # builds the module a config describes
    return nnx.eval_shape(lambda: trainer.build_objective(cfg, nnx.Rngs(0)))


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


def read_weights(workdir: str, step: int | None = None,
                 parts: tuple[str, ...] = ("params", "target"), *, device=None) -> Weights:
    """Reads the arrays under ``parts`` ('params', 'params/encoder', 'target', ...) that the
    checkpoint holds (latest unless ``step``) onto ``device`` (default: this process's first
    device), whatever mesh wrote them. Raises FileNotFoundError when there is no checkpoint,
    CheckpointMismatchError when the arrays do not match the checkpoint's own config, and
    CheckpointDamagedError when they cannot be read or fail their fingerprint."""
    from dwm_jax import trainer

    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {ckpt.directory}")
        if step not in ckpt.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} under {ckpt.directory}")
        meta = ckpt.read_meta(step)
        cfg = ml_collections.ConfigDict(meta["config"])
        setup = trainer.make_setup(cfg, meta["steps_per_epoch"], meta["total_steps"])
        abstract = trainer.abstract_state(setup, cfg.seed)
        stored = meta["signature"]
        have = {p: v for p, v in stored.items() if any(p.startswith(q + "/") for q in parts)}
        # the arrays this config has under ``parts`` that the checkpoint stores too; a
        # converted encoder-only checkpoint has no predictor, a training run more than asked
        subset = _select(abstract, lambda path: path in have) or {}
        wanted = checkpointing.tree_signature(subset)
        if wanted != have:
            diffs = "; ".join(checkpointing.signature_differences(have, wanted))
            raise checkpointing.CheckpointMismatchError(
                f"{ckpt.directory}/{step}: the stored arrays do not match its own config "
                f"({diffs})")
        device = device or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), subset)
        state, _ = ckpt.restore(step, target, partial=True)
    finally:
        ckpt.close()
    return Weights(params=state.get("params", {}), target=state.get("target", {}),
                   norm_stats=data_lib.NormStats(**meta["norm_stats"]), config=meta["config"],
                   meta=meta, step=step, workdir=workdir)


def load_encoder(workdir: str, step: int | None = None):
    """-> (encoder nnx module with the checkpoint's weights, NormStats, config dict)."""
    w = read_weights(workdir, step, ("params/encoder",))
    if "encoder" not in w.params:
        raise checkpointing.CheckpointMismatchError(
            f"{workdir}: checkpoint {w.step} holds no encoder parameters")
    abstract = abstract_objective(ml_collections.ConfigDict(w.config)).encoder
    graphdef, _ = nnx.split(abstract, nnx.Param)
    return nnx.merge(graphdef, w.params["encoder"]), w.norm_stats, w.config


# ---------------------------------------------------------------------- continued pretraining

def _same_shapes(a, b) -> list[str]:
    sa, sb = checkpointing.tree_signature(a), checkpointing.tree_signature(b)
    return checkpointing.signature_differences(sa, sb, limit=3)


def _heads(config: dict) -> tuple[int, int | None]:
    model = config["model"]
    decoder = model.get("decoder") or {}
    return vit.parse_size(model["size"]).heads, decoder.get("heads")


def merge_weights(initial: dict, source: Weights, cfg) -> tuple[dict, list[str]]:
    """Host trees ``{'params', 'target'}`` of a fresh run with the source's weights put in:
    the encoder (required to fit), the predictor / decoder when the source has one of the
    same kind and shape, and M2D's target from the source's target or, where it has none,
    from its encoder (a random target would throw the pretraining away). -> (trees, notes)."""
    where = f"config.init_from={source.workdir!r} (step {source.step})"
    params = dict(initial["params"])
    if "encoder" not in source.params:
        raise validation.ConfigError(f"{where} holds no encoder")
    ours_heads, ours_dheads = _heads(cfg.to_dict())
    their_heads, their_dheads = _heads(source.config)
    if ours_heads != their_heads:
        raise validation.ConfigError(
            f"{where}: its encoder has {their_heads} heads, config.model.size "
            f"{cfg.model.size!r} has {ours_heads}; use the source's size")
    diffs = _same_shapes(source.params["encoder"], params["encoder"])
    if diffs:
        raise validation.ConfigError(f"{where}: its encoder does not fit config.model "
                                     f"({'; '.join(diffs)}); use the source's size and patch")
    params["encoder"] = source.params["encoder"]
    notes = [f"encoder from {source.workdir} (step {source.step})"]
    for head in ("predictor", "decoder"):
        if head not in params:
            continue
        theirs = source.params.get(head)
        if theirs is None:
            notes.append(f"{head}: fresh (the source has none)")
        elif _same_shapes(theirs, params[head]) or ours_dheads != their_dheads:
            notes.append(f"{head}: fresh (the source's has another size)")
        else:
            params[head] = theirs
            notes.append(f"{head} from the source")
    target = initial["target"]
    if target:
        new, origin = {}, set()
        for k, ours in target.items():
            theirs = source.target.get(k)
            if theirs is not None and not _same_shapes(theirs, ours):
                new[k] = theirs
                origin.add("target")
            else:
                new[k] = jax.tree.map(np.copy, source.params["encoder"][k])
                origin.add("encoder")
        target = new
        notes.append(f"target from the source's {' and '.join(sorted(origin))}")
    return dict(params=params, target=target), notes


def start_from(source_dir: str, state: dict, shardings: dict, cfg) -> tuple[dict, list[str]]:
    """``config.init_from``: the fresh train ``state`` with ``source_dir``'s weights put in
    (see :func:`merge_weights`), placed with ``shardings``; the optimizer state stays fresh.
    -> (state, notes). ConfigError names config.init_from when the source does not fit."""
    if not os.path.isdir(os.path.join(source_dir, "checkpoints")):
        raise validation.ConfigError(f"config.init_from={source_dir!r}: no checkpoints there")
    try:
        source = read_weights(source_dir, parts=("params", "target"))
    except FileNotFoundError as e:
        raise validation.ConfigError(f"config.init_from={source_dir!r}: {e}") from None
    # merged in the per-layer layout, whichever layout (scanned or not) each side has
    source.params = vit.unstack_layers(jax.device_get(source.params))
    source.target = vit.unstack_layers(jax.device_get(source.target))
    initial = vit.unstack_layers(
        jax.device_get(dict(params=state["params"], target=state["target"])))
    merged, notes = merge_weights(initial, source, cfg)
    if cfg.model.get("scan_layers", False):
        merged = vit.stack_layers(merged)

    def place(value, sharding):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

    placed = jax.tree.map(place, merged, dict(params=shardings["params"],
                                              target=shardings["target"]))
    return dict(state, **placed), notes
