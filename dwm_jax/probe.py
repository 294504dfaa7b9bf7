"""Clip embeddings from a pretrained encoder and a linear probe on them.

Embedding (M2D's recipe): the encoder sees every patch of a window (no masking); for each time
step the tokens of its frequency patches are concatenated (Fp x dim), then averaged over the
time steps of the whole clip. A clip longer than the encoder's input is cut into consecutive
windows (the last one padded with silence; padded time steps are left out of the average).
The probe is a softmax regression on features standardised with the training split's
statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dwm_jax import data as data_lib
from dwm_jax import trainer


def make_embed_fn(encoder):
    """-> jitted fn(windows [W, F, T]) -> per-time-step features [W, Tp, Fp * dim]."""
    graphdef, params = nnx.split(encoder)
    fp, tp = encoder.grid
    dim = encoder.size.dim

    @jax.jit
    def fn(params, x):
        enc = nnx.merge(graphdef, params)
        tokens = enc(x)[:, 1:].astype(jnp.float32)              # [W, Fp * Tp, dim]
        tokens = tokens.reshape(x.shape[0], fp, tp, dim).transpose(0, 2, 1, 3)
        return tokens.reshape(x.shape[0], tp, fp * dim)

    return lambda x: np.asarray(fn(params, jnp.asarray(x)))


def clip_embedding(embed_fn, log_mel: np.ndarray, frames: int, patch_w: int,
                   pad_value: float) -> np.ndarray:
    """Normalised log-mel [F, T_i] -> [Fp * dim], averaged over the clip's real time steps."""
    length = log_mel.shape[1]
    windows = -(-length // frames)
    padded = np.full((log_mel.shape[0], windows * frames), pad_value, np.float32)
    padded[:, :length] = log_mel
    x = padded.reshape(log_mel.shape[0], windows, frames).transpose(1, 0, 2)
    steps = embed_fn(x).reshape(windows * (frames // patch_w), -1)
    real = max(1, -(-length // patch_w))
    return steps[:real].mean(axis=0)


def embed_split(encoder, split: data_lib.DatasetSplit, stats: data_lib.NormStats):
    """-> (features [n, Fp * dim], labels [n]) for every clip of ``split``."""
    embed_fn = make_embed_fn(encoder)
    frames, patch_w = encoder.input_shape[1], encoder.patch_size[1]
    pad = (split.frontend.pad_value - stats.mean) / stats.std
    feats, labels = [], []
    for clip in data_lib.whole_clips(split, stats):
        feats.append(clip_embedding(embed_fn, clip["log_mel"], frames, patch_w, pad))
        labels.append(int(clip["label"]))
    return np.stack(feats), np.asarray(labels)


def linear_probe(x_train, y_train, x_test, y_test, *, num_classes: int, steps: int = 500,
                 lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0) -> dict:
    """Softmax regression (AdamW, full batch) on standardised features -> accuracies."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xtr = jnp.asarray((x_train - mean) / std)
    xte = jnp.asarray((x_test - mean) / std)
    ytr = jnp.asarray(y_train)
    key = jax.random.key(seed)
    params = dict(w=0.01 * jax.random.normal(key, (xtr.shape[1], num_classes)),
                  b=jnp.zeros(num_classes))
    tx = optax.adamw(lr, weight_decay=weight_decay)

    def loss_fn(p):
        logits = xtr @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ytr).mean()

    @jax.jit
    def fit(params):
        def body(carry, _):
            p, s = carry
            grads = jax.grad(loss_fn)(p)
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None
        (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
        return params

    params = fit(params)
    acc = lambda x, y: float(np.mean(np.asarray((x @ params["w"] + params["b"]).argmax(1)) == y))
    return dict(train_accuracy=acc(xtr, y_train), test_accuracy=acc(xte, y_test),
                chance=1.0 / num_classes, num_train=int(len(y_train)),
                num_test=int(len(y_test)), feature_dim=int(xtr.shape[1]))


def probe_workdir(workdir: str, data_dir: str, name: str, *, train_split="train",
                  test_split="test") -> dict:
    """Loads the latest checkpoint of ``workdir`` and probes it on dataset ``name``."""
    encoder, stats, _ = trainer.load_encoder(workdir)
    train = data_lib.open_split(data_dir, name, train_split)
    test = data_lib.open_split(data_dir, name, test_split)
    if not train.num_classes:
        raise ValueError(f"{name}:{train_split} has no labels to probe")
    xtr, ytr = embed_split(encoder, train, stats)
    xte, yte = embed_split(encoder, test, stats)
    result = linear_probe(xtr, ytr, xte, yte, num_classes=train.num_classes)
    result.update(dataset=name, train_split=train_split, test_split=test_split)
    return result
