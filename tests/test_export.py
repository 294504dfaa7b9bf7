"""Export to the authors' layout (python -m dwm_jax.export), the model card and the serialised
encoder: the reference fixtures' tensors come back exactly, and a run trained here exports
and converts back bit for bit."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dwm_jax import convert, export, serving, torch_layout, weights
from dwm_jax.embedding import Embedder
from dwm_jax.models import vit
from tests.helpers import micro_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.path.join(REPO, "tests", "data", "reference")
FLAGS = {"m2d": ["--num_heads", "4", "--decoder_num_heads", "4", "--input_shape", "80x208"],
         "msm_mae": ["--num_heads", "4", "--decoder_num_heads", "2", "--input_shape", "80x208"]}
# npz in the fast tier; the other writers (and torch) in the whole suite
FORMATS = [pytest.param("safetensors", marks=pytest.mark.slow), "npz",
           pytest.param("pth", marks=pytest.mark.slow)]


def _fixture_weights(objective):
    z = np.load(os.path.join(REF, f"{objective}_reference.npz"))
    return {k[len("weights/"):]: z[k] for k in z.files if k.startswith("weights/")}


def _needs(fmt):
    if fmt == "pth":
        pytest.importorskip("torch", reason=".pth needs PyTorch ('make test' installs it "
                            "where a local CPU wheel exists)")
    if fmt == "safetensors":
        pytest.importorskip("safetensors")


def _leaves(tree):
    """{path: array} in the per-layer layout, whichever layout the tree has."""
    tree = export._int_keys(vit.unstack_layers(jax.device_get(tree)))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def _assert_same_weights(a: weights.Weights, b: weights.Weights, stats_exact=True):
    for part in ("params", "target"):
        ours, theirs = _leaves(getattr(a, part)), _leaves(getattr(b, part))
        assert ours.keys() == theirs.keys()
        for k in ours:
            assert ours[k].dtype == theirs[k].dtype and np.array_equal(ours[k], theirs[k]), k
    if stats_exact:
        assert a.norm_stats == b.norm_stats
    else:  # an .npz holds them only as their float32 tensor
        assert np.float32(a.norm_stats.mean) == b.norm_stats.mean
        assert np.float32(a.norm_stats.std) == b.norm_stats.std


@pytest.mark.parametrize("objective", ["m2d", "msm_mae"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_the_converted_fixture_exports_to_exactly_its_tensors(tmp_path, objective, fmt):
    _needs(fmt)
    theirs = _fixture_weights(objective)
    np.savez(tmp_path / "theirs.npz", **theirs)
    assert convert.main([str(tmp_path / "theirs.npz"), "--workdir", str(tmp_path / "conv"),
                         *FLAGS[objective]]) == 0
    card = export.export(str(tmp_path / "conv"), str(tmp_path / "out"), fmt=fmt)
    back, args = torch_layout.read_checkpoint(card["path"])
    assert sorted(back) == sorted(theirs)
    for name, value in theirs.items():
        assert back[name].dtype == np.float32 and back[name].shape == value.shape, name
        assert np.array_equal(back[name], value), name
    if fmt != "npz":
        assert (args["num_heads"], args["input_size"], args["patch_size"]) == (
            4, [80, 208], [16, 16])


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_run_trained_here_exports_and_converts_back_bit_for_bit(trained_run, tmp_path, fmt):
    _needs(fmt)
    card = export.export(trained_run, str(tmp_path / "out"), fmt=fmt,
                         authors_folder="m2d_dwm_micro")
    folder = os.path.basename(os.path.dirname(card["path"]))
    assert folder == "m2d_dwm_micro-80x64p16x16-mr75"     # their folder convention
    heads = [] if fmt != "npz" else ["--num_heads", "2", "--decoder_num_heads", "2"]
    assert convert.main([card["path"], "--workdir", str(tmp_path / "back"), *heads]) == 0
    _assert_same_weights(weights.read_weights(trained_run), weights.read_weights(
        str(tmp_path / "back")), stats_exact=fmt != "npz")
    report = json.load(open(tmp_path / "back" / "conversion.json"))
    assert report["input_shape"] == [80, 64] and report["mask_ratio"] == 0.75
    assert report["sources"]["input_shape"] == ("the folder name" if fmt == "npz"
                                                else "args.input_size")


@pytest.mark.slow
def test_an_m2d_run_with_scanned_layers_exports_its_target_too(synthetic_small, tmp_path):
    from dwm_jax import train
    pytest.importorskip("safetensors")
    run = str(tmp_path / "run")
    train.train(micro_config(synthetic_small[0], "m2d", "dispersion", total_steps=2,
                             **{"model.scan_layers": True}), run, progress=False)
    card = export.export(run, str(tmp_path / "out"), fmt="safetensors")
    names, _ = torch_layout.read_checkpoint(card["path"])
    assert {"target_blocks.1.mlp.fc2.bias", "target_norm.weight", "decoder_pred.weight",
            "decoder_pos_embed", "norm_stats"} <= set(names)
    assert convert.main([card["path"], "--workdir", str(tmp_path / "back")]) == 0
    _assert_same_weights(weights.read_weights(run), weights.read_weights(
        str(tmp_path / "back")))


def test_the_model_card_says_how_to_use_the_file(trained_run, tmp_path):
    with open(os.path.join(trained_run, "probe.json"), "w") as f:
        json.dump(dict(test_accuracy=0.5, chance=0.1, dataset="synthetic_sounds/small"), f)
    card = export.export(trained_run, str(tmp_path / "out"), fmt="npz")
    stored = json.load(open(tmp_path / "out" / "model_card.json"))
    assert stored["file"] == "checkpoint-4.npz" and stored["objective"] == "msm_mae"
    w = weights.read_weights(trained_run)
    assert stored["normalisation"]["mean"] == w.norm_stats.mean
    assert stored["frontend"]["sample_rate"] == 16000 and stored["frontend"]["n_mels"] == 80
    assert stored["frontend"]["source"] == "the training dataset's metadata"
    assert stored["patch_size"] == [16, 16] and stored["input"]["frames"] == 64
    assert stored["masking"]["name"] == "random" and stored["training"]["step"] == 4
    assert stored["training"]["dataset"]["fingerprint"]
    assert stored["results"]["probe.json"]["test_accuracy"] == 0.5
    text = open(tmp_path / "out" / "model_card.md").read()
    assert "accuracy 0.500 (chance 0.100)" in text and "16000 Hz" in text
    assert card["heads"] == 2


@pytest.mark.parametrize("folder", ["../../escaped", "/tmp/absolute", "a/b", ".."])
def test_an_authors_folder_that_is_a_path_is_refused(trained_run, tmp_path, folder):
    with pytest.raises(export.ExportError, match="a folder name, not a path"):
        export.export(trained_run, str(tmp_path / "out"), fmt="npz", authors_folder=folder)
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escaped").exists()


def test_a_failed_export_leaves_nothing_behind(trained_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)     # not installed
    with pytest.raises(ImportError, match="ONNX export needs jax2onnx"):
        export.export(trained_run, str(tmp_path / "out"), fmt="npz", onnx=True)
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("a user's file")

    def broken(*args):
        raise OSError("disk full")
    monkeypatch.setattr(serving, "save", broken)         # fails after the checkpoint's write
    for out, folder in ((tmp_path / "new", "m2d_x"), (tmp_path / "kept", "")):
        with pytest.raises(OSError, match="disk full"):
            export.export(trained_run, str(out), fmt="npz", serving_export=True,
                          authors_folder=folder)
    assert not (tmp_path / "new").exists()
    assert os.listdir(tmp_path / "kept") == ["mine.txt"]


def test_the_serialised_encoder_equals_the_embedder(trained_run, tmp_path):
    path = serving.save(trained_run, str(tmp_path))
    side = json.load(open(path + ".json"))
    assert set(side["platforms"]) == {"cpu", "cuda", "tpu"}
    features = serving.load(path)
    emb = Embedder.from_workdir(trained_run)
    rng = np.random.default_rng(0)
    for frames in (64, 48, 16):          # the full width and shorter last chunks
        log_mel = (rng.standard_normal((80, frames)) * 3 - 8).astype(np.float32)
        x = (log_mel - side["norm_stats"]["mean"]) / side["norm_stats"]["std"]
        for batch in (1, 3):
            got = np.asarray(features(np.repeat(x[None], batch, axis=0)))
            want = emb.time_features(log_mel)
            assert got.shape == (batch, frames // 16, side["feature_size"])
            scale = np.abs(want).max()
            assert np.abs(got - want[None]).max() <= 1e-5 * scale


@pytest.mark.slow
def test_a_damaged_or_foreign_serialised_encoder_is_refused_naming_the_file(
        trained_run, tmp_path):
    path = serving.save(trained_run, str(tmp_path))
    assert json.load(open(path + ".json"))["sha256"]
    features = serving.load(path)
    with pytest.raises(ValueError, match=r"at most 64 frames per call .* got 80"):
        features(np.zeros((1, 80, 80), np.float32))
    with pytest.raises(ValueError, match="multiple of the patch width 16"):
        features(np.zeros((1, 80, 24), np.float32))
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + 4] = bytes(255 - b for b in data[middle:middle + 4])
    open(path, "wb").write(bytes(data))
    with pytest.raises(serving.ServingFileError, match=f"{path}: damaged"):
        serving.load(path)
    # without a side-car: a truncated or random file is named, not a struct.error
    for name, payload in (("cut.stablehlo", bytes(data[:100])),
                          ("random.stablehlo", np.random.default_rng(0).bytes(4096))):
        open(tmp_path / name, "wb").write(payload)
        with pytest.warns(UserWarning, match="cannot be checked"), pytest.raises(
                serving.ServingFileError, match=f"{name}: damaged or truncated"):
            serving.load(str(tmp_path / name))


@pytest.mark.slow
def test_export_cli_errors_are_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "dwm_jax.export", str(tmp_path / "none"),
                          str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and res.stderr.strip() == (
        f"python -m dwm_jax.export: error: {tmp_path / 'none'}: no checkpoints there")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_onnx_encoder_equals_the_embedder_on_whole_chunks(trained_run, tmp_path):
    pytest.importorskip("jax2onnx", reason="jax2onnx is not installed ('make test' installs "
                        "it without its Orbax pin)")
    ort = pytest.importorskip("onnxruntime")
    path = serving.save_onnx(trained_run, str(tmp_path))
    session = serving.load_onnx(path)
    emb = Embedder.from_workdir(trained_run)
    rng = np.random.default_rng(0)
    for batch in (1, 3):                    # the batch is symbolic
        log_mels = (rng.standard_normal((batch, 80, 64)) * 3 - 8).astype(np.float32)
        x = (log_mels - emb.stats.mean) / emb.stats.std
        got = session.run(None, {"log_mel": x.astype(np.float32)})[0]
        for i in range(batch):
            want = emb.time_features(log_mels[i])
            assert np.abs(got[i] - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.slow
def test_onnx_with_a_symbolic_time_axis_names_what_blocks_it(trained_run):
    """A symbolic number of time patches (what the StableHLO program has) converts, but
    onnxruntime fails in a Mul over the token axis: the CLS row and the patch tokens get
    the same symbolic size. The day it runs, it must equal the Embedder."""
    jax2onnx = pytest.importorskip("jax2onnx", reason="jax2onnx is not installed")
    ort = pytest.importorskip("onnxruntime")
    encoder, stats, _ = weights.load_encoder(trained_run)
    b, t = jax.export.symbolic_shape("b, t", constraints=("t <= 4",))
    model = jax2onnx.to_onnx(serving.encoder_features_fn(encoder),
                             [jax.ShapeDtypeStruct((b, 80, 16 * t), np.float32)])
    session = ort.InferenceSession(model.SerializeToString())
    x = np.zeros((2, 80, 32), np.float32)
    try:
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
    except Exception as e:  # onnxruntime's own error type
        assert "Mul node" in str(e) and "Shape mismatch" in str(e), str(e)[:500]
        return
    want = Embedder(encoder, stats).time_features(x[0] * stats.std + stats.mean)
    assert np.abs(got[0] - want).max() <= 1e-5 * np.abs(want).max()
