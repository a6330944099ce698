"""Figures for the analyses, drawn with matplotlib's Agg canvas and written to a file.

No pyplot and no global backend switch: each function builds a ``Figure``, saves it to a
temporary file next to the target and renames it into place, so a reader never sees half a PNG.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from adapprox_cli.analysis import (
    WEIGHTED,
    CompareReport,
    EstimateReport,
    RunComparison,
    RunReport,
    SpectrumReport,
    common_name_prefix,
)
from adapprox_cli.atomic_io import atomic_write
from adapprox_cli.errors import ParameterError
from adapprox_cli.methods import METHODS

if TYPE_CHECKING:
    from adapprox_cli.train.loop import TrainResult

__all__ = [
    "plot_compare",
    "plot_compare_run",
    "plot_estimate",
    "plot_estimate_against_run",
    "plot_estimate_run",
    "plot_loss_curves",
    "plot_spectrum",
    "plot_spectrum_run",
    "representative_names",
]

_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def representative_names(names: Sequence[str], limit: int) -> list[str]:
    """At most ``limit`` names, one per kind of matrix (layer numbers ignored), in order.

    ``h.0.mlp.c_fc.weight`` and ``h.7.mlp.c_fc.weight`` are the same kind, so a 12-layer model
    shows its embeddings and the first layer's matrices rather than 50 lines.
    """
    if len(names) <= limit:
        return list(names)
    kinds: dict[str, str] = {}
    for name in names:
        kinds.setdefault(re.sub(r"\d+", "#", name), name)
    return list(kinds.values())[:limit]


def check_plot_path(path: str | Path) -> Path:
    """The output path, if its format is one matplotlib writes and its folder exists."""
    path = Path(path).expanduser()
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in _FORMATS:
        raise ParameterError(
            "plot",
            f"{{name}} {path}: unknown image format {path.suffix or '(none)'}; use a .png (or .pdf/.svg) name",
        )
    if not path.parent.is_dir():
        raise ParameterError(
            "plot", f"{{name}} {path}: the folder {path.parent} does not exist; create it first"
        )
    return path


def _save(fig: Figure, path: str | Path) -> Path:
    path = check_plot_path(path)
    FigureCanvasAgg(fig)
    fmt = path.suffix.lower().lstrip(".")
    return atomic_write(path, lambda temporary: fig.savefig(temporary, format=fmt, dpi=120))


def plot_spectrum(report: SpectrumReport, path: str | Path, *, max_lines: int = 8) -> Path:
    """The paper's Figure 1: the leading singular values of several matrices, log scale."""
    chosen = set(representative_names([m.name for m in report.matrices], max_lines))
    prefix = common_name_prefix([m.name for m in report.matrices])
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for spectrum in report.matrices:
        values = [s for s in spectrum.singular_values if s > 0]
        if spectrum.name in chosen and values:
            m, n = spectrum.matrix_shape
            label = f"{spectrum.name.removeprefix(prefix)} {m}x{n}"
            ax.plot(range(1, len(values) + 1), values, marker=".", markersize=3, linewidth=1.2, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value $\\sigma_i$")
    what = "second" if report.settings.get("moment", "exp_avg_sq") == "exp_avg_sq" else "first"
    note = _subset_note([n for n in chosen], len(report.matrices))
    ax.set_title(
        f"Top-{report.settings.get('top', '')} singular values of the {what} moment"
        + _under(prefix)
        + (f"\n{note}" if note else ""),
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_compare(report: CompareReport, path: str | Path, *, max_groups: int = 10) -> Path:
    """The paper's Figure 2: relative error by method, per matrix (grouped bars, log scale).

    The last group is the size-weighted mean over all matrices.
    """
    methods = report.settings["methods"]
    names = representative_names(report.matrices, max_groups)
    errors = {(r.name, r.method): r.relative_error for r in report.rows}
    groups = [*names, "weighted mean"]
    for s in report.summary:
        errors[("weighted mean", s.method)] = s.weighted_error
    fig = Figure(figsize=(max(7.0, 1.1 * len(groups) + 3), 4.8), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    exact: list[float] = []  # x positions of errors that are exactly 0: no bar on a log axis
    positive: list[float] = []
    for j, method in enumerate(methods):
        xs, ys = [], []
        for i, group in enumerate(groups):
            value = errors.get((group, method))
            x = i + (j - (len(methods) - 1) / 2) * width
            if value is not None and math.isfinite(value) and value > 0:
                xs.append(x)
                ys.append(value)
            elif value == 0:
                exact.append(x)
        positive += ys
        ax.bar(xs, ys, width=width, label=method, color=f"C{list(METHODS).index(method) % 10}")
    ax.set_yscale("log")
    if positive:
        # The axis spans the errors that exist; an exact (0) error is marked, not drawn at 1e-16.
        ax.set_ylim(min(positive) / 3, max(positive) * 2)
    for x in exact:
        ax.annotate("0", (x, 0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)))
    prefix = common_name_prefix(report.matrices)
    ax.set_xticklabels([_short(g.removeprefix(prefix)) for g in groups], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("relative error $\\|V - \\tilde V\\|_F / \\|V\\|_F$")
    note = _subset_note(names, len(report.matrices))
    if exact:
        note += ("; " if note else "") + "0: an exact fit (no bar on the log axis)"
    ax.set_title(
        f"Approximation error by method (rank {report.settings['rank']})"
        + _under(prefix)
        + (f"\n{note}" if note else ""),
        fontsize=10,
    )
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_estimate(report: EstimateReport, path: str | Path) -> Path:
    """Optimizer-state memory: against the tolerance for a checkpoint, as bars for fixed ranks."""
    fig = Figure(figsize=(8.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    unit, scale = _byte_unit(max(r.bytes for r in report.memory))
    tols = {r.setting for r in report.memory if r.setting.startswith("tol=")}
    if len(tols) > 1:
        _memory_against_tolerance(ax, report, scale)
        ax.set_ylabel(f"optimizer state ({unit})")
    else:
        _memory_bars(ax, report, scale)
        ax.set_xlabel(f"optimizer state ({unit})")
    ax.set_title("Optimizer-state memory" + (f": {report.source}" if report.source else ""))
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def _byte_unit(largest: float) -> tuple[str, float]:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if largest >= scale:
            return unit, scale
    return "bytes", 1


def _memory_against_tolerance(ax: Any, report: EstimateReport, scale: float) -> None:
    """Adapprox (with and without first moment) as lines over the tolerances; the rest as levels."""
    for key in ("adapprox", "adapprox_no_m"):
        rows = {
            float(r.setting.removeprefix("tol=")): r
            for r in report.memory
            if r.optimizer == key and r.setting.startswith("tol=")
        }
        tols = sorted(rows)
        ax.plot(
            tols, [rows[t].bytes / scale for t in tols], marker="o", linewidth=2, label=rows[tols[0]].label
        )
    styles = ["--", ":", "-."]
    for i, r in enumerate(r for r in report.memory if not r.setting.startswith("tol=")):
        label = f"{r.label} {r.setting}".strip()
        ax.axhline(r.bytes / scale, linestyle=styles[i % 3], linewidth=1, color=f"C{i + 2}", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(tols, [f"{t:g}" for t in tols])
    ax.minorticks_off()
    ax.set_xlabel("tolerance (relative error of the second moment)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))


def _memory_bars(ax: Any, report: EstimateReport, scale: float) -> None:
    """Horizontal bars on a linear axis up to a bit past AdamW, so that half of AdamW looks half;
    the states larger than that (SOAP, Shampoo) run off the edge, labelled with their size."""
    from adapprox_cli.formatting import human_bytes

    labels = [f"{r.label} {r.setting}".strip() for r in report.memory]
    adamw = next(
        (r.bytes for r in report.memory if r.optimizer == "adamw"), max(r.bytes for r in report.memory)
    )
    limit = 1.45 * adamw / scale
    values = [min(r.bytes / scale, limit) for r in report.memory]
    bars = ax.barh(range(len(labels)), values, color=[f"C{i % 10}" for i in range(len(labels))])
    for bar, r in zip(bars, report.memory):
        if r.bytes / scale > limit:
            bar.set_hatch("//")
    for i, r in enumerate(report.memory):
        saving = (
            f"{r.saving_percent:.2f}% saved" if r.saving_percent >= 0 else f"{r.bytes / adamw:.1f}x AdamW"
        )
        text = f" {human_bytes(r.bytes)}, {saving}" + (" (off scale)" if r.bytes / scale > limit else "")
        inside = values[i] > 0.7 * limit
        ax.annotate(
            text.strip() + " " if inside else text,
            (values[i], i),
            va="center",
            ha="right" if inside else "left",
            fontsize=7,
            color="white" if inside else "black",
        )
    ax.set_xlim(0, limit)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()


def _under(prefix: str) -> str:
    return f"; names under {prefix}" if prefix else ""


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else "..." + name[-(limit - 3) :]


# --------------------------------------------------------------------------- training runs


def _stage_axis(run: RunReport) -> tuple[list[float], str, list[str] | None]:
    """x positions of the stages: their steps, or their order when a step is unknown."""
    steps = run.steps
    if all(s is not None for s in steps):
        return [float(s) for s in steps], "training step", None
    return [float(i) for i in range(1, len(steps) + 1)], "stage", [Path(s.path).name for s in run.stages]


def _series(run: RunReport, name: str, quantity: str) -> list[float | None]:
    for trend in run.trends:
        if trend.name == name and trend.quantity == quantity:
            return trend.values
    return [None] * len(run.stages)


def _plot_series(ax: Any, xs: list[float], values: Sequence[float | None], **style: Any) -> list[float]:
    """One line over the stages, broken where a value is unknown; returns the values drawn."""
    ys = [v if v is not None and math.isfinite(v) else math.nan for v in values]
    ax.plot(xs, ys, **{"marker": "o", "markersize": 4, **style})
    return [y for y in ys if not math.isnan(y)]


def _scale_for(ax: Any, drawn: Sequence[float], *, axis: str = "y") -> None:
    """Log scale when the positive values span more than a decade and a half, else linear."""
    positive = [v for v in drawn if v > 0]
    if positive and max(positive) / min(positive) > 30 and len(positive) == len(drawn):
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_DASHES = ("-", "--", ":")


def _finish_step_axes(axes, xs, labels, xlabel: str, *, legends) -> None:
    """Training-step x axes with their ticks and grid; legends outside, right of the plot."""
    for ax in axes:
        ax.set_xlabel(xlabel)
        _steps_ticks(ax, xs, labels)
        ax.grid(True, which="both", alpha=0.3)
    for ax in legends:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))


def _steps_ticks(ax: Any, xs: list[float], labels: list[str] | None) -> None:
    """Steps on a log axis when they span decades (10, 50, 300 ...), labelled where few."""
    if labels is None and min(xs) > 0 and max(xs) / min(xs) >= 20:
        ax.set_xscale("log")
        ax.minorticks_off()
    if labels is not None:
        ax.set_xticks(xs, [_short(label, 16) for label in labels], rotation=30, ha="right", fontsize=7)
    elif len(xs) <= 12:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])


def _run_title(run: RunReport, what: str) -> str:
    failed = f"; {len(run.failed)} stage(s) unreadable" if run.failed else ""
    return f"{what} over {len(run.stages)} checkpoints{failed}"


def _subset_note(shown: Sequence[str], total: int) -> str:
    if len(shown) == total:
        return ""
    return f"{len(shown)} of {total} matrices shown: one per kind (layer numbers ignored)"


def plot_compare_run(run: RunReport, path: str | Path, *, max_lines: int = 6) -> Path:
    """The paper's Figure 2 over training: each method's error against the training step.

    Left: the size-weighted error over all matrices, one line per method. Right: the first
    low-rank method's error per matrix, for one matrix of each kind.
    """
    reports = [s.report for s in run.stages if s.report is not None]
    methods = reports[0].settings["methods"]
    matrices = list(dict.fromkeys(name for r in reports for name in r.matrices))
    xs, xlabel, labels = _stage_axis(run)
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    drawn: list[float] = []
    for j, method in enumerate(methods):
        color = f"C{list(METHODS).index(method) % 10}" if method in METHODS else None
        # Methods that agree (svd, srsi, svd_lowrank) draw on top of each other: markers and
        # dashes of different sizes keep each one visible.
        style = {"marker": _MARKERS[j % len(_MARKERS)], "markersize": 9 - j % 4, "linestyle": _DASHES[j % 3]}
        drawn += _plot_series(left, xs, _series(run, WEIGHTED, method), label=method, color=color, **style)
    _scale_for(left, drawn)
    left.set_title(f"all {len(matrices)} matrices, size-weighted (rank {reports[0].settings['rank']})")
    left.set_ylabel("relative error $\\|V - \\tilde V\\|_F / \\|V\\|_F$")
    focus = next((m for m in ("srsi", "svd", "svd_lowrank") if m in methods), methods[0])
    shown = representative_names(matrices, max_lines)
    prefix = common_name_prefix(matrices)
    drawn = []
    for name in shown:
        drawn += _plot_series(right, xs, _series(run, name, focus), label=_short(name.removeprefix(prefix)))
    _scale_for(right, drawn)
    note = _subset_note(shown, len(matrices))
    right.set_title(f"{focus} per matrix" + _under(prefix) + (f"\n{note}" if note else ""), fontsize=9)
    _finish_step_axes((left, right), xs, labels, xlabel, legends=(left, right))
    fig.suptitle(_run_title(run, "Second-moment approximation error"))
    return _save(fig, path)


def plot_spectrum_run(run: RunReport, path: str | Path, *, max_lines: int = 6) -> Path:
    """How low-rank the moment stays over training: top-1 energy share and stable rank per matrix."""
    reports = [s.report for s in run.stages if s.report is not None]
    matrices = list(dict.fromkeys(m.name for r in reports for m in r.matrices))
    shown = representative_names(matrices, max_lines)
    prefix = common_name_prefix(matrices)
    xs, xlabel, labels = _stage_axis(run)
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    drawn_right: list[float] = []
    for i, name in enumerate(shown):
        label = _short(name.removeprefix(prefix))
        share = [None if v is None else 100 * v for v in _series(run, name, "energy in top 1")]
        _plot_series(left, xs, share, label=label, color=f"C{i}")
        drawn_right += _plot_series(right, xs, _series(run, name, "stable rank"), label=label, color=f"C{i}")
    left.set_ylabel("share of $\\|V\\|_F^2$ in $\\sigma_1$ (%)")
    left.set_ylim(0, 100)
    right.set_ylabel("stable rank $\\|V\\|_F^2 / \\sigma_1^2$")
    _scale_for(right, drawn_right)
    note = _subset_note(shown, len(matrices))
    what = "second" if reports[0].settings.get("moment", "exp_avg_sq") == "exp_avg_sq" else "first"
    _finish_step_axes((left, right), xs, labels, xlabel, legends=(right,))
    fig.suptitle(
        _run_title(run, f"Spectrum of the {what} moment") + _under(prefix) + (f"\n{note}" if note else ""),
        fontsize=10,
    )
    return _save(fig, path)


def plot_estimate_run(run: RunReport, path: str | Path) -> Path:
    """Ranks Adapprox settles on (mean over matrices, per tol) and state memory against the step."""
    reports = [s.report for s in run.stages if s.report is not None]
    tols = reports[0].settings.get("tolerances", [])
    xs, xlabel, labels = _stage_axis(run)
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    matrices = list(dict.fromkeys(m.name for r in reports for m in r.matrices))
    for i, tol in enumerate(tols):
        per_matrix = [_series(run, name, f"rank at tol {tol:g}") for name in matrices]
        mean = []
        for stage in range(len(run.stages)):
            ranks = [values[stage] for values in per_matrix if values[stage] is not None]
            mean.append(sum(ranks) / len(ranks) if ranks else None)
        _plot_series(left, xs, mean, label=f"tol {tol:g}", color=f"C{i}")
    left.set_ylabel(f"mean rank over {len(matrices)} matrices")
    left.set_title("Adapprox's adaptive rank", fontsize=9)
    rows = list(dict.fromkeys(t.name for t in run.trends if t.quantity == "bytes"))
    unit, scale = _byte_unit(max(v or 0 for t in run.trends if t.quantity == "bytes" for v in t.values))
    drawn: list[float] = []
    palette = matplotlib.colormaps["tab20"]  # a dozen rows: ten colours would repeat
    for i, name in enumerate(rows):
        values = [None if v is None else v / scale for v in _series(run, name, "bytes")]
        ours = name.startswith("Adapprox")
        style = {"linewidth": 2.2} if ours else {"linewidth": 1, "linestyle": "--", "marker": "s"}
        drawn += _plot_series(right, xs, values, label=name, color=palette(i % 20), **style)
    _scale_for(right, drawn)
    right.set_ylabel(f"optimizer state ({unit})")
    right.set_title("Optimizer-state memory", fontsize=9)
    _finish_step_axes((left, right), xs, labels, xlabel, legends=(left, right))
    fig.suptitle(_run_title(run, "Ranks and memory"))
    return _save(fig, path)


def plot_loss_curves(results: dict[str, TrainResult], path: str | Path, title: str | None = None) -> Path:
    """Training loss (raw and smoothed) and validation loss per iteration, one colour per optimizer.

    Drawn on matplotlib's Agg canvas without pyplot, and written through a temporary file.
    """
    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # The first run (the --optimizer one) is drawn last, solid and on top, the baselines under
    # it dashed: curves that nearly coincide must still show both.
    styles = {0: ("-", 3.0)}
    for i, (name, result) in reversed(list(enumerate(results.items()))):
        color, (linestyle, zorder) = f"C{i}", styles.get(i, ("--", 2.0))
        iters = [h["iter"] for h in result.history]
        losses = np.array([h["loss"] for h in result.history], dtype=float)
        if len(losses):
            ax.plot(iters, losses, color=color, alpha=0.2, linewidth=0.7, linestyle=linestyle, zorder=zorder)
            ax.plot(
                iters,
                _ema(losses, 0.9),
                color=color,
                linewidth=1.8 if i == 0 else 1.4,
                linestyle=linestyle,
                label=f"{name} train (smoothed)",
                zorder=zorder + 0.1,
            )
        if result.evals:
            ax.plot(
                [e["iter"] for e in result.evals],
                [e["val"] for e in result.evals],
                color=color,
                # a small filled dot over a larger hollow square: coinciding values show both
                marker="o" if i == 0 else "s",
                markersize=5 if i == 0 else 9,
                markerfacecolor=color if i == 0 else "white",
                linestyle=":",
                label=f"{name} val",
                zorder=zorder + 0.2,
            )
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss after resuming")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda k: list(results).index(labels[k].split(" ")[0]))
    ax.legend([handles[k] for k in order], [labels[k] for k in order])
    fig.tight_layout()
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".") or "png"
    return atomic_write(path, lambda temporary: fig.savefig(temporary, format=fmt, dpi=120))


def _ema(values: np.ndarray, beta: float) -> np.ndarray:
    """Exponential moving average, bias-corrected so the first points do not lag the curve."""
    out = np.empty_like(values)
    average = 0.0
    for i, value in enumerate(values):
        average = beta * average + (1 - beta) * value
        out[i] = average / (1 - beta ** (i + 1))
    return out


def plot_estimate_against_run(comparison: RunComparison, path: str | Path) -> Path:
    """The ranks a training run held against the ones ``estimate`` predicted for it.

    Left: factor numbers, sum of k (m + n) over the matched matrices, against the iteration,
    with the prediction at each tolerance as a dashed level. Right: the rank of one matrix of
    each kind (up to 6) with its predicted rank (first tolerance) dashed in the same colour.
    """
    history = comparison.history
    xs = [*history.iters, history.last_iter]  # steps: each recorded value holds until the next
    matched = [m for m in comparison.matrices if m.run_name is not None]
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    numbers = [
        sum((ranks.get(m.run_name) or 0) * sum(m.matrix_shape) for m in matched) for ranks in history.ranks
    ]
    left.step(xs, [*numbers, numbers[-1]], where="post", color="C0", label="the run (Adapprox)")
    for i, (tol, predicted) in enumerate(comparison.predicted_numbers.items()):
        left.axhline(predicted, color=f"C{i + 1}", linestyle="--", label=f"estimate at tol {tol:g}")
    left.set_ylabel(f"factor numbers, {len(matched)} matrices")
    left.set_title("Factored second moment: held vs predicted", fontsize=9)
    tols = list(comparison.predicted_numbers)
    shown = representative_names([m.name for m in matched], 6)
    for i, m in enumerate(m for m in matched if m.name in shown):
        series = history.series(m.run_name)
        right.step(xs, [*series, series[-1]], where="post", color=f"C{i}", label=m.name)
        if tols:
            right.axhline(m.predicted[tols[0]], color=f"C{i}", linestyle="--", linewidth=1)
    right.set_ylabel("rank")
    right.set_title(
        "Rank per matrix (solid: the run; dashed: estimate" + (f" at tol {tols[0]:g})" if tols else ")"),
        fontsize=9,
    )
    for ax in (left, right):
        ax.set_ylim(bottom=0)  # from zero: a few percent of rank jitter must not look like a trend
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"{Path(history.source).name}: the run's ranks against the estimate")
    return _save(fig, path)
