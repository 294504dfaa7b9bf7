"""Training step time and model FLOPs utilisation (MFU) for a config.

  python -m benchmarks.train                                  # ViT-B M2D, DWM, batch 256, bf16
  python -m benchmarks.train --batch 8 --size tiny            # something a CPU finishes
  python -m benchmarks.train --objective msm_mae --masker random --dtype float32
  python -m benchmarks.train --remat full       # peak memory with rematerialised blocks
  python -m benchmarks.train --scan --compile_only  # compile time with scanned layers

Times the jitted step (masking included) on random input of the paper's shape 80 x 608, over
all visible devices (data parallel), after a warm-up. FLOPs per step come from XLA's cost
analysis of the compiled (per-device) step; MFU = FLOPs / step time / per-device peak. The
peak is --peak_tflops, or for known accelerators their dense bf16 peak
(dwm_jax/profiling.py: H100 SXM 989, H200 989, A100 312 TFLOP/s, TPU v4 275, ...).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np


from dwm_jax import build, profiling, sharding
from dwm_jax import config as config_lib
from dwm_jax.train import step as step_lib


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", default="m2d", choices=["m2d", "msm_mae"])
    p.add_argument("--masker", default="dispersion")
    p.add_argument("--size", default="base")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--peak_tflops", type=float, default=0.0)
    p.add_argument("--remat", default="none", help="config.model.remat policy")
    p.add_argument("--attention", default="xla", help="config.model.attention")
    p.add_argument("--scan", action="store_true", help="config.model.scan_layers")
    p.add_argument("--compile_only", action="store_true",
                   help="print the compile time and memory analysis, run no step")
    args = p.parse_args()

    cfg = config_lib.base(args.objective, args.masker)
    cfg.batch_size = args.batch
    cfg.model.size = args.size
    cfg.model.compute_dtype = args.dtype
    cfg.model.update(remat=args.remat, attention=args.attention, scan_layers=args.scan)
    mesh = sharding.make_mesh()
    sharding.check_batch(args.batch, mesh)
    setup = build.make_setup(cfg, steps_per_epoch=1000, total_steps=300_000)
    abstract = build.abstract_state(setup, 0)
    shardings = sharding.state_shardings(abstract, mesh, fsdp=args.fsdp)
    state = jax.jit(lambda: build.init_state(setup, 0), out_shardings=shardings)()
    step = step_lib.jit_train_step(setup, shardings, mesh)
    x = sharding.global_batch_array(
        np.random.default_rng(0).standard_normal((args.batch, 80, 608), np.float32), mesh)

    t0 = time.perf_counter()
    lowered = step.lower(state, x)
    lower_s = time.perf_counter() - t0
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0 - lower_s
    flops = step_lib.step_flops(setup, compiled, x, jax.device_count())
    memory = compiled.memory_analysis()
    if args.compile_only:
        print(f"{args.objective} ViT-{args.size} batch {args.batch} {args.dtype} remat="
              f"{args.remat} scan={args.scan}: trace + lower {lower_s:.1f} s, XLA compile "
              f"{compile_s:.1f} s; temporaries "
              f"{memory.temp_size_in_bytes / 2**20:.0f} MiB; {flops / 1e12:.3f} TFLOP per step")
        return
    for _ in range(3):
        state, m = step(state, x)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = step(state, x)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    peak = args.peak_tflops or profiling.peak_tflops(device)
    print(f"device: {jax.device_count()} x {kind}; {args.objective} ViT-{args.size}, masker "
          f"{args.masker}, batch {args.batch}, {args.dtype}, fsdp={args.fsdp}")
    print(f"trace + lower {lower_s:.1f} s, compile {compile_s:.1f} s; step {step_s * 1e3:.1f} ms (median of {args.steps}); "
          f"{args.batch / step_s:.1f} examples/s")
    if memory is not None:
        print(f"compiled memory analysis (remat={args.remat}): temporaries "
              f"{memory.temp_size_in_bytes / 2**20:.0f} MiB, arguments "
              f"{memory.argument_size_in_bytes / 2**20:.0f} MiB")
    if flops:
        achieved = flops / step_s / 1e12
        line = (f"XLA cost analysis (per-device program): {flops / 1e12:.3f} TFLOP per step "
                f"= {achieved:.2f} TFLOP/s per device")
        if peak:
            line += f"; MFU {100 * achieved / peak:.1f} % of {peak:.0f} TFLOP/s"
        print(line)


if __name__ == "__main__":
    main()
