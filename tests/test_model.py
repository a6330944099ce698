"""The bundled GPT against nanoGPT's naming, shapes, init, tying, grouping and schedule."""

from __future__ import annotations

import io
import math

import pytest
import torch

from adapprox_cli.errors import InputError
from adapprox_cli.train.model import (
    GPT,
    MODEL_ARGS_KEYS,
    GPTConfig,
    gpt_from_checkpoint,
    gpt_from_model_args,
    model_state_from_checkpoint,
    nanogpt_learning_rate,
    nanogpt_param_groups,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These models are tiny: handing each small op to a second OpenMP thread costs more than it
    # saves, and on a busy machine the hand-offs make the tests many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(**overrides) -> GPTConfig:
    values = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True)
    return GPTConfig(**(values | overrides))


def nanogpt_parameter_shapes(config: GPTConfig) -> list[tuple[str, tuple[int, ...]]]:
    """nanoGPT model.py's named_parameters(), written out by hand from its module tree."""
    C, bias = config.n_embd, config.bias

    def layer_norm(prefix):
        return [(f"{prefix}.weight", (C,))] + ([(f"{prefix}.bias", (C,))] if bias else [])

    def linear(prefix, n_out, n_in):
        return [(f"{prefix}.weight", (n_out, n_in))] + ([(f"{prefix}.bias", (n_out,))] if bias else [])

    shapes = [
        ("transformer.wte.weight", (config.vocab_size, C)),
        ("transformer.wpe.weight", (config.block_size, C)),
    ]
    for i in range(config.n_layer):
        h = f"transformer.h.{i}"
        shapes += layer_norm(f"{h}.ln_1")
        shapes += linear(f"{h}.attn.c_attn", 3 * C, C) + linear(f"{h}.attn.c_proj", C, C)
        shapes += layer_norm(f"{h}.ln_2")
        shapes += linear(f"{h}.mlp.c_fc", 4 * C, C) + linear(f"{h}.mlp.c_proj", C, 4 * C)
    return shapes + layer_norm("transformer.ln_f")


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_names_and_shapes_follow_nanogpt(bias):
    config = small_config(bias=bias)
    model = GPT(config)
    expected = nanogpt_parameter_shapes(config)
    assert [(name, tuple(p.shape)) for name, p in model.named_parameters()] == expected
    # state_dict() also lists the tied head, last; there are no buffers (no attn.bias mask).
    assert list(model.state_dict()) == [name for name, _ in expected] + ["lm_head.weight"]
    assert list(model.buffers()) == []


def test_reference_fixture_counts():
    # A real nanoGPT run with n_layer=2, bias=False has 16 model keys, 15 optimizer entries, groups [10, 5].
    model = GPT(small_config(bias=False))
    groups = nanogpt_param_groups(model, 0.1)
    assert len(model.state_dict()) == 16
    assert [len(g["params"]) for g in groups] == [10, 5]


def test_tied_weights_share_storage_even_after_save_and_load():
    model = GPT(small_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()


def test_loss_at_init_is_about_log_vocab():
    config = small_config(vocab_size=65)
    model = GPT(config, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(config.vocab_size, (8, config.block_size), generator=generator)
    targets = torch.randint(config.vocab_size, (8, config.block_size), generator=generator)
    logits, loss = model(idx, targets)
    assert logits.shape == (8, config.block_size, config.vocab_size)
    assert loss.item() == pytest.approx(math.log(config.vocab_size), abs=0.05)


def test_forward_without_targets_returns_last_position_only():
    config = small_config()
    model = GPT(config)
    logits, loss = model(torch.zeros(3, 5, dtype=torch.long))
    assert logits.shape == (3, 1, config.vocab_size)
    assert loss is None


def test_init_matches_nanogpt_scaled_residual_projection():
    config = small_config(n_layer=8, n_embd=128, n_head=4, vocab_size=500)
    model = GPT(config, generator=torch.Generator().manual_seed(0))
    params = dict(model.named_parameters())
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    for name, p in params.items():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(residual_std, rel=0.1), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name
        elif name.endswith("bias") and ".ln_" not in name:
            assert torch.count_nonzero(p) == 0, name


def test_generator_makes_init_reproducible():
    first = GPT(small_config(), generator=torch.Generator().manual_seed(3)).state_dict()
    second = GPT(small_config(), generator=torch.Generator().manual_seed(3)).state_dict()
    other = GPT(small_config(), generator=torch.Generator().manual_seed(4)).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["transformer.wte.weight"], other["transformer.wte.weight"])


def test_param_groups_follow_nanogpt_rule():
    model = GPT(small_config(bias=True))
    groups = nanogpt_param_groups(model, weight_decay=0.1)
    named = list(model.named_parameters())
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert groups[0]["params"] == [p for _, p in named if p.dim() >= 2]
    assert groups[1]["params"] == [p for _, p in named if p.dim() < 2]
    # The optimizer's global indices: all decayed tensors first, then the rest.
    state = torch.optim.AdamW(groups).state_dict()
    assert state["param_groups"][0]["params"] == list(range(len(groups[0]["params"])))


def test_param_groups_with_names_record_param_names():
    model = GPT(small_config(bias=False))
    state = torch.optim.AdamW(nanogpt_param_groups(model, 0.1, with_names=True)).state_dict()
    names = [name for g in state["param_groups"] for name in g["param_names"]]
    params = dict(model.named_parameters())
    assert names == [n for n, p in params.items() if p.dim() >= 2] + [
        n for n, p in params.items() if p.dim() < 2
    ]


def test_gpt_from_model_args_round_trip():
    config = small_config(bias=False)
    model_args = config.model_args()
    assert tuple(model_args) == MODEL_ARGS_KEYS
    assert gpt_from_model_args(model_args).config == config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda args: args.pop("n_head"), "lacks n_head"),
        (lambda args: args.update(n_embd=30, n_head=4), "not divisible"),
        (lambda args: args.update(n_layer="4"), "expected a int"),
        (lambda args: args.update(vocab_size=0), "at least 1"),
    ],
)
def test_gpt_from_model_args_rejects_bad_args(change, message):
    model_args = small_config().model_args()
    change(model_args)
    with pytest.raises(InputError, match=message):
        gpt_from_model_args(model_args, source="ckpt.pt")


def nanogpt_style_checkpoint(model: GPT, compiled: bool, with_mask_buffers: bool) -> dict:
    """A checkpoint dict as nanoGPT writes it, optionally compiled or from a torch without flash attention."""
    state = dict(model.state_dict())
    if with_mask_buffers:
        T = model.config.block_size
        for i in range(model.config.n_layer):
            state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    if compiled:
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    return {"model": state, "model_args": model.config.model_args(), "iter_num": 0}


@pytest.mark.parametrize(("compiled", "with_mask_buffers"), [(False, False), (True, False), (True, True)])
def test_gpt_from_checkpoint_reproduces_the_model(compiled, with_mask_buffers):
    model = GPT(small_config(), generator=torch.Generator().manual_seed(0)).eval()
    checkpoint = nanogpt_style_checkpoint(model, compiled, with_mask_buffers)
    assert set(model_state_from_checkpoint(checkpoint)) == set(model.state_dict())
    restored = gpt_from_checkpoint(checkpoint).eval()
    idx = torch.randint(37, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(restored(idx, idx)[0], model(idx, idx)[0])
    assert restored.lm_head.weight is restored.transformer.wte.weight


def test_gpt_from_checkpoint_names_the_mismatch():
    model = GPT(small_config())
    checkpoint = nanogpt_style_checkpoint(model, compiled=False, with_mask_buffers=False)
    checkpoint["model_args"] = dict(checkpoint["model_args"], n_layer=3)
    with pytest.raises(InputError, match=r"ckpt\.pt: .*missing: transformer\.h\.2\."):
        gpt_from_checkpoint(checkpoint, source="ckpt.pt")
    with pytest.raises(InputError, match="no 'model_args'"):
        gpt_from_checkpoint({"model": {}}, source="ckpt.pt")


def test_learning_rate_schedule_matches_nanogpt_formula():
    lr, warmup, decay_iters, min_lr = 1e-3, 10, 110, 1e-4
    schedule = [nanogpt_learning_rate(it, lr, warmup, decay_iters, min_lr) for it in range(130)]
    assert schedule[0] == pytest.approx(lr / (warmup + 1))
    assert schedule[warmup - 1] == pytest.approx(lr * warmup / (warmup + 1))
    assert schedule[warmup] == pytest.approx(lr)  # cosine starts at its top
    assert schedule[60] == pytest.approx((lr + min_lr) / 2)  # half way through the decay
    assert schedule[decay_iters] == pytest.approx(min_lr)
    assert schedule[129] == min_lr
    assert all(a >= b for a, b in zip(schedule[warmup:], schedule[warmup + 1 :], strict=False))


def test_generate_is_reproducible_with_a_generator():
    model = GPT(small_config(), generator=torch.Generator().manual_seed(0)).eval()
    start = torch.zeros(1, 1, dtype=torch.long)
    first = model.generate(start, 20, top_k=5, generator=torch.Generator().manual_seed(7))
    second = model.generate(start, 20, top_k=5, generator=torch.Generator().manual_seed(7))
    assert first.shape == (1, 21)  # longer than block_size: the context is cropped
    assert torch.equal(first, second)
