"""The nine evaluation presets, each on a miniature copy of its dataset's real layout: the
directory structure and metadata format it is distributed in, with a few generated clips."""

import csv
import json
import os

import numpy as np
import pytest
import soundfile

from dwm_jax import data
from dwm_jax.data import cli as build_cli


def _clip(path, seed, rate=16000, seconds=0.3):
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fmt = {".ogg": "OGG", ".au": "AU"}.get(os.path.splitext(path)[1])
    soundfile.write(path, x.astype(np.float32), rate, format=fmt)


def _text(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def _csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _build(tmp_path, preset, root, data_dir="data", **kw):
    cfg = data.audio_folder_config(preset, preset=preset, root=str(root), **kw)
    b = data.build("audio_folder", str(tmp_path / data_dir), config=cfg)
    splits = {k: v.num_examples for k, v in b.info.splits.items()}
    return b, splits


def _labels(tmp_path, name, split):
    s = data.open_split(str(tmp_path / "data"), f"audio_folder/{name}", split)
    return s, sorted(s.label_names[s.source[i]["label"]] for i in range(len(s)))


def test_spcv2_splits_from_its_own_lists(tmp_path):
    root = tmp_path / "speech_commands_v0.02"
    files = [f"{w}/{s}_nohash_{k}.wav" for w in ("yes", "no") for s in ("aa", "bb", "cc")
             for k in (0,)]
    for i, f in enumerate(files):
        _clip(str(root / f), i)
    _clip(str(root / "_background_noise_" / "white_noise.wav"), 99, seconds=1.0)
    _text(str(root / "validation_list.txt"), ["yes/bb_nohash_0.wav", "no/bb_nohash_0.wav"])
    _text(str(root / "testing_list.txt"), ["yes/cc_nohash_0.wav", "no/cc_nohash_0.wav"])
    _, splits = _build(tmp_path, "spcv2", root)
    assert splits == {"train": 2, "valid": 2, "test": 2}  # the noise folder is no class
    s, labels = _labels(tmp_path, "spcv2", "test")
    assert s.label_names == ("no", "yes") and labels == ["no", "yes"]
    assert sorted(s.source[i]["filename"].decode() for i in range(2)) == [
        "no/cc_nohash_0.wav", "yes/cc_nohash_0.wav"]


def test_spcv2_names_a_listed_file_that_is_missing(tmp_path):
    root = tmp_path / "spc"
    _clip(str(root / "yes" / "aa_nohash_0.wav"), 0)
    _text(str(root / "validation_list.txt"), ["yes/zz_nohash_0.wav"])
    _text(str(root / "testing_list.txt"), [])
    with pytest.raises(data.BuildError, match="zz_nohash_0.wav"):
        _build(tmp_path, "spcv2", root)
    os.remove(root / "testing_list.txt")
    with pytest.raises(data.BuildError, match="testing_list.txt does not exist"):
        _build(tmp_path, "spcv2", root)


def test_vc1_reads_iden_split(tmp_path):
    root = tmp_path / "VoxCeleb1"
    lines = []
    for i, (speaker, video, utt, kind) in enumerate([
            ("id10001", "1zcIwhmdeo4", "00001", 1), ("id10001", "1zcIwhmdeo4", "00002", 1),
            ("id10001", "7gWzIy6yIIk", "00001", 2), ("id10001", "J9lHsKG98U8", "00001", 3),
            ("id10002", "0_laIeN-Q44", "00001", 1), ("id10002", "6WO410QOeuo", "00001", 2),
            ("id10002", "C7k7C-PDvAA", "00001", 3)]):
        _clip(str(root / "wav" / speaker / video / f"{utt}.wav"), i)
        lines.append(f"{kind} {speaker}/{video}/{utt}.wav")
    _text(str(root / "iden_split.txt"), lines)
    _, splits = _build(tmp_path, "vc1", root)
    assert splits == {"train": 3, "valid": 2, "test": 2}
    s, labels = _labels(tmp_path, "vc1", "test")
    assert labels == ["id10001", "id10002"]


def test_vc1_without_its_split_list_says_where_it_comes_from(tmp_path):
    root = tmp_path / "VoxCeleb1"
    _clip(str(root / "wav" / "id10001" / "v" / "00001.wav"), 0)
    with pytest.raises(data.BuildError, match="iden_split.txt from the VoxCeleb1 site"):
        data.audio_folder_config("vc1", preset="vc1", root=str(root))
    _text(str(root / "iden_split.txt"), ["4 id10001/v/00001.wav"])
    with pytest.raises(data.BuildError, match=r"iden_split.txt:1: expected"):
        _build(tmp_path, "vc1", root)


def test_voxforge_reads_evar_metadata(tmp_path):
    root = tmp_path / "voxforge"
    rows = []
    for i, (session, lang, split) in enumerate([
            ("anonymous-20080504-qvg", "de", "train"), ("Aaron-20080318-kdl", "en", "train"),
            ("bernd-20090122-abc", "de", "valid"), ("jose-20100101-xyz", "es", "test"),
            ("mary-20100101-qqq", "en", "test")]):
        rel = f"{session}/wav/a{i:04d}.wav"
        _clip(str(root / rel), i)
        rows.append((rel, lang, split))
    _csv(str(root / "voxforge.csv"), ("file_name", "label", "split"), rows)
    _, splits = _build(tmp_path, "voxforge", root)
    assert splits == {"train": 2, "valid": 1, "test": 2}
    _, labels = _labels(tmp_path, "voxforge", "test")
    assert labels == ["en", "es"]


def test_cremad_labels_from_names_and_speakers_never_cross_splits(tmp_path):
    root = tmp_path / "CREMA-D"
    names = [f"{spk}_{sent}_{emo}_XX.wav" for spk in ("1001", "1002", "1003")
             for sent, emo in (("DFA", "ANG"), ("IEO", "HAP"), ("TIE", "SAD"))]
    for i, name in enumerate(names):
        _clip(str(root / "AudioWAV" / name), i)
    speaker_split = {"1001": "test", "1002": "train", "1003": "valid"}
    # EVAR's file lists the speaker's split on each of its rows; one row is enough here
    _csv(str(root / "cremad.csv"), ("file_name", "label", "speaker_id", "split"),
         [(f"{spk}_DFA_ANG_XX.wav", "ANG", spk, sp) for spk, sp in speaker_split.items()])
    _, splits = _build(tmp_path, "cremad", root)
    assert splits == {"train": 3, "valid": 3, "test": 3}
    s, labels = _labels(tmp_path, "cremad", "test")
    assert labels == ["ANG", "HAP", "SAD"]
    assert {s.source[i]["filename"][:4] for i in range(len(s))} == {b"1001"}

    _csv(str(root / "cremad.csv"), ("file_name", "split"),
         [("1001_DFA_ANG_XX.wav", "test"), ("1001_IEO_HAP_XX.wav", "train")])
    with pytest.raises(data.BuildError, match="speaker 1001 is in split 'train' here"):
        _build(tmp_path, "cremad", root, data_dir="other")
    _clip(str(root / "AudioWAV" / "1001_DFA_XYZ_XX.wav"), 0)
    _csv(str(root / "cremad.csv"), ("file_name", "split"), [("1001_DFA_ANG_XX.wav", "test")])
    with pytest.raises(data.BuildError, match="1001_DFA_XYZ_XX.wav: not a CREMA-D name"):
        _build(tmp_path, "cremad", root, data_dir="other")


def test_gtzan_fault_filtered_split_matches_au_files_and_leaves_out_the_rest(tmp_path):
    root = tmp_path / "gtzan"
    split_dir = tmp_path / "music_dataset_split" / "GTZAN_split"
    for i, genre in enumerate(("blues", "rock")):
        for k in range(4):
            _clip(str(root / "genres" / genre / f"{genre}.{k:05d}.au"), 10 * i + k,
                  rate=22050)
    _text(str(split_dir / "train_filtered.txt"),
          ["blues/blues.00000.wav", "blues/blues.00001.wav", "rock/rock.00000.wav"])
    _text(str(split_dir / "valid_filtered.txt"), ["rock/rock.00001.wav"])
    _text(str(split_dir / "test_filtered.txt"), ["blues/blues.00002.wav", "rock/rock.00002.wav"])
    with pytest.raises(data.BuildError, match="jongpillee/music_dataset_split"):
        data.audio_folder_config("gtzan", preset="gtzan", root=str(root))
    _, splits = _build(tmp_path, "gtzan", root, split_file=str(split_dir))
    assert splits == {"train": 3, "valid": 1, "test": 2}  # *.00003 are in no list
    s, labels = _labels(tmp_path, "gtzan", "test")
    assert labels == ["blues", "rock"] and s.source[0]["filename"].endswith(b".au")


def test_nsynth_instrument_family_from_examples_json(tmp_path):
    root = tmp_path / "nsynth"
    families = {"train": ["bass", "guitar", "bass"], "valid": ["guitar"],
                "test": ["bass", "guitar"]}
    for split, fams in families.items():
        notes = {}
        for k, fam in enumerate(fams):
            note = f"{fam}_acoustic_{k:03d}-060-100"
            _clip(str(root / f"nsynth-{split}" / "audio" / f"{note}.wav"), k)
            notes[note] = {"note_str": note, "pitch": 60, "velocity": 100,
                           "instrument_family_str": fam, "instrument_source_str": "acoustic"}
        _text(str(root / f"nsynth-{split}" / "examples.json"), [json.dumps(notes)])
    _, splits = _build(tmp_path, "nsynth", root)
    assert splits == {"train": 3, "valid": 1, "test": 2}
    _, labels = _labels(tmp_path, "nsynth", "train")
    assert labels == ["bass", "bass", "guitar"]


def test_surge_pitch_labels_and_tone_split(tmp_path):
    root = tmp_path / "surge"
    tones = {"surge-patches-Bass-1-velocity64": "train", "surge-patches-Lead-2-velocity64":
             "valid", "surge-patches-Pad-3-velocity64": "test"}
    for i, tone in enumerate(tones):
        for pitch in (60, 62):
            _clip(str(root / tone / f"{pitch}.ogg"), 10 * i + pitch)
    _csv(str(root / "dataset_surge_tone_splits.csv"), ("tone", "split"), tones.items())
    _, splits = _build(tmp_path, "surge", root)
    assert splits == {"train": 2, "valid": 2, "test": 2}
    s, labels = _labels(tmp_path, "surge", "valid")
    assert labels == ["60", "62"]

    _clip(str(root / "surge-patches-New-velocity64" / "60.ogg"), 7)
    with pytest.raises(data.BuildError, match="'surge-patches-New-velocity64' has no split"):
        _build(tmp_path, "surge", root, data_dir="other")


def test_cli_preset_with_a_split_file_elsewhere_and_its_errors(tmp_path, capsys):
    root = tmp_path / "VoxCeleb1"
    for i, kind in enumerate((1, 2, 3)):
        _clip(str(root / "wav" / "id10001" / "v" / f"0000{i}.wav"), i)
    split = tmp_path / "meta" / "iden_split.txt"
    _text(str(split), [f"{k} id10001/v/0000{i}.wav" for i, k in enumerate((1, 2, 3))])
    args = ["audio_folder", "--name", "vc1", "--preset", "vc1", "--root", str(root),
            "--data_dir", str(tmp_path / "d")]
    assert build_cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "iden_split.txt" in err[0] and "--split_file" in err[0]
    assert build_cli.main(args + ["--split_file", str(split)]) == 0
    assert "'test': 1" in capsys.readouterr().out


@pytest.mark.parametrize("reader,make,message", [
    ("voxceleb1", lambda root: _text(str(root / "list.txt"), ["12 id1/v/1.wav"]),
     r"list.txt:1: expected '<1\|2\|3>"),
    ("voxceleb1", lambda root: (root.mkdir(), (root / "list.txt").write_bytes(b"1 id\xff/v/1.wav\n")),
     r"list.txt: not UTF-8 text"),
    ("nsynth", lambda root: [_text(str(root / f"nsynth-{s}" / "examples.json"), ["[1, 2]"])
                             for s in ("train", "valid", "test")],
     r"examples.json: a JSON list"),
    ("nsynth", lambda root: [_text(str(root / f"nsynth-{s}" / "examples.json"), [json.dumps(
        {"n1": {"instrument_family_str": 3}})]) for s in ("train", "valid", "test")],
     r"note 'n1' has no instrument_family_str string \(got 3\)"),
    ("surge", lambda root: _text(str(root / "list.txt"), ["tone,split", "Bass-1", "Pad,test"]),
     r"list.txt:2: no value in column\(s\) \['split'\]"),
    ("crema_d", lambda root: _text(str(root / "list.txt"), ["file_name,split", ",train"]),
     r"list.txt:2: no value in column\(s\) \['file_name'\]"),
])
def test_layout_readers_name_the_file_and_row_of_a_bad_list(tmp_path, reader, make, message):
    from dwm_jax.data import layouts
    root = tmp_path / "root"
    make(root)
    with pytest.raises(layouts.LayoutError, match=message):
        layouts.READERS[reader](str(root), str(root / "list.txt"))
