"""A CPU-scale pretraining recipe for transfer (issue #9): a tiny ViT on the unlabelled
cross-domain corpus, judged on the cross-domain suite. First version, not yet tuned:

    make corpus suite
    python train.py --config=configs/transfer.py --workdir=workdirs/transfer
    python eval.py --workdir=workdirs/transfer --tasks=audio_folder/suite_events,\
audio_folder/suite_words,audio_folder/suite_speakers,audio_folder/suite_languages,\
audio_folder/suite_instruments,audio_folder/suite_pitch

Variants: any masker, e.g. ``--config=configs/transfer.py:random``; the objective with
``--config=configs/transfer.py:dispersion,m2d``. Checkpoints every 500 steps, so the
learning curve (probe accuracy against steps) comes from ``eval.py --step=N``.
"""

from configs import common


def get_config(arg: str = "dispersion"):
    masker, _, objective = arg.partition(",")
    c = common.base(objective or "msm_mae", masker or "dispersion")
    c.batch_size = 32
    c.epochs = 180                     # 1080 clips: 33 steps an epoch, 5940 steps, about
                                       # 35 minutes on 2 cores at 80 x 304
    c.data.update(name="audio_folder/corpus", build_if_missing=False, worker_count=0)
    c.model.update(size="tiny", input_shape=(80, 304), decoder=dict(dim=128, depth=2, heads=4))
    c.optim.update(base_lr=8e-3, warmup_epochs=10)  # peak lr = 8e-3 * 32 / 256 = 1e-3
    c.masking.hint.update(start_epoch=40)
    c.log_every = 50
    c.ckpt_every = 500
    c.keep_ckpts = 20
    return c
