"""The CLI shell: version, help, one-line errors, --debug, python -m."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from adapprox_cli import __version__
from adapprox_cli.cli.app import app
from adapprox_cli.errors import InputError, ParameterError
from adapprox_cli.validation import check_at_least

runner = CliRunner()


@app.command("_raise-for-tests", hidden=True)
def _raise_for_tests(kind: str = "input") -> None:
    if kind == "input":
        raise InputError("model.pt: not a checkpoint; pass the file torch.save wrote")
    raise RuntimeError("kaput")


@app.command("_bad-parameter-for-tests", hidden=True)
def _bad_parameter_for_tests(iters: int = 0, parameter: str = "power_iters") -> None:
    check_at_least(iters, 0, parameter)


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


@pytest.mark.parametrize(
    ("cores", "load", "threads"),
    [(2, 0.0, 1), (2, 3.5, 1), (16, 0.2, 8), (16, 12.0, 4), (16, 40.0, 1), (1, 0.0, 1)],
)
def test_auto_threads_is_half_the_cores_less_the_busy_ones(monkeypatch, cores, load, threads):
    import importlib

    app_module = importlib.import_module("adapprox_cli.cli.app")

    monkeypatch.setattr(app_module.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(app_module.os, "getloadavg", lambda: (load, load, load))
    assert app_module.auto_threads() == threads


@pytest.mark.parametrize("where", ["before", "after", "equals"])
def test_threads_is_accepted_before_or_after_the_command(where):
    import torch

    from adapprox_cli.cli.app import _hoist_global_options

    argv = {
        "before": ["--threads", "3", "_raise-for-tests"],
        "after": ["_raise-for-tests", "--threads", "3"],
        "equals": ["_raise-for-tests", "--threads=3"],
    }[where]
    before = torch.get_num_threads()
    try:
        result = runner.invoke(app, _hoist_global_options(argv))
        assert "No such option" not in result.output
        assert result.exit_code == 2 and "not a checkpoint" in result.output
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_demo_reports_progress_over_both_runs():
    from adapprox_cli.demo import run_demo

    calls = []
    runs = run_demo(steps=3, width=16, progress=lambda *call: calls.append(call))
    assert [r.optimizer for r in runs] == ["AdamW", "Adapprox"]
    assert [c[:2] for c in calls] == [(i, 6) for i in range(1, 7)]
    assert [c[2] for c in calls] == ["AdamW"] * 3 + ["Adapprox"] * 3


def test_a_bad_parameter_is_named_in_python_terms_by_the_library_and_by_its_flag_in_the_cli():
    with pytest.raises(ParameterError, match=r"^power_iters -1: must be an integer >= 0$") as caught:
        check_at_least(-1, 0, "power_iters")
    assert caught.value.parameter == "power_iters"
    # compare_methods' power_iters is the --iters option
    result = runner.invoke(app, ["_bad-parameter-for-tests", "--iters", "-1"])
    assert result.exit_code == 2
    assert "Error: --iters -1: must be an integer >= 0" in result.output
    assert "power_iters" not in result.output
    # a parameter the command has no option for keeps its Python name rather than a made-up flag
    result = runner.invoke(app, ["_bad-parameter-for-tests", "--iters", "-1", "--parameter", "sketch_width"])
    assert result.exit_code == 2 and "Error: sketch_width -1: must be an integer >= 0" in result.output


def test_a_message_naming_several_parameters_spells_each_one():
    error = ParameterError("out_dir", "run/ exists; pass {resume} or another {name}", mentions=("resume",))
    assert str(error) == "run/ exists; pass resume or another out_dir"
    only_out = {"out_dir": "--out"}
    assert error.spelled_by(lambda p: only_out.get(p, p)) == "run/ exists; pass resume or another --out"
    flags = {"out_dir": "--out", "resume": "--resume"}
    assert error.spelled_by(flags.get) == "run/ exists; pass --resume or another --out"
    # user text that merely looks like a placeholder is left alone
    assert ParameterError("pattern", "{name} 'a{2}' matches nothing").spelled_by(lambda p: "--params") == (
        "--params 'a{2}' matches nothing"
    )
