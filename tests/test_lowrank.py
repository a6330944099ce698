"""lowrank.py against ground truth: exact SVD (Eckart-Young), hand-computed peers, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapprox_cli import lowrank


def second_moment(m: int, n: int, rank: int = 6, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """A non-negative matrix shaped like a real Adam second moment: an EMA of squared gradients
    whose rows and columns carry different scales, plus noise (decaying spectrum)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.zeros(m, n, dtype=dtype)
    row_scale = torch.rand(m, 1, generator=g, dtype=dtype) * 3
    col_scale = torch.rand(1, n, generator=g, dtype=dtype) * 3
    for _ in range(20):
        grad = (
            torch.randn(m, rank, generator=g, dtype=dtype) @ torch.randn(rank, n, generator=g, dtype=dtype)
        ) / rank
        grad = grad * row_scale * col_scale + 0.05 * torch.randn(m, n, generator=g, dtype=dtype)
        v = 0.9 * v + 0.1 * grad.square()
    return v


def exact_error(v: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(v.double())
    return float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())


@pytest.mark.parametrize("shape", [(120, 40), (40, 120)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_srsi_matches_exact_svd_error(shape, dtype, k):
    v = second_moment(*shape, dtype=dtype)
    f = lowrank.srsi(v, k, oversample=5, power_iters=5, generator=torch.Generator().manual_seed(1))
    assert f.q.shape == (shape[0], k) and f.u.shape == (shape[1], k)
    assert f.q.dtype == dtype and f.u.dtype == dtype
    ours = lowrank.relative_error(v, f.reconstruct())
    optimum = exact_error(v, k)
    assert ours >= optimum * (1 - 1e-6)
    assert ours <= optimum * 1.01 + 1e-6
    # The free error of the returned rank equals the measured error.
    assert f.error == pytest.approx(ours, rel=1e-3, abs=1e-5)


def test_srsi_q_is_orthonormal_and_errors_match_every_rank():
    v = second_moment(80, 60)
    f = lowrank.srsi(v, 8, oversample=4, power_iters=3, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(8, dtype=v.dtype)
    torch.testing.assert_close(f.q.T @ f.q, eye, atol=1e-10, rtol=0)
    assert f.singular_values.shape == (12,)
    assert torch.all(f.relative_errors[1:] <= f.relative_errors[:-1] + 1e-12)
    # errors of ranks inside the sketch are exact for the projection onto the sketch's leading
    # directions, which with enough iterations are the true singular directions.
    truth = torch.tensor([exact_error(v, r) for r in range(1, 13)], dtype=torch.float64)
    torch.testing.assert_close(f.relative_errors[:8], truth[:8], rtol=1e-3, atol=1e-8)


def test_truncated_svd_is_eckart_young_optimum():
    v = second_moment(50, 30)
    for k in (1, 3, 10, 30):
        f = lowrank.truncated_svd(v, k)
        assert lowrank.relative_error(v, f.reconstruct()) == pytest.approx(exact_error(v, k), abs=1e-12)
    assert len(f.relative_errors) == 30 and float(f.relative_errors[-1]) == pytest.approx(0, abs=1e-7)


def test_svd_lowrank_wrapper_is_reproducible_and_leaves_global_rng_alone():
    v = second_moment(70, 50)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = lowrank.svd_lowrank(v, 4, generator=torch.Generator().manual_seed(5))
    b = lowrank.svd_lowrank(v, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a.q, b.q) and torch.equal(a.u, b.u)
    assert lowrank.relative_error(v, a.reconstruct()) <= exact_error(v, 4) * 1.05


def test_warm_start_reaches_exact_error_with_one_iteration():
    v = second_moment(90, 70)
    cold = lowrank.srsi(v, 5, power_iters=5, generator=torch.Generator().manual_seed(0))
    # The next "step": V changes slightly; start from the previous basis with a single round.
    v_next = 0.999 * v + 0.001 * second_moment(90, 70, seed=7)
    warm = lowrank.srsi(
        v_next, 5, power_iters=1, warm_start=cold.q, generator=torch.Generator().manual_seed(1)
    )
    assert lowrank.relative_error(v_next, warm.reconstruct()) <= exact_error(v_next, 5) * 1.01


def test_seeded_srsi_is_deterministic():
    v = second_moment(40, 30, dtype=torch.float32)
    a = lowrank.srsi(v, 3, generator=torch.Generator().manual_seed(9))
    b = lowrank.srsi(v, 3, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a.q, b.q) and torch.equal(a.u, b.u)


def test_adaptive_rank_rule():
    errors = [0.5, 0.2, 0.09, 0.04, 0.01, 0.005, 0.001]
    # smallest r within [k_min, min(k + p, k_max)] meeting tol
    assert lowrank.adaptive_rank(errors, 2, rank_min=1, rank_max=10, oversample=5, tol=0.05) == 4
    # shrinks at once when fewer directions suffice
    assert lowrank.adaptive_rank(errors, 6, rank_min=1, rank_max=10, oversample=1, tol=0.1) == 3
    # none qualifies: grow by at most p
    assert lowrank.adaptive_rank(errors, 1, rank_min=1, rank_max=10, oversample=2, tol=1e-6) == 3
    # capped by k_max
    assert lowrank.adaptive_rank(errors, 1, rank_min=1, rank_max=2, oversample=5, tol=1e-6) == 2
    # never below k_min
    assert lowrank.adaptive_rank(errors, 1, rank_min=3, rank_max=10, oversample=5, tol=0.9) == 3


def test_as_rsi_converges_to_smallest_rank_meeting_tol():
    v = second_moment(100, 80, rank=4)
    # a tolerance halfway between the exact errors of ranks 5 and 6: the answer is rank 6
    tol = (exact_error(v, 5) + exact_error(v, 6)) / 2
    truth = 6
    rank, warm = 1, None
    for step in range(10):
        f = lowrank.as_rsi(
            v, rank, tol=tol, rank_max=20, generator=torch.Generator().manual_seed(step), warm_start=warm
        )
        rank, warm = f.rank, f.q
    assert rank == truth
    assert f.error <= tol


def test_rank_clamps_to_matrix_size():
    v = second_moment(6, 4)
    for fn in (
        lambda: lowrank.srsi(v, 50),
        lambda: lowrank.truncated_svd(v, 50),
        lambda: lowrank.svd_lowrank(v, 50),
    ):
        f = fn()
        assert f.rank == 4
        assert lowrank.relative_error(v, f.reconstruct()) < 1e-6


@pytest.mark.parametrize("shape", [(1, 17), (17, 1), (1, 1)])
def test_vectors_as_matrices(shape):
    v = second_moment(*shape) + 0.1
    for f in (lowrank.srsi(v, 1), lowrank.truncated_svd(v, 1), lowrank.svd_lowrank(v, 1)):
        assert lowrank.relative_error(v, f.reconstruct()) < 1e-6
    assert lowrank.relative_error(v, lowrank.adafactor_rank1(v)) < 1e-12


def test_zero_matrix_gives_zero_error_and_no_nan():
    v = torch.zeros(30, 20)
    for f in (
        lowrank.srsi(v, 3),
        lowrank.truncated_svd(v, 3),
        lowrank.svd_lowrank(v, 3),
        lowrank.as_rsi(v, 1),
    ):
        assert not torch.isnan(f.q).any() and not torch.isnan(f.u).any()
        assert torch.all(f.relative_errors == 0)
        assert lowrank.relative_error(v, f.reconstruct()) == 0.0
    for approx in (
        lowrank.adafactor_rank1(v),
        lowrank.smmf_rank1(v),
        lowrank.adam_mini_blocks(v),
        lowrank.sm3_cover(v),
    ):
        assert torch.equal(approx, v)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.ones(3), "matrix"),
        (torch.ones(2, 3, 4), "matrix"),
        (torch.tensor([[1.0, float("nan")]]), "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")]]), "NaN or Inf"),
        (torch.ones(2, 2, dtype=torch.int64), "floating"),
        (torch.ones(2, 2, dtype=torch.complex64), "floating"),
    ],
)
def test_bad_input_raises_clear_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        lowrank.srsi(bad, 1)
    with pytest.raises(ValueError, match=message):
        lowrank.adafactor_rank1(bad)


@pytest.mark.parametrize("rank", [0, -1, 1.5, True])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        lowrank.srsi(torch.ones(3, 3), rank)
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        lowrank.truncated_svd(torch.ones(3, 3), rank)


def test_bf16_input_is_factored_in_float32():
    v = second_moment(20, 10, dtype=torch.float32).bfloat16()
    f = lowrank.srsi(v, 2)
    assert f.q.dtype == torch.float32


def test_adafactor_rank1_formula_and_bound():
    v = second_moment(30, 20)
    approx = lowrank.adafactor_rank1(v)
    r, c = v.mean(1), v.mean(0)
    torch.testing.assert_close(approx, torch.outer(r, c) / r.mean())
    # it preserves row and column sums exactly (the KL-optimal rank-1 NNMF property)
    torch.testing.assert_close(approx.sum(1), v.sum(1))
    torch.testing.assert_close(approx.sum(0), v.sum(0))
    assert lowrank.relative_error(v, approx) >= exact_error(v, 1) - 1e-12
    # exact for a rank-1 non-negative matrix
    outer = torch.outer(torch.rand(7, dtype=torch.float64) + 0.1, torch.rand(5, dtype=torch.float64) + 0.1)
    torch.testing.assert_close(lowrank.adafactor_rank1(outer), outer)


def test_square_matricize_matches_smmf_rule():
    # Values from SMMF's _get_effective_shape: perfect squares, largest divisor <= sqrt, primes.
    assert lowrank.square_matricize_shape(108) == (12, 9)
    assert lowrank.square_matricize_shape(1440) == (40, 36)
    assert lowrank.square_matricize_shape(10) == (5, 2)
    assert lowrank.square_matricize_shape(4) == (2, 2)
    assert lowrank.square_matricize_shape(13) == (13, 1)


def test_smmf_equals_adafactor_on_the_square_shape():
    v = second_moment(12, 12)  # numel 144 -> (12, 12): same shape, so SMMF == Adafactor here
    torch.testing.assert_close(lowrank.smmf_rank1(v), lowrank.adafactor_rank1(v))
    w = second_moment(8, 18)  # 144 -> (12, 12) reshape: differs from the 8x18 factorization
    square = w.reshape(12, 12)
    expected = (torch.outer(square.sum(1), square.sum(0)) / square.sum()).reshape(8, 18)
    torch.testing.assert_close(lowrank.smmf_rank1(w), expected)


def test_adam_mini_blocks():
    v = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    rows = lowrank.adam_mini_blocks(v, "row")
    torch.testing.assert_close(rows[:, 0], v.mean(1))
    heads = lowrank.adam_mini_blocks(v, "head", num_heads=2)
    torch.testing.assert_close(heads[0, 0], v[:2].mean())
    torch.testing.assert_close(heads[3, 5], v[2:].mean())
    whole = lowrank.adam_mini_blocks(v, "tensor")
    assert torch.all(whole == v.mean())
    with pytest.raises(ValueError, match="num_heads"):
        lowrank.adam_mini_blocks(v, "head", num_heads=3)


def test_sm3_cover_is_an_upper_bound_and_exact_where_row_and_col_max_meet():
    v = second_moment(15, 9)
    approx = lowrank.sm3_cover(v)
    assert torch.all(approx >= v)
    i = int(v.argmax() // 9)
    j = int(v.argmax() % 9)
    assert approx[i, j] == v[i, j]


def test_matrix_view_shape():
    assert lowrank.matrix_view_shape((8, 3, 3, 3)) == (8, 27)
    assert lowrank.matrix_view_shape((5, 4)) == (5, 4)
    assert lowrank.matrix_view_shape((5,)) is None
    assert lowrank.matrix_view_shape(()) is None
    assert lowrank.matrix_view_shape((0, 3)) is None and lowrank.matrix_view_shape((4, 0, 2)) is None


def test_rank_cap_and_is_factored_follow_the_memory_rule():
    assert lowrank.rank_cap(96, 48) == 12 and lowrank.rank_cap(96, 48, 100) == 48
    assert lowrank.rank_cap(96, 48, 3) == 3 and lowrank.rank_cap(2, 3) == 1
    # Factored exactly when k_max (m + n) < m n.
    assert lowrank.is_factored((96, 48)) and not lowrank.is_factored((96,))
    assert not lowrank.is_factored((2, 2)) and lowrank.is_factored((8, 8))
    assert not lowrank.is_factored((8, 8), rank_max=4) and lowrank.is_factored((8, 8), rank_max=3)
    assert not lowrank.is_factored((0, 8)) and lowrank.is_factored((8, 2, 3, 3))


@settings(max_examples=50, deadline=None)
@given(
    errors=st.lists(st.floats(0, 1), min_size=1, max_size=12),
    tol=st.floats(0, 1),
    rank_min=st.integers(1, 4),
    oversample=st.integers(1, 5),
)
def test_settled_rank_is_the_fixed_point_of_adaptive_rank(errors, tol, rank_min, oversample):
    # Ground truth: apply the optimizer's rule step after step to a matrix that stops changing.
    rank_max = len(errors)
    rank = 1
    for _ in range(4 * rank_max + 4):
        rank = lowrank.adaptive_rank(
            errors, rank, rank_min=rank_min, rank_max=rank_max, oversample=oversample, tol=tol
        )
    settled = lowrank.settled_rank(errors, rank_min=min(rank_min, rank_max), rank_max=rank_max, tol=tol)
    assert rank == (rank_max if settled is None else settled)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    k=st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
def test_srsi_never_beats_the_optimum_and_stays_close(m, n, k, seed):
    v = second_moment(m, n, rank=3, seed=seed)
    f = lowrank.srsi(v, k, oversample=5, power_iters=5, generator=torch.Generator().manual_seed(seed))
    rank = min(k, m, n)
    ours = lowrank.relative_error(v, f.reconstruct())
    optimum = exact_error(v, rank)
    assert math.isfinite(ours)
    assert ours >= optimum - 1e-9
    assert ours <= optimum * 1.01 + 1e-7


# --------------------------------------------------------------------------- batched S-RSI


@pytest.mark.parametrize("shape", [(120, 40), (40, 120)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_srsi_batched_matches_exact_svd_error(shape, dtype, k):
    """Cholesky-QR and the B B^T eigendecomposition keep S-RSI within 1.01x of the optimum."""
    vs = torch.stack([second_moment(*shape, dtype=dtype, seed=s) for s in range(3)])
    gens = [torch.Generator().manual_seed(10 + s) for s in range(3)]
    for v, f in zip(vs, lowrank.srsi_batched(vs, k, oversample=5, power_iters=5, generators=gens)):
        assert f.q.shape == (shape[0], k) and f.u.shape == (shape[1], k) and f.q.dtype == dtype
        ours = lowrank.relative_error(v, f.reconstruct())
        optimum = exact_error(v, k)
        assert optimum * (1 - 1e-6) <= ours <= optimum * 1.01 + 1e-6
        assert f.error == pytest.approx(ours, rel=1e-3, abs=1e-5)


def test_srsi_batched_equals_srsi_on_the_same_test_matrices():
    vs = torch.stack([second_moment(80, 60, seed=s) for s in range(4)])
    warm = torch.linalg.qr(
        torch.randn(4, 80, 3, dtype=vs.dtype, generator=torch.Generator().manual_seed(0))
    ).Q
    batched = lowrank.srsi_batched(
        vs,
        8,
        oversample=4,
        power_iters=3,
        generators=[torch.Generator().manual_seed(s) for s in range(4)],
        warm_start=warm,
    )
    for s, (v, f) in enumerate(zip(vs, batched)):
        loop = lowrank.srsi(
            v, 8, oversample=4, power_iters=3, generator=torch.Generator().manual_seed(s), warm_start=warm[s]
        )
        torch.testing.assert_close(f.reconstruct(), loop.reconstruct(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(f.singular_values, loop.singular_values, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(f.relative_errors, loop.relative_errors, rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(f.q.T @ f.q, torch.eye(8, dtype=v.dtype), atol=1e-12, rtol=0)


def test_cholesky_qr_is_orthonormal_for_ill_conditioned_and_rank_deficient_stacks():
    g = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(200, 6, generator=g)).Q
    scales = torch.tensor([1.0, 1e-2, 1e-4, 1e-6, 1e-7, 1e-8])
    ill = left * scales  # float32, condition number 1e8
    deficient = torch.cat([left[:, :3], left[:, :3] @ torch.randn(3, 3, generator=g)], dim=1)
    q = lowrank._cholesky_qr_batched(torch.stack([ill, deficient, torch.zeros(200, 6)]))
    assert torch.isfinite(q).all()
    # The ill-conditioned basis: orthonormal to float32 round-off, spanning the same space.
    torch.testing.assert_close(q[0].T @ q[0], torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(q[0] @ (q[0].T @ left), left, atol=1e-5, rtol=0)
    # Rank 3 of 6: the basis spans the 3 directions; the zero stack gives zero columns.
    torch.testing.assert_close(q[1] @ (q[1].T @ left[:, :3]), left[:, :3], atol=1e-5, rtol=0)
    assert float(torch.linalg.matrix_norm(q[1].T @ q[1], ord=2)) <= 1 + 1e-5
    assert torch.equal(q[2], torch.zeros(200, 6))


def test_cholesky_qr_reduce_hook_sees_every_row_gram():
    """The seam for row-sharded V: splitting the rows in two and summing the Gram matrices of
    the halves (what an all-reduce does) gives the same basis as the whole matrix."""
    y = torch.randn(2, 100, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    whole = lowrank._cholesky_qr_batched(y)
    top, bottom = y[:, :40], y[:, 40:]
    other = {"rows": bottom}

    def all_reduce(gram):  # stands in for dist.all_reduce over the two shards
        q_other = other["rows"]
        return gram + q_other.mT @ q_other

    # Shard "top" sees the other shard's rows through the hook; both passes need them.
    def sharded(y_top, y_bottom):
        q_top, q_bottom = y_top, y_bottom
        for _ in range(2):
            other["rows"] = q_bottom
            q_top_next = lowrank._cholesky_qr_batched(q_top, reduce=all_reduce, passes=1)
            other["rows"] = q_top
            q_bottom = lowrank._cholesky_qr_batched(q_bottom, reduce=all_reduce, passes=1)
            q_top = q_top_next
        return torch.cat([q_top, q_bottom], dim=1)

    torch.testing.assert_close(sharded(top, bottom), whole, rtol=0, atol=1e-12)


def test_srsi_batched_nonfinite_matrix_gives_nan_errors_not_an_exception():
    vs = torch.stack([second_moment(30, 20), second_moment(30, 20, seed=1)])
    vs[1, 2, 3] = float("nan")
    *_, errors = lowrank._srsi_batched(vs, 3, 2, 1, torch.randn(2, 20, 5, dtype=vs.dtype), None)
    assert torch.isfinite(errors[0]).all() and torch.isnan(errors[1]).all()


def test_srsi_batched_validates_its_input():
    with pytest.raises(ValueError, match="3-D"):
        lowrank.srsi_batched(torch.ones(3, 3), 1)
    with pytest.raises(ValueError, match="2 generators"):
        lowrank.srsi_batched(torch.ones(2, 3, 3), 1, generators=[torch.Generator()])
    with pytest.raises(ValueError, match="NaN or Inf"):
        lowrank.srsi_batched(torch.full((2, 3, 3), float("inf")), 1)
