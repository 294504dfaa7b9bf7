"""Sphinx configuration: MyST markdown pages, an API reference from the docstrings, and the
configuration reference written from the config schema at every build.

    make docs      # -> docs/_build/html, warnings are errors
"""

import os

from dwm_jax import config as config_lib

project = "dwm_jax"
author = "dwm_jax developers"
copyright = "dwm_jax developers, Apache 2.0"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "study", "study_transfer", "study_frame", "transfer_long"]
html_theme = "furo"
html_title = "dwm_jax"
myst_heading_anchors = 3
suppress_warnings = ["myst.xref_missing"]  # links to repository files outside the docs
autodoc_member_order = "bysource"
autodoc_typehints = "none"


def _write_config_reference(app):
    """docs/reference/config.md from the schema: a renamed field changes the page."""
    path = os.path.join(app.srcdir, "reference", "config.md")
    text = config_lib.reference_document()
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def setup(app):
    app.connect("builder-inited", _write_config_reference)
