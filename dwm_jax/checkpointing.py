"""The one wrapper around Orbax: save and restore the training state, the data iterator and
a JSON description of the run, under ``WORKDIR/checkpoints/<step>/``.

Items per checkpoint: ``state`` (a pytree of arrays: parameters, optimizer and EMA state, step,
RNG), ``data`` (the Grain iterator state, so a resumed run reads the same batches) and
``meta`` (the config, normalisation statistics and the parameter shapes). Restoring checks
``meta`` first: a checkpoint of another model or config fails with a message that lists the
differences instead of a shape error deep inside Orbax.
"""

from __future__ import annotations

import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by another model or incompatible config."""


def tree_signature(tree) -> dict[str, list]:
    """{'path/to/leaf': [shape..., dtype]} for every array leaf: what a checkpoint must match."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                       for k in path)
        out[key] = [*map(int, leaf.shape), str(np.dtype(leaf.dtype))]
    return out


def _differences(stored: dict, wanted: dict, limit: int = 6) -> list[str]:
    diffs = []
    for k in sorted(set(stored) | set(wanted)):
        if stored.get(k) != wanted.get(k):
            diffs.append(f"{k}: checkpoint {stored.get(k, 'absent')}, this run "
                         f"{wanted.get(k, 'absent')}")
    return diffs[:limit] + ([f"... {len(diffs) - limit} more"] if len(diffs) > limit else [])


class Checkpointer:
    """Orbax CheckpointManager with a keep policy and asynchronous saves. The caller decides
    when to save (the trainer: every ``ckpt_every`` steps, at the end and on SIGTERM)."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, meta: dict) -> bool:
        """Starts an asynchronous save of step ``step``; returns whether it saved."""
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def check_compatible(self, step: int, meta: dict, keys=("model", "objective")):
        """Raises CheckpointMismatchError unless the stored meta agrees on ``keys`` and on
        the state's signature."""
        stored = self.read_meta(step)
        where = os.path.join(self.directory, str(step))
        for key in keys:
            if stored.get("config", {}).get(key) != meta["config"].get(key):
                raise CheckpointMismatchError(
                    f"{where} was written with config.{key} = {stored.get('config', {}).get(key)}"
                    f"; this run has config.{key} = {meta['config'].get(key)}. Use another "
                    "workdir or a matching config.")
        if stored.get("signature") != meta["signature"]:
            diffs = "; ".join(_differences(stored.get("signature", {}), meta["signature"]))
            raise CheckpointMismatchError(
                f"{where} holds a state of another shape: {diffs}")
        return stored

    def restore(self, step: int, abstract_state, data_iterator=None):
        """-> (state, meta). ``abstract_state``: ShapeDtypeStructs with the target shardings.
        The data iterator, if given, is restored in place."""
        items = dict(state=ocp.args.StandardRestore(abstract_state),
                     meta=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], out["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
