"""``python -m dwm_jax.data BUILDER --data_dir DIR ...``: build a dataset (see build.py)."""

import sys

from dwm_jax.data.cli import main

sys.exit(main())
