"""The core install is light: a fresh virtual environment with ``pip install <repo>`` (no
extra) jits a masker and draws a mask; the other parts name the extra they need; the
environment is a fraction of the full one (the sizes are printed)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a fresh venv and pip install

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CORE_USE = """
import jax, jax.numpy as jnp
from dwm_jax import masking
masker = masking.make_masker("dispersion", input_shape=(80, 64), mask_ratio=0.7)
x = jax.random.normal(jax.random.key(0), (4, 80, 64))
m = jax.jit(masker)(jax.random.key(1), x)
assert m.ids_keep.shape == (4, 6) and float(m.mask.sum()) == 4 * 14
print("mask ok")
"""


def _size_mb(prefix: str) -> float:
    total = 0
    for root, _, files in os.walk(prefix):
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total / 2 ** 20


def test_core_install_masks_and_names_missing_extras(tmp_path):
    venv = tmp_path / "core"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    res = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          REPO], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([py, "-c", CORE_USE], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and "mask ok" in res.stdout, res.stderr[-3000:]
    for module, extra in [("dwm_jax.data", "data"), ("dwm_jax.train", "train"),
                          ("dwm_jax.embedding", "eval"), ("dwm_jax.audio", "audio"),
                          ("dwm_jax.plots", "plots"), ("dwm_jax.serving", "export"),
                          ("dwm_jax.export", "export"), ("dwm_jax.hear", "hear")]:
        res = subprocess.run([py, "-c", f"import {module}"], capture_output=True, text=True,
                             cwd=tmp_path)
        last = res.stderr.strip().splitlines()[-1]
        assert res.returncode != 0 and f"pip install 'dwm_jax[{extra}]'" in last, res.stderr
    installed = subprocess.run([py, "-m", "pip", "list", "--format=freeze"],
                               capture_output=True, text=True).stdout
    names = {line.split("==")[0].lower() for line in installed.split()}
    assert not names & {"flax", "tensorflow-datasets", "grain", "librosa", "orbax-checkpoint",
                        "matplotlib"}
    core, full = _size_mb(str(venv)), _size_mb(sys.prefix)
    print(f"core environment {core:.0f} MiB, full test environment {full:.0f} MiB")
    assert core < 0.6 * full
