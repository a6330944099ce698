"""AdamW <-> Adapprox optimizer-state migration, from state dicts or from whole checkpoints.

- ``migrate``: pure state-dict -> state-dict functions (``adamw_to_adapprox``,
  ``adapprox_to_adamw``, ``adamw_to_adafactor``, ``factor_second_moment``); no file I/O.
- ``output``: the converted state written on its own (plain, safetensors) or back into the
  container it came in (nanoGPT ``ckpt.pt``, a copy of a Trainer ``checkpoint-N/`` directory),
  through a temporary name and a rename.
- ``verify``: the output read back and checked (shapes, ranks, errors, a real load).
- ``checkpoint``: ``convert_checkpoint``, the three above for one checkpoint on disk.
- ``report``: ``ConversionReport`` and ``MatrixConversion``, what a conversion did.
"""

from adapprox_cli.atomic_io import atomic_write
from adapprox_cli.convert.checkpoint import convert_checkpoint, optimizer_state_dict_of
from adapprox_cli.convert.migrate import (
    CONVERT_POWER_ITERS,
    adamw_group_defaults,
    adamw_to_adafactor,
    adamw_to_adapprox,
    adapprox_group_defaults,
    adapprox_to_adamw,
    factor_second_moment,
    state_bytes,
)
from adapprox_cli.convert.output import OUTPUT_FORMATS, atomic_torch_save
from adapprox_cli.convert.report import ConversionReport, MatrixConversion

__all__ = [
    "CONVERT_POWER_ITERS",
    "OUTPUT_FORMATS",
    "ConversionReport",
    "MatrixConversion",
    "adamw_group_defaults",
    "adamw_to_adafactor",
    "adamw_to_adapprox",
    "adapprox_group_defaults",
    "adapprox_to_adamw",
    "atomic_torch_save",
    "atomic_write",
    "convert_checkpoint",
    "factor_second_moment",
    "optimizer_state_dict_of",
    "state_bytes",
]
