"""The masking study and the learning curve (orchestration over training and evaluation).

  run.py     ``python -m dwm_jax.study``: each arm x seed pretrained, probed, tabled
  arms.py    the arms (maskers and their hint-0 ablations) as config changes
  curve.py   ``python -m dwm_jax.study.curve``: probe accuracy at every checkpoint of a run
"""
