"""Fine-tuning a pretrained encoder plus a linear head on a labelled task (eval.py's
``--mode=finetune``; ``--mode=both`` also runs the linear probe and tables them side by side):

    python eval.py --workdir=workdirs/demo --tasks=synthetic_sounds --mode=finetune
    python eval.py --workdir=RUN --tasks=audio_folder/esc50 --mode=both \
        --finetune=configs/finetune.py --finetune.epochs=100 --finetune.lr=5e-4

The usual audio recipe (as the M2D, ATST and BEATs fine-tuning scripts use it): random crops
of the encoder's input width, mixup of inputs and targets, time and frequency masking of the
normalised log-mel, AdamW with layer-wise learning-rate decay, linear warm-up then cosine,
early stopping on the validation score. Any field can be overridden with
``--finetune.<field>=value``.
"""

from dwm_jax import config


def get_config(arg: str = ""):
    """The defaults of ``dwm_jax.config.FINETUNE_FIELDS`` (the configuration reference
    describes each field)."""
    del arg
    return config.finetune_base()
