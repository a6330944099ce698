"""The ranks a training run held (``train --metrics``) against the ones ``estimate`` predicted."""

from __future__ import annotations

import json

import pytest
from test_train import _config, make_train_checkpoint
from typer.testing import CliRunner

from adapprox_cli.analysis import (
    RankHistory,
    estimate_memory,
    load_moments,
    ranks_against_run,
    read_rank_history,
)
from adapprox_cli.analysis import trained as trained_module
from adapprox_cli.cli import app
from adapprox_cli.errors import InputError
from adapprox_cli.optim import Adapprox
from adapprox_cli.train.loop import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A checkpoint, an 8-step Adapprox run from it with --metrics, and its ranks after every step."""
    directory = tmp_path_factory.mktemp("run")
    checkpoint = make_train_checkpoint(directory / "source")
    after_each_step = []
    original = Adapprox.step

    def spying_step(self, closure=None):
        loss = original(self, closure)
        after_each_step.append(dict(self.ranks()))
        return loss

    Adapprox.step = spying_step
    try:
        result = train(_config(checkpoint, steps=8, final_eval=False, metrics_path=directory / "m.jsonl"))
    finally:
        Adapprox.step = original
    return checkpoint, directory / "m.jsonl", result, after_each_step


def test_the_metrics_hold_every_rank_after_every_step(run):
    _, metrics, result, after_each_step = run
    history = read_rank_history(metrics)
    assert history.last_iter == result.end_iter and history.iters[0] == result.start_iter + 1
    assert history.iters == sorted(set(history.iters))
    names = list(result.ranks)
    index = {name: i for i, name in enumerate(result.history[0]["ranks"])}
    assert set(index) == set(names)
    # The recorded step function equals the optimizer's ranks after each step (ground truth).
    for step, truth in enumerate(after_each_step, start=result.start_iter + 1):
        recorded = history.ranks[max(i for i, it in enumerate(history.iters) if it <= step)]
        assert sorted(recorded.values()) == sorted(truth.values()), step
    assert history.ranks[-1] == result.ranks
    # Only changes are written: every ranks record differs from the one before it.
    assert all(a != b for a, b in zip(history.ranks, history.ranks[1:]))


def test_the_run_is_set_beside_the_estimate_of_its_checkpoint(run):
    checkpoint, metrics, result, _ = run
    report = estimate_memory(load_moments(checkpoint), tolerances=(0.1, 0.05))
    comparison = ranks_against_run(report, read_rank_history(metrics))
    assert comparison.unmatched == []
    assert [m.name for m in comparison.matrices] == [m.name for m in report.matrices]
    for row, predicted in zip(comparison.matrices, report.matrices, strict=True):
        assert row.predicted == predicted.ranks and row.last == result.ranks[row.run_name]
        assert row.largest >= row.last
    for tol in (0.1, 0.05):
        expected = sum(m.ranks[tol] * sum(m.matrix_shape) for m in report.matrices)
        assert comparison.predicted_numbers[tol] == expected
    assert comparison.last_numbers == sum(
        result.ranks[m.run_name] * sum(m.matrix_shape) for m in comparison.matrices
    )
    # A prefix on one side (Lightning's "model.") still matches, when the match is unique.
    prefixed = RankHistory("m", [1], [{f"model.{k}": v for k, v in result.ranks.items()}], 1)
    assert ranks_against_run(report, prefixed).unmatched == []


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        (['{"event": "step", "iter": 1, "ranks": {"w": 2}}', "{not json"], ":2: not a JSON line"),
        (['{"event": "step", "iter": 1, "ranks": [2]}'], ":1: ranks should map parameter names"),
        (['{"event": "step", "iter": 1, "ranks": {"w": -3}}'], ":1: the rank of w should be an integer"),
        (['{"event": "step", "iter": 1, "ranks": {"w": true}}'], ":1: the rank of w should be an integer"),
        (['{"event": "step", "iter": "1", "ranks": {"w": 2}}'], ":1: iter should be an integer"),
        (['{"event": "step", "iter": 1}', '{"event": "end"}'], "records no Adapprox ranks"),
        (["[1, 2]"], ":1: not a metrics record"),
        (["[" * 100_000], ":1: not a JSON line"),
    ],
)
def test_a_bad_metrics_file_is_one_line_naming_it(tmp_path, lines, problem):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    with pytest.raises(InputError, match=problem) as caught:
        read_rank_history(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert path.read_bytes() == before


def test_a_metrics_file_is_read_within_bounds(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    path.write_text('{"event": "step", "iter": 1, "ranks": {"w": 2}}\n')
    monkeypatch.setattr(trained_module, "_MAX_LINE_BYTES", 16)
    with pytest.raises(InputError, match=r":1: a line of 48 bytes"):
        read_rank_history(path)
    monkeypatch.setattr(trained_module, "_MAX_METRICS_BYTES", 16)
    with pytest.raises(InputError, match="more than a metrics file holds"):
        read_rank_history(path)
    with pytest.raises(InputError, match="is not a file"):
        read_rank_history(tmp_path)


def test_estimate_metrics_from_the_command_line(run, tmp_path):
    checkpoint, metrics, result, _ = run
    runner = CliRunner()
    args = ["estimate", str(checkpoint), "--tol", "0.05", "--metrics", str(metrics)]
    data = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert data["run"]["last_iter"] == result.end_iter and data["run"]["unmatched"] == []
    assert {m["run_name"]: m["last"] for m in data["run"]["matrices"]} == result.ranks
    assert [m["predicted"]["0.05"] for m in data["run"]["matrices"]] == [
        m["ranks"]["0.05"] for m in data["matrices"]
    ]
    text = runner.invoke(app, [*args, "--plot", str(tmp_path / "vs.png")])
    assert text.exit_code == 0, text.output
    assert "Predicted ranks against the run" in text.output and "held / predicted" in text.output
    assert (tmp_path / "vs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for wrong in (["--shapes", "gpt2-124m"], [str(checkpoint), str(checkpoint)]):
        refused = runner.invoke(app, ["estimate", *wrong, "--metrics", str(metrics)])
        assert refused.exit_code == 2 and "--metrics" in refused.output, refused.output
