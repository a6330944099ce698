"""``convert_checkpoint``: read a checkpoint, migrate its optimizer state, write it, check it.

The input is never written to. Every argument is checked before the checkpoint is read, so a
bad setting is refused at once, however large the checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from adapprox_cli.atomic_io import check_target
from adapprox_cli.checkpoints import OptimizerCheckpoint, load_checkpoint
from adapprox_cli.checkpoints.integrity import check_integrity
from adapprox_cli.checkpoints.validate import require_sound_state
from adapprox_cli.convert.migrate import adamw_to_adapprox, adapprox_to_adamw, check_rank
from adapprox_cli.convert.output import OUTPUT_FORMATS, ConvertedState, write_checked, write_output
from adapprox_cli.convert.report import ConversionReport
from adapprox_cli.convert.verify import verify_output
from adapprox_cli.errors import InputError, ParameterError
from adapprox_cli.optim import DEFAULT_TOL
from adapprox_cli.validation import check_at_least, check_beta, check_tol

__all__ = ["TARGET_OPTIMIZERS", "convert_checkpoint", "optimizer_state_dict_of"]

TARGET_OPTIMIZERS = ("adapprox", "adamw")


def convert_checkpoint(
    source: str | Path,
    output: str | Path,
    *,
    to: str | None = None,
    output_format: str = "auto",
    tol: float = DEFAULT_TOL,
    rank: int | None = None,
    beta1: float | None = None,
    force: bool = False,
    verify: bool = False,
    check_input: bool = False,
    trust_checkpoint: bool = False,
    optimizer_index: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
    **settings: Any,
) -> ConversionReport:
    """Convert the optimizer state of a checkpoint and write it to ``output``.

    Args:
        to: "adapprox" or "adamw"; by default the other one than the checkpoint holds.
        output_format: "auto" (the input's container), "plain" (a bare optimizer state dict) or
            "safetensors" (``state/{index}/{key}`` tensors plus metadata).
        force: replace an existing ``output``.
        verify: read the output back and check shapes, ranks and reconstruction errors.
        check_input: first compare the input's own checksums (the CRC-32 of every zip member):
            a byte flipped on disk would otherwise be converted, and verified, faithfully.
        tol, rank, beta1, progress, **settings: see ``adamw_to_adapprox``.
    """
    source, output = Path(source), Path(output)
    _check_arguments(to, output_format, tol, rank, beta1, settings)
    if check_input:
        check_integrity(source)
    if _same_path(source, output):
        raise InputError(f"the output {output} is the input; write the converted checkpoint to another path")
    check_target(output, force=force, inputs=[source])
    checkpoint = load_checkpoint(source, trust_checkpoint=trust_checkpoint, optimizer_index=optimizer_index)
    require_sound_state(checkpoint, "convert")
    target = _target_optimizer(checkpoint, to, source)
    state_dict, names, shapes = optimizer_state_dict_of(checkpoint)
    if target == "adapprox":
        new_state, report = adamw_to_adapprox(
            state_dict,
            tol=tol,
            rank=rank,
            beta1=beta1,
            names=names,
            shapes=shapes,
            progress=progress,
            **settings,
        )
    else:
        new_state, report = adapprox_to_adamw(state_dict, names=names, shapes=shapes)
    report.warnings = list(checkpoint.warnings) + report.warnings
    report.source, report.source_format = str(source), checkpoint.format
    converted = ConvertedState(checkpoint, new_state, report, names, shapes)
    if verify:
        fmt = write_checked(
            output,
            lambda staged: write_output(converted, staged, output_format),
            lambda staged: verify_output(
                staged,
                converted,
                state_dict,
                trust_checkpoint=trust_checkpoint,
                optimizer_index=optimizer_index,
            ),
        )
    else:
        fmt = write_output(converted, output, output_format)
    report.output, report.output_format = str(output), fmt
    return report


def _check_arguments(
    to: str | None,
    output_format: str,
    tol: float,
    rank: int | None,
    beta1: float | None,
    settings: dict[str, Any],
) -> None:
    if to is not None and to not in TARGET_OPTIMIZERS:
        raise ParameterError("to", f"{{name}} {to!r}: choose {' or '.join(TARGET_OPTIMIZERS)}")
    check_rank(rank)
    if settings.get("rank_max") is not None:
        check_at_least(settings["rank_max"], 1, "rank_max")
    if beta1 is not None:
        check_beta(beta1)
    check_tol(tol)
    if output_format not in OUTPUT_FORMATS:
        raise ParameterError(
            "output_format", f"{{name}} {output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}"
        )


def _target_optimizer(checkpoint: OptimizerCheckpoint, to: str | None, source: Path) -> str:
    """``to``, or the other optimizer than the checkpoint holds; converting to itself is refused."""
    kind = "adapprox" if checkpoint.optimizer == "adapprox" else "adamw"
    other = "adamw" if kind == "adapprox" else "adapprox"
    if to == kind:
        raise ParameterError(
            "to",
            f"{source} already holds an {checkpoint.optimizer} state; "
            f"pass {{name}} {other} or another checkpoint",
        )
    return to or other


def _same_path(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return a.resolve() == b.resolve()
    return False


def optimizer_state_dict_of(
    checkpoint: OptimizerCheckpoint,
) -> tuple[dict[str, Any], dict[int, str], dict[int, tuple[int, ...]]]:
    """A ``{"state", "param_groups"}`` dict from a loaded ``OptimizerCheckpoint``, with names and shapes.

    Built from the loader's normalised parameter list, so sharded formats (DeepSpeed, DCP) convert
    like plain ones; indices are the flat optimizer order.
    """
    groups: list[dict[str, Any]] = [dict(g) for g in checkpoint.param_groups]
    members: list[list[int]] = [[] for _ in groups]
    state: dict[int, dict[str, Tensor]] = {}
    for param in checkpoint.params:
        while param.group >= len(groups):
            groups.append({})
            members.append([])
        members[param.group].append(param.index)
        if param.state:
            state[param.index] = dict(param.state)
    for group, indices in zip(groups, members):
        group["params"] = sorted(indices)
    names = {p.index: p.name for p in checkpoint.params}
    shapes = {p.index: tuple(p.shape) for p in checkpoint.params}
    return {"state": state, "param_groups": groups}, names, shapes
