"""Audio front end: audio files to log-mel spectrograms with the paper's defaults.

16 kHz mono, n_fft 400 (25 ms), hop 160 (10 ms), 80 mel bins over 50-8000 Hz,
``log(mel + eps)``: the authors' front end (nnAudio ``MelSpectrogram``: periodic Hann window,
centred frames with reflect padding, Slaney mel filterbank with area normalisation, power 2;
eps = float32 eps). ``tests/test_reference.py`` compares it with their numbers.
Spectrograms are float32 ``[n_mels, frames]`` (frequency first, as the models and samplers
expect). Any file soundfile reads (wav, flac, ogg, mp3) loads; channels
are averaged and the signal is resampled (soxr) to the front end's rate. Imports nothing
else from dwm_jax.
"""

from __future__ import annotations

from dwm_jax._extras import require

require("audio", "librosa", "soundfile")

import dataclasses
import os

import librosa
import numpy as np
import soundfile

LOG_EPS = float(np.finfo(np.float32).eps)


class AudioLoadError(ValueError):
    """A file that cannot be turned into audio: unreadable, corrupt, empty or non-finite."""


def load_audio(path: str | os.PathLike, sample_rate: int = 16000) -> np.ndarray:
    """Reads ``path`` -> mono float32 waveform [S] at ``sample_rate``.

    Raises AudioLoadError naming the file when it is missing, unreadable, has no samples or
    holds non-finite values.
    """
    path = os.fspath(path)
    try:
        data, file_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError or OSError
        raise AudioLoadError(f"{path}: cannot read audio ({type(e).__name__}: {e})") from e
    if data.shape[0] == 0:
        raise AudioLoadError(f"{path}: the file holds no audio samples")
    _check_wav_length(path)
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.all(np.isfinite(wave)):
        raise AudioLoadError(f"{path}: the audio holds NaN or infinite samples")
    if file_rate != sample_rate:
        wave = librosa.resample(wave, orig_sr=file_rate, target_sr=sample_rate,
                                res_type="soxr_hq")
    return np.ascontiguousarray(wave, dtype=np.float32)


def to_float_samples(wave) -> np.ndarray:
    """Samples of any numeric dtype -> float32 at full scale +-1, as audio files are read:
    floats as they are, integer PCM (int16, int32, uint8, ...) scaled by its range. A bool,
    complex or non-numeric array is refused (ValueError naming the dtype)."""
    wave = np.asarray(wave)
    if wave.dtype.kind in "iu":
        info = np.iinfo(wave.dtype)
        middle = 0 if wave.dtype.kind == "i" else (info.max + 1) // 2
        return ((wave.astype(np.float64) - middle) / (info.max + 1 - middle)).astype(np.float32)
    if wave.dtype.kind != "f":
        raise ValueError(f"audio samples must be floats in [-1, 1] or integer PCM; got dtype "
                         f"{wave.dtype}")
    return wave.astype(np.float32)


def _check_wav_length(path: str):
    """A WAV whose data chunk is shorter than its header says was cut off (an interrupted
    copy or download); libsndfile reads what is there without a word, so look ourselves."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return  # not a plain RIFF WAV (RF64, other formats): nothing to compare
        size = os.path.getsize(path)
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return
            declared = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                held = size - f.tell()
                if held < declared:
                    raise AudioLoadError(f"{path}: truncated WAV: its header promises "
                                         f"{declared} bytes of audio, the file holds {held}")
                return
            f.seek(declared + (declared & 1), os.SEEK_CUR)


def log_mel(wave: np.ndarray, sample_rate: int = 16000, *, n_fft: int = 400,
            hop_length: int = 160, n_mels: int = 80, fmin: float = 50.0,
            fmax: float = 8000.0, eps: float = LOG_EPS,
            pad_mode: str = "reflect") -> np.ndarray:
    """Mono waveform [S] at ``sample_rate`` -> log-mel float32 [n_mels, 1 + S // hop].

    ``pad_mode``: how the centred STFT pads ``n_fft // 2`` samples at each end ('reflect' as
    the authors' nnAudio front end; 'constant' = zeros, librosa's default)."""
    wave = np.asarray(wave, np.float32)
    if wave.ndim != 1:
        raise ValueError(f"log_mel expects a mono waveform [samples]; got shape {wave.shape}")
    mel = librosa.feature.melspectrogram(
        y=wave, sr=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels,
        fmin=fmin, fmax=fmax, power=2.0, center=True, pad_mode=pad_mode)
    return np.log(mel + eps).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LogMelFrontEnd:
    """The front end's settings, kept together so datasets can record how they were made."""

    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 80
    fmin: float = 50.0
    fmax: float = 8000.0
    eps: float = LOG_EPS
    pad_mode: str = "reflect"

    def __post_init__(self):
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"LogMelFrontEnd.{name} must be a positive integer; got "
                                 f"{getattr(self, name)!r}")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(f"LogMelFrontEnd needs 0 <= fmin < fmax <= sample_rate / 2; got "
                             f"fmin={self.fmin}, fmax={self.fmax}, "
                             f"sample_rate={self.sample_rate}")
        if self.eps <= 0:
            raise ValueError(f"LogMelFrontEnd.eps must be > 0; got {self.eps}")
        if self.pad_mode not in ("reflect", "constant"):
            raise ValueError(f"LogMelFrontEnd.pad_mode must be 'reflect' or 'constant'; got "
                             f"{self.pad_mode!r}")

    @property
    def pad_value(self) -> float:
        """The log-mel value of digital silence: what padding a short clip should use."""
        return float(np.log(np.float32(self.eps)))

    def frames(self, num_samples: int) -> int:
        """Frames produced for a waveform of ``num_samples`` (centred STFT)."""
        return 1 + num_samples // self.hop_length

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        """Waveform [S] at ``sample_rate`` -> float32 [n_mels, frames(S)]."""
        return log_mel(wave, self.sample_rate, n_fft=self.n_fft, hop_length=self.hop_length,
                       n_mels=self.n_mels, fmin=self.fmin, fmax=self.fmax, eps=self.eps,
                       pad_mode=self.pad_mode)

    def from_file(self, path: str | os.PathLike) -> np.ndarray:
        """Audio file -> float32 [n_mels, frames]; AudioLoadError names a bad file."""
        return self(load_audio(path, self.sample_rate))
