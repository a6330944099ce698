"""``adapprox convert`` through Typer's test runner: output, JSON, exit codes and one-line errors."""

from __future__ import annotations

import json

import torch
from checkpoint_factories import make_nanogpt
from typer.testing import CliRunner

from adapprox_cli.cli import app

runner = CliRunner()


def test_convert_prints_table_and_writes(tmp_path):
    truth = make_nanogpt(tmp_path)
    out = tmp_path / "adapprox.pt"
    result = runner.invoke(app, ["convert", str(truth.path), "-o", str(out), "--verify", "--tol", "0.1"])
    assert result.exit_code == 0, result.output
    assert "transformer.wte.weight" in result.output and "rel. error" in result.output
    assert "(verified)" in result.output and out.is_file()
    assert torch.load(out, weights_only=True)["optimizer_kind"] == "adapprox"


def test_convert_json_and_rollback(tmp_path):
    truth = make_nanogpt(tmp_path)
    out = tmp_path / "adapprox.safetensors"
    result = runner.invoke(
        app, ["convert", str(truth.path), "-o", str(out), "--format", "safetensors", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["target_optimizer"] == "adapprox" and report["bytes_after"] < report["bytes_before"]
    assert all(m["rank"] >= 1 and 0 <= m["relative_error"] < 1 for m in report["matrices"])
    back = tmp_path / "adamw.pt"
    result = runner.invoke(app, ["convert", str(out), "-o", str(back), "--format", "plain", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["target_optimizer"] == "adamw"


def test_convert_errors_are_one_line_with_exit_code_2(tmp_path):
    truth = make_nanogpt(tmp_path)
    out = tmp_path / "exists.pt"
    out.write_bytes(b"x")
    for args, message in [
        (["convert", str(truth.path), "-o", str(out)], "--force"),
        (["convert", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "o.pt")], "missing.pt"),
        (["convert", str(truth.path), "-o", str(tmp_path / "o.pt"), "--to", "sgd"], "--to"),
        (["convert", str(truth.path), "-o", str(tmp_path / "o.pt"), "--format", "zip"], "format"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
        error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(error_lines) == 1 and message in result.output, result.output
    assert out.read_bytes() == b"x"
