"""The loaded form of every checkpoint family, and the rules shared by all of them.

Every format reduces to a flat list of parameters in optimizer order, each with its state
tensors (``exp_avg_sq`` for AdamW, ``exp_avg_sq_q``/``exp_avg_sq_u`` factors for Adapprox), its
true shape and, where it can be established without guessing, its name.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapprox_cli.errors import InputError, ParameterError, UnsupportedStateError
from adapprox_cli.lowrank import matrix_view_shape  # the one shape rule; re-exported here


def check_optimizer_index(path: Path, optimizer_index: int, count: int, held: str) -> None:
    """Refuse an ``optimizer_index`` outside the ``count`` optimizers a container holds.

    ``held`` says what there are ``count`` of ("optimizer file(s)", "optimizer state(s)").
    """
    if not 0 <= optimizer_index < count:
        raise ParameterError(
            "optimizer_index",
            f"{path} has {count} {held}; {{name}} {optimizer_index} is out of range (use 0..{count - 1})",
        )


SECOND_MOMENT_KEY = "exp_avg_sq"
FACTOR_KEYS = ("exp_avg_sq_q", "exp_avg_sq_u")

# State keys of optimizers adapprox does not read, and what they mean.
_REFUSED_STATES: list[tuple[frozenset[str], str]] = [
    (frozenset({"momentum_buffer"}), "an SGD state"),
    (frozenset({"row_var", "col_var"}), "a torch.optim.Adafactor state (factored row_var/col_var)"),
    (
        frozenset({"exp_avg_sq_row", "exp_avg_sq_col"}),
        "a Hugging Face Adafactor state (factored exp_avg_sq_row/col)",
    ),
    (
        frozenset({"state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"}),
        "a bitsandbytes 8-bit optimizer state",
    ),
    (frozenset({"square_avg"}), "an RMSprop/Adadelta state"),
    (frozenset({"sum"}), "an Adagrad state"),
]
# Hyper-parameters of a torch.optim.SGD param group.
_SGD_GROUP_KEYS = {"momentum", "dampening", "nesterov"}
# Hyper-parameters only an Adapprox param group has (its state may hold no factored matrix yet).
_ADAPPROX_GROUP_KEYS = {"oversample", "power_iters", "rank_interval"}
_READS = "adapprox reads AdamW/Adam states (exp_avg_sq) and Adapprox states (exp_avg_sq_q/exp_avg_sq_u)"


@dataclass
class ParamState:
    """One parameter of the optimizer, in flat optimizer order."""

    index: int  # position in the flat optimizer order (torch state_dict index)
    name: str  # real parameter name, or "param_{index}" when names could not be established
    shape: tuple[int, ...]  # the parameter's true shape (reassembled for sharded formats)
    dtype: torch.dtype  # storage dtype of exp_avg_sq (or of the Adapprox factors)
    group: int  # param-group index
    state: dict[str, torch.Tensor]  # may be mmap-backed; {} when the optimizer never stepped it

    @property
    def has_second_moment(self) -> bool:
        return SECOND_MOMENT_KEY in self.state or all(k in self.state for k in FACTOR_KEYS)

    @property
    def matrix_shape(self) -> tuple[int, int] | None:
        """The 2-D view the analyses use, or None for vectors and scalars."""
        return matrix_view_shape(self.shape)


@dataclass
class OptimizerCheckpoint:
    """An optimizer state read from any supported checkpoint format."""

    path: Path
    format: str
    optimizer: str  # "adamw" | "adam" | "adapprox"
    step: int | None
    param_groups: list[dict]  # hyper-parameters per group, without "params"/"param_names"
    params: list[ParamState]
    names_source: str
    warnings: list[str] = field(default_factory=list)
    container: Any = None  # the loaded top-level object, to write a new state back into
    optimizer_state_dict: dict | None = None
    model_state: dict[str, torch.Tensor] | None = None
    extra: dict = field(default_factory=dict)

    def second_moment(self, param: ParamState) -> torch.Tensor | None:
        """The second moment of one parameter in its storage dtype and true shape.

        Adapprox factors are multiplied out as the optimizer does: clamp(Q Uᵀ, min=0).
        """
        if SECOND_MOMENT_KEY in param.state:
            return param.state[SECOND_MOMENT_KEY]
        if all(k in param.state for k in FACTOR_KEYS):
            q, u = (param.state[k] for k in FACTOR_KEYS)
            return torch.clamp(q @ u.T, min=0).reshape(param.shape)
        return None

    def second_moments(self) -> list[tuple[ParamState, torch.Tensor]]:
        """Every parameter that has a second moment, with it (dense, in the parameter's shape)."""
        pairs = [(p, self.second_moment(p)) for p in self.params]
        return [(p, v) for p, v in pairs if v is not None]

    def matrix_second_moments(self) -> list[tuple[ParamState, torch.Tensor]]:
        """The second moments the analyses look at, viewed as matrices (see ``matrix_view_shape``)."""
        out = []
        for p in self.params:
            view = p.matrix_shape
            if view is not None and p.has_second_moment:
                out.append((p, self.second_moment(p).reshape(view)))
        return out

    @property
    def total_state_bytes(self) -> int:
        """Bytes of all optimizer state tensors (computed from shapes; no data is read)."""
        return optimizer_state_bytes(dict(enumerate(p.state for p in self.params)))

    def param(self, name: str) -> ParamState:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def container_with_optimizer_state(self, state_dict: dict) -> Any:
        """A shallow copy of ``container`` with ``state_dict`` where the optimizer state was.

        ``extra["optimizer_path"]`` is the list of keys leading to it (``[]``: the container is the
        state dict itself, ``["optimizer"]`` for nanoGPT, ``["optimizer_states", i]`` for Lightning).
        """
        keys = self.extra.get("optimizer_path")
        if self.container is None or keys is None:
            raise InputError(
                f"{self.path} ({self.format}) has no single container to put an optimizer state back into; "
                "write the state with write_adapprox_safetensors instead"
            )
        if not keys:
            return state_dict
        root = copy.copy(self.container)
        node = root
        for key in keys[:-1]:
            node[key] = copy.copy(node[key])
            node = node[key]
        node[keys[-1]] = state_dict
        return root


_DENSE_MOMENTS = ("exp_avg", SECOND_MOMENT_KEY, "max_exp_avg_sq")


def check_declared_shapes(ck: OptimizerCheckpoint) -> None:
    """Refuse a checkpoint whose declared parameter shapes its own state tensors contradict.

    A shape comes from the file's metadata or the model beside the state; a state tensor with
    another number of elements (``param_shapes`` saying 100000x100000 over 128 stored values)
    cannot be analysed, converted or trained, so every command refuses it here, once.
    """
    for p in ck.params:
        if not p.shape:
            continue
        numel = math.prod(p.shape)
        declared = "x".join(map(str, p.shape))
        for key in _DENSE_MOMENTS:
            t = p.state.get(key)
            if isinstance(t, torch.Tensor) and t.numel() != numel:
                raise InputError(
                    f"{ck.path}: parameter {p.name} is declared {declared} but its {key} holds {t.numel()} "
                    "values; the file contradicts itself (re-copy or re-export it)"
                )
        q, u = (p.state.get(k) for k in FACTOR_KEYS)
        if isinstance(q, torch.Tensor) and isinstance(u, torch.Tensor):
            view = matrix_view_shape(p.shape)
            if (
                view is None
                or q.dim() != 2
                or u.dim() != 2
                or (q.shape[0], u.shape[0]) != view
                or q.shape[1] != u.shape[1]
            ):
                raise InputError(
                    f"{ck.path}: parameter {p.name} is declared {declared} but its factors are "
                    f"{list(q.shape)} and {list(u.shape)}; the file contradicts itself (re-copy or re-export it)"
                )


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor's elements take (its view, not the whole storage)."""
    return t.numel() * t.element_size()


def check_tensor_storage(t: torch.Tensor, what: str, source: Path | str) -> None:
    """Refuse a tensor whose stored data does not back every element it claims.

    ``torch.save`` keeps strides, so a few bytes can declare a 40000x40000 moment as an expanded
    (stride-0) or overlapping view of a tiny storage; it loads with ``weights_only=True`` and
    costs gigabytes the first time an analysis makes it contiguous. A real optimizer state is
    never such a view: its elements are distinct and lie inside its storage.
    """
    if t.numel() == 0 or t.layout != torch.strided:
        return
    storage_elements = t.untyped_storage().nbytes() // max(t.element_size(), 1)
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz > 1)
    extent = 1  # elements spanned by the dimensions seen so far, smallest stride first
    overlapping = False
    for stride, size in dims:
        if stride < extent:
            overlapping = True
            break
        extent = stride * (size - 1) + extent
    last = t.storage_offset() + sum((sz - 1) * st for sz, st in zip(t.shape, t.stride(), strict=True))
    if overlapping or t.storage_offset() < 0 or last >= storage_elements:
        shape = "x".join(map(str, t.shape))
        raise InputError(
            f"{source}: {what} declares {shape} elements but stores only {storage_elements} "
            f"({'an expanded or overlapping view' if overlapping else 'a view past its data'}); a real "
            "optimizer state stores every element: re-save it from the optimizer"
        )


def optimizer_state_bytes(state: Mapping[Any, Mapping[str, Any]]) -> int:
    """Bytes of the tensors in an optimizer state: ``optimizer.state`` or ``state_dict()["state"]``.

    Non-tensor entries (a Python ``step``) count nothing; per-parameter ``step`` tensors count.
    """
    return sum(tensor_bytes(t) for s in state.values() for t in s.values() if isinstance(t, torch.Tensor))


def anonymous_name(index: int) -> str:
    return f"param_{index}"


def refuse_unsupported_keys(
    state_keys: set[str], source: Path | str, param_groups: list[dict] | None = None
) -> None:
    """Raise ``UnsupportedStateError`` when the state belongs to an optimizer adapprox does not read.

    ``param_groups`` identify the one such optimizer whose state holds no tensors at all: SGD
    without momentum (an AdamW that never stepped has no state either, but no such groups).
    """
    if not state_keys and param_groups and all(set(g) >= _SGD_GROUP_KEYS for g in param_groups):
        momentum = ", ".join(sorted({str(_scalar(g.get("momentum"))) for g in param_groups}))
        raise UnsupportedStateError(
            f"{source} holds an SGD state without momentum (momentum {momentum}, no per-parameter "
            f"state): there is no second moment to read; {_READS}"
        )
    for keys, what in _REFUSED_STATES:
        found = sorted(keys & state_keys)
        if found:
            raise UnsupportedStateError(f"{source} holds {what} (keys: {', '.join(found)}); {_READS}")
    if state_keys and not state_keys & {SECOND_MOMENT_KEY, *FACTOR_KEYS}:
        # e.g. Lion (exp_avg only), LBFGS, custom optimizers: nothing to analyse or convert.
        keys = ", ".join(sorted(state_keys))
        raise UnsupportedStateError(
            f"{source} holds an optimizer state without a second moment (keys: {keys}); {_READS}"
        )


def optimizer_kind(
    state_keys: set[str], param_groups: list[dict], default: str = "adamw"
) -> tuple[str, list[str]]:
    """The optimizer kind ("adapprox", "adamw" or "adam") and a warning when the file does not say.

    torch >= 2.x marks AdamW with ``decoupled_weight_decay: True`` (AdamW subclasses Adam); older
    files lack the key, so the caller's format decides (nanoGPT, Trainer and DeepSpeed use AdamW).
    """
    if state_keys & set(FACTOR_KEYS) or any(_ADAPPROX_GROUP_KEYS.issubset(g) for g in param_groups):
        return "adapprox", []
    flags = {g.get("decoupled_weight_decay") for g in param_groups}
    if flags == {True}:
        return "adamw", []
    if flags == {False}:
        return "adam", []
    decays = any(float(_scalar(g.get("weight_decay", 0.0)) or 0.0) > 0 for g in param_groups)
    if None in flags and decays and default == "adamw":
        return default, [
            "param_groups do not say whether weight decay is decoupled (saved by an older torch); assumed AdamW"
        ]
    return default, []


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def step_of(state: dict[str, Any]) -> int | None:
    value = state.get("step")
    if value is None:
        return None
    try:
        return int(_scalar(value))
    except (TypeError, ValueError, OverflowError):  # not a number, NaN, or infinite
        return None


def max_step(params: list[ParamState]) -> int | None:
    steps = [s for s in (step_of(p.state) for p in params) if s is not None]
    return max(steps) if steps else None


def clean_param_groups(groups: list[dict]) -> list[dict]:
    """Hyper-parameters only: no "params"/"param_names", tensors turned into numbers."""
    out = []
    for g in groups:
        clean = {}
        for key, value in g.items():
            if key in ("params", "param_names"):
                continue
            clean[key] = _scalar(value) if isinstance(value, torch.Tensor) else value
        out.append(clean)
    return out


def state_dtype(state: dict[str, torch.Tensor], fallback: torch.dtype = torch.float32) -> torch.dtype:
    for key in (SECOND_MOMENT_KEY, FACTOR_KEYS[0], "exp_avg"):
        t = state.get(key)
        if isinstance(t, torch.Tensor):
            return t.dtype
    return fallback


def is_optimizer_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("state"), dict)
        and isinstance(obj.get("param_groups"), list)
        and all(isinstance(g, dict) and "params" in g for g in obj["param_groups"])
    )
