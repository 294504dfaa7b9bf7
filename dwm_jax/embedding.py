"""Embeddings from a pretrained encoder: log-mel or waveform -> per-time-step and clip features.

    from dwm_jax.embedding import Embedder
    emb = Embedder.from_workdir("workdirs/demo")      # latest checkpoint; stats come with it
    steps = emb.time_features(log_mel)                # [ceil(T / 16), 5 * dim]
    clip = emb.clip_embedding(log_mel)                # [5 * dim]
    clip = emb.from_waveform(wave, sample_rate=44100) # resampled, log-mel, then as above

Features follow M2D: the encoder sees every patch of a window (no masking); for each time step
the tokens of its frequency patches are concatenated (Fp x dim). Clips longer than the
encoder's input are cut into consecutive windows, the last padded with the silence level;
padded time steps are dropped, so a clip's embedding is the mean over its real time steps.
Inputs are raw log-mel (the embedder applies the checkpoint's normalisation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dwm_jax import audio
from dwm_jax.data import NormStats


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
        fp, tp = encoder.grid
        dim = encoder.size.dim
        self.dim = fp * dim
        graphdef, params = nnx.split(encoder)
        self._params = params

        @jax.jit
        def windows_fn(params, x):  # [W, F, T] normalised -> [W, Tp, Fp * dim]
            enc = nnx.merge(graphdef, params)
            tokens = enc(x)[:, 1:].astype(jnp.float32)
            tokens = tokens.reshape(x.shape[0], fp, tp, dim).transpose(0, 2, 1, 3)
            return tokens.reshape(x.shape[0], tp, fp * dim)

        self._windows_fn = windows_fn

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None) -> "Embedder":
        """The encoder of a training run's checkpoint (latest unless ``step``)."""
        from dwm_jax import trainer  # the checkpoint format belongs to the trainer

        encoder, stats, config = trainer.load_encoder(workdir, step)
        return cls(encoder, stats)

    @classmethod
    def random_init(cls, config, stats: NormStats, seed: int = 0) -> "Embedder":
        """The same architecture untrained: the baseline that shows what pretraining bought."""
        import ml_collections

        from dwm_jax import trainer

        cfg = ml_collections.ConfigDict(config) if isinstance(config, dict) else config
        return cls(trainer.build_objective(cfg, nnx.Rngs(seed)).encoder, stats)

    def time_features(self, log_mel: np.ndarray) -> np.ndarray:
        """Raw log-mel [n_mels, T] -> per-time-step features [ceil(T / patch_w), Fp * dim]."""
        log_mel = np.asarray(log_mel, np.float32)
        if log_mel.ndim != 2 or log_mel.shape[0] != self.n_mels:
            raise ValueError(f"expected a log-mel [{self.n_mels}, T]; got {log_mel.shape}")
        length = log_mel.shape[1]
        if length == 0:
            raise ValueError("the log-mel has no frames")
        windows = -(-length // self.frames)
        padded = np.full((self.n_mels, _bucket(windows) * self.frames),
                         self.frontend.pad_value, np.float32)
        padded[:, :length] = log_mel
        x = (padded - self.stats.mean) / self.stats.std
        x = x.reshape(self.n_mels, -1, self.frames).transpose(1, 0, 2)
        steps = np.asarray(self._windows_fn(self._params, jnp.asarray(x)))
        return steps.reshape(-1, self.dim)[: -(-length // self.patch_w)]

    def clip_embedding(self, log_mel: np.ndarray) -> np.ndarray:
        """Raw log-mel [n_mels, T] -> [Fp * dim], the mean over the clip's time steps."""
        return self.time_features(log_mel).mean(axis=0)

    def from_waveform(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """Mono waveform at any rate -> clip embedding (resampled to the front end's rate)."""
        wave = np.asarray(wave, np.float32)
        if sample_rate != self.frontend.sample_rate:
            import librosa
            wave = librosa.resample(wave, orig_sr=sample_rate,
                                    target_sr=self.frontend.sample_rate, res_type="soxr_hq")
        return self.clip_embedding(self.frontend(wave))
