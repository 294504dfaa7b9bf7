"""The authors' PyTorch checkpoints -> our workdirs, and the name table behind it.

    python -m dwm_jax.convert m2d_vit_base-80x608p16x16-221006-mr7/checkpoint-300.pth \
        --workdir workdirs/m2d_as_released
    python eval.py --workdir=workdirs/m2d_as_released --tasks=... --data_dir=data

The command reads a ``.pth`` (PyTorch needed: ``pip install 'dwm_jax[torch]'``), ``.npz`` or
``.safetensors`` state_dict, infers the sizes (shapes, the checkpoint's ``args``, the authors'
folder name ``<name>-<F>x<T>p<ph>x<pw>[-...]``; flags override), checks our encoder against a
float64 NumPy forward of the original tensors, and writes an Orbax checkpoint that
``Embedder.from_workdir``, ``eval.py`` and ``config.init_from`` (continued pretraining) read.

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

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
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


def from_torch(state_dict: Mapping[str, np.ndarray], objective: str,
               strict: bool | None = None) -> dict:
    """Their state_dict (NumPy arrays) -> ``{'params': ..., 'target': ...}`` in our layout
    (``target`` is empty unless objective is 'm2d'). Raises ValueError naming a missing key,
    or an unexpected one when ``strict`` (default: unless objective is 'encoder', which
    takes the encoder out of any of their models); non-parameter keys (positions,
    ``norm_stats``) are ignored."""
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
    if unexpected and (objective != "encoder" if strict is None else strict):
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


# ------------------------------------------------------------------------------ reading files

class ConversionError(ValueError):
    """The checkpoint cannot be converted as asked (the message names the key or flag)."""


# Key prefixes of their wrappers: DDP ('module.'), the portable runtime ('backbone.') and the
# CLAP / M2D-AS runtime ('module.ar.runtime.backbone.'). Longest first.
PREFIXES = ("module.ar.runtime.backbone.", "module.backbone.", "backbone.", "module.")
# Parts of their other models that have no place in an audio encoder: skipped with a note.
SKIPPED = {"audio_proj.": "CLAP's audio projection", "text_proj.": "CLAP's text projection",
           "offline_": "M2D-AS's offline predictor", "ar.runtime.": "the runtime wrapper"}


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """-> (state_dict as float32 NumPy arrays, the training ``args`` as a dict or {}).

    ``.pth`` / ``.pt``: their ``{'model': state_dict, 'args': Namespace, ...}`` or a bare
    state_dict, read with ``torch.load(weights_only=True)``; ``.npz``; ``.safetensors`` (its
    metadata may carry ``args`` as JSON)."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}, {}
        except (OSError, ValueError) as e:
            raise ConversionError(f"{path}: not a readable .npz ({e})") from None
    if ext == ".safetensors":
        try:
            from safetensors import safe_open
        except ImportError:
            raise ConversionError("reading .safetensors needs the safetensors package: "
                                  "pip install 'dwm_jax[convert]'") from None
        try:
            with safe_open(path, framework="numpy") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                meta = f.metadata() or {}
        except Exception as e:
            raise ConversionError(f"{path}: not a readable .safetensors file ({e})") from None
        return tensors, json.loads(meta["args"]) if "args" in meta else {}
    if ext in (".pth", ".pt", ".bin", ".ckpt"):
        return _read_torch(path)
    raise ConversionError(f"{path}: unknown checkpoint type {ext!r}; expected .pth, .pt, .npz "
                          "or .safetensors")


def _read_torch(path: str):
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path}: reading a PyTorch checkpoint needs PyTorch: pip install "
            "'dwm_jax[torch]' (or save the state_dict as .npz / .safetensors where torch is "
            "installed; converting those needs no torch)") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(f"{path}: torch.load failed ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:300]})") from None
    args = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        args = obj.get("args") or {}
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    tensors = {k: v.detach().float().numpy() for k, v in obj.items() if torch.is_tensor(v)}
    return tensors, args


def strip_prefixes(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, list[str]]:
    """Drops their wrappers' key prefixes and the parts of other models (CLAP's projections,
    M2D-AS's offline predictor) -> (state_dict, notes on what was skipped)."""
    out, skipped = {}, {}
    for key, value in state_dict.items():
        name = next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)
        what = next((w for p, w in SKIPPED.items() if name.startswith(p)), None)
        if what:
            skipped.setdefault(what, []).append(key)
            continue
        if name in out:
            raise ConversionError(f"two tensors map to {name!r} once prefixes are removed")
        out[name] = value
    notes = [f"skipped {len(keys)} tensor(s) of {what} ({keys[0]}, ...)"
             for what, keys in skipped.items()]
    return out, notes


def detect_objective(state_dict) -> str:
    """'m2d' (target blocks present), 'msm_mae' (a decoder, no target) or 'encoder'."""
    names = list(state_dict)
    if any(n.startswith("target_blocks.") for n in names):
        return "m2d"
    if any(n.startswith("decoder_blocks.") for n in names):
        return "msm_mae"
    return "encoder"


# ------------------------------------------------------------------------------ sizes

@dataclasses.dataclass
class Sizes:
    """Everything the checkpoint's shapes do not say alone, resolved."""

    objective: str                 # 'm2d', 'msm_mae' or 'encoder'
    dim: int
    depth: int
    heads: int
    mlp_ratio: float
    patch_size: tuple[int, int]
    input_shape: tuple[int, int]
    decoder: dict | None           # dim, depth, heads, mlp_ratio of predictor / decoder
    mask_ratio: float | None       # from the folder name's '-mrN', when there
    sources: dict                  # where each inferred value came from

    @property
    def size(self) -> str:
        ratio = "" if self.mlp_ratio == 4.0 else f"x{self.mlp_ratio:g}"
        return f"{self.dim}x{self.depth}x{self.heads}{ratio}"


_NAME = re.compile(r"-(\d+)x(\d+)p(\d+)x(\d+)(?:-|$|p|\b)")


def _pair_of(value, what: str) -> tuple[int, int]:
    if isinstance(value, str):
        value = [int(v) for v in value.lower().split("x")]
    if isinstance(value, (int, np.integer)):
        value = [int(value)] * 2
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        value = value * 2
    if len(value) != 2 or min(value) < 1:
        raise ConversionError(f"{what} {value!r} is not two positive integers")
    return value


def sizes_from_name(path: str):
    """The authors' folder convention ``<name>-<F>x<T>p<ph>x<pw>[-...][-mrN]`` -> (input_shape,
    patch_size, mask_ratio) or Nones, from the file's folder or its own name."""
    for part in (os.path.basename(os.path.dirname(os.path.abspath(path))),
                 os.path.basename(path)):
        m = _NAME.search(part)
        if m:
            f, t, ph, pw = map(int, m.groups())
            r = re.search(r"-mr(\d+)(?:-|$|\.)", part)
            return (f, t), (ph, pw), (int(r.group(1)) / 10 if r else None)
    return None, None, None


def _heads_from_args(args: dict, key: str):
    value = args.get(key)
    return int(value) if isinstance(value, (int, np.integer)) and value > 0 else None


def infer_sizes(state_dict, *, path: str = "", args: dict | None = None,
                num_heads: int | None = None, decoder_num_heads: int | None = None,
                input_shape=None) -> Sizes:
    """Sizes from the shapes, then ``args``, the folder name and the flags (which win).

    Heads cannot be read from shapes: ``num_heads`` > ``args['num_heads']`` > width / 64 (as
    timm's ViTs); the decoder's: ``decoder_num_heads`` > args > the authors' ratio (M2D
    predictor width / 32, MSM-MAE decoder width / 64). The input size: ``input_shape`` >
    ``args['input_size']`` > the folder name > the positions' count with 80 mel bins."""
    args = args or {}
    names = list(state_dict)
    sources = {}
    if "patch_embed.proj.weight" not in state_dict:
        raise ConversionError("the checkpoint has no 'patch_embed.proj.weight' (is it an M2D "
                              f"or MSM-MAE ViT?); its keys start {sorted(names)[:4]}")
    w = np.shape(state_dict["patch_embed.proj.weight"])
    if len(w) != 4 or w[1] != 1:
        raise ConversionError(f"patch_embed.proj.weight has shape {list(w)}; expected "
                              "[dim, 1, patch_h, patch_w] (one input channel)")
    dim, patch = int(w[0]), (int(w[2]), int(w[3]))
    depth = _depth(names, "blocks")
    if depth == 0:
        raise ConversionError("the checkpoint has no encoder blocks ('blocks.0.*')")
    fc1 = np.shape(state_dict.get("blocks.0.mlp.fc1.weight", (4 * dim, dim)))
    mlp_ratio = fc1[0] / dim

    heads = num_heads or _heads_from_args(args, "num_heads")
    sources["heads"] = ("--num_heads" if num_heads else "args" if heads else "width / 64")
    heads = heads or max(dim // 64, 1)
    if dim % heads:
        raise ConversionError(f"--num_heads {heads} does not divide the width {dim}")

    name_shape, name_patch, mask_ratio = sizes_from_name(path) if path else (None,) * 3
    arg_patch = args.get("patch_size")
    for given, where in ((arg_patch, "args.patch_size"), (name_patch, "the folder name")):
        if given is not None and _pair_of(given, where) != patch:
            raise ConversionError(f"{where} says patches of {_pair_of(given, where)}, but "
                                  f"patch_embed.proj.weight has {patch}")
    positions = None
    if "pos_embed" in state_dict:
        positions = int(np.shape(state_dict["pos_embed"])[1]) - 1
    if input_shape is not None:
        shape, sources["input_shape"] = _pair_of(input_shape, "--input_shape"), "--input_shape"
    elif args.get("input_size") is not None:
        shape = _pair_of(args["input_size"], "args.input_size")
        sources["input_shape"] = "args.input_size"
    elif name_shape is not None:
        shape, sources["input_shape"] = name_shape, "the folder name"
    elif positions:
        fp = 80 // patch[0]
        shape = (80, positions // fp * patch[1])
        sources["input_shape"] = "pos_embed, with 80 mel bins"
    else:
        raise ConversionError("cannot tell the input size: no pos_embed, no args and no "
                              "'<F>x<T>p<ph>x<pw>' folder name; pass --input_shape FxT")
    if shape[0] % patch[0] or shape[1] % patch[1]:
        raise ConversionError(f"input shape {shape[0]}x{shape[1]} ({sources['input_shape']}) "
                              f"is not a whole number of {patch[0]}x{patch[1]} patches")
    grid = (shape[0] // patch[0], shape[1] // patch[1])
    if positions is not None and positions != grid[0] * grid[1]:
        raise ConversionError(
            f"pos_embed holds {positions} patch positions, but input {shape[0]}x{shape[1]} "
            f"({sources['input_shape']}) with {patch[0]}x{patch[1]} patches has "
            f"{grid[0] * grid[1]}; pass the input size the model was trained with "
            "(--input_shape FxT)")

    objective = detect_objective(state_dict)
    decoder = None
    if objective != "encoder":
        if "decoder_embed.weight" not in state_dict:
            raise ConversionError(f"the checkpoint has decoder blocks but no "
                                  f"'decoder_embed.weight' (needed for {objective})")
        ddim = int(np.shape(state_dict["decoder_embed.weight"])[0])
        dfc1 = np.shape(state_dict.get("decoder_blocks.0.mlp.fc1.weight", (4 * ddim, ddim)))
        dheads = decoder_num_heads or _heads_from_args(args, "decoder_num_heads")
        sources["decoder_heads"] = ("--decoder_num_heads" if decoder_num_heads else
                                    "args" if dheads else "the authors' width per head")
        dheads = dheads or max(ddim // (32 if objective == "m2d" else 64), 1)
        if ddim % dheads:
            raise ConversionError(f"--decoder_num_heads {dheads} does not divide the decoder "
                                  f"width {ddim}")
        decoder = dict(dim=ddim, depth=_depth(names, "decoder_blocks"), heads=dheads,
                       mlp_ratio=dfc1[0] / ddim)
    return Sizes(objective, dim, depth, heads, mlp_ratio, patch, shape, decoder, mask_ratio,
                 sources)


# ------------------------------------------------------------------------------ NumPy check

def numpy_forward(state_dict, x: np.ndarray, num_heads: int,
                  positions: np.ndarray | None = None) -> np.ndarray:
    """Their encoder in float64 NumPy, straight from their names and layouts (Conv2d patch
    embedding, fused qkv, erf GELU, LayerNorm eps 1e-6): x [B, F, T] -> [B, 1 + N, dim].
    Independent of our Flax model: a conversion is checked against it. ``positions``
    [1 + N, dim]: theirs (``pos_embed[0]``) when the checkpoint has them."""
    from scipy.special import erf

    class _Float64:  # converts one tensor at a time: a ViT-B stays a few MB in float64
        def __getitem__(self, name):
            return np.asarray(state_dict[name], np.float64)

    sd = _Float64()
    w = sd["patch_embed.proj.weight"]                    # [D, 1, ph, pw]
    d, _, ph, pw = w.shape
    b, f, t = x.shape
    patches = np.asarray(x, np.float64).reshape(b, f // ph, ph, t // pw, pw)
    tokens = np.einsum("bfptq,dpq->bftd", patches, w[:, 0]) + sd["patch_embed.proj.bias"]
    tokens = tokens.reshape(b, -1, d)                     # frequency-major, as Conv2d + flatten
    if positions is None:
        positions = sd["pos_embed"][0]
    tokens = tokens + positions[1: tokens.shape[1] + 1]
    cls = np.broadcast_to(sd["cls_token"] + positions[:1], (b, 1, d))
    h = np.concatenate([cls, tokens], axis=1)

    def norm(v, prefix):
        mu = v.mean(-1, keepdims=True)
        var = ((v - mu) ** 2).mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-6) * sd[prefix + ".weight"] + sd[prefix + ".bias"]

    def linear(v, prefix):
        return v @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]

    for i in range(_depth(state_dict, "blocks")):
        p = f"blocks.{i}."
        qkv = linear(norm(h, p + "norm1"), p + "attn.qkv")
        q, k, v = qkv.reshape(b, -1, 3, num_heads, d // num_heads).transpose(2, 0, 3, 1, 4)
        logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // num_heads)
        attn = np.exp(logits - logits.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        h = h + linear((attn @ v).transpose(0, 2, 1, 3).reshape(b, -1, d), p + "attn.proj")
        hidden = linear(norm(h, p + "norm2"), p + "mlp.fc1")
        h = h + linear(0.5 * hidden * (1 + erf(hidden / np.sqrt(2))), p + "mlp.fc2")
    return norm(h, "norm")


# ------------------------------------------------------------------------------ workdirs

FALLBACK_NORM_STATS = (-7.1, 4.2)   # their runtime's statistics when a checkpoint has none


def converted_config(sizes: Sizes):
    """A config like train.py's for the converted model: the repository's base config
    (configs/common.py) with the checkpoint's sizes."""
    try:
        from configs import common
    except ImportError:
        raise ConversionError("configs/common.py is not importable: run the converter from "
                              "the repository root (python -m dwm_jax.convert ...)") from None
    objective = "m2d" if sizes.objective == "encoder" else sizes.objective
    c = common.base(objective, "random")
    c.model.update(size=sizes.size, input_shape=sizes.input_shape, patch_size=sizes.patch_size)
    if sizes.decoder:
        c.model.decoder = dict(sizes.decoder)
    if sizes.mask_ratio is not None:
        c.masking.mask_ratio = sizes.mask_ratio
    c.data.name = "converted"
    return c


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _existing(workdir: str, sha256: str, options: dict):
    """None when ``workdir`` holds no checkpoint; 'same' when it holds this very conversion;
    raises ConversionError when it holds anything else."""
    from dwm_jax import checkpointing

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            return None
        meta = ckpt.read_meta(step)
    finally:
        ckpt.close()
    done = meta.get("converted_from")
    if done and done.get("sha256") == sha256 and done.get("options") == options:
        return "same"
    what = (f"weights converted from {done.get('file')}" if done else
            f"a training run ({meta['config']['objective']['name']}, step {step})")
    raise ConversionError(f"--workdir {workdir} already holds {what}; choose another workdir")


def convert(path: str, workdir: str, *, num_heads=None, decoder_num_heads=None,
            input_shape=None, norm_stats=None, check=True, log=print) -> dict:
    """Converts one checkpoint into ``workdir``; returns the report also written to
    ``workdir/conversion.json``. See the module docstring and ``--help``."""
    import jax

    from dwm_jax import checkpointing, pretrained, trainer

    t0 = time.perf_counter()
    options = dict(num_heads=num_heads, decoder_num_heads=decoder_num_heads,
                   input_shape=list(input_shape) if input_shape else None,
                   norm_stats=list(norm_stats) if norm_stats else None)
    sha256 = _sha256(path) if os.path.isfile(path) else ""
    if _existing(workdir, sha256, options) == "same":
        log(f"{workdir} already holds this conversion of {path}; nothing to do")
        with open(os.path.join(workdir, "conversion.json")) as f:
            return json.load(f)
    raw, args = read_checkpoint(path)
    state_dict, notes = strip_prefixes(raw)
    del raw
    sizes = infer_sizes(state_dict, path=path, args=args, num_heads=num_heads,
                        decoder_num_heads=decoder_num_heads, input_shape=input_shape)
    grid = tuple(n // p for n, p in zip(sizes.input_shape, sizes.patch_size))
    try:
        check_positions(state_dict, grid)
    except ValueError as e:
        raise ConversionError(f"{e} (input {sizes.input_shape[0]}x{sizes.input_shape[1]}, "
                              f"from {sizes.sources['input_shape']})") from None

    if norm_stats is not None:
        stats, stats_from = tuple(map(float, norm_stats)), "--norm_stats"
    elif "norm_stats" in state_dict:
        stats = tuple(float(v) for v in np.asarray(state_dict["norm_stats"]).ravel()[:2])
        stats_from = "the checkpoint's norm_stats"
        if sizes.objective == "msm_mae":
            notes.append("an MSM-MAE checkpoint's norm_stats is its class default, not the "
                         "statistics of its data; pass --norm_stats MEAN,STD if you know them")
    else:
        stats, stats_from = FALLBACK_NORM_STATS, "their runtime's fallback (-7.1, 4.2)"
        notes.append("the checkpoint has no norm_stats: using their runtime's fallback mean "
                     "-7.1, std 4.2 (--norm_stats MEAN,STD overrides)")
    if not (np.isfinite(stats).all() and stats[1] > 0):
        raise ConversionError(f"normalisation statistics {stats} ({stats_from}) are not a "
                              "finite mean and a positive std")

    if sizes.objective == "encoder" and "mask_token" in state_dict:
        del state_dict["mask_token"]  # an encoder-only file may keep it; the encoder has none
        notes.append("skipped mask_token (no decoder to use it)")
    try:
        trees = from_torch(state_dict, sizes.objective, strict=True)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    for name in [n for n in state_dict if n.startswith(("decoder", "target", "mask_token"))]:
        del state_dict[name]  # converted; the float64 check needs only the encoder's
    cfg = converted_config(sizes)
    setup = trainer.make_setup(cfg, 1, 1)
    abstract = trainer.abstract_state(setup, cfg.seed)
    # as device arrays once (Orbax and the fingerprint would each copy NumPy leaves)
    state = jax.device_put(dict(params=trees.pop("params"),
                                target=trees.pop("target") if sizes.objective == "m2d" else {}))
    want = dict(params={k: v for k, v in abstract["params"].items() if k in state["params"]},
                target=abstract["target"] if state["target"] else {})
    diffs = checkpointing.signature_differences(checkpointing.tree_signature(state),
                                       checkpointing.tree_signature(want))
    if diffs:
        raise ConversionError(f"the converted arrays do not fit a {sizes.size} model: "
                              f"{'; '.join(diffs)}")

    check_diff = None
    if check:  # our encoder against a float64 NumPy forward of their tensors
        x = np.random.default_rng(0).standard_normal((1, *sizes.input_shape), np.float32)
        theirs = numpy_forward(state_dict, x, sizes.heads)
        encoder = pretrained.abstract_objective(cfg).encoder
        from flax import nnx
        graphdef, _ = nnx.split(encoder, nnx.Param)
        ours = np.asarray(nnx.merge(graphdef, state["params"]["encoder"])(x), np.float64)
        check_diff = float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))
        if check_diff > 1e-4:
            raise ConversionError(
                f"our encoder differs from a float64 forward of the checkpoint by "
                f"{check_diff:.2e} (relative): are --num_heads ({sizes.heads}, from "
                f"{sizes.sources['heads']}) and the layout right?")

    report = dict(
        file=os.path.abspath(path), sha256=sha256, options=options,
        objective=sizes.objective, size=sizes.size, patch_size=list(sizes.patch_size),
        input_shape=list(sizes.input_shape), decoder=sizes.decoder, mask_ratio=sizes.mask_ratio,
        sources=sizes.sources, norm_stats=list(stats), norm_stats_from=stats_from,
        args={k: v for k, v in args.items() if isinstance(v, (int, float, str, bool))},
        notes=notes, check_max_relative_diff=check_diff,
        parameters=int(sum(np.size(v) for v in jax.tree.leaves(state))))
    meta = dict(config=trainer.config_json(cfg),
                norm_stats=dict(mean=stats[0], std=stats[1]),
                signature=checkpointing.tree_signature(state),
                dataset=dict(name="converted", split="", clips=0, fingerprint=""),
                steps_per_epoch=1, total_steps=1, converted_from=report)
    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpointing.Checkpointer(workdir, keep=1, async_save=False)
    try:
        ckpt.save(0, state, None, meta)
        ckpt.wait()
    finally:
        ckpt.close()
    report["seconds"] = round(time.perf_counter() - t0, 2)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(meta["config"], f, indent=1)
    with open(os.path.join(workdir, "conversion.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def _norm_stats_flag(text: str):
    try:
        mean, std = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MEAN,STD (e.g. -7.1,4.2); got {text!r}")
    return mean, std


def _shape_flag(text: str):
    try:
        return _pair_of(text, "--input_shape")
    except (ConversionError, ValueError):
        raise argparse.ArgumentTypeError(f"expected FxT (e.g. 80x608); got {text!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dwm_jax.convert",
        description="Convert the authors' M2D / MSM-MAE PyTorch checkpoint into a workdir "
                    "that Embedder.from_workdir, eval.py and config.init_from read.")
    parser.add_argument("checkpoint", help=".pth (needs torch), .npz or .safetensors")
    parser.add_argument("--workdir", required=True, help="where to write the converted run")
    parser.add_argument("--num_heads", type=int, help="encoder heads (default: args, or "
                        "width / 64)")
    parser.add_argument("--decoder_num_heads", type=int, help="predictor / decoder heads "
                        "(default: args, or M2D width / 32, MSM-MAE width / 64)")
    parser.add_argument("--input_shape", type=_shape_flag, help="FxT the model was trained "
                        "on (default: args, the folder name, or the positions)")
    parser.add_argument("--norm_stats", type=_norm_stats_flag, help="MEAN,STD of the "
                        "log-mel normalisation (default: the checkpoint's, or -7.1,4.2)")
    parser.add_argument("--no_check", action="store_true", help="skip the float64 check")
    a = parser.parse_args(argv)
    from dwm_jax import checkpointing
    checkpointing.quiet_background_echoes()
    for flag in ("num_heads", "decoder_num_heads"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            parser.error(f"--{flag} must be >= 1")
    try:
        r = convert(a.checkpoint, a.workdir, num_heads=a.num_heads,
                    decoder_num_heads=a.decoder_num_heads, input_shape=a.input_shape,
                    norm_stats=a.norm_stats, check=not a.no_check)
    except (ConversionError, OSError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 2
    for note in r["notes"]:
        print(f"note: {note}")
    dec = r["decoder"]
    head = "" if not dec else ", head " + "x".join(str(dec[k]) for k in ("dim", "depth", "heads"))
    print(f"converted {r['file']} ({r['objective']}, ViT {r['size']}, "
          f"{r['parameters'] / 1e6:.1f} M parameters"
          f"{head}, "
          f"input {r['input_shape'][0]}x{r['input_shape'][1]}, "
          f"norm_stats {r['norm_stats'][0]:.4g}, {r['norm_stats'][1]:.4g} from "
          f"{r['norm_stats_from']})")
    if r["check_max_relative_diff"] is not None:
        print(f"checked: our encoder vs a float64 NumPy forward of the checkpoint, max relative "
              f"difference {r['check_max_relative_diff']:.1e}")
    print(f"written: {a.workdir} (python eval.py --workdir={a.workdir} ...; "
          f"--config.init_from={a.workdir} to pretrain from it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
