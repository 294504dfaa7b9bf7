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

import ml_collections


def get_config(arg: str = ""):
    del arg
    c = ml_collections.ConfigDict()
    c.epochs = 30                 # at most; early stopping may end sooner
    c.patience = 10               # epochs without a better validation score before stopping
    c.batch_size = 32
    c.lr = 1e-3                   # peak learning rate of the head (the top layer)
    c.layer_decay = 0.75          # layer l of L gets lr * layer_decay ** (L + 1 - l)
    c.weight_decay = 0.05
    c.warmup_epochs = 3
    c.clip = 3.0                  # global gradient-norm clipping
    c.mixup = 0.3                 # Beta(alpha, alpha) mixing weight; 0 turns mixup off
    c.freq_mask = 16              # widest frequency band masked per clip (mel bins; 0: off)
    c.time_mask = 64              # widest time band masked per clip (frames; 0: off)
    c.folds = 0                   # fold datasets: how many test folds to run (0: all)
    c.seed = 0
    return c
