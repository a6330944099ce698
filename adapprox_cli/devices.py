"""Where to compute: one parser for every ``device`` argument (each command's --device)."""

from __future__ import annotations

import re

import torch

from adapprox_cli.errors import ParameterError

__all__ = ["resolve_device"]


def resolve_device(spec: str | torch.device) -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N', checked against this machine."""
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", text):
        if not torch.cuda.is_available():
            raise ParameterError(
                "device",
                f"{{name}} {text}: CUDA is not available here (torch {torch.__version__}, "
                f"{'no GPU visible' if torch.version.cuda else 'a CPU-only build'}); use {{name}} cpu or auto",
            )
        device = torch.device(text)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ParameterError(
                "device",
                f"{{name}} {text}: only {torch.cuda.device_count()} CUDA device(s) visible; "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}",
            )
        return device
    raise ParameterError("device", f"{{name}} must be auto, cpu, cuda or cuda:N, got {spec!r}")
