"""AdamW <-> Adapprox optimizer-state migration.

Two pure functions over ``torch.optim`` state dicts do the work:

- ``adamw_to_adapprox``: every factored matrix's dense ``exp_avg_sq`` becomes the low-rank
  factors ``exp_avg_sq_q`` (m x k) and ``exp_avg_sq_u`` (n x k) the optimizer would keep; the rank
  is the one the optimizer's own adaptive rule settles on for that matrix (``factor_second_moment``),
  or a fixed one. ``exp_avg`` and ``step`` are carried over unchanged, ``exp_avg`` dropped when
  beta1 = 0; vectors keep a dense ``exp_avg_sq``. The param groups hold every ``Adapprox`` setting,
  so ``Adapprox.load_state_dict`` accepts the result for the same parameters.
- ``adapprox_to_adamw`` (rollback): the factors are multiplied out, clamp(Q U^T, 0), into a dense
  ``exp_avg_sq`` that ``torch.optim.AdamW`` loads.

``convert_checkpoint`` reads any checkpoint the loader knows, converts its optimizer state and
writes it back in the container it came in (nanoGPT ``ckpt.pt``, a copy of a Trainer
``checkpoint-N/`` directory, a plain state dict) or as an adapprox safetensors file. The input is
never written to; every output goes to a temporary name in the destination directory first and
is renamed into place, so an interrupted conversion leaves either nothing or a complete file.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adapprox_cli.atomic_io import (
    atomic_write,
    check_target,
    current_umask,
    install_directory,
    install_file,
    new_temporary_directory,
    remove_path,
    temporary_path,
    write_error,
)
from adapprox_cli.checkpoints.core import optimizer_state_bytes as state_bytes  # re-exported
from adapprox_cli.errors import AdapproxError, InputError, UnsupportedStateError
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
    "ConversionReport",
    "MatrixConversion",
    "adamw_group_defaults",
    "adamw_to_adafactor",
    "adamw_to_adapprox",
    "adapprox_group_defaults",
    "adapprox_to_adamw",
    "atomic_torch_save",
    "atomic_write",
    "convert_checkpoint",
    "factor_second_moment",
    "optimizer_state_dict_of",
    "state_bytes",
]

# Offline conversion can afford more subspace iterations than a training step: five rounds
# (the paper's comparison setting) make the sketched errors close to the exact SVD's.
CONVERT_POWER_ITERS = 5
_FIRST_WIDTH = 8  # the first sketch width of the rank search (it doubles up to k_max)
OUTPUT_FORMATS = ("auto", "plain", "safetensors")
# Group keys that only the source optimizer understands, or that a scheduler added.
_CARRIED_GROUP_KEYS = ("initial_lr", "param_names")
_ADAPPROX_SETTINGS = frozenset(inspect.signature(Adapprox.__init__).parameters) - {"self", "params"}


@dataclass
class MatrixConversion:
    """One factored matrix: its rank and the relative error of the stored second moment."""

    index: int
    name: str
    shape: tuple[int, ...]
    rank: int
    rank_max: int
    relative_error: float | None  # ||V - clamp(Q U^T, 0)||_F / ||V||_F; None for a rollback


@dataclass
class ConversionReport:
    """What a conversion did: per-matrix ranks and errors, and the state memory before and after."""

    source_optimizer: str
    target_optimizer: str
    matrices: list[MatrixConversion]
    dense_params: int
    bytes_before: int
    bytes_after: int
    step: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    source: str | None = None
    source_format: str | None = None
    output: str | None = None
    output_format: str | None = None
    verified: bool | None = None

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 0.0

    @property
    def max_error(self) -> float | None:
        errors = [m.relative_error for m in self.matrices if m.relative_error is not None]
        return max(errors) if errors else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        data["max_error"] = self.max_error
        return data


# --------------------------------------------------------------------------- helpers


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


def _flat_indices(param_groups: Sequence[Mapping[str, Any]]) -> list[tuple[int, Any]]:
    """(group number, saved parameter id) in flat optimizer order; ``state`` is sparse."""
    return [(g, pid) for g, group in enumerate(param_groups) for pid in group["params"]]


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


def _reconstruction_error(v: Tensor, q: Tensor, u: Tensor) -> float:
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
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InputError(f"invalid rank {rank!r}; pass an integer >= 1 or leave it out for the adaptive rank")
    defaults = adapprox_group_defaults(tol=tol, **settings)
    warnings: list[str] = []
    groups = [_adapprox_group(group, defaults, beta1, warnings) for group in state_dict["param_groups"]]
    state: dict[Any, dict[str, Any]] = {}
    matrices: list[MatrixConversion] = []
    steps: list[int] = []
    flat = _flat_indices(state_dict["param_groups"])
    for position, (group_number, pid) in enumerate(flat):
        old = state_dict["state"].get(pid)
        if not old:
            continue  # never stepped: Adapprox creates its state lazily, as AdamW did
        name = (names or {}).get(pid, f"param_{pid}")
        if progress is not None:
            progress(position, len(flat), name)
        saved_shape = tuple(old["exp_avg_sq"].shape) if "exp_avg_sq" in old else None
        if shapes is not None and pid in shapes and saved_shape not in (None, tuple(shapes[pid])):
            raise InputError(
                f"parameter {pid} ({name}): exp_avg_sq has shape {format_shape(saved_shape)} "
                f"but the parameter is {format_shape(shapes[pid])}"
            )
        group = groups[group_number]
        state[pid], matrix = _adapprox_param_state(
            old,
            group,
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
    error = _reconstruction_error(matrix, new["exp_avg_sq_q"], new["exp_avg_sq_u"])
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
    for g, pid in _flat_indices(state_dict["param_groups"]):
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
    for _, pid in _flat_indices(state_dict["param_groups"]):
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


# --------------------------------------------------------------------------- atomic writers


def _write_torch(obj: Any, path: Path) -> None:
    """The one place a converted object is serialised (tests replace it to simulate failures)."""
    torch.save(obj, path)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temporary file and a rename."""
    return atomic_write(path, lambda temporary: _write_torch(obj, temporary))


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
                raise InputError(
                    f"{src} is not a regular file (a pipe, socket or device); remove it from the checkpoint "
                    "directory or pass --format plain"
                )


# --------------------------------------------------------------------------- checkpoints


def optimizer_state_dict_of(
    checkpoint: Any,
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


def _same_path(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return a.resolve() == b.resolve()
    return False


def _load_checkpoint(path: Path, trust_checkpoint: bool, optimizer_index: int) -> Any:
    from adapprox_cli.checkpoints import load_checkpoint

    return load_checkpoint(path, trust_checkpoint=trust_checkpoint, optimizer_index=optimizer_index)


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
        tol, rank, beta1, progress, **settings: see ``adamw_to_adapprox``.
    """
    source, output = Path(source), Path(output)
    check_tol(tol)  # before the checkpoint is read
    if output_format not in OUTPUT_FORMATS:
        raise InputError(
            f"unknown output format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}"
        )
    if _same_path(source, output):
        raise InputError(f"the output {output} is the input; write the converted checkpoint to another path")
    check_target(output, force=force, inputs=[source])
    checkpoint = _load_checkpoint(source, trust_checkpoint, optimizer_index)
    from adapprox_cli.checkpoints.validate import require_sound_state

    require_sound_state(checkpoint, "convert")
    kind = "adapprox" if checkpoint.optimizer == "adapprox" else "adamw"
    target = to or ("adamw" if kind == "adapprox" else "adapprox")
    if target not in ("adapprox", "adamw"):
        raise InputError(f"unknown target optimizer {target!r}; choose adapprox or adamw")
    if target == kind:
        raise InputError(
            f"{source} already holds an {checkpoint.optimizer} state; "
            f"pass --to {'adamw' if kind == 'adapprox' else 'adapprox'} or another checkpoint"
        )
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
    if not verify:
        fmt = _write_output(checkpoint, new_state, output, output_format, target, report, names, shapes)
    else:
        # Written beside the target and verified there: a failed verification leaves nothing at
        # the target (and an old --force target in place).
        staged = temporary_path(output)
        try:
            fmt = _write_output(checkpoint, new_state, staged, output_format, target, report, names, shapes)
            try:
                _verify_output(
                    staged, report, state_dict, new_state, shapes, trust_checkpoint, optimizer_index
                )
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
    report.output, report.output_format = str(output), fmt
    return report


def _adapprox_settings(report: ConversionReport) -> dict[str, Any]:
    return {k: v for k, v in report.settings.items() if k != "rank"}


def _write_output(
    checkpoint: Any,
    new_state: dict[str, Any],
    output: Path,
    output_format: str,
    target: str,
    report: ConversionReport,
    names: Mapping[int, str],
    shapes: Mapping[int, tuple[int, ...]],
) -> str:
    if output_format == "safetensors":
        from adapprox_cli.checkpoints.formats.safetensors import write_adapprox_safetensors

        order = [i for _, i in _flat_indices(new_state["param_groups"])]
        # The writer goes through a temporary file and a rename itself.
        write_adapprox_safetensors(
            output,
            new_state,
            [names[i] for i in order],
            checkpoint.format,
            target,
            param_shapes=[shapes[i] for i in order],
        )
        return "safetensors"
    if output_format == "plain":
        atomic_torch_save(new_state, output)
        return "plain"
    from adapprox_cli.checkpoints import checkpoint_format

    fmt = checkpoint_format(checkpoint.format)
    write_back = fmt.write_back if fmt is not None else None
    if write_back == "directory" and Path(checkpoint.path).is_dir():
        file_name = Path(checkpoint.extra.get("optimizer_file") or fmt.optimizer_file).name
        if not (Path(checkpoint.path) / file_name).is_file():
            raise InputError(
                f"{checkpoint.path} has no {file_name} to replace; pass --format plain or --format safetensors"
            )
        contents = checkpoint.container_with_optimizer_state(new_state)
        _atomic_copy_directory(Path(checkpoint.path), output, {file_name: contents})
        return checkpoint.format
    if write_back is None or Path(checkpoint.path).is_dir() or checkpoint.extra.get("optimizer_path") is None:
        raise InputError(
            f"{checkpoint.path} is a {checkpoint.format} checkpoint that adapprox cannot rewrite in place; "
            "pass --format safetensors (or --format plain) to write the converted state on its own"
        )
    container = checkpoint.container_with_optimizer_state(new_state)
    if fmt.update_container is not None:
        container = fmt.update_container(container, target, _adapprox_settings(report))
    atomic_torch_save(container, output)
    return checkpoint.format


def _verify_output(
    output: Path,
    report: ConversionReport,
    source_state: Mapping[str, Any],
    new_state: Mapping[str, Any],
    shapes: Mapping[int, tuple[int, ...]],
    trust_checkpoint: bool,
    optimizer_index: int,
) -> None:
    """Read the output back; check the kind, shapes, ranks and reconstruction errors; load it."""
    from adapprox_cli.checkpoints.validate import param_problem

    reloaded = _load_checkpoint(output, trust_checkpoint, optimizer_index)
    # Every value finite, every second moment >= 0, every moment the parameter's shape.
    problems: list[str] = [q for q in (param_problem(p) for p in reloaded.params) if q]
    if (reloaded.optimizer == "adapprox") != (report.target_optimizer == "adapprox"):
        problems.append(f"it reads back as {reloaded.optimizer}, not {report.target_optimizer}")
    by_index = {p.index: p for p in reloaded.params}
    if len(by_index) != len(shapes):
        problems.append(f"it has {len(by_index)} parameters, the input {len(shapes)}")
    for matrix in report.matrices:
        param = by_index.get(matrix.index)
        if param is None:
            problems.append(f"{matrix.name} is missing")
            continue
        if tuple(param.shape) != tuple(matrix.shape):
            problems.append(
                f"{matrix.name} has shape {format_shape(param.shape)}, expected {format_shape(matrix.shape)}"
            )
        if report.target_optimizer == "adapprox":
            q, u = param.state.get("exp_avg_sq_q"), param.state.get("exp_avg_sq_u")
            if q is None or u is None or q.shape[1] != matrix.rank:
                problems.append(f"{matrix.name}: factors missing or of the wrong rank")
                continue
            m, n = matrix_view_shape(matrix.shape)
            v = source_state["state"][matrix.index]["exp_avg_sq"].reshape(m, n)
            error = _reconstruction_error(v, q, u)
            if not error <= matrix.relative_error + 1e-6:
                problems.append(
                    f"{matrix.name}: error {error:.3g} exceeds the reported {matrix.relative_error:.3g}"
                )
        else:
            v = param.state.get("exp_avg_sq")
            expected = new_state["state"][matrix.index]["exp_avg_sq"]
            if v is None or not torch.equal(v.to(expected.dtype), expected):
                problems.append(f"{matrix.name}: exp_avg_sq differs from the multiplied-out factors")
    if not problems:
        try:
            _load_into_optimizer(new_state, shapes, report.target_optimizer)
        except (ValueError, RuntimeError, KeyError) as exc:
            problems.append(f"{report.target_optimizer} refuses it: {exc}")
    if problems:
        raise InputError(f"verification of {output} failed: " + "; ".join(problems[:5]))
    report.verified = True


def _load_into_optimizer(
    state_dict: Mapping[str, Any], shapes: Mapping[int, tuple[int, ...]], target: str
) -> None:
    """Load the state into a real optimizer over same-shaped parameters (meta tensors: no memory)."""
    groups = []
    for group in state_dict["param_groups"]:
        params = [torch.empty(shapes[i], device="meta", requires_grad=True) for i in group["params"]]
        groups.append({"params": params})
    optimizer = Adapprox(groups) if target == "adapprox" else torch.optim.AdamW(groups)
    optimizer.load_state_dict(dict(state_dict))
