"""Embeddings from a pretrained encoder: log-mel or waveform -> per-time-step and clip features.

    from dwm_jax.embedding import Embedder
    emb = Embedder.from_workdir("workdirs/demo")      # latest checkpoint; stats come with it
    steps = emb.time_features(log_mel)                # [ceil(T / 16), 5 * dim]
    clip = emb.clip_embedding(log_mel)                # [5 * dim]
    clip = emb.clip_embedding(log_mel, pool="mean_std")   # [2 * 5 * dim]
    clip = emb.from_waveform(wave, sample_rate=44100) # resampled, log-mel, then as above

Features follow the authors' runtime (``portable_m2d.encode_lms``): the input is normalised
with the checkpoint's statistics, then cut into chunks of the encoder's input width; the last
chunk is not padded to that width, only with zeros (the normalised mean) to a whole number of
patches, and runs with fewer tokens and the positions of its first time columns. The encoder
sees every patch of a chunk (no masking); for each time step the tokens of its frequency
patches are concatenated (Fp x dim, feature ``f * dim + d``), and a clip's embedding is the
mean over its time steps (``pool="mean"``, the authors'). ``pool="mean_std"`` appends the
standard deviation over time steps: the same statistics as the raw log-mel baseline (mean
and std per mel bin), so the two compare on equal terms. ``tests/test_reference.py`` checks
the features against those their runtime returned. Inputs are raw log-mel (the embedder
applies the normalisation).
"""

from __future__ import annotations

from dwm_jax._extras import require

require("eval", "flax", "librosa")

import dataclasses
import functools
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dwm_jax import audio, build, weights
from dwm_jax import config as config_lib
from dwm_jax.normalisation import NormStats


# Part of every embedding cache key: bump it when the features that given weights produce
# change. 2: the authors' positions and runtime chunking.
FEATURE_VERSION = 2
# Encoder windows per call: a 20-minute clip is 200 windows of 6 s, run in groups of this.
MAX_WINDOWS = 32
# How a clip's time steps [T', D] become one vector: the authors' mean, or mean and std.
POOLINGS = ("mean", "mean_std")


def _bucket(n: int) -> int:
    """Windows per call rounded up to a power of two: few shapes, few compilations."""
    return 1 << max(n - 1, 0).bit_length()


class Embedder:
    """An encoder plus its input normalisation and front end."""

    def __init__(self, encoder, stats: NormStats,
                 frontend: audio.LogMelFrontEnd | None = None):
        self.encoder = encoder
        self.stats = stats
        self.frontend = frontend or audio.LogMelFrontEnd()
        self.n_mels, self.frames = encoder.input_shape
        self.patch_w = encoder.patch_size[1]
        self.dim = encoder.grid[0] * encoder.size.dim
        graphdef, params = nnx.split(encoder)
        self._params = params

        @jax.jit
        def chunks_fn(params, x):  # [W, F, T'] normalised -> [W, T' / pw, Fp * dim]
            return nnx.merge(graphdef, params).time_features(x)

        self._chunks_fn = chunks_fn

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None) -> "Embedder":
        """The encoder of a workdir's checkpoint (latest unless ``step``): a training run or
        a converted checkpoint of the authors'."""
        encoder, stats, _ = weights.load_encoder(workdir, step)
        return cls(encoder, stats)

    @classmethod
    def random_init(cls, config, stats: NormStats, seed: int = 0) -> "Embedder":
        """The same architecture untrained: the baseline that shows what pretraining bought."""
        cfg = config_lib.from_stored(config) if isinstance(config, dict) else config
        return cls(build.build_objective(cfg, nnx.Rngs(seed)).encoder, stats)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies the features this embedder computes: a hash of the weights, the
        normalisation, the front end, the shapes and FEATURE_VERSION (a cache key)."""
        h = hashlib.sha256(json.dumps(dict(
            version=FEATURE_VERSION, stats=[float(self.stats.mean), float(self.stats.std)],
            frontend=dataclasses.asdict(self.frontend), input_shape=[self.n_mels, self.frames],
            patch_size=list(self.encoder.patch_size),
            size=dataclasses.asdict(self.encoder.size)), sort_keys=True).encode())
        leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(self._params))[0]
        for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
            h.update(jax.tree_util.keystr(path).encode())
            h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
        return h.hexdigest()[:16]

    def time_features(self, log_mel: np.ndarray, params=None) -> np.ndarray:
        """Raw log-mel [n_mels, T] -> per-time-step features [ceil(T / patch_w), Fp * dim].

        ``params``: other weights of the same encoder (its ``nnx.state``; e.g. while it is
        being fine-tuned) instead of this embedder's own."""
        params = self._params if params is None else params
        log_mel = np.asarray(log_mel, np.float32)
        if log_mel.ndim != 2 or log_mel.shape[0] != self.n_mels:
            raise ValueError(f"expected a log-mel [{self.n_mels}, T]; got {log_mel.shape}")
        length = log_mel.shape[1]
        if length == 0:
            raise ValueError("the log-mel has no frames")
        if not np.all(np.isfinite(log_mel)):
            raise ValueError(f"the log-mel holds {np.sum(~np.isfinite(log_mel))} NaN or "
                             "infinite value(s)")
        x = (log_mel - self.stats.mean) / self.stats.std
        x = np.pad(x, ((0, 0), (0, -length % self.patch_w)))   # zeros: the normalised mean
        full, rest = divmod(x.shape[1], self.frames)
        parts = []
        # whole chunks, at most MAX_WINDOWS per call (memory stays flat for any length),
        # padded to a power-of-two count: few compilations
        for first in range(0, full, MAX_WINDOWS):
            n = min(MAX_WINDOWS, full - first)
            windows = np.zeros((_bucket(n), self.n_mels, self.frames), np.float32)
            windows[:n] = x[:, first * self.frames:(first + n) * self.frames].reshape(
                self.n_mels, n, self.frames).transpose(1, 0, 2)
            steps = np.asarray(self._chunks_fn(params, jnp.asarray(windows)))
            parts.append(steps[:n].reshape(-1, self.dim))
        if rest:  # the shorter last chunk, with its own (truncated) positions
            last = jnp.asarray(x[None, :, full * self.frames:])
            parts.append(np.asarray(self._chunks_fn(params, last))[0])
        return np.concatenate(parts)

    def clip_embedding(self, log_mel: np.ndarray, params=None, pool: str = "mean"
                       ) -> np.ndarray:
        """Raw log-mel [n_mels, T] -> [Fp * dim], the mean over the clip's time steps, or
        with ``pool="mean_std"`` [2 * Fp * dim], their mean then their std."""
        if pool not in POOLINGS:
            raise ValueError(f"pool must be one of {POOLINGS}; got {pool!r}")
        steps = self.time_features(log_mel, params)
        if pool == "mean":
            return steps.mean(axis=0)
        return np.concatenate([steps.mean(axis=0), steps.std(axis=0)])

    def featuriser(self, name: str, pool: str = "mean"):
        """(log_mel -> clip vector, cache key) for probe.evaluate_task: ``name`` (e.g.
        'encoder') and the weights' fingerprint key the cache, and the pooling unless mean."""
        if pool not in POOLINGS:
            raise ValueError(f"pool must be one of {POOLINGS}; got {pool!r}")
        key = f"{name}_{self.fingerprint}" + ("" if pool == "mean" else f"_{pool}")
        return functools.partial(self.clip_embedding, pool=pool), key

    def step_featuriser(self, name: str):
        """(log_mel -> per-step features [T', D], cache key, patch width) for frame-level
        tasks (``sed.evaluate_frame_task``)."""
        return self.time_features, f"{name}_{self.fingerprint}_steps", self.patch_w

    def from_waveform(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """Mono waveform [samples] at any rate -> clip embedding (resampled to the front end's
        rate). Floats are taken as they are (full scale +-1); integer PCM (int16, int32,
        uint8) is scaled to +-1 as audio files are read."""
        wave = np.asarray(wave)
        if wave.ndim != 1:
            raise ValueError(f"from_waveform expects a mono waveform [samples]; got shape "
                             f"{wave.shape} (average the channels first)")
        if wave.size == 0:
            raise ValueError("the waveform has no samples")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
                or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer (Hz); got {sample_rate!r}")
        wave = audio.to_float_samples(wave)
        if not np.all(np.isfinite(wave)):
            raise ValueError("the waveform holds NaN or infinite samples")
        if sample_rate != self.frontend.sample_rate:
            import librosa
            wave = librosa.resample(wave, orig_sr=sample_rate,
                                    target_sr=self.frontend.sample_rate, res_type="soxr_hq")
        return self.clip_embedding(self.frontend(wave))
