"""``config.init_from``: a new run starts from another workdir's weights (a run of ours or
converted weights) as continued pretraining: the encoder, and the predictor / decoder and
M2D target where they fit; the optimizer, schedule and data order start afresh."""

from __future__ import annotations


import jax
import numpy as np

from dwm_jax import checkpointing, storage, weights
from dwm_jax import config as config_lib
from dwm_jax.models import vit


def _same_shapes(a, b) -> list[str]:
    sa, sb = checkpointing.tree_signature(a), checkpointing.tree_signature(b)
    return checkpointing.signature_differences(sa, sb, limit=3)


def _heads(config: dict) -> tuple[int, int | None]:
    model = config["model"]
    decoder = model["decoder"] or {}
    return vit.parse_size(model["size"]).heads, decoder.get("heads")


def merge_weights(initial: dict, source: weights.Weights, cfg) -> tuple[dict, list[str]]:
    """Host trees ``{'params', 'target'}`` of a fresh run with the source's weights put in:
    the encoder (required to fit), the predictor / decoder when the source has one of the
    same kind and shape, and M2D's target from the source's target or, where it has none,
    from its encoder (a random target would throw the pretraining away). -> (trees, notes)."""
    where = f"config.init_from={source.workdir!r} (step {source.step})"
    params = dict(initial["params"])
    if "encoder" not in source.params:
        raise config_lib.ConfigError(f"{where} holds no encoder")
    ours_heads, ours_dheads = _heads(cfg.to_dict())
    their_heads, their_dheads = _heads(source.config)
    if ours_heads != their_heads:
        raise config_lib.ConfigError(
            f"{where}: its encoder has {their_heads} heads, config.model.size "
            f"{cfg.model.size!r} has {ours_heads}; use the source's size")
    diffs = _same_shapes(source.params["encoder"], params["encoder"])
    if diffs:
        raise config_lib.ConfigError(f"{where}: its encoder does not fit config.model "
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


def _check_finite(source: weights.Weights):
    """A NaN or inf in the source's weights is named before anything trains on them."""
    trees = dict(params=source.params, target=source.target)
    for path, leaf in jax.tree_util.tree_flatten_with_path(trees)[0]:
        if not np.isfinite(np.asarray(leaf)).all():
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            raise config_lib.ConfigError(
                f"config.init_from={source.workdir!r} (step {source.step}): {name} holds NaN "
                "or infinite values")


def start_from(source_dir: str, state: dict, shardings: dict, cfg) -> tuple[dict, list[str]]:
    """``config.init_from``: the fresh train ``state`` with ``source_dir``'s weights put in
    (see :func:`merge_weights`), placed with ``shardings``; the optimizer state stays fresh.
    -> (state, notes). ConfigError names config.init_from when the source does not fit."""
    if not storage.isdir(storage.join(source_dir, "checkpoints")):
        raise config_lib.ConfigError(f"config.init_from={source_dir!r}: no checkpoints there")
    try:
        source = weights.read_weights(source_dir, parts=("params", "target"))
    except FileNotFoundError as e:
        raise config_lib.ConfigError(f"config.init_from={source_dir!r}: {e}") from None
    _check_finite(source)
    # merged in the per-layer layout, whichever layout (scanned or not) each side has
    source.params = vit.unstack_layers(jax.device_get(source.params))
    source.target = vit.unstack_layers(jax.device_get(source.target))
    initial = vit.unstack_layers(
        jax.device_get(dict(params=state["params"], target=state["target"])))
    merged, notes = merge_weights(initial, source, cfg)
    if cfg.model.scan_layers:
        merged = vit.stack_layers(merged)

    def place(value, sharding):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

    placed = jax.tree.map(place, merged, dict(params=shardings["params"],
                                              target=shardings["target"]))
    return dict(state, **placed), notes
