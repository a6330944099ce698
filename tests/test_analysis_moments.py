"""The analyses' input: moments chosen by name and loaded from checkpoints, in Python terms."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from checkpoint_factories import make_nanogpt
from moment_factories import sample_moments

from adapprox_cli import analysis
from adapprox_cli.checkpoints import load_checkpoint
from adapprox_cli.errors import InputError, ParameterError


@pytest.fixture(scope="module")
def moments() -> list[tuple[str, torch.Tensor]]:
    return sample_moments()


@pytest.fixture(scope="module")
def nanogpt(tmp_path_factory):
    return make_nanogpt(tmp_path_factory.mktemp("nanogpt"))


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
    with pytest.raises(InputError, match="dtype must be float32 or float64"):
        analysis.resolve_dtype("bfloat16")
    with pytest.raises(InputError, match="device must be auto, cpu, cuda or cuda:N"):
        analysis.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            analysis.resolve_device("cuda:0")


def test_a_bad_pattern_is_named_as_the_caller_spells_it(moments):
    with pytest.raises(ParameterError, match=r"^pattern 'lm_head' matches none .* or drop pattern$"):
        analysis.select_moments(analysis.as_moments(moments), "lm_head")
    with pytest.raises(ParameterError, match=r"^params '\(' is not a valid regular expression"):
        analysis.select_moments(analysis.as_moments(moments), "(", "params")


def test_load_moments_from_a_path_or_a_loaded_checkpoint(nanogpt):
    chosen = analysis.load_moments(nanogpt.path, params=r"\.weight$")
    assert [m.name for m in chosen] == [n for n in nanogpt.names if n.endswith(".weight")]
    for m in chosen:
        expected = nanogpt.states[nanogpt.names.index(m.name)]["exp_avg_sq"]
        torch.testing.assert_close(m.load(), expected, rtol=0, atol=0)
    checkpoint = load_checkpoint(nanogpt.path)
    first = analysis.load_moments(checkpoint, moment="exp_avg")
    assert [m.name for m in first] == nanogpt.names
    torch.testing.assert_close(first[0].load(), nanogpt.states[0]["exp_avg"], rtol=0, atol=0)
    with pytest.raises(ParameterError, match=r"^moment must be exp_avg_sq or exp_avg, got 'v'$"):
        analysis.load_moments(checkpoint, moment="v")
    with pytest.raises(ParameterError, match=r"^params 'lm_head' matches none of"):
        analysis.load_moments(checkpoint, params="lm_head")


def test_heads_and_state_bytes_come_from_the_checkpoint(nanogpt):
    checkpoint = load_checkpoint(nanogpt.path)
    assert analysis.checkpoint_num_heads(checkpoint) == 2  # model_args["n_head"]
    assert analysis.state_bytes_per_number(checkpoint) == 4  # float32 AdamW state
    checkpoint.params = [dataclasses.replace(p, dtype=torch.bfloat16) for p in checkpoint.params]
    assert analysis.state_bytes_per_number(checkpoint) == 2
    checkpoint.extra, checkpoint.container = {}, {"config": {"num_attention_heads": 0}}
    assert analysis.checkpoint_num_heads(checkpoint) is None
