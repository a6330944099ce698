"""Checks of user-given settings, shared by the library and every command.

Each check raises ``ParameterError`` naming the parameter as Python spells it (``tol``,
``rank_max``), the value and the fix, so ``train``, ``convert`` and ``estimate`` refuse the same
value with the same words; the CLI prints the same message with its flag (``--rank-max``).
"""

from __future__ import annotations

import math
from typing import Any

from adapprox_cli.errors import ParameterError

__all__ = ["check_at_least", "check_beta", "check_learning_rate", "check_tol"]


def check_tol(value: Any, parameter: str = "tol") -> float:
    """The adaptive rank's relative-error target: a number in [0, 1).

    The error of rank 0 is 1 by definition, so a target of 1 or more is met by the smallest rank
    allowed for every matrix: surely not what the user meant.
    """
    try:
        tol = float(value)
    except (TypeError, ValueError):
        raise ParameterError(
            parameter, f"{{name}} {value!r}: expected a number in [0, 1), e.g. 0.05"
        ) from None
    if not 0 <= tol < 1:
        raise ParameterError(
            parameter,
            f"{{name}} {value}: must be in [0, 1) (a relative error; 1 or more keeps every matrix at "
            "rank 1); try 0.05",
        )
    return tol


def check_learning_rate(value: Any, parameter: str = "lr") -> float:
    """A finite learning rate >= 0."""
    rate = float(value)
    if not (math.isfinite(rate) and rate >= 0):
        raise ParameterError(
            parameter, f"{{name}} {value}: a learning rate must be a finite number >= 0, e.g. 3e-4"
        )
    return rate


def check_at_least(value: Any, minimum: int, parameter: str, meaning: str = "") -> int:
    """An integer setting with a lower bound; ``meaning`` says what the bound value does (e.g. 0)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        hint = f" ({minimum}: {meaning})" if meaning else ""
        raise ParameterError(parameter, f"{{name}} {value}: must be an integer >= {minimum}{hint}")
    return value


def check_beta(value: Any, parameter: str = "beta1") -> float:
    """A moment's decay rate in [0, 1) (0 keeps no average)."""
    beta = float(value)
    if not 0 <= beta < 1:
        raise ParameterError(
            parameter, f"{{name}} {value}: a decay rate must be in [0, 1) (0 keeps no average), e.g. 0.9"
        )
    return beta
