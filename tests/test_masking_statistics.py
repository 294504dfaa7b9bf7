"""The samplers draw from the distributions the paper specifies (checked against
independent NumPy references), and their masks have the shapes each method promises."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwm_jax import masking

# Z-score bound for frequency comparisons: seeds are fixed, so this is deterministic; 4.5
# sigma leaves room for the ~10 comparisons of a test without hiding a real bias.
Z = 4.5


# ---------------------------------------------------------------- NumPy references

def inclusion_probabilities(weights, num_draws):
    """Exact P(item i is drawn) for sequential sampling without replacement, p ~ weights.
    Dynamic programming over the subsets drawn so far (fine for N <= 12)."""
    w = np.asarray(weights, np.float64)
    n = len(w)
    prob = {0: 1.0}  # bitmask of drawn items -> probability
    for _ in range(num_draws):
        nxt = {}
        for drawn, p in prob.items():
            free = [i for i in range(n) if not drawn >> i & 1]
            total = sum(w[i] for i in free)
            for i in free:
                nxt[drawn | 1 << i] = nxt.get(drawn | 1 << i, 0.0) + p * w[i] / total
        prob = nxt
    return np.array([sum(p for s, p in prob.items() if s >> i & 1) for i in range(n)])


def reference_dwm_with_hints(rng, weights, num_keep, hint_ratio, samples):
    """The paper's procedure step by step: sequential weighted draws, then the hint swap."""
    n = len(weights)
    num_masked = n - num_keep
    n_h = int(num_masked * hint_ratio)
    freq = np.zeros(n)
    for _ in range(samples):
        free, masked = list(range(n)), []
        for _ in range(num_masked):
            p = np.array([weights[i] for i in free])
            masked.append(free.pop(rng.choice(len(free), p=p / p.sum())))
        hints = list(rng.choice(masked, n_h, replace=False))
        pool = [i for i in range(n) if i not in masked] + hints
        final = [i for i in masked if i not in hints] + list(rng.choice(pool, n_h, replace=False))
        freq[final] += 1
    return freq / samples


def mad_patches(mads, ph=2, pw=2):
    """x [1, F, T] on a 2 x 4 grid whose patch i has mean absolute deviation mads[i]."""
    pattern = np.array([[1.0, -1.0], [-1.0, 1.0]])
    x = np.zeros((2 * ph, 4 * pw), np.float32)
    for i, a in enumerate(mads):
        r, c = divmod(i, 4)
        x[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = 3.0 + a * pattern
    return x[None]


def frequencies(masker, x, samples, seed=0, **kw):
    xb = jnp.broadcast_to(jnp.asarray(x), (samples, *x.shape[1:]))
    m = jax.jit(lambda k, x: masker(k, x, **kw))(jax.random.key(seed), xb)
    return np.asarray(m.mask).mean(0)


def assert_close_frequency(emp, ref, samples, ref_samples=None):
    """Binomial z-test per patch; a two-sample test when the reference is Monte Carlo."""
    var = ref * (1 - ref) / samples
    if ref_samples:
        var = var + ref * (1 - ref) / ref_samples
    z = np.abs(emp - ref) / np.sqrt(np.maximum(var, 1e-12))
    exact = var < 1e-10  # reference probability ~0 or ~1: at most a few stray events
    assert np.all(np.abs(emp - ref)[exact] <= 5 / samples), (emp, ref)
    assert np.all(z[~exact] < Z), f"max z {z[~exact].max():.2f}\nemp {emp}\nref {ref}"


# ---------------------------------------------------------------- DWM

MADS = [0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0]


@pytest.mark.parametrize("metric,power", [("mad", 1), ("variance", 2)])
def test_dwm_matches_sequential_weighted_sampling(metric, power):
    """Gumbel-top-k equals sequential sampling without replacement, p ~ dispersion."""
    x = mad_patches(MADS)
    masker = masking.make_masker("dispersion", input_shape=x.shape[1:], patch_size=(2, 2),
                                 mask_ratio=0.6, metric=metric)  # K = 3, 5 masked
    assert masker.num_keep == 3
    dispersion = np.asarray(masking.patch_dispersion(jnp.asarray(x), (2, 2), metric))[0]
    np.testing.assert_allclose(dispersion, np.power(MADS, power), rtol=1e-5)
    ref = inclusion_probabilities(np.power(MADS, power) + 1e-12, 5)
    samples = 40_000
    assert_close_frequency(frequencies(masker, x, samples), ref, samples)


def test_dwm_hints_match_literal_procedure():
    x = mad_patches(MADS)
    masker = masking.make_masker("dispersion", input_shape=x.shape[1:], patch_size=(2, 2),
                                 mask_ratio=0.6)
    rng = np.random.default_rng(0)
    for r_h in (0.4, 0.8):  # n_h = 2 and 4 of the 5 masked patches
        ref = reference_dwm_with_hints(rng, np.array(MADS) + 1e-12, 3, r_h, 4000)
        emp = frequencies(masker, x, 40_000, hint_ratio=r_h)
        assert_close_frequency(emp, ref, 40_000, ref_samples=4000)
        emp_traced = frequencies(masker, x, 40_000, seed=1, hint_ratio=jnp.float32(r_h))
        assert_close_frequency(emp_traced, ref, 40_000, ref_samples=4000)


def test_deterministic_dwm_masks_the_most_dispersed():
    x = mad_patches(MADS)
    masker = masking.make_masker("dispersion", input_shape=x.shape[1:], patch_size=(2, 2),
                                 mask_ratio=0.6, deterministic=True)
    m = masker(jax.random.key(0), jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(m.ids_mask)[0], [3, 4, 5, 6, 7])


def structured_batch(batch, seed=0):
    """[B, 80, 608] log-mel whose even patch rows are silent (constant) and odd rows noisy."""
    x = np.full((batch, 80, 608), -5.0, np.float32)
    noise = np.random.default_rng(seed).standard_normal((batch, 80, 608)).astype(np.float32)
    rows = np.repeat(np.arange(5) % 2 == 1, 16)
    x[:, rows] += noise[:, rows]
    loud = np.repeat(np.arange(5) % 2 == 1, 38)  # patch ids of the noisy rows
    return jnp.asarray(x), loud


@pytest.mark.slow
def test_hint_ratio_zero_prefers_dispersed_and_one_is_random():
    x, loud = structured_batch(512)
    masker = masking.make_masker("dispersion", mask_ratio=0.7)  # 133 masked of 190
    m0 = np.asarray(masker(jax.random.key(0), x, hint_ratio=0.0).mask)
    # 76 loud patches, all masked first; the remaining 57 masked of 114 silent ones
    assert m0[:, loud].mean() == 1.0
    np.testing.assert_allclose(m0[:, ~loud].mean(), 57 / 114, atol=1e-6)
    # r_h = 1: the same law as the random masker, per patch
    for r in (1.0, jnp.float32(1.0)):  # static short-circuit and the traced hint path
        m1 = np.asarray(masker(jax.random.key(1), x, hint_ratio=r).mask)
        assert_close_frequency(m1.mean(0), np.full(190, 133 / 190), 512)
        assert abs(m1[:, loud].mean() - m1[:, ~loud].mean()) < 0.02
    rnd = masking.make_masker("random", mask_ratio=0.7)
    mr = np.asarray(rnd(jax.random.key(2), x).mask)
    assert_close_frequency(mr.mean(0), np.full(190, 133 / 190), 512)


@pytest.mark.parametrize("options", [{}, {"deterministic": True}, {"metric": "variance"},
                                     {"granularity": "frequency"}])
@pytest.mark.slow
@pytest.mark.parametrize("value", [0.0, -7.5])
def test_silent_input_falls_back_to_uniform(options, value):
    masker = masking.make_masker("dispersion", mask_ratio=0.7, **options)
    x = jnp.full((2000, 80, 608), value, jnp.float32)
    m = masker(jax.random.key(0), x)
    assert not np.any(np.isnan(np.asarray(m.mask)))
    assert_close_frequency(np.asarray(m.mask).mean(0), np.full(190, 133 / 190), 2000)


def test_frequency_granularity_masks_active_bands():
    x, loud = structured_batch(256)
    masker = masking.make_masker("dispersion", mask_ratio=0.7, granularity="frequency")
    w = np.asarray(masking.patch_dispersion(x, (16, 16), "mad", "frequency"))
    assert np.all(np.ptp(w.reshape(256, 5, 38), axis=-1) == 0)  # one weight per patch row
    m = np.asarray(masker(jax.random.key(0), x).mask)
    assert m[:, loud].mean() == 1.0


# ---------------------------------------------------------------- inverse block

def visible_runs(mask, grid):
    """Mean length of the time run that a visible patch belongs to (patch-weighted)."""
    runs = []
    for row in (1 - np.asarray(mask)).reshape(-1, grid[1]).astype(int):
        runs += [len(list(g)) for v, g in itertools.groupby(row) if v]
    runs = np.asarray(runs)
    return (runs * runs).sum() / runs.sum()


def test_inverse_block_paint_matches_numpy():
    rng = np.random.default_rng(0)
    grid, b = (5, 38), 5
    centres = rng.integers(0, 190, (50, 3))
    got = np.asarray(masking.paint_squares(jnp.asarray(centres), grid, b))
    for s, cs in enumerate(centres):
        ref = np.zeros(grid, bool)
        for c in cs:
            r0, c0 = c // 38 - b // 2, c % 38 - b // 2
            ref[max(r0, 0):r0 + b, max(c0, 0):c0 + b] = True
        np.testing.assert_array_equal(got[s], ref)


def test_inverse_block_visible_patches_form_blocks():
    x = jnp.zeros((256, 80, 608))
    ibm = masking.make_masker("inverse_block", mask_ratio=0.7)
    assert ibm.options["num_centres"] == 2  # the paper's M2D setting: ~2 visible blocks
    rnd = masking.make_masker("random", mask_ratio=0.7)
    m_ibm = ibm(jax.random.key(0), x).mask
    assert np.all(np.asarray(m_ibm).sum(1) == 133)
    run_ibm, run_rnd = visible_runs(m_ibm, (5, 38)), visible_runs(rnd(jax.random.key(0), x).mask,
                                                                   (5, 38))
    assert run_ibm > 2 * run_rnd, (run_ibm, run_rnd)
    # Visible patches sit in the painted squares: far more have a visible time-neighbour.
    def with_visible_neighbour(mask):
        vis = 1 - np.asarray(mask).reshape(256, 5, 38)
        neighbour = np.zeros_like(vis)
        neighbour[..., 1:] += vis[..., :-1]
        neighbour[..., :-1] += vis[..., 1:]
        return (vis * (neighbour > 0)).sum() / vis.sum()
    assert with_visible_neighbour(m_ibm) > with_visible_neighbour(
        rnd(jax.random.key(1), x).mask) + 0.15


# ---------------------------------------------------------------- time / frequency

def test_time_freq_lines_are_whole_rows_and_columns():
    lines = np.asarray(masking.time_freq_lines(jax.random.key(0), jax.random.key(1), 64,
                                               (5, 38), 0.7, 0.3))
    for m in lines:
        full_cols, full_rows = m.all(0), m.all(1)
        assert full_cols.sum() >= 26 and full_rows.sum() >= 1
        np.testing.assert_array_equal(m, full_cols[None, :] | full_rows[:, None])
        if full_rows.sum() == 1:
            assert full_cols.sum() == 26


def test_time_freq_exact_case_is_lines_only():
    # 4 x 10 grid: 5 columns and 2 rows cover exactly 30 = N - K patches, nothing to trim
    masker = masking.make_masker("time_freq", input_shape=(4, 10), patch_size=(1, 1),
                                 mask_ratio=0.75, time_ratio=0.5, freq_ratio=0.5)
    m = np.asarray(masker(jax.random.key(0), jnp.zeros((64, 4, 10))).mask).reshape(64, 4, 10)
    for s in m.astype(bool):
        cols, rows = s.all(0), s.all(1)
        assert cols.sum() == 5 and rows.sum() == 2
        np.testing.assert_array_equal(s, cols[None] | rows[:, None])


@pytest.mark.slow
@pytest.mark.parametrize("time_ratio,freq_ratio", [(0.7, 0.3), (0.3, 0.2)])
def test_time_freq_trim_and_top_up(time_ratio, freq_ratio):
    """Masked = the lines, minus a random trim (too many) or plus a top-up (too few)."""
    masker = masking.make_masker("time_freq", mask_ratio=0.7, time_ratio=time_ratio,
                                 freq_ratio=freq_ratio)
    key = jax.random.key(3)
    mask = np.asarray(masker(key, jnp.zeros((32, 80, 608))).mask).astype(bool)
    # the masker's documented key path: strategy key, then (time, freq, fix-up) keys
    k_t, k_f, _ = jax.random.split(jax.random.split(key)[0], 3)
    lines = np.asarray(masking.time_freq_lines(k_t, k_f, 32, (5, 38), time_ratio,
                                               freq_ratio)).reshape(32, 190)
    covered = lines.sum(1)
    assert np.all(mask.sum(1) == 133)
    if np.all(covered > 133):
        assert np.all(mask <= lines)  # trimmed
    else:
        assert np.all(covered < 133) and np.all(lines <= mask)  # topped up


# ---------------------------------------------------------------- block (BEiT)

def test_block_masks_are_clustered():
    x = jnp.zeros((128, 80, 608))
    blk = masking.make_masker("block", mask_ratio=0.5, min_patches=16)
    m = np.asarray(blk(jax.random.key(0), x).mask).reshape(128, 5, 38)
    raw = np.asarray(masking.block_mask(jax.random.key(1), 128, (5, 38), 95, 16, 10, 190))
    assert np.all(raw.sum((1, 2)) >= 95)  # the loop reaches the target count
    rnd = np.asarray(masking.make_masker("random", mask_ratio=0.5)(
        jax.random.key(0), x).mask).reshape(128, 5, 38)

    def same_neighbour(m):  # fraction of time-adjacent pairs with equal state
        return (m[..., 1:] == m[..., :-1]).mean()
    assert same_neighbour(m) > same_neighbour(rnd) + 0.2


# ---------------------------------------------------------------- SGIM

def reference_sgim_scores(features):
    out = []
    for f in np.asarray(features, np.float64):
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        _, _, vt = np.linalg.svd(f - f.mean(0), full_matrices=False)
        proj = f @ vt[0]
        groups = [f[proj > proj.mean()], f[proj <= proj.mean()]]
        cents = [g.mean(0) / np.linalg.norm(g.mean(0)) for g in groups]
        out.append(np.max(np.stack([f @ c for c in cents]), axis=0))
    return np.stack(out)


def test_sgim_matches_pca_reference():
    rng = np.random.default_rng(0)
    b, n, d = 6, 190, 48
    centres = rng.standard_normal((b, 2, d)) * 3
    member = rng.integers(0, 2, (b, n))
    feats = np.take_along_axis(centres, member[..., None], 1) + rng.standard_normal((b, n, d))
    got = np.asarray(masking.sgim_scores(jnp.asarray(feats, jnp.float32), 32))
    ref = reference_sgim_scores(feats)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    masker = masking.make_masker("sgim", mask_ratio=0.7)
    m = masker(jax.random.key(0), jnp.zeros((b, 80, 608)), features=jnp.asarray(feats))
    for s in range(b):
        assert set(np.asarray(m.ids_mask[s])) == set(np.argsort(ref[s])[:133])


def test_sgim_identical_features_do_not_nan():
    masker = masking.make_masker("sgim", mask_ratio=0.7)
    m = masker(jax.random.key(0), jnp.zeros((4, 80, 608)), features=jnp.ones((4, 190, 8)))
    assert np.all(np.asarray(m.mask).sum(1) == 133)
    assert not np.array_equal(m.mask[0], m.mask[1])  # ties broken at random


# ---------------------------------------------------------------- schedule

def test_hint_schedule_golden_values():
    hs = masking.hint_schedule
    assert hs(0, total_epochs=300) == 1.0 and hs(49, total_epochs=300) == 1.0
    assert hs(50, total_epochs=300) == pytest.approx(1 - (50 / 300) ** 2)
    assert hs(150, total_epochs=300) == pytest.approx(0.75)
    assert hs(150, total_epochs=300, k=1) == pytest.approx(0.5)
    assert hs(150, total_epochs=300, k=8) == pytest.approx(1 - 0.5 ** 8)
    assert hs(300, total_epochs=300) == 0.0 and hs(400, total_epochs=300) == 0.0
    assert hs(10, total_epochs=300, start_epoch=0) == pytest.approx(1 - (10 / 300) ** 2)
    assert hs(123, total_epochs=300, constant=0.5) == 0.5
    epochs = np.arange(0, 320, 7)
    traced = jax.jit(lambda e: hs(e, total_epochs=300))(jnp.asarray(epochs))
    np.testing.assert_allclose(traced, [hs(int(e), total_epochs=300) for e in epochs],
                               rtol=1e-6)


def test_num_hints():
    assert int(masking.num_hints(133, 0.5)) == 66
    assert int(masking.num_hints(133, 1.0)) == 133 and int(masking.num_hints(133, 2.0)) == 133
    assert int(masking.num_hints(133, 0.0)) == 0 and int(masking.num_hints(100, 0.29)) == 29
