"""The arms of the masking study, as config changes: every registered masker, and for each
masker that takes hints its hint-0 ablation (``<name>_h0``: the hints held at 0)."""

from __future__ import annotations

import dataclasses

from dwm_jax import config as config_lib
from dwm_jax import masking


@dataclasses.dataclass(frozen=True)
class Arm:
    """A study arm: the recipe's config for ``masker``, with ``overrides`` set."""

    masker: str
    overrides: tuple[tuple[str, object], ...] = ()


HINT_ZERO = (("masking.hint.mode", "constant"), ("masking.hint.constant", 0.0))


def _arms() -> dict[str, Arm]:
    out = {}
    for name, entry in masking.MASKERS.items():
        out[name] = Arm(name)
        if entry.takes_hints:
            out[f"{name}_h0"] = Arm(name, HINT_ZERO)
    return out


ARMS: dict[str, Arm] = _arms()
# the paper's comparison; sgim_h0 and the other maskers are run only when named
DEFAULT_ARMS = ("random", "inverse_block", "dispersion", "dispersion_h0", "sgim")


def apply_arm(cfg, arm: Arm):
    """``cfg`` (a recipe's config for ``arm.masker``) with the arm's overrides set."""
    for path, value in arm.overrides:
        config_lib.override(cfg, path, value)
    return cfg
