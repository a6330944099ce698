"""Figures for the analyses, drawn with matplotlib's Agg canvas and written to a file.

No pyplot and no global backend switch: each function builds a ``Figure``, saves it to a
temporary file next to the target and renames it into place, so a reader never sees half a PNG.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from adapprox_cli.analysis import CompareReport, EstimateReport, SpectrumReport, common_name_prefix
from adapprox_cli.atomic_io import atomic_write
from adapprox_cli.errors import InputError
from adapprox_cli.methods import METHODS

__all__ = ["plot_compare", "plot_estimate", "plot_spectrum", "representative_names"]

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
        raise InputError(
            f"--plot {path}: unknown image format {path.suffix or '(none)'}; use a .png (or .pdf/.svg) name"
        )
    if not path.parent.is_dir():
        raise InputError(f"--plot {path}: the folder {path.parent} does not exist; create it first")
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
    ax.set_title(
        f"Top-{report.settings.get('top', '')} singular values of the {what} moment" + _under(prefix)
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
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
    fig = Figure(figsize=(max(7.0, 1.1 * len(groups) + 2), 4.8), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        xs, ys = [], []
        for i, group in enumerate(groups):
            value = errors.get((group, method))
            if value is not None and math.isfinite(value):
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(max(value, 1e-16))
        ax.bar(xs, ys, width=width, label=method, color=f"C{list(METHODS).index(method) % 10}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)))
    prefix = common_name_prefix(report.matrices)
    ax.set_xticklabels([_short(g.removeprefix(prefix)) for g in groups], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("relative error $\\|V - \\tilde V\\|_F / \\|V\\|_F$")
    ax.set_title(f"Approximation error by method (rank {report.settings['rank']})" + _under(prefix))
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(4, len(methods)))
    return _save(fig, path)


def plot_estimate(report: EstimateReport, path: str | Path) -> Path:
    """Optimizer-state memory: against the tolerance for a checkpoint, as bars for fixed ranks."""
    fig = Figure(figsize=(8.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    unit, scale = _byte_unit(max(r.bytes for r in report.memory))
    if any(r.setting.startswith("tol=") for r in report.memory):
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
    labels = [f"{r.label} {r.setting}".strip() for r in report.memory]
    ax.barh(
        range(len(labels)),
        [r.bytes / scale for r in report.memory],
        color=[f"C{i}" for i in range(len(labels))],
    )
    for i, r in enumerate(report.memory):
        ax.annotate(f" {r.saving_percent:.2f}% saved", (r.bytes / scale, i), va="center", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")


def _under(prefix: str) -> str:
    return f"; names under {prefix}" if prefix else ""


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else "..." + name[-(limit - 3) :]
