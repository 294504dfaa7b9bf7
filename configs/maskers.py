"""The paper's masking settings, one variant per strategy, as an ml_collections config.

    python -c "from configs.maskers import get_config; print(get_config('dispersion'))"

Build a sampler from a variant:  ``make_masker(**get_config('inverse_block'))``.
Variants: random, time_freq, block, inverse_block, dispersion, dispersion_det,
dispersion_variance, dispersion_frequency, sgim. Add ``,mae`` for MSM-MAE's ratio 0.75
(default is M2D's 0.7), e.g. ``get_config('dispersion,mae')``.
"""

import ml_collections

VARIANTS = {
    "random": dict(name="random"),
    "time_freq": dict(name="time_freq", time_ratio=0.7, freq_ratio=0.3),
    "block": dict(name="block", min_patches=16),
    "inverse_block": dict(name="inverse_block", block_size=5, adjust=0.07),
    "dispersion": dict(name="dispersion", metric="mad", deterministic=False,
                       granularity="patch"),
    "dispersion_det": dict(name="dispersion", deterministic=True),
    "dispersion_variance": dict(name="dispersion", metric="variance"),
    "dispersion_frequency": dict(name="dispersion", granularity="frequency"),
    "sgim": dict(name="sgim", pca_iters=32),
}


def get_config(arg: str = "dispersion") -> ml_collections.ConfigDict:
    variant, *flags = arg.split(",")
    if variant not in VARIANTS:
        raise ValueError(f"configs/maskers.py: unknown variant {variant!r}; choose one of "
                         f"{sorted(VARIANTS)}")
    unknown = set(flags) - {"mae"}
    if unknown:
        raise ValueError(f"configs/maskers.py: unknown flag(s) {sorted(unknown)}; only 'mae'")
    return ml_collections.ConfigDict(dict(
        input_shape=(80, 608), patch_size=(16, 16),
        mask_ratio=0.75 if "mae" in flags else 0.7, **VARIANTS[variant]))
