"""Every checkpoint family loads to the tensors, names and shapes the factory wrote (bit-exact)."""

from __future__ import annotations

import pytest
import torch
from checkpoint_factories import (
    Truth,
    make_accelerate,
    make_dcp,
    make_deepspeed,
    make_hf_trainer,
    make_lightning,
    make_nanogpt,
    make_plain,
)

from adapprox_cli.checkpoints import OptimizerCheckpoint, detect_format, load_checkpoint
from adapprox_cli.errors import InputError


def assert_matches(ck: OptimizerCheckpoint, truth: Truth, *, names: bool = True) -> None:
    assert len(ck.params) == len(truth.states)
    if names:
        assert [p.name for p in ck.params] == truth.names
        assert [p.shape for p in ck.params] == truth.shapes
    for p, expected in zip(ck.params, truth.states, strict=True):
        assert set(p.state) == set(expected), p.name
        for key, tensor in expected.items():
            assert p.state[key].dtype == tensor.dtype, (p.name, key)
            assert torch.equal(p.state[key], tensor), (p.name, key)
    sizes = [sum(1 for p in ck.params if p.group == g) for g in range(len(ck.param_groups))]
    assert sizes == truth.group_sizes
    assert ck.step == truth.step
    assert all("params" not in g and "param_names" not in g for g in ck.param_groups)


# --- plain and wrappers --------------------------------------------------------------------------------


def test_plain_state_dict_without_names_is_anonymous(tmp_path):
    truth = make_plain(tmp_path)
    ck = load_checkpoint(truth.path)
    assert (ck.format, ck.optimizer, ck.names_source) == ("plain", "adamw", "anonymous")
    assert_matches(ck, truth, names=False)
    assert [p.name for p in ck.params] == [f"param_{i}" for i in range(6)]
    assert [p.shape for p in ck.params] == truth.shapes  # shapes still come from the state
    assert any("names unknown" in w for w in ck.warnings)
    assert ck.container is ck.optimizer_state_dict and ck.extra["optimizer_path"] == []


def test_plain_with_param_names(tmp_path):
    truth = make_plain(tmp_path, param_names=True)
    ck = load_checkpoint(truth.path)
    assert ck.names_source == "param_names" and not ck.warnings
    assert_matches(ck, truth)


@pytest.mark.parametrize("wrapper", ["optimizer", "optimizer_state_dict"])
def test_wrappers(tmp_path, wrapper):
    truth = make_plain(tmp_path, wrapper=wrapper)
    ck = load_checkpoint(truth.path)
    assert ck.format == "plain" and ck.extra["optimizer_path"] == [wrapper]
    if wrapper == "optimizer_state_dict":  # the tutorial convention stores the model next to it
        assert ck.names_source == "single-group"
        assert_matches(ck, truth)
        assert set(ck.model_state) == set(truth.names)
    else:
        assert_matches(ck, truth, names=False)


def test_legacy_format_and_bf16_states(tmp_path):
    truth = make_plain(tmp_path, legacy=True, dtype=torch.bfloat16, param_names=True)
    ck = load_checkpoint(truth.path)
    assert_matches(ck, truth)
    assert {p.dtype for p in ck.params} == {torch.bfloat16}


def test_sparse_state_keeps_every_param(tmp_path):
    truth = make_plain(tmp_path, sparse=True, wrapper="optimizer_state_dict")
    ck = load_checkpoint(truth.path)
    assert_matches(ck, truth)  # shapes of never-stepped params come from the model
    assert [bool(p.state) for p in ck.params] == [False] * 4 + [True] * 2
    assert [p for p, _ in ck.second_moments()] == ck.params[4:]


def test_sparse_state_without_model_has_unknown_shapes(tmp_path):
    truth = make_plain(tmp_path, sparse=True, param_names=True)
    ck = load_checkpoint(truth.path)
    assert [p.name for p in ck.params] == truth.names
    assert [p.shape for p in ck.params] == [()] * 4 + truth.shapes[4:]


def test_container_with_optimizer_state_puts_the_state_back(tmp_path):
    truth = make_plain(tmp_path, wrapper="optimizer_state_dict")
    ck = load_checkpoint(truth.path)
    replaced = ck.container_with_optimizer_state({"state": {}, "param_groups": []})
    assert replaced["optimizer_state_dict"] == {"state": {}, "param_groups": []}
    assert replaced["model_state_dict"] is ck.container["model_state_dict"]
    assert ck.container["optimizer_state_dict"] is ck.optimizer_state_dict  # the original is untouched


# --- nanoGPT ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True])
def test_nanogpt(tmp_path, compiled):
    truth = make_nanogpt(tmp_path, compiled=compiled)
    ck = load_checkpoint(truth.path)
    assert (ck.format, ck.names_source, ck.warnings) == ("nanogpt", "nanogpt-order", [])
    assert_matches(ck, truth)
    assert truth.names[0] == "transformer.wte.weight" and "lm_head.weight" not in truth.names
    assert ck.extra["iter_num"] == 3 and ck.extra["compiled"] is compiled
    assert ck.extra["best_val_loss"] == pytest.approx(2.53)
    assert ck.extra["model_args"]["n_layer"] == 2
    assert not any(k.startswith("_orig_mod.") for k in ck.model_state)
    assert ck.param_groups[0]["weight_decay"] == 0.1 and ck.param_groups[1]["weight_decay"] == 0.0
    assert ck.container_with_optimizer_state("new")["optimizer"] == "new"


def test_nanogpt_without_mask_buffer(tmp_path):
    truth = make_nanogpt(tmp_path, attn_bias_buffer=False, layers=1)
    assert_matches(load_checkpoint(truth.path), truth)


# --- Hugging Face Trainer ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "rule", "layers", "source"),
    [
        ("gpt2", "current", 2, "hf-decay-rule"),
        ("gpt2", "current", 11, "hf-decay-rule"),  # h.10 sorts before h.2 alphabetically
        ("qwen2", "current", 2, "hf-decay-rule"),
        ("qwen2", "old", 2, "hf-decay-rule-old"),  # RMSNorm weights were decayed before 4.49
    ],
)
def test_hf_trainer(tmp_path, arch, rule, layers, source):
    truth = make_hf_trainer(tmp_path, arch=arch, rule=rule, layers=layers)
    assert detect_format(truth.path) == "hf-trainer"
    ck = load_checkpoint(truth.path)
    assert (ck.format, ck.names_source, ck.warnings) == ("hf-trainer", source, [])
    assert_matches(ck, truth)
    assert ck.extra["trainer_state"]["global_step"] == 3 and ck.extra["model_type"] in ("gpt2", "qwen2")
    assert ck.extra["optimizer_file"].endswith("optimizer.pt")


def test_hf_gpt2_conv1d_shapes_are_in_out(tmp_path):
    ck = load_checkpoint(make_hf_trainer(tmp_path).path)
    assert ck.param("transformer.h.0.attn.c_attn.weight").shape == (8, 24)
    assert ck.param("transformer.h.0.mlp.c_proj.weight").shape == (32, 8)


# --- Lightning -----------------------------------------------------------------------------------------------


def test_lightning_two_optimizers(tmp_path):
    first, second = make_lightning(tmp_path)
    ck0 = load_checkpoint(first.path)
    ck1 = load_checkpoint(first.path, optimizer_index=1)
    assert (ck0.format, ck0.optimizer, ck1.optimizer) == ("lightning", "adam", "adamw")
    assert_matches(ck0, first)
    assert_matches(ck1, second)
    assert ck1.extra["optimizer_path"] == ["optimizer_states", 1] and ck1.extra["optimizer_count"] == 2
    assert "running_mean" not in " ".join(p.name for p in ck0.params)
    with pytest.raises(InputError, match="out of range"):
        load_checkpoint(first.path, optimizer_index=2)


# --- accelerate ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("safetensors", [True, False])
def test_accelerate(tmp_path, safetensors):
    truth = make_accelerate(tmp_path, safetensors=safetensors)
    ck = load_checkpoint(truth.path)
    assert (ck.format, ck.names_source) == ("accelerate", "single-group")
    assert_matches(ck, truth)
    # Alphabetical safetensors keys needed the natural-sort heuristic, which the checkpoint says.
    assert bool(ck.warnings) is safetensors


# --- DCP -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["nested", "flattened"])
def test_dcp(tmp_path, style):
    truth = make_dcp(tmp_path, style=style)
    assert detect_format(truth.path) == "dcp"
    ck = load_checkpoint(truth.path)
    assert (ck.format, ck.names_source, ck.extra["key_style"]) == ("dcp", "fqn", style)
    assert_matches(ck, truth)
    assert [g["weight_decay"] for g in ck.param_groups] == [0.1, 0.0]
    assert ck.param_groups[0]["betas"] == (0.9, 0.999)


def test_dcp_lightning_style_prefixes(tmp_path):
    truth = make_dcp(tmp_path, prefix="optimizer_0")
    ck = load_checkpoint(truth.path)
    assert ck.extra["prefix"] == "optimizer_0"
    assert_matches(ck, truth)


# --- DeepSpeed -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "world", "kwargs"),
    [
        (0, 1, {}),
        (1, 1, {}),
        (2, 2, {}),
        (2, 2, {"bf16_files": True}),
        (2, 3, {"paddings": False}),
        (3, 2, {}),
        (3, 3, {}),
    ],
)
def test_deepspeed(tmp_path, stage, world, kwargs):
    truth = make_deepspeed(tmp_path, stage=stage, world=world, **kwargs)
    assert detect_format(truth.path) == "deepspeed"
    ck = load_checkpoint(truth.path)
    assert (ck.format, ck.names_source, ck.optimizer) == ("deepspeed", "deepspeed-param-shapes", "adamw")
    assert_matches(ck, truth)
    assert ck.extra["zero_stage"] == stage and ck.extra["tag"] == "global_step3"


def test_deepspeed_step_dir_and_single_file_resolve(tmp_path):
    truth = make_deepspeed(tmp_path, stage=2)
    step_dir = truth.path / "global_step3"
    assert_matches(load_checkpoint(step_dir), truth)
    assert_matches(load_checkpoint(step_dir / "mp_rank_00_model_states.pt"), truth)


# --- common properties -------------------------------------------------------------------------------------


def test_second_moments_and_memory(tmp_path):
    truth = make_nanogpt(tmp_path)
    ck = load_checkpoint(truth.path)
    matrices = ck.matrix_second_moments()
    assert [p.name for p, _ in matrices] == [n for n, s in zip(truth.names, truth.shapes) if len(s) >= 2]
    assert all(v.dim() == 2 for _, v in matrices)
    expected = sum(t.numel() * t.element_size() for s in truth.states for t in s.values())
    assert ck.total_state_bytes == expected


def test_the_format_registry_names_every_format_once_and_the_help_lists_them():
    from adapprox_cli.checkpoints import FORMATS, checkpoint_format
    from adapprox_cli.checkpoints.formats import registry
    from adapprox_cli.cli.options import _FORMAT_LIST

    names = [f.name for f in registry()]
    assert len(set(names)) == len(names) == 8 and tuple(names) == FORMATS
    assert names[-1] == "plain"  # the last resort: it refuses what no format accepts
    for fmt in registry():
        assert checkpoint_format(fmt.name) is fmt and fmt.description in _FORMAT_LIST
        assert fmt.write_back in (None, "container", "directory")
        assert (fmt.write_back == "directory") == (fmt.optimizer_file is not None)
