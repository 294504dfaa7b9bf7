"""Procedural sound classes for the built-in offline dataset ``synthetic_sounds``.

Twelve acoustically distinct classes, each with randomised parameters whose ranges overlap
across classes (pitch, band, rate, level), placed at a random time in the clip over coloured
background noise at a random SNR, sometimes with a quieter event of another class, at a
random overall gain. Everything comes from the ``numpy.random.Generator`` passed in, so a
clip is a pure function of its seed.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES = (
    "harmonic_tone", "pure_tone", "rising_chirp", "falling_chirp", "noise_band",
    "click_train", "am_tone", "fm_tone", "plucked_notes", "noise_bursts", "chord", "drum_hits",
)
NUM_CLASSES = len(CLASS_NAMES)


def _log_uniform(rng, lo, hi):
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _harmonics(phase: np.ndarray, num: int, rolloff: float, rng) -> np.ndarray:
    """Sum of ``num`` harmonics of the phase track [S], amplitudes k^-rolloff, random phases."""
    out = np.zeros_like(phase)
    for k in range(1, num + 1):
        out += k ** -rolloff * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    return out


def _phase(freq: np.ndarray | float, n: int, sr: int) -> np.ndarray:
    freq = np.broadcast_to(np.asarray(freq, np.float64), (n,))
    return 2 * np.pi * np.cumsum(freq) / sr


def _envelope(n: int, sr: int, rng) -> np.ndarray:
    attack = max(1, int(sr * rng.uniform(0.005, 0.3)))
    release = max(1, int(sr * rng.uniform(0.01, 0.5)))
    env = np.ones(n)
    a, r = min(attack, n // 2), min(release, n // 2)
    env[:a] = np.linspace(0, 1, a)
    env[n - r:] = np.linspace(1, 0, r)
    return env


def _band_noise(n: int, sr: int, centre: float, width_oct: float, rng) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    octaves = np.log2(np.maximum(freqs, 1.0) / centre)
    spec *= np.exp(-0.5 * (octaves / (width_oct / 2)) ** 2)
    return np.fft.irfft(spec, n)


def _coloured_noise(n: int, sr: int, slope: float, rng) -> np.ndarray:
    """Noise with power spectrum ~ f^slope (0 white, -1 pink, -2 brown)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    spec *= np.maximum(freqs, 20.0) ** (slope / 2)
    return np.fft.irfft(spec, n)


def _decaying(n: int, sr: int, onsets: np.ndarray, tau: float) -> np.ndarray:
    """Envelope [n] with exponential decays (time constant tau s) starting at each onset."""
    env = np.zeros(n)
    t = np.arange(n) / sr
    for onset in onsets:
        idx = int(onset * sr)
        env[idx:] = np.maximum(env[idx:], np.exp(-(t[idx:] - t[idx]) / tau))
    return env


def _event(class_id: int, n: int, sr: int, rng) -> np.ndarray:
    """One event of ``class_id``, length n samples, before level normalisation."""
    t = np.arange(n) / sr
    dur = n / sr
    name = CLASS_NAMES[class_id]
    if name == "harmonic_tone":
        f0 = _log_uniform(rng, 90, 900)
        x = _harmonics(_phase(f0, n, sr), int(rng.integers(5, 20)), rng.uniform(0.5, 2.0), rng)
        return x * _envelope(n, sr, rng)
    if name == "pure_tone":
        f0 = _log_uniform(rng, 150, 3000)
        x = _harmonics(_phase(f0, n, sr), int(rng.integers(1, 3)), 2.0, rng)
        return x * _envelope(n, sr, rng)
    if name in ("rising_chirp", "falling_chirp"):
        sweeps = int(rng.integers(1, 5))
        lo = _log_uniform(rng, 100, 1500)
        hi = lo * _log_uniform(rng, 2, 8)
        frac = (t * sweeps / dur) % 1.0
        if name == "falling_chirp":
            frac = 1.0 - frac
        freq = lo * (hi / lo) ** frac
        x = _harmonics(_phase(freq, n, sr), int(rng.integers(1, 4)), 1.5, rng)
        return x * _envelope(n, sr, rng)
    if name == "noise_band":
        x = _band_noise(n, sr, _log_uniform(rng, 200, 5000), rng.uniform(0.2, 1.0), rng)
        return x * _envelope(n, sr, rng)
    if name == "click_train":
        rate = _log_uniform(rng, 3, 40)
        jitter = rng.uniform(0, 0.3)
        period = 1 / rate
        onsets = np.arange(rng.uniform(0, period), dur, period)
        onsets = np.clip(onsets + jitter * period * rng.uniform(-0.5, 0.5, len(onsets)), 0,
                         dur - 1e-3)
        env = _decaying(n, sr, onsets, rng.uniform(0.001, 0.006))
        colour = _band_noise(n, sr, _log_uniform(rng, 500, 6000), 2.0, rng)
        return env * colour
    if name == "am_tone":
        f0 = _log_uniform(rng, 120, 2000)
        carrier = _harmonics(_phase(f0, n, sr), int(rng.integers(1, 5)), 1.0, rng)
        rate, depth = _log_uniform(rng, 2, 16), rng.uniform(0.6, 1.0)
        mod = 1 - depth * 0.5 * (1 + np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)))
        return carrier * mod * _envelope(n, sr, rng)
    if name == "fm_tone":
        f0 = _log_uniform(rng, 120, 2000)
        rate, depth = _log_uniform(rng, 3, 12), rng.uniform(0.03, 0.15)
        freq = f0 * (1 + depth * np.sin(2 * np.pi * rate * t))
        x = _harmonics(_phase(freq, n, sr), int(rng.integers(1, 8)), 1.2, rng)
        return x * _envelope(n, sr, rng)
    if name == "plucked_notes":
        x = np.zeros(n)
        num_notes = int(rng.integers(2, 8))
        tau = _log_uniform(rng, 0.05, 0.4)
        for onset in np.sort(rng.uniform(0, dur * 0.9, num_notes)):
            f0 = _log_uniform(rng, 110, 1200)
            tone = _harmonics(_phase(f0, n, sr), int(rng.integers(3, 12)), 1.0, rng)
            x += tone * _decaying(n, sr, np.array([onset]), tau)
        return x
    if name == "noise_bursts":
        gate = np.zeros(n)
        pos = rng.uniform(0, 0.3)
        while pos < dur:
            length = rng.uniform(0.02, 0.3)
            gate[int(pos * sr):int(min(pos + length, dur) * sr)] = rng.uniform(0.3, 1.0)
            pos += length + rng.uniform(0.05, 0.6)
        return gate * _coloured_noise(n, sr, rng.uniform(-1.0, 0.5), rng)
    if name == "chord":
        root = _log_uniform(rng, 100, 600)
        intervals = rng.choice([3, 4, 5, 7, 9, 12], size=int(rng.integers(2, 4)), replace=False)
        x = _harmonics(_phase(root, n, sr), 6, 1.2, rng)
        for semis in intervals:
            x += _harmonics(_phase(root * 2 ** (semis / 12), n, sr), 6, 1.2, rng)
        return x * _envelope(n, sr, rng)
    if name == "drum_hits":
        tempo = _log_uniform(rng, 1.5, 6)
        onsets = np.arange(rng.uniform(0, 1 / tempo), dur - 0.05, 1 / tempo)
        x = np.zeros(n)
        f_hi, f_lo = _log_uniform(rng, 100, 300), _log_uniform(rng, 40, 90)
        tau = rng.uniform(0.05, 0.25)
        for onset in onsets:
            i = int(onset * sr)
            tt = t[: n - i]
            freq = f_lo + (f_hi - f_lo) * np.exp(-tt / 0.03)
            body = np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-tt / tau)
            snap = rng.standard_normal(n - i) * np.exp(-tt / 0.01) * rng.uniform(0.1, 0.8)
            x[i:] += body + snap
        return x
    raise ValueError(f"unknown synthetic class id {class_id}")


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x ** 2)) + 1e-12)


def synthesize(class_id: int, rng: np.random.Generator, *, sample_rate: int = 16000,
               seconds: float = 6.08) -> np.ndarray:
    """One clip of class ``class_id`` -> float32 waveform [round(seconds * sample_rate)].

    The event covers 30-100 % of the clip at a random position, over coloured noise at an
    SNR of 0-25 dB; with probability 0.5 a second event of another class is mixed in 6-20 dB
    lower; the whole clip gets a random gain of -30 to 0 dB (peak kept below 1).
    """
    if not 0 <= class_id < NUM_CLASSES:
        raise ValueError(f"class_id must be in [0, {NUM_CLASSES}); got {class_id}")
    n = int(round(seconds * sample_rate))
    clip = np.zeros(n)

    def place(cid, level):
        length = int(n * rng.uniform(0.3, 1.0))
        start = int(rng.integers(0, n - length + 1))
        event = _event(cid, length, sample_rate, rng)
        clip[start:start + length] += level * event / _rms(event)

    place(class_id, 1.0)
    if rng.uniform() < 0.5:
        other = int((class_id + rng.integers(1, NUM_CLASSES)) % NUM_CLASSES)
        place(other, 10 ** (-rng.uniform(6, 20) / 20))
    noise = _coloured_noise(n, sample_rate, rng.uniform(-2.0, 0.0), rng)
    clip += noise / _rms(noise) * _rms(clip) * 10 ** (-rng.uniform(0, 25) / 20)
    clip *= 10 ** (-rng.uniform(0, 30) / 20) / max(np.abs(clip).max(), 1e-9) * 0.9
    return clip.astype(np.float32)
