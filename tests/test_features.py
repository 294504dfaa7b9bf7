"""The one encoding path: clips batched together give each clip's features as one clip at a
time does (whole windows of many clips in shared calls, the shorter last windows grouped by
width), on one device and split over eight."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx

from dwm_jax import probe
from dwm_jax.embedding import MAX_WINDOWS, Embedder
from dwm_jax.models import vit
from dwm_jax.normalisation import NormStats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES = 64   # the micro encoder's window: 80 x 64, patches 16 x 16


@pytest.fixture(scope="module")
def embedder():
    encoder = vit.Encoder("micro", input_shape=(80, FRAMES), rngs=nnx.Rngs(3))
    return Embedder(encoder, NormStats(-6.0, 3.0))


def _clips(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(-6, 3, (80, n)).astype(np.float32) for n in lengths]


# shorter than a patch, than a window, exactly one and two windows, a ragged tail, more
# windows than one call holds
LENGTHS = [5, 16, 40, FRAMES, 2 * FRAMES, 3 * FRAMES + 17, (MAX_WINDOWS + 3) * FRAMES + 9, 40]


def test_batched_features_equal_one_clip_at_a_time(embedder):
    clips = _clips(LENGTHS)
    batched = embedder.time_features_batch(clips)
    for clip, got in zip(clips, batched):
        want = embedder.time_features(clip)
        assert got.shape == want.shape == (-(-clip.shape[1] // 16), embedder.dim)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    pooled = embedder.clip_embeddings(clips, pool="mean_std")
    for clip, row in zip(clips, pooled):
        np.testing.assert_allclose(row, embedder.clip_embedding(clip, pool="mean_std"),
                                   rtol=1e-6, atol=1e-6)


def test_the_probes_read_clips_in_batches_through_the_featuriser(embedder):
    featurise, _ = embedder.featuriser("encoder")
    calls = []
    counted = type(featurise)(featurise.one, lambda group: calls.append(len(group)) or
                              featurise.batch(group))
    clips = _clips([30 + 7 * i for i in range(probe.CLIPS_PER_BATCH + 5)], seed=1)
    got = probe.featurise_all(len(clips), clips.__getitem__, counted)
    assert calls == [probe.CLIPS_PER_BATCH, 5]
    np.testing.assert_allclose(np.stack(got), np.stack([featurise(c) for c in clips]),
                               rtol=1e-6, atol=1e-6)


def test_a_bad_clip_in_a_batch_is_named(embedder):
    clips = _clips([40, 40])
    clips[1][3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        embedder.time_features_batch(clips)


EIGHT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {repo!r})
    import jax, numpy as np
    from flax import nnx
    from dwm_jax.embedding import Embedder
    from dwm_jax.models import vit
    from dwm_jax.normalisation import NormStats
    assert jax.local_device_count() == 8
    emb = Embedder(vit.Encoder("micro", input_shape=(80, 64), rngs=nnx.Rngs(3)),
                   NormStats(-6.0, 3.0))
    rng = np.random.default_rng(0)
    clips = [rng.normal(-6, 3, (80, n)).astype(np.float32) for n in {lengths!r}]
    np.save(sys.argv[1], np.concatenate(emb.time_features_batch(clips)))
""")


@pytest.mark.slow
def test_features_split_over_eight_devices_equal_one_device(embedder, tmp_path):
    out = str(tmp_path / "eight.npy")
    res = subprocess.run([sys.executable, "-c", EIGHT.format(repo=REPO, lengths=LENGTHS), out],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    want = np.concatenate(embedder.time_features_batch(_clips(LENGTHS)))
    np.testing.assert_allclose(np.load(out), want, rtol=1e-6, atol=1e-6)
