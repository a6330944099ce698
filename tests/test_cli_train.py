"""``adapprox train`` through Typer's test runner: summary table, JSON, plots and errors."""

from __future__ import annotations

import json

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
