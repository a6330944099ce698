"""The analyses' input: saved Adam moments, chosen by name, loaded one matrix at a time.

A ``Moment`` is a name, a shape and a loader, so a moment that must be rebuilt (an Adapprox
factor product) is materialized only when its matrix is analysed. ``load_moments`` reads them
from a checkpoint file, a directory or an already loaded checkpoint.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from adapprox_cli import lowrank
from adapprox_cli.errors import InputError, ParameterError
from adapprox_cli.formatting import dtype_name

__all__ = [
    "Moment",
    "ProgressCallback",
    "as_moments",
    "checkpoint_num_heads",
    "common_name_prefix",
    "load_matrix",
    "load_moments",
    "moments_from_checkpoint",
    "resolve_dtype",
    "select_moments",
    "state_bytes_per_number",
]

ProgressCallback = Callable[[int, int, str], None]  # (matrices done, matrices in all, current name)

MOMENT_KEYS = ("exp_avg_sq", "exp_avg")
# Where model configurations keep the number of attention heads (nanoGPT, Hugging Face, others).
_HEAD_KEYS = ("n_head", "num_attention_heads", "n_heads", "num_heads")


@dataclass(frozen=True)
class Moment:
    """One parameter's moment: its name, its true shape and how to get the tensor."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], Tensor] = field(repr=False)
    index: int = 0  # position among the optimizer's parameters (seeds the random sketches)

    @property
    def matrix_shape(self) -> tuple[int, int] | None:
        return lowrank.matrix_view_shape(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def as_moments(items: Iterable[tuple[str, Tensor] | Moment]) -> list[Moment]:
    """Normalize ``(name, tensor)`` pairs (or ``Moment`` objects) to ``Moment`` objects."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Moment):
            out.append(item)
            continue
        name, tensor = item
        if not isinstance(tensor, Tensor):
            raise InputError(f"{name}: expected a tensor, got {type(tensor).__name__}")
        out.append(Moment(str(name), tuple(tensor.shape), (lambda t=tensor: t), i))
    return out


def select_moments(
    moments: Sequence[Moment], pattern: str | None, parameter: str = "pattern"
) -> list[Moment]:
    """The moments whose name matches ``pattern`` (``re.search``); all of them for None.

    ``parameter`` is what errors call the pattern (``load_moments`` passes "params").
    """
    if pattern is None:
        return list(moments)
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ParameterError(
            parameter,
            f"{{name}} {pattern!r} is not a valid regular expression ({exc}); escape special characters "
            "with a backslash, e.g. 'h\\.0\\.'",
        ) from None
    chosen = [m for m in moments if regex.search(m.name)]
    if not chosen:
        names = [m.name for m in moments]
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise ParameterError(
            parameter,
            f"{{name}} {pattern!r} matches none of the {len(names)} parameters ({shown}); "
            "loosen the expression or drop {name}",
        )
    return chosen


def moments_from_checkpoint(checkpoint: Any, moment: str = "exp_avg_sq") -> list[Moment]:
    """The moments of a loaded checkpoint (``checkpoints.load_checkpoint``), one per parameter.

    ``moment``: "exp_avg_sq" (the second moment; Adapprox factors are multiplied out lazily,
    one matrix at a time) or "exp_avg" (the first moment). Parameters without it are left out.
    """
    if moment not in MOMENT_KEYS:
        raise ParameterError("moment", f"{{name}} must be exp_avg_sq or exp_avg, got {moment!r}")
    out = []
    for p in checkpoint.params:
        if moment == "exp_avg" or "exp_avg_sq" in p.state:
            tensor = p.state.get(moment)
            if tensor is not None:
                out.append(Moment(p.name, tuple(p.shape), (lambda t=tensor: t), p.index))
        elif getattr(p, "has_second_moment", False):
            out.append(Moment(p.name, tuple(p.shape), (lambda p=p: checkpoint.second_moment(p)), p.index))
    if not out:
        what = "a first moment (exp_avg; beta1 = 0?)" if moment == "exp_avg" else "a second moment"
        raise InputError(
            f"{getattr(checkpoint, 'path', 'the checkpoint')}: no parameter has {what}; was the optimizer ever stepped?"
        )
    return out


def load_moments(
    checkpoint: str | os.PathLike[str] | Any,
    *,
    params: str | None = None,
    moment: str = "exp_avg_sq",
    optimizer_index: int = 0,
    trust_checkpoint: bool = False,
) -> list[Moment]:
    """The moments of a checkpoint whose names match ``params`` (a regular expression; all for None).

    ``checkpoint``: a file or directory (read with ``checkpoints.load_checkpoint``, which
    ``optimizer_index`` and ``trust_checkpoint`` are passed to), or a checkpoint already loaded,
    when its warnings, ``checkpoint_num_heads`` or ``state_bytes_per_number`` are wanted too.
    ``moment``: "exp_avg_sq" (the second moment) or "exp_avg" (the first).
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        from adapprox_cli.checkpoints import load_checkpoint

        checkpoint = load_checkpoint(
            checkpoint, trust_checkpoint=trust_checkpoint, optimizer_index=optimizer_index
        )
    return select_moments(moments_from_checkpoint(checkpoint, moment), params, "params")


def checkpoint_num_heads(checkpoint: Any) -> int | None:
    """Attention heads from the file's model configuration, when it has one (for Adam-mini's blocks)."""
    sources = []
    for holder in (getattr(checkpoint, "extra", None), getattr(checkpoint, "container", None)):
        if isinstance(holder, dict):
            sources += [holder, holder.get("model_args"), holder.get("config")]
    for source in sources:
        if isinstance(source, dict):
            for key in _HEAD_KEYS:
                value = source.get(key)
                if isinstance(value, int) and value > 0:
                    return value
    return None


def state_bytes_per_number(checkpoint: Any) -> int:
    """Bytes per stored value of the file's second moments (the most common; 4 for float32 states)."""
    sizes = [p.dtype.itemsize for p in checkpoint.params if getattr(p, "has_second_moment", bool(p.state))]
    return max(set(sizes), key=sizes.count) if sizes else 4


def common_name_prefix(names: Sequence[str]) -> str:
    """The dotted prefix all names share ("transformer."), to print once instead of on every line."""
    if len(names) < 2:
        return ""
    shared = []
    for pieces in zip(*(name.split(".")[:-1] for name in names), strict=False):
        if len(set(pieces)) > 1:
            break
        shared.append(pieces[0])
    return "".join(p + "." for p in shared)


def resolve_dtype(spec: str | torch.dtype) -> torch.dtype:
    """Compute precision: float32 or float64 (states in half precision are upcast)."""
    if isinstance(spec, torch.dtype):
        if spec in (torch.float32, torch.float64):
            return spec
        spec = dtype_name(spec)
    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64}
    if str(spec).lower() not in table:
        raise ParameterError("dtype", f"{{name}} must be float32 or float64, got {spec!r}")
    return table[str(spec).lower()]


def load_matrix(moment: Moment, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The moment as an (m, n) matrix in the compute dtype on the device (no copy when it already is)."""
    tensor = moment.load()
    view = moment.matrix_shape
    if not isinstance(tensor, Tensor) or tensor.numel() != moment.numel:
        got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise InputError(
            f"{moment.name}: the stored moment has shape {got}, the parameter {moment.shape}; "
            "the file's state does not belong to these parameters"
        )
    if tensor.is_complex() or not tensor.is_floating_point():
        raise InputError(
            f"{moment.name}: the moment has dtype {tensor.dtype}; adapprox analyses real floating states"
        )
    return tensor.reshape(view).to(device=device, dtype=dtype)
