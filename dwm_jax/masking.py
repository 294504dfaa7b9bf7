"""Mask samplers for masked-prediction SSL on spectrograms: DWM and its baselines.

Every sampler is a pure function of an explicit PRNG key and a log-mel batch
``x [B, F, T]``; it returns a :class:`Mask` with exactly ``K = int(N * (1 - mask_ratio))``
visible patches per sample (static shapes), in the frequency-major patch order of the ViT
patch embedding: patch ``i = f_row * Tp + t_col``.

Strategies (``make_masker(name, ...)``):

* ``random``        MAE: a uniformly random K-subset is visible.
* ``time_freq``     Audio-MAE: whole time columns and frequency rows, trimmed/topped up to K.
* ``block``         BEiT: masked rectangles of random area and aspect.
* ``inverse_block`` data2vec 2.0 / EAT: visible b x b blocks around random centres.
* ``dispersion``    DWM (the paper's method): mask with probability proportional to the
                    patch's mean absolute deviation (or variance), without replacement.
* ``sgim``          informed masking from patch features (PCA bipartition, Self-Guided MAE).

Every strategy reduces to a per-patch score where the K lowest scores stay visible. The
K-lowest selection is an exact radix select on the float bits (32 vectorised count passes)
followed by a cumsum compaction, which on XLA:CPU is ~7x cheaper than an argsort of the
scores and gives the same visible set. ``ids_keep`` and ``ids_mask`` are each in ascending
patch order; ``ids_restore`` inverts ``ids_shuffle = concat(ids_keep, ids_mask)`` as in MAE.

This module imports nothing else from dwm_jax, so other JAX projects can vendor it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Mask",
    "Masker",
    "MASKERS",
    "make_masker",
    "MaskerEntry",
    "register_masker",
    "hinted_maskers",
    "hint_schedule",
    "num_hints",
    "patch_grid",
    "patchify",
    "unpatchify",
    "patch_dispersion",
    "select_lowest",
    "mask_from_visible",
    "apply_hints",
    "time_freq_lines",
    "block_mask",
    "inverse_block_paint",
    "paint_squares",
    "sgim_scores",
]

_EPS = 1e-12  # added to dispersions: log-weight of a silent patch stays finite


class Mask(NamedTuple):
    """A batch of masks. ``K`` visible and ``N - K`` masked patches per sample.

    ids_keep:    int32 [B, K]      visible patch ids, ascending.
    ids_mask:    int32 [B, N - K]  masked patch ids, ascending.
    ids_restore: int32 [B, N]      position of each patch in ``ids_shuffle``.
    mask:        float32 [B, N]    1 = masked, 0 = visible, in patch order.
    """

    ids_keep: jax.Array
    ids_mask: jax.Array
    ids_restore: jax.Array
    mask: jax.Array

    @property
    def ids_shuffle(self) -> jax.Array:
        """int32 [B, N]: visible ids then masked ids (MAE's ``ids_shuffle``)."""
        return jnp.concatenate([self.ids_keep, self.ids_mask], axis=-1)


# ----------------------------------------------------------------------------------------
# Patch grid helpers
# ----------------------------------------------------------------------------------------


def patch_grid(input_shape: tuple[int, int], patch_size: tuple[int, int]) -> tuple[int, int]:
    """(Fp, Tp) patch grid of an (F, T) input; raises if the shapes are not usable."""
    input_shape, patch_size = tuple(input_shape), tuple(patch_size)
    if len(input_shape) != 2:
        raise ValueError(
            f"input_shape must be (F, T), the shape of one log-mel without batch; got "
            f"{input_shape} (rank {len(input_shape)})")
    if any(isinstance(n, bool) or not isinstance(n, (int, np.integer))
           for n in input_shape + patch_size):
        raise ValueError(f"input_shape and patch_size must be integers; got {input_shape} and "
                         f"{patch_size}")
    if len(patch_size) != 2 or min(patch_size) < 1:
        raise ValueError(f"patch_size must be two positive ints (ph, pw); got {patch_size}")
    (f, t), (ph, pw) = input_shape, patch_size
    if f % ph or t % pw or f < ph or t < pw:
        raise ValueError(
            f"input_shape {input_shape} is not a whole number of {ph} x {pw} patches; crop "
            f"or pad the log-mel to a multiple of patch_size {patch_size}")
    return f // ph, t // pw


def patchify(x: jax.Array, patch_size: tuple[int, int]) -> jax.Array:
    """[B, F, T] -> [B, N, ph * pw], patches frequency-major, each patch row-major."""
    b, f, t = x.shape
    ph, pw = patch_size
    p = x.reshape(b, f // ph, ph, t // pw, pw).transpose(0, 1, 3, 2, 4)
    return p.reshape(b, (f // ph) * (t // pw), ph * pw)


def unpatchify(p: jax.Array, grid: tuple[int, int], patch_size: tuple[int, int]) -> jax.Array:
    """Inverse of :func:`patchify`: [B, N, ph * pw] -> [B, F, T]."""
    (fp, tp), (ph, pw) = grid, patch_size
    x = p.reshape(p.shape[0], fp, tp, ph, pw).transpose(0, 1, 3, 2, 4)
    return x.reshape(p.shape[0], fp * ph, tp * pw)


def _slices(a: jax.Array, axis: int) -> list[jax.Array]:
    return [jax.lax.index_in_dim(a, i, axis, keepdims=False) for i in range(a.shape[axis])]


def _tree_sum(parts: list[jax.Array]) -> jax.Array:
    """Pairwise sum of equal-shape arrays, as elementwise adds."""
    while len(parts) > 1:
        parts = [p + q for p, q in zip(parts[::2], parts[1::2])] + parts[len(parts) & ~1:]
    return parts[0]


def patch_dispersion(x: jax.Array, patch_size: tuple[int, int], metric: str = "mad",
                     granularity: str = "patch") -> jax.Array:
    """Per-patch dispersion of ``x [B, F, T]`` in float32 -> [B, N] (frequency-major).

    - metric ``"mad"``: mean absolute deviation from the patch mean (the paper's default);
      ``"variance"``: population variance of the patch values.
    - granularity ``"patch"``: over the ph x pw values of each patch; ``"frequency"``: per
      mel bin over all T frames, averaged over the ph bins of a patch row and broadcast to
      that row's Tp patches.

    Non-finite dispersions (NaN input) become 0, so the sampler falls back to uniform.
    """
    b, f, t = x.shape
    ph, pw = patch_size
    fp, tp = f // ph, t // pw
    x = x.astype(jnp.float32)
    if granularity == "patch":
        # Two passes (patch means, then deviations), each summing a patch's ph mel rows and
        # pw frames as a pairwise tree of elementwise adds rather than a reduce: XLA:CPU
        # then emits each pass as one loop fusion that reads x once, where reduces here are
        # handed to a library (YNNPACK) fusion that is 2-3x slower on the benchmark input
        # (benchmarks/masking.py). GPU and TPU fuse either form.
        rows = _slices(x.reshape(b, fp, ph, t), 2)  # ph x [B, Fp, T]

        def patch_sums(parts):  # ph x [B, Fp, T] -> [B, Fp, Tp]
            return _tree_sum(_slices(_tree_sum(parts).reshape(b, fp, tp, pw), 3))

        mean = patch_sums(rows) / (ph * pw)
        mean_t = jnp.broadcast_to(mean[..., None], (b, fp, tp, pw)).reshape(b, fp, t)
        devs = [r - mean_t for r in rows]
        devs = [jnp.abs(v) if metric == "mad" else v * v for v in devs]
        d = patch_sums(devs) / (ph * pw)
    elif granularity == "frequency":
        mean = x.mean(-1, keepdims=True)
        dev = jnp.abs(x - mean) if metric == "mad" else (x - mean) ** 2
        d = dev.mean(-1).reshape(b, fp, ph).mean(-1)[:, :, None]
        d = jnp.broadcast_to(d, (b, fp, tp))
    else:
        raise ValueError(f"granularity must be 'patch' or 'frequency'; got {granularity!r}")
    d = d.reshape(b, fp * tp)
    return jnp.where(jnp.isfinite(d), d, 0.0)


# ----------------------------------------------------------------------------------------
# Exact K-lowest selection without a sort
# ----------------------------------------------------------------------------------------


def _ordered_bits(score: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same total order (negatives flipped, positives offset)."""
    bits = jax.lax.bitcast_convert_type(score.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _kth_smallest(bits: jax.Array, k: jax.Array) -> jax.Array:
    """Per row of ``bits [B, M]`` the k-th smallest value (1-indexed), by radix select."""
    def step(i, t):  # decide bit 31 - i of the answer: 32 count passes, no sort
        cand = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        below = jnp.sum(bits < cand[..., None], axis=-1)
        return jnp.where(below < k, cand, t)

    return jax.lax.fori_loop(0, 32, step, jnp.zeros(bits.shape[:-1], jnp.uint32))


def _select_lowest_bits(bits: jax.Array, k: jax.Array, tiebreak: jax.Array | None):
    t = _kth_smallest(bits, k)[..., None]
    less = bits < t
    tied = bits == t
    need = k[..., None] - jnp.sum(less, axis=-1, keepdims=True)
    if tiebreak is None:  # ties by index (the caller's scores are continuous)
        take = tied & (jnp.cumsum(tied, axis=-1) <= need)
    else:  # ties uniformly at random: select among the tied by the random bits
        tb = jnp.where(tied, tiebreak, jnp.uint32(0xFFFFFFFF))
        take = tied & _select_lowest_bits(tb, need[..., 0], None)
    return less | take


def select_lowest(score: jax.Array, k, tiebreak_key: jax.Array | None = None) -> jax.Array:
    """Boolean [..., M], True for exactly the ``k`` lowest scores of each row.

    ``k`` is an int or an int array broadcastable to ``score.shape[:-1]`` (it may be traced).
    Ties at the boundary go by patch index, or uniformly at random with ``tiebreak_key``.
    Same visible set as ``argsort(score)[..., :k]`` for distinct scores, without a sort.
    """
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), score.shape[:-1])
    tiebreak = None
    if tiebreak_key is not None:
        tiebreak = jax.random.bits(tiebreak_key, score.shape, jnp.uint32)
    return _select_lowest_bits(_ordered_bits(score), k, tiebreak)


def mask_from_visible(visible: jax.Array, num_keep: int) -> Mask:
    """Build a :class:`Mask` from a boolean ``visible [B, N]`` with ``num_keep`` True per row."""
    b, n = visible.shape
    masked = ~visible
    pos_visible = jnp.cumsum(visible, axis=-1, dtype=jnp.int32) - 1
    pos_masked = num_keep + jnp.cumsum(masked, axis=-1, dtype=jnp.int32) - 1
    ids_restore = jnp.where(visible, pos_visible, pos_masked)
    patch_ids = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    ids_shuffle = jnp.zeros((b, n), jnp.int32).at[
        jnp.arange(b)[:, None], ids_restore].set(patch_ids, unique_indices=True)
    return Mask(ids_keep=ids_shuffle[:, :num_keep], ids_mask=ids_shuffle[:, num_keep:],
                ids_restore=ids_restore, mask=masked.astype(jnp.float32))


# ----------------------------------------------------------------------------------------
# Hints (difficulty control shared by DWM and SGIM) and their schedule
# ----------------------------------------------------------------------------------------


def num_hints(num_masked: int, hint_ratio) -> jax.Array:
    """``n_h = int(num_masked * r_h)`` with ``r_h`` clipped to [0, 1]; works on traced r_h."""
    r = jnp.clip(jnp.asarray(hint_ratio, jnp.float32), 0.0, 1.0)
    return jnp.floor(num_masked * r + 1e-6).astype(jnp.int32)


def apply_hints(key: jax.Array, visible: jax.Array, num_keep: int, hint_ratio) -> jax.Array:
    """The hint swap, literally: un-mask ``n_h`` random masked patches (the hints), then
    mask ``n_h`` random patches of the pool (visible + hints). Counts stay exact.

    visible: bool [B, N] with ``num_keep`` True per row. ``hint_ratio`` may be traced;
    r_h = 0 returns ``visible`` unchanged, r_h = 1 gives a uniformly random mask.
    """
    n = visible.shape[-1]
    n_h = num_hints(n - num_keep, hint_ratio)
    k_hint, k_pool = jax.random.split(key)
    u = jax.random.uniform(k_hint, visible.shape)
    hints = select_lowest(jnp.where(visible, 2.0, u), n_h)  # n_h uniform among masked
    pool = visible | hints
    u = jax.random.uniform(k_pool, visible.shape)
    return select_lowest(jnp.where(pool, u, 2.0), num_keep)  # K uniform among the pool


def hint_schedule(epoch, *, total_epochs, start_epoch=50, k=2, constant=None):
    """Hint ratio ``r_h`` for an epoch: 1 (random masking) before ``start_epoch``, then
    ``1 - (epoch / total_epochs) ** k``, clipped to [0, 1]; ``constant`` overrides it.

    Accepts Python numbers (returns a float) or arrays (returns an array, jit-safe).
    """
    if constant is not None:
        if not 0.0 <= constant <= 1.0:
            raise ValueError(f"constant hint ratio must be in [0, 1]; got {constant}")
        return float(constant) if np.isscalar(epoch) else jnp.full(jnp.shape(epoch), constant)
    if total_epochs <= 0:
        raise ValueError(f"total_epochs must be positive; got {total_epochs}")
    if np.isscalar(epoch):
        if epoch < start_epoch:
            return 1.0
        return float(min(1.0, max(0.0, 1.0 - (epoch / total_epochs) ** k)))
    epoch = jnp.asarray(epoch, jnp.float32)
    r = jnp.clip(1.0 - (epoch / total_epochs) ** k, 0.0, 1.0)
    return jnp.where(epoch < start_epoch, 1.0, r)


# ----------------------------------------------------------------------------------------
# Strategies: each returns a visible-selection score (the K lowest stay visible)
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static facts every strategy needs."""

    grid: tuple[int, int]  # (Fp, Tp)
    patch_size: tuple[int, int]
    num_keep: int  # K

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclasses.dataclass(frozen=True, eq=False)
class Masker:
    """A configured sampler: ``masker(key, x, *, hint_ratio=0.0, features=None) -> Mask``.

    Pure and jit-safe: shapes are static, randomness comes only from ``key``; ``hint_ratio``
    may be a Python float (hint-free and r_h >= 1 paths are then skipped statically) or a
    traced scalar (e.g. from :func:`hint_schedule` inside a jitted step).
    """

    name: str
    input_shape: tuple[int, int]
    patch_size: tuple[int, int]
    mask_ratio: float
    options: dict[str, Any]
    _score_fn: Callable = dataclasses.field(repr=False, compare=False)
    needs_features: bool = False

    @property
    def grid(self) -> tuple[int, int]:
        return patch_grid(self.input_shape, self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_keep(self) -> int:
        return _num_keep(self.num_patches, self.mask_ratio)

    @property
    def num_masked(self) -> int:
        return self.num_patches - self.num_keep

    def __call__(self, key: jax.Array, x: jax.Array, *, hint_ratio=0.0,
                 features: jax.Array | None = None) -> Mask:
        x = jnp.asarray(x)
        if x.ndim != 3 or tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ValueError(
                f"{self.name} masker expects x of shape [B, {self.input_shape[0]}, "
                f"{self.input_shape[1]}] (batch, mel bins, frames); got {tuple(x.shape)}")
        spec = _Spec(self.grid, self.patch_size, self.num_keep)
        if x.shape[0] == 0:  # an empty batch: empty ids of the right shapes
            return mask_from_visible(jnp.zeros((0, spec.num_patches), bool), spec.num_keep)
        static_r = None if isinstance(hint_ratio, jax.Array) else float(hint_ratio)
        if static_r is not None and static_r >= 1.0:  # pure random: skip the strategy
            return mask_from_visible(_random_visible_mask(key, x.shape[0], spec), spec.num_keep)
        if self.needs_features:
            features = _check_features(self.name, features, x.shape[0], spec.num_patches)
        k_strategy, k_hint = jax.random.split(key)
        visible = self._score_fn(spec, k_strategy, x, features)
        if static_r is None or static_r > 0.0:
            visible = apply_hints(k_hint, visible, spec.num_keep, hint_ratio)
        return mask_from_visible(visible, spec.num_keep)

    def all_hints(self, key: jax.Array, batch: int) -> Mask:
        """The mask ``self(key, x, hint_ratio=r)`` gives for a traced ``r >= 1``, bit for bit,
        without running the strategy: the hint swap then replaces every masked patch, so the
        strategy's choice (and SGIM's features) cannot matter. The trainer uses it to skip
        SGIM's encoder pass while the schedule holds r_h at 1."""
        spec = _Spec(self.grid, self.patch_size, self.num_keep)
        _, k_hint = jax.random.split(key)
        any_visible = jnp.broadcast_to(jnp.arange(spec.num_patches) < spec.num_keep,
                                       (batch, spec.num_patches))
        return mask_from_visible(apply_hints(k_hint, any_visible, spec.num_keep, 1.0),
                                 spec.num_keep)


def _num_keep(n: int, mask_ratio: float) -> int:
    return int(n * (1 - mask_ratio))


def _check_features(name, features, batch, n):
    if features is None:
        raise ValueError(f"the {name} masker needs features=[B, N, D] patch features "
                         f"(N = {n}); got None")
    features = jnp.asarray(features)
    if features.ndim != 3 or features.shape[:2] != (batch, n):
        raise ValueError(f"{name}: features must be [B, N, D] = [{batch}, {n}, D]; got "
                         f"{tuple(features.shape)}")
    return jax.lax.stop_gradient(features)


def _random_visible_mask(key, batch: int, spec: _Spec) -> jax.Array:
    u = jax.random.uniform(key, (batch, spec.num_patches))
    return select_lowest(u, spec.num_keep)


def _topped_up(key, prior_masked: jax.Array, spec: _Spec) -> jax.Array:
    """Exact count from a prior mask: trim or top up uniformly at random to K visible."""
    u = jax.random.uniform(key, prior_masked.shape)
    return select_lowest(prior_masked.astype(jnp.float32) + u, spec.num_keep)


# ----------------------------------------------------------------------------------------
# Registry: each strategy is declared once, by the decorator on its factory
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaskerEntry:
    """A registered strategy.

    Attributes:
        name: the strategy's name in configs and ``make_masker``.
        factory: ``factory((grid, num_keep, mask_ratio), **options) -> (visible_fn,
            resolved)`` where ``visible_fn(spec, key, x, features) -> bool [B, N]`` has
            exactly K True per row and ``resolved`` is the dict of options it used.
        defaults: the options a config spells out, with their default values.
        takes_hints: whether the strategy is meant to run under the hint schedule (the
            informed maskers); configs give it the schedule by default.
        needs_features: whether a call needs patch ``features [B, N, D]`` (SGIM).
    """

    name: str
    factory: Callable
    defaults: dict
    takes_hints: bool = False
    needs_features: bool = False


MASKERS: dict[str, MaskerEntry] = {}


def register_masker(name: str, *, defaults: dict | None = None, takes_hints: bool = False,
                    needs_features: bool = False):
    """Decorator declaring a strategy under ``name`` (see :class:`MaskerEntry`)."""
    def deco(factory):
        if name in MASKERS:
            raise ValueError(f"a masker named {name!r} is already registered")
        MASKERS[name] = MaskerEntry(name, factory, dict(defaults or {}), takes_hints,
                                    needs_features)
        return factory
    return deco


def hinted_maskers() -> tuple[str, ...]:
    """The registered strategies that take hints."""
    return tuple(n for n, e in MASKERS.items() if e.takes_hints)


# -- random --------------------------------------------------------------------------------

@register_masker("random")
def _make_random(spec_args):
    def visible(spec, key, x, features):
        return _random_visible_mask(key, x.shape[0], spec)
    return visible, {}


# -- time / frequency (Audio-MAE) ----------------------------------------------------------

@register_masker("time_freq", defaults=dict(time_ratio=0.7, freq_ratio=0.3))
def _make_time_freq(spec_args, *, time_ratio, freq_ratio):
    for name, r in (("time_ratio", time_ratio), ("freq_ratio", freq_ratio)):
        if not 0.0 <= r < 1.0:
            raise ValueError(f"time_freq: {name} must be in [0, 1); got {r}")

    def visible(spec, key, x, features):
        fp, tp = spec.grid
        k_t, k_f, k_fix = jax.random.split(key, 3)
        lines = time_freq_lines(k_t, k_f, x.shape[0], spec.grid, time_ratio, freq_ratio)
        return _topped_up(k_fix, lines.reshape(x.shape[0], fp * tp), spec)

    return visible, dict(time_ratio=time_ratio, freq_ratio=freq_ratio)


def time_freq_lines(key_t, key_f, batch: int, grid, time_ratio: float, freq_ratio: float):
    """bool [B, Fp, Tp]: ``int(Tp * time_ratio)`` random whole columns OR
    ``int(Fp * freq_ratio)`` random whole rows (before the exact-count trim/top-up)."""
    fp, tp = grid
    cols = ~select_lowest(jax.random.uniform(key_t, (batch, tp)), tp - int(tp * time_ratio))
    rows = ~select_lowest(jax.random.uniform(key_f, (batch, fp)), fp - int(fp * freq_ratio))
    return cols[:, None, :] | rows[:, :, None]


# -- block (BEiT) --------------------------------------------------------------------------

_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))


@register_masker("block", defaults=dict(min_patches=16))
def _make_block(spec_args, *, min_patches, tries=10, max_rounds=None):
    grid, num_keep, _ = spec_args
    n = grid[0] * grid[1]
    num_masked = n - num_keep
    if not 1 <= min_patches <= num_masked:
        raise ValueError(f"block: min_patches must be in [1, {num_masked}] (the masked count "
                         f"on a {grid[0]} x {grid[1]} grid); got {min_patches}")
    # Some h <= Fp, w <= Tp with h * w >= min_patches and an aspect in [0.3, 1/0.3] must exist.
    if not any(h * w >= min_patches and 0.3 <= h / w <= 1 / 0.3 for h in range(1, grid[0] + 1)
               for w in range(1, grid[1] + 1)):
        raise ValueError(f"block: no block of at least min_patches={min_patches} patches with "
                         f"aspect in [0.3, 3.33] fits the {grid[0]} x {grid[1]} patch grid")
    if isinstance(tries, bool) or not isinstance(tries, int) or tries < 1:
        raise ValueError(f"block: tries must be an integer >= 1; got {tries!r}")
    if max_rounds is not None and (isinstance(max_rounds, bool) or
                                   not isinstance(max_rounds, int) or max_rounds < 1):
        raise ValueError(f"block: max_rounds must be an integer >= 1; got {max_rounds!r}")
    rounds = int(max_rounds) if max_rounds is not None else 2 * num_masked

    def visible(spec, key, x, features):
        k_loop, k_fix = jax.random.split(key)
        blocks = block_mask(k_loop, x.shape[0], spec.grid, spec.num_patches - spec.num_keep,
                            min_patches, tries, rounds)
        return _topped_up(k_fix, blocks.reshape(x.shape[0], -1), spec)

    return visible, dict(min_patches=min_patches, tries=tries, max_rounds=rounds)


def block_mask(key, batch: int, grid, num_masked: int, min_patches: int, tries: int = 10,
               max_rounds: int = 256) -> jax.Array:
    """BEiT block masking, vectorised over the batch -> bool [B, Fp, Tp] (True = masked).

    Each round draws ``tries`` candidate blocks per sample in parallel (area
    U(min(min_patches, remaining), remaining), log-uniform aspect in [0.3, 1/0.3], random
    corner) and keeps the first that fits the grid and adds at least one masked patch. Rounds
    stop once every sample has reached ``num_masked`` (or after ``max_rounds``); the result
    may overshoot slightly and is trimmed to the exact count by the caller.
    """
    fp, tp = grid
    rows = jnp.arange(fp)[None, None, :]
    cols = jnp.arange(tp)[None, None, :]

    def one_round(carry):
        i, key, masked = carry
        key, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
        count = masked.sum((1, 2))
        remaining = jnp.maximum(num_masked - count, 0).astype(jnp.float32)[:, None]
        low = jnp.minimum(float(min_patches), remaining)
        area = low + (remaining - low) * jax.random.uniform(k_area, (batch, tries))
        aspect = jnp.exp(jax.random.uniform(k_aspect, (batch, tries), minval=_LOG_ASPECT[0],
                                            maxval=_LOG_ASPECT[1]))
        h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
        w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
        fits = (h >= 1) & (w >= 1) & (h <= fp) & (w <= tp)
        top = jnp.floor(jax.random.uniform(k_top, (batch, tries)) * (fp - h + 1)).astype(jnp.int32)
        left = jnp.floor(jax.random.uniform(k_left, (batch, tries)) * (tp - w + 1))
        left = left.astype(jnp.int32)
        in_rows = (rows >= top[..., None]) & (rows < (top + h)[..., None])  # [B, tries, Fp]
        in_cols = (cols >= left[..., None]) & (cols < (left + w)[..., None])  # [B, tries, Tp]
        block = in_rows[..., :, None] & in_cols[..., None, :]  # [B, tries, Fp, Tp]
        adds = jnp.sum(block & ~masked[:, None], axis=(2, 3))
        ok = fits & (adds > 0) & (remaining > 0)
        first = jnp.argmax(ok, axis=1)
        chosen = jnp.take_along_axis(block, first[:, None, None, None], axis=1)[:, 0]
        chosen = chosen & ok.any(1)[:, None, None]
        return i + 1, key, masked | chosen

    def not_done(carry):
        i, _, masked = carry
        return (i < max_rounds) & jnp.any(masked.sum((1, 2)) < num_masked)

    init = (jnp.int32(0), key, jnp.zeros((batch, fp, tp), bool))
    return jax.lax.while_loop(not_done, one_round, init)[2]


# -- inverse block (data2vec 2.0 / EAT) ---------------------------------------------------

@register_masker("inverse_block", defaults=dict(block_size=5, adjust=0.07))
def _make_inverse_block(spec_args, *, block_size, adjust):
    grid, _, mask_ratio = spec_args
    b = int(block_size)
    if b < 1 or b > min(grid):
        raise ValueError(f"inverse_block: block_size {block_size} does not fit the "
                         f"{grid[0]} x {grid[1]} patch grid (need 1 <= block_size <= "
                         f"{min(grid)})")
    n = grid[0] * grid[1]
    num_centres = int(n * (1 - mask_ratio + adjust) / b**2)  # blocks describe the visible
    if num_centres < 1:
        raise ValueError(f"inverse_block: int(N * (1 - mask_ratio + adjust) / block_size^2) "
                         f"= 0 block centres on a {grid[0]} x {grid[1]} grid; use a smaller "
                         f"block_size or a larger adjust")

    def visible(spec, key, x, features):
        k_centre, k_fix = jax.random.split(key)
        painted = inverse_block_paint(k_centre, x.shape[0], spec.grid, b, num_centres)
        return _topped_up(k_fix, ~painted.reshape(x.shape[0], -1), spec)

    return visible, dict(block_size=b, adjust=adjust, num_centres=num_centres)


def inverse_block_paint(key, batch: int, grid, block_size: int, num_centres: int) -> jax.Array:
    """bool [B, Fp, Tp]: union of ``block_size`` squares around ``num_centres`` uniform
    centres (with replacement), offsets ``-b//2 .. b-1-b//2``, clamped at the borders."""
    centres = jax.random.randint(key, (batch, num_centres), 0, grid[0] * grid[1])
    return paint_squares(centres, grid, block_size)


def paint_squares(centres: jax.Array, grid, block_size: int) -> jax.Array:
    """bool [B, Fp, Tp]: union of the clamped ``block_size`` squares at ``centres [B, C]``."""
    fp, tp = grid
    centre = centres
    r0 = (centre // tp - block_size // 2)[..., None]
    c0 = (centre % tp - block_size // 2)[..., None]
    rows = jnp.arange(fp)[None, None, :]
    cols = jnp.arange(tp)[None, None, :]
    in_rows = (rows >= r0) & (rows < r0 + block_size)  # [B, C, Fp]
    in_cols = (cols >= c0) & (cols < c0 + block_size)  # [B, C, Tp]
    return jnp.any(in_rows[..., :, None] & in_cols[..., None, :], axis=1)


# -- dispersion-weighted masking (DWM) ----------------------------------------------------

@register_masker("dispersion", takes_hints=True,
                 defaults=dict(metric="mad", deterministic=False, granularity="patch"))
def _make_dispersion(spec_args, *, metric, deterministic, granularity):
    if metric not in ("mad", "variance"):
        raise ValueError(f"dispersion: metric must be 'mad' or 'variance'; got {metric!r}")
    if granularity not in ("patch", "frequency"):
        raise ValueError(f"dispersion: granularity must be 'patch' or 'frequency'; got "
                         f"{granularity!r}")
    if not isinstance(deterministic, (bool, np.bool_)):  # bool("no") would be True
        raise ValueError(f"dispersion: deterministic must be True or False; got "
                         f"{deterministic!r}")
    deterministic = bool(deterministic)

    def visible(spec, key, x, features):
        weight = patch_dispersion(x, spec.patch_size, metric, granularity) + _EPS
        if deterministic:  # masked = top N-K by weight; ties uniformly at random
            return select_lowest(weight, spec.num_keep, tiebreak_key=key)
        # Gumbel-top-k: the N-K largest log w + g are a weighted sample without replacement.
        score = jnp.log(weight) + jax.random.gumbel(key, weight.shape)
        return select_lowest(score, spec.num_keep)

    return visible, dict(metric=metric, deterministic=deterministic, granularity=granularity)


# -- SGIM (informed masking from features) ------------------------------------------------

@register_masker("sgim", takes_hints=True, needs_features=True, defaults=dict(pca_iters=32))
def _make_sgim(spec_args, *, pca_iters):
    if int(pca_iters) < 1:
        raise ValueError(f"sgim: pca_iters must be >= 1; got {pca_iters}")

    def visible(spec, key, x, features):
        score = sgim_scores(features, int(pca_iters))
        return select_lowest(-score, spec.num_keep, tiebreak_key=key)

    return visible, dict(pca_iters=int(pca_iters))


def _l2_normalise(v, axis=-1):
    return v / jnp.maximum(jnp.linalg.norm(v, axis=axis, keepdims=True), 1e-12)


def sgim_scores(features: jax.Array, pca_iters: int = 32) -> jax.Array:
    """SGIM patch scores [B, N] from features [B, N, D]: the highest cosine similarity of
    each patch to the centroids of the clip's two-way split along its first principal
    component (power iteration). Low score = poorly explained = masked first."""
    f = _l2_normalise(features.astype(jnp.float32))
    c = f - f.mean(axis=1, keepdims=True)
    # Start from the patch with the largest deviation: deterministic and non-zero.
    start = jnp.argmax(jnp.sum(c * c, axis=-1), axis=-1)
    u = jnp.einsum("bnd,bd->bn", c, jnp.take_along_axis(c, start[:, None, None], 1)[:, 0])

    def power_step(_, u):
        v = jnp.einsum("bnd,bn->bd", c, u)
        return _l2_normalise(jnp.einsum("bnd,bd->bn", c, v))

    u = jax.lax.fori_loop(0, pca_iters, power_step, _l2_normalise(u))
    group = (u > jnp.mean(u, axis=-1, keepdims=True)).astype(jnp.float32)  # [B, N]
    sums = jnp.stack([jnp.einsum("bn,bnd->bd", g, f) for g in (group, 1.0 - group)], axis=1)
    centroids = _l2_normalise(sums)  # [B, 2, D]; an empty group gives a zero centroid
    return jnp.max(jnp.einsum("bnd,bcd->bnc", f, centroids), axis=-1)


# ----------------------------------------------------------------------------------------
# Constructor
# ----------------------------------------------------------------------------------------

def make_masker(name: str, *, input_shape=(80, 608), patch_size=(16, 16),
                mask_ratio: float, **options) -> Masker:
    """Build a jit-safe sampler ``masker(key, x, *, hint_ratio=0.0, features=None) -> Mask``.

    name: one of ``MASKERS`` (random, time_freq, block, inverse_block, dispersion, sgim).
    input_shape: (F, T) of one log-mel; patch_size: (ph, pw); mask_ratio in (0, 1).
    options: the strategy's own keywords, e.g. ``dispersion(metric="mad",
    deterministic=False, granularity="patch")`` or ``inverse_block(block_size=5,
    adjust=0.07)``. Bad arguments raise here, not at call time.
    """
    if name not in MASKERS:
        raise ValueError(f"unknown masking strategy {name!r}; choose one of {sorted(MASKERS)}")
    grid = patch_grid(input_shape, patch_size)
    if isinstance(mask_ratio, bool) or not 0.0 < float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1); got {mask_ratio}")
    n = grid[0] * grid[1]
    num_keep = _num_keep(n, float(mask_ratio))
    if not 1 <= num_keep <= n - 1:
        raise ValueError(f"mask_ratio {mask_ratio} on a {grid[0]} x {grid[1]} grid ({n} "
                         f"patches) leaves {num_keep} visible; need 1 .. {n - 1}")
    entry = MASKERS[name]
    try:
        fn, resolved = entry.factory((grid, num_keep, float(mask_ratio)),
                                     **{**entry.defaults, **options})
    except TypeError as e:  # unknown keyword for this strategy
        raise TypeError(f"bad option for the {name!r} masker: {e}") from None
    return Masker(name=name, input_shape=tuple(input_shape), patch_size=tuple(patch_size),
                  mask_ratio=float(mask_ratio), options=resolved, _score_fn=fn,
                  needs_features=entry.needs_features)
