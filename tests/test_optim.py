"""Adapprox against a reference written from the algorithm, and the properties torch checks
every optimizer for. Every test runs on the CPU, and on CUDA when a GPU is present."""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import adapprox_cli.optim as optim_module
from adapprox_cli.lowrank import DENSE_SKETCH_KEY, dense_sketch_test_matrix
from adapprox_cli.optim import Adapprox, adapprox, is_factored

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)


@pytest.fixture(autouse=True, params=[False, True], ids=["loop", "foreach"])
def implementation(request, monkeypatch):
    """Every test runs on both implementations: the loop and the batched multi-tensor path
    (what ``foreach=None`` would pick is overridden; explicit ``foreach=`` still wins)."""
    monkeypatch.setattr(optim_module, "_default_to_multi_tensor", lambda params: request.param)
    return request.param


# --------------------------------------------------------------------------- reference


def structured_gradients(
    m: int, n: int, steps: int, seed: int, dtype=torch.float64, noise=0.01
) -> list[torch.Tensor]:
    """Gradients with per-row/per-column scales, two directions and a little noise, so that the
    second moment has a clear spectral gap (S-RSI then finds the exact SVD subspace)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(m, 1, generator=g, dtype=dtype) * 2 + 0.1
    cols = torch.rand(1, n, generator=g, dtype=dtype) * 2 + 0.1
    out = []
    for _ in range(steps):
        low = torch.randn(m, 2, generator=g, dtype=dtype) @ torch.randn(2, n, generator=g, dtype=dtype)
        out.append(rows * cols * (low + noise * torch.randn(m, n, generator=g, dtype=dtype)))
    return out


def reference_step(
    w, g, state, *, lr, beta1, beta2, eps, wd, clip, tol, k_max, oversample, first_moment, rule="step"
):
    """One Adapprox step written straight from the algorithm notes (§4-5): dense V rebuilt from
    the previous factors, the exact truncated SVD at the rank the rule picks. Rule "step": one
    step's truncation error of V; rule "dense": the distance to the dense EMA D (kept exactly
    here) as seen through the 4-column test matrix ``state["omega"]``, ||(D - V_r) Omega|| /
    (sqrt(4) ||V||), with any rank up to k_max allowed at the first step."""
    v_prev = torch.clamp(state["approx"], min=0)
    v = beta2 * v_prev + (1 - beta2) * g * g
    state["dense"] = beta2 * state["dense"] + (1 - beta2) * g * g
    u, sv, vh = torch.linalg.svd(v, full_matrices=False)
    total = (v * v).sum()
    if rule == "step":
        errors = [
            math.sqrt(max(float(total - (sv[:r] ** 2).sum()), 0.0)) / math.sqrt(float(total))
            for r in range(1, len(sv) + 1)
        ]
    else:
        omega = state["omega"]
        # The sketch lives on the smaller side: (D - V_r)^T Omega for a tall matrix.
        side = (lambda x: x.T) if v.shape[0] > v.shape[1] else (lambda x: x)
        errors = [
            float(
                torch.linalg.matrix_norm(side(state["dense"] - (u[:, :r] * sv[:r]) @ vh[:r]) @ omega)
                / torch.sqrt(omega.shape[1] * total)
            )
            for r in range(1, len(sv) + 1)
        ]
    k = state["rank"]
    first = state.setdefault("steps", 0) == 0
    state["steps"] += 1
    top = k_max if rule == "dense" and first else min(k + oversample, k_max)
    new_k = next((r for r in range(1, top + 1) if errors[r - 1] <= tol), top)
    state["approx"] = (u[:, :new_k] * sv[:new_k]) @ vh[:new_k]
    state["rank"] = new_k

    def clipped(x):
        rms = x.norm() / math.sqrt(x.numel())
        return x / max(1.0, float(rms) / clip)

    denom = v.sqrt() + eps
    if beta1 > 0 and first_moment == "gradient":
        state["m"] = beta1 * state["m"] + (1 - beta1) * g
        d = clipped(state["m"] / denom)
    elif beta1 > 0:
        state["m"] = beta1 * state["m"] + (1 - beta1) * clipped(g / denom)
        d = state["m"]
    else:
        d = clipped(g / denom)
    return w - lr * (d + wd * w)


@pytest.mark.parametrize("rule", ["step", "dense"])
@pytest.mark.parametrize("first_moment", ["gradient", "update"])
@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_matches_reference_step_for_step(device, first_moment, beta1, rule):
    m, n, steps = 48, 40, 12
    settings = dict(lr=1e-2, eps=1e-8, wd=0.1, clip=1.0, tol=0.05, k_max=10, oversample=3, rule=rule)
    grads = structured_gradients(m, n, steps, seed=3)
    w0 = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    ref_w = w0.clone()
    ref_state = {
        "approx": torch.zeros(m, n, dtype=torch.float64),
        "rank": 1,
        "m": torch.zeros(m, n, dtype=torch.float64),
        "dense": torch.zeros(m, n, dtype=torch.float64),
        # the optimizer's Omega for parameter 0 and seed 0, on the larger side (48 rows)
        "omega": dense_sketch_test_matrix(m, seed=0, keys=(0, DENSE_SKETCH_KEY)).double(),
    }
    param = nn.Parameter(w0.clone().to(device))
    opt = Adapprox(
        [param],
        lr=settings["lr"],
        betas=(beta1, 0.99),
        eps=settings["eps"],
        weight_decay=settings["wd"],
        clip_threshold=settings["clip"],
        tol=settings["tol"],
        rank_max=settings["k_max"],
        oversample=settings["oversample"],
        power_iters=6,
        warm_start=False,
        first_moment=first_moment,
        rank_rule=rule,
    )
    ranks = []
    for g in grads:
        ref_w = reference_step(
            ref_w, g, ref_state, beta1=beta1, beta2=0.99, first_moment=first_moment, **settings
        )
        param.grad = g.to(device)
        opt.step()
        assert opt.ranks()[0] == ref_state["rank"]
        ranks.append(ref_state["rank"])
        torch.testing.assert_close(param.detach().cpu(), ref_w, rtol=1e-9, atol=1e-11)
    # the test is only meaningful if the rank actually moved
    assert len(set(ranks)) > 1


def test_full_rank_factored_path_equals_dense_path():
    m, n = 12, 9
    grads = structured_gradients(m, n, 10, seed=1)
    kwargs = dict(
        lr=1e-2,
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        weight_decay=0.01,
        clip_threshold=1.0,
        rank_min=1,
        rank_max=n,
        tol=0.0,
        oversample=2,
        power_iters=2,
        rank_interval=1,
        warm_start=True,
        cosine_guidance=False,
        first_moment="gradient",
        seed=0,
        maximize=False,
    )
    w_dense = torch.ones(m, n, dtype=torch.float64)
    w_factored = w_dense.clone()
    step = lambda: torch.tensor(0.0)
    dense = {
        "step": step(),
        "exp_avg": torch.zeros(m, n, dtype=torch.float64),
        "exp_avg_sq": torch.zeros(m, n, dtype=torch.float64),
    }
    factored = {
        "step": step(),
        "exp_avg": torch.zeros(m, n, dtype=torch.float64),
        "exp_avg_sq_q": torch.zeros(m, n, dtype=torch.float64),
        "exp_avg_sq_u": torch.zeros(n, n, dtype=torch.float64),
    }
    for g in grads:
        adapprox([w_dense], [g], [dense], **kwargs)
        adapprox([w_factored], [g], [factored], **kwargs)
        assert factored["exp_avg_sq_q"].shape[1] == n
        torch.testing.assert_close(w_factored, w_dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        factored["exp_avg_sq_q"] @ factored["exp_avg_sq_u"].T, dense["exp_avg_sq"], rtol=1e-9, atol=1e-14
    )


# --------------------------------------------------------------------------- generic properties


def _linear_problem(device, noncontiguous=False):
    g = torch.Generator().manual_seed(0)
    if noncontiguous:
        weight = torch.randn(5, 10, generator=g).to(device).t().requires_grad_()
        assert not weight.is_contiguous()
    else:
        weight = torch.randn(10, 5, generator=g).to(device).requires_grad_()
    bias = torch.randn(10, generator=g).to(device).requires_grad_()
    x = torch.randn(5, generator=g).to(device)
    return weight, bias, x


@pytest.mark.parametrize("noncontiguous", [False, True])
@pytest.mark.parametrize(
    "config",
    [
        {},
        {"betas": (0.0, 0.999)},
        {"first_moment": "update"},
        {"cosine_guidance": True},
        {"weight_decay": 0.1},
    ],
)
def test_goes_right_direction(device, noncontiguous, config):
    weight, bias, x = _linear_problem(device, noncontiguous)
    opt = Adapprox([weight, bias], lr=1e-2, **config)
    assert is_factored(weight.shape)

    def closure():
        opt.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(20):
        opt.step(closure)
    assert closure().item() < initial


def test_param_group_with_tiny_lr_never_moves(device):
    weight, bias, x = _linear_problem(device)
    frozen_before = bias.detach().clone()
    opt = Adapprox([{"params": [weight]}, {"params": [bias], "lr": 1e-28}], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad()
        (weight.mv(x) + bias).pow(2).sum().backward()
        opt.step()
    assert torch.equal(bias.detach(), frozen_before)


def test_noop_without_grads(device):
    weight, bias, _ = _linear_problem(device)
    before = [weight.detach().clone(), bias.detach().clone()]
    opt = Adapprox([weight, bias], lr=1e-2, weight_decay=0.1)
    opt.step()
    assert torch.equal(weight.detach(), before[0]) and torch.equal(bias.detach(), before[1])
    assert len(opt.state) == 0


def test_noop_for_zero_grads(device):
    weight, bias, _ = _linear_problem(device)
    before = [weight.detach().clone(), bias.detach().clone()]
    opt = Adapprox([weight, bias], lr=1e-2)
    for _ in range(3):
        weight.grad = torch.zeros_like(weight)
        bias.grad = torch.zeros_like(bias)
        opt.step()
    assert torch.equal(weight.detach(), before[0]) and torch.equal(bias.detach(), before[1])
    for state in opt.state.values():
        for value in state.values():
            assert torch.isfinite(value).all()


class SmallNet(nn.Module):
    """Every parameter kind: 0-d, 1-D, 2-D (factored), 3-D, 4-D conv, zero-numel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)  # 4-D weight (16, 27 view): factored
        self.fc1 = nn.Linear(16 * 2, 48)  # factored
        self.fc2 = nn.Linear(48, 40)  # factored
        self.tiny = nn.Linear(40, 2)  # too small to gain from factoring: dense
        self.temp = nn.Parameter(torch.tensor(1.5))  # 0-d
        self.mix = nn.Parameter(torch.randn(2, 2, 2) * 0.1)  # 3-D, tiny: dense
        self.empty = nn.Parameter(torch.zeros(0, 7))  # zero numel

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        h = torch.relu(self.fc2(torch.relu(self.fc1(h))))
        out = self.tiny(h) * self.temp
        return out + (self.mix.sum() + self.empty.sum()) * 0.01


def _batch(seed, device, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 3, generator=g).to(device), torch.randn(n, 2, generator=g).to(device)


def _train(model, opt, steps, device, start=0):
    for i in range(start, start + steps):
        x, y = _batch(i, device)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _make(device, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    model = SmallNet().to(device=device, dtype=dtype)
    opt = Adapprox(
        model.parameters(), lr=3e-3, tol=0.02, rank_max=6, oversample=2, weight_decay=0.01, **kwargs
    )
    return model, opt


def test_every_parameter_kind_steps(device):
    model, opt = _make(device)
    _train(model, opt, 3, device)
    st = opt.state
    assert "exp_avg_sq_q" in st[model.conv.weight] and st[model.conv.weight]["exp_avg_sq_q"].shape[0] == 16
    assert st[model.conv.weight]["exp_avg_sq_u"].shape[0] == 27
    assert "exp_avg_sq_q" in st[model.fc1.weight]
    assert "exp_avg_sq" in st[model.tiny.weight]
    assert "exp_avg_sq" in st[model.temp] and st[model.temp]["exp_avg_sq"].shape == ()
    assert "exp_avg_sq" in st[model.mix]
    assert all(len(s) > 0 for s in st.values())
    for p in model.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.parametrize(
    "config",
    [{}, {"rank_interval": 3}, {"betas": (0.0, 0.99)}, {"first_moment": "update", "cosine_guidance": True}],
)
def test_state_dict_round_trip_is_bit_exact(device, config):
    model, opt = _make(device, **config)
    _train(model, opt, 10, device)
    assert any(k > 1 for k in opt.ranks().values()), "factors must have grown from rank 1 before the save"

    clone = copy.deepcopy(model)
    fresh = Adapprox(clone.parameters(), lr=1.0)  # settings come from the state dict
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))

    _train(model, opt, 10, device, start=10)
    _train(clone, fresh, 10, device, start=10)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    assert opt.ranks() == fresh.ranks()
    sd_a, sd_b = opt.state_dict(), fresh.state_dict()
    assert sd_a["param_groups"] == sd_b["param_groups"]
    for key, state in sd_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, sd_b["state"][key][name]), name


def test_save_load_with_weights_only_and_closure(device, tmp_path):
    model, opt = _make(device)
    x, y = _batch(0, device)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(4):
        loss = opt.step(closure)
    assert torch.is_tensor(loss)
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    safe = torch.load(path, weights_only=True)
    unsafe = torch.load(path, weights_only=False)
    assert safe["param_groups"] == unsafe["param_groups"] == opt.state_dict()["param_groups"]
    for key in safe["state"]:
        for name in safe["state"][key]:
            assert torch.equal(safe["state"][key][name], unsafe["state"][key][name])
    fresh = Adapprox(model.parameters())
    fresh.load_state_dict(safe)


def test_load_nontensor_step(device):
    model, opt = _make(device)
    _train(model, opt, 2, device)
    sd = opt.state_dict()
    for state in sd["state"].values():
        state["step"] = float(state["step"])
    fresh = Adapprox(model.parameters())
    fresh.load_state_dict(sd)
    _train(model, fresh, 1, device, start=2)
    assert all(float(s["step"]) == 3 for s in fresh.state.values())


def test_deepcopy_and_pickle_keep_every_setting(device):
    model, opt = _make(
        device, cosine_guidance=True, first_moment="update", seed=7, first_moment_dtype="bfloat16"
    )
    _train(model, opt, 2, device)
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert copied.defaults == opt.defaults
        for g1, g2 in zip(copied.param_groups, opt.param_groups):
            assert {k: v for k, v in g1.items() if k != "params"} == {
                k: v for k, v in g2.items() if k != "params"
            }
    twin = copy.deepcopy(opt)
    assert twin.defaults["seed"] == 7 and twin.param_groups[0]["cosine_guidance"] is True


def test_named_parameters(device):
    torch.manual_seed(0)
    model = SmallNet().to(device)
    opt = Adapprox(model.named_parameters(), lr=1e-3)
    _train(model, opt, 1, device)
    names = opt.state_dict()["param_groups"][0]["param_names"]
    assert names == [n for n, _ in model.named_parameters()]


def test_step_hooks(device):
    model, opt = _make(device)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    _train(model, opt, 2, device)
    assert calls == ["pre", "post", "pre", "post"]


def test_tensor_lr_equals_float_lr(device):
    model_a, opt_a = _make(device)
    torch.manual_seed(0)
    model_b = SmallNet().to(device)
    opt_b = Adapprox(
        model_b.parameters(), lr=torch.tensor(3e-3), tol=0.02, rank_max=6, oversample=2, weight_decay=0.01
    )
    _train(model_a, opt_a, 5, device)
    _train(model_b, opt_b, 5, device)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_bf16_params_keep_float32_factors_after_load(device):
    model, opt = _make(device, dtype=torch.bfloat16)
    _train_bf16 = lambda m, o, steps, start=0: [
        (
            o.zero_grad(),
            nn.functional.mse_loss(
                m(_batch(i, device)[0].bfloat16()), _batch(i, device)[1].bfloat16()
            ).backward(),
            o.step(),
        )
        for i in range(start, start + steps)
    ]
    _train_bf16(model, opt, 4)
    q = opt.state[model.fc1.weight]["exp_avg_sq_q"]
    assert q.dtype == torch.float32 and opt.state[model.fc1.weight]["exp_avg"].dtype == torch.float32
    clone = copy.deepcopy(model)
    fresh = Adapprox(clone.parameters())
    fresh.load_state_dict(opt.state_dict())
    for p_a, p_b in zip(model.parameters(), clone.parameters()):
        for key, value in opt.state[p_a].items():
            assert fresh.state[p_b][key].dtype == value.dtype, key
            assert torch.equal(fresh.state[p_b][key], value), key
    _train_bf16(model, opt, 3, 4)
    _train_bf16(clone, fresh, 3, 4)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_bfloat16_first_moment(device):
    model, opt = _make(device, first_moment_dtype=torch.bfloat16)
    _train(model, opt, 3, device)
    assert opt.state[model.fc1.weight]["exp_avg"].dtype == torch.bfloat16
    assert opt.param_groups[0]["first_moment_dtype"] == "bfloat16"


def test_sparse_gradients_rejected():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = Adapprox(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_complex_params_rejected():
    p = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    opt = Adapprox([p])
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()


def test_nonfinite_gradient_skips_that_parameter(device):
    model, opt = _make(device)
    _train(model, opt, 2, device)
    before_w = model.fc1.weight.detach().clone()
    before_state = {k: v.clone() for k, v in opt.state[model.fc1.weight].items()}
    x, y = _batch(5, device)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    model.fc1.weight.grad[0, 0] = float("nan")
    other_before = model.fc2.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        opt.step()
    assert torch.equal(model.fc1.weight.detach(), before_w)
    for k, v in opt.state[model.fc1.weight].items():
        assert torch.equal(v, before_state[k]), k
    assert not torch.equal(model.fc2.weight.detach(), other_before)  # the others still step
    for state in opt.state.values():
        for value in state.values():
            assert torch.isfinite(value).all()
    model.fc1.weight.grad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert torch.isfinite(model.fc1.weight).all()


def test_maximize_equals_minimizing_the_negation(device):
    model_a, opt_a = _make(device, maximize=True)
    torch.manual_seed(0)
    model_b = SmallNet().to(device)
    opt_b = Adapprox(model_b.parameters(), lr=3e-3, tol=0.02, rank_max=6, oversample=2, weight_decay=0.01)
    for i in range(4):
        x, y = _batch(i, device)
        opt_a.zero_grad()
        (-nn.functional.mse_loss(model_a(x), y)).backward()
        opt_a.step()
        opt_b.zero_grad()
        nn.functional.mse_loss(model_b(x), y).backward()
        opt_b.step()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b)


def test_state_bytes_and_layout(device):
    model, opt = _make(device)
    _train(model, opt, 2, device)
    expected = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    assert opt.state_bytes() == expected
    adam_bytes = 2 * sum(p.numel() * 4 for p in model.parameters())
    assert opt.state_bytes() < adam_bytes
    for p in model.parameters():
        state = opt.state[p]
        assert state["step"].device.type == "cpu" and state["step"].dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -1.0}, "Invalid learning rate: -1.0"),
        ({"betas": (1.0, 0.9)}, "Invalid beta parameter at index 0: 1.0"),
        ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1: -0.1"),
        ({"eps": -1e-8}, "Invalid epsilon value: -1e-08"),
        ({"weight_decay": -0.1}, "Invalid weight_decay value: -0.1"),
        ({"clip_threshold": 0.0}, "Invalid clip_threshold: 0.0"),
        ({"rank_init": 0}, "Invalid rank_init: 0"),
        ({"rank_min": 5, "rank_max": 2}, "rank_min: 5 exceeds rank_max 2"),
        ({"rank_max": 0}, "Invalid rank_max: 0"),
        ({"tol": -0.1}, "Invalid tol: -0.1"),
        ({"tol": float("nan")}, "Invalid tol: nan"),
        ({"oversample": -1}, "Invalid oversample: -1"),
        ({"power_iters": 1.5}, "Invalid power_iters: 1.5"),
        ({"rank_interval": 0}, "Invalid rank_interval: 0"),
        ({"first_moment": "both"}, "Invalid first_moment: 'both'"),
        ({"first_moment_dtype": "int8"}, "Invalid first_moment_dtype: 'int8'"),
        ({"lr": torch.tensor([1e-3, 1e-3])}, "Tensor lr must be 1-element"),
    ],
)
def test_invalid_settings_name_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Adapprox([nn.Parameter(torch.zeros(3))], **kwargs)


def test_optimizer_can_be_printed():
    text = repr(Adapprox([nn.Parameter(torch.zeros(3))]))
    assert "Adapprox" in text and "tol" in text


def test_lr_scheduler_integration():
    model, opt = _make("cpu")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(3):
            _train(model, opt, 1, "cpu", start=i)
            sched.step()
    assert opt.param_groups[0]["lr"] < 3e-3


def test_resume_repeats_the_random_test_matrices():
    """Two optimizers with the same seed draw the same sketches; a different seed differs."""
    grads = structured_gradients(40, 30, 3, seed=0, dtype=torch.float32)

    def run(seed):
        p = nn.Parameter(torch.zeros(40, 30))
        opt = Adapprox([p], seed=seed, rank_max=5, tol=0.0)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return opt.state[p]["exp_avg_sq_q"]

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@settings(max_examples=15, deadline=None)
@given(
    shape=st.lists(st.integers(0, 12), min_size=0, max_size=4).map(tuple),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    beta1=st.sampled_from([0.0, 0.9]),
    first_moment=st.sampled_from(["gradient", "update"]),
    scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e6]),
    seed=st.integers(0, 1000),
)
def test_any_shape_and_scale_gives_finite_steps_in_the_param_dtype(
    shape, dtype, beta1, first_moment, scale, seed
):
    gen = torch.Generator().manual_seed(seed)
    param = nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
    opt = Adapprox(
        [param], lr=1e-2, betas=(beta1, 0.99), first_moment=first_moment, weight_decay=0.0, rank_max=3
    )
    for _ in range(3):
        param.grad = (torch.randn(shape, generator=gen) * scale).to(dtype)
        before = param.detach().double().clone()
        opt.step()
        if param.numel() and dtype != torch.bfloat16:
            # clipping bounds every step: RMS(ΔW) <= lr * clip_threshold
            rms = (param.detach().double() - before).norm() / param.numel() ** 0.5
            assert rms <= 1e-2 * (1 + 1e-5)
    assert param.dtype == dtype
    assert torch.isfinite(param.float()).all()
    for value in opt.state[param].values():
        assert torch.isfinite(value.float()).all()
