"""Cost of every mask sampler per batch, jitted, after warm-up, on this machine.

    python -m benchmarks.masking                 # B = 256, 80 x 608 log-mel, 16 x 16 patches
    python -m benchmarks.masking --batch 32 --reps 100 --json out.json

Prints a markdown table: median ms per batch (with the interquartile range), the ratio to
`random`, and reference rows: MAE's argsort formulation of random masking, one read of the
input (the floor any data-dependent sampler pays), and per-sample NumPy implementations of
DWM and of IBM's exact-count loop (the reference cost the vectorised samplers replace).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from dwm_jax import masking


def time_interleaved(cases, reps: int, warmup: int = 3):
    """Median and IQR (ms) per case of ``fn(*args_for_rep(i))``, each result blocked on.

    The cases run round-robin, one call each per round, so that drift in the machine's
    speed (other tenants, clocks) hits every case alike and the ratios stay meaningful.
    ``cases`` maps a name to ``(fn, args_for_rep)``.
    """
    for fn, args_for_rep in cases.values():
        for i in range(warmup):
            jax.block_until_ready(fn(*args_for_rep(i)))
    times = {name: [] for name in cases}
    for i in range(reps):
        for name, (fn, args_for_rep) in cases.items():
            args = args_for_rep(warmup + i)
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, t in times.items():
        q1, med, q3 = np.percentile(np.asarray(t) * 1e3, [25, 50, 75])
        out[name] = (med, q3 - q1)
    return out


# ---------------------------------------------------------------- per-sample NumPy references

def numpy_dwm(x, patch, num_keep, rng):
    """Per-sample DWM as a straightforward implementation would do it: MAD per patch,
    then numpy's weighted choice without replacement."""
    b, f, t = x.shape
    ph, pw = patch
    n = (f // ph) * (t // pw)
    out = np.empty((b, n - num_keep), np.int64)
    for i in range(b):
        p = x[i].reshape(f // ph, ph, t // pw, pw).transpose(0, 2, 1, 3).reshape(n, -1)
        w = np.abs(p - p.mean(1, keepdims=True)).mean(1) + 1e-12
        out[i] = rng.choice(n, n - num_keep, replace=False, p=w / w.sum())
    return out


def numpy_ibm(batch, grid, num_keep, block_size, num_centres, rng):
    """Per-sample inverse block masking with data2vec's exact-count loop."""
    fp, tp = grid
    out = np.zeros((batch, fp, tp), bool)
    for i in range(batch):
        vis = np.zeros((fp, tp), bool)
        for c in rng.integers(0, fp * tp, num_centres):
            r0, c0 = c // tp - block_size // 2, c % tp - block_size // 2
            vis[max(r0, 0):r0 + block_size, max(c0, 0):c0 + block_size] = True
        flat = vis.reshape(-1)
        while flat.sum() > num_keep:
            flat[rng.choice(np.flatnonzero(flat))] = False
        while flat.sum() < num_keep:
            flat[rng.choice(np.flatnonzero(~flat))] = True
        out[i] = ~flat.reshape(fp, tp)
    return out


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--frames", type=int, default=608)
    ap.add_argument("--mels", type=int, default=80)
    ap.add_argument("--mask-ratio", type=float, default=0.7)
    ap.add_argument("--feature-dim", type=int, default=768, help="SGIM feature width (ViT-B)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--numpy-reps", type=int, default=5)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)

    shape, patch = (args.mels, args.frames), (16, 16)
    b = args.batch
    x = jax.random.normal(jax.random.key(0), (b, *shape), jnp.float32)
    keys = lambda i: jax.random.fold_in(jax.random.key(1), i)  # noqa: E731
    cases, notes = {}, {}

    def add(name, fn, extra=(), note=""):
        cases[name] = (fn, lambda i: (keys(i), x, *extra))
        notes[name] = note

    strategies = [
        ("random", "random", {}, 0.0, ""),
        ("time_freq", "time_freq", {}, 0.0, "Audio-MAE 0.7 / 0.3, trimmed"),
        ("block", "block", {}, 0.0, "BEiT, min 16 patches"),
        ("inverse_block", "inverse_block", {}, 0.0, "b 5, adjust 0.07"),
        ("dispersion", "dispersion", {}, 0.0, "DWM, MAD, hint 0"),
        ("dispersion, hint 0.5", "dispersion", {}, 0.5, "hint swap"),
        ("dispersion, deterministic", "dispersion", {"deterministic": True}, 0.0, ""),
        ("dispersion, variance", "dispersion", {"metric": "variance"}, 0.0, ""),
        ("dispersion, frequency", "dispersion", {"granularity": "frequency"}, 0.0, ""),
    ]
    for label, name, opts, hint, note in strategies:
        m = masking.make_masker(name, input_shape=shape, patch_size=patch,
                                mask_ratio=args.mask_ratio, **opts)
        add(label, jax.jit(lambda k, x, m=m, h=hint: m(k, x, hint_ratio=h)), note=note)

    m = masking.make_masker("dispersion", input_shape=shape, patch_size=patch,
                            mask_ratio=args.mask_ratio)
    add("dispersion, traced hint", jax.jit(lambda k, x, r: m(k, x, hint_ratio=r)),
        (jnp.float32(0.3),), "r_h as a jit argument")
    feats = jax.random.normal(jax.random.key(2), (b, m.num_patches, args.feature_dim))
    sg = masking.make_masker("sgim", input_shape=shape, patch_size=patch,
                             mask_ratio=args.mask_ratio)
    add("sgim (features given)", jax.jit(lambda k, x, f: sg(k, x, features=f)), (feats,),
        f"D = {args.feature_dim}; excludes the encoder pass")

    # reference rows
    n, num_keep = m.num_patches, m.num_keep

    def mae_random(k, x):
        ids = jnp.argsort(jax.random.uniform(k, (x.shape[0], n)), axis=-1)
        restore = jnp.argsort(ids, axis=-1)
        return ids[:, :num_keep], restore, (restore >= num_keep).astype(jnp.float32)
    add("ref: random via argsort (MAE)", jax.jit(mae_random), note="two sorts, as in MAE")
    add("ref: one read of x (floor)", jax.jit(  # the sampler's first pass, on its own
        lambda k, x: masking._tree_sum(masking._slices(x.reshape(b, shape[0] // 16, 16, -1), 2))),
        note="patch-row sums: the least a data-dependent sampler reads")
    add("ref: MAD pass only", jax.jit(lambda k, x: masking.patch_dispersion(x, patch)))

    # SGIM streams 150 MB of features per call: timed on its own so that it does not flush
    # the caches of the cheap samplers it would otherwise alternate with.
    sgim = {k: cases.pop(k) for k in [k for k in cases if k.startswith("sgim")]}
    timed = time_interleaved(cases, args.reps)
    timed.update(time_interleaved(sgim, max(args.reps // 5, 5)))
    rows = [dict(name=name, ms=timed[name][0], iqr=timed[name][1], note=notes[name])
            for name in notes]

    rng = np.random.default_rng(0)
    xn = np.asarray(x)
    t = []
    for _ in range(args.numpy_reps):
        t0 = time.perf_counter()
        numpy_dwm(xn, patch, num_keep, rng)
        t.append(time.perf_counter() - t0)
    rows.append(dict(name="ref: NumPy per-sample DWM", ms=np.median(t) * 1e3,
                     iqr=float(np.subtract(*np.percentile(t, [75, 25])) * 1e3),
                     note="MAD + choice(replace=False, p)"))
    ibm = masking.make_masker("inverse_block", input_shape=shape, patch_size=patch,
                              mask_ratio=args.mask_ratio)
    t = []
    for _ in range(args.numpy_reps):
        t0 = time.perf_counter()
        numpy_ibm(b, ibm.grid, num_keep, 5, ibm.options["num_centres"], rng)
        t.append(time.perf_counter() - t0)
    rows.append(dict(name="ref: NumPy per-sample IBM", ms=np.median(t) * 1e3,
                     iqr=float(np.subtract(*np.percentile(t, [75, 25])) * 1e3),
                     note="exact-count loop"))

    base = rows[0]["ms"]
    print(f"# mask samplers: B = {b}, {shape[0]} x {shape[1]} log-mel, 16 x 16 patches, "
          f"mask ratio {args.mask_ratio}")
    cpu = platform.processor() or platform.machine()
    print(f"# jax {jax.__version__} on {jax.devices()[0].platform} ({cpu}, {os.cpu_count()} "
          f"cores); median of {args.reps} jitted calls after warm-up, cases interleaved\n")
    print("| strategy | ms / batch | IQR | x random | note |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        r["x_random"] = r["ms"] / base
        print(f"| {r['name']} | {r['ms']:.2f} | {r['iqr']:.2f} | {r['x_random']:.2f} | "
              f"{r['note']} |")
    by = {r["name"]: r["ms"] for r in rows}
    print(f"\nDWM / random = {by['dispersion'] / base:.2f}; DWM - random = "
          f"{by['dispersion'] - base:.2f} ms, of which the MAD pass is "
          f"{by['ref: MAD pass only']:.2f} ms (floor: one read = "
          f"{by['ref: one read of x (floor)']:.2f} ms)")
    print(f"IBM / random = {by['inverse_block'] / base:.2f}")
    print(f"speed-up over the per-sample NumPy reference: DWM "
          f"{by['ref: NumPy per-sample DWM'] / by['dispersion']:.0f}x, IBM "
          f"{by['ref: NumPy per-sample IBM'] / by['inverse_block']:.0f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(batch=b, input=shape, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
