"""The loop and its CLI: non-finite training stops naming the step, input waits and the
completion clock, profiler traces and FLOPs, impossible configs, train.py end to end, a full
disk."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwm_jax import checkpointing, sharding, weights
from dwm_jax import train as train_lib
from dwm_jax.train import run_io
from tests.helpers import micro_config, read_metrics, read_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
