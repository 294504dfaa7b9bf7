"""The one wrapper around Orbax: save and restore the training state, the data iterator and
a JSON description of the run, under ``WORKDIR/checkpoints/<step>/``.

Items per checkpoint: ``state`` (a pytree of arrays: parameters, optimizer and EMA state, step,
RNG), ``data`` (the Grain iterator state, so a resumed run reads the same batches) and
``meta`` (the config, normalisation statistics, the parameter shapes and a fingerprint of
the state). Restoring checks ``meta`` first: a checkpoint of another model or config fails
with a message that lists the differences instead of a shape error deep inside Orbax. A
restored state, and (in a single-process run) the restored iterator state, are checked
against their fingerprints; :meth:`Checkpointer.restore_intact` moves
a damaged checkpoint aside (``<step>.damaged``, nothing deleted) and falls back to the newest
intact one. A failed save (a full disk) raises :class:`CheckpointSaveError` at once.
"""

from __future__ import annotations

from dwm_jax import storage
from dwm_jax._extras import require

require("train", "orbax")

import contextlib
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


def _grain():
    """Grain (the data extra), needed only to save or restore a data iterator's state."""
    import grain
    return grain


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by another model or incompatible config."""


class CheckpointDamagedError(ValueError):
    """A checkpoint's files are missing, unreadable or do not match its fingerprint."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (e.g. no space left); earlier checkpoints are intact."""


def _as_uint32(x):
    size = np.dtype(x.dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if size == 1:
        return x.astype(jnp.uint8).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes -> [..., 2]


@jax.jit
def _leaf_checksums(leaves):
    """One uint32 per array: the sum of its bit patterns times odd position weights, mod
    2**32, so changing any single value changes it. Runs on the (sharded) arrays."""
    out = []
    for x in leaves:
        bits = _as_uint32(x).ravel()
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | 1
        out.append(jnp.sum(bits * weights, dtype=jnp.uint32))
    return out


def state_fingerprint(state) -> dict[str, int]:
    """{'path/to/leaf': checksum} for every array of ``state`` (see :func:`tree_signature`
    for the path names)."""
    paths = list(tree_signature(state))
    sums = jax.device_get(_leaf_checksums(jax.tree.leaves(state)))
    return {p: int(v) for p, v in zip(paths, sums)}


def iterator_fingerprint(state) -> str:
    """A hash of a data iterator's saved state (Grain's JSON bytes), without the
    ``data_source`` entry: its text holds an object address that differs from process to
    process over the same data."""
    payload = state if isinstance(state, bytes) else str(state).encode()
    try:
        doc = json.loads(payload)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        doc.pop("data_source", None)
        payload = json.dumps(doc, sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def _root_cause(e: BaseException) -> str:
    """The innermost error's message, e.g. the OSError under Orbax's wrappers."""
    seen = e
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__
    text = str(seen).strip().splitlines()
    line = (text[-1] if text else "").split(" [tensorstore_spec")[0]  # not its JSON spec
    return f"{type(seen).__name__}: {line[:300]}{'...' if len(line) > 300 else ''}"


def tree_signature(tree) -> dict[str, list]:
    """{'path/to/leaf': [shape..., dtype]} for every array leaf: what a checkpoint must match."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                       for k in path)
        out[key] = [*map(int, leaf.shape), str(np.dtype(leaf.dtype))]
    return out


def signature_differences(stored: dict, wanted: dict, limit: int = 6) -> list[str]:
    """'path: checkpoint X, this run Y' for each leaf where two tree_signatures differ."""
    diffs = []
    for k in sorted(set(stored) | set(wanted)):
        if stored.get(k) != wanted.get(k):
            diffs.append(f"{k}: checkpoint {stored.get(k, 'absent')}, this run "
                         f"{wanted.get(k, 'absent')}")
    return diffs[:limit] + ([f"... {len(diffs) - limit} more"] if len(diffs) > limit else [])


def check_signature(stored: dict, meta: dict, where: str):
    """Raises CheckpointMismatchError, listing the differences, unless a checkpoint's stored
    meta describes a state of the same shapes as this run's ``meta``."""
    if stored.get("signature") != meta["signature"]:
        diffs = "; ".join(signature_differences(stored.get("signature", {}), meta["signature"]))
        raise CheckpointMismatchError(f"{where} holds a state of another shape: {diffs}")


class Checkpointer:
    """Orbax CheckpointManager with a keep policy and asynchronous saves. The caller decides
    when to save (the trainer: every ``ckpt_every`` steps, at the end and on SIGTERM)."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = storage.absolute(storage.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, meta: dict) -> bool:
        """Starts an asynchronous save of step ``step`` (with the state's fingerprint in its
        meta); returns whether it saved. Raises CheckpointSaveError when this or an earlier
        asynchronous save failed."""
        meta = dict(meta, fingerprint=state_fingerprint(state))
        if data_iterator is not None and jax.process_count() == 1:
            meta["data_fingerprint"] = iterator_fingerprint(data_iterator.get_state())
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if data_iterator is not None:
            items["data"] = _grain().checkpoint.CheckpointSave(data_iterator)
        with self._save_errors(step):
            return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    @contextlib.contextmanager
    def _save_errors(self, step=None):
        """Turns any failure of a save (Orbax wraps the OSError) into CheckpointSaveError."""
        try:
            yield
        except CheckpointSaveError:
            raise
        except Exception as e:
            when = f" (noticed when saving step {step})" if step is not None else ""
            raise CheckpointSaveError(
                f"a checkpoint save under {self.directory} failed{when}: {_root_cause(e)}; "
                "the checkpoints before it are intact") from e

    def check(self):
        """Raises CheckpointSaveError if an asynchronous save has failed (cheap)."""
        with self._save_errors():
            self.manager.check_for_errors()

    def read_meta(self, step: int) -> dict:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise CheckpointDamagedError(f"{os.path.join(self.directory, str(step))}: its "
                                         f"description cannot be read ({_root_cause(e)})") from e

    def restore(self, step: int, abstract_state, data_iterator=None, *, partial=False):
        """-> (state, meta). ``abstract_state``: ShapeDtypeStructs with the target shardings;
        ``partial``: it names a subset of the stored arrays (e.g. only the parameters) and
        only those are read. The data iterator, if given, is restored in place. Raises
        CheckpointDamagedError when files are missing or unreadable, or the arrays read differ
        from their fingerprint."""
        where = os.path.join(self.directory, str(step))
        if partial:
            restore_args = jax.tree.map(
                lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                               dtype=a.dtype), abstract_state)
            state_args = ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args,
                                                partial_restore=True)
        else:
            state_args = ocp.args.StandardRestore(abstract_state)
        items = dict(state=state_args, meta=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = _grain().checkpoint.CheckpointRestore(data_iterator)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax and TensorStore raise many kinds for broken files
            raise CheckpointDamagedError(f"{where} cannot be read ({_root_cause(e)})") from e
        wanted = out["meta"].get("fingerprint")
        if wanted is not None:
            got = state_fingerprint(out["state"])
            keys = set(got) if partial else set(wanted) | set(got)
            bad = sorted(k for k in keys if wanted.get(k) != got.get(k))
            if bad:
                raise CheckpointDamagedError(
                    f"{where} is damaged: {len(bad)} array(s) differ from the fingerprint "
                    f"saved with them ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
        wanted = out["meta"].get("data_fingerprint")
        if data_iterator is not None and wanted is not None and jax.process_count() == 1:
            if iterator_fingerprint(data_iterator.get_state()) != wanted:
                raise CheckpointDamagedError(f"{where} is damaged: its data-iterator state "
                                             "differs from the fingerprint saved with it")
        return out["state"], out["meta"]

    def restore_intact(self, abstract_state, data_iterator=None, *, check=None, warn=print):
        """-> (step, state, meta) of the newest checkpoint that restores intact, or None when
        there is none. ``check(step, meta)`` runs on each candidate's meta before its state
        is read (a CheckpointMismatchError from it propagates: another run's checkpoints are
        not damaged). Each damaged checkpoint is named through ``warn`` and moved aside to
        ``<step>.damaged`` (kept for inspection; later saves can reuse its step)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                if check is not None:
                    check(step, self.read_meta(step))
                state, meta = self.restore(step, abstract_state, data_iterator)
                return step, state, meta
            except CheckpointDamagedError as e:
                aside = self._aside_name(step)
                if jax.process_index() == 0:
                    storage.move(storage.join(self.directory, str(step)),
                                 storage.join(self.directory, aside))
                warn(f"{e}; moved it to {aside} and trying the previous checkpoint")
                self.manager.reload()
        return None

    def _aside_name(self, step: int) -> str:
        """``<step>.damaged``, or ``<step>.damaged.N`` when that step was damaged before."""
        name, n = f"{step}.damaged", 1
        while storage.exists(storage.join(self.directory, name)):
            n += 1
            name = f"{step}.damaged.{n}"
        return name

    def wait(self):
        """Waits for the asynchronous save; CheckpointSaveError if it failed."""
        with self._save_errors():
            self.manager.wait_until_finished()

    def close(self):
        try:
            self.wait()
        finally:
            self.manager.close()


def quiet_background_echoes():
    """For command-line tools. A failed asynchronous save or a damaged checkpoint makes
    Orbax's background threads log it at length, and asyncio adds tracebacks of unretrieved
    futures and closed loops at exit. The tools raise the failure once (CheckpointSaveError,
    CheckpointDamagedError) and print it in one line; this drops the echoes."""
    import logging
    import sys
    import threading

    def echo(record):
        where = record.pathname or ""
        return record.levelno >= logging.ERROR and ("orbax" in where or "asyncio" in where)

    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: not echo(record))

    def closed_loop(exc):
        return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)

    thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook
    threading.excepthook = lambda a: None if closed_loop(a.exc_value) else thread_hook(a)
    sys.unraisablehook = lambda u: None if closed_loop(u.exc_value) else unraisable_hook(u)
