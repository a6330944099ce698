"""States adapprox does not read are refused with a one-line message naming what was found."""

from __future__ import annotations

import pytest
import torch
from checkpoint_factories import (
    make_adafactor,
    make_bnb_like,
    make_deepspeed,
    make_fsdp1_flat,
    make_hf_trainer,
    make_lightning,
    make_plain,
    make_sgd,
)
from safetensors.torch import save_file
from typer.testing import CliRunner

from adapprox_cli.checkpoints import load_checkpoint
from adapprox_cli.cli.app import app
from adapprox_cli.errors import InputError, ParameterError, UnsupportedStateError


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (make_sgd, "SGD state (keys: momentum_buffer)"),
        (lambda d: make_sgd(d, momentum=0), "SGD state without momentum (momentum 0"),
        (lambda d: make_adafactor(d, flavour="torch"), "torch.optim.Adafactor"),
        (lambda d: make_adafactor(d, flavour="hf"), "Hugging Face Adafactor"),
        (make_bnb_like, "bitsandbytes 8-bit"),
        (lambda d: make_fsdp1_flat(d, with_model=True), "FSDP flat-parameter shard"),
        (lambda d: make_fsdp1_flat(d, with_model=False), "matches no parameter"),
        (lambda d: make_deepspeed(d, stage=2, drop_rank=1).path, "incomplete DeepSpeed rank set"),
        (lambda d: make_deepspeed(d, stage=3, world=3, drop_rank=2).path, "incomplete DeepSpeed rank set"),
    ],
)
def test_unsupported_states_are_refused(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(UnsupportedStateError) as info:
        load_checkpoint(path)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_model_weights_alone_are_not_an_optimizer_state(tmp_path):
    weights = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    torch.save(weights, tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError, match="model weights only"):
        load_checkpoint(tmp_path / "pytorch_model.bin")
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(InputError, match="safetensors file without optimizer state"):
        load_checkpoint(tmp_path / "model.safetensors")


def test_unknown_directory_lists_what_it_holds(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match=r"unknown layout \(it holds notes.txt\)"):
        load_checkpoint(tmp_path)


def test_trainer_checkpoint_without_optimizer(tmp_path):
    truth = make_hf_trainer(tmp_path)
    (truth.path / "optimizer.pt").unlink()
    with pytest.raises(InputError, match="save_only_model"):
        load_checkpoint(truth.path)


def test_optimizer_index_only_where_there_are_several(tmp_path):
    with pytest.raises(InputError, match="one optimizer"):
        load_checkpoint(make_plain(tmp_path).path, optimizer_index=1)
    first, _ = make_lightning(tmp_path)
    with pytest.raises(InputError, match=r"0\.\.1"):
        load_checkpoint(first.path, optimizer_index=5)
    # in Python terms from the library; the CLI names its flag
    with pytest.raises(ParameterError, match=r"optimizer_index 5 is out of range"):
        load_checkpoint(first.path, optimizer_index=5)
    result = CliRunner().invoke(app, ["inspect", str(first.path), "--optimizer-index", "5"])
    assert result.exit_code == 2 and "--optimizer-index 5 is out of range" in result.output


def test_malformed_container_is_an_input_error(tmp_path):
    """A nanoGPT-looking dict whose optimizer state has a non-dict param entry."""
    bad = {
        "model": {"w": torch.ones(2, 2)},
        "optimizer": {"state": {0: [1, 2]}, "param_groups": [{"params": [0]}]},
        "iter_num": 1,
    }
    torch.save(bad, tmp_path / "ckpt.pt")
    with pytest.raises(InputError, match=r"ckpt\.pt"):
        load_checkpoint(tmp_path / "ckpt.pt")
    bad = {
        "optimizer_states": [{"state": {0: {"exp_avg_sq": 3}}, "param_groups": [{"params": [0]}]}],
        "global_step": 1,
    }
    torch.save(bad, tmp_path / "x.ckpt")
    with pytest.raises(InputError, match=r"x\.ckpt: exp_avg_sq of parameter 0 is a int"):
        load_checkpoint(tmp_path / "x.ckpt")
