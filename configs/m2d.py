"""M2D pretraining at the paper's settings (ViT-B, 80 x 608, ratio 0.7, batch 2048, 300 epochs).

    python train.py --config=configs/m2d.py:dispersion --workdir=workdirs/m2d_dwm \
        --config.data.data_dir=data --config.data.name=audio_folder/audioset

Variants (the part after ':'): any registered masker (random, time_freq, block,
inverse_block, dispersion = DWM with the hint schedule, sgim); its options with
``--config.masking.options.<name>=...``. Any field can be overridden on
the command line, e.g. ``--config.batch_size=256 --config.model.compute_dtype=bfloat16``.
"""

from dwm_jax import config as config_lib


def get_config(arg: str = "dispersion"):
    return config_lib.base("m2d", arg)
