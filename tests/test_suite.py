"""The cross-domain evaluation suite (dwm_jax/suite/tasks.py) at its small scale: every task's
splits are disjoint by what the task says (speaker, instrument, words, recording condition),
class counts are as planned, the audio is deterministic by seed, and a task builds."""

import csv
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import soundfile

from dwm_jax import data
from dwm_jax.suite import tasks as suite

pytestmark = [
    pytest.mark.slow,  # synthesises and builds every task
    pytest.mark.skipif(
        not (shutil.which("espeak-ng") and shutil.which("fluidsynth")
             and os.path.isfile(suite.SOUNDFONT)),
        reason="needs espeak-ng, fluidsynth and fluid-soundfont-gm (make test installs them)")]

SMALL = suite.SCALES["small"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    return out, {task: _rows(suite.make_task(task, str(out), SMALL)) for task in suite.TASKS}


def _rows(csv_path):
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def _by_split(rows, column):
    return {split: {r[column] for r in rows if r["split"] == split}
            for split in sorted({r["split"] for r in rows})}


@pytest.mark.parametrize("task,column", [("words", "speaker"), ("languages", "speaker"),
                                         ("instruments", "program"), ("pitch", "program"),
                                         ("events", "condition")])
def test_splits_are_disjoint_by_what_the_task_says(made, task, column):
    groups = _by_split(made[1][task], column)
    expected = ([f"fold{j + 1}" for j in range(suite.INSTRUMENT_FOLDS)]
                if task == "instruments" else ["test", "train", "valid"])
    assert sorted(groups) == expected and all(groups.values())
    for a in groups:
        for b in groups:
            assert a == b or not (groups[a] & groups[b]), (task, a, b)


def test_speakers_are_tested_on_words_they_never_said_in_training(made):
    rows = made[1]["speakers"]
    words = {split: {w for r in rows if r["split"] == split for w in r["text"].split()}
             for split in ("train", "test")}
    assert words["test"] <= set(suite.VOCAB_TEST)
    assert not (words["train"] & words["test"])


def test_every_class_has_the_planned_clips(made):
    expected_classes = {"events": 12, "words": 12, "speakers": 16, "languages": 10,
                        "instruments": 10, "pitch": 12}
    per_fold = (SMALL.train + SMALL.valid + SMALL.test) // suite.INSTRUMENT_FOLDS
    for task, rows in made[1].items():
        labels = {r["label"] for r in rows}
        assert len(labels) == expected_classes[task], task
        planned = ({f"fold{j + 1}": per_fold for j in range(suite.INSTRUMENT_FOLDS)}
                   if task == "instruments" else vars(SMALL))
        for split, clips in planned.items():
            for label in labels:
                n = sum(r["split"] == split and r["label"] == label for r in rows)
                assert n == clips, (task, split, label)
    instruments = {r["label"] for r in made[1]["instruments"]}
    assert instruments == set(suite.GM_FAMILIES)


def test_clips_are_audible_and_of_the_planned_length(made):
    out, rows = made
    for task, seconds in (("words", 1.5), ("instruments", 2.0), ("languages", 3.0)):
        x, rate = soundfile.read(os.path.join(out, task, "audio", rows[task][0]["filename"]))
        assert rate == suite.RATE and len(x) == int(seconds * rate)
        assert 1e-4 < abs(x).max() <= 1.0


def test_the_audio_is_deterministic_by_seed(made, tmp_path):
    out, _ = made
    again = suite.make_task("instruments", str(tmp_path), SMALL)
    other = suite.make_task("words", str(tmp_path / "seed1"), SMALL, seed=1)

    def digest(root):
        h = hashlib.sha256()
        for folder, _, files in sorted(os.walk(os.path.join(root, "audio"))):
            for name in sorted(files):
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(f.read())
        return h.hexdigest()
    assert digest(os.path.dirname(again)) == digest(os.path.join(out, "instruments"))
    assert digest(os.path.dirname(other)) != digest(os.path.join(out, "words"))


def test_a_task_builds_and_reads_back(made, tmp_path):
    out, rows = made
    dataset = suite.build_task("words", str(out), str(tmp_path / "data"), "small")
    s = data.open_split(str(tmp_path / "data"), dataset, "test")
    assert len(s) == 12 * SMALL.test and len(s.label_names) == 12
    assert suite.main(["--out", str(out), "--data_dir", str(tmp_path / "data"),
                       "--tasks", "nope"]) == 2


def test_audio_of_an_older_generator_is_remade_and_its_dataset_rebuilt(made, tmp_path):
    out, _ = made
    work, data_dir = tmp_path / "suite", str(tmp_path / "data")
    shutil.copytree(out / "words", work / "words")
    dataset = suite.build_task("words", str(work), data_dir, "small")
    built = os.path.join(data_dir, dataset)
    labels = work / "words" / "labels.csv"
    made_at = labels.stat().st_mtime_ns
    # made by this generator version, scale and seed: audio and dataset reused
    open(os.path.join(built, "kept"), "w").close()
    assert suite.build_task("words", str(work), data_dir, "small") == dataset
    assert labels.stat().st_mtime_ns == made_at and os.path.exists(os.path.join(built, "kept"))
    # a folder from before the stamps counts as version 1 (words has not changed since)
    os.remove(work / "words" / suite.STAMP)
    suite.build_task("words", str(work), data_dir, "small")
    assert labels.stat().st_mtime_ns == made_at
    # an older generator's audio, or another seed: remade, the old dataset replaced
    for stamp in ({**suite._stamp("words", SMALL, 0), "version": 0},
                  suite._stamp("words", SMALL, 1)):
        json.dump(stamp, open(work / "words" / suite.STAMP, "w"))
        open(os.path.join(built, "kept"), "w").close()
        suite.build_task("words", str(work), data_dir, "small")
        assert json.load(open(work / "words" / suite.STAMP)) == suite._stamp("words", SMALL, 0)
        assert not os.path.exists(os.path.join(built, "kept"))
        assert len(data.open_split(data_dir, dataset, "test")) == 12 * SMALL.test


def test_each_family_is_tested_on_every_program_once_across_the_folds(made):
    rows = made[1]["instruments"]
    for family in suite.GM_FAMILIES:
        mine = [r for r in rows if r["label"] == family]
        assert {int(r["program"]) // 8 for r in mine} == {suite.GM_FAMILIES.index(family)}
    for fold in {r["split"] for r in rows}:
        dealt = suite.instrument_folds(0)
        assert all(dealt[r["label"]][fold].count(int(r["program"])) == 1
                   for r in rows if r["split"] == fold)
    # each family's eight programs dealt out in pairs by the seed (version 1 always held out
    # GM's last two, its odd members)
    for seed in (0, 1):
        for i, family in enumerate(suite.GM_FAMILIES):
            folds = suite.instrument_folds(seed)[family]
            assert len(folds) == suite.INSTRUMENT_FOLDS
            assert sorted(p for f in folds.values() for p in f) == list(range(8 * i, 8 * i + 8))
    assert suite.instrument_folds(0) != suite.instrument_folds(1)


def test_pitch_notes_are_of_their_class_in_the_octaves_the_front_end_resolves():
    # version 1 drew octave 2 as well (65-123 Hz), where every representation was at chance
    for k, pitch_class in enumerate(suite.PITCH_CLASSES):
        rng = np.random.default_rng(k)
        notes = [suite.pitch_note(pitch_class, rng) for _ in range(200)]
        assert all(len(n) == 1 for n in notes)
        midi = {n[0][0] for n in notes}
        assert {m % 12 for m in midi} == {k}
        assert {m // 12 - 1 for m in midi} == set(suite.PITCH_OCTAVES) == {3, 4, 5, 6}


def test_the_corpus_is_unlabelled_mixed_and_deterministic(tmp_path):
    from dwm_jax.suite import corpus
    assert corpus.main(["--out", str(tmp_path / "c"), "--data_dir", str(tmp_path / "d"),
                        "--hours", str(24 * corpus.SECONDS / 3600)]) == 0
    files = sorted(os.listdir(tmp_path / "c" / "audio"))
    kinds = {f.split("_", 1)[1][:-4] for f in files}
    assert len(files) == 24 and {"speech", "music"} <= kinds
    assert any("+" in k for k in kinds)  # mixtures
    x, rate = soundfile.read(tmp_path / "c" / "audio" / files[0])
    assert rate == suite.RATE and len(x) == int(corpus.SECONDS * rate) and abs(x).max() > 1e-4
    s = data.open_split(str(tmp_path / "d"), "audio_folder/corpus", "train")
    assert len(s) == 24 and not s.num_classes
    again = corpus.make_corpus(str(tmp_path / "again"), 24)
    for name in files[:6]:
        with open(tmp_path / "c" / "audio" / name, "rb") as a, \
                open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read()
