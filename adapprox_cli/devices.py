"""Where to compute: one parser for every command's --device option."""

from __future__ import annotations

import re

import torch

from adapprox_cli.errors import InputError

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
            raise InputError(
                f"--device {text}: CUDA is not available here (torch {torch.__version__}, "
                f"{'no GPU visible' if torch.version.cuda else 'a CPU-only build'}); use --device cpu or auto"
            )
        device = torch.device(text)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(
                f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible; "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
        return device
    raise InputError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
