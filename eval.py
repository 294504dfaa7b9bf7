"""Evaluation of a pretrained encoder on labelled tasks: the linear probe (with two
baselines) and fine-tuning.

    python eval.py --workdir=workdirs/demo --tasks=synthetic_sounds
    python eval.py --workdir=RUN --tasks=synthetic_sounds,audio_folder/esc50 --data_dir=data
    python eval.py --workdir=RUN --tasks=audio_folder:/path/to/built/esc50
    python eval.py --workdir=workdirs/demo --tasks=synthetic_sounds --mode=finetune \
        --finetune.epochs=20                       # configs/finetune.py holds the recipe

A task is a built, labelled dataset: 'builder' (config 'default'), 'builder/config', or
'audio_folder:PATH' with PATH the directory of a built dataset. Each task is probed with the
run's encoder (latest checkpoint, or --step), the same architecture untrained (random init)
and pooled raw log-mel statistics (mean and std per mel bin); an encoder's clip feature is the
mean of its time steps, the authors' protocol, or with ``--pool=mean_std`` their mean and std,
the raw baseline's statistics. Writes RUN/eval/results.json and RUN/eval/results.md and
prints the table; embeddings are cached under RUN/eval/cache/, keyed by a hash of the
weights and of the task's data. ``--mode=finetune`` fine-tunes the encoder with a linear head
on each task (``dwm_jax/finetune.py``; checkpoints under RUN/eval/finetune/, a rerun resumes)
and ``--mode=both`` does both; results of one mode are kept when the other runs later on the
same checkpoint, and the table puts them side by side. A task built with an events table
(strong labels) is evaluated at frame level (``dwm_jax/sed.py``, ``configs/sed.py``):
per-step features into per-step sigmoids, scored by segment-based F1 and error rate,
event-based F1 and PSDS.
"""

import json
import os
import sys

from absl import app, flags
from absl import logging as absl_logging

from dwm_jax import checkpointing, cli, config, finetune, probe, sed, storage
from dwm_jax.embedding import Embedder
from dwm_jax.errors import NonFiniteError
from dwm_jax.suite import tasks as suite_tasks

_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's directory", required=True)
_TASKS = flags.DEFINE_list("tasks", ["synthetic_sounds"], "comma-separated tasks; 'suite' "
                           "stands for the six tasks of the offline suite (make suite)")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "where datasets are (default: the run's)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_NO_CACHE = flags.DEFINE_bool("no_cache", False, "recompute embeddings")
_POOL = flags.DEFINE_enum("pool", "mean", ["mean", "mean_std"],
                          "encoder features of a clip: the mean over its time steps (the "
                          "authors'), or mean and std (the raw log-mel baseline's statistics)")
_MODE = flags.DEFINE_enum("mode", "linear", ["linear", "finetune", "both"],
                          "linear probe, fine-tuning, or both")
_SED = cli.define_config_file("eval.py", "sed", "configs/sed.py",
                              "the frame-level protocol, for tasks built with an events table")
_FINETUNE = cli.define_config_file("eval.py", "finetune", "configs/finetune.py",
                                            "the fine-tuning recipe (--mode=finetune / both)")


def markdown_table(results: list[dict], step: int) -> str:
    """One row per task: the linear probe of the pretrained encoder and of both baselines,
    and the fine-tuned encoder, where each was run ('-' where not)."""
    def score(r, key):
        return f"{r[key]['test_score']:.3f}" if key in r else "-"

    lines = [f"Test scores (checkpoint step {step}): accuracy, or mAP for multi-label tasks", "",
             "| task | test clips | classes | metric | linear probe | fine-tuned | "
             "random init (probe) | raw log-mel (probe) | chance | protocol |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        pooled = "encoder features: mean + std over time" if r.get("pool") == "mean_std" else ""
        protocol = "; ".join(p for p in (r.get("protocol"), pooled, r.get("finetune", {}).get(
            "protocol")) if p)
        lines.append(f"| {r['task']} | {r['num_test']} | {r['num_classes']} | {r['metric']} | "
                     f"{score(r, 'encoder')} | {score(r, 'finetune')} | "
                     f"{score(r, 'random_init')} | {score(r, 'raw_logmel')} | "
                     f"{r['chance']:.3f} | {protocol} |")
    lines += _where_in_time(results)
    return "\n".join(lines) + "\n"


def _where_in_time(results: list[dict]) -> list[str]:
    """Frame-level tasks' other scores: event F1 and, where computed, PSDS1 / PSDS2."""
    out = []
    for r in results:
        for key in ("encoder", "random_init", "raw_logmel"):
            got = r.get(key, {})
            if "event_f1" in got:
                psds = "".join(f", {name.upper()} {got[name]:.3f}" for name in ("psds1", "psds2")
                               if name in got)
                out.append(f"- {r['task']}, {key}: event F1 {got['event_f1']:.3f}{psds}")
    return ["", "Where in time (frame-level tasks):", ""] + out if out else []


def _earlier_results(path: str, step: int) -> dict:
    """{task: result} already written for this checkpoint step (kept when only one mode
    runs now); nothing when the file is absent, unreadable or of another step."""
    try:
        earlier = json.loads(storage.read_text(path))
    except (OSError, ValueError):
        return {}
    if earlier.get("step") != step:
        return {}
    return {r["task"]: r for r in earlier.get("tasks", []) if "task" in r}


def _open_run(workdir: str, step: int | None):
    """(step, the checkpoint's meta, Embedder) of ``workdir``; CheckpointError / ValueError
    with a one-line message when there is no such checkpoint or it cannot be read."""
    storage.check_reachable(workdir, "--workdir")
    if not storage.isdir(storage.join(workdir, "checkpoints")):  # and create nothing there
        raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, 'checkpoints')}")
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    try:
        step = step if step is not None else ckpt.latest_step()
        if step is None or step not in ckpt.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint{'' if step is None else f' at step {step}'}"
                                    f" under {ckpt.directory}")
        try:
            return step, ckpt.read_meta(step), Embedder.from_workdir(workdir, step)
        except (checkpointing.CheckpointDamagedError,
                checkpointing.CheckpointMismatchError) as e:
            raise ValueError(f"{e} (--step picks another checkpoint)") from None
    finally:
        ckpt.close()


def _check_writable(out_dir: str) -> None:
    """Fails now, not after every feature is computed, when results cannot be written."""
    storage.makedirs(out_dir)
    probe_file = storage.join(out_dir, f".writable-{os.getpid()}")
    storage.write_atomic(probe_file, "")
    storage.remove(probe_file)


def _linear_probes(tasks, data_dir, meta, encoder, results):
    random_init = Embedder.random_init(meta["config"], encoder.stats, seed=0)
    cache = None if _NO_CACHE.value else _cache_dir(_WORKDIR.value)
    # cache keys identify the weights (not the step: a retrained run reaches the same step)
    featurisers = {
        "encoder": encoder.featuriser("encoder", _POOL.value),
        "random_init": random_init.featuriser("random_init", _POOL.value),
        "raw_logmel": (probe.raw_features, "raw_logmel"),
    }
    step_featurisers = {
        "encoder": encoder.step_featuriser("encoder"),
        "random_init": random_init.step_featuriser("random_init"),
        "raw_logmel": (lambda lm: sed.raw_step_features(lm, encoder.patch_w),
                       f"raw_logmel_steps{encoder.patch_w}", encoder.patch_w),
    }
    for spec in tasks:
        try:
            if sed.is_frame_level(data_dir, spec):  # the dataset decides the protocol
                r = sed.evaluate_frame_task(spec, data_dir, step_featurisers, _SED.value,
                                            cache_dir=cache)
            else:
                r = probe.evaluate_task(spec, data_dir, featurisers, cache_dir=cache)
                r["pool"] = _POOL.value
        except (probe.ProbeError, FileNotFoundError, ValueError) as e:
            raise probe.ProbeError(f"task {spec!r}: {e}") from None
        results[r["task"]] = {**results.get(r["task"], {}), **r}


def _finetunes(tasks, data_dir, step, out_dir, results):
    for spec in tasks:
        if sed.is_frame_level(data_dir, spec):
            raise probe.ProbeError(f"task {spec!r}: fine-tuning is for clip-level tasks; "
                                   "this one is frame level (use --mode=linear)")
        try:
            ft = finetune.finetune_task(spec, data_dir, _WORKDIR.value, step, _FINETUNE.value,
                                        out_dir=os.path.join(out_dir, "finetune"),
                                        log=lambda line: print(line, file=sys.stderr))
        except (probe.ProbeError, FileNotFoundError, ValueError,
                checkpointing.CheckpointMismatchError, NonFiniteError) as e:
            raise probe.ProbeError(f"task {spec!r}: {e}") from None
        summary = ft.pop("task_summary")
        results[summary["task"]] = {**summary, **results.get(summary["task"], {}),
                                    "finetune": ft}


def _cache_dir(workdir: str) -> str:
    """``WORKDIR/eval/cache``; for a workdir in a bucket, its local mirror path (features
    are read back often, and a cache lost with the VM is only recomputed)."""
    cache = storage.join(workdir, "eval", "cache")
    return storage.mirror_path(cache) if storage.is_url(cache) else cache


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    checkpointing.quiet_background_echoes()
    workdir = _WORKDIR.value
    out_dir = os.path.join(workdir, "eval")
    try:
        if _MODE.value in ("finetune", "both"):
            config.check_finetune(_FINETUNE.value)
        config.check_sed(_SED.value)
        tasks = suite_tasks.task_specs(",".join(_TASKS.value))
        if not tasks:
            return cli.fail("eval.py", "--tasks names no task (e.g. --tasks=synthetic_sounds)")
        step, meta, encoder = _open_run(workdir, _STEP.value)
        data_dir = _DATA_DIR.value or meta["config"]["data"]["data_dir"]
        _check_writable(out_dir)
        results = _earlier_results(os.path.join(out_dir, "results.json"), step)
        if _MODE.value in ("linear", "both"):
            _linear_probes(tasks, data_dir, meta, encoder, results)
        if _MODE.value in ("finetune", "both"):
            _finetunes(tasks, data_dir, step, out_dir, results)
        results = list(results.values())
        storage.write_atomic(storage.join(out_dir, "results.json"), json.dumps(
            dict(step=step, workdir=storage.absolute(workdir), tasks=results), indent=1))
        table = markdown_table(results, step)
        storage.write_atomic(storage.join(out_dir, "results.md"), table)
    except cli.FILE_ERRORS as e:
        return cli.fail("eval.py", cli.describe_os_error(e))
    except (config.ConfigError, probe.ProbeError, ValueError) as e:
        return cli.fail("eval.py", str(e))
    print(table)
    print(f"written: {os.path.join(out_dir, 'results.json')}, "
          f"{os.path.join(out_dir, 'results.md')}")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("eval.py", ("finetune",)))
