"""The trainer: overfitting, 1 vs 8 devices, exact resume after SIGKILL, SIGTERM, NaN stops,
checkpoints of another model, the CLI end to end."""

import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwm_jax import checkpointing, sharding
from dwm_jax import build, weights
from dwm_jax import config as config_lib
from dwm_jax import train as train_lib
from dwm_jax.train import run_io
from dwm_jax.train import step as step_lib
from tests.helpers import (damage_largest_state_file, micro_config,
                           read_metrics, read_params)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_overfit_a_handful_of_clips(synthetic_small):
    """MSM-MAE on 8 fixed clips with a fixed (deterministic DWM) mask: the micro model
    memorises them and the reconstruction loss falls by more than 5x in 500 steps (measured:
    about 1.13 -> 0.16)."""
    cfg = micro_config(synthetic_small[0], "msm_mae", "dispersion",
                       **{"masking.hint.mode": "none", "masking.options.deterministic": True})
    cfg.model.decoder = dict(dim=64, depth=2, heads=2)
    cfg.optim.update(base_lr=3e-3 * 256 / 8, warmup_epochs=0, weight_decay=0.0)  # peak 3e-3
    setup = build.make_setup(cfg, steps_per_epoch=1, total_steps=500)
    state = build.init_state(setup, 0)
    step = jax.jit(lambda s, x: step_lib.train_step(setup, s, x))
    from dwm_jax import data
    split = data.open_split(synthetic_small[0], "synthetic_sounds/small", "train")
    x = next(iter(data.eval_loader(split, batch_size=8, frames=64, stats=split.norm_stats())))
    x = jnp.asarray(x["log_mel"])
    losses = []
    for _ in range(500):
        state, m = step(state, x)
        losses.append(float(m["loss"]))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert first / last > 5.0, (first, last)


EQUIVALENCE = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {repo!r})
    import jax, numpy as np
    from dwm_jax import build, sharding
    from dwm_jax.train import step as step_lib
    from tests.helpers import micro_config
    cfg = micro_config({data_dir!r}, {objective!r}, "dispersion")
    setup = build.make_setup(cfg, steps_per_epoch=2, total_steps=10)
    x = np.asarray(jax.random.normal(jax.random.key(3), (8, 80, 64)))
    try:
        sharding.check_batch(12, sharding.make_mesh(8))
        raise SystemExit("batch 12 on 8 devices was accepted")
    except ValueError as e:
        assert "divisible by the device count (8)" in str(e), e
    for name, n, fsdp in [("one", 1, False), ("dp8", 8, False), ("fsdp8", 8, True)]:
        mesh = sharding.make_mesh(n)
        abstract = build.abstract_state(setup, 0)
        sh = sharding.state_shardings(abstract, mesh, fsdp=fsdp, fsdp_min_size=64)
        state = jax.jit(lambda: build.init_state(setup, 0), out_shardings=sh)()
        fn = step_lib.jit_train_step(setup, sh, mesh)
        xs = sharding.global_batch_array(x, mesh)
        for _ in range(2):
            state, m = fn(state, xs)
        leaves = jax.tree.leaves(state["params"])
        if fsdp:
            assert any(len(l.sharding.device_set) == 8 and not l.sharding.is_fully_replicated
                       for l in leaves), "FSDP sharded nothing"
        np.savez(os.path.join({out!r}, name + ".npz"),
                 *[np.asarray(l) for l in leaves], loss=np.asarray(m["loss"]))
    print("ok", jax.device_count())
""")


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["m2d", "msm_mae"])
def test_two_steps_on_8_devices_match_one_device(synthetic_small, tmp_path, objective):
    script = EQUIVALENCE.format(repo=REPO, data_dir=synthetic_small[0], objective=objective,
                                out=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO)
    assert res.returncode == 0 and "ok 8" in res.stdout, res.stderr[-3000:]
    one = np.load(tmp_path / "one.npz")
    for other in ("dp8", "fsdp8"):
        got = np.load(tmp_path / f"{other}.npz")
        assert set(got.files) == set(one.files)
        for k in one.files:
            # Adam divides by sqrt(v): for near-zero gradients, float-rounding differences of
            # the sharded reductions become update differences of up to ~2.5e-6 (measured),
            # against an update size of 3e-5 (lr at step 1); atol 5e-6 bounds that
            np.testing.assert_allclose(got[k], one[k], rtol=1e-5, atol=5e-6,
                                       err_msg=f"{other}: {k}")


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from dwm_jax import data
    from dwm_jax import train as train_lib
    from tests.helpers import micro_config
    cfg = micro_config({data_dir!r})
    calls = [0]
    original = data.DevicePrefetcher.__next__
    def counting(self):  # the signal arrives as the batch of step {at_call} is handed out
        calls[0] += 1
        if calls[0] == {at_call}:
            os.kill(os.getpid(), getattr(signal, {sig!r}))
        return original(self)
    data.DevicePrefetcher.__next__ = counting
    summary = train_lib.train(cfg, {workdir!r}, progress=False)
    print("summary", summary.get("preempted_at"), summary["final_step"])
""")


def _child(synthetic_small, workdir, sig, at_call):
    script = CHILD.format(repo=REPO, data_dir=synthetic_small[0], workdir=str(workdir),
                          sig=sig, at_call=at_call)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO)


@pytest.mark.slow
def test_sigkill_then_resume_is_exact_and_sigterm_saves(synthetic_small, tmp_path):
    ref = tmp_path / "ref"
    train_lib.train(micro_config(synthetic_small[0]), str(ref), progress=False)

    killed = tmp_path / "killed"
    res = _child(synthetic_small, killed, "SIGKILL", at_call=11)  # after checkpoint 8
    assert res.returncode == -9, res.stderr[-2000:]
    ckpt = checkpointing.Checkpointer(str(killed))
    resumed_from = ckpt.latest_step()
    ckpt.close()
    assert resumed_from in (4, 8)  # the async save of step 8 may still be in flight
    logged = [json.loads(line)["step"] for line in open(killed / "metrics.jsonl")]
    assert max(logged) > resumed_from  # the killed run logged steps past its checkpoint
    summary = train_lib.train(micro_config(synthetic_small[0]), str(killed), progress=False)
    assert summary["start_step"] == resumed_from and summary["final_step"] == 12
    logged = [json.loads(line)["step"] for line in open(killed / "metrics.jsonl")]
    assert logged == list(range(1, 13))  # each step once, in order, after the resume

    want, got = read_params(ref), read_params(killed)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)  # bitwise
    m_ref, m_got = read_metrics(ref), read_metrics(killed)
    assert [m_ref[s]["data_crc32"] for s in range(1, 13)] == [
        m_got[s]["data_crc32"] for s in range(1, 13)]  # the same data order
    assert [m_ref[s]["loss"] for s in range(1, 13)] == [m_got[s]["loss"] for s in range(1, 13)]

    termed = tmp_path / "termed"
    res = _child(synthetic_small, termed, "SIGTERM", at_call=6)
    assert res.returncode == 0 and "summary 6 6" in res.stdout, res.stderr[-2000:]
    assert os.path.isdir(termed / "checkpoints" / "6")
    train_lib.train(micro_config(synthetic_small[0]), str(termed), progress=False)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(read_params(termed))):
        np.testing.assert_array_equal(a, b)

    # a first Ctrl-C behaves like SIGTERM: a checkpoint at the step, then a clean stop
    interrupted = tmp_path / "ctrl_c"
    res = _child(synthetic_small, interrupted, "SIGINT", at_call=5)
    assert res.returncode == 0 and "summary 5 5" in res.stdout, res.stderr[-2000:]
    assert os.path.isdir(interrupted / "checkpoints" / "5")


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_small, tmp_path,
                                                                  monkeypatch):
    calls = [0]
    original = sharding.global_batch_array

    def poisoned(local, mesh):
        calls[0] += 1
        if calls[0] == 6:
            local = np.full_like(local, np.nan)
        return original(local, mesh)

    monkeypatch.setattr(sharding, "global_batch_array", poisoned)
    with pytest.raises(train_lib.NonFiniteError, match=r"step 6: loss=nan.*last good checkpoint "
                                                     r"is step 4"):
        train_lib.train(micro_config(synthetic_small[0]), str(tmp_path), progress=False)
    params = read_params(str(tmp_path))
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


@pytest.mark.slow
def test_non_finite_check_between_log_steps_names_the_first_bad_step(synthetic_small,
                                                                     tmp_path, monkeypatch):
    """Metrics reach the host only at log steps and before saves: a NaN at step 6 with logs
    every 5 and saves every 4 is caught before step 8 is saved, naming step 6."""
    calls = [0]
    original = sharding.global_batch_array

    def poisoned(local, mesh):
        calls[0] += 1
        return original(np.full_like(local, np.nan) if calls[0] == 6 else local, mesh)

    monkeypatch.setattr(sharding, "global_batch_array", poisoned)
    cfg = micro_config(synthetic_small[0], log_every=5)
    with pytest.raises(train_lib.NonFiniteError, match=r"step 6: loss=nan.*last good checkpoint "
                                                     r"is step 4"):
        train_lib.train(cfg, str(tmp_path), progress=False)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [5]
    assert 0 <= rows[0]["input_wait_ms"] <= rows[0]["host_wait_ms"] < rows[0]["step_ms"]
    assert rows[0]["examples_per_s"] > 0


@pytest.mark.slow
def test_a_loader_slower_than_the_step_shows_as_input_wait(synthetic_small, tmp_path,
                                                            monkeypatch):
    """With each batch taking 0.4 s to arrive and a micro step of a few ms, the device idles
    for want of input: input_wait_ms counts those waits (not only the host's)."""
    original = sharding.global_batch_array

    def slowed(local, mesh):
        time.sleep(0.4)
        return original(local, mesh)

    monkeypatch.setattr(sharding, "global_batch_array", slowed)
    # no save inside the last interval (a save lets the prefetch thread get ahead)
    cfg = micro_config(synthetic_small[0], log_every=4, total_steps=12, ckpt_every=100)
    train_lib.train(cfg, str(tmp_path), progress=False)
    last = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][-1]
    assert last["step"] == 12
    assert 250 < last["input_wait_ms"] <= last["host_wait_ms"] <= last["step_ms"]


@pytest.mark.slow
def test_resume_with_another_number_of_hosts_is_refused_and_says_what_to_do(synthetic_small,
                                                                           tmp_path):
    """A checkpoint written by 2 processes (its meta says so) is not resumed by 1: the data
    iterator state is per host. It is refused with the way out, and left where it is."""
    train_lib.train(micro_config(synthetic_small[0], total_steps=4), str(tmp_path),
                  progress=False)
    path = tmp_path / "checkpoints" / "4" / "meta" / "metadata"
    meta = json.load(open(path))
    assert meta["processes"] == 1
    meta["processes"] = 2
    json.dump(meta, open(path, "w"))
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=r"written by 2 process\(es\) and this run has 1.*init_from="):
        train_lib.train(micro_config(synthetic_small[0], total_steps=8), str(tmp_path),
                      progress=False)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]  # not moved aside


@pytest.mark.slow
def test_checkpoints_from_before_new_config_fields_still_resume(synthetic_small, tmp_path):
    """A checkpoint whose config predates fields added since (those with a legacy value in
    the config schema) resumes under those values, which behave as runs did before them."""
    import shutil
    train_lib.train(micro_config(synthetic_small[0], total_steps=8), str(tmp_path),
                  progress=False)
    shutil.rmtree(tmp_path / "checkpoints" / "8")
    path = tmp_path / "checkpoints" / "4" / "meta" / "metadata"
    meta = json.load(open(path))
    for field in [f.path for f in config_lib.FIELDS if f.has_legacy]:
        node = meta["config"]
        *parents, last = field.split(".")
        for p in parents:
            node = node[p]
        del node[last]
    json.dump(meta, open(path, "w"))
    summary = train_lib.train(micro_config(synthetic_small[0], total_steps=8), str(tmp_path),
                            progress=False)
    assert summary["start_step"] == 4 and summary["final_step"] == 8
    assert not os.path.exists(tmp_path / "config_changes.jsonl")


@pytest.mark.slow
def test_scanned_layers_train_like_per_layer_and_count_every_layer(synthetic_small, tmp_path):
    """config.model.scan_layers: the same losses step by step as the per-layer run, the FLOPs
    of every layer (XLA's cost analysis sees a loop body once), and a resume that flips the
    switch is refused naming it (the checkpoint's layout differs)."""
    runs = {}
    for scan in (False, True):
        cfg = micro_config(synthetic_small[0], total_steps=4, **{"model.scan_layers": scan})
        runs[scan] = train_lib.train(cfg, str(tmp_path / str(scan)), progress=False)
        runs[scan]["losses"] = [json.loads(line)["loss"]
                                for line in open(tmp_path / str(scan) / "metrics.jsonl")]
    np.testing.assert_allclose(runs[True]["losses"], runs[False]["losses"], rtol=1e-4)
    # the per-layer program's count before XLA's simplifications: 5 % over the compiled
    # count at this micro size, 0.4 % at ViT-B (benchmarks/train.py)
    assert runs[True]["flops_per_step"] == pytest.approx(runs[False]["flops_per_step"], rel=0.08)
    cfg = micro_config(synthetic_small[0], total_steps=6, **{"model.scan_layers": False})
    with pytest.raises(checkpointing.CheckpointMismatchError, match="model.scan_layers"):
        train_lib.train(cfg, str(tmp_path / "True"), progress=False)


def test_completion_clock_times_the_end_of_device_work():
    """The clock's thread notes when a dispatched computation finishes; a wait counts as
    idle only after that moment, and not at all while the work is unfinished or unseen."""
    from dwm_jax import profiling
    clock = profiling.CompletionClock()
    try:
        x = jnp.ones((600, 600))
        t0 = time.perf_counter()
        y = jax.jit(lambda a: jnp.linalg.matrix_power(a / 600, 40))(x)
        clock.watch(1, y)
        jax.block_until_ready(y)
        t1 = time.perf_counter()
        for _ in range(100):                       # the thread records it shortly after
            done = clock.finished_at(1)
            if done is not None:
                break
            time.sleep(0.01)
        assert done is not None and t0 <= done <= t1 + 1.0
        clock.watch(2, y)
        time.sleep(0.2)
        now = time.perf_counter()
        assert 0.19 <= clock.idle_during(2, now - 0.3, now) <= 0.3   # idle since it was done
        assert clock.idle_during(3, now - 0.3, now) == 0.0           # never watched
    finally:
        clock.close()


@pytest.mark.slow
def test_profile_trace_and_step_flops(synthetic_small, tmp_path):
    """profile_steps='1:3' leaves a profiler trace in the workdir; every log row carries the
    compiled step's FLOPs; MFU is left out on a CPU (no known peak)."""
    cfg = micro_config(synthetic_small[0], total_steps=4, profile_steps="1:3")
    summary = train_lib.train(cfg, str(tmp_path), progress=False)
    traces = [f for _, _, fs in os.walk(tmp_path / "profile") for f in fs]
    assert any(f.endswith(".xplane.pb") for f in traces), traces
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 4 and all(r["tflops_per_step"] > 0 for r in rows)
    assert summary["flops_per_step"] == pytest.approx(rows[0]["tflops_per_step"] * 1e12)
    assert "mfu" not in rows[0]
    from dwm_jax import profiling

    class H100:
        device_kind, platform = "NVIDIA H100 80GB HBM3", "gpu"
    assert profiling.mfu(989e12 / 4, 0.5, H100()) == pytest.approx(0.5)
    assert profiling.mfu(1e12, 0.5, jax.devices()[0]) is None


@pytest.mark.slow
def test_checkpoint_of_another_model_fails_clearly(synthetic_small, tmp_path):
    train_lib.train(micro_config(synthetic_small[0], total_steps=4), str(tmp_path),
                  progress=False)
    other = micro_config(synthetic_small[0], total_steps=8)
    other.model.decoder = dict(dim=64, depth=1, heads=2)
    with pytest.raises(checkpointing.CheckpointMismatchError, match="config.model"):
        train_lib.train(other, str(tmp_path), progress=False)
    other = micro_config(synthetic_small[0], "msm_mae", total_steps=8)
    with pytest.raises(checkpointing.CheckpointMismatchError, match="config.objective"):
        train_lib.train(other, str(tmp_path), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("masker", ["sgim", "inverse_block", "time_freq", "block"])
def test_the_loop_runs_with_every_strategy(synthetic_small, tmp_path, masker):
    """Two logged steps of the full loop (masking-time logging included) per strategy."""
    cfg = micro_config(synthetic_small[0], "m2d", masker, total_steps=2)
    cfg.model.input_shape = (80, 304)  # a 5 x 19 grid: room for the paper's block settings
    summary = train_lib.train(cfg, str(tmp_path), progress=False)
    assert summary["final_step"] == 2
    assert np.isfinite(summary["last_metrics"]["loss"]) and summary["last_metrics"]["mask_ms"] > 0


def test_impossible_configs_name_the_field(synthetic_small, tmp_path):
    with pytest.raises(ValueError, match="batch_size 1000 is larger"):
        train_lib.train(micro_config(synthetic_small[0], batch_size=1000), str(tmp_path))
    with pytest.raises(ValueError, match="compute_dtype"):
        train_lib.train(micro_config(synthetic_small[0], **{"model.compute_dtype": "fp8"}),
                      str(tmp_path))


@pytest.mark.slow
def test_train_cli_end_to_end_with_probe(synthetic_small, tmp_path):
    workdir = tmp_path / "w"
    cmd = [sys.executable, "train.py", "--config=configs/demo.py:random",
           f"--workdir={workdir}", f"--config.data.data_dir={synthetic_small[0]}",
           "--config.data.name=synthetic_sounds/small", "--config.model.size=micro",
           "--config.model.input_shape=(80, 64)", "--config.batch_size=8",
           "--config.total_steps=3", "--config.log_every=1"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "probe: test accuracy" in res.stdout
    probe = json.load(open(workdir / "probe.json"))
    assert probe["num_test"] == 48 and 0.0 <= probe["test_accuracy"] <= 1.0
    assert json.load(open(workdir / "config.json"))["masking"]["name"] == "random"
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"loss", "lr", "grad_norm", "examples_per_s", "mask_ms"} <= set(rows[0])
    assert os.listdir(workdir / "tensorboard")


def _tiny_folder_dataset(root, data_dir, seed):
    """8 one-second noise clips as audio_folder/tiny under data_dir (content set by seed)."""
    import soundfile

    from dwm_jax import data
    clips = root / f"clips{seed}"
    clips.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(8):
        soundfile.write(str(clips / f"{i}.wav"),
                        (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
    data.build("audio_folder", data_dir, config=data.audio_folder_config(
        "tiny", audio_dir=str(clips)))


@pytest.mark.slow
def test_resume_refuses_another_run_and_records_accepted_changes(synthetic_small, tmp_path):
    """A resumed run with another masker, ratio, batch or dataset would silently become
    another run: refused, naming the field. Logging and checkpoint cadence may change: the
    change is recorded and config.json follows it."""
    workdir = str(tmp_path / "w")
    train_lib.train(micro_config(synthetic_small[0], total_steps=4), workdir, progress=False)
    for overrides, field in [({"masking.name": "random", "masking.hint.mode": "none",
                               "masking.options": {}}, "config.masking.name"),
                             ({"masking.mask_ratio": 0.6}, "config.masking.mask_ratio"),
                             ({"batch_size": 4}, "config.batch_size"),
                             ({"total_steps": 8}, "config.total_steps")]:
        with pytest.raises(checkpointing.CheckpointMismatchError, match=field):
            train_lib.train(micro_config(synthetic_small[0], **{"total_steps": 4, **overrides}),
                          workdir, progress=False)
    summary = train_lib.train(micro_config(synthetic_small[0], total_steps=4, log_every=2,
                                         ckpt_every=2), workdir, progress=False)
    assert summary["start_step"] == 4
    changes = [json.loads(line) for line in open(os.path.join(workdir,
                                                              "config_changes.jsonl"))]
    assert {(c["field"], c["checkpoint"], c["now"]) for c in changes} == {
        ("log_every", 1, 2), ("ckpt_every", 4, 2)}
    assert json.load(open(os.path.join(workdir, "config.json")))["log_every"] == 2

    # the same name and clip count, other audio: refused; the same build moved: accepted
    one, two = str(tmp_path / "d1"), str(tmp_path / "d2")
    _tiny_folder_dataset(tmp_path, one, seed=1)
    _tiny_folder_dataset(tmp_path, two, seed=2)
    run = str(tmp_path / "r")
    kw = {"data.name": "audio_folder/tiny", "total_steps": 2}
    train_lib.train(micro_config(one, **kw), run, progress=False)
    with pytest.raises(checkpointing.CheckpointMismatchError, match="the built dataset"):
        train_lib.train(micro_config(two, **kw), run, progress=False)
    moved = str(tmp_path / "moved")
    os.rename(one, moved)                            # the same build in another place
    assert train_lib.train(micro_config(moved, **kw), run, progress=False)["start_step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["bytes", "missing_file", "silent_value_change"])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact(synthetic_small, tmp_path,
                                                                   damage):
    """Flipped bytes or a lost file in the latest checkpoint: the resume names it, moves it
    aside and continues from the previous one, ending where an undisturbed run ends."""
    import shutil
    cfg = lambda: micro_config(synthetic_small[0], total_steps=8)  # noqa: E731
    ref, hurt = tmp_path / "ref", tmp_path / "hurt"
    train_lib.train(cfg(), str(ref), progress=False)
    shutil.copytree(ref, hurt)
    step8 = hurt / "checkpoints" / "8"
    if damage == "bytes":
        damage_largest_state_file(str(step8))
    elif damage == "missing_file":
        os.remove(os.path.join(step8, "meta", "metadata"))
    else:  # values that read back fine but are not what was saved: only the fingerprint knows
        path = os.path.join(step8, "meta", "metadata")
        meta = json.load(open(path))
        meta["fingerprint"]["opt_state/1/0/mu/encoder/cls_token"] ^= 1
        json.dump(meta, open(path, "w"))
    with open(hurt / "metrics.jsonl") as f:
        assert len(f.readlines()) == 8
    summary = train_lib.train(cfg(), str(hurt), progress=False)
    assert summary["start_step"] == 4 and summary["final_step"] == 8
    assert os.path.isdir(hurt / "checkpoints" / "8.damaged")
    for a, b in zip(jax.tree.leaves(read_params(str(ref))), jax.tree.leaves(read_params(str(hurt)))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_all_checkpoints_damaged_is_a_clear_error(synthetic_small, tmp_path):
    cfg = micro_config(synthetic_small[0], total_steps=4)
    train_lib.train(cfg, str(tmp_path), progress=False)
    damage_largest_state_file(str(tmp_path / "checkpoints" / "4"))
    with pytest.raises(checkpointing.CheckpointDamagedError, match="no intact checkpoint"):
        train_lib.train(cfg, str(tmp_path), progress=False)


@pytest.mark.slow
def test_full_disk_stops_the_run_at_the_failed_save(synthetic_small, tmp_path):
    """A 3 MiB filesystem holds one micro checkpoint, not two: the run stops with one error
    naming the failure (of the save, or of the metrics when they meet the full disk first),
    and the first checkpoint still restores."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({res.stderr.strip()})")
    try:
        workdir = str(mnt / "w")
        cfg = micro_config(synthetic_small[0], total_steps=12)
        # whichever write meets the full disk first, a save or the metrics, stops the run
        with pytest.raises((checkpointing.CheckpointSaveError, train_lib.MetricsWriteError),
                           match="No space left on device|failed") as info:
            train_lib.train(cfg, workdir, progress=False)
        assert "checkpoints before it are intact" in str(info.value)
        ckpt = checkpointing.Checkpointer(workdir)
        assert ckpt.latest_step() == 4
        ckpt.close()
        weights.load_encoder(workdir)  # restores, fingerprint checked
        metrics = read_metrics(workdir)
        assert max(metrics) < 12  # it stopped, it did not train on to the end
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_metrics_that_meet_a_full_disk_stop_the_run_naming_the_file(tmp_path):
    import errno

    class FullFile:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    writers = run_io.MetricsWriter(str(tmp_path), True)
    writers.jsonl.close()
    writers.jsonl = FullFile()
    with pytest.raises(train_lib.MetricsWriteError,
                       match=r"metrics.jsonl: the metrics of step 7 .*No space left"):
        writers.write(7, {"loss": 1.0})
    writers.close()  # quiet: the error that stopped the run was raised already


def test_sgim_skips_its_encoder_pass_while_every_masked_patch_is_a_hint():
    """At r_h = 1 (the schedule's warm-up) the step's SGIM mask is the one the masker gives
    with the features, bit for bit, and the encoder pass is not in that branch; below 1 the
    features are used as before."""
    cfg = micro_config("unused", "m2d", "sgim")
    setup = build.make_setup(cfg, steps_per_epoch=2, total_steps=10)
    params = build.init_state(setup, 0)["params"]
    x = jax.random.normal(jax.random.key(3), (4, 80, 64))
    key = jax.random.key(7)
    from flax import nnx
    encoder = nnx.merge(setup.graphdef, params).encoder
    features = encoder(x)[:, 1:].astype(jnp.float32)
    step_mask = jax.jit(lambda r: step_lib.sample_mask(setup, params, x, key, r))
    direct = jax.jit(lambda r: setup.masker(key, x, hint_ratio=r, features=features))
    for r in (1.0, 0.5, 0.0):
        got, want = step_mask(jnp.float32(r)), direct(jnp.float32(r))
        for field in got._fields:
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field),
                                          err_msg=f"r_h {r}: {field}")
    assert not np.array_equal(direct(jnp.float32(0.0)).mask, direct(jnp.float32(1.0)).mask)
    jaxpr = jax.make_jaxpr(lambda r: step_lib.sample_mask(setup, params, x, key, r))(
        jnp.float32(1.0))
    cond = next(e for e in jaxpr.eqns if e.primitive.name == "cond")
    informed, skipped = (str(b) for b in cond.params["branches"])  # [0]: r_h >= 1 is false
    assert "dot_general" not in skipped and "dot_general" in informed
