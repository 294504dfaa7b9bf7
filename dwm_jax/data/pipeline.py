"""Reading built datasets: TFDS array_record data sources batched by Grain (no TensorFlow).

``open_split`` finds a built dataset and returns its random-access source with the labels,
front-end settings and statistics stored beside it. ``train_loader`` gives this host's shard
of a split, shuffled by seed and epoch, randomly cropped (or padded) to the model's frame
count, normalised and batched, with worker prefetch; its iterator's state can be saved and
restored (``iterator.get_state()`` / ``set_state``, or Orbax through grain.checkpoint) so a
resumed run reads the same batches. ``eval_loader`` reads deterministic crops once;
``whole_clips`` yields uncropped clips for clip-level evaluation. ``DevicePrefetcher`` reads
and places the next training batches on the devices while a step runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import threading
from typing import Iterator, Sequence

import grain
from absl import flags
import numpy as np
import tensorflow_datasets as tfds

from dwm_jax import audio, storage
from dwm_jax.normalisation import NormStats

CROP_MODES = ("random", "center", "start")



@dataclasses.dataclass(frozen=True)
class DatasetSplit:
    """A built split: its random-access ``source`` (``source[i]`` -> dict of numpy arrays)."""

    name: str                       # e.g. "synthetic_sounds/default"
    split: str                      # e.g. "train", "fold1+fold2"
    source: object
    label_names: tuple[str, ...] | None
    frontend: audio.LogMelFrontEnd
    metadata: dict
    multi_label: bool = False       # examples hold ``labels`` (multi-hot), not ``label``
    event_labels: tuple[str, ...] | None = None  # examples hold ``frame_labels`` [C, T]

    def __len__(self) -> int:
        return len(self.source)

    @property
    def num_classes(self) -> int:
        return len(self.label_names) if self.label_names else 0

    def norm_stats(self, splits: Sequence[str] | None = None) -> NormStats:
        """Pooled statistics of ``splits`` (default: the first part of this split's name,
        e.g. 'train' for 'train[:50%]'; all parts for 'fold1+fold2')."""
        stats = self.metadata.get("stats", {})
        if splits is None:
            splits = [s.split("[")[0] for s in self.split.split("+")]
        missing = [s for s in splits if s not in stats]
        if missing:
            raise ValueError(f"{self.name}: no statistics stored for split(s) {missing}; "
                             f"stored: {sorted(stats)}")
        n_mels = self.frontend.n_mels
        frames = sum(stats[s]["frames"] for s in splits) * n_mels
        total = sum(np.sum(stats[s]["sum"]) for s in splits)
        total_sq = sum(np.sum(stats[s]["sumsq"]) for s in splits)
        mean = total / frames
        return NormStats(float(mean), float(np.sqrt(max(total_sq / frames - mean ** 2, 0.0))))


def _version_key(name: str) -> tuple[int, ...] | None:
    parts = name.split(".")
    return tuple(map(int, parts)) if len(parts) == 3 and all(p.isdigit() for p in parts) \
        else None


def latest_version(path: str) -> str | None:
    if storage.exists(storage.join(path, "dataset_info.json")):
        return path
    if not storage.isdir(path):
        return None
    versions = sorted((_version_key(v), v) for v in storage.listdir(path)
                      if _version_key(v) and storage.exists(storage.join(path, v,
                                                                        "dataset_info.json")))
    return storage.join(path, versions[-1][1]) if versions else None


MARKERS = ("dataset_info.json", "metadata.json")   # written last: a dataset is whole with them


def dataset_dir(data_dir: str, name: str) -> str:
    """``DATA_DIR/<builder>/<config>/<latest version>`` of ``name`` = 'builder/config', or
    ``name`` itself when it is the directory of a built dataset (or of its versions). A
    dataset in a bucket is read through its local copy (array_record reads local files)."""
    found = _find_dataset(data_dir, name)
    if storage.is_url(found):
        return storage.mirror(found)
    return found


def _find_dataset(data_dir: str, name: str) -> str:
    if os.path.isabs(name) or name.startswith(".") or storage.is_url(name):
        storage.check(name, "dataset")
        found = latest_version(name)
        if not found:
            raise FileNotFoundError(f"{name!r} is not the directory of a built dataset (no "
                                    "dataset_info.json in it or in a version subdirectory)")
        return found
    if name.count("/") != 1:
        raise ValueError(f"dataset name must look like 'builder/config' (e.g. "
                         f"'synthetic_sounds/default'); got {name!r}")
    storage.check(data_dir, "data_dir")
    found = latest_version(storage.join(data_dir, name))
    if not found:
        raise FileNotFoundError(
            f"dataset {name!r} is not built under {data_dir!r}; build it with "
            f"`python -m dwm_jax.data {name.split('/')[0]} --data_dir {data_dir} ...`")
    return found


def dataset_fingerprint(data_dir: str, name: str) -> str:
    """A hash of a built dataset's descriptions (TFDS info with shard sizes, our metadata
    with per-split statistics): it changes whenever the dataset is rebuilt with other data,
    so caches and resumed runs can tell two builds apart."""
    path = dataset_dir(data_dir, name)
    h = hashlib.sha256()
    for file in ("dataset_info.json", "metadata.json"):
        with open(os.path.join(path, file), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def open_split(data_dir: str, name: str, split: str) -> DatasetSplit:
    """Opens split ``split`` (TFDS split syntax: 'train', 'fold1+fold2', 'train[:80%]')."""
    path = dataset_dir(data_dir, name)
    builder = tfds.builder_from_directory(path)
    base_splits = [s.split("[")[0] for s in split.split("+")]
    unknown = [s for s in base_splits if s not in builder.info.splits]
    if unknown:
        raise ValueError(f"{name} at {path} has no split(s) {unknown}; it has "
                         f"{sorted(builder.info.splits)}")
    with open(os.path.join(path, "metadata.json")) as f:
        metadata = json.load(f)
    features = builder.info.features
    multi_label = "labels" in features.keys()
    if multi_label:
        label_names = tuple(metadata["label_names"])
    else:
        label_names = tuple(features["label"].names) if "label" in features.keys() else None
    # datasets written before pad_mode was recorded used librosa's zero padding
    frontend = audio.LogMelFrontEnd(**{"pad_mode": "constant", **metadata["frontend"]})
    event_labels = tuple(metadata["event_labels"]) if "event_labels" in metadata else None
    return DatasetSplit(name, split, builder.as_data_source(split), label_names, frontend,
                        metadata, multi_label, event_labels)


class CropAndNormalise(grain.transforms.RandomMap):
    """{'log_mel' [F, T], ...} -> {'log_mel' float32 [F, frames], 'label'?, 'filename'?}.

    Crops ``frames`` frames (at a random offset for mode 'random', the middle for 'center',
    the beginning for 'start'); pads shorter clips at the end with the silence level before
    normalising with ``stats``.
    """

    def __init__(self, frames: int, stats: NormStats, pad_value: float, mode: str = "random",
                 keep_filename: bool = False):
        if mode not in CROP_MODES:
            raise ValueError(f"crop mode must be one of {CROP_MODES}; got {mode!r}")
        if frames <= 0:
            raise ValueError(f"frames must be positive; got {frames}")
        self.frames, self.stats, self.pad_value = frames, stats, pad_value
        self.mode, self.keep_filename = mode, keep_filename

    def random_map(self, element, rng: np.random.Generator):
        x = np.asarray(element["log_mel"], np.float32)
        length = x.shape[1]
        if length >= self.frames:
            if self.mode == "random":
                start = int(rng.integers(0, length - self.frames + 1))
            elif self.mode == "center":
                start = (length - self.frames) // 2
            else:
                start = 0
            x = x[:, start:start + self.frames]
        else:
            x = np.pad(x, ((0, 0), (0, self.frames - length)), constant_values=self.pad_value)
        out = {"log_mel": (x - self.stats.mean) / np.float32(self.stats.std)}
        if "label" in element:
            out["label"] = np.int32(element["label"])
        if "labels" in element:   # multi-label sets: multi-hot
            out["labels"] = np.asarray(element["labels"], np.float32)
        if self.keep_filename:
            out["filename"] = element["filename"]
        return out


def _workers_ready(worker_count: int) -> int:
    """Grain's worker processes read absl flags; outside an absl app use their defaults."""
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0; got {worker_count}")
    if worker_count and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return worker_count


def _shard_options(shard_index, shard_count, drop_remainder):
    if shard_index is None and shard_count is None:
        return grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)
    if shard_index is None or shard_count is None or not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count; got {shard_index}, "
                         f"{shard_count}")
    return grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=drop_remainder)


def train_loader(split: DatasetSplit, *, batch_size: int, frames: int, stats: NormStats,
                 seed: int, num_epochs: int | None = None, shard_index: int | None = None,
                 shard_count: int | None = None, worker_count: int = 0,
                 worker_buffer_size: int = 2, keep_filename: bool = False) -> grain.DataLoader:
    """Shuffled, randomly cropped, normalised batches of this host's shard (per-host
    ``batch_size``); endless unless ``num_epochs``. Shards default to this JAX process's
    (``jax.process_index()`` of ``jax.process_count()``); each host drops its shard's
    remainder so all hosts take the same number of steps."""
    if len(split) < batch_size:
        raise ValueError(f"{split.name}:{split.split} has {len(split)} clips, fewer than one "
                         f"batch of {batch_size}")
    shard = _shard_options(shard_index, shard_count, drop_remainder=True)
    sampler = grain.samplers.IndexSampler(len(split), shard_options=shard, shuffle=True,
                                          num_epochs=num_epochs, seed=seed)
    ops = [CropAndNormalise(frames, stats, split.frontend.pad_value, "random", keep_filename),
           grain.transforms.Batch(batch_size, drop_remainder=True)]
    return grain.DataLoader(data_source=split.source, sampler=sampler, operations=ops,
                            worker_count=_workers_ready(worker_count),
                            worker_buffer_size=worker_buffer_size)


def eval_loader(split: DatasetSplit, *, batch_size: int, frames: int, stats: NormStats,
                crop: str = "center", shard_index: int | None = None,
                shard_count: int | None = None, keep_filename: bool = False,
                worker_count: int = 0) -> grain.DataLoader:
    """One pass, in stored order, with deterministic crops; the last batch may be short.
    Shards do not drop records, so the hosts' shards together cover the split."""
    if crop == "random":
        raise ValueError("eval_loader reads deterministic crops: crop='center' or 'start'")
    shard = _shard_options(shard_index, shard_count, drop_remainder=False)
    sampler = grain.samplers.IndexSampler(len(split), shard_options=shard, shuffle=False,
                                          num_epochs=1, seed=0)
    ops = [CropAndNormalise(frames, stats, split.frontend.pad_value, crop, keep_filename),
           grain.transforms.Batch(batch_size, drop_remainder=False)]
    return grain.DataLoader(data_source=split.source, sampler=sampler, operations=ops,
                            worker_count=_workers_ready(worker_count))


def whole_clips(split: DatasetSplit, stats: NormStats, *, shard_index: int = 0,
                shard_count: int = 1) -> Iterator[dict]:
    """Uncropped clips of this shard, in stored order: {'log_mel' float32 [F, T_i],
    'label'?, 'filename'} with ``stats`` applied."""
    for i in range(shard_index, len(split), shard_count):
        element = split.source[i]
        out = {"log_mel": (np.asarray(element["log_mel"], np.float32) - stats.mean) / stats.std,
               "filename": element["filename"]}
        if "label" in element:
            out["label"] = np.int32(element["label"])
        yield out


class DevicePrefetcher:
    """Reads the next ``size`` batches in a background thread and places them on the devices
    (``place``: host batch -> device array) while the current step runs.

    ``next(p)`` -> (placed array, host batch). ``get_state()`` / ``set_state()`` are those of
    the wrapped Grain iterator *as of the last batch handed out*, not of the batches read
    ahead, so a checkpoint saved through it (grain.checkpoint) resumes exactly where the
    trained steps ended. The thread starts at the first ``next``; errors in it (including
    the end of the data) are raised by ``next``. ``size=0``: no thread, each batch is read
    and placed when asked for.
    """

    _END = object()

    def __init__(self, iterator, place, size: int = 2):
        if size < 0:
            raise ValueError(f"prefetch size must be >= 0; got {size}")
        self._iterator, self._place, self._size = iterator, place, size
        self._queue: "queue.Queue" = queue.Queue(maxsize=max(size, 1))
        self._state = iterator.get_state()
        self._thread = None
        self._stop = False

    def _run(self):
        try:
            while not self._stop:
                batch = next(self._iterator)
                item = (self._place(batch), batch, self._iterator.get_state())
                while not self._stop:  # put, but give up when asked to stop
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._queue.put((self._END, e, None))

    def __iter__(self):
        return self

    def __next__(self):
        if self._size == 0:
            batch = next(self._iterator)
            self._state = self._iterator.get_state()
            return self._place(batch), batch
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="device-prefetch",
                                            daemon=True)
            self._thread.start()
        placed, batch, state = self._queue.get()
        if placed is self._END:
            self._thread = None
            raise batch
        self._state = state
        return placed, batch

    def close(self):
        """Stops the thread; batches read ahead are dropped (the state is unaffected)."""
        self._stop = True
        while self._thread is not None and self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread, self._stop = None, False
        self._queue = queue.Queue(maxsize=max(self._size, 1))

    def get_state(self):
        return self._state

    def set_state(self, state):
        self.close()
        self._iterator.set_state(state)
        self._state = state

    def start_prefetch(self):  # grain.checkpoint's restore calls it; ours starts lazily
        pass
