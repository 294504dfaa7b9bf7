"""Parallel dataset builds: clips/s with 1 (in-process) and N Beam workers on the
same folder, and the time and memory of reading each result with the training pipeline.

  python -m benchmarks.parallel_build                      # 240 clips of 10 s, workers 1, 2
  python -m benchmarks.parallel_build --clips 1000 --workers 1,b1,2,4   # b1: Beam, 1 worker

Clips are 10 s, 44.1 kHz stereo WAV files made with numpy (so decoding and resampling are part
of the cost, as for AudioSet's files). Each build starts from nothing in a temporary folder;
reading is one epoch of ``train_loader`` (random 608-frame crops, normalisation, batch 32)
in a child process, whose peak resident memory is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import soundfile

READ_SCRIPT = """
import json, sys, time
from dwm_jax import data
split = data.open_split(sys.argv[1], "audio_folder/bench", "train")
loader = data.train_loader(split, batch_size=32, frames=608, stats=split.norm_stats(), seed=0,
                           num_epochs=1)
t0 = time.perf_counter(); batches = 0
for batch in loader:
    batches += 1
dt = time.perf_counter() - t0
# VmHWM, not ru_maxrss: the latter starts at the parent's resident size when forked
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"batches": batches, "read_s": dt, "peak_rss_mb": int(hwm) / 1024}))
"""


def make_folder(path: str, clips: int):
    rng = np.random.default_rng(0)
    rate, n = 44100, 441000
    t = np.arange(n) / rate
    for i in range(clips):
        x = 0.2 * np.sin(2 * np.pi * rng.uniform(80, 6000) * t)[:, None] + \
            0.05 * rng.standard_normal((n, 2))
        soundfile.write(os.path.join(path, f"{i:05d}.wav"), x.astype(np.float32), rate)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=240)
    p.add_argument("--workers", default="1,2",
                   help="worker counts; 'b1' is one worker through Beam (its overhead)")
    args = p.parse_args()
    from dwm_jax import data

    with tempfile.TemporaryDirectory() as tmp:
        audio_dir = os.path.join(tmp, "audio")
        os.makedirs(audio_dir)
        make_folder(audio_dir, args.clips)
        print(f"{args.clips} clips of 10 s, 44.1 kHz stereo; {os.cpu_count()} CPU cores")
        print("| workers | build s | clips/s | shards | epoch read s | reader peak RSS MB |")
        print("|---:|---:|---:|---:|---:|---:|")
        stats = {}
        for name in args.workers.split(","):
            workers = int(name.lstrip("b"))
            # one worker through Beam: any beam option makes the build go through Beam
            beam = "--direct_running_mode=multi_processing" if name.startswith("b") else ""
            data_dir = os.path.join(tmp, f"data{name}")
            cfg = data.audio_folder_config("bench", audio_dir=audio_dir)
            t0 = time.perf_counter()
            b = data.build("audio_folder", data_dir, config=cfg, workers=workers,
                           beam_options=beam)
            build_s = time.perf_counter() - t0
            stats[name] = b.info.metadata["stats"]["train"]
            shards = len(b.info.splits["train"].shard_lengths)
            out = subprocess.run([sys.executable, "-c", READ_SCRIPT, data_dir],
                                 capture_output=True, text=True, check=True)
            read = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {name} | {build_s:.1f} | {args.clips / build_s:.1f} | {shards} | "
                  f"{read['read_s']:.1f} | {read['peak_rss_mb']:.0f} |", flush=True)
        same = all(s == next(iter(stats.values())) for s in stats.values())
        print(f"statistics identical across worker counts: {same}")


if __name__ == "__main__":
    main()
