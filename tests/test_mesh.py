"""The mesh a pod needs: named axes (slice, data, fsdp), parameter sharding by rules, the
batch over every axis; on 8 simulated CPU devices the step matches one device on every
mesh, and a checkpoint written on one mesh resumes on another."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from dwm_jax import config as config_lib
from dwm_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rules_are_read_and_bad_ones_named():
    (pattern, entries), = sharding.parse_rules(["blocks.*kernel=None, fsdp"])
    assert pattern.search("params/encoder/blocks/0/fc1/kernel") and entries == (None, "fsdp")
    for bad in ("no_equals_sign", "x=model", "(=fsdp"):
        with pytest.raises(ValueError, match="sharding rule"):
            sharding.parse_rules([bad])
    cfg = config_lib.base()
    cfg.mesh.rules = ("x=tensor",)
    with pytest.raises(config_lib.ConfigError, match=r"config.mesh.rules holds a rule"):
        config_lib.check(cfg)


def test_a_mesh_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match=r"1 devices do not divide into 1 slice\(s\) x data "
                       r"x fsdp 2"):
        sharding.make_mesh(1, fsdp=2)


def test_the_default_mesh_is_one_data_axis():
    mesh = sharding.make_mesh(1)
    assert mesh.axis_names == ("data",)
    assert sharding.batch_sharding(mesh).spec == jax.sharding.PartitionSpec("data")


EIGHT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {repo!r})
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from dwm_jax import build, sharding
    from dwm_jax.train import step as step_lib
    from tests.helpers import micro_config
    cfg = micro_config({data_dir!r}, "m2d", "dispersion")
    setup = build.make_setup(cfg, steps_per_epoch=2, total_steps=10)
    x = np.asarray(jax.random.normal(jax.random.key(3), (8, 80, 64)))
    rule = ("blocks/.*/fc1/kernel=fsdp,None",)
    meshes = [("one", dict(num_devices=1), ()), ("fsdp4", dict(fsdp=4), ()),
              ("slices2_fsdp2", dict(slices=2, fsdp=2), ()), ("rules", dict(fsdp=4), rule)]
    for name, kw, rules in meshes:
        mesh = sharding.make_mesh(kw.pop("num_devices", None), **kw)
        abstract = build.abstract_state(setup, 0)
        sh = sharding.state_shardings(abstract, mesh, rules=rules, fsdp_min_size=64)
        state = jax.jit(lambda: build.init_state(setup, 0), out_shardings=sh)()
        fn = step_lib.jit_train_step(setup, sh, mesh)
        xs = sharding.global_batch_array(x, mesh)
        for _ in range(2):
            state, m = fn(state, xs)
        fc1 = state["params"]["encoder"]["blocks"][0]["fc1"]["kernel"]
        specs = dict(mesh=dict(mesh.shape), batch=str(xs.sharding.spec),
                     fc1=str(fc1.sharding.spec),
                     sharded=sum(not l.sharding.is_fully_replicated
                                 for l in jax.tree.leaves(state["params"])))
        print("specs", name, json.dumps(specs))
        np.savez(os.path.join({out!r}, name + ".npz"),
                 *[np.asarray(l) for l in jax.tree.leaves(state["params"])],
                 loss=np.asarray(m["loss"]))
    print("ok", jax.device_count())
""")


@pytest.mark.slow
def test_every_mesh_matches_one_device_on_8_devices(synthetic_small, tmp_path):
    res = subprocess.run([sys.executable, "-c", EIGHT.format(
        repo=REPO, data_dir=synthetic_small[0], out=str(tmp_path))],
        capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and "ok 8" in res.stdout, res.stderr[-3000:]
    specs = {line.split()[1]: json.loads(line.split(" ", 2)[2])
             for line in res.stdout.splitlines() if line.startswith("specs")}
    assert specs["fsdp4"]["mesh"] == {"data": 2, "fsdp": 4}
    assert specs["fsdp4"]["batch"] == "P(('data', 'fsdp'),)"
    assert specs["slices2_fsdp2"]["mesh"] == {"slice": 2, "data": 2, "fsdp": 2}
    assert specs["fsdp4"]["sharded"] > 0 and specs["one"]["sharded"] == 0
    # fc1's kernel [64, 256]: by default its largest dimension, by the rule its first
    assert specs["fsdp4"]["fc1"] == "P(None, 'fsdp')"
    assert specs["rules"]["fc1"] == "P('fsdp', None)"
    one = np.load(tmp_path / "one.npz")
    for other in ("fsdp4", "slices2_fsdp2", "rules"):
        got = np.load(tmp_path / f"{other}.npz")
        for k in one.files:   # the tolerance of the 1-D mesh's equivalence test
            np.testing.assert_allclose(got[k], one[k], rtol=1e-5, atol=5e-6,
                                       err_msg=f"{other}: {k}")


RESHARD = textwrap.dedent("""
    import os, signal, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {repo!r})
    import jax, numpy as np
    from dwm_jax import data
    from dwm_jax import train as train_lib
    from tests.helpers import micro_config, read_params
    kw = dict(total_steps=8, ckpt_every=4)
    train_lib.train(micro_config({data_dir!r}, **kw), {ref!r}, progress=False)
    calls = [0]
    original = data.DevicePrefetcher.__next__
    def stopping(self):            # SIGTERM as the batch of step 3 is handed out
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)
    data.DevicePrefetcher.__next__ = stopping
    cut = train_lib.train(micro_config({data_dir!r}, **kw), {cut!r}, progress=False)
    data.DevicePrefetcher.__next__ = original
    print("stopped at", cut["preempted_at"])
    again = train_lib.train(micro_config({data_dir!r}, **kw, **{{"mesh.fsdp": 4}}), {cut!r},
                            progress=False)
    print("resumed from", again["start_step"], "to", again["final_step"])
    leaf = again["state"]["params"]["encoder"]["blocks"][0]["fc1"]["kernel"]
    print("mesh", dict(leaf.sharding.mesh.shape), "replicated", leaf.sharding.is_fully_replicated)
    for a, b in zip(jax.tree.leaves(read_params({ref!r})), jax.tree.leaves(read_params({cut!r}))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-6)
    print("ok")
""")


@pytest.mark.slow
def test_a_checkpoint_written_on_one_mesh_resumes_on_another(synthetic_small, tmp_path):
    """8 devices: stopped on the 1-D data mesh, resumed on data 2 x fsdp 4 (Orbax reshards
    the state on restore); it ends where an uninterrupted 1-D run ends."""
    res = subprocess.run([sys.executable, "-c", RESHARD.format(
        repo=REPO, data_dir=synthetic_small[0], ref=str(tmp_path / "ref"),
        cut=str(tmp_path / "cut"))], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and "ok" in res.stdout.split(), res.stderr[-3000:]
    assert "stopped at 3" in res.stdout and "resumed from 3 to 8" in res.stdout, res.stdout
    assert "mesh {'data': 2, 'fsdp': 4} replicated False" in res.stdout, res.stdout
