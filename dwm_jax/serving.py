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

import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from dwm_jax import checkpointing, weights

FORMAT_VERSION = 1


def encoder_features_fn(encoder):
    """A pure function: normalised log-mel [B, F, pw * t] -> features [B, t, Fp * dim]."""
    graphdef, params = nnx.split(encoder)
    fp, dim, pw = encoder.grid[0], encoder.size.dim, encoder.patch_size[1]

    def features(x):
        tokens = nnx.merge(graphdef, params)(x)[:, 1:].astype(jnp.float32)
        steps = x.shape[2] // pw
        tokens = tokens.reshape(x.shape[0], fp, steps, dim).transpose(0, 2, 1, 3)
        return tokens.reshape(x.shape[0], steps, fp * dim)
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


def save(workdir: str, out_dir: str, step: int | None = None) -> str:
    """Writes ``out_dir/encoder-<step>.stablehlo`` and its side-car ``.json`` (input shape,
    patch size, normalisation); returns the program's path."""
    w_step = _step_of(workdir, step)
    encoder, stats, _ = weights.load_encoder(workdir, w_step)
    exported = export_encoder(encoder)
    path = os.path.join(out_dir, f"encoder-{w_step}.stablehlo")
    with open(path + ".tmp", "wb") as f:
        f.write(exported.serialize())
    os.replace(path + ".tmp", path)
    side = dict(format_version=FORMAT_VERSION, input="normalised log-mel [B, F, pw * t]",
                output="[B, t, Fp * dim]", n_mels=encoder.input_shape[0],
                max_frames=encoder.input_shape[1], patch_size=list(encoder.patch_size),
                feature_size=encoder.grid[0] * encoder.size.dim,
                norm_stats=dict(mean=stats.mean, std=stats.std),
                platforms=list(exported.platforms))
    with open(path + ".json.tmp", "w") as f:
        json.dump(side, f, indent=1)
    os.replace(path + ".json.tmp", path + ".json")
    return path


def save_onnx(workdir: str, out_dir: str, step: int | None = None) -> str:
    """Writes ``out_dir/encoder-<step>.onnx`` (jax2onnx): the same features as
    :func:`save`'s program with a symbolic batch and the time fixed at the encoder's input
    width (the full chunks of a clip; symbolic time is refused by onnxruntime, see the
    export guide). Needs ``jax2onnx`` and ``onnxruntime`` (not dependencies of this
    package: their pins conflict with Orbax's, see the export guide)."""
    try:
        import jax2onnx
    except ImportError:
        raise ImportError("ONNX export needs jax2onnx (pip install --no-deps jax2onnx onnx "
                          "onnx-ir onnxruntime; see docs/guides/export.md)") from None
    w_step = _step_of(workdir, step)
    encoder, _, _ = weights.load_encoder(workdir, w_step)
    path = os.path.join(out_dir, f"encoder-{w_step}.onnx")
    model = jax2onnx.to_onnx(encoder_features_fn(encoder),
                             [("B", *encoder.input_shape)], model_name="dwm_jax_encoder",
                             input_names=["log_mel"], output_names=["features"])
    with open(path + ".tmp", "wb") as f:
        f.write(model.SerializeToString())
    os.replace(path + ".tmp", path)
    return path


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


def load(path: str):
    """The serialised encoder as a callable on normalised log-mel [B, F, pw * t]."""
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    return exported.call
