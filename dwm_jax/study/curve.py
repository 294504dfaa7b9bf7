"""Probe accuracy against pretraining steps: every checkpoint of a run, on every task.

  python -m dwm_jax.study.curve --workdir workdirs/transfer --tasks suite
  python -m dwm_jax.study.curve --workdir workdirs/transfer --tasks suite --steps 500,5940
  python -m dwm_jax.study.curve --workdir workdirs/transfer --pool mean_std

Each checkpoint's encoder is probed with eval.py's protocol (embedding.Embedder features,
standardised, softmax regression with early stopping on valid); the untrained encoder and raw
log-mel statistics are the baselines. Features are cached under WORKDIR/eval/cache with the
keys eval.py uses, so a rerun (or a later eval.py) reuses them; a task rebuilt with other
data since (its dataset fingerprint differs) is probed again at every step. Writes
WORKDIR/eval/learning_curve.{json,md,png}; with ``--pool mean_std`` (encoder features: mean
and std over time, as the raw baseline's) WORKDIR/eval/learning_curve_mean_std.*.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from dwm_jax import probe, storage, weights
from dwm_jax.embedding import POOLINGS, Embedder
from dwm_jax.suite import tasks as suite



def checkpoint_steps(workdir: str) -> list[int]:
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        raise SystemExit(f"learning_curve: {folder}: no checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def table(curve: dict, tasks: list[str]) -> str:
    """Markdown: one row per step (and the baselines), one column per task, and the mean."""
    lines = ["| step | " + " | ".join(suite.short_name(t) for t in tasks) + " | mean |",
             "|---:|" + "---:|" * (len(tasks) + 1)]
    rows = [(str(s), curve["steps"][str(s)]) for s in sorted(map(int, curve["steps"]))]
    rows += [(f"*{name.replace('_', ' ')}*", curve[name]) for name in ("random_init",
                                                                       "raw_logmel")]
    for label, scores in rows:
        cells = [scores[t] for t in tasks]
        lines.append(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells)
                     + f" | {np.mean(cells):.3f} |")
    return "\n".join(lines) + "\n"


def plot(curve: dict, tasks: list[str], path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(map(int, curve["steps"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        ax.plot(steps, [curve["steps"][str(s)][t] for s in steps], "o-", label="encoder")
        ax.axhline(curve["raw_logmel"][t], color="k", ls="--", label="raw log-mel")
        ax.axhline(curve["random_init"][t], color="gray", ls=":", label="untrained")
        ax.set_title(suite.short_name(t))
        ax.set_xlabel("pretraining step")
    axes[0][0].set_ylabel("probe test accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--tasks", default="suite", help="comma-separated; 'suite' = the six "
                   "cross-domain suite tasks")
    p.add_argument("--steps", default="", help="comma-separated (default: every checkpoint)")
    p.add_argument("--data_dir", default="data")
    p.add_argument("--pool", default="mean", choices=POOLINGS,
                   help="an encoder's clip feature: the mean of its time steps, or mean and std")
    args = p.parse_args(argv)
    try:
        storage.local_only(args.workdir, "--workdir")
    except storage.StorageError as e:
        p.error(str(e))
    tasks = suite.task_specs(args.tasks)
    steps = ([int(s) for s in args.steps.split(",")] if args.steps
             else checkpoint_steps(args.workdir))
    out_dir = os.path.join(args.workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "learning_curve" + ("" if args.pool == "mean" else
                                                    f"_{args.pool}"))
    path = stem + ".json"
    curve = json.load(open(path)) if os.path.exists(path) else dict(steps={})
    names, fingerprints = {}, {}
    for spec in tasks:
        names[spec], fingerprints[spec] = probe.task_fingerprint(spec, args.data_dir)
    # a task rebuilt with other data since it was probed: its old scores go, probed again
    for spec, name in names.items():
        if curve.get("data", {}).get(name) != fingerprints[spec]:
            for scores in (*curve["steps"].values(), curve.get("random_init", {}),
                           curve.get("raw_logmel", {})):
                scores.pop(name, None)
            curve.setdefault("data", {})[name] = fingerprints[spec]
    cache = os.path.join(out_dir, "cache")
    for step in steps:
        todo = [t for t in tasks if names[t] not in curve["steps"].get(str(step), {})]
        if not todo:
            continue
        t0 = time.perf_counter()
        encoder, stats, config = weights.load_encoder(args.workdir, step)
        emb = Embedder(encoder, stats)
        rnd = None
        for spec in todo:
            featurisers = {"encoder": emb.featuriser("encoder", args.pool)}
            if names[spec] not in curve.get("raw_logmel", {}):  # baselines once per task
                rnd = rnd or Embedder.random_init(config, stats, seed=0)
                featurisers["random_init"] = rnd.featuriser("random_init", args.pool)
                featurisers["raw_logmel"] = (probe.raw_features, "raw_logmel")
            r = probe.evaluate_task(spec, args.data_dir, featurisers, cache_dir=cache)
            curve["steps"].setdefault(str(step), {})[r["task"]] = r["encoder"]["test_score"]
            for name in featurisers.keys() - {"encoder"}:
                curve.setdefault(name, {})[r["task"]] = r[name]["test_score"]
        with open(path, "w") as f:  # after every step: an interrupted curve resumes
            json.dump(curve, f, indent=1)
        print(f"step {step}: " + ", ".join(f"{suite.short_name(names[t])} "
                                           f"{curve['steps'][str(step)][names[t]]:.3f}"
                                           for t in todo)
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    shown = [names[t] for t in tasks]
    # the steps probed on every task asked for (not those of --steps runs on fewer)
    shown_curve = {**curve, "steps": {k: v for k, v in curve["steps"].items()
                                      if all(n in v for n in shown)}}
    md = table(shown_curve, shown)
    with open(stem + ".md", "w") as f:
        f.write(md)
    plot(shown_curve, shown, stem + ".png")
    print(md)


if __name__ == "__main__":
    main()
