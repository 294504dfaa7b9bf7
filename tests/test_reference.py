"""Equivalence with the authors' PyTorch M2D and MSM-MAE (tests/data/reference/).

Their weights are loaded into our modules through dwm_jax.convert (the one name mapping), and
every stage is compared with what their code computed on the same input and mask: patch
embedding, positions, encoder, predictor or decoder, target, loss, every gradient, and one
full optimizer step (their AdamW parameter groups, clipping, and M2D's EMA). The front end and
the inference runtime are compared too.
"""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dwm_jax import torch_layout
from dwm_jax import audio, convert, data, masking, objectives
from dwm_jax.embedding import Embedder
from dwm_jax.models import vit
from dwm_jax import build
from dwm_jax import config as config_lib
from dwm_jax.train import step as step_lib

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "reference")
SHA256 = {
    "m2d": "34fa0322257c9c5750faa34f960c52b84e436e248547345b18f9443ece62a1a5",
    "msm_mae": "8bf16294157c11e40bd9704a089f1bb6e918454052f4fb99aea21b4a0ed11ddd",
}
TINY = vit.ViTSize(64, 2, 4)           # their encoder, shrunk: 64-d, 2 blocks, 4 heads
HEADS = {"m2d": dict(dim=64, depth=2, heads=4), "msm_mae": dict(dim=32, depth=4, heads=2)}


class Ref:
    """One fixture: its arrays, their state_dict, our parameters and model, the mask."""

    def __init__(self, objective):
        path = os.path.join(HERE, f"{objective}_reference.npz")
        with open(path, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()
        self.z = dict(np.load(path))
        self.objective = objective
        self.state_dict = {k[len("weights/"):]: v for k, v in self.z.items()
                           if k.startswith("weights/")}
        trees = torch_layout.from_torch(self.state_dict, objective)
        self.params, self.target = trees["params"], trees["target"] or None
        model = objectives.make_objective(objective, size=TINY, input_shape=(80, 208),
                                          decoder=HEADS[objective], rngs=nnx.Rngs(0))
        self.graphdef, ours = nnx.split(model, nnx.Param)
        assert jax.tree.structure(nnx.to_pure_dict(ours)) == jax.tree.structure(self.params)
        self.model = nnx.merge(self.graphdef, self.params)
        self.x = jnp.asarray(self.z["x"][:, 0])                    # [4, 80, 208]
        ids = self.z["mask/ids_shuffle"]
        k = int(self.z["mask/len_keep"])
        self.mask = masking.Mask(jnp.asarray(ids[:, :k]), jnp.asarray(ids[:, k:]),
                                 jnp.asarray(self.z["mask/ids_restore"]),
                                 jnp.asarray(self.z["mask/mask"]))

    def close(self, ours, key, atol=1e-5, rtol=1e-5):
        np.testing.assert_allclose(np.asarray(ours), self.z[key], atol=atol, rtol=rtol,
                                   err_msg=key)

    def loss_fn(self, params):
        return nnx.merge(self.graphdef, params).loss(self.x, self.mask, self.target)[0]

    def torch_names(self, tree):
        return torch_layout.to_torch(tree, None, self.objective, (16, 16))


@pytest.fixture(scope="module", params=["m2d", "msm_mae"])
def ref(request):
    return Ref(request.param)


@pytest.fixture(scope="module")
def m2d():
    return Ref("m2d")


@pytest.fixture(scope="module")
def mae():
    return Ref("msm_mae")


def test_fixtures_are_the_authors_files(ref):
    assert ref.sha256 == SHA256[ref.objective]


def test_weights_round_trip_through_the_name_mapping(ref):
    back = torch_layout.to_torch(ref.params, ref.target, ref.objective, (16, 16))
    skipped = set(ref.state_dict) - set(back)
    assert skipped == {"pos_embed", "decoder_pos_embed", "norm_stats"}
    for name, value in back.items():
        np.testing.assert_array_equal(value, ref.state_dict[name], err_msg=name)


def test_positions_are_the_authors_layout(ref):
    """Time in the first half of the channels, frequency in the second; CLS row zero."""
    assert convert.check_positions(ref.state_dict, (5, 13)) < 1e-6
    pos = ref.state_dict["pos_embed"][0, 1:]
    pos_t3 = pos[3::13]                              # time column 3, every frequency row
    np.testing.assert_array_equal(pos_t3[:, :32], np.broadcast_to(pos_t3[:1, :32], (5, 32)))
    with pytest.raises(ValueError, match="differs from our sin-cos"):
        swapped = dict(ref.state_dict, pos_embed=np.concatenate(
            [ref.state_dict["pos_embed"][..., 32:], ref.state_dict["pos_embed"][..., :32]], -1))
        convert.check_positions(swapped, (5, 13))


def test_mapping_names_a_missing_or_foreign_key(m2d):
    partial = {k: v for k, v in m2d.state_dict.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match="blocks.1.mlp.fc2.bias"):
        torch_layout.from_torch(partial, "m2d")
    with pytest.raises(ValueError, match="target_blocks"):
        torch_layout.from_torch(m2d.state_dict, "msm_mae")  # an M2D checkpoint is not an MSM-MAE


def test_encoder_forward(ref):
    enc = ref.model.encoder
    ref.close(enc.patch_embed(masking.patchify(ref.x, (16, 16))), "fwd/patch_embed_out")
    tokens = enc.embed(ref.x)
    ref.close(tokens, "fwd/tokens_pos")
    ref.close(jnp.take_along_axis(tokens, ref.mask.ids_keep[..., None], 1), "fwd/x_visible")
    ref.close(enc(ref.x, ref.mask.ids_keep), "fwd/latent")


def test_m2d_predictor_target_and_loss(m2d):
    model = m2d.model
    latent = model.encoder(m2d.x, m2d.mask.ids_keep)
    pred_all = model.predictor(latent, m2d.mask.ids_restore)
    m2d.close(pred_all, "fwd/pred_all")
    pred = jnp.take_along_axis(pred_all, m2d.mask.ids_mask[..., None], 1)
    m2d.close(pred, "fwd/pred_masked")
    tokens = model.encoder.embed(m2d.x)
    m2d.close(jnp.take_along_axis(tokens, m2d.mask.ids_mask[..., None], 1), "fwd/x_targ")
    raw = objectives.make_objective("m2d", size=TINY, input_shape=(80, 208),
                                    decoder=HEADS["m2d"], norm_target=False, rngs=nnx.Rngs(0))
    raw = nnx.merge(nnx.graphdef(raw), m2d.params)
    m2d.close(raw.target_outputs(m2d.x, m2d.mask, m2d.target), "fwd/target_encoder_out")
    target = model.target_outputs(m2d.x, m2d.mask, m2d.target)
    m2d.close(target, "fwd/target_standardised")
    m2d.close(objectives.l2_normalise(target), "fwd/target_unit")
    m2d.close(objectives.l2_normalise(pred), "fwd/pred_unit")
    loss, _ = model.loss(m2d.x, m2d.mask, m2d.target)
    np.testing.assert_allclose(float(loss), float(m2d.z["loss"]), rtol=1e-5)


def test_msm_mae_decoder_target_and_loss(mae):
    model = mae.model
    latent = model.encoder(mae.x, mae.mask.ids_keep)
    mae.close(model.decoder.embed(latent), "fwd/decoder_embed_out")
    mae.close(model.decoder.prepare(latent, mae.mask.ids_restore), "fwd/decoder_in")
    pred = model.predict(mae.x, mae.mask)
    mae.close(pred, "fwd/pred_all")
    mae.close(masking.patchify(mae.x, (16, 16)), "fwd/target_patches", atol=0, rtol=0)
    # near-constant patches amplify float32 rounding up to ~1e-4 (their README, surprise 5)
    target = model.reconstruction_target(mae.x)
    mae.close(target, "fwd/target", atol=2e-4)
    per_patch = jnp.mean(jnp.square(pred - target), -1)
    mae.close(per_patch, "fwd/loss_per_patch", atol=2e-5)
    loss, _ = model.loss(mae.x, mae.mask)
    np.testing.assert_allclose(float(loss), float(mae.z["loss"]), rtol=1e-5)
    # a biased variance (numpy's default) is visibly another target
    patches = masking.patchify(mae.x, (16, 16))
    biased = (patches - patches.mean(-1, keepdims=True)) / jnp.sqrt(
        patches.var(-1, keepdims=True) + 1e-6)
    assert np.abs(np.asarray(biased) - mae.z["fwd/target"]).max() > 1e-2


@pytest.mark.slow
def test_every_gradient(ref):
    loss, grads = jax.value_and_grad(ref.loss_fn)(ref.params)
    np.testing.assert_allclose(float(loss), float(ref.z["loss"]), rtol=1e-5)
    theirs = {k[len("grads/"):]: v for k, v in ref.z.items() if k.startswith("grads/")}
    ours = ref.torch_names(grads)
    assert set(ours) == set(theirs)  # every trainable tensor, nothing more
    for name, g in ours.items():
        scale = np.abs(theirs[name]).max()
        np.testing.assert_allclose(g, theirs[name], rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=name)
    np.testing.assert_allclose(float(optax.tree.norm(grads)),
                               float(ref.z["train_step/grad_norm"]), rtol=1e-5)


def test_weight_decay_groups_are_timms(ref):
    mask = build.decay_mask(ref.params)
    decayed = {name for name, path, _ in torch_layout.table(ref.state_dict, ref.objective)
               if path[0] == "params" and torch_layout._get(mask, path[1:])}
    trainable = {k[len("grads/"):] for k in ref.z if k.startswith("grads/")}
    assert decayed == set(json.loads(str(ref.z["decay_param_names"])))
    assert trainable - decayed == set(json.loads(str(ref.z["no_decay_param_names"])))
    legacy = build.decay_mask(ref.params, decay_tokens=False)
    assert not legacy["encoder"]["cls_token"] and legacy["encoder"]["patch_embed"]["kernel"]


def _setup(ref):
    """Their step: lr 1e-3, AdamW(0.9, 0.95, eps 1e-8, wd 0.05 on timm's groups), clip 3.0;
    M2D's EMA at global step 20 of 300 (their fixture's placement)."""
    cfg = config_lib.base(ref.objective, "random")
    schedule = optax.constant_schedule(float(ref.z["train_step/lr"]))
    return build.Setup(cfg, ref.graphdef, None, build.make_optimizer(cfg, schedule),
                         schedule, ref.objective == "m2d", steps_per_epoch=1, total_steps=300)


def _initial_state(ref, setup):
    return dict(params=ref.params, opt_state=setup.optimizer.init(ref.params),
                target=ref.target or {}, step=jnp.int32(20))


def _after_step(ref, new):
    """(ours, theirs) after one step, by their names: online parameters, and M2D's target."""
    theirs = {k[len("after_step/"):]: v for k, v in ref.z.items() if k.startswith("after_step/")}
    ours = torch_layout.to_torch(new["params"], new["target"] or None, ref.objective, (16, 16))
    assert set(ours) == set(theirs)
    return ours, theirs


def test_optimizer_and_ema_step_on_their_gradients(ref):
    """Their gradients through our clipping, AdamW groups and EMA give their weights."""
    setup = _setup(ref)
    grads = {k[len("grads/"):]: v for k, v in ref.z.items() if k.startswith("grads/")}
    grads = torch_layout.from_torch({**ref.state_dict, **grads}, ref.objective)["params"]
    new = jax.jit(lambda s, g: step_lib.apply_gradients(setup, s, g))(
        _initial_state(ref, setup), grads)
    ours, theirs = _after_step(ref, new)
    for name, value in ours.items():
        np.testing.assert_allclose(value, theirs[name], atol=2e-7, rtol=0, err_msg=name)
    if ref.objective == "m2d":
        np.testing.assert_allclose(float(objectives.ema_rate(20, 300)),
                                   float(ref.z["train_step/one_minus_ema_decay"]), rtol=1e-6)
        assert set(new["target"]) == {"blocks", "norm"}  # the rest of the target is online


def test_one_full_training_step(ref):
    """Our gradients, our step. AdamW's first step is lr * g / (|g| + 1e-8): where their
    gradient is float32 noise at or below 1e-6 (e.g. key biases, whose true gradient is 0)
    the noise decides the step, so those entries are only bounded by the lr."""
    setup = _setup(ref)
    new, metrics = jax.jit(lambda s: step_lib.update(setup, s, ref.x, ref.mask))(
        _initial_state(ref, setup))
    np.testing.assert_allclose(float(metrics["loss"]), float(ref.z["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]),
                               float(ref.z["train_step/grad_norm"]), rtol=1e-5)
    ours, theirs = _after_step(ref, new)
    lr = float(ref.z["train_step/lr"])
    for name, value in ours.items():
        g = ref.z.get(f"grads/{name}")
        firm = np.abs(g) > 1e-6 if g is not None else np.ones(value.shape, bool)
        assert firm.mean() > 0.5, name
        np.testing.assert_allclose(value[firm], theirs[name][firm], atol=1e-6, rtol=0,
                                   err_msg=name)
        assert np.abs(value - theirs[name]).max() <= 2.1 * lr, name


def test_m2d_target_starts_independent_of_the_online_encoder():
    model = objectives.make_objective("m2d", size=TINY, input_shape=(80, 64),
                                      decoder=HEADS["m2d"], rngs=nnx.Rngs(0))
    online = nnx.to_pure_dict(nnx.state(model.encoder, nnx.Param))
    target = model.target_init(seed=0)
    assert set(target) == {"blocks", "norm"}
    w_t, w_o = target["blocks"][0]["fc1"]["kernel"], online["blocks"][0]["fc1"]["kernel"]
    assert w_t.shape == w_o.shape and not np.allclose(w_t, w_o)
    bound = np.sqrt(6 / (64 + 256))                  # xavier-uniform, as their _init_weights
    assert np.abs(w_t).max() <= bound and np.abs(w_t).max() > 0.9 * bound
    np.testing.assert_array_equal(target["norm"]["scale"], 1.0)
    np.testing.assert_array_equal(target["blocks"][1]["attn"]["qkv"]["bias"], 0.0)
    np.testing.assert_array_equal(target["blocks"][0]["fc1"]["kernel"],
                                  model.target_init(seed=0)["blocks"][0]["fc1"]["kernel"])
    full = objectives.make_objective("m2d", size=TINY, input_shape=(80, 64),
                                     decoder=HEADS["m2d"], target_mode="ema_encoder",
                                     rngs=nnx.Rngs(0)).target_init(seed=0)
    assert set(full) == set(online)
    np.testing.assert_array_equal(full["patch_embed"]["kernel"], online["patch_embed"]["kernel"])


def test_front_end_matches_theirs(m2d):
    """Reflect padding, periodic Hann, Slaney mel: what is left is float32 STFT rounding,
    largest (about 5e-4 in log) at bins near the eps floor."""
    for wave, ref in [*zip(m2d.z["wave"], m2d.z["lms_raw_full"][:, 0]),
                      *zip(m2d.z["portable/wave"], m2d.z["portable/lms_raw"][:, 0])]:
        ours = audio.LogMelFrontEnd()(wave)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
        assert np.median(np.abs(ours - ref)) < 1e-5
    zeros = audio.LogMelFrontEnd(pad_mode="constant")(m2d.z["wave"][0])
    assert np.abs(zeros - m2d.z["lms_raw_full"][0, 0]).max() > 0.5  # the old default differs


def test_runtime_features_match_theirs(m2d):
    """Their PortableM2D on two 10 s clips: 208-frame chunks, the last one 176 frames with
    truncated positions, features [T', 5 * 64]; and the clip embedding (time mean)."""
    stats = data.NormStats(float(m2d.z["norm_mean"]), float(m2d.z["norm_std"]))
    np.testing.assert_allclose(m2d.state_dict["norm_stats"], [stats.mean, stats.std])
    emb = Embedder(m2d.model.encoder, stats)
    for i in range(2):
        feats = emb.time_features(m2d.z["portable/lms_raw"][i, 0])
        np.testing.assert_allclose(feats, m2d.z["portable/features"][i], atol=2e-4, rtol=0)
        np.testing.assert_allclose(emb.clip_embedding(m2d.z["portable/lms_raw"][i, 0]),
                                   m2d.z["portable/scene_embeddings"][i], atol=2e-4, rtol=0)
        # from the waveform, through our front end
        np.testing.assert_allclose(emb.from_waveform(m2d.z["portable/wave"][i], 16000),
                                   m2d.z["portable/scene_embeddings"][i], atol=2e-4, rtol=0)
