"""``spectrum|compare|estimate`` on a training run: every stage as its own checkpoint, plus a summary."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from checkpoint_factories import MLP_SPEC, adamw, make_hf_trainer, make_params, run_steps
from typer.testing import CliRunner

from adapprox_cli.analysis import analyse_run, spectrum_report
from adapprox_cli.checkpoints import load_checkpoint
from adapprox_cli.checkpoints.runs import find_stages
from adapprox_cli.cli import app

runner = CliRunner()
STEPS = (3, 6, 10)
COMMANDS = {
    "spectrum": ["--dtype", "float64", "--top", "5"],
    "compare": ["--rank", "2", "--methods", "svd,srsi,adafactor,adam_mini"],
    "estimate": ["--tol", "0.1", "--tol", "0.02", "--rank", "2"],
}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def without_timings(data):
    """Reports minus wall-clock seconds, the one thing two runs of the same command may differ in."""
    if isinstance(data, dict):
        return {k: without_timings(v) for k, v in data.items() if k != "seconds"}
    if isinstance(data, list):
        return [without_timings(v) for v in data]
    return data


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A Trainer output_dir with checkpoint-3/, checkpoint-6/, checkpoint-10/ and a log folder."""
    root = tmp_path_factory.mktemp("output_dir")
    for step in (10, 3, 6):
        make_hf_trainer(root, global_step=step)
    (root / "runs").mkdir()
    return root


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_run_json_equals_one_run_per_checkpoint(run_dir, command):
    args = COMMANDS[command]
    result = invoke(command, run_dir, "--json", *args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kind"] == command and data["failed"] == [] and data["skipped"] == []
    assert [s["step"] for s in data["stages"]] == list(STEPS)
    assert [s["path"] for s in data["stages"]] == [str(run_dir / f"checkpoint-{s}") for s in STEPS]
    for stage in data["stages"]:
        alone = invoke(command, stage["path"], "--json", *args)
        assert alone.exit_code == 0, alone.output
        single = json.loads(alone.stdout)
        assert "stages" not in single  # one checkpoint keeps the one-report shape
        entry = {k: v for k, v in stage.items() if k not in ("path", "step")}
        assert without_timings(entry) == without_timings(single)
    # The summary follows each quantity through the stages, in stage order.
    trends = {(t["name"], t["quantity"]): t for t in data["summary"]}
    assert trends
    if command == "compare":
        first = data["stages"][0]["rows"][0]
        trend = trends[first["name"], first["method"]]
        expected = [next(r for r in s["rows"] if r["name"] == first["name"] and r["method"] == first["method"])
                    ["relative_error"] for s in data["stages"]]  # fmt: skip
        assert trend["values"] == expected
        assert trend["change"] == pytest.approx(expected[-1] / expected[0])
        weighted = trends["all matrices (size-weighted)", "srsi"]["values"]
        assert weighted == [next(m for m in s["summary"] if m["method"] == "srsi")["weighted_error"]
                            for s in data["stages"]]  # fmt: skip
    if command == "spectrum":
        matrix = data["stages"][-1]["matrices"][0]
        assert trends[matrix["name"], "stable rank"]["values"][-1] == matrix["stable_rank"]
    if command == "estimate":
        row = data["stages"][1]["memory"][0]
        label = f"{row['label']} {row['setting']}".strip()
        assert trends[label, "bytes"]["values"][1] == row["bytes"]


def test_run_text_has_a_table_per_stage_and_a_summary(run_dir):
    result = invoke("compare", run_dir, "--rank", "2", "--methods", "svd,srsi", "--params", r"h\.0\.mlp")
    assert result.exit_code == 0, result.output
    for i, step in enumerate(STEPS, 1):
        assert f"stage {i}/3: {run_dir / f'checkpoint-{step}'} (step {step})" in result.stdout
    assert "compare across 3 stages" in result.stdout
    assert all(f"step {s}" in result.stdout for s in STEPS)


def test_an_unreadable_stage_is_one_line_and_the_others_go_on(run_dir, tmp_path):
    for step in STEPS:
        (tmp_path / f"checkpoint-{step}").symlink_to(run_dir / f"checkpoint-{step}")
    broken = tmp_path / "checkpoint-8"
    broken.mkdir()
    (broken / "optimizer.pt").write_bytes(b"PK\x03\x04 not a zip archive at all")
    (broken / "trainer_state.json").write_text("{}")
    paths = [tmp_path / f"checkpoint-{s}" for s in (3, 6)] + [broken, tmp_path / "checkpoint-10"]
    result = invoke("spectrum", *paths, "--json", "--top", "3")
    assert result.exit_code == 2, result.output
    data = json.loads(result.stdout)
    assert [s["step"] for s in data["stages"]] == [3, 6, 8, 10]
    assert [s.get("error") is None for s in data["stages"]] == [True, True, False, True]
    assert data["failed"][0]["path"] == str(broken)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "stage 3/4 failed" in errors[0] and "checkpoint-8" in errors[0]
    summary = {(t["name"], t["quantity"]): t["values"] for t in data["summary"]}
    assert all(values[2] is None and values[0] is not None for values in summary.values())


def test_the_step_comes_from_the_state_when_the_name_has_none(tmp_path):
    for name, steps in (("early.pt", 5), ("late.pt", 2)):
        params = make_params(MLP_SPEC)
        opt = adamw(list(params.values()))
        run_steps(opt, list(params.values()), steps=steps)
        torch.save(opt.state_dict(), tmp_path / name)
    result = invoke("estimate", tmp_path / "early.pt", tmp_path / "late.pt", "--json")
    assert result.exit_code == 0, result.output
    stages = json.loads(result.stdout)["stages"]
    assert [(s["step"], s["path"]) for s in stages] == [
        (2, str(tmp_path / "late.pt")),
        (5, str(tmp_path / "early.pt")),
    ]


def test_analyse_run_holds_one_checkpoint_at_a_time(run_dir):
    alive: list[weakref.ref] = []
    live_at_load = []

    def load(path):
        gc.collect()
        live_at_load.append(sum(ref() is not None for ref in alive))
        checkpoint = load_checkpoint(path)
        alive.append(weakref.ref(checkpoint))
        return checkpoint

    def analyse(checkpoint, path):
        from adapprox_cli.analysis import moments_from_checkpoint

        return spectrum_report(moments_from_checkpoint(checkpoint), top=3)

    run = analyse_run(find_stages([run_dir]).stages, load, analyse, kind="spectrum")
    assert live_at_load == [0, 0, 0]
    assert run.steps == list(STEPS) and not run.failed


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_run_plot_writes_a_png(run_dir, tmp_path, command):
    figure = tmp_path / f"{command}-run.png"
    result = invoke(command, run_dir, "--plot", figure, "--json", *COMMANDS[command])
    assert result.exit_code == 0, result.output
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 20000
