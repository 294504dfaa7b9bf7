"""The encoder as a serialised StableHLO program (``jax.export``), for serving without this
package's model code.

    path = serving.save("workdirs/demo", "exported/")       # encoder-<step>.stablehlo (+ .json)
    features = serving.load(path)                            # a callable
    steps = features(x)     # x: normalised log-mel [B, F, 16 * t] -> [B, t, Fp * dim]

The program takes the *normalised* log-mel (``(log_mel - mean) / std``, the statistics in the
side-car JSON) with a symbolic batch ``B`` and a symbolic number of time patches ``t``
(1 <= t <= the encoder's input width / patch width), and returns the features of each time
step: the tokens of its frequency patches concatenated, exactly what
:meth:`dwm_jax.embedding.Embedder.time_features` computes for one chunk. The weights are
constants inside the program. Reloading needs only ``jax``: ``jax.export.deserialize``.
"""

from __future__ import annotations

from dwm_jax._extras import require

require("export", "flax", "orbax", "flatbuffers")

import hashlib
import json
import os
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from dwm_jax import checkpointing, storage, weights

FORMAT_VERSION = 1


def encoder_features_fn(encoder):
    """A pure function: normalised log-mel [B, F, pw * t] -> features [B, t, Fp * dim]."""
    graphdef, params = nnx.split(encoder)

    def features(x):
        return nnx.merge(graphdef, params).time_features(x)
    return features


# lowered for each: the file runs wherever jax runs
PLATFORMS = ("cpu", "cuda", "tpu")


def export_encoder(encoder, platforms=PLATFORMS) -> jax.export.Exported:
    """The encoder's features as a ``jax.export.Exported`` with symbolic batch and time,
    lowered for ``platforms``."""
    (n_mels, frames), pw = encoder.input_shape, encoder.patch_size[1]
    batch, steps = jax.export.symbolic_shape(
        "b, t", constraints=(f"t <= {frames // pw}",))
    spec = jax.ShapeDtypeStruct((batch, n_mels, pw * steps), jnp.float32)
    return jax.export.export(jax.jit(encoder_features_fn(encoder)), platforms=platforms)(spec)


class ServingFileError(ValueError):
    """A serialised encoder that cannot be used as it is (the message names the file)."""


def save(workdir: str, out_dir: str, step: int | None = None) -> str:
    """Writes ``out_dir/encoder-<step>.stablehlo`` and its side-car ``.json`` (input shape,
    patch size, normalisation, the program's SHA-256); returns the program's path."""
    w_step = _step_of(workdir, step)
    encoder, stats, _ = weights.load_encoder(workdir, w_step)
    exported = export_encoder(encoder)
    path = storage.join(out_dir, f"encoder-{w_step}.stablehlo")
    _write_with_sidecar(path, bytes(exported.serialize()), _sidecar(
        encoder, stats, platforms=list(exported.platforms)))
    return path


def save_onnx(workdir: str, out_dir: str, step: int | None = None) -> str:
    """Writes ``out_dir/encoder-<step>.onnx`` (jax2onnx) and its side-car ``.json``: the
    same features as :func:`save`'s program with a symbolic batch and the time fixed at the
    encoder's input width (the full chunks of a clip; symbolic time is refused by
    onnxruntime, see the export guide). Needs ``jax2onnx`` and ``onnxruntime`` (not
    dependencies of this package: their pins conflict with Orbax's, see the export guide)."""
    jax2onnx = _jax2onnx()
    w_step = _step_of(workdir, step)
    encoder, stats, _ = weights.load_encoder(workdir, w_step)
    path = storage.join(out_dir, f"encoder-{w_step}.onnx")
    model = jax2onnx.to_onnx(encoder_features_fn(encoder),
                             [("B", *encoder.input_shape)], model_name="dwm_jax_encoder",
                             input_names=["log_mel"], output_names=["features"])
    _write_with_sidecar(path, model.SerializeToString(), _sidecar(
        encoder, stats, input="normalised log-mel [B, F, max_frames]"))
    return path


def _jax2onnx():
    """The jax2onnx module; ImportError saying how to install it."""
    try:
        import jax2onnx
    except ImportError:
        raise ImportError("ONNX export needs jax2onnx (pip install --no-deps jax2onnx onnx "
                          "onnx-ir onnxruntime; see docs/guides/export.md)") from None
    return jax2onnx


def check_onnx_available() -> None:
    """ImportError (how to install it) unless ONNX export can run: checked before writing."""
    _jax2onnx()


def _sidecar(encoder, stats, **extra) -> dict:
    side = dict(format_version=FORMAT_VERSION, input="normalised log-mel [B, F, pw * t]",
                output="[B, t, Fp * dim]", n_mels=encoder.input_shape[0],
                max_frames=encoder.input_shape[1], patch_size=list(encoder.patch_size),
                feature_size=encoder.grid[0] * encoder.size.dim,
                norm_stats=dict(mean=stats.mean, std=stats.std))
    return {**side, **extra}


def _write_with_sidecar(path: str, payload: bytes, side: dict) -> None:
    """``path`` and ``path.json`` (with the payload's SHA-256), each written to a temporary
    name and renamed; the side-car last, so a file with a side-car is whole."""
    storage.write_atomic(path, payload)
    side["sha256"] = hashlib.sha256(payload).hexdigest()
    storage.write_atomic(path + ".json", json.dumps(side, indent=1))


def _step_of(workdir: str, step: int | None) -> int:
    """``step``, or the workdir's latest (read from the checkpoint folder, no arrays)."""
    if step is not None:
        return step
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    try:
        latest = ckpt.latest_step()
    finally:
        ckpt.close()
    if latest is None:
        raise FileNotFoundError(f"no checkpoint under {ckpt.directory}")
    return latest


def read_verified(path: str) -> tuple[bytes, dict]:
    """A serialised encoder's bytes and side-car, its SHA-256 checked against the side-car's
    (ServingFileError naming the file when they differ or the side-car is unreadable). A
    file without a side-car is read unchecked, with a warning."""
    with storage.open(path, "rb") as f:
        payload = f.read()
    try:
        side = json.loads(storage.read_text(path + ".json"))
    except FileNotFoundError:
        warnings.warn(f"{path}: no side-car {os.path.basename(path)}.json, so the file cannot "
                      "be checked for damage", stacklevel=2)
        return payload, {}
    except (OSError, ValueError) as e:
        raise ServingFileError(f"{path}.json: unreadable side-car ({e})") from None
    if not isinstance(side, dict):
        raise ServingFileError(f"{path}.json: the side-car is not a JSON object")
    expected = side.get("sha256")
    if expected is not None and hashlib.sha256(payload).hexdigest() != expected:
        raise ServingFileError(f"{path}: damaged (its SHA-256 is not the one written at "
                               "export in its side-car); export it again")
    return payload, side


def load(path: str):
    """The serialised encoder as a callable on normalised log-mel [B, F, pw * t] (t <= the
    exported width); the file is checked against its side-car's hash first."""
    payload, side = read_verified(path)
    try:
        exported = jax.export.deserialize(bytearray(payload))
    except Exception as e:  # flatbuffers' struct.error, IndexError, ...: not a program
        raise ServingFileError(f"{path}: damaged or truncated, not a serialised jax.export "
                               f"program ({type(e).__name__})") from None
    (_, n_mels, _), = [a.shape for a in exported.in_avals]
    max_frames = side.get("max_frames")
    pw = (side.get("patch_size") or [0, 0])[1]

    def features(x):
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) != 3 or shape[1] != n_mels:
            raise ValueError(f"{path}: expects normalised log-mel [B, {n_mels}, frames]; got "
                             f"{shape}")
        if max_frames and shape[2] > max_frames:
            raise ValueError(f"{path}: at most {max_frames} frames per call (the exported "
                             f"width); got {shape[2]}: cut the log-mel into chunks")
        if pw and shape[2] % pw:
            raise ValueError(f"{path}: frames must be a multiple of the patch width {pw}; "
                             f"got {shape[2]}: pad the log-mel with zeros")
        return exported.call(x)
    return features


def load_onnx(path: str):
    """An ``onnxruntime.InferenceSession`` of an ONNX encoder this package wrote, the file
    checked against its side-car's hash first (needs onnxruntime)."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("loading an ONNX encoder needs onnxruntime (pip install "
                          "onnxruntime)") from None
    payload, _ = read_verified(path)
    try:
        return onnxruntime.InferenceSession(payload)
    except Exception as e:  # onnxruntime's own error types
        raise ServingFileError(f"{path}: damaged or truncated, not an ONNX model "
                               f"({type(e).__name__})") from None
