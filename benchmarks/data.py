"""Data throughput: clips/s for building datasets and batches/s for reading them.

  python -m benchmarks.data                    # builds synthetic_sounds/default in a temp dir
  python -m benchmarks.data --data_dir data    # reuse (or build) it under data/
  python -m benchmarks.data --probe            # also the raw-feature linear probe accuracy

Prints: building rate of synthetic_sounds and of an audio folder (44.1 kHz stereo wav files,
so loading and resampling are included); reading rate of the training pipeline (random crop
to 608 frames, normalisation, batching) for 0 and 2 Grain workers; the demo training step
rate against the pipeline's rate at the demo's crop; with --probe, the test accuracy of a
linear probe on pooled raw log-mel features (how far from saturation the built-in dataset
is).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import soundfile


def build_rates(data_dir: str, folder_clips: int) -> dict:
    from dwm_jax import data

    from dwm_jax.data import pipeline

    out = {}
    try:
        pipeline.dataset_dir(data_dir, "synthetic_sounds/default")
        out["synthetic_reused"] = True
    except FileNotFoundError:
        out["synthetic_reused"] = False
    t0 = time.perf_counter()
    b = data.build("synthetic_sounds", data_dir, config="default")
    dt = time.perf_counter() - t0
    n = sum(s.num_examples for s in b.info.splits.values())
    out["synthetic_build_s"] = dt
    out["synthetic_clips"] = n
    out["synthetic_clips_per_s"] = n / dt
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for i in range(folder_clips):
            x = 0.1 * rng.standard_normal((441000, 2)).astype(np.float32)  # 10 s stereo
            soundfile.write(os.path.join(tmp, f"{i:04d}.wav"), x, 44100)
        cfg = data.audio_folder_config("bench", audio_dir=tmp)
        t0 = time.perf_counter()
        data.build("audio_folder", os.path.join(tmp, "tfds"), config=cfg)
        dt = time.perf_counter() - t0
    out["folder_clips_per_s"] = folder_clips / dt
    return out


def read_rate(split, batch_size: int, frames: int, workers: int, batches: int) -> float:
    from dwm_jax import data

    loader = data.train_loader(split, batch_size=batch_size, frames=frames,
                               stats=split.norm_stats(), seed=0, shard_index=0, shard_count=1,
                               worker_count=workers)
    it = iter(loader)
    for _ in range(3):  # start-up (worker spawn) is not throughput
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches / (time.perf_counter() - t0)
    del it
    return rate


def demo_step_rate(steps: int = 20) -> float:
    """Training steps per second of the demo config (configs/demo.py) on this machine."""
    import jax
    from configs import demo
    from dwm_jax import build
    from dwm_jax.train import step as step_lib

    cfg = demo.get_config()
    setup = build.make_setup(cfg, steps_per_epoch=30, total_steps=240)
    state = build.init_state(setup, 0)
    step = jax.jit(lambda s, x: step_lib.train_step(setup, s, x), donate_argnums=0)
    x = jax.random.normal(jax.random.key(0), (cfg.batch_size, *cfg.model.input_shape))
    for _ in range(3):
        state, m = step(state, x)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, x)
    jax.block_until_ready(m)
    return steps / (time.perf_counter() - t0)


def raw_probe(data_dir: str) -> float:
    """eval.py's probe on pooled raw log-mel statistics (mean and std per mel bin)."""
    from dwm_jax import probe

    result = probe.evaluate_task("synthetic_sounds/default", data_dir,
                                 {"raw": (probe.raw_features, None)})
    return result["raw"]["test_accuracy"]


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="", help="default: a temporary directory")
    p.add_argument("--batch", type=int, default=32, help="per-host batch (demo default 32)")
    p.add_argument("--frames", type=int, default=608)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--folder_clips", type=int, default=50)
    p.add_argument("--probe", action="store_true")
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args()

    from dwm_jax import data

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or tmp
        res = build_rates(data_dir, args.folder_clips)
        if res["synthetic_reused"]:
            print(f"build synthetic_sounds/default: reused the one in {data_dir} (not timed)")
        else:
            print(f"build synthetic_sounds/default: {res['synthetic_clips']} clips in "
                  f"{res['synthetic_build_s']:.1f} s = {res['synthetic_clips_per_s']:.1f} "
                  "clips/s")
        print(f"build audio_folder (10 s, 44.1 kHz stereo wav): "
              f"{res['folder_clips_per_s']:.1f} clips/s")
        split = data.open_split(data_dir, "synthetic_sounds/default", "train")
        for workers in (0, 2):
            rate = read_rate(split, args.batch, args.frames, workers, args.batches)
            res[f"read_batches_per_s_workers{workers}"] = rate
            print(f"read train batches of {args.batch} x 80 x {args.frames}, {workers} "
                  f"workers: {rate:.1f} batches/s = {rate * args.batch:.0f} clips/s")
        steps = demo_step_rate()
        res["demo_steps_per_s"] = steps
        frames = 304  # the demo's crop
        rate = read_rate(split, args.batch, frames, 0, args.batches)
        res["read_batches_per_s_demo_crop"] = rate
        print(f"demo training step (configs/demo.py, batch {args.batch}, 80 x {frames}): "
              f"{steps:.2f} steps/s; the pipeline at that crop reads {rate:.1f} batches/s = "
              f"{rate / steps:.0f}x what the step consumes (target >= 5x)")
        if args.probe:
            res["raw_probe_test_accuracy"] = raw_probe(data_dir)
            print(f"linear probe on pooled raw log-mel (mean+std per bin), test accuracy: "
                  f"{res['raw_probe_test_accuracy']:.3f} (chance {1 / split.num_classes:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
