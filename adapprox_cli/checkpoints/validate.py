"""Whether a loaded optimizer state is sound enough to convert or to train from.

A checkpoint can load cleanly and still be damaged: a negative or NaN second moment, an infinite
step, betas outside [0, 1), moments that do not match the model. The analyses only read such a
state (and may show odd numbers); ``convert`` and ``train`` would build on it and write NaN
weights or an inconsistent checkpoint with exit 0, so they call ``require_sound_state`` first.
Every check reads the tensors once, in chunks small enough not to copy a large moment.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from adapprox_cli.checkpoints.core import FACTOR_KEYS, SECOND_MOMENT_KEY, OptimizerCheckpoint, ParamState
from adapprox_cli.errors import InputError

_MOMENTS = ("exp_avg", SECOND_MOMENT_KEY, "max_exp_avg_sq", *FACTOR_KEYS)
_NON_NEGATIVE = (SECOND_MOMENT_KEY, "max_exp_avg_sq")
_CHUNK = 1 << 22  # elements per finiteness/sign pass: bounded temporaries for any moment size


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def tensor_problem(t: torch.Tensor, key: str, non_negative: bool = False) -> str | None:
    """What is wrong with one moment tensor's values (dtype, NaN/Inf, sign), or None."""
    if t.is_complex() or not t.is_floating_point():
        return f"{key} has dtype {str(t.dtype).removeprefix('torch.')} (moments are real floating point)"
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        if not bool(torch.isfinite(chunk).all()):
            bad = int((~torch.isfinite(chunk)).sum())
            return f"{key} holds {bad} NaN/Inf value(s)"
        if non_negative and bool((chunk < 0).any()):
            return f"{key} holds negative values (min {float(chunk.min()):.3g}; a second moment is >= 0)"
    return None


def param_problem(p: ParamState) -> str | None:
    """The first problem of one parameter's state, naming the parameter, or None."""
    shape = tuple(p.shape)
    numel = math.prod(shape) if shape else None
    for key in _MOMENTS:
        t = p.state.get(key)
        if not isinstance(t, torch.Tensor):
            continue
        problem = tensor_problem(t, key, non_negative=key in _NON_NEGATIVE)
        if problem:
            return f"parameter {p.name}: {problem}"
        if key in FACTOR_KEYS or numel is None:
            continue
        if tuple(t.shape) != shape and t.numel() != numel:
            return f"parameter {p.name}: {key} has shape {list(t.shape)} but the parameter is {list(shape)}"
    dense = [
        tuple(p.state[k].shape)
        for k in ("exp_avg", SECOND_MOMENT_KEY)
        if isinstance(p.state.get(k), torch.Tensor)
    ]
    if len(set(dense)) > 1:
        return f"parameter {p.name}: exp_avg {list(dense[0])} and exp_avg_sq {list(dense[1])} differ in shape"
    if "step" in p.state:
        step = _number(p.state["step"])
        if step is None or not math.isfinite(step) or step < 0:
            return f"parameter {p.name}: step is {p.state['step']!r} (a finite count >= 0)"
    return None


def group_problem(g: int, group: dict) -> str | None:
    """The first impossible hyper-parameter of one param group, or None."""
    checks = {
        "lr": lambda v: v >= 0,
        "eps": lambda v: v >= 0,
        "weight_decay": lambda v: True,
    }
    for key, ok in checks.items():
        if key in group:
            v = _number(group[key])
            if v is None or not math.isfinite(v) or not ok(v):
                return f"param group {g}: {key} is {group[key]!r}"
    betas = group.get("betas")
    if betas is not None:
        values = [_number(b) for b in betas] if isinstance(betas, (list, tuple)) else [None]
        if not values or any(b is None or not 0 <= b < 1 for b in values):
            return f"param group {g}: betas {tuple(betas) if isinstance(betas, (list, tuple)) else betas!r} (each in [0, 1))"
    return None


def state_problems(ck: OptimizerCheckpoint) -> list[str]:
    """Every problem found, one line each (parameters first, then groups)."""
    problems = [q for q in (param_problem(p) for p in ck.params) if q]
    problems += [q for q in (group_problem(g, group) for g, group in enumerate(ck.param_groups)) if q]
    if ck.model_state and ck.names_source == "anonymous":
        # The loader could not match the state to the weights stored beside it: transposed or
        # resized moments, or a state from another model.
        reason = next((w for w in ck.warnings if "names unknown" in w), "no naming rule fits")
        problems.append(f"the optimizer state does not match the model weights in the file ({reason})")
    return problems


def require_sound_state(ck: OptimizerCheckpoint, action: str) -> None:
    """Raise ``InputError`` naming the file and its first problem when the state is damaged."""
    problems = state_problems(ck)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise InputError(
            f"{ck.path} has a damaged optimizer state: {problems[0]}{more}; refusing to {action} from it "
            "(use an earlier or intact copy of the checkpoint)"
        )
