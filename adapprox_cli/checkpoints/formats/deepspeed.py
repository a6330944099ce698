"""DeepSpeed ZeRO checkpoints: ``latest`` + ``global_stepN/`` with model and optimizer files per rank.

``*_model_states.pt`` carries ``param_shapes`` (per group, name -> shape in flat order), the name
map. Stage 0 keeps a plain optimizer state dict there. Stages 1-3 keep one file per data-parallel
rank whose moments are flat 1-D partitions, reassembled here without deepspeed:

* stage 1/2: per group, concatenate the ranks' flat tensors, then walk ``param_shapes[g]``,
  ``narrow(offset, numel).view(shape)``, advancing by ``numel + param_alignment_paddings[g][i]``;
  the tail padding (alignment to 2 * world size) is ignored;
* stage 3: per rank, concatenate the groups; each parameter takes ``ceil(numel / world)``
  elements from every rank, in rank order, trimmed to ``numel``.

A rank set smaller than ``partition_count`` is refused, as ``zero_to_fp32`` does.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from adapprox_cli.checkpoints import names as naming
from adapprox_cli.checkpoints.core import (
    OptimizerCheckpoint,
    ParamState,
    clean_param_groups,
    max_step,
    optimizer_kind,
    refuse_unsupported_keys,
    state_dtype,
)
from adapprox_cli.checkpoints.formats import CheckpointFormat
from adapprox_cli.checkpoints.safe_load import contained_path, safe_torch_load
from adapprox_cli.checkpoints.torch_state import build_checkpoint, find_optimizer_state_dict
from adapprox_cli.errors import InputError, UnsupportedStateError
from adapprox_cli.formatting import natural_key

_OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL_FILE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_STEP_DIR = re.compile(r"^global_step(\d+)$")


def _has_model_states(path: Path) -> bool:
    return path.is_dir() and any(_MODEL_FILE.match(f.name) for f in path.iterdir())


def resolve_step_dir(path: Path) -> Path | None:
    """The ``global_stepN`` (or tag) directory of a DeepSpeed checkpoint, or None if it is not one."""
    if path.is_file() and (_MODEL_FILE.match(path.name) or _OPTIM_FILE.match(path.name)):
        return path.parent
    if not path.is_dir():
        return None
    if _has_model_states(path):
        return path
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text(errors="replace").strip()
        if tag and _has_model_states(contained_path(path, tag, latest)):
            return path / tag
    steps = sorted(
        (int(m.group(1)), d)
        for d in path.iterdir()
        if (m := _STEP_DIR.match(d.name)) and _has_model_states(d)
    )
    if steps:
        return steps[-1][1]
    # Lightning's DeepSpeed strategy: <name>.ckpt/checkpoint/
    if _has_model_states(path / "checkpoint"):
        return path / "checkpoint"
    return None


def is_deepspeed(path: Path) -> bool:
    return resolve_step_dir(path) is not None


def load_deepspeed(path: Path, *, trust_checkpoint: bool = False) -> OptimizerCheckpoint:
    step_dir = resolve_step_dir(path)
    if step_dir is None:
        raise InputError(f"{path} is not a DeepSpeed checkpoint (no latest/global_stepN/*_model_states.pt)")
    model_files = sorted(
        (f for f in step_dir.iterdir() if _MODEL_FILE.match(f.name)), key=lambda f: natural_key(f.name)
    )
    optim_files = sorted(
        (f for f in step_dir.iterdir() if _OPTIM_FILE.match(f.name)), key=lambda f: natural_key(f.name)
    )
    mp_ranks = {int(_MODEL_FILE.match(f.name).group(2)) for f in model_files}
    if len(mp_ranks) > 1:
        raise UnsupportedStateError(
            f"{step_dir} is model-parallel ({len(mp_ranks)} mp ranks); adapprox reassembles data-parallel ZeRO "
            "partitions only. Convert it with DeepSpeed's ds_to_universal first"
        )
    model_states = safe_torch_load(model_files[0], trust_checkpoint=trust_checkpoint)
    if not isinstance(model_states, dict) or "param_shapes" not in model_states:
        raise InputError(f"{model_files[0]} has no param_shapes; it is not a DeepSpeed model-states file")
    param_shapes = [
        [(naming.normalize_name(n), tuple(s)) for n, s in g.items()] for g in model_states["param_shapes"]
    ]
    extra = {
        "step_dir": str(step_dir),
        "tag": step_dir.name,
        "ds_version": model_states.get("ds_version"),
        "global_steps": model_states.get("global_steps"),
        "dp_world_size": model_states.get("dp_world_size"),
        "frozen_param_shapes": _frozen_shapes(model_states.get("frozen_param_shapes")),
        "optim_files": [str(f) for f in optim_files],
    }
    step_fallback = (
        model_states.get("global_steps") if isinstance(model_states.get("global_steps"), int) else None
    )
    if not optim_files:
        return _load_stage0(path, model_states, param_shapes, extra, step_fallback)
    ranks = [_optimizer_partition(f, trust_checkpoint) for f in optim_files]
    _check_rank_set(step_dir, optim_files, ranks)
    stage = _stage(ranks[0])
    extra["zero_stage"] = stage
    if stage == 3:
        params, groups = _reassemble_stage3(ranks, param_shapes, step_dir)
    else:
        params, groups = _reassemble_stage12(ranks, param_shapes, step_dir)
    refuse_unsupported_keys({k for p in params for k in p.state}, step_dir)
    kind, warnings = optimizer_kind({k for p in params for k in p.state}, groups, "adamw")
    step = max_step(params)
    module = model_states.get("module")
    return OptimizerCheckpoint(
        path=path,
        format="deepspeed",
        optimizer=kind,
        step=step if step is not None else step_fallback,
        param_groups=clean_param_groups(groups),
        params=params,
        names_source="deepspeed-param-shapes",
        warnings=warnings,
        container=None,
        optimizer_state_dict=None,
        model_state=_model_state(module) if stage < 3 else None,
        extra=extra,
    )


def _frozen_shapes(value: Any) -> dict[str, list[int]]:
    """Frozen parameters have no optimizer state; kept for the record (a dict, or one per group)."""
    groups = value if isinstance(value, list) else [value]
    return {naming.normalize_name(k): list(v) for g in groups if isinstance(g, dict) for k, v in g.items()}


def _model_state(module: Any) -> dict | None:
    if not isinstance(module, dict):
        return None
    return naming.normalize_keys({k: v for k, v in module.items() if isinstance(v, torch.Tensor)})


def _load_stage0(
    path: Path, model_states: dict, param_shapes: list, extra: dict, step_fallback
) -> OptimizerCheckpoint:
    osd, keys = find_optimizer_state_dict(model_states, path)
    params = [naming.ModelParam(n, s) for g in param_shapes for n, s in g]
    candidate = naming.NameCandidate(
        "deepspeed-param-shapes", [p.name for p in params], [p.shape for p in params]
    )
    extra["zero_stage"] = 0
    return build_checkpoint(
        osd,
        path=path,
        fmt="deepspeed",
        model_params=params,
        model_tiers=[[candidate]],
        default_optimizer="adamw",
        step_fallback=step_fallback,
        container=model_states,
        model_state=_model_state(model_states.get("module")),
        extra={**extra, "optimizer_path": keys},
    )


def _optimizer_partition(path: Path, trust_checkpoint: bool) -> dict:
    obj = safe_torch_load(path, trust_checkpoint=trust_checkpoint)
    osd = obj.get("optimizer_state_dict") if isinstance(obj, dict) else None
    if not isinstance(osd, dict):
        raise InputError(f"{path} has no optimizer_state_dict; it is not a DeepSpeed ZeRO optimizer file")
    return osd


def _check_rank_set(step_dir: Path, files: list[Path], ranks: list[dict]) -> None:
    found = [int(_OPTIM_FILE.match(f.name).group(2)) for f in files]
    count = ranks[0].get("partition_count")
    expected = max(count) if isinstance(count, (list, tuple)) and count else count
    if isinstance(expected, int) and (expected != len(files) or sorted(found) != list(range(expected))):
        raise UnsupportedStateError(
            f"{step_dir} is an incomplete DeepSpeed rank set: partition_count is {expected} but optimizer files "
            f"exist for ranks {sorted(found)}; copy every *_optim_states.pt file of this step"
        )


def _stage(osd: dict) -> int:
    stage = osd.get("zero_stage")
    if stage is not None:
        return int(stage)
    return 3 if "fp32_flat_groups" in osd else 2


def _group_states(osd: dict, step_dir: Path) -> tuple[list[dict], list[dict]]:
    """(state per group, param_groups) of one rank."""
    base = osd.get("base_optimizer_state", osd.get("optimizer_state_dict"))
    if isinstance(base, list):  # elastic checkpoints: a list of per-group states
        return base, [{} for _ in base]
    if not isinstance(base, dict) or "state" not in base:
        raise InputError(f"{step_dir}: unrecognised ZeRO optimizer file layout (keys {sorted(osd)[:8]})")
    # One flat tensor per (sub-)group, keyed 0..G-1 in group order.
    return [base["state"][k] for k in sorted(base["state"])], base.get("param_groups", [])


def _reassemble_stage12(
    ranks: list[dict], param_shapes: list, step_dir: Path
) -> tuple[list[ParamState], list[dict]]:
    per_rank = [_group_states(r, step_dir) for r in ranks]
    groups = per_rank[0][1]
    paddings = ranks[0].get("param_alignment_paddings")
    params: list[ParamState] = []
    if len(per_rank[0][0]) != len(param_shapes):
        raise InputError(
            f"{step_dir}: {len(per_rank[0][0])} flat optimizer groups for {len(param_shapes)} groups in param_shapes; "
            "the model and optimizer files do not belong together"
        )
    for g, shapes in enumerate(param_shapes):
        keys = [
            k
            for k, v in per_rank[0][0][g].items()
            if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() > 1
        ]
        flats = {k: _cat([states[g][k] for states, _ in per_rank]) for k in keys}
        shared = {k: v for k, v in per_rank[0][0][g].items() if k not in keys}
        offset = 0
        for i, (name, shape) in enumerate(shapes):
            numel = math.prod(shape)
            state = dict(shared)
            for k, flat in flats.items():
                _check_bounds(step_dir, name, k, offset + numel, flat.numel())
                state[k] = flat.narrow(0, offset, numel).view(shape)
            pad = paddings[g][i] if paddings and g < len(paddings) and i < len(paddings[g]) else 0
            offset += numel + int(pad)
            params.append(ParamState(len(params), name, shape, state_dtype(state), g, state))
    return params, groups


def _reassemble_stage3(
    ranks: list[dict], param_shapes: list, step_dir: Path
) -> tuple[list[ParamState], list[dict]]:
    per_rank = [_group_states(r, step_dir) for r in ranks]
    groups = per_rank[0][1]
    world = len(ranks)
    first = per_rank[0][0]
    keys = [k for k, v in first[0].items() if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() > 1]
    rank_flats = {k: [_cat([s[k] for s in states]) for states, _ in per_rank] for k in keys}
    params: list[ParamState] = []
    offset = 0
    shared = {k: v for k, v in first[0].items() if k not in keys}  # the step, common to all groups
    for g, shapes in enumerate(param_shapes):
        for name, shape in shapes:
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            state = dict(shared)
            for k, flats in rank_flats.items():
                _check_bounds(step_dir, name, k, offset + part, flats[0].numel())
                state[k] = _cat([f.narrow(0, offset, part) for f in flats]).narrow(0, 0, numel).view(shape)
            offset += part
            params.append(ParamState(len(params), name, shape, state_dtype(state), g, state))
    return params, groups


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    # One rank: keep the memory-mapped tensor (narrowed views stay lazy).
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _check_bounds(step_dir: Path, name: str, key: str, end: int, total: int) -> None:
    if end > total:
        raise InputError(
            f"{step_dir}: {key} of {name} ends at element {end} but the flat partitions hold {total}; "
            "param_shapes does not match the optimizer files (mixed steps?)"
        )


FORMAT = CheckpointFormat(
    name="deepspeed",
    description="DeepSpeed directory",
    load=lambda path, obj, *, trust_checkpoint=False, optimizer_index=0: load_deepspeed(
        path, trust_checkpoint=trust_checkpoint
    ),
    detect_directory=is_deepspeed,
    detect_file=is_deepspeed,
    write_back="container",
    extra_keys=("zero_stage", "tag", "ds_version", "dp_world_size"),
)
