"""Where a training step's time goes: FLOPs from XLA's cost analysis, the peak FLOP/s of
known accelerators, model FLOPs utilisation (MFU), and profiler traces of chosen steps.

    flops = compiled_flops(jitted.lower(*abstract_args).compile())   # per-device program
    mfu(flops, step_seconds, jax.devices()[0])                        # None on CPU

``config.profile_steps='A:B'`` makes the trainer write a JAX profiler trace of steps A..B-1
into ``WORKDIR/profile`` (open with TensorBoard's profile plugin, or Perfetto).
"""

from __future__ import annotations

import queue
import threading
import time

import jax

# Dense bfloat16 peak TFLOP/s per device (vendor figures, no sparsity), by a substring of
# jax's device_kind. MFU is reported only for these; pass your own with --peak_tflops in
# benchmarks/train.py.
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}


def peak_tflops(device=None) -> float:
    """The device's dense bf16 peak in TFLOP/s, or 0.0 when unknown (e.g. a CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), 0.0)


def compiled_cost(compiled) -> dict:
    """XLA's cost analysis of one call of a compiled (per-device) or a lowered program
    (``flops``, ``bytes accessed``, ...); {} when the backend gives none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return {}
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return dict(cost) if cost else {}


def compiled_flops(compiled) -> float:
    """FLOPs of one call of a compiled (per-device) or a lowered program; 0.0 when the
    backend gives none."""
    return float(compiled_cost(compiled).get("flops", 0.0))


def mfu(flops_per_step: float, step_seconds: float, device=None) -> float | None:
    """Achieved / peak FLOP/s of one device, or None when the peak or the FLOPs are unknown."""
    peak = peak_tflops(device)
    if not peak or not flops_per_step or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak * 1e12)


def parse_steps(spec: str) -> tuple[int, int] | None:
    """'A:B' (0 <= A < B) -> (A, B); '' -> None. ValueError otherwise."""
    if not spec:
        return None
    try:
        a, b = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"expected 'A:B' (steps A to B-1); got {spec!r}") from None
    if not 0 <= a < b:
        raise ValueError(f"expected 0 <= A < B; got {spec!r}")
    return a, b


class CompletionClock:
    """Notes when dispatched device work finishes, without blocking the caller: a thread
    waits on each array handed to :meth:`watch` and records ``time.perf_counter()`` when it
    is ready. The loop uses it to tell a wait for input that idled the device (its last step
    had finished) from one that overlapped a running step.
    """

    def __init__(self):
        self._queue: "queue.Queue" = queue.Queue()
        self._done: dict = {}
        self._thread = threading.Thread(target=self._run, name="completion-clock", daemon=True)
        self._thread.start()

    def _run(self):
        while (item := self._queue.get()) is not None:
            key, array = item
            try:
                jax.block_until_ready(array)
            except Exception:  # noqa: BLE001 - the loop sees the error where it fetches
                pass
            self._done[key] = time.perf_counter()

    def watch(self, key, array):
        self._queue.put((key, array))

    def finished_at(self, key) -> float | None:
        """When the array watched under ``key`` became ready (None: not yet, or not seen)."""
        return self._done.pop(key, None)

    def idle_during(self, key, start: float, end: float) -> float:
        """Seconds of [start, end] after the work watched under ``key`` had finished: the
        device's idle time in a wait, if that was its last work (0 if still running)."""
        done = self.finished_at(key)
        return max(0.0, end - max(start, done)) if done is not None else 0.0

    def close(self):
        self._queue.put(None)
        self._thread.join(timeout=10)


class StepTracer:
    """A JAX profiler trace of steps A..B-1 (``config.profile_steps='A:B'``) into
    ``logdir``: :meth:`before` each step starts it, :meth:`after` each step stops it."""

    def __init__(self, spec: str, logdir: str, enabled: bool = True):
        self.steps = parse_steps(spec) if enabled else None
        self.logdir, self.tracing = logdir, False

    def before(self, step: int):
        if self.steps and step == self.steps[0]:
            jax.profiler.start_trace(self.logdir)
            self.tracing = True

    def after(self, step: int, state):
        if self.tracing and step == self.steps[1]:
            jax.block_until_ready(state)
            self.close()

    def close(self):
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
