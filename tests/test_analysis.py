"""The analysis library against ground truth: exact SVDs in float64, Eckart-Young, hand counts."""

from __future__ import annotations

import math

import pytest
import torch

from adapprox_cli import analysis, lowrank
from adapprox_cli.errors import InputError
from adapprox_cli.methods import ApproximationSettings, approximate
from adapprox_cli.optim import is_factored

# --------------------------------------------------------------------------- fixtures


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


@pytest.fixture(scope="module")
def moments() -> list[tuple[str, torch.Tensor]]:
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


# --------------------------------------------------------------------------- exact spectra


@pytest.mark.parametrize("shape", [(120, 40), (40, 120), (64, 64)])
def test_gram_eigenvalues_match_svd(shape):
    v = second_moment(*shape, seed=7)
    s = torch.linalg.svdvals(v)
    lam = analysis.gram_eigenvalues(v)
    assert lam.dtype == torch.float64 and lam.shape == s.shape
    # A Gram eigenvalue is exact to about eps64 * sigma_1^2, so its square root is exact to
    # sqrt(eps64) * sigma_1 for the smallest singular values and to 1e-9 relative for the rest.
    torch.testing.assert_close(lam.sqrt(), s, rtol=1e-9, atol=1e-7 * float(s[0]))
    # Truncation errors from both agree to 1e-9 at every rank.
    fro2 = float(v.square().sum())
    torch.testing.assert_close(
        analysis.tail_errors(lam, fro2), analysis.tail_errors(s.square(), fro2), rtol=0, atol=1e-9
    )


def test_gram_squares_the_condition_number_but_keeps_what_matters():
    # Singular values from 1 down to 1e-7: the Gram matrix holds them squared (1 .. 1e-14).
    g = torch.Generator().manual_seed(0)
    q1 = torch.linalg.qr(torch.randn(300, 40, generator=g, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -7, 40, dtype=torch.float64)
    v = (q1 * s) @ q2.T
    lam = analysis.gram_eigenvalues(v)
    from_gram = lam.sqrt()
    big = s >= 1e-3
    torch.testing.assert_close(from_gram[big], s[big], rtol=1e-8, atol=0)
    mid = (s >= 1e-6) & ~big
    torch.testing.assert_close(from_gram[mid], s[mid], rtol=1e-3, atol=0)
    # Below ~1e-7 sigma_1 the values are noise, but the errors they imply stay exact to 1e-12.
    fro2 = float(s.square().sum())
    exact = analysis.tail_errors(s.square(), fro2)
    torch.testing.assert_close(analysis.tail_errors(lam, fro2), exact, rtol=0, atol=1e-7)
    assert float((analysis.tail_errors(lam, fro2) - exact).abs()[:20].max()) < 1e-12


def test_tail_errors_are_eckart_young():
    s2 = torch.tensor([9.0, 4.0, 1.0], dtype=torch.float64)
    errors = analysis.tail_errors(s2, 14.0)
    expected = [1.0, math.sqrt(5 / 14), math.sqrt(1 / 14), 0.0]
    torch.testing.assert_close(errors, torch.tensor(expected, dtype=torch.float64))
    assert analysis.tail_errors(s2, 0.0).tolist() == [0.0] * 4


# --------------------------------------------------------------------------- spectrum


@pytest.mark.parametrize("method", ["svd", "gram", "auto"])
def test_spectrum_exact_matches_svd(moments, method):
    report = analysis.spectrum_report(moments, top=60, method=method, dtype="float64")
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
    report = analysis.spectrum_report(
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
    report = analysis.spectrum_report(
        [("big", big), ("small", second_moment(30, 20, 6))], top=20, oversample=5
    )
    assert [m.method for m in report.matrices] == ["sketch", "svd"]
    big_spectrum = report.matrices[0]
    assert big_spectrum.ranks_known_up_to == 25
    assert big_spectrum.singular_values[0] == pytest.approx(float(torch.linalg.svdvals(big)[0]), rel=1e-5)


def test_spectrum_of_a_zero_matrix_and_of_a_first_moment():
    signed = torch.randn(30, 20, dtype=torch.float64)
    report = analysis.spectrum_report([("zero", torch.zeros(10, 8)), ("signed", signed)], dtype="float64")
    zero, first = report.matrices
    assert zero.stable_rank is None and zero.rank_for_error == {0.1: 0, 0.05: 0, 0.01: 0}
    assert first.singular_values[0] == pytest.approx(float(torch.linalg.svdvals(signed)[0]), rel=1e-12)


def test_moments_are_loaded_one_at_a_time_and_vectors_never():
    calls = []

    def loader(name, tensor):
        def load():
            calls.append(name)
            return tensor

        return analysis.Moment(name, tuple(tensor.shape), load)

    items = [
        loader("a", second_moment(20, 10, 1)),
        loader("b", torch.rand(10)),
        loader("c", second_moment(12, 9, 2)),
    ]
    analysis.spectrum_report(items)
    assert calls == ["a", "c"]


# --------------------------------------------------------------------------- compare


@pytest.fixture(scope="module")
def comparison(moments):
    return analysis.compare_methods(moments, rank=4, dtype="float64", num_heads=4, seed=3)


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
    assert len(comparison.rows) == 4 * len(analysis.DEFAULT_METHODS)
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
    report = analysis.compare_methods(
        [("attn.q_proj.weight", q)], ["adam_mini"], num_heads=4, dtype="float64"
    )
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
    a = analysis.compare_methods(moments, ["svd"], exact="svd", dtype="float64")
    b = analysis.compare_methods(moments, ["svd"], exact="gram", dtype="float64")
    for x, y in zip(a.optimum, b.optimum, strict=True):
        assert x["error"] == pytest.approx(y["error"], abs=1e-10)
        assert x["rank1_error"] == pytest.approx(y["rank1_error"], abs=1e-10)


def test_compare_in_float32_stays_close(moments):
    report = analysis.compare_methods(moments[:1], ["svd", "srsi", "adafactor"], rank=4, dtype="float32")
    for row in report.rows:
        assert row.vs_optimum >= 1 - 1e-4


def test_compare_rejects_unknown_methods(moments):
    with pytest.raises(InputError, match="unknown nope"):
        analysis.compare_methods(moments, ["svd", "nope"])


# --------------------------------------------------------------------------- estimate


def test_estimate_exact_rule_is_the_smallest_rank_within_tolerance(moments):
    report = analysis.estimate_memory(moments, tolerances=[0.3, 0.1, 0.02], dtype="float64")
    factored = [(n, v) for n, v in moments if v.ndim >= 2 and is_factored(tuple(v.shape), None)]
    assert [m.name for m in report.matrices] == [n for n, _ in factored]
    for ranks, (_, v) in zip(report.matrices, factored, strict=True):
        t = truth(v)
        k_max = lowrank.default_rank_max(*lowrank.matrix_view_shape(v.shape))
        assert ranks.rank_max == k_max
        for tol in (0.3, 0.1, 0.02):
            smallest = next(r for r in range(1, len(t["tail"])) if t["tail"][r] <= tol)
            assert ranks.ranks[tol] == min(smallest, k_max)
            assert ranks.capped[tol] == (smallest > k_max)
            assert ranks.errors[tol] == pytest.approx(t["tail"][ranks.ranks[tol]], abs=1e-10)


def test_estimate_as_rsi_settles_on_the_exact_rank():
    # A clear spectral gap at every tolerance: the randomized rule must find the same ranks.
    g = torch.Generator().manual_seed(0)
    q1 = torch.linalg.qr(torch.randn(400, 100, generator=g, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(100, 100, generator=g, dtype=torch.float64)).Q
    s = torch.cat([torch.tensor([10.0, 3.0, 2.0]), torch.full((9,), 0.5), torch.full((88,), 0.01)]).double()
    v = (q1 * s) @ q2.T
    moments = [("w", v)]
    # err(2) = 0.233, err(3) = 0.140, err(11) = 0.047, err(12) = 0.0087
    exact = analysis.estimate_memory(moments, tolerances=[0.3, 0.2, 0.01], dtype="float64")
    randomized = analysis.estimate_memory(
        moments, tolerances=[0.3, 0.2, 0.01], rule="as-rsi", dtype="float64"
    )
    assert exact.matrices[0].ranks == {0.01: 12, 0.2: 3, 0.3: 2}
    assert randomized.matrices[0].ranks == exact.matrices[0].ranks
    for tol in (0.3, 0.2, 0.01):
        assert randomized.matrices[0].errors[tol] == pytest.approx(exact.matrices[0].errors[tol], rel=1e-6)


def test_simulate_adaptive_rank_grows_by_the_oversampling():
    v = second_moment(200, 80, 9, noise=0.3)
    exact_tail = truth(v)["tail"]
    target = next(r for r in range(1, len(exact_tail)) if exact_tail[r] <= 0.1)
    rank, error, rounds = analysis.simulate_adaptive_rank(
        v, 0.1, oversample=5, generator=torch.Generator().manual_seed(1)
    )
    assert target <= rank <= target + 1
    assert error <= 0.1 or rank == lowrank.default_rank_max(200, 80)
    assert rounds >= math.ceil(target / 5)


def test_estimate_memory_rows_by_hand():
    a, b = second_moment(64, 16, 1), second_moment(16, 64, 2)
    moments = [("mlp.c_fc.weight", a), ("mlp.c_fc.bias", torch.rand(64)), ("mlp.c_proj.weight", b)]
    report = analysis.estimate_memory(
        moments, tolerances=[0.1], fixed_ranks=[2], galore_rank=8, bytes_per_number=2
    )
    ranks = [m.ranks[0.1] for m in report.matrices]
    n = 64 * 16 * 2 + 64
    rows = {(r.optimizer, r.setting): r for r in report.memory}
    assert report.parameters == n
    assert rows[("adamw", "")].numbers == 2 * n and rows[("adamw", "")].bytes == 4 * n
    assert rows[("adapprox", "tol=0.1")].numbers == n + sum(k * 80 for k in ranks) + 64
    assert rows[("adapprox_no_m", "tol=0.1")].numbers == sum(k * 80 for k in ranks) + 64
    assert rows[("adapprox", "k=2")].numbers == n + 2 * 80 * 2 + 64
    assert rows[("galore", "r=8")].numbers == 2 * 8 * (2 * 64 + 16) + 128
    assert rows[("adafactor", "")].numbers == 80 + 64 + 80
    assert rows[("smmf", "")].bits == n
    saving = 100 * (1 - rows[("adapprox", "k=2")].bytes / rows[("adamw", "")].bytes)
    assert rows[("adapprox", "k=2")].saving_percent == pytest.approx(saving)


def test_estimate_rank_max_caps_ranks():
    report = analysis.estimate_memory(
        [("w", second_moment(120, 40, 3, noise=1.0))], tolerances=[0.001], rank_max=3
    )
    (ranks,) = report.matrices
    assert ranks.rank_max == 3 and ranks.ranks[0.001] == 3 and ranks.capped[0.001]


# --------------------------------------------------------------------------- inputs and errors


def test_select_moments_by_regex(moments):
    chosen = analysis.select_moments(analysis.as_moments(moments), r"mlp\.c_")
    assert [m.name for m in chosen] == [n for n, _ in moments if "mlp.c_" in n]
    with pytest.raises(InputError, match="not a valid regular expression"):
        analysis.select_moments(analysis.as_moments(moments), "(")
    with pytest.raises(InputError, match="matches none of the 5 parameters"):
        analysis.select_moments(analysis.as_moments(moments), "lm_head")


def test_device_and_dtype_resolution():
    assert analysis.resolve_device("cpu") == torch.device("cpu")
    assert analysis.resolve_dtype("float64") is torch.float64
    with pytest.raises(InputError, match="--dtype"):
        analysis.resolve_dtype("bfloat16")
    with pytest.raises(InputError, match="--device"):
        analysis.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            analysis.resolve_device("cuda:0")


def test_vectors_only_and_nan_are_refused():
    with pytest.raises(InputError, match="nothing to analyse"):
        analysis.spectrum_report([("b", torch.rand(5))])
    bad = torch.rand(20, 10)
    bad[3, 4] = float("nan")
    with pytest.raises(InputError, match="w: the moment contains NaN"):
        analysis.compare_methods([("w", bad)])


def test_half_precision_states_are_upcast():
    v = second_moment(40, 20, 4).to(torch.bfloat16)
    report = analysis.spectrum_report([("w", v)], dtype="float32")
    expected = float(torch.linalg.svdvals(v.float())[0])
    assert report.matrices[0].singular_values[0] == pytest.approx(expected, rel=1e-5)


def test_reports_serialize(moments, comparison):
    import json

    spectrum = analysis.spectrum_report(moments)
    estimate = analysis.estimate_memory(moments, tolerances=[0.1, 0.05])
    for report in (spectrum, comparison, estimate, analysis.estimate_preset("gpt2-124m")):
        text = json.dumps(report.to_dict(), default=str)
        assert json.loads(text)
    data = spectrum.to_dict()["matrices"][0]
    assert set(data["energy_share"]) == {"top1", "top5", "top20"}
    assert set(data["rank_for_error"]) == {"0.1", "0.05", "0.01"}


# --------------------------------------------------------------------------- plots


def test_plots_write_png_files(tmp_path, moments, comparison):
    from adapprox_cli import plots

    spectrum = analysis.spectrum_report(moments)
    estimate = analysis.estimate_memory(moments, tolerances=[0.2, 0.1, 0.05])
    for kind, report in [
        ("spectrum", spectrum),
        ("compare", comparison),
        ("estimate", estimate),
        ("estimate", analysis.estimate_preset("gpt2-355m")),
    ]:
        path = tmp_path / f"{kind}-{id(report)}.png"
        assert getattr(plots, f"plot_{kind}")(report, path) == path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".png"] * 4  # no temporary files left
    with pytest.raises(InputError, match="unknown image format"):
        plots.plot_spectrum(spectrum, tmp_path / "figure.bmp")
    with pytest.raises(InputError, match="does not exist"):
        plots.plot_spectrum(spectrum, tmp_path / "missing" / "figure.png")


def test_representative_names_pick_one_per_kind():
    from adapprox_cli.plots import representative_names

    names = ["wte", "wpe"] + [f"h.{i}.{k}" for i in range(12) for k in ("attn", "mlp")]
    assert representative_names(names, 8) == ["wte", "wpe", "h.0.attn", "h.0.mlp"]
    assert representative_names(names[:3], 8) == names[:3]
