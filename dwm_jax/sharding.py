"""Device mesh, named shardings, and global arrays from per-host batches.

The mesh has up to three named axes, outermost first: ``slice`` (slices of a multi-slice
TPU job, over the data-centre network: data parallel, only the gradient reduction crosses
it), ``data`` (data parallel) and ``fsdp`` (the batch is split over it too, and parameters
and optimizer state are sharded over it). Axes of size 1 are left out, so the default is
a 1-D ``data`` mesh over every device. Batches are split over every axis.

Parameters and optimizer state follow ``rules`` ("REGEX=SPEC", the first whose pattern is
found in an array's path, e.g. ``params/encoder/blocks/3/fc1/kernel``, wins; SPEC
names a mesh axis or None per dimension, ``None,fsdp``); an array no rule names is split
along its largest dimension that the ``fsdp`` axis divides (arrays smaller than
``min_size`` stay replicated). Without an ``fsdp`` axis, ``fsdp=True`` applies the same
rule over the ``data`` axis; otherwise unnamed arrays are replicated. XLA inserts the
gathers. Multi-host: each process feeds ``global_batch // process_count`` examples and
``global_batch_array`` assembles them.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec as P

SLICE_AXIS, DATA_AXIS, FSDP_AXIS = "slice", "data", "fsdp"
AXES = (SLICE_AXIS, DATA_AXIS, FSDP_AXIS)


def make_mesh(num_devices: int | None = None, devices=None, *, fsdp: int = 1,
              slices: int = 1) -> jax.sharding.Mesh:
    """The mesh over the first ``num_devices`` (default all) of ``devices`` (default the
    visible ones; compile-only devices for a named target): ``slices`` x data x ``fsdp``,
    axes of size 1 left out. ValueError when the devices do not divide so."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"asked for {n} devices; {len(devices)} are visible")
    if fsdp < 1 or slices < 1 or n % (fsdp * slices):
        raise ValueError(f"{n} devices do not divide into {slices} slice(s) x data x fsdp "
                         f"{fsdp}")
    sizes = dict(zip(AXES, (slices, n // (fsdp * slices), fsdp)))
    names = tuple(a for a in AXES if sizes[a] > 1 or a == DATA_AXIS)
    shape = tuple(sizes[a] for a in names)
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    if len(names) == 1:
        return jax.make_mesh(shape, names, axis_types=auto, devices=devices[:n])
    return jax.sharding.Mesh(_device_grid(devices[:n], shape, names), names, axis_types=auto)


def _device_grid(devices: list, shape: tuple, names: tuple) -> np.ndarray:
    """Devices laid out for ``shape``: slices over the data-centre network where the devices
    know their slice, the rest along the chips' interconnect where jax knows its layout."""
    if SLICE_AXIS in names and hasattr(devices[0], "slice_index"):
        inner = [1] + list(shape[1:])
        outer = [shape[0]] + [1] * (len(shape) - 1)
        return mesh_utils.create_hybrid_device_mesh(inner, outer, devices)
    try:
        return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        return np.asarray(devices, dtype=object).reshape(shape)


def check_batch(global_batch: int, mesh: jax.sharding.Mesh,
                processes: int | None = None) -> int:
    """Per-host batch; fails early when the batch does not divide over devices and hosts
    (``processes``: the hosts feeding the mesh, default this job's)."""
    n_dev, n_proc = mesh.devices.size, processes or jax.process_count()
    if global_batch % n_dev or global_batch % n_proc:
        raise ValueError(f"batch_size {global_batch} must be divisible by the device count "
                         f"({n_dev}) and the process count ({n_proc})")
    return global_batch // n_proc


def batch_axes(mesh) -> tuple[str, ...]:
    """The axes a batch is split over: all of them."""
    return tuple(mesh.axis_names)


def batch_sharding(mesh) -> NamedSharding:
    axes = batch_axes(mesh)
    return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def parse_rules(rules) -> list[tuple[re.Pattern, tuple]]:
    """("REGEX=SPEC", ...) -> [(compiled pattern, spec entries)]; ValueError naming a rule
    that cannot be read. SPEC is comma-separated mesh axes or None, one per dimension."""
    parsed = []
    for rule in rules:
        pattern, sep, spec = str(rule).rpartition("=")
        entries = tuple(None if e.strip() in ("None", "") else e.strip()
                        for e in spec.split(","))
        unknown = [e for e in entries if e is not None and e not in AXES]
        if not sep or not pattern or unknown:
            raise ValueError(f"sharding rule {rule!r}: expected 'REGEX=SPEC' with SPEC of "
                             f"{', '.join(AXES)} or None per dimension")
        try:
            parsed.append((re.compile(pattern), entries))
        except re.error as e:
            raise ValueError(f"sharding rule {rule!r}: {e}") from None
    return parsed


def _largest_dim_spec(shape, axis: str, n: int, min_size: int) -> P:
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[dim] % n == 0:
            spec = [None] * len(shape)
            spec[dim] = axis
            return P(*spec)
    return P()


def _rule_spec(name: str, shape, entries: tuple, mesh, rule: str) -> P:
    """A rule's spec for one array, checked: its rank and the axes' sizes must fit."""
    if len(entries) > len(shape):
        raise ValueError(f"sharding rule {rule!r} names {len(entries)} dimensions; {name} "
                         f"has shape {tuple(shape)}")
    for dim, axis in enumerate(entries):
        if axis is not None and (axis not in mesh.shape or shape[dim] % mesh.shape[axis]):
            size = mesh.shape.get(axis, "no")
            raise ValueError(f"sharding rule {rule!r}: {name} dimension {dim} "
                             f"({shape[dim]}) over the {axis!r} axis ({size} devices)")
    return P(*entries)


def state_shardings(tree, mesh, *, fsdp: bool = False, rules=(),
                    fsdp_min_size: int = 2 ** 14):
    """A NamedSharding for every array leaf of ``tree`` (arrays or ShapeDtypeStructs): the
    first matching rule, else the largest dimension over the ``fsdp`` axis (or, with
    ``fsdp=True`` and no such axis, the ``data`` axis), else replicated."""
    parsed = list(zip(rules, parse_rules(rules)))
    axis = FSDP_AXIS if FSDP_AXIS in mesh.shape else (DATA_AXIS if fsdp else None)

    def one(path, leaf):
        if not hasattr(leaf, "shape"):
            return replicated(mesh)
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                        for k in path)
        for rule, (pattern, entries) in parsed:
            if pattern.search(name):
                return NamedSharding(mesh, _rule_spec(name, leaf.shape, entries, mesh, rule))
        if axis is None:
            return replicated(mesh)
        return NamedSharding(mesh, _largest_dim_spec(leaf.shape, axis, mesh.shape[axis],
                                                     fsdp_min_size))
    return jax.tree_util.tree_map_with_path(one, tree)


def global_batch_array(local: np.ndarray, mesh) -> jax.Array:
    """This host's rows [B_local, ...] -> a global array [B_local * process_count, ...]
    split over every axis of the mesh."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local)
