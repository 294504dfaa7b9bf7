"""The masking study: pretrain the same small model with each strategy, probe each, one table.

  python -m dwm_jax.study --outdir docs/study                    # 5 strategies x 3 seeds
  make study     # the same on the transfer recipe and the cross-domain suite:
  python -m dwm_jax.study --config configs/transfer.py --tasks suite \
      --outdir docs/study_transfer
  python -m dwm_jax.study --outdir /tmp/s --strategies random,dispersion --seeds 0 \
      --total_steps 3 --size micro --dataset synthetic_sounds/small     # a smoke run

Every run starts from ``--config`` (default configs/demo.py: ViT-tiny MSM-MAE, 80 x 304,
batch 32, 8 epochs on synthetic_sounds/default; its ``get_config(masker)`` is called) with
only the masking strategy and the seed changed; the seed sets the initialisation, the data
order and the masks. An interrupted study resumes: finished runs are kept in results.json and
a run in progress resumes from its last checkpoint. Strategies (``arms.py``): by default
random, inverse_block, dispersion (DWM with the hint schedule), dispersion_h0 (DWM with
constant hint 0) and sgim (with the same schedule); any registered masker and the hint-0
variant of each masker that takes hints can be named.
Each trained encoder is probed (embedding.Embedder + probe.evaluate_task) on every task, with
the untrained encoder and raw log-mel statistics as baselines. Writes OUTDIR/results.json,
OUTDIR/results.md (strategy x task, mean and std over seeds, step cost) and plots.
``--pool mean,mean_std`` also probes with the encoder's mean and std over time (the raw
baseline's statistics) beside the authors' mean, into OUTDIR/results_mean_std.md; runs
already trained are only probed again. Each score keeps its dataset's fingerprint: a task
rebuilt with other data since (e.g. a new suite version) is probed again, nothing retrained.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import numpy as np

from dwm_jax import config, probe, sed, storage, train
from dwm_jax.embedding import POOLINGS, Embedder
from dwm_jax.study.arms import ARMS, DEFAULT_ARMS, apply_arm
from dwm_jax.suite import tasks as suite


def recipe(path: str):
    """The recipe module of ``--config`` (``configs/transfer.py`` or ``configs.transfer``),
    imported as a module from the repository root (where ``python -m dwm_jax.study``
    runs): its ``get_config(masker)`` gives each run."""
    if path.endswith(".py") and not os.path.isfile(path):
        raise SystemExit(f"study: --config {path}: no such file")
    return importlib.import_module(path.removesuffix(".py").replace("/", "."))


def study_config(strategy: str, seed: int, args):
    cfg = apply_arm(recipe(args.config).get_config(ARMS[strategy].masker), ARMS[strategy])
    cfg.seed = seed
    cfg.probe.enabled = False
    cfg.keep_ckpts = 2                 # the study probes the last one; resuming needs one
    cfg.data.data_dir = args.data_dir
    if args.dataset:
        cfg.data.name = args.dataset
    if args.size:
        cfg.model.size = args.size
    if args.total_steps:
        cfg.total_steps = args.total_steps
    if args.batch:
        cfg.batch_size = args.batch
    if args.total_steps and args.total_steps < 50:  # smoke runs: every step logged
        cfg.log_every = 1
    return cfg


def run_one(strategy: str, seed: int, args) -> dict | None:
    """Trains one run (or resumes it) -> its record: cost and loss curve, no probe yet;
    None when a SIGTERM or Ctrl-C stopped it early (its checkpoint is saved; not probed)."""
    cfg = study_config(strategy, seed, args)
    workdir = run_dir(args.outdir, strategy, seed)
    ckpts = os.path.join(workdir, "checkpoints")
    resumed = os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts))
    t0 = time.perf_counter()
    summary = train.train(cfg, workdir, progress=False)
    if "preempted_at" in summary:
        return None
    train_s = None if resumed else time.perf_counter() - t0  # a resumed run's time is partial
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return dict(strategy=strategy, seed=seed, train_s=train_s,
                examples_per_s=float(np.median([r["examples_per_s"] for r in rows[1:]] or
                                               [rows[0]["examples_per_s"]])),
                step_ms=float(np.median([r["step_ms"] for r in rows[1:] if "step_ms" in r]
                                        or [np.nan])),
                total_steps=int(rows[-1]["step"]), dataset=cfg.data.name,
                mask_ms=float(np.median([r["mask_ms"] for r in rows])),
                loss_curve=[(r["step"], r["loss"]) for r in rows])


def run_dir(outdir: str, strategy: str, seed: int) -> str:
    return os.path.join(outdir, "runs", f"{strategy}_seed{seed}")


def scores_key(pool: str) -> str:
    """Where a run keeps its probe scores: 'tasks' for the authors' mean pooling (the main
    table), 'tasks_<pool>' for another pooling."""
    return "tasks" if pool == "mean" else f"tasks_{pool}"


def probe_run(run: dict, args, tasks, pool: str, baselines) -> dict:
    """{task: {'encoder': score, ['random_init', 'raw_logmel',] 'num_test', 'data'}} of the
    run's last checkpoint, its clip features pooled by ``pool``; the baselines on the tasks
    in ``baselines``; 'data' is the dataset's fingerprint (probe.task_fingerprint)."""
    emb = Embedder.from_workdir(run_dir(args.outdir, run["strategy"], run["seed"]))
    cache = os.path.join(args.outdir, "cache")
    out = {}
    for spec in tasks:
        if sed.is_frame_level(args.data_dir, spec):
            out.update(_probe_frames(emb, run, args, spec, spec in baselines, cache))
            continue
        feats = {"encoder": (emb.featuriser("encoder", pool)[0], None)}
        if spec in baselines:
            cfg = study_config(run["strategy"], run["seed"], args)
            feats["random_init"] = Embedder.random_init(cfg, emb.stats, seed=0).featuriser(
                "random_init", pool)
            feats["raw_logmel"] = (probe.raw_features, "raw_logmel")
        r = probe.evaluate_task(spec, args.data_dir, feats, cache_dir=cache)
        out[r["task"]] = {k: r[k]["test_score"] for k in feats}
        out[r["task"]].update(num_test=r["num_test"], data=r["data"])
    return out


def _probe_frames(emb, run: dict, args, spec: str, with_baselines: bool, cache: str) -> dict:
    """A frame-level task (dwm_jax.sed): the encoder's time steps, pooling aside; scores are
    the segment F1 (``test_score``), with the event F1 beside."""
    feats = {"encoder": (emb.time_features, None, emb.patch_w)}
    if with_baselines:
        cfg = study_config(run["strategy"], run["seed"], args)
        feats["random_init"] = Embedder.random_init(cfg, emb.stats, seed=0).step_featuriser(
            "random_init")
        feats["raw_logmel"] = (lambda lm: sed.raw_step_features(lm, emb.patch_w),
                               f"raw_logmel_steps{emb.patch_w}", emb.patch_w)
    r = sed.evaluate_frame_task(spec, args.data_dir, feats, config.sed_base(), cache_dir=cache)
    scores = {k: r[k]["test_score"] for k in feats}
    scores.update({f"{k}_event_f1": r[k]["event_f1"] for k in feats},
                  num_test=r["num_test"], data=r["data"])
    return {r["task"]: scores}


def _mean_std(values) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}"


def summarise(runs: list[dict], strategies, tasks_order, key: str = "tasks",
              fingerprints: dict | None = None) -> str:
    """Two markdown tables: each strategy's probe score per task and their mean (mean ± std
    over seeds) with its step cost; then each strategy minus random, paired by seed. ``key``:
    the scores of one pooling (``scores_key``); runs without them are left out, and so are,
    with a line naming them, runs with a score on other data than ``fingerprints`` ({task:
    fingerprint}, the tasks as built now); the baselines come from runs on that data."""
    runs, stale = split_current(runs, key, tasks_order, fingerprints)
    if not runs:
        return _left_out(stale)
    columns = _columns(tasks_order)
    clip_tasks = [t for t in tasks_order if suite.short_name(t) not in suite.FRAME_TASKS]
    head = " | ".join(name for name, _, _ in columns)
    lines = [f"| strategy | seeds | {head} | mean | step ms | mask ms |",
             "|---|---:|" + "---:|" * (len(columns) + 3)]
    score = lambda r, t, k="encoder": r[key][t][k]  # noqa: E731
    # the mean is over the clip-level tasks (accuracies and mAPs, not frame-level F1s)
    mean_of = lambda r: np.mean([score(r, t) for t in clip_tasks])  # noqa: E731
    for s in strategies:
        mine = sorted((r for r in runs if r["strategy"] == s), key=lambda r: r["seed"])
        if not mine:
            continue
        cells = [str(len(mine))] + [_mean_std([score(r, t, f"encoder{k}") for r in mine])
                                    for _, t, k in columns]
        cells.append(_mean_std([mean_of(r) for r in mine]))
        cells.append(f"{np.mean([r.get('step_ms', np.nan) for r in mine]):.0f}")
        cells.append(f"{np.mean([r['mask_ms'] for r in mine]):.2f}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    # each task's baselines: from the first run probed with them (on the current data)
    base = {t: next(r[key][t] for r in runs if "random_init" in r[key].get(t, {}))
            for t in tasks_order}
    for name in ("random_init", "raw_logmel"):
        cells = [f"{base[t][name + k]:.3f}" for _, t, k in columns]
        cells.append(f"{np.mean([base[t][name] for t in clip_tasks]):.3f}")
        lines.append(f"| *{name.replace('_', ' ')}* | | " + " | ".join(cells) + " | | |")
    reference = {r["seed"]: r for r in runs if r["strategy"] == "random"}
    diffs = []
    for s in strategies:
        pairs = [(r, reference[r["seed"]]) for r in runs
                 if r["strategy"] == s and s != "random" and r["seed"] in reference]
        if not pairs:
            continue
        cells = [str(len(pairs))]
        cells += [_mean_std([score(r, t, f"encoder{k}") - score(q, t, f"encoder{k}")
                             for r, q in pairs]) for _, t, k in columns]
        cells.append(_mean_std([mean_of(r) - mean_of(q) for r, q in pairs]))
        diffs.append(f"| {s} − random | " + " | ".join(cells) + " |")
    if diffs:
        lines += ["", f"| paired by seed | seeds | {head} | mean |",
                  "|---|---:|" + "---:|" * (len(columns) + 1)] + diffs
    if stale:
        lines += ["", _left_out(stale).rstrip()]
    return "\n".join(lines) + "\n"


def _columns(tasks_order) -> list[tuple[str, str, str]]:
    """(header, task, score suffix) of the table: a clip-level task's score; a frame-level
    task's segment F1 and event F1 (where in time)."""
    out = []
    for t in tasks_order:
        name = suite.short_name(t)
        if name in suite.FRAME_TASKS:
            out += [(f"{name}: segment F1", t, ""), (f"{name}: event F1", t, "_event_f1")]
        else:
            out.append((name, t, ""))
    return out


def split_current(runs, key, tasks_order, fingerprints=None):
    """(runs with ``key`` scores on every task of ``tasks_order`` as built now, i.e. with the
    data fingerprint in ``fingerprints``, the other runs with ``key`` scores)."""
    runs = [r for r in runs if key in r]
    if not fingerprints:
        return runs, []
    current = lambda r: all(  # noqa: E731
        r[key].get(t, {}).get("data") == fingerprints.get(t) for t in tasks_order)
    return [r for r in runs if current(r)], [r for r in runs if not current(r)]


def _left_out(stale) -> str:
    return ("Left out, not probed on every task as built now (probe them with --strategies "
            "and --seeds): " + ", ".join(f"{r['strategy']} seed {r['seed']}" for r in stale)
            + ".\n")


def plots(runs, strategies, tasks_order, outdir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if "tasks" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    present = [s for s in strategies if any(r["strategy"] == s for r in runs)]
    width = 0.8 / max(len(tasks_order), 1)
    for j, t in enumerate(tasks_order):
        means = [np.mean([r["tasks"][t]["encoder"] for r in runs if r["strategy"] == s])
                 for s in present]
        errs = [np.std([r["tasks"][t]["encoder"] for r in runs if r["strategy"] == s])
                for s in present]
        axes[0].bar(np.arange(len(present)) + j * width, means, width, yerr=errs, label=t)
    axes[0].set_xticks(np.arange(len(present)))
    axes[0].set_xticklabels(present, rotation=30)
    axes[0].set_ylabel("probe test accuracy")
    axes[0].legend(fontsize=7)
    axes[1].bar(present, [np.mean([r["examples_per_s"] for r in runs if r["strategy"] == s])
                          for s in present])
    axes[1].set_ylabel("training examples / s")
    axes[1].tick_params(axis="x", rotation=30)
    for s in present:
        r = next(r for r in runs if r["strategy"] == s)
        steps, losses = zip(*r["loss_curve"])
        axes[2].plot(steps, losses, label=f"{s} (seed {r['seed']})")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("training loss")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, "study.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", required=True)
    p.add_argument("--strategies", default=",".join(DEFAULT_ARMS),
                   help=f"comma-separated arms: {', '.join(ARMS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--config", default="configs/demo.py",
                   help="a configs/*.py file whose get_config(masker) gives each run")
    p.add_argument("--tasks", default="", help="comma-separated tasks; 'suite' = the six "
                   "cross-domain suite tasks (make suite); default: the training dataset")
    p.add_argument("--data_dir", default="data")
    p.add_argument("--dataset", default="", help="pretraining dataset (default: the config's)")
    p.add_argument("--size", default="")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--total_steps", type=int, default=0)
    p.add_argument("--pool", default="mean", help="comma-separated poolings of the encoder's "
                   "clip features: mean (the authors'; results.md), mean_std (mean and std over "
                   "time; results_mean_std.md); finished runs are only probed again")
    args = p.parse_args(argv)
    args.pool = args.pool.split(",")
    if not args.pool or set(args.pool) - set(POOLINGS):
        p.error(f"--pool {','.join(args.pool)}: choose from {POOLINGS}")
    args.strategies = args.strategies.split(",")
    unknown = set(args.strategies) - set(ARMS)
    if unknown:
        p.error(f"unknown strategies {sorted(unknown)}; choose from {list(ARMS)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    try:
        storage.local_only(args.outdir, "--outdir")
    except storage.StorageError as e:
        p.error(str(e))
    tasks = suite.task_specs(args.tasks)
    tasks = tasks or [study_config(args.strategies[0], 0, args).data.name]
    names, fingerprints = {}, {}
    for t in tasks:
        names[t], fingerprints[t] = probe.task_fingerprint(t, args.data_dir)
    os.makedirs(args.outdir, exist_ok=True)
    path = os.path.join(args.outdir, "results.json")
    runs = json.load(open(path))["runs"] if os.path.exists(path) else []
    by_run = {(r["strategy"], r["seed"]): r for r in runs}
    for seed in args.seeds:
        for strategy in args.strategies:
            r = by_run.get((strategy, seed))
            if r is None:
                try:
                    r = run_one(strategy, seed, args)
                except train.USER_ERRORS as e:  # e.g. a run dir left by another config
                    # of this strategy: one line naming it, exit 2
                    print(f"study: {strategy} seed {seed}: {e}", file=sys.stderr)
                    sys.exit(2)
                if r is None:  # stopped by a signal: a partial run is never probed
                    print(f"study: {strategy} seed {seed}: stopped; its checkpoint is saved, "
                          "rerun the same command to resume", file=sys.stderr)
                    return runs
                runs.append(r)
                by_run[(strategy, seed)] = r
            for pool in args.pool:
                key = scores_key(pool)
                # tasks never probed, or rebuilt with other data since: probed (again)
                stale = [t for t in tasks if r.get(key, {}).get(names[t], {}).get("data")
                         != fingerprints[t]]
                if not stale:
                    continue
                baselines = [t for t in stale if not any(
                    "random_init" in q.get(key, {}).get(names[t], {}) and
                    q[key][names[t]].get("data") == fingerprints[t] for q in runs)]
                r.setdefault(key, {}).update(probe_run(r, args, stale, pool, baselines))
                with open(path, "w") as f:  # after every probe: an interrupted study resumes
                    json.dump(dict(runs=runs), f, indent=1)
                print(f"{strategy} seed {seed} ({pool}): " + ", ".join(
                    f"{suite.short_name(names[t])} {r[key][names[t]]['encoder']:.3f}"
                    for t in stale) +
                    (f" ({r['train_s']:.0f} s)" if r.get("train_s") else ""), flush=True)
    present = [s for s in ARMS if any(r["strategy"] == s for r in runs)]
    for pool in args.pool:
        key = scores_key(pool)
        tasks_order = [names[t] for t in tasks]
        now = {names[t]: fingerprints[t] for t in tasks}
        table = summarise(runs, present, tasks_order, key, now)
        name = "results.md" if pool == "mean" else f"results_{pool}.md"
        with open(os.path.join(args.outdir, name), "w") as f:
            f.write(table)
        current = split_current(runs, key, tasks_order, now)[0]
        if pool == "mean" and current:
            plots(current, present, tasks_order, args.outdir)
        print(table)
    return runs


if __name__ == "__main__":
    main()
