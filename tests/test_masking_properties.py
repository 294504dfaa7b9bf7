"""Invariants every sampler must hold, for any grid, ratio and batch size (hypothesis)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from dwm_jax import masking

STRATEGIES = [
    ("random", {}),
    ("time_freq", {}),
    ("time_freq", {"time_ratio": 0.2, "freq_ratio": 0.5}),
    ("block", {"min_patches": 2}),
    ("inverse_block", {"block_size": 1, "adjust": 0.0}),
    ("inverse_block", {"block_size": 2, "adjust": 0.07}),
    ("dispersion", {}),
    ("dispersion", {"metric": "variance"}),
    ("dispersion", {"deterministic": True}),
    ("dispersion", {"granularity": "frequency"}),
    ("sgim", {"pca_iters": 8}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in STRATEGIES]


@st.composite
def setups(draw):
    fp, tp = draw(st.integers(1, 6)), draw(st.integers(2, 40))
    ph, pw = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 4]))
    n = fp * tp
    num_keep = draw(st.integers(1, n - 1))
    # a ratio whose int(N * (1 - ratio)) is exactly num_keep
    ratio = 1.0 - (num_keep + 0.5) / n
    batch = draw(st.integers(1, 5))
    hint = draw(st.sampled_from([0.0, 0.3, 1.0]))
    return (fp * ph, tp * pw), (ph, pw), ratio, batch, hint, num_keep


def build(name, options, shape, patch, ratio):
    try:
        return masking.make_masker(name, input_shape=shape, patch_size=patch,
                                   mask_ratio=ratio, **options)
    except ValueError as e:  # e.g. a block that cannot fit this grid: construction refuses
        assume(False)
        raise AssertionError from e


def run(masker, key, x, hint):
    """One jitted call (one compile per grid, cheaper than eager dispatch of every op)."""
    feats = np.random.default_rng(7).standard_normal((x.shape[0], masker.num_patches, 6))
    return jax.jit(lambda k, x, f: masker(k, x, hint_ratio=hint, features=f))(key, x, feats)


def check_mask(m: masking.Mask, batch, n, k):
    ids_keep, ids_mask = np.asarray(m.ids_keep), np.asarray(m.ids_mask)
    restore, mask = np.asarray(m.ids_restore), np.asarray(m.mask)
    assert ids_keep.shape == (batch, k) and ids_mask.shape == (batch, n - k)
    assert restore.shape == (batch, n) and mask.shape == (batch, n)
    shuffle = np.concatenate([ids_keep, ids_mask], axis=1)
    for b in range(batch):
        assert sorted(shuffle[b]) == list(range(n)), "ids_shuffle is not a permutation"
        np.testing.assert_array_equal(shuffle[b][restore[b]], np.arange(n))
        np.testing.assert_array_equal(restore[b], np.argsort(shuffle[b]))
        assert mask[b].sum() == n - k
        assert np.all(mask[b][ids_keep[b]] == 0) and np.all(mask[b][ids_mask[b]] == 1)
        np.testing.assert_array_equal(mask[b], (restore[b] >= k).astype(np.float32))


@pytest.mark.parametrize("name,options", STRATEGIES, ids=IDS)
@given(setup=setups(), seed=st.integers(0, 2**31 - 1))
def test_exact_count_and_consistent_ids(name, options, setup, seed):
    shape, patch, ratio, batch, hint, k = setup
    masker = build(name, options, shape, patch, ratio)
    assert masker.num_keep == k
    x = np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)
    m = run(masker, jax.random.key(seed + 1), x, hint)
    check_mask(m, batch, masker.num_patches, k)


@pytest.mark.parametrize("name,options", STRATEGIES, ids=IDS)
def test_determinism_and_key_dependence(name, options):
    masker = masking.make_masker(name, mask_ratio=0.7, **options)
    x = jax.random.normal(jax.random.key(0), (8, 80, 608))
    # sgim and deterministic DWM are deterministic in the data; hints make them random
    hint = 0.5 if (name == "sgim" or options.get("deterministic")) else 0.0
    a = run(masker, jax.random.key(1), x, hint)
    b = run(masker, jax.random.key(1), x, hint)
    c = run(masker, jax.random.key(2), x, hint)
    for fa, fb in zip(a, b):
        np.testing.assert_array_equal(fa, fb)
    assert not np.array_equal(a.mask, c.mask), "different keys gave identical masks"
    # different samples of one batch get different masks
    assert not np.array_equal(a.mask[0], a.mask[1])


@pytest.mark.parametrize("name,options", STRATEGIES, ids=IDS)
def test_jit_matches_eager_and_traced_hint(name, options):
    masker = masking.make_masker(name, input_shape=(32, 96), patch_size=(8, 8),
                                 mask_ratio=0.6, **options)
    x = jax.random.normal(jax.random.key(3), (3, 32, 96))
    feats = jax.random.normal(jax.random.key(4), (3, masker.num_patches, 5))
    key = jax.random.key(5)

    @jax.jit
    def jitted(key, x, r, feats):
        return masker(key, x, hint_ratio=r, features=feats)

    eager = masker(key, x, hint_ratio=0.25, features=feats)
    traced = jitted(key, x, jnp.float32(0.25), feats)
    for fe, ft in zip(eager, traced):
        np.testing.assert_array_equal(fe, ft)
    # traced hint ratios 0 and 1 still give exact masks
    for r in (0.0, 1.0):
        check_mask(jitted(key, x, jnp.float32(r), feats), 3, masker.num_patches,
                   masker.num_keep)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_low_precision_input(dtype):
    masker = masking.make_masker("dispersion", mask_ratio=0.7)
    x = jax.random.normal(jax.random.key(0), (2, 80, 608)).astype(dtype)
    check_mask(masker(jax.random.key(1), x), 2, 190, 57)


@given(n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_select_lowest_matches_sort(n, seed, data):
    """The sort-free selection equals argsort's first k (ties: exactly k, lowest values)."""
    k = data.draw(st.integers(0, n))
    rng = np.random.default_rng(seed)
    distinct = rng.standard_normal((3, n)).astype(np.float32) * 10.0 ** rng.integers(-30, 30)
    sel = np.asarray(masking.select_lowest(jnp.asarray(distinct), k))
    expect = np.zeros_like(sel)
    np.put_along_axis(expect, np.argsort(distinct, axis=1, kind="stable")[:, :k], True, 1)
    np.testing.assert_array_equal(sel, expect)
    tied = rng.integers(-2, 3, (3, n)).astype(np.float32)  # many ties, negatives, zeros
    for tb in (None, jax.random.key(seed)):
        sel = np.asarray(masking.select_lowest(jnp.asarray(tied), k, tiebreak_key=tb))
        assert np.all(sel.sum(1) == k)
        for row, s in zip(tied, sel):
            if 0 < k < n:
                assert row[s].max() <= row[~s].min()


def test_select_lowest_per_row_k_and_special_values():
    score = jnp.asarray([[jnp.inf, -jnp.inf, 0.0, -0.0, 1e-38, -1e-38]] * 3)
    sel = np.asarray(masking.select_lowest(score, jnp.asarray([0, 2, 6])))
    np.testing.assert_array_equal(sel.sum(1), [0, 2, 6])
    np.testing.assert_array_equal(sel[1], [False, True, False, False, False, True])


def test_patch_order_is_frequency_major():
    """Patch i = f_row * Tp + t_col, the order of a ViT patch embedding's flatten."""
    f, t, ph, pw = 8, 12, 4, 3
    x = jnp.arange(f * t, dtype=jnp.float32).reshape(1, f, t)
    p = np.asarray(masking.patchify(x, (ph, pw)))
    fp, tp = f // ph, t // pw
    for i in range(fp * tp):
        r, c = divmod(i, tp)
        np.testing.assert_array_equal(p[0, i], np.asarray(x)[0, r * ph:(r + 1) * ph,
                                                               c * pw:(c + 1) * pw].ravel())
    np.testing.assert_array_equal(masking.unpatchify(p, (fp, tp), (ph, pw)), x)


def numpy_dispersion(x, patch, metric, granularity):
    """Independent float64 reference of the dispersion weights, [B, N] frequency-major."""
    b, f, t = x.shape
    ph, pw = patch
    x = x.astype(np.float64)
    if granularity == "frequency":
        dev = x - x.mean(-1, keepdims=True)
        per_bin = (np.abs(dev) if metric == "mad" else dev ** 2).mean(-1)  # [B, F]
        per_row = per_bin.reshape(b, f // ph, ph).mean(-1)
        return np.repeat(per_row, t // pw, axis=1)
    p = x.reshape(b, f // ph, ph, t // pw, pw).transpose(0, 1, 3, 2, 4).reshape(b, -1, ph * pw)
    dev = p - p.mean(-1, keepdims=True)
    return (np.abs(dev) if metric == "mad" else dev ** 2).mean(-1)


@given(fp=st.integers(1, 5), tp=st.integers(1, 9), ph=st.integers(1, 17),
       pw=st.integers(1, 17), batch=st.integers(1, 3),
       metric=st.sampled_from(["mad", "variance"]),
       granularity=st.sampled_from(["patch", "frequency"]), seed=st.integers(0, 2**16))
def test_patch_dispersion_matches_numpy(fp, tp, ph, pw, batch, metric, granularity, seed):
    # Odd and even patch sizes exercise every shape of the pairwise-sum tree.
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((batch, fp * ph, tp * pw)) * rng.uniform(0.1, 10)
         + rng.uniform(-50, 50)).astype(np.float32)
    got = jax.jit(masking.patch_dispersion, static_argnums=(1, 2, 3))(
        x, (ph, pw), metric, granularity)
    ref = numpy_dispersion(x, (ph, pw), metric, granularity)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-4, atol=1e-4 * ref.max() + 1e-6)
