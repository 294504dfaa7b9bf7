"""The authors' PyTorch checkpoints -> our workdirs.

    python -m dwm_jax.convert m2d_vit_base-80x608p16x16-221006-mr7/checkpoint-300.pth \
        --workdir workdirs/m2d_as_released
    python eval.py --workdir=workdirs/m2d_as_released --tasks=... --data_dir=data

The command reads a ``.pth`` (PyTorch needed: ``pip install 'dwm_jax[torch]'``), ``.npz`` or
``.safetensors`` state_dict, infers the sizes (shapes, the checkpoint's ``args``, the authors'
folder name ``<name>-<F>x<T>p<ph>x<pw>[-...]``; flags override), checks our encoder against a
float64 NumPy forward of the original tensors, and writes an Orbax checkpoint that
``Embedder.from_workdir``, ``eval.py`` and ``config.init_from`` (continued pretraining) read.
The name table and the file readers are :mod:`dwm_jax.torch_layout`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Mapping

import jax
import numpy as np
from flax import nnx

from dwm_jax import build, checkpointing, storage
from dwm_jax import config as config_lib
from dwm_jax.models import vit
from dwm_jax.torch_layout import (FALLBACK_NORM_STATS, ConversionError, Sizes, from_torch,
                                  infer_sizes, numpy_forward, pair_of, read_checkpoint,
                                  strip_prefixes)


# ------------------------------------------------------------------------------ positions

def check_positions(state_dict: Mapping[str, np.ndarray], grid: tuple[int, int],
                    atol: float = 1e-5) -> float:
    """Largest difference between the checkpoint's fixed positions and ours (CLS row 0 must
    be zeros); raises ValueError when they disagree, e.g. for another grid or layout."""
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


# ------------------------------------------------------------------------------ workdirs

def converted_config(sizes: Sizes):
    """A config like train.py's for the converted model: the base config with the
    checkpoint's sizes."""
    objective = "m2d" if sizes.objective == "encoder" else sizes.objective
    c = config_lib.base(objective, "random")
    c.model.update(size=sizes.size, input_shape=sizes.input_shape, patch_size=sizes.patch_size)
    if sizes.decoder:
        c.model.decoder = dict(sizes.decoder)
    if sizes.mask_ratio is not None:
        c.masking.mask_ratio = sizes.mask_ratio
    c.data.name = "converted"
    return c


def _sha256(path: str) -> str:
    return storage.digest(path)


def _existing(workdir: str, sha256: str, options: dict) -> dict | None:
    """None when ``workdir`` holds no checkpoint; the report saved with the checkpoint when
    it holds this very conversion; raises ConversionError when it holds anything else."""
    if not storage.isdir(storage.join(workdir, "checkpoints")):
        return None
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            return None
        meta = ckpt.read_meta(step)
    except checkpointing.CheckpointDamagedError as e:
        raise ConversionError(f"--workdir {workdir} holds a damaged checkpoint ({e}); remove "
                              "it or choose another workdir") from None
    finally:
        ckpt.close()
    done = meta.get("converted_from")
    if done and done.get("sha256") == sha256 and done.get("options") == options:
        return done
    what = (f"weights converted from {done.get('file')}" if done else
            f"a training run ({meta['config']['objective']['name']}, step {step})")
    raise ConversionError(f"--workdir {workdir} already holds {what}; choose another workdir")


def convert(path: str, workdir: str, *, num_heads=None, decoder_num_heads=None,
            input_shape=None, norm_stats=None, check=True, log=print) -> dict:
    """Converts one checkpoint into ``workdir``; returns the report also written to
    ``workdir/conversion.json``. See the module docstring and ``--help``."""
    t0 = time.perf_counter()
    options = dict(num_heads=num_heads, decoder_num_heads=decoder_num_heads,
                   input_shape=list(input_shape) if input_shape else None,
                   norm_stats=list(norm_stats) if norm_stats else None)
    storage.check(path, "checkpoint")
    storage.check_reachable(workdir, "--workdir")
    sha256 = _sha256(path) if storage.isfile(path) else ""
    done = _existing(workdir, sha256, options)
    if done is not None:
        log(f"{workdir} already holds this conversion of {path}; nothing to do")
        try:
            return json.loads(storage.read_text(storage.join(workdir, "conversion.json")))
        except (OSError, ValueError):  # a run stopped after its checkpoint: finish it
            _write_json(storage.join(workdir, "conversion.json"), done)
            return done
    with storage.local_file(path) as local:
        raw, args = read_checkpoint(local)
    state_dict, notes = strip_prefixes(raw)
    del raw
    precision = _as_float32(state_dict, notes)
    _check_finite(state_dict)
    sizes = infer_sizes(state_dict, path=path, args=args, num_heads=num_heads,
                        decoder_num_heads=decoder_num_heads, input_shape=input_shape)
    _note_heads(sizes, args, notes)
    _check_grid(state_dict, sizes, POSITION_TOLERANCE[precision])
    stats, stats_from = _norm_stats(state_dict, sizes, norm_stats, notes, args)
    cfg = converted_config(sizes)
    state = _converted_state(state_dict, sizes, cfg, notes)
    check_diff = _check_encoder(state_dict, state, sizes, cfg, precision) if check else None
    report = dict(
        file=storage.absolute(path), sha256=sha256, options=options,
        objective=sizes.objective, size=sizes.size, patch_size=list(sizes.patch_size),
        input_shape=list(sizes.input_shape), decoder=sizes.decoder, mask_ratio=sizes.mask_ratio,
        heads=sizes.heads, sources=sizes.sources, precision=precision,
        norm_stats=list(stats), norm_stats_from=stats_from,
        args={k: v for k, v in args.items() if isinstance(v, (int, float, str, bool))},
        notes=notes, check_max_relative_diff=check_diff,
        parameters=int(sum(np.size(v) for v in jax.tree.leaves(state))))
    _write_workdir(workdir, state, cfg, stats, report)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    _write_json(storage.join(workdir, "conversion.json"), report)
    return report


def _write_json(path: str, obj) -> None:
    """Written whole or not at all."""
    storage.write_atomic(path, json.dumps(obj, indent=1))


# how far stored positions may be from ours: float32 rounding, or that of the half precision
# the weights were stored in
POSITION_TOLERANCE = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}


def _as_float32(state_dict, notes: list) -> str:
    """Casts every floating tensor to float32 in place -> the lowest precision stored
    ('float32', 'float16' or 'bfloat16'), noted when it is a half one."""
    stored = {str(np.asarray(v).dtype) for v in state_dict.values()
              if np.asarray(v).dtype.kind == "f" or str(np.asarray(v).dtype) == "bfloat16"}
    for name in list(state_dict):
        v = np.asarray(state_dict[name])
        if v.dtype.kind == "f" or str(v.dtype) == "bfloat16":
            state_dict[name] = v.astype(np.float32)
    half = [p for p in ("bfloat16", "float16") if p in stored]
    if half:
        notes.append(f"the weights are stored in {half[0]}: converted to float32, positions "
                     f"compared at {half[0]} tolerance ({POSITION_TOLERANCE[half[0]]:g})")
        return half[0]
    return "float32"


def _note_heads(sizes: Sizes, args: dict, notes: list) -> None:
    """The head count cannot be read from the weights (any count that divides the width
    fits the same tensors, and the float64 check runs with the same count). Refuses a
    --num_heads that contradicts the size named in args.model; notes a defaulted count."""
    named = _heads_of_model_name(args.get("model"), sizes.dim)
    if named and named != sizes.heads:
        raise ConversionError(
            f"{sizes.heads} heads (from {sizes.sources['heads']}) contradict the checkpoint's "
            f"args.model {args['model']!r}, a ViT of {named} heads at width {sizes.dim}")
    if named:
        sizes.sources["heads"] += f", agreeing with args.model {args['model']!r}"
    elif sizes.sources["heads"] == "width / 64":
        notes.append(f"{sizes.heads} heads from the width ({sizes.dim} / 64): the weights "
                     "cannot tell the head count and the file has no args saying it; pass "
                     "--num_heads if the model was trained with another")


# timm's ViT names -> (width, heads): a named size fixes the head count
_TIMM_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12), "large": (1024, 16),
               "huge": (1280, 16)}


def _heads_of_model_name(model, dim: int) -> int | None:
    if not isinstance(model, str):
        return None
    for name, (width, heads) in _TIMM_SIZES.items():
        if f"vit_{name}" in model and width == dim:
            return heads
    return None


def _check_finite(state_dict):
    """Every floating tensor finite: a NaN or inf in a weight is named, not converted."""
    for name, value in state_dict.items():
        value = np.asarray(value)
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ConversionError(f"tensor {name} holds NaN or infinite values")


def _check_grid(state_dict, sizes: Sizes, atol: float):
    """The checkpoint's fixed positions against ours for the inferred input size."""
    grid = tuple(n // p for n, p in zip(sizes.input_shape, sizes.patch_size))
    try:
        check_positions(state_dict, grid, atol)
    except ValueError as e:
        raise ConversionError(f"{e} (input {sizes.input_shape[0]}x{sizes.input_shape[1]}, "
                              f"from {sizes.sources['input_shape']})") from None


def _norm_stats(state_dict, sizes: Sizes, given, notes: list, args: dict) -> tuple[tuple, str]:
    """(mean, std) and where they came from: the flag, the checkpoint (its ``args`` at full
    precision where they round to its float32 tensor, as our exports write them) or their
    fallback."""
    if given is not None:
        stats, stats_from = tuple(map(float, given)), "--norm_stats"
    elif "norm_stats" in state_dict and _args_stats(args, state_dict["norm_stats"]):
        stats = _args_stats(args, state_dict["norm_stats"])
        stats_from = "the checkpoint's norm_stats (args.norm_stats, full precision)"
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
    return stats, stats_from


def _args_stats(args: dict, tensor) -> tuple | None:
    """``args['norm_stats']`` when it is two numbers that round to ``tensor``'s first two."""
    found = args.get("norm_stats")
    if (not isinstance(found, (list, tuple)) or len(found) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in found)):
        return None
    rounded = np.asarray(found, np.float32)
    return tuple(map(float, found)) if np.array_equal(
        rounded, np.asarray(tensor, np.float32).ravel()[:2]) else None


def _converted_state(state_dict, sizes: Sizes, cfg, notes: list) -> dict:
    """``{'params', 'target'}`` on the device, checked against the config's shapes. Leaves in
    ``state_dict`` only the encoder's tensors (what the float64 check needs)."""
    if sizes.objective == "encoder" and "mask_token" in state_dict:
        del state_dict["mask_token"]  # an encoder-only file may keep it; the encoder has none
        notes.append("skipped mask_token (no decoder to use it)")
    try:
        trees = from_torch(state_dict, sizes.objective, strict=True)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    for name in [n for n in state_dict if n.startswith(("decoder", "target", "mask_token"))]:
        del state_dict[name]
    abstract = build.abstract_weights(cfg)
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
    return state


def _check_encoder(state_dict, state: dict, sizes: Sizes, cfg, precision: str) -> float:
    """Our encoder against a float64 NumPy forward of their tensors -> the largest relative
    difference; ConversionError above 1e-4. The forward adds their stored positions, or
    ours (exact sin-cos, as our model does) when there are none or they were stored in a
    half precision (their rounding was checked by ``_check_grid``)."""
    x = np.random.default_rng(0).standard_normal((1, *sizes.input_shape), np.float32)
    grid = tuple(n // p for n, p in zip(sizes.input_shape, sizes.patch_size))
    ours_positions = np.concatenate([np.zeros((1, sizes.dim)), vit.sincos_2d(sizes.dim, grid)])
    theirs_usable = "pos_embed" in state_dict and precision == "float32"
    positions = (np.asarray(state_dict["pos_embed"], np.float64)[0] if theirs_usable
                 else ours_positions)
    theirs = numpy_forward(state_dict, x, sizes.heads, positions)
    graphdef, _ = nnx.split(build.abstract_objective(cfg).encoder, nnx.Param)
    ours = np.asarray(nnx.merge(graphdef, state["params"]["encoder"])(x), np.float64)
    diff = float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))
    if not diff <= 1e-4:  # NaN fails too
        raise ConversionError(
            f"our encoder differs from a float64 forward of the checkpoint by "
            f"{diff:.2e} (relative): is the layout right?")
    return diff


def _write_workdir(workdir: str, state: dict, cfg, stats, report: dict):
    """The converted weights as a workdir's step-0 checkpoint, and its config.json."""
    meta = dict(config=config_lib.to_json_dict(cfg),
                norm_stats=dict(mean=stats[0], std=stats[1]),
                signature=checkpointing.tree_signature(state),
                dataset=dict(name="converted", split="", clips=0, fingerprint=""),
                steps_per_epoch=1, total_steps=1, converted_from=report)
    storage.makedirs(workdir)
    ckpt = checkpointing.Checkpointer(workdir, keep=1, async_save=False)
    try:
        ckpt.save(0, state, None, meta)
        ckpt.wait()
    finally:
        ckpt.close()
    _write_json(storage.join(workdir, "config.json"), meta["config"])


def _norm_stats_flag(text: str):
    try:
        mean, std = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MEAN,STD (e.g. -7.1,4.2); got {text!r}")
    return mean, std


def _shape_flag(text: str):
    try:
        return pair_of(text, "--input_shape")
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
    checkpointing.quiet_background_echoes()
    for flag in ("num_heads", "decoder_num_heads"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            parser.error(f"--{flag} must be >= 1")
    try:
        r = convert(a.checkpoint, a.workdir, num_heads=a.num_heads,
                    decoder_num_heads=a.decoder_num_heads, input_shape=a.input_shape,
                    norm_stats=a.norm_stats, check=not a.no_check)
    except (ConversionError, storage.StorageError, OSError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 2
    for note in r["notes"]:
        print(f"note: {note}")
    dec = r["decoder"]
    head = "" if not dec else ", head " + "x".join(str(dec[k]) for k in ("dim", "depth", "heads"))
    print(f"converted {r['file']} ({r['objective']}, ViT {r['size']} with {r['heads']} heads "
          f"from {r['sources']['heads']}, "
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
