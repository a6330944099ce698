"""Pure numerics of the analyses: exact spectra, truncation errors and relative errors of matrices.

Functions of tensors only: no files, no printing, no report dataclasses. ``spectrum``,
``compare`` and ``estimate`` all call them.

How the numbers are computed (and why):

- Exact spectra of large matrices come from the eigenvalues of the Gram matrix (the smaller
  side, V^T V or V V^T), accumulated in float64 over row blocks. Squaring the matrix squares its
  condition number, but in float64 the eigenvalues keep an absolute accuracy of about
  1e-16 * sigma_1^2: every singular value above ~1e-6 sigma_1 and every truncation error above
  ~1e-6 is exact to many digits, far beyond what a second moment needs; and on a CPU it is an
  order of magnitude faster than ``torch.linalg.svdvals`` on GPT-2's 768-wide moments (whose
  wide 768 x 3072 ones LAPACK handles especially slowly). Small matrices use
  ``torch.linalg.svdvals`` in float64 directly.
- Truncation errors are computed from tail sums, err(r)^2 = sum_{i>r} sigma_i^2 / ||V||_F^2,
  never as 1 minus a head sum, so small errors do not cancel.
- The spectrum's fast path for large matrices is one S-RSI sketch of width top + oversample:
  its leading singular values and the errors of every rank up to the width are exact for the
  sketched subspace (algorithm notes §3.5), hence upper bounds on the optimal errors; a rank
  beyond the sketch is reported as unknown (None: "more than ``ranks_known_up_to``").
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from adapprox_cli.errors import ParameterError

__all__ = [
    "SMALL_NUMEL",
    "blockwise_relative_error",
    "exact_squared_singular_values",
    "first_rank",
    "frobenius_sq",
    "gram_eigenvalues",
    "row_blocks",
    "tail_errors",
]

# Matrices up to this many elements always get an exact SVD (it takes milliseconds).
SMALL_NUMEL = 1 << 18
# Row blocks for float64 accumulation: ~4 MiB of float64 whatever the width, so an upcast never
# doubles a whole matrix. Larger blocks (32 MiB) left glibc's heap 1.3x a GPT-2 embedding larger.
_BLOCK_BYTES = 4 << 20


def row_blocks(v: Tensor) -> Iterable[Tensor]:
    """Consecutive row blocks of V, each about 4 MiB once upcast to float64."""
    rows = max(1, _BLOCK_BYTES // (8 * max(1, v.shape[1])))
    for start in range(0, v.shape[0], rows):
        yield v[start : start + rows]


def frobenius_sq(v: Tensor, moment_name: str) -> float:
    """||V||_F^2 accumulated in float64 over row blocks; rejects NaN/Inf with the parameter's name."""
    total = sum(float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2 for block in row_blocks(v))
    if not math.isfinite(total):
        # The fix is to select fewer moments: ``{name}`` reads ``params`` (``load_moments``'s
        # pattern) from Python and ``--params`` in the CLI.
        raise ParameterError(
            "params",
            f"{moment_name}: the moment contains NaN or Inf (training diverged or the file is damaged); "
            "leave it out with {name}",
        )
    return total


def gram_eigenvalues(v: Tensor) -> Tensor:
    """Squared singular values of V (descending, float64) from the Gram matrix of its shorter side.

    Accumulated over row blocks in float64, so the float64 upcast of V never exists whole.
    """
    tall = v if v.shape[0] >= v.shape[1] else v.T
    n = tall.shape[1]
    gram = torch.zeros(n, n, dtype=torch.float64, device=v.device)
    rows = max(1, _BLOCK_BYTES // (8 * n))
    for start in range(0, tall.shape[0], rows):
        block = tall[start : start + rows].to(torch.float64)
        gram.addmm_(block.T, block)
    eigenvalues = torch.linalg.eigvalsh(gram)
    return eigenvalues.flip(0).clamp_(min=0.0)


def exact_squared_singular_values(v: Tensor, method: str = "auto") -> Tensor:
    """All squared singular values of V, descending, float64.

    method: "svd" (``torch.linalg.svdvals`` in V's dtype), "gram" (``gram_eigenvalues``) or
    "auto" (svdvals in float64 for small matrices, where it costs milliseconds; gram otherwise).
    """
    if method == "auto":
        if v.numel() <= SMALL_NUMEL:
            return torch.linalg.svdvals(v.to(torch.float64)).square()
        method = "gram"
    if method == "gram":
        return gram_eigenvalues(v)
    if method == "svd":
        return torch.linalg.svdvals(v).to(torch.float64).square()
    raise ValueError(f"method must be 'auto', 'svd' or 'gram', got {method!r}")


def tail_errors(squared_singular_values: Tensor, frobenius_sq: float) -> Tensor:
    """err(r) = sqrt(sum_{i>r} sigma_i^2) / ||V||_F for r = 0..len, from tail sums (no cancellation).

    ``err[0]`` is 1 (nothing kept); with every singular value, the last entry is 0.
    """
    s2 = squared_singular_values.to(torch.float64)
    tails = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])
    if frobenius_sq <= 0:
        return torch.zeros_like(tails)
    return (tails / frobenius_sq).clamp(max=1.0).sqrt()


def first_rank(hits: Tensor) -> int | None:
    """The smallest rank r with hits[r - 1] true (hits[i] says something of rank i + 1), or None."""
    found = hits.nonzero()
    return int(found[0]) + 1 if len(found) else None


def blockwise_relative_error(v: Tensor, approximation: Tensor, frobenius_sq: float) -> float:
    """||V - A||_F / ||V||_F, the difference squared in float64 block by block (no full temporary).

    ``lowrank.relative_error`` computes the same in one piece; here ``frobenius_sq`` (already
    known) is reused and no m x n difference is ever allocated.
    """
    blocks = zip(row_blocks(approximation.reshape(v.shape)), row_blocks(v), strict=True)
    diff_sq = sum(float(torch.linalg.vector_norm(a - b, dtype=torch.float64)) ** 2 for a, b in blocks)
    if frobenius_sq == 0:
        return 0.0 if diff_sq == 0 else math.inf
    return math.sqrt(diff_sq / frobenius_sq)
