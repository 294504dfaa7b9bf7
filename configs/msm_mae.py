"""MSM-MAE pretraining at the paper's settings (ViT-B, 80 x 608, ratio 0.75, norm-pix loss).

    python train.py --config=configs/msm_mae.py:dispersion --workdir=workdirs/msm_mae_dwm \
        --config.data.data_dir=data --config.data.name=audio_folder/audioset

Variants: random, inverse_block, dispersion, sgim (and the rest of configs/maskers.py).
"""

from configs import common


def get_config(arg: str = "dispersion"):
    return common.base("msm_mae", arg)
