"""A CPU-scale pretraining recipe for transfer: a tiny ViT on the unlabelled
cross-domain corpus, judged on the cross-domain suite. 60 epochs (1980 steps, 10.5 min
alone on 2 cores), the length the masking study (``make study``) runs at:

    make corpus suite
    python train.py --config=configs/transfer.py --workdir=workdirs/transfer
    python eval.py --workdir=workdirs/transfer --tasks=audio_folder/suite_events,\
audio_folder/suite_words,audio_folder/suite_speakers,audio_folder/suite_languages,\
audio_folder/suite_instruments,audio_folder/suite_pitch

Variants: any masker, e.g. ``--config=configs/transfer.py:random``; the objective with
``--config=configs/transfer.py:dispersion,m2d``. Longer: ``--config.epochs=180
--config.masking.hint.start_epoch=40`` (the hint schedule starts at 2/9 of the run). Checkpoints
every 500 steps; ``python -m dwm_jax.study.curve`` probes each (``make transfer`` runs all).
What was tried on the way here (one seed each, probe at 2000 steps) is in docs/results/transfer.md.
"""

from configs import demo


def get_config(arg: str = "dispersion"):
    masker, _, objective = arg.partition(",")
    c = demo.tiny(objective or "msm_mae", masker or "dispersion")
    c.epochs = 60                      # 1080 clips: 33 steps an epoch, 1980 steps
    c.data.name = "audio_folder/corpus"
    c.optim.warmup_epochs = 10
    c.masking.hint.update(start_epoch=13)
    c.log_every = 50
    c.ckpt_every = 500
    c.keep_ckpts = 20
    return c
