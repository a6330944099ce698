"""Adapprox on FSDP2 parameters (DTensors sharded by rows) and its checkpoints through DCP.

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns every parameter W (m x n) into a
``DTensor`` with ``Shard(0)`` on a 1-D mesh: each rank holds a block of rows. Adapprox keeps,
per rank, the rows of Q (m x k) that match its rows of W and the whole of U (n x k): the
factors cost (m / P + n) k numbers per rank. The first moment and dense second moments are
sharded like the parameter.

S-RSI on a row-sharded V ([decided], after microsoft/dion's sharded power iteration):

- the test matrix Omega (n x (k + p)) lives on the column side and is drawn from the same
  seeded generator on every rank, so it is identical everywhere (and a resume stays exact);
- Y = V Omega is local; the tall, row-sharded Y is orthonormalized by Cholesky-QR whose
  (k + p) x (k + p) Gram matrix is all-reduced; B = Q^T V and ||V||_F^2 are all-reduced too
  (``lowrank._srsi_batched``'s ``reduce`` seam), and the small decomposition is replicated.
  Each matrix costs O((k + p) n) numbers of communication per step, small next to its
  gradient's reduce-scatter.
- Every decision is taken from all-reduced values so that all ranks agree: the NaN/Inf skip,
  the clip RMS (global sum of squares over the global count) and the adaptive rank.

The rule for which matrices are factored reads the parameter's GLOBAL shape (a DTensor's
``shape``), never the local shard: the state format does not depend on the number of ranks.

Only ``Shard(0)`` on a 1-D mesh is supported. FSDP1's flat parameters and DeepSpeed ZeRO's
flattened partitions lose the matrix shape that factoring needs; Replicate, Shard(1) and 2-D
meshes are refused with an error naming the parameter rather than stepped wrongly.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from adapprox_cli.errors import AdapproxError, InputError
from adapprox_cli.lowrank import _srsi_batched, adaptive_rank, matrix_view_shape, rank_cap, seeded_generator
from adapprox_cli.optim import _gradient_in_compute_dtype, _gradient_limit, _warn_skipped

__all__ = [
    "CollectiveTime",
    "ShardingError",
    "check_row_sharded",
    "check_sharded_group",
    "full_model_state_dict",
    "full_optimizer_state_dict",
    "load_optimizer_dcp",
    "local_state_bytes",
    "measure_collectives",
    "save_optimizer_dcp",
    "shard_for_training",
    "shard_optimizer_state",
    "sharded_adapprox",
    "sharded_zero_factors",
]

_FACTOR_KEYS = ("exp_avg_sq_q", "exp_avg_sq_u")
_DCP_PREFIX = "optim"  # the key ``adapprox inspect`` and HF/torchtitan-style tools look for


class ShardingError(AdapproxError):
    """A DTensor parameter sharded in a way Adapprox cannot factor (not Shard(0) on a 1-D mesh)."""


# --------------------------------------------------------------------------- collectives


@dataclass
class CollectiveTime:
    """Seconds spent in the optimizer's all-reduces, how many were issued and their numbers."""

    seconds: float = 0.0
    calls: int = 0
    elements: int = 0


_timers: list[CollectiveTime] = []


@contextmanager
def measure_collectives() -> Iterator[CollectiveTime]:
    """Time every all-reduce the sharded step issues inside the ``with`` block."""
    timer = CollectiveTime()
    _timers.append(timer)
    try:
        yield timer
    finally:
        _timers.remove(timer)


def _all_reduce(t: Tensor, group: Any, op: Any = None) -> Tensor:
    t = t.contiguous()
    start = time.perf_counter() if _timers else 0.0
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
    if _timers:
        elapsed = time.perf_counter() - start
        for timer in _timers:
            timer.seconds += elapsed
            timer.calls += 1
            timer.elements += t.numel()
    return t


# --------------------------------------------------------------------------- placement


def check_row_sharded(param: Tensor, label: str) -> None:
    """Raise ``ShardingError`` unless ``param`` is a DTensor with Shard(0) on a 1-D mesh."""
    if not isinstance(param, DTensor):
        return
    mesh, placements = param.device_mesh, tuple(param.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise ShardingError(
            f"Adapprox: {label} is a DTensor with placements {placements} on a {mesh.ndim}-D mesh; "
            "only FSDP2's Shard(0) on a 1-D mesh is supported (the factors need whole rows); "
            "shard it with fully_shard() on a 1-D mesh or keep it a plain tensor"
        )


def check_sharded_group(group: dict[str, Any], first_index: int) -> None:
    """``check_row_sharded`` for every parameter of an optimizer group, named when it can be."""
    names = group.get("param_names")
    for offset, param in enumerate(group["params"]):
        label = f"parameter {first_index + offset}"
        if names is not None:
            label += f" ({names[offset]!r})"
        check_row_sharded(param, f"{label} of shape {tuple(param.shape)}")
        if group.get("cosine_guidance") and isinstance(param, DTensor):
            raise ShardingError(
                f"Adapprox: {label} is sharded and cosine_guidance is on; cosine guidance is not "
                "implemented for sharded parameters: set cosine_guidance=False"
            )


def _row_sharded(local: Tensor, like: DTensor, global_shape: tuple[int, ...]) -> DTensor:
    """A DTensor holding ``local`` as this rank's rows (uneven and empty shards included)."""
    stride = torch.empty(global_shape, device="meta").stride()
    return DTensor.from_local(
        local, like.device_mesh, [Shard(0)], run_check=False, shape=torch.Size(global_shape), stride=stride
    )


def _replicated(local: Tensor, like: DTensor) -> DTensor:
    return DTensor.from_local(local, like.device_mesh, [Replicate()], run_check=False)


def sharded_zero_factors(param: DTensor, rank: int, dtype: torch.dtype) -> tuple[DTensor, DTensor]:
    """Zero factors for a row-sharded parameter: Q sharded like its rows, U replicated."""
    m, n = matrix_view_shape(param.shape)
    local = param.to_local()
    local_rows, device = local.shape[0], local.device
    q = torch.zeros(local_rows, rank, dtype=dtype, device=device)
    u = torch.zeros(n, rank, dtype=dtype, device=device)
    return _row_sharded(q, param, (m, rank)), _replicated(u, param)


def local_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this rank holds (``Optimizer.state_bytes`` counts global sizes)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                local = value.to_local() if isinstance(value, DTensor) else value
                total += local.numel() * local.element_size()
    return total


# --------------------------------------------------------------------------- the step


_warned_step_rule = False  # the fallback of rank_rule='dense' is said once per process


def sharded_adapprox(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    param_indices: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip_threshold: float | None,
    rank_min: int,
    rank_max: int | None,
    tol: float,
    oversample: int,
    power_iters: int,
    rank_interval: int,
    warm_start: bool,
    cosine_guidance: bool,
    first_moment: str,
    seed: int,
    maximize: bool,
    rank_rule: str = "step",
    rank_jump: bool = False,
) -> None:
    """``optim._single_tensor_adapprox`` for row-sharded DTensor parameters, on local shards.

    [decided] The rank rule here is the per-step truncation rule (``rank_rule="step"``): the
    dense-EMA sketch is not sharded yet, so ``rank_rule="dense"`` and ``rank_jump`` fall back to
    it, with a warning the first time.

    Phase 1 (no writes): the all-reduced skip flags, then per factored matrix the local V and
    S-RSI with all-reduced sums. Phase 2: rank choices from replicated errors, made identical
    by an all-reduce (MAX) of the chosen ranks. Phase 3: the update with a clip RMS from the
    all-reduced sum of squares; then the new factors are committed.
    """
    if not params:
        return
    if cosine_guidance:
        raise ShardingError("Adapprox: cosine_guidance is not implemented for sharded parameters")
    global _warned_step_rule
    if rank_rule == "dense" and not _warned_step_rule:
        _warned_step_rule = True
        warnings.warn(
            "Adapprox on FSDP2 parameters uses rank_rule='step' (tol bounds each step's truncation, "
            "not the distance to Adam's dense moment): the dense-EMA sketch is not sharded yet",
            RuntimeWarning,
            stacklevel=3,
        )
    for param, index in zip(params, param_indices):
        label = f"parameter {index} of shape {tuple(param.shape)}"
        if not isinstance(param, DTensor):
            raise ShardingError(
                f"Adapprox: {label} is a plain tensor in a group of DTensor parameters; put "
                "unsharded parameters in their own parameter group"
            )
        check_row_sharded(param, label)
        if param.device_mesh != params[0].device_mesh:
            raise ShardingError(
                f"Adapprox: {label} lives on another device mesh than parameter {param_indices[0]}; "
                "put parameters sharded over different meshes in different optimizers"
            )
    group = params[0].device_mesh.get_group()
    device = params[0].to_local().device

    def reduce(t: Tensor) -> Tensor:
        return _all_reduce(t, group)

    local_params = [p.to_local() for p in params]
    local_grads = [
        _gradient_in_compute_dtype(g.to_local() if isinstance(g, DTensor) else g, p, maximize)
        for p, g in zip(local_params, grads)
    ]
    # Skip flags: a rank whose shard holds NaN/Inf (or overflows) marks the whole parameter bad;
    # the flags (not the maxima: a MAX over NaN is not portable) are summed over ranks.
    bad = torch.stack(
        [
            (
                ~(torch.linalg.vector_norm(g, ord=math.inf) <= _gradient_limit(p))
                if g.numel()
                else torch.zeros((), dtype=torch.bool, device=device)
            ).to(device=device, dtype=torch.float64)
            for p, g in zip(params, local_grads)
        ]
    )
    ok = [flag == 0.0 for flag in _all_reduce(bad, group).tolist()]
    steps = [int(state["step"].item()) + 1 for state in states]

    # Phase 1: local V and sharded S-RSI, one batched call (and so one all-reduce per sum) for
    # every stack of matrices with the same global shape, rank and warm start. Every rank sees
    # the same parameters in the same order and the same flags: the stacks agree across ranks.
    stacks: dict[tuple, list[int]] = {}
    for i, (param, state) in enumerate(zip(params, states)):
        if ok[i] and param.numel() and "exp_avg_sq_q" in state:
            warm = warm_start and steps[i] > 1
            key = (tuple(param.shape), state["exp_avg_sq_q"].shape[1], state["exp_avg_sq_q"].dtype, warm)
            stacks.setdefault(key, []).append(i)
    sketched: dict[int, tuple[Tensor, Tensor, Tensor, Tensor, int, int]] = {}
    for (shape, current_rank, _, warm), members in stacks.items():
        m, n = matrix_view_shape(shape)  # the GLOBAL shape
        q_prev = torch.stack([states[i]["exp_avg_sq_q"].to_local() for i in members])
        u_prev = torch.stack([states[i]["exp_avg_sq_u"].to_local() for i in members])
        # V = beta2 max(Q U^T, 0) + (1 - beta2) G^2 for this rank's rows of the whole stack.
        v = torch.bmm(q_prev, u_prev.mT).clamp_(min=0.0).mul_(beta2)
        g2d = [local_grads[i].reshape(-1, n) for i in members]
        torch._foreach_addcmul_(list(v.unbind(0)), g2d, g2d, value=1.0 - beta2)
        k_max = rank_cap(m, n, rank_max)
        sketch_rank = min(current_rank, k_max)
        width = min(sketch_rank + oversample, m, n)
        kept = min(current_rank, width) if warm else 0
        # [decided] The seed rule of the one-process step, so Omega is identical on every rank.
        omega = torch.stack(
            [
                torch.randn(
                    n,
                    width - kept,
                    generator=seeded_generator(seed, param_indices[i], steps[i], device=v.device),
                    device=v.device,
                    dtype=v.dtype,
                )
                for i in members
            ]
        )
        q_s, u_s, _, errors = _srsi_batched(
            v, sketch_rank, oversample, power_iters, omega, q_prev if warm else None, reduce=reduce, rows=m
        )
        for row, i in enumerate(members):
            sketched[i] = (v[row], q_s[row], u_s[row], errors[row], current_rank, k_max)

    # Phase 2: rank choices. The errors are computed from all-reduced values on every rank;
    # the MAX all-reduce makes the choice identical even if two ranks rounded differently.
    chosen: dict[int, int] = {}
    evaluated = [i for i in sketched if (steps[i] - 1) % rank_interval == 0]
    flat = torch.cat([sketched[i][3] for i in evaluated]).tolist() if evaluated else []  # one host read
    host_errors, offset = {}, 0
    for i in evaluated:
        width = sketched[i][3].shape[0]
        host_errors[i], offset = flat[offset : offset + width], offset + width
    for i, (_, q_s, _, _, current_rank, k_max) in sketched.items():
        if i in host_errors:
            chosen[i] = adaptive_rank(
                host_errors[i],
                current_rank,
                rank_min=min(rank_min, k_max),
                rank_max=k_max,
                oversample=oversample,
                tol=tol,
            )
        else:
            chosen[i] = min(current_rank, k_max, q_s.shape[-1])
    if chosen:
        agreed = _all_reduce(
            torch.tensor(list(chosen.values()), dtype=torch.int64, device=device), group, dist.ReduceOp.MAX
        )
        chosen = dict(zip(chosen, agreed.tolist()))

    # Phase 3: the update of every stepped parameter, clipped by its global RMS.
    stepped = [i for i in range(len(params)) if ok[i] and params[i].numel()]
    directions: dict[int, Tensor] = {}
    for i in stepped:
        state, g = states[i], local_grads[i]
        if i in sketched:
            denom = sketched[i][0].sqrt_().add_(eps).view(g.shape)
        else:
            exp_avg_sq = state["exp_avg_sq"].to_local()
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = exp_avg_sq.sqrt().add_(eps)
        if beta1 > 0 and first_moment == "gradient":
            exp_avg = state["exp_avg"].to_local()
            exp_avg.lerp_(g.to(exp_avg.dtype), 1.0 - beta1)
            directions[i] = torch.div(exp_avg.to(denom.dtype), denom, out=denom)
        else:
            directions[i] = torch.div(g, denom, out=denom)
    if stepped and clip_threshold is not None and not math.isinf(clip_threshold):
        sums = torch.stack(
            [torch.linalg.vector_norm(directions[i], dtype=torch.float64).square() for i in stepped]
        )
        sums = _all_reduce(sums, group)
        for i, total in zip(stepped, sums.unbind(0)):
            rms = total.sqrt() / math.sqrt(params[i].numel())  # global numel
            directions[i].div_(torch.clamp(rms / clip_threshold, min=1.0).to(directions[i].dtype))
    for i in stepped:
        update = directions[i]
        if beta1 > 0 and first_moment == "update":
            exp_avg = states[i]["exp_avg"].to_local()
            exp_avg.lerp_(update.to(exp_avg.dtype), 1.0 - beta1)
            update = exp_avg.to(update.dtype)
        local = local_params[i]
        # [paper] decoupled weight decay: W <- W - lr (D + wd W).
        if weight_decay != 0:
            local.mul_(1.0 - lr * weight_decay)
        local.add_(update.to(local.dtype), alpha=-lr)

    for i, state in enumerate(states):
        if not ok[i]:
            _warn_skipped(param_indices[i], params[i])
            continue
        state["step"] = state["step"] + 1
        if i in sketched:
            _, q_s, u_s, _, _, _ = sketched[i]
            k = chosen[i]
            m, _ = matrix_view_shape(params[i].shape)
            state["exp_avg_sq_q"] = _row_sharded(q_s[:, :k].contiguous(), params[i], (m, k))
            state["exp_avg_sq_u"] = _replicated(u_s[:, :k].contiguous(), params[i])


# --------------------------------------------------------------------------- training


def shard_for_training(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
    """FSDP2 a model and move its optimizer (and the state it holds) onto the sharded parameters.

    ``fully_shard`` is applied to every block of each ``nn.ModuleList`` (the transformer layers),
    then to the whole model (embeddings, tied head, final norm); the mesh is 1-D over the
    default process group. ``fully_shard`` replaces the parameters, so the optimizer's groups
    and state are re-keyed to the new ones by name, then sharded like them
    (``shard_optimizer_state``). Returns the sharded model (the same object).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = {id(p): name for name, p in model.named_parameters()}
    grouped = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    states = {names[id(p)]: state for p, state in optimizer.state.items()}
    device_type = next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for module in list(model.modules()):
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = dict(model.named_parameters())
    optimizer.state.clear()
    for group, group_names in zip(optimizer.param_groups, grouped):
        group["params"] = [params[name] for name in group_names]
        for name in group_names:
            if name in states:
                optimizer.state[params[name]] = states[name]
    shard_optimizer_state(optimizer)
    return model


# --------------------------------------------------------------------------- checkpoints


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Turn full (unsharded) state tensors of row-sharded parameters into DTensors, in place.

    For a state loaded from a one-process checkpoint (every rank holds the same full tensors)
    onto an optimizer over FSDP2 parameters: tensors with the parameter's rows (the first
    moment, dense second moments, Q) are sharded by rows like it, U is replicated.
    """
    for group in optimizer.param_groups:
        if any(isinstance(p, DTensor) for p in group["params"]) and "rank_rule" in group:
            group["rank_rule"] = "step"  # what the sharded step runs (it keeps no dense-EMA sketch)
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not isinstance(param, DTensor) or not state:
                continue
            state.pop("exp_avg_sq_sketch", None)
            for key, value in list(state.items()):
                if not isinstance(value, Tensor) or isinstance(value, DTensor) or value.ndim == 0:
                    continue  # the step counter stays a plain scalar
                if key == "exp_avg_sq_u":
                    state[key] = _replicated(value.to(param.to_local().device), param)
                elif value.shape[0] != param.shape[0]:
                    raise ShardingError(
                        f"optimizer state {key!r} of shape {tuple(value.shape)} does not follow the rows "
                        f"of its parameter {tuple(param.shape)}; it cannot be sharded like it under FSDP2 "
                        "(use Adapprox or AdamW)"
                    )
                else:
                    # every rank holds the same full tensor: each keeps its rows
                    state[key] = distribute_tensor(
                        value.to(param.to_local().device), param.device_mesh, [Shard(0)], src_data_rank=None
                    )


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every DTensor gathered into a full CPU tensor.

    A collective: every rank must call it. The result is the one-process state dict (what
    ``Adapprox.load_state_dict`` and ``adapprox inspect`` read), whatever the number of ranks.
    """
    state_dict = optimizer.state_dict()
    state = {
        index: {
            key: value.full_tensor().cpu() if isinstance(value, DTensor) else value
            for key, value in entries.items()
        }
        for index, entries in state_dict["state"].items()
    }
    return {"state": state, "param_groups": state_dict["param_groups"]}


def full_model_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every DTensor gathered into a full CPU tensor (a collective)."""
    return {
        key: value.full_tensor().cpu() if isinstance(value, DTensor) else value
        for key, value in model.state_dict().items()
    }


def save_optimizer_dcp(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Save the optimizer state as a torch.distributed.checkpoint directory (every rank calls it).

    Keys are parameter FQNs under ``optim`` (``optim.state.<fqn>.exp_avg_sq_q``): the directory
    reshards on load and ``adapprox inspect`` reads it.
    """
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer)
    dcp.save({_DCP_PREFIX: state}, checkpoint_id=str(path))


def load_optimizer_dcp(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Load a directory written by ``save_optimizer_dcp``, on any number of ranks (or one process).

    A fresh optimizer's skeleton holds factors at ``rank_init``; the saved ones have the ranks
    the run had reached, so every factor is first re-created at its saved global size (Q sharded
    by rows, U replicated, as the step keeps them) and ``dcp.load`` fills it.
    """
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    path = Path(path)
    try:
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except (OSError, FileNotFoundError) as exc:
        raise InputError(
            f"{path}: cannot read a DCP checkpoint ({exc}); pass the directory save_optimizer_dcp wrote"
        ) from exc
    # DCP builds its skeleton by a zero-gradient, lr=0 step, which torch skips when gradients
    # are present (the state dict would then be empty and nothing would load): set them aside.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        state = get_optimizer_state_dict(model, optimizer)
        _presize_factors(state, saved)
        wrapped = {_DCP_PREFIX: state}
        dcp.load(wrapped, checkpoint_id=str(path))
        set_optimizer_state_dict(model, optimizer, wrapped[_DCP_PREFIX])
    finally:
        for p, grad in zip(params, grads):
            p.grad = grad


def _presize_factors(state: dict[str, Any], saved: dict[str, Any]) -> None:
    """Replace every factor of the skeleton whose size differs from the saved one.

    A dense-EMA sketch the checkpoint does not hold (saved by the sharded step, which keeps
    none) is dropped from the skeleton: the optimizer starts it from the loaded factors.
    """
    for fqn, entries in state["state"].items():
        if "exp_avg_sq_sketch" in entries and f"{_DCP_PREFIX}.state.{fqn}.exp_avg_sq_sketch" not in saved:
            del entries["exp_avg_sq_sketch"]
        for key in _FACTOR_KEYS:
            meta = saved.get(f"{_DCP_PREFIX}.state.{fqn}.{key}")
            if key not in entries or meta is None or tuple(meta.size) == tuple(entries[key].shape):
                continue
            current = entries[key]
            if isinstance(current, DTensor):
                entries[key] = torch.distributed.tensor.empty(
                    tuple(meta.size),
                    dtype=current.dtype,
                    device_mesh=current.device_mesh,
                    placements=current.placements,
                )
            else:
                entries[key] = torch.empty(tuple(meta.size), dtype=current.dtype, device=current.device)
