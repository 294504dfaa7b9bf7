"""Which optional extra each part of dwm_jax needs, and one clear error when it is missing.

The core install (``pip install dwm_jax``) brings what ``dwm_jax.masking`` needs: jax and
numpy. The rest comes with extras (setup.cfg): ``audio``, ``data``, ``train``, ``eval``,
``plots`` or ``all``.
"""

from __future__ import annotations

import importlib.util


def require(extra: str, *modules: str) -> None:
    """Raises ImportError naming the extra to install when a top-level module is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"this part of dwm_jax needs the '{extra}' extra: pip install "
                          f"'dwm_jax[{extra}]' (missing: {', '.join(missing)})")
