"""Resume training from a checkpoint with Adapprox, AdamW or Adafactor: one straight loop.

Read like nanoGPT's ``train.py``: a config dataclass, a few setup helpers, then ``train`` runs
the loop top to bottom (learning rate, optional eval, gradient accumulation, clipping, step,
log, save). Nothing here prints: progress goes to a callback, metrics to an optional JSON-lines
file, and the CLI renders them.

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
import importlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from adapprox_cli.atomic_io import atomic_write
from adapprox_cli.checkpoints.core import optimizer_state_bytes
from adapprox_cli.convert import (
    ConversionReport,
    adamw_to_adafactor,
    adamw_to_adapprox,
    adapprox_to_adamw,
    atomic_torch_save,
)
from adapprox_cli.devices import resolve_device
from adapprox_cli.errors import InputError
from adapprox_cli.formatting import format_shape
from adapprox_cli.optim import Adapprox
from adapprox_cli.train.data import encode_text_file, get_batch, read_nanogpt_dataset, read_vocab
from adapprox_cli.train.model import (
    gpt_from_model_args,
    model_state_from_checkpoint,
    nanogpt_learning_rate,
    nanogpt_param_groups,
)
from adapprox_cli.validation import check_at_least, check_beta, check_learning_rate, check_tol

__all__ = [
    "OPTIMIZERS",
    "TrainConfig",
    "TrainResult",
    "compare_optimizers",
    "learning_rate_at",
    "plot_loss_curves",
    "prepare_run",
    "train",
]

OPTIMIZERS = ("adapprox", "adamw", "adafactor")
CHECKPOINT_NAME = "ckpt.pt"
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


# --------------------------------------------------------------------------- setup helpers


@dataclass
class _Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    created: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: str) -> _Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Dist()
    import torch.distributed as dist

    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        created = True
    return _Dist(world_size, rank, local_rank, created)


def _resolve_device(device: str, dist_info: _Dist) -> str:
    resolved = resolve_device(device)
    if resolved.type != "cuda":
        return str(resolved)
    if resolved.index is None and dist_info.enabled:
        # under torchrun each process takes the GPU of its local rank
        resolved = torch.device("cuda", dist_info.local_rank)
    torch.cuda.set_device(resolved)
    return str(resolved)


def _read_container(path: Path, trust_checkpoint: bool) -> tuple[Path, dict[str, Any]]:
    """The nanoGPT-style checkpoint dict: model, optimizer, model_args, iter_num, config."""
    from adapprox_cli.checkpoints import safe_torch_load

    if path.is_dir():
        if not (path / CHECKPOINT_NAME).is_file():
            raise InputError(
                f"{path} is a directory without {CHECKPOINT_NAME}; adapprox train resumes nanoGPT-layout "
                "checkpoints (ckpt.pt with model, optimizer and model_args)"
            )
        path = path / CHECKPOINT_NAME
    container = safe_torch_load(path, trust_checkpoint=trust_checkpoint, mmap=False)
    if not isinstance(container, dict) or "model" not in container:
        keys = ", ".join(map(str, container)) if isinstance(container, dict) else type(container).__name__
        raise InputError(
            f"{path} holds no model weights ({keys}); adapprox train resumes nanoGPT-layout checkpoints "
            "(a dict with model, optimizer, model_args, iter_num, config); convert other formats first"
        )
    check_resumable(path, container)
    return path, container


def check_resumable(path: Path, container: dict[str, Any]) -> None:
    """Refuse a damaged container before anything is built from it: the optimizer state (values,
    shapes against the stored weights, hyper-parameters), the weights' storage and iter_num."""
    from adapprox_cli.checkpoints.core import check_tensor_storage
    from adapprox_cli.checkpoints.formats.nanogpt import is_nanogpt, load_nanogpt
    from adapprox_cli.checkpoints.validate import require_sound_state

    model = container.get("model")
    if isinstance(model, dict):
        for key, value in model.items():
            if isinstance(value, torch.Tensor):
                check_tensor_storage(value, f"model weight {key}", path)
    iter_num = container.get("iter_num", 0)
    if isinstance(iter_num, torch.Tensor) and iter_num.numel() == 1:
        iter_num = iter_num.item()
    if isinstance(iter_num, bool) or not isinstance(iter_num, (int, float)) or not 0 <= iter_num < 2**53:
        raise InputError(f"{path}: iter_num is {iter_num!r}; a resumable checkpoint has a count >= 0")
    if is_nanogpt(container) and container.get("optimizer") is not None:
        require_sound_state(load_nanogpt(path, container), "train")


def _load_factory(spec: str) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise InputError(
            f"--model {spec!r}: expected package.module:factory (a callable returning an nn.Module)"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(
            f"--model {spec!r}: cannot import {module_name} ({exc}); is it on PYTHONPATH?"
        ) from None
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise InputError(f"--model {spec!r}: {module_name} has no attribute {attribute}")
    if not callable(target):
        raise InputError(f"--model {spec!r}: {attribute} is not callable")
    model = target()
    if not isinstance(model, nn.Module):
        raise InputError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _build_model(config: TrainConfig, container: dict[str, Any], source: str) -> nn.Module:
    """The bundled GPT from ``model_args`` (or the ``--model`` factory), with the checkpoint's weights."""
    if config.model is None:
        if "model_args" not in container:
            raise InputError(
                f"{source} has no model_args; pass --model package.module:factory to build the model yourself"
            )
        # model_args are checked against the stored weights on the meta device first: a 5 MB file
        # must not make us allocate the 3.7 GB model its model_args claim.
        with torch.device("meta"):
            skeleton = gpt_from_model_args(container["model_args"], source=source)
        state = model_state_from_checkpoint(container, source)
        _check_weights_fit(config, state, skeleton.state_dict(), source)
        model = gpt_from_model_args(container["model_args"], source=source)
    else:
        model = _load_factory(config.model)
    state = model_state_from_checkpoint(container, source)
    _check_weights_fit(config, state, model.state_dict(), source)
    model.load_state_dict(state)
    return model.float()


def _check_weights_fit(
    config: TrainConfig, state: dict[str, Any], expected: dict[str, Any], source: str
) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {format_shape(state[k].shape)} vs {format_shape(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched))
            if items
        )
        what = f"the model from {config.model}" if config.model else "the GPT built from model_args"
        raise InputError(f"{source}: the checkpoint weights do not fit {what} ({details})")


def _check_batch_fits(
    source: str, batch_size: int, block_size: int, train_tokens: int, model: nn.Module, device: str
) -> None:
    """Refuse a micro-batch larger than the training data, or one whose activations cannot fit.

    ``config.batch_size`` comes from the checkpoint (a downloaded file may say 200000). The
    estimate is a lower bound of what one forward and backward pass keeps (fp32: about 16 values
    per token and layer for the block, 2 per head and position for attention, logits and their
    gradient), so what it refuses would not have fitted.
    """
    if batch_size < 1:
        raise InputError(f"{source}: batch size {batch_size}; pass --batch-size N with N >= 1")
    tokens = batch_size * block_size
    if tokens > max(train_tokens, 1):
        raise InputError(
            f"{source}: a micro-batch of {batch_size} x {block_size} tokens is larger than the "
            f"{train_tokens} training tokens; pass a smaller --batch-size (and --grad-accum for the same step size)"
        )
    cfg = getattr(model, "config", None)
    if cfg is None:
        return
    per_token = 4 * (cfg.n_layer * (16 * cfg.n_embd + 2 * cfg.n_head * block_size) + 2 * cfg.vocab_size)
    needed = tokens * per_token
    available = _available_memory(device)
    if available is not None and needed > available:
        from adapprox_cli.render import human_bytes

        raise InputError(
            f"{source}: batch size {batch_size} x {block_size} tokens needs about {human_bytes(needed)} of "
            f"activations, more than the {human_bytes(available)} available on {device}; pass a smaller "
            "--batch-size (and --grad-accum for the same step size)"
        )


def _available_memory(device: str) -> int | None:
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    limits = []
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:  # an address-space cap (ulimit -v): what is left of it
            status = Path("/proc/self/status").read_text()
            used = next(int(ln.split()[1]) * 1024 for ln in status.splitlines() if ln.startswith("VmSize:"))
            limits.append(max(soft - used, 0))
    return min(limits) if limits else None


def _saved_kind(state_dict: dict[str, Any] | None) -> str | None:
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


def _param_groups(
    model: nn.Module, saved: dict[str, Any] | None, weight_decay: float
) -> list[dict[str, Any]]:
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


def _build_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    saved: dict[str, Any] | None,
    options: dict[str, Any],
    names: list[str],
) -> tuple[torch.optim.Optimizer, ConversionReport | None, str | None]:
    """The optimizer with the checkpoint's state, converted when it belongs to another optimizer."""
    kind = _saved_kind(saved)
    report = None
    state = saved
    settings = _adapprox_kwargs(options)
    beta1 = options.get("beta1")
    if name == "adapprox":
        if kind == "adafactor":
            raise InputError("the checkpoint holds an Adafactor state; resume it with --optimizer adafactor")
        if kind == "adamw":
            state, report = adamw_to_adapprox(saved, beta1=beta1, names=dict(enumerate(names)), **settings)
        optimizer: torch.optim.Optimizer = Adapprox(groups, **settings)
    elif name == "adamw":
        if kind == "adafactor":
            raise InputError("the checkpoint holds an Adafactor state; resume it with --optimizer adafactor")
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


@dataclass
class _Schedule:
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


def _schedule(
    config: TrainConfig,
    ckpt_config: dict[str, Any],
    saved: dict[str, Any] | None,
    start_iter: int,
    steps: int,
) -> tuple[_Schedule, str | None]:
    """The learning-rate schedule of this run, and a note when the user should hear about it.

    The checkpoint's schedule continues (``--lr`` replaces its peak), except when it has ended
    (iter_num >= lr_decay_iters): every step would then sit at min_lr and ``--lr`` would change
    nothing. So ``--lr`` on an ended schedule starts a fresh one over this run: linear warmup of
    ``--warmup-iters`` (default a tenth of the steps), cosine to ``--min-lr`` (default lr/10) at
    the run's last step. Without ``--lr`` the ended schedule stays at min_lr, and the note says so.
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
        raise InputError(
            "the checkpoint's config has no lr_decay_iters; pass --lr-decay-iters N, or --no-decay-lr for a constant rate"
        )
    ended = decay_lr and config.lr_decay_iters is None and start_iter >= int(lr_decay_iters)
    if ended and config.learning_rate is not None:
        warmup = config.warmup_iters if config.warmup_iters is not None else steps // 10
        schedule = _Schedule(
            learning_rate=learning_rate,
            min_lr=float(config.min_lr if config.min_lr is not None else learning_rate / 10),
            warmup_iters=int(warmup),
            lr_decay_iters=start_iter + steps,
            decay_lr=True,
            scale=config.lr_scale,
            start=start_iter,
        )
        note = (
            f"the checkpoint's schedule ended at iteration {int(lr_decay_iters)}; --lr {learning_rate:g} "
            f"starts a fresh one: {schedule.warmup_iters} warmup steps, cosine to {schedule.min_lr:g} "
            f"at iteration {schedule.lr_decay_iters}"
        )
        return schedule, note
    schedule = _Schedule(
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
        note = (
            f"the checkpoint's schedule ended at iteration {int(lr_decay_iters)}: every step uses its "
            f"min_lr {schedule.min_lr:g}; pass --lr to start a fresh warmup + cosine over this run"
        )
    return schedule, note


def _data_source(
    config: TrainConfig, checkpoint_path: Path, ckpt_config: dict[str, Any]
) -> tuple[Path, Path | None]:
    """Where the tokens come from: --data/--text, else beside the checkpoint, else the recorded source.

    Checkpoints written by ``train`` record their data directory (and --text file), so the saved
    ckpt.pt of a run resumes with the command alone, wherever it was written.
    """
    if config.data_dir is not None or config.text is not None:
        data_dir = Path(config.data_dir) if config.data_dir is not None else checkpoint_path.parent
        return data_dir, Path(config.text) if config.text is not None else None
    beside = checkpoint_path.parent
    recorded = ckpt_config.get("data_dir")
    if not (beside / "train.bin").is_file() and isinstance(recorded, str):
        recorded_text = ckpt_config.get("text")
        if isinstance(recorded_text, str) and Path(recorded_text).is_file():
            return Path(recorded), Path(recorded_text)
        if (Path(recorded) / "train.bin").is_file():
            return Path(recorded), None
    return beside, None


def _load_data(data_dir: Path, text: Path | None) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Training and validation tokens, and the vocabulary size when known."""
    if text is not None:
        meta = data_dir / "meta.pkl"
        if not meta.is_file():
            raise InputError(
                f"--text needs the checkpoint's character vocabulary, but {meta} does not exist; "
                "pass --data DIR with the meta.pkl the checkpoint was trained with"
            )
        vocab = read_vocab(meta)
        ids = encode_text_file(text, vocab)
        split = int(len(ids) * 0.9)
        return ids[:split], ids[split:], vocab.vocab_size
    if not (data_dir / "train.bin").is_file():
        raise InputError(
            f"no training data: {data_dir / 'train.bin'} does not exist; pass --data DIR (train.bin, val.bin, "
            "meta.pkl) or --text FILE"
        )
    data = read_nanogpt_dataset(data_dir)
    return data.train, data.val, data.vocab.vocab_size if data.vocab else None


def _sampler_seed(seed: int, rank: int, iteration: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + iteration * 104_729) % (2**63)


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


# --------------------------------------------------------------------------- the loop


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
        raise InputError("--resume continues the run in --out, --force replaces it: pass one of them")


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
        raise InputError(
            f"{own} exists from an earlier run; pass --resume to continue it, --force to replace it, "
            "or another --out"
        )
    return config


def train(config: TrainConfig, callback: Callback | None = None) -> TrainResult:
    """Resume training from ``config.checkpoint`` for ``config.steps`` optimizer steps."""
    if config.optimizer not in OPTIMIZERS:
        raise InputError(f"unknown optimizer {config.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    _validate(config)
    if config.fsdp:
        _check_fsdp(config)
    config = prepare_run(config)
    dist_info = _setup_distributed("cuda" if config.device.startswith("cuda") else config.device)
    try:
        result = _train(config, callback, dist_info)
        if dist_info.created:
            import torch.distributed as dist

            # Every rank leaves together: a rank tearing gloo down while another still sends
            # (rank 0 writes the last checkpoint) can abort that one at exit.
            dist.barrier()
        return result
    finally:
        if dist_info.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(config: TrainConfig, callback: Callback | None, dist_info: _Dist) -> TrainResult:
    device = _resolve_device(config.device, dist_info)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    checkpoint_path, container = _read_container(
        Path(config.checkpoint).expanduser(), config.trust_checkpoint
    )
    source = str(checkpoint_path)
    ckpt_config = dict(container.get("config") or {})
    saved_optimizer = container.get("optimizer")
    start_iter = int(container.get("iter_num", 0) or 0)
    steps = config.steps
    if config.until is not None:
        if config.until <= start_iter:
            raise InputError(
                f"--until {config.until}: {source} is already at iteration {start_iter}; pass a larger N"
            )
        steps = config.until - start_iter
    eval_interval = config.eval_interval if config.eval_interval is not None else max(1, -(-steps // 4))

    model = _build_model(config, container, source)
    block_size = (
        config.block_size
        or ckpt_config.get("block_size")
        or getattr(getattr(model, "config", None), "block_size", None)
    )
    if not block_size:
        raise InputError(f"{source} does not say its block size; pass --block-size")
    model_block = getattr(getattr(model, "config", None), "block_size", None)
    if model_block is not None and block_size > model_block:
        raise InputError(f"--block-size {block_size} exceeds the model's block size {model_block}")
    batch_size = config.batch_size or int(ckpt_config.get("batch_size", _DEFAULT_BATCH_SIZE))
    data_dir, text = _data_source(config, checkpoint_path, ckpt_config)
    train_data, val_data, vocab_size = _load_data(data_dir, text)
    _check_batch_fits(source, batch_size, block_size, len(train_data), model, device)
    model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab_size is not None and model_vocab is not None and vocab_size > model_vocab:
        raise InputError(
            f"the data has {vocab_size} token ids but the model only {model_vocab}; wrong data directory?"
        )

    model.to(device)
    weight_decay = config.weight_decay
    if weight_decay is None:
        groups = (saved_optimizer or {}).get("param_groups") or [{}]
        weight_decay = float(groups[0].get("weight_decay", ckpt_config.get("weight_decay", 0.0)))
    groups = _param_groups(model, saved_optimizer, weight_decay)
    names_by_id = {id(p): n for n, p in model.named_parameters()}
    flat_names = [names_by_id[id(p)] for g in groups for p in g["params"]]
    optimizer, conversion, source_kind = _build_optimizer(
        config.optimizer, groups, saved_optimizer, dict(config.optimizer_options), flat_names
    )
    schedule, schedule_note = _schedule(config, ckpt_config, saved_optimizer, start_iter, steps)
    notes = [schedule_note] if schedule_note else []
    grad_clip = (
        config.grad_clip
        if config.grad_clip is not None
        else float(ckpt_config.get("grad_clip", _DEFAULT_GRAD_CLIP))
    )

    raw_model = model
    if config.fsdp:
        from adapprox_cli.distributed import shard_for_training

        # FSDP2 shards the module itself: raw_model and model are the same sharded object.
        shard_for_training(model, optimizer)
    elif dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if device_type == "cuda" else None
        )

    # Sampler and dropout randomness: restored from our own checkpoints, else seeded by (seed, rank, iter).
    generator = torch.Generator().manual_seed(_sampler_seed(config.seed, dist_info.rank, start_iter))
    sampler = container.get("sampler")
    if isinstance(sampler, dict) and sampler.get("world_size") == dist_info.world_size:
        generator.set_state(sampler["generator_states"][dist_info.rank])
    rng = container.get("rng")
    if isinstance(rng, dict) and len(rng.get("torch_states", [])) == dist_info.world_size:
        torch.set_rng_state(rng["torch_states"][dist_info.rank])
    else:
        torch.manual_seed(_sampler_seed(config.seed + 1, dist_info.rank, start_iter))

    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        if device_type == "cuda"
        else contextlib.nullcontext()
    )
    tokens_per_step = batch_size * block_size * config.grad_accum * dist_info.world_size
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    metrics = None
    if config.metrics_path is not None and dist_info.master:
        metrics_path = Path(config.metrics_path)
        # One run per file: a continued run (--resume) appends, a fresh one starts the file anew.
        continuing = (
            out_dir is not None and checkpoint_path.resolve() == (out_dir / CHECKPOINT_NAME).resolve()
        )
        if metrics_path.is_file() and metrics_path.stat().st_size and not (continuing or config.force):
            raise InputError(
                f"{metrics_path} already holds the metrics of another run; pass another --metrics, "
                "--resume to continue that run, or --force to replace it"
            )
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics = open(metrics_path, "a" if continuing else "w")  # noqa: SIM115 - closed in the finally below

    def emit(record: dict[str, Any]) -> None:
        if not dist_info.master:
            return
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if callback is not None:
            callback(record)

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        # The same eval batches every time (a fixed generator): curves compare across steps and runs.
        raw_model.eval()
        losses = {}
        for split, data in (("train", train_data), ("val", val_data)):
            eval_generator = torch.Generator().manual_seed(_sampler_seed(config.seed + 2, dist_info.rank, 0))
            total = torch.zeros((), dtype=torch.float64)
            for _ in range(config.eval_iters):
                x, y = get_batch(data, block_size, batch_size, eval_generator, device)
                with autocast:
                    total += _forward_loss(raw_model, x, y).double().cpu()
            losses[split] = float(_all_mean(total / config.eval_iters, dist_info))
        raw_model.train()
        return losses

    best_val = container.get("best_val_loss")
    best_val_loss = float(best_val) if best_val is not None else math.inf
    written: list[str] = []

    def save(iteration: int) -> None:
        nonlocal best_val_loss
        states = _gather_states(generator.get_state(), dist_info)
        rng_states = _gather_states(torch.get_rng_state(), dist_info)
        # Under FSDP every rank takes part in gathering the full (one-process) state dicts.
        gathered = _gathered_state_dicts(raw_model, optimizer) if config.fsdp else None
        if not dist_info.master or out_dir is None:
            return
        run_config = {
            **ckpt_config,
            "learning_rate": schedule.learning_rate,
            "min_lr": schedule.min_lr,
            "warmup_iters": schedule.warmup_iters,
            "lr_decay_iters": schedule.lr_decay_iters,
            "decay_lr": schedule.decay_lr,
            "lr_schedule_start": schedule.start,
            "data_dir": str(data_dir.resolve()),
            "text": str(text.resolve()) if text is not None else None,
            "batch_size": batch_size,
            "block_size": block_size,
            "gradient_accumulation_steps": config.grad_accum * dist_info.world_size,
            "grad_clip": grad_clip,
            "weight_decay": weight_decay,
            "max_iters": start_iter + steps,
            "seed": config.seed,
            "optimizer": config.optimizer,
        }
        checkpoint = {
            "model": gathered[0] if gathered else raw_model.state_dict(),
            "optimizer": gathered[1] if gathered else optimizer.state_dict(),
            "model_args": container.get("model_args"),
            "iter_num": iteration,
            "best_val_loss": torch.tensor(best_val_loss),
            "config": run_config,
            "optimizer_kind": config.optimizer,
            "sampler": {"world_size": dist_info.world_size, "seed": config.seed, "generator_states": states},
            "rng": {"torch_states": rng_states},
        }
        if config.optimizer == "adapprox":
            group = optimizer.param_groups[0]
            checkpoint["adapprox"] = {
                k: v for k, v in group.items() if k not in ("params", "lr", "param_names")
            }
        path = atomic_torch_save(checkpoint, out_dir / CHECKPOINT_NAME)
        written.append(str(path))
        emit({"event": "save", "iter": iteration, "path": str(path)})

    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []

    def evaluate(iteration: int) -> None:
        nonlocal best_val_loss
        losses = estimate_loss()
        best_val_loss = min(best_val_loss, losses["val"])
        record = {"event": "eval", "iter": iteration, "train": losses["train"], "val": losses["val"]}
        evals.append(record)
        emit(record)

    emit(
        {
            "event": "start",
            "optimizer": config.optimizer,
            "source_optimizer": source_kind,
            "iter": start_iter,
            "steps": steps,
            "device": device,
            "notes": notes,
            "world_size": dist_info.world_size,
            "tokens_per_step": tokens_per_step,
            "state_bytes": optimizer_state_bytes(optimizer.state),
        }
    )
    iter_num = start_iter
    end_iter = start_iter + steps
    step_seconds = 0.0
    interrupted = False
    try:
        with _stop_on_signals(config.handle_signals) as stop:
            if eval_interval > 0:
                evaluate(iter_num)
            while iter_num < end_iter:
                lr = schedule.at(iter_num)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), dtype=torch.float64)
                for micro_step in range(config.grad_accum):
                    x, y = get_batch(train_data, block_size, batch_size, generator, device)
                    # Under DDP only the last micro-step all-reduces the gradients (nanoGPT's trick).
                    last = micro_step == config.grad_accum - 1
                    ddp = dist_info.enabled and not config.fsdp
                    sync = model.no_sync() if ddp and not last else contextlib.nullcontext()
                    with sync:
                        with autocast:
                            loss = _forward_loss(model, x, y) / config.grad_accum
                        loss.backward()
                    loss_sum += loss.detach().double().cpu()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                iter_num += 1
                # One collective per step: the mean loss over ranks and whether any rank was interrupted.
                loss_value, stop_requested = _all_reduce_step(loss_sum, stop["stop"], dist_info)
                dt = time.perf_counter() - t0
                step_seconds += dt
                done = iter_num - start_iter
                record = {
                    "event": "step",
                    "iter": iter_num,
                    "step": done,
                    "steps": steps,
                    "loss": loss_value,
                    "lr": lr,
                    "dt": dt,
                    # training tokens per wall second of the steps so far (eval and saving excluded)
                    "tokens_per_s": tokens_per_step * done / step_seconds if step_seconds > 0 else 0.0,
                    "state_bytes": optimizer_state_bytes(optimizer.state),
                }
                history.append(record)
                emit(record)
                if eval_interval > 0 and done % eval_interval == 0 and iter_num < end_iter:
                    evaluate(iter_num)
                if stop_requested:
                    interrupted = True
                    save(iter_num)
                    break
                if config.save_interval > 0 and done % config.save_interval == 0 and iter_num < end_iter:
                    save(iter_num)
            if not interrupted:
                if config.final_eval:
                    evaluate(iter_num)
                if config.save_final:
                    save(iter_num)

        ranks = None
        if isinstance(optimizer, Adapprox):
            ranks = {flat_names[i]: k for i, k in optimizer.ranks().items()}
        result = TrainResult(
            optimizer=config.optimizer,
            start_iter=start_iter,
            end_iter=iter_num,
            history=history,
            evals=evals,
            state_bytes=optimizer_state_bytes(optimizer.state),
            step_time=step_seconds / len(history) if history else 0.0,
            tokens_per_step=tokens_per_step,
            world_size=dist_info.world_size,
            ranks=ranks,
            checkpoints=written,
            interrupted=interrupted,
            stop_signal=stop["signal"] if interrupted else None,
            conversion=conversion,
            source_optimizer=source_kind,
            device=device,
            metrics_path=str(config.metrics_path) if config.metrics_path is not None else None,
            notes=notes,
            model=raw_model,
        )
        emit(
            {
                "event": "end",
                "iter": iter_num,
                "interrupted": interrupted,
                "final_val_loss": result.final_val_loss,
            }
        )
        return result
    finally:
        if metrics is not None:
            metrics.close()


def _check_fsdp(config: TrainConfig) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise InputError(
            "--fsdp shards the model over the processes torchrun starts; run it as "
            "torchrun --nproc-per-node 2 -m adapprox_cli train ... --fsdp"
        )
    if config.optimizer not in ("adapprox", "adamw"):
        raise InputError(
            f"--fsdp supports --optimizer adapprox or adamw, not {config.optimizer} "
            "(its state does not follow the weight rows FSDP2 shards)"
        )


def _gathered_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    from adapprox_cli.distributed import full_model_state_dict, full_optimizer_state_dict

    return full_model_state_dict(model), full_optimizer_state_dict(optimizer)


def _all_mean(value: torch.Tensor, dist_info: _Dist) -> torch.Tensor:
    if not dist_info.enabled:
        return value
    import torch.distributed as dist

    tensor = value.detach().to(torch.float64).reshape(1)
    tensor = tensor.cuda() if dist.get_backend() == "nccl" else tensor
    dist.all_reduce(tensor)
    return tensor.cpu()[0] / dist_info.world_size


def _all_reduce_step(loss: torch.Tensor, stop: bool, dist_info: _Dist) -> tuple[float, bool]:
    if not dist_info.enabled:
        return float(loss), stop
    import torch.distributed as dist

    tensor = torch.tensor([float(loss), 1.0 if stop else 0.0], dtype=torch.float64)
    tensor = tensor.cuda() if dist.get_backend() == "nccl" else tensor
    dist.all_reduce(tensor)
    tensor = tensor.cpu()
    return float(tensor[0]) / dist_info.world_size, bool(tensor[1] > 0)


def _gather_states(state: torch.Tensor, dist_info: _Dist) -> list[torch.Tensor]:
    """Every rank's copy of a generator state (a uint8 tensor), in rank order."""
    if not dist_info.enabled:
        return [state]
    import torch.distributed as dist

    states: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(states, state)
    return states


# --------------------------------------------------------------------------- comparisons and plots


def compare_optimizers(
    config: TrainConfig, others: list[str], callback: Callable[[str, dict[str, Any]], None] | None = None
) -> dict[str, TrainResult]:
    """Run ``config.optimizer`` and each of ``others`` from the same checkpoint, with the same data."""
    results: dict[str, TrainResult] = {}
    runs = {
        name: prepare_run(comparison_run(config, name))
        for name in [config.optimizer, *[o for o in others if o != config.optimizer]]
    }  # every run's out_dir checked before the first one trains
    for name, run in runs.items():
        results[name] = train(run, (lambda record, _n=name: callback(_n, record)) if callback else None)
        if results[name].interrupted:
            break
    return results


def comparison_run(config: TrainConfig, name: str) -> TrainConfig:
    """The run of optimizer ``name`` in a comparison: ``out_dir/name/``, ``metrics-name.jsonl``."""
    return replace(
        config,
        optimizer=name,
        out_dir=Path(config.out_dir) / name if config.out_dir is not None else None,
        metrics_path=_suffixed(config.metrics_path, name) if config.metrics_path is not None else None,
    )


def _suffixed(path: Path, name: str) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}-{name}{path.suffix}")


def plot_loss_curves(results: dict[str, TrainResult], path: str | Path, title: str | None = None) -> Path:
    """Training loss (raw and smoothed) and validation loss per iteration, one colour per optimizer.

    Drawn on matplotlib's Agg canvas without pyplot, and written through a temporary file.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # The first run (the --optimizer one) is drawn last, solid and on top, the baselines under
    # it dashed: curves that nearly coincide must still show both.
    styles = {0: ("-", 3.0)}
    for i, (name, result) in reversed(list(enumerate(results.items()))):
        color, (linestyle, zorder) = f"C{i}", styles.get(i, ("--", 2.0))
        iters = [h["iter"] for h in result.history]
        losses = np.array([h["loss"] for h in result.history], dtype=float)
        if len(losses):
            ax.plot(iters, losses, color=color, alpha=0.2, linewidth=0.7, linestyle=linestyle, zorder=zorder)
            ax.plot(
                iters,
                _ema(losses, 0.9),
                color=color,
                linewidth=1.8 if i == 0 else 1.4,
                linestyle=linestyle,
                label=f"{name} train (smoothed)",
                zorder=zorder + 0.1,
            )
        if result.evals:
            ax.plot(
                [e["iter"] for e in result.evals],
                [e["val"] for e in result.evals],
                color=color,
                # a small filled dot over a larger hollow square: coinciding values show both
                marker="o" if i == 0 else "s",
                markersize=5 if i == 0 else 9,
                markerfacecolor=color if i == 0 else "white",
                linestyle=":",
                label=f"{name} val",
                zorder=zorder + 0.2,
            )
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss after resuming")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda k: list(results).index(labels[k].split(" ")[0]))
    ax.legend([handles[k] for k in order], [labels[k] for k in order])
    fig.tight_layout()
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".") or "png"
    return atomic_write(path, lambda temporary: fig.savefig(temporary, format=fmt, dpi=120))


def _ema(values: np.ndarray, beta: float) -> np.ndarray:
    """Exponential moving average, bias-corrected so the first points do not lag the curve."""
    out = np.empty_like(values)
    average = 0.0
    for i, value in enumerate(values):
        average = beta * average + (1 - beta) * value
        out[i] = average / (1 - beta ** (i + 1))
    return out
