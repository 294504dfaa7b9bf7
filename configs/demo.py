"""The default demo: a tiny MSM-MAE with DWM on the built-in synthetic_sounds, a few minutes
on a 2-core CPU, then a linear probe. ``make demo`` runs it:

    python train.py --config=configs/demo.py --workdir=workdirs/demo

The dataset is built under data/ on first use. Variants: any masker name, e.g.
``--config=configs/demo.py:random``. MSM-MAE rather than M2D because in a 240-step run M2D's
target network has no time to become informative. Measured probe accuracy after the same run
(``--config.objective.name=m2d --config.masking.mask_ratio=0.7``): the authors' M2D 0.408;
with EMA 0.99 -> 0.999 0.383; with ``target_mode=ema_encoder`` and that EMA 0.417; against
0.496 for this MSM-MAE demo and 0.454 for the untrained encoder.
"""

from dwm_jax import config as config_lib


def tiny(objective: str, masker: str):
    """The CPU-scale model every small recipe shares: ViT-tiny on 80 x 304 crops, a
    128-wide 2-block decoder, batch 32, peak lr 8e-3 * 32 / 256 = 1e-3."""
    c = config_lib.base(objective, masker)
    c.batch_size = 32
    c.data.worker_count = 0
    c.model.update(size="tiny", input_shape=(80, 304), decoder=dict(dim=128, depth=2, heads=4))
    c.optim.base_lr = 8e-3
    return c


def get_config(arg: str = "dispersion"):
    c = tiny("msm_mae", arg)
    c.epochs = 8
    c.data.update(name="synthetic_sounds/default", build_if_missing=True)
    c.optim.warmup_epochs = 1
    c.masking.hint.update(start_epoch=2)
    c.log_every = 10
    c.ckpt_every = 60
    c.probe.update(enabled=True)  # on config.data.name, with eval.py's protocol
    return c
