"""Published datasets' own layouts: which file, which label and which split.

The M2D papers' nine linear-evaluation tasks come from datasets that mostly ship no
``filename,label,split`` CSV: labels sit in directory names, file names or JSON, and splits in
list files, some of which are published apart from the audio. Each reader here takes the
directory of the audio (``audio_dir``) and, where the split is not in the dataset's own files,
``split_file`` (the published list it comes from), and returns ``Entry`` rows with paths
relative to ``audio_dir``. The builder (builders.py) checks and stores them like CSV rows.

Where each split comes from (EVAR = the M2D authors' evaluation package, nttcslab/eval-audio-repr):

============  =====================================================================
speech_commands  the dataset's validation_list.txt and testing_list.txt; the rest is train
voxceleb1     iden_split.txt (1 train, 2 valid, 3 test), published on the VoxCeleb1 site
              next to the audio, not inside its archive
crema_d       none official; EVAR's evar/metadata/cremad.csv (speakers 63/9/19)
gtzan         the fault-filtered split (Kereliuk et al. 2015, Sturm 2013), files
              train_filtered.txt, valid_filtered.txt, test_filtered.txt of
              jongpillee/music_dataset_split/GTZAN_split (930 of the 1000 clips)
nsynth        the dataset's three archives nsynth-train, nsynth-valid, nsynth-test
surge         none official; EVAR's evar/predefined/dataset_surge_tone_splits.csv
              (tone presets 80/10/10, so test presets are never heard in training)
============  =====================================================================
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import os

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".au")


class LayoutError(ValueError):
    """The files do not have the layout the reader expects; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Entry:
    where: str      # "list.txt:12" or the file itself, for error messages
    rel_path: str   # relative to audio_dir
    label: str
    split: str      # train, valid or test


def _audio_files(top: str, depth: int) -> list[str]:
    """Audio files exactly ``depth`` directories below ``top``, relative, sorted."""
    out = []
    for d, dirs, files in os.walk(top):
        dirs.sort()
        rel_dir = os.path.relpath(d, top)
        level = 0 if rel_dir == "." else rel_dir.count(os.sep) + 1
        if level == depth:
            out += [os.path.normpath(os.path.join(rel_dir, f)) for f in sorted(files)
                    if f.lower().endswith(AUDIO_EXTENSIONS)]
            dirs.clear()
    return out


@contextlib.contextmanager
def _reading(path: str, what: str, **open_kw):
    """Opens a list or table as UTF-8 text; LayoutError naming the file when it is absent
    or not UTF-8."""
    if not os.path.isfile(path):
        raise LayoutError(f"{path} does not exist ({what})")
    try:
        with open(path, encoding="utf-8-sig", **open_kw) as f:
            yield f
    except UnicodeDecodeError as e:
        raise LayoutError(f"{path}: not UTF-8 text ({what}): byte {e.start} cannot be "
                          "decoded") from None


def _lines(path: str, what: str) -> list[tuple[int, str]]:
    with _reading(path, what) as f:
        return [(n, line.strip()) for n, line in enumerate(f, start=1) if line.strip()]


def _csv_rows(path: str, what: str, columns: tuple[str, ...]):
    """(line number, row) of a CSV whose rows all have a value in each of ``columns``."""
    with _reading(path, what, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise LayoutError(f"{path}: no column(s) {missing} ({what}); the header is "
                              f"{reader.fieldnames}")
        rows = list(enumerate(reader, start=2))
    for n, rec in rows:
        empty = [c for c in columns if not (rec.get(c) or "").strip()]
        if empty:
            raise LayoutError(f"{path}:{n}: no value in column(s) {empty} ({what})")
    return rows


def speech_commands(audio_dir: str, split_file: str = "") -> list[Entry]:
    """Speech Commands V2: ``<word>/<speaker>_nohash_<n>.wav`` (``_background_noise_`` is
    not a class); valid and test are the files listed in validation_list.txt and
    testing_list.txt, the rest is train (35 words, 84843/9981/11005 clips)."""
    held_out = {}
    for split, name in (("valid", "validation_list.txt"), ("test", "testing_list.txt")):
        path = os.path.join(audio_dir, name)
        for n, line in _lines(path, f"Speech Commands' {split} list"):
            held_out[os.path.normpath(line)] = (f"{path}:{n}", split)
    files = [f for f in _audio_files(audio_dir, 1) if not f.startswith("_")]
    entries = [Entry(os.path.join(audio_dir, f), f, f.split(os.sep)[0], "train")
               for f in files if f not in held_out]
    # listed files are taken even when absent: the builder names the missing ones
    entries += [Entry(where, f, f.split(os.sep)[0], split)
                for f, (where, split) in sorted(held_out.items())]
    return entries


def voxceleb1(audio_dir: str, split_file: str) -> list[Entry]:
    """VoxCeleb1 identification: ``wav/<speaker>/<video>/<utterance>.wav``; iden_split.txt
    lines are ``<1|2|3> <speaker>/<video>/<utterance>.wav`` (train, valid, test); the label
    is the speaker (1251 classes)."""
    entries = []
    for n, line in _lines(split_file, "VoxCeleb1's iden_split.txt"):
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ("1", "2", "3") or parts[1].count("/") != 2:
            raise LayoutError(f"{split_file}:{n}: expected '<1|2|3> <speaker>/<video>/"
                              f"<utterance>.wav'; got {line!r}")
        split = {"1": "train", "2": "valid", "3": "test"}[parts[0]]
        entries.append(Entry(f"{split_file}:{n}", os.path.normpath(parts[1]),
                             parts[1].split("/")[0], split))
    return entries


CREMA_D_EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")


def crema_d(audio_dir: str, split_file: str) -> list[Entry]:
    """CREMA-D: ``<speaker>_<sentence>_<emotion>_<level>.wav`` (e.g. 1001_DFA_ANG_XX.wav); the
    label is the emotion (6 classes). Speakers' splits come from ``split_file`` (EVAR's
    cremad.csv, columns file_name and split), so no speaker is in two splits."""
    speaker_split = {}
    for n, rec in _csv_rows(split_file, "the speaker split of CREMA-D", ("file_name", "split")):
        speaker = os.path.basename(rec["file_name"]).split("_")[0]
        split = rec["split"].strip()
        if speaker_split.setdefault(speaker, (split, n))[0] != split:
            raise LayoutError(f"{split_file}:{n}: speaker {speaker} is in split {split!r} "
                              f"here and {speaker_split[speaker][0]!r} at line "
                              f"{speaker_split[speaker][1]}")
    entries = []
    for f in _audio_files(audio_dir, 0):
        parts = os.path.splitext(f)[0].split("_")
        if len(parts) != 4 or parts[2] not in CREMA_D_EMOTIONS:
            raise LayoutError(f"{os.path.join(audio_dir, f)}: not a CREMA-D name "
                              "<speaker>_<sentence>_<emotion>_<level>, emotion one of "
                              f"{', '.join(CREMA_D_EMOTIONS)}")
        if parts[0] not in speaker_split:
            raise LayoutError(f"{os.path.join(audio_dir, f)}: speaker {parts[0]} has no split "
                              f"in {split_file}")
        entries.append(Entry(os.path.join(audio_dir, f), f, parts[2],
                             speaker_split[parts[0]][0]))
    return entries


def gtzan(audio_dir: str, split_file: str) -> list[Entry]:
    """GTZAN: ``<genre>/<genre>.000NN.{au,wav}``; the label is the genre (10 classes).
    ``split_file`` is the folder holding the fault-filtered lists (``train_filtered.txt``,
    ...; lines ``<genre>/<genre>.000NN.wav``), matched without the extension, so the
    original .au files and converted .wav files both work. Clips in no list (repeats,
    distortions) are left out, as in the filtered protocol."""
    files = {os.path.splitext(f)[0]: f for f in _audio_files(audio_dir, 1)}
    entries, listed = [], set()
    for split in ("train", "valid", "test"):
        path = os.path.join(split_file, f"{split}_filtered.txt")
        for n, line in _lines(path, f"GTZAN's fault-filtered {split} list"):
            stem = os.path.splitext(os.path.normpath(line))[0]
            if stem in listed:
                raise LayoutError(f"{path}:{n}: {line} is listed twice")
            listed.add(stem)
            rel = files.get(stem, os.path.normpath(line))  # absent: the builder names it
            entries.append(Entry(f"{path}:{n}", rel, stem.split(os.sep)[0], split))
    left_out = len(set(files) - listed)
    if left_out:
        log.info("gtzan: %d clip(s) under %s are in none of the filtered lists; left out",
                 left_out, audio_dir)
    return entries


def nsynth(audio_dir: str, split_file: str = "") -> list[Entry]:
    """NSynth: ``nsynth-<split>/examples.json`` and ``nsynth-<split>/audio/<note>.wav`` for
    the three published splits; the label is ``instrument_family_str`` (11 classes)."""
    entries = []
    for split in ("train", "valid", "test"):
        path = os.path.join(audio_dir, f"nsynth-{split}", "examples.json")
        if not os.path.isfile(path):
            raise LayoutError(f"{path} does not exist (NSynth's {split} metadata)")
        with _reading(path, f"NSynth's {split} metadata") as f:
            try:
                notes = json.load(f)
            except json.JSONDecodeError as e:
                raise LayoutError(f"{path}: not JSON ({e})") from None
        if not isinstance(notes, dict):
            raise LayoutError(f"{path}: a JSON {type(notes).__name__}; NSynth's examples.json "
                              "is an object of notes")
        for note, fields in sorted(notes.items()):
            family = fields.get("instrument_family_str") if isinstance(fields, dict) else None
            if not isinstance(family, str) or not family:
                raise LayoutError(f"{path}: note {note!r} has no instrument_family_str "
                                  f"string (got {family!r})")
            entries.append(Entry(f"{path}: {note}",
                                 os.path.join(f"nsynth-{split}", "audio", f"{note}.wav"),
                                 family, split))
    return entries


def surge(audio_dir: str, split_file: str) -> list[Entry]:
    """Surge synthesizer pitch set: ``<tone preset>/<pitch>.ogg``; the label is the pitch
    (the file name). ``split_file`` (EVAR's dataset_surge_tone_splits.csv, columns tone and
    split) gives each tone preset's split."""
    tone_split = {rec["tone"].strip(): rec["split"].strip()
                  for _, rec in _csv_rows(split_file, "the tone split of Surge",
                                          ("tone", "split"))}
    entries = []
    for f in _audio_files(audio_dir, 1):
        tone = f.split(os.sep)[0]
        if tone not in tone_split:
            raise LayoutError(f"{os.path.join(audio_dir, tone)}: tone preset {tone!r} has no "
                              f"split in {split_file}")
        entries.append(Entry(os.path.join(audio_dir, f), f,
                             os.path.splitext(os.path.basename(f))[0], tone_split[tone]))
    return entries


READERS = {"speech_commands": speech_commands, "voxceleb1": voxceleb1, "crema_d": crema_d,
           "gtzan": gtzan, "nsynth": nsynth, "surge": surge}
