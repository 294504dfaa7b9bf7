"""The demo figure path and the log-mel front end."""

import librosa
import numpy as np
import pytest

from dwm_jax import audio, plots


def test_log_mel_matches_librosa_and_paper_defaults():
    wave = plots.demo_clip(seconds=1.0)
    lm = audio.log_mel(wave)
    assert lm.shape == (80, 101) and lm.dtype == np.float32
    mel = librosa.feature.melspectrogram(y=wave, sr=16000, n_fft=400, hop_length=160,
                                         n_mels=80, fmin=50, fmax=8000, pad_mode="reflect")
    np.testing.assert_allclose(lm, np.log(mel + np.finfo(np.float32).eps), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.slow
def test_mask_figure_masks_the_active_regions(tmp_path):
    masks = plots.mask_figure(str(tmp_path / "masks.png"))
    assert (tmp_path / "masks.png").stat().st_size > 10_000
    for m in masks.values():
        assert m.shape == (190,) and m.sum() == 133
    # the demo clip is silent in its first 0.3 s: DWM at hint 0 keeps those patches visible
    silent_cols = np.arange(190) % 38 == 0
    assert masks["dispersion"][silent_cols].mean() < masks["random"][silent_cols].mean() + 0.01
    plots.plot_hint_schedule(str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").stat().st_size > 10_000
