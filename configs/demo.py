"""The default demo: a tiny M2D with DWM on the built-in synthetic_sounds, a few minutes on a
2-core CPU, then a linear probe. ``make demo`` runs it:

    python train.py --config=configs/demo.py --workdir=workdirs/demo

The dataset is built under data/ on first use. Variants: any masker name, e.g.
``--config=configs/demo.py:random``.
"""

from configs import common


def get_config(arg: str = "dispersion"):
    c = common.base("m2d", arg)
    c.batch_size = 32
    c.epochs = 8
    c.data.update(name="synthetic_sounds/default", build_if_missing=True, worker_count=0)
    c.model.update(size="tiny", input_shape=(80, 304), decoder=dict(dim=128, depth=2, heads=4))
    c.objective.update(ema_start=0.995, ema_end=0.999)  # short run: a faster target
    c.optim.update(base_lr=8e-3, warmup_epochs=1)  # peak lr = 8e-3 * 32 / 256 = 1e-3
    c.masking.hint.update(start_epoch=2)
    c.log_every = 10
    c.ckpt_every = 60
    c.probe.update(enabled=True)  # on config.data.name: train split -> test split
    return c
