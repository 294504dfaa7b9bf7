"""Converting a ViT-B sized checkpoint in the authors' layout: time, peak memory, fidelity.

  python -m benchmarks.convert [--outdir /tmp/convert_bench] [--format npz|pth|both]

Writes a full M2D checkpoint (encoder, predictor 512/8/16, target; random weights, their
names, Conv2d / Linear layouts, sin-cos positions and norm_stats) for 80 x 608 inputs, in a
folder named their way (``m2d_vit_base-80x608p16x16-bench``), as .npz and, where PyTorch is
installed, as their ``{'model', 'args'}`` .pth. Each is converted by the real command in a
child process, whose wall time and peak resident memory (ru_maxrss) are printed. Then the
converted encoder's features of a random 80 x 608 input are compared with a float64 NumPy
forward of the same tensors (dwm_jax.torch_layout.numpy_forward).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def authors_layout_checkpoint() -> dict[str, np.ndarray]:
    """Our ViT-B M2D at its random init, written with their names and layouts."""
    from flax import nnx

    from dwm_jax import objectives, torch_layout
    from dwm_jax.models import vit

    model = objectives.make_objective("m2d", size="base", input_shape=(80, 608),
                                      decoder=objectives.OBJECTIVES["m2d"].default_decoder,
                                      rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    sd = torch_layout.to_torch(params, model.target_init(1), "m2d", (16, 16))
    sd = {k: np.asarray(v) for k, v in sd.items()}
    grid = model.encoder.grid
    for key, dim in (("pos_embed", 768), ("decoder_pos_embed", 512)):
        sd[key] = np.concatenate([np.zeros((1, dim), np.float32),
                                  vit.sincos_2d(dim, grid)])[None]
    sd["norm_stats"] = np.array([-7.1, 4.2], np.float32)
    return sd


def convert_in_child(path: str, workdir: str) -> tuple[float, float, str]:
    """-> (wall seconds, peak RSS MiB, output) of `python -m dwm_jax.convert` in a child."""
    shutil.rmtree(workdir, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "dwm_jax.convert", path, "--workdir", workdir],
                         capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if res.returncode:
        raise SystemExit(f"conversion failed: {res.stderr.strip()}")
    if peak <= before:
        print("(peak RSS below an earlier child's: ru_maxrss is the largest child so far)")
    return wall, peak / 1024, res.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--outdir", default="/tmp/convert_bench")
    ap.add_argument("--format", default="both", choices=["npz", "pth", "both"])
    a = ap.parse_args()
    folder = os.path.join(a.outdir, "m2d_vit_base-80x608p16x16-bench")
    os.makedirs(folder, exist_ok=True)
    sd = authors_layout_checkpoint()
    n = sum(v.size for v in sd.values())
    print(f"checkpoint: {len(sd)} tensors, {n / 1e6:.1f} M values ({n * 4 / 2**20:.0f} MiB)")
    files = []
    if a.format in ("npz", "both"):
        files.append(os.path.join(folder, "checkpoint-300.npz"))
        np.savez(files[-1], **sd)
    if a.format in ("pth", "both"):
        try:
            import torch
        except ImportError:
            print("no PyTorch: the .pth case is skipped")
        else:
            files.append(os.path.join(folder, "checkpoint-300.pth"))
            torch.save(dict(model={k: torch.from_numpy(v) for k, v in sd.items()},
                            args=argparse.Namespace(model="m2d_vit_base"), epoch=300),
                       files[-1])
    for path in files:
        size = os.path.getsize(path) / 2**20
        wall, peak, out = convert_in_child(path, os.path.join(a.outdir, "workdir"))
        print(f"{os.path.basename(path)} ({size:.0f} MiB): converted in {wall:.1f} s "
              f"(child process, imports included), peak RSS {peak:.0f} MiB")
        print("  " + out.strip().replace("\n", "\n  "))

    from dwm_jax import torch_layout
    from dwm_jax.embedding import Embedder

    emb = Embedder.from_workdir(os.path.join(a.outdir, "workdir"))
    x = np.random.default_rng(7).standard_normal((1, 80, 608)).astype(np.float32)
    ours = np.asarray(emb.encoder(x), np.float64)
    theirs = torch_layout.numpy_forward(sd, x, num_heads=12)
    diff = np.abs(ours - theirs).max()
    print(f"features of a random 80 x 608 input vs a float64 NumPy forward of the same "
          f"tensors: max |diff| {diff:.2e} (relative to max |feature| "
          f"{diff / np.abs(theirs).max():.2e})")


if __name__ == "__main__":
    main()
