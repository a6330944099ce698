"""The Typer application, its global options, and the one place where errors become messages.

Command modules (``adapprox_cli/cli/*.py``) register themselves on ``app``; every command is a
few lines over a library call. Library errors (``AdapproxError``) are printed as one line on
stderr with a non-zero exit code; ``--debug`` (anywhere on the command line) or
``ADAPPROX_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import math
import os
import re
import sys

import typer
from typer.core import TyperCommand, TyperGroup

from adapprox_cli import __version__
from adapprox_cli.errors import AdapproxError, ParameterError

_debug_flag = False  # set from --debug by the root callback on every invocation


def debug_enabled() -> bool:
    return _debug_flag or os.environ.get("ADAPPROX_DEBUG", "") not in ("", "0")


def _print_error(message: str) -> None:
    # Imported lazily: rich is only needed when something goes wrong or is rendered.
    from adapprox_cli.render import safe_text, stderr_console

    stderr_console().print(
        f"[bold red]Error:[/] {safe_text(message)}", markup=True, highlight=False, soft_wrap=True
    )


def _plain_params(params: list) -> list:
    """Flags without a value placeholder (``--json``, not ``--json <bool>``), arguments in capitals.

    Typer shows every option's type, so a flag reads as if it took a value (and ``--json true``
    is then refused); a metavar of "" shows nothing. Arguments get the usual ``PATH`` metavar.
    """
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        elif param.param_type_name == "argument" and param.metavar is None:
            param.metavar = param.name.upper()
    return params


def _plain_usage(pieces: list[str]) -> list[str]:
    # Typer brackets a required argument as {PATH}; the convention (and click's) is a bare PATH.
    return [re.sub(r"^\{(.*)\}$", r"\1", piece) for piece in pieces]


class _Command(TyperCommand):
    """Every command's help: flags shown as flags, the usage line as ``adapprox CMD [OPTIONS] PATH``."""

    def get_params(self, ctx):
        return _plain_params(super().get_params(ctx))

    def collect_usage_pieces(self, ctx):
        return _plain_usage(super().collect_usage_pieces(ctx))


class _App(typer.Typer):
    """``app.command`` registers ``_Command`` unless a command asks for another class."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or _Command, **kwargs)


# Library parameters whose command option has another name (``compare_methods(power_iters=)`` is
# ``compare --iters``); every other parameter is found under its own name among the options.
_OPTION_OF_PARAMETER = {
    "power_iters": "iters",
    "learning_rate": "lr",
    "pattern": "params",
    "tolerances": "tol",
    "fixed_ranks": "rank",
    "ranks": "rank",
    "preset": "shapes",
    "data_dir": "data",
    "metrics_path": "metrics",
    "out_dir": "out",
}


def error_message(exc: AdapproxError, command) -> str:
    """The error as the command's user reads it: each parameter it names is called by its flag.

    A parameter the command has no option for keeps its Python name rather than a made-up flag.
    """
    if not isinstance(exc, ParameterError) or command is None:
        return str(exc)
    flags = {
        param.name: max(param.opts, key=len)
        for param in command.params
        if param.param_type_name == "option" and param.opts
    }

    def spell(parameter: str) -> str:
        return flags.get(_OPTION_OF_PARAMETER.get(parameter, parameter), flags.get(parameter, parameter))

    return exc.spelled_by(spell)


class _ErrorReportingGroup(TyperGroup):
    """Turns library errors into a one-line message and an exit code instead of a traceback."""

    _workflow_order = ("inspect", "spectrum", "compare", "estimate", "convert", "train", "demo")

    def list_commands(self, ctx):
        # Workflow order (inspect, analyse, convert, train) rather than alphabetical.
        known = [name for name in self._workflow_order if name in self.commands]
        return known + sorted(name for name in self.commands if name not in known)

    def get_params(self, ctx):
        return _plain_params(super().get_params(ctx))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AdapproxError as exc:
            if debug_enabled():
                raise
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            _print_error(error_message(exc, command))
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            # stdout closed early (`adapprox ... | head`): not an error worth a message.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(141) from None
        except Exception as exc:  # a bug or an unexpected library failure: still no traceback by default
            # Click's own exceptions (usage errors) carry their message and exit code: let them
            # through. Typer may vendor click, so match on the module rather than import it.
            if debug_enabled() or "click" in type(exc).__module__:
                raise
            _print_error(f"{type(exc).__name__}: {exc} (run again with --debug for the full traceback)")
            raise typer.Exit(1) from None


app = _App(
    name="adapprox",
    cls=_ErrorReportingGroup,
    help=(
        "Adapprox: Adam with a randomized low-rank second moment.\n\n"
        "Look at the second moments in the AdamW checkpoints you already have, measure how well "
        "low-rank approximations reproduce them, estimate the memory Adapprox would save, convert "
        "the state, and resume training with less optimizer memory."
    ),
    no_args_is_help=True,
    add_completion=False,
    # Markdown: docstring paragraphs are re-wrapped to the terminal width.
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        import torch

        typer.echo(f"adapprox {__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    threads: int = typer.Option(
        0,
        "--threads",
        min=0,
        envvar="ADAPPROX_THREADS",
        help=(
            "CPU threads for torch; 0 (default) picks half the cores, fewer on a busy machine "
            "(1 on a 2-core one), which measured fastest or within 1.15x of it for every command. "
            "Accepted before or after the command name."
        ),
    ),
) -> None:
    global _debug_flag
    _debug_flag = debug
    import torch

    torch.set_num_threads(threads or auto_threads())


def auto_threads() -> int:
    """Half the cores, less the cores other jobs keep busy (1-minute load average), at least 1.

    On 2 shared cores (`benchmarks/bench_threads.py`) one thread was the fastest choice for every
    command but `compare` on large matrices of an idle machine (1.14x of two threads), and two
    threads were up to 4.4x slower on a busy one: OpenMP threads that wait for a core cost more
    than the parallel work gains, and most of this tool's matrices are small.
    """
    cores = os.cpu_count() or 1
    try:
        busy = math.ceil(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average on this platform
        busy = 0
    return max(1, min(cores // 2, cores - busy))


def _hoist_global_options(argv: list[str]) -> list[str]:
    """Move ``--threads N`` from after the command name to before it, where the root parses it."""
    front, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--threads" and i + 1 < len(argv):
            front += argv[i : i + 2]
            i += 2
            continue
        (front if arg.startswith("--threads=") else rest).append(arg)
        i += 1
    return front + rest


def main() -> None:
    # ``--debug`` is accepted anywhere on the line (users append it after the error they saw).
    argv = sys.argv[1:]
    if "--debug" in argv:
        os.environ["ADAPPROX_DEBUG"] = "1"
        argv = [a for a in argv if a != "--debug"]
    argv = _hoist_global_options(argv)
    try:
        app(args=argv, prog_name="adapprox")
    except KeyboardInterrupt:
        _print_error("interrupted")
        sys.exit(130)
