"""Writing a converted optimizer state: on its own (plain, safetensors) or back into its container.

How a checkpoint takes a new state back is declared by its format (``CheckpointFormat.write_back``):
"container" re-saves the loaded object with the new state, "directory" copies the checkpoint
directory with its optimizer file replaced. Every output goes to a temporary name in the
destination directory first and is renamed into place (``atomic_io``), so an interrupted
conversion leaves either nothing or a complete output.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapprox_cli.atomic_io import (
    atomic_write,
    current_umask,
    install_directory,
    install_file,
    new_temporary_directory,
    remove_path,
    temporary_path,
    write_error,
)
from adapprox_cli.checkpoints import OptimizerCheckpoint, checkpoint_format
from adapprox_cli.checkpoints.formats import CheckpointFormat
from adapprox_cli.checkpoints.formats.safetensors import write_adapprox_safetensors
from adapprox_cli.convert.migrate import flat_indices
from adapprox_cli.convert.report import ConversionReport
from adapprox_cli.errors import AdapproxError, ParameterError

__all__ = ["OUTPUT_FORMATS", "ConvertedState", "atomic_torch_save", "write_checked", "write_output"]


@dataclass(frozen=True)
class ConvertedState:
    """A converted optimizer state with what writing and checking it needs."""

    checkpoint: OptimizerCheckpoint  # where it came from (its container and format)
    state_dict: dict[str, Any]
    report: ConversionReport
    names: Mapping[int, str]  # parameter names by saved index
    shapes: Mapping[int, tuple[int, ...]]  # parameter shapes by saved index


def _write_torch(obj: Any, path: Path) -> None:
    """The one place a converted object is serialised (tests replace it to simulate failures)."""
    torch.save(obj, path)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temporary file and a rename."""
    return atomic_write(path, lambda temporary: _write_torch(obj, temporary))


def write_output(converted: ConvertedState, output: Path, output_format: str) -> str:
    """Write the converted state to ``output`` as ``output_format``; returns the format written."""
    return _WRITERS[output_format](converted, output)


def write_checked(output: Path, write: Callable[[Path], str], check: Callable[[Path], None]) -> str:
    """``write`` beside ``output``, ``check`` it there, then install it; returns what ``write`` did.

    A failed check leaves nothing at ``output`` (and an existing target in place); its message
    names ``output``, never the temporary.
    """
    staged = temporary_path(output)
    try:
        written = write(staged)
        try:
            check(staged)
        except AdapproxError as exc:
            raise type(exc)(str(exc).replace(str(staged), str(output))) from None
        if staged.is_dir():
            install_directory(staged, output)
        else:
            try:
                install_file(staged, output)
            except OSError as exc:
                raise write_error(exc, output) from exc
    finally:
        remove_path(staged)
    return written


def _write_plain(converted: ConvertedState, output: Path) -> str:
    atomic_torch_save(converted.state_dict, output)
    return "plain"


def _write_safetensors(converted: ConvertedState, output: Path) -> str:
    order = [i for _, i in flat_indices(converted.state_dict["param_groups"])]
    # The writer goes through a temporary file and a rename itself.
    write_adapprox_safetensors(
        output,
        converted.state_dict,
        [converted.names[i] for i in order],
        converted.checkpoint.format,
        converted.report.target_optimizer,
        param_shapes=[converted.shapes[i] for i in order],
    )
    return "safetensors"


def _write_back(converted: ConvertedState, output: Path) -> str:
    """The input's own container with the new state, as its format declares."""
    checkpoint = converted.checkpoint
    fmt = checkpoint_format(checkpoint.format)
    write_back = _WRITE_BACKS.get(fmt.write_back) if fmt is not None and fmt.write_back else None
    if write_back is None or not write_back(converted, fmt, output):
        raise ParameterError(
            "output_format",
            f"{checkpoint.path} is a {checkpoint.format} checkpoint that adapprox cannot rewrite in place; "
            "pass {name} safetensors (or {name} plain) to write the converted state on its own",
        )
    return checkpoint.format


def _write_directory(converted: ConvertedState, fmt: CheckpointFormat, output: Path) -> bool:
    """A copy of the checkpoint directory with its optimizer file replaced."""
    checkpoint = converted.checkpoint
    source = Path(checkpoint.path)
    if not source.is_dir():  # the format's optimizer file read on its own: a container
        return _write_container(converted, fmt, output)
    file_name = Path(checkpoint.extra.get("optimizer_file") or fmt.optimizer_file).name
    if not (source / file_name).is_file():
        raise ParameterError(
            "output_format",
            f"{checkpoint.path} has no {file_name} to replace; pass {{name}} plain or {{name}} safetensors",
        )
    contents = checkpoint.container_with_optimizer_state(converted.state_dict)
    _atomic_copy_directory(source, output, {file_name: contents})
    return True


def _write_container(converted: ConvertedState, fmt: CheckpointFormat, output: Path) -> bool:
    """The loaded object re-saved with the new state; False when it is not one object in one file."""
    checkpoint = converted.checkpoint
    if Path(checkpoint.path).is_dir() or checkpoint.extra.get("optimizer_path") is None:
        return False
    container = checkpoint.container_with_optimizer_state(converted.state_dict)
    if fmt.update_container is not None:
        report = converted.report
        container = fmt.update_container(container, report.target_optimizer, report.adapprox_settings())
    atomic_torch_save(container, output)
    return True


def _atomic_copy_directory(source: Path, destination: Path, replace: Mapping[str, Any]) -> None:
    """Copy ``source`` to ``destination`` with the files in ``replace`` re-saved; installed in one step.

    Symlinks are copied as links, never followed: a downloaded checkpoint's ``notes.txt ->
    ~/.ssh/id_rsa`` must not put the key's bytes into the output, and ``loop -> .`` must not recurse.
    """
    temporary = new_temporary_directory(destination)
    try:
        _copy_tree(source, temporary, skip=set(replace))
        for name, obj in replace.items():
            _write_torch(obj, temporary / name)
            os.chmod(temporary / name, 0o666 & ~current_umask())
        install_directory(temporary, destination)
    except OSError as exc:
        raise write_error(exc, destination) from exc
    finally:
        remove_path(temporary)


def _copy_tree(source: Path, destination: Path, skip: set[str]) -> None:
    """Copy files and directories; recreate symlinks instead of following them.

    A relative link that stays inside ``source`` is copied as is (it resolves the same way in the
    copy); any other link points at its resolved absolute target, so a Hugging Face cache snapshot
    (``model.safetensors -> ../../blobs/...``) still works from the new place without its bytes
    being copied.
    """
    root = source.resolve()
    for current, dirs, files in os.walk(source, followlinks=False):
        here = Path(current)
        relative = here.relative_to(source)
        entries = [(n, True) for n in dirs] + [(n, False) for n in files]
        dirs[:] = [n for n in dirs if not (here / n).is_symlink() and not (here == source and n in skip)]
        for name, is_dir in entries:
            if here == source and name in skip:
                continue
            src, dst = here / name, destination / relative / name
            if src.is_symlink():
                link = os.readlink(src)
                resolved = Path(os.path.realpath(src))
                inside = resolved == root or root in resolved.parents
                os.symlink(link if inside and not os.path.isabs(link) else str(resolved), dst)
            elif is_dir:
                os.mkdir(dst)
                shutil.copystat(src, dst)
            elif src.is_file():
                shutil.copy2(src, dst)
            else:  # a pipe or device: reading it could block forever or never end
                raise ParameterError(
                    "output_format",
                    f"{src} is not a regular file (a pipe, socket or device); remove it from the checkpoint "
                    "directory or pass {name} plain",
                )


# The ``output_format`` values, in the order help texts list them.
_WRITERS: dict[str, Callable[[ConvertedState, Path], str]] = {
    "auto": _write_back,
    "plain": _write_plain,
    "safetensors": _write_safetensors,
}
OUTPUT_FORMATS = tuple(_WRITERS)
# ``CheckpointFormat.write_back`` kinds: each writes and returns True, or False where it does not apply.
_WRITE_BACKS: dict[str, Callable[[ConvertedState, CheckpointFormat, Path], bool]] = {
    "directory": _write_directory,
    "container": _write_container,
}
