"""Pretraining entry point: M2D / MSM-MAE with any mask sampler, over a device mesh.

    python train.py --config=configs/demo.py --workdir=workdirs/demo
    python train.py --config=configs/m2d.py:dispersion --workdir=DIR --config.batch_size=256

Resumes from the latest checkpoint in ``WORKDIR/checkpoints`` when there is one. Multi-host
(TPU pods, GPU clusters): run one process per host with ``--multihost`` (or the environment
that ``jax.distributed.initialize()`` reads); each host feeds its shard of the batch. Where
nothing is detected, name the coordinator (on CPU this uses gloo collectives):

    python train.py --config=... --workdir=DIR --coordinator_address=host0:1234 \
        --num_processes=2 --process_id=0      # and --process_id=1 on the other host
Writes ``WORKDIR/config.json``, ``metrics.jsonl``, ``tensorboard/`` and ``checkpoints/``;
with ``config.probe.enabled`` it then runs the linear probe and writes ``probe.json``.
"""

import json
import sys

from absl import app, flags
from absl import logging as absl_logging

from dwm_jax import cli, storage

_CONFIG = cli.define_config_file("train.py", "config", "configs/demo.py",
                                 "a configs/*.py file")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and logs go", required=True)
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for clusters that "
    "jax.distributed.initialize() cannot detect (implies --multihost)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "with --coordinator_address")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "with --coordinator_address")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and TFDS are chatty at INFO
    from dwm_jax import checkpointing
    checkpointing.quiet_background_echoes()
    import jax
    if _COORDINATOR.value is not None:
        if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
            raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
        # Cross-process collectives for the CPU backend (GPU and TPU bring their own);
        # set before initialize, which must run before any backend exists.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _MULTIHOST.value:
        jax.distributed.initialize()
    from dwm_jax import train

    cfg = _CONFIG.value
    workdir = _WORKDIR.value
    try:
        summary = train.train(cfg, workdir)
    except train.NonFiniteError as e:
        print(f"train.py: stopped: {e}", file=sys.stderr)
        return 3
    except train.USER_ERRORS as e:  # the user's to fix: one line, no traceback
        return cli.fail("train.py", str(e))
    except cli.FILE_ERRORS as e:      # a read-only or misplaced directory
        return cli.fail("train.py", cli.describe_os_error(e))
    print(f"checkpoints: {summary['checkpoint_dir']} (step {summary['final_step']})")
    print(f"logs: {storage.join(workdir, 'metrics.jsonl')}, "
          f"{storage.join(workdir, 'tensorboard')}")
    if "preempted_at" in summary:
        print(f"preempted: saved step {summary['preempted_at']}; rerun the same command to "
              "resume")
        return 0
    if cfg.probe.enabled and jax.process_index() == 0:
        from dwm_jax import probe
        result = probe.probe_workdir(workdir, cfg.data.data_dir, cfg.probe.name or cfg.data.name)
        path = storage.join(workdir, "probe.json")
        storage.write_atomic(path, json.dumps(result, indent=1))
        print(f"probe: test accuracy {result['test_accuracy']:.3f} "
              f"(chance {result['chance']:.3f}) -> {path}")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("train.py"))
