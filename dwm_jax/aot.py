"""Ahead-of-time compilation for a named accelerator target on a host without it: does the
training step fit on each chip, and what does it cost?

    report = aot.compile_for(cfg, topologies.parse("v5e:2x2"))
    print(aot.format_report(report))

The step is train.py's own (:func:`dwm_jax.train.step.step_program`: the same config,
setup, mesh, shardings and jitted step), over compile-only devices
(:mod:`dwm_jax.topologies`). Figures are per chip (per device JAX sees):

* memory from XLA's buffer assignment of the compiled program: arguments (the sharded
  state and this chip's rows of the batch), temporaries (activations, gradients, the
  workspace), outputs, less what donation aliases; against the chip's memory (on GPUs the
  share JAX preallocates, ``XLA_PYTHON_CLIENT_MEM_FRACTION``, 0.75 by default);
* FLOPs and bytes from XLA's cost analysis of the compiled program. XLA counts a loop's
  body once, and gives no analysis for sharded programs compiled for GPUs without one: there
  the figures are those of the same step with unrolled layers compiled for one chip of the
  target at one chip's share of the batch (a second compilation; collectives not counted);
* a roofline step time, the larger of FLOPs / peak and bytes / bandwidth (communication
  not in it), and the MFU it implies: the step's model FLOPs (the whole batch's, counted on
  the unsharded program, over the chips) / peak / step time. The sharded program's own
  count can differ from the model's (work the partitioner repeats or splits): both are
  reported.
"""

from __future__ import annotations

from dwm_jax._extras import require

require("train", "flax", "optax", "ml_collections")

import os
import pickle
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.experimental import serialize_executable

# XLA's module cost analysis (run with the CPU client over a GPU module): no public name
from jax._src.lib import _jax as xla_extension

from dwm_jax import build, profiling, sharding, topologies
from dwm_jax import config as config_lib
from dwm_jax.train import step as step_lib

# bytes per element of the HLO types the largest-buffer listing reads
_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
              "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_HLO_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_HLO_VALUE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]")
GPU_MEM_FRACTION = 0.75   # JAX's default preallocation on GPUs


def usable_bytes(chip: topologies.Chip) -> int:
    """The memory a program may use on ``chip``: all of a TPU's, the preallocated share of
    a GPU's."""
    if chip.platform != "cuda":
        return chip.hbm_bytes
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEM_FRACTION))
    return int(chip.hbm_bytes * fraction)


def target_mesh(cfg, target: topologies.Target) -> jax.sharding.Mesh:
    """train.py's mesh over the target's compile-only devices (its slices: the config's
    ``mesh.slices`` unless ``--num_slices`` names more)."""
    devices = topologies.compile_devices(target)
    try:
        return sharding.make_mesh(devices=devices, fsdp=cfg.mesh.fsdp,
                                  slices=max(cfg.mesh.slices, target.num_slices))
    except ValueError as e:
        raise config_lib.ConfigError(f"config.mesh on {target.name}: {e}") from None


def compile_for(cfg, target: topologies.Target, *, steps_per_epoch: int = 1000,
                eval_batch: int = 0, save: str = "") -> dict:
    """Compiles the step (and the evaluation encoder at ``eval_batch`` clips, 0: the
    training batch) of ``cfg`` for ``target``; returns the report (see the module doc).
    ConfigError for a config or batch the target cannot take, TopologyError for a target
    that cannot be made here."""
    config_lib.check(cfg)
    mesh = target_mesh(cfg, target)
    processes = len({d.process_index for d in mesh.devices.flat})
    try:
        sharding.check_batch(cfg.batch_size, mesh, processes)
    except ValueError as e:
        raise config_lib.ConfigError(f"config.batch_size on {target.name}: {e}") from None
    total = cfg.total_steps or cfg.epochs * steps_per_epoch
    setup = build.make_setup(cfg, steps_per_epoch, total)
    program = step_lib.step_program(setup, mesh)
    t0 = time.perf_counter()
    compiled = program.lower().compile()
    seconds = time.perf_counter() - t0
    if save:
        save_executable(compiled, save)
    report = dict(target=_target_fields(target, processes), config=_config_fields(cfg),
                  step=_program_report(compiled, target, seconds))
    report["step"].update(cost(setup, compiled, target))
    report["eval"] = _eval_encoder(setup, program, eval_batch or cfg.batch_size, target)
    return report


def _target_fields(target: topologies.Target, processes: int) -> dict:
    chip = target.chip
    return dict(name=target.name, chip=chip.name, grid=list(target.grid),
                slices=target.num_slices, devices=target.num_devices, hosts=processes,
                hbm_gib=chip.hbm_bytes / topologies.GIB,
                usable_gib=usable_bytes(chip) / topologies.GIB,
                peak_bf16_tflops=chip.bf16_tflops, hbm_gbytes_per_s=chip.hbm_gbytes_per_s,
                source=chip.source)


def _config_fields(cfg) -> dict:
    m = cfg.model
    return dict(objective=cfg.objective.name, masking=cfg.masking.name, size=m.size,
                input_shape=list(m.input_shape), batch_size=cfg.batch_size,
                compute_dtype=m.compute_dtype, remat=m.remat, scan_layers=m.scan_layers,
                fsdp=cfg.fsdp, attention=m.attention)


def _program_report(compiled, target: topologies.Target, seconds: float) -> dict:
    """Per-chip memory of a compiled program against the chip's, and its largest values."""
    mem = compiled.memory_analysis()
    args, temps, outs = (int(mem.argument_size_in_bytes), int(mem.temp_size_in_bytes),
                         int(mem.output_size_in_bytes))
    aliased = int(getattr(mem, "alias_size_in_bytes", 0))
    total = args + temps + outs - aliased
    usable = usable_bytes(target.chip)
    return dict(compile_s=seconds, arguments=args, temporaries=temps, outputs=outs,
                aliased=aliased, total=total, usable=usable, fits=total <= usable,
                largest=largest_values(compiled.as_text()))


def largest_values(hlo_text: str, count: int = 5) -> list[tuple[str, str, int]]:
    """The ``count`` largest array values of a compiled (per-device) HLO module: (name,
    type and shape, bytes). Tuples and values of the same name are counted once."""
    seen: dict[str, tuple[str, str, int]] = {}
    inside_fusion = False
    for line in hlo_text.splitlines():
        header = _HLO_COMPUTATION.match(line)
        if header:   # values inside a fused computation live in registers, not buffers
            inside_fusion = header.group(1).startswith(("fused", "wrapped"))
            continue
        m = _HLO_VALUE.match(line)
        if inside_fusion or not m or m.group(2) not in _HLO_BYTES:
            continue
        name, dtype, dims = m.groups()
        size = _HLO_BYTES[dtype]
        for d in filter(None, dims.split(",")):
            size *= int(d)
        if size > seen.get(name, ("", "", -1))[2]:
            seen[name] = (name, f"{dtype}[{dims}]", size)
    return sorted(seen.values(), key=lambda v: -v[2])[:count]


def cost(setup, compiled, target: topologies.Target) -> dict:
    """FLOPs and bytes per chip, the roofline step time and the MFU it implies."""
    cfg = setup.config

    def unrolled(flat_cfg, mesh, batch: int):
        flat_cfg.batch_size = batch
        other = build.make_setup(flat_cfg, setup.steps_per_epoch, setup.total_steps)
        return step_lib.step_program(other, mesh).lower()
    flops, bytes_, source = _cost_per_chip(compiled, unrolled, cfg, target, cfg.batch_size)
    out = dict(flops=flops, bytes=bytes_, cost_source=source,
               **roofline(flops, bytes_, target.chip))
    model = model_flops(cfg, lambda flat: unrolled(flat, sharding.make_mesh(1),
                                                   cfg.batch_size)) / target.num_devices
    peak = target.chip.bf16_tflops * 1e12
    return dict(out, model_flops=model,
                model_mfu=model / peak / out["step_s"] if out["step_s"] else 0.0)


def model_flops(cfg, lower_unrolled) -> float:
    """The step's FLOPs for the whole batch, however it is sharded: the program with
    unrolled layers lowered for one host device (traced, not compiled) and counted by XLA.
    What MFU divides: a sharded program's own count can differ (work the partitioner
    repeats or splits)."""
    flat = ml_collections.ConfigDict(cfg.to_dict())
    flat.model.scan_layers = False
    return profiling.compiled_flops(lower_unrolled(flat))


def module_cost(compiled) -> dict:
    """XLA's cost analysis of a compiled program: the target's own or, where it gives none
    (compile-only GPUs), XLA's CPU cost model run over the target's optimised module (its
    bytes; it does not count the FLOPs of library calls such as cuBLAS GEMMs)."""
    own = profiling.compiled_cost(compiled)
    if own:
        return own
    try:
        module = compiled.runtime_executable().hlo_modules()[0]
        return dict(xla_extension.hlo_module_cost_analysis(jax.devices("cpu")[0].client,
                                                           module))
    except Exception:  # noqa: BLE001 - no module or no analysis: no figures
        return {}


def _cost_per_chip(compiled, lower_unrolled, cfg, target: topologies.Target, batch: int):
    """(FLOPs, bytes, where the bytes come from) per chip. FLOPs: the compiled program's
    where XLA counts them all (TPUs, layers unrolled), else those of the program with
    unrolled layers lowered for the host (traced, not compiled) over the chips. Bytes: the compiled program's; with
    scanned layers (XLA counts a loop body once) those of the unrolled program compiled for
    one chip of the target at one chip's share of the batch."""
    own = module_cost(compiled)
    flat = ml_collections.ConfigDict(cfg.to_dict())
    flat.model.scan_layers = False
    if own.get("flops") and not cfg.model.scan_layers and target.chip.platform == "tpu":
        flops = float(own["flops"])
    else:   # the host's own cost model over the whole batch, traced for one CPU device
        flops = profiling.compiled_flops(lower_unrolled(flat, sharding.make_mesh(1), batch)) \
            / target.num_devices
    if not cfg.model.scan_layers:
        return flops, float(own.get("bytes accessed", 0.0)), "compiled"
    one = sharding.make_mesh(devices=topologies.compile_devices(topologies.one_chip(target)))
    single = module_cost(lower_unrolled(flat, one, max(batch // target.num_devices, 1))
                         .compile())
    return flops, float(single.get("bytes accessed", 0.0)), "one chip, layers unrolled"


def roofline(flops: float, bytes_: float, chip: topologies.Chip) -> dict:
    """The larger of compute time at peak and memory time at full bandwidth."""
    compute_s = flops / (chip.bf16_tflops * 1e12)
    memory_s = bytes_ / (chip.hbm_gbytes_per_s * 1e9)
    step_s = max(compute_s, memory_s)
    return dict(compute_s=compute_s, memory_s=memory_s, step_s=step_s,
                bound="compute" if compute_s >= memory_s else "memory",
                mfu=compute_s / step_s if step_s else 0.0)


def _features_fn(cfg):
    """(the encoder's parameters as shapes, params, x -> per-step features) of ``cfg``."""
    graphdef, params = nnx.split(build.abstract_objective(cfg).encoder, nnx.Param)
    return params, jax.jit(lambda p, x: nnx.merge(graphdef, p).time_features(x))


def _eval_encoder(setup, program, eval_batch: int, target: topologies.Target) -> dict:
    """The encoder's features (what evaluation runs) for ``eval_batch`` clips of the
    training width, the batch split over the mesh, the encoder's weights sharded as in
    training."""
    mesh, cfg = program.mesh, setup.config
    if eval_batch % mesh.size:
        return dict(batch=eval_batch, skipped=f"{eval_batch} clips do not divide over "
                    f"{mesh.size} devices")
    shape = (eval_batch, *cfg.model.input_shape)
    _, fn = _features_fn(cfg)
    t0 = time.perf_counter()
    compiled = fn.lower(program.state["params"]["encoder"], jax.ShapeDtypeStruct(
        shape, jnp.float32, sharding=sharding.batch_sharding(mesh))).compile()
    report = dict(batch=eval_batch, **_program_report(compiled, target,
                                                      time.perf_counter() - t0))

    def unrolled(flat_cfg, mesh, batch: int):
        params, flat_fn = _features_fn(flat_cfg)
        spec = jax.tree.map(lambda p: jax.ShapeDtypeStruct(
            p.shape, p.dtype, sharding=sharding.replicated(mesh)), params)
        return flat_fn.lower(spec, jax.ShapeDtypeStruct(
            (batch, *shape[1:]), jnp.float32, sharding=sharding.batch_sharding(mesh)))
    flops, _, _ = _cost_per_chip(compiled, unrolled, cfg, target, eval_batch)
    seconds_at_peak = flops / (target.chip.bf16_tflops * 1e12)
    report.update(flops=flops, clips_per_s_at_peak=eval_batch / max(seconds_at_peak, 1e-12))
    return report


def save_executable(compiled, path: str) -> None:
    """The serialised executable and its input and output trees (pickled), for
    ``jax.experimental.serialize_executable.deserialize_and_load`` on the target."""
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    with open(path + ".tmp", "wb") as f:
        pickle.dump(dict(executable=payload, in_tree=in_tree, out_tree=out_tree), f)
    os.replace(path + ".tmp", path)


def shortfall(report: dict) -> str | None:
    """One line naming what does not fit and the switches that would help, or None."""
    step, cfg = report["step"], report["config"]
    if step["fits"]:
        return None
    gib = topologies.GIB
    helps = []
    if cfg["remat"] == "none":
        helps.append("--config.model.remat=full (activations recomputed)")
    if not cfg["fsdp"] and report["target"]["devices"] > 1:
        helps.append("--config.fsdp=True (parameters and optimizer state sharded)")
    if cfg["compute_dtype"] != "bfloat16":
        helps.append("--config.model.compute_dtype=bfloat16")
    per_chip = cfg["batch_size"] // report["target"]["devices"]
    if per_chip > 1:
        helps.append(f"a smaller per-chip batch than {per_chip} (--config.batch_size, or "
                     "more chips)")
    return (f"the step needs {step['total'] / gib:.2f} GiB per chip on "
            f"{report['target']['name']} ({report['target']['chip']}, "
            f"{step['usable'] / gib:.2f} GiB usable): {(step['total'] - step['usable']) / gib:.2f}"
            f" GiB short; try {'; '.join(helps) or 'a larger chip'}")


def format_report(report: dict) -> str:
    """The report as a few lines of text."""
    t, c, s, e = report["target"], report["config"], report["step"], report["eval"]
    gib = topologies.GIB
    lines = [
        f"target: {t['name']}: {t['devices']} x {t['chip']} ({t['slices']} slice(s), "
        f"{t['hosts']} host(s)); per chip {t['hbm_gib']:.1f} GiB "
        f"({t['usable_gib']:.1f} usable), {t['peak_bf16_tflops']:g} TFLOP/s bf16, "
        f"{t['hbm_gbytes_per_s']:g} GB/s",
        f"config: {c['objective']} / {c['masking']}, ViT {c['size']}, input "
        f"{c['input_shape'][0]}x{c['input_shape'][1]}, batch {c['batch_size']} "
        f"({c['batch_size'] // t['devices']} a chip), {c['compute_dtype']}, remat "
        f"{c['remat']}, scan {c['scan_layers']}, fsdp {c['fsdp']}",
        f"step compiled in {s['compile_s']:.1f} s; per chip: arguments "
        f"{s['arguments'] / gib:.2f} GiB, temporaries {s['temporaries'] / gib:.2f} GiB, "
        f"outputs {s['outputs'] / gib:.2f} GiB, aliased {s['aliased'] / gib:.2f} GiB -> "
        f"{s['total'] / gib:.2f} of {s['usable'] / gib:.2f} GiB "
        f"({'fits' if s['fits'] else 'DOES NOT FIT'})",
        "largest values: " + ", ".join(f"{n} {shape} {b / 2 ** 20:.0f} MiB"
                                       for n, shape, b in s["largest"]),
        f"cost per chip: {s['flops'] / 1e12:.2f} TFLOP, {s['bytes'] / 1e9:.2f} GB "
        f"({s['cost_source']})",
        f"roofline: {s['step_s'] * 1e3:.1f} ms a step ({s['bound']}-bound; compute "
        f"{s['compute_s'] * 1e3:.1f} ms, memory {s['memory_s'] * 1e3:.1f} ms), "
        f"{c['batch_size'] / max(s['step_s'], 1e-12):.0f} examples/s; MFU "
        f"{s['model_mfu']:.2f} (model FLOPs {s['model_flops'] / 1e12:.2f} T a chip)",
    ]
    if "skipped" in e:
        lines.append(f"evaluation encoder: skipped ({e['skipped']})")
    else:
        lines.append(f"evaluation encoder ({e['batch']} clips): compiled in "
                     f"{e['compile_s']:.1f} s, {e['total'] / gib:.2f} GiB per chip "
                     f"({'fits' if e['fits'] else 'DOES NOT FIT'}), "
                     f"{e['flops'] / 1e12:.3f} TFLOP per chip, at most "
                     f"{e['clips_per_s_at_peak']:.0f} clips/s at peak")
    return "\n".join(lines)
