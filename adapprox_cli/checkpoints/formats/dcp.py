"""torch.distributed.checkpoint (DCP) directories: ``.metadata`` + ``__{rank}_{i}.distcp``.

The optimizer state is keyed by parameter FQN, so names need no reconstruction. Two key styles
occur: nested (``optim.state.<fqn>.exp_avg_sq``, ``optim.param_groups.0.lr`` with a ``params``
list of FQNs; the prefix is ``optimizer`` for HF/accelerate and ``optimizer_<i>`` for Lightning)
and flattened (``state.<fqn>.exp_avg_sq``, ``param_groups.<fqn>.lr`` per parameter, torchtitan).

``.metadata`` is a plain pickle that DCP itself reads with ``pickle.load``; here it is read with a
restricted unpickler, and the data is loaded through ``dcp.load`` without a process group using a
reader and planner that never unpickle anything unrestricted (DCP's own planner loads non-tensor
entries with ``weights_only=False``). Sharded tensors (FSDP2) are reassembled by ``dcp.load``.
"""

from __future__ import annotations

import functools
import io
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapprox_cli.checkpoints.core import OptimizerCheckpoint, check_optimizer_index
from adapprox_cli.checkpoints.formats import CheckpointFormat
from adapprox_cli.checkpoints.safe_load import allowed_globals, dcp_metadata_globals, restricted_unpickle
from adapprox_cli.checkpoints.torch_state import build_checkpoint
from adapprox_cli.errors import InputError
from adapprox_cli.formatting import natural_key

METADATA_FILE = ".metadata"
_PREFIX = re.compile(r"^(optim|optimizer|optimizer_\d+)$")


def read_dcp_metadata(path: Path) -> Any:
    """The ``Metadata`` object of a DCP directory, unpickled with only DCP's own classes allowed."""
    md = restricted_unpickle(path / METADATA_FILE, dcp_metadata_globals())
    if not hasattr(md, "state_dict_metadata"):
        raise InputError(
            f"{path / METADATA_FILE} is not torch.distributed.checkpoint metadata; re-copy the directory"
        )
    return md


@dataclass
class _Layout:
    prefix: str | None  # "optim", "optimizer", "optimizer_0", ... or None for the flattened style
    state: dict[str, dict[str, str]]  # fqn -> {state key: flat metadata key}
    groups: dict[str, str]  # flat keys of nested param_groups entries
    flat_groups: dict[str, dict[str, str]]  # fqn -> {hyper-parameter: flat key} (flattened style)


def _path_of(md: Any, key: str) -> tuple:
    planner = getattr(md, "planner_data", None) or {}
    path = planner.get(key)
    return tuple(path) if isinstance(path, (tuple, list)) else (key,)


def _layouts(md: Any) -> dict[str | None, _Layout]:
    layouts: dict[str | None, _Layout] = {}
    for key in md.state_dict_metadata:
        path = _path_of(md, key)
        if len(path) == 4 and path[1] == "state" and _PREFIX.match(str(path[0])):
            layout = layouts.setdefault(path[0], _Layout(path[0], {}, {}, {}))
            layout.state.setdefault(str(path[2]), {})[str(path[3])] = key
        elif len(path) >= 3 and path[1] == "param_groups" and _PREFIX.match(str(path[0])):
            layouts.setdefault(path[0], _Layout(path[0], {}, {}, {})).groups[key] = key
        elif len(path) == 1 and key.startswith("state.") and key.count(".") >= 2:
            fqn, _, leaf = key[len("state.") :].rpartition(".")
            layouts.setdefault(None, _Layout(None, {}, {}, {})).state.setdefault(fqn, {})[leaf] = key
        elif len(path) == 1 and key.startswith("param_groups.") and key.count(".") >= 2:
            fqn, _, leaf = key[len("param_groups.") :].rpartition(".")
            layouts.setdefault(None, _Layout(None, {}, {}, {})).flat_groups.setdefault(fqn, {})[leaf] = key
    return {k: v for k, v in layouts.items() if v.state or v.groups or v.flat_groups}


def load_dcp(path: Path, *, optimizer_index: int = 0) -> OptimizerCheckpoint:
    md = read_dcp_metadata(path)
    layouts = _layouts(md)
    if not layouts:
        keys = list(md.state_dict_metadata)[:5]
        raise InputError(
            f"{path} is a DCP checkpoint without optimizer state (keys like {keys}); save the optimizer with "
            "get_state_dict(model, optimizer) next to the model"
        )
    order = sorted(layouts, key=lambda p: (p is None, natural_key(p or "")))
    check_optimizer_index(path, optimizer_index, len(order), "optimizer state(s)")
    layout = layouts[order[optimizer_index]]
    values = _load(path, md, layout)
    osd = _assemble(layout, values, path)
    warnings_ = (
        [f"the checkpoint holds {len(order)} optimizer states; showing {order[optimizer_index]}"]
        if len(order) > 1
        else []
    )
    ck = build_checkpoint(
        osd,
        path=path,
        fmt="dcp",
        default_optimizer="adamw",
        container=None,
        warnings=warnings_,
        extra={
            "prefix": layout.prefix,
            "optimizer_index": optimizer_index,
            "key_style": "flattened" if layout.prefix is None else "nested",
        },
    )
    ck.optimizer_state_dict = None  # rebuilt here from FQN keys, not an object of the directory
    return ck


_COMPRESSION_ALLOWANCE = 256


def check_storage(path: Path, md: Any) -> None:
    """Refuse metadata that points outside the directory, past a data file's end, or that declares
    a tensor larger than the bytes stored for it.

    DCP opens ``relative_path`` as given (``../../../../etc/passwd`` included) and allocates each
    tensor from its declared size before reading a byte: both are checked here first, so a
    100-byte ``.metadata`` cannot cost a 40 GB ``torch.empty``.
    """
    root = path.resolve()
    sizes: dict[str, int] = {}
    stored: dict[str, int] = {}  # bytes on disk per tensor
    bound: dict[str, int] = {}  # the most those bytes can decode to
    for index, info in (getattr(md, "storage_data", None) or {}).items():
        relative = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(relative, str) or type(offset) is not int or type(length) is not int:
            raise InputError(f"{path / METADATA_FILE}: a storage entry is malformed; re-copy the directory")
        target = (root / relative).resolve()
        if target.parent != root or not target.name.endswith(".distcp"):
            raise InputError(
                f"{path / METADATA_FILE} points a tensor at {relative!r}, outside the checkpoint directory; "
                "refused without opening it (re-copy the directory from its source)"
            )
        if relative not in sizes:
            sizes[relative] = target.stat().st_size if target.is_file() else -1
        if sizes[relative] < 0:
            raise InputError(f"{path}: data file {relative} is missing; re-copy the whole directory")
        if offset < 0 or length < 0 or offset + length > sizes[relative]:
            raise InputError(
                f"{path / relative} is shorter than its metadata says ({sizes[relative]} bytes, an entry ends "
                f"at {offset + length}): truncated copy; re-copy the directory"
            )
        fqn = getattr(index, "fqn", None)
        # Entries written through a transform (compression) may hold fewer bytes than the tensor:
        # allow a generous ratio there, none for plain entries.
        ratio = _COMPRESSION_ALLOWANCE if getattr(info, "transform_descriptors", None) else 1
        stored[fqn] = stored.get(fqn, 0) + length
        bound[fqn] = bound.get(fqn, 0) + length * ratio
    for key, meta in md.state_dict_metadata.items():
        size = getattr(meta, "size", None)
        if size is None:
            continue
        dtype = meta.properties.dtype
        needed = math.prod(int(d) for d in size) * torch.empty((), dtype=dtype).element_size()
        if needed > bound.get(key, 0):
            shape = "x".join(str(int(d)) for d in size)
            raise InputError(
                f"{path / METADATA_FILE} declares {key} as {shape} ({needed} bytes) but the directory stores "
                f"{stored.get(key, 0)} bytes for it: the metadata does not match the data; re-copy the directory"
            )


def _load(path: Path, md: Any, layout: _Layout) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    check_storage(path, md)
    wanted: dict[str, Any] = {}
    for keys in layout.state.values():
        for key in keys.values():
            wanted[key] = _empty_like_metadata(md.state_dict_metadata[key])
    for key in [*layout.groups.values(), *(k for g in layout.flat_groups.values() for k in g.values())]:
        wanted[key] = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group": single-process load is intended
            reader, planner = _reader_and_planner()
            dcp.load(
                wanted,
                storage_reader=reader(path),
                planner=planner(flatten_state_dict=False),
                no_dist=True,
            )
    except InputError:
        raise
    except (Exception, CheckpointException) as exc:
        # CheckpointException derives from BaseException: ``except Exception`` alone misses it.
        raise InputError(
            f"{path}: reading the DCP data failed ({_failure(exc)}); re-copy the directory"
        ) from exc
    return wanted


def _failure(exc: BaseException) -> str:
    """The first real error inside a CheckpointException (it wraps one per rank), in one line."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        exc = next(iter(failures.values()))
        if isinstance(exc, tuple) and exc:  # (exception, traceback) in some torch versions
            exc = exc[0]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _empty_like_metadata(meta: Any) -> Any:
    size = getattr(meta, "size", None)
    if size is None:
        return None
    return torch.empty(tuple(size), dtype=meta.properties.dtype)


def _assemble(layout: _Layout, values: dict[str, Any], path: Path) -> dict:
    """A torch-style state dict keyed by FQN, like ``FSDP.optim_state_dict``."""
    state = {fqn: {leaf: values[key] for leaf, key in keys.items()} for fqn, keys in layout.state.items()}
    if layout.prefix is not None:
        groups: dict[int, dict] = {}
        for key in layout.groups:
            _, _, rest = key.partition(f"{layout.prefix}.param_groups.")
            index, _, hp = rest.partition(".")
            groups.setdefault(int(index), {})[hp] = values[key]
        param_groups = [groups[i] for i in sorted(groups)]
        for g in param_groups:
            g.setdefault("params", list(state) if len(param_groups) == 1 else [])
    else:
        param_groups = _groups_from_flattened(layout, values, list(state))
    if sum(len(g["params"]) for g in param_groups) == 0:
        raise InputError(
            f"{path}: the optimizer param_groups list no parameters; the checkpoint is incomplete"
        )
    return {"state": state, "param_groups": param_groups}


def _groups_from_flattened(layout: _Layout, values: dict[str, Any], stated: list[str]) -> list[dict]:
    # Flattened dicts repeat the group's hyper-parameters per parameter; equal values = one group.
    groups: list[dict] = []
    fqns = list(layout.flat_groups) or stated
    for fqn in fqns:
        hp = {leaf: values[key] for leaf, key in layout.flat_groups.get(fqn, {}).items()}
        match = next((g for g in groups if _same(g, hp)), None)
        if match is None:
            match = {**hp, "params": []}
            groups.append(match)
        match["params"].append(fqn)
    return groups


def _same(group: dict, hp: dict) -> bool:
    return {k: v for k, v in group.items() if k != "params"} == hp


@functools.cache
def _reader_and_planner() -> tuple[type, type]:
    """DCP's reader and planner made safe; built on first use, since torch.distributed.checkpoint
    takes seconds to import and only DCP directories should pay for it."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _SafePlanner(DefaultLoadPlanner):
        """DCP's planner unpickles non-tensor entries with ``weights_only=False``; this one does not."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            with torch.serialization.safe_globals(allowed_globals()):
                obj = torch.load(value, weights_only=True, map_location="cpu")
            # The planner works on a (flattened) copy; the caller reads the dict it passed in.
            self.state_dict[read_item.dest_index.fqn] = obj
            self.original_state_dict[read_item.dest_index.fqn] = obj

    class _RestrictedReader(FileSystemReader):
        """Reads ``.metadata`` with the restricted unpickler instead of ``pickle.load``."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            md = read_dcp_metadata(Path(self.path))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return _RestrictedReader, _SafePlanner


def is_dcp_dir(path: Path) -> bool:
    return (path / METADATA_FILE).is_file()


def dcp_dir(path: Path) -> Path:
    """The DCP directory itself, or the ``optimizer_0/`` DCP subdirectory of a Trainer/accelerate FSDP save."""
    if is_dcp_dir(path):
        return path
    return next(d for d in sorted(path.iterdir()) if d.name.startswith("optimizer") and is_dcp_dir(d))


def _detect(path: Path) -> bool:
    # Also Trainer/accelerate FSDP (optimizer_0/) and Lightning FSDP (.ckpt/ with meta.pt).
    return is_dcp_dir(path) or any(
        d.is_dir() and d.name.startswith("optimizer") and is_dcp_dir(d) for d in path.iterdir()
    )


FORMAT = CheckpointFormat(
    name="dcp",
    description="DCP directory",
    load=lambda path, obj, *, trust_checkpoint=False, optimizer_index=0: load_dcp(
        dcp_dir(path), optimizer_index=optimizer_index
    ),
    detect_directory=_detect,
    several_optimizers=True,
    extra_keys=("optimizer_index", "prefix", "key_style"),
)
