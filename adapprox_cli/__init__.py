"""adapprox: Adam with a randomized low-rank second moment (Adapprox), and tools for AdamW checkpoints.

The public API is flat::

    from adapprox_cli import Adapprox, srsi, as_rsi, truncated_svd, state_size
"""

__version__ = "0.1.0"

from adapprox_cli.errors import AdapproxError, InputError, UnsafeCheckpointError, UnsupportedStateError
from adapprox_cli.lowrank import (
    LowRankFactors,
    adafactor_rank1,
    adam_mini_blocks,
    adaptive_rank,
    as_rsi,
    relative_error,
    sm3_cover,
    smmf_rank1,
    srsi,
    svd_lowrank,
    truncated_svd,
)
from adapprox_cli.memory import state_size
from adapprox_cli.methods import METHODS, approximate
from adapprox_cli.optim import Adapprox, adapprox

__all__ = [
    "METHODS",
    "Adapprox",
    "AdapproxError",
    "InputError",
    "LowRankFactors",
    "UnsafeCheckpointError",
    "UnsupportedStateError",
    "__version__",
    "adafactor_rank1",
    "adam_mini_blocks",
    "adapprox",
    "adaptive_rank",
    "approximate",
    "as_rsi",
    "relative_error",
    "sm3_cover",
    "smmf_rank1",
    "srsi",
    "state_size",
    "svd_lowrank",
    "truncated_svd",
]
