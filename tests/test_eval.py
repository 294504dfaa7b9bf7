"""Embeddings and the linear probe: separable vs shuffled labels, windowing, eval.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from dwm_jax import data, probe
from dwm_jax.embedding import Embedder
from dwm_jax.models import vit
from dwm_jax import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blobs(sizes, d=20, classes=4, margin=4.0, seed=0):
    """Gaussian blobs around shared class centres: one (x, y) per requested split size."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d)) * margin
    out = []
    for n in sizes:
        y = np.arange(n) % classes
        out.append((centres[y] + rng.standard_normal((n, d)), y))
    return out


def test_probe_is_near_perfect_on_separable_features_and_chance_on_shuffled_labels():
    (xtr, ytr), (xva, yva), (xte, yte) = _blobs([400, 100, 200])
    r = probe.probe(xtr, ytr, xva, yva, xte, yte, num_classes=4)
    assert r["test_accuracy"] >= 0.98
    accs = [probe.probe(xtr, np.random.default_rng(s).permutation(ytr), xva,
                        np.random.default_rng(s + 10).permutation(yva), xte, yte,
                        num_classes=4)["test_accuracy"] for s in range(3)]
    assert abs(np.mean(accs) - 0.25) < 0.08, accs


def test_early_stopping_keeps_the_best_validation_step():
    (xtr, ytr), (xva, yva) = _blobs([200, 200], d=50, margin=0.3)
    xtr, xva = probe.standardise(xtr, xva)
    params, info = probe.train_linear(xtr, ytr, xva, yva, num_classes=4, max_steps=1000,
                                      eval_every=50, patience=3)
    assert info["best_step"] <= info["steps"] <= 1000
    assert probe.accuracy(params, xva, yva) == pytest.approx(info["valid_accuracy"])


@pytest.fixture(scope="module")
def embedder():
    enc = vit.Encoder("micro", input_shape=(80, 64), rngs=nnx.Rngs(0))
    return Embedder(enc, data.NormStats(-6.0, 3.0))


def test_embedding_shapes_windowing_and_determinism(embedder):
    rng = np.random.default_rng(0)
    short = rng.standard_normal((80, 40)).astype(np.float32) - 6    # one 48-frame chunk
    long = rng.standard_normal((80, 150)).astype(np.float32) - 6    # 64 + 64 + 32 frames
    assert embedder.time_features(short).shape == (3, 5 * 64)       # ceil(40 / 16)
    steps = embedder.time_features(long)
    assert steps.shape == (10, 5 * 64)                              # ceil(150 / 16)
    np.testing.assert_array_equal(steps, embedder.time_features(long))
    # windowing: the first 64 frames are one window on their own
    np.testing.assert_allclose(steps[:4], embedder.time_features(long[:, :64]), atol=1e-5)
    np.testing.assert_allclose(steps[4:8], embedder.time_features(long[:, 64:128]), atol=1e-5)
    np.testing.assert_allclose(embedder.clip_embedding(long), steps.mean(0), atol=1e-6)
    np.testing.assert_allclose(embedder.clip_embedding(long, pool="mean_std"),
                               np.concatenate([steps.mean(0), steps.std(0)]), atol=1e-6)
    with pytest.raises(ValueError, match="pool must be one of"):
        embedder.clip_embedding(long, pool="max")
    # the last chunk is 22 frames padded with zeros (after normalisation) to 32, not to 64,
    # and runs with the positions of the first 2 time columns (the authors' runtime)
    last = np.zeros((1, 80, 32), np.float32)
    last[0, :, :22] = (long[:, 128:] + 6.0) / 3.0
    tokens = np.asarray(embedder.encoder(last))[0, 1:].reshape(5, 2, 64)
    np.testing.assert_allclose(steps[8:], tokens.transpose(1, 0, 2).reshape(2, -1), atol=1e-4)
    # the token layout: time step t holds the Fp frequency tokens of column t
    tokens = np.asarray(embedder.encoder((long[None, :, :64] + 6.0) / 3.0))[0, 1:]
    np.testing.assert_allclose(steps[2], tokens.reshape(5, 4, 64)[:, 2].reshape(-1),
                               atol=1e-4)
    with pytest.raises(ValueError, match=r"expected a log-mel \[80, T\]"):
        embedder.time_features(np.zeros((64, 100)))


def test_embedder_refuses_or_converts_odd_inputs(embedder):
    t = np.arange(16000) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    pcm = np.round(wave * 32768).astype(np.int16)        # the same clip as int16 PCM
    np.testing.assert_allclose(embedder.from_waveform(pcm, 16000),     # read as +-1 audio
                               embedder.from_waveform(pcm / np.float32(32768), 16000),
                               atol=1e-5)
    np.testing.assert_allclose(embedder.from_waveform(pcm, 16000),
                               embedder.from_waveform(wave, 16000), atol=5e-3)
    with pytest.raises(ValueError, match="no samples"):
        embedder.from_waveform(np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match=r"mono waveform \[samples\]; got shape \(2, 16000\)"):
        embedder.from_waveform(np.stack([wave, wave]), 44100)
    with pytest.raises(ValueError, match="sample_rate must be a positive integer"):
        embedder.from_waveform(wave, 0)
    bad = embedder.frontend(wave)
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match=r"holds 1 NaN or infinite"):
        embedder.clip_embedding(bad)


def test_waveform_embedding_matches_the_log_mel_path(embedder):
    t = np.arange(22050 * 2) / 22050
    wave = (0.3 * np.sin(2 * np.pi * 500 * t)).astype(np.float32)
    import librosa
    resampled = librosa.resample(wave, orig_sr=22050, target_sr=16000, res_type="soxr_hq")
    np.testing.assert_allclose(embedder.from_waveform(wave, 22050),
                               embedder.clip_embedding(embedder.frontend(resampled)), atol=1e-5)


@pytest.mark.slow
def test_eval_cli_writes_results_with_both_baselines(synthetic_small, trained_run):
    res = subprocess.run([sys.executable, "eval.py", f"--workdir={trained_run}",
                          "--tasks=synthetic_sounds/small",
                          f"--data_dir={synthetic_small[0]}"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| synthetic_sounds/small | 48 | 12 |" in res.stdout
    out = json.load(open(os.path.join(trained_run, "eval", "results.json")))
    task = out["tasks"][0]
    assert out["step"] == 4 and task["num_test"] == 48
    for name in ("encoder", "random_init", "raw_logmel"):
        assert 0.0 <= task[name]["test_accuracy"] <= 1.0
    cache = os.path.join(trained_run, "eval", "cache")
    data_fp = data.dataset_fingerprint(synthetic_small[0], "synthetic_sounds/small")
    fp = Embedder.from_workdir(trained_run).fingerprint
    assert os.path.exists(os.path.join(cache, f"encoder_{fp}",
                                       f"synthetic_sounds_small-{data_fp}", "test.npz"))
    assert os.path.exists(os.path.join(trained_run, "eval", "results.md"))
    # --pool=mean_std: mean and std over time, cached apart from the mean features
    res = subprocess.run([sys.executable, "eval.py", f"--workdir={trained_run}",
                          "--tasks=synthetic_sounds/small", "--pool=mean_std",
                          f"--data_dir={synthetic_small[0]}"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "encoder features: mean + std over time" in res.stdout
    split = os.path.join(f"synthetic_sounds_small-{data_fp}", "test.npz")
    mean = np.load(os.path.join(cache, f"encoder_{fp}", split))["x"]
    pooled = np.load(os.path.join(cache, f"encoder_{fp}_mean_std", split))["x"]
    np.testing.assert_allclose(pooled[:, : mean.shape[1]], mean, atol=1e-6)
    assert pooled.shape == (48, 2 * mean.shape[1]) and pooled[:, mean.shape[1]:].min() >= 0


@pytest.mark.slow
def test_eval_cache_follows_the_weights_not_the_step(synthetic_small, tmp_path):
    """Retraining a workdir to the same step must not report the old run's features."""
    import shutil

    from tests.helpers import micro_config
    workdir = str(tmp_path / "run")

    def train_and_eval(seed, *flags):
        cfg = micro_config(synthetic_small[0], "msm_mae", "random", total_steps=4)
        cfg.seed = seed
        train_lib.train(cfg, workdir, progress=False)
        res = subprocess.run([sys.executable, "eval.py", f"--workdir={workdir}",
                              "--tasks=synthetic_sounds/small",
                              f"--data_dir={synthetic_small[0]}", *flags],
                             capture_output=True, text=True, cwd=REPO)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.load(open(os.path.join(workdir, "eval", "results.json")))["tasks"][0]

    train_and_eval(0)
    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    cached = train_and_eval(1)                       # same step 4, other weights
    fresh = train_and_eval(1, "--no_cache")
    assert cached["encoder"] == fresh["encoder"]
    keys = sorted(os.listdir(os.path.join(workdir, "eval", "cache")))
    assert sum(k.startswith("encoder_") for k in keys) == 2, keys


@pytest.mark.slow
def test_eval_errors_are_clear(synthetic_small, trained_run, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "eval.py", *args], capture_output=True,
                              text=True, cwd=REPO)
    res = run(f"--workdir={tmp_path / 'missing'}")
    assert res.returncode == 2 and "no checkpoint" in res.stderr
    assert not (tmp_path / "missing").exists()  # nothing created where nothing was
    res = run(f"--workdir={trained_run}", "--tasks=nothing_here",
              f"--data_dir={synthetic_small[0]}")
    assert res.returncode == 2 and "not built" in res.stderr


def test_results_that_cannot_be_written_fail_before_any_feature(synthetic_small, _micro_run,
                                                                tmp_path):
    """RUN/eval unwritable (here a file where the folder belongs; a read-only workdir is
    the same error path): one line, exit 2, and nothing computed first."""
    import shutil
    run = str(tmp_path / "run")
    shutil.copytree(_micro_run, run)
    with open(os.path.join(run, "eval"), "w") as f:
        f.write("not a folder")
    res = subprocess.run([sys.executable, "eval.py", f"--workdir={run}",
                          f"--data_dir={synthetic_small[0]}"], capture_output=True, text=True,
                         cwd=REPO)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval.py: error:") and "eval" in lines[0]
    assert "embed" not in res.stderr   # no progress bar: no feature was computed


def test_unlabelled_and_one_class_tasks_are_refused(tmp_path):
    import soundfile
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(3):
        soundfile.write(str(clips / f"{i}.wav"), np.random.default_rng(i).standard_normal(
            8000).astype(np.float32) * 0.1, 16000)
    data_dir = str(tmp_path / "d")
    data.build("audio_folder", data_dir,
               config=data.audio_folder_config("unlab", audio_dir=str(clips)))
    with open(tmp_path / "one.csv", "w") as f:
        f.write("filename,label,split\n0.wav,dog,train\n1.wav,dog,train\n2.wav,dog,test\n")
    data.build("audio_folder", data_dir, config=data.audio_folder_config(
        "one", audio_dir=str(clips), csv_path=str(tmp_path / "one.csv")))
    feats = {"raw": (probe.raw_features, None)}
    with pytest.raises(probe.ProbeError, match="has no labels"):
        probe.evaluate_task("audio_folder/unlab", data_dir, feats)
    with pytest.raises(probe.ProbeError, match="one class"):
        probe.evaluate_task("audio_folder/one", data_dir, feats)
    # a built dataset can also be named by its directory
    with pytest.raises(probe.ProbeError, match="one class"):
        probe.evaluate_task(f"audio_folder:{data_dir}/audio_folder/one", data_dir, feats)


def test_fold_datasets_use_leave_one_fold_out(tmp_path):
    import soundfile
    clips = tmp_path / "clips"
    clips.mkdir()
    rows = ["filename,label,fold"]
    for i in range(24):
        label = i % 2
        t = np.arange(16000) / 16000
        x = np.sin(2 * np.pi * (300 if label else 3000) * t) * 0.3
        x = x + 0.01 * np.random.default_rng(i).standard_normal(16000)
        soundfile.write(str(clips / f"{i}.wav"), x.astype(np.float32), 16000)
        rows.append(f"{i}.wav,{'low' if label else 'high'},{1 + i % 3}")
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    data_dir = str(tmp_path / "d")
    data.build("audio_folder", data_dir, config=data.audio_folder_config(
        "folds", audio_dir=str(clips), csv_path=str(tmp_path / "meta.csv")))
    r = probe.evaluate_task("audio_folder/folds", data_dir, {"raw": (probe.raw_features, None)})
    assert r["protocol"].startswith("leave-one-fold-out over 3 folds")
    assert len(r["raw"]["fold_accuracies"]) == 3 and r["num_test"] == 24
    assert r["raw"]["test_accuracy"] == 1.0  # a 300 Hz tone vs a 3 kHz tone


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["bytes", "silent_value_change"])
def test_eval_names_a_damaged_checkpoint_in_one_line(synthetic_small, tmp_path, damage):
    """eval.py reads only the encoder's arrays (and checks them against their fingerprint):
    flipped bytes in every data file, or an encoder value that reads back but is not what
    was saved, is named in one line."""
    import shutil

    from tests.helpers import damage_state_files, micro_config
    workdir = tmp_path / "run"
    train_lib.train(micro_config(synthetic_small[0], "msm_mae", "random", total_steps=4),
                  str(workdir), progress=False)
    if damage == "bytes":
        damage_state_files(str(workdir / "checkpoints" / "4"))
    else:
        path = os.path.join(workdir, "checkpoints", "4", "meta", "metadata")
        meta = json.load(open(path))
        meta["fingerprint"]["params/encoder/norm/scale"] ^= 1
        json.dump(meta, open(path, "w"))
    res = subprocess.run([sys.executable, "eval.py", f"--workdir={workdir}",
                          "--tasks=synthetic_sounds/small", f"--data_dir={synthetic_small[0]}"],
                         capture_output=True, text=True, cwd=REPO)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert "checkpoints/4 cannot be read" in lines[0] or "is damaged" in lines[0]
    shutil.rmtree(workdir)


# ------------------------------------------------------------------------------ multi-label

def test_map_and_auc_match_scikit_learn_with_ties():
    """Per-class AP and AUC (ties included, from rounded scores) and their macro means equal
    scikit-learn's on the same scores."""
    from sklearn.metrics import average_precision_score, roc_auc_score
    rng = np.random.default_rng(0)
    for trial in range(5):
        y = (rng.random((200, 7)) < rng.uniform(0.05, 0.5, 7)).astype(np.float32)
        y[0], y[1] = 1, 0                                   # every class has both kinds
        s = np.round(y * rng.uniform(0, 1.5) + rng.standard_normal((200, 7)), trial)
        for c in range(7):
            assert probe.average_precision(y[:, c], s[:, c]) == pytest.approx(
                average_precision_score(y[:, c], s[:, c]), abs=1e-12)
            assert probe.roc_auc(y[:, c], s[:, c]) == pytest.approx(
                roc_auc_score(y[:, c], s[:, c]), abs=1e-12)
        got = probe.multilabel_scores(y, s)
        assert got["map"] == pytest.approx(average_precision_score(y, s, average="macro"))
        assert got["auc"] == pytest.approx(roc_auc_score(y, s, average="macro"))
        assert got["classes_scored"] == 7
    # a class with no positive in the test set is left out of the mean (and counted)
    y[:, 3] = 0
    assert probe.multilabel_scores(y, s)["classes_scored"] == 6


def test_multilabel_probe_learns_and_shuffled_labels_sit_at_chance():
    """Sigmoid outputs on features that carry the labels give a high mAP; with the
    training labels shuffled, mAP falls to about the classes' prevalence."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((5, 16)) * 3

    def split(n):
        y = (rng.random((n, 5)) < 0.3).astype(np.float32)
        return y @ centres + rng.standard_normal((n, 16)), y

    (xtr, ytr), (xva, yva), (xte, yte) = split(300), split(100), split(200)
    r = probe.probe(xtr, ytr, xva, yva, xte, yte, num_classes=5)
    assert r["test_score"] == r["test_map"] >= 0.95 and r["test_auc"] >= 0.95
    shuffled = probe.probe(xtr, rng.permutation(ytr), xva, rng.permutation(yva), xte, yte,
                           num_classes=5)
    assert shuffled["test_map"] < 0.5


def test_multilabel_folder_builds_multi_hot_and_is_probed_with_map(tmp_path):
    """A CSV with several labels per clip (FSD50K style, 'a,b' quoted) builds a `labels`
    multi-hot feature; eval's probe reports mAP on it, well above chance for raw log-mel on
    mixtures of tones."""
    import soundfile
    clips = tmp_path / "clips"
    clips.mkdir()
    tones = {"low": 300, "mid": 1200, "high": 3500}
    rows = ["fname,labels,split"]
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    for i in range(60):
        names = [n for n in tones if rng.random() < 0.5] or ["mid"]
        x = sum(np.sin(2 * np.pi * tones[n] * t) * 0.2 for n in names)
        x = x + 0.02 * rng.standard_normal(16000)
        soundfile.write(str(clips / f"{i}.wav"), x.astype(np.float32), 16000)
        split = ["train", "train", "train", "val", "test"][i % 5]
        rows.append(f'{i}.wav,"{",".join(names)}",{split}')
    (tmp_path / "gt.csv").write_text("\n".join(rows) + "\n")
    data_dir = str(tmp_path / "d")
    data.build("audio_folder", data_dir, config=data.audio_folder_config(
        "mixtures", audio_dir=str(clips), csv_path=str(tmp_path / "gt.csv"),
        filename_column="fname", label_column="labels", label_separator=","))
    split = data.open_split(data_dir, "audio_folder/mixtures", "train")
    assert split.multi_label and split.label_names == ("high", "low", "mid")
    first = split.source[0]
    assert first["labels"].dtype == np.uint8 and first["labels"].shape == (3,)
    r = probe.evaluate_task("audio_folder/mixtures", data_dir,
                            {"raw": (probe.raw_features, None)})
    assert r["metric"] == "mAP" and r["num_test"] == 12
    assert r["raw"]["test_map"] > 0.9 > r["chance"]
    assert 0.0 <= r["raw"]["test_auc"] <= 1.0
