"""The HEAR 2021 API (dwm_jax.hear) on a run trained here: every rule hearvalidator checks,
checked here for the clip lengths the benchmark's tasks use, a 20-minute clip, and
hearvalidator itself where it is installed."""

import importlib.util
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the HEAR API needs PyTorch ('make test' "
                            "installs it where a local CPU wheel exists)")

from dwm_jax import hear  # noqa: E402
from dwm_jax.embedding import Embedder  # noqa: E402

RATES = (16000, 22050, 44100, 48000)   # the sample rates hearvalidator accepts


@pytest.fixture(scope="module")
def model(trained_run):
    return hear.load_model(trained_run)


def _noise(n, seconds, rate, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, int(seconds * rate)), generator=g) * 2 - 1


def test_the_model_has_the_attributes_the_api_asks_for(model):
    assert isinstance(model, torch.nn.Module)
    assert model.sample_rate in RATES
    assert isinstance(model.scene_embedding_size, int)
    assert isinstance(model.timestamp_embedding_size, int)


@pytest.mark.parametrize("n,seconds", [(1, 1.07), (1, 1.98), (1, 4.0), (4, 2.74), (16, 2.0)])
def test_timestamp_embeddings_follow_the_rules(model, n, seconds):
    audio = _noise(n, seconds, model.sample_rate)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert emb.dtype == torch.float32 and emb.shape[0] == n
    assert emb.shape[2] == model.timestamp_embedding_size and ts.shape == emb.shape[:2]
    diffs = torch.diff(ts)
    assert torch.all(torch.abs(diffs - diffs.mean()) < 1e-3)       # a regular hop...
    assert float(diffs.mean()) <= 50.0                              # ...of at most 50 ms
    # centred: the first covers frames 0..15 (centre 75 ms); the last is centred inside the
    # clip, and none that is is left out
    last_frame_ms = 10.0 * (int(seconds * model.sample_rate) // 160)
    assert float(ts[0, 0]) == pytest.approx(75.0)
    assert float(ts[0, -1]) <= last_frame_ms < float(ts[0, -1]) + 40
    assert torch.isfinite(emb).all()


def test_scene_embeddings_follow_the_rules(model):
    audio = _noise(8, 3.74, model.sample_rate)
    emb = hear.get_scene_embeddings(audio, model)
    assert emb.dtype == torch.float32 and emb.shape == (8, model.scene_embedding_size)


def test_the_embeddings_are_the_embedders(model, trained_run):
    """Scene = the Embedder's clip embedding; every shifts-th timestamp embedding = its
    time steps (the unshifted run); the others are its steps on the shifted log-mel."""
    emb = Embedder.from_workdir(trained_run)
    audio = _noise(2, 2.74, model.sample_rate, seed=1)
    lms = [emb.frontend(a.numpy()) for a in audio]
    scene = hear.get_scene_embeddings(audio, model).numpy()
    frames, _ = hear.get_timestamp_embeddings(audio, model)
    for i, lm in enumerate(lms):
        np.testing.assert_allclose(scene[i], emb.clip_embedding(lm), rtol=1e-6, atol=1e-6)
        steps, ours = emb.time_features(lm), frames[i, ::4].numpy()
        assert len(steps) - 1 <= len(ours) <= len(steps)   # a last step over padding dropped
        np.testing.assert_allclose(ours, steps[: len(ours)], rtol=1e-6, atol=1e-6)
        shifted = emb.time_features(lm[:, 8:])
        ours = frames[i, 2::4].numpy()
        np.testing.assert_allclose(ours, shifted[: len(ours)], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_a_twenty_minute_clip(model):
    audio = _noise(1, 20 * 60, model.sample_rate) * 0.1
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert emb.shape == (1, 29999, model.timestamp_embedding_size)
    assert float(ts[0, -1]) == pytest.approx(75.0 + 40.0 * 29998)
    assert torch.isfinite(emb).all()


def test_bad_audio_is_refused_in_one_line(model):
    with pytest.raises(ValueError, match=r"audio must be \[n_sounds, n_samples\]"):
        hear.get_scene_embeddings(torch.zeros(16000), model)
    with pytest.raises(ValueError, match="load_model needs a workdir"):
        hear.load_model()


def test_integer_pcm_is_scaled_as_a_file_would_be_and_bool_refused(model):
    audio = _noise(2, 1.3, model.sample_rate)
    pcm = torch.round(audio * 32767).to(torch.int16)
    as_float = pcm.to(torch.float32) / 32768
    assert torch.equal(hear.get_scene_embeddings(pcm, model),
                       hear.get_scene_embeddings(as_float, model))
    got, _ = hear.get_timestamp_embeddings(pcm, model)
    want, _ = hear.get_timestamp_embeddings(as_float, model)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="dtype bool"):
        hear.get_scene_embeddings(audio > 0, model)


def test_an_empty_batch_gives_empty_outputs_of_the_right_shapes(model):
    empty = torch.zeros((0, int(2.74 * model.sample_rate)))
    scene = hear.get_scene_embeddings(empty, model)
    assert scene.shape == (0, model.scene_embedding_size) and scene.dtype == torch.float32
    emb, ts = hear.get_timestamp_embeddings(empty, model)
    full_emb, full_ts = hear.get_timestamp_embeddings(_noise(1, 2.74, model.sample_rate), model)
    assert emb.shape == (0,) + full_emb.shape[1:] and ts.shape == (0, full_ts.shape[1])


@pytest.mark.slow
def test_hearvalidator_accepts_the_module(trained_run, monkeypatch, capsys):
    """hearvalidator (PyPI) itself. It imports tensorflow for its tf.Module branch only;
    where tensorflow is absent a stand-in module with those two names is used (a torch
    model never reaches them)."""
    if importlib.util.find_spec("hearvalidator") is None:
        pytest.skip("hearvalidator is not installed ('make test' installs it): the rules it "
                    "checks are the tests above")
    if importlib.util.find_spec("tensorflow") is None:
        stand_in = types.ModuleType("tensorflow")
        stand_in.Module = type("Module", (), {})
        stand_in.device = lambda name: None
        monkeypatch.setitem(sys.modules, "tensorflow", stand_in)
    from hearvalidator.validate import ValidateModel
    ValidateModel("dwm_jax.hear", trained_run, device="cpu")()
    out = capsys.readouterr().out
    assert "Checking get_scene_embeddings" in out and "Interval between timestamps is 40" in out
