"""Accelerator targets by name, for compiling without them: TPU slices and GPU hosts as
compile-only devices (``jax.experimental.topologies``), and each chip's memory and peaks.

    target = topologies.parse("v5e-256")        # or "v5e:16x16", "v4-32", "h100:2x8"
    devices = topologies.compile_devices(target)  # needs libtpu / the CUDA plugin

TPU names follow Cloud TPU's: ``v5e-N`` and ``v6e-N`` count chips, ``v4-N`` and ``v5p-N``
count TensorCores (two per chip, seen by JAX as one "megacore" device), so ``v4-32`` is 16
chips. ``<gen>:<AxB[xC]>`` names the chip grid itself. ``num_slices`` repeats a slice over
the data-centre network (multi-slice). GPU names are ``h100`` / ``a100`` with
``:<GPUs>`` or ``:<hosts>x<GPUs per host>`` (8 per host by default); their target
descriptions (what XLA would read from the device) are kept in ``gpu_targets/``.
Importing this module needs only jax; making devices needs the platform's plugin.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from jax.experimental import topologies as jax_topologies

GIB = 1024 ** 3


class TopologyError(ValueError):
    """A target that cannot be named or made here (the message says why and what to do)."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: what fits on it and how fast it can go (vendor figures)."""
    name: str
    platform: str            # "tpu" or "cuda"
    hbm_bytes: int           # memory per chip (per device JAX sees)
    bf16_tflops: float       # dense bfloat16 peak, no sparsity
    hbm_gbytes_per_s: float  # memory bandwidth
    source: str


# Per chip. TPU v4 and v5p are two TensorCores per chip that JAX sees as one device.
CHIPS = {
    "v4": Chip("TPU v4", "tpu", 32 * GIB, 275.0, 1228.0,
               "Cloud TPU docs, 'TPU v4' system architecture"),
    "v5e": Chip("TPU v5e", "tpu", 16 * GIB, 197.0, 819.0,
                "Cloud TPU docs, 'TPU v5e' system architecture"),
    "v5p": Chip("TPU v5p", "tpu", 95 * GIB, 459.0, 2765.0,
                "Cloud TPU docs, 'TPU v5p' system architecture"),
    "v6e": Chip("TPU v6e", "tpu", 32 * GIB, 918.0, 1640.0,
                "Cloud TPU docs, 'TPU v6e (Trillium)' system architecture"),
    "h100": Chip("NVIDIA H100 SXM 80GB", "cuda", 85520809984, 989.0, 3352.0,
                 "NVIDIA H100 Tensor Core GPU datasheet (SXM5); memory as the device "
                 "reports it"),
    "a100": Chip("NVIDIA A100 SXM 80GB", "cuda", 85198045184, 312.0, 2039.0,
                 "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB); memory as the device "
                 "reports it"),
}
# TPU generations whose chips are laid out in 3-D (and counted in TensorCores by name)
_CUBE = ("v4", "v5p")
GPUS_PER_HOST = 8
GPU_TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")


@dataclasses.dataclass(frozen=True)
class Target:
    """A named target: the chip, the grid of chips in one slice (TPU) or hosts x GPUs
    (GPU), and the number of slices."""
    name: str
    chip: Chip
    generation: str
    grid: tuple[int, ...]
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.grid)

    @property
    def num_devices(self) -> int:
        return self.chips_per_slice * self.num_slices


def _tpu_grid(chips: int, dims: int) -> tuple[int, ...]:
    """The most nearly square (cubic) power-of-two grid of ``chips`` chips, smallest first."""
    if chips < 1 or chips & (chips - 1):
        raise TopologyError(f"{chips} chips: a TPU slice named by its size has a power of "
                            "two chips; name the grid instead (e.g. v5e:4x8)")
    grid = [1] * dims
    for _ in range(chips.bit_length() - 1):
        grid[grid.index(min(grid))] *= 2
    return tuple(sorted(grid))


def parse(name: str, num_slices: int = 1) -> Target:
    """``v5e-256``, ``v5e:16x16``, ``v4-32``, ``v5p:4x4x4``, ``h100``, ``h100:8``,
    ``a100:2x8`` -> a Target; TopologyError naming what is known otherwise."""
    text = name.strip().lower()
    if num_slices < 1:
        raise TopologyError(f"--num_slices must be >= 1; got {num_slices}")
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)(?:-(\d+)|:(\d+(?:x\d+){1,2}))", text)
    if m:
        gen, count, grid = m.groups()
        dims = 3 if gen in _CUBE else 2
        if count is not None:
            n = int(count)
            if gen in _CUBE and n % 2:
                raise TopologyError(f"{name}: {gen} names count TensorCores (two per chip); "
                                    "expected an even number")
            shape = _tpu_grid(n // 2 if gen in _CUBE else n, dims)
        else:
            shape = tuple(int(v) for v in grid.split("x"))
            if len(shape) != dims or min(shape) < 1:
                raise TopologyError(f"{name}: a {gen} grid has {dims} dimensions")
        return Target(name, CHIPS[gen], gen, shape, num_slices)
    m = re.fullmatch(r"(h100|a100)(?::(?:(\d+)x)?(\d+))?", text)
    if m:
        gen, hosts, gpus = m.groups()
        gpus = int(gpus) if gpus else 1
        hosts = int(hosts) if hosts else 1
        if not hosts and gpus > GPUS_PER_HOST:
            hosts, gpus = gpus // GPUS_PER_HOST, GPUS_PER_HOST
        if gpus > GPUS_PER_HOST and hosts == 1 and gpus % GPUS_PER_HOST == 0:
            hosts, gpus = gpus // GPUS_PER_HOST, GPUS_PER_HOST
        if hosts < 1 or not 1 <= gpus <= GPUS_PER_HOST:
            raise TopologyError(f"{name}: expected {gen}:<GPUs> or {gen}:<hosts>x<GPUs per "
                                f"host> with 1..{GPUS_PER_HOST} GPUs a host")
        return Target(name, CHIPS[gen], gen, (hosts, gpus), num_slices)
    raise TopologyError(
        f"--topology {name!r} is not one this package knows: TPU v4-N, v5e-N, v5p-N, v6e-N "
        "(or <gen>:<grid>, e.g. v5e:16x16, v4:2x2x4) and GPU h100[:N], a100[:N], "
        "h100:<hosts>x<GPUs>")


def one_chip(target: Target) -> Target:
    """One chip of ``target``'s kind (one slice, one host)."""
    return dataclasses.replace(target, name=f"one chip of {target.name}",
                               grid=(1,) * len(target.grid), num_slices=1)


def compile_devices(target: Target) -> list:
    """Compile-only devices of ``target`` (no accelerator needed). TopologyError naming the
    package to install when the platform's compiler is missing."""
    if target.chip.platform == "tpu":
        return _tpu_devices(target)
    return _gpu_devices(target)


# libtpu asks the cloud's metadata server what it runs on; told here, it stays quiet
_ACCELERATOR_TYPE = {"v4": "v4-{cores}", "v5p": "v5p-{cores}", "v5e": "v5litepod-{chips}",
                     "v6e": "v6e-{chips}"}


def _tpu_devices(target: Target) -> list:
    """A host drives 2 x 2 chips (fewer in a smaller slice)."""
    chips = target.chips_per_slice
    # compile-only: several processes may load libtpu at once (it locks by default)
    for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
                       ("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_ID", "0"),
                       ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("TPU_ACCELERATOR_TYPE", _ACCELERATOR_TYPE[target.generation].format(
                           chips=chips, cores=2 * chips))):
        os.environ.setdefault(key, value)
    grid = "x".join(map(str, target.grid))
    per_host = tuple(min(2, g) for g in target.grid[:2]) + (1,)
    kwargs = dict(chip_config_name="megacore" if target.generation in _CUBE else "default",
                  chips_per_host_bounds=per_host, num_slices=target.num_slices)
    try:
        desc = jax_topologies.get_topology_desc(
            topology_name=f"{target.generation}:{grid}", platform="tpu", **kwargs)
    except Exception as e:  # no libtpu, or a grid libtpu refuses
        raise TopologyError(_plugin_message(e, "libtpu", "pip install 'dwm_jax[tpu]'",
                                            target)) from None
    return list(desc.devices)


def _gpu_devices(target: Target) -> list:
    path = os.path.join(GPU_TARGETS, f"{target.generation}.txtpb")
    with open(path) as f:
        target_config = f.read()
    hosts, gpus = target.grid
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    try:
        desc = jax_topologies.get_topology_desc(
            platform="cuda", target_config=target_config,
            topology=f"{target.num_slices}x{hosts}x{gpus}")
    except Exception as e:  # no CUDA plugin, or a target it refuses
        raise TopologyError(_plugin_message(e, "the CUDA plugin",
                                            "pip install 'dwm_jax[cuda]'", target)) from None
    return list(desc.devices)


def _plugin_message(error: Exception, what: str, install: str, target: Target) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"--topology {target.name}: cannot make its devices ({text[:200]}); compiling "
            f"for it needs {what}: {install}")
