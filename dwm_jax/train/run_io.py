"""What a training run writes and how it is stopped: the metrics log (metrics.jsonl and
TensorBoard), accepted config changes on resume, and the SIGTERM / Ctrl-C handler that
stops a run at a step with a checkpoint."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

from dwm_jax import storage

log = logging.getLogger(__name__)


def write_config(workdir: str, config: dict) -> None:
    """config.json: the config in force in ``workdir``."""
    storage.write_atomic(storage.join(workdir, "config.json"), json.dumps(config, indent=1))


def sync_config(workdir: str, config: dict) -> list[str]:
    """Makes config.json the config in force when a resumed run finds it otherwise (edited
    by hand, or missing); returns the fields that differed (``['(the whole file)']`` when it
    was unreadable)."""
    try:
        found = json.loads(storage.read_text(storage.join(workdir, "config.json")))
    except (OSError, ValueError):
        found = None
    if found == config:
        return []
    differ = ["(the whole file)"] if not isinstance(found, dict) else sorted(
        _differing_fields(found, config))
    write_config(workdir, config)
    return differ


def _differing_fields(a: dict, b: dict, prefix: str = "") -> set[str]:
    out = set()
    for key in set(a) | set(b):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out |= _differing_fields(x, y, f"{prefix}{key}.")
        elif x != y:
            out.add(f"{prefix}{key}")
    return out


def record_changes(workdir: str, step: int, changes):
    """Notes accepted config changes in ``config_changes.jsonl``."""
    storage.append_text(storage.join(workdir, "config_changes.jsonl"), "".join(
        json.dumps(dict(step=step, field=field, checkpoint=old, now=new)) + "\n"
        for field, old, new in changes))
    log.warning("resumed at step %d with changed %s (recorded in config_changes.jsonl)", step,
                ", ".join(c[0] for c in changes))


class MetricsWriter:
    """metrics.jsonl and TensorBoard events (process 0 only). On resume from ``start``, rows
    of later steps (logged by a run killed after its last checkpoint) are dropped first, so
    each step appears once. In a bucket, metrics.jsonl is rewritten whole at each log step
    (objects cannot be appended to) and the events are written locally and copied up."""

    def __init__(self, workdir: str, enabled: bool, start: int = 0):
        self.enabled = enabled
        self.failed = False
        if enabled:
            self.path = storage.join(workdir, "metrics.jsonl")
            truncate_metrics(self.path, start)
            self.jsonl = storage.appender(self.path)
            self.tb_dir = storage.join(workdir, "tensorboard")
            self.tb = SummaryWriter(_local_events_dir(self.tb_dir))
            self.uploaded = time.monotonic()

    def write(self, step: int, scalars: dict):
        if not self.enabled:
            return
        try:
            self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self.jsonl.flush()
            for k, v in scalars.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
            if time.monotonic() - self.uploaded > EVENTS_UPLOAD_S:
                self._upload_events()
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
        for close in (self.jsonl.close, self._close_tensorboard):
            try:
                close()
            except OSError as e:
                if not (self.failed or quiet):  # else the run's own error is on its way
                    raise MetricsWriteError(f"{self.path}: closing the metrics failed "
                                            f"({e.strerror or e})") from None

    def _close_tensorboard(self):
        self.tb.close()
        self._upload_events()

    def _upload_events(self):
        """For a workdir in a bucket: the events written locally, copied to the bucket."""
        self.uploaded = time.monotonic()
        if storage.is_url(self.tb_dir):
            self.tb.flush()
            storage.upload_tree(_local_events_dir(self.tb_dir), self.tb_dir)


EVENTS_UPLOAD_S = 60.0   # how often a bucket workdir's TensorBoard events are copied up


def _local_events_dir(tb_dir: str) -> str:
    """Where TensorBoard's writer writes: ``tb_dir``, or for a bucket its local mirror
    folder (copied up every ``EVENTS_UPLOAD_S`` and at the end)."""
    return storage.mirror_path(tb_dir) if storage.is_url(tb_dir) else tb_dir


class MetricsWriteError(OSError):
    """metrics.jsonl or the TensorBoard log could not be written (e.g. a full disk)."""


def truncate_metrics(path: str, last_step: int):
    """Keeps the rows of ``path`` up to ``last_step`` (atomically; a torn last line goes)."""
    if not storage.exists(path):
        return
    kept, dropped = [], False
    with storage.open(path) as f:
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
        storage.write_atomic(path, "".join(kept))


class Preemption:
    """SIGTERM, or a first Ctrl-C (SIGINT), stops the run with a checkpoint at a step; a
    second Ctrl-C interrupts at once (the last checkpoint stays).

    One process: a signal handler sets a flag the loop reads after each step. Several
    processes must stop at the same step (the save and the next step are collective)
    without the hosts waiting on each other every step: SIGTERM is left to the distributed
    runtime's preemption notifier, which agrees on a step with every host in the
    background, and :meth:`stop_now` asks it, a host-local check
    (``multihost_utils.reached_preemption_sync_point``). A Ctrl-C on one host becomes a
    SIGTERM to itself, so it takes the same path. Where the runtime has no preemption
    service, the hosts exchange their flags at log steps (already a host sync).
    """

    def __init__(self):
        self.requested = False
        self.agreed = jax.process_count() > 1 and _preemption_service()
        signals = (signal.SIGINT,) if self.agreed else (signal.SIGTERM, signal.SIGINT)
        self._old = {sig: signal.signal(sig, self._handler) for sig in signals}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt
            print("\nstopping after this step with a checkpoint (Ctrl-C again: at once)",
                  file=sys.stderr)
            if self.agreed:   # every host must stop: through the runtime's notifier
                self.requested = True
                os.kill(os.getpid(), signal.SIGTERM)
                return
        self.requested = True

    def stop_now(self, step: int, log_step: bool) -> bool:
        """Whether this step is where every process stops (called after every step)."""
        if jax.process_count() == 1:
            return self.requested
        if self.agreed:
            return multihost_utils.reached_preemption_sync_point(step)
        if not log_step:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.any(flags))

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _preemption_service() -> bool:
    """Whether the distributed runtime runs its preemption notifier (jax.distributed with
    ``jax_enable_preemption_service``, the default)."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)
