"""``adapprox train`` through Typer's test runner: summary table, JSON, plots and errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_train import make_train_checkpoint
from typer.testing import CliRunner

from adapprox_cli.cli import app

runner = CliRunner()


def test_train_table_checkpoint_metrics_and_plot(tmp_path):
    checkpoint = make_train_checkpoint(tmp_path / "source")
    out, metrics, plot = tmp_path / "run", tmp_path / "m.jsonl", tmp_path / "loss.png"
    args = [
        "train",
        str(checkpoint),
        "--steps",
        "3",
        "--eval-iters",
        "2",
        "--eval-interval",
        "2",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, [*args, "--out", str(out), "--metrics", str(metrics), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "adapprox" in result.output and "val loss" in result.output and "ranks of" in result.output
    assert (out / "ckpt.pt").is_file() and plot.is_file()
    events = [json.loads(line)["event"] for line in metrics.read_text().splitlines()]
    assert events.count("step") == 3 and "eval" in events and events[-1] == "end"


def test_train_compare_json(tmp_path):
    checkpoint = make_train_checkpoint(tmp_path / "source")
    args = ["train", str(checkpoint), "--steps", "2", "--eval-iters", "1", "--compare", "adamw", "--json"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout)["runs"]
    data = {run["optimizer"]: run for run in runs}
    assert set(data) == {"adapprox", "adamw"} and runs[0]["optimizer"] == "adapprox"
    assert data["adapprox"]["state_bytes"] < data["adamw"]["state_bytes"]
    assert data["adapprox"]["end_iter"] == data["adamw"]["end_iter"] == 5
    assert (tmp_path / "cmp" / "adamw" / "ckpt.pt").is_file() and (tmp_path / "cmp" / "loss.png").is_file()


def test_train_errors_are_one_line_with_exit_code_2(tmp_path):
    checkpoint = make_train_checkpoint(tmp_path / "source")
    for args, message in [
        (["--optimizer", "sgd"], "--optimizer"),
        (["--data", str(tmp_path)], "train.bin"),
        (["--model", "nonexistent_module_xyz:make"], "cannot import"),
        (["--steps", "0"], "--steps"),
        (["--plot", str(tmp_path / "no-such-folder" / "loss.png")], "does not exist"),
    ]:
        result = runner.invoke(app, ["train", str(checkpoint), *args])
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
        assert sum(line.startswith("Error:") for line in result.output.splitlines()) == 1, result.output
        assert message in result.output


def _one_line_error(result, option: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and option in errors[0], result.output


def test_bad_option_values_are_refused_naming_the_option(tmp_path):
    checkpoint = make_train_checkpoint(tmp_path / "source")
    for option, value in [
        ("--lr", "-1"),
        ("--min-lr", "-1"),
        ("--batch-size", "0"),
        ("--batch-size", "-3"),
        ("--block-size", "0"),
        ("--eval-interval", "-1"),
        ("--save-interval", "-1"),
        ("--grad-accum", "0"),
        ("--tol", "2"),
        ("--tol", "-0.1"),
        ("--steps", "0"),
        ("--rank-max", "0"),
        ("--beta1", "2"),
    ]:
        result = runner.invoke(app, ["train", str(checkpoint), option, value, "--out", str(tmp_path / "o")])
        _one_line_error(result, option)
        assert f"{option} {value}" in result.output  # the value, and what to pass instead
        assert not (tmp_path / "o").exists()
    result = runner.invoke(app, ["convert", str(checkpoint), "-o", str(tmp_path / "c.pt"), "--tol", "2"])
    _one_line_error(result, "--tol 2")
    assert "must be in [0, 1)" in result.output and not (tmp_path / "c.pt").exists()
    for option, value in [("--rank", "0"), ("--rank-max", "0"), ("--beta1", "1.5")]:
        result = runner.invoke(app, ["convert", str(checkpoint), "-o", str(tmp_path / "c.pt"), option, value])
        _one_line_error(result, f"{option} {value}")
    _one_line_error(runner.invoke(app, ["demo", "--steps", "0"]), "--steps 0")
    estimate = runner.invoke(app, ["estimate", str(checkpoint), "--tol", "2"])
    assert estimate.exit_code == 2 and "[0, 1)" in estimate.output


def test_a_second_run_into_the_same_out_needs_resume_or_force(tmp_path):
    checkpoint = make_train_checkpoint(tmp_path / "source")
    out, metrics = tmp_path / "run", tmp_path / "m.jsonl"
    base = ["train", str(checkpoint), "--eval-iters", "1", "--out", str(out), "--metrics", str(metrics)]
    first = runner.invoke(app, [*base, "--steps", "2", "--json"])
    assert first.exit_code == 0, first.output
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 5

    again = runner.invoke(app, [*base, "--steps", "2"])
    _one_line_error(again, "--resume")
    assert "--force" in again.output and torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 5

    # --resume continues from the run's own ckpt.pt (iteration 5), not from PATH (iteration 3).
    resumed = runner.invoke(app, [*base, "--resume", "--until", "8", "--json"])
    assert resumed.exit_code == 0, resumed.output
    run = json.loads(resumed.stdout)["runs"][0]
    assert (run["start_iter"], run["end_iter"]) == (5, 8)
    starts = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["event"] == "start"]
    assert [r["iter"] for r in starts] == [3, 5]  # one run, continued: appended in order

    replaced = runner.invoke(app, [*base, "--force", "--steps", "1", "--json"])
    assert replaced.exit_code == 0, replaced.output
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iter"] for r in records if r["event"] == "start"] == [3]  # the old run's lines are gone
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 4

    other = runner.invoke(
        app, ["train", str(checkpoint), "--out", str(tmp_path / "b"), "--metrics", str(metrics)]
    )
    _one_line_error(other, str(metrics))  # a metrics file of another run is not appended to

    late = runner.invoke(app, [*base, "--resume", "--until", "2"])
    _one_line_error(late, "--until 2")
    both = runner.invoke(app, [*base, "--resume", "--until", "9", "--steps", "3"])
    _one_line_error(both, "--until")


def test_saved_checkpoint_resumes_without_data(tmp_path):
    """The help's advice, "train the saved ckpt.pt", works: the checkpoint records its data."""
    checkpoint = make_train_checkpoint(tmp_path / "source")
    first = runner.invoke(
        app, ["train", str(checkpoint), "--steps", "1", "--eval-iters", "1", "--out", str(tmp_path / "a")]
    )
    assert first.exit_code == 0, first.output
    again = runner.invoke(
        app,
        [
            "train",
            str(tmp_path / "a" / "ckpt.pt"),
            "--steps",
            "1",
            "--eval-iters",
            "1",
            "--out",
            str(tmp_path / "b"),
            "--json",
        ],
    )
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["runs"][0]["start_iter"] == 4


def test_compare_names_its_metrics_files_verdict_and_one_tokens_per_second(tmp_path):
    checkpoint = make_train_checkpoint(tmp_path / "source")
    metrics = tmp_path / "m.jsonl"
    args = ["train", str(checkpoint), "--steps", "3", "--eval-iters", "1", "--compare", "adamw"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "cmp"), "--metrics", str(metrics)])
    assert result.exit_code == 0, result.output
    for name in ("adapprox", "adamw"):
        assert str(tmp_path / f"m-{name}.jsonl") in result.output.replace("\n", "")
    verdict = [line for line in result.output.splitlines() if line.startswith("Adapprox ")]
    assert (
        len(verdict) == 1
        and "AdamW's validation loss" in verdict[0]
        and "% of its optimizer state" in verdict[0]
    )

    single = runner.invoke(
        app,
        [
            "train",
            str(checkpoint),
            "--steps",
            "3",
            "--eval-iters",
            "1",
            "--json",
            "--metrics",
            str(tmp_path / "s.jsonl"),
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert single.exit_code == 0, single.output
    data = json.loads(single.stdout)
    assert set(data) == {"runs", "verdict", "plot"} and len(data["runs"]) == 1 and data["verdict"] is None
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    # The progress bar shows the running tokens_per_s; its last value is the summary's.
    assert steps[-1]["tokens_per_s"] == pytest.approx(data["runs"][0]["tokens_per_second"])
    assert data["runs"][0]["tokens_per_second"] == pytest.approx(
        data["runs"][0]["tokens_per_step"] * 3 / sum(r["dt"] for r in steps)
    )
    # Default eval interval: a quarter of the steps, so even a short run gets several evaluations.
    assert sum(r["event"] == "eval" for r in records) == 4


def test_help_shows_flags_as_flags_and_every_default():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert result.exit_code == 0
    text = result.output
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert usage.split() == ["Usage:", "adapprox", "train", "[OPTIONS]", "PATH"]
    assert "<bool>" not in text
    assert "adapprox-runs/FOLDER-CHECKPOINT-OPTIMIZER/" in text
    entries: dict[str, str] = {}  # option -> its rows of the Options panel
    current = None
    for line in text[text.index("Options") :].splitlines():
        match = re.match(r"^[│|] (--[\w-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = ""
        if current is not None:
            entries[current] += line
    undefaulted = {"--model", "--data", "--text", "--metrics", "--plot", "--compare", "--until"}
    flags = {"--resume", "--force", "--json", "--trust-checkpoint", "--help"}
    assert {"--steps", "--lr", "--out", "--batch-size", "--tol"} <= set(entries)
    for option, entry in entries.items():
        assert ("[default:" in entry) == (option not in undefaulted | flags), (option, entry)
