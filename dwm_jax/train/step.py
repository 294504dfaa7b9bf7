"""The pure training step: sample the mask inside the jit, take an AdamW step with
clipping, update M2D's EMA target.

DWM sees the same normalised tensor as the patch embedding; SGIM gets its features from a
no-gradient pass of the current encoder (skipped while the hint schedule holds r_h at 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from dwm_jax import build, masking, objectives, profiling, sharding
from dwm_jax import config as config_lib
from dwm_jax.build import Setup


def hint_ratio(setup: Setup, step):
    """r_h for the epoch of ``step`` (traced); 0 when the config has no hint schedule."""
    h = setup.config.masking.hint
    if h.mode == "none":
        return jnp.zeros((), jnp.float32)
    epoch = step // setup.steps_per_epoch
    total_epochs = max(setup.total_steps // setup.steps_per_epoch, 1)
    constant = h.constant if h.mode == "constant" else None
    return jnp.asarray(masking.hint_schedule(epoch, total_epochs=total_epochs,
                                             start_epoch=h.start_epoch, k=h.k,
                                             constant=constant), jnp.float32)


def sample_mask(setup: Setup, params, x, key, r_h) -> masking.Mask:
    """The step's mask for x [B, F, T] at hint ratio r_h (traced or a Python float)."""
    masker = setup.masker
    if not masker.needs_features:
        return masker(key, x, hint_ratio=r_h)

    def informed():  # SGIM: the current encoder on all patches, no gradient
        encoder = nnx.merge(setup.graphdef, params).encoder
        features = jax.lax.stop_gradient(encoder(x)[:, 1:].astype(jnp.float32))
        return masker(key, x, hint_ratio=r_h, features=features)

    if not isinstance(r_h, jax.Array):  # static: the masker short-circuits r_h >= 1 itself
        return informed()
    # while the schedule holds r_h at 1 every masked patch is a random hint and the features
    # are unused: skip the encoder pass (the same mask, bit for bit; Masker.all_hints)
    return jax.lax.cond(r_h >= 1.0, lambda: masker.all_hints(key, x.shape[0]), informed)


def train_step(setup: Setup, state: dict, x: jax.Array):
    """One update on the batch x [B, F, T] -> (new state, metrics). Pure; jit it."""
    step = state["step"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    r_h = hint_ratio(setup, step)
    mask = sample_mask(setup, state["params"], x, key, r_h)
    new, metrics = update(setup, state, x, mask)
    return new, dict(metrics, hint_ratio=r_h)


def update(setup: Setup, state: dict, x: jax.Array, mask: masking.Mask):
    """The update for a given mask: loss and gradients, then :func:`apply_gradients`."""
    target = state["target"] if setup.uses_target else None

    def loss_fn(params):
        model = nnx.merge(setup.graphdef, params)
        return model.loss(x, mask, target)

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    new = apply_gradients(setup, state, grads)
    metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads),
                   lr=setup.schedule(state["step"]), param_norm=optax.tree.norm(new["params"]))
    return new, metrics


def apply_gradients(setup: Setup, state: dict, grads) -> dict:
    """In the authors' order: global-norm clipping and AdamW on the online parameters, then
    (M2D) the EMA of the target towards the *updated* online parameters, with the decay of
    this step."""
    step = state["step"]
    updates, opt_state = setup.optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, params=params, opt_state=opt_state, step=step + 1)
    if setup.uses_target:
        o = setup.config.objective
        rate = objectives.ema_rate(step, setup.total_steps, o.ema_start, o.ema_end)
        online = objectives.ema_source(params["encoder"], state["target"])
        new["target"] = objectives.ema_update(state["target"], online, rate)
    return new


def jit_train_step(setup: Setup, state_shardings, mesh):
    def step(state, x):
        return train_step(setup, state, x)
    return jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,))


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """The jitted step with the shapes and shardings of its inputs on a mesh: what
    ``train.py`` runs and ``python -m dwm_jax.compile`` compiles for a named target.
    ``abstract`` is the state's shapes, ``state`` the same with their shardings, ``batch``
    the global batch [B, F, T]."""
    setup: Setup
    mesh: jax.sharding.Mesh
    abstract: Any
    shardings: Any
    state: Any
    batch: jax.ShapeDtypeStruct

    def lower(self):
        return jit_train_step(self.setup, self.shardings, self.mesh).lower(self.state,
                                                                          self.batch)


def step_program(setup: Setup, mesh) -> StepProgram:
    """The step of ``setup.config`` over ``mesh`` (real or compile-only devices)."""
    cfg = setup.config
    abstract = build.abstract_state(setup, cfg.seed)
    try:
        shardings = sharding.state_shardings(abstract, mesh, fsdp=cfg.fsdp,
                                             rules=cfg.mesh.rules)
    except ValueError as e:   # a rule that does not fit this mesh or array
        raise config_lib.ConfigError(f"config.mesh.rules: {e}") from None
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, shardings)
    batch = jax.ShapeDtypeStruct((cfg.batch_size, *cfg.model.input_shape), jnp.float32,
                                 sharding=sharding.batch_sharding(mesh))
    return StepProgram(setup, mesh, abstract, shardings, state, batch)


def jit_mask(setup: Setup):
    """Masking alone, as the step does it (SGIM: including its encoder pass), at r_h = 0:
    ``(params, key, x) -> bool mask [B, N]``, for timing it in the logs."""
    return jax.jit(lambda params, key, x: sample_mask(setup, params, x, key, 0.0).mask)


def step_flops(setup: Setup, compiled, batch_shape, num_devices: int = 1) -> float:
    """FLOPs of one step per device, from XLA's cost analysis of the compiled step. XLA
    counts a loop's body once, so with scanned layers the figure comes from the per-layer
    program instead: lowered (traced, not compiled) from the same shapes, its global FLOPs
    divided over the devices (about 1 % off the compiled count on the CPU)."""
    if not setup.config.model.scan_layers:
        return profiling.compiled_flops(compiled)
    cfg = ml_collections.ConfigDict(setup.config.to_dict())
    cfg.model.scan_layers = False
    per_layer = build.make_setup(cfg, setup.steps_per_epoch, setup.total_steps)
    shape = jax.ShapeDtypeStruct(batch_shape.shape, batch_shape.dtype)
    lowered = jax.jit(lambda state, x: train_step(per_layer, state, x)).lower(
        build.abstract_state(per_layer, 0), shape)
    return profiling.compiled_flops(lowered) / num_devices
