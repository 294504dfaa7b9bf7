"""Linear probing: the paper's protocol for judging a frozen encoder on labelled tasks.

For a task (a built, labelled dataset) every clip is embedded (``embedding.Embedder``: the
frequency patches of each time step concatenated, averaged over the clip), features are
standardised with the training split's statistics, and a softmax-regression classifier is
trained with AdamW on the full batch, keeping the parameters of the best validation accuracy
(early stopping). Multi-label datasets (``labels`` multi-hot, AudioSet / FSD50K style) get
independent sigmoid outputs, early stopping on the validation mAP, and report mAP and macro
ROC AUC (both as scikit-learn defines them). Datasets with ``foldK`` splits (ESC-50, UrbanSound8K) are evaluated by
leave-one-fold-out cross-validation; otherwise train / valid / test splits are used. The same
probe runs on two baselines: the untrained (random-init) encoder and pooled raw log-mel
statistics (mean and std per mel bin).
"""

from __future__ import annotations

from dwm_jax._extras import require

require("eval", "optax", "tensorflow_datasets", "grain")

import json
import os
import re
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from dwm_jax import data as data_lib
from dwm_jax.embedding import Embedder


class ProbeError(ValueError):
    """A task cannot be probed as asked (no labels, one class, missing splits, ...)."""


# ------------------------------------------------------------------------------- the probe

def _fit(loss_fn, params, valid_fn, score, *, lr, weight_decay, max_steps, eval_every,
         patience):
    """Full-batch AdamW from ``params`` (zero init, full batch: deterministic) in chunks of
    ``eval_every`` steps, each ending with ``score(valid_fn(params))`` (higher is better);
    stops after ``patience`` chunks without a better score. -> (best params, its score, its
    step, steps run)."""
    tx = optax.adamw(lr, weight_decay=weight_decay)

    @jax.jit
    def run(params, opt_state):
        def body(carry, _):
            p, s = carry
            updates, s = tx.update(jax.grad(loss_fn)(p), s, p)
            return (optax.apply_updates(p, updates), s), None
        (params, opt_state), _ = jax.lax.scan(body, (params, opt_state), None,
                                              length=eval_every)
        return params, opt_state, valid_fn(params)

    opt_state = tx.init(params)
    best, best_score, best_step, waited, step = params, -1.0, 0, 0, 0
    while step < max_steps and waited < patience:
        params, opt_state, valid = run(params, opt_state)
        step += eval_every
        current = score(valid)
        if current > best_score:
            best, best_score, best_step, waited = params, current, step, 0
        else:
            waited += 1
    return best, best_score, best_step, step


def train_linear(x_train, y_train, x_valid, y_valid, *, num_classes: int, lr: float = 1e-3,
                 weight_decay: float = 1e-4, max_steps: int = 3000, eval_every: int = 50,
                 patience: int = 10):
    """Softmax regression with early stopping on the validation accuracy.

    Features must already be standardised. Returns (params {'w' [D, C], 'b' [C]}, info).
    """
    xtr, ytr = jnp.asarray(x_train, jnp.float32), jnp.asarray(y_train, jnp.int32)
    xva = jnp.asarray(x_valid, jnp.float32)

    def loss_fn(p):
        logits = xtr @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ytr).mean()

    def valid_accuracy(p):
        return jnp.mean((xva @ p["w"] + p["b"]).argmax(1) == y_valid)

    params = dict(w=jnp.zeros((xtr.shape[1], num_classes)), b=jnp.zeros(num_classes))
    best, acc, best_step, steps = _fit(
        loss_fn, params, valid_accuracy, float, lr=lr, weight_decay=weight_decay,
        max_steps=max_steps, eval_every=eval_every, patience=patience)
    return best, dict(valid_accuracy=acc, best_step=best_step, steps=steps)


def accuracy(params, x, y) -> float:
    return float(np.mean(np.asarray((jnp.asarray(x) @ params["w"] + params["b"]).argmax(1))
                         == np.asarray(y)))


# ------------------------------------------------------------------------ multi-label probe

def average_precision(y_true, scores) -> float:
    """Average precision of one class: the sum over distinct score thresholds (highest
    first) of recall gained x precision there, no interpolation (scikit-learn's
    ``average_precision_score``). Needs at least one positive."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]   # last index of each tie group
    tp = np.cumsum(y)[last]
    precision, recall = tp / (last + 1), tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve of one class (ties count one half: the Mann-Whitney U
    statistic, as ``roc_auc_score``). Needs positives and negatives."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, np.float64)
    order = np.argsort(s, kind="mergesort")
    _, inverse, counts = np.unique(s[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = np.empty(len(s))
    ranks[order] = ((ends - counts + 1 + ends) / 2)[inverse]   # average 1-based rank
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def multilabel_scores(y_true, scores) -> dict:
    """mAP and macro ROC AUC of multi-hot ``y_true`` [n, C] against ``scores`` [n, C]:
    means over the classes with a positive (mAP) and with both kinds (AUC) in ``y_true``;
    classes without are left out and counted (``classes_scored``)."""
    y, s = np.asarray(y_true), np.asarray(scores)
    pos = y.sum(0)
    with_pos = np.flatnonzero(pos > 0)
    with_both = np.flatnonzero((pos > 0) & (pos < len(y)))
    return dict(map=float(np.mean([average_precision(y[:, c], s[:, c]) for c in with_pos])),
                auc=float(np.mean([roc_auc(y[:, c], s[:, c]) for c in with_both])),
                classes_scored=int(len(with_pos)))


def train_multilabel(x_train, y_train, x_valid, y_valid, *, lr: float = 1e-3,
                     weight_decay: float = 1e-4, max_steps: int = 3000, eval_every: int = 50,
                     patience: int = 10):
    """One sigmoid output per class (binary cross-entropy) on multi-hot ``y`` [n, C], early
    stopping on the validation mAP. Returns (params {'w', 'b'}, info)."""
    xtr, ytr = jnp.asarray(x_train, jnp.float32), jnp.asarray(y_train, jnp.float32)
    xva = jnp.asarray(x_valid, jnp.float32)

    def loss_fn(p):
        return optax.sigmoid_binary_cross_entropy(xtr @ p["w"] + p["b"], ytr).mean()

    def valid_map(valid_logits):
        return multilabel_scores(y_valid, np.asarray(valid_logits))["map"]

    params = dict(w=jnp.zeros((xtr.shape[1], ytr.shape[1])), b=jnp.zeros(ytr.shape[1]))
    best, best_map, best_step, steps = _fit(
        loss_fn, params, lambda p: xva @ p["w"] + p["b"], valid_map, lr=lr,
        weight_decay=weight_decay, max_steps=max_steps, eval_every=eval_every,
        patience=patience)
    return best, dict(valid_map=best_map, best_step=best_step, steps=steps)


def logits(params, x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32) @ params["w"] + params["b"])


def standardise(train, *others):
    mean, std = train.mean(0), train.std(0) + 1e-6
    return [(a - mean) / std for a in (train, *others)]


def probe(x_train, y_train, x_valid, y_valid, x_test, y_test, *, num_classes: int,
          **kw) -> dict:
    """Standardise with train statistics, fit with early stopping on valid, score on test.

    Class indices ``y`` [n] -> softmax, ``test_score`` = accuracy; multi-hot ``y`` [n, C]
    -> sigmoids, ``test_score`` = mAP (also ``test_auc``, macro ROC AUC)."""
    xtr, xva, xte = standardise(x_train, x_valid, x_test)
    sizes = dict(num_train=int(len(y_train)), num_test=int(len(y_test)))
    if np.ndim(y_train) == 2:
        params, info = train_multilabel(xtr, y_train, xva, y_valid, **kw)
        test = multilabel_scores(y_test, logits(params, xte))
        return dict(test_score=test["map"], test_map=test["map"], test_auc=test["auc"],
                    classes_scored=test["classes_scored"],
                    train_map=multilabel_scores(y_train, logits(params, xtr))["map"],
                    **info, **sizes)
    params, info = train_linear(xtr, y_train, xva, y_valid, num_classes=num_classes, **kw)
    test = accuracy(params, xte, y_test)
    return dict(test_score=test, test_accuracy=test,
                train_accuracy=accuracy(params, xtr, y_train), **info, **sizes)


# ------------------------------------------------------------------------------- features

def raw_features(log_mel: np.ndarray) -> np.ndarray:
    """Pooled raw log-mel statistics [2 * n_mels]: mean and std of each mel bin over time."""
    x = np.asarray(log_mel, np.float32)
    return np.concatenate([x.mean(axis=1), x.std(axis=1)])


def labels_of(split: data_lib.DatasetSplit) -> np.ndarray:
    """The labels [n] (or multi-hot [n, C]) of every clip of ``split``, read from the dataset
    (never from a cache: a relabelled rebuild keeps its audio, and so its features)."""
    if split.multi_label:
        return np.stack([np.asarray(split.source[i]["labels"], np.float32)
                         for i in range(len(split))])
    return np.asarray([int(split.source[i]["label"]) for i in range(len(split))])


def _read_cache(path: str, n: int) -> np.ndarray | None:
    """The cached features [n, D], or None when the file is absent, unreadable (a killed
    write, a damaged disk) or holds another number of clips; a bad file is recomputed."""
    try:
        with np.load(path) as f:
            x = f["x"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        print(f"probe: ignoring the unreadable cache file {path} ({type(e).__name__}); "
              "recomputing it", file=sys.stderr)
        return None
    return x if x.ndim == 2 and len(x) == n else None


CLIPS_PER_BATCH = 256   # clips read and encoded together (their windows batched)


def featurise_all(count: int, read, featurise, desc: str = "embed") -> list:
    """``featurise`` on clips ``read(0) .. read(count - 1)`` (log-mels, read as needed):
    through its ``batch`` (many clips an encoder call) in groups of CLIPS_PER_BATCH where it
    has one, else clip by clip."""
    batch = getattr(featurise, "batch", None)
    out: list = []
    with tqdm(total=count, desc=desc, unit="clip", leave=False, dynamic_ncols=True) as bar:
        step = CLIPS_PER_BATCH if batch else 1
        for first in range(0, count, step):
            group = [read(i) for i in range(first, min(first + step, count))]
            out.extend(batch(group) if batch else [featurise(group[0])])
            bar.update(len(group))
    return out


def features_of(split: data_lib.DatasetSplit, featurise, *, cache: str | None = None,
                desc: str = "embed") -> np.ndarray:
    """The features [n, D] of every clip of ``split`` through ``featurise(log_mel)``, cached
    in ``cache`` (.npz, written atomically) when given."""
    if cache:
        x = _read_cache(cache, len(split))
        if x is not None:
            return x
    x = np.stack(featurise_all(len(split), lambda i: split.source[i]["log_mel"], featurise,
                               desc))
    if not np.isfinite(x).all():  # never cached, never probed: a chance score would hide it
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise ProbeError(f"{desc}: the features of clip {bad} ({split.name}:{split.split}) "
                         "hold NaN or infinite values; are the weights finite?")
    if cache:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        np.savez(cache + ".tmp.npz", x=x)
        os.replace(cache + ".tmp.npz", cache)
    return x


# ---------------------------------------------------------------------------------- tasks

def resolve_task(spec: str, data_dir: str) -> tuple[str, str]:
    """'synthetic_sounds' | 'builder/config' | 'audio_folder:/path/to/built/dataset' ->
    (display name, dataset name or directory for data.open_split)."""
    if ":" in spec:
        _, path = spec.split(":", 1)
        return os.path.basename(os.path.normpath(path)) or spec, path
    if "/" not in spec:
        spec = f"{spec}/default"
    return spec, spec


def task_fingerprint(spec: str, data_dir: str) -> tuple[str, str]:
    """(display name, fingerprint of the built dataset): changes when the task is rebuilt
    with other data, so stored scores can tell that they are stale."""
    name, dataset = resolve_task(spec, data_dir)
    return name, data_lib.dataset_fingerprint(data_dir, dataset)


def split_names(data_dir: str, dataset: str) -> list[str]:
    path = data_lib.pipeline.dataset_dir(data_dir, dataset)
    with open(os.path.join(path, "dataset_info.json")) as f:
        return [s["name"] for s in json.load(f).get("splits", [])]


def task_splits(data_dir: str, dataset: str) -> dict:
    """The split plan: {'folds': [...]} for foldK datasets, else train/valid/test names."""
    names = split_names(data_dir, dataset)
    folds = sorted((n for n in names if re.fullmatch(r"fold\d+", n)), key=lambda n: int(n[4:]))
    if len(folds) >= 2:
        return dict(folds=folds)
    missing = [s for s in ("train", "test") if s not in names]
    if missing:
        raise ProbeError(f"{dataset}: needs train and test splits (or fold1..foldK); it has "
                         f"{names}")
    return dict(train="train", valid="valid" if "valid" in names else None, test="test")


def _split_valid(x, y, frac=0.1, seed=0):
    """A stratified-enough random hold-out of the training set for early stopping."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    n_valid = max(1, int(len(y) * frac))
    return x[idx[n_valid:]], y[idx[n_valid:]], x[idx[:n_valid]], y[idx[:n_valid]]


def evaluate_task(spec: str, data_dir: str, featurisers: dict, *, cache_dir: str | None = None,
                  probe_kw: dict | None = None) -> dict:
    """Probes every featuriser on one task -> {'task', 'data' (task_fingerprint), 'num_test',
    'num_classes', 'metric', 'chance', 'protocol',
    <featuriser name>: {test_score, test_accuracy | test_map, ...}}.

    ``featurisers``: {name: (featurise(log_mel) -> vector, cache key or None)}; the key must
    identify the featuriser (e.g. ``Embedder.fingerprint``), the data are identified here.
    """
    name, dataset = resolve_task(spec, data_dir)
    some_split = data_lib.open_split(data_dir, dataset, split_names(data_dir, dataset)[0])
    if not some_split.num_classes:
        raise ProbeError(f"task {spec!r}: dataset {dataset} has no labels; a linear probe "
                         "needs a labelled dataset (build it with a CSV)")
    plan = task_splits(data_dir, dataset)
    wanted = plan.get("folds") or [s for s in (plan["train"], plan["valid"], plan["test"]) if s]
    splits = {s: data_lib.open_split(data_dir, dataset, s) for s in wanted}
    multi = some_split.multi_label
    split_labels = {s: labels_of(split) for s, split in splits.items()}
    labels = np.concatenate(list(split_labels.values()))
    present = int((labels.sum(0) > 0).sum()) if multi else len(np.unique(labels))
    if present < 2:
        raise ProbeError(f"task {spec!r}: all clips have one class; a probe needs two or more")
    num_classes = some_split.num_classes
    # the cache path names the data too: a rebuilt dataset never reuses old features
    fingerprint = data_lib.dataset_fingerprint(data_dir, dataset)
    slug = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{fingerprint}"
    out = dict(task=name, data=fingerprint, dataset=dataset, num_classes=num_classes,
               metric="mAP" if multi else "accuracy")
    kw = probe_kw or {}
    for fname, (featurise, cache_key) in featurisers.items():
        feats = {}
        for s, split in splits.items():
            cache = (os.path.join(cache_dir, cache_key, slug, f"{s}.npz")
                     if cache_dir and cache_key else None)
            feats[s] = (features_of(split, featurise, cache=cache, desc=f"{name}:{s} {fname}"),
                        split_labels[s])
        if "folds" in plan:
            accs, n_test = [], 0
            for k, test_fold in enumerate(plan["folds"]):
                rest = [f for f in plan["folds"] if f != test_fold]
                x = np.concatenate([feats[f][0] for f in rest])
                y = np.concatenate([feats[f][1] for f in rest])
                xtr, ytr, xva, yva = _split_valid(x, y, seed=k)
                r = probe(xtr, ytr, xva, yva, *feats[test_fold], num_classes=num_classes, **kw)
                accs.append(r["test_score"])
                n_test += r["num_test"]
            mean = float(np.mean(accs))
            out[fname] = (dict(test_score=mean, test_map=mean, fold_maps=accs) if multi else
                          dict(test_score=mean, test_accuracy=mean, fold_accuracies=accs))
            out["num_test"] = n_test
            out["protocol"] = f"leave-one-fold-out over {len(plan['folds'])} folds"
        else:
            xtr, ytr = feats[plan["train"]]
            if plan["valid"]:
                xva, yva = feats[plan["valid"]]
            else:
                xtr, ytr, xva, yva = _split_valid(xtr, ytr)
            r = probe(xtr, ytr, xva, yva, *feats[plan["test"]], num_classes=num_classes, **kw)
            out[fname] = r
            out["num_test"] = r["num_test"]
            out["protocol"] = ("train / valid (early stopping) / test" if plan["valid"] else
                               "train (10% held out for early stopping) / test")
    # chance: a constant guess; for mAP, random scores (each class's prevalence)
    out["chance"] = (float(labels.mean(0)[labels.sum(0) > 0].mean()) if multi
                     else 1.0 / num_classes)
    return out


def probe_workdir(workdir: str, data_dir: str, name: str) -> dict:
    """The demo's quick probe: the latest checkpoint of ``workdir`` on dataset ``name``
    (its train / valid / test splits or folds, as eval.py reads them)."""
    emb = Embedder.from_workdir(workdir)
    result = evaluate_task(name, data_dir, {"encoder": (emb.clip_embedding, None)})
    return dict(test_accuracy=result["encoder"]["test_accuracy"], chance=result["chance"],
                dataset=result["dataset"], protocol=result["protocol"],
                num_test=result["num_test"])
