"""Training-step cost of every masking strategy on the same model and batch.

  python -m benchmarks.train_step                         # ViT-tiny, batch 32, 80 x 304, CPU
  python -m benchmarks.train_step --size base --batch 256 --frames 608 --dtype bfloat16  # GPU

For each objective (M2D, MSM-MAE) and strategy: the median time of the jitted training step
(mask sampling inside, as in training), the median time of producing the mask alone (for SGIM
including its no-gradient encoder pass over all patches), the mask's share of the step, and
the step time relative to random masking.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np


from dwm_jax import build, masking
from dwm_jax import config as config_lib
from dwm_jax.train import step as step_lib



def _median_ms(fn, reps: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def measure(objective: str, strategy: str, args) -> dict:
    cfg = config_lib.base(objective, strategy)
    cfg.batch_size = args.batch
    cfg.model.update(size=args.size, input_shape=(80, args.frames),
                     compute_dtype=args.dtype)
    if args.decoder_dim:
        cfg.model.decoder = dict(dim=args.decoder_dim, depth=args.decoder_depth,
                                 heads=args.decoder_heads)
    setup = build.make_setup(cfg, steps_per_epoch=100, total_steps=10_000)
    state = build.init_state(setup, 0)
    x = jax.random.normal(jax.random.key(1), (args.batch, 80, args.frames))
    step = jax.jit(lambda s, x: step_lib.train_step(setup, s, x))
    mask = jax.jit(lambda p, x, k: step_lib.sample_mask(setup, p, x, k, 0.5).mask)
    step_ms = _median_ms(lambda: step(state, x)[1]["loss"], args.reps)
    mask_ms = _median_ms(lambda: mask(state["params"], x, jax.random.key(2)), args.reps)
    return dict(objective=objective, strategy=strategy, step_ms=step_ms, mask_ms=mask_ms,
                mask_share=mask_ms / step_ms)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objectives", default="m2d,msm_mae")
    p.add_argument("--strategies", default=",".join(masking.MASKERS))
    p.add_argument("--size", default="tiny")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--frames", type=int, default=304)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--decoder_dim", type=int, default=128, help="0: the paper's 512 x 8")
    p.add_argument("--decoder_depth", type=int, default=2)
    p.add_argument("--decoder_heads", type=int, default=4)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", default="")
    args = p.parse_args()
    rows = []
    print(f"device: {jax.devices()[0].device_kind}; ViT-{args.size}, batch {args.batch}, "
          f"80 x {args.frames}, {args.dtype}; median of {args.reps}")
    print("| objective | strategy | step ms | mask ms | mask share | x random |")
    print("|---|---|---:|---:|---:|---:|")
    for objective in args.objectives.split(","):
        base = None
        for strategy in args.strategies.split(","):
            r = measure(objective, strategy, args)
            base = r["step_ms"] if strategy == "random" else base
            r["x_random"] = r["step_ms"] / base if base else float("nan")
            rows.append(r)
            print(f"| {objective} | {strategy} | {r['step_ms']:.1f} | {r['mask_ms']:.2f} | "
                  f"{100 * r['mask_share']:.1f} % | {r['x_random']:.3f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
