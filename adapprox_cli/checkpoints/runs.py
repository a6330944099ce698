"""The checkpoints of a training run, in training order.

A run directory is what training scripts leave behind: a Hugging Face ``output_dir/`` with
``checkpoint-500/ checkpoint-1000/ ...``, a Lightning ``checkpoints/`` folder of
``epoch=0-step=500.ckpt`` files, nanoGPT checkpoints saved as ``ckpt_1000.pt``, one DCP or
DeepSpeed folder per step. ``find_stages`` turns one or several paths into the list of stages
sorted by training step. The step comes from the name where the name carries one; a stage
whose name has no number keeps ``step=None`` and its reader fills it from the stored state.
Discovery only lists and detects; each stage is read later, one at a time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from adapprox_cli.errors import InputError
from adapprox_cli.formatting import natural_key

__all__ = ["RunStages", "Stage", "find_stages", "step_from_name"]

# Suffixes checkpoint files carry; anything else in a run directory (logs, configs, data) is
# not opened. Directories are detected by layout instead.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
# Most specific first: "epoch=3-step=1200.ckpt" is step 1200, not 3.
_STEP_PATTERNS = (
    re.compile(r"(?:^|[^a-z])checkpoint-(\d+)$"),
    re.compile(r"global_step(\d+)"),
    re.compile(r"(?:^|[^a-z])step[=_-]?(\d+)"),
    re.compile(r"(?:^|[^a-z])iter(?:ation)?[=_-]?(\d+)"),
)
_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


@dataclass(frozen=True)
class Stage:
    path: Path
    step: int | None  # from the name; None: read it from the checkpoint's state


@dataclass(frozen=True)
class RunStages:
    stages: list[Stage]
    # Candidates that were not checkpoints: (path, why), reported so nothing is silently dropped.
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def step_from_name(name: str) -> int | None:
    """The training step a checkpoint's file or directory name states, if any."""
    stem = name.lower()
    for suffix in CHECKPOINT_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    for pattern in _STEP_PATTERNS:
        match = pattern.search(stem)
        if match:
            return int(match.group(1))
    match = _LAST_NUMBER.search(stem)
    return int(match.group(1)) if match else None


def _is_checkpoint(path: Path, trust_checkpoint: bool) -> str | None:
    """None if ``path`` is a checkpoint this tool reads, else why not (one line)."""
    from adapprox_cli.checkpoints import detect_format

    try:
        detect_format(path, trust_checkpoint=trust_checkpoint)
    except InputError as error:
        return str(error)
    return None


def find_stages(paths: Sequence[str | Path], *, trust_checkpoint: bool = False) -> RunStages:
    """Stages of the run(s) at ``paths``, sorted by step (unnumbered ones last, by name).

    A path that is itself a checkpoint (file or directory) is one stage. A directory that is
    not contributes every child that is one: subdirectories of a known layout, and files with
    a checkpoint suffix. A directory holding no checkpoint is an error that lists what it holds.
    """
    stages: list[Stage] = []
    skipped: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise InputError(f"{path}: no such file or directory")
        reason = _is_checkpoint(path, trust_checkpoint)
        if reason is None:
            stages.append(Stage(path, step_from_name(path.name)))
            continue
        if not path.is_dir():
            raise InputError(reason)
        found = _stages_in(path, trust_checkpoint, skipped)
        if not found:
            names = sorted(p.name for p in path.iterdir())
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") if names else "nothing"
            raise InputError(
                f"{path} is neither a checkpoint nor a run directory holding checkpoints (it holds {shown}); "
                "pass a checkpoint, or a directory of checkpoint-N/ folders or checkpoint files"
            )
        stages.extend(found)
    unique = {stage.path.resolve(): stage for stage in stages}
    ordered = sorted(
        unique.values(),
        key=lambda s: (s.step is None, s.step if s.step is not None else 0, natural_key(s.path.name)),
    )
    return RunStages(ordered, skipped)


def _stages_in(directory: Path, trust_checkpoint: bool, skipped: list[tuple[Path, str]]) -> list[Stage]:
    found = []
    for child in sorted(directory.iterdir(), key=lambda p: natural_key(p.name)):
        if child.is_symlink():
            # A run directory's own checkpoints are real entries; a link may lead anywhere.
            skipped.append((child, "a symbolic link (not followed)"))
            continue
        if child.is_file() and not child.name.lower().endswith(CHECKPOINT_SUFFIXES):
            continue
        if not (child.is_file() or child.is_dir()):
            continue
        reason = _is_checkpoint(child, trust_checkpoint)
        if reason is None:
            found.append(Stage(child, step_from_name(child.name)))
        elif child.is_file() or step_from_name(child.name) is not None:
            skipped.append((child, reason))
    return found
