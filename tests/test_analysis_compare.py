"""``compare_methods`` against ground truth: the exact truncated SVD (Eckart-Young) and the registry."""

from __future__ import annotations

import math

import pytest
import torch
from moment_factories import sample_moments, truth

from adapprox_cli import lowrank
from adapprox_cli.analysis.compare import DEFAULT_METHODS, compare_methods
from adapprox_cli.errors import InputError, ParameterError
from adapprox_cli.methods import ApproximationSettings, approximate


@pytest.fixture(scope="module")
def moments() -> list[tuple[str, torch.Tensor]]:
    return sample_moments()


@pytest.fixture(scope="module")
def comparison(moments):
    return compare_methods(moments, rank=4, dtype="float64", num_heads=4, seed=3)


def test_compare_svd_row_is_eckart_young(moments, comparison):
    for name, v in moments:
        if v.ndim < 2:
            continue
        t = truth(v)
        row = next(r for r in comparison.rows if r.name == name and r.method == "svd")
        s2 = t["s"].square()
        expected = math.sqrt(float(s2[4:].sum())) / math.sqrt(t["fro2"])
        assert row.relative_error == pytest.approx(expected, rel=1e-9)
        assert row.vs_optimum == 1.0 and row.rank == 4
        m, n = lowrank.matrix_view_shape(v.shape)
        assert row.numbers_stored == 4 * (m + n)


def test_compare_methods_never_beat_the_optimum(comparison):
    names = comparison.matrices
    assert len(names) == 4 and comparison.skipped == ["transformer.h.0.mlp.c_fc.bias"]
    assert len(comparison.rows) == 4 * len(DEFAULT_METHODS)
    for row in comparison.rows:
        assert row.vs_optimum >= 1 - 1e-9, row
        if row.vs_rank1_optimum is not None:
            assert row.vs_rank1_optimum >= 1 - 1e-9, row
    for name in names:
        srsi = next(r for r in comparison.rows if r.name == name and r.method == "srsi")
        assert srsi.vs_optimum < 1.01  # 5 power iterations: essentially optimal
        adafactor = next(r for r in comparison.rows if r.name == name and r.method == "adafactor")
        assert adafactor.vs_rank1_optimum is not None and adafactor.vs_rank1_optimum >= 1 - 1e-9


def test_compare_errors_match_the_registry(moments, comparison):
    name, v = moments[0]
    for method in ("adafactor", "smmf", "sm3", "adam_mini"):
        row = next(r for r in comparison.rows if r.name == name and r.method == method)
        expected = approximate(method, v, ApproximationSettings(rank=4, adam_mini_block="row"))
        assert row.relative_error == pytest.approx(expected.relative_error, rel=1e-10)
        assert row.numbers_stored == expected.numbers_stored


def test_compare_adam_mini_block_comes_from_the_name(comparison):
    details = {r.name: r.detail for r in comparison.rows if r.method == "adam_mini"}
    assert details["transformer.h.0.mlp.c_fc.weight"] == "row"
    assert details["conv.weight"] == "row"  # no rule matches: the default
    q = torch.rand(8, 6, dtype=torch.float64)
    report = compare_methods([("attn.q_proj.weight", q)], ["adam_mini"], num_heads=4, dtype="float64")
    (row,) = report.rows
    assert row.detail == "head x4" and row.numbers_stored == 4
    expected = approximate("adam_mini", q, ApproximationSettings(adam_mini_block="head", num_heads=4))
    assert row.relative_error == pytest.approx(expected.relative_error, rel=1e-12)


def test_compare_summary_is_size_weighted(comparison):
    numel = {o["name"]: None for o in comparison.optimum}
    for row in comparison.rows:
        numel[row.name] = row.matrix_shape[0] * row.matrix_shape[1]
    for summary in comparison.summary:
        rows = [r for r in comparison.rows if r.method == summary.method]
        weight = sum(numel[r.name] for r in rows)
        expected = sum(r.relative_error * numel[r.name] for r in rows) / weight
        assert summary.weighted_error == pytest.approx(expected, rel=1e-12)
        assert summary.numbers_stored == sum(r.numbers_stored for r in rows)


def test_compare_gram_and_svd_optima_agree(moments):
    a = compare_methods(moments, ["svd"], exact="svd", dtype="float64")
    b = compare_methods(moments, ["svd"], exact="gram", dtype="float64")
    for x, y in zip(a.optimum, b.optimum, strict=True):
        assert x["error"] == pytest.approx(y["error"], abs=1e-10)
        assert x["rank1_error"] == pytest.approx(y["rank1_error"], abs=1e-10)


def test_compare_in_float32_stays_close(moments):
    report = compare_methods(moments[:1], ["svd", "srsi", "adafactor"], rank=4, dtype="float32")
    for row in report.rows:
        assert row.vs_optimum >= 1 - 1e-4


def test_compare_rejects_unknown_methods(moments):
    with pytest.raises(InputError, match="unknown nope"):
        compare_methods(moments, ["svd", "nope"])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rank": 0}, "rank 0: must be an integer >= 1"),
        ({"oversample": -1}, "oversample -1: must be an integer >= 0"),
        ({"power_iters": -1}, "power_iters -1: must be an integer >= 0"),
        ({"exact": "qr"}, "exact must be auto, svd or gram, got 'qr'"),
    ],
)
def test_bad_settings_are_named_as_python_spells_them(settings, message):
    with pytest.raises(ParameterError, match=f"^{message}$") as caught:
        compare_methods([("w", torch.rand(4, 3))], ["svd"], **settings)
    assert caught.value.parameter == next(iter(settings))


def test_factors_larger_than_the_dense_state_are_found():
    # rank 3 on a 4 x 3 matrix: 3 x (4 + 3) = 21 numbers for 12 dense ones; rank 1 stores 7.
    v = torch.rand(4, 3, dtype=torch.float64)
    assert compare_methods([("w", v)], ["svd"], rank=3).larger_than_dense() == {"w": (4, 3)}
    assert compare_methods([("w", v)], ["svd"], rank=1).larger_than_dense() == {}
