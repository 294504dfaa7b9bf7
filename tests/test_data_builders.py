"""TFDS builders: audio folders (+CSV, presets, bad files) and synthetic_sounds, read back."""

import csv
import json
import os

import numpy as np
import pytest
import soundfile

from dwm_jax import audio, data
from dwm_jax.data import builders, pipeline, synthetic

# name, format, sample rate, channels, seconds, label, split
CLIPS = [
    ("a.wav", 16000, 1, 3.0, "dog", "train"),
    ("b.flac", 22050, 2, 8.0, "cat", "train"),     # long: kept whole (801 frames)
    ("sub/c.ogg", 8000, 1, 1.0, "dog", "valid"),   # short: padded when read
    ("d.mp3", 44100, 1, 2.0, "cat", "valid"),
    ("e.wav", 16000, 1, 6.1, "bird", "test"),
    ("f.flac", 48000, 1, 2.5, "bird", "train"),
]


def _write_clip(path, rate, channels, seconds, seed):
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    t = np.arange(n) / rate
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) + 0.05 * rng.standard_normal(n)
    if channels == 2:
        x = np.stack([x, rng.standard_normal(n) * 0.05], axis=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    soundfile.write(path, x.astype(np.float32), rate)


def _write_csv(path, rows, header=("filename", "label", "split")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    for i, (name, rate, ch, sec, _, _) in enumerate(CLIPS):
        _write_clip(str(root / "clips" / name), rate, ch, sec, seed=i)
    (root / "clips" / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    good = [(n, lab, sp) for n, _, _, _, lab, sp in CLIPS]
    _write_csv(root / "good.csv", good)
    _write_csv(root / "with_corrupt.csv", good + [("corrupt.wav", "dog", "train")])
    _write_csv(root / "with_missing.csv", good[:2] + [("missing.wav", "dog", "train")] + good[2:])
    return root


def _build(tmp_path, name, **kw):
    cfg = data.audio_folder_config(name, **kw)
    return data.build("audio_folder", str(tmp_path / "data"), config=cfg)


def test_audio_folder_round_trip(folder, tmp_path):
    b = _build(tmp_path, "pets", audio_dir=str(folder / "clips"), csv_path=str(folder / "good.csv"))
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 3, "valid": 2,
                                                                      "test": 1}
    fe = audio.LogMelFrontEnd()
    seen = {}
    for split in ("train", "valid", "test"):
        s = data.open_split(str(tmp_path / "data"), "audio_folder/pets", split)
        assert s.label_names == ("bird", "cat", "dog")
        for i in range(len(s)):
            ex = s.source[i]
            name = ex["filename"].decode()
            seen[name] = split
            want = fe.from_file(str(folder / "clips" / name)).astype(np.float16)
            assert ex["log_mel"].dtype == np.float16
            np.testing.assert_array_equal(ex["log_mel"], want)  # long clips kept whole
            label = next(c[4] for c in CLIPS if c[0] == name)
            assert s.label_names[ex["label"]] == label
    assert seen == {c[0]: c[5] for c in CLIPS}
    b_frames = fe.from_file(str(folder / "clips" / "b.flac")).shape[1]
    assert b_frames == 801


def test_statistics_are_stored_and_pooled(folder, tmp_path):
    _build(tmp_path, "pets", audio_dir=str(folder / "clips"), csv_path=str(folder / "good.csv"))
    per_split = {}
    for split in ("train", "valid", "test"):
        s = data.open_split(str(tmp_path / "data"), "audio_folder/pets", split)
        per_split[split] = [s.source[i]["log_mel"].astype(np.float64) for i in range(len(s))]
        stored = s.metadata["stats"][split]
        allx = np.concatenate(per_split[split], axis=1)
        assert stored["frames"] == allx.shape[1] and stored["clips"] == len(s)
        np.testing.assert_allclose(stored["mean"], allx.mean(), rtol=1e-9)
        np.testing.assert_allclose(stored["std"], allx.std(), rtol=1e-7)
        np.testing.assert_allclose(stored["sum"], allx.sum(axis=1), rtol=1e-9)
    s = data.open_split(str(tmp_path / "data"), "audio_folder/pets", "train+valid")
    pooled = np.concatenate(per_split["train"] + per_split["valid"], axis=1)
    st = s.norm_stats()
    np.testing.assert_allclose([st.mean, st.std], [pooled.mean(), pooled.std()], rtol=1e-7)
    with pytest.raises(ValueError, match="no statistics stored for split"):
        s.norm_stats(["nope"])


def test_corrupt_file_stops_the_build_and_names_it(folder, tmp_path):
    with pytest.raises(data.BuildError, match="corrupt.wav") as err:
        _build(tmp_path, "bad", audio_dir=str(folder / "clips"),
               csv_path=str(folder / "with_corrupt.csv"))
    assert "skip_bad_files" in str(err.value)
    with pytest.raises(FileNotFoundError, match="not built"):  # nothing half-written remains
        pipeline.dataset_dir(str(tmp_path / "data"), "audio_folder/bad")


def test_skipping_bad_files_reports_each_one(folder, tmp_path, capsys):
    b = _build(tmp_path, "bad", audio_dir=str(folder / "clips"),
               csv_path=str(folder / "with_corrupt.csv"), skip_bad_files=True)
    assert b.info.splits["train"].num_examples == 3
    skipped = b.info.metadata["skipped_files"]["train"]
    assert len(skipped) == 1 and skipped[0]["file"].endswith("corrupt.wav")
    err = capsys.readouterr().err
    assert "skipped 1 file(s) in split 'train'" in err and "corrupt.wav" in err


def test_missing_csv_row_is_an_error_that_names_the_row(folder, tmp_path):
    with pytest.raises(data.BuildError, match=r"with_missing\.csv:4: .*missing\.wav"):
        _build(tmp_path, "miss", audio_dir=str(folder / "clips"),
               csv_path=str(folder / "with_missing.csv"))
    b = _build(tmp_path, "miss", audio_dir=str(folder / "clips"),
               csv_path=str(folder / "with_missing.csv"), skip_bad_files=True)
    assert b.info.splits["train"].num_examples == 3
    assert "with_missing.csv:4" in b.info.metadata["skipped_files"]["train"][0]["reason"]


def test_folder_without_csv_is_an_unlabelled_train_split(folder, tmp_path):
    clean = tmp_path / "clean"
    for i, (name, rate, ch, sec, _, _) in enumerate(CLIPS):
        _write_clip(str(clean / name), rate, ch, sec, seed=i)
    b = _build(tmp_path, "unlabelled", audio_dir=str(clean))
    s = data.open_split(str(tmp_path / "data"), "audio_folder/unlabelled", "train")
    assert list(b.info.splits) == ["train"] and len(s) == len(CLIPS)
    assert s.label_names is None and "label" not in s.source[0]
    assert sorted(s.source[i]["filename"].decode() for i in range(len(s))) == sorted(
        c[0] for c in CLIPS)


def test_esc50_and_us8k_presets(tmp_path):
    esc = tmp_path / "ESC-50-master"
    rows = []
    for i in range(6):
        fname = f"{1 + i % 3}-{1000 + i}-A-{i}.wav"
        _write_clip(str(esc / "audio" / fname), 44100, 1, 0.5, seed=i)
        rows.append((fname, 1 + i % 3, i % 2, ["dog", "rain"][i % 2], "False", 1000 + i, "A"))
    os.makedirs(esc / "meta")
    _write_csv(esc / "meta" / "esc50.csv", rows,
               header=("filename", "fold", "target", "category", "esc10", "src_file", "take"))
    data.build("audio_folder", str(tmp_path / "data"),
               config=data.audio_folder_config("esc50", preset="esc50", root=str(esc)))
    s = data.open_split(str(tmp_path / "data"), "audio_folder/esc50", "fold1+fold2")
    assert len(s) == 4 and s.label_names == ("dog", "rain")

    us = tmp_path / "UrbanSound8K"
    rows = []
    for i in range(4):
        fname = f"{100 + i}-0-0-{i}.wav"
        fold = 1 + i % 2
        _write_clip(str(us / "audio" / f"fold{fold}" / fname), 22050, 2, 0.5, seed=i)
        rows.append((fname, 100 + i, 0, 0.5, 1, fold, i % 2, ["siren", "drilling"][i % 2]))
    os.makedirs(us / "metadata")
    _write_csv(us / "metadata" / "UrbanSound8K.csv", rows, header=(
        "slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"))
    b = data.build("audio_folder", str(tmp_path / "data"),
                   config=data.audio_folder_config("us8k", preset="us8k", root=str(us)))
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {"fold1": 2, "fold2": 2}


def test_same_name_other_settings_is_refused_until_overwrite(folder, tmp_path):
    _build(tmp_path, "pets", audio_dir=str(folder / "clips"), csv_path=str(folder / "good.csv"))
    with pytest.raises(data.BuildError, match="built with other settings"):
        _build(tmp_path, "pets", audio_dir=str(folder / "clips"),
               csv_path=str(folder / "good.csv"), dtype="float32")
    cfg = data.audio_folder_config("pets", audio_dir=str(folder / "clips"),
                                   csv_path=str(folder / "good.csv"), dtype="float32")
    data.build("audio_folder", str(tmp_path / "data"), config=cfg, overwrite=True)
    s = data.open_split(str(tmp_path / "data"), "audio_folder/pets", "train")
    assert s.source[0]["log_mel"].dtype == np.float32


def test_a_dataset_built_before_a_new_setting_is_reused(folder, tmp_path):
    """A build whose stored settings predate label_separator (its metadata lacks the field)
    is the same dataset as one asked for with the field's default: reused, not refused."""
    b = _build(tmp_path, "pets", audio_dir=str(folder / "clips"),
               csv_path=str(folder / "good.csv"))
    meta_path = os.path.join(b.data_dir, "metadata.json")
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["builder_config"]["label_separator"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    _build(tmp_path, "pets", audio_dir=str(folder / "clips"), csv_path=str(folder / "good.csv"))
    with pytest.raises(data.BuildError, match="built with other settings"):
        _build(tmp_path, "pets", audio_dir=str(folder / "clips"),
               csv_path=str(folder / "good.csv"), label_separator=";")


def test_bad_configs_name_the_field(folder, tmp_path):
    with pytest.raises(data.BuildError, match="unknown preset"):
        data.audio_folder_config("x", preset="esc5", root=str(tmp_path))
    with pytest.raises(data.BuildError, match="is not a directory"):
        _build(tmp_path, "x", audio_dir=str(tmp_path / "nowhere"))
    with pytest.raises(data.BuildError, match="filename_column"):
        _build(tmp_path, "x", audio_dir=str(folder / "clips"), csv_path=str(folder / "good.csv"),
               filename_column="file")
    with pytest.raises(data.BuildError, match="dtype"):
        _build(tmp_path, "x", audio_dir=str(folder / "clips"), dtype="int8")
    with pytest.raises(data.BuildError, match="has no config"):
        data.build("synthetic_sounds", str(tmp_path), config="huge")


def test_cli_builds_a_folder_and_reports_errors(folder, tmp_path, capsys):
    from dwm_jax.data import cli as build_cli
    rc = build_cli.main(["audio_folder", "--name", "cli", "--audio_dir", str(folder / "clips"),
                         "--csv", str(folder / "with_corrupt.csv"), "--data_dir",
                         str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and "corrupt.wav" in err
    assert err.strip().splitlines()[-1].startswith("python -m dwm_jax.data: error:")
    rc = build_cli.main(["audio_folder", "--name", "cli", "--audio_dir", str(folder / "clips"),
                         "--sample_rate", "0", "--data_dir", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "sample_rate must be a positive integer" in err[0]
    rc = build_cli.main(["audio_folder", "--name", "cli", "--audio_dir", str(folder / "clips"),
                         "--csv", str(folder / "good.csv"), "--data_dir", str(tmp_path / "d")])
    assert rc == 0 and "'train': 3" in capsys.readouterr().out


# ----------------------------------------------------------------------- synthetic_sounds

def test_synthetic_clips_are_deterministic_by_seed():
    a = synthetic.synthesize(3, np.random.default_rng([0, 0, 7]))
    b = synthetic.synthesize(3, np.random.default_rng([0, 0, 7]))
    c = synthetic.synthesize(3, np.random.default_rng([1, 0, 7]))
    assert a.shape == (97280,) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert np.abs(a).max() <= 0.9 + 1e-6


def test_synthetic_small_build(synthetic_small):
    data_dir, _ = synthetic_small
    with open(os.path.join(pipeline.dataset_dir(data_dir, "synthetic_sounds/small"),
                           "metadata.json")) as f:
        meta = json.load(f)
    assert meta["builder_config"]["train_per_class"] == 8
    train = data.open_split(data_dir, "synthetic_sounds/small", "train")
    assert len(train) == 96 and train.num_classes == synthetic.NUM_CLASSES >= 10
    labels = [train.source[i]["label"] for i in range(len(train))]
    assert np.bincount(labels).tolist() == [8] * 12
    # a stored example is the front end applied to the clip its seed generates
    ex = next(train.source[i] for i in range(len(train))
              if train.source[i]["filename"] == b"train/000005_click_train")
    wave = synthetic.synthesize(5, np.random.default_rng([0, 0, 5]))
    np.testing.assert_array_equal(ex["log_mel"], audio.LogMelFrontEnd()(wave).astype(np.float16))
    assert ex["log_mel"].shape == (80, 609)


def test_synthetic_classes_are_distinct_but_not_trivially_separable(synthetic_small):
    """A linear probe on pooled raw log-mel features beats chance but does not saturate (the
    dataset leaves room for learned features). With 8 training clips per class the bound is
    loose: 10 of 48 right has p ~ 0.01 under chance; benchmarks/data.py reports the probe on
    the default build (80 per class)."""
    data_dir, _ = synthetic_small

    def pooled(split):
        s = data.open_split(data_dir, "synthetic_sounds/small", split)
        xs = [s.source[i] for i in range(len(s))]
        feats = np.stack([np.concatenate([e["log_mel"].astype(np.float32).mean(1),
                                          e["log_mel"].astype(np.float32).std(1)]) for e in xs])
        return feats, np.array([e["label"] for e in xs])

    xtr, ytr = pooled("train")
    xte, yte = pooled("test")
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    w, b = np.zeros((xtr.shape[1], 12)), np.zeros(12)
    for _ in range(1000):  # softmax regression, full-batch gradient descent
        z = xtr @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(ytr)), ytr] -= 1
        w -= 0.1 * (xtr.T @ p / len(ytr) + 1e-2 * w)
        b -= 0.1 * p.mean(0)
    acc = ((xte @ w + b).argmax(1) == yte).mean()
    assert 2 / 12 < acc < 0.9, acc


# ---- bad CSVs, bad files and interrupted builds: an error names the row or file, and
# ---- nothing that existed is lost

def _csv_build(folder, tmp_path, text, name="x", **kw):
    (tmp_path / f"{name}.csv").write_text(text, encoding="utf-8")
    return _build(tmp_path, name, audio_dir=str(folder / "clips"),
                  csv_path=str(tmp_path / f"{name}.csv"), **kw)


@pytest.mark.parametrize("text,match", [
    ("filename,label,split\na.wav,dog,train\ne.wav,bird,test\na.wav,cat,test\n",
     r"x\.csv:4: a\.wav is listed twice, here and at .*x\.csv:2 \(splits 'train' and 'test'"),
    ("filename,label,split\na.wav,dog,train\na.wav,dog,train\n", r"x\.csv:3: a\.wav is listed"),
    ("filename,label,split\na.wav,dog,train\ne.wav,bird,holdout\n",
     r"x\.csv:3: split 'holdout' is not one"),
    ("filename,split\na.wav,train\ne.wav,test\n", r"no column 'label' \(label_column\)"),
    ("filename,label,split\na.wav,dog,train\ne.wav,bird\n",
     r"x\.csv:3: the row has 2 field\(s\); the header has 3"),
    ("filename,label,split\na.wav,dog,train,extra\n", r"x\.csv:2: the row has 4 field"),
    ("filename,label,split\na.wav,dog,train\n../outside/x.wav,cat,test\n",
     r"x\.csv:3: \.\./outside/x\.wav is outside the audio folder"),
    ("filename,label,split\na.wav,dog,train\n/etc/hosts,cat,test\n",
     r"x\.csv:3: /etc/hosts is outside the audio folder"),
])
def test_bad_csv_rows_are_named(folder, tmp_path, text, match):
    with pytest.raises(data.BuildError, match=match):
        _csv_build(folder, tmp_path, text)


def test_a_multilabel_row_without_labels_is_named(folder, tmp_path):
    with pytest.raises(data.BuildError, match=r"x\.csv:3: no label in column 'label' "
                                              r"\(separated by ','\)"):
        _csv_build(folder, tmp_path, 'filename,label,split\na.wav,"dog,cat",train\n'
                   'e.wav," , ",test\n', label_separator=",")


def test_split_aliases_and_a_byte_order_mark(folder, tmp_path):
    text = "\ufefffilename,label,split\na.wav,dog,Training\nb.flac,cat,train\ne.wav,bird,Testing\n"
    b = _csv_build(folder, tmp_path, text)
    assert sorted(b.info.splits) == ["test", "train"]
    assert b.info.splits["test"].num_examples == 1


def test_every_bad_file_is_named_and_all_bad_is_an_error(folder, tmp_path):
    clips = folder / "clips"
    (clips / "bad2.wav").write_bytes(b"not audio at all")
    text = ("filename,label,split\na.wav,dog,train\ncorrupt.wav,dog,train\nb.flac,cat,train\n"
            "bad2.wav,cat,train\n")
    with pytest.raises(data.BuildError, match=r"2 bad file\(s\).*corrupt\.wav.*bad2\.wav"):
        _csv_build(folder, tmp_path, text)
    only_bad = "filename,label,split\ncorrupt.wav,dog,train\nbad2.wav,cat,train\n"
    with pytest.raises(data.BuildError, match=r"all 2 file\(s\) of split 'train' are bad"):
        _csv_build(folder, tmp_path, only_bad, name="y", skip_bad_files=True)


def test_truncated_wav_is_a_bad_file(folder, tmp_path):
    body = (folder / "clips" / "a.wav").read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(body[: len(body) // 3])
    with pytest.raises(audio.AudioLoadError, match=r"cut\.wav: truncated WAV: its header "
                                                   r"promises \d+ bytes of audio, the file holds"):
        audio.load_audio(str(cut))
    audio.load_audio(str(folder / "clips" / "a.wav"))  # the whole file is fine


def test_overwrite_keeps_the_old_dataset_until_the_new_one_is_complete(folder, tmp_path):
    good = _build(tmp_path, "pets", audio_dir=str(folder / "clips"),
                  csv_path=str(folder / "good.csv"))
    before = {k: v.num_examples for k, v in good.info.splits.items()}
    with pytest.raises(data.BuildError, match="corrupt.wav"):
        data.build("audio_folder", str(tmp_path / "data"), overwrite=True,
                   config=data.audio_folder_config("pets", audio_dir=str(folder / "clips"),
                                                   csv_path=str(folder / "with_corrupt.csv")))
    split = data.open_split(str(tmp_path / "data"), "audio_folder/pets", "train")
    assert len(split) == before["train"]                          # the old one, intact
    assert split.metadata["builder_config"]["csv"].endswith("good.csv")
    config_dir = os.path.dirname(pipeline.dataset_dir(str(tmp_path / "data"),
                                                      "audio_folder/pets"))
    assert sorted(os.listdir(config_dir)) == [builders.AudioFolder.VERSION.__str__()]
    # a successful overwrite replaces it
    new = data.build("audio_folder", str(tmp_path / "data"), overwrite=True,
                     config=data.audio_folder_config("pets", audio_dir=str(folder / "clips"),
                                                     csv_path=str(folder / "good.csv"),
                                                     dtype="float32"))
    assert new.info.metadata["builder_config"]["dtype"] == "float32"


def test_leftovers_of_a_killed_build_are_cleaned_up(folder, tmp_path):
    good = _build(tmp_path, "pets", audio_dir=str(folder / "clips"),
                  csv_path=str(folder / "good.csv"))
    config_dir = os.path.dirname(good.data_dir)
    os.makedirs(os.path.join(config_dir, "incomplete.ABC123_1.1.0"))
    version = os.path.basename(good.data_dir)   # killed between the two renames of a rebuild
    os.replace(good.data_dir, os.path.join(config_dir, ".old-" + version))
    restored = _build(tmp_path, "pets", audio_dir=str(folder / "clips"),
                      csv_path=str(folder / "good.csv"))
    assert {k: v.num_examples for k, v in restored.info.splits.items()} == {
        k: v.num_examples for k, v in good.info.splits.items()}   # reported as it is
    assert os.listdir(config_dir) == [version]
    assert len(data.open_split(str(tmp_path / "data"), "audio_folder/pets", "train")) == 3


@pytest.mark.parametrize("error", [
    PermissionError(13, "Permission denied", "/srv/data/audio_folder"),
    NotADirectoryError(20, "Not a directory", "/srv/data/.locks"),
])
def test_file_system_refusals_are_one_line_in_the_cli(monkeypatch, capsys, error):
    from dwm_jax.data import cli

    def refuse(*args, **kwargs):
        raise error
    monkeypatch.setattr(builders, "build", refuse)
    assert cli.main(["synthetic_sounds", "--data_dir", "/srv/data"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"python -m dwm_jax.data: error: {error.filename}: {error.strerror}"]


def test_a_csv_that_is_not_utf8_is_named_with_its_line(folder, tmp_path):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("filename,label\nfile_1.wav,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(data.BuildError, match=r"latin1.csv:2: not UTF-8 text"):
        data.build("audio_folder", str(tmp_path / "data"), config=data.audio_folder_config(
            "latin", audio_dir=str(folder / "clips"), csv_path=str(bad)))
