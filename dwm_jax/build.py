"""Building from a config: the one place that turns a pretraining config into the objects
a run, an evaluation, the weight reader and the converter need.

    model = build_objective(cfg, nnx.Rngs(0))           # MSM-MAE or M2D, an nnx module
    masker = build_masker(cfg)                           # the step's mask sampler
    setup = make_setup(cfg, steps_per_epoch, total_steps)  # + optimizer and schedule
    state = init_state(setup, seed)                      # the train state pytree
    shapes = abstract_weights(cfg)                       # params and target, shapes only

The train state is a plain pytree ``{params, opt_state, target, step, rng}``: parameters
as pure dicts of arrays, ``target`` the EMA target of M2D (``{}`` otherwise), ``rng`` raw
key data. Reading weights needs only :func:`abstract_weights` (no optimizer is built).
"""

from __future__ import annotations

from dwm_jax._extras import require

require("train", "flax", "optax", "ml_collections")

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from dwm_jax import masking, objectives

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ------------------------------------------------------------------------------ model, masker

def build_objective(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """The objective module (encoder + decoder / predictor) that ``cfg`` describes."""
    m = cfg.model
    if m.compute_dtype not in DTYPES:
        raise ValueError(f"config.model.compute_dtype must be one of {sorted(DTYPES)}; got "
                         f"{m.compute_dtype!r}")
    cls = objectives.OBJECTIVES[cfg.objective.name]
    return objectives.make_objective(
        cfg.objective.name, size=m.size, input_shape=tuple(m.input_shape),
        patch_size=tuple(m.patch_size), decoder=dict(m.decoder),
        dtype=DTYPES[m.compute_dtype], attention=m.attention, remat=m.remat,
        scan=m.scan_layers, rngs=rngs, **cls.config_kwargs(cfg.objective))


def abstract_objective(cfg) -> nnx.Module:
    """The objective module a config describes, as shapes only (nothing allocated)."""
    return nnx.eval_shape(lambda: build_objective(cfg, nnx.Rngs(0)))


def abstract_weights(cfg, seed: int = 0) -> dict:
    """``{'params', 'target'}`` of a config's model as ShapeDtypeStructs (no optimizer)."""
    def make():
        model = build_objective(cfg, nnx.Rngs(seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return dict(params=params,
                    target=model.target_init(seed) if type(model).uses_target else {})
    return jax.eval_shape(make)


def build_masker(cfg) -> masking.Masker:
    return masking.make_masker(cfg.masking.name, input_shape=tuple(cfg.model.input_shape),
                               patch_size=tuple(cfg.model.patch_size),
                               mask_ratio=cfg.masking.mask_ratio, **dict(cfg.masking.options))


# -------------------------------------------------------------------------------- optimizer

def lr_schedule(cfg, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Warm-up then cosine to 0; peak = base_lr * batch_size / 256."""
    peak = cfg.optim.base_lr * cfg.batch_size / 256
    warmup = min(int(cfg.optim.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1))


TOKEN_PARAMS = ("cls_token", "mask_token")


def decay_mask(params, decay_tokens: bool = True):
    """Which parameters get weight decay: timm's grouping, as the authors use it
    (``param_groups_weight_decay``): every parameter with more than one dimension, so
    matrices *and* the [1, 1, D] CLS and mask tokens; biases and LayerNorm scales get none.
    ``decay_tokens=False`` (an option) also exempts the two tokens, as timm models' own
    ``no_weight_decay()`` lists do: decay pulls a lone learned vector towards 0 with nothing
    to balance it but its own gradient. Scanned blocks' leading layer axis does not count."""
    def leaf(path, p):
        keys = [str(getattr(k, "key", k)) for k in path]
        stacked = "blocks" in keys[:-1] and not keys[keys.index("blocks") + 1].isdigit()
        return p.ndim - stacked > 1 and (decay_tokens or keys[-1] not in TOKEN_PARAMS)
    return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(cfg, schedule) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled decay scaled by the lr, as torch's)."""
    o = cfg.optim
    return optax.chain(
        optax.clip_by_global_norm(o.clip),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                    mask=lambda params: decay_mask(params, o.decay_tokens)))


# ------------------------------------------------------------------------------------ state

@dataclasses.dataclass
class Setup:
    """Everything the step needs that is not state: static, built once from the config."""

    config: ml_collections.ConfigDict
    graphdef: Any
    masker: masking.Masker
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    uses_target: bool
    steps_per_epoch: int
    total_steps: int


def make_setup(cfg, steps_per_epoch: int, total_steps: int) -> Setup:
    abstract = abstract_objective(cfg)
    graphdef, _ = nnx.split(abstract, nnx.Param)
    schedule = lr_schedule(cfg, steps_per_epoch, total_steps)
    return Setup(cfg, graphdef, build_masker(cfg), make_optimizer(cfg, schedule), schedule,
                 type(abstract).uses_target, steps_per_epoch, total_steps)


def init_state(setup: Setup, seed: int) -> dict:
    """The initial train state (call under jit with out_shardings to build it sharded)."""
    model = build_objective(setup.config, nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    rest = nnx.state(model, nnx.Not(nnx.Param))
    if jax.tree.leaves(rest):
        raise ValueError("objective modules must hold only nnx.Param variables")
    params = nnx.to_pure_dict(params)
    state = dict(params=params, opt_state=setup.optimizer.init(params), target={},
                 step=jnp.zeros((), jnp.int32),
                 rng=jax.random.key_data(jax.random.key(seed + 1)))
    if setup.uses_target:
        state["target"] = model.target_init(seed)
    return state


def abstract_state(setup: Setup, seed: int):
    return jax.eval_shape(lambda: init_state(setup, seed))
