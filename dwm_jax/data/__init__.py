"""Datasets and input pipelines: TFDS builders (synthetic_sounds, audio_folder) that store
log-mel spectrograms, and Grain loaders that read them without TensorFlow.

  cli.py        the ``python -m dwm_jax.data`` CLI
  builders.py   the TFDS builders, presets, build()
  examples.py   one audio file -> one example, build-time statistics (shared by both builds)
  parallel.py   the same builds as Apache Beam pipelines
  layouts.py    published datasets' own layouts
  pipeline.py   open_split, train_loader, eval_loader, whole_clips, DevicePrefetcher
  synthetic.py  the procedural sound classes
"""

from dwm_jax._extras import require

require("data", "tensorflow_datasets", "grain", "librosa", "soundfile")

from dwm_jax.data.builders import (AudioFolderConfig, BuildError, SyntheticSoundsConfig,
                                   audio_folder_config, build)
from dwm_jax.data.pipeline import (DatasetSplit, DevicePrefetcher, NormStats, dataset_dir,
                                   dataset_fingerprint, eval_loader, open_split,
                                   train_loader, whole_clips)

__all__ = ["build", "AudioFolderConfig", "BuildError", "SyntheticSoundsConfig",
           "audio_folder_config", "DatasetSplit", "NormStats", "dataset_dir", "dataset_fingerprint",
           "eval_loader", "open_split",
           "train_loader", "whole_clips", "DevicePrefetcher"]
