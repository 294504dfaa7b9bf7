"""TFDS builders that store log-mel spectrograms in array_record files.

``synthetic_sounds`` is the built-in offline dataset (procedural, deterministic by seed).
``audio_folder`` turns a directory of audio files, with an optional CSV of
``filename,label[,split|fold]`` or a published dataset's own layout (``PRESETS``: the nine
linear-evaluation tasks of the M2D papers), into a dataset; without labels it is an
unlabelled pretraining set (AudioSet-style file lists).

Every example holds ``log_mel`` [n_mels, frames] (float16 by default; long clips are kept
whole and cropped when read), ``filename`` and, for labelled sets, ``label``. Normalisation
statistics (sums and sums of squares per mel bin, per split) are accumulated while a split is
written and stored in the dataset's ``metadata.json`` together with the front-end settings,
the builder config and any skipped files. Reading needs no TensorFlow (see pipeline.py).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import tensorflow_datasets as tfds

from dwm_jax import audio, locks, storage
from dwm_jax.data import events as events_lib
from dwm_jax.data import layouts, parallel, pipeline, synthetic
from dwm_jax.data.examples import (EVENTS_KEY, BuildError, Row, SplitStats, check_skipped,
                                   clip_example)

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = layouts.AUDIO_EXTENSIONS
_SPLIT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _config_record(config: tfds.core.BuilderConfig) -> dict:
    """The fields of a builder config that decide the data (JSON-able)."""
    skip = {"name", "version", "release_notes", "supported_versions", "description", "tags"}
    out = {}
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        value = getattr(config, f.name)
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


class _LogMelBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared parts: features, statistics and metadata of log-mel datasets."""

    def _features(self, label_names, multi_label: bool = False):
        """log_mel [n_mels, frames], filename, and ``label`` (one class) or, for multi-label
        sets, ``labels`` (multi-hot uint8 [num_classes]; the names in the metadata)."""
        cfg = self.builder_config
        features = {
            "log_mel": tfds.features.Tensor(shape=(cfg.frontend.n_mels, None),
                                            dtype=np.dtype(cfg.dtype)),
            "filename": tfds.features.Text(),
        }
        if label_names is not None and multi_label:
            features["labels"] = tfds.features.Tensor(shape=(len(label_names),),
                                                      dtype=np.uint8)
        elif label_names is not None:
            features["label"] = tfds.features.ClassLabel(names=list(label_names))
        return tfds.features.FeaturesDict(features)

    def _check_config(self):
        cfg = self.builder_config
        if np.dtype(cfg.dtype) not in (np.float16, np.float32):
            raise BuildError(f"{self.name}/{cfg.name}: dtype must be 'float16' or 'float32'; "
                             f"got {cfg.dtype!r}")

    def _metadata(self) -> tfds.core.MetadataDict:
        meta = tfds.core.MetadataDict()
        meta["frontend"] = dataclasses.asdict(self.builder_config.frontend)
        meta["builder_config"] = _config_record(self.builder_config)
        meta["stats"] = {}
        meta["skipped_files"] = {}
        return meta

    def _finish_split(self, split: str, stats: dict, skipped: list[dict]):
        self.info.metadata["stats"][split] = stats
        self.info.metadata["skipped_files"][split] = skipped
        if skipped:
            log.warning("%s: skipped %d unreadable file(s) in split %r: %s", self.name,
                        len(skipped), split, ", ".join(s["file"] for s in skipped))

    def _store(self, log_mel: np.ndarray) -> np.ndarray:
        return log_mel.astype(self.builder_config.dtype)


# --------------------------------------------------------------------------- synthetic_sounds

@dataclasses.dataclass
class SyntheticSoundsConfig(tfds.core.BuilderConfig):
    """Clips per class in each split, the seed, clip length and storage dtype."""

    train_per_class: int = 80
    valid_per_class: int = 20
    test_per_class: int = 20
    seed: int = 0
    seconds: float = 6.08
    dtype: str = "float16"
    frontend: audio.LogMelFrontEnd = audio.LogMelFrontEnd()


class SyntheticSounds(_LogMelBuilder):
    """Twelve procedural sound classes (see synthetic.py): the default offline dataset."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Front end pads the STFT by reflection, as the authors' does."}
    BUILDER_CONFIGS = [
        SyntheticSoundsConfig(name="default", description="80/20/20 clips per class, 6.08 s"),
        SyntheticSoundsConfig(name="small", train_per_class=8, valid_per_class=2,
                              test_per_class=4, description="for tests and smoke runs"),
    ]
    SPLITS = ("train", "valid", "test")

    def _info(self):
        self._check_config()
        return tfds.core.DatasetInfo(
            builder=self, description="Procedurally generated sound events, 12 classes.",
            features=self._features(synthetic.CLASS_NAMES), metadata=self._metadata(),
            supervised_keys=("log_mel", "label"))

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        counts = {"train": cfg.train_per_class, "valid": cfg.valid_per_class,
                  "test": cfg.test_per_class}
        return {split: self._generate_examples(split, counts[split] * synthetic.NUM_CLASSES)
                for split in self.SPLITS if counts[split] > 0}

    def _generate_examples(self, split: str, num: int):
        cfg = self.builder_config
        stats = SplitStats(cfg.frontend.n_mels)
        split_id = self.SPLITS.index(split)
        for index in range(num):
            class_id = index % synthetic.NUM_CLASSES
            rng = np.random.default_rng([cfg.seed, split_id, index])
            wave = synthetic.synthesize(class_id, rng, sample_rate=cfg.frontend.sample_rate,
                                        seconds=cfg.seconds)
            log_mel = self._store(cfg.frontend(wave))
            stats.add(log_mel)
            name = f"{split}/{index:06d}_{synthetic.CLASS_NAMES[class_id]}"
            yield name, {"log_mel": log_mel, "label": class_id, "filename": name}
        self._finish_split(split, stats.to_json(), [])


# ------------------------------------------------------------------------------- audio_folder

# The nine linear-evaluation tasks of the M2D papers, under the short names of their
# evaluation package (EVAR), read from the layout each dataset is distributed in. A preset
# either names the columns of the dataset's metadata CSV or a ``layout`` reader (layouts.py,
# which says where each split comes from); ``split_file`` is where, under the root, the
# published split list is looked for when it is not part of the dataset (--split_file
# elsewhere).
PRESETS = {
    # ESC-50: ROOT/meta/esc50.csv, ROOT/audio/<filename>; 5 folds.
    "esc50": dict(audio_subdir="audio", csv_path="meta/esc50.csv", filename_column="filename",
                  label_column="category", split_column="", fold_column="fold",
                  path_template="{filename}"),
    # UrbanSound8K: ROOT/metadata/UrbanSound8K.csv, ROOT/audio/fold<k>/<file>; 10 folds.
    "us8k": dict(audio_subdir="audio", csv_path="metadata/UrbanSound8K.csv",
                 filename_column="slice_file_name", label_column="class", split_column="",
                 fold_column="fold", path_template="fold{fold}/{filename}"),
    # Speech Commands V2: ROOT/<word>/*.wav, ROOT/validation_list.txt, ROOT/testing_list.txt.
    "spcv2": dict(audio_subdir="", layout="speech_commands"),
    # VoxCeleb1: ROOT/wav/<speaker>/<video>/<utterance>.wav and ROOT/iden_split.txt.
    "vc1": dict(audio_subdir="wav", layout="voxceleb1", split_file="iden_split.txt"),
    # VoxForge as EVAR downloads it (ROOT/<speaker-session>/wav/*.wav); it has no official
    # split: labels (language) and splits are EVAR's evar/metadata/voxforge.csv (columns
    # file_name, label, split), looked for at ROOT/voxforge.csv (--csv elsewhere).
    "voxforge": dict(audio_subdir="", csv_path="voxforge.csv", filename_column="file_name",
                     label_column="label", split_column="split", fold_column="",
                     path_template="{filename}"),
    # CREMA-D: ROOT/AudioWAV/<speaker>_<sentence>_<emotion>_<level>.wav; speaker split
    # from EVAR's cremad.csv.
    "cremad": dict(audio_subdir="AudioWAV", layout="crema_d", split_file="cremad.csv"),
    # GTZAN: ROOT/genres/<genre>/<genre>.000NN.au; fault-filtered split lists.
    "gtzan": dict(audio_subdir="genres", layout="gtzan", split_file="GTZAN_split"),
    # NSynth: ROOT/nsynth-{train,valid,test}/{examples.json,audio/}; instrument family.
    "nsynth": dict(audio_subdir="", layout="nsynth"),
    # Surge pitch set: ROOT/<tone preset>/<pitch>.ogg; tone split from EVAR.
    "surge": dict(audio_subdir="", layout="surge",
                  split_file="dataset_surge_tone_splits.csv"),
}
# what a layout reader needs besides the audio (for the error when it is missing)
_SPLIT_FILE_SOURCES = {
    "voxceleb1": "iden_split.txt from the VoxCeleb1 site (meta files)",
    "crema_d": "evar/metadata/cremad.csv of nttcslab/eval-audio-repr",
    "gtzan": "the folder GTZAN_split of jongpillee/music_dataset_split",
    "surge": "evar/predefined/dataset_surge_tone_splits.csv of nttcslab/eval-audio-repr",
}


@dataclasses.dataclass
class AudioFolderConfig(tfds.core.BuilderConfig):
    """Where the audio and the CSV are and how to read the CSV.

    ``name`` is the dataset's name under ``audio_folder/`` (e.g. ``esc50``). Columns left
    empty are not used; ``path_template`` formats a row's columns into a path relative to
    ``audio_dir``. Without ``csv`` every audio file under ``audio_dir`` (recursively) goes to
    an unlabelled ``train`` split. ``label_separator`` (e.g. ',' for FSD50K's ``labels``
    column, AudioSet-style) makes it a multi-label set: each row's label column holds one or
    more labels separated by it, stored multi-hot as ``labels``. ``layout`` names a reader of
    a published dataset's own layout instead of a CSV (layouts.READERS), with its
    ``split_file`` where the split is published apart from the audio.
    """

    audio_dir: str = ""
    csv: str = ""
    filename_column: str = "filename"
    label_column: str = "label"
    split_column: str = "split"
    fold_column: str = "fold"
    path_template: str = "{filename}"
    label_separator: str = ""         # several labels per clip ('a,b'): stored multi-hot
    layout: str = ""                  # a layouts.READERS name instead of a CSV
    split_file: str = ""              # the published split list a layout reads
    events: str = ""                  # a strong-label table: per-frame targets (events.py)
    events_columns: tuple = events_lib.EVENT_COLUMNS
    skip_bad_files: bool = False
    dtype: str = "float16"
    frontend: audio.LogMelFrontEnd = audio.LogMelFrontEnd()


def audio_folder_config(name: str, *, root: str = "", preset: str = "", audio_dir: str = "",
                        csv_path: str = "", split_file: str = "",
                        **fields) -> AudioFolderConfig:
    """An AudioFolderConfig from a preset (``PRESETS``) and a dataset ``root``, or from an
    explicit ``audio_dir`` and optional ``csv_path``; ``fields`` override any field."""
    if preset:
        if preset not in PRESETS:
            raise BuildError(f"unknown preset {preset!r}; known presets: {sorted(PRESETS)}")
        if not root:
            raise BuildError(f"preset {preset!r} needs root= (the dataset's top directory)")
        p = dict(PRESETS[preset])
        audio_subdir, csv_rel = p.pop("audio_subdir"), p.pop("csv_path", "")
        split_rel = p.pop("split_file", "")
        audio_dir = audio_dir or os.path.join(root, audio_subdir)
        csv_path = csv_path or (os.path.join(root, csv_rel) if csv_rel else "")
        split_file = split_file or (os.path.join(root, split_rel) if split_rel else "")
        fields = {**p, **fields}
    audio_dir, csv_path, split_file = (storage.localise(storage.check(p, "path"))
                                       for p in (audio_dir, csv_path, split_file))
    if fields.get("events"):
        fields["events"] = storage.localise(storage.check(fields["events"], "--events"))
    if not audio_dir:
        raise BuildError("audio_folder needs audio_dir= (or preset= and root=)")
    if not _SPLIT_NAME.match(name):
        raise BuildError(f"audio_folder name must be lower-case letters, digits and _; "
                         f"got {name!r}")
    layout = fields.get("layout", "")
    if layout and layout not in layouts.READERS:
        raise BuildError(f"unknown layout {layout!r}; known: {sorted(layouts.READERS)}")
    if layout and csv_path:
        raise BuildError(f"layout {layout!r} reads the dataset's own files: give no CSV")
    if layout in _SPLIT_FILE_SOURCES and not os.path.exists(split_file):
        raise BuildError(f"layout {layout!r} needs its split list, {_SPLIT_FILE_SOURCES[layout]}"
                         f": {split_file or '(none given)'} does not exist (--split_file)")
    if fields.get("events"):
        fields["events"] = os.path.abspath(fields["events"])
        fields["events_columns"] = tuple(fields.get("events_columns", events_lib.EVENT_COLUMNS))
    return AudioFolderConfig(name=name, audio_dir=os.path.abspath(audio_dir),
                             csv=os.path.abspath(csv_path) if csv_path else "",
                             split_file=os.path.abspath(split_file) if split_file else "",
                             **fields)


# CSV split names taken for the ones training and evaluation read
SPLIT_ALIASES = {"training": "train", "validation": "valid", "val": "valid", "dev": "valid",
                 "testing": "test", "eval": "test", "evaluation": "test"}
_FOLD = re.compile(r"^fold\d+$")


def _checked_row(audio_dir: str, where: str, rel: str, label, given_split: str,
                 first_seen: dict) -> Row:
    """A row with its split name checked (aliases taken) and its file listed only once."""
    split = SPLIT_ALIASES.get(given_split.lower(), given_split.lower())
    if split not in ("train", "valid", "test") and not _FOLD.match(split):
        raise BuildError(
            f"{where}: split {given_split!r} is not one that training and evaluation read: "
            f"train, valid, test or foldN (also accepted: {', '.join(sorted(SPLIT_ALIASES))})")
    path = os.path.normpath(os.path.join(audio_dir, rel))
    root = os.path.normpath(audio_dir)  # by name: links inside the folder stay allowed
    if os.path.isabs(rel) or os.path.commonpath([root, path]) != root:
        raise BuildError(f"{where}: {rel} is outside the audio folder {audio_dir}; a list or "
                         "CSV may name only files inside it")
    if path in first_seen:
        other = first_seen[path]
        leak = (f" (splits {other.split!r} and {split!r}: test clips would leak into "
                "training)" if other.split != split else "")
        raise BuildError(f"{where}: {rel} is listed twice, here and at {other.where}{leak}")
    first_seen[path] = Row(where, path, label, split)
    return first_seen[path]


def _sorted_labels(labels) -> tuple[str, ...]:
    labels = set(labels)
    if all(s.lstrip("-").isdigit() for s in labels):
        return tuple(sorted(labels, key=int))
    return tuple(sorted(labels))


class AudioFolder(_LogMelBuilder):
    """A directory of audio files (+ optional CSV) as a log-mel dataset.

    Build through ``dwm_jax.data.build`` (CLI: ``python -m dwm_jax.data``).
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Front end pads the STFT by reflection, as the authors' does."}
    BUILDER_CONFIGS = []  # the user's folders are configs made with audio_folder_config

    def __init__(self, *args, parallel: bool = False, **kwargs):
        """``parallel``: build on Apache Beam (parallel.py) instead of in this process."""
        self._rows_cache = None
        self._parallel = parallel
        self._by_split: dict[str, list[Row]] = {}
        self._beam_scratch = ""
        super().__init__(*args, **kwargs)

    # The CSV is read once and checked before anything is written.
    def _rows(self) -> list[Row]:
        if self._rows_cache is None:
            rows = self._read_rows()
            self._rows_cache = self._with_events(rows) if self.builder_config.events else rows
        return self._rows_cache

    def _with_events(self, rows: list[Row]) -> list[Row]:
        """The rows with their events attached; BuildError naming a row of the table whose
        file the dataset does not list."""
        cfg = self.builder_config
        if os.path.isfile(cfg.events):
            _check_utf8(cfg.events)
        try:
            table = events_lib.read_events(cfg.events, tuple(cfg.events_columns))
        except events_lib.EventsError as e:
            raise BuildError(f"audio_folder/{cfg.name}: {e}") from None
        by_path = {r.path: r for r in rows}
        attached: dict[str, list] = {}
        for name, found in table.items():   # one file may be written several ways
            path = os.path.normpath(os.path.join(cfg.audio_dir, name))
            if path not in by_path:
                raise BuildError(f"{found[0].where}: {name} is not a file of the dataset "
                                 f"(audio_dir {cfg.audio_dir}, {cfg.csv or 'all files'})")
            attached.setdefault(path, []).extend(found)
        fps = events_lib.frames_per_second(cfg.frontend)
        merged = {path: events_lib.merge_overlapping(found, fps)
                  for path, found in attached.items()}
        joined = sum(len(attached[p]) - len(merged[p]) for p in merged)
        if joined:
            print(f"audio_folder/{cfg.name}: {joined} event row(s) of {cfg.events} overlap or "
                  "meet another of their class in the same file and are merged with it (the "
                  "frame targets cannot tell them apart)", file=sys.stderr)
        return [dataclasses.replace(r, events=tuple(merged.get(r.path, ()))) for r in rows]

    def _event_labels(self) -> tuple[str, ...]:
        return _sorted_labels(e.label for r in self._rows() for e in r.events)

    def _read_rows(self) -> list[Row]:
        cfg = self.builder_config
        if not os.path.isdir(cfg.audio_dir):
            raise BuildError(f"audio_folder/{cfg.name}: audio_dir {cfg.audio_dir!r} is not a "
                             "directory")
        if cfg.layout:
            return self._layout_rows()
        if not cfg.csv:
            paths = sorted(
                os.path.join(d, f) for d, _, files in os.walk(cfg.audio_dir) for f in files
                if f.lower().endswith(AUDIO_EXTENSIONS))
            if not paths:
                raise BuildError(f"audio_folder/{cfg.name}: no audio files "
                                 f"({', '.join(AUDIO_EXTENSIONS)}) under {cfg.audio_dir}")
            return [Row(p, p, None, "train") for p in paths]
        if not os.path.isfile(cfg.csv):
            raise BuildError(f"audio_folder/{cfg.name}: CSV file {cfg.csv!r} does not exist")
        _check_utf8(cfg.csv)
        with open(cfg.csv, newline="", encoding="utf-8-sig") as f:  # a BOM is not a name
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if cfg.filename_column not in columns:
                raise BuildError(f"{cfg.csv}: no column {cfg.filename_column!r} "
                                 f"(filename_column); the header is {columns}")
            if cfg.label_column and cfg.label_column not in columns:
                raise BuildError(f"{cfg.csv}: no column {cfg.label_column!r} (label_column); "
                                 f"the header is {columns}. For an unlabelled dataset leave "
                                 "out the CSV or set label_column='' (--label_column '')")
            has_label = bool(cfg.label_column)
            split_col = cfg.split_column if cfg.split_column in columns else ""
            fold_col = cfg.fold_column if (not split_col and cfg.fold_column in columns) else ""
            rows, first_seen = [], {}
            for line, rec in enumerate(reader, start=2):
                where = f"{cfg.csv}:{line}"
                if None in rec or None in rec.values():
                    fields = len(columns) + len(rec.get(None) or []) - list(
                        rec.values()).count(None)
                    raise BuildError(f"{where}: the row has {fields} field(s); the header has "
                                     f"{len(columns)} ({', '.join(columns)})")
                try:
                    rel = cfg.path_template.format(**{
                        **rec, "filename": rec[cfg.filename_column]})
                except KeyError as e:
                    raise BuildError(f"{where}: path_template {cfg.path_template!r} needs "
                                     f"column {e}") from None
                if split_col:
                    given = rec[split_col].strip()
                elif fold_col:
                    given = f"fold{rec[fold_col].strip()}"
                else:
                    given = "train"
                label = rec[cfg.label_column].strip() if has_label else None
                if has_label and not label:
                    raise BuildError(f"{where}: empty label in column {cfg.label_column!r}")
                if has_label and cfg.label_separator:
                    label = tuple(sorted({part.strip() for part in
                                          label.split(cfg.label_separator)} - {""}))
                    if not label:
                        raise BuildError(f"{where}: no label in column {cfg.label_column!r} "
                                         f"(separated by {cfg.label_separator!r})")
                rows.append(_checked_row(cfg.audio_dir, where, rel, label, given, first_seen))
        if not rows:
            raise BuildError(f"{cfg.csv}: the CSV lists no files")
        return rows

    def _layout_rows(self) -> list[Row]:
        cfg = self.builder_config
        try:
            entries = layouts.READERS[cfg.layout](cfg.audio_dir, cfg.split_file)
        except layouts.LayoutError as e:
            raise BuildError(f"audio_folder/{cfg.name} (layout {cfg.layout}): {e}") from None
        if not entries:
            raise BuildError(f"audio_folder/{cfg.name}: layout {cfg.layout!r} found no audio "
                             f"under {cfg.audio_dir}")
        first_seen: dict[str, Row] = {}
        return [_checked_row(cfg.audio_dir, e.where, e.rel_path, e.label, e.split, first_seen)
                for e in entries]

    def _label_names(self):
        labels = [r.label for r in self._rows() if r.label is not None]
        if self.builder_config.label_separator:
            labels = [name for names in labels for name in names]
        return _sorted_labels(labels) if labels else None

    def _info(self):
        self._check_config()
        names = self._label_names()
        multi = bool(self.builder_config.label_separator) and names is not None
        metadata = self._metadata()
        if multi:
            metadata["label_names"] = list(names)
        features = self._features(names, multi_label=multi)
        if self.builder_config.events:
            event_labels = self._event_labels()
            if not event_labels:
                raise BuildError(f"{self.builder_config.events}: the events table has no rows")
            metadata["event_labels"] = list(event_labels)
            features = tfds.features.FeaturesDict({
                **features, "frame_labels": tfds.features.Tensor(
                    shape=(len(event_labels), None), dtype=np.uint8)})
        return tfds.core.DatasetInfo(
            builder=self, description=f"Audio files from {self.builder_config.audio_dir}",
            features=features, metadata=metadata)

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        missing = [r for r in self._rows() if not os.path.isfile(r.path)]
        if missing and not cfg.skip_bad_files:
            listed = "; ".join(f"{r.where}: {r.path}" for r in missing[:5])
            raise BuildError(
                f"audio_folder/{cfg.name}: {len(missing)} listed file(s) do not "
                f"exist: {listed}{' ...' if len(missing) > 5 else ''} "
                "(skip_bad_files=True / --skip_bad_files skips and reports them)")
        by_split: dict[str, list[Row]] = {}
        for r in self._rows():
            by_split.setdefault(r.split, []).append(r)
        self._by_split = dict(sorted(by_split.items()))
        if self._parallel:
            return self._split_transforms(self._by_split)
        return {split: self._generate_examples(split, rows)
                for split, rows in self._by_split.items()}

    def _label_index(self) -> dict[str, int]:
        """Class name -> index; event labels under the key ``events``."""
        index = {name: i for i, name in enumerate(self._label_names() or ())}
        if self.builder_config.events:
            index = {**index, EVENTS_KEY: {name: i for i, name in
                                           enumerate(self._event_labels())}}
        return index

    def _generate_examples(self, split: str, rows: list[Row]):
        cfg = self.builder_config
        stats = SplitStats(cfg.frontend.n_mels)
        skipped = []
        index = self._label_index()
        for row in rows:
            try:
                key, example = clip_example(row, cfg, index)
            except audio.AudioLoadError as e:
                if cfg.skip_bad_files:
                    log.warning("skipping %s", e)
                skipped.append({"file": row.path, "reason": str(e)})
                continue
            if skipped and not cfg.skip_bad_files:
                continue  # the build will fail: read on only to name every bad file
            stats.add(example["log_mel"])
            yield key, example
        check_skipped(cfg, split, len(rows), skipped)
        self._finish_split(split, stats.to_json(), skipped)

    # Parallel builds (parallel.py): each split is a Beam transform; its statistics and
    # skipped files come back through small files in a scratch folder, read when the
    # pipeline is done, before TFDS writes the dataset's metadata.
    def _split_transforms(self, by_split: dict[str, list[Row]]):
        self._beam_scratch = parallel.scratch_dir(self.data_dir)  # the unfinished dataset's
        index = self._label_index()
        return {split: parallel.split_transform(split, rows, self.builder_config, index,
                                                self._beam_scratch)
                for split, rows in by_split.items()}

    def _process_pipeline_result(self, pipeline_result):
        cfg = self.builder_config
        results = {split: parallel.split_results(self._beam_scratch, split)
                   for split in self._by_split}
        parallel.remove_scratch(self._beam_scratch)
        bad = [s for _, skipped in results.values() for s in skipped]
        if bad and not cfg.skip_bad_files:  # all splits ran at once: name every bad file
            check_skipped(cfg, "+".join(k for k, (_, b) in results.items() if b), -1, bad)
        for split, (stats, skipped) in results.items():
            check_skipped(cfg, split, len(self._by_split[split]), skipped)
            self._finish_split(split, stats, skipped)


# ------------------------------------------------------------------------------- building

def _check_utf8(path: str) -> None:
    """BuildError naming the file and line when a table is not UTF-8 text."""
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BuildError(f"{path}:{line}: not UTF-8 text (byte {e.start} of the line "
                                 "cannot be decoded); save the table as UTF-8") from None


def _remove_unfinished(config_dir: str):
    """Removes the ``incomplete.*`` folders a killed build of this dataset left behind (TFDS
    writes there and renames when done; a second build of the same dataset at the same time
    is not supported)."""
    if not os.path.isdir(config_dir):
        return
    for name in sorted(os.listdir(config_dir)):
        path = os.path.join(config_dir, name)
        if name.startswith(".old-"):  # a rebuild stopped between its two renames
            final = os.path.join(config_dir, name[len(".old-"):])
            if os.path.exists(final):
                shutil.rmtree(path)
            else:
                os.replace(path, final)
                print(f"restored {final}, which an unfinished rebuild had moved aside",
                      file=sys.stderr)
        elif name.startswith(("incomplete.", ".rebuild-")):
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path}, left by an unfinished build", file=sys.stderr)


def _rebuild_beside(cls, data_dir: str, config, final_dir: str, parallel: dict):
    """--overwrite without losing the old dataset: builds the new one in a staging folder
    next to it and swaps the two only once the new one is complete. A failed or killed
    rebuild leaves the old dataset as it was."""
    staging = tempfile.mkdtemp(prefix=".rebuild-", dir=os.path.dirname(final_dir))
    try:
        new = cls(data_dir=staging, config=config, file_format="array_record",
                  **parallel["builder"])
        new.download_and_prepare(**parallel["prepare"])
        aside = os.path.join(os.path.dirname(final_dir), ".old-" + os.path.basename(final_dir))
        os.replace(final_dir, aside)
        os.replace(new.data_dir, final_dir)
        shutil.rmtree(aside)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cls(data_dir=data_dir, config=config, file_format="array_record")


def _parallel_args(builder: str, workers: int, beam_options: str) -> dict:
    """Builder and download_and_prepare arguments of a build on Beam (or none)."""
    if workers == 1 and not beam_options:
        return {"builder": {}, "prepare": {}}
    if builder != "audio_folder":
        raise BuildError(f"--workers and --beam_options are for audio_folder; {builder} is "
                         "built in one process")
    options = parallel.pipeline_options(workers, beam_options)
    return {"builder": {"parallel": True},
            "prepare": {"download_config": tfds.download.DownloadConfig(
                beam_options=options)}}


BUILDERS = {"synthetic_sounds": SyntheticSounds, "audio_folder": AudioFolder}
# builder-config fields added after datasets were first built, with their default
ADDED_CONFIG_FIELDS = {"label_separator": "", "layout": "", "split_file": "", "events": "",
                       "events_columns": list(events_lib.EVENT_COLUMNS)}


def build(builder: str, data_dir: str, *, config: str | tfds.core.BuilderConfig = "default",
          overwrite: bool = False, workers: int = 1,
          beam_options: str = "") -> tfds.core.DatasetBuilder:
    """Builds (or reuses) a dataset and returns its TFDS builder.

    ``builder`` is 'synthetic_sounds' or 'audio_folder'; ``config`` a config name of the
    builder or a config object (``builders.audio_folder_config(...)`` for folders).
    ``workers`` > 1 or ``beam_options`` build an audio_folder on Apache Beam (parallel.py):
    the same dataset, written by that many local processes or by a cluster runner.
    """
    if builder not in BUILDERS:
        raise BuildError(f"unknown builder {builder!r}; known: {sorted(BUILDERS)}")
    cls = BUILDERS[builder]
    parallel = _parallel_args(builder, workers, beam_options)
    if isinstance(config, str):
        known = {c.name: c for c in cls.BUILDER_CONFIGS}
        if config not in known:
            raise BuildError(f"{builder} has no config {config!r}; known: {sorted(known)} "
                             "(audio_folder needs a config made by audio_folder_config)")
        config = known[config]
    storage.check(data_dir, "--data_dir")
    if storage.is_url(data_dir):
        return _build_to_bucket(builder, data_dir, config, overwrite, workers, beam_options)
    ds_builder = cls(data_dir=data_dir, config=config, file_format="array_record")
    with _build_lock(data_dir, builder, config.name):
        return _build_locked(builder, ds_builder, data_dir, config, overwrite, parallel)


def _build_lock(data_dir: str, builder: str, name: str):
    """One build of a dataset at a time (a second one would remove the first's unfinished
    files as left by a killed build): a lock file, or in a bucket a lease object."""
    path = storage.join(data_dir, ".locks", f"{builder}-{name}.lock")
    return locks.exclusive(path, f"a build of {builder}/{name}", f"{builder}/{name} in {data_dir}")


def _build_to_bucket(builder: str, data_dir: str, config, overwrite: bool, workers: int,
                     beam_options: str):
    """Builds into the local copy of ``data_dir`` (array_record writes local files), then
    uploads the version folder, its descriptions last (a reader takes a dataset without
    them for unfinished). A dataset already in the bucket is downloaded and checked against
    the asked settings instead."""
    storage.check_reachable(data_dir, "--data_dir")
    local = storage.mirror_path(data_dir)
    with _build_lock(data_dir, builder, config.name):
        found = pipeline.latest_version(storage.join(data_dir, builder, config.name))
        if found and not overwrite:
            storage.mirror(found)
        ds_builder = build(builder, local, config=config, overwrite=overwrite,
                           workers=workers, beam_options=beam_options)
        target = bucket_dir(ds_builder, data_dir)
        if found and not overwrite:
            return ds_builder
        if storage.exists(target):   # --overwrite: the old one is unfinished from here on
            for marker in pipeline.MARKERS:
                if storage.exists(storage.join(target, marker)):
                    storage.remove(storage.join(target, marker))
            storage.rmtree(target)
        storage.upload_tree(ds_builder.data_dir, target, last=pipeline.MARKERS)
        storage.mirrored(target)
    return ds_builder


def bucket_dir(ds_builder, data_dir: str) -> str:
    """Where a dataset built for ``data_dir`` lives: its builder's folder, or for a bucket
    the same place in the bucket (the builder reads the local copy)."""
    if not storage.is_url(data_dir):
        return ds_builder.data_dir
    rel = os.path.relpath(ds_builder.data_dir, storage.mirror_path(data_dir))
    return storage.join(data_dir, *rel.split(os.sep))


def _build_locked(builder: str, ds_builder, data_dir: str, config, overwrite: bool,
                  parallel: dict):
    """build() once the lock is held: reuse, check the stored settings, or (re)build."""
    cls = BUILDERS[builder]
    _remove_unfinished(os.path.dirname(ds_builder.data_dir))
    # anew: a dataset restored just now must be read from its folder, not the empty one seen
    ds_builder = cls(data_dir=data_dir, config=config, file_format="array_record")
    meta_path = os.path.join(ds_builder.data_dir, "metadata.json")
    if os.path.exists(meta_path) and not overwrite:
        with open(meta_path) as f:
            stored = json.load(f).get("builder_config")
        # settings added since: a dataset built before them was built as their default says
        stored = {**{k: v for k, v in ADDED_CONFIG_FIELDS.items()
                     if k in _config_record(config)}, **(stored or {})}
        wanted = json.loads(json.dumps(_config_record(config)))
        if stored != wanted:
            raise BuildError(
                f"{ds_builder.data_dir} was built with other settings ({stored}); now asked "
                f"for {wanted}. Use another name or overwrite=True / --overwrite.")
    if overwrite and os.path.exists(meta_path):
        ds_builder = _rebuild_beside(cls, data_dir, config, ds_builder.data_dir, parallel)
    else:
        if parallel["builder"] and not os.path.exists(meta_path):
            ds_builder = cls(data_dir=data_dir, config=config, file_format="array_record",
                             **parallel["builder"])
        ds_builder.download_and_prepare(**parallel["prepare"])
    skipped = {k: v for k, v in ds_builder.info.metadata.get("skipped_files", {}).items() if v}
    for split, files in skipped.items():
        print(f"{builder}/{config.name}: skipped {len(files)} file(s) in split {split!r}:",
              file=sys.stderr)
        for s in files:
            print(f"  {s['reason']}", file=sys.stderr)
    return ds_builder
