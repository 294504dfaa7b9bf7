"""Audio loading and the log-mel front end against direct librosa computations."""

import librosa
import numpy as np
import pytest
import soundfile

from dwm_jax import audio


def _tone(seconds, rate, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1234 * t * (1 + t))
    x = x + 0.01 * rng.standard_normal(len(t))
    if channels == 2:
        x = np.stack([x, 0.5 * x[::-1]], axis=1)
    return x.astype(np.float32)


@pytest.mark.parametrize("ext,rate,channels", [
    ("wav", 16000, 1), ("wav", 44100, 2), ("flac", 22050, 1), ("ogg", 8000, 1),
    ("mp3", 32000, 2),
])
def test_front_end_matches_librosa_for_every_format(tmp_path, ext, rate, channels):
    path = str(tmp_path / f"clip.{ext}")
    soundfile.write(path, _tone(1.5, rate, channels), rate)
    got = audio.LogMelFrontEnd().from_file(path)
    # the direct computation: librosa's own loader (mono, soxr_hq resampling) + melspectrogram
    wave, sr = librosa.load(path, sr=16000, mono=True, res_type="soxr_hq")
    mel = librosa.feature.melspectrogram(y=wave, sr=sr, n_fft=400, hop_length=160, n_mels=80,
                                         fmin=50, fmax=8000, power=2.0, pad_mode="reflect")
    want = np.log(mel + np.finfo(np.float32).eps)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert got.shape[0] == 80 and abs(got.shape[1] - 151) <= 2  # 1.5 s at 100 frames/s
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)


def test_front_end_settings_are_honoured(tmp_path):
    path = str(tmp_path / "a.wav")
    soundfile.write(path, _tone(1.0, 22050), 22050)
    fe = audio.LogMelFrontEnd(sample_rate=22050, n_fft=1024, hop_length=256, n_mels=64,
                              fmin=0, fmax=11025)
    got = fe.from_file(path)
    assert got.shape == (64, fe.frames(22050))
    wave, _ = soundfile.read(path, dtype="float32")
    want = np.log(librosa.feature.melspectrogram(y=wave, sr=22050, n_fft=1024, hop_length=256,
                                                 n_mels=64, fmin=0, fmax=11025,
                                                 pad_mode="reflect") + fe.eps)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    assert fe.pad_value == pytest.approx(np.log(np.finfo(np.float32).eps))


def test_bad_files_raise_errors_that_name_them(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)))
    empty = tmp_path / "empty.wav"
    soundfile.write(str(empty), np.zeros(0, np.float32), 16000)
    for path, why in [(corrupt, "cannot read"), (empty, "no audio samples"),
                      (tmp_path / "missing.flac", "cannot read")]:
        with pytest.raises(audio.AudioLoadError, match=why) as err:
            audio.load_audio(path)
        assert str(path) in str(err.value)


@pytest.mark.parametrize("field,value", [("fmax", 9000.0), ("n_mels", 0), ("eps", 0.0),
                                         ("hop_length", -1)])
def test_impossible_front_end_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        audio.LogMelFrontEnd(**{field: value})
