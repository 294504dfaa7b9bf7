"""One audio file -> one dataset example, and the build-time statistics: the per-file
work that a single-process build (builders.py) and a parallel one (parallel.py) share."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from dwm_jax import audio
from dwm_jax.data import events as events_lib


class BuildError(ValueError):
    """A dataset cannot be built as configured; the message names the file, row or field."""


# Sums are kept as integers in units of 2**-_EXACT_BITS (every float64 is a whole number of
# those), so adding them is exact and the same in any order: a split's statistics do not
# depend on how its clips were divided among workers (builds with 1 or N workers agree).
_EXACT_BITS = 1100


def _exact(values: np.ndarray) -> list[int]:
    """float64 values as exact integers in units of 2**-_EXACT_BITS."""
    out = []
    for v in values.tolist():
        num, den = float(v).as_integer_ratio()
        out.append(num * ((1 << _EXACT_BITS) // den))
    return out


def _rounded(total: int) -> float:
    """An exact integer sum back to the nearest float64 (Python's int division rounds
    correctly)."""
    return total / (1 << _EXACT_BITS)


class SplitStats:
    """Per-mel-bin sums and sums of squares of one split, accumulated exactly.

    Each clip's sums are taken in float64 (numpy, the same wherever the clip is processed),
    then added as exact integers; ``merge`` combines the statistics of disjoint sets of clips
    (from parallel workers) with the same result as adding the clips one by one.
    """

    def __init__(self, n_mels: int):
        self.clips = 0
        self.frames = 0
        self.sum = [0] * n_mels
        self.sumsq = [0] * n_mels

    @staticmethod
    def clip_sums(log_mel: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        """(frames, sum [n_mels], sum of squares [n_mels]) of one clip, float64."""
        x = log_mel.astype(np.float64)
        return x.shape[1], x.sum(axis=1), np.square(x).sum(axis=1)

    def add_sums(self, frames: int, sums: np.ndarray, sumsqs: np.ndarray):
        self.clips += 1
        self.frames += frames
        self.sum = [a + b for a, b in zip(self.sum, _exact(sums))]
        self.sumsq = [a + b for a, b in zip(self.sumsq, _exact(sumsqs))]

    def add(self, log_mel: np.ndarray):
        self.add_sums(*self.clip_sums(log_mel))

    def merge(self, other: "SplitStats") -> "SplitStats":
        self.clips += other.clips
        self.frames += other.frames
        self.sum = [a + b for a, b in zip(self.sum, other.sum)]
        self.sumsq = [a + b for a, b in zip(self.sumsq, other.sumsq)]
        return self

    def to_json(self) -> dict:
        n = max(self.frames, 1) * len(self.sum)
        mean = _rounded(sum(self.sum)) / n
        var = max(_rounded(sum(self.sumsq)) / n - mean ** 2, 0.0)
        return {"clips": self.clips, "frames": self.frames, "mean": float(mean),
                "std": float(np.sqrt(var)), "sum": [_rounded(t) for t in self.sum],
                "sumsq": [_rounded(t) for t in self.sumsq]}


@dataclasses.dataclass(frozen=True)
class Row:
    where: str        # "file.csv:12" or the path itself, for error messages
    path: str
    label: str | tuple[str, ...] | None   # a tuple for multi-label sets
    split: str
    events: tuple = ()  # strong labels (events.Event) of the file, for frame targets


# the entry of a label index that maps event labels to frame-target rows
EVENTS_KEY = "__events__"


def clip_example(row: Row, cfg, index: dict[str, int]):
    """(key, example) of one row: log_mel [n_mels, frames], filename and the label(s).
    Raises AudioLoadError for a missing or unreadable file."""
    if not os.path.isfile(row.path):
        raise audio.AudioLoadError(f"{row.path}: listed at {row.where} but does not exist")
    log_mel = cfg.frontend.from_file(row.path).astype(cfg.dtype)
    rel = os.path.relpath(row.path, cfg.audio_dir)
    example = {"log_mel": log_mel, "filename": rel}
    if isinstance(row.label, tuple):
        example["labels"] = np.zeros(len(index), np.uint8)
        example["labels"][[index[name] for name in row.label]] = 1
    elif row.label is not None:
        example["label"] = row.label
    if EVENTS_KEY in index:
        from_hop = cfg.frontend.hop_length / cfg.frontend.sample_rate
        example["frame_labels"] = events_lib.frame_targets(
            row.events, log_mel.shape[1], 1.0 / from_hop, index[EVENTS_KEY],
            clip_seconds=(log_mel.shape[1] - 1) * from_hop, tolerance=2 * from_hop)
    return rel, example


def check_skipped(cfg, split: str, num_rows: int, skipped: list[dict]):
    """Bad files stop the build naming each one, unless skip_bad_files; all bad always does."""
    if skipped and not cfg.skip_bad_files:
        listed = "; ".join(s["reason"] for s in skipped[:10])
        raise BuildError(
            f"audio_folder/{cfg.name}: {len(skipped)} bad file(s) in split {split!r}: "
            f"{listed}{' ...' if len(skipped) > 10 else ''} (skip_bad_files=True / "
            "--skip_bad_files skips and reports such files)")
    if len(skipped) == num_rows:
        raise BuildError(f"audio_folder/{cfg.name}: all {num_rows} file(s) of split "
                         f"{split!r} are bad, e.g. {skipped[0]['reason']}")
