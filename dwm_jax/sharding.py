"""Device mesh, named shardings, and global arrays from per-host batches.

One ``data`` axis over all devices. Batches are split over it (data parallel). Parameters and
optimizer state are replicated, or with ``fsdp=True`` each array is split over the same axis
along its largest dimension that the device count divides (arrays smaller than
``fsdp_min_size`` stay replicated); XLA inserts the gathers. Multi-host: each process feeds
``global_batch // process_count`` examples and ``global_batch_array`` assembles them.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None, devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh named ``data`` over the first ``num_devices`` (default all) of
    ``devices`` (default the visible ones; compile-only devices for a named target)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"asked for {n} devices; {len(devices)} are visible")
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices[:n])


def check_batch(global_batch: int, mesh: jax.sharding.Mesh,
                processes: int | None = None) -> int:
    """Per-host batch; fails early when the batch does not divide over devices and hosts
    (``processes``: the hosts feeding the mesh, default this job's)."""
    n_dev, n_proc = mesh.devices.size, processes or jax.process_count()
    if global_batch % n_dev or global_batch % n_proc:
        raise ValueError(f"batch_size {global_batch} must be divisible by the device count "
                         f"({n_dev}) and the process count ({n_proc})")
    return global_batch // n_proc


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fsdp_spec(shape, n: int, min_size: int) -> P:
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA_AXIS
            return P(*spec)
    return P()


def state_shardings(tree, mesh, *, fsdp: bool = False, fsdp_min_size: int = 2 ** 14):
    """A NamedSharding for every array leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
    n = mesh.devices.size

    def one(leaf):
        if not fsdp or not hasattr(leaf, "shape"):
            return replicated(mesh)
        return NamedSharding(mesh, _fsdp_spec(leaf.shape, n, fsdp_min_size))
    return jax.tree.map(one, tree)


def global_batch_array(local: np.ndarray, mesh) -> jax.Array:
    """This host's rows [B_local, ...] -> a global array [B_local * process_count, ...]
    split over the ``data`` axis."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local)
