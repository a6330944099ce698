"""``estimate_memory`` and the shape-only plans against ground truth: exact tails and hand counts."""

from __future__ import annotations

import math

import pytest
import torch
from moment_factories import sample_moments, second_moment, truth

from adapprox_cli import lowrank
from adapprox_cli.analysis.estimate import (
    estimate_memory,
    estimate_preset,
    estimate_shapes,
    simulate_adaptive_rank,
)
from adapprox_cli.errors import ParameterError
from adapprox_cli.optim import is_factored


@pytest.fixture(scope="module")
def moments() -> list[tuple[str, torch.Tensor]]:
    return sample_moments()


def test_estimate_exact_rule_is_the_smallest_rank_within_tolerance(moments):
    report = estimate_memory(moments, tolerances=[0.3, 0.1, 0.02], dtype="float64")
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
    exact = estimate_memory(moments, tolerances=[0.3, 0.2, 0.01], dtype="float64")
    randomized = estimate_memory(moments, tolerances=[0.3, 0.2, 0.01], rule="as-rsi", dtype="float64")
    assert exact.matrices[0].ranks == {0.01: 12, 0.2: 3, 0.3: 2}
    assert randomized.matrices[0].ranks == exact.matrices[0].ranks
    for tol in (0.3, 0.2, 0.01):
        assert randomized.matrices[0].errors[tol] == pytest.approx(exact.matrices[0].errors[tol], rel=1e-6)


def test_simulate_adaptive_rank_grows_by_the_oversampling():
    v = second_moment(200, 80, 9, noise=0.3)
    exact_tail = truth(v)["tail"]
    target = next(r for r in range(1, len(exact_tail)) if exact_tail[r] <= 0.1)
    rank, error, rounds = simulate_adaptive_rank(
        v, 0.1, oversample=5, generator=torch.Generator().manual_seed(1)
    )
    assert target <= rank <= target + 1
    assert error <= 0.1 or rank == lowrank.default_rank_max(200, 80)
    assert rounds >= math.ceil(target / 5)


def test_estimate_memory_rows_by_hand():
    a, b = second_moment(64, 16, 1), second_moment(16, 64, 2)
    moments = [("mlp.c_fc.weight", a), ("mlp.c_fc.bias", torch.rand(64)), ("mlp.c_proj.weight", b)]
    report = estimate_memory(moments, tolerances=[0.1], fixed_ranks=[2], galore_rank=8, bytes_per_number=2)
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
    report = estimate_memory([("w", second_moment(120, 40, 3, noise=1.0))], tolerances=[0.001], rank_max=3)
    (ranks,) = report.matrices
    assert ranks.rank_max == 3 and ranks.ranks[0.001] == 3 and ranks.capped[0.001]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rule": "guess"}, "rule must be exact or as-rsi, got 'guess'"),
        ({"tolerances": [0.1, 1.5]}, r"tolerances values must be in \[0, 1\), got 1.5, 0.1"),
        ({"tolerances": []}, r"tolerances values must be in \[0, 1\), got none"),
        ({"rank_max": 0}, "rank_max 0: must be an integer >= 1"),
        ({"fixed_ranks": [2, 0]}, "fixed_ranks 0: must be an integer >= 1"),
    ],
)
def test_bad_settings_are_named_as_python_spells_them(settings, message):
    with pytest.raises(ParameterError, match=f"^{message}$") as caught:
        estimate_memory([("w", torch.rand(8, 8))], **settings)
    assert caught.value.parameter == next(iter(settings))


def test_bad_plans_are_named_as_python_spells_them():
    with pytest.raises(ParameterError, match=r"^preset must be one of gpt2-124m, .* got 'gpt5'$"):
        estimate_preset("gpt5")
    with pytest.raises(ParameterError, match=r"^ranks 0: must be an integer >= 1$"):
        estimate_shapes([("w", (8, 8))], "w", ranks=(0,))
