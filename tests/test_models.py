"""ViT encoder, decoder/predictor and objectives: golden sizes, shapes, reference losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dwm_jax import masking, objectives
from dwm_jax.models import vit
from dwm_jax import build

# Encoder parameters on a 1-channel 16 x 16 patch embedding (80 x 608 input). A size without a
# golden count fails test_every_size_has_a_golden_count.
GOLDEN_PARAMS = {
    "micro": 116_608,
    "tiny": 5_388_288,
    "small": 21_393_408,
    "base": 85_254_144,
    "large": 302_575_616,
}


def _count(module):
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_every_size_has_a_golden_count():
    assert set(vit.SIZES) == set(GOLDEN_PARAMS)


@pytest.mark.parametrize("size", sorted(GOLDEN_PARAMS))
def test_golden_parameter_counts(size):
    enc = nnx.eval_shape(lambda: vit.Encoder(size, rngs=nnx.Rngs(0)))
    assert _count(enc) == GOLDEN_PARAMS[size]
    s = vit.SIZES[size]  # patch embed + CLS + blocks + final LN, by formula
    block = 4 * s.dim * s.dim + 4 * s.dim + 2 * 4 * s.dim * s.dim + 5 * s.dim + 4 * s.dim
    assert GOLDEN_PARAMS[size] == 256 * s.dim + s.dim + s.dim + s.depth * block + 2 * s.dim


def test_sincos_positions_put_time_first():
    """Tokens frequency-major; channels 0-31 encode the time column, 32-63 the frequency row
    (the authors' layout; tests/test_reference.py compares the values with theirs)."""
    emb = vit.sincos_2d(64, (5, 38))
    assert emb.shape == (190, 64)
    row2 = emb[2 * 38:3 * 38]  # frequency row 2, all time columns
    np.testing.assert_allclose(row2[:, 32:], np.broadcast_to(row2[:1, 32:], (38, 32)))
    col7 = emb[7::38]          # time column 7, all frequency rows
    np.testing.assert_allclose(col7[:, :32], np.broadcast_to(col7[:1, :32], (5, 32)))
    np.testing.assert_allclose(emb[0, 16:32], 1.0)  # cos(0)
    np.testing.assert_allclose(emb[5, 0], np.sin(5.0), rtol=1e-6)  # time 5, first sine


@pytest.fixture(scope="module")
def batch():
    x = jax.random.normal(jax.random.key(0), (3, 80, 64))
    masker = masking.make_masker("random", input_shape=(80, 64), mask_ratio=0.7)
    return x, masker(jax.random.key(1), x)  # N = 20, K = 6


def test_encoder_runs_on_visible_tokens_only(batch):
    x, mask = batch
    enc = vit.Encoder("micro", input_shape=(80, 64), rngs=nnx.Rngs(0))
    out = enc(x, mask.ids_keep)
    assert out.shape == (3, 1 + 6, 64)
    full = enc(x)
    assert full.shape == (3, 1 + 20, 64)
    # the visible tokens entering the blocks are exactly the gathered patch embeddings
    gathered = jnp.take_along_axis(enc.embed(x), mask.ids_keep[..., None], axis=1)
    manual = enc.patch_embed(masking.patchify(x, (16, 16))) + vit.sincos_2d(64, (5, 4))
    np.testing.assert_allclose(gathered, jnp.take_along_axis(manual, mask.ids_keep[..., None],
                                                             axis=1), atol=1e-5)
    with pytest.raises(ValueError, match=r"expects input \[B, 80, 64\]"):
        enc(jnp.zeros((1, 80, 608)))
    with pytest.raises(ValueError, match=r"shorter multiple of 16"):
        enc(jnp.zeros((1, 80, 40)))
    # a shorter input (the runtime's last chunk) takes the first time columns' positions
    short = enc.embed(x[:, :, :32])
    np.testing.assert_allclose(short, enc.embed(x).reshape(3, 5, 4, 64)[:, :, :2].reshape(
        3, 10, 64), atol=1e-5)


def test_msm_mae_shapes_and_norm_pix_loss(batch):
    x, mask = batch
    model = objectives.make_objective("msm_mae", size="micro", input_shape=(80, 64),
                                      decoder=dict(dim=32, depth=1, heads=2), rngs=nnx.Rngs(0))
    pred = model.predict(x, mask)
    assert pred.shape == (3, 20, 256)
    loss, _ = model.loss(x, mask)
    p = np.asarray(masking.patchify(x, (16, 16)))
    p = (p - p.mean(-1, keepdims=True)) / np.sqrt(p.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = ((np.asarray(pred) - p) ** 2).mean(-1)
    m = np.asarray(mask.mask)
    np.testing.assert_allclose(loss, (per_patch * m).sum() / m.sum(), rtol=1e-5)


def test_m2d_shapes_target_and_loss(batch):
    x, mask = batch
    model = objectives.make_objective("m2d", size="micro", input_shape=(80, 64),
                                      decoder=dict(dim=32, depth=1, heads=2), rngs=nnx.Rngs(0))
    target = model.target_init()
    tgt = model.target_outputs(x, mask, target)
    assert tgt.shape == (3, 14, 64)  # the masked patches only
    # the target network: online patch embedding and CLS, its own blocks and norm, on ids_mask,
    # then standardised per token (unbiased variance)
    online = nnx.to_pure_dict(nnx.state(model.encoder, nnx.Param))
    enc = nnx.merge(nnx.graphdef(model.encoder), {**online, **target})
    raw = np.asarray(enc(x, mask.ids_mask)[:, 1:])
    expect = (raw - raw.mean(-1, keepdims=True)) / np.sqrt(raw.var(-1, ddof=1, keepdims=True)
                                                          + 1e-6)
    np.testing.assert_allclose(tgt, expect, atol=1e-4)
    loss, _ = model.loss(x, mask, target)
    assert loss.shape == () and 0.0 <= float(loss) <= 4.0
    # 2 - 2 cos by hand
    pred = model.predictor(model.encoder(x, mask.ids_keep), mask.ids_restore)
    pred = np.take_along_axis(np.asarray(pred), np.asarray(mask.ids_mask)[..., None], axis=1)
    t = np.asarray(tgt)
    cos = (pred * t).sum(-1) / np.linalg.norm(pred, axis=-1) / np.linalg.norm(t, axis=-1)
    np.testing.assert_allclose(loss, np.mean(2 - 2 * cos), rtol=1e-4)
    # no gradient reaches the online encoder through the target path
    def target_only(params):
        m = nnx.merge(nnx.graphdef(model), params)
        return jnp.sum(m.target_outputs(x, mask, target))
    grads = jax.grad(target_only)(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="target"):
        model.loss(x, mask)
    with pytest.raises(ValueError, match="target_mode"):
        objectives.make_objective("m2d", size="micro", target_mode="copy", rngs=nnx.Rngs(0))


def test_ema_update_and_decay_schedule():
    t = {"w": jnp.ones(3)}
    o = {"w": jnp.zeros(3)}
    np.testing.assert_allclose(objectives.ema_update(t, o, 0.1)["w"], 0.9)
    # their ema_decay_sched: step / (total_steps - 1), so the last step (99) reaches the end;
    # the rate 1 - decay keeps its digits in float32
    assert float(objectives.ema_rate(0, 100)) == pytest.approx(5e-5, rel=1e-6)
    assert float(objectives.ema_rate(99, 100)) == pytest.approx(1e-5, rel=1e-6)
    assert float(objectives.ema_rate(33, 100)) == pytest.approx(3.6666667e-5, rel=1e-6)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters(batch):
    x, mask = batch
    kw = dict(size="micro", input_shape=(80, 64), decoder=dict(dim=32, depth=1, heads=2))
    m32 = objectives.make_objective("m2d", rngs=nnx.Rngs(0), **kw)
    m16 = objectives.make_objective("m2d", rngs=nnx.Rngs(0), dtype=jnp.bfloat16, **kw)
    assert {a.dtype for a in jax.tree.leaves(nnx.state(m16, nnx.Param))} == {np.dtype("float32")}
    assert m16.encoder(x).dtype == jnp.bfloat16
    l32, _ = m32.loss(x, mask, m32.target_init())
    l16, _ = m16.loss(x, mask, m16.target_init())
    assert abs(float(l32) - float(l16)) < 0.05


def test_unknown_objective_and_bad_widths():
    with pytest.raises(ValueError, match="unknown objective 'mae'"):
        objectives.make_objective("mae")
    with pytest.raises(ValueError, match="not divisible by 5 heads"):
        vit.Attention(64, 5, dtype=jnp.float32, rngs=nnx.Rngs(0))


def _loss_and_grads(objective, batch, **switches):
    x, mask = batch
    kw = dict(size="micro", input_shape=(80, 64), decoder=dict(dim=32, depth=2, heads=2))
    model = objectives.make_objective(objective, rngs=nnx.Rngs(0), **kw, **switches)
    graphdef, params = nnx.split(model, nnx.Param)
    target = model.target_init() if model.uses_target else None

    def loss(p):
        return nnx.merge(graphdef, p).loss(x, mask, target)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), jax.tree.leaves(vit.unstack_layers(nnx.to_pure_dict(grads)))


@pytest.mark.parametrize("objective", ["m2d", "msm_mae"])
@pytest.mark.parametrize("switch", [dict(remat="full"), dict(remat="dots_saveable"),
                                    dict(remat="dots_with_no_batch_dims_saveable"),
                                    dict(attention="xla"), dict(dtype=jnp.bfloat16),
                                    dict(scan=True), dict(scan=True, remat="full")])
@pytest.mark.slow
def test_accelerator_switches_give_the_default_loss_and_gradients(objective, switch, batch):
    """Rematerialisation recomputes the same numbers; explicit 'xla' attention is the
    default; scanned layers keep one parameter subtree per block (the same tree) and give the
    same numbers; bfloat16 compute is close (its own, looser tolerance)."""
    want_loss, want = _loss_and_grads(objective, batch)
    got_loss, got = _loss_and_grads(objective, batch, **switch)
    assert [a.shape for a in got] == [a.shape for a in want]
    bf16 = "dtype" in switch
    assert got_loss == pytest.approx(want_loss, rel=3e-2 if bf16 else 1e-6)
    for a, b in zip(want, got):
        scale = float(np.abs(a).max()) + 1e-12
        tol = 0.1 if bf16 else 1e-5
        assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) <= tol * scale


@pytest.mark.parametrize("depth", [2, 6])
def test_scanned_layers_trace_one_block_whatever_the_depth(depth):
    """With scan the encoder's program holds one scan over the blocks (one block's ops);
    without it the program grows with each block."""
    def equations(scan):
        model = vit.Encoder(f"32x{depth}x2", input_shape=(80, 64), scan=scan, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda p, x: nnx.merge(graphdef, p)(x))(
            params, jnp.zeros((1, 80, 64)))
        return [str(e.primitive) for e in jaxpr.jaxpr.eqns]

    scanned, unrolled = equations(True), equations(False)
    assert scanned.count("scan") == 1 and "scan" not in unrolled
    assert unrolled.count("dot_general") >= 4 * depth    # qkv, proj, fc1, fc2 per block
    assert scanned.count("dot_general") < 4               # only outside the blocks


def test_scanned_layout_is_the_per_layer_one_stacked(batch):
    """The same seed gives the same weights in either layout (stacked on a layer axis), the
    conversions are inverse, and weight decay skips the same (bias, norm) parameters."""
    kw = dict(size="micro", input_shape=(80, 64), decoder=dict(dim=32, depth=2, heads=2))
    per_layer, scanned = (nnx.to_pure_dict(nnx.state(
        objectives.make_objective("m2d", rngs=nnx.Rngs(0), scan=scan, **kw), nnx.Param))
        for scan in (False, True))
    assert scanned["encoder"]["blocks"]["attn"]["qkv"]["bias"].shape == (2, 3 * 64)
    assert sorted(per_layer["encoder"]["blocks"]) == [0, 1]
    jax.tree.map(np.testing.assert_array_equal, vit.stack_layers(per_layer), scanned)
    jax.tree.map(np.testing.assert_array_equal, vit.unstack_layers(scanned), per_layer)
    jax.tree.map(np.testing.assert_array_equal, vit.stack_layers(scanned), scanned)  # as is
    pass
    decay = build.decay_mask(scanned)
    assert decay["encoder"]["blocks"]["fc1"]["kernel"] and not decay["encoder"]["blocks"][
        "fc1"]["bias"] and not decay["encoder"]["blocks"]["norm1"]["scale"]
    stacked_mask = vit.stack_layers(build.decay_mask(per_layer))
    assert [bool(np.all(a)) for a in jax.tree.leaves(stacked_mask)] == jax.tree.leaves(decay)


def test_unknown_switch_values_are_refused():
    with pytest.raises(ValueError, match="attention must be one of"):
        vit.Encoder("micro", input_shape=(80, 64), attention="flash", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="remat must be one of"):
        vit.run_blocks([], jnp.zeros((1, 2, 4)), "sometimes")
