"""The shared pretraining config: the paper's settings (ViT-B, 80 x 608, AdamW, warm-up +
cosine, lr scaled by batch, clipping 3.0, 300 epochs, batch 2048), and the authors' model
sizes (M2D predictor 512 / 8 blocks / 16 heads; MSM-MAE decoder 384 / 4 / 6). The launchable
configs (m2d.py, msm_mae.py, demo.py) start from ``base()`` and change what differs."""

import ml_collections

from configs import maskers
from dwm_jax import objectives


HINTED_MASKERS = ("dispersion", "sgim")  # the informed maskers; the others take no hints


def base(objective: str = "m2d", masker: str = "dispersion") -> ml_collections.ConfigDict:
    if objective not in ("m2d", "msm_mae"):
        raise ValueError(f"objective must be 'm2d' or 'msm_mae'; got {objective!r}")
    mask = maskers.get_config(masker + (",mae" if objective == "msm_mae" else ""))
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 2048                # global, over all hosts and devices
    c.epochs = 300
    c.total_steps = 0                  # 0: epochs x steps per epoch
    c.num_devices = 0                  # 0: all visible devices
    # another workdir (a run, or `python -m dwm_jax.convert` output) to start from: its
    # encoder, and its predictor / decoder and M2D target where they fit
    c.init_from = ""
    c.fsdp = False                     # shard parameters and optimizer state over the mesh

    c.data = ml_collections.ConfigDict(dict(
        data_dir="data", name="audio_folder/audioset", split="train", build_if_missing=False,
        worker_count=8,
        prefetch=2))                   # batches placed on the devices ahead of the step

    c.model = ml_collections.ConfigDict(dict(
        size="base", input_shape=tuple(mask.input_shape), patch_size=tuple(mask.patch_size),
        decoder=dict(objectives.M2D_PREDICTOR if objective == "m2d"
                     else objectives.MSM_MAE_DECODER),
        compute_dtype="float32",       # parameters stay float32; 'bfloat16' computes in bf16
        attention="xla",               # jax.nn.dot_product_attention: 'xla' or 'cudnn' (GPU, bf16)
        remat="none",                  # per-block rematerialisation policy (vit.REMAT_POLICIES)
        scan_layers=False))            # blocks under one jax.lax.scan: compile time flat in depth

    # norm_pix: the authors' norm_pix_loss (MSM-MAE: standardised patches; M2D: standardised
    # target tokens). target_mode (M2D): 'm2d' (their target: own init, EMA of the blocks and
    # final norm) or 'ema_encoder' (a copy of the whole encoder, all of it EMA'd).
    c.objective = ml_collections.ConfigDict(dict(
        name=objective, ema_start=0.99995, ema_end=0.99999, norm_pix=True,
        target_mode="m2d"))

    options = {k: v for k, v in mask.items()
               if k not in ("name", "input_shape", "patch_size", "mask_ratio")}
    c.masking = ml_collections.ConfigDict(dict(
        name=mask.name, mask_ratio=mask.mask_ratio, options=options,
        # r_h: 'schedule' (1 before start_epoch, then 1 - (e/E)^k), 'constant' or 'none' (0);
        # DWM and SGIM share the hints and their schedule (docs/masking.md, SGIM step 4)
        hint=dict(mode="schedule" if mask.name in HINTED_MASKERS else "none", start_epoch=50,
                  k=2, constant=1.0)))

    c.optim = ml_collections.ConfigDict(dict(
        base_lr=3e-4, warmup_epochs=20, weight_decay=0.05, b1=0.9, b2=0.95, eps=1e-8,
        clip=3.0,
        decay_tokens=True))            # timm's grouping: CLS and mask tokens are decayed too

    c.log_every = 50
    c.profile_steps = ""               # 'A:B': a JAX profiler trace of steps A..B-1 in WORKDIR/profile
    c.log_data_fingerprint = False     # crc32 of each logged batch in metrics.jsonl
    c.ckpt_every = 1000                # steps
    c.keep_ckpts = 3

    # after training, a linear probe on a labelled dataset (name "" = config.data.name)
    c.probe = ml_collections.ConfigDict(dict(enabled=False, name=""))
    return c
