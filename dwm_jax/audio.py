"""Audio front end: waveforms to log-mel spectrograms with the paper's defaults.

16 kHz mono, n_fft 400 (25 ms), hop 160 (10 ms), 80 mel bins over 50-8000 Hz,
``log(mel + eps)``. Returns float32 ``[n_mels, frames]`` (frequency first, as the models
expect). Imports nothing else from dwm_jax.
"""

from __future__ import annotations

import librosa
import numpy as np

LOG_EPS = float(np.finfo(np.float32).eps)


def log_mel(wave: np.ndarray, sample_rate: int = 16000, *, n_fft: int = 400,
            hop_length: int = 160, n_mels: int = 80, fmin: float = 50.0,
            fmax: float = 8000.0, eps: float = LOG_EPS) -> np.ndarray:
    """Mono waveform [S] at ``sample_rate`` -> log-mel float32 [n_mels, 1 + S // hop]."""
    wave = np.asarray(wave, np.float32)
    if wave.ndim != 1:
        raise ValueError(f"log_mel expects a mono waveform [samples]; got shape {wave.shape}")
    mel = librosa.feature.melspectrogram(
        y=wave, sr=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels,
        fmin=fmin, fmax=fmax, power=2.0, center=True)
    return np.log(mel + eps).astype(np.float32)
