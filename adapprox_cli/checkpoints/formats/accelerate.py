"""accelerate ``save_state`` directories: optimizer.bin (+ optimizer_1.bin, ...) next to model.safetensors.

Each ``optimizer{_i}.bin`` is a bare torch optimizer state dict. Names come from the matching
``model{_i}.safetensors`` (alphabetical keys: same order reconstruction as for the Trainer) or
``pytorch_model{_i}.bin`` (model order), accepted only when every shape matches.
"""

from __future__ import annotations

import re
from pathlib import Path

from adapprox_cli.checkpoints import names as naming
from adapprox_cli.checkpoints.core import OptimizerCheckpoint, check_optimizer_index
from adapprox_cli.checkpoints.formats import CheckpointFormat
from adapprox_cli.checkpoints.formats.hf_trainer import hf_candidates, load_model_state, read_json
from adapprox_cli.checkpoints.safe_load import safe_torch_load
from adapprox_cli.checkpoints.torch_state import build_checkpoint, find_optimizer_state_dict

_OPTIMIZER_FILE = re.compile(r"^optimizer(?:_(\d+))?\.bin$")


def optimizer_files(path: Path) -> list[Path]:
    found = [(int(m.group(1) or 0), f) for f in path.iterdir() if (m := _OPTIMIZER_FILE.match(f.name))]
    return [f for _, f in sorted(found)]


def is_accelerate_dir(path: Path) -> bool:
    return bool(optimizer_files(path))


def load_accelerate(
    path: Path, *, trust_checkpoint: bool = False, optimizer_index: int = 0
) -> OptimizerCheckpoint:
    files = optimizer_files(path)
    check_optimizer_index(path, optimizer_index, len(files), "optimizer file(s)")
    optimizer_file = files[optimizer_index]
    obj = safe_torch_load(optimizer_file, trust_checkpoint=trust_checkpoint)
    osd, keys = find_optimizer_state_dict(obj, optimizer_file)
    stem = "model" if optimizer_index == 0 else f"model_{optimizer_index}"
    model_state, ordered = load_model_state(path, stem, trust_checkpoint=trust_checkpoint)
    if model_state is None and optimizer_index:
        model_state, ordered = load_model_state(path, "model", trust_checkpoint=trust_checkpoint)
    params = naming.model_params_from_state_dict(model_state) if model_state else []
    config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    model_type = config.get("model_type") if isinstance(config, dict) else None
    count = sum(len(g["params"]) for g in osd["param_groups"])
    warnings = []
    if len(files) > 1:
        warnings.append(
            f"the directory has {len(files)} optimizers; showing {optimizer_file.name} (choose another with the optimizer index)"
        )
    return build_checkpoint(
        osd,
        path=path,
        fmt="accelerate",
        model_params=params or None,
        model_tiers=[hf_candidates(params, count, model_type, ordered)] if params else [],
        default_optimizer="adamw",
        container=obj,
        model_state=naming.normalize_keys(model_state or None),
        warnings=warnings,
        extra={
            "optimizer_file": str(optimizer_file),
            "optimizer_path": keys,
            "optimizer_index": optimizer_index,
        },
    )


FORMAT = CheckpointFormat(
    name="accelerate",
    description="accelerate directory",
    load=lambda path, obj, *, trust_checkpoint=False, optimizer_index=0: load_accelerate(
        path, trust_checkpoint=trust_checkpoint, optimizer_index=optimizer_index
    ),
    detect_directory=is_accelerate_dir,
    several_optimizers=True,
    write_back="directory",
    optimizer_file="optimizer.bin",
    extra_keys=("optimizer_index", "optimizer_file"),
)
