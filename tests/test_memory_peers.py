"""Memory accounting of Adapprox's peers, checked against hand-computed counts, and the paper's
six savings figures reproduced from the presets."""

from __future__ import annotations

import math

import pytest

from adapprox_cli import memory
from adapprox_cli.analysis import estimate_preset

# A matrix, a vector and a 3-D weight (leading dimension batched by Adafactor/CAME).
SHAPES = [(4, 6), (6,), (2, 3, 5)]  # 24 + 6 + 30 = 60 elements


def test_adamw_counts_both_moments():
    assert memory.adamw_state_numbers(SHAPES) == 120


def test_adafactor_factors_the_last_two_dimensions():
    # (4,6): 4 + 6; (6,): dense 6; (2,3,5): 2 x (3 + 5) = 16.
    assert memory.adafactor_state_numbers(SHAPES) == 10 + 6 + 16
    assert memory.adafactor_state_numbers(SHAPES, first_moment=True) == 32 + 60


def test_came_adds_a_full_first_moment_and_factored_instability():
    # (4,6): 24 + 2 x 10; (6,): 6 + 6; (2,3,5): 30 + 2 x 16.
    assert memory.came_state_numbers(SHAPES) == 44 + 12 + 62


@pytest.mark.parametrize(
    ("name", "shape", "heads", "default", "block", "numbers"),
    [
        ("transformer.h.0.mlp.c_fc.weight", (4, 6), None, "row", "row", 24 + 4),
        ("transformer.h.0.mlp.c_fc.bias", (6,), None, "row", "full", 6 + 6),
        ("transformer.ln_f.weight", (6,), None, "row", "tensor", 6 + 1),
        ("model.layers.0.self_attn.q_proj.weight", (4, 6), 2, "row", "head", 24 + 2),
        ("model.layers.0.self_attn.k_proj.weight", (4, 6), 3, "row", "row", 24 + 4),  # 3 does not divide 4
        ("model.layers.0.self_attn.q_proj.weight", (4, 6), None, "row", "row", 24 + 4),
        ("Transformer.WTE.weight", (4, 6), None, "tensor", "row", 24 + 4),  # names are lower-cased
        ("transformer.h.0.attn.c_attn.weight", (4, 6), 2, "row", "row", 24 + 4),  # no rule: the default
        ("transformer.h.0.attn.c_attn.weight", (4, 6), 2, "tensor", "tensor", 24 + 1),
        ("conv.weight", (2, 3, 5), None, "row", "row", 30 + 2),
    ],
)
def test_adam_mini_blocks_follow_the_name_rules(name, shape, heads, default, block, numbers):
    assert memory.adam_mini_block(name, shape, num_heads=heads, default=default) == block
    assert memory.adam_mini_state_numbers([(name, shape)], num_heads=heads, default=default) == numbers


def test_adam_mini_rejects_an_unknown_default():
    with pytest.raises(ValueError, match="default"):
        memory.adam_mini_block("w", (4, 6), default="column")


def test_smmf_square_matricizes_every_tensor_and_keeps_one_sign_bit_per_element():
    # 24 -> (6, 4); 6 -> (3, 2); 30 -> (6, 5): each moment keeps r + c numbers.
    assert memory.smmf_state_numbers(SHAPES) == 2 * (10 + 5 + 11)
    assert memory.smmf_sign_bits(SHAPES) == 60
    assert memory.state_bytes(52, 4, 60) == 52 * 4 + 8
    # Without vector reshaping a vector keeps plain Adam state and no signs.
    assert memory.smmf_state_numbers(SHAPES, vector_reshape=False) == 2 * (10 + 11) + 12
    assert memory.smmf_sign_bits(SHAPES, vector_reshape=False) == 54


def test_galore_projects_the_shorter_side_and_falls_back_to_adam():
    # rank 2: (4,6) -> 2 (2*6 + 4) = 32; (6,) -> 12; (2,3,5) viewed (2,15): 2 (30 + 2) = 64 > 60 -> Adam.
    assert memory.galore_state_numbers(SHAPES, rank=2) == 32 + 12 + 60
    # rank 1: 1 (12 + 4) = 16; 12; 1 (30 + 2) = 32.
    assert memory.galore_state_numbers(SHAPES, rank=1) == 16 + 12 + 32
    # The rank is clamped to min(m, n).
    assert memory.galore_matrix_numbers((4, 6), 128) == min(4 * (12 + 4), 48)


def test_state_bytes_packs_bits():
    assert memory.state_bytes(10) == 40
    assert memory.state_bytes(10, 2) == 20
    assert memory.state_bytes(10, 4, 9) == 42


def test_preset_names_line_up_with_the_shapes():
    gpt2 = dict(memory.preset_named_shapes("gpt2-124m"))
    assert len(gpt2) == len(memory.preset_shapes("gpt2-124m")) == 148
    assert gpt2["transformer.wte.weight"] == (50257, 768)
    assert gpt2["transformer.h.11.attn.c_attn.weight"] == (768, 2304)
    assert gpt2["transformer.h.11.attn.c_attn.bias"] == (2304,)
    assert gpt2["transformer.h.0.mlp.c_proj.weight"] == (3072, 768)
    llama = dict(memory.preset_named_shapes("llama-7b"))
    assert llama["model.layers.0.self_attn.q_proj.weight"] == (4096, 4096)
    assert llama["model.layers.31.mlp.down_proj.weight"] == (4096, 11008)
    assert llama["lm_head.weight"] == (32000, 4096)
    assert sum(math.prod(s) for s in llama.values()) == 6_738_415_616
    for preset in memory.PRESETS:
        assert [s for _, s in memory.preset_named_shapes(preset)] == memory.preset_shapes(preset)


PAPER = [
    ("gpt2-124m", 192, 34.50, 84.50),
    ("gpt2-124m", 1, 49.87, 99.87),
    ("gpt2-355m", 256, 33.85, 83.85),
    ("gpt2-355m", 1, 49.89, 99.89),
]


@pytest.mark.parametrize(("preset", "rank", "with_m", "without_m"), PAPER)
def test_presets_reproduce_the_paper(preset, rank, with_m, without_m):
    report = estimate_preset(preset, (rank,))
    rows = {r.optimizer: r for r in report.memory if r.setting.startswith(f"k={rank}")}
    assert round(rows["adapprox"].saving_percent, 2) == with_m
    assert round(rows["adapprox_no_m"].saving_percent, 2) == without_m
    key = "k_max" if rank > 1 else "k1"
    assert memory.PAPER_SAVINGS[preset][f"{key}_with_m"] == with_m
    assert memory.PAPER_SAVINGS[preset][f"{key}_without_m"] == without_m


def test_preset_defaults_are_the_two_ends_of_the_range():
    report = estimate_preset("gpt2-124m")
    settings = [r.setting for r in report.memory if r.optimizer == "adapprox"]
    assert settings == ["k=192 (k_max)", "k=1"]
    assert report.parameters == 124_439_808
    adamw = report.memory[0]
    assert adamw.optimizer == "adamw" and adamw.bytes == 2 * 124_439_808 * 4 and adamw.saving_percent == 0
    # Adafactor without momentum stores exactly Adapprox's rank-1 second moment for GPT-2
    # (every weight is 2-D, vectors dense).
    by_key = {(r.optimizer, r.setting): r for r in report.memory}
    assert by_key[("adafactor", "")].numbers == by_key[("adapprox_no_m", "k=1")].numbers


def test_coap_keeps_galores_layout_and_adalomo_adafactors():
    assert memory.coap_state_numbers(SHAPES, 2) == memory.galore_state_numbers(SHAPES, 2)
    # (4,6): 2 x (2 x 6 + 4) = 32 < 48; (6,): Adam 12.
    assert memory.coap_state_numbers([(4, 6), (6,)], 2) == 32 + 12
    assert memory.adalomo_state_numbers(SHAPES) == 10 + 6 + 16  # no first moment


def test_badam_holds_adam_state_for_the_largest_block_only():
    named = [
        ("model.layers.0.mlp.up.weight", (4, 6)),
        ("model.layers.0.norm.weight", (6,)),  # layer 0: 30 elements
        ("model.layers.1.mlp.up.weight", (2, 3, 6)),  # layer 1: 36
        ("lm_head.weight", (4, 6)),  # a block of its own: 24
    ]
    assert memory.badam_state_numbers(named) == 2 * 36


def test_microadam_keeps_a_window_of_sparse_gradients_and_a_4_bit_error_buffer():
    # Per tensor: 4 bits per element + 10 gradients x ceil(1%) entries x (16-bit value + 16-bit index).
    assert memory.microadam_state_bits(SHAPES) == (96 + 320) + (24 + 320) + (120 + 320)
    # At scale this is the paper's 0.9 bytes per parameter.
    assert memory.microadam_state_bits([(1000, 1000)]) / 8 == pytest.approx(0.9e6)


def test_soap_and_shampoo_store_more_than_adamw():
    # SOAP: Adam's 2 mn plus GG and Q (d x d) per dimension of >= 2-D tensors; vectors plain Adam.
    assert memory.soap_state_numbers(SHAPES) == (48 + 2 * 16 + 2 * 36) + 12 + (60 + 2 * (4 + 9 + 25))
    assert memory.soap_state_numbers(SHAPES, max_precond_dim=5) == (48 + 2 * 16) + 12 + (
        60 + 2 * (4 + 9 + 25)
    )
    # Shampoo: statistics and inverse root per dimension, vectors included.
    assert memory.shampoo_state_numbers(SHAPES) == 2 * (16 + 36) + 2 * 36 + 2 * (4 + 9 + 25)
    assert memory.soap_state_numbers(SHAPES) > memory.adamw_state_numbers(SHAPES)
    assert memory.shampoo_state_numbers(SHAPES) > memory.adamw_state_numbers(SHAPES)


def test_lion_and_muon_keep_one_buffer():
    assert memory.lion_state_numbers(SHAPES) == 60
    named = [("h.0.mlp.c_fc.weight", (4, 6)), ("transformer.wte.weight", (4, 6)), ("h.0.ln_1.weight", (6,))]
    assert memory.muon_state_numbers(named) == 24 + 2 * 24 + 2 * 6  # embeddings and vectors: AdamW


def test_torchao_low_bit_quantizes_whole_blocks_of_large_tensors():
    big = (64, 128)  # 8192 elements: 32 blocks of 256, 64 of 128
    assert memory.torchao_low_bit_state([big, (6,)], bits=8) == (2 * (32 + 256) + 12, 2 * 8 * 8192)
    assert memory.torchao_low_bit_state([big], bits=4) == (2 * (64 + 16), 2 * 4 * 8192)
    assert memory.torchao_low_bit_state([(4097,)], bits=8) == (2 * 4097, 0)  # not whole blocks
    assert memory.torchao_low_bit_state([(4224,)], bits=8) == (2 * 4224, 0)  # 4224 = 16.5 x 256
    assert memory.torchao_low_bit_state([(4224,)], bits=4) == (2 * (33 + 16), 4 * 2 * 4224)
    adamw = memory.state_bytes(memory.adamw_state_numbers([big]))
    numbers, bits = memory.torchao_low_bit_state([big], bits=8)
    assert memory.state_bytes(numbers, 4, bits) / adamw == pytest.approx(0.285, abs=1e-3)


def test_every_peer_is_in_the_one_list_estimate_uses():
    from adapprox_cli.analysis import PEER_OPTIMIZERS

    keys = {p.key for p in PEER_OPTIMIZERS}
    assert {"coap", "adalomo", "badam", "microadam", "soap", "shampoo", "fadam", "lion", "muon"} <= keys
    assert {"torchao_adamw8bit", "torchao_adamw4bit"} <= keys
    rows = {r.optimizer: r for r in estimate_preset("gpt2-124m").memory}
    assert rows["fadam"].bytes == rows["adamw"].bytes
    assert rows["soap"].saving_percent < 0 and rows["shampoo"].saving_percent < 0
    assert rows["microadam"].bytes == pytest.approx(0.9 * 124_439_808, rel=1e-3)
