"""The pretraining config schema: every field once, with its default, its rule, whether a
resumed run may change it, and its value for checkpoints written before it existed.

Everything about a config derives from :data:`FIELDS`:

    cfg = base("m2d", "dispersion")      # the paper's settings, an ml_collections ConfigDict
    check(cfg)                           # ConfigError naming the first bad field
    cfg = from_stored(meta["config"])    # a checkpoint's config, older fields filled in
    resume_differences(old, new)         # what a resume would change, and what it may
    print(reference_markdown())          # the configuration reference of the docs

Defaults that depend on the objective or the masker (the decoder's size, the mask ratio, the
masker's options, whether it runs under the hint schedule) come from their registries in
``objectives`` and ``masking``. The launchable recipes in the repository's ``configs/``
start from :func:`base` and change what differs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable

import jax
import ml_collections

from dwm_jax import build, masking, objectives, profiling, sharding
from dwm_jax.models import vit


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


# ------------------------------------------------------------------------------------ rules
# A rule returns None for a good value, else what is wrong; its ``text`` is the reference's.

def _described(text: str):
    def deco(rule):
        rule.text = text
        return rule
    return deco


def _integer(low: int | None = None, high: int | None = None):
    def rule(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return "must be an integer"
        if low is not None and v < low:
            return f"must be >= {low}"
        if high is not None and v > high:
            return f"must be <= {high}"
    rule.text = "integer" + (f" >= {low}" if low is not None else "") + (
        f", <= {high}" if high is not None else "")
    return rule


def _number(low=None, high=None, low_open=False, high_open=False):
    def rule(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return "must be a finite number"
        if low is not None and (v <= low if low_open else v < low):
            return f"must be {'>' if low_open else '>='} {low}"
        if high is not None and (v >= high if high_open else v > high):
            return f"must be {'<' if high_open else '<='} {high}"
    lo = "" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    rule.text = f"number in {lo or '(-inf'}, {hi or 'inf)'}"
    return rule


@_described("True / False")
def _boolean(v):
    if not isinstance(v, bool):
        return "must be True or False"


@_described("non-empty string")
def _string(v):
    if not isinstance(v, str) or not v:
        return "must be a non-empty string"


@_described("string")
def _optional_string(v):
    if not isinstance(v, str):
        return "must be a string"


def _one_of(choices: Callable[[], tuple]):
    """``choices`` is called at check time, so registries filled later count."""
    def rule(v):
        if v not in choices():
            return f"must be one of {list(choices())}"
    rule.text = "one of " + ", ".join(f"`{c}`" for c in choices())
    return rule


@_described("two positive integers")
def _pair(v):
    if (not isinstance(v, (tuple, list)) or len(v) != 2 or
            any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in v)):
        return "must be two positive integers"


@_described("a size name or DxLxH")
def _size(v):
    try:
        vit.parse_size(v)
    except ValueError:
        return f"must be one of {list(vit.SIZES)} or 'DIMxDEPTHxHEADS[xMLP_RATIO]'"


@_described("'A:B' or ''")
def _steps_range(v):
    if not isinstance(v, str):
        return "must be a string 'A:B' or ''"
    try:
        profiling.parse_steps(v)
    except ValueError as e:
        return str(e)


@_described("dict, checked by building it")
@_described("('REGEX=SPEC', ...)")
def _sharding_rules(v):
    if not isinstance(v, (tuple, list)) or not all(isinstance(r, str) for r in v):
        return "must be a tuple of 'REGEX=SPEC' strings"
    try:
        sharding.parse_rules(v)
    except ValueError as e:
        return f"holds a rule that cannot be read ({e})"


def _free(v):  # checked by building what it describes
    if not isinstance(v, dict) and not hasattr(v, "to_dict"):
        return "must be a dict"


# ----------------------------------------------------------------------------------- schema

_NO_LEGACY = object()


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field.

    Attributes:
        path: the dotted name, e.g. ``optim.base_lr``.
        default: its value, or a function ``(objective, masker) -> value`` for the fields
            whose default depends on them.
        rule: ``rule(value) -> None`` when the value can work, else what is wrong.
        doc: one line for the configuration reference.
        resumable: a resumed run may change it (how a run is observed, saved and placed,
            not what it computes); any other change is refused.
        legacy: the value a checkpoint written before the field existed behaves as.
    """

    path: str
    default: Any
    rule: Callable[[Any], str | None]
    doc: str
    resumable: bool = False
    legacy: Any = _NO_LEGACY

    @property
    def has_legacy(self) -> bool:
        return self.legacy is not _NO_LEGACY

    def default_for(self, objective: str, masker: str):
        return self.default(objective, masker) if callable(self.default) else self.default


def _decoder(objective, masker):
    return dict(objectives.OBJECTIVES[objective].default_decoder)


def _mask_ratio(objective, masker):
    return objectives.OBJECTIVES[objective].mask_ratio


def _masker_options(objective, masker):
    return dict(masking.MASKERS[masker].defaults)


def _hint_mode(objective, masker):
    return "schedule" if masking.MASKERS[masker].takes_hints else "none"


def _names(registry) -> Callable[[], tuple]:
    return lambda: tuple(registry)


F = Field
FIELDS: tuple[Field, ...] = (
    F("seed", 0, _integer(0, 2**32 - 1), "seeds the initialisation, the data order and the masks"),
    F("batch_size", 2048, _integer(1), "global batch, over all hosts and devices"),
    F("epochs", 300, _integer(1), "length of the run in epochs (when total_steps is 0)"),
    F("total_steps", 0, _integer(0), "length in steps; 0: epochs x steps per epoch"),
    F("num_devices", 0, _integer(0), "devices of the mesh; 0: all visible", resumable=True),
    F("fsdp", False, _boolean, "shard parameters and optimizer state over the mesh",
      resumable=True),
    F("mesh.fsdp", 1, _integer(1),
      "size of the mesh's fsdp axis: the batch and the parameters and optimizer state are "
      "split over it (1: none)", resumable=True, legacy=1),
    F("mesh.slices", 1, _integer(1),
      "slices of a multi-slice job: the outer mesh axis, over the data-centre network (data "
      "parallel)", resumable=True, legacy=1),
    F("mesh.rules", (), _sharding_rules,
      "parameter sharding rules 'REGEX=SPEC' (first found in an array's path wins; SPEC: "
      "slice, data, fsdp or None per dimension); others: the largest dimension over fsdp",
      resumable=True, legacy=()),
    F("init_from", "", _optional_string,
      "another workdir (a run or converted weights) to start from: its encoder, and its "
      "predictor / decoder and M2D target where they fit", legacy=""),
    F("data.data_dir", "data", _string, "TFDS data directory", resumable=True),
    F("data.name", "audio_folder/audioset", _string, "dataset as builder/config"),
    F("data.split", "train", _string, "the split pretrained on"),
    F("data.build_if_missing", False, _boolean,
      "build a synthetic_sounds dataset on first use", resumable=True),
    F("data.worker_count", 8, _integer(0), "Grain worker processes (0: in-process)",
      resumable=True),
    F("data.prefetch", 2, _integer(0), "batches placed on the devices ahead of the step",
      resumable=True, legacy=2),
    F("model.size", "base", _size, "ViT size: a name or 'DIMxDEPTHxHEADS[xMLP_RATIO]'"),
    F("model.input_shape", (80, 608), _pair, "(mel bins, frames) of one input crop"),
    F("model.patch_size", (16, 16), _pair, "(frequency, time) size of one patch"),
    F("model.decoder", _decoder, _free,
      "decoder / predictor sizes (dim, depth, heads, mlp_ratio); default: the objective's"),
    F("model.compute_dtype", "float32", _one_of(lambda: tuple(build.DTYPES)),
      "parameters stay float32; 'bfloat16' computes in bf16"),
    F("model.attention", "xla", _one_of(lambda: vit.ATTENTION),
      "jax.nn.dot_product_attention implementation: 'xla' or 'cudnn' (GPU, bf16)",
      legacy="xla"),
    F("model.remat", "none", _one_of(lambda: tuple(vit.REMAT_POLICIES)),
      "per-block rematerialisation policy", resumable=True, legacy="none"),
    F("model.scan_layers", False, _boolean,
      "blocks under one jax.lax.scan: compile time flat in depth", legacy=False),
    F("objective.name", lambda objective, masker: objective, _one_of(_names(objectives.OBJECTIVES)),
      "the masked-prediction objective"),
    F("objective.ema_start", 0.99995, _number(0.0, 1.0, high_open=True),
      "M2D: EMA decay at step 0"),
    F("objective.ema_end", 0.99999, _number(0.0, 1.0, high_open=True),
      "M2D: EMA decay at the last step"),
    F("objective.norm_pix", True, _boolean,
      "the authors' norm_pix_loss (MSM-MAE: standardised patches; M2D: standardised target "
      "tokens)"),
    F("objective.target_mode", "m2d", _one_of(lambda: objectives.M2D.TARGET_MODES),
      "M2D: 'm2d' (own init, EMA of the blocks and norm) or 'ema_encoder' (an EMA copy of "
      "the whole encoder)", legacy="m2d"),
    F("masking.name", lambda objective, masker: masker, _one_of(_names(masking.MASKERS)),
      "the mask sampler"),
    F("masking.mask_ratio", _mask_ratio, _number(0.0, 1.0, low_open=True, high_open=True),
      "fraction of patches masked; default: the objective's (M2D 0.7, MSM-MAE 0.75)"),
    F("masking.options", _masker_options, _free,
      "the masker's own options; default: those it registers"),
    F("masking.hint.mode", _hint_mode, _one_of(lambda: ("schedule", "constant", "none")),
      "r_h: 'schedule' (1 before start_epoch, then 1 - (e/E)^k), 'constant' or 'none' (0); "
      "default: 'schedule' for the maskers that take hints"),
    F("masking.hint.start_epoch", 50, _integer(0), "first epoch of the hint decay"),
    F("masking.hint.k", 2, _number(0.0, low_open=True), "exponent of the hint decay"),
    F("masking.hint.constant", 1.0, _number(0.0, 1.0), "r_h when mode is 'constant'"),
    F("optim.base_lr", 3e-4, _number(0.0, low_open=True),
      "peak learning rate per 256 examples (peak = base_lr * batch_size / 256)"),
    F("optim.warmup_epochs", 20, _number(0.0), "linear warm-up, then cosine to 0"),
    F("optim.weight_decay", 0.05, _number(0.0), "AdamW's decoupled weight decay"),
    F("optim.b1", 0.9, _number(0.0, 1.0, high_open=True), "AdamW beta 1"),
    F("optim.b2", 0.95, _number(0.0, 1.0, high_open=True), "AdamW beta 2"),
    F("optim.eps", 1e-8, _number(0.0, low_open=True), "AdamW epsilon", legacy=1e-8),
    F("optim.clip", 3.0, _number(0.0, low_open=True), "global gradient-norm clipping"),
    F("optim.decay_tokens", True, _boolean,
      "timm's grouping: the CLS and mask tokens are decayed too", legacy=True),
    F("log_every", 50, _integer(1), "steps between metric rows", resumable=True),
    F("profile_steps", "", _steps_range,
      "'A:B': a JAX profiler trace of steps A..B-1 in WORKDIR/profile", resumable=True,
      legacy=""),
    F("log_data_fingerprint", False, _boolean, "crc32 of each logged batch in metrics.jsonl",
      resumable=True),
    F("ckpt_every", 1000, _integer(1), "steps between checkpoints", resumable=True),
    F("keep_ckpts", 3, _integer(1), "checkpoints kept", resumable=True),
    F("probe.enabled", False, _boolean, "after training, a linear probe (train.py)",
      resumable=True),
    F("probe.name", "", _optional_string,
      "the labelled dataset probed; '' = config.data.name", resumable=True),
)
# The fine-tuning recipe (eval.py --mode=finetune; configs/finetune.py): the usual one for
# audio transformers (the M2D, ATST and BEATs fine-tuning scripts).
FINETUNE_FIELDS: tuple[Field, ...] = (
    F("epochs", 30, _integer(1), "at most this many epochs; early stopping may end sooner"),
    F("patience", 10, _integer(1),
      "epochs without a better validation score before stopping"),
    F("batch_size", 32, _integer(1), "clips per step (the task needs at least this many)"),
    F("lr", 1e-3, _number(0.0, low_open=True), "peak learning rate of the head (the top layer)"),
    F("layer_decay", 0.75, _number(0.0, 1.0, low_open=True),
      "block i of L gets lr * layer_decay ** (L - i); the patch embedding one step less"),
    F("weight_decay", 0.05, _number(0.0), "AdamW's decoupled weight decay"),
    F("warmup_epochs", 3, _number(0.0), "linear warm-up, then cosine to 0"),
    F("clip", 3.0, _number(0.0, low_open=True), "global gradient-norm clipping"),
    F("mixup", 0.3, _number(0.0), "Beta(alpha, alpha) mixing weight; 0 turns mixup off"),
    F("freq_mask", 16, _integer(0), "widest frequency band masked per clip (mel bins; 0: off)"),
    F("time_mask", 64, _integer(0), "widest time band masked per clip (frames; 0: off)"),
    F("folds", 0, _integer(0), "fold datasets: how many test folds to run (0: all)"),
    F("seed", 0, _integer(0, 2**32 - 1), "seeds the head, the batches and the augmentation"),
)

@_described("increasing numbers in (0, 1)")
def _thresholds(v):
    if (not isinstance(v, (tuple, list)) or not v
            or any(_number(0.0, 1.0, low_open=True, high_open=True)(t) for t in v)
            or list(v) != sorted(set(v))):
        return "must be increasing numbers in (0, 1)"


# Frame-level evaluation (eval.py on a dataset built with an events table; configs/sed.py).
SED_FIELDS: tuple[Field, ...] = (
    F("median_window_s", 0.48, _number(0.0, 60.0),
      "median filter over the step probabilities, in seconds (an odd number of steps; 0: "
      "none; at most the task's longest clip)"),
    F("thresholds", (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), _thresholds,
      "decision thresholds: the best on valid (segment F1) scores test; all make PSDS"),
    F("segment_s", 1.0, _number(0.0, low_open=True), "segment of the segment-based metrics"),
    F("collar_s", 0.2, _number(0.0), "onset collar of the event-based F1 (seconds)"),
    F("offset_fraction", 0.2, _number(0.0, 1.0),
      "offset collar: max(collar, this x the reference event's length)"),
)
del F
BY_PATH: dict[str, Field] = {f.path: f for f in FIELDS}
_FREE = tuple(f.path for f in FIELDS if f.rule is _free)


# --------------------------------------------------------------------------- building, reading

def _set(tree: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = value


def base(objective: str = "m2d", masker: str = "dispersion") -> ml_collections.ConfigDict:
    """The paper's settings for ``objective`` with ``masker`` (ViT-B, 80 x 608, batch 2048,
    300 epochs, AdamW, warm-up + cosine, clipping 3.0), every field of the schema set."""
    if objective not in objectives.OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(objectives.OBJECTIVES)}; got "
                         f"{objective!r}")
    if masker not in masking.MASKERS:
        raise ValueError(f"masker must be one of {sorted(masking.MASKERS)}; got {masker!r}")
    tree: dict = {}
    for f in FIELDS:
        _set(tree, f.path, f.default_for(objective, masker))
    return ml_collections.ConfigDict(tree)


def override(cfg, path: str, value):
    """Sets the field ``path`` ('a.b.c') of ``cfg`` (a ConfigDict); returns ``cfg``."""
    *parents, last = path.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[last] = value
    return cfg


def flatten(node, prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} of a config (ConfigDict or dict); free-form fields stay whole."""
    out = {}
    for k, v in (node.items() if hasattr(node, "items") else []):
        path = f"{prefix}{k}"
        if path in _FREE or not hasattr(v, "items"):
            out[path] = v
        else:
            out.update(flatten(v, path + "."))
    return out


def from_stored(stored: dict) -> ml_collections.ConfigDict:
    """A config as a checkpoint stored it, with the fields added since filled in by their
    legacy values (the behaviour of runs before them)."""
    tree = ml_collections.ConfigDict(stored).to_dict()
    have = flatten(tree)
    for f in FIELDS:
        if f.path not in have and f.has_legacy:
            _set(tree, f.path, f.legacy)
    return ml_collections.ConfigDict(tree)


def to_json_dict(cfg) -> dict:
    """The config as plain JSON types (what config.json and checkpoints store)."""
    return json.loads(cfg.to_json_best_effort())


def resume_differences(stored: dict, new: dict) -> tuple[list, list]:
    """Compares a checkpoint's config with this run's -> (refused, accepted): lists of
    ``(field, checkpoint value, this run's value)``. Fields a resume may change are accepted;
    fields the checkpoint predates count with their legacy value."""
    old, now = flatten(to_json_dict(from_stored(stored))), flatten(new)
    diffs = [(k, old.get(k, "absent"), now.get(k, "absent"))
             for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]
    resumable = {f.path for f in FIELDS if f.resumable}
    return [d for d in diffs if d[0] not in resumable], [d for d in diffs if d[0] in resumable]


# --------------------------------------------------------------------------------- checking

def check(cfg) -> None:
    """Raises ConfigError naming the first bad field of a pretraining config."""
    fields = flatten(cfg)
    unknown = sorted(set(fields) - set(BY_PATH))
    if unknown:
        raise ConfigError(f"config has unknown field(s) {', '.join('config.' + u for u in unknown)}"
                          "; the configuration reference lists the fields "
                          "(python -m dwm_jax.config)")
    missing = sorted(set(BY_PATH) - set(fields))
    if missing:
        raise ConfigError(f"config lacks field(s) {', '.join('config.' + m for m in missing)}; "
                          "start from dwm_jax.config.base()")
    for f in FIELDS:
        problem = f.rule(fields[f.path])
        if problem:
            raise ConfigError(f"config.{f.path} {problem}; got {fields[f.path]!r}")
    _check_model(cfg.model)
    _check_decoder(dict(cfg.model.decoder))
    try:
        masking.make_masker(cfg.masking.name, input_shape=tuple(cfg.model.input_shape),
                            patch_size=tuple(cfg.model.patch_size),
                            mask_ratio=cfg.masking.mask_ratio, **dict(cfg.masking.options))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.masking: {e}") from None
    if cfg.objective.ema_start > cfg.objective.ema_end:
        raise ConfigError(f"config.objective.ema_start ({cfg.objective.ema_start}) must not "
                          f"exceed ema_end ({cfg.objective.ema_end})")


def finetune_base() -> ml_collections.ConfigDict:
    """The fine-tuning recipe's defaults, every field of :data:`FINETUNE_FIELDS` set."""
    return ml_collections.ConfigDict({f.path: f.default for f in FINETUNE_FIELDS})


def check_finetune(cfg) -> None:
    """Raises ConfigError naming the first bad ``--finetune.<field>``."""
    _check_flat(cfg, FINETUNE_FIELDS, "--finetune", "finetune_base")


def sed_base() -> ml_collections.ConfigDict:
    """The frame-level evaluation's defaults, every field of :data:`SED_FIELDS` set."""
    return ml_collections.ConfigDict({f.path: f.default for f in SED_FIELDS})


def check_sed(cfg) -> None:
    """Raises ConfigError naming the first bad ``--sed.<field>``."""
    _check_flat(cfg, SED_FIELDS, "--sed", "sed_base")


def _check_flat(cfg, fields: tuple[Field, ...], flag: str, base_name: str) -> None:
    given = dict(cfg.items())
    known = {f.path for f in fields}
    for name in sorted(set(given) - known):
        raise ConfigError(f"{flag}.{name}: the config has no such field; it has "
                          f"{', '.join(sorted(known))}")
    for f in fields:
        if f.path not in given:
            raise ConfigError(f"the {flag[2:]} config lacks field {f.path!r}; start from "
                              f"dwm_jax.config.{base_name}()")
        problem = f.rule(given[f.path])
        if problem:
            raise ConfigError(f"{flag}.{f.path} {problem}; got {given[f.path]!r}")


def _check_model(m) -> None:
    try:
        masking.patch_grid(tuple(m.input_shape), tuple(m.patch_size))
    except ValueError as e:
        raise ConfigError(f"config.model.input_shape / patch_size: {e}") from None
    size = vit.parse_size(m.size)
    if size.dim % size.heads or size.dim % 4:
        raise ConfigError(f"config.model.size {m.size!r}: width {size.dim} must divide by its "
                          f"{size.heads} heads and by 4")
    if m.attention == "cudnn" and (m.compute_dtype != "bfloat16"
                                   or jax.default_backend() != "gpu"):
        raise ConfigError("config.model.attention='cudnn' needs an NVIDIA GPU and "
                          f"model.compute_dtype='bfloat16' (this run: "
                          f"{jax.default_backend()}, {m.compute_dtype}); use 'xla'")


def _check_decoder(decoder: dict) -> None:
    unknown = set(decoder) - {"dim", "depth", "heads", "mlp_ratio"}
    if unknown:
        raise ConfigError(f"config.model.decoder has unknown key(s) {sorted(unknown)}; it takes "
                          "dim, depth, heads, mlp_ratio")
    for key in ("dim", "depth", "heads"):
        if key in decoder and _integer(1)(decoder[key]):
            raise ConfigError(f"config.model.decoder.{key} must be an integer >= 1; got "
                              f"{decoder[key]!r}")
    dim = decoder.get("dim", 1)
    if dim % decoder.get("heads", 1) or dim % 4:
        raise ConfigError(f"config.model.decoder.dim {dim} must divide by its "
                          f"{decoder.get('heads')} heads and by 4")


# -------------------------------------------------------------------------------- reference

def _show(value) -> str:
    if callable(value):
        return "(see description)"
    return f"`{value!r}`"


def reference_markdown(fields: tuple[Field, ...] = FIELDS) -> str:
    """The configuration reference: a table of every field (the docs include it)."""
    lines = ["| field | default | rule | resume may change | description |",
             "|---|---|---|---|---|"]
    for f in fields:
        doc = f.doc + ("" if not f.has_legacy else
                       f" (checkpoints older than the field: `{f.legacy!r}`)")
        lines.append(f"| `{f.path}` | {_show(f.default)} | {getattr(f.rule, 'text', '')} | "
                     f"{'yes' if f.resumable else 'no'} | {doc} |")
    return "\n".join(lines) + "\n"


def reference_document() -> str:
    """docs/reference/config.md: the reference table with its heading and how it is made."""
    return ("# Configuration reference\n\n"
            "Every field of a pretraining config (`dwm_jax.config.FIELDS`). Generated by\n"
            "`python -m dwm_jax.config > docs/reference/config.md`; a test fails when this page\n"
            "and the schema disagree. Fields marked *resume may change* can differ when a run\n"
            "is resumed (they are recorded in `config_changes.jsonl`); any other difference is\n"
            "refused. Defaults shown as *(see description)* depend on the objective or the\n"
            "masker and come from their registries.\n\n" + reference_markdown() +
            "\n## Fine-tuning\n\n"
            "The recipe of `eval.py --mode=finetune` (`dwm_jax.config.FINETUNE_FIELDS`;\n"
            "`configs/finetune.py`), each field overridable as `--finetune.<field>=value`.\n"
            "A rerun with another value of any field is refused while the earlier run's\n"
            "checkpoints (under `RUN/eval/finetune/`) remain.\n\n"
            + reference_markdown(FINETUNE_FIELDS) +
            "\n## Frame-level evaluation\n\n"
            "The settings of `eval.py` on a frame-level task (a dataset built with an events\n"
            "table; `dwm_jax.config.SED_FIELDS`, `configs/sed.py`), each overridable as\n"
            "`--sed.<field>=value`.\n\n" + reference_markdown(SED_FIELDS))


if __name__ == "__main__":
    print(reference_document(), end="")
