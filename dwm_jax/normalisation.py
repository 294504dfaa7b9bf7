"""The log-mel normalisation statistics a model was trained with (two floats that travel
with every checkpoint and export)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class NormStats:
    """Scalar log-mel normalisation: ``(x - mean) / std``."""

    mean: float
    std: float

    def __post_init__(self):
        if not (np.isfinite(self.mean) and np.isfinite(self.std) and self.std > 0):
            raise ValueError(f"NormStats needs a finite mean and std > 0; got {self}")
