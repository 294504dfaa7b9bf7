"""The cross-domain evaluation suite (dwm_jax/data/suite.py) at its small scale: every task's
splits are disjoint by what the task says (speaker, instrument, words, recording condition),
class counts are as planned, the audio is deterministic by seed, and a task builds."""

import csv
import hashlib
import os
import shutil

import pytest
import soundfile

from dwm_jax import data
from dwm_jax.data import suite

pytestmark = pytest.mark.skipif(
    not (shutil.which("espeak-ng") and shutil.which("fluidsynth")
         and os.path.isfile(suite.SOUNDFONT)),
    reason="needs espeak-ng, fluidsynth and fluid-soundfont-gm (make test installs them)")

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
            for split in ("train", "valid", "test")}


@pytest.mark.parametrize("task,column", [("words", "speaker"), ("languages", "speaker"),
                                         ("instruments", "program"), ("pitch", "program"),
                                         ("events", "condition")])
def test_splits_are_disjoint_by_what_the_task_says(made, task, column):
    groups = _by_split(made[1][task], column)
    assert all(groups.values())
    assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["valid"])
    assert not (groups["valid"] & groups["test"])


def test_speakers_are_tested_on_words_they_never_said_in_training(made):
    rows = made[1]["speakers"]
    words = {split: {w for r in rows if r["split"] == split for w in r["text"].split()}
             for split in ("train", "test")}
    assert words["test"] <= set(suite.VOCAB_TEST)
    assert not (words["train"] & words["test"])


def test_every_class_has_the_planned_clips(made):
    expected_classes = {"events": 12, "words": 12, "speakers": 16, "languages": 10,
                        "instruments": 10, "pitch": 12}
    for task, rows in made[1].items():
        labels = {r["label"] for r in rows}
        assert len(labels) == expected_classes[task], task
        for split in ("train", "valid", "test"):
            for label in labels:
                n = sum(r["split"] == split and r["label"] == label for r in rows)
                assert n == getattr(SMALL, split), (task, split, label)
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
        files = sorted(os.listdir(os.path.join(root, "audio", "train")))
        h = hashlib.sha256()
        for name in files:
            with open(os.path.join(root, "audio", "train", name), "rb") as f:
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


def test_the_corpus_is_unlabelled_mixed_and_deterministic(tmp_path):
    from dwm_jax.data import corpus
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
