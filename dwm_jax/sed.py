"""Frame-level evaluation (sound event detection) on frozen features: where in time, not
only what.

A frame-level task is a dataset built with an events table (``frame_labels`` [C, frames],
``data/events.py``). Each featuriser gives one vector per encoder time step (a patch width,
16 frames = 160 ms): the Embedder's ``time_features``, or for the raw baseline the mean and
std of the log-mel's frames in the step. A linear layer with one sigmoid per class is trained
on the steps of the train clips (targets: a class is active in a step when it is in any of
its frames), early-stopped on the valid steps' mAP; the decision threshold is the one of
``cfg.thresholds`` with the best segment-based F1 on valid. Test probabilities are median
filtered over ``cfg.median_window_s`` and thresholded; runs of active steps are the
detected events. Scored as sed_eval does (``tests/test_sed.py`` compares):

* segment-based F1 and error rate over ``cfg.segment_s`` segments (micro, over all files);
* event-based F1 with a ``cfg.collar_s`` onset collar and an offset collar of
  max(collar, ``cfg.offset_fraction`` x the reference length), one-to-one matching;
* PSDS1 and PSDS2 (DCASE's two scenarios) through sed_scores_eval, threshold-independent,
  on the median-filtered test probabilities, where sed_scores_eval is installed.

The reference events are read from the frame targets (runs at 10 ms resolution): same-class
rows of a table that overlap or meet are one event (the build merges them and says so).
"""

from __future__ import annotations

from dwm_jax._extras import require

require("eval", "flax", "optax")

import importlib.util
import os
import re

import numpy as np

from dwm_jax import data as data_lib
from dwm_jax import probe
from dwm_jax.data.events import runs_to_events

Event = tuple  # (onset s, offset s, label)


# ------------------------------------------------------------------------------- metrics

def _segment_roll(events, labels: list[str], segment: float, n_segments: int) -> np.ndarray:
    roll = np.zeros((n_segments, len(labels)), bool)
    for onset, offset, label in events:
        first, last = int(np.floor(onset / segment)), int(np.ceil(offset / segment))
        roll[first:max(last, first + 1), labels.index(label)] = True
    return roll


def segment_metrics(reference: list[list[Event]], estimated: list[list[Event]],
                    labels: list[str], segment: float = 1.0) -> dict:
    """Segment-based scores over files (lists of events per file): a class is active in a
    segment when an event of it overlaps the segment. Micro F1, precision, recall and the
    error rate (substitutions + deletions + insertions) / active reference classes."""
    tp = fp = fn = subs = dels = ins = n_ref = 0
    for ref, est in zip(reference, estimated):
        end = max([o for _, o, _ in ref + est] or [0.0])
        n = int(np.ceil(end / segment))
        r, e = _segment_roll(ref, labels, segment, n), _segment_roll(est, labels, segment, n)
        tp_k = (r & e).sum(1)
        fn_k, fp_k = (r & ~e).sum(1), (~r & e).sum(1)
        tp, fp, fn = tp + tp_k.sum(), fp + fp_k.sum(), fn + fn_k.sum()
        subs += np.minimum(fn_k, fp_k).sum()
        dels += np.maximum(0, fn_k - fp_k).sum()
        ins += np.maximum(0, fp_k - fn_k).sum()
        n_ref += r.sum()
    return dict(f1=_f1(tp, fp, fn), precision=float(tp / max(tp + fp, 1)),
                recall=float(tp / max(tp + fn, 1)),
                error_rate=float((subs + dels + ins) / max(n_ref, 1)))


def _f1(tp, fp, fn) -> float:
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def _max_matching(pairs: dict[int, list[int]]) -> int:
    """Size of a maximum bipartite matching (augmenting paths); ``pairs``: left -> rights."""
    owner: dict[int, int] = {}

    def augment(left, seen):
        for right in pairs[left]:
            if right not in seen:
                seen.add(right)
                if right not in owner or augment(owner[right], seen):
                    owner[right] = left
                    return True
        return False
    return sum(augment(left, set()) for left in pairs)


def event_metrics(reference: list[list[Event]], estimated: list[list[Event]],
                  collar: float = 0.2, offset_fraction: float = 0.2) -> dict:
    """Event-based scores over files: an estimate matches a reference event of the same
    class when the onsets differ by at most ``collar`` and the offsets by at most
    max(``collar``, ``offset_fraction`` x the reference's length); each event matches once
    (a maximum matching). Micro F1, precision, recall."""
    tp = n_ref = n_est = 0
    for ref, est in zip(reference, estimated):
        n_ref, n_est = n_ref + len(ref), n_est + len(est)
        pairs = {i: [j for j, (eo, ef, el) in enumerate(est)
                     if el == rl and abs(eo - ro) <= collar
                     and abs(ef - rf) <= max(collar, offset_fraction * (rf - ro))]
                 for i, (ro, rf, rl) in enumerate(ref)}
        tp += _max_matching(pairs)
    return dict(f1=_f1(tp, n_est - tp, n_ref - tp), precision=float(tp / max(n_est, 1)),
                recall=float(tp / max(n_ref, 1)))


# ----------------------------------------------------------------------- post-processing

def median_filter(probs: np.ndarray, window: int) -> np.ndarray:
    """Median over ``window`` (odd) consecutive steps of each class [T, C], edges repeated."""
    if window <= 1:
        return probs
    half = window // 2
    padded = np.pad(probs, ((half, half), (0, 0)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, window, axis=0)
    return np.median(windows, axis=-1)


def decode(active: np.ndarray, step_s: float, labels, end: float) -> list[Event]:
    """Active steps [T, C] -> events (onset, offset, label), offsets cut at ``end``."""
    return [(on, off, label) for c, label in enumerate(labels)
            for on, off in runs_to_events(active[:, c], step_s, end)]


def reference_events(frame_labels: np.ndarray, fps: float, labels) -> list[Event]:
    """Frame targets [C, frames] -> events at the frame rate (frame i spans [i, i+1) / fps)."""
    return decode(np.asarray(frame_labels).T.astype(bool), 1.0 / fps, labels,
                  end=frame_labels.shape[1] / fps)


def step_targets(frame_labels: np.ndarray, steps: int, patch_w: int) -> np.ndarray:
    """[C, frames] -> [steps, C]: a class is active in a step when it is in any of its
    ``patch_w`` frames (frames past the clip count as inactive)."""
    c, frames = frame_labels.shape
    padded = np.zeros((c, steps * patch_w), np.float32)
    padded[:, :min(frames, steps * patch_w)] = frame_labels[:, :steps * patch_w]
    return padded.reshape(c, steps, patch_w).max(axis=2).T


def raw_step_features(log_mel: np.ndarray, patch_w: int = 16) -> np.ndarray:
    """Pooled raw log-mel per step [ceil(T / patch_w), 2 * n_mels]: mean and std of each mel
    bin over the step's frames (the clip-level raw baseline, per step)."""
    x = np.asarray(log_mel, np.float32)
    steps = -(-x.shape[1] // patch_w)
    out = np.empty((steps, 2 * x.shape[0]), np.float32)
    for j in range(steps):
        part = x[:, j * patch_w:(j + 1) * patch_w]
        out[j] = np.concatenate([part.mean(axis=1), part.std(axis=1)])
    return out


# --------------------------------------------------------------------------------- tasks

def is_frame_level(data_dir: str, spec: str) -> bool:
    """Whether the task's dataset carries frame targets (was built with an events table)."""
    _, dataset = probe.resolve_task(spec, data_dir)
    first = probe.split_names(data_dir, dataset)[0]
    return data_lib.open_split(data_dir, dataset, first).event_labels is not None


class _Split:
    """One split's clips: per-step features [sum of steps, D] with each clip's step count,
    step targets, the reference events and the clips' lengths."""

    def __init__(self, split, featurise, patch_w: int, cache: str | None, desc: str):
        fps = split.frontend.sample_rate / split.frontend.hop_length
        self.labels = list(split.event_labels)
        self.steps, self.targets, self.reference, self.seconds = [], [], [], []
        examples = [split.source[i] for i in range(len(split))]
        feats = _cached_steps(examples, featurise, cache, desc)
        for ex, f in zip(examples, feats):
            frame_labels = np.asarray(ex["frame_labels"])
            self.steps.append(len(f))
            self.targets.append(step_targets(frame_labels, len(f), patch_w))
            self.reference.append(reference_events(frame_labels, fps, self.labels))
            self.seconds.append(frame_labels.shape[1] / fps)
        self.x = np.concatenate(feats)
        self.y = np.concatenate(self.targets)

    def per_clip(self, values: np.ndarray) -> list[np.ndarray]:
        return np.split(values, np.cumsum(self.steps)[:-1])


def _cached_steps(examples, featurise, cache: str | None, desc: str) -> list[np.ndarray]:
    if cache and os.path.exists(cache):
        try:
            with np.load(cache) as f:
                x, lengths = f["x"], f["lengths"]
            if len(lengths) == len(examples):
                return np.split(x, np.cumsum(lengths)[:-1])
        except (OSError, ValueError, KeyError, EOFError):
            pass  # recomputed below
    feats = [np.asarray(f, np.float32) for f in probe.featurise_all(
        len(examples), lambda i: examples[i]["log_mel"], featurise, desc)]
    x = np.concatenate(feats)
    if not np.isfinite(x).all():
        raise probe.ProbeError(f"{desc}: the step features hold NaN or infinite values; are "
                               "the weights finite?")
    if cache:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        np.savez(cache + ".tmp.npz", x=x, lengths=np.asarray([len(f) for f in feats]))
        os.replace(cache + ".tmp.npz", cache)
    return feats


def _detect(probs_per_clip, split: _Split, threshold: float, window: int, step_s: float):
    return [decode(median_filter(p, window) >= threshold, step_s, split.labels, end)
            for p, end in zip(probs_per_clip, split.seconds)]


def _scores(split: _Split, detected, cfg) -> dict:
    seg = segment_metrics(split.reference, detected, split.labels, cfg.segment_s)
    ev = event_metrics(split.reference, detected, cfg.collar_s, cfg.offset_fraction)
    return dict(segment_f1=seg["f1"], segment_er=seg["error_rate"],
                segment_precision=seg["precision"], segment_recall=seg["recall"],
                event_f1=ev["f1"], event_precision=ev["precision"], event_recall=ev["recall"])


def probe_frames(train: _Split, valid: _Split, test: _Split, cfg, step_s: float) -> dict:
    """Fits the per-step classifier, picks the threshold on valid, scores test."""
    longest = max(valid.seconds + test.seconds)
    if cfg.median_window_s > longest:
        raise probe.ProbeError(f"--sed.median_window_s={cfg.median_window_s:g} is longer than "
                               f"the task's longest clip ({longest:.2f} s)")
    xtr, xva, xte = probe.standardise(train.x, valid.x, test.x)
    params, info = probe.train_multilabel(xtr, train.y, xva, valid.y)
    window = max(1, int(round(cfg.median_window_s / step_s))) | 1
    sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    p_valid = valid.per_clip(sigmoid(probe.logits(params, xva)))
    p_test = test.per_clip(sigmoid(probe.logits(params, xte)))
    on_valid = {t: segment_metrics(valid.reference, _detect(p_valid, valid, t, window, step_s),
                                   valid.labels, cfg.segment_s)["f1"] for t in cfg.thresholds}
    threshold = max(on_valid, key=lambda t: (on_valid[t], -abs(t - 0.5)))
    out = _scores(test, _detect(p_test, test, threshold, window, step_s), cfg)
    out.update(test_score=out["segment_f1"], threshold=float(threshold),
               valid_segment_f1=on_valid[threshold], median_window_steps=window,
               frame_map=probe.multilabel_scores(test.y, probe.logits(params, xte))["map"],
               **{k: v for k, v in info.items() if k != "valid_map"})
    filtered = [median_filter(p, window) for p in p_test]   # as the detections see them
    scores = psds(filtered, test.seconds, test.reference, test.labels, step_s)
    if scores is not None:
        out.update(scores)
    return out


# DCASE's two PSDS scenarios (DCASE 2021 task 4 onwards): detection and ground-truth
# intersection criteria, cross-trigger criterion and penalties, e_max 100 per hour
PSDS_SCENARIOS = {
    "psds1": dict(dtc_threshold=0.7, gtc_threshold=0.7, cttc_threshold=None, alpha_ct=0.0,
                  alpha_st=1.0),
    "psds2": dict(dtc_threshold=0.1, gtc_threshold=0.1, cttc_threshold=0.3, alpha_ct=0.5,
                  alpha_st=1.0),
}


def psds(probs_per_clip, seconds, reference, labels, step_s: float) -> dict | None:
    """PSDS1 and PSDS2 (sed_scores_eval, threshold-independent: every score is an operating
    point) of per-step class scores. ``probs_per_clip``: [T'_i, C] per clip, step ``i``
    covering [i * step_s, (i + 1) * step_s) cut at the clip's end; ``reference``: (onset,
    offset, label) per clip. None where sed_scores_eval is not installed."""
    if importlib.util.find_spec("sed_scores_eval") is None:
        return None
    from sed_scores_eval import intersection_based
    from sed_scores_eval.base_modules.scores import create_score_dataframe
    names = [f"clip{i}" for i in range(len(seconds))]
    scores = {}
    for name, p, end in zip(names, probs_per_clip, seconds):
        edges = np.minimum(np.arange(len(p) + 1) * step_s, end)
        keep = np.flatnonzero(np.diff(edges) > 0)      # steps wholly past the end go
        scores[name] = create_score_dataframe(np.asarray(p, np.float64)[keep],
                                              np.append(edges[keep], edges[keep[-1] + 1]),
                                              list(labels))
    truth = {name: [(float(on), float(off), label) for on, off, label in ref]
             for name, ref in zip(names, reference)}
    durations = dict(zip(names, map(float, seconds)))
    out = {}
    for key, scenario in PSDS_SCENARIOS.items():
        if len(labels) == 1:   # no other class to cross-trigger (sed_scores_eval needs one)
            scenario = dict(scenario, cttc_threshold=None, alpha_ct=0.0)
        out[key] = float(intersection_based.psds(scores, truth, durations, unit_of_time="hour",
                                                 max_efpr=100.0, **scenario)[0])
    return out


def evaluate_frame_task(spec: str, data_dir: str, featurisers: dict, cfg, *,
                        cache_dir: str | None = None) -> dict:
    """Probes every featuriser on one frame-level task -> {'task', 'data', 'num_test',
    'num_classes', 'metric', 'chance', 'protocol', <featuriser>: {test_score (segment F1),
    segment_er, event_f1, psds?, threshold, ...}}.

    ``featurisers``: {name: (log_mel -> step features [T', D], cache key or None, patch
    width in frames)}."""
    name, dataset = probe.resolve_task(spec, data_dir)
    plan = probe.task_splits(data_dir, dataset)
    if "folds" in plan or not plan["valid"]:
        raise probe.ProbeError(f"task {spec!r}: a frame-level task needs train, valid and "
                               "test splits")
    splits = {s: data_lib.open_split(data_dir, dataset, plan[s])
              for s in ("train", "valid", "test")}
    labels = splits["test"].event_labels
    fingerprint = data_lib.dataset_fingerprint(data_dir, dataset)
    slug = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{fingerprint}"
    out = dict(task=name, data=fingerprint, dataset=dataset, num_classes=len(labels),
               metric=f"segment F1 ({cfg.segment_s:g} s)")
    frontend = splits["test"].frontend
    for fname, (featurise, key, patch_w) in featurisers.items():
        step_s = patch_w * frontend.hop_length / frontend.sample_rate
        parts = {s: _Split(split, featurise, patch_w,
                           os.path.join(cache_dir, key, slug, f"{s}.npz")
                           if cache_dir and key else None, f"{name}:{s} {fname}")
                 for s, split in splits.items()}
        out[fname] = probe_frames(parts["train"], parts["valid"], parts["test"], cfg, step_s)
        test = parts["test"]
    out["num_test"] = len(test.reference)
    out["protocol"] = (f"frame level: per-step linear sigmoids, threshold from valid, median "
                       f"filter {cfg.median_window_s:g} s; event F1 collar {cfg.collar_s:g} s")
    everything = [[(0.0, end, label) for label in labels] for end in test.seconds]
    out["chance"] = segment_metrics(test.reference, everything, list(labels),
                                    cfg.segment_s)["f1"]
    return out
