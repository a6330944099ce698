"""Every approximation method of ``methods.METHODS`` on every matrix-shaped moment, with its error
relative to the Eckart-Young optimum (``adapprox compare``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

from adapprox_cli import lowrank, memory
from adapprox_cli.analysis.moments import Moment, ProgressCallback, as_moments, load_matrix, resolve_dtype
from adapprox_cli.analysis.numerics import (
    blockwise_relative_error,
    exact_squared_singular_values,
    frobenius_sq,
    tail_errors,
)
from adapprox_cli.devices import resolve_device
from adapprox_cli.errors import InputError, ParameterError
from adapprox_cli.formatting import dtype_name
from adapprox_cli.methods import METHODS, ApproximationSettings
from adapprox_cli.validation import check_at_least

__all__ = ["DEFAULT_METHODS", "CompareReport", "CompareRow", "CompareSummary", "compare_methods"]

DEFAULT_METHODS = tuple(METHODS)  # every registered method, in registry order


@dataclass
class CompareRow:
    """One method on one matrix.

    vs_optimum: relative error / the exact truncated SVD's at the same rank (>= 1 up to rounding).
    vs_rank1_optimum: relative error / the rank-1 SVD's, for methods that store at most m + n
    numbers (Adafactor, SMMF, Adam-mini, SM3, and any method at rank 1); None otherwise.
    """

    name: str
    matrix_shape: tuple[int, int]
    method: str
    rank: int | None
    relative_error: float
    numbers_stored: int
    seconds: float
    vs_optimum: float | None
    vs_rank1_optimum: float | None
    detail: str = ""  # e.g. the Adam-mini block

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["matrix_shape"] = list(self.matrix_shape)
        return d


@dataclass
class CompareSummary:
    """One method over all matrices; means weighted by each matrix's number of elements."""

    method: str
    weighted_error: float | None
    weighted_vs_optimum: float | None
    weighted_vs_rank1_optimum: float | None
    numbers_stored: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CompareReport:
    rows: list[CompareRow]
    summary: list[CompareSummary]
    optimum: list[dict[str, Any]]  # per matrix: the exact truncated-SVD errors at the rank and at rank 1
    skipped: list[str]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "rows": [r.to_dict() for r in self.rows],
            "summary": [s.to_dict() for s in self.summary],
            "optimum": self.optimum,
            "skipped": self.skipped,
        }

    @property
    def matrices(self) -> list[str]:
        return list(dict.fromkeys(r.name for r in self.rows))

    def larger_than_dense(self) -> dict[str, tuple[int, int]]:
        """Matrices whose factors at the report's rank store more numbers than the dense m x n
        state they approximate (k (m + n) > m n, at a large rank): name -> matrix shape."""
        rank = self.settings["rank"]
        return {
            r.name: r.matrix_shape
            for r in self.rows
            if r.rank == rank and r.numbers_stored > r.matrix_shape[0] * r.matrix_shape[1]
        }


def _ratio(error: float, optimum: float) -> float:
    if optimum > 0:
        return error / optimum
    return 1.0 if error == 0 else math.inf


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def compare_methods(
    moments: Iterable[tuple[str, Tensor] | Moment],
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    rank: int = 5,
    oversample: int = 5,
    power_iters: int = 5,
    exact: str = "auto",
    adam_mini_default: str = "row",
    num_heads: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> CompareReport:
    """Every method of ``methods`` (names in ``methods.METHODS``) on every matrix-shaped moment.

    The optimum at the rank (and at rank 1) is the exact truncated SVD, whose error follows from
    the singular values (Eckart-Young); ``exact`` picks how they are computed (see
    ``exact_squared_singular_values``). The "svd" row reports that optimum and the time to
    compute it. Adam-mini's block comes from the parameter name (``memory.adam_mini_block``;
    unmatched matrices get ``adam_mini_default``). Randomized methods draw from a generator
    seeded by (seed, parameter index), the same for each method.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ParameterError(
            "methods",
            f"{{name}}: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}",
        )
    check_at_least(rank, 1, "rank")
    check_at_least(oversample, 0, "oversample")
    check_at_least(power_iters, 0, "power_iters")
    if exact not in ("auto", "svd", "gram"):
        raise ParameterError("exact", f"{{name}} must be auto, svd or gram, got {exact!r}")
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    moments = as_moments(moments)
    matrices = [m for m in moments if m.matrix_shape is not None]
    if not matrices:
        raise InputError(
            "none of the selected parameters is a matrix (all are vectors or scalars); nothing to compare"
        )
    # Per matrix, the rank is clamped to its shape, the generator seeded by its index and
    # Adam-mini's block read from its name (``_run_method``).
    common = ApproximationSettings(
        rank=rank, oversample=oversample, power_iters=power_iters, num_heads=num_heads
    )
    rows: list[CompareRow] = []
    optimum: list[dict[str, Any]] = []
    for done, moment in enumerate(matrices):
        if progress:
            progress(done, len(matrices), moment.name)
        v = load_matrix(moment, dtype, device)
        fro_sq = frobenius_sq(v, moment.name)
        s2, svd_seconds = _timed(lambda v=v: exact_squared_singular_values(v, exact), device)
        errors = tail_errors(s2, fro_sq)
        m, n = v.shape
        k = min(rank, m, n)
        opt_k, opt_1 = float(errors[k]), float(errors[1])
        optimum.append(dict(name=moment.name, rank=k, error=opt_k, rank1_error=opt_1))
        for method in methods:
            if method == "svd":
                result = (opt_k, k * (m + n), svd_seconds, k, "")
            else:
                result = _run_method(
                    method, moment, v, fro_sq, replace(common, rank=k), seed, adam_mini_default
                )
            error, stored, seconds, method_rank, detail = result
            rows.append(
                CompareRow(
                    name=moment.name,
                    matrix_shape=(m, n),
                    method=method,
                    rank=method_rank,
                    relative_error=error,
                    numbers_stored=stored,
                    seconds=seconds,
                    vs_optimum=_ratio(error, opt_k),
                    vs_rank1_optimum=_ratio(error, opt_1) if stored <= m + n else None,
                    detail=detail,
                )
            )
        del v
    if progress:
        progress(len(matrices), len(matrices), "")
    numel = {m.name: math.prod(m.matrix_shape) for m in matrices}
    summary = [_summarize(method, [r for r in rows if r.method == method], numel) for method in methods]
    settings = dict(
        methods=list(methods), rank=rank, oversample=oversample, power_iters=power_iters, exact=exact,
        adam_mini_default=adam_mini_default, num_heads=num_heads, dtype=dtype_name(dtype),
        device=str(device), seed=seed,
    )  # fmt: skip
    skipped = [m.name for m in moments if m.matrix_shape is None]
    return CompareReport(rows, summary, optimum, skipped, settings)


def _run_method(
    method: str,
    moment: Moment,
    v: Tensor,
    fro_sq: float,
    common: ApproximationSettings,
    seed: int,
    adam_mini_default: str,
) -> tuple[float, int, float, int | None, str]:
    """(error, numbers stored, seconds, rank, detail) of one method on one loaded matrix."""
    heads = common.num_heads
    block = memory.adam_mini_block(moment.name, moment.shape, num_heads=heads, default=adam_mini_default)
    detail = ""
    if method == "adam_mini":
        detail = f"head x{heads}" if block == "head" else block
        if block == "full":  # a matrix named like a bias: Adam-mini keeps full Adam state for it
            return 0.0, v.numel(), 0.0, None, detail
    settings = replace(
        common,
        generator=lowrank.seeded_generator(seed, moment.index, device=v.device),
        adam_mini_block=block if block in ("row", "head", "tensor") else "row",
    )
    # The registry's methods return the dense reconstruction; the error is taken block by block
    # so that only V and one reconstruction are alive at a time.
    (reconstruction, stored, method_rank), seconds = _timed(
        lambda: METHODS[method].run(v, settings), v.device
    )
    error = blockwise_relative_error(v, reconstruction, fro_sq)
    return error, int(stored), seconds, method_rank, detail


def _weighted_mean(pairs: list[tuple[float | None, int]]) -> float | None:
    finite = [(x, w) for x, w in pairs if x is not None and math.isfinite(x)]
    weight = sum(w for _, w in finite)
    return sum(x * w for x, w in finite) / weight if weight else None


def _summarize(method: str, rows: list[CompareRow], numel: dict[str, int]) -> CompareSummary:
    return CompareSummary(
        method=method,
        weighted_error=_weighted_mean([(r.relative_error, numel[r.name]) for r in rows]),
        weighted_vs_optimum=_weighted_mean([(r.vs_optimum, numel[r.name]) for r in rows]),
        weighted_vs_rank1_optimum=_weighted_mean([(r.vs_rank1_optimum, numel[r.name]) for r in rows]),
        numbers_stored=sum(r.numbers_stored for r in rows),
        seconds=sum(r.seconds for r in rows),
    )
