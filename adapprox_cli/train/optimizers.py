"""The optimizer of a resumed run: nanoGPT's parameter groups, and the checkpoint's state loaded
into Adapprox, AdamW or Adafactor (converted when it belongs to another of them)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from adapprox_cli.convert import ConversionReport, adamw_to_adafactor, adamw_to_adapprox, adapprox_to_adamw
from adapprox_cli.errors import InputError, ParameterError
from adapprox_cli.formatting import format_shape
from adapprox_cli.optim import Adapprox
from adapprox_cli.train.model import nanogpt_param_groups

__all__ = ["OPTIMIZERS", "build_optimizer", "param_groups", "saved_kind"]

OPTIMIZERS = ("adapprox", "adamw", "adafactor")


def saved_kind(state_dict: dict[str, Any] | None) -> str | None:
    """Which optimizer a state dict belongs to, from its state keys (None: no state yet)."""
    if not state_dict or not state_dict.get("state"):
        return None
    keys = set().union(*(s.keys() for s in state_dict["state"].values()))
    if keys & {"exp_avg_sq_q", "exp_avg_sq_u"}:
        return "adapprox"
    if keys & {"row_var", "col_var", "variance"}:
        return "adafactor"
    if "exp_avg_sq" in keys:
        # An Adapprox state of only vectors has dense exp_avg_sq too; its groups say which.
        groups = state_dict.get("param_groups", [])
        return "adapprox" if groups and "rank_min" in groups[0] else "adamw"
    raise InputError(
        f"the checkpoint's optimizer state has keys {', '.join(sorted(map(str, keys)))}; "
        "adapprox train resumes AdamW, Adapprox and Adafactor states"
    )


def param_groups(model: nn.Module, saved: dict[str, Any] | None, weight_decay: float) -> list[dict[str, Any]]:
    """nanoGPT's two groups (or one, if the checkpoint has one), checked against the saved state."""
    groups = nanogpt_param_groups(model, weight_decay)
    if saved and len(saved.get("param_groups", [])) == 1:
        groups = [{"params": [p for g in groups for p in g["params"]], "weight_decay": weight_decay}]
    if not saved:
        return groups
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != [len(g["params"]) for g in groups]:
        raise InputError(
            f"the checkpoint's optimizer has parameter groups of sizes {sizes}, the model "
            f"{[len(g['params']) for g in groups]}; the model does not match the optimizer state"
        )
    params = [p for g in groups for p in g["params"]]
    saved_ids = [pid for g in saved["param_groups"] for pid in g["params"]]
    for param, pid in zip(params, saved_ids):
        entry = saved["state"].get(pid, {})
        shape = _state_shape(entry)
        if shape is not None and shape != tuple(param.shape) and math.prod(shape) != param.numel():
            raise InputError(
                f"optimizer state {pid} has shape {format_shape(shape)} but the model parameter in that place is "
                f"{format_shape(param.shape)}; the model does not match the optimizer state"
            )
    return groups


def _state_shape(entry: dict[str, Any]) -> tuple[int, ...] | None:
    for key in ("exp_avg", "exp_avg_sq"):
        if isinstance(entry.get(key), torch.Tensor):
            return tuple(entry[key].shape)
    if "exp_avg_sq_q" in entry:
        return (entry["exp_avg_sq_q"].shape[0], entry["exp_avg_sq_u"].shape[0])
    return None


def _adapprox_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k != "beta1" and v is not None}


def build_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    saved: dict[str, Any] | None,
    options: dict[str, Any],
    names: list[str],
) -> tuple[torch.optim.Optimizer, ConversionReport | None, str | None]:
    """The optimizer with the checkpoint's state, converted when it belongs to another optimizer."""
    kind = saved_kind(saved)
    report = None
    state = saved
    settings = _adapprox_kwargs(options)
    beta1 = options.get("beta1")
    if name == "adapprox":
        if kind == "adafactor":
            raise ParameterError(
                "optimizer", "the checkpoint holds an Adafactor state; resume it with {name} adafactor"
            )
        if kind == "adamw":
            state, report = adamw_to_adapprox(saved, beta1=beta1, names=dict(enumerate(names)), **settings)
        optimizer: torch.optim.Optimizer = Adapprox(groups, **settings)
    elif name == "adamw":
        if kind == "adafactor":
            raise ParameterError(
                "optimizer", "the checkpoint holds an Adafactor state; resume it with {name} adafactor"
            )
        if kind == "adapprox":
            state, report = adapprox_to_adamw(saved, names=dict(enumerate(names)))
        optimizer = torch.optim.AdamW(groups, foreach=False)
    elif name == "adafactor":
        if kind == "adapprox":
            state, report = adapprox_to_adamw(saved, names=dict(enumerate(names)))
            kind = "adamw"
        if kind == "adamw":
            state = adamw_to_adafactor(state)
        optimizer = torch.optim.Adafactor(groups, foreach=False)
    else:
        raise InputError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if state and state.get("state"):
        optimizer.load_state_dict(state)
    # Settings given for this run win over the ones stored with a resumed state.
    for group in optimizer.param_groups:
        if name == "adapprox":
            group.update(settings)
            if beta1 is not None:
                group["betas"] = (float(beta1), group["betas"][1])
        elif name == "adamw" and beta1 is not None:
            group["betas"] = (float(beta1), group["betas"][1])
    return optimizer, report, kind
