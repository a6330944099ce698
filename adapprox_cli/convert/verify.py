"""Reading a converted output back: kind, shapes, ranks, reconstruction errors, and a real load."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from adapprox_cli.checkpoints import ParamState, load_checkpoint
from adapprox_cli.checkpoints.validate import param_problem
from adapprox_cli.convert.migrate import reconstruction_error
from adapprox_cli.convert.output import ConvertedState
from adapprox_cli.convert.report import MatrixConversion
from adapprox_cli.errors import InputError
from adapprox_cli.formatting import format_shape
from adapprox_cli.lowrank import matrix_view_shape
from adapprox_cli.optim import Adapprox

__all__ = ["verify_output"]


def verify_output(
    output: Path,
    converted: ConvertedState,
    source_state: Mapping[str, Any],
    *,
    trust_checkpoint: bool = False,
    optimizer_index: int = 0,
) -> None:
    """Read the output back; check the kind, shapes, ranks and reconstruction errors; load it.

    ``source_state`` is the state dict that was converted (the errors are measured against its
    ``exp_avg_sq``); on success ``converted.report.verified`` is set.
    """
    report, shapes = converted.report, converted.shapes
    reloaded = load_checkpoint(output, trust_checkpoint=trust_checkpoint, optimizer_index=optimizer_index)
    # Every value finite, every second moment >= 0, every moment the parameter's shape.
    problems: list[str] = [q for q in (param_problem(p) for p in reloaded.params) if q]
    if (reloaded.optimizer == "adapprox") != (report.target_optimizer == "adapprox"):
        problems.append(f"it reads back as {reloaded.optimizer}, not {report.target_optimizer}")
    by_index = {p.index: p for p in reloaded.params}
    if len(by_index) != len(shapes):
        problems.append(f"it has {len(by_index)} parameters, the input {len(shapes)}")
    for matrix in report.matrices:
        problems += _matrix_problems(matrix, by_index.get(matrix.index), converted, source_state)
    if not problems:
        try:
            _load_into_optimizer(converted.state_dict, shapes, report.target_optimizer)
        except (ValueError, RuntimeError, KeyError) as exc:
            problems.append(f"{report.target_optimizer} refuses it: {exc}")
    if problems:
        raise InputError(f"verification of {output} failed: " + "; ".join(problems[:5]))
    report.verified = True


def _matrix_problems(
    matrix: MatrixConversion,
    param: ParamState | None,
    converted: ConvertedState,
    source_state: Mapping[str, Any],
) -> list[str]:
    """What is wrong with one converted matrix as read back (nothing: an empty list)."""
    if param is None:
        return [f"{matrix.name} is missing"]
    problems = []
    if tuple(param.shape) != tuple(matrix.shape):
        problems.append(
            f"{matrix.name} has shape {format_shape(param.shape)}, expected {format_shape(matrix.shape)}"
        )
    if converted.report.target_optimizer == "adapprox":
        q, u = param.state.get("exp_avg_sq_q"), param.state.get("exp_avg_sq_u")
        if q is None or u is None or q.shape[1] != matrix.rank:
            return [*problems, f"{matrix.name}: factors missing or of the wrong rank"]
        m, n = matrix_view_shape(matrix.shape)
        v = source_state["state"][matrix.index]["exp_avg_sq"].reshape(m, n)
        error = reconstruction_error(v, q, u)
        if not error <= matrix.relative_error + 1e-6:
            problems.append(
                f"{matrix.name}: error {error:.3g} exceeds the reported {matrix.relative_error:.3g}"
            )
    else:
        v = param.state.get("exp_avg_sq")
        expected = converted.state_dict["state"][matrix.index]["exp_avg_sq"]
        if v is None or not torch.equal(v.to(expected.dtype), expected):
            problems.append(f"{matrix.name}: exp_avg_sq differs from the multiplied-out factors")
    return problems


def _load_into_optimizer(
    state_dict: Mapping[str, Any], shapes: Mapping[int, tuple[int, ...]], target: str
) -> None:
    """Load the state into a real optimizer over same-shaped parameters (meta tensors: no memory)."""
    groups = []
    for group in state_dict["param_groups"]:
        params = [torch.empty(shapes[i], device="meta", requires_grad=True) for i in group["params"]]
        groups.append({"params": params})
    optimizer = Adapprox(groups) if target == "adapprox" else torch.optim.AdamW(groups)
    optimizer.load_state_dict(dict(state_dict))
