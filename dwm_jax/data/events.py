"""Strong labels: an events table (filename, onset, offset, label, as DCASE and
AudioSet-strong publish them) -> per-frame multi-hot targets at the front end's frame rate.

A table is CSV, or TSV when its name ends in ``.tsv`` (DCASE's), with a header naming four
columns (``EVENT_COLUMNS`` by default: DCASE's ``filename, onset, offset, event_label``).
Times are seconds. Frame ``i`` of a log-mel is centred at ``i * hop / sample_rate`` seconds;
an event covers frames ``floor(onset * fps)`` to ``ceil(offset * fps)`` (exclusive), as the
DCASE baselines encode strong labels, cut to the clip. A file listed in the dataset but in no
row of the table has no events (background only).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os

import numpy as np

EVENT_COLUMNS = ("filename", "onset", "offset", "event_label")


class EventsError(ValueError):
    """An events table or one of its rows cannot be used; the message names the row."""


@dataclasses.dataclass(frozen=True)
class Event:
    where: str      # "events.tsv:12", for error messages
    onset: float    # seconds
    offset: float
    label: str


def read_events(path: str, columns: tuple[str, ...] = EVENT_COLUMNS) -> dict[str, list[Event]]:
    """{filename as written in the table: [Event, ...]}; EventsError naming the row for an
    unreadable time, an empty label, or an offset not after its onset."""
    if not os.path.isfile(path):
        raise EventsError(f"events table {path!r} does not exist")
    name_col, on_col, off_col, label_col = columns
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    out: dict[str, list[Event]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise EventsError(f"{path}: no column(s) {missing} (events_columns); the header is "
                             f"{reader.fieldnames}")
        for line, rec in enumerate(reader, start=2):
            where = f"{path}:{line}"
            if None in rec.values():
                raise EventsError(f"{where}: the row has fewer fields than the header")
            try:
                onset, offset = float(rec[on_col]), float(rec[off_col])
            except ValueError:
                raise EventsError(f"{where}: onset {rec[on_col]!r} / offset {rec[off_col]!r} "
                                 "are not times in seconds") from None
            label = rec[label_col].strip()
            if not label:
                raise EventsError(f"{where}: empty label in column {label_col!r}")
            if not math.isfinite(onset) or onset < 0:
                raise EventsError(f"{where}: onset {onset} must be a finite time >= 0")
            if not math.isfinite(offset):
                raise EventsError(f"{where}: offset {offset} must be a finite time")
            if offset <= onset:
                raise EventsError(f"{where}: offset {offset} is not after onset {onset}")
            out.setdefault(rec[name_col].strip(), []).append(
                Event(where, onset, offset, label))
    return out


def frames_per_second(frontend) -> float:
    return frontend.sample_rate / frontend.hop_length


def merge_overlapping(events: list[Event], fps: float) -> list[Event]:
    """One file's events with the same-class events whose frames overlap or meet (frame
    spans ``floor(onset * fps)`` .. ``ceil(offset * fps)``) joined into one, from the first
    onset to the last offset: the frame targets cannot tell such events apart, so they are
    one reference event when scored. Sorted by label, then onset."""
    out: list[Event] = []
    for e in sorted(events, key=lambda e: (e.label, e.onset, e.offset)):
        last = out[-1] if out else None
        if last and last.label == e.label and \
                math.floor(e.onset * fps) <= math.ceil(last.offset * fps):
            out[-1] = Event(f"{last.where}+{e.where.rsplit(':', 1)[-1]}", last.onset,
                            max(last.offset, e.offset), e.label)
        else:
            out.append(e)
    return out


def frame_targets(events, num_frames: int, fps: float, index: dict[str, int],
                  clip_seconds: float, tolerance: float) -> np.ndarray:
    """Multi-hot targets [num_classes, num_frames] (uint8) of one clip's events. An event
    ending more than ``tolerance`` seconds after the clip is a EventsError naming its row."""
    out = np.zeros((len(index), num_frames), np.uint8)
    for e in events:
        if e.offset > clip_seconds + tolerance:
            raise EventsError(f"{e.where}: offset {e.offset} s is beyond the clip "
                             f"({clip_seconds:.3f} s)")
        first = min(int(math.floor(e.onset * fps)), num_frames)
        last = min(int(math.ceil(e.offset * fps)), num_frames)
        out[index[e.label], first:last] = 1
    return out


def runs_to_events(active: np.ndarray, seconds_per_step: float,
                   end: float | None = None) -> list[tuple[float, float]]:
    """Contiguous runs of True in ``active`` [T] -> (onset, offset) in seconds; step ``j``
    spans ``[j, j + 1) * seconds_per_step``, offsets cut at ``end`` when given."""
    padded = np.concatenate([[False], np.asarray(active, bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    events = []
    for start, stop in zip(edges[::2], edges[1::2]):
        offset = stop * seconds_per_step
        events.append((start * seconds_per_step, min(offset, end) if end else offset))
    return events
