"""safetensors: header-only reads, memory-mapped tensors, and adapprox's own optimizer export.

The export holds a flat ``str -> tensor`` dict with keys ``state/{index}/{key}`` (key one of
step, exp_avg, exp_avg_sq, exp_avg_sq_q, exp_avg_sq_u, exp_avg_sq_sketch, max_exp_avg_sq) and a ``__metadata__``
of strings: ``format`` = "adapprox-optimizer-v1", ``optimizer`` ("adamw" | "adapprox"),
``param_groups`` (JSON list of groups including their ``params`` index lists), ``param_names``
(JSON list by index), ``param_shapes`` (JSON list by index, optional), ``source_format`` and
``ranks`` (JSON {index: rank} for factored parameters).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import torch

from adapprox_cli.atomic_io import atomic_write
from adapprox_cli.checkpoints.core import (
    FACTOR_KEYS,
    OptimizerCheckpoint,
    ParamState,
    anonymous_name,
    clean_param_groups,
    max_step,
    state_dtype,
    tensor_bytes,
)
from adapprox_cli.checkpoints.formats import CheckpointFormat
from adapprox_cli.checkpoints.safe_load import check_readable_file
from adapprox_cli.errors import InputError

EXPORT_FORMAT = "adapprox-optimizer-v1"
EXPORT_STATE_KEYS = (
    "step",
    "exp_avg",
    "exp_avg_sq",
    "exp_avg_sq_q",
    "exp_avg_sq_u",
    "exp_avg_sq_sketch",
    "max_exp_avg_sq",
)
_KEY = re.compile(r"^state/(\d+)/([A-Za-z_]+)$")
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "U16": getattr(torch, "uint16", None),
    "U32": getattr(torch, "uint32", None),
    "U64": getattr(torch, "uint64", None),
}
_MAX_HEADER = 100 * 2**20


def is_safetensors(path: Path) -> bool:
    """A cheap sniff: 8-byte little-endian header length, then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        n = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else 0
        return 2 <= n <= min(_MAX_HEADER, path.stat().st_size - 8) and head[8:9] == b"{"
    except OSError:
        return False


def read_safetensors_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """({name: {"dtype", "shape", "data_offsets"}}, metadata) without reading any tensor data."""
    path = Path(path)
    check_readable_file(path, what="safetensors")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        n = struct.unpack("<Q", raw_len)[0] if len(raw_len) == 8 else 0
        if not 2 <= n <= min(_MAX_HEADER, size - 8):
            raise InputError(f"{path} is not a safetensors file (bad header length {n}); {_FIX}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path} has a corrupt safetensors header ({exc}); {_FIX}") from None
        except RecursionError:
            raise InputError(
                f"{path} has a safetensors header nested too deeply to be one (a real header is a flat "
                f"object of tensors); {_FIX}"
            ) from None
    if not isinstance(header, dict):
        raise InputError(f"{path} has a corrupt safetensors header (not a JSON object); {_FIX}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: the safetensors __metadata__ is not a map of strings; {_FIX}")
    _check_layout(path, header, size - 8 - n)
    return header, metadata


def _check_layout(path: Path, header: dict, data_len: int) -> None:
    """Every tensor's bytes are exactly what its dtype and shape need, inside the file, and no two
    tensors share bytes (the rules the safetensors library itself enforces)."""
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise InputError(f"{path}: header entry {name!r} is not a tensor description; {_FIX}")
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
        ):
            raise InputError(f"{path}: tensor {name!r} has malformed shape or data_offsets; {_FIX}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise InputError(
                f"{path}: the header places tensor {name!r} outside the file's data (truncated?); {_FIX}"
            )
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is not None:
            needed = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if needed != end - begin:
                raise InputError(
                    f"{path}: the header declares tensor {name!r} as {info.get('dtype')} {shape} "
                    f"({needed} bytes) but gives it {end - begin} bytes; {_FIX}"
                )
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise InputError(f"{path}: tensors {a!r} and {b!r} overlap in the file (corrupt header); {_FIX}")


_FIX = "re-copy or re-export the file"


def load_safetensors_lazy(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file, memory-mapped (data is read only when touched)."""
    path = Path(path)
    header, metadata = read_safetensors_header(path)
    n = struct.unpack("<Q", path.open("rb").read(8))[0]
    base = 8 + n
    raw = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
    tensors = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise InputError(
                f"{path}: tensor {name!r} has dtype {info.get('dtype')} that this torch cannot read"
            )
        begin, end = info["data_offsets"]
        chunk = raw[base + begin : base + end]
        try:
            flat = chunk.view(dtype)
        except RuntimeError:  # unaligned data (writers that do not pad the header): copy
            flat = chunk.clone().view(dtype)
        tensors[name] = flat.view(info["shape"])
    return tensors, metadata


def is_adapprox_export(path: Path) -> bool:
    try:
        return read_safetensors_header(path)[1].get("format") == EXPORT_FORMAT
    except InputError:
        return False


def load_adapprox_safetensors(path: Path) -> OptimizerCheckpoint:
    tensors, metadata = load_safetensors_lazy(path)
    groups = _json_field(path, metadata, "param_groups", [])
    names = _json_field(path, metadata, "param_names", None)
    shapes = _json_field(path, metadata, "param_shapes", None)
    states: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if not m or m.group(2) not in EXPORT_STATE_KEYS:
            raise InputError(f"{path}: unexpected tensor {key!r} in an {EXPORT_FORMAT} file; {_FIX}")
        states.setdefault(int(m.group(1)), {})[m.group(2)] = t
    membership = [(int(i), g) for g, group in enumerate(groups) for i in group.get("params", [])]
    if not membership:  # groups without index lists: one group over every stated index
        membership = [(i, 0) for i in sorted(states)]
    warnings = []
    if names is None or len(names) != len(membership):
        warnings.append(
            "parameter names unknown: the file's param_names metadata is missing or has the wrong length"
        )
        names = None
    params = []
    for pos, (index, g) in enumerate(membership):
        state = states.get(index, {})
        shape = tuple(shapes[pos]) if shapes and pos < len(shapes) else _shape_from_state(state)
        name = names[pos] if names else anonymous_name(index)
        params.append(ParamState(index, name, shape, state_dtype(state), g, state))
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    ranks = {int(k): int(v) for k, v in _json_field(path, metadata, "ranks", {}).items()}
    return OptimizerCheckpoint(
        path=path,
        format="adapprox-safetensors",
        optimizer=metadata.get("optimizer", "adapprox"),
        step=max_step(params),
        param_groups=clean_param_groups(groups),
        params=params,
        names_source="safetensors-metadata" if names else "anonymous",
        warnings=warnings,
        container=None,
        optimizer_state_dict={"state": states, "param_groups": groups},
        extra={"source_format": metadata.get("source_format"), "ranks": ranks, "metadata": dict(metadata)},
    )


def _shape_from_state(state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    for key in ("exp_avg_sq", "exp_avg"):
        if key in state:
            return tuple(state[key].shape)
    if all(k in state for k in FACTOR_KEYS):
        return (int(state[FACTOR_KEYS[0]].shape[0]), int(state[FACTOR_KEYS[1]].shape[0]))
    return ()


def _json_field(path: Path, metadata: dict[str, str], key: str, default: Any) -> Any:
    if key not in metadata:
        return default
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: metadata field {key!r} is not valid JSON ({exc}); {_FIX}") from None


def write_adapprox_safetensors(
    path: str | Path,
    state_dict: dict,
    param_names: list[str] | None,
    source_format: str,
    optimizer: str,
    *,
    param_shapes: list[tuple[int, ...]] | None = None,
) -> Path:
    """Write a torch-style optimizer state dict (int-keyed) as an ``adapprox-optimizer-v1`` file.

    Written to a temporary file in the same directory and renamed, so an interrupted write never
    leaves a half file under ``path``. Returns the path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = _flatten_state(state_dict["state"])
    groups = [_jsonable_group(g) for g in state_dict["param_groups"]]
    ranks = {
        str(i): int(s["exp_avg_sq_q"].shape[1])
        for i, s in state_dict["state"].items()
        if isinstance(s.get("exp_avg_sq_q"), torch.Tensor)
    }
    metadata = {
        "format": EXPORT_FORMAT,
        "optimizer": optimizer,
        "param_groups": json.dumps(groups),
        "source_format": source_format,
        "ranks": json.dumps(ranks),
    }
    if param_names is not None:
        metadata["param_names"] = json.dumps(list(param_names))
    if param_shapes is not None:
        metadata["param_shapes"] = json.dumps([list(map(int, s)) for s in param_shapes])
    return atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def _flatten_state(state: dict) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for index, entry in state.items():
        for key, value in entry.items():
            if key not in EXPORT_STATE_KEYS:
                raise InputError(
                    f"state of parameter {index} has key {key!r}; the export holds {', '.join(EXPORT_STATE_KEYS)}"
                )
            t = torch.as_tensor(value, dtype=torch.float32) if not isinstance(value, torch.Tensor) else value
            t = t.detach().to("cpu").contiguous()
            # safetensors refuses tensors that share memory (views of one flat DeepSpeed buffer).
            ident = (t.untyped_storage().data_ptr(), t.storage_offset())
            if t.numel() and (ident in seen or t.untyped_storage().nbytes() != tensor_bytes(t)):
                t = t.clone()
            seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
            tensors[f"state/{int(index)}/{key}"] = t
    return tensors


def _jsonable_group(group: dict) -> dict:
    out = {}
    for key, value in group.items():
        if key == "param_names":
            continue
        if isinstance(value, torch.Tensor):
            value = value.item() if value.numel() == 1 else value.tolist()
        elif isinstance(value, tuple):
            value = [v.item() if isinstance(v, torch.Tensor) else v for v in value]
        try:
            json.dumps(value)
        except TypeError:
            value = str(value)
        out[key] = value
    return out


def _detect_file(path: Path) -> bool:
    if not is_safetensors(path):
        return False
    if is_adapprox_export(path):
        return True
    raise InputError(
        f"{path} is a safetensors file without optimizer state (model weights?); pass the optimizer "
        "checkpoint, or the directory that holds both"
    )


FORMAT = CheckpointFormat(
    name="adapprox-safetensors",
    description="an adapprox safetensors export",
    load=lambda path, obj, *, trust_checkpoint=False, optimizer_index=0: load_adapprox_safetensors(path),
    detect_file=_detect_file,
    extra_keys=("source_format", "ranks"),
)
