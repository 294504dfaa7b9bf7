"""Exclusive locks: a second training run in one workdir, or a second build of one dataset,
is refused at once naming the holder, writing nothing; a lock file left by a process that
no longer runs is taken over, saying so."""

import logging
import os
import subprocess
import sys

import pytest

from dwm_jax import data, locks
from dwm_jax import train as train_lib
from tests.helpers import micro_config


def test_a_held_lock_refuses_a_second_holder_and_frees_on_exit(tmp_path):
    path = str(tmp_path / "d" / ".lock")
    with locks.exclusive(path, "the first"):
        with pytest.raises(locks.LockedError, match=r"in use by \d+ \(the first\)"):
            with locks.exclusive(path, "the second"):
                pass
    with locks.exclusive(path, "the second"):  # released
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over_saying_so(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    path = tmp_path / ".lock"
    path.write_text(f"{dead} (a killed run)")
    with caplog.at_level(logging.WARNING):
        with locks.exclusive(str(path), "a new run"):
            assert path.read_text() == f"{os.getpid()} (a new run)"
    assert f"took over the lock left by {dead} (a killed run)" in caplog.text


def test_a_second_training_run_in_a_workdir_is_refused_writing_nothing(synthetic_small,
                                                                      tmp_path):
    workdir = tmp_path / "run"
    with locks.exclusive(str(workdir / ".lock"), "a training run"):
        with pytest.raises(locks.LockedError, match=rf"{workdir} is in use by \d+"):
            train_lib.train(micro_config(synthetic_small[0], total_steps=2), str(workdir),
                            progress=False)
    assert sorted(os.listdir(workdir)) == [".lock"]
    assert locks.LockedError in train_lib.USER_ERRORS


def test_a_run_that_stops_before_writing_leaves_no_workdir(tmp_path):
    cfg = micro_config(str(tmp_path / "no_data"), total_steps=2)
    with pytest.raises(train_lib.USER_ERRORS, match="config.data"):
        train_lib.train(cfg, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_second_build_of_a_dataset_is_refused(tmp_path):
    lock = tmp_path / ".locks" / "synthetic_sounds-small.lock"
    with locks.exclusive(str(lock), "a build"):
        with pytest.raises(locks.LockedError, match=r"synthetic_sounds/small in .* in use"):
            data.build("synthetic_sounds", str(tmp_path), config="small")
    assert not (tmp_path / "synthetic_sounds").exists()
