"""The study and step-cost scripts at a tiny size, so they cannot rot."""

import json
import os
import subprocess
import sys

from dwm_jax.study import arms
from dwm_jax.study import run as study
import pytest

pytestmark = pytest.mark.slow  # subprocesses, builds or training runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_study_runs_end_to_end_at_a_tiny_size(synthetic_small, tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "dwm_jax.study", f"--outdir={out}",
           "--config=configs/transfer.py", "--strategies=random,dispersion_h0", "--seeds=0,1", "--total_steps=2",
           "--size=micro", "--batch=8", f"--data_dir={synthetic_small[0]}",
           "--dataset=synthetic_sounds/small"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = json.load(open(out / "results.json"))["runs"]
    assert sorted((r["strategy"], r["seed"]) for r in runs) == [
        ("dispersion_h0", 0), ("dispersion_h0", 1), ("random", 0), ("random", 1)]
    table = (out / "results.md").read_text()
    assert "| random | 2 | " in table and "| dispersion_h0 | 2 | " in table
    assert "random init" in table and "| dispersion_h0 − random | 2 | " in table
    assert all(r["dataset"] == "synthetic_sounds/small" and r["total_steps"] == 2 for r in runs)
    assert (out / "study.png").stat().st_size > 10_000
    # the constant-hint variant really trained with r_h = 0
    rows = [json.loads(line) for line in
            open(out / "runs" / "dispersion_h0_seed0" / "metrics.jsonl")]
    assert all(r["hint_ratio"] == 0.0 for r in rows)
    # a rerun resumes: nothing left to train
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and "seed 0 (" not in res.stdout
    # another pooling probes the trained runs again, trains nothing, keeps the first table
    mtimes = {p: p.stat().st_mtime for p in (out / "runs").glob("*/metrics.jsonl")}
    res = subprocess.run(cmd + ["--pool=mean_std"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes
    runs = json.load(open(out / "results.json"))["runs"]
    assert all(r["tasks"] and r["tasks_mean_std"] for r in runs)
    pooled = (out / "results_mean_std.md").read_text()
    assert "| random | 2 | " in pooled and "| dispersion_h0 − random | 2 | " in pooled
    assert (out / "results.md").read_text() == table
    # a task rebuilt with other data since (its fingerprint differs): only its stale scores
    # are probed again, with the baselines on the new data; nothing is trained
    task = next(iter(runs[0]["tasks"]))
    fresh = runs[0]["tasks"][task]["data"]
    stale = next(r for r in runs if r["strategy"] == "dispersion_h0" and r["seed"] == 1)
    stale["tasks"][task]["data"] = "rebuilt"
    json.dump(dict(runs=runs), open(out / "results.json", "w"))
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes
    probed = [l for l in res.stdout.splitlines() if " seed " in l and "(mean)" in l]
    assert probed == [l for l in probed if l.startswith("dispersion_h0 seed 1 (mean)")]
    assert len(probed) == 1
    runs = json.load(open(out / "results.json"))["runs"]
    again = next(r for r in runs if r["strategy"] == "dispersion_h0" and r["seed"] == 1)
    assert again["tasks"][task]["data"] == fresh


def test_train_step_benchmark_prints_every_strategy():
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--objectives=m2d", "--size=micro",
           "--batch=4", "--reps=2", "--strategies=random,sgim"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [l for l in res.stdout.splitlines() if l.startswith("| m2d |")]
    assert [l.split("|")[2].strip() for l in lines] == ["random", "sgim"]
    assert lines[0].rstrip().endswith("| 1.000 |")


def test_study_names_a_missing_config(tmp_path):
    res = subprocess.run([sys.executable, "-m", "dwm_jax.study", f"--outdir={tmp_path}",
                          "--config=configs/nope.py"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode != 0 and "configs/nope.py: no such file" in res.stderr
    res = subprocess.run([sys.executable, "-m", "dwm_jax.study", f"--outdir={tmp_path}",
                          "--pool=mean,max"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and "--pool mean,max: choose from" in res.stderr


def test_learning_curve_probes_every_checkpoint(synthetic_small, tmp_path):
    from dwm_jax import train as train_lib
    from tests.helpers import micro_config

    data_dir = synthetic_small[0]
    workdir = str(tmp_path / "run")
    train_lib.train(micro_config(data_dir, "msm_mae", "random", total_steps=8, keep_ckpts=3),
                  workdir, progress=False)
    cmd = [sys.executable, "-m", "dwm_jax.study.curve", f"--workdir={workdir}",
           "--tasks=synthetic_sounds/small", f"--data_dir={data_dir}"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    curve = json.load(open(os.path.join(workdir, "eval", "learning_curve.json")))
    assert sorted(map(int, curve["steps"])) == [4, 8]
    for scores in (*curve["steps"].values(), curve["random_init"], curve["raw_logmel"]):
        assert 0.0 <= scores["synthetic_sounds/small"] <= 1.0
    md = open(os.path.join(workdir, "eval", "learning_curve.md")).read()
    assert md.count("\n| 4 |") == 1 and "| *raw logmel* |" in md
    # a rerun keeps what it has: no checkpoint is probed again
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and "step 4:" not in res.stdout
    # mean + std pooling: its own curve beside the first
    res = subprocess.run(cmd + ["--pool=mean_std", "--steps=8"], capture_output=True,
                         text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    pooled = json.load(open(os.path.join(workdir, "eval", "learning_curve_mean_std.json")))
    assert list(pooled["steps"]) == ["8"] and "raw_logmel" in pooled
    assert pooled["raw_logmel"] == curve["raw_logmel"]
    # the task rebuilt with other data since: every step is probed on it again
    curve["data"]["synthetic_sounds/small"] = "rebuilt"
    curve["steps"]["4"]["synthetic_sounds/small"] = -1.0
    json.dump(curve, open(os.path.join(workdir, "eval", "learning_curve.json"), "w"))
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and "step 4:" in res.stdout and "step 8:" in res.stdout
    again = json.load(open(os.path.join(workdir, "eval", "learning_curve.json")))
    assert again["steps"]["4"]["synthetic_sounds/small"] >= 0.0
    assert again["data"] != curve["data"]


def test_summary_leaves_out_scores_and_baselines_on_data_rebuilt_since():

    def run(strategy, seed, score, data, baselines=None):
        entry = dict(encoder=score, data=data, num_test=10)
        if baselines:
            entry.update(random_init=baselines[0], raw_logmel=baselines[1])
        return dict(strategy=strategy, seed=seed, step_ms=1.0, mask_ms=0.1,
                    tasks={"t": entry})

    runs = [run("random", 0, 0.9, "old", (0.11, 0.12)),  # probed on the old build
            run("random", 1, 0.5, "new", (0.21, 0.22)),
            run("dispersion", 1, 0.7, "new")]
    table = study.summarise(runs, ["random", "dispersion"], ["t"], "tasks", {"t": "new"})
    assert "| random | 1 | 0.500 ± 0.000 |" in table
    assert "| *random init* | | 0.210 |" in table and "| *raw logmel* | | 0.220 |" in table
    assert "| dispersion − random | 1 | 0.200 ± 0.000 |" in table
    assert table.rstrip().endswith("probe them with --strategies and --seeds): random seed 0.")
    # without fingerprints every run counts, as before
    assert "| random | 2 | 0.700 ± 0.283 |" in study.summarise(
        runs, ["random", "dispersion"], ["t"])
    # nothing on the current data: only the line naming what is left out
    assert study.summarise(runs[:1], ["random"], ["t"], "tasks", {"t": "new"}).startswith(
        "Left out")


def test_each_study_strategy_trains_with_its_hints():
    """DWM and SGIM follow the hint schedule (the paper's SGIM, step 4); the *_h0
    variants hold r_h at 0 with the same masker; random and inverse block take no hints."""
    import argparse
    args = argparse.Namespace(config="configs/transfer_long.py",
                              data_dir="data", dataset="", size="", total_steps=0, batch=0)
    got = {}
    for strategy in ("random", "inverse_block", "dispersion", "dispersion_h0", "sgim",
                     "sgim_h0"):
        cfg = study.study_config(strategy, 0, args)
        got[strategy] = (cfg.masking.name, cfg.masking.hint.mode,
                         cfg.masking.hint.constant if cfg.masking.hint.mode == "constant"
                         else None)
    assert got == {"random": ("random", "none", None),
                   "inverse_block": ("inverse_block", "none", None),
                   "dispersion": ("dispersion", "schedule", None),
                   "dispersion_h0": ("dispersion", "constant", 0.0),
                   "sgim": ("sgim", "schedule", None),
                   "sgim_h0": ("sgim", "constant", 0.0)}
    assert "sgim_h0" not in arms.DEFAULT_ARMS


def test_study_refuses_a_run_dir_left_by_another_config(synthetic_small, tmp_path):
    """A run directory of the same name trained under other settings (here: DWM at hint 0
    where DWM with the schedule is asked for, as SGIM's runs were before it had its schedule)
    is never taken as finished: one line naming the directory and the field, exit 2."""
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "dwm_jax.study", f"--outdir={out}",
           "--config=configs/transfer.py", "--seeds=0", "--total_steps=2", "--size=micro",
           "--batch=8", f"--data_dir={synthetic_small[0]}", "--dataset=synthetic_sounds/small"]
    res = subprocess.run(cmd + ["--strategies=dispersion_h0"], capture_output=True, text=True,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    os.rename(out / "runs" / "dispersion_h0_seed0", out / "runs" / "dispersion_seed0")
    os.remove(out / "results.json")
    res = subprocess.run(cmd + ["--strategies=dispersion"], capture_output=True, text=True,
                         cwd=REPO)
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("study: dispersion seed 0: ") and "Traceback" not in res.stderr
    assert str(out / "runs" / "dispersion_seed0") in last and "masking.hint.mode" in last
    assert not (out / "results.json").exists()


def test_a_study_stopped_by_sigterm_probes_nothing_and_resumes(synthetic_small, tmp_path,
                                                              monkeypatch, capsys):
    """A SIGTERM mid-run (a preempted job, or a session's end) saves the run's checkpoint
    and stops the study: the partial run is neither probed nor written to results.json, and
    the same command resumes it to the full length."""
    import signal

    from dwm_jax import data
    out = tmp_path / "study"
    argv = [f"--outdir={out}", "--config=configs/transfer.py", "--strategies=random",
            "--seeds=0", "--total_steps=4", "--size=micro", "--batch=8",
            f"--data_dir={synthetic_small[0]}", "--dataset=synthetic_sounds/small"]
    calls = [0]
    original = data.DevicePrefetcher.__next__

    def signalling(self):  # SIGTERM as the batch of step 2 is handed out
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(data.DevicePrefetcher, "__next__", signalling)
    assert study.main(argv) == []
    assert "random seed 0: stopped" in capsys.readouterr().err
    assert not (out / "results.json").exists()
    ckpts = out / "runs" / "random_seed0" / "checkpoints"
    saved = sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit())
    assert saved and saved[-1] < 4
    monkeypatch.setattr(data.DevicePrefetcher, "__next__", original)
    runs = study.main(argv)
    assert [(r["strategy"], r["total_steps"]) for r in runs] == [("random", 4)]
    assert runs[0]["train_s"] is None and runs[0]["tasks"]  # resumed: its time is partial
    assert json.load(open(out / "results.json"))["runs"][0]["total_steps"] == 4
