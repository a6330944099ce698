"""adapprox's own safetensors export: round trips, atomic writes, Adapprox factors."""

from __future__ import annotations

import json

import torch
from checkpoint_factories import adapprox_state_dict, make_deepspeed, make_plain

from adapprox_cli.checkpoints import detect_format, load_checkpoint, write_adapprox_safetensors
from adapprox_cli.checkpoints.formats.safetensors import read_safetensors_header


def test_adamw_round_trip(tmp_path):
    truth = make_plain(tmp_path, param_names=True)
    ck = load_checkpoint(truth.path)
    out = write_adapprox_safetensors(
        tmp_path / "state.safetensors", ck.optimizer_state_dict, truth.names, ck.format, "adamw"
    )
    assert detect_format(out) == "adapprox-safetensors"
    back = load_checkpoint(out)
    assert (back.format, back.optimizer, back.names_source, back.step) == (
        "adapprox-safetensors",
        "adamw",
        "safetensors-metadata",
        3,
    )
    assert [p.name for p in back.params] == truth.names
    assert [p.shape for p in back.params] == truth.shapes
    for p, expected in zip(back.params, truth.states, strict=True):
        for key, tensor in expected.items():
            assert torch.equal(p.state[key], tensor) and p.state[key].dtype == tensor.dtype
    assert back.param_groups[0]["betas"] == (0.9, 0.99)
    assert back.extra["source_format"] == "plain"
    _, metadata = read_safetensors_header(out)
    assert json.loads(metadata["param_groups"])[0]["params"] == list(range(6))


def test_adapprox_factors_round_trip(tmp_path):
    sd, names, shapes = adapprox_state_dict(rank=2)
    out = write_adapprox_safetensors(
        tmp_path / "a.safetensors", sd, names, "plain", "adapprox", param_shapes=shapes
    )
    ck = load_checkpoint(out)
    assert ck.optimizer == "adapprox" and ck.extra["ranks"] == {0: 2, 2: 2, 3: 2}
    assert [p.shape for p in ck.params] == shapes
    conv = ck.param("conv")
    assert conv.matrix_shape == (6, 18) and conv.dtype == torch.float32
    q, u = sd["state"][2]["exp_avg_sq_q"], sd["state"][2]["exp_avg_sq_u"]
    assert torch.equal(ck.second_moment(conv), torch.clamp(q @ u.T, min=0).reshape(6, 2, 3, 3))
    assert [p.name for p, _ in ck.matrix_second_moments()] == ["w1", "conv", "w2"]


def test_torch_saved_adapprox_state_without_shapes(tmp_path):
    sd, _, shapes = adapprox_state_dict()
    del sd["state"][2]["exp_avg"]  # beta1 = 0: only the factors say the size
    torch.save(sd, tmp_path / "adapprox.pt")
    ck = load_checkpoint(tmp_path / "adapprox.pt")
    assert ck.optimizer == "adapprox"
    assert [p.shape for p in ck.params] == [shapes[0], shapes[1], (6, 18), shapes[3]]


def test_write_is_atomic_and_replaces(tmp_path):
    sd, names, _ = adapprox_state_dict()
    target = tmp_path / "out.safetensors"
    target.write_text("old")
    write_adapprox_safetensors(target, sd, names, "plain", "adapprox")
    assert load_checkpoint(target).params[0].name == "w1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # no temporary left


def test_views_of_one_flat_buffer_can_be_written(tmp_path):
    """DeepSpeed states are narrowed views of one flat partition; safetensors refuses shared memory."""
    ck = load_checkpoint(make_deepspeed(tmp_path, stage=2, world=1).path)
    sd = {
        "state": {p.index: p.state for p in ck.params},
        "param_groups": [{**g, "params": []} for g in ck.param_groups],
    }
    for p in ck.params:
        sd["param_groups"][p.group]["params"].append(p.index)
    out = write_adapprox_safetensors(
        tmp_path / "ds.safetensors", sd, [p.name for p in ck.params], "deepspeed", "adamw"
    )
    back = load_checkpoint(out)
    for a, b in zip(ck.params, back.params, strict=True):
        assert torch.equal(a.state["exp_avg_sq"].reshape(-1), b.state["exp_avg_sq"].reshape(-1))
