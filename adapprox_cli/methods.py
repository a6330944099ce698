"""The registry of second-moment approximation methods, behind one small interface.

Each method turns a matrix V into an approximation Ṽ, and says how many numbers it stores.
``compare`` loops over ``METHODS``; adding a method is one function and one registry entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from adapprox_cli import lowrank

__all__ = ["METHODS", "Approximation", "ApproximationMethod", "ApproximationSettings", "approximate"]


@dataclass(frozen=True)
class ApproximationSettings:
    """Knobs the methods read; each method ignores the ones that do not apply to it."""

    rank: int = 5
    oversample: int = 5
    power_iters: int = 5
    generator: torch.Generator | None = None
    adam_mini_block: str = "row"  # "row" | "head" | "tensor"
    num_heads: int | None = None


@dataclass(frozen=True)
class Approximation:
    method: str
    reconstruction: Tensor
    numbers_stored: int
    relative_error: float
    seconds: float
    rank: int | None = None  # for low-rank methods


@dataclass(frozen=True)
class ApproximationMethod:
    name: str
    description: str
    # (V, settings) -> (reconstruction, numbers stored, rank or None)
    run: Callable[[Tensor, ApproximationSettings], tuple[Tensor, int, int | None]] = field(repr=False)


def _low_rank(factors: lowrank.LowRankFactors) -> tuple[Tensor, int, int | None]:
    return factors.reconstruct(), factors.numbers_stored(), factors.rank


def _rows_plus_cols(v: Tensor) -> int:
    return v.shape[0] + v.shape[1]


def _adam_mini_numbers(v: Tensor, s: ApproximationSettings) -> int:
    return {"row": v.shape[0], "head": s.num_heads or 1, "tensor": 1}[s.adam_mini_block]


METHODS: dict[str, ApproximationMethod] = {
    m.name: m
    for m in [
        ApproximationMethod(
            "svd",
            "exact truncated SVD at the rank: the Eckart-Young optimum, the floor for every method",
            lambda v, s: _low_rank(lowrank.truncated_svd(v, s.rank)),
        ),
        ApproximationMethod(
            "srsi",
            "S-RSI (Adapprox's randomized subspace iteration) at the rank, with oversampling and power iterations",
            lambda v, s: _low_rank(
                lowrank.srsi(
                    v, s.rank, oversample=s.oversample, power_iters=s.power_iters, generator=s.generator
                )
            ),
        ),
        ApproximationMethod(
            "svd_lowrank",
            "torch.svd_lowrank (Halko et al.) at the rank, same oversampling and iterations",
            lambda v, s: _low_rank(
                lowrank.svd_lowrank(
                    v, s.rank, oversample=s.oversample, power_iters=s.power_iters, generator=s.generator
                )
            ),
        ),
        ApproximationMethod(
            "adafactor",
            "Adafactor / CAME / AdaLomo rank-1: row and column means, r c^T / mean(r)",
            lambda v, s: (lowrank.adafactor_rank1(v), _rows_plus_cols(v), 1),
        ),
        ApproximationMethod(
            "smmf",
            "SMMF: square-matricized rank-1 NNMF of the whole tensor",
            lambda v, s: (lowrank.smmf_rank1(v), sum(lowrank.square_matricize_shape(v.numel())), 1),
        ),
        ApproximationMethod(
            "adam_mini",
            "Adam-mini: one mean per block (row, head or tensor)",
            lambda v, s: (
                lowrank.adam_mini_blocks(v, s.adam_mini_block, s.num_heads),
                _adam_mini_numbers(v, s),
                None,
            ),
        ),
        ApproximationMethod(
            "sm3",
            "SM3: row and column maxima, min over the cover (an upper bound)",
            lambda v, s: (lowrank.sm3_cover(v), _rows_plus_cols(v), None),
        ),
    ]
}


def approximate(name: str, v: Tensor, settings: ApproximationSettings) -> Approximation:
    """Run one registered method on V and measure its relative error and wall time."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if v.device.type == "cuda":
        torch.cuda.synchronize(v.device)
    start = time.perf_counter()
    reconstruction, stored, rank = METHODS[name].run(v, settings)
    if v.device.type == "cuda":
        torch.cuda.synchronize(v.device)
    seconds = time.perf_counter() - start
    return Approximation(
        method=name,
        reconstruction=reconstruction,
        numbers_stored=stored,
        relative_error=lowrank.relative_error(v, reconstruction),
        seconds=seconds,
        rank=rank,
    )
