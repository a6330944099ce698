"""Rich consoles, tables and progress bars: used by the CLI layer only.

Results go to stdout; logs, warnings and progress go to stderr so that ``--json`` output on
stdout stays machine-readable.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# The CLI's spellings of a shape and a size, re-exported for the commands.
from adapprox_cli.formatting import format_shape as format_shape
from adapprox_cli.formatting import human_bytes as human_bytes

# C0/C1 control characters and DEL: a name holding ESC ] 0 ; ... BEL would retitle the terminal,
# ESC [ 8 m hide what follows; they are shown as \x1b instead.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def safe_text(value: Any) -> str:
    """Text from a file or an argument (paths, names, messages quoting them), ready for Rich.

    Control characters become visible ``\\xNN`` escapes and Rich markup is escaped, so
    ``run[/x]/ckpt.pt`` prints as itself instead of raising MarkupError or vanishing, and a
    ``[link=...]`` in a parameter name is shown, not followed. Every render of such text goes
    through here.
    """
    return escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value)))


@functools.cache
def stdout_console() -> Console:
    return Console(highlight=False)


@functools.cache
def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def warn(message: str) -> None:
    stderr_console().print(f"[yellow]Warning:[/] {safe_text(message)}", highlight=False, soft_wrap=True)


def info(message: str) -> None:
    stderr_console().print(safe_text(message), highlight=False, soft_wrap=True)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def _finite(obj: Any) -> Any:
    # JSON has no NaN/Infinity: scripts reading our output must get valid JSON.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def print_json(data: Any) -> None:
    """Machine-readable output on stdout (plain print: no Rich markup or wrapping)."""
    print(json.dumps(_finite(data), indent=2, default=_json_default))


def table(
    title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, right_from: int = 1
) -> Table:
    """A simple table: text columns left, numeric columns (index >= right_from) right-aligned."""
    t = Table(title=safe_text(title) if title else title, title_justify="left", header_style="bold")
    for i, col in enumerate(columns):
        t.add_column(col, justify="right" if i >= right_from else "left", no_wrap=i < right_from)
    for row in rows:
        t.add_row(*[safe_text(c) for c in row])
    return t


def wrap_first_column(t: Table) -> Table:
    """Long names in the first column wrap instead of squeezing the numeric columns."""
    t.columns[0].no_wrap = False
    t.columns[0].overflow = "fold"
    return t


def table_cells(column: Any) -> list[str]:
    """A column's cells as the text they print (for CSV and for measuring widths)."""
    return [str(c) for c in column._cells]


def print_table(t: Table) -> None:
    """A table on stdout within the terminal's width (or COLUMNS when set).

    Numbers are never cut: the name column folds first, and when the numeric columns still do
    not fit they are split over several tables that repeat the leading text columns. Into a pipe
    without COLUMNS a table keeps its natural width: one line per row, for grep and awk.
    """
    console = stdout_console()
    if console.is_terminal or os.environ.get("COLUMNS", "").isdigit():
        parts = _fit_columns(t, console.width)
    else:
        parts = [t]
        width = _natural_width(t)
        if width > console.width:
            console = Console(highlight=False, width=width)
    for part in parts:
        console.print(part)


# Box-drawn tables spend 3 characters per column (a border and one space each side) and 1 more.
_PER_COLUMN, _EDGE = 3, 1
_MIN_NAME = 14


def _natural_width(t: Table) -> int:
    widths = [max([len(str(c.header)), *(len(x) for x in table_cells(c))]) for c in t.columns]
    return sum(widths) + _PER_COLUMN * len(widths) + _EDGE


def _fit_columns(t: Table, width: int) -> list[Table]:
    columns = list(t.columns)
    keys = next((i for i, c in enumerate(columns) if c.justify != "left"), len(columns)) or 1
    need = []
    for c in columns:
        longest_cell = max((len(x) for x in table_cells(c)), default=0)
        longest_word = max((len(w) for w in str(c.header).split()), default=0)
        need.append(max(longest_cell, longest_word))
    natural = [max(n, len(str(c.header))) for n, c in zip(need, columns)]

    def total(widths: list[int]) -> int:
        return sum(widths) + _PER_COLUMN * len(widths) + _EDGE

    if total(natural) <= width:
        return [t]
    name_min = min(natural[0], _MIN_NAME)
    if keys < len(columns) and total([name_min, *natural[1:]]) > width:
        # Splitting anyway: let each part keep whole names where the widest column allows.
        widest = max(need[keys:])
        name_min = max(name_min, min(natural[0], width - total([0, *need[1:keys], widest])))
    fixed = [name_min, *need[1:keys]]

    def split(widths: list[int]) -> list[list[int]]:
        chunks: list[list[int]] = []
        for i in range(keys, len(columns)):
            if chunks and total(fixed + [widths[j] for j in chunks[-1]] + [widths[i]]) <= width:
                chunks[-1].append(i)
            else:
                chunks.append([i])
        return chunks

    # Whole headers when they cost no extra part; else headers wrap at their spaces.
    chunks = split(natural)
    if len(chunks) > len(split(need)) or any(total(fixed + [natural[j] for j in c]) > width for c in chunks):
        chunks = split(need)
    else:
        need = [*need[:keys], *natural[keys:]]
    parts = []
    for n, chunk in enumerate(chunks, 1):
        chosen = list(range(keys)) + chunk
        spare = width - total([need[j] for j in chosen])
        widths = {j: need[j] for j in chosen}
        widths[0] = max(name_min, min(natural[0], need[0] + spare))
        title = t.title if len(chunks) == 1 else f"{t.title} (part {n}/{len(chunks)})"
        part = Table(title=title, title_justify="left", header_style="bold")
        for j in chosen:
            c = columns[j]
            part.add_column(
                c.header,
                justify=c.justify,
                width=widths[j],
                no_wrap=False,
                overflow="fold",
            )
        for row in zip(*(table_cells(columns[j]) for j in chosen)):
            part.add_row(*row)
        parts.append(part)
    return parts


def progress(enabled: bool = True) -> Progress:
    """A progress bar on stderr; disabled when asked (``--json``) or when stderr is not a terminal."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr_console(),
        transient=True,
        disable=not enabled,
    )


def track(items: Sequence[Any], description: str, enabled: bool = True) -> Iterator[Any]:
    with progress(enabled) as bar:
        task = bar.add_task(safe_text(description), total=len(items))
        for item in items:
            yield item
            bar.advance(task)


def show_progress(json_output: bool) -> bool:
    """Progress bars only for a person watching: not with ``--json``, not when stderr is piped."""
    return not json_output and stderr_console().is_terminal


@contextlib.contextmanager
def callback_progress(description: str, enabled: bool) -> Iterator[Any]:
    """A bar on stderr driven by a library's ``progress(done, total, name)`` callback (yielded)."""
    with progress(enabled) as bar:
        task = bar.add_task(safe_text(description), total=None)

        def update(done: int, total: int, name: str) -> None:
            bar.update(
                task, completed=done, total=total, description=safe_text(f"{description} {name}".rstrip())
            )

        yield update
