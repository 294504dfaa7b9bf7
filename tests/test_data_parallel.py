"""Parallel builds on Apache Beam: the same dataset as a single-process build, record for
record, with the same statistics and skipped files; a killed build leaves nothing finished."""

import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile

from dwm_jax import data

pytestmark = pytest.mark.slow  # subprocesses, builds or training runs

pytest.importorskip("apache_beam", reason="pip install 'dwm_jax[beam]' (make test does)")


def _clip(path, seed, seconds):
    rng = np.random.default_rng(seed)
    rate = 16000
    t = np.arange(int(rate * seconds)) / rate
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) + 0.05 * rng.standard_normal(len(t))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    soundfile.write(path, x.astype(np.float32), rate)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    rows = []
    for i in range(14):
        name = f"c{i:02d}.wav"
        _clip(str(root / "clips" / name), i, seconds=0.5 + 0.25 * (i % 5))
        rows.append((name, ["dog", "cat", "bird"][i % 3], ["train", "train", "test"][i % 3]))
    (root / "clips" / "bad1.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    (root / "clips" / "bad2.wav").write_bytes(b"")
    rows += [("bad1.wav", "dog", "train"), ("bad2.wav", "cat", "test")]
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("filename", "label", "split"))
        w.writerows(rows)
    return root


def _records(data_dir, name, split):
    s = data.open_split(str(data_dir), f"audio_folder/{name}", split)
    return s, {s.source[i]["filename"]: (s.source[i]["label"], s.source[i]["log_mel"].tobytes())
               for i in range(len(s))}


def test_one_and_two_workers_build_the_same_dataset(folder, tmp_path):
    cfg = data.audio_folder_config("pets", audio_dir=str(folder / "clips"),
                                   csv_path=str(folder / "labels.csv"), skip_bad_files=True)
    one = data.build("audio_folder", str(tmp_path / "one"), config=cfg)
    two = data.build("audio_folder", str(tmp_path / "two"), config=cfg, workers=2)
    for split in ("train", "test"):
        s1, r1 = _records(tmp_path / "one", "pets", split)
        s2, r2 = _records(tmp_path / "two", "pets", split)
        assert len(r1) == {"train": 10, "test": 4}[split]
        assert r1 == r2  # the same clips, labels and log-mels (as sets of records)
        assert s1.norm_stats() == s2.norm_stats()
    m1, m2 = one.info.metadata, two.info.metadata
    assert m1["stats"] == m2["stats"]  # exact: not approximately equal
    assert m1["skipped_files"] == m2["skipped_files"]
    assert [s["file"] for s in m2["skipped_files"]["train"]] == [str(folder / "clips/bad1.wav")]
    assert [s["file"] for s in m2["skipped_files"]["test"]] == [str(folder / "clips/bad2.wav")]
    assert not glob.glob(str(tmp_path / "two" / "audio_folder" / "pets" / "incomplete*"))
    # the stored statistics are those of the stored clips
    s, recs = _records(tmp_path / "two", "pets", "train")
    x = np.concatenate([s.source[i]["log_mel"].astype(np.float64) for i in range(len(s))], 1)
    np.testing.assert_allclose(m2["stats"]["train"]["sum"], x.sum(1), rtol=1e-12)
    assert m2["stats"]["train"]["frames"] == x.shape[1]


def test_bad_files_stop_a_parallel_build_naming_each(folder, tmp_path):
    cfg = data.audio_folder_config("pets", audio_dir=str(folder / "clips"),
                                   csv_path=str(folder / "labels.csv"))
    with pytest.raises(data.BuildError, match=r"2 bad file.* split 'test\+train'") as e:
        data.build("audio_folder", str(tmp_path / "d"), config=cfg, workers=2)
    assert "bad1.wav" in str(e.value) and "bad2.wav" in str(e.value)
    config_dir = tmp_path / "d" / "audio_folder" / "pets"
    assert not glob.glob(str(config_dir / "*" / "dataset_info.json"))


def test_parallel_options_are_checked(folder, tmp_path):
    cfg = data.audio_folder_config("pets", audio_dir=str(folder / "clips"),
                                   csv_path=str(folder / "labels.csv"), skip_bad_files=True)
    with pytest.raises(data.BuildError, match="--workers must be at least 1"):
        data.build("audio_folder", str(tmp_path), config=cfg, workers=0)
    with pytest.raises(data.BuildError, match="synthetic_sounds is built in one process"):
        data.build("synthetic_sounds", str(tmp_path), config="small", workers=2)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_killed_parallel_build_leaves_nothing_finished_and_reruns(tmp_path, sig):
    audio_dir = tmp_path / "many"
    for i in range(48):
        _clip(str(audio_dir / f"{i:03d}.wav"), i, seconds=4.0)
    cmd = [sys.executable, "-m", "dwm_jax.data", "audio_folder", "--name", "many",
           "--audio_dir", str(audio_dir), "--data_dir", str(tmp_path / "d"), "--workers", "2"]
    config_dir = tmp_path / "d" / "audio_folder" / "many"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    # the pipeline's scratch folder appears when the pipeline is made, before any clip is read
    while (not glob.glob(str(config_dir / "**" / "incomplete.beam-*"), recursive=True)
           and time.time() < deadline):
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.killpg(proc.pid, sig)
    assert proc.wait(timeout=120) != 0
    assert not glob.glob(str(config_dir / "*" / "dataset_info.json"))
    with pytest.raises(FileNotFoundError):
        data.open_split(str(tmp_path / "d"), "audio_folder/many", "train")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "'train': 48" in done.stdout
    assert [os.path.basename(p) for p in glob.glob(str(config_dir / "*"))] == ["1.1.0"]
    with open(glob.glob(str(config_dir / "*" / "metadata.json"))[0]) as f:
        assert json.load(f)["stats"]["train"]["clips"] == 48
