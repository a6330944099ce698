"""Command-line interface: ``adapprox`` (also ``python -m adapprox_cli``)."""

# Importing a command module registers its commands on ``app``.
from adapprox_cli.cli import analysis as _analysis  # noqa: F401
from adapprox_cli.cli import convert as _convert  # noqa: F401
from adapprox_cli.cli import demo as _demo  # noqa: F401
from adapprox_cli.cli import inspect as _inspect  # noqa: F401
from adapprox_cli.cli import train as _train  # noqa: F401
from adapprox_cli.cli.app import app, main

__all__ = ["app", "main"]
