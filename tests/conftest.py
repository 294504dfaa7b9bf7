import os
import shutil
import time

import pytest

from hypothesis import HealthCheck, settings

# Every new grid shape compiles, so examples are few but each is a whole batch of masks.
settings.register_profile(
    "ci", max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "10")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow], derandomize=True, print_blob=True)
settings.register_profile("thorough", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# The fast tier's goal on 2 cores: its time is printed after each run, so drift is seen.
FAST_TIER_GOAL_S = 300
_STARTED = [0.0]


def pytest_sessionstart(session):
    _STARTED[0] = time.perf_counter()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.getoption("markexpr") == "not slow" and not hasattr(config, "workerinput"):
        spent = time.perf_counter() - _STARTED[0]
        verdict = "within" if spent <= FAST_TIER_GOAL_S else "OVER"
        terminalreporter.write_line(f"fast tier: {spent / 60:.1f} min, {verdict} its goal of "
                                    f"{FAST_TIER_GOAL_S / 60:.0f} min (docs/testing.md)")


@pytest.fixture(scope="session")
def _micro_run(synthetic_small, tmp_path_factory):
    """A micro MSM-MAE run of 4 steps (random masks), trained once per test process."""
    from dwm_jax import train
    from tests.helpers import micro_config
    workdir = str(tmp_path_factory.mktemp("micro_run"))
    train.train(micro_config(synthetic_small[0], "msm_mae", "random", total_steps=4), workdir,
                progress=False)
    return workdir


@pytest.fixture(scope="module")
def trained_run(_micro_run, tmp_path_factory):
    """A copy of the session's micro run for this module (its evaluations write into it)."""
    workdir = str(tmp_path_factory.mktemp("run") / "run")
    shutil.copytree(_micro_run, workdir)
    return workdir


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory):
    """The 'small' synthetic_sounds config (96/24/48 clips), built once per test process."""
    from dwm_jax import data

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builder = data.build("synthetic_sounds", data_dir, config="small")
    return data_dir, builder
