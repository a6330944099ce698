"""Synthetic second moments and their ground truth (plain float64 SVDs) for the analysis tests."""

from __future__ import annotations

import math

import torch


def second_moment(
    m: int, n: int, seed: int, *, rank: int = 3, steps: int = 4, noise: float = 0.4
) -> torch.Tensor:
    """(1 - b2) sum b2^t g_t^2 over gradients with row/column scales, a low-rank part and noise."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.exp(torch.randn(m, 1, generator=g, dtype=torch.float64) * 0.7)
    cols = torch.exp(torch.randn(1, n, generator=g, dtype=torch.float64) * 0.5)
    v = torch.zeros(m, n, dtype=torch.float64)
    for _ in range(steps):
        low = torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(
            rank, n, generator=g, dtype=torch.float64
        )
        grad = (
            (low / math.sqrt(rank) + noise * torch.randn(m, n, generator=g, dtype=torch.float64))
            * rows
            * cols
        )
        v = 0.95 * v + 0.05 * grad.square()
    return v


def sample_moments() -> list[tuple[str, torch.Tensor]]:
    """Three GPT-2-like matrices, a bias (a vector: no spectrum) and a 4-d convolution kernel."""
    return [
        ("transformer.h.0.mlp.c_fc.weight", second_moment(120, 40, 1)),
        ("transformer.h.0.mlp.c_proj.weight", second_moment(40, 120, 2)),
        ("transformer.h.0.attn.c_attn.weight", second_moment(96, 32, 3, noise=0.1)),
        ("transformer.h.0.mlp.c_fc.bias", torch.rand(120, dtype=torch.float64)),
        ("conv.weight", second_moment(8, 36, 4).reshape(8, 4, 3, 3)),
    ]


def truth(v: torch.Tensor) -> dict:
    """Everything ``spectrum`` reports, from torch.linalg.svd in float64, computed plainly."""
    v = v.reshape(v.shape[0], -1).double()
    s = torch.linalg.svd(v, full_matrices=False).S
    fro2 = float(v.square().sum())
    s2 = s.square().tolist()
    tail = [math.sqrt(max(sum(s2[r:]), 0.0) / fro2) for r in range(len(s2) + 1)]  # tail[r]: error at rank r
    head = [sum(s2[:k]) / fro2 for k in range(len(s2) + 1)]
    return dict(
        s=s,
        fro2=fro2,
        stable_rank=fro2 / s2[0],
        tail=tail,
        energy={k: head[min(k, len(s2))] for k in (1, 5, 20)},
        rank_99=next(r for r in range(1, len(s2) + 1) if head[r] >= 0.99),
        rank_for={t: next(r for r in range(1, len(s2) + 1) if tail[r] <= t) for t in (0.1, 0.05, 0.01)},
    )
