"""Resume training from a checkpoint with Adapprox, AdamW or Adafactor: one straight loop.

Read like nanoGPT's ``train.py``: a config dataclass, then ``train`` prepares the run (the
checks and builders of ``setup``, ``optimizers``, ``schedule`` and ``parallel``), runs the loop
top to bottom (learning rate, gradient accumulation, clipping, step, log, optional eval, save)
and returns a ``TrainResult``. Nothing here prints: progress goes to a callback, metrics to an
optional JSON-lines file, and the CLI renders them.

Resuming is exact: a checkpoint stores the weights, the optimizer state, ``iter_num`` (the
learning-rate schedule continues from it), the batch sampler's generator state of every rank and
the global torch RNG, so N steps in one go equal N/2 steps, a save and N/2 resumed steps bit for
bit on CPU. Adapprox needs no stored generator: its random test matrices are a function of
(seed, parameter index, step).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (gloo on
CPU, nccl on CUDA); every rank draws its own batches from a generator seeded by (seed, rank), the
gradients are averaged before the step, so every rank runs the same deterministic optimizer step
and the replicas stay identical. Only rank 0 logs and writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from adapprox_cli.checkpoints.core import optimizer_state_bytes
from adapprox_cli.convert import ConversionReport, atomic_torch_save
from adapprox_cli.errors import InputError, ParameterError
from adapprox_cli.optim import Adapprox
from adapprox_cli.train.data import get_batch
from adapprox_cli.train.optimizers import OPTIMIZERS, build_optimizer, param_groups
from adapprox_cli.train.parallel import (
    Processes,
    gather_over_processes,
    gathered_state_dicts,
    join_processes,
    leave_processes,
    mean_over_processes,
    reduce_step,
    wait_for_processes,
    wrap_model,
)
from adapprox_cli.train.schedule import Schedule, learning_rate_at, run_schedule
from adapprox_cli.train.setup import (
    CHECKPOINT_NAME,
    block_size_of,
    build_model,
    check_batch_fits,
    check_fsdp,
    check_resumable,
    check_vocab_fits,
    data_source,
    load_data,
    read_container,
    resolve_train_device,
    restore_randomness,
    run_length,
    sampler_seed,
)
from adapprox_cli.validation import check_at_least, check_beta, check_learning_rate, check_tol

__all__ = [
    "CHECKPOINT_NAME",
    "OPTIMIZERS",
    "TrainConfig",
    "TrainResult",
    "check_resumable",
    "learning_rate_at",
    "prepare_run",
    "train",
]

# nanoGPT's defaults, used when a checkpoint carries no training config.
_DEFAULT_BATCH_SIZE = 12
_DEFAULT_GRAD_CLIP = 1.0


@dataclass
class TrainConfig:
    """Everything a resumed run needs; ``None`` means "as the checkpoint's config says"."""

    checkpoint: Path
    steps: int = 100
    until: int | None = None  # train until this iteration instead (steps = until - iter_num)
    optimizer: str = "adapprox"  # adapprox | adamw | adafactor
    model: str | None = None  # "package.module:factory"; None: the bundled GPT from model_args
    data_dir: Path | None = None  # train.bin/val.bin(/meta.pkl); None: beside the checkpoint
    text: Path | None = None  # a UTF-8 text encoded with the checkpoint's vocabulary instead
    out_dir: Path | None = None  # where ckpt.pt is written; None: never save
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int | None = None
    block_size: int | None = None
    grad_accum: int = 1  # micro-batches per optimizer step, per rank
    learning_rate: float | None = None
    min_lr: float | None = None
    warmup_iters: int | None = None
    lr_decay_iters: int | None = None
    decay_lr: bool | None = None
    lr_scale: float = 1.0  # multiplies the schedule (Adafactor's lr is relative to the weights' RMS)
    grad_clip: float | None = None  # 0 disables clipping
    weight_decay: float | None = None
    # evaluate every this many steps and before the first (0: only at the end; None: a quarter of the steps)
    eval_interval: int | None = 0
    eval_iters: int = 20
    save_interval: int = 0  # write a checkpoint every this many steps (0: only at the end)
    save_final: bool = True
    final_eval: bool = True
    seed: int = 1337
    metrics_path: Path | None = None  # JSON lines, appended
    optimizer_options: dict[str, Any] = field(default_factory=dict)  # e.g. tol, beta1, first_moment
    trust_checkpoint: bool = False
    # An out_dir that already holds a run's ckpt.pt: refused, unless resume (continue from that
    # checkpoint instead of ``checkpoint``) or force (replace the run and its metrics file).
    resume: bool = False
    force: bool = False
    handle_signals: bool = True  # Ctrl-C saves at the next step boundary and stops
    fsdp: bool = False  # under torchrun: FSDP2 (weights and optimizer state sharded) instead of DDP


@dataclass
class TrainResult:
    optimizer: str
    start_iter: int
    end_iter: int
    history: list[dict[str, Any]]  # one record per optimizer step
    evals: list[dict[str, Any]]  # {"iter", "train", "val"}
    state_bytes: int
    step_time: float  # mean wall seconds per optimizer step, evaluation and saving excluded
    tokens_per_step: int
    world_size: int = 1
    ranks: dict[str, int] | None = None
    checkpoints: list[str] = field(default_factory=list)
    interrupted: bool = False
    stop_signal: int | None = None  # SIGINT/SIGTERM that stopped the run (it saved first)
    conversion: ConversionReport | None = None
    source_optimizer: str | None = None
    device: str = "cpu"
    metrics_path: str | None = None
    notes: list[str] = field(default_factory=list)  # things the user should know (e.g. an ended schedule)
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # the trained model

    @property
    def final_train_loss(self) -> float | None:
        if self.evals:
            return self.evals[-1]["train"]
        return self.history[-1]["loss"] if self.history else None

    @property
    def final_val_loss(self) -> float | None:
        return self.evals[-1]["val"] if self.evals else None

    @property
    def tokens_per_second(self) -> float:
        """Training tokens per wall second of the optimizer steps (evaluation and saving excluded).

        The same measure as each step record's ``tokens_per_s`` (a running value), so the
        progress bar ends on the summary's number.
        """
        return self.tokens_per_step / self.step_time if self.step_time > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "conversion")}
        data["conversion"] = self.conversion.to_dict() if self.conversion else None
        data.update(
            final_train_loss=self.final_train_loss,
            final_val_loss=self.final_val_loss,
            tokens_per_second=self.tokens_per_second,
        )
        return data


Callback = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------- checks before reading


def _validate(config: TrainConfig) -> None:
    """Refuse impossible settings before anything is read, naming the TrainConfig field."""
    check_at_least(config.steps, 0, "steps")
    if config.until is not None:
        check_at_least(config.until, 1, "until")
    check_at_least(config.grad_accum, 1, "grad_accum")
    check_at_least(config.eval_iters, 1, "eval_iters")
    for name in ("batch_size", "block_size"):
        if getattr(config, name) is not None:
            check_at_least(getattr(config, name), 1, name)
    if config.eval_interval is not None:
        check_at_least(config.eval_interval, 0, "eval_interval", "only at the end")
    check_at_least(config.save_interval, 0, "save_interval", "only at the end")
    for name in ("warmup_iters", "lr_decay_iters"):
        if getattr(config, name) is not None:
            check_at_least(getattr(config, name), 0, name)
    if config.learning_rate is not None:
        check_learning_rate(config.learning_rate, "learning_rate")
    if config.min_lr is not None:
        check_learning_rate(config.min_lr, "min_lr")
    options = config.optimizer_options
    if options.get("tol") is not None:
        check_tol(options["tol"])
    if options.get("rank_max") is not None:
        check_at_least(options["rank_max"], 1, "rank_max")
    if options.get("beta1") is not None:
        check_beta(options["beta1"])
    if config.resume and config.force:
        raise ParameterError(
            "resume", "{name} continues the run in the output directory, force replaces it: pass one of them"
        )


def prepare_run(config: TrainConfig) -> TrainConfig:
    """The run ``config`` describes, checked against what its ``out_dir`` already holds.

    An out_dir with a ckpt.pt from an earlier run is refused (two runs would overwrite each
    other's checkpoint and mix their metrics), unless ``resume`` (continue from that ckpt.pt:
    the returned config reads it) or ``force`` (replace it). Resuming the ckpt.pt of out_dir
    itself is a continuation too.
    """
    if config.out_dir is None:
        return config
    own = Path(config.out_dir) / CHECKPOINT_NAME
    source = Path(config.checkpoint)
    source = source / CHECKPOINT_NAME if source.is_dir() else source
    continuing = own.exists() and source.exists() and own.resolve() == source.resolve()
    if config.resume and own.is_file():
        return replace(config, checkpoint=own)
    if own.exists() and not (continuing or config.force or config.resume):
        raise ParameterError(
            "out_dir",
            f"{own} exists from an earlier run; pass {{resume}} to continue it, {{force}} to replace it, "
            "or another {name}",
            mentions=("resume", "force"),
        )
    return config


# --------------------------------------------------------------------------- the run


def train(config: TrainConfig, callback: Callback | None = None) -> TrainResult:
    """Resume training from ``config.checkpoint`` for ``config.steps`` optimizer steps."""
    if config.optimizer not in OPTIMIZERS:
        raise InputError(f"unknown optimizer {config.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    _validate(config)
    if config.fsdp:
        check_fsdp(config)
    config = prepare_run(config)
    processes = join_processes("cuda" if config.device.startswith("cuda") else config.device)
    try:
        result = _train(config, callback, processes)
        # Every rank leaves together: a rank tearing gloo down while another still sends
        # (rank 0 writes the last checkpoint) can abort that one at exit.
        wait_for_processes(processes)
        return result
    finally:
        leave_processes(processes)


def _train(config: TrainConfig, callback: Callback | None, processes: Processes) -> TrainResult:
    run = _prepare(config, callback, processes)
    try:
        state = _RunState(iter_num=run.start_iter, best_val_loss=run.best_val_loss)
        run.events.emit(_start_record(run))
        with _stop_on_signals(config.handle_signals) as stop:
            _loop(run, state, stop)
        result = _result(run, state, stop["signal"] if state.interrupted else None)
        run.events.emit(_end_record(state, result))
        return result
    finally:
        run.events.close()


@dataclass
class _Events:
    """Where the run's records go: the metrics file (JSON lines) and the callback, on rank 0 only."""

    master: bool
    metrics: IO[str] | None
    callback: Callback | None

    def emit(self, record: dict[str, Any]) -> None:
        if not self.master:
            return
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        if self.callback is not None:
            self.callback(record)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


@dataclass
class _Run:
    """What the loop needs, read and built once from the config and the checkpoint."""

    config: TrainConfig
    processes: Processes
    device: str
    model: nn.Module  # what the loop calls: the DDP wrapper, or raw_model itself
    raw_model: nn.Module  # the module whose weights are saved and evaluated
    optimizer: torch.optim.Optimizer
    param_names: list[str]  # in the optimizer's order
    conversion: ConversionReport | None
    source_kind: str | None  # the optimizer the checkpoint's state belonged to
    schedule: Schedule
    notes: list[str]
    train_data: np.ndarray
    val_data: np.ndarray
    data_dir: Path
    text: Path | None
    batch_size: int
    block_size: int
    grad_clip: float
    weight_decay: float
    start_iter: int
    steps: int
    eval_interval: int
    generator: torch.Generator  # the batch sampler's
    autocast: Any  # bf16 autocast on CUDA, else a null context
    ckpt_config: dict[str, Any]
    model_args: Any
    best_val_loss: float
    out_dir: Path | None
    events: _Events

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size * self.config.grad_accum * self.processes.world_size


@dataclass
class _RunState:
    """What the loop changes as it goes."""

    iter_num: int
    best_val_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per optimizer step
    evals: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)  # the paths written
    step_seconds: float = 0.0  # wall time of the optimizer steps, evaluation and saving excluded
    interrupted: bool = False
    ranks: dict[str, int] | None = None  # Adapprox's ranks as last recorded


def _factor_ranks(run: _Run) -> dict[str, int] | None:
    """Adapprox's rank per factored matrix, by parameter name (None for other optimizers)."""
    if not isinstance(run.optimizer, Adapprox):
        return None
    return {run.param_names[i]: k for i, k in run.optimizer.ranks().items()}


def _prepare(config: TrainConfig, callback: Callback | None, processes: Processes) -> _Run:
    """Read the checkpoint and the data, check that they fit, build the model and its optimizer."""
    device = resolve_train_device(config.device, processes)
    checkpoint_path, container = read_container(Path(config.checkpoint).expanduser(), config.trust_checkpoint)
    source = str(checkpoint_path)
    ckpt_config = dict(container.get("config") or {})
    saved_optimizer = container.get("optimizer")
    start_iter = int(container.get("iter_num", 0) or 0)
    steps = run_length(config.until, config.steps, start_iter, source)
    eval_interval = config.eval_interval if config.eval_interval is not None else max(1, -(-steps // 4))

    model = build_model(config.model, container, source)
    block_size = block_size_of(config.block_size, ckpt_config, model, source)
    batch_size = config.batch_size or int(ckpt_config.get("batch_size", _DEFAULT_BATCH_SIZE))
    data_dir, text = data_source(config, checkpoint_path, ckpt_config)
    train_data, val_data, vocab_size = load_data(data_dir, text)
    check_batch_fits(source, batch_size, block_size, len(train_data), model, device)
    check_vocab_fits(vocab_size, model)

    model.to(device)
    weight_decay = config.weight_decay
    if weight_decay is None:
        saved_groups = (saved_optimizer or {}).get("param_groups") or [{}]
        weight_decay = float(saved_groups[0].get("weight_decay", ckpt_config.get("weight_decay", 0.0)))
    groups = param_groups(model, saved_optimizer, weight_decay)
    names_by_id = {id(p): n for n, p in model.named_parameters()}
    param_names = [names_by_id[id(p)] for g in groups for p in g["params"]]
    optimizer, conversion, source_kind = build_optimizer(
        config.optimizer, groups, saved_optimizer, dict(config.optimizer_options), param_names
    )
    schedule, schedule_note = run_schedule(config, ckpt_config, saved_optimizer, start_iter, steps)
    grad_clip = (
        config.grad_clip
        if config.grad_clip is not None
        else float(ckpt_config.get("grad_clip", _DEFAULT_GRAD_CLIP))
    )
    wrapped = wrap_model(model, optimizer, processes, device, config.fsdp)
    # Sampler and dropout randomness: restored from our own checkpoints, else seeded by (seed, rank, iter).
    generator = restore_randomness(container, config.seed, processes, start_iter)
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        if device.startswith("cuda")
        else contextlib.nullcontext()
    )
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    best_val = container.get("best_val_loss")
    metrics = _open_metrics(config, checkpoint_path, out_dir) if processes.master else None
    return _Run(
        config=config,
        processes=processes,
        device=device,
        model=wrapped,
        raw_model=model,
        optimizer=optimizer,
        param_names=param_names,
        conversion=conversion,
        source_kind=source_kind,
        schedule=schedule,
        notes=[schedule_note] if schedule_note else [],
        train_data=train_data,
        val_data=val_data,
        data_dir=data_dir,
        text=text,
        batch_size=batch_size,
        block_size=block_size,
        grad_clip=grad_clip,
        weight_decay=weight_decay,
        start_iter=start_iter,
        steps=steps,
        eval_interval=eval_interval,
        generator=generator,
        autocast=autocast,
        ckpt_config=ckpt_config,
        model_args=container.get("model_args"),
        best_val_loss=float(best_val) if best_val is not None else math.inf,
        out_dir=out_dir,
        events=_Events(processes.master, metrics, callback),
    )


def _open_metrics(config: TrainConfig, checkpoint_path: Path, out_dir: Path | None) -> IO[str] | None:
    """The metrics file, refused when it holds another run's records."""
    if config.metrics_path is None:
        return None
    metrics_path = Path(config.metrics_path)
    # One run per file: a continued run (resume) appends, a fresh one starts the file anew.
    continuing = out_dir is not None and checkpoint_path.resolve() == (out_dir / CHECKPOINT_NAME).resolve()
    if metrics_path.is_file() and metrics_path.stat().st_size and not (continuing or config.force):
        raise ParameterError(
            "metrics_path",
            f"{metrics_path} already holds the metrics of another run; pass another {{name}}, "
            "resume to continue that run, or force to replace it",
        )
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    return open(metrics_path, "a" if continuing else "w")  # closed by _Events.close


def _loop(run: _Run, state: _RunState, stop: dict[str, Any]) -> None:
    """The training loop: learning rate, gradient accumulation, clipping, step, log, eval, save."""
    config, optimizer = run.config, run.optimizer
    end_iter = run.start_iter + run.steps
    if run.eval_interval > 0:
        _evaluate(run, state)
    while state.iter_num < end_iter:
        lr = run.schedule.at(state.iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss_sum = _accumulate_gradients(run)
        if run.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), run.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.iter_num += 1
        # One collective per step: the mean loss over ranks and whether any rank was interrupted.
        loss, stop_requested = reduce_step(loss_sum, stop["stop"], run.processes)
        dt = time.perf_counter() - t0
        state.step_seconds += dt
        done = state.iter_num - run.start_iter
        # training tokens per wall second of the steps so far (eval and saving excluded)
        tokens_per_s = run.tokens_per_step * done / state.step_seconds if state.step_seconds > 0 else 0.0
        record = {
            "event": "step",
            "iter": state.iter_num,
            "step": done,
            "steps": run.steps,
            "loss": loss,
            "lr": lr,
            "dt": dt,
            "tokens_per_s": tokens_per_s,
            "state_bytes": optimizer_state_bytes(optimizer.state),
        }
        # Every rank once, then only when one changes: the metrics file holds the ranks over
        # training (``analysis.ranks_from_metrics``) at a few bytes per step.
        ranks = _factor_ranks(run)
        if ranks is not None and ranks != state.ranks:
            record["ranks"] = state.ranks = ranks
        state.history.append(record)
        run.events.emit(record)
        if run.eval_interval > 0 and done % run.eval_interval == 0 and state.iter_num < end_iter:
            _evaluate(run, state)
        if stop_requested:
            state.interrupted = True
            _save(run, state)
            return
        if config.save_interval > 0 and done % config.save_interval == 0 and state.iter_num < end_iter:
            _save(run, state)
    if config.final_eval:
        _evaluate(run, state)
    if config.save_final:
        _save(run, state)


def _accumulate_gradients(run: _Run) -> torch.Tensor:
    """Forward and backward ``grad_accum`` micro-batches; their summed (scaled) loss."""
    grad_accum = run.config.grad_accum
    ddp = run.processes.enabled and not run.config.fsdp
    # Summed on the device: the step's one host read is the logged loss (reduce_step), not one
    # per micro-batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    for micro_step in range(grad_accum):
        x, y = get_batch(run.train_data, run.block_size, run.batch_size, run.generator, run.device)
        # Under DDP only the last micro-step all-reduces the gradients (nanoGPT's trick).
        last = micro_step == grad_accum - 1
        sync = run.model.no_sync() if ddp and not last else contextlib.nullcontext()
        with sync:
            with run.autocast:
                loss = _forward_loss(run.model, x, y) / grad_accum
            loss.backward()
        loss_sum += loss.detach().double()
    return loss_sum


def _evaluate(run: _Run, state: _RunState) -> None:
    losses = _estimate_loss(run)
    state.best_val_loss = min(state.best_val_loss, losses["val"])
    record = {"event": "eval", "iter": state.iter_num, "train": losses["train"], "val": losses["val"]}
    state.evals.append(record)
    run.events.emit(record)


@torch.no_grad()
def _estimate_loss(run: _Run) -> dict[str, float]:
    # The same eval batches every time (a fixed generator): curves compare across steps and runs.
    config, model = run.config, run.raw_model
    model.eval()
    losses = {}
    for split, data in (("train", run.train_data), ("val", run.val_data)):
        eval_generator = torch.Generator().manual_seed(sampler_seed(config.seed + 2, run.processes.rank, 0))
        total = torch.zeros((), dtype=torch.float64, device=run.device)
        for _ in range(config.eval_iters):
            x, y = get_batch(data, run.block_size, run.batch_size, eval_generator, run.device)
            with run.autocast:
                total += _forward_loss(model, x, y).double()
        losses[split] = float(mean_over_processes(total / config.eval_iters, run.processes))
    model.train()
    return losses


def _save(run: _Run, state: _RunState) -> None:
    """Write ``out_dir/ckpt.pt`` (rank 0); every rank takes part in gathering what it holds."""
    generator_states = gather_over_processes(run.generator.get_state(), run.processes)
    rng_states = gather_over_processes(torch.get_rng_state(), run.processes)
    # Under FSDP every rank takes part in gathering the full (one-process) state dicts.
    gathered = gathered_state_dicts(run.raw_model, run.optimizer) if run.config.fsdp else None
    if not run.processes.master or run.out_dir is None:
        return
    model_state, optimizer_state = gathered or (run.raw_model.state_dict(), run.optimizer.state_dict())
    checkpoint = {
        "model": model_state,
        "optimizer": optimizer_state,
        "model_args": run.model_args,
        "iter_num": state.iter_num,
        "best_val_loss": torch.tensor(state.best_val_loss),
        "config": _saved_config(run),
        "optimizer_kind": run.config.optimizer,
        "sampler": {
            "world_size": run.processes.world_size,
            "seed": run.config.seed,
            "generator_states": generator_states,
        },
        "rng": {"torch_states": rng_states},
    }
    if run.config.optimizer == "adapprox":
        group = run.optimizer.param_groups[0]
        checkpoint["adapprox"] = {k: v for k, v in group.items() if k not in ("params", "lr", "param_names")}
    path = atomic_torch_save(checkpoint, run.out_dir / CHECKPOINT_NAME)
    state.checkpoints.append(str(path))
    run.events.emit({"event": "save", "iter": state.iter_num, "path": str(path)})


def _saved_config(run: _Run) -> dict[str, Any]:
    """The checkpoint's config as this run used it, so the saved ckpt.pt resumes with no options."""
    schedule, config = run.schedule, run.config
    return {
        **run.ckpt_config,
        "learning_rate": schedule.learning_rate,
        "min_lr": schedule.min_lr,
        "warmup_iters": schedule.warmup_iters,
        "lr_decay_iters": schedule.lr_decay_iters,
        "decay_lr": schedule.decay_lr,
        "lr_schedule_start": schedule.start,
        "data_dir": str(run.data_dir.resolve()),
        "text": str(run.text.resolve()) if run.text is not None else None,
        "batch_size": run.batch_size,
        "block_size": run.block_size,
        "gradient_accumulation_steps": config.grad_accum * run.processes.world_size,
        "grad_clip": run.grad_clip,
        "weight_decay": run.weight_decay,
        "max_iters": run.start_iter + run.steps,
        "seed": config.seed,
        "optimizer": config.optimizer,
    }


def _start_record(run: _Run) -> dict[str, Any]:
    return {
        "event": "start",
        "optimizer": run.config.optimizer,
        "source_optimizer": run.source_kind,
        "iter": run.start_iter,
        "steps": run.steps,
        "device": run.device,
        "notes": run.notes,
        "world_size": run.processes.world_size,
        "tokens_per_step": run.tokens_per_step,
        "state_bytes": optimizer_state_bytes(run.optimizer.state),
    }


def _end_record(state: _RunState, result: TrainResult) -> dict[str, Any]:
    return {
        "event": "end",
        "iter": state.iter_num,
        "interrupted": state.interrupted,
        "final_val_loss": result.final_val_loss,
    }


def _result(run: _Run, state: _RunState, stop_signal: int | None) -> TrainResult:
    ranks = _factor_ranks(run)
    config = run.config
    return TrainResult(
        optimizer=config.optimizer,
        start_iter=run.start_iter,
        end_iter=state.iter_num,
        history=state.history,
        evals=state.evals,
        state_bytes=optimizer_state_bytes(run.optimizer.state),
        step_time=state.step_seconds / len(state.history) if state.history else 0.0,
        tokens_per_step=run.tokens_per_step,
        world_size=run.processes.world_size,
        ranks=ranks,
        checkpoints=state.checkpoints,
        interrupted=state.interrupted,
        stop_signal=stop_signal,
        conversion=run.conversion,
        source_optimizer=run.source_kind,
        device=run.device,
        metrics_path=str(config.metrics_path) if config.metrics_path is not None else None,
        notes=run.notes,
        model=run.raw_model,
    )


def _forward_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of any model: nanoGPT's (logits, loss), an object with .loss, or bare logits."""
    out = model(x, y)
    if isinstance(out, tuple) and len(out) >= 2 and isinstance(out[1], torch.Tensor):
        return out[1]
    if hasattr(out, "loss") and isinstance(out.loss, torch.Tensor):
        return out.loss
    if isinstance(out, torch.Tensor):
        if out.dim() == 0:
            return out
        return F.cross_entropy(out.reshape(-1, out.size(-1)).float(), y.reshape(-1))
    raise InputError(
        f"the model returned a {type(out).__name__}; it must return (logits, loss), an object with .loss, or logits"
    )


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and what schedulers send before a kill


@contextlib.contextmanager
def _stop_on_signals(enabled: bool) -> Iterator[dict[str, Any]]:
    """SIGINT or SIGTERM sets a flag the loop checks at each step boundary (it then saves and
    stops, and ``stop_signal`` records which); a second one interrupts at once."""
    flag: dict[str, Any] = {"stop": False, "signal": None}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"], flag["signal"] = True, signum

    previous = {s: signal.signal(s, handler) for s in _STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, handler_before in previous.items():
            signal.signal(s, handler_before)
