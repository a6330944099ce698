"""Exact spectra and errors against ground truth: float64 SVDs, Eckart-Young, hand values."""

from __future__ import annotations

import math

import pytest
import torch
from moment_factories import second_moment

from adapprox_cli import lowrank
from adapprox_cli.analysis import numerics
from adapprox_cli.errors import ParameterError


@pytest.mark.parametrize("shape", [(120, 40), (40, 120), (64, 64)])
def test_gram_eigenvalues_match_svd(shape):
    v = second_moment(*shape, seed=7)
    s = torch.linalg.svdvals(v)
    lam = numerics.gram_eigenvalues(v)
    assert lam.dtype == torch.float64 and lam.shape == s.shape
    # A Gram eigenvalue is exact to about eps64 * sigma_1^2, so its square root is exact to
    # sqrt(eps64) * sigma_1 for the smallest singular values and to 1e-9 relative for the rest.
    torch.testing.assert_close(lam.sqrt(), s, rtol=1e-9, atol=1e-7 * float(s[0]))
    # Truncation errors from both agree to 1e-9 at every rank.
    fro2 = float(v.square().sum())
    torch.testing.assert_close(
        numerics.tail_errors(lam, fro2), numerics.tail_errors(s.square(), fro2), rtol=0, atol=1e-9
    )


def test_gram_squares_the_condition_number_but_keeps_what_matters():
    # Singular values from 1 down to 1e-7: the Gram matrix holds them squared (1 .. 1e-14).
    g = torch.Generator().manual_seed(0)
    q1 = torch.linalg.qr(torch.randn(300, 40, generator=g, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -7, 40, dtype=torch.float64)
    v = (q1 * s) @ q2.T
    lam = numerics.gram_eigenvalues(v)
    from_gram = lam.sqrt()
    big = s >= 1e-3
    torch.testing.assert_close(from_gram[big], s[big], rtol=1e-8, atol=0)
    mid = (s >= 1e-6) & ~big
    torch.testing.assert_close(from_gram[mid], s[mid], rtol=1e-3, atol=0)
    # Below ~1e-7 sigma_1 the values are noise, but the errors they imply stay exact to 1e-12.
    fro2 = float(s.square().sum())
    exact = numerics.tail_errors(s.square(), fro2)
    torch.testing.assert_close(numerics.tail_errors(lam, fro2), exact, rtol=0, atol=1e-7)
    assert float((numerics.tail_errors(lam, fro2) - exact).abs()[:20].max()) < 1e-12


def test_tail_errors_are_eckart_young():
    s2 = torch.tensor([9.0, 4.0, 1.0], dtype=torch.float64)
    errors = numerics.tail_errors(s2, 14.0)
    expected = [1.0, math.sqrt(5 / 14), math.sqrt(1 / 14), 0.0]
    torch.testing.assert_close(errors, torch.tensor(expected, dtype=torch.float64))
    assert numerics.tail_errors(s2, 0.0).tolist() == [0.0] * 4


def test_blockwise_relative_error_is_the_plain_one():
    v = second_moment(300, 40, 5)
    approximation = v + 0.01 * torch.randn(300, 40, generator=torch.Generator().manual_seed(0), dtype=v.dtype)
    fro2 = float(v.square().sum())
    expected = lowrank.relative_error(v, approximation)
    assert numerics.blockwise_relative_error(v, approximation, fro2) == pytest.approx(expected, rel=1e-12)
    assert numerics.blockwise_relative_error(torch.zeros(3, 2), torch.zeros(3, 2), 0.0) == 0.0
    assert numerics.blockwise_relative_error(torch.zeros(3, 2), torch.ones(3, 2), 0.0) == math.inf


def test_a_nan_moment_is_refused_with_the_fix_in_python_terms():
    bad = torch.rand(20, 10)
    bad[3, 4] = float("nan")
    with pytest.raises(ParameterError, match=r"^w: the moment contains NaN.*leave it out with params$"):
        numerics.frobenius_sq(bad, "w")
