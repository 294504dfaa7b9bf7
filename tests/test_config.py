"""The config schema: one declaration per field drives the base config, validation, the
resume policy, legacy checkpoints and the reference; the recipes give the configs the
previous release wrote into its workdirs (so those workdirs resume)."""

import json
import os

import pytest

from configs import demo, m2d, msm_mae, transfer, transfer_long
from dwm_jax import config as config_lib
from dwm_jax import masking, objectives

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = dict(demo=demo, transfer=transfer, transfer_long=transfer_long, m2d=m2d,
               msm_mae=msm_mae)


def test_recipes_give_the_configs_the_previous_release_wrote():
    """tests/data/recipes_previous_main.json: each recipe's config as the release before the
    config schema wrote it (config.json and checkpoint meta); equal, once the fields added
    since take their legacy values, means its runs resume."""
    old = json.load(open(os.path.join(REPO, "tests", "data", "recipes_previous_main.json")))
    assert len(old) == 24
    for key, stored in old.items():
        name, arg = key.split(":")
        assert config_lib.to_json_dict(RECIPES[name].get_config(arg)) == \
            config_lib.to_json_dict(config_lib.from_stored(stored)), key


def test_base_has_every_field_once_and_passes_its_own_rules():
    for objective in objectives.OBJECTIVES:
        for masker in masking.MASKERS:
            cfg = config_lib.base(objective, masker)
            assert set(config_lib.flatten(cfg)) == set(config_lib.BY_PATH)
            config_lib.check(cfg)
            assert cfg.masking.mask_ratio == objectives.OBJECTIVES[objective].mask_ratio
            assert dict(cfg.masking.options) == masking.MASKERS[masker].defaults
            assert (cfg.masking.hint.mode == "schedule") == masking.MASKERS[masker].takes_hints
    assert len(config_lib.BY_PATH) == len(config_lib.FIELDS)


def test_unknown_and_missing_fields_are_named():
    cfg = config_lib.base()
    cfg.optim.lr = 1.0
    with pytest.raises(config_lib.ConfigError, match=r"unknown field\(s\) config.optim.lr"):
        config_lib.check(cfg)
    cfg = config_lib.base()
    del cfg.optim["clip"]
    with pytest.raises(config_lib.ConfigError, match=r"lacks field\(s\) config.optim.clip"):
        config_lib.check(cfg)


def test_seed_beyond_32_bits_is_refused():
    cfg = config_lib.base()
    cfg.seed = 2 ** 32
    with pytest.raises(config_lib.ConfigError, match=r"config.seed must be <= 4294967295"):
        config_lib.check(cfg)


def test_resume_policy_comes_from_the_schema():
    old = config_lib.to_json_dict(config_lib.base())
    new = config_lib.to_json_dict(config_lib.base())
    new["log_every"], new["model"]["remat"], new["batch_size"] = 7, "full", 64
    refused, accepted = config_lib.resume_differences(old, new)
    assert [d[0] for d in refused] == ["batch_size"]
    assert sorted(d[0] for d in accepted) == ["log_every", "model.remat"]
    resumable = {f.path for f in config_lib.FIELDS if f.resumable}
    assert "probe.name" in resumable and "masking.name" not in resumable


def test_a_stored_config_without_later_fields_reads_as_it_behaved():
    stored = config_lib.to_json_dict(config_lib.base())
    legacy = {f.path: f.legacy for f in config_lib.FIELDS if f.has_legacy}
    assert {"optim.eps", "model.scan_layers", "data.prefetch"} <= set(legacy)
    for path in legacy:
        *parents, last = path.split(".")
        node = stored
        for p in parents:
            node = node[p]
        del node[last]
    cfg = config_lib.from_stored(stored)
    config_lib.check(cfg)
    assert config_lib.resume_differences(stored, config_lib.to_json_dict(config_lib.base())) \
        == ([], [])


def test_reference_lists_every_field_and_the_docs_page_is_current():
    table = config_lib.reference_markdown()
    for f in config_lib.FIELDS:
        assert f"| `{f.path}` |" in table
    page = open(os.path.join(REPO, "docs", "reference", "config.md")).read()
    assert page == config_lib.reference_document(), (
        "docs/reference/config.md is stale: python -m dwm_jax.config > docs/reference/config.md")
