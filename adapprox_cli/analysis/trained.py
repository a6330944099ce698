"""What a run of ``adapprox train`` held against what ``estimate`` predicted for it.

``adapprox train --metrics m.jsonl`` records Adapprox's rank of every factored matrix at the
first step and whenever one changes. ``read_rank_history`` reads them back; ``ranks_against_run``
sets them beside an ``EstimateReport`` of the run's checkpoint: per matrix the predicted rank at
each tolerance and the ranks the optimizer held, and the factor numbers, sum of k (m + n), both
ways. The metrics file is untrusted input like any checkpoint: its size and lines are bounded
and every field is type-checked.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapprox_cli.analysis.estimate import EstimateReport
from adapprox_cli.errors import InputError

__all__ = ["RankHistory", "RunComparison", "RunRanks", "ranks_against_run", "read_rank_history"]

# A step record is ~200 bytes and a ranks record ~60 bytes per matrix: a million steps of a
# model with a thousand matrices fits with room to spare.
_MAX_METRICS_BYTES = 1 << 30
_MAX_LINE_BYTES = 16 << 20


@dataclass
class RankHistory:
    """The ranks a run held: at each iteration where one changed, every matrix's rank."""

    source: str
    iters: list[int]  # the iterations where the ranks were recorded, ascending
    ranks: list[dict[str, int]]  # the ranks from that iteration on
    last_iter: int  # the run's last recorded step

    def series(self, name: str) -> list[int | None]:
        """One matrix's rank at each of ``iters`` (None where it was not factored)."""
        return [r.get(name) for r in self.ranks]


@dataclass
class RunRanks:
    """Per factored matrix of an estimate: the predicted ranks beside the ones the run held."""

    name: str
    run_name: str | None  # the matrix's name in the metrics file (None: not found there)
    matrix_shape: tuple[int, int]
    rank_max: int
    predicted: dict[float, int]  # tolerance -> the rank estimate predicts
    last: int | None  # the run's rank at its last step
    largest: int | None  # the largest rank it held

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["matrix_shape"] = list(self.matrix_shape)
        d["predicted"] = {str(t): k for t, k in self.predicted.items()}
        return d


@dataclass
class RunComparison:
    history: RankHistory
    tolerances: list[float]
    matrices: list[RunRanks]  # every factored matrix of the estimate, matched or not

    @property
    def unmatched(self) -> list[str]:
        """Estimate matrices the run has no rank for."""
        return [m.name for m in self.matrices if m.run_name is None]

    @property
    def predicted_numbers(self) -> dict[float, int]:
        """Tolerance -> sum of k (m + n) at the predicted ranks, over the matched matrices."""
        matched = [m for m in self.matrices if m.run_name is not None]
        return {t: sum(m.predicted[t] * sum(m.matrix_shape) for m in matched) for t in self.tolerances}

    @property
    def last_numbers(self) -> int:
        """The same sum at the run's last ranks."""
        return sum((m.last or 0) * sum(m.matrix_shape) for m in self.matrices if m.run_name is not None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.history.source,
            "last_iter": self.history.last_iter,
            "matrices": [m.to_dict() for m in self.matrices],
            "predicted_numbers": {str(t): n for t, n in self.predicted_numbers.items()},
            "last_numbers": self.last_numbers,
            "unmatched": self.unmatched,
        }


def read_rank_history(path: str | os.PathLike[str]) -> RankHistory:
    """The ranks recorded in a ``train --metrics`` file (JSON lines)."""
    path = Path(path).expanduser()
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"{path}: cannot read the metrics file ({exc.strerror or exc})") from None
    if not path.is_file():
        raise InputError(f"{path} is not a file; pass the JSON-lines metrics file adapprox train wrote")
    if size > _MAX_METRICS_BYTES:
        raise InputError(
            f"{path} is {size:,} bytes, more than a metrics file holds; pass the metrics file adapprox train wrote"
        )
    iters: list[int] = []
    ranks: list[dict[str, int]] = []
    last_iter: int | None = None
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            record = _record(path, number, line)
            if record is None or record.get("event") != "step":
                continue
            last_iter = _integer(path, number, "iter", record.get("iter"))
            if "ranks" in record:
                iters.append(last_iter)
                ranks.append(_ranks(path, number, record["ranks"]))
    if not ranks or last_iter is None:
        raise InputError(
            f"{path} records no Adapprox ranks; pass the metrics file of a run trained with Adapprox "
            "(files written before ranks were recorded hold none)"
        )
    return RankHistory(str(path), iters, ranks, last_iter)


def _record(path: Path, number: int, line: bytes) -> dict[str, Any] | None:
    if len(line) > _MAX_LINE_BYTES:
        raise InputError(
            f"{path}:{number}: a line of {len(line):,} bytes; pass the metrics file adapprox train wrote"
        )
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise InputError(
            f"{path}:{number}: not a JSON line ({exc}); pass the metrics file adapprox train wrote"
        ) from None
    if not isinstance(record, dict):
        raise InputError(f"{path}:{number}: not a metrics record (a JSON object)")
    return record


def _integer(path: Path, number: int, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{path}:{number}: {key} should be an integer >= 0, got {value!r}")
    return value


def _ranks(path: Path, number: int, value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise InputError(f"{path}:{number}: ranks should map parameter names to ranks")
    return {str(name): _integer(path, number, f"the rank of {name}", k) for name, k in value.items()}


def ranks_against_run(report: EstimateReport, history: RankHistory) -> RunComparison:
    """Each factored matrix of ``report`` beside the ranks ``history`` says the run held.

    Names are matched exactly, else by the longer ending one shares with the other (a Trainer or
    Lightning prefix on one side), provided that match is unique.
    """
    run_names = sorted({name for ranks in history.ranks for name in ranks})
    matrices = []
    for m in report.matrices:
        run_name = _matching_name(m.name, run_names)
        held = [k for k in history.series(run_name) if k is not None] if run_name is not None else []
        last = history.ranks[-1].get(run_name) if run_name is not None else None
        largest = max(held) if held else None
        matrices.append(RunRanks(m.name, run_name, m.matrix_shape, m.rank_max, dict(m.ranks), last, largest))
    return RunComparison(history, list(report.settings.get("tolerances", [])), matrices)


def _matching_name(name: str, run_names: list[str]) -> str | None:
    if name in run_names:
        return name
    candidates = [r for r in run_names if r.endswith("." + name) or name.endswith("." + r)]
    return candidates[0] if len(candidates) == 1 else None
