"""Config validation: every impossible value is refused at start, naming the field, before
anything is compiled or written; train.py turns it into one line and exit code 2."""

import os
import subprocess
import sys

import pytest
from dwm_jax import cli
from dwm_jax import config as config_lib
from dwm_jax import train as train_lib

from configs import demo, m2d, msm_mae, transfer, transfer_long
from dwm_jax import masking
from tests.helpers import micro_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", [demo, m2d, msm_mae, transfer, transfer_long])
def test_every_shipped_config_is_valid(module):
    for masker in masking.MASKERS:
        config_lib.check(module.get_config(masker))


@pytest.mark.parametrize("field,value,match", [
    ("optim.base_lr", -1e-3, r"config.optim.base_lr must be > 0"),
    ("total_steps", -5, r"config.total_steps must be >= 0"),
    ("ckpt_every", 0, r"config.ckpt_every must be >= 1"),
    ("log_every", 0, r"config.log_every must be >= 1"),
    ("batch_size", 0, r"config.batch_size must be >= 1"),
    ("keep_ckpts", 0, r"config.keep_ckpts must be >= 1"),
    ("epochs", 0, r"config.epochs must be >= 1"),
    ("model.size", "huge", r"config.model.size must be one of"),
    ("model.size", "64x2", r"config.model.size must be one of .*DIMxDEPTHxHEADS"),
    ("profile_steps", "5:2", r"config.profile_steps expected 0 <= A < B"),
    ("model.attention", "cudnn", r"config.model.attention='cudnn' needs an NVIDIA GPU"),
    ("model.remat", "some", r"config.model.remat must be one of"),
    ("model.scan_layers", "yes", r"config.model.scan_layers must be True or False"),
    ("data.prefetch", -1, r"config.data.prefetch must be >= 0"),
    ("init_from", 3, r"config.init_from must be a string"),
    ("model.compute_dtype", "fp8", r"config.model.compute_dtype must be one of"),
    ("objective.name", "mae", r"config.objective.name must be one of"),
    ("objective.ema_start", 1.0, r"config.objective.ema_start must be < 1.0"),
    ("objective.target_mode", "copy", r"config.objective.target_mode"),
    ("masking.mask_ratio", 1.0, r"config.masking.mask_ratio must be < 1.0"),
    ("masking.name", "nope", r"config.masking.name must be one of"),
    ("masking.hint.mode", "linear", r"config.masking.hint.mode"),
    ("optim.b2", 1.5, r"config.optim.b2 must be < 1.0"),
    ("optim.clip", 0.0, r"config.optim.clip must be > 0"),
    ("optim.weight_decay", float("nan"), r"config.optim.weight_decay must be a finite"),
    ("data.worker_count", -1, r"config.data.worker_count must be >= 0"),
    ("model.input_shape", (80, 100), r"not a whole number of 16 x 16 patches"),
    ("model.decoder", dict(dim=30, depth=1, heads=4), r"decoder.dim 30 must divide"),
    ("model.decoder", dict(dim=32, depth=0, heads=2), r"decoder.depth must be an integer"),
    ("masking.options", dict(deterministic="no"), r"deterministic must be True or False"),
    ("masking.options", dict(temperature=2.0), r"config.masking: bad option"),
])
def test_bad_values_name_the_field(field, value, match):
    cfg = micro_config("data")
    node = cfg
    *path, last = field.split(".")
    for p in path:
        node = node[p]
    with node.ignore_type():
        node[last] = value
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.check(cfg)


def test_unknown_and_missing_fields_are_named():
    cfg = micro_config("data")
    cfg.unlock()
    cfg.optim.lr = 1e-3                              # a typo for base_lr in a config file
    with pytest.raises(config_lib.ConfigError, match=r"unknown field\(s\) config.optim.lr"):
        config_lib.check(cfg)
    cfg = micro_config("data")
    del cfg.optim["clip"]
    with pytest.raises(config_lib.ConfigError, match=r"lacks field\(s\) config.optim.clip"):
        config_lib.check(cfg)


@pytest.mark.parametrize("override,match", [
    ("--config.optim.base_lr=-0.001", "config.optim.base_lr must be > 0"),
    ("--config.foo=1", "--config.foo: the config has no field 'foo'"),
    ("--config.batch_size=abc", "--config.batch_size=abc"),
    ("--config.data.name=audio_folder/none_here", "config.data (name='audio_folder/none_here'"),
    ("--config.data.name=nonsense", "dataset name must look like 'builder/config'"),
])
def test_train_cli_refuses_in_one_line_and_writes_nothing(tmp_path, override, match):
    workdir = tmp_path / "w"
    res = subprocess.run([sys.executable, "train.py", "--config=configs/demo.py",
                          f"--workdir={workdir}", override],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error:"), res.stderr[-2000:]
    assert match in lines[0]
    assert not workdir.exists()


@pytest.mark.parametrize("argv,message", [
    (["--config.model.input_shape=80,96", "--config.model.input_shape=80,100"],
     "--config.model.input_shape is given more than once; give it once"),
    (["--config.seed=1", "--config.seed=2"], "--config.seed is given more than once; give it once"),
])
def test_an_override_given_twice_is_refused(argv, message, capsys):
    parse = cli.flags_parser("train.py")
    with pytest.raises(SystemExit) as e:
        parse(["train.py", "--config=configs/demo.py", *argv])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"train.py: error: {message}\n"


@pytest.mark.parametrize("flag,field", [("--config.model.foo", "model.foo"),
                                        ("--config.model.foo.bar", "model.foo"),
                                        ("--config.foo.bar", "foo")])
def test_an_unknown_nested_field_is_named_as_given(flag, field, capsys):
    cli._unknown_field("train.py", KeyError("foo"), ["train.py", f"{flag}=1"], ("config",))
    assert capsys.readouterr().err == (f"train.py: error: {flag}: the config has no field "
                                       f"{field!r}\n")


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    with pytest.raises(config_lib.ConfigError, match="is a file, not a directory"):
        train_lib.train(micro_config(str(tmp_path / "no_data")), str(path), progress=False)
    assert path.read_text() == "keep me"


@pytest.mark.parametrize("args,match", [
    (["--finetune.foo=1"], "--finetune.foo: the config has no field 'foo'"),
    (["--finetune.epochs=0"], "--finetune.epochs must be >= 1; got 0"),
    (["--finetune.patience=0"], "--finetune.patience must be >= 1; got 0"),
    (["--finetune.batch_size=-4"], "--finetune.batch_size must be >= 1; got -4"),
    (["--finetune.lr=abc"], "--finetune.lr=abc"),
    (["--step=abc"], "--step=abc"),
    (["--bogus=1"], "Unknown command line flag 'bogus'"),
])
def test_eval_cli_refuses_bad_flags_in_one_line_and_writes_nothing(tmp_path, args, match):
    workdir = tmp_path / "w"
    res = subprocess.run([sys.executable, "eval.py", f"--workdir={workdir}", "--mode=both",
                          *args], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval.py: error:"), res.stderr[-2000:]
    assert match in lines[0]
    assert not workdir.exists()


def test_the_finetune_recipe_is_the_schema_and_checked_like_training():
    recipe = config_lib.finetune_base()
    config_lib.check_finetune(recipe)
    assert set(recipe) == {f.path for f in config_lib.FINETUNE_FIELDS}
    recipe.mixup = float("nan")
    with pytest.raises(config_lib.ConfigError, match="--finetune.mixup must be a finite"):
        config_lib.check_finetune(recipe)


def test_a_bad_init_from_leaves_no_workdir_behind(synthetic_small, tmp_path):
    (tmp_path / "empty_run").mkdir()
    for source in (tmp_path / "nowhere", tmp_path / "empty_run"):
        cfg = micro_config(synthetic_small[0], init_from=str(source))
        with pytest.raises(train_lib.USER_ERRORS, match="no checkpoints there"):
            train_lib.train(cfg, str(tmp_path / "w"), progress=False)
        assert not (tmp_path / "w").exists()
