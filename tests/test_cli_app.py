"""The CLI shell: version, help, one-line errors, --debug, python -m."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from adapprox_cli import __version__
from adapprox_cli.cli.app import app
from adapprox_cli.errors import InputError

runner = CliRunner()


@app.command("_raise-for-tests", hidden=True)
def _raise_for_tests(kind: str = "input") -> None:
    if kind == "input":
        raise InputError("model.pt: not a checkpoint; pass the file torch.save wrote")
    raise RuntimeError("kaput")


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("ADAPPROX_DEBUG", raising=False)


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_help_lists_the_commands_in_workflow_order():
    import typer

    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = typer.main.get_command(app).list_commands(None)
    expected = [
        c for c in ("inspect", "spectrum", "compare", "estimate", "convert", "train", "demo") if c in commands
    ]
    assert commands[: len(expected)] == expected
    for name in ("inspect", "convert", "train", "demo"):
        assert name in commands and name in result.output


def test_library_error_is_one_line_with_exit_code_2():
    result = runner.invoke(app, ["_raise-for-tests", "--kind", "input"])
    assert result.exit_code == 2
    assert result.output.strip() == "Error: model.pt: not a checkpoint; pass the file torch.save wrote"
    assert "Traceback" not in result.output


def test_unexpected_error_is_one_line_with_exit_code_1():
    result = runner.invoke(app, ["_raise-for-tests", "--kind", "bug"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert "RuntimeError: kaput" in result.output and "--debug" in result.output


def test_debug_shows_the_exception(monkeypatch):
    result = runner.invoke(app, ["--debug", "_raise-for-tests", "--kind", "input"])
    assert isinstance(result.exception, InputError)


def test_usage_errors_keep_click_behaviour():
    result = runner.invoke(app, ["inspect"])
    assert result.exit_code == 2
    assert "Missing argument" in result.output


def test_python_dash_m_and_debug_anywhere():
    out = subprocess.run(
        [sys.executable, "-m", "adapprox_cli", "--version"], capture_output=True, text=True, check=True
    )
    assert __version__ in out.stdout
    # --debug after the command is accepted too (moved in front by main())
    bad = subprocess.run(
        [sys.executable, "-m", "adapprox_cli", "inspect", "/nonexistent/ckpt.pt", "--debug"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0
    assert "Traceback" in bad.stderr
