"""The registry of checkpoint formats: one module per family, each ending with its ``FORMAT``.

A format says how it is recognised (a directory layout, a file signature, or the shape of the
unpickled object), how it is read into an ``OptimizerCheckpoint``, how a converted state is
written back into it, and which of its ``extra`` fields ``inspect`` shows. Adding a format is its
module plus one name in ``_MODULES``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CheckpointFormat", "checkpoint_format", "registry"]

# Detection order: directory layouts, then file signatures, then unpickled objects, each in this order.
_MODULES = ("hf_trainer", "dcp", "safetensors", "deepspeed", "accelerate", "lightning", "nanogpt", "plain")


@dataclass(frozen=True)
class CheckpointFormat:
    name: str  # as in OptimizerCheckpoint.format
    description: str  # for help texts: "nanoGPT ckpt.pt"
    # (path, obj, trust_checkpoint=, optimizer_index=) -> OptimizerCheckpoint; obj is None for paths
    load: Callable[..., Any] = field(repr=False)
    detect_directory: Callable[[Path], bool] | None = field(default=None, repr=False)
    detect_file: Callable[[Path], bool] | None = field(default=None, repr=False)  # before unpickling
    detect_object: Callable[[Any, Path], bool] | None = field(default=None, repr=False)
    several_optimizers: bool = False  # --optimizer-index applies
    # "container": the loaded object re-saved with the new state; "directory": the directory copied
    # with its optimizer file replaced; None: the state is written on its own (plain/safetensors).
    write_back: str | None = None
    optimizer_file: str | None = None  # "directory" write-back: the file replaced by default
    # (container, target optimizer, Adapprox settings) -> container, for formats that record them
    update_container: Callable[[Any, str, dict], Any] | None = field(default=None, repr=False)
    extra_keys: tuple[str, ...] = ()  # OptimizerCheckpoint.extra fields inspect shows


@functools.cache
def registry() -> tuple[CheckpointFormat, ...]:
    """Every format, in detection order."""
    return tuple(importlib.import_module(f"{__name__}.{m}").FORMAT for m in _MODULES)


def checkpoint_format(name: str) -> CheckpointFormat | None:
    """The registered format called ``name``, or None."""
    return next((f for f in registry() if f.name == name), None)
