"""``spectrum_report`` against ground truth: exact float64 SVDs, and the bounds a sketch obeys."""

from __future__ import annotations

import math

import pytest
import torch
from moment_factories import sample_moments, second_moment, truth

from adapprox_cli import lowrank
from adapprox_cli.analysis.compare import compare_methods
from adapprox_cli.analysis.moments import Moment
from adapprox_cli.analysis.spectrum import spectrum_report
from adapprox_cli.errors import InputError, ParameterError


@pytest.fixture(scope="module")
def moments() -> list[tuple[str, torch.Tensor]]:
    return sample_moments()


@pytest.mark.parametrize("method", ["svd", "gram", "auto"])
def test_spectrum_exact_matches_svd(moments, method):
    report = spectrum_report(moments, top=60, method=method, dtype="float64")
    assert report.skipped == ["transformer.h.0.mlp.c_fc.bias"]
    assert [m.name for m in report.matrices] == [n for n, t in moments if t.ndim >= 2]
    for spectrum, (_, v) in zip(report.matrices, [p for p in moments if p[1].ndim >= 2], strict=True):
        t = truth(v)
        assert spectrum.matrix_shape == lowrank.matrix_view_shape(v.shape)
        assert spectrum.method == ("svd" if method == "auto" else method)
        k = min(60, len(t["s"]))
        torch.testing.assert_close(
            torch.tensor(spectrum.singular_values, dtype=torch.float64), t["s"][:k], rtol=1e-9, atol=0
        )
        assert spectrum.frobenius_norm == pytest.approx(math.sqrt(t["fro2"]), rel=1e-12)
        assert spectrum.stable_rank == pytest.approx(t["stable_rank"], rel=1e-9)
        for top in (1, 5, 20):
            assert spectrum.energy_share[top] == pytest.approx(t["energy"][top], abs=1e-9)
        assert spectrum.rank_for_energy_99 == t["rank_99"]
        assert spectrum.rank_for_error == t["rank_for"]
        assert spectrum.ranks_known_up_to == len(t["s"])


def test_spectrum_sketch_bounds_the_exact_values():
    v = second_moment(600, 200, 11, noise=0.2)
    t = truth(v)
    report = spectrum_report(
        [("w", v)], top=30, method="sketch", oversample=10, power_iters=3, dtype="float64"
    )
    (spectrum,) = report.matrices
    assert spectrum.method == "sketch" and spectrum.ranks_known_up_to == 40
    sketch = torch.tensor(spectrum.singular_values, dtype=torch.float64)
    assert len(sketch) == 30
    torch.testing.assert_close(sketch[:10], t["s"][:10], rtol=1e-6, atol=0)
    assert bool((sketch <= t["s"][:30] * (1 + 1e-12)).all())  # Ritz values never exceed the truth
    for top in (1, 5, 20):  # shares captured by the sketch: lower bounds, and tight at the top
        assert spectrum.energy_share[top] <= t["energy"][top] + 1e-12
        assert spectrum.energy_share[top] == pytest.approx(t["energy"][top], abs=1e-4)
    for tol, rank in spectrum.rank_for_error.items():
        if rank is None:
            assert t["rank_for"][tol] > 30  # beyond the sketch only if the truth is far out too
        else:
            assert t["rank_for"][tol] <= rank <= t["rank_for"][tol] + 1


def test_spectrum_auto_uses_a_sketch_for_large_matrices_only():
    big = second_moment(2048, 160, 5)
    report = spectrum_report([("big", big), ("small", second_moment(30, 20, 6))], top=20, oversample=5)
    assert [m.method for m in report.matrices] == ["sketch", "svd"]
    big_spectrum = report.matrices[0]
    assert big_spectrum.ranks_known_up_to == 25
    assert big_spectrum.singular_values[0] == pytest.approx(float(torch.linalg.svdvals(big)[0]), rel=1e-5)


def test_spectrum_of_a_zero_matrix_and_of_a_first_moment():
    signed = torch.randn(30, 20, dtype=torch.float64)
    report = spectrum_report([("zero", torch.zeros(10, 8)), ("signed", signed)], dtype="float64")
    zero, first = report.matrices
    assert zero.stable_rank is None and zero.rank_for_error == {0.1: 0, 0.05: 0, 0.01: 0}
    assert first.singular_values[0] == pytest.approx(float(torch.linalg.svdvals(signed)[0]), rel=1e-12)


def test_moments_are_loaded_one_at_a_time_and_vectors_never():
    calls = []

    def loader(name, tensor):
        def load():
            calls.append(name)
            return tensor

        return Moment(name, tuple(tensor.shape), load)

    items = [
        loader("a", second_moment(20, 10, 1)),
        loader("b", torch.rand(10)),
        loader("c", second_moment(12, 9, 2)),
    ]
    spectrum_report(items)
    assert calls == ["a", "c"]


def test_vectors_only_and_nan_are_refused():
    with pytest.raises(InputError, match="nothing to analyse"):
        spectrum_report([("b", torch.rand(5))])
    bad = torch.rand(20, 10)
    bad[3, 4] = float("nan")
    with pytest.raises(InputError, match="w: the moment contains NaN"):
        compare_methods([("w", bad)])


def test_half_precision_states_are_upcast():
    v = second_moment(40, 20, 4).to(torch.bfloat16)
    report = spectrum_report([("w", v)], dtype="float32")
    expected = float(torch.linalg.svdvals(v.float())[0])
    assert report.matrices[0].singular_values[0] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "magic"}, "method must be one of auto, svd, gram, sketch, got 'magic'"),
        ({"top": 0}, "top 0: must be an integer >= 1"),
        ({"oversample": -1}, "oversample -1: must be an integer >= 0"),
        ({"power_iters": -2}, "power_iters -2: must be an integer >= 0"),
    ],
)
def test_bad_settings_are_named_as_python_spells_them(settings, message):
    with pytest.raises(ParameterError, match=f"^{message}$") as caught:
        spectrum_report([("w", torch.rand(4, 3))], **settings)
    assert caught.value.parameter == next(iter(settings))
