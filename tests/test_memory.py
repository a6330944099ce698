"""The memory accounting reproduces the paper's six savings figures exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adapprox_cli import memory
from adapprox_cli.lowrank import DENSE_SKETCH_COLUMNS
from adapprox_cli.optim import Adapprox


def test_gpt2_124m_shapes_match_the_paper_model():
    shapes = memory.preset_shapes("gpt2-124m")
    assert sum(math.prod(s) for s in shapes) == 124_439_808
    assert sum(s[0] + s[1] for s in shapes if len(s) == 2) == 200_273
    assert sum(s[0] for s in shapes if len(s) == 1) == 121_344


def test_gpt2_355m_shapes_match_the_paper_model():
    shapes = memory.preset_shapes("gpt2-355m")
    assert sum(math.prod(s) for s in shapes) == 354_823_168
    assert sum(s[0] + s[1] for s in shapes if len(s) == 2) == 446_545
    assert sum(s[0] for s in shapes if len(s) == 1) == 321_536


@pytest.mark.parametrize(
    "preset, k_max",
    [("gpt2-124m", 192), ("gpt2-355m", 256)],
)
def test_paper_savings_reproduced_exactly(preset, k_max):
    shapes = memory.preset_shapes(preset)
    paper = memory.PAPER_SAVINGS[preset]
    cases = {
        "k_max_with_m": (k_max, True),
        "k1_with_m": (1, True),
        "k_max_without_m": (k_max, False),
        "k1_without_m": (1, False),
    }
    for key, (rank, first_moment) in cases.items():
        saving = memory.state_size(shapes, rank, first_moment=first_moment)["saving_percent"]
        assert round(saving, 2) == paper[key], key
    # k_max is min(m, n) // 4 everywhere in these models: rank=None means the same
    assert (
        memory.state_size(shapes, None)["saving_percent"]
        == memory.state_size(shapes, k_max)["saving_percent"]
    )


def test_accounting_matches_a_real_optimizer_state():
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 3), nn.Conv1d(3, 40, 5))
    opt = Adapprox(model.parameters(), tol=0.0)
    x = torch.randn(4, 7, 64)
    for _ in range(3):
        opt.zero_grad()
        h = model[2](model[1](model[0](x))).transpose(1, 2)
        model[3](h).square().mean().backward()
        opt.step()
    shapes = [tuple(p.shape) for p in model.parameters()]
    ranks = opt.ranks()
    numbers = memory.adapprox_state_numbers(shapes, ranks, sketch_columns=DENSE_SKETCH_COLUMNS)
    # state_bytes also counts the 0-d step tensors (one float32 per parameter)
    assert opt.state_bytes() == 4 * numbers + 4 * len(shapes)
    assert memory.adamw_state_numbers(shapes) == 2 * sum(p.numel() for p in model.parameters())


def test_unknown_preset():
    with pytest.raises(ValueError, match="gpt2-124m"):
        memory.preset_shapes("gpt5")
