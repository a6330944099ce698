"""``adapprox spectrum``, ``adapprox compare`` and ``adapprox estimate``: thin layers over
``adapprox_cli.analysis``: parse, load, call one library function, render or print JSON."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from adapprox_cli.analysis import common_name_prefix
from adapprox_cli.cli.app import app
from adapprox_cli.cli.options import (
    CheckpointPath,
    DeviceOption,
    DtypeOption,
    JsonOption,
    OptimizerIndexOption,
    ParamsRegex,
    PlotOption,
    SeedOption,
    TrustOption,
)
from adapprox_cli.defaults import DEFAULT_TOL
from adapprox_cli.errors import InputError
from adapprox_cli.formatting import format_shape
from adapprox_cli.methods import METHODS

_OptionalPath = Annotated[
    Path | None,
    typer.Argument(
        help="A checkpoint file or directory (as for spectrum); omit with --shapes.", show_default=False
    ),
]
_Oversample = Annotated[int, typer.Option("--oversample", min=0, help="Extra sketch columns p.")]
_Iters = Annotated[int, typer.Option("--iters", min=0, help="Power (subspace) iterations l.")]
_NumHeads = Annotated[
    int | None,
    typer.Option(
        "--num-heads",
        min=1,
        help="Attention heads, for Adam-mini's per-head blocks (default: from the file).",
    ),
]
_AdamMiniDefault = Annotated[
    str,
    typer.Option(
        "--adam-mini-default",
        help="Adam-mini block for matrices no name rule matches: row, or tensor (one value, as Adam-mini does).",
    ),
]


# --------------------------------------------------------------------------- shared plumbing


def _show_progress(json_output: bool) -> bool:
    from adapprox_cli.render import stderr_console

    return not json_output and stderr_console().is_terminal


@contextlib.contextmanager
def _progress(description: str, enabled: bool) -> Iterator[Any]:
    """A bar on stderr driven by the library's ``progress(done, total, name)`` callback."""
    from adapprox_cli.render import progress

    with progress(enabled) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{description} {name}".rstrip())

        yield update


def _load(path: Path, trust_checkpoint: bool, optimizer_index: int, json_output: bool) -> Any:
    from adapprox_cli.checkpoints import load_checkpoint
    from adapprox_cli.render import warn

    with _progress(f"loading {path.name}", _show_progress(json_output)):
        checkpoint = load_checkpoint(path, trust_checkpoint=trust_checkpoint, optimizer_index=optimizer_index)
    for message in checkpoint.warnings:
        warn(message)
    return checkpoint


def _moments(checkpoint: Any, params: str | None, moment: str = "exp_avg_sq") -> list:
    from adapprox_cli.analysis import moments_from_checkpoint, select_moments

    return select_moments(moments_from_checkpoint(checkpoint, moment), params)


def _plot(kind: str, report: Any, path: Path | None) -> None:
    if path is None:
        return
    from adapprox_cli import plots
    from adapprox_cli.render import info

    written = getattr(plots, f"plot_{kind}")(report, path)
    info(f"wrote {written}")


def _check_plot(path: Path | None) -> None:
    # Fail before the long computation, not after it.
    if path is not None:
        from adapprox_cli.plots import check_plot_path

        check_plot_path(path)


def _rank(value: int | None, known: int) -> str:
    return f">{known}" if value is None else str(value)


def _ratio(x: float | None) -> str:
    return "-" if x is None else "inf" if math.isinf(x) else f"{x:.3f}"


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


# --------------------------------------------------------------------------- spectrum


@app.command()
def spectrum(
    path: CheckpointPath,
    top: Annotated[
        int, typer.Option("--top", min=1, help="How many leading singular values to report.")
    ] = 60,
    moment: Annotated[
        str, typer.Option("--moment", help="exp_avg_sq (second moment) or exp_avg (first moment).")
    ] = "exp_avg_sq",
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="auto (exact SVD for small matrices, a randomized sketch for large ones), svd (exact), "
            "gram (exact, float64 Gram eigenvalues) or sketch.",
        ),
    ] = "auto",
    oversample: _Oversample = 10,
    iters: _Iters = 2,
    params: ParamsRegex = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    json_output: JsonOption = False,
    plot: PlotOption = None,
    seed: SeedOption = 0,
    trust_checkpoint: TrustOption = False,
    optimizer_index: OptimizerIndexOption = 0,
) -> None:
    """Singular values of every matrix-shaped moment: how low-rank is Adam's second moment?

    Per matrix: the top singular values, stable rank ||V||_F^2 / sigma_1^2, the share of
    ||V||_F^2 in the top 1/5/20 directions, the rank holding 99% of it, and the ranks a
    relative error of 0.1/0.05/0.01 needs. With the default --method auto, large matrices
    get one randomized sketch of width --top + --oversample: ranks beyond it print as >W
    (use --method gram for exact ones). --plot draws the Adapprox paper's Figure 1.

    Examples:

        adapprox spectrum out/ckpt.pt

        adapprox spectrum out/ckpt.pt --params 'h\\.0\\.' --plot spectrum.png

        adapprox spectrum checkpoint-500/ --method gram --json > spectrum.json
    """
    from adapprox_cli.analysis import spectrum_report

    _check_plot(plot)
    checkpoint = _load(path, trust_checkpoint, optimizer_index, json_output)
    moments = _moments(checkpoint, params, moment)
    with _progress("spectrum", _show_progress(json_output)) as update:
        report = spectrum_report(
            moments,
            top=top,
            method=method,
            oversample=oversample,
            power_iters=iters,
            dtype=dtype,
            device=device,
            seed=seed,
            progress=update,
        )
    report.settings["moment"] = moment
    report.settings["path"] = str(path)
    if json_output:
        from adapprox_cli.render import print_json

        print_json(report.to_dict())
    else:
        _render_spectrum(report)
    _plot("spectrum", report, plot)


def _render_spectrum(report: Any) -> None:
    from adapprox_cli.render import stdout_console, table

    tols = report.settings["tolerances"]
    prefix = common_name_prefix([m.name for m in report.matrices])
    columns = ["parameter", "shape", "sigma_1", "stable rank", "energy in top 1/5/20 (%)", "rank for 99%"]
    columns.append("rank for error " + "/".join(f"{t:g}" for t in tols))
    rows = []
    for m in report.matrices:
        known = m.ranks_known_up_to
        energy = "/".join(
            "-" if m.energy_share[k] is None else f"{100 * m.energy_share[k]:.1f}" for k in (1, 5, 20)
        )
        ranks = "/".join(_rank(m.rank_for_error[t], known) for t in tols)
        sigma = _num(m.singular_values[0] if m.singular_values else None)
        name = m.name.removeprefix(prefix)
        rank_99 = _rank(m.rank_for_energy_99, known)
        rows.append(
            (name, format_shape(m.matrix_shape), sigma, _num(m.stable_rank, 4), energy, rank_99, ranks)
        )
    console = stdout_console()
    what = "second" if report.settings.get("moment", "exp_avg_sq") == "exp_avg_sq" else "first"
    title = f"Spectrum of the {what} moment" + (f" (names under {prefix})" if prefix else "")
    _print_table(_wrapping(table(title, columns, rows)))
    notes = [f"{len(report.matrices)} matrices"]
    if report.skipped:
        notes.append(f"{len(report.skipped)} vectors/scalars skipped")
    sketched = [m.ranks_known_up_to for m in report.matrices if m.method == "sketch"]
    if sketched:
        notes.append(
            f"{len(sketched)} sketched at width {max(sketched)}: '>{max(sketched)}' lies beyond the sketch "
            "(exact ranks: --method gram)"
        )
    console.print("; ".join(notes))


def _wrapping(t: Any) -> Any:
    # Long names wrap instead of squeezing the numeric columns in narrow terminals.
    t.columns[0].no_wrap = False
    t.columns[0].overflow = "fold"
    return t


def _print_table(t: Any) -> None:
    """A table on stdout; into a pipe or file at its natural width, never squeezed to 80 columns."""
    from rich.console import Console
    from rich.measure import Measurement

    from adapprox_cli.render import stdout_console

    console = stdout_console()
    if not console.is_terminal:
        needed = Measurement.get(console, console.options.update_width(1000), t).maximum
        if needed > console.width:
            console = Console(highlight=False, width=needed)
    console.print(t)


# --------------------------------------------------------------------------- compare


@app.command()
def compare(
    path: CheckpointPath,
    rank: Annotated[int, typer.Option("--rank", min=1, help="Rank k of the low-rank methods.")] = 5,
    oversample: _Oversample = 5,
    iters: _Iters = 5,
    methods: Annotated[
        str,
        typer.Option("--methods", help=f"Comma-separated: {', '.join(METHODS)}."),
    ] = ",".join(METHODS),
    long: Annotated[
        bool, typer.Option("--long", help="One row per matrix and method, with every number.")
    ] = False,
    num_heads: _NumHeads = None,
    adam_mini_default: _AdamMiniDefault = "row",
    params: ParamsRegex = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    json_output: JsonOption = False,
    plot: PlotOption = None,
    seed: SeedOption = 0,
    trust_checkpoint: TrustOption = False,
    optimizer_index: OptimizerIndexOption = 0,
) -> None:
    """How well each approximation reproduces every second moment, against the optimum.

    For every matrix and method: relative error ||V - V~||_F / ||V||_F, numbers stored and
    time; the error divided by the optimum, the exact truncated SVD at --rank (Eckart-Young),
    and for methods storing at most m + n numbers also by the rank-1 SVD's error. The last
    table weights every matrix by its size. --plot draws the paper's Figure 2.

    Examples:

        adapprox compare out/ckpt.pt

        adapprox compare out/ckpt.pt --rank 1 --methods svd,srsi,adafactor --plot compare.png

        adapprox compare checkpoint-500/ --params 'mlp' --json > compare.json
    """
    from adapprox_cli.analysis import compare_methods

    _check_plot(plot)
    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    checkpoint = _load(path, trust_checkpoint, optimizer_index, json_output)
    moments = _moments(checkpoint, params)
    heads = num_heads or _num_heads(checkpoint)
    with _progress("compare", _show_progress(json_output)) as update:
        report = compare_methods(
            moments,
            names,
            rank=rank,
            oversample=oversample,
            power_iters=iters,
            num_heads=heads,
            adam_mini_default=adam_mini_default,
            dtype=dtype,
            device=device,
            seed=seed,
            progress=update,
        )
    report.settings["path"] = str(path)
    if json_output:
        from adapprox_cli.render import print_json

        print_json(report.to_dict())
    else:
        _render_compare(report, long)
    _plot("compare", report, plot)


def _long_row(r: Any) -> tuple:
    method = r.method + (f" ({r.detail})" if r.detail else "")
    rank = r.rank if r.rank is not None else "-"
    errors = (_num(r.relative_error, 4), _ratio(r.vs_optimum), _ratio(r.vs_rank1_optimum))
    return (r.name, method, rank, *errors, f"{r.numbers_stored:,}", f"{r.seconds:.3f}")


def _num_heads(checkpoint: Any) -> int | None:
    """Attention heads from the file's model configuration, when it has one."""
    sources = []
    for holder in (getattr(checkpoint, "extra", None), getattr(checkpoint, "container", None)):
        if isinstance(holder, dict):
            sources += [holder, holder.get("model_args"), holder.get("config")]
    for source in sources:
        if isinstance(source, dict):
            for key in ("n_head", "num_attention_heads", "n_heads", "num_heads"):
                value = source.get(key)
                if isinstance(value, int) and value > 0:
                    return value
    return None


def _render_compare(report: Any, long: bool) -> None:
    from adapprox_cli.render import stdout_console, table

    console = stdout_console()
    methods = report.settings["methods"]
    rank = report.settings["rank"]
    if long:
        columns = [
            "parameter",
            "method",
            "rank",
            "rel. error",
            "/ optimum",
            "/ rank-1 opt.",
            "numbers",
            "seconds",
        ]
        rows = [_long_row(r) for r in report.rows]
        _print_table(table("Approximation error per matrix and method", columns, rows, right_from=2))
    else:
        prefix = common_name_prefix(report.matrices)
        cells = {(r.name, r.method): r for r in report.rows}
        rows = []
        for name in report.matrices:
            errors = [_num(cells[name, method].relative_error) for method in methods]
            rows.append(
                (name.removeprefix(prefix), format_shape(cells[name, methods[0]].matrix_shape), *errors)
            )
        title = f"Relative error ||V - V~||_F / ||V||_F (rank {rank}" + (
            f"; names under {prefix})" if prefix else ")"
        )
        _print_table(_wrapping(table(title, ["parameter", "shape", *methods], rows, right_from=2)))
        console.print("per-matrix ratios to the optimum, numbers stored and times: --long or --json")
    columns = ["method", "rel. error", "/ optimum", "/ rank-1 opt.", "numbers stored", "seconds"]
    rows = [
        (
            s.method,
            _num(s.weighted_error, 4),
            _ratio(s.weighted_vs_optimum),
            _ratio(s.weighted_vs_rank1_optimum),
            f"{s.numbers_stored:,}",
            f"{s.seconds:.2f}",
        )
        for s in report.summary
    ]
    _print_table(table(f"All {len(report.matrices)} matrices (means weighted by size)", columns, rows))


# --------------------------------------------------------------------------- estimate


@app.command()
def estimate(
    path: _OptionalPath = None,
    tol: Annotated[
        list[float] | None,
        typer.Option(
            "--tol",
            help=f"Largest relative distance (Frobenius) of the stored second moment to Adam's, as "
            f"Adapprox's tol bounds it (default {DEFAULT_TOL}); repeat for several.",
        ),
    ] = None,
    rank_max: Annotated[
        int | None, typer.Option("--rank-max", min=1, help="Cap on every rank (default min(m, n) // 4).")
    ] = None,
    rank: Annotated[
        list[int] | None,
        typer.Option("--rank", min=1, help="A fixed rank for every matrix (clamped to k_max); repeatable."),
    ] = None,
    shapes: Annotated[
        str | None,
        typer.Option(
            "--shapes",
            help="A preset instead of a checkpoint: gpt2-124m, gpt2-355m, gpt2-774m, gpt2-1.5b or llama-7b.",
        ),
    ] = None,
    galore_rank: Annotated[int, typer.Option("--galore-rank", min=1, help="GaLore's projection rank.")] = 128,
    rule: Annotated[
        str,
        typer.Option(
            "--rule",
            help="exact: smallest rank whose optimal error is <= tol; as-rsi: run the optimizer's adaptive "
            "S-RSI from rank 1 until the rank settles (slower, randomized).",
        ),
    ] = "exact",
    oversample: _Oversample = 5,
    iters: _Iters = 5,
    num_heads: _NumHeads = None,
    adam_mini_default: _AdamMiniDefault = "row",
    params: ParamsRegex = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    json_output: JsonOption = False,
    plot: PlotOption = None,
    seed: SeedOption = 0,
    trust_checkpoint: TrustOption = False,
    optimizer_index: OptimizerIndexOption = 0,
) -> None:
    """Ranks Adapprox would settle on, and optimizer-state memory against AdamW and its peers.

    From a checkpoint: per matrix, the rank adaptive S-RSI picks at each --tol and the error
    reached; then the state memory of AdamW, Adapprox with and without first moment, Adafactor,
    CAME, Adam-mini, SMMF and GaLore, in the file's state dtype, and the % saved vs AdamW.
    With --shapes no checkpoint is needed: memory at fixed ranks (default k_max and 1, the two
    ends of the paper's range).

    Examples:

        adapprox estimate out/ckpt.pt --tol 0.1 --tol 0.05 --tol 0.01 --plot memory.png

        adapprox estimate --shapes gpt2-124m --rank 192 --rank 1
    """
    from adapprox_cli.analysis import estimate_memory, estimate_preset
    from adapprox_cli.lowrank import DENSE_SKETCH_COLUMNS

    _check_plot(plot)
    if (path is None) == (shapes is None):
        raise InputError("give a checkpoint PATH or --shapes PRESET (one of them)")
    if shapes is not None:
        if tol or rank_max or params:
            raise InputError("--tol, --rank-max and --params need a checkpoint; with --shapes use --rank")
        report = estimate_preset(
            shapes,
            tuple(rank) if rank else (None, 1),
            galore_rank=galore_rank,
            adam_mini_default=adam_mini_default,
        )
    else:
        checkpoint = _load(path, trust_checkpoint, optimizer_index, json_output)
        moments = _moments(checkpoint, params)
        with _progress("estimate", _show_progress(json_output)) as update:
            report = estimate_memory(
                moments,
                tolerances=tol or (DEFAULT_TOL,),
                rank_max=rank_max,
                fixed_ranks=rank or (),
                rule=rule,
                galore_rank=galore_rank,
                bytes_per_number=_state_bytes_per_number(checkpoint),
                num_heads=num_heads or _num_heads(checkpoint),
                adam_mini_default=adam_mini_default,
                oversample=oversample,
                power_iters=iters,
                dtype=dtype,
                device=device,
                seed=seed,
                source=str(path),
                progress=update,
                sketch_columns=DENSE_SKETCH_COLUMNS,  # the state the default optimizer keeps
            )
    if json_output:
        from adapprox_cli.render import print_json

        print_json(report.to_dict())
    else:
        _render_estimate(report)
    _plot("estimate", report, plot)


def _state_bytes_per_number(checkpoint: Any) -> int:
    """Bytes per stored value of the file's second moments (4 for float32 states)."""
    sizes = [p.dtype.itemsize for p in checkpoint.params if getattr(p, "has_second_moment", bool(p.state))]
    return max(set(sizes), key=sizes.count) if sizes else 4


def _render_estimate(report: Any) -> None:
    from adapprox_cli.render import human_bytes, stdout_console, table

    console = stdout_console()
    if report.matrices:
        tols = report.settings["tolerances"]
        prefix = common_name_prefix([m.name for m in report.matrices])
        columns = ["parameter", "shape", "k_max"] + [f"rank (error) at tol {t:g}" for t in tols]
        rows = []
        for m in report.matrices:
            cells = [f"{m.ranks[t]}{'*' if m.capped[t] else ''} ({m.errors[t]:.3g})" for t in tols]
            rows.append((m.name.removeprefix(prefix), format_shape(m.matrix_shape), m.rank_max, *cells))
        title = f"Adaptive ranks ({report.rule} rule)" + (f"; names under {prefix}" if prefix else "")
        _print_table(_wrapping(table(title, columns, rows, right_from=2)))
        if any(any(m.capped.values()) for m in report.matrices):
            console.print("* k_max reached before the tolerance (raise it with --rank-max)")
    columns = ["optimizer", "setting", "state", "bytes", "saved vs AdamW"]
    rows = [
        [r.label, r.setting, human_bytes(r.bytes), f"{r.bytes:,}", f"{r.saving_percent:.2f}%"]
        for r in report.memory
    ]
    console.print(
        f"{report.source}: {report.parameters:,} parameters, optimizer state in "
        f"{report.bytes_per_number}-byte values"
    )
    _print_table(table("Optimizer-state memory", columns, rows, right_from=2))
