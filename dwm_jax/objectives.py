"""Masked-prediction objectives, chosen by name: MSM-MAE and M2D, as the authors wrote them.

Each objective is an NNX module holding the trainable networks (``.encoder`` plus a decoder
or predictor) with ``loss(x, mask, target=None) -> (loss, aux)``. M2D's target network is not
part of the module: its parameters (a pure dict, EMA-updated, never given to the optimizer)
live in the train state and come in as ``target``; ``M2D.target_init`` makes them and
``ema_source`` names the online parameters they follow. ``tests/test_reference.py`` checks
both objectives against the authors' PyTorch numbers (``tests/data/reference``): outputs,
losses, every gradient and one optimizer step.
"""

from __future__ import annotations

from dwm_jax._extras import require

require("train", "flax")


import jax
import jax.numpy as jnp
from flax import nnx

from dwm_jax import masking
from dwm_jax.models import vit

OBJECTIVES: dict[str, type] = {}


def register_objective(name: str, *, decoder: dict, head: str, mask_ratio: float):
    """Class decorator declaring an objective under ``name``, once.

    Args:
        name: the objective's name in configs.
        decoder: the default sizes of its decoder / predictor (``dim``, ``depth``,
            ``heads``), what a config's ``model.decoder`` starts from.
        head: the attribute holding that decoder ('decoder' or 'predictor').
        mask_ratio: the paper's mask ratio for it, a config's default.

    The class takes the model keywords (size, input_shape, patch_size, decoder, dtype,
    attention, remat, scan, rngs) plus what its ``config_kwargs(objective_config)`` returns,
    and has ``uses_target`` (whether the train state carries an EMA target).
    """
    def wrap(cls):
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        cls.name, cls.default_decoder, cls.head = name, dict(decoder), head
        cls.mask_ratio = mask_ratio
        OBJECTIVES[name] = cls
        return cls
    return wrap


def make_objective(name: str, **kwargs) -> nnx.Module:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)


def _decoder_kwargs(decoder: dict | None, default: dict) -> dict:
    return {**default, **(decoder or {})}


def standardise(v, eps: float = 1e-6):
    """Per-vector standardisation over the last axis with the *unbiased* variance, as the
    authors' ``norm_pix_loss``: ``(v - mean) / sqrt(var(ddof=1) + eps)``."""
    mean = jnp.mean(v, axis=-1, keepdims=True)
    var = jnp.var(v, axis=-1, keepdims=True, ddof=1)
    return (v - mean) * jax.lax.rsqrt(var + eps)


# The authors' ViT-B sizes: MSM-MAE's decoder (msm_mae_vit_base, which forces depth 4
# whatever --decoder_depth says) and M2D's predictor (m2d_vit_base).
@register_objective("msm_mae", decoder=dict(dim=384, depth=4, heads=6), head="decoder",
                    mask_ratio=0.75)
class MSMMAE(nnx.Module):
    """MSM-MAE (the authors' ``MaskedAutoencoderViT``): the decoder reconstructs every patch
    from the visible ones; the loss is the mean squared error over the masked patches against
    the input patches, each standardised over its pixels (``norm_pix=True``, their default).
    The authors' decoder is 384 wide, 4 blocks, 6 heads (their factory forces it)."""

    uses_target = False

    def __init__(self, *, size="base", input_shape=(80, 608), patch_size=(16, 16),
                 decoder=None, norm_pix=True, dtype=jnp.float32, attention="xla",
                 remat="none", scan=False, rngs: nnx.Rngs):
        switches = dict(dtype=dtype, attention=attention, remat=remat, scan=scan)
        self.encoder = vit.Encoder(size, input_shape=input_shape, patch_size=patch_size,
                                   rngs=rngs, **switches)
        self.patch_size, self.norm_pix = tuple(patch_size), norm_pix
        self.decoder = vit.TokenDecoder(self.encoder.size.dim, patch_size[0] * patch_size[1],
                                        grid=self.encoder.grid, rngs=rngs, **switches,
                                        **_decoder_kwargs(decoder, self.default_decoder))

    @staticmethod
    def config_kwargs(objective_config) -> dict:
        return dict(norm_pix=objective_config.norm_pix)

    def predict(self, x, mask: masking.Mask):
        """-> reconstructions [B, N, ph * pw] (float32) in patch order."""
        latent = self.encoder(x, mask.ids_keep)
        return self.decoder(latent, mask.ids_restore).astype(jnp.float32)

    def reconstruction_target(self, x):
        """x [B, F, T] -> the patches to reconstruct [B, N, ph * pw] (float32)."""
        patches = masking.patchify(x.astype(jnp.float32), self.patch_size)
        return standardise(patches) if self.norm_pix else patches

    def loss(self, x, mask: masking.Mask, target=None):
        pred = self.predict(x, mask)
        per_patch = jnp.mean(jnp.square(pred - self.reconstruction_target(x)), axis=-1)
        loss = jnp.sum(per_patch * mask.mask) / jnp.sum(mask.mask)
        return loss, {}


def l2_normalise(v):
    """``v / max(|v|, 1e-12)`` over the last axis (torch's ``F.normalize``), safe to
    differentiate at 0."""
    return v / jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), 1e-24))


# nnx.Rngs(seed) draws the model's keys as fold_in(key(seed), 0, 1, 2, ...); the target's own
# initialisation folds in this constant instead, far past any count a model reaches.
_TARGET_INIT_STREAM = 0x4D3244


@register_objective("m2d", decoder=dict(dim=512, depth=8, heads=16), head="predictor",
                    mask_ratio=0.7)
class M2D(nnx.Module):
    """M2D (the authors' ``M2DViT``): the online encoder sees the visible patches; the
    predictor predicts, at the masked positions, what the target network makes of the masked
    patches; loss ``2 - 2 cos`` between the L2-normalised prediction and target, averaged over
    the masked tokens.

    The target network (``target_mode="m2d"``, the authors' design): its own transformer
    blocks and final LayerNorm, randomly initialised independently of the online encoder and
    then an EMA of the online blocks and norm; it reuses the *online* patch embedding,
    positions and CLS token, with no gradient through any of it. Its outputs are
    standardised per token (``norm_target=True``, their ``norm_pix_loss``) before the cosine.

    ``target_mode="ema_encoder"`` (an option, off by default): the target is a copy of the
    whole online encoder at step 0 and an EMA of all of it, patch embedding and CLS included,
    as in BYOL and data2vec. Its merit: from the first step the target is the same function as
    the online encoder, and its input embedding moves only as fast as the EMA, so targets do
    not shift with every optimizer step of the patch embedding.
    """

    uses_target = True
    TARGET_MODES = ("m2d", "ema_encoder")

    def __init__(self, *, size="base", input_shape=(80, 608), patch_size=(16, 16),
                 decoder=None, norm_target=True, target_mode="m2d", dtype=jnp.float32,
                 attention="xla", remat="none", scan=False, rngs: nnx.Rngs):
        if target_mode not in self.TARGET_MODES:
            raise ValueError(f"M2D target_mode must be one of {self.TARGET_MODES}; got "
                             f"{target_mode!r}")
        switches = dict(dtype=dtype, attention=attention, remat=remat, scan=scan)
        self.encoder = vit.Encoder(size, input_shape=input_shape, patch_size=patch_size,
                                   rngs=rngs, **switches)
        dim = self.encoder.size.dim
        self.predictor = vit.TokenDecoder(dim, dim, grid=self.encoder.grid, rngs=rngs, **switches,
                                          **_decoder_kwargs(decoder, self.default_decoder))
        self.norm_target, self.target_mode = norm_target, target_mode

    @staticmethod
    def config_kwargs(objective_config) -> dict:
        """M2D's norm_pix_loss standardises the target tokens."""
        return dict(norm_target=objective_config.norm_pix,
                    target_mode=objective_config.target_mode)

    def _online(self) -> dict:
        return nnx.to_pure_dict(nnx.state(self.encoder, nnx.Param))

    def target_init(self, seed: int = 0) -> dict:
        """The target network's parameters at step 0 (a pure dict).

        ``m2d``: ``{'blocks', 'norm'}`` with their own random init (xavier-uniform weights,
        zero biases, unit LayerNorms), drawn from ``seed`` on a stream the model's own
        initialisation never uses. ``ema_encoder``: a copy of every online encoder parameter.
        """
        if self.target_mode == "ema_encoder":
            return jax.tree.map(jnp.copy, self._online())
        key = jax.random.fold_in(jax.random.key(seed), _TARGET_INIT_STREAM)
        fresh = vit.Encoder(self.encoder.size, input_shape=self.encoder.input_shape,
                            patch_size=self.encoder.patch_size, dtype=self.encoder.dtype,
                            scan=self.encoder.scan, rngs=nnx.Rngs(key))
        state = nnx.to_pure_dict(nnx.state(fresh, nnx.Param))
        return {"blocks": state["blocks"], "norm": state["norm"]}

    def target_outputs(self, x, mask: masking.Mask, target: dict):
        """The target network on the masked patches -> [B, M, dim] (float32, no gradient),
        standardised per token when ``norm_target``."""
        params = jax.lax.stop_gradient({**self._online(), **target})
        encoder = nnx.merge(nnx.graphdef(self.encoder), params)
        out = encoder(x, mask.ids_mask)[:, 1:].astype(jnp.float32)
        return jax.lax.stop_gradient(standardise(out) if self.norm_target else out)

    def loss(self, x, mask: masking.Mask, target=None):
        if target is None:
            raise ValueError("M2D.loss needs the target network's parameters (target=...)")
        latent = self.encoder(x, mask.ids_keep)
        pred = self.predictor(latent, mask.ids_restore)            # [B, N, D]
        pred = jnp.take_along_axis(pred, mask.ids_mask[..., None], axis=1).astype(jnp.float32)
        tgt = self.target_outputs(x, mask, target)
        cos = jnp.sum(l2_normalise(pred) * l2_normalise(tgt), axis=-1)  # [B, M]
        return jnp.mean(2.0 - 2.0 * cos), {}


def ema_rate(step, total_steps: int, start: float = 0.99995, end: float = 0.99999):
    """``1 - decay`` of M2D's EMA at ``step`` (0-based), the decay moving linearly from
    ``start`` at step 0 to ``end`` at the last step: ``step / (total_steps - 1)`` (their
    ``ema_decay_sched``). Returned as the rate because in float32 ``1 - 0.99995`` loses three
    digits, while the authors form ``1 - decay`` in float64."""
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps - 1, 1), 0.0, 1.0)
    return jnp.float32(1.0 - start) + jnp.float32(start - end) * frac


def ema_source(encoder_params: dict, target: dict) -> dict:
    """The online encoder parameters that M2D's EMA moves ``target`` towards: the subtrees it
    holds (``blocks`` and ``norm``, or all of them for ``ema_encoder``)."""
    return {k: encoder_params[k] for k in target}


def ema_update(target, online, rate):
    """target <- (1 - rate) * target + rate * online (same tree structure); ``rate`` is
    ``1 - decay``, see :func:`ema_rate`."""
    return jax.tree.map(lambda t, o: t * (1.0 - rate) + rate * o.astype(t.dtype),
                        target, online)
