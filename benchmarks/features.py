"""Feature extraction for the probes: clips per second, one clip per encoder call against
clips batched together (``Embedder.time_features_batch``, the probes' path).

  python -m benchmarks.features [--clips 1000] [--seconds 5,10] [--size tiny] [--devices N]

Builds the demo's encoder (ViT-tiny on 80 x 304 crops) at its random initialisation (the
time does not depend on the weights) and embeds ``--clips`` random log-mels of 5 to 10 s
(100 frames a second), then the built demo dataset's test split when it is there
(``data/synthetic_sounds/default``). Each path runs once to compile (not timed) and once
timed; the largest difference between the two paths' features is printed. First, the
encoder's own rate: windows per second in calls of 1, 4 and 32 windows.
``--devices N`` simulates N CPU devices (the batches are split over them).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main():
    os.environ.setdefault("TQDM_DISABLE", "1")   # progress bars would bury the figures
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=1000)
    p.add_argument("--seconds", default="5,10")
    p.add_argument("--size", default="tiny")
    p.add_argument("--devices", type=int, default=1)
    a = p.parse_args()
    if a.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={a.devices}")
    import jax
    import numpy as np
    from flax import nnx

    from dwm_jax import probe
    from dwm_jax.embedding import Embedder
    from dwm_jax.models import vit
    from dwm_jax.normalisation import NormStats

    encoder = vit.Encoder(a.size, input_shape=(80, 304), rngs=nnx.Rngs(0))
    emb = Embedder(encoder, NormStats(-7.1, 4.2))
    featurise, _ = emb.featuriser("encoder")
    one_by_one = featurise.one   # no ``batch``: one clip per call, as the probes did
    lo, hi = (float(s) for s in a.seconds.split(","))
    rng = np.random.default_rng(0)
    clips = [rng.normal(-7, 4, (80, int(rng.uniform(lo, hi) * 100))).astype(np.float32)
             for _ in range(a.clips)]
    sets = [(f"{a.clips} clips of {lo:g}-{hi:g} s", clips)]
    demo = os.path.join("data", "synthetic_sounds", "default")
    if os.path.isdir(demo):
        from dwm_jax import data
        split = data.open_split("data", "synthetic_sounds/default", "test")
        sets.append((f"synthetic_sounds test ({len(split)} clips)",
                     [split.source[i]["log_mel"] for i in range(len(split))]))
    print(f"{jax.local_device_count()} device(s), ViT-{a.size}, 80 x 304 windows")
    for n in (1, 4, 32):   # one clip of n whole windows: one encoder call of n windows
        clip = rng.normal(-7, 4, (80, 304 * n)).astype(np.float32)
        emb.time_features(clip)
        t0, calls = time.perf_counter(), max(1, 64 // n)
        for _ in range(calls):
            emb.time_features(clip)
        print(f"one call of {n} window(s): {n * calls / (time.perf_counter() - t0):.0f} "
              "windows/s")
    for name, log_mels in sets:
        rates, feats = {}, {}
        for path, f in (("one clip a call", one_by_one), ("batched", featurise)):
            probe.featurise_all(len(log_mels), log_mels.__getitem__, f, "warm-up")
            t0 = time.perf_counter()
            feats[path] = np.stack(probe.featurise_all(len(log_mels), log_mels.__getitem__,
                                                       f, path))
            rates[path] = len(log_mels) / (time.perf_counter() - t0)
        diff = float(np.abs(feats["batched"] - feats["one clip a call"]).max())
        print(f"{name}: one clip a call {rates['one clip a call']:.1f} clips/s, batched "
              f"{rates['batched']:.1f} clips/s ({rates['batched'] / rates['one clip a call']:.1f}"
              f"x); largest feature difference {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
