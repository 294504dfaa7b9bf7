"""Compile train.py's step for a TPU or GPU target without one: per-chip memory against the
chip's, XLA's FLOPs and bytes, a roofline step time and MFU, and the evaluation encoder.

    python -m dwm_jax.compile --config=configs/m2d.py:dispersion --topology=v5e:2x2 \\
        --config.model.size=base --config.batch_size=256 --config.fsdp=True
    python -m dwm_jax.compile --config=configs/m2d.py:dispersion --topology=h100:8 \\
        --config.model.size=base --config.batch_size=256
    python -m dwm_jax.compile ... --topology=v5e-256 --num_slices=2 --save=step.bin

Topologies: TPU ``v4-N``, ``v5e-N``, ``v5p-N``, ``v6e-N`` or ``<gen>:<grid>`` (needs
``pip install 'dwm_jax[tpu]'``: libtpu), GPU ``h100[:N]``, ``a100[:N]`` or
``h100:<hosts>x<GPUs>`` (needs ``pip install 'dwm_jax[cuda]'``: the CUDA plugin; compiled
without autotuning, which needs a device). The config and its ``--config.*`` overrides are
train.py's; exit status 2 with one line when the step does not fit, naming the shortfall
and the switches that would help. ``--json`` writes the report for tables.
"""

import json
import os

# Compile-only: no backend but the CPU is started. GPU targets compile without autotuning
# (it runs kernels on a device) and with cuBLAS for dots (Triton's tiling is autotuned).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
if "xla_gpu_autotune_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0"
                               " --xla_gpu_enable_triton_gemm=false").strip()

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from dwm_jax import aot, cli, storage, topologies  # noqa: E402
from dwm_jax import config as config_lib  # noqa: E402

PROG = "python -m dwm_jax.compile"
_CONFIG = cli.define_config_file(PROG, "config", "configs/m2d.py:dispersion",
                                 "a configs/*.py file, as train.py takes")
_TOPOLOGY = flags.DEFINE_string("topology", None, "the target: v5e-256, v5e:16x16, v4-32, "
                                "v5p-128, v6e-64, h100:8, a100:2x8, ...", required=True)
_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices over the data-centre network",
                               lower_bound=1)
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 0, "clips per evaluation-encoder call "
                                   "(0: the training batch)", lower_bound=0)
_STEPS_PER_EPOCH = flags.DEFINE_integer(
    "steps_per_epoch", 1000, "for the schedules only (no dataset is read): memory and cost "
    "do not depend on it", lower_bound=1)
_SAVE = flags.DEFINE_string("save", "", "write the serialised executable here")
_JSON = flags.DEFINE_string("json", "", "write the report as JSON here")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    for flag in (_SAVE, _JSON):   # before minutes of compiling
        try:
            storage.local_only(flag.value or "", f"--{flag.name}")
        except storage.StorageError as e:
            return cli.fail(PROG, str(e))
        folder = os.path.dirname(os.path.abspath(flag.value)) if flag.value else ""
        if folder and not os.path.isdir(folder):
            return cli.fail(PROG, f"--{flag.name}={flag.value}: no folder {folder}")
    try:
        target = topologies.parse(_TOPOLOGY.value, _SLICES.value)
        report = aot.compile_for(_CONFIG.value, target, steps_per_epoch=_STEPS_PER_EPOCH.value,
                                 eval_batch=_EVAL_BATCH.value, save=_SAVE.value)
    except (topologies.TopologyError, config_lib.ConfigError) as e:
        return cli.fail(PROG, str(e))
    except cli.FILE_ERRORS as e:
        return cli.fail(PROG, cli.describe_os_error(e))
    print(aot.format_report(report))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(report, f, indent=1)
    short = aot.shortfall(report)
    return cli.fail(PROG, short) if short else 0


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(PROG))
