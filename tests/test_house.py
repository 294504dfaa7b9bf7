"""The package's structure, measured from its source by tools/check_house.py: layers, no
import cycle, no hidden function-local import, no function over 120 lines."""

import ast
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "check_house", os.path.join(REPO, "tools", "check_house.py"))
house = importlib.util.module_from_spec(spec)
spec.loader.exec_module(house)


def test_the_package_keeps_its_layers_and_has_no_cycle():
    assert house.check() == []


def test_the_checker_finds_a_cycle_and_a_long_function():
    graph = {"dwm_jax.a": {"dwm_jax.b"}, "dwm_jax.b": {"dwm_jax.c"},
             "dwm_jax.c": {"dwm_jax.a"}, "dwm_jax.d": {"dwm_jax.a"}}
    assert house.cycles(graph) == ["import cycle: dwm_jax.a -> dwm_jax.b -> dwm_jax.c -> "
                                   "dwm_jax.a"]
    body = "\n".join(["def f():"] + ["    x = 1"] * 120)
    assert house.long_functions(ast.parse(body), "m.py") == [
        "m.py:1: f has 121 lines (at most 120)"]


def test_the_checker_sees_hidden_and_layer_breaking_imports():
    tree = ast.parse("import os\n\ndef f():\n    from dwm_jax import train\n")
    assert ("dwm_jax.train", 4, True) in house.imports(tree, "dwm_jax.weights")
    assert house.layer_of("dwm_jax.weights") == "core"
    assert "train" not in house.LAYERS["core"][1] and "eval" not in house.LAYERS["train"][1]
