"""The transfer recipe at three times the length: 180 epochs (5940 steps, ~31 min alone on
2 cores), the hint schedule from epoch 40 (2/9 of the run, as in configs/transfer.py).
Probed with the encoder's mean and std over time, it is the recipe that passes both the
untrained encoder and raw log-mel on the suite (docs/results/transfer.md, "Like for like"):

    make corpus suite
    python train.py --config=configs/transfer_long.py --workdir=workdirs/transfer_long \
        [--config.seed=1]
    python -m dwm_jax.study.curve --workdir=workdirs/transfer_long --pool=mean_std

``make transfer-seeds`` trains it with seeds 0, 1 and 2 and probes each at its last step.
"""

from configs import transfer


def get_config(arg: str = "dispersion"):
    c = transfer.get_config(arg)
    c.epochs = 180                     # 33 steps an epoch: 5940 steps
    c.masking.hint.update(start_epoch=40)
    return c
