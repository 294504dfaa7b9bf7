"""Compiling for TPU and GPU targets without them (python -m dwm_jax.compile): topology
names, the report's arithmetic and refusals in-process; real compiles of a small scanned
model for a v5e 2x2 slice and two H100s in the venv that has libtpu and the CUDA plugin
(`make aot`), skipped with one line where it is missing."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from dwm_jax import aot, topologies

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AOT_PYTHON = os.path.join(REPO, ".venv-aot", "bin", "python")
# large enough that activations live in a TPU's HBM (a micro model's fit in on-chip memory)
SMALL = ["--config=configs/m2d.py:dispersion", "--config.model.size=tiny",
         "--config.model.scan_layers=True", "--config.model.input_shape=80,208",
         "--config.model.decoder.dim=32", "--config.model.decoder.depth=1",
         "--config.model.decoder.heads=2"]


@pytest.mark.parametrize("name,generation,grid,devices", [
    ("v5e-256", "v5e", (16, 16), 256), ("v5e:2x2", "v5e", (2, 2), 4),
    ("v5e-8", "v5e", (2, 4), 8), ("v4-32", "v4", (2, 2, 4), 16),
    ("v5p-128", "v5p", (4, 4, 4), 64), ("v6e-64", "v6e", (8, 8), 64),
    ("v4:2x2x1", "v4", (2, 2, 1), 4), ("h100", "h100", (1, 1), 1),
    ("h100:8", "h100", (1, 8), 8), ("h100:16", "h100", (2, 8), 16),
    ("A100:2x4", "a100", (2, 4), 8),
])
def test_topology_names(name, generation, grid, devices):
    target = topologies.parse(name)
    assert (target.generation, target.grid, target.num_devices) == (generation, grid, devices)
    assert topologies.parse(name, num_slices=2).num_devices == 2 * devices


@pytest.mark.parametrize("name,message", [
    ("v7x-8", "is not one this package knows"), ("v4-7", "expected an even number"),
    ("v5e-24", "a power of two chips"), ("v5e:2x2x2", "a v5e grid has 2 dimensions"),
    ("h100:3x9", "1..8 GPUs a host"), ("tpu", "is not one this package knows"),
])
def test_unknown_or_impossible_topologies_are_named(name, message):
    with pytest.raises(topologies.TopologyError, match=message):
        topologies.parse(name)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None,
                    reason="libtpu is installed here")
def test_a_missing_compiler_is_named_with_its_install_command():
    with pytest.raises(topologies.TopologyError, match=r"needs libtpu: pip install "
                       r"'dwm_jax\[tpu\]'"):
        topologies.compile_devices(topologies.parse("v5e:2x2"))


def test_every_chip_has_its_figures_and_gpus_their_target_description():
    for key, chip in topologies.CHIPS.items():
        assert chip.hbm_bytes > 0 and chip.bf16_tflops > 0 and chip.hbm_gbytes_per_s > 0
        assert chip.source
        if chip.platform == "cuda":
            text = open(os.path.join(topologies.GPU_TARGETS, f"{key}.txtpb")).read()
            assert "gpu_device_info" in text and "device_memory_size" in text


def test_the_roofline_is_the_larger_of_compute_and_memory_time():
    chip = topologies.CHIPS["v5e"]
    compute = aot.roofline(197e12, 819e9 * 0.5, chip)       # 1 s of FLOPs, 0.5 s of bytes
    assert compute["step_s"] == pytest.approx(1.0) and compute["bound"] == "compute"
    assert compute["mfu"] == pytest.approx(1.0)
    memory = aot.roofline(197e12, 819e9 * 4, chip)
    assert memory["step_s"] == pytest.approx(4.0) and memory["mfu"] == pytest.approx(0.25)


def test_largest_values_skip_fused_computations():
    hlo = "\n".join([
        "%fused_computation.1 (p: f32[1024,1024]) -> f32[1024,1024] {",
        "  %inner = f32[4096,4096]{1,0} multiply(%p, %p)",
        "}",
        "ENTRY %main (a: bf16[8,80,608]) -> f32[] {",
        "  %a = bf16[8,80,608]{2,1,0} parameter(0)",
        "  %fusion.3 = f32[1024,1024]{1,0} fusion(%a), kind=kLoop",
        "  ROOT %r = f32[] constant(0)",
        "}"])
    assert aot.largest_values(hlo, 2) == [("fusion.3", "f32[1024,1024]", 4 * 2 ** 20),
                                          ("a", "bf16[8,80,608]", 2 * 8 * 80 * 608)]


def _report(total_gib, usable_gib=16.0, **config):
    gib = topologies.GIB
    cfg = {**dict(remat="none", fsdp=False, compute_dtype="float32", batch_size=64), **config}
    return dict(step=dict(fits=total_gib <= usable_gib, total=total_gib * gib,
                          usable=usable_gib * gib),
                config=cfg, target=dict(name="v5e:2x2", chip="TPU v5e", devices=4))


def test_a_step_that_does_not_fit_names_the_shortfall_and_the_switches():
    assert aot.shortfall(_report(8.0)) is None
    line = aot.shortfall(_report(20.0))
    assert line.startswith("the step needs 20.00 GiB per chip on v5e:2x2 (TPU v5e, 16.00 GiB "
                           "usable): 4.00 GiB short; try --config.model.remat=full")
    assert "--config.fsdp=True" in line and "bfloat16" in line
    assert "a smaller per-chip batch than 16" in line
    done = aot.shortfall(_report(20.0, remat="full", fsdp=True, compute_dtype="bfloat16"))
    assert "remat" not in done and "fsdp" not in done and "per-chip batch" in done


# ------------------------------------------------------------ real compiles (make aot)

def _compile(tmp_path, *flags, env=None):
    if not os.path.exists(AOT_PYTHON):
        pytest.skip("no .venv-aot with libtpu and the CUDA plugin: make aot")
    out = tmp_path / f"report{len(list(tmp_path.iterdir()))}.json"
    res = subprocess.run([AOT_PYTHON, "-m", "dwm_jax.compile", *SMALL, *flags,
                          f"--json={out}"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, **(env or {})})
    return res, (json.load(open(out)) if out.exists() else None)


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5e:2x2", "h100:2"])
def test_a_small_step_compiles_for_the_target_and_its_figures_hold(tmp_path, topology):
    """Memory and cost positive and per chip; twice the per-chip batch, more temporaries
    and twice the FLOPs; the evaluation encoder compiles too."""
    runs = {}
    for batch in (64, 128):
        res, report = _compile(tmp_path, f"--topology={topology}",
                               f"--config.batch_size={batch}")
        if res.returncode and "cannot make its devices" in res.stderr:
            pytest.skip(res.stderr.strip().splitlines()[-1])
        assert res.returncode == 0, res.stderr[-3000:]
        assert "fits" in res.stdout and "roofline" in res.stdout
        runs[batch] = report
    small, large = runs[64]["step"], runs[128]["step"]
    for s in (small, large):
        assert s["arguments"] > 0 and s["temporaries"] > 0 and s["fits"]
        assert s["flops"] > 0 and s["bytes"] > 0 and 0 < s["mfu"] <= 1
        assert s["total"] == s["arguments"] + s["temporaries"] + s["outputs"] - s["aliased"]
    assert large["temporaries"] > small["temporaries"]
    assert large["arguments"] >= small["arguments"]               # the state is the same
    assert large["flops"] == pytest.approx(2 * small["flops"], rel=0.1)
    assert large["model_flops"] == pytest.approx(2 * small["model_flops"], rel=0.01)
    assert 0 < large["model_mfu"] <= 1.5
    assert runs[64]["eval"]["fits"] and runs[64]["eval"]["flops"] > 0
    devices = runs[64]["target"]["devices"]
    assert devices == (4 if topology.startswith("v5e") else 2)


@pytest.mark.slow
def test_the_cli_refuses_in_one_line(tmp_path):
    cases = [(["--topology=v9z-8"], "is not one this package knows"),
             (["--topology=v5e:2x2", "--num_slices=0"], "--num_slices"),
             (["--topology=v5e:2x2", f"--save={tmp_path}/none/step.bin"], "no folder"),
             (["--topology=v5e:2x2", "--config.batch_size=6"],
              "batch_size 6 must be divisible by the device count (4)"),
             (["--topology=h100:1", "--config.batch_size=8"], "GiB short; try")]
    for flags, message in cases:
        env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.00001"} if "short" in message else None
        res, _ = _compile(tmp_path, *flags, env=env)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, res.stderr[-3000:]
        assert lines[-1].startswith("python -m dwm_jax.compile: error:") and \
            message in lines[-1], lines[-1]
