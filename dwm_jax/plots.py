"""Figures: the masks of each strategy on one spectrogram, and the hint-ratio schedule.

    python -m dwm_jax.plots --outdir docs/figures     # what `make demo` runs for now
"""

from __future__ import annotations

from dwm_jax._extras import require

require("plots", "matplotlib")

import argparse
import os

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dwm_jax import audio, masking, storage  # noqa: E402

SAMPLE_RATE = 16000


def demo_clip(seconds: float = 6.08, seed: int = 0) -> np.ndarray:
    """A sparse synthetic scene: a harmonic tone with vibrato, a chirp, clicks, a noise
    burst and silences between them, so that DWM has something to find."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave = 1e-4 * rng.standard_normal(t.size)  # near-silent floor
    env = lambda a, b: ((t >= a) & (t < b)) * np.sin(np.pi * np.clip((t - a) / (b - a), 0, 1))  # noqa: E731
    f0 = 220 * (1 + 0.02 * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    wave += env(0.3, 2.2) * sum(0.3 / h * np.sin(h * phase) for h in range(1, 9))
    chirp_phase = 2 * np.pi * np.cumsum(300 * 2 ** (4 * np.clip(t - 2.6, 0, 1.2))) / SAMPLE_RATE
    wave += 0.3 * env(2.6, 3.8) * np.sin(chirp_phase)
    for c in np.arange(4.1, min(4.9, seconds - 0.01), 0.1):  # click train
        i = int(c * SAMPLE_RATE)
        wave[i:i + 40] += 0.8 * np.hanning(40) * rng.standard_normal(40)
    wave += 0.15 * env(5.2, 5.9) * rng.standard_normal(t.size)
    return wave.astype(np.float32)


def plot_masks(logmel: np.ndarray, masks: dict[str, np.ndarray], patch_size, path: str):
    """logmel [F, T]; masks name -> [N] (1 = masked). One panel per strategy."""
    f, t = logmel.shape
    ph, pw = patch_size
    grid = (f // ph, t // pw)
    fig, axes = plt.subplots(len(masks) + 1, 1, figsize=(10, 1.25 * (len(masks) + 1)),
                             sharex=True)
    kw = dict(origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
              vmin=float(np.min(logmel)), vmax=float(np.max(logmel)))
    axes[0].imshow(logmel, **kw)
    axes[0].set_ylabel("input", rotation=0, ha="right", va="center")
    for ax, (name, m) in zip(axes[1:], masks.items()):
        full = np.kron(np.asarray(m).reshape(grid), np.ones((ph, pw))).astype(bool)
        ax.imshow(np.where(full, np.nan, logmel), **kw)
        ax.set_facecolor("0.85")
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
    for ax in axes:
        ax.set_yticks([])
    axes[-1].set_xlabel("frame (10 ms); grey = masked patch (16 x 16)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_hint_schedule(path: str, total_epochs: int = 300, start_epoch: int = 50,
                       ks=(1, 2, 4, 8)):
    epochs = np.arange(total_epochs + 1)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for k in ks:
        r = masking.hint_schedule(epochs, total_epochs=total_epochs, start_epoch=start_epoch,
                                  k=k)
        ax.plot(epochs, r, label=f"k = {k}" + (" (default)" if k == 2 else ""))
    ax.axhline(0.5, ls="--", c="0.5", lw=1, label="constant 0.5")
    ax.set_xlabel("epoch")
    ax.set_ylabel("hint ratio r_h")
    ax.set_title(f"hint schedule: random until epoch {start_epoch}, then 1 - (e/E)^k")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mask_figure(path: str, seed: int = 0):
    """The paper-style figure on :func:`demo_clip`, one panel per registered masker at hint
    0; maskers that need features (SGIM) get raw patch vectors (no encoder is involved)."""
    lm = audio.log_mel(demo_clip(seed=seed))[:, :608]
    x = jnp.asarray((lm - lm.mean()) / lm.std())[None]
    masks = {}
    key = jax.random.key(seed)
    for name, entry in masking.MASKERS.items():
        m = masking.make_masker(name, input_shape=x.shape[1:], mask_ratio=0.7)
        feats = masking.patchify(x, (16, 16)) if entry.needs_features else None
        masks[name] = np.asarray(m(key, x, features=feats).mask[0])
    plot_masks(np.asarray(x[0]), masks, (16, 16), path)
    return masks


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write the mask and hint-schedule figures.")
    ap.add_argument("--outdir", default="docs/figures")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        storage.local_only(args.outdir, "--outdir")
    except storage.StorageError as e:
        ap.error(str(e))
    os.makedirs(args.outdir, exist_ok=True)
    masks_png = os.path.join(args.outdir, "masks.png")
    sched_png = os.path.join(args.outdir, "hint_schedule.png")
    mask_figure(masks_png, args.seed)
    plot_hint_schedule(sched_png)
    print(f"wrote {masks_png}\nwrote {sched_png}")


if __name__ == "__main__":
    main()
