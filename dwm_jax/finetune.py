"""Fine-tuning: the whole pretrained encoder plus a linear head, trained on a labelled task.

The model is :class:`Classifier`: the encoder's tokens, the frequency tokens of each time
step concatenated (the linear probe's features), the mean over time, LayerNorm and a linear
head. The recipe (``configs/finetune.py``) is the usual one for audio transformers: random
crops of the encoder's input width; mixup of inputs and targets; one time and one frequency
band of the normalised log-mel set to 0 (the mean) per clip; AdamW with layer-wise
learning-rate decay (the head and final norm get ``lr``, block ``i`` of ``L`` gets
``lr * layer_decay ** (L - i)``, the patch embedding ``lr * layer_decay ** (L + 1)``),
linear warm-up then cosine, clipping; early stopping on the validation score. Whole clips
are scored as the linear probe embeds them (``Embedder``: chunks of the input width, features
averaged over the clip), with the best validation epoch's weights. Single-label tasks train
with softmax cross-entropy and report accuracy; multi-label tasks with sigmoids and report
mAP (and macro AUC).

Each task (each test fold of a fold dataset) runs in its own directory with Orbax
checkpoints at every epoch end (the state, the best weights so far and the history): a run
stopped at any point and started again with the same command resumes at the last epoch end
and ends where an uninterrupted run ends. One process; small datasets are held in memory.
"""

from __future__ import annotations

from dwm_jax._extras import require

require("eval", "flax", "optax", "orbax", "ml_collections")

import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dwm_jax import build, checkpointing, config, probe, weights
from dwm_jax import data as data_lib
from dwm_jax.embedding import Embedder
from dwm_jax.errors import NonFiniteError


class Classifier(nnx.Module):
    """Encoder -> per-time-step features [B, T' / pw, Fp * dim] -> mean over time -> LayerNorm
    -> Linear -> logits [B, num_classes]. Input: normalised log-mel [B, F, T']."""

    def __init__(self, encoder, num_classes: int, *, rngs: nnx.Rngs):
        self.encoder = encoder
        width = encoder.grid[0] * encoder.size.dim
        self.norm = nnx.LayerNorm(width, epsilon=1e-6, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs,
                               kernel_init=nnx.initializers.normal(0.01))

    def features(self, x):
        return self.encoder.time_features(x).mean(axis=1)

    def __call__(self, x):
        return self.head(self.norm(self.features(x)))


def layer_scales(params: dict, depth: int, decay: float) -> dict:
    """The learning-rate factor of every parameter (same tree): the head and the final
    norms 1, block ``i`` (0-based) ``decay ** (depth - i)``, the patch embedding and CLS
    ``decay ** (depth + 1)``. Scanned blocks get one factor per layer along their axis 0."""
    def scale(path, leaf):
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[0] != "encoder" or keys[1] == "norm":
            return np.float32(1.0)
        if keys[1] != "blocks":                     # patch_embed, cls_token
            return np.float32(decay ** (depth + 1))
        if keys[2].isdigit():                       # per-layer layout
            return np.float32(decay ** (depth - int(keys[2])))
        per_layer = decay ** (depth - np.arange(depth, dtype=np.float64))
        return per_layer.reshape((depth,) + (1,) * (np.ndim(leaf) - 1)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(scale, params)


def make_optimizer(cfg, params, depth: int, steps_per_epoch: int, total_steps: int):
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup,
                                                  max(total_steps, warmup + 1))
    scales = layer_scales(params, depth, cfg.layer_decay)
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip),
        optax.adamw(schedule, weight_decay=cfg.weight_decay,
                    mask=lambda p: build.decay_mask(p, decay_tokens=False)),
        optax.stateless(lambda updates, _: jax.tree.map(lambda u, s: u * s, updates, scales)))


def augment(key, x, y, cfg):
    """Mixup (one Beta weight per batch, partners by a random permutation) and one
    frequency and one time band per clip set to 0. x [B, F, T] normalised, y [B, C] targets."""
    k_lam, k_perm, k_f, k_t = jax.random.split(key, 4)
    if cfg.mixup > 0:
        lam = jax.random.beta(k_lam, cfg.mixup, cfg.mixup)
        perm = jax.random.permutation(k_perm, x.shape[0])
        x = lam * x + (1 - lam) * x[perm]
        y = lam * y + (1 - lam) * y[perm]

    def band(k, size, widest, axis):
        kw, ks = jax.random.split(k)
        width = jax.random.randint(kw, (x.shape[0], 1), 0, widest + 1)
        start = jax.random.randint(ks, (x.shape[0], 1), 0, size - width + 1)
        where = jnp.arange(size)[None]
        hit = (where >= start) & (where < start + width)           # [B, size]
        return jnp.expand_dims(hit, axis)

    if cfg.freq_mask > 0:
        x = jnp.where(band(k_f, x.shape[1], min(cfg.freq_mask, x.shape[1]), 2), 0.0, x)
    if cfg.time_mask > 0:
        x = jnp.where(band(k_t, x.shape[2], min(cfg.time_mask, x.shape[2]), 1), 0.0, x)
    return x, y


def make_train_step(graphdef, optimizer, cfg, multi_label: bool):
    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        if multi_label:
            return optax.sigmoid_binary_cross_entropy(logits, y).mean()
        return optax.softmax_cross_entropy(logits, y).mean()

    @jax.jit
    def step(state, x, y):
        key = jax.random.fold_in(jax.random.key(cfg.seed), state["step"])
        x, y = augment(key, x, y, cfg)
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], x, y)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), loss
    return step


class _Clips:
    """A split held in memory: raw log-mels (as stored) and targets [n, C] (one-hot or
    multi-hot, float32)."""

    def __init__(self, split: data_lib.DatasetSplit, indices=None):
        indices = range(len(split)) if indices is None else indices
        examples = [split.source[int(i)] for i in indices]
        self.log_mels = [np.asarray(e["log_mel"]) for e in examples]
        c = split.num_classes
        if split.multi_label:
            self.targets = np.stack([np.asarray(e["labels"], np.float32) for e in examples])
        else:
            self.targets = np.eye(c, dtype=np.float32)[[int(e["label"]) for e in examples]]
        self.pad_value = split.frontend.pad_value

    def __len__(self):
        return len(self.log_mels)

    def digest(self) -> str:
        """A hash of the targets: a rebuild with other labels is another fine-tuning run."""
        return hashlib.sha256(np.ascontiguousarray(self.targets).tobytes()).hexdigest()[:12]


def _score(model_state, graphdef, embedder, clips: _Clips, multi_label: bool) -> dict:
    """Whole clips through the encoder (as the probe embeds them), then norm and head."""
    model = nnx.merge(graphdef, model_state)
    encoder_state = nnx.state(model.encoder)
    feats = np.stack([embedder.clip_embedding(lm, params=encoder_state)
                      for lm in clips.log_mels])
    logits = np.asarray(model.head(model.norm(jnp.asarray(feats))))
    if multi_label:
        s = probe.multilabel_scores(clips.targets, logits)
        return dict(score=s["map"], map=s["map"], auc=s["auc"])
    acc = float(np.mean(logits.argmax(1) == clips.targets.argmax(1)))
    return dict(score=acc, accuracy=acc)


def _batches(clips: _Clips, cfg, epoch: int, frames: int, stats):
    """This epoch's batches: a permutation and random crops drawn from (seed, epoch), so a
    resumed epoch reads what the uninterrupted one read. Drops the remainder."""
    rng = np.random.default_rng([cfg.seed, epoch])
    order = rng.permutation(len(clips))
    crop = data_lib.pipeline.CropAndNormalise(frames, stats, clips.pad_value, "random")
    for b in range(len(clips) // cfg.batch_size):
        idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        x = np.stack([crop.random_map({"log_mel": clips.log_mels[i]}, rng)["log_mel"]
                      for i in idx])
        yield x, clips.targets[idx]


def run(encoder, stats, train: _Clips, valid: _Clips, test: _Clips, cfg, run_dir: str,
        *, identity: dict, multi_label: bool, log=print) -> dict:
    """Fine-tunes ``encoder`` (a fresh copy of its weights) on ``train``, early-stopping on
    ``valid``; scores ``test`` with the best weights. Checkpoints in ``run_dir`` and resumes
    from them; ``identity`` (the source weights, the data, the config), with the labels
    added here, must match theirs (runs that predate the labels' entry match on the rest)."""
    identity = dict(identity, labels=[c.digest() for c in (train, valid, test)])
    if len(train) < cfg.batch_size:
        raise probe.ProbeError(f"fine-tuning needs a batch of {cfg.batch_size} training "
                               f"clips; the task has {len(train)} (--finetune.batch_size)")
    num_classes = train.targets.shape[1]
    frames = encoder.input_shape[1]
    model = Classifier(encoder, num_classes, rngs=nnx.Rngs(cfg.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    steps_per_epoch = len(train) // cfg.batch_size
    optimizer = make_optimizer(cfg, params, encoder.size.depth, steps_per_epoch,
                               steps_per_epoch * cfg.epochs)
    # what a checkpoint holds: the training state and the best validation epoch's weights
    saved = dict(state=dict(params=params, opt_state=optimizer.init(params),
                            step=jnp.zeros((), jnp.int32)),
                 best_params=params)
    train_step = make_train_step(graphdef, optimizer, cfg, multi_label)
    embedder = Embedder(encoder, stats)
    meta = dict(identity=identity, history=[], best_epoch=0, best_score=-1.0, wall_s=0.0)

    ckpt = checkpointing.Checkpointer(run_dir, keep=1, async_save=False)
    try:
        if ckpt.latest_step() is not None:
            def check(step, stored):
                theirs = stored.get("identity", {})
                ours = {k: v for k, v in identity.items() if k in theirs or k != "labels"}
                diffs = sorted(k for k in set(theirs) | set(ours)
                               if theirs.get(k) != ours.get(k))
                if diffs:
                    raise checkpointing.CheckpointMismatchError(
                        f"{ckpt.directory} holds a fine-tuning run with other "
                        f"{', '.join(diffs)}; remove it or use another --workdir / step")
            target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), saved)
            found = ckpt.restore_intact(target, check=check, warn=log)
            if found is not None:
                _, saved, meta = found
        state = saved["state"]
        epoch = len(meta["history"])
        started = time.perf_counter()
        while epoch < cfg.epochs and epoch - meta["best_epoch"] < cfg.patience:
            losses = []
            for x, y in _batches(train, cfg, epoch, frames, stats):
                state, loss = train_step(state, jnp.asarray(x), jnp.asarray(y))
                losses.append(loss)
            loss = float(np.mean(jax.device_get(losses)))
            if not np.isfinite(loss):
                raise NonFiniteError(
                    f"fine-tuning: non-finite loss in epoch {epoch + 1}; lower "
                    "--finetune.lr (nothing of this epoch was saved)")
            epoch += 1
            valid_score = _score(state["params"], graphdef, embedder, valid, multi_label)
            meta["history"].append(dict(epoch=epoch, loss=loss, valid=valid_score["score"]))
            if valid_score["score"] > meta["best_score"]:
                meta.update(best_epoch=epoch, best_score=valid_score["score"])
                saved["best_params"] = state["params"]
            saved["state"] = state
            meta["wall_s"] += time.perf_counter() - started
            started = time.perf_counter()
            ckpt.save(epoch, saved, None, meta)
            ckpt.wait()
            log(f"fine-tune epoch {epoch}: loss {loss:.4f}, valid {valid_score['score']:.4f}"
                f" (best {meta['best_score']:.4f} at epoch {meta['best_epoch']})")
    finally:
        ckpt.close()
    test_score = _score(saved["best_params"], graphdef, embedder, test, multi_label)
    return dict(test=test_score, valid_score=meta["best_score"], best_epoch=meta["best_epoch"],
                epochs=len(meta["history"]), wall_s=meta["wall_s"], history=meta["history"],
                test_targets=test.targets)


def finetune_task(spec: str, data_dir: str, workdir: str, step: int,
                  cfg: ml_collections.ConfigDict, *, out_dir: str, log=print) -> dict:
    """Fine-tunes ``workdir``'s encoder on task ``spec`` (train / valid / test, or each test
    fold against the others with 10 % of them held out for early stopping) -> a result dict
    like the probe's: {'test_score', 'test_accuracy' | 'test_map' + 'test_auc', 'protocol',
    'best_epochs', 'epochs', 'histories' (per run: epoch, loss, valid score), 'wall_s',
    'fold_scores'?, 'task_summary'}."""
    config.check_finetune(cfg)
    name, dataset = probe.resolve_task(spec, data_dir)
    plan = probe.task_splits(data_dir, dataset)
    first = data_lib.open_split(data_dir, dataset, probe.split_names(data_dir, dataset)[0])
    if not first.num_classes:
        raise probe.ProbeError(f"task {spec!r}: dataset {dataset} has no labels")
    multi = first.multi_label
    # every run starts from these weights (training makes new arrays; the module stays)
    enc, stats, _ = weights.load_encoder(workdir, step)
    identity = dict(source=Embedder(enc, stats).fingerprint, step=step,
                    data=data_lib.dataset_fingerprint(data_dir, dataset),
                    config=json.loads(cfg.to_json()))

    runs = []
    if "folds" in plan:
        folds = plan["folds"][: cfg.folds or None]
        for k, test_fold in enumerate(folds):
            rest = [f for f in plan["folds"] if f != test_fold]
            pool = data_lib.open_split(data_dir, dataset, "+".join(rest))
            order = np.random.default_rng(k).permutation(len(pool))
            n_valid = max(1, len(pool) // 10)
            test = _Clips(data_lib.open_split(data_dir, dataset, test_fold))
            runs.append(run(enc, stats, _Clips(pool, order[n_valid:]),
                            _Clips(pool, order[:n_valid]), test, cfg,
                            os.path.join(out_dir, name.replace("/", "_"), test_fold),
                            identity=dict(identity, fold=test_fold), multi_label=multi,
                            log=log))
        protocol = (f"fine-tuned, leave-one-fold-out over {len(folds)} of "
                    f"{len(plan['folds'])} folds")
    else:
        tr = data_lib.open_split(data_dir, dataset, plan["train"])
        if plan["valid"]:
            train, valid = _Clips(tr), _Clips(data_lib.open_split(data_dir, dataset,
                                                                   plan["valid"]))
        else:
            order = np.random.default_rng(0).permutation(len(tr))
            n_valid = max(1, len(tr) // 10)
            train, valid = _Clips(tr, order[n_valid:]), _Clips(tr, order[:n_valid])
        test = _Clips(data_lib.open_split(data_dir, dataset, plan["test"]))
        runs.append(run(enc, stats, train, valid, test, cfg,
                        os.path.join(out_dir, name.replace("/", "_")), identity=identity,
                        multi_label=multi, log=log))
        protocol = "fine-tuned, train / valid (early stopping) / test"
    scores = [r["test"]["score"] for r in runs]
    labels = np.concatenate([r["test_targets"] for r in runs])
    summary = dict(task=name, dataset=dataset, num_classes=first.num_classes,
                   metric="mAP" if multi else "accuracy", num_test=int(len(labels)),
                   chance=(float(labels.mean(0)[labels.sum(0) > 0].mean()) if multi
                           else 1.0 / first.num_classes))
    out = dict(test_score=float(np.mean(scores)), protocol=protocol, task_summary=summary,
               best_epochs=[r["best_epoch"] for r in runs],
               epochs=[r["epochs"] for r in runs], wall_s=sum(r["wall_s"] for r in runs),
               histories=[r["history"] for r in runs])
    if multi:
        out.update(test_map=out["test_score"],
                   test_auc=float(np.mean([r["test"]["auc"] for r in runs])))
    else:
        out["test_accuracy"] = out["test_score"]
    if len(runs) > 1:
        out["fold_scores"] = scores
    return out
