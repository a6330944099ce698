"""formatting: one spelling for a dtype, a shape, a size and a natural sort order."""

from __future__ import annotations

import torch

from adapprox_cli.formatting import dtype_name, format_shape, human_bytes, natural_key


def test_spellings():
    assert dtype_name(torch.bfloat16) == "bfloat16" and dtype_name(torch.float32) == "float32"
    assert format_shape((768, 3072)) == "768x3072" and format_shape(torch.Size([3])) == "3"
    assert format_shape(()) == "()"
    assert human_bytes(512) == "512 B" and human_bytes(1536) == "1.50 KiB"
    assert human_bytes(3 * 2**30) == "3.00 GiB" and human_bytes(2**50) == "1024.00 TiB"


def test_natural_key_orders_digit_runs_by_value():
    names = ["layer10.w", "layer2.w", "layer1.w", "bf16_zero_pp_rank_10", "bf16_zero_pp_rank_9", "2a", "a"]
    assert sorted(names, key=natural_key) == [
        "2a",
        "a",
        "bf16_zero_pp_rank_9",
        "bf16_zero_pp_rank_10",
        "layer1.w",
        "layer2.w",
        "layer10.w",
    ]
