"""Masked-prediction objectives, chosen by name: MSM-MAE and M2D.

Each objective is an NNX module holding the trainable networks (``.encoder`` plus a decoder
or predictor) with ``loss(x, mask, target=None) -> (loss, aux)``. M2D's target encoder is not
part of the module: it is an EMA copy of the encoder's parameters (an ``nnx.State``) that the
trainer carries in its state and passes in as ``target``; ``target_init`` makes the copy.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dwm_jax import masking
from dwm_jax.models import vit

OBJECTIVES: dict[str, Callable] = {}


def register_objective(name: str):
    def wrap(cls):
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        OBJECTIVES[name] = cls
        return cls
    return wrap


def make_objective(name: str, **kwargs) -> nnx.Module:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)


def _decoder_kwargs(decoder: dict | None) -> dict:
    d = dict(dim=512, depth=8, heads=16)
    d.update(decoder or {})
    return d


@register_objective("msm_mae")
class MSMMAE(nnx.Module):
    """MAE on log-mel: reconstruct the per-patch-normalised log-mel of the masked patches."""

    uses_target = False

    def __init__(self, *, size="base", input_shape=(80, 608), patch_size=(16, 16),
                 decoder=None, norm_pix=True, dtype=jnp.float32, rngs: nnx.Rngs):
        self.encoder = vit.Encoder(size, input_shape=input_shape, patch_size=patch_size,
                                   dtype=dtype, rngs=rngs)
        self.patch_size, self.norm_pix = tuple(patch_size), norm_pix
        self.decoder = vit.TokenDecoder(self.encoder.size.dim, patch_size[0] * patch_size[1],
                                        grid=self.encoder.grid, dtype=dtype, rngs=rngs,
                                        **_decoder_kwargs(decoder))

    def predict(self, x, mask: masking.Mask):
        """-> reconstructions [B, N, ph * pw] (float32) in patch order."""
        latent = self.encoder(x, mask.ids_keep)
        return self.decoder(latent, mask.ids_restore).astype(jnp.float32)

    def loss(self, x, mask: masking.Mask, target=None):
        pred = self.predict(x, mask)
        patches = masking.patchify(x.astype(jnp.float32), self.patch_size)
        if self.norm_pix:
            mean = patches.mean(-1, keepdims=True)
            var = patches.var(-1, keepdims=True)
            patches = (patches - mean) / jnp.sqrt(var + 1e-6)
        per_patch = jnp.mean(jnp.square(pred - patches), axis=-1)  # [B, N]
        loss = jnp.sum(per_patch * mask.mask) / jnp.sum(mask.mask)
        return loss, {}


def _l2_normalise(v):
    return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), 1e-12))


@register_objective("m2d")
class M2D(nnx.Module):
    """M2D: the online encoder sees the visible patches; the predictor predicts the target
    encoder's outputs for the masked patches; the target (EMA of the online encoder) sees only
    the masked patches; loss ``2 - 2 cos`` on L2-normalised vectors."""

    uses_target = True

    def __init__(self, *, size="base", input_shape=(80, 608), patch_size=(16, 16),
                 decoder=None, dtype=jnp.float32, rngs: nnx.Rngs):
        self.encoder = vit.Encoder(size, input_shape=input_shape, patch_size=patch_size,
                                   dtype=dtype, rngs=rngs)
        dim = self.encoder.size.dim
        self.predictor = vit.TokenDecoder(dim, dim, grid=self.encoder.grid, dtype=dtype,
                                          rngs=rngs, **_decoder_kwargs(decoder))

    def target_init(self) -> nnx.State:
        """A copy of the encoder's parameters: the target encoder's starting point."""
        return jax.tree.map(jnp.copy, nnx.state(self.encoder, nnx.Param))

    def target_outputs(self, x, mask: masking.Mask, target: nnx.State):
        """Target encoder (EMA parameters) on the masked patches -> [B, M, dim], no grad."""
        encoder = nnx.merge(nnx.graphdef(self.encoder), target)
        out = encoder(x, mask.ids_mask)[:, 1:]
        return jax.lax.stop_gradient(out.astype(jnp.float32))

    def loss(self, x, mask: masking.Mask, target=None):
        if target is None:
            raise ValueError("M2D.loss needs the target encoder's parameters (target=...)")
        latent = self.encoder(x, mask.ids_keep)
        pred = self.predictor(latent, mask.ids_restore)            # [B, N, D]
        pred = jnp.take_along_axis(pred, mask.ids_mask[..., None], axis=1).astype(jnp.float32)
        tgt = self.target_outputs(x, mask, target)
        cos = jnp.sum(_l2_normalise(pred) * _l2_normalise(tgt), axis=-1)  # [B, M]
        return jnp.mean(2.0 - 2.0 * cos), {}


def ema_decay(step, total_steps: int, start: float = 0.99995, end: float = 0.99999):
    """M2D's EMA decay: linear from ``start`` to ``end`` over training."""
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return start + (end - start) * frac


def ema_update(target: nnx.State, online: nnx.State, decay) -> nnx.State:
    """target <- decay * target + (1 - decay) * online (same tree structure)."""
    return jax.tree.map(lambda t, o: decay * t + (1.0 - decay) * o.astype(t.dtype),
                        target, online)
