"""Frame-level evaluation (sound event detection) of a pretrained encoder: eval.py on a task
built with an events table picks this protocol by itself.

    python eval.py --workdir=workdirs/demo --tasks=suite_scenes --data_dir=data
    python eval.py --workdir=RUN --tasks=audio_folder/desed --sed.median_window_s=0.32

Per-step linear sigmoids on frozen features, the decision threshold chosen on valid, median
filtering, then segment-based F1 / error rate, event-based F1 and PSDS.
"""

from dwm_jax import config


def get_config(arg: str = ""):
    """The defaults of ``dwm_jax.config.SED_FIELDS`` (the configuration reference describes
    each field)."""
    del arg
    return config.sed_base()
