"""Every hostile input class (``hostile_inputs.CASES``) against every command, through the CLI.

For each (class, command): exit code 2 where the class must be refused (0 or 2 elsewhere, never
a crash), at most one ``Error:`` line naming the file, no traceback, the input tree unchanged
byte for byte, no temporary files left anywhere. The memory bombs run in a child process whose
address space is capped (``RLIMIT_AS``), so "refused" also means "refused before allocating".
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hostile_inputs import CASES, COMMANDS, MARKUP_NAMES
from test_train import make_train_checkpoint
from typer.testing import CliRunner

from adapprox_cli.cli import app

runner = CliRunner()
BOMBS = (
    "stride0_moments",
    "overlapping_moments",
    "stride0_weights",
    "deepspeed_stride0_partition",
    "model_args_bomb",
    "batch_size_bomb",
    "dcp_huge_metadata",
)
ADDRESS_LIMIT = 3 * 2**30  # the child imports torch (~0.7 GB of address space) and loads small files


def command_args(command: str, path: Path, out: Path) -> list[str]:
    p = str(path)
    return {
        "inspect": ["inspect", p],
        "spectrum": ["spectrum", p, "--json"],
        "compare": ["compare", p, "--json", "--rank", "2"],
        "estimate": ["estimate", p, "--json", "--rank", "2"],
        "convert": ["convert", p, "-o", str(out / "converted.pt"), "--format", "plain", "--verify"],
        "train": [
            "train",
            p,
            "--steps",
            "1",
            "--eval-iters",
            "1",
            "--device",
            "cpu",
            "--out",
            str(out / "run"),
        ],
    }[command]


def invoke(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, args)
    return result.exit_code, result.output


def tree_digest(root: Path) -> dict[str, str]:
    """Path -> sha256 of every file under ``root`` (links by target, not followed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".tmp" in p.name or "adapprox-tmp" in p.name]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[dict, Path]:
    directory = tmp_path_factory.mktemp("base")
    path = make_train_checkpoint(directory, steps=2, n_embd=16)
    return torch.load(path, weights_only=True), directory


@pytest.fixture(scope="module")
def built(base, tmp_path_factory) -> dict[str, Path]:
    """Each class built once, in its own directory."""
    obj, base_dir = base
    return {name: case.build(obj, base_dir, tmp_path_factory.mktemp(name)) for name, case in CASES.items()}


def check_outcome(name: str, command: str, path: Path, code: int, output: str) -> None:
    must_refuse = command in CASES[name].refuse
    allowed = {2} if must_refuse else {0, 2}
    assert code in allowed, f"{name} x {command}: exit {code}\n{output}"
    assert "Traceback" not in output, f"{name} x {command}\n{output}"
    assert "run again with --debug" not in output, f"{name} x {command}: unexpected-error catch-all\n{output}"
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    if code == 2:
        assert len(errors) == 1, f"{name} x {command}: {output}"
        named = {path.name, path.parent.name} if path.is_file() else {path.name}
        assert any(n in errors[0] for n in named), f"{name} x {command}: file not named in {errors[0]!r}"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", [n for n in CASES if n not in BOMBS])
def test_hostile_input(name, command, built, tmp_path):
    path = built[name]
    root = path.parent
    before = tree_digest(root)
    code, output = invoke(command_args(command, path, tmp_path))
    check_outcome(name, command, path, code, output)
    assert tree_digest(root) == before, f"{name} x {command} modified its input"
    assert not leftovers(root) and not leftovers(tmp_path), f"{name} x {command} left temporary files"
    assert "\x1b" not in output and "\x07" not in output


_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from pathlib import Path
from test_hostile import COMMANDS, command_args, invoke
path, out = Path({path!r}), Path({out!r})
results = {{}}
for command in COMMANDS:
    (out / command).mkdir()
    results[command] = invoke(command_args(command, path, out / command))
print("RESULTS" + json.dumps(results))
"""


@pytest.mark.parametrize("name", BOMBS)
def test_memory_bomb_is_refused_within_bounded_memory(name, built, tmp_path):
    path = built[name]
    before = tree_digest(path.parent)
    script = _CHILD.format(
        limit=ADDRESS_LIMIT, tests=str(Path(__file__).parent), path=str(path), out=str(tmp_path)
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    for command, (code, output) in results.items():
        check_outcome(name, command, path, code, output)
    assert tree_digest(path.parent) == before
    assert not leftovers(path.parent) and not leftovers(tmp_path)


def test_debug_shows_the_traceback(built):
    result = runner.invoke(app, ["--debug", "inspect", str(built["dcp_path_traversal"])])
    assert result.exit_code != 0 and type(result.exception).__name__ == "InputError"
    assert "outside the checkpoint directory" in str(result.exception)


# --- untrusted text -------------------------------------------------------------------------------


def test_markup_names_are_shown_literally(built):
    code, output = invoke(["inspect", str(built["markup_names"])])
    assert code == 0, output
    assert "[link=http://evil.example]click[/link].1" in output and "[/x].0" in output
    assert "[bold]b[/bold].3" in output
    assert "\x1b" not in output and "\x07" not in output and "title.2" in output
    assert MARKUP_NAMES  # the same list the builder used


def test_markup_in_paths_is_shown_literally(built, tmp_path):
    tricky = tmp_path / "run[/x]"
    tricky.mkdir(parents=True)
    target = tricky / "optimizer.pt"
    target.write_bytes(built["markup_names"].read_bytes())
    code, output = invoke(["inspect", str(target)])
    assert code == 0, output
    assert "run[/x]" in output
    missing = tmp_path / "exp[old]" / "missing.pt"
    code, output = invoke(["inspect", str(missing)])
    assert code == 2 and "exp[old]/missing.pt" in output, output
    code, output = invoke(["inspect", str(tmp_path / "a\x1b]0;t\x07b.pt")])
    assert code == 2 and "\x1b" not in output and "\x07" not in output, repr(output)


# --- integrity -------------------------------------------------------------------------------------


def test_inspect_check_finds_a_flipped_byte(built, base):
    code, output = invoke(["inspect", str(built["flipped_byte"]), "--check"])
    assert code == 2 and "CRC" in output and "ckpt.pt" in output, output
    _, base_dir = base
    code, output = invoke(["inspect", str(base_dir / "ckpt.pt"), "--check"])
    assert code == 0 and "CRC-32" in output, output


# --- signals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_train_saves_then_exits_128_plus_the_signal(signum, code, base, tmp_path):
    _, base_dir = base
    out, metrics = tmp_path / "run", tmp_path / "metrics.jsonl"
    args = ["--threads", "1", "train", str(base_dir / "ckpt.pt"), "--steps", "100000", "--eval-interval", "0"]
    args += ["--device", "cpu", "--out", str(out), "--metrics", str(metrics)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapprox_cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and '"step"' in metrics.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr.decode()[-2000:]
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert saved["iter_num"] > 2  # the base checkpoint's iter_num is 2: at least one step was saved
    assert b"Traceback" not in stderr


def test_train_refuses_a_batch_whose_activations_cannot_fit(base, monkeypatch, tmp_path):
    from adapprox_cli.errors import InputError
    from adapprox_cli.train import loop, setup

    _, base_dir = base
    config = loop.TrainConfig(checkpoint=str(base_dir / "ckpt.pt"), steps=1, out_dir=str(tmp_path / "run"))
    monkeypatch.setattr(setup, "_available_memory", lambda device: 1 << 16)  # 64 KiB "free"
    with pytest.raises(InputError, match=r"needs about .* of activations, more than the 64\.00 KiB"):
        loop.train(config)
    assert not (tmp_path / "run").exists()


def test_progress_bars_show_names_literally(monkeypatch):
    import io

    from rich.console import Console

    from adapprox_cli import render

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=200, color_system=None)
    monkeypatch.setattr(render, "stderr_console", lambda: console)
    with render.callback_progress("factoring [/x]", True) as update:
        update(1, 2, "[link=http://evil.example]w[/link]\x1b]0;t\x07")
    text = buffer.getvalue()
    assert "[link=http://evil.example]w[/link]" in text and "factoring [/x]" in text
    assert "\x07" not in text and "\x1b]0" not in text
