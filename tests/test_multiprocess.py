"""Two real JAX processes (one per simulated host, gloo collectives on CPU) running
train.py: per-host input feeding a global batch, collective Orbax checkpoints, no host sync
on every step, a SIGTERM that reaches one host only (both stop at the step the distributed
runtime agrees on), and an exact resume."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from tests.helpers import read_metrics, read_params
import pytest

pytestmark = pytest.mark.slow  # subprocesses, builds or training runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(data_dir, workdir, port, log_every=1):
    """Starts process 0 and 1 of a two-host run; returns the Popen objects."""
    procs = []
    for pid in (0, 1):
        cmd = [sys.executable, "train.py", "--config=configs/demo.py:dispersion",
               f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
               "--config.data.name=synthetic_sounds/small", "--config.data.worker_count=0",
               "--config.model.size=micro", "--config.model.input_shape=(80, 64)",
               "--config.batch_size=8", f"--config.total_steps={STEPS}",
               "--config.ckpt_every=10", f"--config.log_every={log_every}",
               "--config.probe.enabled=False", f"--coordinator_address=localhost:{port}",
               "--num_processes=2", f"--process_id={pid}"]
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs, timeout=240):
    """Waits for both processes (a host left waiting on a collective fails by timeout)."""
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"process exited {p.returncode}:\n{err[-3000:]}"
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def _steps_logged(workdir) -> int:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def test_two_processes_sigterm_on_one_host_then_exact_resume(synthetic_small, tmp_path):
    data_dir = synthetic_small[0]
    ref, cut = tmp_path / "ref", tmp_path / "cut"

    outs = _finish(_launch(data_dir, ref, _free_port(), log_every=5))
    assert all(f"(step {STEPS})" in o for o in outs)
    by_step = read_metrics(ref)
    assert sorted(by_step) == list(range(5, STEPS + 1, 5))
    assert _steps_logged(ref) == STEPS // 5  # each row once: process 0 is the only writer
    assert sorted(os.listdir(ref / "checkpoints")) == ["10", "20", "30"]
    # no per-step host sync: between saves the host's own time per step (dispatch and
    # bookkeeping) is a fraction of the step's wall time: it runs ahead of the device
    for s in (15, 25):
        assert by_step[s]["host_ms"] < 0.5 * by_step[s]["step_ms"], by_step[s]

    procs = _launch(data_dir, cut, _free_port())
    deadline = time.time() + 300
    while _steps_logged(cut) < 4 and time.time() < deadline and procs[1].poll() is None:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # host 1 only: host 0 must stop with it
    outs = _finish(procs)
    stopped = {o.split("preempted: saved step ")[1].split(";")[0] for o in outs
               if "preempted: saved step " in o}
    assert len(stopped) == 1 and len(outs) == 2, outs  # both hosts, the same step
    (stop,) = stopped
    assert 4 <= int(stop) < STEPS and os.path.isdir(cut / "checkpoints" / stop)

    outs = _finish(_launch(data_dir, cut, _free_port()))  # resume on both hosts
    assert all(f"(step {STEPS})" in o for o in outs)
    cut_by_step = read_metrics(cut)
    assert sorted(cut_by_step) == list(range(1, STEPS + 1))
    assert [cut_by_step[s]["loss"] for s in by_step] == [by_step[s]["loss"] for s in by_step]
    for a, b in zip(jax.tree.leaves(read_params(ref)), jax.tree.leaves(read_params(cut)), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise
