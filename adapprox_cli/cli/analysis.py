"""``adapprox spectrum``, ``adapprox compare`` and ``adapprox estimate``: thin layers over
``adapprox_cli.analysis``: parse, load, call one library function, render or print JSON."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from adapprox_cli.analysis import common_name_prefix
from adapprox_cli.cli.app import app
from adapprox_cli.cli.options import (
    CheckpointPaths,
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
from adapprox_cli.errors import InputError, ParameterError
from adapprox_cli.formatting import format_shape
from adapprox_cli.methods import METHODS

_OptionalPaths = Annotated[
    list[Path] | None,
    typer.Argument(
        help="A checkpoint, several, or a run directory (as for spectrum); omit with --shapes.",
        show_default=False,
        metavar="PATH...",
    ),
]
_CsvOption = Annotated[
    Path | None,
    typer.Option(
        "--csv",
        help="Also write the tables as CSV: to PATH when there is one, else one file per table "
        "beside it (out.csv: out-errors.csv, out-summary.csv, ...).",
        show_default=False,
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


class _AnalysisCommand(TyperCommand):
    """Usage reads ``adapprox compare [OPTIONS] PATH...`` (typer would print ``{PATH}...``)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or (param.name or "").upper()
                pieces.append(name if param.required else f"[{name}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


def _show_progress(json_output: bool) -> bool:
    from adapprox_cli.render import show_progress

    return show_progress(json_output)


def _progress(description: str, enabled: bool):
    """A bar on stderr driven by the library's ``progress(done, total, name)`` callback."""
    from adapprox_cli.render import callback_progress

    return callback_progress(description, enabled)


@contextlib.contextmanager
def _about(path: Path) -> Iterator[None]:
    """Errors about one parameter's moment name the checkpoint file too."""
    try:
        yield
    except InputError as exc:
        if str(path) in str(exc):
            raise
        if isinstance(exc, ParameterError):  # still printed with the command's flag
            raise ParameterError(exc.parameter, f"{path}: {exc.template}", mentions=exc.mentions) from exc
        raise type(exc)(f"{path}: {exc}") from exc


def _load(path: Path, trust_checkpoint: bool, optimizer_index: int, json_output: bool) -> Any:
    from adapprox_cli.checkpoints import load_checkpoint
    from adapprox_cli.render import warn

    with _progress(f"loading {path.name}", _show_progress(json_output)):
        checkpoint = load_checkpoint(path, trust_checkpoint=trust_checkpoint, optimizer_index=optimizer_index)
    for message in checkpoint.warnings:
        warn(message)
    return checkpoint


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


class _CsvTables:
    """The tables a command prints, kept to be written as CSV files when --csv asks for them."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.prefix = ""
        self.tables: list[tuple[str, list[str], list[tuple[str, ...]]]] = []

    def start(self, path: Path | None) -> None:
        if path is not None and not path.expanduser().parent.is_dir():
            raise InputError(f"--csv {path}: the folder {path.parent} does not exist; create it first")
        self.path, self.prefix, self.tables = path, "", []

    def add(self, name: str, t: Any) -> None:
        from adapprox_cli.render import table_cells

        if self.path is not None:
            headers = [str(c.header) for c in t.columns]
            self.tables.append((self.prefix + name, headers, list(zip(*(table_cells(c) for c in t.columns)))))

    def write(self) -> None:
        import csv

        from adapprox_cli.atomic_io import atomic_write
        from adapprox_cli.render import info

        if self.path is None or not self.tables:
            return
        path = self.path.expanduser()
        for name, headers, rows in self.tables:
            target = (
                path
                if len(self.tables) == 1
                else path.with_name(f"{path.stem}-{name}{path.suffix or '.csv'}")
            )

            def write(temporary: Path, headers: list[str] = headers, rows: list = rows) -> None:
                with temporary.open("w", newline="", encoding="utf-8") as handle:
                    writer = csv.writer(handle)
                    writer.writerow(headers)
                    writer.writerows(rows)

            info(f"wrote {atomic_write(target, write)}")
        self.tables = []


_CSV = _CsvTables()


# --------------------------------------------------------------------------- one checkpoint or a run


def _analyse(
    ctx: typer.Context,
    paths: list[Path],
    kind: str,
    analyse: Callable[[Any, Path, str], Any],
    render: Callable[[Any], None],
    *,
    json_output: bool,
    plot: Path | None,
    trust_checkpoint: bool,
    optimizer_index: int,
) -> None:
    """One checkpoint as before, or every stage of a run one at a time, then a summary across them.

    ``analyse(checkpoint, path, progress_label)`` computes one stage's report. A lone checkpoint
    path keeps the single-report output (and JSON shape); a run directory or several paths give
    a table per stage, a summary and ``{"stages": [...]}`` JSON. A stage that fails is reported
    in one line and the others go on; the exit code is then 2.
    """
    from adapprox_cli.analysis import analyse_run
    from adapprox_cli.checkpoints.runs import find_stages
    from adapprox_cli.cli.app import error_message
    from adapprox_cli.render import print_json, warn

    found = find_stages(paths, trust_checkpoint=trust_checkpoint)
    given = paths[0].expanduser()
    if len(paths) == 1 and len(found.stages) == 1 and found.stages[0].path == given:
        report = analyse(_load(given, trust_checkpoint, optimizer_index, json_output), given, kind)
        if json_output:
            print_json(report.to_dict())
        else:
            render(report)
        _CSV.write()
        _plot(kind, report, plot)
        return
    for path, why in found.skipped:
        warn(f"{path}: skipped ({why})")
    label = {"text": kind}

    def on_stage(i: int, total: int, stage: Any) -> None:
        label["text"] = f"stage {i}/{total} {kind}"

    def analyse_stage(checkpoint: Any, path: Path) -> Any:
        try:
            return analyse(checkpoint, path, label["text"])
        except ParameterError as exc:  # a stage's one-line error names the flag, as a lone file's does
            raise InputError(error_message(exc, ctx.command)) from exc

    def on_result(i: int, total: int, result: Any) -> None:
        if result.report is None:
            _print_stage_error(f"stage {i}/{total} failed: {result.error}")
        elif not json_output:
            from adapprox_cli.render import stdout_console

            step = "" if result.step is None else f" (step {result.step})"
            stdout_console().rule(f"stage {i}/{total}: {result.path}{step}", align="left")
            _CSV.prefix = f"stage{i}-"
            render(result.report)
            _CSV.prefix = ""

    run = analyse_run(
        found.stages,
        lambda path: _load(path, trust_checkpoint, optimizer_index, json_output),
        analyse_stage,
        kind=kind,
        skipped=found.skipped,
        on_stage=on_stage,
        on_result=on_result,
    )
    if json_output:
        print_json(run.to_dict())
    else:
        _render_trends(run)
    _CSV.write()
    if plot is not None and any(s.report is not None for s in run.stages):
        _plot(f"{kind}_run", run, plot)
    if run.failed:
        raise typer.Exit(2)


def _print_stage_error(message: str) -> None:
    from adapprox_cli.render import stderr_console

    stderr_console().print(f"[red]Error:[/] {message}", highlight=False, soft_wrap=True)


def _trend_value(quantity: str, value: float | None) -> str:
    if value is None:
        return "-"
    if quantity == "bytes":
        return f"{int(value):,}"
    if quantity.startswith("rank"):
        return str(int(value))
    return _num(value, 4)


def _render_trends(run: Any) -> None:
    from adapprox_cli.render import stdout_console, table, wrap_first_column

    stages = [s for s in run.stages]
    headers = [f"step {s.step}" if s.step is not None else Path(s.path).name for s in stages]
    prefix = common_name_prefix([t.name for t in run.trends if not t.name.startswith("all matrices")])
    rows = []
    previous = None
    # A peer's memory depends on the shapes only: the same at every stage, so not worth a row here.
    hidden = [t for t in run.trends if t.quantity == "bytes" and not t.name.startswith(("Adapprox", "AdamW"))]
    for t in (t for t in run.trends if t not in hidden):
        name = t.name.removeprefix(prefix) if t.name != previous else ""
        previous = t.name
        change = "-" if t.change is None else f"x{t.change:.2f}"
        rows.append((name, t.quantity, *(_trend_value(t.quantity, v) for v in t.values), change, t.direction))
    title = f"{run.kind} across {len(stages)} stages" + (f" (names under {prefix})" if prefix else "")
    columns = ["name", "quantity", *headers, "last / first", "trend"]
    stdout_console().rule("summary", align="left")
    _print_table(wrap_first_column(table(title, columns, rows, right_from=2)), name="trends")
    if hidden:
        stdout_console().print(f"{len(hidden)} peer optimizers' memory (the same at every stage): --json")
    if run.failed:
        stdout_console().print(f"{len(run.failed)} of {len(stages)} stages failed to read (shown as -)")


# --------------------------------------------------------------------------- spectrum


@app.command(cls=_AnalysisCommand)
def spectrum(
    ctx: typer.Context,
    path: CheckpointPaths,
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
    csv: _CsvOption = None,
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
    Given a run directory or several checkpoints, every stage is analysed in training order,
    then summarised across stages (--plot: energy and stable rank against the step).

    Examples:

        adapprox spectrum out/ckpt.pt

        adapprox spectrum out/ckpt.pt --params 'h\\.0\\.' --plot spectrum.png

        adapprox spectrum checkpoint-500/ --method gram --json > spectrum.json
    """
    from adapprox_cli.analysis import load_moments, spectrum_report

    _check_plot(plot)
    _CSV.start(csv)

    def analyse(checkpoint: Any, path: Path, label: str) -> Any:
        moments = load_moments(checkpoint, params=params, moment=moment)
        with _about(path), _progress(label, _show_progress(json_output)) as update:
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
        return report

    _analyse(
        ctx,
        path,
        "spectrum",
        analyse,
        _render_spectrum,
        json_output=json_output,
        plot=plot,
        trust_checkpoint=trust_checkpoint,
        optimizer_index=optimizer_index,
    )


def _render_spectrum(report: Any) -> None:
    from adapprox_cli.render import stdout_console, table, wrap_first_column

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
    _print_table(wrap_first_column(table(title, columns, rows)), name="spectrum")
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


def _print_table(t: Any, *, name: str = "table") -> None:
    """The table on stdout (``render.print_table``), kept for --csv under ``name``."""
    from adapprox_cli.render import print_table

    _CSV.add(name, t)
    print_table(t)


# --------------------------------------------------------------------------- compare


@app.command(cls=_AnalysisCommand)
def compare(
    ctx: typer.Context,
    path: CheckpointPaths,
    rank: Annotated[int, typer.Option("--rank", min=1, help="Rank k of the low-rank methods.")] = 5,
    oversample: _Oversample = 5,
    iters: _Iters = 5,
    methods: Annotated[
        str,
        typer.Option(
            "--methods",
            help=f"Comma-separated, default all of: {', '.join(METHODS)}.",
            show_default=False,
        ),
    ] = ",".join(METHODS),
    long: Annotated[
        bool, typer.Option("--long", help="One row per matrix and method, with every number.", metavar="")
    ] = False,
    num_heads: _NumHeads = None,
    adam_mini_default: _AdamMiniDefault = "row",
    params: ParamsRegex = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    json_output: JsonOption = False,
    csv: _CsvOption = None,
    plot: PlotOption = None,
    seed: SeedOption = 0,
    trust_checkpoint: TrustOption = False,
    optimizer_index: OptimizerIndexOption = 0,
) -> None:
    """How well each approximation reproduces every second moment, against the optimum.

    For every matrix and method: relative error ||V - V~||_F / ||V||_F, numbers stored and
    time; the error divided by the optimum, the exact truncated SVD at --rank (Eckart-Young),
    and for methods storing at most m + n numbers also by the rank-1 SVD's error. The last
    table weights every matrix by its size. --plot draws the paper's Figure 2. Given a run
    directory or several checkpoints, every stage is compared in training order, then each
    error is followed across stages (--plot: error against the training step, per method).

    Examples:

        adapprox compare out/ckpt.pt

        adapprox compare out/ckpt.pt --rank 1 --methods svd,srsi,adafactor --plot compare.png

        adapprox compare checkpoint-500/ --params 'mlp' --json > compare.json

        adapprox compare output_dir/ --rank 5 --plot error-over-training.png
    """
    from adapprox_cli.analysis import checkpoint_num_heads, compare_methods, load_moments

    _check_plot(plot)
    _CSV.start(csv)
    names = tuple(m.strip() for m in methods.split(",") if m.strip())

    def analyse(checkpoint: Any, path: Path, label: str) -> Any:
        moments = load_moments(checkpoint, params=params)
        heads = num_heads or checkpoint_num_heads(checkpoint)
        with _about(path), _progress(label, _show_progress(json_output)) as update:
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
        _warn_dense_is_smaller(report)
        return report

    _analyse(
        ctx,
        path,
        "compare",
        analyse,
        lambda report: _render_compare(report, long),
        json_output=json_output,
        plot=plot,
        trust_checkpoint=trust_checkpoint,
        optimizer_index=optimizer_index,
    )


def _warn_dense_is_smaller(report: Any) -> None:
    """At a large --rank the factors k (m + n) outgrow the dense m x n state they approximate."""
    from adapprox_cli.render import warn

    rank = report.settings["rank"]
    larger = report.larger_than_dense()
    if larger:
        name, shape = next(iter(larger.items()))
        warn(
            f"--rank {rank}: {len(larger)} of {len(report.matrices)} matrices store more numbers as factors "
            f"than as the dense second moment (e.g. {name} {format_shape(shape)}: "
            f"{rank} x ({shape[0]} + {shape[1]}) > {shape[0] * shape[1]}); try a smaller --rank"
        )


def _long_row(r: Any) -> tuple:
    method = r.method + (f" ({r.detail})" if r.detail else "")
    rank = r.rank if r.rank is not None else "-"
    errors = (_num(r.relative_error, 4), _ratio(r.vs_optimum), _ratio(r.vs_rank1_optimum))
    return (r.name, method, rank, *errors, f"{r.numbers_stored:,}", f"{r.seconds:.3f}")


def _render_compare(report: Any, long: bool) -> None:
    from adapprox_cli.render import stdout_console, table, wrap_first_column

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
        _print_table(
            table("Approximation error per matrix and method", columns, rows, right_from=2), name="errors"
        )
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
        _print_table(
            wrap_first_column(table(title, ["parameter", "shape", *methods], rows, right_from=2)),
            name="errors",
        )
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
    _print_table(
        table(f"All {len(report.matrices)} matrices (means weighted by size)", columns, rows), name="summary"
    )


# --------------------------------------------------------------------------- estimate


@app.command(cls=_AnalysisCommand)
def estimate(
    ctx: typer.Context,
    path: _OptionalPaths = None,
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
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Plan from a Hugging Face config.json (or its folder) instead of a checkpoint: llama, "
            "mistral, qwen2, qwen3, gpt2 or gpt_neox, any size.",
            show_default=False,
        ),
    ] = None,
    galore_rank: Annotated[int, typer.Option("--galore-rank", min=1, help="GaLore's projection rank.")] = 128,
    metrics: Annotated[
        Path | None,
        typer.Option(
            "--metrics",
            help="The --metrics file of an `adapprox train` run from this checkpoint: the ranks the "
            "optimizer held are set beside the predicted ones (--plot draws both over the run).",
            show_default=False,
        ),
    ] = None,
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
    csv: _CsvOption = None,
    plot: PlotOption = None,
    seed: SeedOption = 0,
    trust_checkpoint: TrustOption = False,
    optimizer_index: OptimizerIndexOption = 0,
) -> None:
    """Ranks Adapprox would settle on, and optimizer-state memory against AdamW and its peers.

    From a checkpoint: per matrix, the rank adaptive S-RSI picks at each --tol and the error
    reached; then the state memory of AdamW, Adapprox with and without first moment, Adafactor,
    CAME, Adam-mini, SMMF and GaLore, in the file's state dtype, and the % saved vs AdamW.
    With --shapes (a preset) or --config (a Hugging Face config.json) no checkpoint is needed:
    memory at fixed ranks (default k_max and 1, the two ends of the paper's range), and the
    total of weights, gradients and state at fp32, bf16 with fp32 master and pure bf16.
    Given a run directory or several checkpoints, ranks and memory are followed over training.

    Examples:

        adapprox estimate out/ckpt.pt --tol 0.1 --tol 0.05 --tol 0.01 --plot memory.png

        adapprox estimate --shapes gpt2-124m --rank 192 --rank 1

        adapprox estimate --config path/to/Qwen3-8B/config.json --rank 8

        adapprox estimate output_dir/ --tol 0.05 --plot ranks-over-training.png

        adapprox estimate out/ckpt.pt --tol 0.05 --metrics run/metrics.jsonl --plot held-vs-predicted.png
    """
    from adapprox_cli.analysis import (
        checkpoint_num_heads,
        estimate_memory,
        estimate_preset,
        load_moments,
        state_bytes_per_number,
    )
    from adapprox_cli.lowrank import DENSE_SKETCH_COLUMNS

    _check_plot(plot)
    _CSV.start(csv)
    sibling_path = path[0] if config is not None and path and len(path) == 1 else None
    if sum((bool(path) and sibling_path is None, shapes is not None, config is not None)) != 1:
        raise InputError("give a checkpoint PATH or --shapes PRESET or --config config.json (one of them)")
    if metrics is not None and (shapes is not None or config is not None):
        raise InputError(
            "--metrics sets a run beside the estimate of its checkpoint: give the checkpoint PATH"
        )
    if shapes is not None or config is not None:
        flag = "--shapes" if shapes is not None else "--config"
        if (tol and sibling_path is None) or rank_max or params:
            raise InputError(
                f"--tol, --rank-max and --params need a checkpoint; with {flag} use --rank "
                "(or --config with the checkpoint of a smaller sibling for --tol)"
            )
        ranks = tuple(rank) if rank else (None, 1)
        if shapes is not None:
            report = estimate_preset(
                shapes, ranks, galore_rank=galore_rank, adam_mini_default=adam_mini_default
            )
        else:
            from adapprox_cli.analysis import estimate_config
            from adapprox_cli.model_shapes import load_config

            sibling = None
            if sibling_path is not None:
                # Ranks measured on a smaller model of the same family, carried over per matrix kind.
                checkpoint = _load(sibling_path, trust_checkpoint, optimizer_index, json_output)
                with _progress("sibling ranks", _show_progress(json_output)) as update:
                    sibling = estimate_memory(
                        load_moments(checkpoint),
                        tolerances=tol or (DEFAULT_TOL,),
                        galore_rank=galore_rank,
                        dtype=dtype,
                        device=device,
                        seed=seed,
                        source=str(sibling_path),
                        progress=update,
                    )
                del checkpoint
            report = estimate_config(
                load_config(config),
                str(config),
                ranks,
                galore_rank=galore_rank,
                adam_mini_default=adam_mini_default,
                sibling=sibling,
            )
        if json_output:
            from adapprox_cli.render import print_json

            print_json(report.to_dict())
        else:
            _render_estimate(report)
        _CSV.write()
        _plot("estimate", report, plot)
        return

    def analyse(checkpoint: Any, source: Path, label: str) -> Any:
        moments = load_moments(checkpoint, params=params)
        with _about(source), _progress(label, _show_progress(json_output)) as update:
            return estimate_memory(
                moments,
                tolerances=tol or (DEFAULT_TOL,),
                rank_max=rank_max,
                fixed_ranks=rank or (),
                rule=rule,
                galore_rank=galore_rank,
                bytes_per_number=state_bytes_per_number(checkpoint),
                num_heads=num_heads or checkpoint_num_heads(checkpoint),
                adam_mini_default=adam_mini_default,
                oversample=oversample,
                power_iters=iters,
                dtype=dtype,
                device=device,
                seed=seed,
                source=str(source),
                progress=update,
                sketch_columns=DENSE_SKETCH_COLUMNS,  # the state the default optimizer keeps
            )

    if metrics is not None:
        _estimate_against_run(
            path, metrics, analyse, json_output=json_output, plot=plot, trust_checkpoint=trust_checkpoint,
            optimizer_index=optimizer_index,
        )  # fmt: skip
        return
    _analyse(
        ctx,
        path,
        "estimate",
        analyse,
        _render_estimate,
        json_output=json_output,
        plot=plot,
        trust_checkpoint=trust_checkpoint,
        optimizer_index=optimizer_index,
    )


def _estimate_against_run(
    paths: list[Path],
    metrics: Path,
    analyse: Callable[[Any, Path, str], Any],
    *,
    json_output: bool,
    plot: Path | None,
    trust_checkpoint: bool,
    optimizer_index: int,
) -> None:
    """The estimate of one checkpoint, then the ranks a run from it held beside the predicted ones."""
    from adapprox_cli.analysis import ranks_against_run, read_rank_history
    from adapprox_cli.checkpoints.runs import find_stages

    history = read_rank_history(metrics)  # a bad file fails before the analysis, not after
    found = find_stages(paths, trust_checkpoint=trust_checkpoint)
    given = paths[0].expanduser()
    if len(paths) != 1 or len(found.stages) != 1 or found.stages[0].path != given:
        raise InputError(
            "--metrics sets one run beside one checkpoint: give the checkpoint the run started from"
        )
    report = analyse(_load(given, trust_checkpoint, optimizer_index, json_output), given, "estimate")
    comparison = ranks_against_run(report, history)
    if json_output:
        from adapprox_cli.render import print_json

        print_json({**report.to_dict(), "run": comparison.to_dict()})
    else:
        _render_estimate(report)
        _render_against_run(comparison)
    _CSV.write()
    if plot is not None:
        from adapprox_cli import plots
        from adapprox_cli.render import info

        info(f"wrote {plots.plot_estimate_against_run(comparison, plot)}")


def _render_against_run(comparison: Any) -> None:
    from adapprox_cli.render import stdout_console, table, warn, wrap_first_column

    tols = list(comparison.predicted_numbers)
    prefix = common_name_prefix([m.name for m in comparison.matrices])
    columns = [
        "parameter",
        "shape",
        "k_max",
        *[f"predicted at tol {t:g}" for t in tols],
        "run: last",
        "run: largest",
    ]
    rows = [
        (
            m.name.removeprefix(prefix),
            format_shape(m.matrix_shape),
            m.rank_max,
            *[m.predicted[t] for t in tols],
            "-" if m.last is None else m.last,
            "-" if m.largest is None else m.largest,
        )
        for m in comparison.matrices
    ]
    title = f"Predicted ranks against the run ({comparison.history.source}, to iteration {comparison.history.last_iter})"
    _print_table(wrap_first_column(table(title, columns, rows, right_from=2)), name="run")
    held = comparison.last_numbers
    for t, predicted in comparison.predicted_numbers.items():
        ratio = f"{held / predicted:.2f}x" if predicted else "-"
        stdout_console().print(
            f"factor numbers at the run's last ranks: {held:,}; predicted at tol {t:g}: {predicted:,} "
            f"(held / predicted {ratio})"
        )
    if comparison.unmatched:
        warn(
            f"{len(comparison.unmatched)} matrices have no rank in {comparison.history.source} "
            f"(e.g. {comparison.unmatched[0]}): is it the run of this checkpoint, trained with Adapprox?"
        )


def _render_estimate(report: Any) -> None:
    from adapprox_cli.render import human_bytes, safe_text, stdout_console, table, warn, wrap_first_column

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
        _print_table(wrap_first_column(table(title, columns, rows, right_from=2)), name="ranks")
        if any(any(m.capped.values()) for m in report.matrices):
            console.print("* k_max reached before the tolerance (raise it with --rank-max)")
    columns = ["optimizer", "setting", "state", "bytes", "saved vs AdamW"]
    rows = [
        [r.label, r.setting, human_bytes(r.bytes), f"{r.bytes:,}", _saving(r.saving_percent)]
        for r in report.memory
    ]
    console.print(
        safe_text(report.source) + f": {report.parameters:,} parameters, optimizer state in "
        f"{report.bytes_per_number}-byte values"
    )
    _print_table(table("Optimizer-state memory", columns, rows, right_from=2), name="memory")
    if report.totals:
        _render_totals(report)
    console.print(_verdict(report))
    for message in report.warnings:
        warn(message)


def _render_totals(report: Any) -> None:
    from adapprox_cli.analysis import PRECISIONS
    from adapprox_cli.render import human_bytes, stdout_console, table

    columns = ["optimizer", "setting", *PRECISIONS]
    rows = [
        [t["label"], t["setting"], *(human_bytes(t["bytes"][p]) for p in PRECISIONS)] for t in report.totals
    ]
    title = "Weights + gradients + optimizer state (activations not counted)"
    _print_table(table(title, columns, rows, right_from=2), name="totals")
    stdout_console().print(
        "fp32: 4-byte weights, gradients and state; bf16 + fp32 master: 2-byte weights and gradients, "
        "a 4-byte master copy and state; pure bf16: 2 bytes everywhere"
    )


def _saving(percent: float) -> str:
    # SOAP and Shampoo store more than AdamW: say so rather than print a negative saving.
    return f"{percent:.2f}%" if percent >= 0 else f"{-percent:.2f}% more"


def _verdict(report: Any) -> str:
    """One line: what Adapprox keeps against AdamW at each setting, and the smallest state listed."""
    from adapprox_cli.render import human_bytes

    adamw = next(r for r in report.memory if r.optimizer == "adamw")
    without_m = {r.setting: r for r in report.memory if r.optimizer == "adapprox_no_m"}
    parts = []
    for r in (r for r in report.memory if r.optimizer == "adapprox"):
        share = f"{100 - r.saving_percent:.1f}%"
        lean = without_m.get(r.setting)
        lean_share = f" (beta1=0: {100 - lean.saving_percent:.1f}%)" if lean else ""
        parts.append(f"{r.setting} keeps {human_bytes(r.bytes)}, {share} of AdamW's{lean_share}")
    smallest = min(report.memory, key=lambda r: r.bytes)
    name = f"{smallest.label} {smallest.setting}".strip()
    return (
        f"Verdict: AdamW keeps {human_bytes(adamw.bytes)}; Adapprox at "
        + "; at ".join(parts)
        + f". Smallest here: {name}, {human_bytes(smallest.bytes)}."
    )
