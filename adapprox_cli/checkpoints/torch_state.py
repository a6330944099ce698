"""Turning a torch-style optimizer state dict ({"state", "param_groups"}) into ParamStates.

Shared by every format whose optimizer state is such a dict (plain, nanoGPT, Trainer, Lightning,
accelerate, DeepSpeed stage 0) or can be put into that form (DCP, FSDP full state dicts keyed by
FQN strings instead of integers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapprox_cli.checkpoints import names as naming
from adapprox_cli.checkpoints.core import (
    OptimizerCheckpoint,
    ParamState,
    check_tensor_storage,
    clean_param_groups,
    is_optimizer_state_dict,
    max_step,
    optimizer_kind,
    refuse_unsupported_keys,
    state_dtype,
)
from adapprox_cli.errors import InputError


@dataclass
class FlatEntry:
    key: int | str  # the key in osd["state"]: an int index, or an FQN string
    group: int
    state: dict[str, torch.Tensor]


def flat_entries(osd: dict, source: Path | str) -> list[FlatEntry]:
    """The parameters of all groups in flat order, with their (possibly empty) state."""
    if not is_optimizer_state_dict(osd):
        raise InputError(
            f"{source} has no optimizer state dict with 'state' and 'param_groups'; pass an optimizer file"
        )
    _check_param_keys(osd, source)
    entries = []
    for g, group in enumerate(osd["param_groups"]):
        for key in group["params"]:
            raw = osd["state"].get(key, {})
            if not isinstance(raw, dict):
                raise InputError(
                    f"{source}: the state of parameter {key!r} is a {type(raw).__name__}, not a dict"
                )
            entries.append(FlatEntry(key, g, {k: _as_tensor(k, v, key, source) for k, v in raw.items()}))
    return entries


def _check_param_keys(osd: dict, source: Path | str) -> None:
    """``params`` lists hold each parameter once: all int indices (torch) or all FQN strings (FSDP)."""
    keys = []
    for g, group in enumerate(osd["param_groups"]):
        if not isinstance(group["params"], (list, tuple)):
            raise InputError(
                f"{source}: param group {g} lists its params as a {type(group['params']).__name__}"
            )
        keys += list(group["params"])
    ints = all(type(k) is int and 0 <= k < 2**31 for k in keys)
    strings = all(isinstance(k, str) for k in keys)
    if keys and not (ints or strings):
        bad = next(k for k in keys if not (type(k) is int and 0 <= k < 2**31) and not isinstance(k, str))
        raise InputError(
            f"{source}: param_groups list a parameter as {bad!r:.40}; an optimizer state dict lists int indices "
            "(or FQN strings); re-save it from the optimizer"
        )
    if len(set(keys)) != len(keys):
        repeated = next(k for k in keys if keys.count(k) > 1)
        raise InputError(
            f"{source}: param_groups list parameter {repeated!r:.40} more than once; re-save it from the optimizer"
        )


_MOMENT_KEYS = {
    "exp_avg",
    "exp_avg_sq",
    "max_exp_avg_sq",
    "exp_avg_sq_q",
    "exp_avg_sq_u",
    "exp_avg_sq_sketch",
}


def _as_tensor(key: str, value: Any, param: int | str, source: Path | str) -> Any:
    # Old torch and some custom optimizers keep ``step`` as a Python number.
    if key == "step" and isinstance(value, (int, float)):
        return torch.tensor(float(value), dtype=torch.float32)
    if key in _MOMENT_KEYS and not isinstance(value, torch.Tensor):
        raise InputError(f"{source}: {key} of parameter {param!r} is a {type(value).__name__}, not a tensor")
    if isinstance(value, torch.Tensor):
        check_tensor_storage(value, f"{key} of parameter {param!r}", source)
    return value


def explicit_names(osd: dict, entries: list[FlatEntry]) -> tuple[str, list[str]] | None:
    """Names the state dict carries itself: ``param_names`` (torch >= 2.6) or FQN-string keys."""
    groups = osd["param_groups"]
    if groups and all(isinstance(g.get("param_names"), list) for g in groups):
        names = [n for g in groups for n in g["param_names"]]
        if len(names) == len(entries):
            return "param_names", [str(n) for n in names]
    if entries and all(isinstance(e.key, str) for e in entries):
        return "fqn", [str(e.key) for e in entries]
    return None


def rule_candidates(
    params: list[naming.ModelParam], count: int, note: str | None = None
) -> list[naming.NameCandidate]:
    """All grouping rules applied to one model order (chosen later by group sizes and shapes)."""
    return [
        naming.nanogpt_candidate(params, note),
        *naming.hf_decay_candidates(params, note),
        naming.model_order_candidate(params, note),
        *naming.window_candidates(params, count, note),
    ]


def build_checkpoint(
    osd: dict,
    *,
    path: Path,
    fmt: str,
    model_params: list[naming.ModelParam] | None = None,
    model_tiers: list[list[naming.NameCandidate]] | None = None,
    default_optimizer: str = "adamw",
    step_fallback: int | None = None,
    **fields: Any,
) -> OptimizerCheckpoint:
    """An OptimizerCheckpoint from a torch-style state dict.

    ``model_params`` (names and shapes of the model in parameter order, when known) lets explicit
    names be checked against shapes and the flat-shard trap be detected; ``model_tiers`` are the
    format's candidate name orders after the explicit ones (default: every rule on ``model_params``).
    """
    entries = flat_entries(osd, path)
    state_keys = {k for e in entries for k in e.state}
    refuse_unsupported_keys(state_keys, path, osd["param_groups"])
    evidence = [naming.evidence_of(e.state) for e in entries]
    group_sizes = [len(g["params"]) for g in osd["param_groups"]]

    explicit = explicit_names(osd, entries)
    naming.refuse_flat_shards(
        [*(p.name for p in model_params or []), *(explicit[1] if explicit else [])],
        evidence,
        model_params or [],
        path,
    )
    tiers: list[list[naming.NameCandidate]] = []
    if explicit:
        tiers.append([_explicit_candidate(explicit[0], explicit[1], evidence, model_params)])
    if model_tiers is None and model_params:
        model_tiers = [rule_candidates(model_params, len(entries))]
    tiers += model_tiers or []
    choice = naming.choose_names(tiers, evidence, group_sizes)

    params = []
    for i, (entry, e) in enumerate(zip(entries, evidence, strict=True)):
        shape = choice.shapes[i] or e.exact or e.matrix or ()
        fallback = (choice.dtypes[i] if choice.dtypes else None) or torch.float32
        index = entry.key if isinstance(entry.key, int) else i
        params.append(
            ParamState(
                index,
                choice.names[i],
                tuple(shape),
                state_dtype(entry.state, fallback),
                entry.group,
                entry.state,
            )
        )

    kind, kind_warnings = optimizer_kind(state_keys, osd["param_groups"], default_optimizer)
    step = max_step(params)
    return OptimizerCheckpoint(
        path=path,
        format=fmt,
        optimizer=kind,
        step=step if step is not None else step_fallback,
        param_groups=clean_param_groups(osd["param_groups"]),
        params=params,
        names_source=choice.source,
        warnings=[*choice.warnings, *kind_warnings, *fields.pop("warnings", [])],
        optimizer_state_dict=osd,
        **fields,
    )


def _explicit_candidate(
    source: str,
    names: list[str],
    evidence: list[naming.StateEvidence],
    model_params: list[naming.ModelParam] | None,
) -> naming.NameCandidate:
    normalized = [naming.normalize_name(n) for n in names]
    by_name = {p.name: p for p in model_params or []}
    shapes, dtypes = [], []
    for n, e in zip(normalized, evidence, strict=True):
        p = by_name.get(n)
        shapes.append(p.shape if p else (e.exact or e.matrix or ()))
        dtypes.append(p.dtype if p else None)
    return naming.NameCandidate(source, normalized, shapes, None, None, dtypes)


def find_optimizer_state_dict(obj: Any, source: Path) -> tuple[dict, list]:
    """The optimizer state dict inside a loaded object, and the keys leading to it."""
    if is_optimizer_state_dict(obj):
        return obj, []
    if isinstance(obj, dict):
        for key in ("optimizer", "optimizer_state_dict", "optim", "optimizer_state"):
            inner = obj.get(key)
            if is_optimizer_state_dict(inner):
                return inner, [key]
            # DeepSpeed fp16 stage 0 and some wrappers nest it one level deeper.
            if isinstance(inner, dict) and is_optimizer_state_dict(inner.get("optimizer_state_dict")):
                return inner["optimizer_state_dict"], [key, "optimizer_state_dict"]
    raise InputError(f"{source} {describe_object(obj)}; {_NO_OPTIMIZER_FIX}")


_NO_OPTIMIZER_FIX = (
    "adapprox needs an optimizer state dict (a dict with 'state' and 'param_groups', e.g. torch.save(optimizer."
    "state_dict())); pass the optimizer file or the checkpoint that contains it"
)


def describe_object(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = list(obj)
        if keys and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return f"holds model weights only ({len(keys)} tensors, e.g. {keys[0]!r}), no optimizer state"
        shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
        return f"holds a dict with keys [{shown}] and no optimizer state dict"
    return f"holds a {type(obj).__name__}, not an optimizer state dict"


def model_from_wrapper(obj: Any) -> dict[str, torch.Tensor] | None:
    """Model weights stored next to the optimizer (tutorial, nanoGPT and Lightning conventions)."""
    if not isinstance(obj, dict):
        return None
    for key in ("model_state_dict", "model", "state_dict", "module"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return None
