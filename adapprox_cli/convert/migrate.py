"""AdamW <-> Adapprox (and AdamW -> Adafactor) state migration: state dict in, state dict out.

Pure functions over ``torch.optim`` state dicts; nothing here reads or writes a file.

- ``adamw_to_adapprox``: every factored matrix's dense ``exp_avg_sq`` becomes the low-rank
  factors ``exp_avg_sq_q`` (m x k) and ``exp_avg_sq_u`` (n x k) the optimizer would keep; the rank
  is the one the optimizer's own adaptive rule settles on for that matrix (``factor_second_moment``),
  or a fixed one. ``exp_avg`` and ``step`` are carried over unchanged, ``exp_avg`` dropped when
  beta1 = 0; vectors keep a dense ``exp_avg_sq``. The param groups hold every ``Adapprox`` setting,
  so ``Adapprox.load_state_dict`` accepts the result for the same parameters.
- ``adapprox_to_adamw`` (rollback): the factors are multiplied out, clamp(Q U^T, 0), into a dense
  ``exp_avg_sq`` that ``torch.optim.AdamW`` loads.
- ``adamw_to_adafactor``: row and column means of ``exp_avg_sq`` seed ``torch.optim.Adafactor``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from adapprox_cli.checkpoints.core import optimizer_state_bytes as state_bytes
from adapprox_cli.convert.report import ConversionReport, MatrixConversion
from adapprox_cli.errors import InputError, ParameterError, UnsupportedStateError
from adapprox_cli.formatting import dtype_name, format_shape
from adapprox_cli.lowrank import (
    is_factored,
    matrix_view_shape,
    moment_sketch,
    moment_sketch_test_matrix,
    rank_cap,
    relative_error,
    seeded_generator,
    settled_rank,
    srsi,
)
from adapprox_cli.optim import DEFAULT_TOL, Adapprox
from adapprox_cli.validation import check_tol

__all__ = [
    "CONVERT_POWER_ITERS",
    "adamw_group_defaults",
    "adamw_to_adafactor",
    "adamw_to_adapprox",
    "adapprox_group_defaults",
    "adapprox_to_adamw",
    "check_rank",
    "factor_second_moment",
    "flat_indices",
    "reconstruction_error",
    "state_bytes",
]

# Offline conversion can afford more subspace iterations than a training step: five rounds
# (the paper's comparison setting) make the sketched errors close to the exact SVD's.
CONVERT_POWER_ITERS = 5
_FIRST_WIDTH = 8  # the first sketch width of the rank search (it doubles up to k_max)
# Group keys that only the source optimizer understands, or that a scheduler added.
_CARRIED_GROUP_KEYS = ("initial_lr", "param_names")
_ADAPPROX_SETTINGS = frozenset(inspect.signature(Adapprox.__init__).parameters) - {"self", "params"}


def _number(value: Any) -> Any:
    return value.item() if isinstance(value, Tensor) and value.numel() == 1 else value


def adapprox_group_defaults(**settings: Any) -> dict[str, Any]:
    """Every ``Adapprox`` group setting, validated by the optimizer itself (``params`` excluded)."""
    try:
        return dict(Adapprox([torch.zeros(1)], **settings).defaults)
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid Adapprox setting: {exc}") from None


def adamw_group_defaults() -> dict[str, Any]:
    """The group keys of ``torch.optim.AdamW`` with its defaults (``params`` excluded)."""
    return dict(torch.optim.AdamW([torch.zeros(1)]).defaults)


def flat_indices(param_groups: Sequence[Mapping[str, Any]]) -> list[tuple[int, Any]]:
    """(group number, saved parameter id) in flat optimizer order; ``state`` is sparse."""
    return [(g, pid) for g, group in enumerate(param_groups) for pid in group["params"]]


def check_rank(rank: int | None) -> int | None:
    """A fixed conversion rank: an integer >= 1, or None for the rank the adaptive rule settles on."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ParameterError(
            "rank", f"{{name}} {rank!r}: must be an integer >= 1 (leave it out for the adaptive rank)"
        )
    return rank


def _check_state_dict(state_dict: Any) -> None:
    if not (
        isinstance(state_dict, Mapping)
        and isinstance(state_dict.get("state"), Mapping)
        and isinstance(state_dict.get("param_groups"), list)
    ):
        raise InputError(
            "expected an optimizer state dict with 'state' and 'param_groups' "
            "(what optimizer.state_dict() returns)"
        )


# --------------------------------------------------------------------------- factoring


def factor_second_moment(
    v: Tensor,
    *,
    tol: float,
    rank: int | None = None,
    rank_min: int = 1,
    rank_max: int | None = None,
    oversample: int = 5,
    power_iters: int = CONVERT_POWER_ITERS,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Factors (Q, U) of a second-moment matrix, V ~ Q U^T, computed in float64.

    With ``rank`` the factors have min(rank, k_max) columns. Otherwise the rank is the one the
    optimizer's own rule (``lowrank.adaptive_rank``, algorithm notes §4) settles on for a matrix
    that stops changing: the smallest r in [rank_min, k_max] whose error is at most ``tol``, or
    k_max. The rule grows a rank by at most p per step to bound each step's cost; offline, the
    sketch width doubles instead (8, 16, ... k_max), and S-RSI's free errors give every rank
    below the width from one sketch.
    """
    m, n = v.shape
    k_max = rank_cap(m, n, rank_max)
    v = v.double()
    if rank is not None:
        factors = srsi(
            v, min(rank, k_max), oversample=oversample, power_iters=power_iters, generator=generator
        )
        return factors.q, factors.u
    low = min(rank_min, k_max)
    width = min(_FIRST_WIDTH, k_max)
    while True:
        factors = srsi(v, width, oversample=oversample, power_iters=power_iters, generator=generator)
        chosen = settled_rank(factors.relative_errors, rank_min=low, rank_max=width, tol=tol)
        if chosen is not None or width >= k_max:
            k = chosen if chosen is not None else k_max
            return factors.q[:, :k], factors.u[:, :k]
        width = min(2 * width, k_max)


def reconstruction_error(v: Tensor, q: Tensor, u: Tensor) -> float:
    """Relative error of what the optimizer will use, clamp(Q U^T, 0), against V (float64)."""
    approximation = torch.clamp(q.double() @ u.double().T, min=0.0)
    return relative_error(v.double(), approximation)


# --------------------------------------------------------------------------- AdamW -> Adapprox


def adamw_to_adapprox(
    state_dict: Mapping[str, Any],
    *,
    tol: float = DEFAULT_TOL,
    rank: int | None = None,
    beta1: float | None = None,
    names: Mapping[int, str] | None = None,
    shapes: Mapping[int, Sequence[int]] | None = None,
    power_iters: int = CONVERT_POWER_ITERS,
    progress: Callable[[int, int, str], None] | None = None,
    **settings: Any,
) -> tuple[dict[str, Any], ConversionReport]:
    """Convert an AdamW/Adam state dict into one ``Adapprox.load_state_dict`` accepts.

    Args:
        state_dict: ``optimizer.state_dict()`` of AdamW or Adam (not modified).
        tol: the largest relative distance (Frobenius) of the stored second moment to AdamW's;
            each matrix is factored at the smallest rank whose exact error of exp_avg_sq is
            within it, with the exact sketch S = D_0 Omega, and stored as the groups' ``tol`` (the
            optimizer's default rank_rule then holds that distance to the dense EMA).
        rank: factor every matrix at this fixed rank (clamped to its k_max) instead.
        beta1: override the first-moment decay; 0 drops ``exp_avg``.
        names, shapes: optional names and parameter shapes by saved index, for the report and a
            shape check (the shape otherwise comes from ``exp_avg_sq``).
        power_iters: S-RSI rounds used here (the optimizer's own ``power_iters`` is a setting).
        progress: called as ``progress(done, total, name)`` before each parameter and at the end.
        **settings: other ``Adapprox`` settings (rank_max, oversample, first_moment, seed, ...).

    Returns the new state dict (tensors not touched are shared with the input) and a report.
    """
    _check_state_dict(state_dict)
    tol = check_tol(tol)
    check_rank(rank)
    defaults = adapprox_group_defaults(tol=tol, **settings)
    warnings: list[str] = []
    groups = [_adapprox_group(group, defaults, beta1, warnings) for group in state_dict["param_groups"]]
    state: dict[Any, dict[str, Any]] = {}
    matrices: list[MatrixConversion] = []
    steps: list[int] = []
    flat = flat_indices(state_dict["param_groups"])
    for position, (group_number, pid) in enumerate(flat):
        old = state_dict["state"].get(pid)
        if not old:
            continue  # never stepped: Adapprox creates its state lazily, as AdamW did
        name = (names or {}).get(pid, f"param_{pid}")
        if progress is not None:
            progress(position, len(flat), name)
        _check_saved_shape(old, shapes, pid, name)
        state[pid], matrix = _adapprox_param_state(
            old,
            groups[group_number],
            pid,
            name,
            rank,
            power_iters,
            position,
            keep_moment_dtype="first_moment_dtype" in settings,
        )
        steps.append(int(state[pid]["step"]))
        if matrix is not None:
            matrices.append(matrix)
    if progress is not None:
        progress(len(flat), len(flat), "")
    dense = sum("exp_avg_sq" in s for s in state.values())

    first_moment = groups[0]["first_moment"] if groups else "gradient"
    if first_moment == "update" and any("exp_avg" in s for s in state.values()):
        warnings.append(
            "first_moment='update' averages clipped updates, but AdamW's exp_avg averages gradients; "
            "the carried exp_avg is a different quantity until it has been refreshed"
        )
    report = ConversionReport(
        source_optimizer="adamw",
        target_optimizer="adapprox",
        matrices=matrices,
        dense_params=dense,
        bytes_before=state_bytes(state_dict["state"]),
        bytes_after=state_bytes(state),
        step=max(steps) if steps else None,
        settings={k: v for k, v in defaults.items() if k not in ("lr", "betas", "eps", "weight_decay")}
        | {"beta1": groups[0]["betas"][0] if groups else beta1, "rank": rank},
        warnings=warnings,
    )
    return {"state": state, "param_groups": groups}, report


def _check_saved_shape(
    old: Mapping[str, Any], shapes: Mapping[int, Sequence[int]] | None, pid: Any, name: str
) -> None:
    saved_shape = tuple(old["exp_avg_sq"].shape) if "exp_avg_sq" in old else None
    if shapes is not None and pid in shapes and saved_shape not in (None, tuple(shapes[pid])):
        raise InputError(
            f"parameter {pid} ({name}): exp_avg_sq has shape {format_shape(saved_shape)} "
            f"but the parameter is {format_shape(shapes[pid])}"
        )


def _adapprox_group(
    group: Mapping[str, Any], defaults: dict[str, Any], beta1: float | None, warnings: list[str]
) -> dict[str, Any]:
    """An AdamW group's hyper-parameters on top of every Adapprox setting."""
    betas = tuple(float(_number(b)) for b in group.get("betas", defaults["betas"]))
    new_group = {
        **defaults,
        "lr": float(_number(group.get("lr", defaults["lr"]))),
        "betas": (float(beta1) if beta1 is not None else betas[0], betas[1]),
        "eps": float(_number(group.get("eps", defaults["eps"]))),
        "weight_decay": float(_number(group.get("weight_decay", 0.0))),
        "maximize": bool(group.get("maximize", False)),
    }
    # Validate the carried hyper-parameters with the optimizer's own checks.
    adapprox_group_defaults(**{k: v for k, v in new_group.items() if k in _ADAPPROX_SETTINGS})
    if group.get("decoupled_weight_decay") is False and new_group["weight_decay"] > 0:
        warnings.append(
            f"the source is Adam with L2 weight decay {new_group['weight_decay']}; Adapprox applies it "
            "decoupled (as AdamW does)"
        )
    if group.get("amsgrad"):
        warnings.append("amsgrad's max_exp_avg_sq has no Adapprox counterpart and is dropped")
    for key in _CARRIED_GROUP_KEYS:
        if key in group:
            new_group[key] = group[key]
    new_group["params"] = list(group["params"])
    return new_group


def _adapprox_param_state(
    old: Mapping[str, Any],
    group: dict[str, Any],
    pid: Any,
    name: str,
    rank: int | None,
    power_iters: int,
    position: int,
    keep_moment_dtype: bool,
) -> tuple[dict[str, Any], MatrixConversion | None]:
    """One parameter's Adapprox state from its AdamW state, and its report line when factored."""
    if "exp_avg_sq" not in old:
        raise UnsupportedStateError(
            f"parameter {pid} ({name}) has state keys {', '.join(sorted(map(str, old)))} but no exp_avg_sq; "
            "adamw_to_adapprox converts AdamW/Adam states"
        )
    v = old["exp_avg_sq"]
    new: dict[str, Any] = {"step": torch.tensor(float(_number(old.get("step", 0))), dtype=torch.float32)}
    if group["betas"][0] > 0:
        if "exp_avg" not in old:
            raise UnsupportedStateError(f"parameter {pid} ({name}) has no exp_avg; pass beta1=0 to drop it")
        new["exp_avg"] = old["exp_avg"]  # carried bit for bit
        if old["exp_avg"].dtype in (torch.bfloat16, torch.float16) and not keep_moment_dtype:
            # New first moments are then kept in the precision the carried ones have.
            group["first_moment_dtype"] = dtype_name(old["exp_avg"].dtype)
    # Second moments live in the optimizer's compute dtype (float32 unless float64 params).
    compute_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    shape = tuple(v.shape)
    if not is_factored(shape, group["rank_max"]):
        new["exp_avg_sq"] = v.to(compute_dtype) if v.dtype != compute_dtype else v
        return new, None
    m, n = matrix_view_shape(shape)
    k_max = rank_cap(m, n, group["rank_max"])
    matrix = v.reshape(m, n).double()
    q, u = factor_second_moment(
        matrix,
        tol=group["tol"],
        rank=rank,
        rank_min=group["rank_min"],
        rank_max=k_max,
        oversample=group["oversample"],
        power_iters=power_iters,
        generator=seeded_generator(group["seed"], position, device=matrix.device),
    )
    new["exp_avg_sq_q"], new["exp_avg_sq_u"] = (
        q.to(compute_dtype).contiguous(),
        u.to(compute_dtype).contiguous(),
    )
    if group["rank_rule"] == "dense":
        # The optimizer's sketch of the dense EMA starts exact, S = D_0 Omega (with its own Omega
        # for this flat position), so tol bounds the distance to AdamW's moment from step one.
        omega = moment_sketch_test_matrix(m, n, seed=group["seed"], index=position, dtype=torch.float64)
        new["exp_avg_sq_sketch"] = moment_sketch(matrix, omega).to(compute_dtype).contiguous()
    error = reconstruction_error(matrix, new["exp_avg_sq_q"], new["exp_avg_sq_u"])
    return new, MatrixConversion(int(pid), name, shape, q.shape[1], k_max, error)


# --------------------------------------------------------------------------- Adapprox -> AdamW


def adapprox_to_adamw(
    state_dict: Mapping[str, Any],
    *,
    names: Mapping[int, str] | None = None,
    shapes: Mapping[int, Sequence[int]] | None = None,
) -> tuple[dict[str, Any], ConversionReport]:
    """Roll an Adapprox state dict back into one ``torch.optim.AdamW.load_state_dict`` accepts.

    Factored second moments become clamp(Q U^T, 0) in the parameter's shape (``shapes``, else the
    shape of ``exp_avg``, else the matrix view). Without a first moment (beta1 = 0) AdamW's
    ``exp_avg`` starts at zero.
    """
    _check_state_dict(state_dict)
    defaults = adamw_group_defaults()
    warnings: list[str] = []
    groups = []
    for group in state_dict["param_groups"]:
        new_group = {
            **defaults,
            "lr": float(_number(group.get("lr", defaults["lr"]))),
            "betas": tuple(float(_number(b)) for b in group.get("betas", defaults["betas"])),
            "eps": float(_number(group.get("eps", defaults["eps"]))),
            "weight_decay": float(_number(group.get("weight_decay", 0.0))),
            "maximize": bool(group.get("maximize", False)),
        }
        for key in _CARRIED_GROUP_KEYS:
            if key in group:
                new_group[key] = group[key]
        new_group["params"] = list(group["params"])
        groups.append(new_group)
        if group.get("first_moment") == "update" and group.get("betas", (0.0,))[0] > 0:
            warnings.append(
                "first_moment='update' stored an average of clipped updates as exp_avg; AdamW reads it "
                "as a gradient average"
            )

    state: dict[Any, dict[str, Any]] = {}
    matrices: list[MatrixConversion] = []
    dense = 0
    steps: list[int] = []
    zero_first_moment = False
    for g, pid in flat_indices(state_dict["param_groups"]):
        old = state_dict["state"].get(pid)
        if not old:
            continue
        name = (names or {}).get(pid, f"param_{pid}")
        step = _number(old.get("step", 0))
        steps.append(int(step))
        new: dict[str, Any] = {"step": torch.tensor(float(step), dtype=torch.float32)}
        shape = _rollback_shape(pid, old, shapes, warnings, name)
        if "exp_avg_sq_q" in old and "exp_avg_sq_u" in old:
            q, u = old["exp_avg_sq_q"], old["exp_avg_sq_u"]
            v = torch.clamp(q @ u.T, min=0.0).reshape(shape)
            m, n = q.shape[0], u.shape[0]
            k_max = rank_cap(m, n, state_dict["param_groups"][g].get("rank_max"))
            matrices.append(MatrixConversion(int(pid), name, tuple(shape), q.shape[1], k_max, None))
        elif "exp_avg_sq" in old:
            v = old["exp_avg_sq"]
            dense += 1
        else:
            raise UnsupportedStateError(
                f"parameter {pid} ({name}) has state keys {', '.join(sorted(map(str, old)))}; "
                "adapprox_to_adamw converts Adapprox states (exp_avg_sq_q/exp_avg_sq_u or exp_avg_sq)"
            )
        if "exp_avg" in old:
            new["exp_avg"] = old["exp_avg"]
        else:
            new["exp_avg"] = torch.zeros(shape, dtype=v.dtype)
            zero_first_moment = True
        new["exp_avg_sq"] = v
        state[pid] = new
    if zero_first_moment:
        warnings.append("the Adapprox state has no first moment (beta1 = 0); AdamW's exp_avg starts at zero")
    report = ConversionReport(
        source_optimizer="adapprox",
        target_optimizer="adamw",
        matrices=matrices,
        dense_params=dense,
        bytes_before=state_bytes(state_dict["state"]),
        bytes_after=state_bytes(state),
        step=max(steps) if steps else None,
        warnings=warnings,
    )
    return {"state": state, "param_groups": groups}, report


def _rollback_shape(
    pid: Any,
    old: Mapping[str, Any],
    shapes: Mapping[int, Sequence[int]] | None,
    warnings: list[str],
    name: str,
) -> tuple[int, ...]:
    if shapes is not None and pid in shapes:
        return tuple(int(d) for d in shapes[pid])
    if "exp_avg" in old:
        return tuple(old["exp_avg"].shape)
    if "exp_avg_sq" in old:
        return tuple(old["exp_avg_sq"].shape)
    m, n = old["exp_avg_sq_q"].shape[0], old["exp_avg_sq_u"].shape[0]
    warnings.append(f"{name}: parameter shape unknown, exp_avg_sq written as the ({m}, {n}) matrix view")
    return (m, n)


# --------------------------------------------------------------------------- AdamW -> Adafactor


def adamw_to_adafactor(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Seed a ``torch.optim.Adafactor`` state from an AdamW one: row/column means of exp_avg_sq.

    Adafactor keeps ``row_var`` (mean of V over the last dimension) and ``col_var`` (mean over the
    one before) for tensors of 2 or more dimensions and a dense ``variance`` for vectors; it has no
    first moment. The groups are Adafactor's defaults plus the source's lr and weight decay.
    """
    _check_state_dict(state_dict)
    defaults = dict(torch.optim.Adafactor([torch.zeros(1)]).defaults)
    groups = []
    for group in state_dict["param_groups"]:
        new_group = {
            **defaults,
            "lr": float(_number(group.get("lr", defaults["lr"]))),
            "weight_decay": float(_number(group.get("weight_decay", 0.0))),
            "maximize": bool(group.get("maximize", False)),
        }
        new_group["params"] = list(group["params"])
        groups.append(new_group)
    state: dict[Any, dict[str, Any]] = {}
    for _, pid in flat_indices(state_dict["param_groups"]):
        old = state_dict["state"].get(pid)
        if not old or "exp_avg_sq" not in old:
            continue
        v = old["exp_avg_sq"].float()
        new: dict[str, Any] = {"step": torch.tensor(float(_number(old.get("step", 0))), dtype=torch.float32)}
        if v.dim() > 1:
            new["row_var"] = v.mean(dim=-1, keepdim=True)
            new["col_var"] = v.mean(dim=-2, keepdim=True)
        else:
            new["variance"] = v.clone()
        state[pid] = new
    return {"state": state, "param_groups": groups}
