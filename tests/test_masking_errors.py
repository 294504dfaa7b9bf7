"""Bad arguments fail at construction (or at the call, for a wrong x) with a clear message."""

import jax
import jax.numpy as jnp
import pytest

from dwm_jax import masking


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="nope", mask_ratio=0.7), "unknown masking strategy 'nope'"),
    (dict(name="random", mask_ratio=0.0), r"mask_ratio must be in \(0, 1\)"),
    (dict(name="random", mask_ratio=1.0), r"mask_ratio must be in \(0, 1\)"),
    (dict(name="random", mask_ratio=-0.3), r"mask_ratio must be in \(0, 1\)"),
    (dict(name="random", mask_ratio=0.999), "leaves 0 visible"),
    (dict(name="random", mask_ratio=0.7, input_shape=(1, 80, 608)), "input_shape must be"),
    (dict(name="random", mask_ratio=0.7, input_shape=(80,)), "input_shape must be"),
    (dict(name="random", mask_ratio=0.7, input_shape=(80, 600)), "not a whole number"),
    (dict(name="random", mask_ratio=0.7, patch_size=(0, 16)), "patch_size"),
    (dict(name="dispersion", mask_ratio=0.7, metric="std"), "metric must be"),
    (dict(name="dispersion", mask_ratio=0.7, granularity="time"), "granularity must be"),
    (dict(name="inverse_block", mask_ratio=0.7, block_size=6), "does not fit the 5 x 38"),
    (dict(name="inverse_block", mask_ratio=0.7, input_shape=(16, 64), block_size=1,
          adjust=-0.3), "0 block centres"),
    (dict(name="block", mask_ratio=0.7, min_patches=500), "min_patches must be"),
    (dict(name="block", mask_ratio=0.5, input_shape=(16, 640), min_patches=9),
     "no block of at least"),
    (dict(name="time_freq", mask_ratio=0.7, time_ratio=1.0), "time_ratio"),
    (dict(name="sgim", mask_ratio=0.7, pca_iters=0), "pca_iters"),
    (dict(name="dispersion", mask_ratio=0.7, deterministic="no"), "deterministic must be"),
    (dict(name="block", mask_ratio=0.7, tries=0), "tries must be"),
    (dict(name="block", mask_ratio=0.7, max_rounds=0), "max_rounds must be"),
    (dict(name="block", mask_ratio=0.7, max_rounds=-3), "max_rounds must be"),
])
def test_bad_construction_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        masking.make_masker(**kwargs)


def test_unknown_option_names_the_strategy():
    with pytest.raises(TypeError, match="'dispersion'.*temperature"):
        masking.make_masker("dispersion", mask_ratio=0.7, temperature=2.0)


@pytest.mark.parametrize("shape", [(80, 608), (2, 1, 80, 608), (2, 80, 600)])
def test_wrong_input_shape_at_call(shape):
    masker = masking.make_masker("random", mask_ratio=0.7)
    with pytest.raises(ValueError, match=r"expects x of shape \[B, 80, 608\]"):
        masker(jax.random.key(0), jnp.zeros(shape))


def test_sgim_needs_features_of_the_right_shape():
    masker = masking.make_masker("sgim", mask_ratio=0.7)
    x = jnp.zeros((2, 80, 608))
    with pytest.raises(ValueError, match="needs features"):
        masker(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"\[2, 190, D\]"):
        masker(jax.random.key(0), x, features=jnp.zeros((2, 189, 8)))
    # r_h >= 1 is plain random masking and needs no features
    assert masker(jax.random.key(0), x, hint_ratio=1.0).mask.shape == (2, 190)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="total_epochs"):
        masking.hint_schedule(3, total_epochs=0)
    with pytest.raises(ValueError, match="constant"):
        masking.hint_schedule(3, total_epochs=10, constant=1.5)


def test_register_masker_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        masking.register_masker("random")(lambda spec_args: None)


def test_every_registered_masker_builds_from_its_declared_defaults():
    """Each masker registers its config options once; the defaults build at both ratios."""
    for name, entry in masking.MASKERS.items():
        for ratio, keep in ((0.7, 57), (0.75, 47)):
            masker = masking.make_masker(name, input_shape=(80, 608), mask_ratio=ratio)
            assert masker.num_keep == keep
            assert {k: masker.options[k] for k in entry.defaults} == entry.defaults
    assert masking.hinted_maskers() == ("dispersion", "sgim")


def test_an_empty_batch_gives_empty_masks_for_every_masker():
    for name, entry in masking.MASKERS.items():
        m = masking.make_masker(name, input_shape=(80, 608), mask_ratio=0.7)
        feats = jnp.zeros((0, 190, 8)) if entry.needs_features else None
        mask = jax.jit(lambda k, x, f: m(k, x, features=f))(jax.random.key(0),
                                                             jnp.zeros((0, 80, 608)), feats)
        assert mask.ids_keep.shape == (0, 57) and mask.mask.shape == (0, 190), name


def test_non_integer_shapes_are_refused_at_construction():
    with pytest.raises(ValueError, match="input_shape and patch_size must be integers"):
        masking.make_masker("random", input_shape=(80, 64), patch_size=(16.0, 16.0),
                            mask_ratio=0.7)
