"""Our workdirs -> the authors' PyTorch layout, with a model card.

    python -m dwm_jax.export workdirs/demo exported/                 # .pth (needs torch)
    python -m dwm_jax.export RUN OUT --format safetensors --step 1000
    python -m dwm_jax.export RUN OUT --authors_folder m2d_dwm_vit_base # their folder name

Writes ``checkpoint-<step>.<ext>`` holding their state_dict: the same tensor names and
layouts as their M2D (encoder, predictor, target) and MSM-MAE (encoder, decoder) code saves,
with the fixed sin-cos ``pos_embed`` / ``decoder_pos_embed`` and ``norm_stats`` [mean, std]
as their runtime reads them. A ``.pth`` is their ``{'model': state_dict, 'args':
Namespace}``; a ``.safetensors`` carries ``args`` as JSON in its metadata; an ``.npz`` holds
the tensors alone (its ``args`` are in the card). ``--authors_folder NAME`` puts the file in
``OUT/NAME-<F>x<T>p<ph>x<pw>[-mrNN]/``, the folder convention from which their runtime and
our converter read the input and patch sizes. Beside it: ``model_card.json`` and
``model_card.md`` (front end, normalisation, patch geometry, objective and masking, training
data and steps, recorded probe results) and, with ``--serving``, the StableHLO encoder
(:mod:`dwm_jax.serving`). The name table is :mod:`dwm_jax.torch_layout`'s, shared with the
converter: ``python -m dwm_jax.convert`` reads every exported file back bit for bit.
"""

from __future__ import annotations

from dwm_jax._extras import require

require("export", "flax", "orbax", "flatbuffers")

import argparse
import dataclasses
import json
import os
import sys

import jax
import numpy as np

from dwm_jax import audio, checkpointing, cli, serving, storage, weights
from dwm_jax import config as config_lib
from dwm_jax.models import vit
from dwm_jax.torch_layout import ConversionError, to_torch

FORMATS = ("pth", "safetensors", "npz")
# timm's ViT sizes (width, depth, heads): a matching model is named as their args name it
_TIMM_NAMES = {(192, 12, 3): "vit_tiny", (384, 12, 6): "vit_small", (768, 12, 12): "vit_base",
               (1024, 24, 16): "vit_large", (1280, 32, 16): "vit_huge"}


class ExportError(ValueError):
    """The workdir cannot be exported as asked (the message names the file or flag)."""


def _int_keys(tree):
    """Orbax restores ``blocks: {'0': ...}``; the name table walks ``blocks[0]``."""
    if not isinstance(tree, dict):
        return np.asarray(tree)
    return {int(k) if str(k).isdigit() else k: _int_keys(v) for k, v in tree.items()}


def objective_of(cfg) -> str:
    """'m2d' or 'msm_mae': which of their models the workdir's weights form."""
    name = cfg.objective.name
    if name not in ("m2d", "msm_mae"):
        raise ExportError(f"objective {name!r} has no counterpart in the authors' code")
    return name


def state_dict_of(w: weights.Weights, cfg) -> tuple[dict[str, np.ndarray], list[str]]:
    """Their state_dict (float32 NumPy, their names and layouts) of the weights ``w``, and
    notes on what could not be included."""
    objective, notes = objective_of(cfg), []
    params = _int_keys(vit.unstack_layers(jax.device_get(w.params)))
    target = _int_keys(vit.unstack_layers(jax.device_get(w.target))) or None
    head = "predictor" if objective == "m2d" else "decoder"
    if head not in params:  # a converted encoder-only checkpoint
        objective = "encoder"
        notes.append("the workdir holds an encoder only: exported without predictor/decoder")
    if objective == "m2d" and cfg.objective.target_mode != "m2d":
        target = None
        notes.append(f"M2D target_mode {cfg.objective.target_mode!r} has no place in their "
                     "layout: the target network is not exported")
    patch = tuple(cfg.model.patch_size)
    out = to_torch(params, target if objective == "m2d" else None, objective, patch)
    grid = tuple(n // p for n, p in zip(cfg.model.input_shape, patch))
    out["pos_embed"] = _positions(out["cls_token"].shape[-1], grid)
    if objective != "encoder":
        out["decoder_pos_embed"] = _positions(out["mask_token"].shape[-1], grid)
    out["norm_stats"] = np.asarray([w.norm_stats.mean, w.norm_stats.std], np.float32)
    return out, notes


def _positions(dim: int, grid: tuple[int, int]) -> np.ndarray:
    """Their fixed positions [1, 1 + N, dim]: a zero CLS row, then our sin-cos grid."""
    table = np.asarray(vit.sincos_2d(dim, grid), np.float32)
    return np.concatenate([np.zeros((1, dim), np.float32), table])[None]


def args_of(cfg, w: weights.Weights) -> dict:
    """The training arguments their code saves and their runtime and our converter read
    (plain JSON types)."""
    size = vit.parse_size(cfg.model.size)
    name = _TIMM_NAMES.get((size.dim, size.depth, size.heads), f"vit_{cfg.model.size}")
    patch = list(cfg.model.patch_size)
    args = dict(model=f"{name}_patch{patch[0]}x{patch[1]}", input_size=list(cfg.model.input_shape),
                patch_size=patch, num_heads=size.heads, norm_pix_loss=cfg.objective.norm_pix,
                mask_ratio=cfg.masking.mask_ratio, masking=cfg.masking.name,
                norm_stats=[w.norm_stats.mean, w.norm_stats.std], step=w.step,
                dataset=cfg.data.name)
    decoder = dict(cfg.model.decoder)
    if "heads" in decoder:
        args["decoder_num_heads"] = decoder["heads"]
    if cfg.objective.name == "m2d":
        args.update(ema_decay_init=cfg.objective.ema_start, ema_decay=cfg.objective.ema_end)
    return args


def folder_name(name: str, cfg) -> str:
    """Their convention ``<name>-<F>x<T>p<ph>x<pw>-mrNN``, NN the mask ratio's digits after
    '0.' (``mr7`` for 0.7, ``mr75`` for 0.75)."""
    (f, t), (ph, pw) = cfg.model.input_shape, cfg.model.patch_size
    digits = f"{cfg.masking.mask_ratio:.6f}".rstrip("0").split(".")[1]
    return f"{name}-{f}x{t}p{ph}x{pw}-mr{digits}"


def write_checkpoint(path: str, state_dict: dict, args: dict, fmt: str) -> None:
    """One file in their layout; written to a temporary name and renamed (for a bucket,
    written locally and uploaded in one piece)."""
    with storage.staged(path, f".tmp.{fmt}") as tmp:
        _write_layout(tmp, state_dict, args, fmt)


def _write_layout(tmp: str, state_dict: dict, args: dict, fmt: str) -> None:
    if fmt == "pth":
        torch = _torch()
        torch.save({"model": {k: torch.from_numpy(np.array(v, np.float32))
                              for k, v in state_dict.items()},
                    "args": argparse.Namespace(**args)}, tmp)
    elif fmt == "safetensors":
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, tmp,
                  metadata={"args": json.dumps(args)})
    else:
        with open(tmp, "wb") as f:
            np.savez(f, **state_dict)


def _torch():
    """The torch module; ExportError saying how to install it (or what needs none)."""
    try:
        import torch
    except ImportError:
        raise ExportError("writing .pth needs PyTorch: pip install 'dwm_jax[torch]' (or "
                          "--format safetensors / npz, which need no torch)") from None
    return torch


def check_request(fmt: str, authors_folder: str, onnx: bool) -> None:
    """Refuses, before anything is read or written, a format or folder name that cannot be
    used and an output whose package is missing (ExportError / ImportError, one line)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {FORMATS}; got {fmt!r}")
    if authors_folder and (os.path.isabs(authors_folder) or authors_folder in (".", "..")
                           or any(sep in authors_folder for sep in ("/", "\\", os.sep))):
        raise ExportError(f"--authors_folder {authors_folder!r}: a folder name, not a path "
                          "(no separators, no '..'); the folder is made inside OUT")
    if fmt == "pth":
        _torch()
    if onnx:
        serving.check_onnx_available()


def model_card(w: weights.Weights, cfg, args: dict, fmt: str, file: str,
               notes: list[str]) -> dict:
    """What a shared file needs to be used: the front end, normalisation, geometry,
    objective and masking, training data and steps, and the probe results recorded."""
    frontend = _frontend_of(cfg)
    return dict(
        file=os.path.basename(file), format=fmt, layout="the authors' M2D / MSM-MAE "
        "state_dict (timm / MAE names)", objective=cfg.objective.name, model=args["model"],
        size=cfg.model.size, heads=args["num_heads"],
        input=dict(n_mels=cfg.model.input_shape[0], frames=cfg.model.input_shape[1],
                   seconds=cfg.model.input_shape[1] * frontend["hop_length"]
                   / frontend["sample_rate"]),
        patch_size=list(cfg.model.patch_size),
        frontend=frontend,
        normalisation=dict(mean=w.norm_stats.mean, std=w.norm_stats.std,
                           applied="(log_mel - mean) / std before the encoder"),
        masking=dict(name=cfg.masking.name, mask_ratio=cfg.masking.mask_ratio,
                     options=dict(cfg.masking.options), hint=dict(cfg.masking.hint)),
        training=dict(step=w.step, total_steps=w.meta.get("total_steps"),
                      dataset=w.meta.get("dataset", {}), converted_from=(
                          w.meta.get("converted_from", {}) or {}).get("file")),
        results=_recorded_results(w.workdir, w.step), notes=notes,
        args=args)


def _frontend_of(cfg) -> dict:
    """The front end the training data was made with (its dataset's metadata), or the
    default one when that dataset is not at hand."""
    path = storage.join(cfg.data.data_dir, *cfg.data.name.split("/"))
    found = None
    if storage.isdir(path):
        versions = sorted(v for v in storage.listdir(path)
                          if storage.isfile(storage.join(path, v, "metadata.json")))
        if versions:
            found = json.loads(storage.read_text(
                storage.join(path, versions[-1], "metadata.json"))).get("frontend")
    settings = {**dataclasses.asdict(audio.LogMelFrontEnd()), **(found or {})}
    settings["source"] = ("the training dataset's metadata" if found else
                          "the default front end (the training dataset was not found)")
    return settings


def _recorded_results(workdir: str, step: int) -> dict:
    """probe.json (train.py's probe) and eval/results.json (eval.py) when of this step."""
    out = {}
    for name in ("probe.json", os.path.join("eval", "results.json")):
        try:
            found = json.loads(storage.read_text(storage.join(workdir, name)))
        except (OSError, ValueError):
            continue
        if name == "probe.json" or found.get("step") == step:
            out[name] = found
    return out


def card_markdown(card: dict) -> str:
    """The card as a short human-readable page."""
    fe, n = card["frontend"], card["normalisation"]
    lines = [
        f"# {card['model']} ({card['objective']})", "",
        f"File: `{card['file']}` ({card['layout']}).", "",
        "## Input", "",
        f"- Log-mel: {fe['sample_rate']} Hz, window {fe['n_fft']} samples, hop "
        f"{fe['hop_length']} samples, {fe['n_mels']} mel bins from {fe['fmin']:g} to "
        f"{fe['fmax']:g} Hz, log(mel + {fe['eps']:g}), {fe['pad_mode']} padding "
        f"({fe['source']}).",
        f"- Normalisation: (log_mel - {n['mean']:.6g}) / {n['std']:.6g}.",
        f"- Encoder input {card['input']['n_mels']} x {card['input']['frames']} frames "
        f"({card['input']['seconds']:g} s), patches {card['patch_size'][0]} x "
        f"{card['patch_size'][1]}; ViT {card['size']} with {card['heads']} heads.", "",
        "## Training", "",
        f"- Objective {card['objective']}; masking {card['masking']['name']} at ratio "
        f"{card['masking']['mask_ratio']:g} (options {card['masking']['options']}).",
        f"- Step {card['training']['step']} of {card['training']['total_steps']} on "
        f"{card['training']['dataset'].get('name', '?')} "
        f"({card['training']['dataset'].get('clips', '?')} clips, build "
        f"{card['training']['dataset'].get('fingerprint', '?') or '-'}).", "",
        "## Recorded results", ""]
    lines += _results_lines(card["results"]) or ["- none recorded in the workdir"]
    if card["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in card["notes"]]
    return "\n".join(lines) + "\n"


def _results_lines(results: dict) -> list[str]:
    lines = []
    if "probe.json" in results:
        p = results["probe.json"]
        lines.append(f"- Linear probe on {p.get('dataset')}: accuracy "
                     f"{p.get('test_accuracy', float('nan')):.3f} (chance "
                     f"{p.get('chance', float('nan')):.3f}).")
    for task in results.get(os.path.join("eval", "results.json"), {}).get("tasks", []):
        for key in ("encoder", "finetune"):
            if key in task:
                what = "linear probe" if key == "encoder" else "fine-tuned"
                lines.append(f"- {task['task']}: {what} {task['metric']} "
                             f"{task[key]['test_score']:.3f} (chance {task['chance']:.3f}).")
    return lines


def export(workdir: str, out_dir: str, *, step: int | None = None, fmt: str = "pth",
           authors_folder: str = "", serving_export: bool = False, onnx: bool = False,
           log=print) -> dict:
    """Exports one checkpoint of ``workdir``; returns the model card (also written). Every
    requirement is checked before the first write; a failure after it removes what this
    call wrote."""
    check_request(fmt, authors_folder, onnx)
    storage.check(out_dir, "out")
    storage.check_reachable(workdir, "workdir")
    if not storage.isdir(storage.join(workdir, "checkpoints")):
        raise ExportError(f"{workdir}: no checkpoints there")
    w = weights.read_weights(workdir, step)
    cfg = config_lib.from_stored(w.config)
    state_dict, notes = state_dict_of(w, cfg)
    args = args_of(cfg, w)
    if authors_folder:
        out_dir = storage.join(out_dir, folder_name(authors_folder, cfg))
    path = storage.join(out_dir, f"checkpoint-{w.step}.{fmt}")
    folders = [out_dir] + ([os.path.dirname(out_dir)] if authors_folder else [])
    before = {folder: _files_in(folder) for folder in folders}
    try:
        storage.makedirs(out_dir)
        write_checkpoint(path, state_dict, args, fmt)
        card = model_card(w, cfg, args, fmt, path, notes)
        if serving_export:
            card["serving"] = os.path.basename(serving.save(workdir, out_dir, w.step))
        if onnx:
            card["onnx"] = os.path.basename(serving.save_onnx(workdir, out_dir, w.step))
        storage.write_atomic(storage.join(out_dir, "model_card.json"),
                             json.dumps(card, indent=1))
        storage.write_atomic(storage.join(out_dir, "model_card.md"), card_markdown(card))
    except BaseException:
        for folder in folders:   # innermost first
            _remove_new_files(folder, before[folder])
        raise
    card["path"] = path
    return card


def _files_in(folder: str) -> set[str] | None:
    """The names directly in ``folder`` (None when it does not exist yet)."""
    return set(storage.listdir(folder)) if storage.isdir(folder) else None


def _remove_new_files(folder: str, before: set[str] | None) -> None:
    """Removes the files that appeared in ``folder`` since ``before``, and the folder itself
    when it is new and left empty."""
    if not storage.isdir(folder):
        return
    for name in set(storage.listdir(folder)) - (before or set()):
        if storage.isfile(storage.join(folder, name)):
            storage.remove(storage.join(folder, name))
    if before is None and not storage.is_url(folder) and not os.listdir(folder):
        os.rmdir(folder)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dwm_jax.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", help="a training run (or converted weights)")
    p.add_argument("out", help="the folder to write into")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--format", default="pth", choices=FORMATS)
    p.add_argument("--authors_folder", default="", help="NAME: write into their folder "
                   "convention OUT/NAME-<F>x<T>p<ph>x<pw>[-mrNN]/")
    p.add_argument("--serving", action="store_true",
                   help="also write the encoder as StableHLO (jax.export) beside it")
    p.add_argument("--onnx", action="store_true",
                   help="also write the encoder as ONNX (needs jax2onnx; see the guide)")
    a = p.parse_args(argv)
    checkpointing.quiet_background_echoes()
    try:
        card = export(a.workdir, a.out, step=a.step, fmt=a.format,
                      authors_folder=a.authors_folder, serving_export=a.serving, onnx=a.onnx)
    except (ExportError, ConversionError, config_lib.ConfigError, storage.StorageError,
            checkpointing.CheckpointDamagedError, checkpointing.CheckpointMismatchError) as e:
        return cli.fail("python -m dwm_jax.export", str(e))
    except cli.FILE_ERRORS as e:
        return cli.fail("python -m dwm_jax.export", cli.describe_os_error(e))
    except ImportError as e:  # an optional package for the asked format
        return cli.fail("python -m dwm_jax.export", str(e))
    for note in card["notes"]:
        print(f"note: {note}")
    print(f"exported step {card['training']['step']} of {a.workdir} -> {card['path']} "
          f"(model card: {os.path.join(os.path.dirname(card['path']), 'model_card.md')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
