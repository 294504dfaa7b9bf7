"""The authors' PyTorch parameter names <-> ours: one table, used in both directions.

Their M2D (``M2DViT``) and MSM-MAE (``MaskedAutoencoderViT``) state_dicts name tensors as
timm/MAE do (``blocks.3.attn.qkv.weight``, ``decoder_pred.bias``, ``target_norm.weight``).
:func:`from_torch` turns such a dict of NumPy arrays into our parameter trees (pure dicts, as
the train state holds them); :func:`to_torch` is its inverse. The layouts differ only where
torch and Flax do: a Linear weight is [out, in] there and a kernel [in, out] here; the patch
embedding is a Conv2d [D, 1, ph, pw] there and a Linear on patchified pixels (pixel index
``p * pw + q``, frequency-major within the patch, the same order) here.

Not parameters here: ``pos_embed`` and ``decoder_pos_embed`` (fixed sin-cos, recomputed by
:func:`dwm_jax.models.vit.sincos_2d`; :func:`check_positions` compares them) and
``norm_stats`` (the normalisation mean and std, returned separately).
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping

import numpy as np

# (their suffix, our path, transform) inside one pre-LN block.
_BLOCK = (
    ("norm1.weight", ("norm1", "scale"), ""), ("norm1.bias", ("norm1", "bias"), ""),
    ("attn.qkv.weight", ("attn", "qkv", "kernel"), "linear"),
    ("attn.qkv.bias", ("attn", "qkv", "bias"), ""),
    ("attn.proj.weight", ("attn", "proj", "kernel"), "linear"),
    ("attn.proj.bias", ("attn", "proj", "bias"), ""),
    ("norm2.weight", ("norm2", "scale"), ""), ("norm2.bias", ("norm2", "bias"), ""),
    ("mlp.fc1.weight", ("fc1", "kernel"), "linear"), ("mlp.fc1.bias", ("fc1", "bias"), ""),
    ("mlp.fc2.weight", ("fc2", "kernel"), "linear"), ("mlp.fc2.bias", ("fc2", "bias"), ""),
)
NOT_PARAMETERS = ("pos_embed", "decoder_pos_embed", "norm_stats")


def _depth(names, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    found = {int(m.group(1)) for n in names if (m := pattern.match(n))}
    if found and found != set(range(len(found))):
        raise ValueError(f"{prefix}.N: block indices {sorted(found)} are not 0..{len(found) - 1}")
    return len(found)


def _blocks(names, theirs: str, ours: tuple):
    for i in range(_depth(names, theirs)):
        for suffix, path, transform in _BLOCK:
            yield f"{theirs}.{i}.{suffix}", (*ours, "blocks", i, *path), transform


def table(names, objective: str) -> Iterator[tuple[str, tuple, str]]:
    """(their name, (tree, *our path), transform) for every parameter of ``objective``.

    ``tree`` is 'params' or 'target'; transform is 'linear' (transpose), 'conv' (to a
    [ph * pw, D] kernel) or '' (as is). ``names``: the checkpoint's keys, which fix depths.
    objective: 'm2d', 'msm_mae' or 'encoder' (the online encoder alone).
    """
    if objective not in ("m2d", "msm_mae", "encoder"):
        raise ValueError(f"objective must be 'm2d', 'msm_mae' or 'encoder'; got {objective!r}")
    names = list(names)
    enc = ("params", "encoder")
    yield "patch_embed.proj.weight", (*enc, "patch_embed", "kernel"), "conv"
    yield "patch_embed.proj.bias", (*enc, "patch_embed", "bias"), ""
    yield "cls_token", (*enc, "cls_token"), ""
    yield from _blocks(names, "blocks", enc)
    yield "norm.weight", (*enc, "norm", "scale"), ""
    yield "norm.bias", (*enc, "norm", "bias"), ""
    if objective == "encoder":
        return
    head = ("params", "predictor" if objective == "m2d" else "decoder")
    yield "decoder_embed.weight", (*head, "embed", "kernel"), "linear"
    yield "decoder_embed.bias", (*head, "embed", "bias"), ""
    yield "mask_token", (*head, "mask_token"), ""
    yield from _blocks(names, "decoder_blocks", head)
    yield "decoder_norm.weight", (*head, "norm", "scale"), ""
    yield "decoder_norm.bias", (*head, "norm", "bias"), ""
    yield "decoder_pred.weight", (*head, "head", "kernel"), "linear"
    yield "decoder_pred.bias", (*head, "head", "bias"), ""
    if objective == "m2d":
        yield from _blocks(names, "target_blocks", ("target",))
        yield "target_norm.weight", ("target", "norm", "scale"), ""
        yield "target_norm.bias", ("target", "norm", "bias"), ""


def _set(tree: dict, path: tuple, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def from_torch(state_dict: Mapping[str, np.ndarray], objective: str) -> dict:
    """Their state_dict (NumPy arrays) -> ``{'params': ..., 'target': ...}`` in our layout
    (``target`` is empty unless objective is 'm2d'). Raises ValueError naming a missing or
    unexpected key; extra non-parameter keys (positions, ``norm_stats``) are ignored."""
    out: dict = {"params": {}, "target": {}}
    used = set(NOT_PARAMETERS)
    for name, path, transform in table(state_dict, objective):
        if name not in state_dict:
            raise ValueError(f"the checkpoint has no {name!r} (needed for {objective})")
        value = np.asarray(state_dict[name], np.float32)
        if transform == "linear":
            value = value.T
        elif transform == "conv":
            value = value.reshape(value.shape[0], -1).T
        _set(out, path, np.ascontiguousarray(value))
        used.add(name)
    unexpected = sorted(set(state_dict) - used)
    if unexpected and objective != "encoder":
        raise ValueError(f"the checkpoint has parameters with no place in {objective}: "
                         f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    return out


def to_torch(params: dict, target: dict | None, objective: str,
             patch_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Inverse of :func:`from_torch`: our trees -> their state_dict names and layouts (the
    fixed positions and ``norm_stats`` not included; the target's only when given)."""
    trees = {"params": params, "target": target or {}}
    names = _torch_names(params, target)
    out = {}
    for name, path, transform in table(names, objective):
        if path[0] == "target" and not target:
            continue
        value = np.asarray(_get(trees, path), np.float32)
        if transform == "linear":
            value = value.T
        elif transform == "conv":
            value = value.T.reshape(value.shape[1], 1, *patch_size)
        out[name] = np.ascontiguousarray(value)
    return out


def _torch_names(params: dict, target: dict | None) -> list[str]:
    """Just enough of their key names for :func:`table` to count the depths."""
    names = [f"blocks.{i}.x" for i in params["encoder"]["blocks"]]
    for head in ("predictor", "decoder"):
        if head in params:
            names += [f"decoder_blocks.{i}.x" for i in params[head]["blocks"]]
    if target:
        names += [f"target_blocks.{i}.x" for i in target.get("blocks", {})]
    return names


def check_positions(state_dict: Mapping[str, np.ndarray], grid: tuple[int, int],
                    atol: float = 1e-5) -> float:
    """Largest difference between the checkpoint's fixed positions and ours (CLS row 0 must
    be zeros); raises ValueError when they disagree, e.g. for another grid or layout."""
    from dwm_jax.models import vit

    worst = 0.0
    for key in ("pos_embed", "decoder_pos_embed"):
        if key not in state_dict:
            continue
        pos = np.asarray(state_dict[key], np.float32)[0]  # [1 + N, D]
        ours = np.concatenate([np.zeros((1, pos.shape[1]), np.float32),
                               vit.sincos_2d(pos.shape[1], grid)])
        if pos.shape != ours.shape:
            raise ValueError(f"{key} has shape {pos.shape}; a {grid[0]} x {grid[1]} grid "
                             f"needs {ours.shape}")
        diff = float(np.abs(pos - ours).max())
        if diff > atol:
            raise ValueError(f"{key} differs from our sin-cos positions by {diff:.3g}")
        worst = max(worst, diff)
    return worst
