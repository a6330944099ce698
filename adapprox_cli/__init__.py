"""adapprox: Adam with a randomized low-rank second moment (Adapprox), and tools for AdamW checkpoints.

The public API is flat; everything a command does can be done from Python::

    from adapprox_cli import Adapprox, srsi, as_rsi, truncated_svd, state_size
    from adapprox_cli import load_checkpoint, load_moments, spectrum_report, compare_methods, estimate_memory
    from adapprox_cli import adamw_to_adapprox, adapprox_to_adamw, convert_checkpoint
"""

__version__ = "0.1.0"

from adapprox_cli.analysis import (
    compare_methods,
    estimate_memory,
    estimate_preset,
    load_moments,
    spectrum_report,
)
from adapprox_cli.checkpoints import OptimizerCheckpoint, ParamState, load_checkpoint
from adapprox_cli.convert import adamw_to_adapprox, adapprox_to_adamw, convert_checkpoint
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
    "OptimizerCheckpoint",
    "ParamState",
    "UnsafeCheckpointError",
    "UnsupportedStateError",
    "__version__",
    "adafactor_rank1",
    "adam_mini_blocks",
    "adamw_to_adapprox",
    "adapprox",
    "adapprox_to_adamw",
    "adaptive_rank",
    "approximate",
    "as_rsi",
    "compare_methods",
    "convert_checkpoint",
    "estimate_memory",
    "estimate_preset",
    "load_checkpoint",
    "load_moments",
    "relative_error",
    "sm3_cover",
    "smmf_rank1",
    "spectrum_report",
    "srsi",
    "state_size",
    "svd_lowrank",
    "truncated_svd",
]
