"""Linear-probe evaluation of a pretrained encoder on labelled tasks, with two baselines.

    python eval.py --workdir=workdirs/demo --tasks=synthetic_sounds
    python eval.py --workdir=RUN --tasks=synthetic_sounds,audio_folder/esc50 --data_dir=data
    python eval.py --workdir=RUN --tasks=audio_folder:/path/to/built/esc50

A task is a built, labelled dataset: 'builder' (config 'default'), 'builder/config', or
'audio_folder:PATH' with PATH the directory of a built dataset. Each task is probed with the
run's encoder (latest checkpoint, or --step), the same architecture untrained (random init)
and pooled raw log-mel statistics. Writes RUN/eval/results.json and RUN/eval/results.md and
prints the table; embeddings are cached under RUN/eval/cache/, keyed by a hash of the
weights and of the task's data.
"""

import json
import os
import sys

from absl import app, flags
from absl import logging as absl_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's directory", required=True)
_TASKS = flags.DEFINE_list("tasks", ["synthetic_sounds"], "comma-separated tasks")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "where datasets are (default: the run's)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_NO_CACHE = flags.DEFINE_bool("no_cache", False, "recompute embeddings")


def markdown_table(results: list[dict], step: int) -> str:
    lines = [f"Linear probe, test accuracy (checkpoint step {step})", "",
             "| task | test clips | classes | pretrained | random init | raw log-mel | "
             "protocol |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['task']} | {r['num_test']} | {r['num_classes']} | "
                     f"{r['encoder']['test_accuracy']:.3f} | "
                     f"{r['random_init']['test_accuracy']:.3f} | "
                     f"{r['raw_logmel']['test_accuracy']:.3f} | {r['protocol']} |")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    from dwm_jax import checkpointing, probe
    from dwm_jax.embedding import Embedder

    checkpointing.quiet_background_echoes()

    workdir = _WORKDIR.value
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # and create nothing there
        print(f"eval.py: no checkpoint under {os.path.join(workdir, 'checkpoints')}",
              file=sys.stderr)
        return 2
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    step = _STEP.value if _STEP.value is not None else ckpt.latest_step()
    if step is None or step not in ckpt.manager.all_steps():
        print(f"eval.py: no checkpoint{'' if step is None else f' at step {step}'} under "
              f"{ckpt.directory}", file=sys.stderr)
        return 2
    try:
        meta = ckpt.read_meta(step)
        encoder = Embedder.from_workdir(workdir, step)
    except (checkpointing.CheckpointDamagedError, checkpointing.CheckpointMismatchError) as e:
        print(f"eval.py: {e} (--step picks another checkpoint)", file=sys.stderr)
        return 2
    finally:
        ckpt.close()
    data_dir = _DATA_DIR.value or meta["config"]["data"]["data_dir"]
    random_init = Embedder.random_init(meta["config"], encoder.stats, seed=0)
    cache = None if _NO_CACHE.value else os.path.join(workdir, "eval", "cache")
    # cache keys identify the weights (not the step: a retrained run reaches the same step)
    featurisers = {
        "encoder": (encoder.clip_embedding, f"encoder_{encoder.fingerprint}"),
        "random_init": (random_init.clip_embedding, f"random_init_{random_init.fingerprint}"),
        "raw_logmel": (probe.raw_features, "raw_logmel"),
    }
    results = []
    for spec in _TASKS.value:
        try:
            r = probe.evaluate_task(spec, data_dir, featurisers, cache_dir=cache)
        except (probe.ProbeError, FileNotFoundError, ValueError) as e:
            print(f"eval.py: task {spec!r}: {e}", file=sys.stderr)
            return 2
        results.append(r)
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(step=step, workdir=os.path.abspath(workdir), tasks=results), f, indent=1)
    table = markdown_table(results, step)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"written: {os.path.join(out_dir, 'results.json')}, "
          f"{os.path.join(out_dir, 'results.md')}")
    return 0


if __name__ == "__main__":
    app.run(main)
