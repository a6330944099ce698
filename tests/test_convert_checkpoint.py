"""``convert_checkpoint``: real checkpoint files in, their containers (or plain/safetensors) out."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from checkpoint_factories import (
    make_accelerate,
    make_deepspeed,
    make_hf_trainer,
    make_lightning,
    make_nanogpt,
    make_plain,
)

from adapprox_cli.checkpoints import load_checkpoint
from adapprox_cli.convert.checkpoint import convert_checkpoint
from adapprox_cli.errors import InputError, ParameterError


def _sha(path: Path) -> str:
    if path.is_dir():
        return "".join(_sha(p) for p in sorted(path.rglob("*")) if p.is_file())
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_convert_nanogpt_checkpoint_keeps_container_and_input(tmp_path):
    truth = make_nanogpt(tmp_path)
    before = _sha(truth.path)
    out = tmp_path / "converted" / "ckpt.pt"
    report = convert_checkpoint(truth.path, out, tol=0.05, verify=True)
    assert _sha(truth.path) == before
    assert report.verified and report.source_format == "nanogpt" and report.output_format == "nanogpt"
    assert report.matrices[0].name == "transformer.wte.weight"
    saved = torch.load(out, weights_only=True)
    original = torch.load(truth.path, weights_only=True)
    assert saved["optimizer_kind"] == "adapprox" and saved["adapprox"]["tol"] == 0.05
    assert saved["iter_num"] == original["iter_num"] and saved["model_args"] == original["model_args"]
    assert all(torch.equal(saved["model"][k], original["model"][k]) for k in original["model"])
    reloaded = load_checkpoint(out)
    assert reloaded.optimizer == "adapprox" and reloaded.format == "nanogpt"

    # And back to AdamW, in the same container.
    back = tmp_path / "back.pt"
    report = convert_checkpoint(out, back, verify=True)
    assert report.target_optimizer == "adamw"
    saved = torch.load(back, weights_only=True)
    assert saved["optimizer_kind"] == "adamw" and "adapprox" not in saved
    assert load_checkpoint(back).optimizer == "adamw"


def test_convert_hf_trainer_directory_is_a_copy(tmp_path):
    truth = make_hf_trainer(tmp_path)
    before = _sha(truth.path)
    out = tmp_path / "checkpoint-3-adapprox"
    report = convert_checkpoint(truth.path, out, verify=True)
    assert _sha(truth.path) == before
    assert report.output_format == "hf-trainer"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in truth.path.iterdir())
    assert (out / "scheduler.pt").read_bytes() == (truth.path / "scheduler.pt").read_bytes()
    assert load_checkpoint(out).optimizer == "adapprox"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_convert_to_safetensors_and_plain(tmp_path):
    truth = make_nanogpt(tmp_path)
    out = tmp_path / "state.safetensors"
    report = convert_checkpoint(truth.path, out, output_format="safetensors", rank=1, verify=True)
    assert all(m.rank == 1 for m in report.matrices)
    loaded = load_checkpoint(out)
    assert loaded.format == "adapprox-safetensors" and loaded.optimizer == "adapprox"
    plain = tmp_path / "adamw.pt"
    convert_checkpoint(out, plain, output_format="plain", verify=True)
    state = torch.load(plain, weights_only=True)
    assert set(state) == {"state", "param_groups"} and "exp_avg_sq" in state["state"][0]


def test_refuses_to_overwrite_without_force_and_same_path(tmp_path):
    truth = make_nanogpt(tmp_path)
    out = tmp_path / "out.pt"
    out.write_bytes(b"keep me")
    with pytest.raises(InputError, match="pass force to replace it"):
        convert_checkpoint(truth.path, out)
    assert out.read_bytes() == b"keep me"
    convert_checkpoint(truth.path, out, force=True)
    assert load_checkpoint(out).optimizer == "adapprox"
    with pytest.raises(InputError, match="is the input"):
        convert_checkpoint(truth.path, truth.path, force=True)
    with pytest.raises(InputError, match="already holds"):
        convert_checkpoint(out, tmp_path / "again.pt", to="adapprox")


@pytest.mark.parametrize(
    "fmt", ["plain", "plain-bf16", "lightning", "accelerate", "deepspeed"], ids=lambda f: f
)
def test_convert_other_formats(tmp_path, fmt):
    makers = {
        "plain": lambda: make_plain(tmp_path),
        "plain-bf16": lambda: make_plain(tmp_path, dtype=torch.bfloat16),
        "lightning": lambda: make_lightning(tmp_path)[0],
        "accelerate": lambda: make_accelerate(tmp_path, layers=4),  # (8, 7) is the first factored shape
        "deepspeed": lambda: make_deepspeed(tmp_path),
    }
    truth = makers[fmt]()
    before = _sha(truth.path)
    out = tmp_path / "converted" / ("state.safetensors" if fmt == "deepspeed" else truth.path.name)
    if fmt == "deepspeed":
        # Sharded formats cannot be rewritten in place; the converted state goes on its own.
        with pytest.raises(InputError, match="output_format safetensors"):
            convert_checkpoint(truth.path, out)
    report = convert_checkpoint(
        truth.path, out, output_format="safetensors" if fmt == "deepspeed" else "auto", verify=True
    )
    assert report.verified and report.matrices and _sha(truth.path) == before
    reloaded = load_checkpoint(out)
    assert reloaded.optimizer == "adapprox"
    assert [p.shape for p in reloaded.params] == [tuple(s) for s in truth.shapes]
    for param in reloaded.params:
        assert all(t.dtype == torch.float32 for k, t in param.state.items() if k.startswith("exp_avg_sq"))


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"to": "sgd"}, "to 'sgd': choose adapprox or adamw"),
        ({"output_format": "zip"}, "output_format 'zip': choose one of auto, plain, safetensors"),
        ({"rank": 0}, "rank 0: must be an integer >= 1"),
        ({"rank_max": 0}, "rank_max 0: must be an integer >= 1"),
        ({"beta1": 1.5}, "beta1 1.5: a decay rate must be in [0, 1)"),
        ({"tol": 2}, "tol 2: must be in [0, 1)"),
    ],
)
def test_arguments_are_refused_by_their_python_name_before_reading(tmp_path, arguments, message):
    missing = tmp_path / "no-such-checkpoint.pt"  # never read: the argument is refused first
    with pytest.raises(ParameterError) as info:
        convert_checkpoint(missing, tmp_path / "out.pt", **arguments)
    assert str(info.value).startswith(message) and info.value.parameter == next(iter(arguments))
    assert not (tmp_path / "out.pt").exists()


def test_refusals_that_name_a_setting_say_which_one(tmp_path):
    truth = make_nanogpt(tmp_path)
    out = convert_checkpoint(truth.path, tmp_path / "adapprox.pt").output
    with pytest.raises(ParameterError, match="already holds an adapprox state; pass to adamw") as info:
        convert_checkpoint(out, tmp_path / "again.pt", to="adapprox")
    assert info.value.parameter == "to"
    sharded = make_deepspeed(tmp_path / "ds")
    with pytest.raises(ParameterError, match="pass output_format safetensors") as info:
        convert_checkpoint(sharded.path, tmp_path / "ds.pt")
    assert info.value.parameter == "output_format"


def test_check_input_refuses_a_flipped_byte_before_converting(tmp_path):
    import zipfile

    truth = make_nanogpt(tmp_path)
    raw = bytearray(truth.path.read_bytes())
    with zipfile.ZipFile(truth.path) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    # The member's bytes follow its 30-byte local header, name and extra field (stored, not deflated).
    start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    raw[start + member.file_size // 2] ^= 0x40
    truth.path.write_bytes(bytes(raw))
    convert_checkpoint(truth.path, tmp_path / "faithful.pt")  # without the check, converted as read
    with pytest.raises(InputError, match="corrupt"):
        convert_checkpoint(truth.path, tmp_path / "checked.pt", check_input=True)
    assert not (tmp_path / "checked.pt").exists()
