"""One analysis (spectrum, compare or estimate) over the checkpoints of a training run, one
checkpoint in memory at a time, and how each of its numbers moves across the stages."""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapprox_cli.analysis.compare import CompareReport
from adapprox_cli.analysis.estimate import EstimateReport
from adapprox_cli.analysis.spectrum import SpectrumReport
from adapprox_cli.errors import InputError

__all__ = ["WEIGHTED", "RunReport", "StageResult", "Trend", "analyse_run", "run_trends", "stage_quantities"]

StageReport = SpectrumReport | CompareReport | EstimateReport
# What a stage that cannot be read raises: the library's own one-line errors, and what torch,
# pickle and the file system raise on a damaged or vanished file.
_STAGE_FAILURES = (InputError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError)
# A quantity that moved less than this (relative) between the first and the last stage is steady.
_STEADY = 0.10


@dataclass
class StageResult:
    """One checkpoint of a run: its analysis, or the one-line reason it could not be read."""

    path: str
    step: int | None  # from the name, else the largest step in the stored state
    report: StageReport | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        head: dict[str, Any] = {"path": self.path, "step": self.step}
        if self.report is None:
            return {**head, "error": self.error}
        return {**head, **self.report.to_dict()}


@dataclass
class Trend:
    """One quantity (a method's error on a matrix, a rank, a memory size) across the stages."""

    name: str  # a matrix, "all matrices (size-weighted)" or an optimizer setting
    quantity: str  # a method, "stable rank", "rank for error 0.05", "bytes", ...
    values: list[float | None]  # one per stage, in stage order; None where it is unknown
    change: float | None  # last known / first known; None when fewer than two are known or first is 0
    direction: str  # "rising", "falling", "steady" or "-"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunReport:
    """One analysis (spectrum, compare or estimate) over the checkpoints of a training run."""

    kind: str
    stages: list[StageResult]
    trends: list[Trend]
    skipped: list[tuple[str, str]]  # (path, why) candidates that were not checkpoints

    @property
    def steps(self) -> list[int | None]:
        return [s.step for s in self.stages]

    @property
    def failed(self) -> list[StageResult]:
        return [s for s in self.stages if s.report is None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "stages": [s.to_dict() for s in self.stages],
            "summary": [t.to_dict() for t in self.trends],
            "failed": [{"path": s.path, "step": s.step, "error": s.error} for s in self.failed],
            "skipped": [{"path": p, "why": why} for p, why in self.skipped],
        }


WEIGHTED = "all matrices (size-weighted)"


def stage_quantities(report: StageReport) -> dict[tuple[str, str], float | None]:
    """The numbers of one stage that a run summary follows: (name, quantity) -> value."""
    out: dict[tuple[str, str], float | None] = {}
    if isinstance(report, CompareReport):
        for r in report.rows:
            out[r.name, r.method] = r.relative_error
        for s in report.summary:
            out[WEIGHTED, s.method] = s.weighted_error
    elif isinstance(report, SpectrumReport):
        for m in report.matrices:
            out[m.name, "stable rank"] = m.stable_rank
            out[m.name, "energy in top 1"] = m.energy_share.get(1)
            for t, k in m.rank_for_error.items():
                out[m.name, f"rank for error {t:g}"] = None if k is None else float(k)
    elif isinstance(report, EstimateReport):
        for m in report.matrices:
            for t, k in m.ranks.items():
                out[m.name, f"rank at tol {t:g}"] = float(k)
        for r in report.memory:
            out[f"{r.label} {r.setting}".strip(), "bytes"] = float(r.bytes)
    return out


def run_trends(reports: Sequence[StageReport | None]) -> list[Trend]:
    """Each quantity's values over the stages (None for a failed stage), with its overall change."""
    per_stage = [stage_quantities(r) if r is not None else {} for r in reports]
    keys = list(dict.fromkeys(key for quantities in per_stage for key in quantities))
    trends = []
    for name, quantity in keys:
        values = [q.get((name, quantity)) for q in per_stage]
        known = [v for v in values if v is not None and math.isfinite(v)]
        change = known[-1] / known[0] if len(known) >= 2 and known[0] != 0 else None
        if change is None:
            direction = "-"
        elif abs(change - 1) <= _STEADY:
            direction = "steady"
        else:
            direction = "rising" if change > 1 else "falling"
        trends.append(Trend(name, quantity, values, change, direction))
    return trends


def analyse_run(
    stages: Sequence[Any],
    load: Callable[[Path], Any],
    analyse: Callable[[Any, Path], StageReport],
    *,
    kind: str,
    skipped: Sequence[tuple[Path, str]] = (),
    on_stage: Callable[[int, int, Any], None] | None = None,
    on_result: Callable[[int, int, StageResult], None] | None = None,
) -> RunReport:
    """Run one analysis on each stage (a ``checkpoints.runs.Stage``), one checkpoint in memory at a time.

    ``load(path)`` reads a checkpoint and ``analyse(checkpoint, path)`` turns it into a report.
    A stage that fails to read or analyse is kept with its one-line error and the run goes on.
    A stage without a step in its name takes the largest step stored in its state.
    """
    results: list[StageResult] = []
    total = len(stages)
    for i, stage in enumerate(stages, 1):
        if on_stage is not None:
            on_stage(i, total, stage)
        step = stage.step
        try:
            checkpoint = load(stage.path)
            if step is None:
                step = getattr(checkpoint, "step", None)
            report = analyse(checkpoint, stage.path)
            del checkpoint  # the next stage reads into the memory this one held
            result = StageResult(str(stage.path), step, report)
        except _STAGE_FAILURES as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if not isinstance(error, InputError):
                message = f"{stage.path}: {type(error).__name__}: {message}"
            result = StageResult(str(stage.path), step, None, message)
        results.append(result)
        if on_result is not None:
            on_result(i, total, result)
    # Steps read from the state may reorder stages the names left unnumbered.
    results.sort(key=lambda s: (s.step is None, s.step if s.step is not None else 0))
    return RunReport(
        kind, results, run_trends([s.report for s in results]), [(str(p), w) for p, w in skipped]
    )
