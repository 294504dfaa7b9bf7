"""Pretraining entry point (M2D / MSM-MAE over a device mesh).

Not implemented yet: the trainer lands with issue #4. Until then this exits with status 2
rather than pretending to train. The masking library (dwm_jax.masking) is complete.
"""

import sys

if __name__ == "__main__":
    sys.exit("train.py: the trainer is not implemented yet (issue #4); "
             "see README.md for what works today")
