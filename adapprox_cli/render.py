"""Rich consoles, tables and progress bars: used by the CLI layer only.

Results go to stdout; logs, warnings and progress go to stderr so that ``--json`` output on
stdout stays machine-readable.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
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
