"""Checks a pretraining config once, at start, before anything is compiled or written.

Every field of ``configs/common.py``'s config has a rule here; :func:`check_config` raises a
:class:`ConfigError` whose message names the field (``config.optim.base_lr must be > 0; got
-0.001``), and lists fields that the config has but no rule knows (a typo in a config file)
or that it lacks. Free-form fields (``model.decoder``, ``masking.options``) are checked by
building what they describe.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from dwm_jax import masking, objectives
from dwm_jax.models import vit


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def _integer(low: int | None = None):
    def rule(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return "must be an integer"
        if low is not None and v < low:
            return f"must be >= {low}"
    return rule


def _number(low=None, high=None, low_open=False, high_open=False):
    def rule(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return "must be a finite number"
        if low is not None and (v <= low if low_open else v < low):
            return f"must be {'>' if low_open else '>='} {low}"
        if high is not None and (v >= high if high_open else v > high):
            return f"must be {'<' if high_open else '<='} {high}"
    return rule


def _boolean(v):
    if not isinstance(v, bool):
        return "must be True or False"


def _string(v):
    if not isinstance(v, str) or not v:
        return "must be a non-empty string"


def _optional_string(v):
    if not isinstance(v, str):
        return "must be a string"


def _one_of(*choices):
    def rule(v):
        if v not in choices:
            return f"must be one of {list(choices)}"
    return rule


def _pair(v):
    if (not isinstance(v, (tuple, list)) or len(v) != 2 or
            any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in v)):
        return "must be two positive integers"


def _size(v):
    try:
        vit.parse_size(v)
    except ValueError:
        return f"must be one of {list(vit.SIZES)} or 'DIMxDEPTHxHEADS[xMLP_RATIO]'"


def _steps_range(v):
    from dwm_jax import profiling
    if not isinstance(v, str):
        return "must be a string 'A:B' or ''"
    try:
        profiling.parse_steps(v)
    except ValueError as e:
        return str(e)


def _free(v):  # checked by building what it describes
    if not isinstance(v, dict) and not hasattr(v, "to_dict"):
        return "must be a dict"


RULES: dict[str, Callable[[Any], str | None]] = {
    "seed": _integer(0),
    "batch_size": _integer(1),
    "epochs": _integer(1),
    "total_steps": _integer(0),
    "num_devices": _integer(0),
    "fsdp": _boolean,
    "init_from": _optional_string,
    "data.data_dir": _string,
    "data.name": _string,
    "data.split": _string,
    "data.build_if_missing": _boolean,
    "data.worker_count": _integer(0),
    "data.prefetch": _integer(0),
    "model.size": _size,
    "model.input_shape": _pair,
    "model.patch_size": _pair,
    "model.decoder": _free,
    "model.compute_dtype": _one_of("float32", "bfloat16"),
    "model.attention": _one_of(*vit.ATTENTION),
    "model.remat": _one_of(*vit.REMAT_POLICIES),
    "model.scan_layers": _boolean,
    "objective.name": _one_of(*objectives.OBJECTIVES),
    "objective.ema_start": _number(0.0, 1.0, high_open=True),
    "objective.ema_end": _number(0.0, 1.0, high_open=True),
    "objective.norm_pix": _boolean,
    "objective.target_mode": _one_of(*objectives.M2D.TARGET_MODES),
    "masking.name": _one_of(*masking.MASKERS),
    "masking.mask_ratio": _number(0.0, 1.0, low_open=True, high_open=True),
    "masking.options": _free,
    "masking.hint.mode": _one_of("schedule", "constant", "none"),
    "masking.hint.start_epoch": _integer(0),
    "masking.hint.k": _number(0.0, low_open=True),
    "masking.hint.constant": _number(0.0, 1.0),
    "optim.base_lr": _number(0.0, low_open=True),
    "optim.warmup_epochs": _number(0.0),
    "optim.weight_decay": _number(0.0),
    "optim.b1": _number(0.0, 1.0, high_open=True),
    "optim.b2": _number(0.0, 1.0, high_open=True),
    "optim.eps": _number(0.0, low_open=True),
    "optim.clip": _number(0.0, low_open=True),
    "optim.decay_tokens": _boolean,
    "log_every": _integer(1),
    "profile_steps": _steps_range,
    "log_data_fingerprint": _boolean,
    "ckpt_every": _integer(1),
    "keep_ckpts": _integer(1),
    "probe.enabled": _boolean,
    "probe.name": _optional_string,
}
_FREE = ("model.decoder", "masking.options")


def _flatten(node, prefix="") -> dict[str, Any]:
    out = {}
    items = node.items() if hasattr(node, "items") else []
    for k, v in items:
        path = f"{prefix}{k}"
        if path in _FREE or not hasattr(v, "items"):
            out[path] = v
        else:
            out.update(_flatten(v, path + "."))
    return out


def check_config(cfg) -> None:
    """Raises ConfigError naming the first bad field of a pretraining config."""
    fields = _flatten(cfg)
    unknown = sorted(set(fields) - set(RULES))
    if unknown:
        raise ConfigError(f"config has unknown field(s) {', '.join('config.' + u for u in unknown)}"
                          f"; known fields are listed in dwm_jax/validation.py")
    missing = sorted(set(RULES) - set(fields))
    if missing:
        raise ConfigError(f"config lacks field(s) {', '.join('config.' + m for m in missing)}; "
                          "start from configs/common.py's base()")
    for path, rule in RULES.items():
        problem = rule(fields[path])
        if problem:
            raise ConfigError(f"config.{path} {problem}; got {fields[path]!r}")
    _check_together(cfg)


def _check_together(cfg) -> None:
    """Rules that span fields: shapes, widths, the masker, the schedule."""
    m = cfg.model
    try:
        masking.patch_grid(tuple(m.input_shape), tuple(m.patch_size))
    except ValueError as e:
        raise ConfigError(f"config.model.input_shape / patch_size: {e}") from None
    size = vit.parse_size(m.size)
    if size.dim % size.heads or size.dim % 4:
        raise ConfigError(f"config.model.size {m.size!r}: width {size.dim} must divide by its "
                          f"{size.heads} heads and by 4")
    if m.attention == "cudnn":
        import jax
        if m.compute_dtype != "bfloat16" or jax.default_backend() != "gpu":
            raise ConfigError("config.model.attention='cudnn' needs an NVIDIA GPU and "
                              f"model.compute_dtype='bfloat16' (this run: "
                              f"{jax.default_backend()}, {m.compute_dtype}); use 'xla'")
    decoder = dict(m.decoder)
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
    try:
        masking.make_masker(cfg.masking.name, input_shape=tuple(m.input_shape),
                            patch_size=tuple(m.patch_size), mask_ratio=cfg.masking.mask_ratio,
                            **dict(cfg.masking.options))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.masking: {e}") from None
    if cfg.objective.ema_start > cfg.objective.ema_end:
        raise ConfigError(f"config.objective.ema_start ({cfg.objective.ema_start}) must not "
                          f"exceed ema_end ({cfg.objective.ema_end})")
