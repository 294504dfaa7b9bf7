"""The documentation cannot rot: every Python snippet of the README and the guides
runs, the README stays a front door (at most 300 lines), its links point at files that
exist, and no internal issue number or fix date is left in the docs."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNABLE = ("README.md", "docs/guides/masking.md")


def snippets(path: str) -> list[str]:
    text = open(os.path.join(REPO, path)).read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("path", [RUNNABLE[0], pytest.param(RUNNABLE[1],
                                                             marks=pytest.mark.slow)])
def test_every_python_snippet_runs(path):
    blocks = snippets(path)
    assert blocks
    for block in blocks:
        exec(compile(block, path, "exec"), {})


@pytest.mark.slow
def test_the_data_and_embedding_snippets_run(synthetic_small, trained_run, tmp_path,
                                             monkeypatch):
    """The guides' snippets that need built data and a trained workdir, run where ``data``
    holds synthetic_sounds (the small build, under the name they use) and
    ``workdirs/demo`` is a trained run."""
    (tmp_path / "data" / "synthetic_sounds").mkdir(parents=True)
    os.symlink(os.path.join(synthetic_small[0], "synthetic_sounds", "small"),
               tmp_path / "data" / "synthetic_sounds" / "default")
    (tmp_path / "workdirs").mkdir()
    os.symlink(trained_run, tmp_path / "workdirs" / "demo")
    monkeypatch.chdir(tmp_path)
    for path in ("docs/guides/datasets.md", "docs/guides/evaluation.md"):
        for block in snippets(path):
            exec(compile(block, path, "exec"), {})


@pytest.mark.slow
def test_the_export_guide_runs(trained_run, tmp_path, monkeypatch):
    """docs/guides/export.md on a trained run named ``workdirs/demo`` (its HEAR snippet needs
    PyTorch, as the API does)."""
    pytest.importorskip("torch", reason="the HEAR snippet needs PyTorch")
    (tmp_path / "workdirs").mkdir()
    os.symlink(trained_run, tmp_path / "workdirs" / "demo")
    monkeypatch.chdir(tmp_path)
    blocks = snippets("docs/guides/export.md")
    assert len(blocks) == 3
    for block in blocks:
        exec(compile(block, "docs/guides/export.md", "exec"), {})
    assert (tmp_path / "exported" / "demo" / "model_card.md").exists()


def test_readme_is_a_front_door():
    assert len(open(os.path.join(REPO, "README.md")).read().splitlines()) <= 300


def _docs_files():
    yield "README.md"
    for root, _, files in os.walk(os.path.join(REPO, "docs")):
        for f in files:
            if f.endswith(".md"):
                yield os.path.relpath(os.path.join(root, f), REPO)


def test_every_link_of_the_docs_points_at_a_file():
    for path in _docs_files():
        text = open(os.path.join(REPO, path)).read()
        for target in re.findall(r"\]\(([^)#\s]+)\)", text):
            if "://" not in target:
                where = os.path.join(REPO, os.path.dirname(path), target)
                assert os.path.exists(where), f"{path}: {target}"


def test_no_internal_issue_numbers_or_fix_dates_in_the_docs():
    for path in _docs_files():
        text = open(os.path.join(REPO, path)).read()
        assert not re.search(r"[Ii]ssues? #?\d|\(#\d+\)|20\d\d-\d\d-\d\d", text), path


@pytest.mark.slow
def test_the_documentation_site_builds_without_a_warning(tmp_path):
    if not os.environ.get("CI"):  # CI installs the docs extra (make test-all): no skip there
        pytest.importorskip("myst_parser", reason="pip install '.[docs]' (make test-all does)")
    res = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q",
                          "-b", "html", os.path.join(REPO, "docs"), str(tmp_path / "html")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    api = (tmp_path / "html" / "reference" / "api.html").read_text()
    assert "make_masker" in api and "register_masker" in api
    assert "optim.base_lr" in (tmp_path / "html" / "reference" / "config.html").read_text()
