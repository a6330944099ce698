"""The committed sample_states/ match SHA256SUMS, have the real layouts, and regenerate bit-identically."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from adapprox_cli.train.data import read_nanogpt_dataset
from adapprox_cli.train.model import gpt_from_checkpoint

# The builder of sample_states/ is a module of scripts/, not of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from sample_builder import (
    SAMPLE_CONFIGS,
    SHA256SUMS_FILE,
    compare_trees,
    deterministic_torch,
    hf_decay_parameter_names,
    make_sample_states,
    read_sha256sums,
    sha256_of_file,
    tree_sha256,
    write_sha256sums,
)

SAMPLE_STATES = Path(__file__).resolve().parents[1] / "sample_states"
HF_FILES = ("config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_committed_files_match_sha256sums():
    listed = read_sha256sums(SAMPLE_STATES / SHA256SUMS_FILE)
    assert compare_trees(listed, tree_sha256(SAMPLE_STATES)) == []
    assert {"nanogpt/ckpt.pt", "plain/optimizer.pt", "README.md"} <= listed.keys()
    assert sum((SAMPLE_STATES / path).stat().st_size for path in listed) < 15e6


def test_tiny_regeneration_is_bit_identical(tmp_path):
    first = make_sample_states(tmp_path / "a", SAMPLE_CONFIGS["tiny"])
    make_sample_states(tmp_path / "b", "tiny")
    sums = read_sha256sums(tmp_path / "a" / SHA256SUMS_FILE)
    assert sums == tree_sha256(tmp_path / "a")
    assert compare_trees(sums, tree_sha256(tmp_path / "b")) == []
    assert set(sums) == {"README.md", *first.file_sizes}
    assert set(first.file_sizes) == {
        "nanogpt/ckpt.pt",
        "nanogpt/train.bin",
        "nanogpt/val.bin",
        "nanogpt/meta.pkl",
        "plain/optimizer.pt",
        *(f"hf-trainer/checkpoint-4/{name}" for name in HF_FILES),
    }


def test_make_sample_states_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        make_sample_states(tmp_path, "tiny")


def test_deterministic_torch_restores_settings():
    threads = torch.get_num_threads()
    with deterministic_torch():
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


def test_sha256sums_format_is_sha256sum_compatible(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.txt").write_bytes(b"abc")
    write_sha256sums(tmp_path)
    # sha256("abc") from FIPS 180-2, in `sha256sum` output format.
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert (tmp_path / SHA256SUMS_FILE).read_text() == f"{digest}  sub/f.txt\n"
    assert sha256_of_file(tmp_path / "sub" / "f.txt") == digest


# ---------------------------------------------------------------------------------------------
# the committed files have the layouts they claim


def test_nanogpt_sample_has_nanogpt_layout():
    checkpoint = load(SAMPLE_STATES / "nanogpt" / "ckpt.pt")
    assert list(checkpoint) == ["model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"]
    assert checkpoint["best_val_loss"].dim() == 0
    assert checkpoint["config"]["beta2"] == 0.99
    model = gpt_from_checkpoint(checkpoint, source="ckpt.pt")
    optimizer = checkpoint["optimizer"]
    groups = optimizer["param_groups"]
    assert [g["weight_decay"] for g in groups] == [checkpoint["config"]["weight_decay"], 0.0]
    assert all(g["betas"] == (0.9, 0.99) and g["decoupled_weight_decay"] for g in groups)
    # nanoGPT's index order: >= 2-D tensors, then the rest; state shapes follow it exactly.
    named = list(model.named_parameters())
    order = [p for _, p in named if p.dim() >= 2] + [p for _, p in named if p.dim() < 2]
    assert [i for g in groups for i in g["params"]] == list(range(len(order)))
    for index, parameter in enumerate(order):
        state = optimizer["state"][index]
        assert state["exp_avg_sq"].shape == parameter.shape
        assert state["step"].item() == checkpoint["iter_num"]
    # Trained: well below the ln(vocab) of an untrained model, and the data beside it fits.
    vocab_size = checkpoint["model_args"]["vocab_size"]
    assert checkpoint["best_val_loss"].item() < math.log(vocab_size) - 2.0
    data = read_nanogpt_dataset(SAMPLE_STATES / "nanogpt", require_meta=True)
    assert data.vocab.vocab_size == vocab_size


def test_plain_sample_carries_param_names_and_a_conv_weight():
    state = load(SAMPLE_STATES / "plain" / "optimizer.pt")
    assert set(state) == {"state", "param_groups"}
    (group,) = state["param_groups"]
    assert group["param_names"][0] == "conv1.weight"
    shapes = {
        name: state["state"][i]["exp_avg_sq"].shape
        for name, i in zip(group["param_names"], group["params"], strict=True)
    }
    assert len(shapes["conv2.weight"]) == 4


def test_hf_sample_has_trainer_layout():
    from safetensors import safe_open

    directory = SAMPLE_STATES / "hf-trainer" / "checkpoint-200"
    assert sorted(p.name for p in directory.iterdir()) == sorted(HF_FILES)
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    with safe_open(directory / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in keys}
    assert keys == sorted(keys) and "lm_head.weight" not in keys
    n_embd = config["n_embd"]
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (n_embd, 3 * n_embd)  # Conv1D: (in, out)
    assert shapes["transformer.h.0.mlp.c_proj.weight"] == (4 * n_embd, n_embd)
    optimizer = load(directory / "optimizer.pt")
    # transformers' current rule for GPT-2 with 2 layers: 10 decayed tensors, 18 not.
    assert [len(g["params"]) for g in optimizer["param_groups"]] == [10, 18]
    assert [g["weight_decay"] for g in optimizer["param_groups"]] == [0.01, 0.0]
    state = json.loads((directory / "trainer_state.json").read_text())
    assert state["global_step"] == 200 and state["log_history"][-1]["step"] == 200
    assert load(directory / "scheduler.pt")["last_epoch"] == 200


def test_hf_decay_rule_excludes_biases_and_norm_weights():
    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

    model = nn.Module()
    model.proj = nn.Linear(3, 3)
    model.ln = nn.LayerNorm(3)  # excluded by type, although the name matches no pattern
    model.input_layernorm = RMSNorm()  # excluded by name
    model.final_norm = RMSNorm()
    model.norm = RMSNorm()
    model.normalizer = nn.Linear(3, 3, bias=False)  # "norm" only as a whole word: decayed
    assert hf_decay_parameter_names(model) == {"proj.weight", "normalizer.weight"}
