"""Reading optimizer states from the checkpoints people already have.

``load_checkpoint(path)`` detects the format (plain torch state dict, nanoGPT, Hugging Face
Trainer, Lightning, accelerate, torch.distributed.checkpoint, DeepSpeed ZeRO, or adapprox's own
safetensors export) and returns an ``OptimizerCheckpoint``: the flat list of parameters in
optimizer order with their state tensors (memory-mapped where the format allows), true shapes
and names, plus the loaded container so a new state can be written back in the same place.
"""

from __future__ import annotations

from pathlib import Path

from adapprox_cli.checkpoints.core import (
    FACTOR_KEYS,
    SECOND_MOMENT_KEY,
    OptimizerCheckpoint,
    ParamState,
    check_declared_shapes,
    matrix_view_shape,
)
from adapprox_cli.checkpoints.formats import CheckpointFormat, checkpoint_format, registry
from adapprox_cli.checkpoints.formats.safetensors import write_adapprox_safetensors
from adapprox_cli.checkpoints.safe_load import check_readable_file, restricted_unpickle, safe_torch_load
from adapprox_cli.checkpoints.summary import describe_checkpoint
from adapprox_cli.errors import InputError, ParameterError
from adapprox_cli.validation import check_at_least

FORMATS = tuple(f.name for f in registry())  # every format name, in detection order

__all__ = [
    "FACTOR_KEYS",
    "FORMATS",
    "SECOND_MOMENT_KEY",
    "OptimizerCheckpoint",
    "ParamState",
    "checkpoint_format",
    "describe_checkpoint",
    "detect_format",
    "load_checkpoint",
    "matrix_view_shape",
    "restricted_unpickle",
    "safe_torch_load",
    "write_adapprox_safetensors",
]


def detect_format(path: str | Path, *, trust_checkpoint: bool = False) -> str:
    """The format name of a checkpoint file or directory (see ``FORMATS``).

    Files are opened (memory-mapped, with the safe loader) because the format is a property of
    the pickled object, not of the file name.
    """
    path = Path(path)
    if path.is_dir():
        return _detect_dir(path).name
    fmt, _ = _detect_file(path, trust_checkpoint)
    return fmt.name


def load_checkpoint(
    path: str | Path, *, trust_checkpoint: bool = False, optimizer_index: int = 0
) -> OptimizerCheckpoint:
    """Load the optimizer state of any supported checkpoint (see the module docstring)."""
    path = Path(path).expanduser()
    check_at_least(optimizer_index, 0, "optimizer_index")
    try:
        checkpoint = _load(path, trust_checkpoint, optimizer_index)
        check_declared_shapes(checkpoint)
        return checkpoint
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        # A container whose pieces are not what its format promises (edited, mixed or foreign
        # files). The cause stays chained for --debug.
        raise InputError(
            f"{path} does not have the structure its format implies ({type(exc).__name__}: {exc}); "
            "re-copy it, or pass the optimizer file itself"
        ) from exc


def _load(path: Path, trust_checkpoint: bool, optimizer_index: int) -> OptimizerCheckpoint:
    if path.is_dir():
        fmt, obj = _detect_dir(path), None
    else:
        fmt, obj = _detect_file(path, trust_checkpoint)
    _check_single_optimizer(path, fmt, optimizer_index)
    return fmt.load(path, obj, trust_checkpoint=trust_checkpoint, optimizer_index=optimizer_index)


def _check_single_optimizer(path: Path, fmt: CheckpointFormat, optimizer_index: int) -> None:
    if optimizer_index and not fmt.several_optimizers:
        raise ParameterError(
            "optimizer_index",
            f"{path} is a {fmt.name} checkpoint with one optimizer; {{name}} applies to Lightning, accelerate "
            "and DCP checkpoints with several (leave it at 0)",
        )


def _detect_dir(path: Path) -> CheckpointFormat:
    for fmt in registry():
        if fmt.detect_directory is not None and fmt.detect_directory(path):
            return fmt
    if (path / "trainer_state.json").is_file():
        raise InputError(
            f"{path} is a Hugging Face Trainer checkpoint without optimizer state (no optimizer.pt; saved with "
            "save_only_model=True?); adapprox needs the optimizer file"
        )
    names = sorted(p.name for p in path.iterdir())
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") if names else "nothing"
    raise InputError(
        f"{path} is a directory of unknown layout (it holds {shown}); pass an optimizer file, a Trainer "
        "checkpoint-N/, an accelerate save_state directory, a DCP directory (.metadata) or a DeepSpeed "
        "checkpoint (latest + global_stepN/)"
    )


def _detect_file(path: Path, trust_checkpoint: bool) -> tuple[CheckpointFormat, object]:
    check_readable_file(path)
    for fmt in registry():
        if fmt.detect_file is not None and fmt.detect_file(path):
            return fmt, None
    obj = safe_torch_load(path, trust_checkpoint=trust_checkpoint)
    for fmt in registry():
        if fmt.detect_object is not None and fmt.detect_object(obj, path):
            return fmt, obj
    raise AssertionError("the plain format accepts every optimizer state dict and refuses the rest")
