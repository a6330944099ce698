r"""Adapprox: Adam with a second moment stored as adaptive-rank randomized low-rank factors.

Shaped like ``torch/optim/adam.py``: the ``Adapprox`` class validates its settings and keeps
them in ``defaults``/``param_groups``, creates state lazily, and calls the functional twin
``adapprox`` under ``no_grad``. Two implementations do the work, as in torch.optim:
``_single_tensor_adapprox`` walks the parameters one by one (the reference), and
``_multi_tensor_adapprox`` stacks same-shape matrices and runs S-RSI on the stack (batched
products, Cholesky-QR, one small eigendecomposition per stack) and the dense parameters through
``torch._foreach_*`` ops, with one host read per step. ``foreach=None`` picks the batched path
(measured faster on the CPU too); ``foreach=False`` keeps the loop.

Paper versus project: the Adapprox paper (arXiv:2403.14958) fixes the idea (V ~ Q U^T found by
randomized subspace iteration, an adaptive rank within [k_min, k_max], optional first moment,
update clipping, decoupled weight decay, no bias correction, optional cosine-similarity
guidance). Its full body and code are not public; every detail it leaves open is decided here
and marked [decided] in comments and in the class docstring.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from adapprox_cli.defaults import DEFAULT_TOL
from adapprox_cli.errors import StateMismatchError
from adapprox_cli.lowrank import (  # is_factored: the shape rule, re-exported as optim.is_factored
    _frobenius_sq,
    _sketched_distances,
    _srsi,
    _srsi_batched,
    dense_ema_rank,
    is_factored,
    matrix_view_shape,
    moment_sketch,
    moment_sketch_test_matrix,
    rank_cap,
    seeded_generator,
)

__all__ = ["DEFAULT_TOL", "Adapprox", "adapprox", "is_factored"]

_FIRST_MOMENT_MODES = ("update", "gradient")
# "dense": the rank bounds the distance to the dense EMA Adam would hold (default, [decided]);
# "step": the paper-shaped rule that bounds one step's truncation of the rebuilt V (kept to compare).
_RANK_RULES = ("dense", "step")
# State entries that hold the second moment: kept in the compute dtype whatever they were saved in.
_SECOND_MOMENT_KEYS = ("exp_avg_sq", "exp_avg_sq_q", "exp_avg_sq_u", "exp_avg_sq_sketch")
_FIRST_MOMENT_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
# [decided] float16 stores at most 65504: Adam's first moment of a 1e5 gradient becomes Inf and
# the weights NaN, so float16 is refused (bfloat16 takes the same memory with float32's range).
_REFUSED_FIRST_MOMENT_DTYPES = ("float16",)


def _compute_dtype(param: Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


class Adapprox(Optimizer):
    r"""Adam whose second moment lives as low-rank factors :math:`V \approx Q U^\top`.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)}, \beta_1, \beta_2, \epsilon, \lambda
                \text{ (weight decay)}, d \text{ (clip threshold)}, \tau \text{ (tol)},
                k_{\min}, k_{\max}, p, l \\
            &\textbf{for } t = 1, 2, \ldots \textbf{ do} \\
            &\quad G_t \leftarrow \nabla_W f_t(W_{t-1}) \\
            &\quad V_t \leftarrow \beta_2 \max(Q_{t-1} U_{t-1}^\top, 0) + (1-\beta_2) G_t^2
                \quad \text{(dense, one matrix at a time)} \\
            &\quad (Q_t, U_t, k_t) \leftarrow \text{AS-RSI}(V_t;\, k_{t-1}, p, l, \tau,
                k_{\min}, k_{\max}) \\
            &\quad D_t \leftarrow G_t / (\sqrt{V_t} + \epsilon) \\
            &\quad D_t \leftarrow D_t / \max(1, \mathrm{RMS}(D_t) / d) \\
            &\quad \textbf{if } \beta_1 > 0: M_t \leftarrow \beta_1 M_{t-1} + (1-\beta_1) D_t;
                \ D_t \leftarrow M_t \\
            &\quad W_t \leftarrow W_{t-1} - \gamma (D_t + \lambda W_{t-1}) \\
       \end{aligned}

    Vectors, scalars and matrices too small to gain from factoring keep a dense
    :math:`V_t` (``exp_avg_sq``) and follow the same update.

    Paper: Zhao et al., "Adapprox: Adaptive Approximation in Adam Optimization via Randomized
    Low-Rank Matrices", https://arxiv.org/abs/2403.14958.

    What the paper fixes [paper]: randomized subspace iteration with oversampling p and power
    iterations l; an adaptive rank within [k_min, k_max]; the first moment is optional
    (``betas[0] = 0`` drops it); update clipping with d = 1; decoupled weight decay; no bias
    correction; optional cosine-similarity guidance.

    What this implementation decides [decided] (the paper leaves it open):

    - Rank rule (``rank_rule="dense"``, the default): ``tol`` bounds the distance of the
      stored moment to the dense EMA :math:`D_t = \beta_2 D_{t-1} + (1-\beta_2) G_t^2` Adam
      would hold, :math:`\|\max(Q U^\top, 0) - D_t\|_F / \|D_t\|_F`. Each factored matrix
      keeps an exact sketch :math:`S_t = D_t \Omega` (``exp_avg_sq_sketch``, 4 columns on the
      smaller side, updated with :math:`(1-\beta_2) G_t^2 \Omega`; :math:`\Omega` is
      regenerated from the seed, never stored) and, after each S-RSI at width k + p, keeps the
      smallest r in [k_min, min(k + p, k_max)] whose sketched distance is <= ``tol``; if none,
      min(k + p, k_max). Re-evaluated every ``rank_interval`` steps. ``rank_rule="step"`` is
      the rule before it: the same search on one step's truncation error of the rebuilt
      :math:`V_t`, whose errors compound (measured: 1.7-4.7x ``tol`` from :math:`D_t`).
    - Start of a sketch (``rank_jump``, on by default): the first evaluation of a fresh state,
      or of a state loaded without a sketch (its sketch starts as :math:`\max(Q U^\top, 0)
      \Omega`), may take any rank up to k_max instead of growing by p per step; the paper's
      rank "expands gradually", so this is a departure. Measured from scratch: it halves the
      first step's distance to :math:`D_t`. A converted state already sits at the rank the
      rule asks for (``convert`` stores the exact :math:`D_0 \Omega`), so it does not jump.
    - k_max defaults to min(m, n) // 4 per matrix (the value behind the paper's memory numbers).
    - Warm start: the sketch starts from the previous Q plus p fresh Gaussian directions.
    - Q U^T is clamped at 0 before it is used (the product can dip below zero).
    - ``first_moment="gradient"`` averages the gradient as Adam does and preconditions the
      average; ``"update"`` averages the clipped preconditioned update (Adafactor/CAME style).
    - Cosine guidance (off by default; a reconstruction): the step is scaled by (1 + c) / 2,
      c = cos(clipped update, M_{t-1}).
    - A parameter whose gradient holds NaN or Inf is skipped for that step (state and
      weights untouched) with a ``RuntimeWarning``: a bad batch never poisons the factors.
    - The random test matrix is a function of (seed, parameter index, step): resuming from a
      state dict repeats the uninterrupted run bit for bit.

    Args:
        params: iterable of parameters, dicts defining parameter groups, or named parameters.
        lr: learning rate :math:`\gamma` (float or 1-element tensor). Default: 1e-3.
        betas: :math:`(\beta_1, \beta_2)`; :math:`\beta_1 = 0` stores no first moment.
        eps: added to :math:`\sqrt{V}` (outside the root). Default: 1e-8.
        weight_decay: decoupled weight decay :math:`\lambda`. Default: 0.
        clip_threshold: d in the update clipping; ``None`` or ``inf`` disables it. Default: 1.
        rank_init: k_0, the rank of a fresh factored moment. Default: 1.
        rank_min: k_min. Default: 1.
        rank_max: k_max for every matrix, or ``None`` for min(m, n) // 4 per matrix.
        tol: with ``rank_rule="dense"``, the largest relative distance (Frobenius) of the
            stored moment max(Q U^T, 0) to the dense EMA Adam would hold; with ``"step"``, the
            largest relative truncation error of one step. Default: ``DEFAULT_TOL`` (0.05).
        rank_rule: ``"dense"`` (default) or ``"step"``, see above.
        rank_jump: let the first evaluation of a new sketch take any rank up to k_max.
        oversample: p >= 1, extra sketch columns (also the most a rank grows per evaluation;
            0 would freeze every rank, so it is refused).
        power_iters: l, subspace-iteration rounds per step. Default: 1 with ``warm_start``
            (the previous basis is already close), measured in ``benchmarks/``.
        rank_interval: re-evaluate ranks every this many steps (1 = every step); in between
            the rank is kept and no host synchronisation is needed for it.
        warm_start: start each sketch from the previous factor. Default: True.
        cosine_guidance: scale updates by (1 + cos) / 2 against the previous first moment.
        first_moment: ``"gradient"`` (Adam's form) or ``"update"`` (Adafactor's form).
        first_moment_dtype: storage dtype of ``exp_avg``: ``None`` (float32, float64 for
            float64 params), ``"bfloat16"`` to save memory, or float32/float64 (float16 is
            refused: its range ends at 65504).
        seed: seed of the random test matrices.
        maximize: maximize the objective instead of minimizing it.
        foreach: ``True`` for the batched multi-tensor implementation, ``False`` for the
            per-parameter loop, ``None`` (default) for the batched one (it measured faster on
            the CPU as well, ``benchmarks/bench_step_ops.py``). Both give the same ranks and
            factors to float32 round-off; cosine guidance always runs on the loop.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        clip_threshold: float | None = 1.0,
        rank_init: int = 1,
        rank_min: int = 1,
        rank_max: int | None = None,
        tol: float = DEFAULT_TOL,
        rank_rule: str = "dense",
        rank_jump: bool = True,
        oversample: int = 5,
        power_iters: int = 1,
        rank_interval: int = 1,
        warm_start: bool = True,
        cosine_guidance: bool = False,
        first_moment: str = "gradient",
        first_moment_dtype: str | torch.dtype | None = None,
        seed: int = 0,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"Tensor lr must be 1-element, got {lr.numel()} elements")
        elif not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if clip_threshold is not None and not clip_threshold > 0.0:
            raise ValueError(f"Invalid clip_threshold: {clip_threshold}; use a positive number or None")
        for name, value in (
            ("rank_init", rank_init),
            ("rank_min", rank_min),
            ("rank_interval", rank_interval),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= 1")
        if rank_max is not None:
            if isinstance(rank_max, bool) or not isinstance(rank_max, int) or rank_max < 1:
                raise ValueError(f"Invalid rank_max: {rank_max!r}; expected an integer >= 1 or None")
            if rank_min > rank_max:
                raise ValueError(f"Invalid rank_min: {rank_min} exceeds rank_max {rank_max}")
            if rank_init > rank_max:
                raise ValueError(f"Invalid rank_init: {rank_init} exceeds rank_max {rank_max}")
        if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 1:
            raise ValueError(
                f"Invalid oversample: {oversample!r}; expected an integer >= 1 (a rank grows by at "
                "most oversample per evaluation, so 0 would freeze every rank at rank_init)"
            )
        if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 0:
            raise ValueError(f"Invalid power_iters: {power_iters!r}; expected an integer >= 0")
        if rank_rule not in _RANK_RULES:
            raise ValueError(f"Invalid rank_rule: {rank_rule!r}; expected 'dense' or 'step'")
        if not (isinstance(tol, (int, float)) and 0.0 <= tol < math.inf):
            raise ValueError(f"Invalid tol: {tol!r}; expected a finite number >= 0")
        if first_moment not in _FIRST_MOMENT_MODES:
            raise ValueError(f"Invalid first_moment: {first_moment!r}; expected 'gradient' or 'update'")
        if isinstance(first_moment_dtype, torch.dtype):
            first_moment_dtype = str(first_moment_dtype).removeprefix("torch.")
        if first_moment_dtype in _REFUSED_FIRST_MOMENT_DTYPES:
            raise ValueError(
                f"Invalid first_moment_dtype: {first_moment_dtype!r}; float16 overflows above 65504 "
                "(a 1e5 gradient would make the weights NaN); use 'bfloat16' for the same memory"
            )
        if first_moment_dtype is not None and first_moment_dtype not in _FIRST_MOMENT_DTYPES:
            raise ValueError(
                f"Invalid first_moment_dtype: {first_moment_dtype!r}; expected None or one of "
                f"{', '.join(_FIRST_MOMENT_DTYPES)}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Invalid seed: {seed!r}; expected an integer")
        if foreach is not None and not isinstance(foreach, bool):
            raise ValueError(f"Invalid foreach: {foreach!r}; expected True, False or None")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            clip_threshold=clip_threshold,
            rank_init=rank_init,
            rank_min=rank_min,
            rank_max=rank_max,
            tol=float(tol),
            rank_rule=rank_rule,
            rank_jump=bool(rank_jump),
            oversample=oversample,
            power_iters=power_iters,
            rank_interval=rank_interval,
            warm_start=bool(warm_start),
            cosine_guidance=bool(cosine_guidance),
            first_moment=first_moment,
            first_moment_dtype=first_moment_dtype,
            seed=seed,
            maximize=bool(maximize),
            foreach=foreach,
            differentiable=False,  # not supported; kept because torch adds it on unpickling
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Older state dicts may lack settings added later: fill them from the defaults.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Tensor]],
    ) -> None:
        beta1 = group["betas"][0]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    "Adapprox does not support sparse gradients; use dense gradients "
                    "(e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam for those parameters"
                )
            if torch.is_complex(p):
                raise RuntimeError(
                    "Adapprox does not support complex parameters; optimize torch.view_as_real(param) instead"
                )
            state = self.state[p]
            if "step" in state and not isinstance(state["step"], Tensor):
                # state dicts written by other tools may hold a plain number
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
            if "exp_avg" in state and state["exp_avg"].dtype == torch.float16:
                # A float16 moment carried in from a checkpoint overflows above 65504: it is
                # widened to float32 once (lossless) instead of turning the weights into NaN.
                state["exp_avg"] = state["exp_avg"].float()
            if "exp_avg" in state and group["first_moment_dtype"] in _FIRST_MOMENT_DTYPES:
                # The group's storage dtype wins over the one a loaded or converted state was
                # saved in (a cast once, when the setting changes).
                wanted = _FIRST_MOMENT_DTYPES[group["first_moment_dtype"]]
                if state["exp_avg"].dtype != wanted:
                    state["exp_avg"] = state["exp_avg"].to(wanted)
            if len(state) == 0:
                compute_dtype = _compute_dtype(p)
                # step on the CPU as in torch.optim.AdamW: reading it needs no device sync.
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                if beta1 > 0:
                    dtype_name = group["first_moment_dtype"]
                    # a refused float16 (from an older or converted state dict) stores float32
                    moment_dtype = (
                        _FIRST_MOMENT_DTYPES.get(dtype_name, compute_dtype) if dtype_name else compute_dtype
                    )
                    state["exp_avg"] = torch.zeros_like(
                        p, dtype=moment_dtype, memory_format=torch.preserve_format
                    )
                if is_factored(p.shape, group["rank_max"]):
                    m, n = matrix_view_shape(p.shape)
                    k = min(group["rank_init"], m, n)
                    # Zero factors of rank k_0: Q U^T = 0 is the zero initial moment of Adam.
                    if _is_dtensor(p):
                        state["exp_avg_sq_q"], state["exp_avg_sq_u"] = _distributed().sharded_zero_factors(
                            p, k, compute_dtype
                        )
                    else:
                        state["exp_avg_sq_q"] = torch.zeros(m, k, dtype=compute_dtype, device=p.device)
                        state["exp_avg_sq_u"] = torch.zeros(n, k, dtype=compute_dtype, device=p.device)
                else:
                    state["exp_avg_sq"] = torch.zeros_like(
                        p, dtype=compute_dtype, memory_format=torch.preserve_format
                    )
            params.append(p)
            grads.append(p.grad)
            states.append(state)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform a single optimization step.

        Args:
            closure: a closure that re-evaluates the model and returns the loss (run with
                gradients enabled).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        first_index = 0
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            states: list[dict[str, Tensor]] = []
            if any(_is_dtensor(p) for p in group["params"]):
                # FSDP2: before any state exists, refuse placements the factors cannot follow.
                _distributed().check_sharded_group(group, first_index)
            self._init_group(group, params, grads, states)
            # The parameter's position in the flat order is part of its random seed.
            position = {id(p): first_index + i for i, p in enumerate(group["params"])}
            first_index += len(group["params"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            adapprox(
                params,
                grads,
                states,
                param_indices=[position[id(p)] for p in params],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                clip_threshold=group["clip_threshold"],
                rank_min=group["rank_min"],
                rank_max=group["rank_max"],
                tol=group["tol"],
                rank_rule=group["rank_rule"],
                rank_jump=group["rank_jump"],
                oversample=group["oversample"],
                power_iters=group["power_iters"],
                rank_interval=group["rank_interval"],
                warm_start=group["warm_start"],
                cosine_guidance=group["cosine_guidance"],
                first_moment=group["first_moment"],
                seed=group["seed"],
                maximize=group["maximize"],
                foreach=group["foreach"],
            )
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict after checking that every saved tensor fits its parameter.

        Refused (``StateMismatchError``, a ``ValueError``, naming the parameter): a tensor whose
        shape does not fit (a 64 x 48 state into a 48 x 64 parameter), and a dense
        ``exp_avg_sq`` for a matrix Adapprox factors, i.e. an AdamW/Adam state: it would be
        kept dense forever; ``adapprox_cli.convert.adamw_to_adapprox`` (``adapprox convert``)
        factors it into the state this optimizer keeps.

        Precision: ``torch.optim.Optimizer.load_state_dict`` casts floating state to each
        parameter's dtype; for bf16/fp16 parameters that would round the float32 factors to 3
        digits on every resume. Instead the second moment (dense, factors, sketch) is held in
        the compute dtype (float32, float64 for float64 parameters: a float32 state loads into
        a float64 model), and ``exp_avg`` in the group's ``first_moment_dtype`` when it names
        one, else in the dtype it was saved in.
        """
        saved_groups = state_dict["param_groups"]
        saved_ids = list(chain.from_iterable(g["params"] for g in saved_groups))
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        saved_rank_max = [
            g.get("rank_max", self.defaults["rank_max"]) for g in saved_groups for _ in g["params"]
        ]
        saved_names = [
            g["param_names"][i] if "param_names" in g else None
            for g in saved_groups
            for i in range(len(g["params"]))
        ]
        for index, (saved_id, param) in enumerate(zip(saved_ids, params)):
            label = f"parameter {index}" + (f" ({saved_names[index]})" if saved_names[index] else "")
            _check_saved_state(state_dict["state"].get(saved_id, {}), param, saved_rank_max[index], label)
        super().load_state_dict(state_dict)
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        for saved_id, param in zip(saved_ids, params):
            group = group_of[id(param)]
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if key == "step" or not isinstance(value, Tensor) or not value.is_floating_point():
                    continue
                dtype = value.dtype
                if key in _SECOND_MOMENT_KEYS:
                    dtype = _compute_dtype(param)
                elif key == "exp_avg" and group["first_moment_dtype"] in _FIRST_MOMENT_DTYPES:
                    dtype = _FIRST_MOMENT_DTYPES[group["first_moment_dtype"]]
                if self.state[param][key].dtype != dtype:
                    self.state[param][key] = value.to(device=param.device, dtype=dtype, copy=True)

    def ranks(self) -> dict[int, int]:
        """Current rank of every factored parameter, keyed by its flat index."""
        result = {}
        for index, p in enumerate(chain.from_iterable(g["params"] for g in self.param_groups)):
            state = self.state.get(p, {})
            if "exp_avg_sq_q" in state:
                result[index] = state["exp_avg_sq_q"].shape[1]
        return result

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (what a checkpoint of this optimizer stores)."""
        return sum(
            t.numel() * t.element_size()
            for s in self.state.values()
            for t in s.values()
            if isinstance(t, Tensor)
        )


def _check_saved_state(saved: dict[str, Any], param: Tensor, rank_max: int | None, label: str) -> None:
    """Raise ``StateMismatchError`` when a saved per-parameter state cannot belong to ``param``."""
    shape = tuple(param.shape)

    def refuse(problem: str) -> None:
        raise StateMismatchError(f"Adapprox.load_state_dict: {label} of shape {shape}: {problem}")

    tensors = {k: v for k, v in saved.items() if isinstance(v, Tensor) and k != "step"}
    for key in ("exp_avg", "exp_avg_sq"):
        if key in tensors and tuple(tensors[key].shape) != shape:
            refuse(
                f"the saved {key} has shape {tuple(tensors[key].shape)}; the state belongs to another "
                "parameter (check the model and the order of its parameters)"
            )
    if "exp_avg_sq" in tensors and is_factored(shape, rank_max):
        refuse(
            "the state holds a dense exp_avg_sq (an AdamW/Adam state?) but Adapprox keeps this matrix's "
            "second moment as low-rank factors; convert the state dict first with "
            "adapprox_cli.convert.adamw_to_adapprox (or `adapprox convert`)"
        )
    view = matrix_view_shape(shape)
    if "exp_avg_sq_q" in tensors or "exp_avg_sq_u" in tensors:
        q, u = tensors.get("exp_avg_sq_q"), tensors.get("exp_avg_sq_u")
        if q is None or u is None or view is None:
            refuse(
                "the saved factors exp_avg_sq_q/exp_avg_sq_u are incomplete or the parameter is not a matrix"
            )
        m, n = view
        if q.ndim != 2 or u.ndim != 2 or q.shape[0] != m or u.shape[0] != n or q.shape[1] != u.shape[1]:
            refuse(
                f"the saved factors are {tuple(q.shape)} and {tuple(u.shape)}; this parameter needs "
                f"({m}, k) and ({n}, k)"
            )
        sketch = tensors.get("exp_avg_sq_sketch")
        if sketch is not None and (sketch.ndim != 2 or sketch.shape[0] != min(m, n)):
            refuse(
                f"the saved exp_avg_sq_sketch is {tuple(sketch.shape)}; this parameter needs ({min(m, n)}, c)"
            )


def adapprox(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    *,
    param_indices: list[int] | None = None,
    lr: float | Tensor,
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
    foreach: bool | None = None,
    rank_rule: str = "dense",
    rank_jump: bool = True,
) -> None:
    """Functional Adapprox: one step over lists of parameters, gradients and their states.

    Unlike ``torch.optim.adam.adam`` it takes each parameter's state dict rather than lists of
    moment tensors, because the factors are replaced (not updated in place) when a rank changes.
    The step is atomic: every decomposition runs before any weight or state is written, so an
    exception leaves parameters, moments, factors and step counters as they were.
    See :class:`Adapprox` for the algorithm.
    """
    if param_indices is None:
        param_indices = list(range(len(params)))
    if isinstance(lr, Tensor):
        lr = lr.item()
    if foreach is None:
        foreach = _default_to_multi_tensor(params)
    # [decided] Cosine guidance needs M_{t-1} beside the new update: it stays on the loop.
    implementation = _multi_tensor_adapprox if foreach and not cosine_guidance else _single_tensor_adapprox
    if any(_is_dtensor(p) for p in params):
        # FSDP2 row-sharded parameters: local shards with all-reduced sums and decisions.
        implementation = _distributed().sharded_adapprox
    implementation(
        params,
        grads,
        states,
        param_indices,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        clip_threshold=clip_threshold,
        rank_min=rank_min,
        rank_max=rank_max,
        tol=tol,
        rank_rule=rank_rule,
        rank_jump=rank_jump,
        oversample=oversample,
        power_iters=power_iters,
        rank_interval=rank_interval,
        warm_start=warm_start,
        cosine_guidance=cosine_guidance,
        first_moment=first_moment,
        seed=seed,
        maximize=maximize,
    )


def _is_dtensor(t: Tensor) -> bool:
    # FSDP2 parameters are DTensors. Importing torch.distributed.tensor costs seconds, and a
    # DTensor can only exist once it is imported: look it up instead of importing it.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _distributed():
    # Imported on first use: the sharded step lives beside the DCP checkpoint helpers and
    # builds on this module's pieces; one-device runs never load it.
    from adapprox_cli import distributed

    return distributed


def _default_to_multi_tensor(params: list[Tensor]) -> bool:
    """The batched path wherever it runs: on CUDA per-matrix launches and syncs would dominate
    the loop, and on the CPU it measured 1.1-1.3x faster with fewer temporaries
    (``benchmarks/bench_step_ops.py``, 1 thread: 12 layers d=128 and 2 layers d=768)."""
    return bool(params)


def _gradient_limit(param: Tensor) -> float:
    """Largest |g| a step accepts: beyond it G^2, or V times the test matrix, overflows.

    V = G^2 (after the EMA, up to max|g|^2) must be finite and so must V @ Omega, a sum of n
    terms of |Omega| < 8: max|g|^2 * 8 n < finfo.max. Dense moments need G^2 * 8 finite.
    """
    view = matrix_view_shape(param.shape)
    fan = view[1] if view is not None else 1
    return math.sqrt(torch.finfo(_compute_dtype(param)).max / (8.0 * max(fan, 1)))


def _finite_flags(grads: list[Tensor], params: list[Tensor] | None = None) -> list[bool]:
    """Whether each gradient can be stepped on: free of NaN/Inf and below ``_gradient_limit``
    (a finite gradient of 1e19 has an infinite square), with one host sync for the whole list.

    max|g| (an inf-norm, a streaming reduction without a full-size mask) is NaN for a NaN
    gradient, inf for an infinite one, and compares false against the limit in both cases.
    """
    if not grads:
        return []
    return _step_gate(grads, params if params is not None else grads).tolist()


def _step_gate(grads: list[Tensor], params: list[Tensor]) -> Tensor:
    """Device-side skip-or-apply flags, one per gradient (True: step this parameter).

    max|g| / limit <= 1 for the whole list in four foreach/stack ops; empty gradients pass.
    """
    device = grads[0].device
    flags = torch.ones(len(grads), dtype=torch.bool, device=device)
    present = [i for i, g in enumerate(grads) if g.numel()]
    if not present:
        return flags
    amax = torch._foreach_norm([grads[i] for i in present], math.inf)
    scaled = torch._foreach_mul(amax, [1.0 / _gradient_limit(params[i]) for i in present])
    # NaN compares false: a NaN or Inf gradient fails like an overflowing one.
    ok = torch.stack([s.to(device=device, dtype=torch.float64) for s in scaled]) <= 1.0
    return flags.index_copy(0, torch.tensor(present, device=device), ok) if len(present) < len(grads) else ok


def _warn_skipped(index: int, param: Tensor) -> None:
    warnings.warn(
        f"Adapprox: gradient of parameter {index} (shape {tuple(param.shape)}) holds NaN or Inf "
        "(or overflows when squared); its step is skipped and its state left unchanged",
        RuntimeWarning,
        stacklevel=5,
    )


def _clip_(update: Tensor, clip_threshold: float | None) -> Tensor:
    """update / max(1, RMS(update) / d), in place and without a host sync."""
    if clip_threshold is None or math.isinf(clip_threshold) or update.numel() == 0:
        return update
    rms = torch.linalg.vector_norm(update) / math.sqrt(update.numel())
    return update.div_(torch.clamp(rms / clip_threshold, min=1.0))


def _cosine_scale(update: Tensor, previous_moment: Tensor) -> Tensor:
    """(1 + cos(update, M_{t-1})) / 2; 1 when M_{t-1} is zero (nothing to be guided by)."""
    prev = previous_moment.to(update.dtype)
    dot = torch.sum(update * prev)
    norms = torch.linalg.vector_norm(update) * torch.linalg.vector_norm(prev)
    cosine = torch.where(
        norms > 0, dot / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.ones_like(dot)
    )
    return (1.0 + cosine) / 2.0


def _rebuild_second_moment(g2d: Tensor, q_prev: Tensor, u_prev: Tensor, beta2: float) -> Tensor:
    """V = beta2 max(Q U^T, 0) + (1 - beta2) G^2, dense, for one matrix.

    [paper] rebuild V densely (one matrix at a time); [decided] clamp Q U^T at 0.
    max(beta2 Q U^T + c, c) = beta2 max(Q U^T, 0) + c with c = (1 - beta2) G^2: the clamp
    folds into one fused matrix product and one pass.
    """
    fresh = g2d.square().mul_(1.0 - beta2)
    v = torch.addmm(fresh, q_prev, u_prev.T, alpha=beta2)
    torch.maximum(v, fresh, out=v)
    return v


# --------------------------------------------------------------------------- dense-EMA sketch
# [decided] rank_rule="dense": S_t = D_t Omega is kept exactly for the dense EMA D_t Adam would
# hold, on the smaller side of the matrix (S = D^T Omega for a tall one), so it stores
# DENSE_SKETCH_COLUMNS * min(m, n) numbers; lowrank.sketched_distances turns it into the
# distance of every candidate rank (lowrank section "rank rule: distance to the dense EMA").


def _next_dense_sketch(
    sketch: Tensor | None, g2d: Tensor, v: Tensor, omega: Tensor, beta2: float
) -> tuple[Tensor, bool]:
    """(S_t, started): the sketch after this step's gradient, out of place (the step is atomic).

    Without a sketch (a fresh state, or one saved without it) the dense EMA starts from the
    factored moment, D_{t-1} = max(Q U^T, 0): then D_t = V_t exactly, so S_t = V_t Omega.
    """
    if sketch is None:
        return moment_sketch(v, omega), True
    tall = g2d.shape[0] > g2d.shape[1]
    g2 = g2d.square()
    return torch.addmm(sketch, g2.mT if tall else g2, omega, beta=beta2, alpha=1.0 - beta2), False


def _distances_to_dense(
    sketch: Tensor, q_s: Tensor, u_s: Tensor, s: Tensor, omega: Tensor, frobenius_sq: Tensor, tall: bool
) -> Tensor:
    """Estimated ||D_t - Q_r U_r^T|| / ||D_t|| for every r <= width (one matrix or a stack).

    The denominator uses ||V_t||_F (exact, already needed by S-RSI). A tall matrix's sketch
    lives on its short side: V^T ~ Z (Q S)^T with Z = U / S orthonormal, the factors' roles swapped.
    """
    if tall:
        safe = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-2)
        return _sketched_distances(sketch, u_s / safe, q_s * s.unsqueeze(-2), omega, frobenius_sq)
    return _sketched_distances(sketch, q_s, u_s, omega, frobenius_sq)


def _single_tensor_adapprox(
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
    rank_rule: str,
    rank_jump: bool,
    oversample: int,
    power_iters: int,
    rank_interval: int,
    warm_start: bool,
    cosine_guidance: bool,
    first_moment: str,
    seed: int,
    maximize: bool,
) -> None:
    finite = _finite_flags(grads, params)
    # Phase 1 runs every decomposition (the only calls that can raise) and writes nothing;
    # V is rebuilt again in phase 3 rather than kept, so at most one m x n V lives at a time.
    sketches: dict[int, tuple[Tensor, Tensor]] = {}
    dense_sketches: dict[int, Tensor] = {}
    # Rank choices wait for one sync after phase 1: (position, errors, current rank, k_max, jump).
    pending_ranks: list[tuple[int, Tensor, int, int, bool]] = []
    stepped: list[int] = []
    for position, (param, grad, state, index, is_finite) in enumerate(
        zip(params, grads, states, param_indices, finite)
    ):
        if not is_finite:
            _warn_skipped(index, param)
            continue
        stepped.append(position)
        if param.numel() == 0 or "exp_avg_sq_q" not in state:
            continue
        step = int(state["step"].item()) + 1  # a CPU tensor: no device sync
        m, n = matrix_view_shape(param.shape)
        g2d = _gradient_in_compute_dtype(grad, param, maximize).reshape(m, n)
        q_prev, u_prev = state["exp_avg_sq_q"], state["exp_avg_sq_u"]
        v = _rebuild_second_moment(g2d, q_prev, u_prev, beta2)
        current_rank = q_prev.shape[1]
        k_max = rank_cap(m, n, rank_max)
        evaluate, jump = (step - 1) % rank_interval == 0, False
        if rank_rule == "dense":
            omega = moment_sketch_test_matrix(m, n, seed=seed, index=index, dtype=v.dtype, device=v.device)
            dense_sketches[position], started = _next_dense_sketch(
                state.get("exp_avg_sq_sketch"), g2d, v, omega, beta2
            )
            # A new sketch is evaluated at once (whatever rank_interval) and may jump.
            evaluate, jump = evaluate or started, started and rank_jump
        # [decided] The test matrix is a pure function of (seed, parameter index, step): a
        # resumed run draws exactly what the uninterrupted one drew, without stored generators.
        generator = seeded_generator(seed, index, step, device=v.device)
        warm = q_prev if warm_start and step > 1 else None
        sketch_rank = k_max if jump else min(current_rank, k_max)
        frobenius_sq = _frobenius_sq(v)
        q_s, u_s, s, errors = _srsi(v, sketch_rank, oversample, power_iters, generator, warm, frobenius_sq)
        del v
        if evaluate:
            if rank_rule == "dense":
                errors = _distances_to_dense(
                    dense_sketches[position], q_s, u_s, s, omega, frobenius_sq, tall=m > n
                )
            pending_ranks.append((position, errors, current_rank, k_max, jump))
            sketches[position] = (q_s, u_s)
        else:
            k = min(current_rank, k_max, q_s.shape[1])
            sketches[position] = (q_s[:, :k], u_s[:, :k])

    # Phase 2: the rank choices (one host read).
    for (position, *_), k in zip(
        pending_ranks, _rank_choices(pending_ranks, rank_min=rank_min, oversample=oversample, tol=tol)
    ):
        q_s, u_s = sketches[position]
        sketches[position] = (q_s[:, :k], u_s[:, :k])

    # Phase 3: the update, elementwise ops only.
    for position in stepped:
        param, grad, state = params[position], grads[position], states[position]
        # Out of place: a state dict loaded without a deep copy shares this tensor with its source.
        state["step"] = state["step"] + 1
        if param.numel() == 0:
            continue
        compute_dtype = _compute_dtype(param)
        g = _gradient_in_compute_dtype(grad, param, maximize)
        if "exp_avg_sq_q" in state:
            m, n = matrix_view_shape(param.shape)
            v = _rebuild_second_moment(g.reshape(m, n), state["exp_avg_sq_q"], state["exp_avg_sq_u"], beta2)
            q_new, u_new = sketches[position]
            state["exp_avg_sq_q"] = q_new.contiguous()
            state["exp_avg_sq_u"] = u_new.contiguous()
            _commit_dense_sketch(state, dense_sketches.get(position))
            denom = v.sqrt_().add_(eps).reshape(param.shape)
            del v
        else:
            exp_avg_sq = state["exp_avg_sq"]
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = exp_avg_sq.sqrt().add_(eps)

        # The quotient overwrites the denominator (a temporary) unless cosine guidance needs it.
        out = None if cosine_guidance else denom
        if beta1 > 0:
            exp_avg = state["exp_avg"]
            previous = exp_avg.clone() if cosine_guidance else None
            if first_moment == "gradient":
                # Adam's form: average the gradient, then precondition and clip the average.
                exp_avg.lerp_(g.to(exp_avg.dtype), 1.0 - beta1)
                update = _clip_(torch.div(exp_avg.to(compute_dtype), denom, out=out), clip_threshold)
            else:
                # Adafactor/CAME's form: average the clipped, preconditioned update.
                clipped = _clip_(torch.div(g, denom, out=out), clip_threshold)
                exp_avg.lerp_(clipped.to(exp_avg.dtype), 1.0 - beta1)
                update = exp_avg.to(compute_dtype)
            if previous is not None:
                update = update * _cosine_scale(_clip_(g / denom, clip_threshold), previous)
        else:
            update = _clip_(torch.div(g, denom, out=out), clip_threshold)

        # [paper] decoupled weight decay: W <- W - lr (D + wd W).
        if weight_decay != 0:
            param.mul_(1.0 - lr * weight_decay)
        param.add_(update.to(param.dtype), alpha=-lr)


def _commit_dense_sketch(state: dict[str, Tensor], sketch: Tensor | None) -> None:
    if sketch is not None:
        state["exp_avg_sq_sketch"] = sketch
    else:
        # rank_rule="step" keeps no sketch; one left from a "dense" run would go stale.
        state.pop("exp_avg_sq_sketch", None)


def _gradient_in_compute_dtype(grad: Tensor, param: Tensor, maximize: bool) -> Tensor:
    g = grad.to(_compute_dtype(param))
    return -g if maximize else g


def _rank_choices(
    pending: list[tuple[Any, Tensor, int, int, bool]],
    *,
    rank_min: int,
    oversample: int,
    tol: float,
    errors_on_host: list[list[float]] | None = None,
) -> list[int]:
    """Rank selection for every matrix re-evaluated this step, with one host sync (none when
    the caller already read the errors: ``errors_on_host``). ``errors`` are the sketched
    distances to the dense EMA (rank_rule "dense") or one step's truncation errors ("step");
    the search is the same (``lowrank.dense_ema_rank``; without a jump it is ``adaptive_rank``)."""
    if not pending:
        return []
    if errors_on_host is None:
        flat = torch.cat([entry[1].to(torch.float64) for entry in pending]).tolist()
        errors_on_host, offset = [], 0
        for entry in pending:
            errors_on_host.append(flat[offset : offset + entry[1].shape[0]])
            offset += entry[1].shape[0]
    return [
        dense_ema_rank(
            host_errors,
            current_rank,
            rank_min=min(rank_min, k_max),
            rank_max=k_max,
            oversample=oversample,
            tol=tol,
            jump=jump,
        )
        for (_, _, current_rank, k_max, jump), host_errors in zip(pending, errors_on_host)
    ]


def _multi_tensor_adapprox(
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
    rank_rule: str,
    rank_jump: bool,
    oversample: int,
    power_iters: int,
    rank_interval: int,
    warm_start: bool,
    cosine_guidance: bool,
    first_moment: str,
    seed: int,
    maximize: bool,
) -> None:
    """The step of ``_single_tensor_adapprox`` on stacks of same-shape matrices.

    Phase 1 (no writes): skip-or-apply flags on the device; per group of factored matrices
    with the same (shape, dtype, device, rank, warm start), V for the whole stack by one bmm,
    then batched S-RSI (``lowrank._srsi_batched``). Phase 2: one host read, the flags and the
    errors of the matrices whose rank is re-evaluated. Phase 3: the update through foreach ops,
    with the stacked V reused in place as denominator, quotient and clipped update.
    """
    if not params:
        return
    grads_c = [_gradient_in_compute_dtype(g, p, maximize) for p, g in zip(params, grads)]
    gate = _step_gate(grads_c, params)
    steps = [int(state["step"].item()) + 1 for state in states]  # CPU tensors: no device sync

    # Phase 1: group the factored matrices and sketch each stack.
    groups: dict[tuple, list[int]] = {}
    # Per position: re-evaluate the rank this step; let that evaluation jump (a new sketch).
    evaluates = [(step - 1) % rank_interval == 0 for step in steps]
    jumps = [False] * len(params)
    for position, (param, state) in enumerate(zip(params, states)):
        if param.numel() and "exp_avg_sq_q" in state:
            q_prev = state["exp_avg_sq_q"]
            warm = warm_start and steps[position] > 1
            if rank_rule == "dense" and "exp_avg_sq_sketch" not in state:
                evaluates[position], jumps[position] = True, rank_jump
            key = (tuple(param.shape), q_prev.dtype, q_prev.device, q_prev.shape[1], warm, jumps[position])
            groups.setdefault(key, []).append(position)
    sketched = []  # (positions, V stack, Q_s, U_s, errors, current rank, k_max)
    dense_sketches: dict[int, Tensor] = {}
    for (shape, _, device, current_rank, warm, jump), positions in groups.items():
        m, n = matrix_view_shape(shape)
        q_prev = torch.stack([states[i]["exp_avg_sq_q"] for i in positions])
        u_prev = torch.stack([states[i]["exp_avg_sq_u"] for i in positions])
        # V = beta2 max(Q U^T, 0) + (1 - beta2) G^2 for the stack, built in one buffer.
        v = torch.bmm(q_prev, u_prev.mT).clamp_(min=0.0).mul_(beta2)
        g2d = [grads_c[i].reshape(m, n) for i in positions]
        torch._foreach_addcmul_(list(v.unbind(0)), g2d, g2d, value=1.0 - beta2)
        k_max = rank_cap(m, n, rank_max)
        sketch_rank = k_max if jump else min(current_rank, k_max)
        width = min(sketch_rank + oversample, m, n)
        kept = min(current_rank, width) if warm else 0
        # Drawn per matrix with the loop's rule, then stacked: the same test matrices as the loop.
        omega = torch.stack(
            [
                torch.randn(
                    n,
                    width - kept,
                    generator=seeded_generator(seed, param_indices[i], steps[i], device=device),
                    device=device,
                    dtype=v.dtype,
                )
                for i in positions
            ]
        )
        q_s, u_s, s, errors = _srsi_batched(
            v, sketch_rank, oversample, power_iters, omega, q_prev if warm else None
        )
        if rank_rule == "dense":
            # Per matrix, as in the loop (same Omega, same product): the sketches stay bitwise
            # identical between the two paths; the distances are then computed on the stack.
            omegas = [
                moment_sketch_test_matrix(
                    m, n, seed=seed, index=param_indices[i], dtype=v.dtype, device=device
                )
                for i in positions
            ]
            for row, i in enumerate(positions):
                dense_sketches[i], _ = _next_dense_sketch(
                    states[i].get("exp_avg_sq_sketch"), g2d[row], v[row], omegas[row], beta2
                )
            if any(evaluates[i] for i in positions):
                frobenius_sq = torch.linalg.vector_norm(v, dim=-1).to(torch.float64).square().sum(-1)
                errors = _distances_to_dense(
                    torch.stack([dense_sketches[i] for i in positions]),
                    q_s,
                    u_s,
                    s,
                    torch.stack(omegas),
                    frobenius_sq,
                    tall=m > n,
                )
        sketched.append((positions, v, q_s, u_s, errors, current_rank, k_max))

    # Phase 2: one host read for the flags and every rank choice of this step.
    evaluated = [
        (positions, errors)
        for positions, _, _, _, errors, _, _ in sketched
        if any(evaluates[i] for i in positions)
    ]
    first_device = gate.device
    host = torch.cat(
        [gate.to(torch.float64)] + [errors.reshape(-1).to(first_device) for _, errors in evaluated]
    ).tolist()
    ok = [flag == 1.0 for flag in host[: len(params)]]
    host_errors: dict[int, list[float]] = {}
    offset = len(params)
    for positions, errors in evaluated:
        width = errors.shape[1]
        for i in positions:
            host_errors[i] = host[offset : offset + width]
            offset += width
    for position, flag in enumerate(ok):
        if not flag:
            _warn_skipped(param_indices[position], params[position])

    # New factors per stepped matrix (committed after the update, which cannot fail).
    new_factors: dict[int, tuple[Tensor, Tensor]] = {}
    denominators: dict[int, Tensor] = {}
    for positions, v, q_s, u_s, errors, current_rank, k_max in sketched:
        v.sqrt_().add_(eps)
        for row, i in enumerate(positions):
            if not ok[i]:
                continue
            if evaluates[i]:
                (k,) = _rank_choices(
                    [(i, errors[row], current_rank, k_max, jumps[i])],
                    rank_min=rank_min,
                    oversample=oversample,
                    tol=tol,
                    errors_on_host=[host_errors[i]],
                )
            else:
                k = min(current_rank, k_max, q_s.shape[-1])
            new_factors[i] = (q_s[row, :, :k].contiguous(), u_s[row, :, :k].contiguous())
            denominators[i] = v[row].view(params[i].shape)

    # Phase 3: the update of every stepped, non-empty parameter, through foreach ops.
    stepped = [i for i in range(len(params)) if ok[i] and params[i].numel()]
    dense = [i for i in stepped if i not in denominators]
    if dense:
        exp_avg_sqs = [states[i]["exp_avg_sq"] for i in dense]
        dense_grads = [grads_c[i] for i in dense]
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, dense_grads, dense_grads, value=1.0 - beta2)
        for i, denom in zip(dense, torch._foreach_sqrt(exp_avg_sqs)):
            denominators[i] = denom.add_(eps)
    if stepped:
        p_list = [params[i] for i in stepped]
        g_list = [grads_c[i] for i in stepped]
        # From here on d_list holds 1 / denom, then the (clipped) update: no new full buffers.
        d_list = [denominators[i] for i in stepped]
        torch._foreach_reciprocal_(d_list)
        if beta1 > 0:
            m_list = [states[i]["exp_avg"] for i in stepped]
            if first_moment == "gradient":
                torch._foreach_lerp_(m_list, _cast_like(g_list, m_list), 1.0 - beta1)
                torch._foreach_mul_(d_list, _cast_like(m_list, d_list))
                _foreach_clip_(d_list, clip_threshold)
                updates = d_list
            else:
                torch._foreach_mul_(d_list, g_list)
                _foreach_clip_(d_list, clip_threshold)
                torch._foreach_lerp_(m_list, _cast_like(d_list, m_list), 1.0 - beta1)
                updates = m_list
        else:
            torch._foreach_mul_(d_list, g_list)
            _foreach_clip_(d_list, clip_threshold)
            updates = d_list
        # [paper] decoupled weight decay: W <- W - lr (D + wd W).
        if weight_decay != 0:
            torch._foreach_mul_(p_list, 1.0 - lr * weight_decay)
        torch._foreach_add_(p_list, _cast_like(updates, p_list), alpha=-lr)

    for position, flag in enumerate(ok):
        if not flag:
            continue
        state = states[position]
        state["step"] = state["step"] + 1
        if position in new_factors:
            state["exp_avg_sq_q"], state["exp_avg_sq_u"] = new_factors[position]
            _commit_dense_sketch(state, dense_sketches.get(position))


def _cast_like(tensors: list[Tensor], like: list[Tensor]) -> list[Tensor]:
    return [t if t.dtype == ref.dtype else t.to(ref.dtype) for t, ref in zip(tensors, like)]


def _foreach_clip_(updates: list[Tensor], clip_threshold: float | None) -> None:
    """``_clip_`` for a list: update / max(1, RMS(update) / d), in place, without a host sync."""
    if clip_threshold is None or math.isinf(clip_threshold) or not updates:
        return
    norms = torch._foreach_norm(updates)
    scales = torch._foreach_mul(norms, [1.0 / (math.sqrt(u.numel()) * clip_threshold) for u in updates])
    torch._foreach_clamp_min_(scales, 1.0)
    torch._foreach_div_(updates, scales)
