"""PyTorch Lightning ``.ckpt`` files: {"state_dict", "optimizer_states": [sd, ...], "global_step", ...}.

``optimizer_states`` holds one torch state dict per optimizer of ``configure_optimizers``; indices
restart at 0 in each. Names come from the LightningModule ``state_dict`` order (buffers and tied
duplicates removed), accepted only when the shapes match exactly, also for an optimizer that
covers one contiguous part of the module (GAN-style setups).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapprox_cli.checkpoints import names as naming
from adapprox_cli.checkpoints.core import OptimizerCheckpoint, check_optimizer_index, is_optimizer_state_dict
from adapprox_cli.checkpoints.formats import CheckpointFormat
from adapprox_cli.checkpoints.torch_state import build_checkpoint
from adapprox_cli.errors import InputError


def is_lightning(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("optimizer_states"), list)
        and ("state_dict" in obj or "pytorch-lightning_version" in obj or "global_step" in obj)
    )


def load_lightning(path: Path, obj: dict, optimizer_index: int = 0) -> OptimizerCheckpoint:
    states = obj["optimizer_states"]
    if not states:
        raise InputError(
            f"{path} has no optimizer state (optimizer_states is empty): it was saved without optimizer"
        )
    check_optimizer_index(path, optimizer_index, len(states), "optimizer(s)")
    osd = states[optimizer_index]
    if not is_optimizer_state_dict(osd):
        raise InputError(f"{path}: optimizer_states[{optimizer_index}] is not an optimizer state dict")
    model_state = obj.get("state_dict") if isinstance(obj.get("state_dict"), dict) else None
    params = naming.model_params_from_state_dict(model_state) if model_state else None
    warnings = []
    if len(states) > 1:
        warnings.append(
            f"the checkpoint has {len(states)} optimizers; showing optimizer {optimizer_index} "
            "(choose another with the optimizer index)"
        )
    global_step = obj.get("global_step")
    return build_checkpoint(
        osd,
        path=path,
        fmt="lightning",
        model_params=params,
        default_optimizer="adamw",
        # global_step counts optimizer steps of all optimizers together: only a fallback.
        step_fallback=global_step if isinstance(global_step, int) and len(states) == 1 else None,
        container=obj,
        model_state=naming.normalize_keys(model_state or None),
        warnings=warnings,
        extra={
            "optimizer_path": ["optimizer_states", optimizer_index],
            "optimizer_index": optimizer_index,
            "optimizer_count": len(states),
            "global_step": global_step,
            "epoch": obj.get("epoch"),
            "lightning_version": obj.get("pytorch-lightning_version"),
            "hyper_parameters": obj.get("hyper_parameters"),
        },
    )


FORMAT = CheckpointFormat(
    name="lightning",
    description="Lightning .ckpt",
    load=lambda path, obj, *, trust_checkpoint=False, optimizer_index=0: load_lightning(
        path, obj, optimizer_index
    ),
    detect_object=lambda obj, path: is_lightning(obj),
    several_optimizers=True,
    write_back="container",
    extra_keys=("optimizer_index", "optimizer_count", "global_step", "epoch", "lightning_version"),
)
