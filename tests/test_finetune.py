"""Fine-tuning (dwm_jax/finetune.py, eval.py --mode=finetune): it beats the linear probe of
the same encoder, resumes exactly after a crash, scales learning rates per layer, and eval.py
tables it beside the probe."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dwm_jax import finetune, probe
from dwm_jax.embedding import Embedder
from dwm_jax.models import vit

pytestmark = pytest.mark.slow  # subprocesses, builds or training runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "synthetic_sounds/small"


def _config(**overrides):
    from configs import finetune as recipe
    cfg = recipe.get_config()
    cfg.update(dict(epochs=40, patience=40, batch_size=8, lr=2e-3, mixup=0.0), **overrides)
    return cfg


def test_finetuning_beats_the_linear_probe_of_the_same_encoder(synthetic_small,
                                                              trained_run, tmp_path):
    """On synthetic_sounds/small (12 classes, 8 training clips each), the micro encoder's
    linear probe reaches 0.15 test accuracy; fine-tuning it (40 epochs) reaches 0.25."""
    data_dir = synthetic_small[0]
    emb = Embedder.from_workdir(trained_run)
    linear = probe.evaluate_task(TASK, data_dir, {"encoder": (emb.clip_embedding, None)})
    tuned = finetune.finetune_task(TASK, data_dir, trained_run, 4, _config(),
                                   out_dir=str(tmp_path), log=lambda _: None)
    assert tuned["test_accuracy"] >= linear["encoder"]["test_accuracy"] + 0.06, (
        tuned["test_accuracy"], linear["encoder"]["test_accuracy"])
    assert tuned["task_summary"]["num_test"] == 48 and tuned["epochs"] == [40]
    assert 1 <= tuned["best_epochs"][0] <= 40


def test_a_crashed_finetuning_resumes_where_it_stopped(synthetic_small, trained_run,
                                                       tmp_path, monkeypatch):
    """Stopped by an error after epoch 3 and run again, it resumes from the epoch-3
    checkpoint and ends with the uninterrupted run's history and test score, exactly; a
    rerun with another recipe in the same place is refused, naming the difference."""
    data_dir, cfg = synthetic_small[0], _config(epochs=6, patience=6, mixup=0.3)
    whole = finetune.finetune_task(TASK, data_dir, trained_run, 4, cfg,
                                   out_dir=str(tmp_path / "whole"), log=lambda _: None)
    original, calls = finetune._score, []

    def crash_after_three(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(*args, **kw)

    monkeypatch.setattr(finetune, "_score", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        finetune.finetune_task(TASK, data_dir, trained_run, 4, cfg,
                               out_dir=str(tmp_path / "cut"), log=lambda _: None)
    monkeypatch.setattr(finetune, "_score", original)
    run_dir = tmp_path / "cut" / TASK.replace("/", "_") / "checkpoints"
    assert sorted(os.listdir(run_dir)) == ["3"]
    resumed = finetune.finetune_task(TASK, data_dir, trained_run, 4, cfg,
                                     out_dir=str(tmp_path / "cut"), log=lambda _: None)
    assert resumed["test_score"] == whole["test_score"]
    assert resumed["histories"] == whole["histories"]
    assert len(whole["histories"][0]) == 6
    with pytest.raises(Exception, match="other config"):
        finetune.finetune_task(TASK, data_dir, trained_run, 4, _config(epochs=7),
                               out_dir=str(tmp_path / "cut"), log=lambda _: None)


@pytest.mark.parametrize("scan", [False, True])
def test_layerwise_learning_rates(scan):
    """The head and final norms get the full rate; block i of L gets decay ** (L - i); the
    patch embedding decay ** (L + 1); scanned blocks carry one factor per layer."""
    enc = vit.Encoder("32x3x2", input_shape=(80, 64), scan=scan, rngs=nnx.Rngs(0))
    model = finetune.Classifier(enc, 5, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    scales = finetune.layer_scales(params, 3, 0.5)
    assert float(scales["head"]["kernel"]) == 1.0 and float(scales["norm"]["scale"]) == 1.0
    assert float(scales["encoder"]["norm"]["scale"]) == 1.0
    assert float(scales["encoder"]["patch_embed"]["kernel"]) == 0.5 ** 4
    blocks = scales["encoder"]["blocks"]
    per_block = ([float(blocks[i]["fc1"]["kernel"]) for i in range(3)] if not scan else
                 list(np.asarray(blocks["fc1"]["kernel"]).ravel()))
    assert per_block == [0.5 ** 3, 0.5 ** 2, 0.5]


def test_augmentation_masks_bands_and_mixes_targets():
    cfg = _config(mixup=0.4, freq_mask=10, time_mask=20)
    x = jnp.ones((4, 80, 64))
    y = jnp.eye(4)
    xa, ya = finetune.augment(jax.random.key(0), x, y, cfg)
    np.testing.assert_allclose(np.asarray(ya).sum(1), 1.0, rtol=1e-6)   # still distributions
    zeros = np.asarray(xa) == 0
    rows, cols = zeros.all(axis=2), zeros.all(axis=1)      # whole mel rows / frame columns
    assert rows.sum(1).max() <= 10 and cols.sum(1).max() <= 20
    assert (rows.any(1) | cols.any(1)).any()


def test_eval_cli_tables_probe_and_finetuning_side_by_side(synthetic_small, trained_run):
    base = [sys.executable, "eval.py", f"--workdir={trained_run}", f"--tasks={TASK}",
            f"--data_dir={synthetic_small[0]}"]
    res = subprocess.run(base + ["--mode=finetune", "--finetune.epochs=2",
                                 "--finetune.batch_size=16"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    row = next(line for line in res.stdout.splitlines() if line.startswith(f"| {TASK}"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[4] == "-" and float(cells[5]) >= 0        # no probe yet, a fine-tuned score
    res = subprocess.run(base + ["--mode=linear"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    row = next(line for line in res.stdout.splitlines() if line.startswith(f"| {TASK}"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert float(cells[4]) >= 0 and float(cells[5]) >= 0   # both, side by side
    out = json.load(open(os.path.join(trained_run, "eval", "results.json")))
    task = out["tasks"][0]
    assert {"encoder", "finetune", "random_init", "raw_logmel"} <= set(task)
    assert task["finetune"]["epochs"] == [2]
    # a bad recipe value is one line, exit 2
    res = subprocess.run(base + ["--mode=finetune", "--finetune.batch_size=1000"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and "batch of 1000" in res.stderr
    assert "Traceback" not in res.stderr
