"""Low-rank and factored approximations of second-moment matrices: pure functions of tensors.

Everything here takes tensors and returns tensors: no I/O, no printing, no global random state
(randomized methods take an explicit ``torch.Generator``). The optimizer, ``compare``,
``spectrum`` and ``estimate`` all call these same functions.

Public functions validate their input (a 2-D, finite, floating matrix; rank >= 1) and raise
``ValueError`` with the offending value; the private ``_srsi`` body used on the optimizer's hot
path skips those checks. Tags as in the project's algorithm notes: [paper] stated by the
Adapprox paper, [decided] this project's choice where the paper is silent.

References
- Adapprox: Zhao et al., "Adapprox: Adaptive Approximation in Adam Optimization via Randomized
  Low-Rank Matrices", arXiv:2403.14958.
- Halko, Martinsson, Tropp, "Finding structure with randomness", SIAM Review 2011 (Alg. 4.4).
- Adafactor: Shazeer & Stern 2018; SM3: Anil et al. 2019; SMMF: Park & Lee 2024;
  Adam-mini: Zhang et al. 2024.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LowRankFactors",
    "adafactor_rank1",
    "adam_mini_blocks",
    "adaptive_rank",
    "as_rsi",
    "default_rank_max",
    "dense_ema_rank",
    "dense_sketch",
    "dense_sketch_test_matrix",
    "is_factored",
    "matrix_view_shape",
    "moment_sketch",
    "moment_sketch_test_matrix",
    "rank_cap",
    "relative_error",
    "relative_errors_from_singular_values",
    "seeded_generator",
    "settled_rank",
    "sketched_distances",
    "sm3_cover",
    "smmf_rank1",
    "square_matricize_shape",
    "srsi",
    "srsi_batched",
    "svd_lowrank",
    "truncated_svd",
    "update_dense_sketch",
]


@dataclass(frozen=True)
class LowRankFactors:
    """V ~ q @ u.T, with the errors of every rank the sketch can tell.

    q: (m, k), orthonormal columns. u: (n, k), the singular values folded in.
    singular_values: the singular values of the sketched matrix (length s >= k).
    relative_errors: relative_errors[r - 1] = ||V - V_r||_F / ||V||_F for r = 1..s, where V_r is
        the best rank-r approximation inside the sketched subspace (exact for truncated SVD).
    """

    q: Tensor
    u: Tensor
    singular_values: Tensor
    relative_errors: Tensor

    @property
    def rank(self) -> int:
        return self.q.shape[1]

    @property
    def error(self) -> float:
        """Relative error at the returned rank."""
        if self.rank == 0:
            return 0.0
        return float(self.relative_errors[self.rank - 1])

    def reconstruct(self) -> Tensor:
        return self.q @ self.u.T

    def numbers_stored(self) -> int:
        return self.q.numel() + self.u.numel()


# --------------------------------------------------------------------------- validation


def _check_matrix(v: Tensor) -> Tensor:
    """Public-door validation: returns v in a compute dtype (float32/float64)."""
    if not isinstance(v, Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(v).__name__}")
    if v.ndim != 2:
        raise ValueError(
            f"expected a matrix (2-D tensor), got shape {tuple(v.shape)}; "
            "view higher-order tensors with matrix_view_shape() first"
        )
    if v.is_complex() or not v.is_floating_point():
        raise ValueError(f"expected a real floating-point matrix, got dtype {v.dtype}")
    if v.dtype not in (torch.float32, torch.float64):
        # bf16/fp16 keep ~3 significant digits: factor in float32.
        v = v.float()
    if v.numel() and not bool(torch.isfinite(v).all()):
        raise ValueError("matrix contains NaN or Inf; approximate only finite second moments")
    return v


def _check_rank(rank: int, name: str = "rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {rank!r}")
    return rank


def _check_nonnegative_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


# --------------------------------------------------------------------------- shapes


def matrix_view_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int] | None:
    """The matrix a parameter's second moment is factored as, or None when there is none.

    [decided] >2-D weights (convolutions) are viewed as (shape[0], prod(shape[1:])): output
    channels by fan-in, the layout ``nn.Conv*`` weights already have in memory. 0-D/1-D shapes
    and empty tensors give None: there is no matrix to factor (their state still counts in
    memory totals).
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2 or 0 in shape:
        return None
    return shape[0], math.prod(shape[1:])


def default_rank_max(m: int, n: int) -> int:
    """k_max = min(m, n) // 4 (at least 1): the largest rank the paper's memory numbers use."""
    return max(1, min(m, n) // 4)


def rank_cap(m: int, n: int, rank_max: int | None = None) -> int:
    """k_max of an m x n matrix: ``default_rank_max`` unless ``rank_max`` is set, never above min(m, n)."""
    return default_rank_max(m, n) if rank_max is None else min(rank_max, m, n)


# [decided] Matrices with fewer entries than this keep a dense second moment: factoring one
# saves at most about 20 numbers (a 5 x 5 stores 10 instead of 25) and costs an S-RSI every step.
MIN_FACTORED_NUMEL = 32


def is_factored(shape: tuple[int, ...] | torch.Size, rank_max: int | None = None) -> bool:
    """Whether a parameter of this shape keeps its second moment as low-rank factors.

    [decided] 2-D weights, and >2-D ones viewed as (shape[0], prod(shape[1:])), but only when
    factors at k_max store fewer numbers than the dense matrix, k_max (m + n) < m n, and the
    matrix has at least ``MIN_FACTORED_NUMEL`` (32) entries. Biases, norms, scalars and tiny
    matrices keep a dense ``exp_avg_sq``. (The dense-EMA sketch of ``rank_rule="dense"`` adds
    4 min(m, n) numbers; it is not part of this rule, so that which matrices are factored does
    not depend on the rank rule.)
    """
    view = matrix_view_shape(shape)
    if view is None:
        return False
    m, n = view
    return m * n >= MIN_FACTORED_NUMEL and rank_cap(m, n, rank_max) * (m + n) < m * n


def square_matricize_shape(numel: int) -> tuple[int, int]:
    """SMMF's most-square factor pair (rows >= cols) of ``numel``; primes give (numel, 1)."""
    if numel < 1:
        return (numel, 1) if numel == 0 else (0, 0)
    cols = math.isqrt(numel)
    while numel % cols:
        cols -= 1
    return numel // cols, cols


def seeded_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator that is a pure function of (seed, *keys), e.g. (seed, parameter index, step).

    Randomized methods draw their test matrices from it, so a run, a resumed run and a
    re-run of an analysis draw exactly the same numbers without storing generator state.
    """
    mixed = seed % (2**64)
    for key in keys:
        # splitmix64-style mixing: nearby keys give unrelated seeds
        mixed = (mixed * 0x9E3779B97F4A7C15 + (key + 1) * 0xBF58476D1CE4E5B9) % (2**64)
        mixed ^= mixed >> 31
    return torch.Generator(device=device).manual_seed(mixed % (2**63))


# --------------------------------------------------------------------------- errors


def relative_error(v: Tensor, approximation: Tensor) -> float:
    """||V - approximation||_F / ||V||_F; 0 when both are zero, inf when only V is."""
    norm = torch.linalg.matrix_norm(v.double() if v.dtype == torch.float64 else v.float())
    diff = torch.linalg.matrix_norm((v - approximation).to(norm.dtype))
    if float(norm) == 0.0:
        return 0.0 if float(diff) == 0.0 else math.inf
    return float(diff / norm)


def relative_errors_from_singular_values(frobenius_sq: Tensor, singular_values: Tensor) -> Tensor:
    """err(r) = sqrt(max(||V||^2 - sum_{i<=r} S_i^2, 0)) / ||V|| for r = 1..len(S).

    Exact for the projection onto the leading r directions of the sketch (algorithm notes
    §3.5). Computed in float64: the subtraction cancels when the error is small.
    """
    total = frobenius_sq.double()
    captured = torch.cumsum(singular_values.double().square(), 0)
    residual = torch.clamp(total - captured, min=0.0).sqrt()
    # A zero matrix is reproduced exactly by any rank: error 0, never 0/0.
    safe_norm = torch.where(total > 0, total.sqrt(), torch.ones_like(total))
    return torch.where(total > 0, residual / safe_norm, torch.zeros_like(residual))


# --------------------------------------------------------------------------- S-RSI


def _frobenius_sq(v: Tensor) -> Tensor:
    # Row norms first: no m x n temporary (v.square() would allocate a full copy), and summing
    # m partial results keeps float32 accurate where one reduction over all entries drifts.
    return torch.linalg.vector_norm(v, dim=1).square().sum()


def _orthonormal_basis(y: Tensor) -> Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def _srsi(
    v: Tensor,
    rank: int,
    oversample: int,
    power_iters: int,
    generator: torch.Generator | None,
    warm_start: Tensor | None,
    frobenius_sq: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unchecked S-RSI body: returns (Q_s, U_s, S, errors) at the full sketch width s.

    The caller slices the leading k columns; keeping all s lets the adaptive rank choose k
    after the fact without a second pass.
    """
    m, n = v.shape
    width = min(rank + oversample, m, n)
    # 1. Start basis: Gaussian directions; with a warm start, the previous factor Q plus fresh
    #    Gaussian directions for the rest ([decided]: V changes slowly between optimizer steps).
    if warm_start is not None and warm_start.shape[1] > 0:
        kept = warm_start[:, : min(warm_start.shape[1], width)].to(v.dtype)
        fresh = width - kept.shape[1]
        omega = torch.randn(n, fresh, generator=generator, device=v.device, dtype=v.dtype)
        y = torch.cat([kept, v @ omega], dim=1)
    else:
        omega = torch.randn(n, width, generator=generator, device=v.device, dtype=v.dtype)
        y = v @ omega
    q = _orthonormal_basis(y)
    # 2. Subspace iteration. [decided] Orthonormalize after each product (Halko et al. Alg. 4.4)
    #    rather than once per round: in float32, V V^T squares the singular-value ratios and
    #    would wash out every direction below sqrt(eps) of the top one.
    #    V^T Q is computed as (Q^T V)^T: the same product, but BLAS kernels for a transposed tall
    #    operand times a narrow matrix were measured 5-15x slower on CPU (benchmarks/bench_speed.py).
    for _ in range(power_iters):
        q = _orthonormal_basis(v @ _orthonormal_basis((q.T @ v).T))
    # 3. Small SVD of the projection B = Q^T V.
    b = q.T @ v
    w, s, zh = torch.linalg.svd(b, full_matrices=False)
    # 4. Rotate inside the sketched subspace: V ~ (Q W) (Z S)^T, ordered by singular value.
    q_rot = q @ w
    u_rot = zh.T * s
    if frobenius_sq is None:
        frobenius_sq = _frobenius_sq(v)
    # 5. Free errors of every rank <= s.
    errors = relative_errors_from_singular_values(frobenius_sq, s)
    return q_rot, u_rot, s, errors


def srsi(
    v: Tensor,
    rank: int,
    *,
    oversample: int = 5,
    power_iters: int = 5,
    generator: torch.Generator | None = None,
    warm_start: Tensor | None = None,
) -> LowRankFactors:
    """Streamlined randomized subspace iteration (S-RSI) at a fixed rank.

    [paper] Gaussian test matrix with ``oversample`` extra columns (p), ``power_iters`` rounds
    (l) of multiplication by V with orthonormalization. [decided] A small SVD of Q^T V rotates
    the basis so the leading k columns are the best rank-k approximation inside the sketch,
    and yields the relative error of every rank up to k + p for free.

    Args:
        v: (m, n) matrix (a second moment: non-negative, but any real matrix works).
        rank: k >= 1; clamped to min(m, n).
        oversample: p >= 0 extra sketch columns.
        power_iters: l >= 0 subspace-iteration rounds.
        generator: source of the Gaussian test matrix (None: torch's default generator).
        warm_start: optional (m, j) basis to start from, e.g. the previous step's factor.
    """
    v = _check_matrix(v)
    _check_rank(rank)
    _check_nonnegative_int(oversample, "oversample")
    _check_nonnegative_int(power_iters, "power_iters")
    m, n = v.shape
    if warm_start is not None and (warm_start.ndim != 2 or warm_start.shape[0] != m):
        raise ValueError(f"warm_start must have shape ({m}, j), got {tuple(warm_start.shape)}")
    if v.numel() == 0:
        return _empty_factors(v, min(rank, m, n))
    q, u, s, errors = _srsi(v, rank, oversample, power_iters, generator, warm_start)
    k = min(rank, q.shape[1])
    return LowRankFactors(q[:, :k], u[:, :k], s, errors)


# --------------------------------------------------------------------------- batched S-RSI
# The same algorithm as ``_srsi`` on a stack of same-shape matrices (b, m, n): every step is a
# batched product (bmm) or a batched small factorization, so b matrices cost one launch each
# and nothing reads a value back to the host. Two choices differ from ``_srsi``:
# - [decided] Orthonormalization by Cholesky-QR (CholeskyQR2 with a shift) instead of
#   Householder QR: the only cross-row reduction is the small Gram matrix Y^T Y, which a
#   row-sharded (FSDP2) version all-reduces through ``reduce`` before factoring it.
# - [decided] The small SVD of B = Q^T V becomes a symmetric eigendecomposition of B B^T in
#   float64 (eigenvalues = S^2, the quantity the rank rule needs): float64 keeps the directions
#   down to sqrt(eps64) of the top one, well past what a float32 V holds.


def _reduced(t: Tensor, reduce) -> Tensor:
    # Seam for row-sharded matrices: a sum over rows computed per shard must be all-reduced.
    return t if reduce is None else reduce(t)


def _cholesky_qr_batched(y: Tensor, reduce=None, passes: int = 2, rows: int | None = None) -> Tensor:
    """Orthonormal basis of each y[i] (b, m, s) by shifted Cholesky-QR, ``passes`` times.

    Y^T Y (+ a shift of m s eps ||Y||_F^2 on the first pass, Fukaya et al. 2020, shifted
    CholeskyQR) is factored in float64 with
    ``cholesky_ex`` (no host check of its info); Q = Y R^-1 by a triangular solve. A second pass
    restores orthogonality to float64 round-off. A rank-deficient or zero Y gives zero columns
    for the missing directions instead of arbitrary ones; they carry nothing of V.
    ``rows`` is Y's global row count when Y is row-sharded (every rank must shift its reduced
    Gram matrix alike, or the ranks' R factors, and so their Q rows, would disagree).
    """
    q = y.to(torch.float64)
    width = q.shape[-1]
    rows = q.shape[-2] if rows is None else rows
    tiny = torch.finfo(torch.float64).tiny
    eps = torch.finfo(torch.float64).eps
    for number in range(passes):
        gram = _reduced(torch.matmul(q.mT, q), reduce)
        trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
        # The first pass needs Fukaya's shift to factor an ill-conditioned Gram; later passes
        # see a nearly orthonormal basis and only guard its zero columns (a shift shortens
        # every column by about its relative size).
        shift = rows * width * eps if number == 0 else eps
        gram.diagonal(dim1=-2, dim2=-1).add_(trace * shift + tiny)
        r, _ = torch.linalg.cholesky_ex(gram, upper=True)
        q = torch.linalg.solve_triangular(r, q, upper=True, left=False)
    return q.to(y.dtype)


def _srsi_batched(
    v: Tensor,
    rank: int,
    oversample: int,
    power_iters: int,
    omega: Tensor,
    warm_start: Tensor | None,
    reduce=None,
    rows: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unchecked batched S-RSI: v (b, m, n) -> (Q_s (b, m, s), U_s (b, n, s), S (b, s), errors (b, s)).

    ``omega`` (b, n, s - j) is drawn by the caller (one generator per matrix, so each matrix
    sees exactly the test matrix ``_srsi`` would draw); ``warm_start`` (b, m, j) or None.
    ``reduce`` is applied to every sum over V's rows (Gram matrices, Q^T V, ||V||^2); None on
    one device; ``rows`` is then V's global row count (the local shard may hold fewer rows,
    or none). A matrix holding NaN/Inf gives NaN factors and errors, never an exception.
    """
    m, n = v.shape[-2:]
    if rows is not None:
        m = rows
    width = min(rank + oversample, m, n)
    if warm_start is not None and warm_start.shape[-1] > 0:
        kept = warm_start[..., : min(warm_start.shape[-1], width)].to(v.dtype)
        y = torch.cat([kept, torch.bmm(v, omega)], dim=-1)
    else:
        y = torch.bmm(v, omega)
    q = _cholesky_qr_batched(y, reduce, rows=rows)
    for _ in range(power_iters):
        # V^T Q as (Q^T V)^T, as in _srsi; its rows live on the n side (not sharded).
        z = _cholesky_qr_batched(_reduced(torch.bmm(q.mT, v), reduce).mT)
        q = _cholesky_qr_batched(torch.bmm(v, z), reduce, rows=rows)
    b = _reduced(torch.bmm(q.mT, v), reduce)  # (batch, s, n)
    b64 = b.to(torch.float64)
    gram = torch.bmm(b64, b64.mT)
    # A non-finite matrix must not make the eigensolver raise: give it a zero Gram (its NaN
    # Frobenius norm still marks its errors NaN for the caller).
    finite = torch.isfinite(gram).all(dim=-1).all(dim=-1)
    gram = torch.where(finite[:, None, None], gram, torch.zeros_like(gram))
    evals, evecs = torch.linalg.eigh(gram)
    evals = evals.flip(-1).clamp_(min=0.0)
    w = evecs.flip(-1)
    s = evals.sqrt()
    q_rot = torch.bmm(q, w.to(v.dtype))
    u_rot = torch.bmm(b.mT, w.to(v.dtype))  # B^T W = Z S
    # ||V||_F^2 from row norms (no m x n temporary; a float64 norm would cast V to a float64
    # copy), summed in float64. An overflowing row gives inf errors: the rank rule's top rank.
    total = _reduced(torch.linalg.vector_norm(v, dim=-1).to(torch.float64).square().sum(-1), reduce)
    total = torch.where(finite, total, torch.full_like(total, math.nan))
    captured = torch.cumsum(evals, -1)
    residual = torch.clamp(total[:, None] - captured, min=0.0).sqrt()
    safe_norm = torch.where(total > 0, total.sqrt(), torch.ones_like(total))[:, None]
    errors = torch.where(total[:, None] > 0, residual / safe_norm, torch.zeros_like(residual))
    errors = torch.where(torch.isnan(total)[:, None], total[:, None].expand_as(errors), errors)
    return q_rot, u_rot, s.to(v.dtype), errors


def srsi_batched(
    v: Tensor,
    rank: int,
    *,
    oversample: int = 5,
    power_iters: int = 5,
    generators: list[torch.Generator] | None = None,
    warm_start: Tensor | None = None,
) -> list[LowRankFactors]:
    """S-RSI on a stack of same-shape matrices v (b, m, n) at once; one factor set per matrix.

    Matrix i draws its test matrix from ``generators[i]`` exactly as ``srsi`` would, so
    ``srsi_batched(stack(vs), k, generators=gs)[i]`` and ``srsi(vs[i], k, generator=gs[i])``
    span the same subspace. Differences from ``srsi``: Cholesky-QR and an eigendecomposition
    of B B^T (see the section comment); the singular values are square roots of eigenvalues.
    """
    if not isinstance(v, Tensor) or v.ndim != 3:
        raise ValueError(f"expected a stack of matrices (3-D tensor), got {getattr(v, 'shape', type(v))}")
    for matrix in v:
        _check_matrix(matrix)
    if v.dtype not in (torch.float32, torch.float64):
        v = v.float()
    _check_rank(rank)
    _check_nonnegative_int(oversample, "oversample")
    _check_nonnegative_int(power_iters, "power_iters")
    batch, m, n = v.shape
    if generators is not None and len(generators) != batch:
        raise ValueError(f"expected {batch} generators (one per matrix), got {len(generators)}")
    if warm_start is not None and (warm_start.ndim != 3 or warm_start.shape[:2] != (batch, m)):
        raise ValueError(f"warm_start must have shape ({batch}, {m}, j), got {tuple(warm_start.shape)}")
    if v.numel() == 0:
        return [_empty_factors(matrix, min(rank, m, n)) for matrix in v]
    width = min(rank + oversample, m, n)
    kept = 0 if warm_start is None else min(warm_start.shape[-1], width)
    omega = torch.stack(
        [
            torch.randn(
                n,
                width - kept,
                generator=None if generators is None else generators[i],
                device=v.device,
                dtype=v.dtype,
            )
            for i in range(batch)
        ]
    )
    q, u, s, errors = _srsi_batched(v, rank, oversample, power_iters, omega, warm_start)
    k = min(rank, q.shape[-1])
    return [LowRankFactors(q[i, :, :k], u[i, :, :k], s[i], errors[i]) for i in range(batch)]


def adaptive_rank(
    relative_errors: Tensor | list[float],
    current_rank: int,
    *,
    rank_min: int,
    rank_max: int,
    oversample: int,
    tol: float,
) -> int:
    """AS-RSI rank rule ([decided]; the paper's rule is not public).

    The smallest r in [rank_min, min(current_rank + oversample, rank_max)] whose error is at
    most ``tol``; if none qualifies, the top of that range. A matrix therefore grows by at most
    p per evaluation and shrinks at once when fewer directions suffice.
    """
    errors = relative_errors.tolist() if isinstance(relative_errors, Tensor) else list(relative_errors)
    available = len(errors)
    top = max(1, min(current_rank + oversample, rank_max, available))
    low = min(max(1, rank_min), top)
    for r in range(low, top + 1):
        if errors[r - 1] <= tol:
            return r
    return top


def settled_rank(
    relative_errors: Tensor | list[float], *, rank_min: int = 1, rank_max: int, tol: float
) -> int | None:
    """The rank ``adaptive_rank`` settles on for a matrix that stops changing ([decided]).

    The rule grows a rank by at most p per evaluation and shrinks it at once, so on a fixed V it
    stops at the smallest r in [rank_min, rank_max] whose error (``relative_errors[r - 1]``) is at
    most ``tol``. None when no rank the errors cover qualifies: the rule then holds rank_max, or a
    wider sketch may still find one.
    """
    errors = relative_errors.tolist() if isinstance(relative_errors, Tensor) else list(relative_errors)
    top = min(rank_max, len(errors))
    return next((r for r in range(max(1, rank_min), top + 1) if errors[r - 1] <= tol), None)


def as_rsi(
    v: Tensor,
    current_rank: int,
    *,
    rank_min: int = 1,
    rank_max: int | None = None,
    tol: float = 0.01,
    oversample: int = 5,
    power_iters: int = 5,
    generator: torch.Generator | None = None,
    warm_start: Tensor | None = None,
) -> LowRankFactors:
    """Adaptive-rank S-RSI: sketch at current_rank + p, keep the rank ``adaptive_rank`` picks."""
    v = _check_matrix(v)
    _check_rank(current_rank, "current_rank")
    _check_rank(rank_min, "rank_min")
    m, n = v.shape
    rank_max = default_rank_max(m, n) if rank_max is None else _check_rank(rank_max, "rank_max")
    if rank_min > rank_max:
        raise ValueError(f"rank_min ({rank_min}) must not exceed rank_max ({rank_max})")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if v.numel() == 0:
        return _empty_factors(v, 0)
    sketch_rank = min(current_rank, rank_max)
    q, u, s, errors = _srsi(v, sketch_rank, oversample, power_iters, generator, warm_start)
    k = adaptive_rank(
        errors, sketch_rank, rank_min=rank_min, rank_max=rank_max, oversample=oversample, tol=tol
    )
    return LowRankFactors(q[:, :k], u[:, :k], s, errors)


def _empty_factors(v: Tensor, rank: int) -> LowRankFactors:
    m, n = v.shape
    empty = v.new_zeros(0)
    return LowRankFactors(v.new_zeros(m, rank), v.new_zeros(n, rank), empty, empty)


# --------------------------------------------------------------------------- exact and Halko


def truncated_svd(v: Tensor, rank: int) -> LowRankFactors:
    """Exact truncated SVD: the Eckart-Young optimum at every rank, the floor for all methods.

    ``singular_values``/``relative_errors`` cover every rank up to min(m, n).
    """
    v = _check_matrix(v)
    _check_rank(rank)
    if v.numel() == 0:
        return _empty_factors(v, min(rank, *v.shape))
    u_left, s, vh = torch.linalg.svd(v, full_matrices=False)
    k = min(rank, s.shape[0])
    errors = relative_errors_from_singular_values(_frobenius_sq(v), s)
    return LowRankFactors(u_left[:, :k], vh[:k].T * s[:k], s, errors)


def svd_lowrank(
    v: Tensor,
    rank: int,
    *,
    oversample: int = 5,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> LowRankFactors:
    """A thin wrapper over ``torch.svd_lowrank`` (Halko et al.), the peer S-RSI must match.

    torch.svd_lowrank draws from the global RNG; with a ``generator`` we seed a forked RNG from
    it, so the caller's global random state is untouched and results are reproducible.
    """
    v = _check_matrix(v)
    _check_rank(rank)
    _check_nonnegative_int(oversample, "oversample")
    _check_nonnegative_int(power_iters, "power_iters")
    m, n = v.shape
    if v.numel() == 0:
        return _empty_factors(v, min(rank, m, n))
    width = min(rank + oversample, m, n)
    devices = [v.device] if v.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            torch.manual_seed(seed)
        u_left, s, v_right = torch.svd_lowrank(v, q=width, niter=power_iters)
    k = min(rank, s.shape[0])
    errors = relative_errors_from_singular_values(_frobenius_sq(v), s)
    return LowRankFactors(u_left[:, :k], v_right[:, :k] * s[:k], s, errors)


# --------------------------------------------------------------------------- peers


def adafactor_rank1(v: Tensor) -> Tensor:
    """Adafactor / CAME / AdaLomo rank-1 factorization: V ~ r c^T / mean(r).

    r and c are the row and column means (the statistics those optimizers store); for a
    non-negative V this is the KL-optimal rank-1 non-negative factorization.
    """
    v = _check_matrix(v)
    if v.numel() == 0:
        return v.clone()
    row = v.mean(dim=1)
    col = v.mean(dim=0)
    scale = row.mean()
    if float(scale) == 0.0:
        return torch.zeros_like(v)
    return torch.outer(row, col) / scale


def smmf_rank1(v: Tensor) -> Tensor:
    """SMMF: square-matricize the whole tensor to its most square shape, then rank-1 NNMF.

    The NNMF is outer(row sums, col sums) / total, which equals Adafactor's factorization of
    the reshaped matrix. The original matrix structure is ignored, as in SMMF.
    """
    v = _check_matrix(v)
    if v.numel() == 0:
        return v.clone()
    rows, cols = square_matricize_shape(v.numel())
    square = v.reshape(rows, cols)
    total = square.sum()
    if float(total) == 0.0:
        return torch.zeros_like(v)
    return (torch.outer(square.sum(dim=1), square.sum(dim=0)) / total).reshape(v.shape)


def adam_mini_blocks(v: Tensor, block: str = "row", num_heads: int | None = None) -> Tensor:
    """Adam-mini: one mean of V per block, broadcast back.

    block: "row" (one value per output row / token, Adam-mini's choice for embeddings, value,
    output and MLP weights), "head" (``num_heads`` equal row blocks, its choice for query/key
    weights) or "tensor" (one value for the whole tensor, its default for everything else).
    """
    v = _check_matrix(v)
    if v.numel() == 0:
        return v.clone()
    m, n = v.shape
    if block == "row":
        return v.mean(dim=1, keepdim=True).expand(m, n).clone()
    if block == "tensor":
        return v.mean().expand(m, n).clone()
    if block == "head":
        if num_heads is None or num_heads < 1 or m % num_heads:
            raise ValueError(f"block='head' needs num_heads dividing the {m} rows, got {num_heads!r}")
        per_head = v.reshape(num_heads, -1).mean(dim=1, keepdim=True)
        return per_head.expand(num_heads, (m // num_heads) * n).reshape(m, n).clone()
    raise ValueError(f"block must be 'row', 'head' or 'tensor', got {block!r}")


def sm3_cover(v: Tensor) -> Tensor:
    """SM3 with the row/column cover: V_ij ~ min(max_j' V_ij', max_i' V_i'j).

    SM3 stores one accumulator per row and per column, each the maximum over its cover set;
    the estimate of an entry is the minimum over the sets covering it (an upper bound on V).
    """
    v = _check_matrix(v)
    if v.numel() == 0:
        return v.clone()
    row_max = v.amax(dim=1, keepdim=True)
    col_max = v.amax(dim=0, keepdim=True)
    return torch.minimum(row_max, col_max)


# --------------------------------------------------------------------------- rank rule: distance to the dense EMA
#
# [decided] The paper's AS-RSI bounds one step's truncation error of the rebuilt
# V_t = beta2 max(Q U^T, 0) + (1 - beta2) G^2. Each step re-truncates a V rebuilt from the previous
# truncation, so errors compound: the factored moment drifts ~2x tol from the dense EMA
# D_t = beta2 D_{t-1} + (1 - beta2) G_t^2 that Adam would hold (benchmarks/bench_tol.py). The rule
# below targets ||max(Q_r U_r^T, 0) - D_t||_F / ||D_t||_F itself, estimated from a small exact
# sketch S_t = D_t Omega of the dense EMA: Omega is a fixed (n, c) Gaussian, regenerated from a
# seed each step (never stored), and S_t = beta2 S_{t-1} + (1 - beta2) (G_t * G_t) Omega costs one
# (m, n) x (n, c) product and c * m numbers of state (c = 4: two ranks' worth for a square matrix).

DENSE_SKETCH_COLUMNS = 4
# Steps count from 1 and convert keys by position only: -1 is a key neither draws with.
DENSE_SKETCH_KEY = -1


def dense_sketch_test_matrix(
    n: int,
    columns: int = DENSE_SKETCH_COLUMNS,
    *,
    seed: int,
    keys: tuple[int, ...] = (),
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Omega (n, columns): standard Gaussian, a pure function of (seed, *keys).

    The same Omega must multiply every gradient of a sketch's life, so it is drawn from
    ``seeded_generator`` each time it is needed instead of being stored. The optimizer's keys
    are (parameter index, DENSE_SKETCH_KEY): no step (it is fixed for the run) and a key no step
    or ``convert`` draw uses, so Omega is independent of every S-RSI test matrix.
    """
    _check_rank(columns, "columns")
    generator = seeded_generator(seed, *keys, device=device)
    return torch.randn(n, columns, generator=generator, dtype=dtype, device=device)


def dense_sketch(v: Tensor, omega: Tensor) -> Tensor:
    """S = V @ Omega: the sketch of a known dense moment (at convert, or of clamp(Q U^T, 0) on load)."""
    v = _check_matrix(v)
    if omega.ndim != 2 or omega.shape[0] != v.shape[1]:
        raise ValueError(f"omega must have shape ({v.shape[1]}, c), got {tuple(omega.shape)}")
    return v @ omega.to(v.dtype)


def moment_sketch_test_matrix(
    m: int, n: int, *, seed: int, index: int, dtype: torch.dtype = torch.float32, device="cpu"
) -> Tensor:
    """The optimizer's Omega for parameter ``index`` (flat position) of an m x n matrix.

    (max(m, n), DENSE_SKETCH_COLUMNS), keys (index, DENSE_SKETCH_KEY): the sketch lives on the
    smaller side (``moment_sketch``), so it stores DENSE_SKETCH_COLUMNS * min(m, n) numbers.
    ``convert`` and the optimizer both call this: a converted sketch continues in the optimizer.
    Drawn in float32 whatever ``dtype`` (then cast), so a float32 state loaded into a float64
    model keeps the Omega its sketch was made with.
    """
    omega = dense_sketch_test_matrix(max(m, n), seed=seed, keys=(index, DENSE_SKETCH_KEY), device=device)
    return omega.to(dtype)


def moment_sketch(d: Tensor, omega: Tensor) -> Tensor:
    """The optimizer's sketch of a dense moment D (m x n): D Omega, or D^T Omega when m > n."""
    return (d.mT if d.shape[-2] > d.shape[-1] else d) @ omega.to(d.dtype)


def update_dense_sketch(sketch: Tensor, grad: Tensor, omega: Tensor, beta2: float) -> Tensor:
    """S <- beta2 S + (1 - beta2) (G * G) @ Omega, in place: the dense EMA's sketch, exactly.

    Linear in D, so S_t = D_t @ Omega for every t whatever the factored moment does.
    """
    return sketch.addmm_(grad.square(), omega, beta=beta2, alpha=1.0 - beta2)


def sketched_distances(
    sketch: Tensor,
    q: Tensor,
    u: Tensor,
    omega: Tensor,
    *,
    dense_frobenius_sq: Tensor | float | None = None,
) -> Tensor:
    """Estimated ||D - Q_r U_r^T||_F / ||D||_F for r = 1..s, from S = D @ Omega.

    With P = U^T Omega (s, c), A = Q^T S and S_perp = S - Q A (Q orthonormal), the sketched
    residual splits into orthogonal parts with no cancellation:

        ||S - Q_r P_r||^2 = ||S_perp||^2 + sum_{i<=r} ||a_i - p_i||^2 + sum_{i>r} ||a_i||^2.

    For a Gaussian Omega, E ||X Omega||_F^2 = c ||X||_F^2. The denominator is ||S||_F (the
    sketch's own estimate of ||D||_F) unless ``dense_frobenius_sq`` is given, then
    sqrt(c * dense_frobenius_sq): an exact or near-exact norm removes the denominator's noise
    (a non-negative D is dominated by one direction, so ||D Omega||^2 is close to a chi^2 with c
    degrees of freedom). The clamp max(., 0) is ignored: it only moves entries towards the
    non-negative D, so the clamped factors are at most this far. Computed in float64 (the
    matrices are (m, c) and (s, c)).

    To keep the smaller sketch (c * min(m, n) numbers) of a tall V, sketch V^T instead:
    S = D^T Omega (Omega (m, c)) and pass (S, U / singular values, Q * singular values, Omega),
    the roles of the two factors swapped (U's columns are orthogonal with norms the singular
    values).
    """
    if q.ndim != 2 or u.ndim != 2 or q.shape[1] != u.shape[1]:
        raise ValueError(f"q and u must be (m, s) and (n, s), got {tuple(q.shape)} and {tuple(u.shape)}")
    if sketch.shape != (q.shape[0], omega.shape[1]) or omega.shape[0] != u.shape[0]:
        raise ValueError(
            f"sketch {tuple(sketch.shape)} and omega {tuple(omega.shape)} do not fit factors "
            f"{tuple(q.shape)}, {tuple(u.shape)}: expected ({q.shape[0]}, c) and ({u.shape[0]}, c)"
        )
    return _sketched_distances(sketch, q, u, omega, dense_frobenius_sq)


def _sketched_distances(
    sketch: Tensor, q: Tensor, u: Tensor, omega: Tensor, dense_frobenius_sq: Tensor | float | None
) -> Tensor:
    """Unchecked ``sketched_distances`` on one matrix or a stack (leading batch dimensions), with
    no host synchronisation: the optimizer reads the result once per step with every other choice."""
    s64, q64 = sketch.double(), q.double()
    a = q64.mT @ s64
    p = u.double().mT @ omega.double()
    perp_sq = torch.linalg.matrix_norm(s64 - q64 @ a).square()[..., None]
    head = torch.cumsum((a - p).square().sum(dim=-1), -1)
    a_sq = a.square().sum(dim=-1)
    tail = a_sq.flip(-1).cumsum(-1).flip(-1) - a_sq  # sum_{i>r}, r = 1..s
    residual = (perp_sq + head + tail.clamp(min=0.0)).sqrt()
    if dense_frobenius_sq is None:
        norm = torch.linalg.matrix_norm(s64)
    else:
        total = torch.as_tensor(dense_frobenius_sq, dtype=torch.float64, device=residual.device)
        norm = (total * omega.shape[-1]).sqrt()
    norm = norm[..., None]
    # A zero dense moment: any zero factor reproduces it, anything else is infinitely far.
    zero = torch.where(residual == 0, torch.zeros_like(residual), torch.full_like(residual, math.inf))
    return torch.where(norm > 0, residual / torch.where(norm > 0, norm, torch.ones_like(norm)), zero)


def dense_ema_rank(
    distances: Tensor | list[float],
    current_rank: int,
    *,
    rank_min: int,
    rank_max: int,
    oversample: int,
    tol: float,
    jump: bool = False,
) -> int:
    """The smallest r in [rank_min, top] whose estimated distance to the dense EMA is <= tol.

    top = min(current_rank + oversample, rank_max), as in ``adaptive_rank`` (a rank grows by at
    most p per evaluation, so a step's sketch width k + p covers every candidate); with ``jump``
    top = rank_max ([decided] departure from the paper's gradual growth, for the first
    evaluation of a fresh or just-converted/loaded state; the caller must then have sketched at
    width rank_max so that ``distances`` reaches it). If none qualifies: top.
    """
    return adaptive_rank(
        distances,
        current_rank,
        rank_min=rank_min,
        rank_max=rank_max,
        oversample=rank_max if jump else oversample,
        tol=tol,
    )
