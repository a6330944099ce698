"""Helpers shared by the benchmark scripts: timing, tables, JSON output, the small char model.

Benchmarks import the package; the package never imports benchmarks. Run every script from the
repository root with ``PYTHONPATH=.`` (see benchmarks/README.md).

Timing rules used throughout: wall-clock ``time.perf_counter`` around the measured call (with a
CUDA synchronize on GPU), a warm-up call first, and competing variants interleaved round by round
so that a slow spell of a shared machine hits all of them alike. Reported numbers are medians over
the repeats; comparisons are ratios of medians taken in the same run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapprox_cli import checkpoints, lowrank

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- CLI and output


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark shares: --json, --quick, --threads, --seed."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", metavar="PATH", type=Path, help="write the results as JSON to PATH")
    parser.add_argument(
        "--quick", action="store_true", help="a fast smoke run (smaller sizes, fewer repeats)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine, 2 threads measured 2-4x "
        "slower and far noisier than 1 because of oversubscription; pass 0 for torch's own choice)",
    )
    parser.add_argument("--seed", type=int, default=0, help="base random seed (default: 0)")
    return parser


def configure_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "argv": sys.argv[1:],
        # The library changes while benchmarks run: name the exact versions measured.
        "library_sha256": _library_hashes(),
    }


def _library_hashes() -> dict[str, str]:
    root = Path(__file__).resolve().parent.parent / "adapprox_cli"
    return {
        name: hashlib.sha256((root / name).read_bytes()).hexdigest()[:12]
        for name in ("lowrank.py", "optim.py")
        if (root / name).is_file()
    }


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), **payload}
    path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    print(f"\nwrote {path}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def format_number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 1e6 or magnitude < 1e-3:
            return f"{value:.{max(digits - 2, 1)}e}"
        if magnitude >= 100:
            return f"{value:.1f}"
        if magnitude >= 10:
            return f"{value:.2f}"
        if magnitude >= 1:
            return f"{value:.{digits}f}"  # ratios near 1: 1.0003 must not print as 1
        return f"{value:.{digits}g}"
    return str(value)


def format_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 4) -> str:
    """A GitHub-markdown table (readable in a terminal and pasteable into the README)."""
    body = [[format_number(cell, digits) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = [f"\n### {title}\n"] if title else []
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in body:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(lines)


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 4) -> None:
    print(format_table(title, headers, list(rows), digits), flush=True)


# --------------------------------------------------------------------------- statistics and timing


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max (the spread reported for repeated runs)."""
    values = [float(v) for v in values]
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"median": median(values), "min": min(values), "max": max(values), "n": len(values)}


def synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[float, Any]:
    """Seconds one call takes, and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def interleaved_timings(
    functions: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, round robin, with the order rotated every round.

    Interleaving cancels slow phases of a shared machine; rotating the order cancels any bias
    from running first or last in a round (cache state, allocator reuse).
    """
    names = list(functions)
    for _ in range(warmup):
        for name in names:
            functions[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, _ = time_call(functions[name], device)
            times[name].append(seconds)
    return times


# --------------------------------------------------------------------------- the small char model


@dataclass(frozen=True)
class CharModelConfig:
    """The bundled nanoGPT-style GPT at character level, and how it is trained."""

    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    batch_size: int = 32
    steps: int = 500
    learning_rate: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    corpus_chars: int = 1_000_000
    corpus_seed: int = 0
    eval_batches: int = 40


@dataclass
class CharTask:
    train: np.ndarray
    val: np.ndarray
    vocab_size: int


def char_task(config: CharModelConfig) -> CharTask:
    """The project-generated corpus, encoded at character level, 90/10 train/val split."""
    from adapprox_cli.train.corpus import generate_corpus
    from adapprox_cli.train.data import CharVocab

    text = generate_corpus(config.corpus_chars, config.corpus_seed)
    vocab = CharVocab.from_text(text)
    ids = np.array(vocab.encode(text), dtype=np.uint16)
    split = int(0.9 * len(ids))
    return CharTask(train=ids[:split], val=ids[split:], vocab_size=vocab.vocab_size)


def build_model(config: CharModelConfig, vocab_size: int, seed: int) -> torch.nn.Module:
    from adapprox_cli.train.model import GPT, GPTConfig

    gpt_config = GPTConfig(
        block_size=config.block_size,
        vocab_size=vocab_size,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        dropout=0.0,
        bias=False,
    )
    return GPT(gpt_config, generator=torch.Generator().manual_seed(seed))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """nanoGPT's groups: decay on >= 2-D tensors only."""
    from adapprox_cli.train.model import nanogpt_param_groups

    return nanogpt_param_groups(model, weight_decay)


def learning_rate(step: int, config: CharModelConfig) -> float:
    from adapprox_cli.train.model import nanogpt_learning_rate

    return nanogpt_learning_rate(step, config.learning_rate, config.warmup_steps, config.steps, config.min_lr)


def fixed_batches(
    data: np.ndarray, config: CharModelConfig, count: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from adapprox_cli.train.data import get_batch

    generator = torch.Generator().manual_seed(seed)
    return [get_batch(data, config.block_size, config.batch_size, generator) for _ in range(count)]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    losses = [float(model(x, y)[1]) for x, y in batches]
    model.train()
    return float(np.mean(losses))


@dataclass
class TrainResult:
    final_val_loss: float
    train_losses: list[float]
    step_seconds: list[float]  # whole step: forward, backward, clip, optimizer
    optimizer_seconds: list[float]  # optimizer.step() alone
    val_curve: list[tuple[int, float]] = field(default_factory=list)


def train_char_model(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    task: CharTask,
    config: CharModelConfig,
    seed: int,
    val_batches: list[tuple[torch.Tensor, torch.Tensor]],
    eval_every: int = 0,
    after_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """nanoGPT's loop in miniature: warmup + cosine lr, grad-norm clipping, one batch per step.

    The batch sequence depends only on ``seed``, so two optimizers with one seed see the same data.
    """
    from adapprox_cli.train.data import get_batch

    generator = torch.Generator().manual_seed(10_000 + seed)
    result = TrainResult(math.nan, [], [], [])
    for step in range(config.steps):
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        x, y = get_batch(task.train, config.block_size, config.batch_size, generator)
        _, loss = model(x, y)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer_start = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        result.step_seconds.append(end - start)
        result.optimizer_seconds.append(end - optimizer_start)
        result.train_losses.append(loss.item())
        if not math.isfinite(result.train_losses[-1]):
            break
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < config.steps:
            result.val_curve.append((step + 1, evaluate(model, val_batches)))
        if after_step is not None:
            after_step(step)
    result.final_val_loss = evaluate(model, val_batches)
    result.val_curve.append((config.steps, result.final_val_loss))
    return result


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes in the optimizer's state tensors, counted the same way for every optimizer.

    Per-parameter ``step`` counters are included for all optimizers (AdamW and Adapprox keep a
    0-d tensor per parameter); they are a few hundred bytes.
    """
    return checkpoints.core.optimizer_state_bytes(optimizer.state)


def named_matrices(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The model's 2-D parameters, in named_parameters() order (tied weights listed once)."""
    return [(name, p) for name, p in model.named_parameters() if p.ndim == 2]


def truncation_errors(singular_values: torch.Tensor) -> torch.Tensor:
    """err[r-1] = ||V - V_r||_F / ||V||_F of the exact truncated SVD, from ALL singular values.

    Uses the tail sum sqrt(sum_{i>r} s_i^2) rather than ||V||^2 - sum_{i<=r} s_i^2: no
    cancellation, so float32 singular values still give the floor to ~1e-6 relative.
    """
    squares = singular_values.double().square()
    total = squares.sum()
    tail = squares.flip(0).cumsum(0).flip(0)  # tail[i] = sum_{j>=i} s_j^2
    tail = torch.cat([tail[1:], tail.new_zeros(1)])  # sum_{j>r} for r = 1..len
    return (tail.clamp(min=0).sqrt() / total.sqrt()) if float(total) > 0 else torch.zeros_like(tail)


# --------------------------------------------------------------------------- synthetic moments, S-RSI variant


def realistic_second_moment(
    m: int, n: int, seed: int, samples: int = 256, signal_rank: int = 8, signal: float = 0.5
):
    """(V_prev, V): see the module docstring.

    The average of T squared gradients (S + N_t)^2 with Gaussian N_t is sampled exactly without
    drawing T matrices: with the sample mean a ~ N(0, 1/T) and, independent of it (Cochran),
    sum_t (N_t - a)^2 ~ chi^2_{T-1}, the average is (S + a)^2 + chi^2_{T-1} / T.
    """
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    scale = torch.exp(0.5 * torch.randn(m, 1, generator=generator)) * torch.exp(
        0.5 * torch.randn(1, n, generator=generator)
    )
    s = torch.randn(m, signal_rank, generator=generator) @ torch.randn(signal_rank, n, generator=generator)
    s.mul_(signal / math.sqrt(signal_rank))
    mean_noise = torch.randn(m, n, generator=generator).div_(math.sqrt(samples))
    chi2 = torch.from_numpy(rng.standard_gamma((samples - 1) / 2, size=(m, n), dtype=np.float32)).mul_(
        2 / samples
    )
    v_prev = (s + mean_noise).square_().add_(chi2).mul_(scale).mul_(scale)
    del mean_noise, chi2
    g = s.add_(torch.randn(m, n, generator=generator)).mul_(scale)  # one more gradient
    v = v_prev.mul(0.99).addcmul_(g, g, value=0.01)
    return v_prev, v


def structured_gradient(v: torch.Tensor, seed: int) -> torch.Tensor:
    """A gradient whose square is exactly V: random signs times sqrt(V).

    Adapprox only sees G through G^2 (for V) and G / sqrt(V) (the update), so feeding this G
    every step makes V_t = (1 - beta2^t) V: the adaptive rank settles where V's truncation
    error meets the tolerance, as it would on a real second moment with this spectrum.
    """
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, v.shape, generator=generator, dtype=torch.int8).to(v.dtype).mul_(2).sub_(1)
    return signs.mul_(v.sqrt())


def _orthonormal_basis(y):
    return torch.linalg.qr(y, mode="reduced").Q


def srsi_before_patch(v, rank, oversample, power_iters, generator, warm_start, frobenius_sq=None):
    """lowrank._srsi as first written (before 2026-11-23 08:06), kept to measure two fixes.

    Same arithmetic and random draws as the library body; it differs only in
    - V^T Q computed as ``v.T @ q``: MKL's kernel for a tall transposed operand times a narrow
      matrix (a few columns) was measured 5-15x slower than ``(q.T @ v).T`` on this machine
      (AMD EPYC, MKL 2024.2, 1 thread); the library now uses the latter;
    - ||V||_F^2 as ``v.square().sum()``: a full m x n temporary (allocated and page-faulted);
      the library now sums row norms.
    """
    m, n = v.shape
    width = min(rank + oversample, m, n)
    if warm_start is not None and warm_start.shape[1] > 0:
        kept = warm_start[:, : min(warm_start.shape[1], width)].to(v.dtype)
        omega = torch.randn(n, width - kept.shape[1], generator=generator, device=v.device, dtype=v.dtype)
        y = torch.cat([kept, v @ omega], dim=1)
    else:
        y = v @ torch.randn(n, width, generator=generator, device=v.device, dtype=v.dtype)
    q = _orthonormal_basis(y)
    for _ in range(power_iters):
        q = _orthonormal_basis(v @ _orthonormal_basis(v.T @ q))
    w, s, zh = torch.linalg.svd(q.T @ v, full_matrices=False)
    if frobenius_sq is None:
        frobenius_sq = v.square().sum()
    errors = lowrank.relative_errors_from_singular_values(frobenius_sq, s)
    return q @ w, zh.T * s, s, errors
