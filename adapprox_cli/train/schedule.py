"""The learning rate of a resumed run: nanoGPT's warmup + cosine, continued or started afresh."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from adapprox_cli.errors import ParameterError
from adapprox_cli.train.model import nanogpt_learning_rate

if TYPE_CHECKING:
    from adapprox_cli.train.loop import TrainConfig

__all__ = ["Schedule", "learning_rate_at", "run_schedule"]


@dataclass
class Schedule:
    learning_rate: float
    min_lr: float
    warmup_iters: int  # counted from ``start``
    lr_decay_iters: int  # the iteration where the cosine reaches min_lr
    decay_lr: bool
    scale: float = 1.0
    start: int = 0  # the iteration the warmup starts from: 0 for nanoGPT's, iter_num for a fresh one

    def at(self, iteration: int) -> float:
        return learning_rate_at(iteration, self) * self.scale


def learning_rate_at(iteration: int, schedule: Any) -> float:
    """nanoGPT's schedule (linear warmup, cosine decay to min_lr), or a constant rate.

    A schedule with a ``start`` runs the same curve shifted to begin at that iteration.
    """
    if not schedule.decay_lr:
        return schedule.learning_rate
    start = getattr(schedule, "start", 0)
    return nanogpt_learning_rate(
        iteration - start,
        schedule.learning_rate,
        schedule.warmup_iters,
        schedule.lr_decay_iters - start,
        schedule.min_lr,
    )


def run_schedule(
    config: TrainConfig,
    ckpt_config: dict[str, Any],
    saved: dict[str, Any] | None,
    start_iter: int,
    steps: int,
) -> tuple[Schedule, str | None]:
    """The learning-rate schedule of this run, and a note when the user should hear about it.

    The checkpoint's schedule continues (``learning_rate`` replaces its peak), except when it has
    ended (iter_num >= lr_decay_iters): every step would then sit at min_lr and a new peak would
    change nothing. So ``learning_rate`` on an ended schedule starts a fresh one over this run:
    linear warmup of ``warmup_iters`` (default a tenth of the steps), cosine to ``min_lr``
    (default lr/10) at the run's last step. Without it the ended schedule stays at min_lr, and
    the note says so.
    """

    def pick(value: Any, key: str, default: Any) -> Any:
        return value if value is not None else ckpt_config.get(key, default)

    saved_lr = None
    if saved and saved.get("param_groups"):
        lr = saved["param_groups"][0].get("lr")
        saved_lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr) if lr is not None else None
    learning_rate = float(pick(config.learning_rate, "learning_rate", saved_lr or 1e-3))
    lr_decay_iters = pick(config.lr_decay_iters, "lr_decay_iters", None)
    # Without a decay horizon there is no schedule to continue: the rate stays constant.
    decay_lr = bool(pick(config.decay_lr, "decay_lr", lr_decay_iters is not None))
    if decay_lr and lr_decay_iters is None:
        raise ParameterError(
            "lr_decay_iters",
            "the checkpoint's config has no lr_decay_iters; pass {name} N, or turn the decay off (decay_lr) "
            "for a constant rate",
        )
    ended = decay_lr and config.lr_decay_iters is None and start_iter >= int(lr_decay_iters)
    if ended and config.learning_rate is not None:
        return _fresh_schedule(config, learning_rate, start_iter, steps, int(lr_decay_iters))
    schedule = Schedule(
        learning_rate=learning_rate,
        min_lr=float(pick(config.min_lr, "min_lr", learning_rate / 10)),
        warmup_iters=int(pick(config.warmup_iters, "warmup_iters", 0)),
        lr_decay_iters=int(lr_decay_iters or 0),
        decay_lr=decay_lr,
        scale=config.lr_scale,
        start=int(ckpt_config.get("lr_schedule_start", 0)) if config.lr_decay_iters is None else 0,
    )
    note = None
    if ended:
        # The note is shown to CLI users, who set the peak with --lr.
        note = (
            f"the checkpoint's schedule ended at iteration {int(lr_decay_iters)}: every step uses its "
            f"min_lr {schedule.min_lr:g}; pass --lr to start a fresh warmup + cosine over this run"
        )
    return schedule, note


def _fresh_schedule(
    config: TrainConfig, learning_rate: float, start_iter: int, steps: int, ended_at: int
) -> tuple[Schedule, str]:
    """A warmup + cosine over this run's steps, for a new peak on a schedule that has ended."""
    warmup = config.warmup_iters if config.warmup_iters is not None else steps // 10
    schedule = Schedule(
        learning_rate=learning_rate,
        min_lr=float(config.min_lr if config.min_lr is not None else learning_rate / 10),
        warmup_iters=int(warmup),
        lr_decay_iters=start_iter + steps,
        decay_lr=True,
        scale=config.lr_scale,
        start=start_iter,
    )
    note = (
        f"the checkpoint's schedule ended at iteration {ended_at}; --lr {learning_rate:g} "
        f"starts a fresh one: {schedule.warmup_iters} warmup steps, cosine to {schedule.min_lr:g} "
        f"at iteration {schedule.lr_decay_iters}"
    )
    return schedule, note
