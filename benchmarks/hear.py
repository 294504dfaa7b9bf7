"""The HEAR API on long clips: wall time and peak memory of timestamp embeddings.

  python -m benchmarks.hear [--size tiny] [--minutes 20] [--frames 304]

Builds an encoder of the given size at its random initialisation (the demo's ViT-tiny on
80 x 304 crops by default; the time does not depend on the weights), wraps it as
``dwm_jax.hear`` does and embeds one clip of white noise of ``--minutes`` minutes, then a
batch of four 2.74 s clips. Prints the embeddings' shapes, the wall times (the first call
includes compilation) and the process's peak resident memory (ru_maxrss).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from flax import nnx

from dwm_jax import hear
from dwm_jax.embedding import Embedder
from dwm_jax.models import vit
from dwm_jax.normalisation import NormStats


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny")
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--frames", type=int, default=304)
    a = p.parse_args()
    encoder = vit.Encoder(a.size, input_shape=(80, a.frames), rngs=nnx.Rngs(0))
    model = hear.HearModel(Embedder(encoder, NormStats(-7.1, 4.2)))
    rng = np.random.default_rng(0)
    short = torch.from_numpy(rng.uniform(-1, 1, (4, int(2.74 * 16000))).astype(np.float32))
    t0 = time.perf_counter()
    emb, ts = hear.get_timestamp_embeddings(short, model)
    print(f"4 x 2.74 s: {tuple(emb.shape)} in {time.perf_counter() - t0:.1f} s (compiling)")
    clip = torch.from_numpy(
        rng.uniform(-0.1, 0.1, (1, int(a.minutes * 60 * 16000))).astype(np.float32))
    t0 = time.perf_counter()
    emb, ts = hear.get_timestamp_embeddings(clip, model)
    wall = time.perf_counter() - t0
    print(f"{a.minutes:g} min: {tuple(emb.shape)} timestamps {float(ts[0, 0]):.0f} .. "
          f"{float(ts[0, -1]):.0f} ms every {model.hop_ms:g} ms in {wall:.1f} s")
    t0 = time.perf_counter()
    scene = hear.get_scene_embeddings(clip, model)
    print(f"{a.minutes:g} min scene embedding: {tuple(scene.shape)} in "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"
          " MiB")


if __name__ == "__main__":
    main()
