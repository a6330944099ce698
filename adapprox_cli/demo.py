"""A one-minute demonstration: the same small network trained with AdamW and with Adapprox.

Synthetic teacher-student regression (nothing downloaded): a student MLP learns a fixed random
teacher. Returns both loss curves and both optimizer-state sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from adapprox_cli.checkpoints.core import optimizer_state_bytes
from adapprox_cli.optim import Adapprox


@dataclass
class DemoRun:
    optimizer: str
    final_loss: float
    state_bytes: int
    losses: list[float]
    ranks: dict[int, int]


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 16)
    )


def run_demo(
    steps: int = 200,
    width: int = 192,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[DemoRun]:
    """Train the same student with AdamW and Adapprox (same data, same init); return both runs.

    ``progress(done, total, name)`` is called after every step of both runs (total: 2 * steps).
    """
    gen = torch.Generator().manual_seed(seed)
    teacher = _mlp(width)
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    inputs = torch.randn(steps, 128, 64, generator=gen)
    with torch.no_grad():
        targets = teacher(inputs)

    runs = []
    for run_index, name in enumerate(("AdamW", "Adapprox")):
        torch.manual_seed(seed + 1)
        student = _mlp(width)
        if name == "AdamW":
            opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
        else:
            opt = Adapprox(student.parameters(), lr=1e-3)
        losses = []
        for x, y in zip(inputs, targets):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(student(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if progress is not None:
                progress(run_index * steps + len(losses), 2 * steps, name)
        state_bytes = optimizer_state_bytes(opt.state)
        ranks = opt.ranks() if isinstance(opt, Adapprox) else {}
        runs.append(DemoRun(name, sum(losses[-20:]) / 20, state_bytes, losses, ranks))
    return runs


def demo_to_dict(runs: list[DemoRun]) -> list[dict]:
    return [asdict(r) for r in runs]
