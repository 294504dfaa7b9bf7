"""MSM-MAE pretraining at the paper's settings (ViT-B, 80 x 608, ratio 0.75, norm-pix loss).

    python train.py --config=configs/msm_mae.py:dispersion --workdir=workdirs/msm_mae_dwm \
        --config.data.data_dir=data --config.data.name=audio_folder/audioset

Variants: any registered masker (random, time_freq, block, inverse_block, dispersion, sgim).
"""

from dwm_jax import config as config_lib


def get_config(arg: str = "dispersion"):
    return config_lib.base("msm_mae", arg)
