"""The converter (python -m dwm_jax.convert) and continued pretraining (config.init_from).

The authors' weights are the reference fixtures' ``weights/*`` (their M2D and MSM-MAE
state_dicts, tests/data/reference/), written as the files users have: .npz, .safetensors and
.pth (PyTorch; those tests need it installed), with and without their wrappers' prefixes.
"""

import argparse
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dwm_jax import torch_layout
from dwm_jax import checkpointing, convert, masking, sharding
from dwm_jax.embedding import Embedder
from dwm_jax.models import vit
from dwm_jax import build
from dwm_jax import weights as weights_lib
from dwm_jax import config as config_lib
from dwm_jax import train as train_lib
from dwm_jax.train import init_from
from dwm_jax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.path.join(REPO, "tests", "data", "reference")
# the fixtures' heads (not readable from shapes): encoder 4, M2D predictor 4, MSM-MAE decoder 2
FLAGS = {"m2d": ["--num_heads", "4", "--decoder_num_heads", "4", "--input_shape", "80x208"],
         "msm_mae": ["--num_heads", "4", "--decoder_num_heads", "2", "--input_shape", "80x208"]}


def _fixture(objective):
    z = dict(np.load(os.path.join(REF, f"{objective}_reference.npz")))
    weights = {k[len("weights/"):]: v for k, v in z.items() if k.startswith("weights/")}
    return z, weights


def _encoder_only(weights):
    return {k: v for k, v in weights.items()
            if not k.startswith(("decoder", "target", "mask_token"))}


def _convert(path, workdir, *flags):
    return convert.main([str(path), "--workdir", str(workdir), *flags])


def _mask(z):
    ids, k = z["mask/ids_shuffle"], int(z["mask/len_keep"])
    return masking.Mask(jnp.asarray(ids[:, :k]), jnp.asarray(ids[:, k:]),
                        jnp.asarray(z["mask/ids_restore"]), jnp.asarray(z["mask/mask"]))


def test_converted_fixture_gives_their_runtime_features(tmp_path):
    """Their M2D state_dict as .npz -> workdir -> Embedder.from_workdir on raw log-mel: the
    features their portable runtime returned (it normalises with the converted stats)."""
    z, weights = _fixture("m2d")
    np.savez(tmp_path / "m2d.npz", **weights)
    assert _convert(tmp_path / "m2d.npz", tmp_path / "run", *FLAGS["m2d"]) == 0
    report = json.load(open(tmp_path / "run" / "conversion.json"))
    assert report["objective"] == "m2d" and report["size"] == "64x2x4"
    np.testing.assert_allclose(report["norm_stats"], [z["norm_mean"], z["norm_std"]], rtol=1e-6)
    assert report["check_max_relative_diff"] < 1e-5
    emb = Embedder.from_workdir(str(tmp_path / "run"))
    for i in range(2):
        ours = emb.time_features(z["portable/lms_raw"][i, 0])
        np.testing.assert_allclose(ours, z["portable/features"][i], atol=2e-4)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("objective", ["m2d", "msm_mae"])
def test_step_from_converted_full_checkpoint_reproduces_their_loss(objective, scan, tmp_path):
    """A run started from the converted full checkpoint (config.init_from) holds their
    encoder, predictor / decoder and target: one update on their batch and mask gives their
    loss; also with scanned layers (the weights restacked on a layer axis)."""
    z, weights = _fixture(objective)
    np.savez(tmp_path / "ckpt.npz", **weights)
    assert _convert(tmp_path / "ckpt.npz", tmp_path / "conv", *FLAGS[objective]) == 0
    source = weights_lib.read_weights(str(tmp_path / "conv"))
    import ml_collections
    cfg = ml_collections.ConfigDict(source.config)
    cfg.init_from = str(tmp_path / "conv")
    cfg.model.scan_layers = scan
    setup = build.make_setup(cfg, 1, 300)
    mesh = sharding.make_mesh(1)
    abstract = build.abstract_state(setup, 0)
    shardings = sharding.state_shardings(abstract, mesh)
    state = jax.jit(lambda: build.init_state(setup, 0), out_shardings=shardings)()
    state, notes = init_from.start_from(cfg.init_from, state, shardings, cfg)
    head = "predictor" if objective == "m2d" else "decoder"
    assert f"{head} from the source" in notes
    if objective == "m2d":
        assert "target from the source's target" in notes
    _, metrics = step_lib.update(setup, state, jnp.asarray(z["x"][:, 0]), _mask(z))
    np.testing.assert_allclose(float(metrics["loss"]), float(z["loss"]), rtol=2e-5)


def test_encoder_only_file_with_their_prefixes_and_clap_heads(tmp_path):
    """Keys under 'module.ar.runtime.backbone.' (their CLAP / M2D-AS runtime), CLAP's
    projections skipped with a note, the input size read from the positions."""
    z, weights = _fixture("m2d")
    sd = {f"module.ar.runtime.backbone.{k}": v for k, v in _encoder_only(weights).items()}
    sd["module.audio_proj.0.weight"] = np.zeros((8, 64), np.float32)
    sd["module.text_proj.weight"] = np.zeros((8, 32), np.float32)
    np.savez(tmp_path / "clap.npz", **sd)
    assert _convert(tmp_path / "clap.npz", tmp_path / "run", "--num_heads", "4") == 0
    report = json.load(open(tmp_path / "run" / "conversion.json"))
    assert report["objective"] == "encoder" and report["input_shape"] == [80, 208]
    assert report["sources"]["input_shape"] == "pos_embed, with 80 mel bins"
    assert any("CLAP's audio projection" in n for n in report["notes"])
    assert any("CLAP's text projection" in n for n in report["notes"])
    emb = Embedder.from_workdir(str(tmp_path / "run"))
    np.testing.assert_allclose(emb.time_features(z["portable/lms_raw"][1, 0]),
                               z["portable/features"][1], atol=2e-4)


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.update({"head.weight": np.zeros((10, 64), np.float32)}),
     r"no place in m2d: \['head.weight'\]"),
    (lambda sd: sd.pop("blocks.1.attn.qkv.bias"), r"has no 'blocks.1.attn.qkv.bias'"),
    (lambda sd: sd.pop("patch_embed.proj.weight"), r"no 'patch_embed.proj.weight'"),
])
def test_missing_or_unknown_tensors_stop_the_conversion(tmp_path, capsys, change, message):
    _, weights = _fixture("m2d")
    change(weights)
    np.savez(tmp_path / "bad.npz", **weights)
    assert _convert(tmp_path / "bad.npz", tmp_path / "run", *FLAGS["m2d"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convert: ") and err.count("\n") == 1
    import re
    assert re.search(message, err), err
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("make,message", [
    (lambda p, w: p.write_bytes(b""), r"not a readable .npz \(EOFError"),
    (lambda p, w: (np.savez(p, **w), _truncated(p)), r"not a readable .npz \(BadZipFile"),
    (lambda p, w: np.savez(p, **dict(w, norm_stats=np.array([1.0], np.float32))),
     "tensor norm_stats holds 1 value"),
    (lambda p, w: np.savez(p, **dict(w, pos_embed=w["pos_embed"][0, :, 0])),
     r"tensor pos_embed has shape \[66\]"),
    (lambda p, w: np.savez(p, **{k.replace("blocks.1.", "blocks.3."): v for k, v in w.items()}),
     r"block indices \[0, 3\] are not 0..1"),
    (lambda p, w: np.savez(p, **dict(w, **{"patch_embed.proj.weight": np.zeros(
        (64, 1, 0, 16), np.float32)})), "patch_embed.proj.weight has shape"),
])
def test_malformed_files_are_one_line_errors(tmp_path, capsys, make, message):
    """Damaged files and impossible tensors: one line naming the file or tensor, exit 2,
    nothing written."""
    import re
    _, weights = _fixture("m2d")
    make(tmp_path / "bad.npz", _encoder_only(weights))
    assert _convert(tmp_path / "bad.npz", tmp_path / "run", *FLAGS["m2d"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convert: ") and err.count("\n") == 1 and re.search(message, err), err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("args,message", [
    ("[1, 2]", "metadata 'args' is a JSON list"),
    ("{not json", "metadata 'args' is not JSON"),
    (json.dumps({"num_heads": "four"}), "args.num_heads is 'four', not a positive integer"),
    (json.dumps({"num_heads": 5}), r"5 heads \(from args\) do not divide the width 64"),
])
def test_safetensors_args_that_cannot_be_used_are_named(tmp_path, capsys, args, message):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    _, weights = _fixture("m2d")
    safetensors_numpy.save_file(_encoder_only(weights), str(tmp_path / "e.safetensors"),
                                metadata={"args": args})
    assert _convert(tmp_path / "e.safetensors", tmp_path / "run", "--input_shape",
                    "80x208") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err


@pytest.mark.parametrize("args,message", [
    ({"input_size": "abc"}, "args.input_size 'abc' is not two positive integers"),
    ({"input_size": [80, "x"]}, r"args.input_size \[80, 'x'\] is not two positive"),
    ({"input_size": [80.5, 208]}, "args.input_size .* is not two positive integers"),
    ({"patch_size": "abc"}, "args.patch_size 'abc' is not two positive integers"),
])
def test_safetensors_args_with_a_size_that_is_no_number_are_named(tmp_path, capsys, args,
                                                                  message):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    _, weights = _fixture("m2d")
    safetensors_numpy.save_file(_encoder_only(weights), str(tmp_path / "e.safetensors"),
                                metadata={"args": json.dumps(args)})
    assert _convert(tmp_path / "e.safetensors", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith("convert: ") and err.count("\n") == 1 and re.search(message, err), err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_half_precision_weights_convert_and_say_so(tmp_path, precision):
    import ml_dtypes
    _, weights = _fixture("m2d")
    dtype = np.float16 if precision == "float16" else ml_dtypes.bfloat16
    half = {k: v.astype(dtype) for k, v in _encoder_only(weights).items()}
    if precision == "bfloat16":  # NumPy cannot save bfloat16: through safetensors
        safetensors_numpy = pytest.importorskip("safetensors.numpy")
        path = tmp_path / "e.safetensors"
        safetensors_numpy.save_file(half, str(path))
    else:
        path = tmp_path / "e.npz"
        np.savez(path, **half)
    assert _convert(path, tmp_path / "run", *FLAGS["m2d"][:2], "--input_shape", "80x208") == 0
    r = json.load(open(tmp_path / "run" / "conversion.json"))
    assert r["precision"] == precision and r["check_max_relative_diff"] < 1e-5
    assert any(f"stored in {precision}" in n for n in r["notes"])


def test_head_count_source_is_reported_and_contradictions_refused(tmp_path, capsys):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    _, weights = _fixture("m2d")
    np.savez(tmp_path / "e.npz", **_encoder_only(weights))
    assert _convert(tmp_path / "e.npz", tmp_path / "default", "--input_shape", "80x208") == 0
    r = json.load(open(tmp_path / "default" / "conversion.json"))
    assert r["heads"] == 1 and r["sources"]["heads"] == "width / 64"
    assert any("cannot tell the head count" in n for n in r["notes"])
    # their ViT-B is named in args.model: 12 heads; --num_heads 8 contradicts it
    scale = {64: 768, 192: 2304, 256: 3072}
    rng = np.random.default_rng(0)
    vit_b = {k: (rng.standard_normal([scale.get(n, n) for n in v.shape]) * 0.02).astype(
        np.float32) for k, v in _encoder_only(weights).items()
        if k not in ("pos_embed", "norm_stats")}
    safetensors_numpy.save_file(vit_b, str(tmp_path / "b.safetensors"),
                                metadata={"args": json.dumps({"model": "vit_base_patch16"})})
    assert _convert(tmp_path / "b.safetensors", tmp_path / "b8", "--input_shape", "80x208",
                    "--num_heads", "8") == 2
    assert "8 heads (from --num_heads) contradict the checkpoint's args.model" in (
        capsys.readouterr().err)
    assert _convert(tmp_path / "b.safetensors", tmp_path / "b", "--input_shape", "80x208",
                    "--no_check") == 0
    r = json.load(open(tmp_path / "b" / "conversion.json"))
    assert r["heads"] == 12 and "agreeing with args.model" in r["sources"]["heads"]


def test_a_conversion_stopped_before_its_report_is_finished_by_a_rerun(tmp_path):
    _, weights = _fixture("m2d")
    np.savez(tmp_path / "m2d.npz", **weights)
    assert _convert(tmp_path / "m2d.npz", tmp_path / "run", *FLAGS["m2d"]) == 0
    report = json.load(open(tmp_path / "run" / "conversion.json"))
    os.remove(tmp_path / "run" / "conversion.json")         # killed just before writing it
    assert _convert(tmp_path / "m2d.npz", tmp_path / "run", *FLAGS["m2d"]) == 0
    again = json.load(open(tmp_path / "run" / "conversion.json"))
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in report.items() if k != "seconds"}
    (tmp_path / "run" / "conversion.json").write_text('{"half wri')  # a full disk
    assert _convert(tmp_path / "m2d.npz", tmp_path / "run", *FLAGS["m2d"]) == 0
    assert json.load(open(tmp_path / "run" / "conversion.json"))["sha256"] == report["sha256"]
    os.remove(tmp_path / "run" / "checkpoints" / "0" / "meta" / "metadata")  # damaged since
    assert _convert(tmp_path / "m2d.npz", tmp_path / "run", *FLAGS["m2d"]) == 2


def test_input_shape_that_contradicts_the_positions(tmp_path, capsys):
    _, weights = _fixture("m2d")
    np.savez(tmp_path / "m2d.npz", **weights)
    assert _convert(tmp_path / "m2d.npz", tmp_path / "run", "--input_shape", "80x608") == 2
    err = capsys.readouterr().err
    assert "pos_embed holds 65 patch positions" in err and "190" in err


def test_cli_error_is_one_line_and_exit_2(tmp_path):
    """Through the real command line: a bad file is one stderr line, exit code 2."""
    (tmp_path / "broken.npz").write_bytes(b"not a zip file")
    res = subprocess.run([sys.executable, "-m", "dwm_jax.convert", str(tmp_path / "broken.npz"),
                          "--workdir", str(tmp_path / "run")], capture_output=True, text=True,
                         cwd=REPO)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert "broken.npz: not a readable .npz" in res.stderr


@pytest.mark.slow
def test_a_workdir_holding_something_else_is_refused(tmp_path, capsys, synthetic_small):
    _, weights = _fixture("m2d")
    np.savez(tmp_path / "a.npz", **weights)
    np.savez(tmp_path / "b.npz", **_encoder_only(weights))
    assert _convert(tmp_path / "a.npz", tmp_path / "conv", *FLAGS["m2d"]) == 0
    assert _convert(tmp_path / "a.npz", tmp_path / "conv", *FLAGS["m2d"]) == 0  # the same
    assert "nothing to do" in capsys.readouterr().out
    assert _convert(tmp_path / "b.npz", tmp_path / "conv", "--num_heads", "4") == 2
    assert "already holds weights converted from" in capsys.readouterr().err
    from tests.helpers import micro_config
    train_lib.train(micro_config(synthetic_small[0], total_steps=2), str(tmp_path / "run"),
                  progress=False)
    assert _convert(tmp_path / "a.npz", tmp_path / "run", *FLAGS["m2d"]) == 2
    assert "already holds a training run (m2d, step 2)" in capsys.readouterr().err
    # and training in the converted workdir points to init_from instead of resuming
    cfg = micro_config(synthetic_small[0], total_steps=2)
    with pytest.raises(checkpointing.CheckpointMismatchError, match="config.init_from="):
        train_lib.train(cfg, str(tmp_path / "conv"), progress=False)


def test_sizes_from_their_folder_name_and_args():
    name = "/x/m2d_vit_base-80x608p16x16-221006-mr7/checkpoint-300.pth"
    assert torch_layout.sizes_from_name(name) == ((80, 608), (16, 16), 0.7)
    assert torch_layout.sizes_from_name(
        "/x/msm_mae_vit_base-80x608p16x16-220924-mr75/checkpoint-300.pth")[2] == 0.75
    assert torch_layout.sizes_from_name("/x/m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025/c.pth") \
        == ((80, 1001), (16, 16), None)
    assert torch_layout.sizes_from_name("/x/run/checkpoint.pth") == (None, None, None)
    d, depth, heads = 768, 2, 12
    sd = {"patch_embed.proj.weight": np.zeros((d, 1, 16, 16), np.float32),
          **{f"blocks.{i}.mlp.fc1.weight": np.zeros((4 * d, d), np.float32)
             for i in range(depth)}}
    s = torch_layout.infer_sizes(sd, path=name)
    assert (s.size, s.input_shape, s.mask_ratio, s.objective) == \
        (f"{d}x{depth}x{heads}", (80, 608), 0.7, "encoder")
    s = torch_layout.infer_sizes(sd, path=name, args=dict(input_size=[80, 208], num_heads=6))
    assert (s.input_shape, s.heads, s.sources["input_shape"]) == ((80, 208), 6,
                                                                    "args.input_size")
    s = torch_layout.infer_sizes(sd, path=name, input_shape=(80, 400), num_heads=8)
    assert (s.input_shape, s.heads) == ((80, 400), 8)
    with pytest.raises(convert.ConversionError, match="patches of"):
        torch_layout.infer_sizes(sd, args=dict(patch_size=[16, 8], input_size="80x608"))
    with pytest.raises(convert.ConversionError, match="cannot tell the input size"):
        torch_layout.infer_sizes(sd)
    with pytest.raises(convert.ConversionError,
                       match=r"7 heads \(from --num_heads\) do not divide"):
        torch_layout.infer_sizes(sd, path=name, num_heads=7)


def test_safetensors_with_args_in_metadata(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    z, weights = _fixture("msm_mae")
    args = dict(input_size=[80, 208], num_heads=4, decoder_num_heads=2)
    safetensors_numpy.save_file({f"module.{k}": v for k, v in weights.items()},
                                str(tmp_path / "msm.safetensors"),
                                metadata={"args": json.dumps(args)})
    assert _convert(tmp_path / "msm.safetensors", tmp_path / "run") == 0
    r = json.load(open(tmp_path / "run" / "conversion.json"))
    assert (r["objective"], r["size"], r["decoder"]["heads"]) == ("msm_mae", "64x2x4", 2)
    assert r["sources"]["heads"] == "args" and r["sources"]["input_shape"] == "args.input_size"
    assert any("class default" in n for n in r["notes"])   # their MSM-MAE norm_stats


def test_pth_as_the_authors_save_it(tmp_path):
    """{'model': state_dict, 'args': Namespace, 'epoch', ...} in a folder named their way."""
    torch = pytest.importorskip("torch", reason="reading .pth needs PyTorch ('make test' "
                                "installs it where a local CPU wheel exists)")
    z, weights = _fixture("m2d")
    folder = tmp_path / "m2d_vit_tiny-80x208p16x16-test-mr7"
    folder.mkdir()
    torch.save(dict(model={k: torch.from_numpy(v) for k, v in weights.items()},
                    args=argparse.Namespace(num_heads=4, decoder_num_heads=4, batch_size=8),
                    epoch=3), folder / "checkpoint-3.pth")
    assert _convert(folder / "checkpoint-3.pth", tmp_path / "run") == 0
    r = json.load(open(tmp_path / "run" / "conversion.json"))
    assert r["sources"]["input_shape"] == "the folder name" and r["mask_ratio"] == 0.7
    assert r["args"]["batch_size"] == 8
    emb = Embedder.from_workdir(str(tmp_path / "run"))
    np.testing.assert_allclose(emb.time_features(z["portable/lms_raw"][0, 0]),
                               z["portable/features"][0], atol=2e-4)


def test_pth_without_torch_says_which_extra(tmp_path, monkeypatch):
    (tmp_path / "c.pth").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(convert.ConversionError, match=r"pip install 'dwm_jax\[torch\]'"):
        torch_layout.read_checkpoint(str(tmp_path / "c.pth"))


def test_numpy_forward_matches_our_encoder_on_other_shapes():
    """The float64 check is itself right: our encoder (random weights, 8 x 16 patches, MLP
    ratio 2) written in their layout and run by it."""
    size = vit.ViTSize(32, 2, 2, 2.0)
    enc = vit.Encoder(size, input_shape=(64, 96), patch_size=(8, 16), rngs=nnx.Rngs(3))
    params = {"encoder": nnx.to_pure_dict(nnx.state(enc, nnx.Param))}
    sd = torch_layout.to_torch(params, None, "encoder", (8, 16))
    x = np.random.default_rng(1).standard_normal((2, 64, 96)).astype(np.float32)
    positions = np.concatenate([np.zeros((1, 32)), vit.sincos_2d(32, enc.grid)])
    theirs = torch_layout.numpy_forward(sd, x, num_heads=2, positions=positions)
    np.testing.assert_allclose(np.asarray(enc(jnp.asarray(x))), theirs, atol=2e-5, rtol=1e-4)


def _encoder_source(tmp_path):
    _, weights = _fixture("m2d")
    np.savez(tmp_path / "enc.npz", **_encoder_only(weights))
    assert _convert(tmp_path / "enc.npz", tmp_path / "enc", "--num_heads", "4") == 0
    return str(tmp_path / "enc")


@pytest.mark.slow
def test_init_from_an_encoder_only_checkpoint_trains_on(tmp_path, synthetic_small):
    """Continued M2D pretraining from their encoder on our data (another crop length): the
    run starts from it, the target from its blocks; a size with other heads is refused."""
    from tests.helpers import micro_config
    source = _encoder_source(tmp_path)
    cfg = micro_config(synthetic_small[0], total_steps=2, init_from=source)
    cfg.model.size = "64x2x4"
    setup = build.make_setup(cfg, 1, 2)
    shardings = sharding.state_shardings(build.abstract_state(setup, 0), sharding.make_mesh(1))
    state = jax.jit(lambda: build.init_state(setup, 0), out_shardings=shardings)()
    state, notes = init_from.start_from(source, state, shardings, cfg)
    assert "predictor: fresh (the source has none)" in notes
    assert "target from the source's encoder" in notes
    theirs = weights_lib.read_weights(source).params["encoder"]
    jax.tree.map(np.testing.assert_array_equal, state["params"]["encoder"], theirs)
    jax.tree.map(np.testing.assert_array_equal, state["target"]["blocks"], theirs["blocks"])
    summary = train_lib.train(cfg, str(tmp_path / "run"), progress=False)
    assert summary["final_step"] == 2
    cfg.model.size = "micro"   # 64 wide, 2 blocks, but 2 heads
    with pytest.raises(config_lib.ConfigError, match="4 heads"):
        train_lib.train(cfg, str(tmp_path / "run2"), progress=False)
    cfg.model.size, cfg.init_from = "64x2x4", str(tmp_path / "nowhere")
    with pytest.raises(config_lib.ConfigError, match="config.init_from=.*no checkpoints"):
        train_lib.train(cfg, str(tmp_path / "run3"), progress=False)


@pytest.mark.slow
def test_init_from_our_own_run_takes_everything(tmp_path, synthetic_small):
    from tests.helpers import micro_config
    cfg = micro_config(synthetic_small[0], total_steps=2)
    train_lib.train(cfg, str(tmp_path / "a"), progress=False)
    source = weights_lib.read_weights(str(tmp_path / "a"))
    assert set(source.params) == {"encoder", "predictor"}   # no optimizer state was read
    cfg.init_from = str(tmp_path / "a")
    setup = build.make_setup(cfg, 1, 2)
    shardings = sharding.state_shardings(build.abstract_state(setup, 0), sharding.make_mesh(1))
    state = jax.jit(lambda: build.init_state(setup, 0), out_shardings=shardings)()
    state, notes = init_from.start_from(cfg.init_from, state, shardings, cfg)
    assert notes[1:] == ["predictor from the source", "target from the source's target"]
    jax.tree.map(np.testing.assert_array_equal, (state["params"], state["target"]),
                 (source.params, source.target))
    # into a run with scanned layers: the same weights, stacked on a layer axis
    cfg.model.scan_layers = True
    setup = build.make_setup(cfg, 1, 2)
    shardings = sharding.state_shardings(build.abstract_state(setup, 0), sharding.make_mesh(1))
    state = jax.jit(lambda: build.init_state(setup, 0), out_shardings=shardings)()
    state, _ = init_from.start_from(cfg.init_from, state, shardings, cfg)
    assert state["params"]["encoder"]["blocks"]["fc1"]["kernel"].shape[0] == 2  # depth
    jax.tree.map(np.testing.assert_array_equal,
                 (vit.unstack_layers(state["params"]), vit.unstack_layers(state["target"])),
                 (source.params, source.target))
