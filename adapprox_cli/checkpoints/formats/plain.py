"""``torch.save(optimizer.state_dict())`` and the common wrappers around it.

Wrappers: ``{"optimizer": sd}``, ``{"optimizer_state_dict": sd, "model_state_dict": ...}`` (the
PyTorch tutorial convention), FSDP full optimizer state dicts keyed by FQN strings. Model weights
stored next to the optimizer are used to name the parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapprox_cli.checkpoints import names as naming
from adapprox_cli.checkpoints.core import OptimizerCheckpoint
from adapprox_cli.checkpoints.formats import CheckpointFormat
from adapprox_cli.checkpoints.torch_state import (
    build_checkpoint,
    find_optimizer_state_dict,
    model_from_wrapper,
)


def load_plain(path: Path, obj: Any) -> OptimizerCheckpoint:
    osd, keys = find_optimizer_state_dict(obj, path)
    model_state = model_from_wrapper(obj) if keys else None
    model_params = naming.model_params_from_state_dict(model_state) if model_state else None
    extra: dict[str, Any] = {"optimizer_path": keys}
    if isinstance(obj, dict) and keys:
        extra["container_keys"] = [str(k) for k in obj]
        for key in ("epoch", "loss", "global_step", "iter_num", "step"):
            if isinstance(obj.get(key), (int, float)):
                extra[key] = obj[key]
    step_fallback = next(
        (
            int(obj[k])
            for k in ("global_step", "iter_num", "step")
            if isinstance(obj, dict) and isinstance(obj.get(k), int)
        ),
        None,
    )
    return build_checkpoint(
        osd,
        path=path,
        fmt="plain",
        model_params=model_params,
        default_optimizer="adamw",
        step_fallback=step_fallback,
        container=obj,
        model_state=_strip(model_state),
        extra=extra,
    )


def _strip(model_state: dict | None) -> dict | None:
    return naming.normalize_keys(model_state)


def _detect(obj: Any, path: Path) -> bool:
    find_optimizer_state_dict(obj, path)  # the last resort: raises InputError naming what obj holds
    return True


FORMAT = CheckpointFormat(
    name="plain",
    description="torch.save'd optimizer state",
    load=lambda path, obj, *, trust_checkpoint=False, optimizer_index=0: load_plain(path, obj),
    detect_object=_detect,
    write_back="container",
    extra_keys=("iter_num", "global_step", "epoch"),
)
