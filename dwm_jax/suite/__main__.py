import sys

from dwm_jax.suite.tasks import main

sys.exit(main())
