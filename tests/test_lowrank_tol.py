"""The dense-EMA rank rule: sketch maths against exact distances and a dense shadow EMA."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from adapprox_cli import lowrank


def _nonnegative(m: int, n: int, seed: int, rank: int = 3, noise: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    signal = torch.rand(m, rank, generator=g, dtype=torch.float64) @ torch.rand(
        rank, n, generator=g, dtype=torch.float64
    )
    return signal + noise * torch.rand(m, n, generator=g, dtype=torch.float64)


def _factors_near(d: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of a perturbed D, as the optimizer holds them (not D's own truncation)."""
    g = torch.Generator().manual_seed(seed + 1)
    v = d + 0.05 * torch.rand(d.shape, generator=g, dtype=torch.float64)
    q, u, _, _ = lowrank._srsi(v, 6, 4, 2, torch.Generator().manual_seed(seed), None)
    return q, u


def _exact_distances(d: torch.Tensor, q: torch.Tensor, u: torch.Tensor, clamp: bool = False) -> list[float]:
    out = []
    for r in range(1, q.shape[1] + 1):
        approx = q[:, :r] @ u[:, :r].T
        if clamp:
            approx = approx.clamp(min=0.0)
        out.append(float(torch.linalg.matrix_norm(d - approx) / torch.linalg.matrix_norm(d)))
    return out


def test_identity_test_matrix_gives_the_exact_distance_of_every_rank():
    d = _nonnegative(30, 20, seed=0)
    q, u = _factors_near(d, seed=0)
    estimated = lowrank.sketched_distances(d, q, u, torch.eye(20, dtype=torch.float64))
    assert estimated.tolist() == pytest.approx(_exact_distances(d, q, u), rel=1e-10)
    # With a given norm the denominator is sqrt(c * norm_sq), c = 20 identity columns here.
    with_norm = lowrank.sketched_distances(
        d,
        q,
        u,
        torch.eye(20, dtype=torch.float64),
        dense_frobenius_sq=torch.linalg.matrix_norm(d).square() / 20,
    )
    assert with_norm.tolist() == pytest.approx(_exact_distances(d, q, u), rel=1e-10)


def test_transposed_sketch_of_a_tall_matrix_gives_the_same_distances():
    d = _nonnegative(40, 16, seed=1)
    q, u = _factors_near(d, seed=1)
    s = u.norm(dim=0)
    transposed = lowrank.sketched_distances(
        d.T.contiguous(), u / s, q * s, torch.eye(40, dtype=torch.float64)
    )
    assert transposed.tolist() == pytest.approx(_exact_distances(d, q, u), rel=1e-9)


def test_estimate_ignoring_the_clamp_bounds_the_clamped_distance():
    d = _nonnegative(25, 25, seed=2, noise=1.0).pow(4)  # heavy-tailed: truncations dip below 0
    q, u = _factors_near(d, seed=2)
    assert bool(((q[:, :2] @ u[:, :2].T) < 0).any())  # the clamp has something to do here
    estimated = lowrank.sketched_distances(d, q, u, torch.eye(25, dtype=torch.float64)).tolist()
    clamped = _exact_distances(d, q, u, clamp=True)
    assert all(c <= e + 1e-12 for c, e in zip(clamped, estimated))


def test_sketch_update_equals_the_dense_shadow_ema_times_omega():
    m, n, beta2 = 24, 18, 0.95
    omega = lowrank.dense_sketch_test_matrix(n, 4, seed=3, keys=(7,))
    assert torch.equal(omega, lowrank.dense_sketch_test_matrix(n, 4, seed=3, keys=(7,)))  # regenerable
    assert not torch.equal(omega, lowrank.dense_sketch_test_matrix(n, 4, seed=3, keys=(8,)))
    shadow = _nonnegative(m, n, seed=3).float()
    sketch = lowrank.dense_sketch(shadow, omega)
    g = torch.Generator().manual_seed(3)
    for _ in range(60):
        grad = torch.randn(m, n, generator=g)
        shadow.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        lowrank.update_dense_sketch(sketch, grad, omega, beta2)
    torch.testing.assert_close(sketch, shadow @ omega, rtol=1e-5, atol=1e-5)


def test_gaussian_sketch_estimates_the_distance_to_within_its_sampling_error():
    m, n, c = 60, 50, 64
    d = _nonnegative(m, n, seed=4, rank=4, noise=0.5)
    q, u = _factors_near(d, seed=4)
    exact = _exact_distances(d, q, u)
    omega = lowrank.dense_sketch_test_matrix(n, c, seed=4, dtype=torch.float64)
    norm_sq = torch.linalg.matrix_norm(d).square()
    estimated = lowrank.sketched_distances(d @ omega, q, u, omega, dense_frobenius_sq=norm_sq).tolist()
    # c = 64 columns: relative sampling error ~ 1 / sqrt(2 c) = 9% for a spread residual.
    for r in range(2, len(exact) + 1):
        assert estimated[r - 1] == pytest.approx(exact[r - 1], rel=0.3)


def test_zero_dense_moment_is_met_only_by_zero_factors():
    omega = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    zeros = torch.zeros(4, 3, dtype=torch.float64)
    q = torch.linalg.qr(torch.randn(4, 2, dtype=torch.float64)).Q
    assert lowrank.sketched_distances(zeros, q, torch.zeros(5, 2, dtype=torch.float64), omega).tolist() == [
        0.0,
        0.0,
    ]
    far = lowrank.sketched_distances(zeros, q, torch.ones(5, 2, dtype=torch.float64), omega)
    assert all(math.isinf(x) for x in far.tolist())


def test_shapes_that_do_not_fit_are_refused_with_the_shapes():
    q, u = torch.zeros(4, 2), torch.zeros(5, 2)
    with pytest.raises(ValueError, match=r"\(4, c\)"):
        lowrank.sketched_distances(torch.zeros(3, 2), q, u, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="omega"):
        lowrank.dense_sketch(torch.zeros(4, 5), torch.zeros(4, 2))


def test_dense_ema_rank_grows_by_p_or_jumps_and_respects_the_bounds():
    distances = [0.9, 0.5, 0.3, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01]
    kwargs = dict(rank_min=1, rank_max=9, oversample=2, tol=0.04)
    assert lowrank.dense_ema_rank(distances, 1, **kwargs) == 3  # top of 1 + p, none qualifies
    assert lowrank.dense_ema_rank(distances, 1, jump=True, **kwargs) == 7  # the rank the rule asks for
    assert lowrank.dense_ema_rank(distances, 8, **kwargs) == 7  # shrinks at once
    assert lowrank.dense_ema_rank(distances, 1, jump=True, **{**kwargs, "tol": 0.001}) == 9  # capped at k_max
    assert lowrank.dense_ema_rank(distances, 8, **{**kwargs, "rank_min": 8}) == 8


def _simulate(rule: str, tol: float, steps: int = 150, seed: int = 5) -> tuple[list[float], list[int]]:
    """The optimizer's factored EMA (rebuild, clamp, warm-started S-RSI, rank rule) vs a dense shadow."""
    m, n, beta2, p, k_max = 48, 40, 0.95, 3, 12
    g = torch.Generator().manual_seed(seed)
    left, right = torch.randn(m, 6, generator=g), torch.randn(6, n, generator=g)
    omega = lowrank.dense_sketch_test_matrix(n, 4, seed=seed, keys=(0,))
    q, u = torch.zeros(m, 1), torch.zeros(n, 1)
    dense = torch.zeros(m, n, dtype=torch.float64)
    sketch = torch.zeros(m, 4)
    distances, ranks = [], []
    for step in range(1, steps + 1):
        # A gradient whose structure rotates slowly: the regime where re-truncation drifts.
        angle = 0.1 * step
        mix = math.cos(angle) * left[:, :3] + math.sin(angle) * left[:, 3:]
        grad = (mix @ right[:3] + 0.3 * torch.randn(m, n, generator=g)) * (1 + torch.arange(n) / n)
        dense.mul_(beta2).addcmul_(grad.double(), grad.double(), value=1 - beta2)
        lowrank.update_dense_sketch(sketch, grad, omega, beta2)
        fresh = grad.square().mul_(1 - beta2)
        v = torch.maximum(torch.addmm(fresh, q, u.T, alpha=beta2), fresh)
        warm = q if step > 1 else None
        q_s, u_s, _, errors = lowrank._srsi(
            v, min(q.shape[1], k_max), p, 1, lowrank.seeded_generator(seed, 0, step), warm
        )
        if rule == "today":
            k = lowrank.adaptive_rank(errors, q.shape[1], rank_min=1, rank_max=k_max, oversample=p, tol=tol)
        else:
            estimated = lowrank.sketched_distances(
                sketch, q_s, u_s, omega, dense_frobenius_sq=lowrank._frobenius_sq(v)
            )
            k = lowrank.dense_ema_rank(
                estimated, q.shape[1], rank_min=1, rank_max=k_max, oversample=p, tol=tol, jump=step == 1
            )
        q, u = q_s[:, :k], u_s[:, :k]
        distances.append(lowrank.relative_error(dense, (q @ u.T).double().clamp(min=0.0)))
        ranks.append(k)
    return distances, ranks


def test_sketch_rule_holds_the_distance_to_the_dense_shadow_where_todays_rule_drifts():
    tol = 0.1
    today, _ = _simulate("today", tol)
    sketch, ranks = _simulate("sketch", tol)
    assert statistics.median(today[30:]) > 1.25 * tol  # measured 1.37 x tol
    assert statistics.median(sketch[30:]) <= 1.3 * tol  # measured 0.83 x tol
    assert max(ranks) <= 12


def test_sketch_test_matrix_key_differs_from_every_step_and_convert_draw():
    omega = lowrank.dense_sketch_test_matrix(16, 4, seed=0, keys=(3, lowrank.DENSE_SKETCH_KEY))
    for keys in [(3,), *((3, step) for step in range(1, 50))]:
        draw = torch.randn(16, 4, generator=lowrank.seeded_generator(0, *keys))
        assert not torch.equal(omega, draw)
