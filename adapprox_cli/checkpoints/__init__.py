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
    FORMATS,
    SECOND_MOMENT_KEY,
    OptimizerCheckpoint,
    ParamState,
    check_declared_shapes,
    matrix_view_shape,
)
from adapprox_cli.checkpoints.safe_load import restricted_unpickle, safe_torch_load
from adapprox_cli.checkpoints.safetensors_format import write_adapprox_safetensors
from adapprox_cli.checkpoints.summary import describe_checkpoint
from adapprox_cli.errors import InputError

__all__ = [
    "FACTOR_KEYS",
    "FORMATS",
    "SECOND_MOMENT_KEY",
    "OptimizerCheckpoint",
    "ParamState",
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
        return _detect_dir(path)
    fmt, _ = _detect_file(path, trust_checkpoint)
    return fmt


def load_checkpoint(
    path: str | Path, *, trust_checkpoint: bool = False, optimizer_index: int = 0
) -> OptimizerCheckpoint:
    """Load the optimizer state of any supported checkpoint (see the module docstring)."""
    path = Path(path).expanduser()
    if optimizer_index < 0:
        raise InputError(f"--optimizer-index must be >= 0, got {optimizer_index}")
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
    # torch.distributed.checkpoint takes seconds to import: only DCP directories pay for it.
    from adapprox_cli.checkpoints import (
        accelerate_format,
        deepspeed_format,
        hf_trainer,
        lightning,
        nanogpt,
        plain,
        safetensors_format,
    )

    if path.is_dir():
        fmt = _detect_dir(path)
        _check_single_optimizer(path, fmt, optimizer_index, ("accelerate", "dcp"))
        if fmt == "hf-trainer":
            return hf_trainer.load_hf_trainer(path, trust_checkpoint=trust_checkpoint)
        if fmt == "accelerate":
            return accelerate_format.load_accelerate(
                path, trust_checkpoint=trust_checkpoint, optimizer_index=optimizer_index
            )
        if fmt == "dcp":
            from adapprox_cli.checkpoints import dcp

            return dcp.load_dcp(_dcp_dir(path), optimizer_index=optimizer_index)
        return deepspeed_format.load_deepspeed(path, trust_checkpoint=trust_checkpoint)
    fmt, obj = _detect_file(path, trust_checkpoint)
    _check_single_optimizer(path, fmt, optimizer_index, ("lightning",))
    if fmt == "adapprox-safetensors":
        return safetensors_format.load_adapprox_safetensors(path)
    if fmt == "deepspeed":
        return deepspeed_format.load_deepspeed(path, trust_checkpoint=trust_checkpoint)
    if fmt == "lightning":
        return lightning.load_lightning(path, obj, optimizer_index)
    if fmt == "nanogpt":
        return nanogpt.load_nanogpt(path, obj)
    return plain.load_plain(path, obj)


def _check_single_optimizer(path: Path, fmt: str, optimizer_index: int, multi: tuple[str, ...]) -> None:
    if optimizer_index and fmt not in multi:
        raise InputError(
            f"{path} is a {fmt} checkpoint with one optimizer; --optimizer-index applies to Lightning, accelerate "
            "and DCP checkpoints with several (drop the option)"
        )


def _is_dcp_dir(path: Path) -> bool:
    return (path / ".metadata").is_file()


def _dcp_dir(path: Path) -> Path:
    """The DCP directory itself, or the ``optimizer_0/`` DCP subdirectory of a Trainer/accelerate FSDP save."""
    if _is_dcp_dir(path):
        return path
    return next(d for d in sorted(path.iterdir()) if d.name.startswith("optimizer") and _is_dcp_dir(d))


def _detect_dir(path: Path) -> str:
    from adapprox_cli.checkpoints.accelerate_format import is_accelerate_dir
    from adapprox_cli.checkpoints.deepspeed_format import is_deepspeed
    from adapprox_cli.checkpoints.hf_trainer import is_hf_trainer_dir

    if is_hf_trainer_dir(path):
        return "hf-trainer"
    if _is_dcp_dir(path) or any(
        d.is_dir() and d.name.startswith("optimizer") and _is_dcp_dir(d) for d in path.iterdir()
    ):
        return "dcp"  # also Trainer/accelerate FSDP (optimizer_0/) and Lightning FSDP (.ckpt/ with meta.pt)
    if is_deepspeed(path):
        return "deepspeed"
    if is_accelerate_dir(path):
        return "accelerate"
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


def _detect_file(path: Path, trust_checkpoint: bool) -> tuple[str, object]:
    from adapprox_cli.checkpoints import deepspeed_format, lightning, nanogpt, safetensors_format
    from adapprox_cli.checkpoints.safe_load import check_readable_file
    from adapprox_cli.checkpoints.torch_state import find_optimizer_state_dict

    check_readable_file(path)
    if safetensors_format.is_safetensors(path):
        if safetensors_format.is_adapprox_export(path):
            return "adapprox-safetensors", None
        raise InputError(
            f"{path} is a safetensors file without optimizer state (model weights?); pass the optimizer "
            "checkpoint, or the directory that holds both"
        )
    if deepspeed_format.is_deepspeed(path):
        return "deepspeed", None
    obj = safe_torch_load(path, trust_checkpoint=trust_checkpoint)
    if lightning.is_lightning(obj):
        return "lightning", obj
    if nanogpt.is_nanogpt(obj):
        return "nanogpt", obj
    find_optimizer_state_dict(obj, path)  # raises InputError naming what the file holds instead
    return "plain", obj
