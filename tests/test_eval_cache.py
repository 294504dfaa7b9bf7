"""The embedding cache never changes a score: labels always come from the dataset, and an
unreadable cache file is recomputed."""

import glob

import numpy as np
import pytest

from dwm_jax import data, probe

soundfile = pytest.importorskip("soundfile")


def _tones(tmp_path, labels_of_index):
    """24 one-second clips (300 Hz or 3 kHz tones) and a CSV labelling clip i as
    ``labels_of_index(i)``; builds (or rebuilds) dataset audio_folder/tones."""
    clips = tmp_path / "clips"
    clips.mkdir(exist_ok=True)
    rows = ["filename,label,split"]
    for i in range(24):
        t = np.arange(16000) / 16000
        x = np.sin(2 * np.pi * (300 if i % 2 else 3000) * t) * 0.3
        x = x + 0.01 * np.random.default_rng(i).standard_normal(16000)
        soundfile.write(str(clips / f"{i}.wav"), x.astype(np.float32), 16000)
        rows.append(f"{i}.wav,{labels_of_index(i)},{'test' if i >= 16 else 'train'}")
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    data_dir = str(tmp_path / "d")
    data.build("audio_folder", data_dir, overwrite=True, config=data.audio_folder_config(
        "tones", audio_dir=str(clips), csv_path=str(tmp_path / "meta.csv")))
    return data_dir


def _score(data_dir, cache_dir):
    r = probe.evaluate_task("audio_folder/tones", data_dir,
                            {"raw": (probe.raw_features, "raw")}, cache_dir=cache_dir)
    return r["raw"]["test_accuracy"]


def test_a_relabelled_rebuild_is_scored_with_its_new_labels(tmp_path):
    cache = str(tmp_path / "cache")
    data_dir = _tones(tmp_path, lambda i: "low" if i % 2 else "high")
    assert _score(data_dir, cache) == 1.0  # the labels follow the tone
    assert glob.glob(f"{cache}/raw/*/*.npz")
    # the same audio, the labels of the test clips swapped: the probe must now be wrong on
    # every test clip, as it is without the cache
    data_dir = _tones(tmp_path, lambda i: ("low" if i % 2 else "high") if i < 16
                      else ("high" if i % 2 else "low"))
    assert _score(data_dir, None) == 0.0
    assert _score(data_dir, cache) == 0.0


def test_a_truncated_cache_file_is_recomputed(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    data_dir = _tones(tmp_path, lambda i: "low" if i % 2 else "high")
    assert _score(data_dir, cache) == 1.0
    files = sorted(glob.glob(f"{cache}/raw/*/*.npz"))
    with open(files[0], "r+b") as f:
        f.truncate(40)
    assert _score(data_dir, cache) == 1.0
    assert "unreadable cache file" in capsys.readouterr().err
    with np.load(files[0]) as f:  # and written again whole
        assert f["x"].shape[0] > 0
