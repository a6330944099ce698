"""How values are spelled in messages, tables and sort orders: one spelling for each.

Plain functions of values (no Rich, no I/O), so the library and the CLI write a dtype, a shape or
a size the same way everywhere.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["dtype_name", "format_shape", "human_bytes", "natural_key"]


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the name a user types (``--dtype``, ``first_moment_dtype``)."""
    return str(dtype).removeprefix("torch.")


def format_shape(shape: tuple[int, ...] | list[int]) -> str:
    """'768x3072'; '()' for a scalar."""
    return "x".join(str(int(d)) for d in shape) if len(shape) else "()"


def human_bytes(n: float) -> str:
    """Binary units: '512 B', '1.50 KiB', ... up to TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value: 'layer2' before 'layer10', 'rank_2' before 'rank_10'.

    Digit runs and text runs are tagged so a number is never compared with a string.
    """
    return tuple(
        (0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in re.split(r"(\d+)", text) if tok
    )
