"""The README is a promise: every command and snippet in its user-facing sections runs as written.

Blocks run in document order in one scratch directory (later blocks use what earlier ones
wrote, as a reader following the README would), with `sample_states/` linked in. The Results
and Development sections are left out: their commands are benchmarks that take minutes and
tools for maintainers, and CI's `.ci/run` runs the test command itself.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SKIPPED_SECTIONS = ("Results", "Development")
# Words standing for "your file here" in inline commands; a command holding one is a pattern.
PLACEHOLDER = re.compile(r"(\.\.\.|\b[A-Z]{2,}\b|\bN\b)")
SETUP_PREFIXES = ("python3 -m venv", ". .venv/bin/activate", "pip install", "python -m pytest")


@dataclass(frozen=True)
class Snippet:
    line: int
    kind: str  # "python" or "command"
    text: str

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.kind}"


def _sections(text: str) -> list[tuple[int, str]]:
    """(first line, body) of each part of the README outside the skipped sections."""
    parts, keep, start, body = [], True, 1, []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("## "):
            if keep and body:
                parts.append((start, "\n".join(body)))
            keep = line[3:].strip() not in SKIPPED_SECTIONS
            start, body = number, []
        body.append(line)
    if keep and body:
        parts.append((start, "\n".join(body)))
    return parts


def _commands(block: str) -> list[str]:
    """Shell commands of a bash block: comments dropped, `\\` continuations joined, `&&` chains
    split, and the environment set-up (venv, pip, the test command) left to CI."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for part in line.split("&&"):
            part = part.strip()
            if part and not part.startswith(SETUP_PREFIXES):
                commands.append(part)
    return commands


def readme_snippets() -> list[Snippet]:
    snippets, seen = [], set()
    fence = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
    for first_line, body in _sections(README.read_text(encoding="utf-8")):
        prose = body
        for match in fence.finditer(body):
            line = first_line + body[: match.start()].count("\n")
            language, code = match.group(1), match.group(2)
            prose = prose.replace(match.group(0), "")
            if language == "python":
                snippets.append(Snippet(line, "python", code))
            elif language == "bash":
                snippets.extend(Snippet(line, "command", c) for c in _commands(code))
        for match in re.finditer(r"`(adapprox [^`]+)`", prose):
            command = match.group(1)
            # `adapprox convert` in a sentence names a command; one with arguments is one to run
            if len(command.split()) < 3 or PLACEHOLDER.search(command) or command in seen:
                continue
            seen.add(command)
            line = first_line + body[: body.find(match.group(0))].count("\n")
            snippets.append(Snippet(line, "command", command))
    return sorted(snippets, key=lambda s: s.line)


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    program = {
        "adapprox": [sys.executable, "-m", "adapprox_cli"],
        "torchrun": [sys.executable, "-m", "torch.distributed.run"],
        "python": [sys.executable],
        "python3": [sys.executable],
    }
    if words[0] not in program:
        raise AssertionError(f"README command {command!r} uses {words[0]!r}, which this test cannot run")
    return program[words[0]] + words[1:]


def _missing_modules(code: str) -> list[str]:
    imported = re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", code, re.M)
    return [name for name in dict.fromkeys(imported) if importlib.util.find_spec(name) is None]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("readme")
    (path / "sample_states").symlink_to(REPO / "sample_states")
    return path


@pytest.fixture(scope="module")
def environment():
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        ADAPPROX_THREADS="1",
        MPLBACKEND="Agg",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        COLUMNS="160",
    )
    return env


SNIPPETS = readme_snippets()


def test_the_readme_has_runnable_snippets():
    kinds = {s.kind for s in SNIPPETS}
    assert kinds == {"python", "command"}, SNIPPETS
    assert any("adapprox spectrum sample_states/nanogpt/ckpt.pt" in s.text for s in SNIPPETS)


@pytest.mark.slow
@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_readme_snippet_runs_as_written(snippet, workdir, environment):
    if snippet.kind == "python":
        missing = _missing_modules(snippet.text)
        if missing:
            pytest.skip(f"needs {', '.join(missing)} (installed by .ci/run)")
        script = workdir / f"snippet_{snippet.line}.py"
        script.write_text(snippet.text, encoding="utf-8")
        argv = [sys.executable, script.name]
    else:
        argv = _argv(snippet.text)
        if argv[1:3] == ["-m", "torch.distributed.run"] and not torch.distributed.is_available():
            pytest.skip("torch.distributed is not available in this build")
    done = subprocess.run(argv, cwd=workdir, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (
        f"README line {snippet.line}: {snippet.text.strip()[:200]}\n"
        f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )


@pytest.mark.slow
def test_trainer_resumed_the_converted_factors(workdir):
    """After the README's Trainer migration, the checkpoint Trainer wrote at step 220 holds
    Adapprox's factored state, continued from the converted one (not a fresh optimizer)."""
    pytest.importorskip("transformers")
    converted = workdir / "hf-adapprox/checkpoint-200/optimizer.pt"
    resumed = workdir / "hf-adapprox/checkpoint-220/optimizer.pt"
    if not resumed.exists():
        pytest.fail(f"{resumed} was not written: the README's Trainer snippet did not run to the end")
    before = torch.load(converted, weights_only=True)["state"]
    after = torch.load(resumed, weights_only=True)["state"]
    factored = [i for i, s in after.items() if "exp_avg_sq_q" in s]
    assert factored and set(factored) == {i for i, s in before.items() if "exp_avg_sq_q" in s}
    assert all(float(after[i]["step"]) == float(before[i]["step"]) + 20 for i in factored)
    assert all(torch.isfinite(after[i]["exp_avg_sq_q"]).all() for i in factored)
