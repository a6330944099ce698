"""karpathy/nanoGPT ``ckpt.pt``: {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}.

The optimizer order is nanoGPT's ``configure_optimizers`` rule: all parameters with dim >= 2 in
``named_parameters()`` order (group 0, decayed), then all the others (group 1). The model state
dict gives that order once ``_orig_mod.`` (torch.compile) is stripped, the tied ``lm_head.weight``
(same storage as ``transformer.wte.weight``) is dropped and the (1, 1, T, T) ``attn.bias`` mask
buffers of older torch are dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adapprox_cli.checkpoints import names as naming
from adapprox_cli.checkpoints.core import OptimizerCheckpoint
from adapprox_cli.checkpoints.formats import CheckpointFormat
from adapprox_cli.checkpoints.safe_load import restricted_unpickle
from adapprox_cli.checkpoints.torch_state import build_checkpoint, rule_candidates
from adapprox_cli.errors import InputError


def is_nanogpt(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("model"), dict)
        and "optimizer" in obj
        and ("model_args" in obj or "iter_num" in obj)
    )


def load_nanogpt(path: Path, obj: dict) -> OptimizerCheckpoint:
    model_state = naming.normalize_keys(obj["model"])
    params = naming.model_params_from_state_dict(obj["model"])
    count = sum(len(g.get("params", [])) for g in (obj["optimizer"] or {}).get("param_groups", []))
    tiers = [
        [naming.nanogpt_candidate(params)],
        [c for c in rule_candidates(params, count) if c.source != "nanogpt-order"],
    ]
    best = obj.get("best_val_loss")
    extra = {
        "optimizer_path": ["optimizer"],
        "model_args": obj.get("model_args"),
        "config": obj.get("config"),
        "iter_num": obj.get("iter_num"),
        "best_val_loss": float(best) if isinstance(best, (torch.Tensor, int, float)) else best,
        "compiled": any(k.startswith("_orig_mod.") for k in obj["model"]),
    }
    iter_num = obj.get("iter_num")
    return build_checkpoint(
        obj["optimizer"],
        path=path,
        fmt="nanogpt",
        model_params=params,
        model_tiers=tiers,
        default_optimizer="adamw",
        step_fallback=int(iter_num) if isinstance(iter_num, int) else None,
        container=obj,
        model_state=model_state,
        extra=extra,
    )


def load_nanogpt_meta(path: str | Path) -> dict:
    """nanoGPT's ``data/<dataset>/meta.pkl`` ({'vocab_size', 'itos', 'stoi'}), unpickled with builtins only."""
    meta = restricted_unpickle(path)
    if not isinstance(meta, dict) or "vocab_size" not in meta:
        raise InputError(
            f"{path} is not a nanoGPT meta.pkl (expected a dict with 'vocab_size', 'itos', 'stoi')"
        )
    return meta


def record_optimizer(container: Any, target: str, adapprox_settings: dict) -> Any:
    """nanoGPT containers say which optimizer they hold (and its settings) for adapprox train."""
    if not isinstance(container, dict):
        return container
    container = dict(container)
    container["optimizer_kind"] = target
    if target == "adapprox":
        container["adapprox"] = adapprox_settings
    else:
        container.pop("adapprox", None)
    return container


FORMAT = CheckpointFormat(
    name="nanogpt",
    description="nanoGPT ckpt.pt",
    load=lambda path, obj, *, trust_checkpoint=False, optimizer_index=0: load_nanogpt(path, obj),
    detect_object=lambda obj, path: is_nanogpt(obj),
    write_back="container",
    update_container=record_optimizer,
    extra_keys=("model_args", "iter_num", "best_val_loss", "compiled"),
)
