"""Options shared by several commands, declared once (``Annotated`` aliases)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adapprox_cli.checkpoints.formats import registry

# Listed from the format registry, so a new format appears here by itself.
_FORMAT_LIST = ", ".join(f.description for f in registry()[:-1]) + f", or {registry()[-1].description}"
CheckpointPath = Annotated[
    Path,
    typer.Argument(
        help=f"A checkpoint file or directory: {_FORMAT_LIST}.",
        show_default=False,
    ),
]
# spectrum, compare and estimate read one checkpoint or a whole run, one stage at a time.
CheckpointPaths = Annotated[
    list[Path],
    typer.Argument(
        help=f"A checkpoint ({_FORMAT_LIST}), several, or a run directory holding them "
        "(checkpoint-N/, *step=N.ckpt, numbered files): analysed stage by stage in training order.",
        show_default=False,
        metavar="PATH...",
    ),
]
ParamsRegex = Annotated[
    str | None,
    typer.Option("--params", help="Only parameters whose name matches this regular expression (re.search)."),
]
DeviceOption = Annotated[
    str, typer.Option("--device", help="Where to compute: auto (CUDA when available), cpu, cuda or cuda:N.")
]
DtypeOption = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="Compute precision: float32 or float64. Second moments span ~11 decades, so states are upcast.",
    ),
]
JsonOption = Annotated[
    bool,
    # metavar "": a flag takes no value, so the help shows no "<bool>" after it.
    typer.Option(
        "--json", help="Print machine-readable JSON on stdout (logs and progress go to stderr).", metavar=""
    ),
]
PlotOption = Annotated[Path | None, typer.Option("--plot", help="Write a figure to this PNG file.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for the random test matrices.")]
TrustOption = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="Allow pickled Python objects outside the safe allowlist. This runs code from the file: "
        "only for checkpoints you made yourself.",
        metavar="",
    ),
]
OptimizerIndexOption = Annotated[
    int,
    typer.Option(
        "--optimizer-index", help="Which optimizer of a Lightning checkpoint with several (0-based)."
    ),
]
