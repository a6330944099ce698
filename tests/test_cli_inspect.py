"""``adapprox inspect`` through the Typer app."""

from __future__ import annotations

import json

import pytest
from checkpoint_factories import make_deepspeed, make_garbage, make_lightning, make_malicious, make_nanogpt
from typer.testing import CliRunner

from adapprox_cli.cli import app


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_inspect_nanogpt(runner, tmp_path):
    truth = make_nanogpt(tmp_path)
    result = runner.invoke(app, ["inspect", str(truth.path)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in (
        "nanogpt",
        "adamw",
        "step 3",
        "transformer.h.1.mlp.c_proj.weight",
        "nanogpt-order",
        "skipped (1-D)",
    ):
        assert text in out
    assert "10 second moments analysed as matrices" in " ".join(out.split())


def test_inspect_json(runner, tmp_path):
    truth = make_nanogpt(tmp_path)
    result = runner.invoke(app, ["inspect", str(truth.path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["format"] == "nanogpt" and info["step"] == 3 and info["names_source"] == "nanogpt-order"
    assert [p["name"] for p in info["params"]] == truth.names
    assert [tuple(p["shape"]) for p in info["params"]] == truth.shapes
    assert info["analysed"]["count"] == 10 and info["analysed"]["skipped"] == len(truth.names) - 10
    assert info["param_groups"][1]["weight_decay"] == 0.0 and info["param_groups"][0]["num_params"] == 10
    assert info["total_state_bytes"] == sum(
        t.numel() * t.element_size() for s in truth.states for t in s.values()
    )
    wpe = next(p for p in info["params"] if p["name"] == "transformer.wpe.weight")
    assert wpe["matrix_shape"] == [8, 8] and wpe["analysed"] and wpe["dtype"] == "float32"


def test_inspect_params_filter(runner, tmp_path):
    truth = make_deepspeed(tmp_path, stage=3)
    result = runner.invoke(app, ["inspect", str(truth.path), "--params", r"^layers\.0\.mlp", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert [p["name"] for p in info["params"]] == ["layers.0.mlp.weight", "layers.0.mlp.bias"]
    assert info["num_params"] == len(truth.names)


def test_inspect_lightning_optimizer_index(runner, tmp_path):
    first, second = make_lightning(tmp_path)
    result = runner.invoke(app, ["inspect", str(first.path), "--optimizer-index", "1", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert [p["name"] for p in info["params"]] == second.names and info["optimizer"] == "adamw"


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("Error:")
    return " ".join(" ".join(lines).split())


def test_bad_input_exits_2_with_one_message(runner, tmp_path):
    message = _one_line_error(runner.invoke(app, ["inspect", str(make_garbage(tmp_path))]))
    assert "garbage.pt" in message and "re-copy" in message
    message = _one_line_error(runner.invoke(app, ["inspect", str(tmp_path / "missing.pt")]))
    assert "no such file" in message


def test_unsafe_file_exits_2_and_names_the_flag(runner, tmp_path):
    marker = tmp_path / "pwned"
    message = _one_line_error(runner.invoke(app, ["inspect", str(make_malicious(tmp_path, marker))]))
    assert "--trust-checkpoint" in message
    assert not marker.exists()


def test_bad_regex_exits_2(runner, tmp_path):
    message = _one_line_error(
        runner.invoke(app, ["inspect", str(make_nanogpt(tmp_path).path), "--params", "("])
    )
    assert "regular expression" in message


def test_inspect_says_sgd_without_momentum(runner, tmp_path):
    """SGD with momentum 0 keeps no per-parameter state; it must not pass for an AdamW one."""
    from checkpoint_factories import make_sgd

    result = runner.invoke(app, ["inspect", str(make_sgd(tmp_path, momentum=0))])
    assert result.exit_code == 2, result.output
    assert "SGD state without momentum" in result.output and "adamw" not in result.output.split(";")[0]
