"""Checks the structure of the package from its source (no import is executed):

* layers: each module imports only from the layers below it (``LAYERS``); the masking
  module imports nothing of the package;
* no import cycle among the package's modules;
* no function-local import of a package module (an import hidden to dodge a cycle);
* no function longer than ``MAX_FUNCTION_LINES``;
* no import of the repository's ``configs`` from the package, and no ``sys.path`` edit in
  the package or the benchmarks.

    python tools/check_house.py          # prints each violation; exit 1 if any
"""

from __future__ import annotations

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "dwm_jax"
MAX_FUNCTION_LINES = 120

CORE = ("_extras", "errors", "normalisation", "masking", "models", "objectives", "config",
        "build", "checkpointing", "weights", "sharding", "profiling", "audio",
        "torch_layout", "locks", "cli", "serving", "topologies", "storage")
# layer -> (its modules, by first component under dwm_jax; the layers it may import)
LAYERS = {
    "masking": (("masking",), ()),
    "core": (CORE, ("core",)),
    "data": (("data",), ("core", "data")),
    "train": (("train",), ("core", "data", "train")),
    "compile": (("aot", "compile"), ("core", "data", "train", "compile")),
    "eval": (("embedding", "probe", "finetune", "sed"), ("core", "data", "eval")),
    "hear": (("hear",), ("core", "eval", "hear")),
    "convert": (("convert", "export"), ("core", "convert")),
    "plots": (("plots",), ("core", "plots")),
    "suite": (("suite",), ("core", "data", "eval", "suite")),
    "study": (("study",), ("core", "data", "train", "eval", "suite", "study")),
}


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return "package"
    if parts[1] == "masking":
        return "masking"
    for layer, (members, _) in LAYERS.items():
        if parts[1] in members:
            return layer
    return "unlisted"


def imports(tree: ast.AST, module: str):
    """(imported module, line, inside a function?) for every import of the package."""
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                base = child.module
                if child.level:
                    base = ".".join(module.split(".")[:-child.level] + [child.module])
                out.append((base, child.lineno, in_function))
                out.extend((f"{base}.{a.name}", child.lineno, in_function)
                           for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return out


def python_files(folder: str):
    for root, _, files in os.walk(os.path.join(ROOT, folder)):
        yield from (os.path.join(root, f) for f in sorted(files) if f.endswith(".py"))


def check() -> list[str]:
    problems, graph = [], {}
    known = {module_name(p) for p in python_files(PACKAGE)}
    for path in python_files(PACKAGE):
        module, rel = module_name(path), os.path.relpath(path, ROOT)
        tree = ast.parse(open(path).read(), rel)
        layer = layer_of(module)
        if layer == "unlisted":
            problems.append(f"{rel}: module in no layer (tools/check_house.py LAYERS)")
        allowed = LAYERS.get(layer, ((), ()))[1] + ("masking",)
        graph[module] = set()
        for name, line, local in imports(tree, module):
            if name == "configs" or name.startswith("configs."):
                problems.append(f"{rel}:{line}: imports the repository's configs")
            target = name if name in known else None
            if target is None or target == module:
                continue
            if local:
                problems.append(f"{rel}:{line}: function-local import of {target}")
            graph[module].add(target)
            theirs = layer_of(target)
            if layer == "masking" or (layer in LAYERS and theirs not in allowed
                                      and theirs != "package"):
                problems.append(f"{rel}:{line}: {layer} layer imports {target} ({theirs})")
        problems += long_functions(tree, rel)
    problems += cycles(graph)
    for folder in (PACKAGE, "benchmarks"):
        for path in python_files(folder):
            if "sys.path" in open(path).read():
                problems.append(f"{os.path.relpath(path, ROOT)}: edits sys.path")
    return problems


def long_functions(tree, rel: str) -> list[str]:
    return [f"{rel}:{n.lineno}: {n.name} has {n.end_lineno - n.lineno + 1} lines "
            f"(at most {MAX_FUNCTION_LINES})" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every import cycle, once, as 'a -> b -> a' (a module importing its own package's
    ``__init__`` does not count: Python runs the package first)."""
    found, state, stack = set(), {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if m.startswith(n + "."):
                continue
            if state.get(n) == "open":
                loop = stack[stack.index(n):]
                start = loop.index(min(loop))
                found.add(" -> ".join(loop[start:] + loop[:start] + [min(loop)]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return [f"import cycle: {c}" for c in sorted(found)]


if __name__ == "__main__":
    problems = check()
    for p in problems:
        print(p)
    print(f"check_house: {len(problems)} problem(s)")
    sys.exit(1 if problems else 0)
