"""Pretraining (``train.py`` is its CLI), in the layout of the flax examples and MaxText:

  step.py       the pure jitted step: mask inside the jit, AdamW with clipping, M2D's EMA
  loop.py       :func:`train`: input, resume or start, compile, the loop, checkpoints, logs
  resume.py     the resume policy: is a checkpoint this run's, what may change
  init_from.py  ``config.init_from``: continued pretraining from another workdir's weights
  run_io.py     the metrics log, recorded config changes, SIGTERM / Ctrl-C

The state, the model, the masker and the optimizer are built by :mod:`dwm_jax.build` from
a config checked by :mod:`dwm_jax.config`.
"""

from dwm_jax._extras import require

require("train", "flax", "optax", "orbax", "ml_collections", "tensorboardX", "tqdm")

from dwm_jax import checkpointing, locks, storage  # noqa: E402
from dwm_jax.config import ConfigError  # noqa: E402
from dwm_jax.errors import NonFiniteError  # noqa: E402
from dwm_jax.train.loop import train  # noqa: E402
from dwm_jax.train.run_io import MetricsWriteError  # noqa: E402

# The errors that are the user's to fix (a bad config, a run dir of another model, a damaged
# checkpoint, a full disk, a missing file, a bucket out of reach): entry points print them as one line, exit 2.
USER_ERRORS = (ConfigError, checkpointing.CheckpointMismatchError,
               checkpointing.CheckpointDamagedError, checkpointing.CheckpointSaveError,
               MetricsWriteError, locks.LockedError, storage.StorageError, FileNotFoundError)

__all__ = ["train", "NonFiniteError", "USER_ERRORS"]
