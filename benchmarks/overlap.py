"""Does input overlap with compute? The loop's time per step with a slowed loader.

  python -m benchmarks.overlap [--data_dir data] [--steps 40]

Runs the training loop (the demo's model and data) three times per prefetch setting: as it
is, and with the input path slowed by a sleep about as long as one step (and twice as long). Without overlap the
time per step is the step plus the delay; with it, close to the larger of the two. Prints
``step_ms``, ``input_wait_ms`` (waits that may have idled the device) and ``host_wait_ms``
(all the loop's waits for input) from metrics.jsonl (the mean over the logged intervals
after the first, which includes compilation).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cfg, delay_s: float) -> tuple[float, float]:
    from dwm_jax import sharding, train

    original = sharding.global_batch_array

    def slowed(local, mesh):
        time.sleep(delay_s)
        return original(local, mesh)

    sharding.global_batch_array = slowed
    workdir = tempfile.mkdtemp()
    try:
        train.train(cfg, workdir, progress=False)
        rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    finally:
        sharding.global_batch_array = original
        shutil.rmtree(workdir)
    rows = rows[1:]  # the first interval holds the compilation
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return mean("step_ms"), mean("input_wait_ms"), mean("host_wait_ms")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_dir", default="data")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prefetch", type=int, nargs="+", default=[0, 2],
                    help="config.data.prefetch values to compare (0: read on demand)")
    a = ap.parse_args()
    from configs import demo

    cfg = demo.get_config()
    cfg.data.data_dir = a.data_dir
    cfg.total_steps = a.steps
    cfg.log_every = 10
    cfg.ckpt_every = 10 * a.steps
    for prefetch in a.prefetch:
        cfg.data.prefetch = prefetch
        base, wait, host = run(cfg, 0.0)
        print(f"prefetch {prefetch}, no delay: step {base:.1f} ms, input wait {wait:.1f} ms "
              f"per step ({100 * wait / base:.1f} % of the step; host wait {host:.1f} ms)")
        for factor in (1.0, 2.0):
            delay = factor * base / 1e3
            step, wait, host = run(cfg, delay)
            print(f"prefetch {prefetch}, input slowed by {delay * 1e3:.0f} ms: step "
                  f"{step:.1f} ms (sum would be {base + delay * 1e3:.0f}, max "
                  f"{max(base, delay * 1e3):.0f}), input wait {wait:.1f} ms, host wait "
                  f"{host:.1f} ms")


if __name__ == "__main__":
    main()
