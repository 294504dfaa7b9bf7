"""The offline evaluation suite and pretraining corpus: audio synthesised on this machine
(espeak-ng speech, fluidsynth General MIDI, procedural events) and built as datasets.

  tasks.py    the six labelled tasks, their splits and the raw log-mel check
              (``python -m dwm_jax.suite``)
  corpus.py   the unlabelled cross-domain corpus (``python -m dwm_jax.suite.corpus``)
"""
