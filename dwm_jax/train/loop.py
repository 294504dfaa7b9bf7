"""The training loop: :func:`train` tells the story of a run.

Per-host batches are fed as global arrays; the jitted step (``step.py``) runs while the
host reads the next batch. Metrics stay on the device between log steps: they are fetched,
and checked for NaN / inf naming the first bad step, at each log step and before each save,
so a bad state is never saved. Each log row has ``step_ms`` (wall time per step over the
interval), ``input_wait_ms`` (time per step the device idled for want of input, timed by
``profiling.CompletionClock``), ``host_wait_ms`` (all the loop's waits for input),
``examples_per_s``, ``host_ms`` (the host's own time per step in the loop: dispatch and
bookkeeping, no waits for input or the device; below ``step_ms`` when it runs ahead of the
device), ``mask_ms`` (the masker alone), the compiled step's
``tflops_per_step`` (XLA cost analysis, per device) and, on accelerators of known peak,
``mfu``. Checkpoints are written every ``ckpt_every`` steps, at the end and on SIGTERM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import time
import zlib

import jax
import numpy as np
from tqdm import tqdm

from dwm_jax import build, checkpointing, locks, profiling, sharding, storage
from dwm_jax import config as config_lib
from dwm_jax import data as data_lib
from dwm_jax.errors import NonFiniteError
from dwm_jax.train import init_from, resume, run_io
from dwm_jax.train import step as step_lib

log = logging.getLogger(__name__)


def train(cfg, workdir: str, *, progress: bool = True) -> dict:
    """Runs (or resumes) pretraining in ``workdir``; returns a summary dict (``final_step``,
    ``checkpoint_dir``, ``state``, ``last_metrics``, ``preempted_at`` when stopped).

    Raises ConfigError (naming the field) before anything is compiled or written when the
    config cannot work."""
    config_lib.check(cfg)
    storage.check_reachable(workdir, "--workdir")
    if storage.exists(workdir) and not storage.isdir(workdir):
        raise config_lib.ConfigError(f"--workdir {workdir} is a file, not a directory")
    with _workdir_lock(workdir):
        return _train(cfg, workdir, progress)


LOCK_FILE = ".lock"


@contextlib.contextmanager
def _workdir_lock(workdir: str):
    """The run's exclusive hold on ``workdir`` (process 0 holds it for every host); a
    workdir this call created and nothing was written to is removed again."""
    if jax.process_index() != 0:
        yield
        return
    created = not storage.exists(workdir)
    try:
        with locks.exclusive(storage.join(workdir, LOCK_FILE), "a training run", workdir):
            yield
    finally:
        if created and not storage.is_url(workdir) and _nothing_written(workdir):
            shutil.rmtree(workdir)


def _nothing_written(workdir: str) -> bool:
    """No file in ``workdir`` but the lock (empty folders, e.g. a Checkpointer's, count as
    nothing)."""
    if not os.path.isdir(workdir):
        return False
    for folder, _, files in os.walk(workdir):
        if any(not (folder == workdir and f == LOCK_FILE) for f in files):
            return False
    return True


def _train(cfg, workdir: str, progress: bool) -> dict:
    """The run itself, in a workdir this process may write."""
    mesh, local_batch = _mesh(cfg)
    split = _open_data(cfg)
    stats = split.norm_stats()
    steps_per_epoch, total_steps = _run_length(cfg, split)
    storage.makedirs(workdir)
    inputs = _inputs(cfg, split, stats, local_batch, mesh)
    setup = build.make_setup(cfg, steps_per_epoch, total_steps)
    program = step_lib.step_program(setup, mesh)
    meta = _meta(cfg, stats, program.abstract, split, steps_per_epoch, total_steps)
    ckpt = checkpointing.Checkpointer(workdir, keep=cfg.keep_ckpts)
    start, state = _start_or_resume(cfg, workdir, setup, ckpt, program.state,
                                    program.shardings, inputs, meta)

    # compiled from shapes after the checks above, so a refused resume costs no compilation
    t_compile = time.perf_counter()
    step_fn = program.lower().compile()
    summary: dict = dict(workdir=workdir, compile_s=time.perf_counter() - t_compile,
                         flops_per_step=step_lib.step_flops(setup, step_fn, program.batch,
                                                            mesh.size),
                         start_step=start, total_steps=total_steps)
    is_main = jax.process_index() == 0
    monitor = _Monitor(cfg, setup, ckpt, workdir, start, summary["flops_per_step"],
                       progress and is_main, is_main)
    tracer = profiling.StepTracer(cfg.profile_steps, os.path.join(workdir, "profile"), is_main)
    preempt = run_io.Preemption()
    try:
        step = start
        while step < total_steps:
            tracer.before(step)
            x, batch = monitor.next_input(inputs, step)
            state, metrics = step_fn(state, x)   # dispatched; runs while the host goes on
            step += 1
            monitor.dispatched(step, metrics)
            tracer.after(step, state)
            ckpt.check()  # a failed asynchronous save stops the run here, not later
            if step % cfg.ckpt_every == 0:
                monitor.check_finite()
                ckpt.save(step, state, inputs, meta)
            log_step = step % cfg.log_every == 0 or step == total_steps
            if log_step:
                summary["last_metrics"] = monitor.log(step, state, x, batch)
            stop = preempt.stop_now(step, log_step)
            monitor.tick()
            if stop:
                _save_unless_saved(ckpt, monitor, step, state, inputs, meta)
                summary["preempted_at"] = step
                log.warning("SIGTERM: saved step %d to %s and stopped", step, ckpt.directory)
                break
        else:
            _save_unless_saved(ckpt, monitor, total_steps, state, inputs, meta)
        ckpt.wait()
    finally:
        tracer.close()
        preempt.restore()
        monitor.close(quiet=sys.exc_info()[1] is not None)
        ckpt.close()
        inputs.close()
    return dict(summary, final_step=int(jax.device_get(state["step"])),
                checkpoint_dir=ckpt.directory, state=state)


# ------------------------------------------------------------------------------- the parts

def _mesh(cfg):
    try:
        mesh = sharding.make_mesh(cfg.num_devices or None, fsdp=cfg.mesh.fsdp,
                                  slices=cfg.mesh.slices)
        return mesh, sharding.check_batch(cfg.batch_size, mesh)
    except ValueError as e:
        raise config_lib.ConfigError(f"config.batch_size / num_devices / mesh: {e}") from None


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
        raise config_lib.ConfigError(
            f"config.data (name={d.name!r}, split={d.split!r}, data_dir={d.data_dir!r}): "
            f"{e}") from None


def _run_length(cfg, split) -> tuple[int, int]:
    steps_per_epoch = len(split) // cfg.batch_size
    if steps_per_epoch == 0:
        raise config_lib.ConfigError(
            f"config.batch_size {cfg.batch_size} is larger than the {len(split)} clips of "
            f"{cfg.data.name}:{cfg.data.split}")
    return steps_per_epoch, cfg.total_steps or cfg.epochs * steps_per_epoch


def _inputs(cfg, split, stats, local_batch: int, mesh):
    """Batches read and placed on the devices ahead of the step; the saved state is that of
    the batches trained on, so a resumed run reads the same ones."""
    loader = data_lib.train_loader(split, batch_size=local_batch,
                                   frames=cfg.model.input_shape[1], stats=stats, seed=cfg.seed,
                                   worker_count=cfg.data.worker_count)
    return data_lib.DevicePrefetcher(
        iter(loader), lambda batch: sharding.global_batch_array(batch["log_mel"], mesh),
        size=cfg.data.prefetch)


def _meta(cfg, stats, abstract, split, steps_per_epoch: int, total_steps: int) -> dict:
    """What every checkpoint of the run carries besides the state."""
    return dict(config=config_lib.to_json_dict(cfg), norm_stats=dataclasses.asdict(stats),
                signature=checkpointing.tree_signature(abstract),
                dataset=dict(name=cfg.data.name, split=cfg.data.split, clips=len(split),
                             fingerprint=data_lib.dataset_fingerprint(cfg.data.data_dir,
                                                                      cfg.data.name)),
                steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                processes=jax.process_count())


def _start_or_resume(cfg, workdir, setup, ckpt, target, shardings, inputs, meta):
    """-> (first step, state): the latest intact checkpoint of this run, or a fresh state
    (from ``config.init_from`` when set) and config.json."""
    is_main = jax.process_index() == 0
    found = resume.restore_or_none(ckpt, workdir, target, inputs, meta, warn=log.error)
    if found is not None:
        start, state, changes = found
        if is_main:
            _note_config_in_force(workdir, start, changes, meta["config"])
        log.info("resumed from step %d in %s", start, ckpt.directory)
        return start, state
    state = jax.jit(lambda: build.init_state(setup, cfg.seed), out_shardings=shardings)()
    if cfg.init_from:
        state, notes = init_from.start_from(cfg.init_from, state, shardings, cfg)
        log.warning("config.init_from: %s", "; ".join(notes))
    if is_main:
        run_io.write_config(workdir, meta["config"])
    return 0, state


def _note_config_in_force(workdir: str, start: int, changes, config: dict) -> None:
    """On resume: records the accepted changes and makes config.json the config in force,
    saying which of its values (edited by hand) the run does not use."""
    if changes:
        run_io.record_changes(workdir, start, changes)
    edited = set(run_io.sync_config(workdir, config)) - {c[0] for c in changes}
    if edited:
        log.warning("config.json differed from the config this run resumes with (%s): "
                    "rewritten with the values in use", ", ".join(sorted(edited)))


def _save_unless_saved(ckpt, monitor, step: int, state, inputs, meta):
    if ckpt.latest_step() != step:
        monitor.check_finite()
        ckpt.save(step, state, inputs, meta)


class _Monitor:
    """The loop's observer: input waits, the metrics pending on the device, their finite
    check, the log rows (metrics.jsonl, TensorBoard) and the progress bar."""

    def __init__(self, cfg, setup, ckpt, workdir, start, flops, progress, is_main):
        self.cfg, self.ckpt, self.flops, self.start = cfg, ckpt, flops, start
        self.steps_per_epoch = setup.steps_per_epoch
        self.mask_fn = step_lib.jit_mask(setup)
        self.writer = run_io.MetricsWriter(workdir, is_main, start)
        self.clock = profiling.CompletionClock()  # when each dispatched step finished
        self.pending: list = []    # (step, metrics on the device) not yet checked on the host
        self.fetched = None        # the last metrics checked on the host
        self._reset(start)
        self.bar = None
        if progress:
            self.bar = tqdm(total=setup.total_steps, initial=start, desc="train", unit="step",
                            dynamic_ncols=True)

    def _reset(self, step: int):
        self.last_step, self.last_time = step, time.perf_counter()
        self.waited = dict(host=0.0, idle=0.0)  # seconds waiting for input since the last log
        # the host's own time in the loop since the last log (input waits excluded) and the
        # part of it spent waiting on the device (fetching metrics before a save)
        self.busy, self.synced, self.got = 0.0, 0.0, self.last_time

    def next_input(self, inputs, step: int):
        t_input = time.perf_counter()
        x, batch = next(inputs)
        t_got = self.got = time.perf_counter()
        self.waited["host"] += t_got - t_input
        # the part of the wait after the previous step had finished idled the device
        self.waited["idle"] += (t_got - t_input if step == self.start
                                else self.clock.idle_during(step, t_input, t_got))
        return x, batch

    def dispatched(self, step: int, metrics):
        self.clock.watch(step, metrics["loss"])
        self.pending.append((step, metrics))

    def check_finite(self):
        """Fetches the pending steps' metrics (the only host sync of the loop) and stops at
        the first non-finite one. Runs at log steps and before every save."""
        t0 = time.perf_counter()
        fetched = jax.device_get(self.pending)
        self.synced += time.perf_counter() - t0
        self.pending.clear()
        for at, m in fetched:
            if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
                self.ckpt.wait()
                raise NonFiniteError(
                    f"non-finite training at step {at}: loss={m['loss']}, "
                    f"grad_norm={m['grad_norm']}. Nothing was saved from this step on; the "
                    f"last good checkpoint is step {self.ckpt.latest_step()} in "
                    f"{self.ckpt.directory}.")
        if fetched:
            self.fetched = fetched[-1][1]

    def log(self, step: int, state, x, batch) -> dict:
        t_log = time.perf_counter()
        host_ms = (self.busy + t_log - self.got - self.synced) * 1e3
        self.check_finite()
        now = time.perf_counter()
        steps, seconds = step - self.last_step, now - self.last_time
        scalars = {k: float(v) for k, v in self.fetched.items()}
        scalars.update(epoch=step / self.steps_per_epoch,
                       examples_per_s=steps * self.cfg.batch_size / seconds,
                       step_ms=seconds / steps * 1e3,
                       input_wait_ms=self.waited["idle"] / steps * 1e3,
                       host_wait_ms=self.waited["host"] / steps * 1e3,
                       host_ms=host_ms / steps)
        if self.flops:
            scalars["tflops_per_step"] = self.flops / 1e12
            util = profiling.mfu(self.flops, seconds / steps, jax.local_devices()[0])
            if util is not None:
                scalars["mfu"] = util
        scalars["mask_ms"] = self._mask_ms(step, state, x)
        if self.cfg.log_data_fingerprint:
            scalars["data_crc32"] = zlib.crc32(np.asarray(batch["log_mel"]).tobytes())
        self.writer.write(step, scalars)
        self._reset(step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}")
        return scalars

    def _mask_ms(self, step: int, state, x) -> float:
        """The masker alone on this batch (compiled and warm), in ms."""
        key = jax.random.key(step)
        jax.block_until_ready(self.mask_fn(state["params"], key, x))
        t0 = time.perf_counter()
        jax.block_until_ready(self.mask_fn(state["params"], key, x))
        return (time.perf_counter() - t0) * 1e3

    def tick(self):
        now = time.perf_counter()
        self.busy, self.got = self.busy + now - self.got, now
        if self.bar is not None:
            self.bar.update(1)

    def close(self, quiet: bool):
        self.clock.close()
        if self.bar is not None:
            self.bar.close()
        self.writer.close(quiet=quiet)
