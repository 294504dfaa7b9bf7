"""The resume policy: before a checkpoint's state is read, is it this run's?

A resumed run must be the same run: the same model, objective, masker, schedule, batch and
dataset. Fields the config schema marks resumable (how a run is observed, saved and placed)
may change, and are recorded; anything else is refused with the fields named.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from dwm_jax import checkpointing
from dwm_jax import config as config_lib


def check_resume(stored: dict, meta: dict, where: str) -> list[tuple[str, Any, Any]]:
    """Compares a checkpoint's meta with this run's before resuming. Raises
    CheckpointMismatchError naming every field whose change would make the resumed run
    another run (masker, ratio, batch, schedule, model, objective, dataset); returns the
    accepted changes as (field, checkpoint value, this run's value)."""
    refused, accepted = config_lib.resume_differences(stored.get("config", {}),
                                                      meta["config"])
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
    return accepted


def check_checkpoint(workdir: str, where: str, stored: dict, meta: dict) -> list:
    """Every check of a checkpoint ``stored`` (its meta) against this run's ``meta``:
    converted weights are not a run, the process count must match (each host's iterator
    state is saved per process), the config and dataset (:func:`check_resume`) and the
    state's shapes. -> the accepted config changes."""
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
    changes = check_resume(stored, meta, where)
    checkpointing.check_signature(stored, meta, where)
    return changes


def restore_or_none(ckpt: checkpointing.Checkpointer, workdir: str, target, inputs,
                    meta: dict, warn):
    """The latest intact checkpoint of this run -> (step, state, accepted changes), or None
    when the workdir has none. A workdir whose every checkpoint is damaged is refused."""
    changes: list = []

    def check(step, stored):
        changes[:] = check_checkpoint(workdir, os.path.join(ckpt.directory, str(step)),
                                      stored, meta)

    had_checkpoints = ckpt.latest_step() is not None
    found = ckpt.restore_intact(target, inputs, check=check, warn=warn)
    if had_checkpoints and found is None:
        raise checkpointing.CheckpointDamagedError(
            f"no intact checkpoint under {ckpt.directory} (the damaged ones were moved to "
            "<step>.damaged); use another workdir to start afresh")
    if found is None:
        return None
    step, state, _ = found
    return step, state, changes
