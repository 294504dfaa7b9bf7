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
import numpy as np
from flax import nnx

from dwm_jax import audio, build, weights
from dwm_jax import config as config_lib
from dwm_jax.normalisation import NormStats


# Part of every embedding cache key: bump it when the features that given weights produce
# change. 2: the authors' positions and runtime chunking.
FEATURE_VERSION = 2
# Encoder windows per call (of one clip or many): a 20-minute clip is 200 windows of 6 s.
MAX_WINDOWS = 32
# How a clip's time steps [T', D] become one vector: the authors' mean, or mean and std.
POOLINGS = ("mean", "mean_std")


def _bucket(n: int) -> int:
    """Windows per call rounded up to a power of two: few shapes, few compilations."""
    return 1 << max(n - 1, 0).bit_length()


def _pooled(steps: np.ndarray, pool: str) -> np.ndarray:
    if pool == "mean":
        return steps.mean(axis=0)
    return np.concatenate([steps.mean(axis=0), steps.std(axis=0)])


@dataclasses.dataclass(frozen=True)
class Featuriser:
    """log_mel -> features, callable on one clip, with ``batch(log_mels)`` for many at once
    (the probe and the frame-level probe read clips in batches through it)."""

    one: object
    many: object

    def __call__(self, log_mel):
        return self.one(log_mel)

    def batch(self, log_mels):
        return self.many(log_mels)


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
        return self.time_features_batch([log_mel], params)[0]

    def time_features_batch(self, log_mels, params=None) -> list[np.ndarray]:
        """Many clips at once, as :meth:`time_features` gives each: every whole window of
        every clip in calls of up to MAX_WINDOWS (padded to a power of two, split over this
        host's devices), the shorter last windows grouped by width (one compilation each).
        -> [ceil(T_i / patch_w), Fp * dim] per clip."""
        params = self._params if params is None else params
        xs = [self._normalised(lm) for lm in log_mels]
        if not xs:
            return []
        fulls = [x.shape[1] // self.frames for x in xs]
        whole = [x[:, :n * self.frames].reshape(self.n_mels, n, self.frames).transpose(1, 0, 2)
                 for x, n in zip(xs, fulls)]
        steps = self._run_windows(np.concatenate(whole), params)
        out = [s.reshape(-1, self.dim) for s in np.split(steps, np.cumsum(fulls)[:-1])]
        by_width: dict[int, list[int]] = {}
        for c, (x, n) in enumerate(zip(xs, fulls)):
            if x.shape[1] > n * self.frames:
                by_width.setdefault(x.shape[1] - n * self.frames, []).append(c)
        for width, clips in by_width.items():   # the shorter last chunks, own positions
            last = np.stack([xs[c][:, fulls[c] * self.frames:] for c in clips])
            for c, tail in zip(clips, self._run_windows(last, params)):
                out[c] = np.concatenate([out[c], tail])
        return out

    def _normalised(self, log_mel) -> np.ndarray:
        """Raw log-mel [n_mels, T], checked, normalised and zero-padded (the normalised mean)
        to a whole number of patches."""
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
        return np.pad(x, ((0, 0), (0, -length % self.patch_w)))

    def _run_windows(self, windows, params) -> np.ndarray:
        """Windows [W, F, T'] of one width -> [W, T' / pw, Fp * dim], at most MAX_WINDOWS a
        call (memory stays flat), padded to few shapes; a call of at least one window per
        device is split over the devices."""
        if not len(windows):
            return np.zeros((0, windows.shape[2] // self.patch_w, self.dim), np.float32)
        parts = []
        for first in range(0, len(windows), MAX_WINDOWS):
            chunk = windows[first:first + MAX_WINDOWS]
            devices = self._batch_sharding.mesh.size
            split = len(chunk) >= devices    # else one device: padding would outweigh it
            size = -(-_bucket(len(chunk)) // devices) * devices if split else _bucket(len(chunk))
            padded = np.zeros((size, *chunk.shape[1:]), np.float32)
            padded[:len(chunk)] = chunk
            x = jax.device_put(padded, self._batch_sharding if split else jax.local_devices()[0])
            parts.append(np.asarray(self._chunks_fn(params, x))[:len(chunk)])
        return np.concatenate(parts)

    @functools.cached_property
    def _batch_sharding(self):
        """Batches split over this host's devices (all of them; one on a plain CPU)."""
        mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    def clip_embedding(self, log_mel: np.ndarray, params=None, pool: str = "mean"
                       ) -> np.ndarray:
        """Raw log-mel [n_mels, T] -> [Fp * dim], the mean over the clip's time steps, or
        with ``pool="mean_std"`` [2 * Fp * dim], their mean then their std."""
        return self.clip_embeddings([log_mel], params, pool)[0]

    def clip_embeddings(self, log_mels, params=None, pool: str = "mean") -> np.ndarray:
        """Many clips' embeddings at once [N, D] (see :meth:`clip_embedding`)."""
        if pool not in POOLINGS:
            raise ValueError(f"pool must be one of {POOLINGS}; got {pool!r}")
        return np.stack([_pooled(steps, pool)
                         for steps in self.time_features_batch(log_mels, params)])

    def featuriser(self, name: str, pool: str = "mean"):
        """(log_mel -> clip vector, cache key) for probe.evaluate_task: ``name`` (e.g.
        'encoder') and the weights' fingerprint key the cache, and the pooling unless mean."""
        if pool not in POOLINGS:
            raise ValueError(f"pool must be one of {POOLINGS}; got {pool!r}")
        key = f"{name}_{self.fingerprint}" + ("" if pool == "mean" else f"_{pool}")
        return Featuriser(functools.partial(self.clip_embedding, pool=pool),
                          functools.partial(self.clip_embeddings, pool=pool)), key

    def step_featuriser(self, name: str):
        """(log_mel -> per-step features [T', D], cache key, patch width) for frame-level
        tasks (``sed.evaluate_frame_task``)."""
        return (Featuriser(self.time_features, self.time_features_batch),
                f"{name}_{self.fingerprint}_steps", self.patch_w)

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
