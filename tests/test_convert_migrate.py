"""State-dict migration (``convert.migrate``): ground truth is the exact SVD and real optimizers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapprox_cli.convert.migrate import (
    adamw_to_adafactor,
    adamw_to_adapprox,
    adapprox_to_adamw,
    factor_second_moment,
)
from adapprox_cli.errors import InputError, UnsupportedStateError
from adapprox_cli.lowrank import relative_error, truncated_svd
from adapprox_cli.optim import Adapprox


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 40), nn.LayerNorm(40))


def _loss(model: nn.Module, seed: int) -> torch.Tensor:
    x = torch.randn(16, 48, generator=torch.Generator().manual_seed(seed))
    return model(x).pow(2).mean()


def _adamw_state(model: nn.Module, steps: int = 12) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.99),
    )
    for i in range(steps):
        opt.zero_grad()
        _loss(model, i).backward()
        opt.step()
    return opt


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int = 99) -> None:
    opt.zero_grad()
    _loss(model, seed).backward()
    opt.step()


# --------------------------------------------------------------------------- factoring


def test_adaptive_rank_is_smallest_rank_within_tol_by_exact_svd():
    g = torch.Generator().manual_seed(0)
    # A non-negative matrix with a decaying spectrum: a few strong directions plus small noise.
    left, right = (
        torch.rand(80, 6, generator=g, dtype=torch.float64),
        torch.rand(6, 50, generator=g, dtype=torch.float64),
    )
    scales = torch.tensor([1.0, 0.5, 0.25, 0.12, 0.06, 0.03], dtype=torch.float64)
    v = (left * scales) @ right + 1e-4 * torch.rand(80, 50, generator=g, dtype=torch.float64)
    exact = truncated_svd(v, 1).relative_errors
    for tol in (0.2, 0.05, 0.01, 0.002):
        q, u = factor_second_moment(v, tol=tol, generator=torch.Generator().manual_seed(1))
        expected = next(r for r in range(1, 13) if exact[r - 1] <= tol) if exact[11] <= tol else 12
        assert q.shape[1] == expected, tol
        # The factors are as good as the exact truncated SVD at that rank.
        assert relative_error(v, q @ u.T) <= float(exact[q.shape[1] - 1]) * 1.01 + 1e-12


def test_fixed_rank_is_clamped_to_k_max():
    v = torch.rand(64, 32, dtype=torch.float64)
    q, u = factor_second_moment(v, tol=0.0, rank=100)
    assert q.shape == (64, 8) and u.shape == (32, 8)


# --------------------------------------------------------------------------- round trip


def test_round_trip_adamw_adapprox_adamw():
    model = _tiny_model()
    opt = _adamw_state(model)
    source = opt.state_dict()
    new, report = adamw_to_adapprox(source, tol=0.05)

    # Every factored matrix: exp_avg carried bit for bit, step kept, error as reported and measured.
    assert [m.index for m in report.matrices] == [0, 1]
    for m in report.matrices:
        old, state = source["state"][m.index], new["state"][m.index]
        assert torch.equal(state["exp_avg"], old["exp_avg"])
        assert float(state["step"]) == float(old["step"]) == 12.0
        assert state["step"].dtype == torch.float32 and state["step"].dim() == 0
        q, u = state["exp_avg_sq_q"], state["exp_avg_sq_u"]
        assert q.dtype == torch.float32 and q.shape[1] == m.rank <= m.rank_max
        v = old["exp_avg_sq"].double()
        measured = relative_error(v, torch.clamp(q.double() @ u.double().T, min=0))
        assert measured == pytest.approx(m.relative_error, rel=1e-9, abs=1e-12)
        # The unclamped product is never better than the Eckart-Young optimum at that rank, and
        # clamping at zero only moves a non-negative V's approximation closer.
        unclamped = relative_error(v, q.double() @ u.double().T)
        assert unclamped >= float(truncated_svd(v, m.rank).error) - 1e-6
        assert m.relative_error <= unclamped + 1e-12
    assert report.dense_params == 4 and report.bytes_after < report.bytes_before

    # Groups carry the hyper-parameters and every Adapprox setting.
    defaults = Adapprox([torch.zeros(1)]).defaults
    for old_group, group in zip(source["param_groups"], new["param_groups"]):
        assert set(defaults) <= set(group)
        assert group["lr"] == old_group["lr"] and group["betas"] == old_group["betas"]
        assert group["weight_decay"] == old_group["weight_decay"] and group["tol"] == 0.05

    # A fresh Adapprox over the same parameters loads and steps.
    adapprox = Adapprox(model.parameters())
    adapprox.param_groups = []  # rebuilt with the same two-group split as the source
    for group in opt.param_groups:
        adapprox.add_param_group({"params": group["params"]})
    adapprox.load_state_dict(new)
    assert adapprox.ranks() == {m.index: m.rank for m in report.matrices}
    _step(model, adapprox)
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # Rollback: the multiplied-out factors are the clamped product, a fresh AdamW loads and steps.
    back, back_report = adapprox_to_adamw(new)
    assert back_report.target_optimizer == "adamw"
    for m in report.matrices:
        v_old = source["state"][m.index]["exp_avg_sq"].double()
        v_back = back["state"][m.index]["exp_avg_sq"]
        assert v_back.shape == v_old.shape and bool((v_back >= 0).all())
        assert relative_error(v_old, v_back.double()) <= m.relative_error + 1e-6
        assert torch.equal(back["state"][m.index]["exp_avg"], source["state"][m.index]["exp_avg"])
    adamw = torch.optim.AdamW(opt.param_groups)
    adamw.load_state_dict(back)
    _step(model, adamw)
    assert set(adamw.param_groups[0]) >= set(torch.optim.AdamW([torch.zeros(1)]).defaults)


def test_rollback_reports_the_groups_own_rank_max():
    # Weights 96x48 and 40x96: the default k_max would be 12 and 10; the group caps both at 3.
    model = _tiny_model()
    weights = [p for p in model.parameters() if p.dim() >= 2]
    opt = Adapprox(
        [{"params": weights, "rank_max": 3}, {"params": [p for p in model.parameters() if p.dim() < 2]}]
    )
    _step(model, opt)
    _, report = adapprox_to_adamw(opt.state_dict())
    assert [(m.shape, m.rank_max) for m in report.matrices] == [((96, 48), 3), ((40, 96), 3)]
    assert all(m.rank <= 3 for m in report.matrices)


def test_beta1_zero_drops_first_moment_and_rollback_restores_zeros():
    model = _tiny_model()
    source = _adamw_state(model, steps=3).state_dict()
    new, _ = adamw_to_adapprox(source, beta1=0.0)
    assert all("exp_avg" not in s for s in new["state"].values())
    assert all(g["betas"][0] == 0.0 for g in new["param_groups"])
    back, report = adapprox_to_adamw(new)
    assert all(torch.count_nonzero(s["exp_avg"]) == 0 for s in back["state"].values())
    assert any("first moment" in w for w in report.warnings)


def test_bf16_first_moment_is_carried_in_its_own_precision():
    source = _adamw_state(_tiny_model(), steps=2).state_dict()
    for s in source["state"].values():
        s["exp_avg"] = s["exp_avg"].to(torch.bfloat16)
    new, _ = adamw_to_adapprox(source)
    assert new["state"][0]["exp_avg"].dtype == torch.bfloat16
    assert new["param_groups"][0]["first_moment_dtype"] == "bfloat16"


def test_sparse_state_and_refused_states():
    model = _tiny_model()
    opt = _adamw_state(model, steps=1)
    source = opt.state_dict()
    del source["state"][1]  # a parameter that never got a gradient has no state
    new, report = adamw_to_adapprox(source)
    assert 1 not in new["state"] and [m.index for m in report.matrices] == [0]
    with pytest.raises(UnsupportedStateError, match="momentum_buffer"):
        adamw_to_adapprox(
            {"state": {0: {"momentum_buffer": torch.zeros(2)}}, "param_groups": [{"params": [0]}]}
        )
    with pytest.raises(InputError, match="state dict"):
        adamw_to_adapprox({"state": []})


def test_adafactor_seed_matches_adafactor_statistics():
    source = _adamw_state(_tiny_model(), steps=2).state_dict()
    state = adamw_to_adafactor(source)
    v = source["state"][0]["exp_avg_sq"]
    assert torch.allclose(state["state"][0]["row_var"], v.mean(dim=-1, keepdim=True))
    assert torch.allclose(state["state"][0]["col_var"], v.mean(dim=-2, keepdim=True))
    model = _tiny_model()
    params = [p for p in model.parameters() if p.dim() >= 2], [p for p in model.parameters() if p.dim() < 2]
    adafactor = torch.optim.Adafactor([{"params": params[0]}, {"params": params[1]}])
    adafactor.load_state_dict(state)
    _step(model, adafactor)


def test_conversion_reports_progress_per_parameter():
    model = _tiny_model()
    opt = _adamw_state(model, steps=2)
    calls = []
    names = {i: f"p{i}" for i in range(6)}  # two Linear layers and a LayerNorm: 6 parameters
    adamw_to_adapprox(opt.state_dict(), names=names, progress=lambda *call: calls.append(call))
    assert calls == [(i, 6, f"p{i}") for i in range(6)] + [(6, 6, "")]
    with pytest.raises(InputError, match=r"tol 2: must be in \[0, 1\)"):
        adamw_to_adapprox(opt.state_dict(), tol=2)
