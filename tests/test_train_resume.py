"""Resuming: exact after SIGKILL, SIGTERM saves first, another run or host count is refused,
checkpoints from before new config fields resume, damaged checkpoints fall back to the
newest intact one."""

import glob
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from dwm_jax import checkpointing
from dwm_jax import config as config_lib
from dwm_jax import train as train_lib
from tests.helpers import (damage_largest_state_file, micro_config, read_metrics,
                           read_params)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from dwm_jax import data
    from dwm_jax import train as train_lib
    from tests.helpers import micro_config
    cfg = micro_config({data_dir!r})
    calls = [0]
    original = data.DevicePrefetcher.__next__
    def counting(self):  # the signal arrives as the batch of step {at_call} is handed out
        calls[0] += 1
        if calls[0] == {at_call}:
            os.kill(os.getpid(), getattr(signal, {sig!r}))
        return original(self)
    data.DevicePrefetcher.__next__ = counting
    summary = train_lib.train(cfg, {workdir!r}, progress=False)
    print("summary", summary.get("preempted_at"), summary["final_step"])
""")


def _child(synthetic_small, workdir, sig, at_call):
    script = CHILD.format(repo=REPO, data_dir=synthetic_small[0], workdir=str(workdir),
                          sig=sig, at_call=at_call)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO)


@pytest.mark.slow
def test_sigkill_then_resume_is_exact_and_sigterm_saves(synthetic_small, tmp_path):
    ref = tmp_path / "ref"
    train_lib.train(micro_config(synthetic_small[0]), str(ref), progress=False)

    killed = tmp_path / "killed"
    res = _child(synthetic_small, killed, "SIGKILL", at_call=11)  # after checkpoint 8
    assert res.returncode == -9, res.stderr[-2000:]
    ckpt = checkpointing.Checkpointer(str(killed))
    resumed_from = ckpt.latest_step()
    ckpt.close()
    assert resumed_from in (4, 8)  # the async save of step 8 may still be in flight
    logged = [json.loads(line)["step"] for line in open(killed / "metrics.jsonl")]
    assert max(logged) > resumed_from  # the killed run logged steps past its checkpoint
    summary = train_lib.train(micro_config(synthetic_small[0]), str(killed), progress=False)
    assert summary["start_step"] == resumed_from and summary["final_step"] == 12
    logged = [json.loads(line)["step"] for line in open(killed / "metrics.jsonl")]
    assert logged == list(range(1, 13))  # each step once, in order, after the resume

    want, got = read_params(ref), read_params(killed)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)  # bitwise
    m_ref, m_got = read_metrics(ref), read_metrics(killed)
    assert [m_ref[s]["data_crc32"] for s in range(1, 13)] == [
        m_got[s]["data_crc32"] for s in range(1, 13)]  # the same data order
    assert [m_ref[s]["loss"] for s in range(1, 13)] == [m_got[s]["loss"] for s in range(1, 13)]

    termed = tmp_path / "termed"
    res = _child(synthetic_small, termed, "SIGTERM", at_call=6)
    assert res.returncode == 0 and "summary 6 6" in res.stdout, res.stderr[-2000:]
    assert os.path.isdir(termed / "checkpoints" / "6")
    train_lib.train(micro_config(synthetic_small[0]), str(termed), progress=False)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(read_params(termed))):
        np.testing.assert_array_equal(a, b)

    # a first Ctrl-C behaves like SIGTERM: a checkpoint at the step, then a clean stop
    interrupted = tmp_path / "ctrl_c"
    res = _child(synthetic_small, interrupted, "SIGINT", at_call=5)
    assert res.returncode == 0 and "summary 5 5" in res.stdout, res.stderr[-2000:]
    assert os.path.isdir(interrupted / "checkpoints" / "5")


@pytest.mark.slow
def test_resume_with_another_number_of_hosts_is_refused_and_says_what_to_do(synthetic_small,
                                                                           tmp_path):
    """A checkpoint written by 2 processes (its meta says so) is not resumed by 1: the data
    iterator state is per host. It is refused with the way out, and left where it is."""
    train_lib.train(micro_config(synthetic_small[0], total_steps=4), str(tmp_path),
                  progress=False)
    path = tmp_path / "checkpoints" / "4" / "meta" / "metadata"
    meta = json.load(open(path))
    assert meta["processes"] == 1
    meta["processes"] = 2
    json.dump(meta, open(path, "w"))
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=r"written by 2 process\(es\) and this run has 1.*init_from="):
        train_lib.train(micro_config(synthetic_small[0], total_steps=8), str(tmp_path),
                      progress=False)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]  # not moved aside


@pytest.mark.slow
def test_checkpoints_from_before_new_config_fields_still_resume(synthetic_small, tmp_path):
    """A checkpoint whose config predates fields added since (those with a legacy value in
    the config schema) resumes under those values, which behave as runs did before them."""
    import shutil
    train_lib.train(micro_config(synthetic_small[0], total_steps=8), str(tmp_path),
                  progress=False)
    shutil.rmtree(tmp_path / "checkpoints" / "8")
    path = tmp_path / "checkpoints" / "4" / "meta" / "metadata"
    meta = json.load(open(path))
    for field in [f.path for f in config_lib.FIELDS if f.has_legacy]:
        node = meta["config"]
        *parents, last = field.split(".")
        for p in parents:
            node = node[p]
        del node[last]
    json.dump(meta, open(path, "w"))
    summary = train_lib.train(micro_config(synthetic_small[0], total_steps=8), str(tmp_path),
                            progress=False)
    assert summary["start_step"] == 4 and summary["final_step"] == 8
    assert not os.path.exists(tmp_path / "config_changes.jsonl")


@pytest.mark.slow
def test_checkpoint_of_another_model_fails_clearly(synthetic_small, tmp_path):
    train_lib.train(micro_config(synthetic_small[0], total_steps=4), str(tmp_path),
                  progress=False)
    other = micro_config(synthetic_small[0], total_steps=8)
    other.model.decoder = dict(dim=64, depth=1, heads=2)
    with pytest.raises(checkpointing.CheckpointMismatchError, match="config.model"):
        train_lib.train(other, str(tmp_path), progress=False)
    other = micro_config(synthetic_small[0], "msm_mae", total_steps=8)
    with pytest.raises(checkpointing.CheckpointMismatchError, match="config.objective"):
        train_lib.train(other, str(tmp_path), progress=False)


def _tiny_folder_dataset(root, data_dir, seed):
    """8 one-second noise clips as audio_folder/tiny under data_dir (content set by seed)."""
    import soundfile

    from dwm_jax import data
    clips = root / f"clips{seed}"
    clips.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(8):
        soundfile.write(str(clips / f"{i}.wav"),
                        (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
    data.build("audio_folder", data_dir, config=data.audio_folder_config(
        "tiny", audio_dir=str(clips)))


@pytest.mark.slow
def test_resume_refuses_another_run_and_records_accepted_changes(synthetic_small, tmp_path,
                                                                 caplog):
    """A resumed run with another masker, ratio, batch or dataset would silently become
    another run: refused, naming the field. Logging and checkpoint cadence may change: the
    change is recorded and config.json follows it."""
    workdir = str(tmp_path / "w")
    train_lib.train(micro_config(synthetic_small[0], total_steps=4), workdir, progress=False)
    for overrides, field in [({"masking.name": "random", "masking.hint.mode": "none",
                               "masking.options": {}}, "config.masking.name"),
                             ({"masking.mask_ratio": 0.6}, "config.masking.mask_ratio"),
                             ({"batch_size": 4}, "config.batch_size"),
                             ({"total_steps": 8}, "config.total_steps")]:
        with pytest.raises(checkpointing.CheckpointMismatchError, match=field):
            train_lib.train(micro_config(synthetic_small[0], **{"total_steps": 4, **overrides}),
                          workdir, progress=False)
    summary = train_lib.train(micro_config(synthetic_small[0], total_steps=4, log_every=2,
                                         ckpt_every=2), workdir, progress=False)
    assert summary["start_step"] == 4
    changes = [json.loads(line) for line in open(os.path.join(workdir,
                                                              "config_changes.jsonl"))]
    assert {(c["field"], c["checkpoint"], c["now"]) for c in changes} == {
        ("log_every", 1, 2), ("ckpt_every", 4, 2)}
    assert json.load(open(os.path.join(workdir, "config.json")))["log_every"] == 2
    # config.json edited by hand: the run resumes with the checkpoint's values and says so
    path = os.path.join(workdir, "config.json")
    edited = json.load(open(path))
    in_force, edited["masking"]["mask_ratio"] = edited["masking"]["mask_ratio"], 0.9
    json.dump(edited, open(path, "w"))
    with caplog.at_level("WARNING"):
        train_lib.train(micro_config(synthetic_small[0], total_steps=4, log_every=2,
                                     ckpt_every=2), workdir, progress=False)
    assert json.load(open(path))["masking"]["mask_ratio"] == in_force != 0.9
    assert "config.json differed from the config this run resumes with (masking.mask_ratio)" \
        in caplog.text

    # the same name and clip count, other audio: refused; the same build moved: accepted
    one, two = str(tmp_path / "d1"), str(tmp_path / "d2")
    _tiny_folder_dataset(tmp_path, one, seed=1)
    _tiny_folder_dataset(tmp_path, two, seed=2)
    run = str(tmp_path / "r")
    kw = {"data.name": "audio_folder/tiny", "total_steps": 2}
    train_lib.train(micro_config(one, **kw), run, progress=False)
    with pytest.raises(checkpointing.CheckpointMismatchError, match="the built dataset"):
        train_lib.train(micro_config(two, **kw), run, progress=False)
    moved = str(tmp_path / "moved")
    os.rename(one, moved)                            # the same build in another place
    assert train_lib.train(micro_config(moved, **kw), run, progress=False)["start_step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["bytes", "missing_file", "silent_value_change",
                                    "edited_iterator_state"])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact(synthetic_small, tmp_path,
                                                                   damage):
    """Flipped bytes or a lost file in the latest checkpoint: the resume names it, moves it
    aside and continues from the previous one, ending where an undisturbed run ends."""
    import shutil
    cfg = lambda: micro_config(synthetic_small[0], total_steps=8)  # noqa: E731
    ref, hurt = tmp_path / "ref", tmp_path / "hurt"
    train_lib.train(cfg(), str(ref), progress=False)
    shutil.copytree(ref, hurt)
    step8 = hurt / "checkpoints" / "8"
    if damage == "bytes":
        damage_largest_state_file(str(step8))
    elif damage == "missing_file":
        os.remove(os.path.join(step8, "meta", "metadata"))
    elif damage == "edited_iterator_state":  # valid, but not the state saved with step 8
        path, = glob.glob(os.path.join(step8, "data", "*.json"))
        state = json.load(open(path))
        state["last_seen_indices"] = {k: v - 2 for k, v in state["last_seen_indices"].items()}
        json.dump(state, open(path, "w"))
    else:  # values that read back fine but are not what was saved: only the fingerprint knows
        path = os.path.join(step8, "meta", "metadata")
        meta = json.load(open(path))
        meta["fingerprint"]["opt_state/1/0/mu/encoder/cls_token"] ^= 1
        json.dump(meta, open(path, "w"))
    with open(hurt / "metrics.jsonl") as f:
        assert len(f.readlines()) == 8
    summary = train_lib.train(cfg(), str(hurt), progress=False)
    assert summary["start_step"] == 4 and summary["final_step"] == 8
    assert os.path.isdir(hurt / "checkpoints" / "8.damaged")
    ours, theirs = read_params(str(ref)), read_params(str(hurt))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(a, b)
    if damage == "bytes":  # the same step damaged a second time: moved aside beside the first
        damage_largest_state_file(str(step8))
        summary = train_lib.train(cfg(), str(hurt), progress=False)
        assert summary["start_step"] == 4 and summary["final_step"] == 8
        assert os.path.isdir(hurt / "checkpoints" / "8.damaged.2")


@pytest.mark.slow
def test_all_checkpoints_damaged_is_a_clear_error(synthetic_small, tmp_path):
    cfg = micro_config(synthetic_small[0], total_steps=4)
    train_lib.train(cfg, str(tmp_path), progress=False)
    damage_largest_state_file(str(tmp_path / "checkpoints" / "4"))
    with pytest.raises(checkpointing.CheckpointDamagedError, match="no intact checkpoint"):
        train_lib.train(cfg, str(tmp_path), progress=False)
