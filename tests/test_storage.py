"""Workdirs and datasets in a bucket: the one file-system layer (``dwm_jax.storage``), the
lease that keeps one run per workdir, and the whole path (build, train, SIGTERM, resume,
fall back from a damaged checkpoint, evaluate, export, convert back) against a real GCS
server on loopback (``tests/gcs_server.py``). Without a server, a URL is never turned into a
local folder."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from dwm_jax import locks, storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "dwm-test"


# ----------------------------------------------------------------------- local, fast tier

@pytest.mark.parametrize("path", ["gs:/bucket/run", "gs:bucket/run", "s3:/b/x"])
def test_a_url_that_lost_a_slash_is_refused(path):
    with pytest.raises(storage.StorageError, match="lost a slash"):
        storage.check(path, "--workdir")


@pytest.mark.parametrize("path", ["ftp://host/run", "foo://bucket/x", "file:///tmp/x"])
def test_an_unsupported_scheme_is_refused_naming_the_flag(path):
    with pytest.raises(storage.StorageError, match=r"--workdir .*not supported"):
        storage.check(path, "--workdir")


@pytest.mark.parametrize("path", ["runs/a", "/tmp/x", "./a:b", "C:/x", "a/gs:/b"])
def test_local_paths_pass_unchanged(path):
    assert storage.check(path) == path
    assert not storage.is_url(path)


def test_absolute_keeps_a_url_whole():
    assert storage.absolute("gs://b/run/checkpoints") == "gs://b/run/checkpoints"
    assert storage.absolute("run") == os.path.abspath("run")


def test_local_writes_behave_as_files(tmp_path):
    path = str(tmp_path / "a.json")
    storage.write_atomic(path, "one")
    storage.write_atomic(path, b"two")
    assert open(path).read() == "two" and not os.path.exists(path + ".tmp")
    storage.append_text(str(tmp_path / "log"), "a\n")
    with storage.appender(str(tmp_path / "log")) as f:
        f.write("b\n")
    assert open(tmp_path / "log").read() == "a\nb\n"
    os.makedirs(tmp_path / "d" / "e")
    open(tmp_path / "d" / "e" / "f", "w").write("x")
    storage.move(str(tmp_path / "d"), str(tmp_path / "d.aside"))
    assert storage.walk_files(str(tmp_path / "d.aside")) == ["e/f"]
    with storage.staged(str(tmp_path / "g.bin")) as tmp:
        open(tmp, "wb").write(b"123")
    assert open(tmp_path / "g.bin", "rb").read() == b"123"
    with pytest.raises(FileExistsError):
        storage.create_only(str(tmp_path / "g.bin"), b"again")


def test_train_py_refuses_a_bucket_out_of_reach_in_one_line(tmp_path):
    """No local folder named after the URL, nothing written (no storage server runs: the
    endpoint is a closed loopback port)."""
    env = dict(os.environ, STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{_free_port()}")
    res = subprocess.run([sys.executable, os.path.join(REPO, "train.py"),
                          "--config", os.path.join(REPO, "configs", "demo.py"),
                          "--workdir=gs://bucket/demo"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300, env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--workdir gs://bucket/demo" in lines[0], res.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("workdir", ["gs:/bucket/demo", "foo://bucket/demo"])
def test_training_refuses_a_bad_url_before_writing(workdir, tmp_path, monkeypatch):
    from dwm_jax import train as train_lib
    from tests.helpers import micro_config
    monkeypatch.chdir(tmp_path)
    with pytest.raises(storage.StorageError, match="--workdir"):
        train_lib.train(micro_config(str(tmp_path / "data")), workdir, progress=False)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("tool, argv", [
    ("dwm_jax.plots", ["--outdir", "gs://bucket/figures"]),
    ("dwm_jax.study.curve", ["--workdir", "gs://bucket/run"]),
    ("dwm_jax.study.run", ["--outdir", "gs:/bucket/study"]),
])
def test_tools_that_write_here_only_refuse_a_url(tool, argv, tmp_path, monkeypatch, capsys):
    import importlib
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(tool).main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and ("local path" in err or "lost a slash" in err), err
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------- against a GCS server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A GCS server on a free loopback port with bucket ``BUCKET``; the clients (gcsfs,
    TensorStore, google-cloud-storage) pointed at it; a local cache folder of our own."""
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.gcs_server", f"--port={port}",
                             f"--bucket={BUCKET}"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "ready"
    url = f"http://127.0.0.1:{port}"
    env = dict(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
               GOOGLE_CLOUD_PROJECT="test", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
               DWM_JAX_CACHE=str(tmp_path_factory.mktemp("cache")))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield f"gs://{BUCKET}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.slow
def test_objects_behave_as_files_on_the_server(gcs):
    path = f"{gcs}/unit/a.json"
    storage.write_atomic(path, "one")
    assert storage.read_text(path) == "one" and storage.isfile(path)
    with storage.appender(f"{gcs}/unit/log") as f:
        f.write("a\n")
        f.flush()
        f.write("b\n")
    storage.append_text(f"{gcs}/unit/log", "c\n")
    assert storage.read_text(f"{gcs}/unit/log") == "a\nb\nc\n"
    storage.write_atomic(f"{gcs}/unit/d/e/f", b"x")
    storage.move(f"{gcs}/unit/d", f"{gcs}/unit/d.aside")
    assert storage.walk_files(f"{gcs}/unit/d.aside") == ["e/f"]
    assert not storage.exists(f"{gcs}/unit/d/e/f")
    storage.create_only(f"{gcs}/unit/lease", b"first")
    with pytest.raises(FileExistsError):   # the create-only precondition, honoured
        storage.create_only(f"{gcs}/unit/lease", b"second")
    assert storage.read_text(f"{gcs}/unit/lease") == "first"
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.check_reachable("gs://no-such-bucket/run", "--workdir")


@pytest.mark.slow
def test_a_fresh_lease_refuses_a_second_holder_and_a_stale_one_is_taken_over(gcs, caplog):
    path = f"{gcs}/leases/run/.lock"
    storage.write_atomic(path, json.dumps(dict(holder="4242 on pod-host-7 (a training run)",
                                               token="theirs", heartbeat=time.time())))
    with pytest.raises(locks.LockedError, match="pod-host-7"):
        with locks.exclusive(path, "a training run", f"{gcs}/leases/run"):
            pass
    storage.write_atomic(path, json.dumps(dict(holder="4242 on pod-host-7 (a training run)",
                                               token="theirs", heartbeat=time.time() - 3600)))
    with locks.exclusive(path, "a training run", f"{gcs}/leases/run"):
        held = json.loads(storage.read_text(path))
        assert held["token"] != "theirs" and str(os.getpid()) in held["holder"]
    assert "took over the lease left by 4242 on pod-host-7" in caplog.text
    assert not storage.exists(path)   # released


@pytest.mark.slow
def test_an_audio_folder_and_its_table_in_a_bucket_build_into_a_bucket(gcs, tmp_path):
    import soundfile

    from dwm_jax import data
    clips = tmp_path / "clips"
    clips.mkdir()
    rng = np.random.default_rng(0)
    rows = ["filename,label,split"]
    for i in range(6):
        soundfile.write(str(clips / f"{i}.wav"),
                        (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
        rows.append(f"{i}.wav,{'ab'[i % 2]},{'train' if i < 4 else 'test'}")
    storage.upload_tree(str(clips), f"{gcs}/audio/clips")
    storage.write_atomic(f"{gcs}/audio/labels.csv", "\n".join(rows) + "\n")
    config = data.audio_folder_config("tiny", audio_dir=f"{gcs}/audio/clips",
                                      csv_path=f"{gcs}/audio/labels.csv")
    built = data.build("audio_folder", f"{gcs}/tfds", config=config)
    assert {k: v.num_examples for k, v in built.info.splits.items()} == {"train": 4, "test": 2}
    split = data.open_split(f"{gcs}/tfds", "audio_folder/tiny", "train")
    assert len(split) == 4 and split.label_names == ("a", "b")


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from dwm_jax import data
    from dwm_jax import train as train_lib
    from tests.helpers import micro_config
    calls = [0]
    original = data.DevicePrefetcher.__next__
    def counting(self):  # SIGTERM as the batch of step 6 is handed out
        calls[0] += 1
        if calls[0] == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)
    data.DevicePrefetcher.__next__ = counting
    cfg = micro_config({data_dir!r}, "msm_mae", "random", total_steps=8)
    summary = train_lib.train(cfg, {workdir!r}, progress=False)
    print("summary", summary.get("preempted_at"), summary["final_step"])
""")


def _metrics(workdir):
    return [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl")
            .splitlines()]


def _damage_largest_object(folder):
    files = [f"{folder}/{rel}" for rel in storage.walk_files(folder) if "/d/" in f"/{rel}"]
    path = max(files, key=lambda p: len(storage.open(p, "rb").read()))
    data = bytearray(storage.open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
    storage.write_atomic(path, bytes(data))


@pytest.mark.slow
def test_a_run_in_a_bucket_end_to_end(gcs, tmp_path):
    from dwm_jax import convert, data, export
    from dwm_jax import train as train_lib
    from tests.helpers import micro_config, read_params
    data_dir = f"{gcs}/tfds"
    built = data.build("synthetic_sounds", data_dir, config="small")
    stored = f"{data_dir}/synthetic_sounds/small/{built.info.version}"
    assert {"dataset_info.json", "metadata.json"} <= set(storage.listdir(stored))
    assert not storage.exists(f"{data_dir}/.locks/synthetic_sounds-small.lock")
    cfg = lambda: micro_config(data_dir, "msm_mae", "random", total_steps=8)  # noqa: E731

    ref = f"{gcs}/runs/ref"
    train_lib.train(cfg(), ref, progress=False)
    assert [r["step"] for r in _metrics(ref)] == list(range(1, 9))
    assert storage.exists(f"{ref}/config.json") and storage.listdir(f"{ref}/tensorboard")

    termed = f"{gcs}/runs/termed"   # SIGTERM at step 6: a checkpoint there, then a resume
    script = CHILD.format(repo=REPO, data_dir=data_dir, workdir=termed)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, timeout=600)
    assert res.returncode == 0 and "summary 6 6" in res.stdout, res.stderr[-2000:]
    assert storage.isdir(f"{termed}/checkpoints/6")
    assert not storage.exists(f"{termed}/.lock")
    summary = train_lib.train(cfg(), termed, progress=False)
    assert summary["start_step"] == 6 and summary["final_step"] == 8
    want = read_params(ref)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(read_params(termed))):
        np.testing.assert_array_equal(a, b)   # bitwise where the undisturbed run ends
    assert [r["step"] for r in _metrics(termed)] == list(range(1, 9))

    _damage_largest_object(f"{termed}/checkpoints/8/state")   # falls back to step 6
    summary = train_lib.train(cfg(), termed, progress=False)
    assert summary["start_step"] == 6 and summary["final_step"] == 8
    assert storage.isdir(f"{termed}/checkpoints/8.damaged")
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(read_params(termed))):
        np.testing.assert_array_equal(a, b)

    res = subprocess.run([sys.executable, "eval.py", f"--workdir={termed}",
                          f"--data_dir={data_dir}", "--tasks=synthetic_sounds/small"],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads(storage.read_text(f"{termed}/eval/results.json"))
    assert results["step"] == 8 and results["workdir"] == termed

    card = export.export(termed, f"{gcs}/export", fmt="npz", log=lambda *_: None)
    assert storage.isfile(card["path"]) and storage.isfile(f"{gcs}/export/model_card.json")
    convert.convert(card["path"], f"{gcs}/converted", log=lambda *_: None)
    back = read_params(f"{gcs}/converted")
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(back)):
        np.testing.assert_allclose(a, b, rtol=0, atol=0)
    assert not os.path.exists(os.path.join(REPO, "gs:"))
