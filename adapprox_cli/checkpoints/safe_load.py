"""Loading pickled checkpoints without running code from them.

``torch.load`` runs with ``weights_only=True`` and a small allowlist: the numpy globals that
``rng_state.pth``-style files need (under both the numpy 1.x ``numpy.core`` and the numpy 2.x
``numpy._core`` spellings, which do not match each other) and stand-in classes for the three
DeepSpeed globals of ZeRO optimizer files, registered under DeepSpeed's qualified names so that
deepspeed need not be installed. A file that needs anything else is refused with the list of
globals it names; ``--trust-checkpoint`` is the only way past that, never an automatic fallback.

Plain pickles (nanoGPT ``meta.pkl``, DCP ``.metadata``) go through ``restricted_unpickle``, which
resolves only the globals it is given.
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
import io
import pathlib
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapprox_cli.errors import InputError, UnsafeCheckpointError

_ZIP_MAGIC = b"PK\x03\x04"
_TRUST_HINT = (
    "pass --trust-checkpoint (Python: trust_checkpoint=True) only if you made this file yourself: "
    "loading it runs code stored in it"
)


class ZeroStageEnum(enum.IntEnum):
    """Stand-in for ``deepspeed.runtime.zero.config.ZeroStageEnum`` (same member values)."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


@dataclasses.dataclass
class FragmentAddress:
    """Stand-in for ``deepspeed.utils.tensor_fragment.fragment_address``."""

    numel: int = 0
    start: int = 0


class LossScaler:
    """Stand-in for DeepSpeed's loss scalers: only their attributes are kept, no behaviour."""


class DynamicLossScaler(LossScaler):
    """Stand-in for ``deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler``."""


DEEPSPEED_STAND_INS: list[tuple[Any, str]] = [
    (ZeroStageEnum, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
    (LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (DynamicLossScaler, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
]


def _numpy_globals() -> list[Any]:
    core = np._core if hasattr(np, "_core") else np.core
    entries: list[Any] = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        entries.append((core.multiarray._reconstruct, f"{module}._reconstruct"))
        entries.append((core.multiarray.scalar, f"{module}.scalar"))
    # numpy 2 pickles dtypes through their classes (numpy.dtypes.Float64DType, ...).
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        entries += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return entries


def _path_globals() -> list[Any]:
    # Lightning hyper-parameters often hold a Path; building one runs no user code.
    return [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]


def allowed_globals() -> list[Any]:
    """The allowlist passed to ``torch.serialization.safe_globals``."""
    return _numpy_globals() + _path_globals() + list(DEEPSPEED_STAND_INS)


def _allowed_names() -> set[str]:
    names = set()
    for entry in allowed_globals():
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f"{entry.__module__}.{entry.__qualname__}")
    return names


def is_zip_checkpoint(path: Path) -> bool:
    """True for the zip format of ``torch.save`` (torch >= 1.6), which can be memory-mapped."""
    with open(path, "rb") as f:
        return f.read(4) == _ZIP_MAGIC


def check_readable_file(path: Path, what: str = "checkpoint") -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file or directory; check the path")
    if not path.is_file():
        raise InputError(f"{path} is not a file; pass the {what} file itself")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputError(f"{path} cannot be read ({exc.strerror}); check its permissions") from None
    if size == 0:
        raise InputError(
            f"{path} is empty (0 bytes): the save was interrupted or the copy failed; use another copy"
        )


def contained_path(root: Path, relative: str, source: Path) -> Path:
    """``root / relative``, refused when it resolves outside ``root`` (``..``, absolute paths, links).

    Index files (``model.safetensors.index.json``, DeepSpeed's ``latest``, DCP ``.metadata``) name
    other files of the checkpoint; a downloaded one must not make adapprox open files elsewhere.
    """
    base = root.resolve()
    target = (base / str(relative)).resolve()
    if target != base and base not in target.parents:
        raise InputError(
            f"{source} names {str(relative)!r}, which lies outside {root}; refused without opening it "
            "(re-copy the checkpoint from its source)"
        )
    return target


def _unsafe_globals(path: Path, exc: Exception) -> list[str]:
    allowed = _allowed_names()
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        # Legacy (non-zip) files: the unpickler names the first global it refused.
        found = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    return [name for name in found if name not in allowed]


def safe_torch_load(path: str | Path, *, trust_checkpoint: bool = False, mmap: bool = True) -> Any:
    """``torch.load`` on CPU, memory-mapped when possible, refusing unknown pickled globals.

    Raises ``UnsafeCheckpointError`` listing the globals a file needs beyond the allowlist, and
    ``InputError`` for missing, empty, truncated or non-torch files.
    """
    path = Path(path)
    check_readable_file(path)
    from adapprox_cli.checkpoints.formats.safetensors import is_safetensors

    if is_safetensors(path):  # newer torch.load would hand it to the safetensors library
        raise InputError(
            f"{path} is a safetensors file, not a torch.save file; pass it to the commands that read "
            "safetensors (inspect, spectrum, compare, estimate, convert), or the torch.save checkpoint"
        )
    use_mmap = mmap and is_zip_checkpoint(path)
    try:
        if trust_checkpoint:
            obj = torch.load(path, map_location="cpu", weights_only=False, mmap=use_mmap)
        else:
            with torch.serialization.safe_globals(allowed_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
        _refuse_inflated_tensors(obj, path)
        return obj
    except pickle.UnpicklingError as exc:
        unsafe = [] if trust_checkpoint else _unsafe_globals(path, exc)
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path} contains pickled Python objects outside the safe allowlist "
                f"({', '.join(unsafe)}); {_TRUST_HINT}"
            ) from None
        raise InputError(
            f"{path} is not a readable torch.save file ({_first_line(exc)}); {_CORRUPT_FIX}"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError) as exc:
        raise InputError(
            f"{path} is not a readable torch.save file ({_first_line(exc)}); {_CORRUPT_FIX}"
        ) from None


def _refuse_inflated_tensors(obj: Any, path: Path) -> None:
    """Refuse a file holding a tensor that declares far more data than the file stores.

    ``torch.save`` keeps strides, so an expanded (stride-0) or overlapping view of a few bytes
    can declare gigabytes; whatever reads it later (a copy, ``.contiguous()``, an SVD) would
    allocate them. Optimizer states are checked strictly where they are collected; here every
    tensor of every loaded file is bounded by a small multiple of the file's size, which leaves
    harmless expanded buffers alone.
    """
    limit = 4 * path.stat().st_size + (1 << 20)
    stack: list[tuple[str, Any, int]] = [("", obj, 0)]
    while stack:
        where, value, depth = stack.pop()
        if isinstance(value, torch.Tensor):
            if value.layout == torch.strided and value.numel() * value.element_size() > limit:
                storage = value.untyped_storage().nbytes()
                if value.numel() * value.element_size() > storage:
                    shape = "x".join(map(str, value.shape))
                    raise InputError(
                        f"{path}: tensor {where or '(top level)'} declares {shape} elements over {storage} stored "
                        "bytes (an expanded or overlapping view); refused before anything reads it: re-save it "
                        "with real data"
                    )
        elif depth < 64 and isinstance(value, Mapping):
            stack += [(f"{where}.{k}" if where else str(k), v, depth + 1) for k, v in value.items()]
        elif depth < 64 and isinstance(value, (list, tuple)):
            stack += [(f"{where}[{i}]", v, depth + 1) for i, v in enumerate(value)]


_CORRUPT_FIX = "it may be truncated or corrupt, or not a PyTorch checkpoint: re-copy or re-save it"


def _first_line(exc: BaseException) -> str:
    """The informative part of a torch/pickle error, without torch's weights_only advice."""
    boilerplate = (
        "Weights only load failed",
        "Please file an issue",
        "Check the documentation",
        "(1)",
        "(2)",
    )
    lines = [
        ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith(boilerplate)
    ]
    detail = next((ln for ln in lines if re.search(r"GLOBAL|load key|Unsupported|failed|Expected", ln)), "")
    detail = detail or (lines[0] if lines else "")
    detail = detail.split(". ")[0].removeprefix("WeightsUnpickler error: ")
    return f"{type(exc).__name__}: {detail[:160]}" if detail else type(exc).__name__


# --- plain pickles ----------------------------------------------------------------------------

# nanoGPT meta.pkl: {'vocab_size': int, 'itos': {int: str}, 'stoi': {str: int}}.
META_PKL_GLOBALS: dict[tuple[str, str], Any] = {
    ("builtins", cls.__name__): cls for cls in (dict, int, str, list, tuple, float)
}


def dcp_metadata_globals() -> dict[tuple[str, str], Any]:
    """Globals a ``torch.distributed.checkpoint`` ``.metadata`` pickle may name: DCP's own metadata
    classes, torch.Size, dtypes/layouts and plain builtins."""
    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], Any] = {
        ("torch", "Size"): torch.Size,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("collections", "OrderedDict"): OrderedDict,
        ("pathlib", "PosixPath"): pathlib.PosixPath,
        ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo,
    }
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    ):
        if hasattr(metadata, name):
            allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(metadata, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = getattr(torch, name)
    for name in (
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "int",
        "float",
        "str",
        "bool",
        "bytes",
        "complex",
    ):
        allowed[("builtins", name)] = getattr(builtins, name)
    return allowed


class RefusedGlobal(UnsafeCheckpointError):
    """A pickle named a global outside the allowlist; refused before anything ran."""

    def __init__(self, source: Path | str, global_name: str):
        super().__init__(
            f"{source} is a pickle that names {global_name}, which is not allowed in this file; "
            "it was refused without running it. Re-create the file with the tool that should have made it"
        )
        self.global_name = global_name


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, allowed: Mapping[tuple[str, str], Any], source: Path | str):
        super().__init__(file)
        self._allowed = allowed
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        raise RefusedGlobal(self._source, f"{module}.{name}")


def unpickle_restricted(
    payload: bytes, allowed: Mapping[tuple[str, str], Any] = META_PKL_GLOBALS, source: Path | str = "pickle"
) -> Any:
    """Unpickle bytes resolving only the ``(module, name)`` globals in ``allowed``; others raise
    ``RefusedGlobal`` before they run. The one restricted unpickler (``restricted_unpickle`` reads
    a file through it; ``train.data.read_meta`` words its own messages around it)."""
    return _RestrictedUnpickler(io.BytesIO(payload), allowed, source).load()


def restricted_unpickle(path: str | Path, allowed: Mapping[tuple[str, str], Any] | None = None) -> Any:
    """Unpickle ``path`` resolving only the ``(module, name)`` globals in ``allowed``.

    The default allows plain builtins only (for nanoGPT ``meta.pkl``); ``dcp_metadata_globals()``
    is the set for ``torch.distributed.checkpoint`` ``.metadata`` files.
    """
    path = Path(path)
    check_readable_file(path, what="pickle")
    allowed = META_PKL_GLOBALS if allowed is None else allowed
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, allowed, path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:
        raise InputError(f"{path} is not a readable pickle ({_first_line(exc)}); {_CORRUPT_FIX}") from None
