"""The authors' PyTorch layout: their tensor names and shapes against our parameter trees,
reading their checkpoint files, inferring a model's sizes, and a float64 NumPy forward of
their encoder. NumPy only (PyTorch for ``.pth``, safetensors for ``.safetensors``), so the
converter and the exporter share one name table.

Their M2D (``M2DViT``) and MSM-MAE (``MaskedAutoencoderViT``) state_dicts name tensors as
timm/MAE do (``blocks.3.attn.qkv.weight``, ``decoder_pred.bias``, ``target_norm.weight``).
:func:`from_torch` turns such a dict of NumPy arrays into our parameter trees (pure dicts, as
the train state holds them); :func:`to_torch` is its inverse. The layouts differ only where
torch and Flax do: a Linear weight is [out, in] there and a kernel [in, out] here; the patch
embedding is a Conv2d [D, 1, ph, pw] there and a Linear on patchified pixels (pixel index
``p * pw + q``, frequency-major within the patch, the same order) here.

Not parameters here: ``pos_embed`` and ``decoder_pos_embed`` (fixed sin-cos, recomputed by
:func:`dwm_jax.models.vit.sincos_2d`; ``convert.check_positions`` compares them) and
``norm_stats`` (the normalisation mean and std, returned separately).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import zipfile
from typing import Iterator, Mapping

import numpy as np

class ConversionError(ValueError):
    """The checkpoint cannot be converted as asked (the message names the key or flag)."""


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
        raise ConversionError(f"{prefix}.N: block indices {sorted(found)} are not "
                              f"0..{len(found) - 1} (a block is missing)")
    return len(found)


def _blocks(names, theirs: str, ours: tuple):
    for i in range(_depth(names, theirs)):
        for suffix, path, transform in _BLOCK:
            yield f"{theirs}.{i}.{suffix}", (*ours, "blocks", i, *path), transform


def table(names, objective: str) -> Iterator[tuple[str, tuple, str]]:
    """``(their name, (tree, *our path), transform)`` for every parameter of ``objective``.

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


# ------------------------------------------------------------------------------ reading files

# Key prefixes of their wrappers: DDP ('module.'), the portable runtime ('backbone.') and the
# CLAP / M2D-AS runtime ('module.ar.runtime.backbone.'). Longest first.
PREFIXES = ("module.ar.runtime.backbone.", "module.backbone.", "backbone.", "module.")
# Parts of their other models that have no place in an audio encoder: skipped with a note.
SKIPPED = {"audio_proj.": "CLAP's audio projection", "text_proj.": "CLAP's text projection",
           "offline_": "M2D-AS's offline predictor", "ar.runtime.": "the runtime wrapper"}


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """-> (state_dict as NumPy arrays in their stored precision, the training ``args`` as a
    dict or {}).

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
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise ConversionError(f"{path}: not a readable .npz ({type(e).__name__}: {e}); "
                                  "is the file whole?") from None
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
        return tensors, _json_args(meta.get("args"), path)
    if ext in (".pth", ".pt", ".bin", ".ckpt"):
        return _read_torch(path)
    raise ConversionError(f"{path}: unknown checkpoint type {ext!r}; expected .pth, .pt, .npz "
                          "or .safetensors")


def _json_args(text: str | None, path: str) -> dict:
    """The ``args`` a .safetensors file's metadata carries (a JSON object), or {}."""
    if text is None:
        return {}
    try:
        args = json.loads(text)
    except ValueError as e:
        raise ConversionError(f"{path}: its metadata 'args' is not JSON ({e})") from None
    if not isinstance(args, dict):
        raise ConversionError(f"{path}: its metadata 'args' is a JSON {type(args).__name__}, "
                              "not an object of training arguments")
    return args


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
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConversionError(f"{path}: torch.load failed ({type(e).__name__}: {first}); "
                              "is the file whole?") from None
    args = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        args = obj.get("args") or {}
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    tensors = {k: _numpy_of(v) for k, v in obj.items() if torch.is_tensor(v)}
    return tensors, args


def _numpy_of(tensor):
    """A torch tensor as NumPy, half precisions kept (bfloat16 as ml_dtypes' bfloat16), so
    that the converter can tell which precision the weights were stored in."""
    import ml_dtypes
    import torch
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy().astype(ml_dtypes.bfloat16)
    if tensor.dtype == torch.float16:
        return tensor.numpy()
    return tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()


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


def pair_of(value, what: str) -> tuple[int, int]:
    """``value`` (``16``, ``"16x16"``, ``[16, 16]``) -> two positive integers; ConversionError
    naming ``what`` (the flag or the args key) otherwise."""
    given = value
    try:
        if isinstance(value, str):
            value = [int(v) for v in value.lower().split("x")]
        if isinstance(value, (int, np.integer)):
            value = [int(value)] * 2
        if isinstance(value, bool) or any(isinstance(v, (bool, float)) and v != int(v)
                                          for v in value):
            raise ValueError
        value = tuple(int(v) for v in value)
    except (TypeError, ValueError, OverflowError):
        raise ConversionError(f"{what} {given!r} is not two positive integers") from None
    if len(value) == 1:
        value = value * 2
    if len(value) != 2 or min(value) < 1:
        raise ConversionError(f"{what} {given!r} is not two positive integers")
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
            # the digits after '0.': mr7 is 0.7 (M2D), mr75 0.75 (MSM-MAE)
            return (f, t), (ph, pw), (float(f"0.{r.group(1)}") if r else None)
    return None, None, None


_RANKS = {"linear": 2, "conv": 4, "": 1}


def check_ranks(state_dict) -> None:
    """Every tensor the name table knows has its rank and no empty axis (Linear weights 2,
    the patch Conv2d 4, norms and biases 1, CLS and mask tokens and the positions 3 as
    [1, n, D]), and ``norm_stats`` two values or more; ConversionError names the first that
    has not."""
    ranks = {name: _RANKS[t] for name, _, t in table(state_dict, detect_objective(state_dict))}
    ranks.update(cls_token=3, mask_token=3, pos_embed=3, decoder_pos_embed=3)
    for name, rank in ranks.items():
        if name not in state_dict:
            continue
        shape = np.shape(state_dict[name])
        if len(shape) != rank or 0 in shape:
            raise ConversionError(f"tensor {name} has shape {list(shape)}; expected {rank} "
                                  "non-empty axes")
    if "norm_stats" in state_dict and np.size(state_dict["norm_stats"]) < 2:
        raise ConversionError(f"tensor norm_stats holds {np.size(state_dict['norm_stats'])} "
                              "value(s); expected the mean and the std")


def _heads_from_args(args: dict, key: str):
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConversionError(f"the checkpoint's args.{key} is {value!r}, not a positive "
                              f"integer; pass --{key}")
    return int(value)


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
    check_ranks(state_dict)
    w = np.shape(state_dict["patch_embed.proj.weight"])
    if len(w) != 4 or w[1] != 1 or min(w) < 1:
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
        raise ConversionError(f"{heads} heads (from {sources['heads']}) do not divide the "
                              f"width {dim}; pass --num_heads")

    name_shape, name_patch, mask_ratio = sizes_from_name(path) if path else (None,) * 3
    arg_patch = args.get("patch_size")
    for given, where in ((arg_patch, "args.patch_size"), (name_patch, "the folder name")):
        if given is not None and pair_of(given, where) != patch:
            raise ConversionError(f"{where} says patches of {pair_of(given, where)}, but "
                                  f"patch_embed.proj.weight has {patch}")
    positions = None
    if "pos_embed" in state_dict:
        positions = int(np.shape(state_dict["pos_embed"])[1]) - 1
    if input_shape is not None:
        shape, sources["input_shape"] = pair_of(input_shape, "--input_shape"), "--input_shape"
    elif args.get("input_size") is not None:
        shape = pair_of(args["input_size"], "args.input_size")
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
            raise ConversionError(f"{dheads} decoder heads (from {sources['decoder_heads']}) "
                                  f"do not divide the decoder width {ddim}; pass "
                                  "--decoder_num_heads")
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
        positions = sd["pos_embed"][0]  # KeyError when absent: pass ``positions``
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


FALLBACK_NORM_STATS = (-7.1, 4.2)   # their runtime's statistics when a checkpoint has none
