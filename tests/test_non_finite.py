"""Non-finite values are refused wherever weights or features enter, naming the tensor or
clip: the converter, config.init_from, the probe; a float64 check that is NaN fails."""

import os

import numpy as np
import pytest

from dwm_jax import convert, data, probe, weights
from dwm_jax import config as config_lib
from dwm_jax.normalisation import NormStats
from dwm_jax.train import init_from

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "reference")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_the_converter_names_a_non_finite_tensor(tmp_path, capsys, value):
    z = dict(np.load(os.path.join(REF, "m2d_reference.npz")))
    tensors = {k[len("weights/"):]: v for k, v in z.items() if k.startswith("weights/")}
    tensors["blocks.1.attn.qkv.weight"] = tensors["blocks.1.attn.qkv.weight"].copy()
    tensors["blocks.1.attn.qkv.weight"][0, 0] = value
    np.savez(tmp_path / "bad.npz", **tensors)
    assert convert.main([str(tmp_path / "bad.npz"), "--workdir", str(tmp_path / "run")]) == 2
    assert "tensor blocks.1.attn.qkv.weight holds NaN or infinite values" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_init_from_names_a_non_finite_weight():
    encoder = {"blocks": {"0": {"fc1": {"kernel": np.array([[1.0, np.nan]])}}}}
    source = weights.Weights(params={"encoder": encoder}, target={},
                             norm_stats=NormStats(0.0, 1.0), config={}, meta={}, step=7,
                             workdir="runs/a")
    with pytest.raises(config_lib.ConfigError,
                       match=r"init_from='runs/a' \(step 7\): params/encoder/blocks/0/fc1/"
                             r"kernel holds NaN"):
        init_from._check_finite(source)


def test_the_probe_refuses_non_finite_features_and_caches_nothing(synthetic_small, tmp_path):
    split = data.open_split(synthetic_small[0], "synthetic_sounds/small", "test")
    cache = str(tmp_path / "cache" / "test.npz")

    def featurise(log_mel):
        return np.full(4, np.nan, np.float32)

    with pytest.raises(probe.ProbeError, match=r"clip 0 .* hold NaN or infinite values"):
        probe.features_of(split, featurise, cache=cache, desc="small:test encoder")
    assert not os.path.exists(cache)
