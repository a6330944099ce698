"""A plain-data description of a loaded checkpoint (what ``adapprox inspect`` shows and prints as JSON)."""

from __future__ import annotations

import re
from typing import Any

from adapprox_cli.checkpoints.core import OptimizerCheckpoint, ParamState, optimizer_state_bytes
from adapprox_cli.checkpoints.formats import checkpoint_format, registry
from adapprox_cli.errors import ParameterError
from adapprox_cli.formatting import dtype_name


# Container facts worth showing; big or nested objects (model args stay, tensors do not).
def compile_params_regex(pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ParameterError(
            "pattern", f"{{name}} {pattern!r} is not a valid regular expression ({exc})"
        ) from None


def select_params(ck: OptimizerCheckpoint, pattern: str | None) -> list[ParamState]:
    """Parameters whose name matches ``pattern`` (``re.search``); all of them for None."""
    regex = compile_params_regex(pattern)
    return [p for p in ck.params if regex is None or regex.search(p.name)]


def describe_param(p: ParamState) -> dict[str, Any]:
    view = p.matrix_shape
    return {
        "index": p.index,
        "name": p.name,
        "shape": list(p.shape),
        "dtype": dtype_name(p.dtype),
        "group": p.group,
        "state_keys": sorted(p.state),
        "state_bytes": optimizer_state_bytes({p.index: p.state}),
        "matrix_shape": list(view) if view else None,
        "analysed": bool(view) and p.has_second_moment,
        "rank": int(p.state["exp_avg_sq_q"].shape[1]) if "exp_avg_sq_q" in p.state else None,
    }


def describe_checkpoint(ck: OptimizerCheckpoint, params_regex: str | None = None) -> dict[str, Any]:
    """Everything ``inspect`` reports, as JSON-ready data; ``params_regex`` filters the parameter list only."""
    shown = select_params(ck, params_regex)
    analysed = [p for p in ck.params if p.matrix_shape and p.has_second_moment]
    sizes = [0] * len(ck.param_groups)
    for p in ck.params:
        if p.group < len(sizes):
            sizes[p.group] += 1
    return {
        "path": str(ck.path),
        "format": ck.format,
        "optimizer": ck.optimizer,
        "step": ck.step,
        "names_source": ck.names_source,
        "warnings": list(ck.warnings),
        "param_groups": [{"group": g, "num_params": sizes[g], **hp} for g, hp in enumerate(ck.param_groups)],
        "num_params": len(ck.params),
        "num_params_with_state": sum(1 for p in ck.params if p.state),
        "total_state_bytes": ck.total_state_bytes,
        "analysed": {
            "count": len(analysed),
            "skipped": len(ck.params) - len(analysed),
            "second_moment_numel": sum(_numel(p.shape) for p in analysed),
        },
        "params_filter": params_regex,
        "params": [describe_param(p) for p in shown],
        "extra": {k: ck.extra[k] for k in _extra_keys(ck.format) if ck.extra.get(k) is not None},
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _extra_keys(format_name: str) -> tuple[str, ...]:
    """The extra fields a format shows; every format's for a name outside the registry."""
    fmt = checkpoint_format(format_name)
    if fmt is not None:
        return fmt.extra_keys
    return tuple(dict.fromkeys(k for f in registry() for k in f.extra_keys))
