"""Pretraining: the train state, the pure jitted step, and the loop (train.py is its CLI).

The state is a plain pytree ``{params, opt_state, target, step, rng}`` (parameters as pure
dicts of arrays, ``target`` the EMA encoder for M2D, ``rng`` raw key data), sharded over the
mesh by ``sharding.state_shardings``. The step samples the mask inside the jit (DWM sees the
same normalised tensor as the patch embedding; SGIM gets features from a no-gradient pass of
the current encoder), takes an AdamW step with clipping and updates the EMA. The loop feeds
per-host batches as global arrays, logs, checkpoints at an interval and on SIGTERM, resumes
from the latest checkpoint and stops on a non-finite loss or gradient. Metrics stay on the
device between log steps (no host sync per step): they are fetched, and checked for NaN / inf
naming the first bad step, at each log step and before each save, so a bad state is never
saved. Each log row has ``step_ms`` (wall time per step over the interval), ``input_wait_ms``
(time per step the device idled for want of input: the part of each wait for the next batch
after the previous step had finished, timed by ``profiling.CompletionClock``),
``host_wait_ms`` (all the loop's waits for input, idle or overlapping a running step),
``examples_per_s``, the compiled step's ``tflops_per_step`` (XLA cost analysis, per device)
and, on accelerators of known peak, ``mfu``.
``config.profile_steps='A:B'`` writes a profiler trace of steps A..B-1 to WORKDIR/profile.
"""

from __future__ import annotations

from dwm_jax._extras import require

require("train", "flax", "optax", "orbax", "ml_collections", "tensorboardX", "tqdm")

import dataclasses
import json
import logging
import os
import signal
import sys
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from dwm_jax import checkpointing, masking, objectives, profiling, sharding, validation
from dwm_jax import data as data_lib

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite."""


# ----------------------------------------------------------------------------- model + optim

def build_objective(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    m = cfg.model
    if m.compute_dtype not in DTYPES:
        raise ValueError(f"config.model.compute_dtype must be one of {sorted(DTYPES)}; got "
                         f"{m.compute_dtype!r}")
    kwargs = dict(size=m.size, input_shape=tuple(m.input_shape), patch_size=tuple(m.patch_size),
                  decoder=dict(m.decoder), dtype=DTYPES[m.compute_dtype],
                  attention=m.get("attention", "xla"), remat=m.get("remat", "none"),
                  scan=m.get("scan_layers", False), rngs=rngs)
    if cfg.objective.name == "msm_mae":
        kwargs["norm_pix"] = cfg.objective.norm_pix
    else:  # M2D's norm_pix_loss standardises the target tokens
        kwargs.update(norm_target=cfg.objective.norm_pix,
                      target_mode=cfg.objective.get("target_mode", "m2d"))
    return objectives.make_objective(cfg.objective.name, **kwargs)


def build_masker(cfg) -> masking.Masker:
    return masking.make_masker(cfg.masking.name, input_shape=tuple(cfg.model.input_shape),
                               patch_size=tuple(cfg.model.patch_size),
                               mask_ratio=cfg.masking.mask_ratio, **dict(cfg.masking.options))


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
    decay_tokens = o.get("decay_tokens", True)
    return optax.chain(
        optax.clip_by_global_norm(o.clip),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.get("eps", 1e-8),
                    weight_decay=o.weight_decay,
                    mask=lambda params: decay_mask(params, decay_tokens)))


# ------------------------------------------------------------------------------------- state

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
    abstract = nnx.eval_shape(lambda: build_objective(cfg, nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract, nnx.Param)
    masker = build_masker(cfg)
    schedule = lr_schedule(cfg, steps_per_epoch, total_steps)
    return Setup(cfg, graphdef, masker, make_optimizer(cfg, schedule), schedule,
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


def abstract_state(setup: Setup, seed: int):
    return jax.eval_shape(lambda: init_state(setup, seed))


def step_flops(setup: Setup, compiled, batch_shape, num_devices: int = 1) -> float:
    """FLOPs of one step per device, from XLA's cost analysis of the compiled step. XLA
    counts a loop's body once, so with scanned layers the figure comes from the per-layer
    program instead: lowered (traced, not compiled) from the same shapes, its global FLOPs
    divided over the devices (about 1 % off the compiled count on the CPU)."""
    if not setup.config.model.get("scan_layers", False):
        return profiling.compiled_flops(compiled)
    cfg = ml_collections.ConfigDict(setup.config.to_dict())
    cfg.model.scan_layers = False
    per_layer = make_setup(cfg, setup.steps_per_epoch, setup.total_steps)
    shape = jax.ShapeDtypeStruct(batch_shape.shape, batch_shape.dtype)
    lowered = jax.jit(lambda state, x: train_step(per_layer, state, x)).lower(
        abstract_state(per_layer, 0), shape)
    return profiling.compiled_flops(lowered) / num_devices


# -------------------------------------------------------------------------------------- loop

def _open_data(cfg):
    """The training split; a dataset that is not there (or a bad name or split) is a
    ConfigError naming config.data."""
    d = cfg.data
    try:
        try:
            return data_lib.open_split(d.data_dir, d.name, d.split)
        except FileNotFoundError:
            if not (d.build_if_missing and d.name.startswith("synthetic_sounds/")):
                raise
            data_lib.build("synthetic_sounds", d.data_dir, config=d.name.split("/")[1])
            return data_lib.open_split(d.data_dir, d.name, d.split)
    except (FileNotFoundError, ValueError) as e:  # BuildError is a ValueError
        raise validation.ConfigError(
            f"config.data (name={d.name!r}, split={d.split!r}, data_dir={d.data_dir!r}): "
            f"{e}") from None


# Config fields a resumed run may change: how the run is observed, saved and placed, not what
# it computes. Any other difference from the checkpoint's config is refused.
RESUMABLE_FIELDS = ("log_every", "log_data_fingerprint", "ckpt_every", "keep_ckpts",
                    "profile_steps", "num_devices", "fsdp", "data.data_dir",
                    "data.worker_count", "data.prefetch", "data.build_if_missing", "probe.",
                    "model.remat")  # the same computation, scheduled otherwise


def _flat(tree, prefix="") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Config fields added after checkpoints were first written, with the value that behaves as
# runs did before them: a checkpoint without the field resumes under that value.
ADDED_FIELDS = {"init_from": "", "profile_steps": "", "data.prefetch": 2,
                "model.attention": "xla", "model.remat": "none", "model.scan_layers": False}


def check_resume(stored: dict, meta: dict, where: str) -> list[tuple[str, Any, Any]]:
    """Compares a checkpoint's meta with this run's before resuming. Raises
    CheckpointMismatchError naming every field whose change would make the resumed run
    another run (masker, ratio, batch, schedule, model, objective, dataset); returns the
    accepted changes of RESUMABLE_FIELDS as (field, checkpoint value, this run's value)."""
    old, new = _flat(stored.get("config", {})), _flat(meta["config"])
    old = {**{k: v for k, v in ADDED_FIELDS.items() if k not in old}, **old}
    diffs = [(k, old.get(k, "absent"), new.get(k, "absent"))
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    refused = [d for d in diffs if not d[0].startswith(RESUMABLE_FIELDS)]
    was, now = stored.get("dataset", {}), meta["dataset"]
    if "fingerprint" in was and was["fingerprint"] != now["fingerprint"]:
        refused.append(("data (the built dataset)", f"{was['name']} build {was['fingerprint']}",
                        f"{now['name']} build {now['fingerprint']}"))
    if refused:
        listed = "; ".join(f"config.{k}: checkpoint {a!r}, this run {b!r}"
                           for k, a, b in refused[:4])
        more = f" (and {len(refused) - 4} more)" if len(refused) > 4 else ""
        raise checkpointing.CheckpointMismatchError(
            f"{where} was written by another run: {listed}{more}. Resuming would silently "
            "change the run; use another workdir, or the checkpoint's values.")
    return [d for d in diffs if d[0].startswith(RESUMABLE_FIELDS)]


def record_changes(workdir: str, step: int, changes, config: dict):
    """Notes accepted config changes in ``config_changes.jsonl`` and makes config.json the
    config now in force."""
    with open(os.path.join(workdir, "config_changes.jsonl"), "a") as f:
        for field, old, new in changes:
            f.write(json.dumps(dict(step=step, field=field, checkpoint=old, now=new)) + "\n")
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    log.warning("resumed at step %d with changed %s (recorded in config_changes.jsonl)", step,
                ", ".join(c[0] for c in changes))


class _Writers:
    """metrics.jsonl and TensorBoard events (process 0 only). On resume from ``start``, rows
    of later steps (logged by a run killed after its last checkpoint) are dropped first, so
    each step appears once."""

    def __init__(self, workdir: str, enabled: bool, start: int = 0):
        self.enabled = enabled
        self.failed = False
        if enabled:
            from tensorboardX import SummaryWriter
            self.path = os.path.join(workdir, "metrics.jsonl")
            _truncate_metrics(self.path, start)
            self.jsonl = open(self.path, "a")
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict):
        if not self.enabled:
            return
        try:
            self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self.jsonl.flush()
            for k, v in scalars.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
        except OSError as e:  # a full disk: stop here, before a save could fail halfway
            self.failed = True
            raise MetricsWriteError(
                f"{self.path}: the metrics of step {step} could not be written "
                f"({e.strerror or e}); the run stopped, the checkpoints before it are "
                "intact") from None

    def close(self, quiet: bool = False):
        """``quiet``: another error is stopping the run; a failed close must not hide it."""
        if not self.enabled:
            return
        for close in (self.jsonl.close, self.tb.close):
            try:
                close()
            except OSError as e:
                if not (self.failed or quiet):  # else the run's own error is on its way
                    raise MetricsWriteError(f"{self.path}: closing the metrics failed "
                                            f"({e.strerror or e})") from None


class MetricsWriteError(OSError):
    """metrics.jsonl or the TensorBoard log could not be written (e.g. a full disk)."""


# The errors that are the user's to fix (a bad config, a run dir of another model, a damaged
# checkpoint, a full disk, a missing file): entry points print them as one line, exit 2.
USER_ERRORS = (validation.ConfigError, checkpointing.CheckpointMismatchError,
               checkpointing.CheckpointDamagedError, checkpointing.CheckpointSaveError,
               MetricsWriteError, FileNotFoundError)


def _truncate_metrics(path: str, last_step: int):
    """Keeps the rows of ``path`` up to ``last_step`` (atomically; a torn last line goes)."""
    if not os.path.exists(path):
        return
    kept, dropped = [], False
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped = True
                continue
            if row.get("step", 0) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped = True
    if dropped:
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


class _Preemption:
    """SIGTERM, or a first Ctrl-C (SIGINT), sets a flag; the loop saves a checkpoint and exits
    at the next step. A second Ctrl-C interrupts at once (the last checkpoint stays).

    With several processes the hosts must stop at the same step (the save and the next
    step are collective), so :meth:`stop_now` all-gathers the flags: any host's SIGTERM
    stops every host, at the same step.
    """

    def __init__(self):
        self.requested = False
        self._old = {sig: signal.signal(sig, self._handler)
                     for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt
            print("\nstopping after this step with a checkpoint (Ctrl-C again: at once)",
                  file=sys.stderr)
        self.requested = True

    def stop_now(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.any(flags))

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def config_json(cfg) -> dict:
    return json.loads(cfg.to_json_best_effort())


def train(cfg: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
    """Runs (or resumes) pretraining in ``workdir``; returns a summary dict.

    Raises ConfigError (naming the field) before anything is compiled or written when the
    config cannot work."""
    validation.check_config(cfg)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise validation.ConfigError(f"--workdir {workdir} is a file, not a directory")
    is_main = jax.process_index() == 0

    # --- mesh and input
    try:
        mesh = sharding.make_mesh(cfg.num_devices or None)
        local_batch = sharding.check_batch(cfg.batch_size, mesh)
    except ValueError as e:
        raise validation.ConfigError(f"config.batch_size / num_devices: {e}") from None
    split = _open_data(cfg)
    stats = split.norm_stats()
    steps_per_epoch = len(split) // cfg.batch_size
    if steps_per_epoch == 0:
        raise validation.ConfigError(
            f"config.batch_size {cfg.batch_size} is larger than the {len(split)} clips of "
            f"{cfg.data.name}:{cfg.data.split}")
    os.makedirs(workdir, exist_ok=True)
    total_steps = cfg.total_steps or cfg.epochs * steps_per_epoch
    loader = data_lib.train_loader(split, batch_size=local_batch,
                                   frames=cfg.model.input_shape[1], stats=stats, seed=cfg.seed,
                                   worker_count=cfg.data.worker_count)
    # batches read and placed on the devices ahead of the step; its saved state is that of
    # the batches trained on, so a resumed run reads the same ones
    inputs = data_lib.DevicePrefetcher(
        iter(loader), lambda batch: sharding.global_batch_array(batch["log_mel"], mesh),
        size=cfg.data.get("prefetch", 2))

    # --- model, optimizer, shardings
    setup = make_setup(cfg, steps_per_epoch, total_steps)
    abstract = abstract_state(setup, cfg.seed)
    shardings = sharding.state_shardings(abstract, mesh, fsdp=cfg.fsdp)
    step_fn = jit_train_step(setup, shardings, mesh)
    # masking alone, as the step does it (SGIM: including its encoder pass), for the logs
    mask_fn = jax.jit(lambda params, key, x: sample_mask(setup, params, x, key, 0.0).mask)

    # --- checkpoint: resume or start
    ckpt = checkpointing.Checkpointer(workdir, keep=cfg.keep_ckpts)
    meta = dict(config=config_json(cfg), norm_stats=dataclasses.asdict(stats),
                signature=checkpointing.tree_signature(abstract),
                dataset=dict(name=cfg.data.name, split=cfg.data.split, clips=len(split),
                             fingerprint=data_lib.dataset_fingerprint(cfg.data.data_dir,
                                                                      cfg.data.name)),
                steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                processes=jax.process_count())
    changes = []

    def check(step, stored):  # before a checkpoint's state is read: is it this run's?
        where = os.path.join(ckpt.directory, str(step))
        if "converted_from" in stored:
            raise checkpointing.CheckpointMismatchError(
                f"{workdir} holds weights converted from "
                f"{stored['converted_from'].get('file')}, not a training run; to pretrain "
                f"from them, start a run in another workdir with --config.init_from={workdir}")
        written_by = stored.get("processes", 1)
        if written_by != jax.process_count():
            raise checkpointing.CheckpointMismatchError(
                f"{where} was written by {written_by} process(es) and this run has "
                f"{jax.process_count()}: each host's data iterator state is saved per process, "
                f"so the data order cannot resume exactly. Resume with {written_by} "
                f"process(es), or start a new run in another workdir with "
                f"--config.init_from={workdir} (the weights carry over; the optimizer, "
                "schedule and data order start afresh).")
        changes[:] = check_resume(stored, meta, where)
        checkpointing.check_signature(stored, meta, where)  # and the state's shapes

    had_checkpoints = ckpt.latest_step() is not None
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    found = ckpt.restore_intact(target, inputs, check=check, warn=log.error)
    if had_checkpoints and found is None:
        raise checkpointing.CheckpointDamagedError(
            f"no intact checkpoint under {ckpt.directory} (the damaged ones were moved to "
            "<step>.damaged); use another workdir to start afresh")
    if found is not None:
        start, state, _ = found
        if changes and is_main:
            record_changes(workdir, start, changes, meta["config"])
        log.info("resumed from step %d in %s", start, ckpt.directory)
    else:
        start = 0
        state = jax.jit(lambda: init_state(setup, cfg.seed), out_shardings=shardings)()
        if cfg.init_from:
            from dwm_jax import pretrained
            state, notes = pretrained.start_from(cfg.init_from, state, shardings, cfg)
            log.warning("config.init_from: %s", "; ".join(notes))
        if is_main:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                json.dump(meta["config"], f, indent=1)

    # compiled before the first batch, from shapes (after the checks above, so a refused
    # resume costs no compilation): the step's FLOPs (XLA cost analysis) for MFU
    batch_shape = jax.ShapeDtypeStruct((cfg.batch_size, *cfg.model.input_shape), jnp.float32,
                                       sharding=sharding.batch_sharding(mesh))
    t_compile = time.perf_counter()
    step_fn = step_fn.lower(target, batch_shape).compile()
    summary: dict = dict(workdir=workdir, compile_s=time.perf_counter() - t_compile,
                         flops_per_step=step_flops(setup, step_fn, batch_shape, mesh.size))
    writers = _Writers(workdir, is_main, start)
    preempt = _Preemption()
    bar = None
    if progress and is_main:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=start, desc="train", unit="step",
                   dynamic_ncols=True)
    last = dict(step=start, time=time.perf_counter())
    summary.update(start_step=start, total_steps=total_steps)
    profile = profiling.parse_steps(cfg.get("profile_steps", ""))
    tracing = False
    clock = profiling.CompletionClock()  # when each dispatched step finished
    try:
        step = start
        pending: list = []    # (step, metrics on the device) not yet checked on the host
        waited = dict(host=0.0, idle=0.0)  # seconds waiting for input since the last log

        def check_finite():
            """Fetches the pending steps' metrics (the only host sync of the loop) and stops
            at the first non-finite one. Runs at log steps and before every save."""
            fetched = jax.device_get(pending)
            pending.clear()
            for at, m in fetched:
                if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
                    ckpt.wait()
                    raise NonFiniteError(
                        f"non-finite training at step {at}: loss={m['loss']}, "
                        f"grad_norm={m['grad_norm']}. Nothing was saved from this step on; the "
                        f"last good checkpoint is step {ckpt.latest_step()} in "
                        f"{ckpt.directory}.")
            return fetched[-1][1] if fetched else None

        while step < total_steps:
            if profile and step == profile[0] and is_main:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
                tracing = True
            t_input = time.perf_counter()
            x, batch = next(inputs)
            t_got = time.perf_counter()
            waited["host"] += t_got - t_input
            # the part of the wait after the previous step had finished idled the device
            waited["idle"] += (t_got - t_input if step == start
                               else clock.idle_during(step, t_input, t_got))
            state, metrics = step_fn(state, x)   # dispatched; runs while the host goes on
            clock.watch(step + 1, metrics["loss"])
            step += 1
            if tracing and step == profile[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                tracing = False
            pending.append((step, metrics))
            ckpt.check()  # a failed asynchronous save stops the run here, not later
            log_now = step % cfg.log_every == 0 or step == total_steps
            if step % cfg.ckpt_every == 0:
                m = check_finite()
                ckpt.save(step, state, inputs, meta)
            if log_now:
                m = check_finite() or m
                now = time.perf_counter()
                steps = step - last["step"]
                scalars = {k: float(v) for k, v in m.items()}
                scalars["epoch"] = step / steps_per_epoch
                scalars["examples_per_s"] = steps * cfg.batch_size / (now - last["time"])
                scalars["step_ms"] = (now - last["time"]) / steps * 1e3
                scalars["input_wait_ms"] = waited["idle"] / steps * 1e3
                scalars["host_wait_ms"] = waited["host"] / steps * 1e3
                if summary["flops_per_step"]:
                    scalars["tflops_per_step"] = summary["flops_per_step"] / 1e12
                    util = profiling.mfu(summary["flops_per_step"], (now - last["time"]) / steps,
                                         jax.local_devices()[0])
                    if util is not None:
                        scalars["mfu"] = util
                key = jax.random.key(step)
                jax.block_until_ready(mask_fn(state["params"], key, x))  # compiled, warm
                t0 = time.perf_counter()
                jax.block_until_ready(mask_fn(state["params"], key, x))
                scalars["mask_ms"] = (time.perf_counter() - t0) * 1e3
                if cfg.log_data_fingerprint:
                    scalars["data_crc32"] = zlib.crc32(np.asarray(batch["log_mel"]).tobytes())
                writers.write(step, scalars)
                summary["last_metrics"] = scalars
                last = dict(step=step, time=time.perf_counter())
                waited = dict(host=0.0, idle=0.0)
                if bar is not None:
                    bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}")
            if bar is not None:
                bar.update(1)
            if preempt.stop_now():
                if ckpt.latest_step() != step:
                    check_finite()
                    ckpt.save(step, state, inputs, meta)
                ckpt.wait()
                summary["preempted_at"] = step
                log.warning("SIGTERM: saved step %d to %s and stopped", step, ckpt.directory)
                break
        else:
            if ckpt.latest_step() != total_steps:
                check_finite()
                ckpt.save(total_steps, state, inputs, meta)
        ckpt.wait()
    finally:
        if tracing:
            jax.profiler.stop_trace()
        preempt.restore()
        clock.close()
        if bar is not None:
            bar.close()
        writers.close(quiet=sys.exc_info()[1] is not None)
        ckpt.close()
        inputs.close()
    summary["final_step"] = int(jax.device_get(state["step"]))
    summary["checkpoint_dir"] = ckpt.directory
    summary["state"] = state
    return summary
