"""The Grain pipeline over built datasets: crops, normalisation, order, shards, resume."""

import itertools

import numpy as np
import pytest

from dwm_jax import data
from dwm_jax.data import pipeline

NAME = "synthetic_sounds/small"


@pytest.fixture(scope="module")
def train(synthetic_small):
    return data.open_split(synthetic_small[0], NAME, "train")


def _records_by_name(split):
    return {split.source[i]["filename"]: split.source[i] for i in range(len(split))}


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_batches_are_normalised_random_crops_of_their_records(train):
    stats = train.norm_stats()
    records = _records_by_name(train)
    loader = data.train_loader(train, batch_size=8, frames=208, stats=stats, seed=3,
                               shard_index=0, shard_count=1, keep_filename=True)
    starts = []
    for batch in _take(loader, 6):
        assert batch["log_mel"].shape == (8, 80, 208) and batch["log_mel"].dtype == np.float32
        for x, label, name in zip(batch["log_mel"], batch["label"], batch["filename"]):
            rec = records[name]
            assert label == rec["label"]
            full = (rec["log_mel"].astype(np.float32) - stats.mean) / stats.std
            # find the crop offset from the first frame, then compare the whole window
            cands = np.flatnonzero(np.abs(full - x[:, :1]).max(axis=0) < 1e-5)
            assert len(cands) >= 1
            start = int(cands[0])
            assert 0 <= start <= full.shape[1] - 208
            np.testing.assert_allclose(x, full[:, start:start + 208], atol=1e-5)
            starts.append(start)
    assert min(starts) < 100 and max(starts) > 300  # offsets spread over the clip


def test_short_clips_are_padded_with_silence_and_long_ones_cropped_deterministically(train):
    stats = data.NormStats(mean=-5.0, std=2.0)
    pad = train.frontend.pad_value
    x = np.arange(80 * 10, dtype=np.float16).reshape(80, 10)
    rng = np.random.default_rng(0)
    out = pipeline.CropAndNormalise(16, stats, pad, "random").random_map({"log_mel": x}, rng)
    np.testing.assert_allclose(out["log_mel"][:, :10], (x.astype(np.float32) + 5) / 2)
    np.testing.assert_allclose(out["log_mel"][:, 10:], (pad + 5) / 2)
    y = np.arange(80 * 30, dtype=np.float32).reshape(80, 30)
    centre = pipeline.CropAndNormalise(10, stats, pad, "center").random_map({"log_mel": y}, rng)
    np.testing.assert_allclose(centre["log_mel"], (y[:, 10:20] + 5) / 2)
    start = pipeline.CropAndNormalise(10, stats, pad, "start").random_map({"log_mel": y}, rng)
    np.testing.assert_allclose(start["log_mel"], (y[:, :10] + 5) / 2)
    with pytest.raises(ValueError, match="crop mode"):
        pipeline.CropAndNormalise(10, stats, pad, "middle")


@pytest.mark.slow
def test_order_is_a_function_of_the_seed_and_epochs_reshuffle(train):
    kw = dict(batch_size=8, frames=64, stats=train.norm_stats(), shard_index=0, shard_count=1,
              keep_filename=True)
    a = _take(data.train_loader(train, seed=1, **kw), 24)  # 24 x 8 = two epochs of 96
    b = _take(data.train_loader(train, seed=1, **kw), 24)
    c = _take(data.train_loader(train, seed=2, **kw), 12)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["log_mel"], y["log_mel"])
        np.testing.assert_array_equal(x["filename"], y["filename"])
    names_a = np.concatenate([x["filename"] for x in a])
    names_c = np.concatenate([x["filename"] for x in c])
    assert not np.array_equal(names_a[:96], names_c)
    # each epoch is a permutation of the split, and the second is a different permutation
    assert sorted(names_a[:96]) == sorted(names_a[96:]) and len(set(names_a[:96])) == 96
    assert not np.array_equal(names_a[:96], names_a[96:])


@pytest.mark.parametrize("shard_count", [2, 3])
def test_host_shards_are_disjoint_and_cover_the_split(synthetic_small, shard_count):
    test = data.open_split(synthetic_small[0], NAME, "test")  # 48 clips
    stats = test.norm_stats(["train"])
    shards = []
    for host in range(shard_count):
        loader = data.eval_loader(test, batch_size=5, frames=32, stats=stats, shard_index=host,
                                  shard_count=shard_count, keep_filename=True)
        shards.append([n for b in loader for n in b["filename"]])
    flat = list(itertools.chain(*shards))
    assert len(flat) == len(set(flat)) == len(test)  # disjoint, nothing lost
    # training shards: disjoint too, each host takes the same number of full batches
    per_host = []
    for host in range(shard_count):
        loader = data.train_loader(test, batch_size=4, frames=32, stats=stats, seed=0,
                                   num_epochs=1, shard_index=host, shard_count=shard_count,
                                   keep_filename=True)
        per_host.append([n for b in loader for n in b["filename"]])
    assert len({len(p) for p in per_host}) == 1
    flat = list(itertools.chain(*per_host))
    assert len(flat) == len(set(flat)) and len(flat) > len(test) - shard_count * 4


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_iterator_state_restores_the_same_batches(train, workers):
    kw = dict(batch_size=8, frames=64, stats=train.norm_stats(), seed=5, shard_index=0,
              shard_count=1, keep_filename=True, worker_count=workers)
    it = iter(data.train_loader(train, **kw))
    for _ in range(15):  # crosses an epoch boundary (12 batches per epoch)
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(4)]
    resumed = iter(data.train_loader(train, **kw))
    resumed.set_state(state)
    got = [next(resumed) for _ in range(4)]
    for x, y in zip(want, got):
        np.testing.assert_array_equal(x["filename"], y["filename"])
        np.testing.assert_array_equal(x["log_mel"], y["log_mel"])  # same random crops
    del it, resumed


@pytest.mark.parametrize("size", [0, 3])
def test_device_prefetcher_state_is_that_of_the_batches_handed_out(train, size):
    """Read ahead by ``size`` batches, the prefetcher's state still resumes right after the
    last batch it handed out; set_state mid-stream drops what was read ahead; the end of
    the data and errors reach the consumer."""
    import jax
    kw = dict(batch_size=8, frames=64, stats=train.norm_stats(), seed=5, shard_index=0,
              shard_count=1, keep_filename=True, num_epochs=2)
    placed = []
    prefetcher = data.DevicePrefetcher(iter(data.train_loader(train, **kw)),
                                       lambda b: placed.append(1) or jax.device_put(b["log_mel"]),
                                       size=size)
    for _ in range(5):
        x, batch = next(prefetcher)
        np.testing.assert_array_equal(np.asarray(x), batch["log_mel"])
    state = prefetcher.get_state()
    want = [next(prefetcher)[1]["filename"] for _ in range(3)]
    if size:   # it reads ahead: size batches beyond the 8 handed out (+1 in its hands)
        import time
        for _ in range(200):
            if len(placed) >= 8 + size:
                break
            time.sleep(0.05)
        assert len(placed) >= 8 + size
    plain = iter(data.train_loader(train, **kw))
    plain.set_state(state)
    assert [next(plain)["filename"].tolist() for _ in range(3)] == [w.tolist() for w in want]
    prefetcher.set_state(state)   # back in time: what was read ahead is dropped
    assert [next(prefetcher)[1]["filename"].tolist() for _ in range(3)] == \
        [w.tolist() for w in want]
    rest = list(itertools.islice(prefetcher, 100))   # 2 epochs of 12 batches, then the end
    assert len(rest) == 24 - 8
    with pytest.raises(StopIteration):
        next(prefetcher)
    prefetcher.close()

    def broken(batch):
        raise OSError("device full")
    failing = data.DevicePrefetcher(iter(data.train_loader(train, **kw)), broken, size=size)
    with pytest.raises(OSError, match="device full"):
        next(failing)
    failing.close()


def test_whole_clips_and_eval_crops(synthetic_small):
    valid = data.open_split(synthetic_small[0], NAME, "valid")
    stats = valid.norm_stats(["train"])
    clips = list(data.whole_clips(valid, stats))
    assert len(clips) == len(valid) and all(c["log_mel"].shape == (80, 609) for c in clips)
    batches = list(data.eval_loader(valid, batch_size=10, frames=608, stats=stats))
    assert [len(b["label"]) for b in batches] == [10, 10, 4]
    centre = np.concatenate([b["log_mel"] for b in batches])
    np.testing.assert_allclose(centre, np.stack([c["log_mel"][:, :608] for c in clips]),
                               atol=1e-6)  # 609 frames: the centre crop starts at 0


def test_reading_errors_name_what_is_wrong(synthetic_small, train, tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m dwm_jax.data synthetic_sounds"):
        data.open_split(str(tmp_path), NAME, "train")
    with pytest.raises(ValueError, match=r"no split\(s\) \['training'\]"):
        data.open_split(synthetic_small[0], NAME, "training")
    with pytest.raises(ValueError, match="builder/config"):
        data.open_split(synthetic_small[0], "synthetic_sounds", "train")
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.train_loader(train, batch_size=1000, frames=64, stats=train.norm_stats(), seed=0)
    with pytest.raises(ValueError, match="shard_index"):
        data.train_loader(train, batch_size=8, frames=64, stats=train.norm_stats(), seed=0,
                          shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="std > 0"):
        data.NormStats(0.0, 0.0)
