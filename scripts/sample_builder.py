"""Make the bundled ``sample_states/``: three real AdamW checkpoints, bit-identical from a seed.

* ``nanogpt/``: a nanoGPT ``ckpt.pt`` (exact key layout, two param groups, betas (0.9, 0.99),
  warmup + cosine schedule) with the ``train.bin``/``val.bin``/``meta.pkl`` it was trained on;
* ``plain/optimizer.pt``: a bare ``optimizer.state_dict()`` of AdamW built from
  ``named_parameters()`` (so it carries ``param_names``) for a small conv net with 4-D weights;
* ``hf-trainer/checkpoint-N/``: the files a Hugging Face Trainer writes for a tiny GPT-2, with
  Conv1D ``(in, out)`` weights and the current Trainer decay rule, made without transformers.

Bit-identical means: fixed seeds and explicit generators for every random draw, one CPU thread
and ``torch.use_deterministic_algorithms(True)`` while training, float32 throughout, and output
formats without timestamps. The bytes can still differ across CPU instruction sets or torch
versions (kernels round differently); ``SHA256SUMS`` records the committed ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from adapprox_cli.train.corpus import generate_corpus
from adapprox_cli.train.data import CharVocab, get_batch, read_nanogpt_dataset, write_nanogpt_dataset
from adapprox_cli.train.model import gpt_from_model_args, nanogpt_learning_rate, nanogpt_param_groups

SHA256SUMS_FILE = "SHA256SUMS"
README_FILE = "README.md"
REGENERATE_COMMAND = "python scripts/make_sample_states.py"


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class NanoGPTSampleConfig:
    """A nanoGPT character-level run shaped like its shakespeare_char config, scaled down for a CPU.

    Kept from that config: betas (0.9, 0.99), weight decay 0.1, warmup then cosine decay to
    lr / 10, grad clip 1.0, no bias, no dropout (dropout would need the global RNG).
    """

    corpus_chars: int = 250_000
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 96
    block_size: int = 64
    batch_size: int = 16
    max_iters: int = 300
    eval_interval: int = 100
    eval_iters: int = 20
    learning_rate: float = 3e-3  # above nanoGPT's 1e-3: a model this small learns faster with it
    min_lr: float = 3e-4  # learning_rate / 10, as in nanoGPT
    warmup_iters: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0


@dataclass(frozen=True)
class PlainSampleConfig:
    """A small conv net classifying generated images of bars, diagonals and boxes."""

    steps: int = 300
    batch_size: int = 64
    image_size: int = 12
    conv_channels: tuple[int, int] = (8, 16)
    hidden: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    eval_batch_size: int = 512


@dataclass(frozen=True)
class HFSampleConfig:
    """A tiny GPT-2 trained as Hugging Face's Trainer would (its defaults, except lr and decay)."""

    corpus_chars: int = 120_000
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    n_positions: int = 64
    batch_size: int = 8
    max_steps: int = 200
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    logging_steps: int = 50


@dataclass(frozen=True)
class SampleConfig:
    name: str = "full"
    seed: int = 0
    nanogpt: NanoGPTSampleConfig = field(default_factory=NanoGPTSampleConfig)
    plain: PlainSampleConfig = field(default_factory=PlainSampleConfig)
    hf: HFSampleConfig = field(default_factory=HFSampleConfig)


SAMPLE_CONFIGS = {
    "full": SampleConfig(),
    # Same code path, seconds to run: for tests of the bit-identical regeneration.
    "tiny": SampleConfig(
        name="tiny",
        nanogpt=NanoGPTSampleConfig(
            corpus_chars=6_000, n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4,
            max_iters=6, eval_interval=3, eval_iters=2, warmup_iters=2,
        ),
        plain=PlainSampleConfig(steps=5, batch_size=8, conv_channels=(2, 4), hidden=8, eval_batch_size=16),
        hf=HFSampleConfig(
            corpus_chars=3_000, n_layer=1, n_head=2, n_embd=16, n_positions=16, batch_size=4,
            max_steps=4, logging_steps=2,
        ),
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# reproducibility


@contextlib.contextmanager
def deterministic_torch() -> Iterator[None]:
    """One thread and deterministic kernels inside the block; the caller's settings after it.

    A single thread fixes the order of floating-point reductions, which otherwise depends on
    how work is split between cores.
    """
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


# ---------------------------------------------------------------------------------------------
# nanoGPT run


@dataclass(frozen=True)
class NanoGPTResult:
    curve: list[tuple[int, float, float]]  # (iter_num, train loss, val loss) at every evaluation
    n_params: int
    vocab_size: int
    train_tokens: int
    val_tokens: int
    decay_group_size: int
    no_decay_group_size: int


@torch.no_grad()
def _estimate_loss(
    model: nn.Module,
    splits: dict[str, np.ndarray],
    block_size: int,
    batch_size: int,
    eval_iters: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """nanoGPT's estimate_loss; the same windows at every evaluation, so the curve compares like with like."""
    model.eval()
    out = {}
    for split, data in splits.items():
        generator = _generator(seed)
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            x, y = get_batch(data, block_size, batch_size, generator)
            _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean()
    model.train()
    return out


def _nanogpt_run_config(cfg: NanoGPTSampleConfig) -> dict[str, Any]:
    """nanoGPT's ``config`` entry: every int/float/bool/str global of its train.py, in its order."""
    return {
        "out_dir": "out-sample",
        "eval_interval": cfg.eval_interval,
        "log_interval": 10,
        "eval_iters": cfg.eval_iters,
        "eval_only": False,
        "always_save_checkpoint": True,
        "init_from": "scratch",
        "wandb_log": False,
        "wandb_project": "adapprox-sample",
        "wandb_run_name": "nanogpt-char",
        "dataset": "adapprox_sample_char",
        "gradient_accumulation_steps": 1,
        "batch_size": cfg.batch_size,
        "block_size": cfg.block_size,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "dropout": 0.0,
        "bias": False,
        "learning_rate": cfg.learning_rate,
        "max_iters": cfg.max_iters,
        "weight_decay": cfg.weight_decay,
        "beta1": cfg.beta1,
        "beta2": cfg.beta2,
        "grad_clip": cfg.grad_clip,
        "decay_lr": True,
        "warmup_iters": cfg.warmup_iters,
        "lr_decay_iters": cfg.max_iters,
        "min_lr": cfg.min_lr,
        "backend": "nccl",
        "device": "cpu",
        "dtype": "float32",
        "compile": False,
    }


def make_nanogpt_sample(out_dir: Path, cfg: NanoGPTSampleConfig, seed: int) -> NanoGPTResult:
    """Write a nanoGPT data directory and the ``ckpt.pt`` of a run on it, as nanoGPT's train.py would."""
    text = generate_corpus(cfg.corpus_chars, seed)
    write_nanogpt_dataset(out_dir, text)
    data = read_nanogpt_dataset(out_dir, require_meta=True)  # train on what a reader of the files sees
    assert data.vocab is not None
    run_config = _nanogpt_run_config(cfg)
    model_args = {key: run_config[key] for key in ("n_layer", "n_head", "n_embd", "block_size", "bias")}
    model_args |= {"vocab_size": data.vocab.vocab_size, "dropout": run_config["dropout"]}
    model = gpt_from_model_args(model_args, generator=_generator(seed + 1))
    optimizer = torch.optim.AdamW(
        nanogpt_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2)
    )
    batch_generator = _generator(seed + 2)
    splits = {"train": data.train, "val": data.val}
    curve = []
    for iter_num in range(cfg.max_iters + 1):
        lr = nanogpt_learning_rate(iter_num, cfg.learning_rate, cfg.warmup_iters, cfg.max_iters, cfg.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            losses = _estimate_loss(model, splits, cfg.block_size, cfg.batch_size, cfg.eval_iters, seed + 3)
            curve.append((iter_num, losses["train"].item(), losses["val"].item()))
        if iter_num == cfg.max_iters:
            break  # nanoGPT saves at this evaluation, before any further step
        x, y = get_batch(data.train, cfg.block_size, cfg.batch_size, batch_generator)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "model_args": model_args,
        "iter_num": cfg.max_iters,
        "best_val_loss": losses["val"],  # a 0-d tensor, as nanoGPT stores it
        "config": run_config,
    }
    torch.save(checkpoint, out_dir / "ckpt.pt")
    return NanoGPTResult(
        curve=curve,
        n_params=model.get_num_params(),
        vocab_size=data.vocab.vocab_size,
        train_tokens=len(data.train),
        val_tokens=len(data.val),
        decay_group_size=len(optimizer.param_groups[0]["params"]),
        no_decay_group_size=len(optimizer.param_groups[1]["params"]),
    )


# ---------------------------------------------------------------------------------------------
# plain optimizer.state_dict() run

SHAPE_CLASSES = ("horizontal bar", "vertical bar", "diagonal", "box")


class ShapeClassifier(nn.Module):
    """Two conv layers (4-D weights) and two linear layers: different shapes from a transformer."""

    def __init__(self, cfg: PlainSampleConfig, generator: torch.Generator):
        super().__init__()
        c1, c2 = cfg.conv_channels
        self.conv1 = nn.Conv2d(1, c1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.hidden = nn.Linear(c2 * (cfg.image_size // 4) ** 2, cfg.hidden)
        self.classifier = nn.Linear(cfg.hidden, len(SHAPE_CLASSES))
        # torch's default init again, but drawn from the explicit generator.
        for module in (self.conv1, self.conv2, self.hidden, self.classifier):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(module.weight[0].numel())
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(images)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.classifier(F.relu(self.hidden(x.flatten(1))))


def shape_batch(
    batch_size: int, image_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy ``image_size``² images, each with one shape of a random class, size and place."""
    labels = torch.randint(len(SHAPE_CLASSES), (batch_size,), generator=generator)
    images = 0.3 * torch.randn(batch_size, 1, image_size, image_size, generator=generator)
    sizes = torch.randint(4, 8, (batch_size,), generator=generator).tolist()
    places = torch.rand(batch_size, 2, generator=generator).tolist()
    for i, (label, size, (u, v)) in enumerate(zip(labels.tolist(), sizes, places, strict=True)):
        row, col = int(u * (image_size - size + 1)), int(v * (image_size - size + 1))
        canvas = images[i, 0]
        if label == 0:
            canvas[row, col : col + size] += 1.0
        elif label == 1:
            canvas[row : row + size, col] += 1.0
        elif label == 2:
            canvas[torch.arange(row, row + size), torch.arange(col, col + size)] += 1.0
        else:
            box = torch.zeros(size, size)
            box[[0, -1], :] = 1.0
            box[:, [0, -1]] = 1.0
            canvas[row : row + size, col : col + size] += box
    return images, labels


@dataclass(frozen=True)
class PlainResult:
    final_loss: float  # mean training loss over the last 20 steps
    accuracy: float  # on a fresh batch the model never saw
    n_params: int


def make_plain_sample(out_dir: Path, cfg: PlainSampleConfig, seed: int) -> PlainResult:
    """Train the shape classifier with AdamW and save only ``optimizer.state_dict()``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = ShapeClassifier(cfg, _generator(seed))
    # named_parameters() (torch >= 2.6) makes the state dict carry param_names.
    optimizer = torch.optim.AdamW(
        model.named_parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    batch_generator = _generator(seed + 1)
    recent_losses: list[float] = []
    for _ in range(cfg.steps):
        images, labels = shape_batch(cfg.batch_size, cfg.image_size, batch_generator)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent_losses = [*recent_losses[-19:], loss.item()]
    torch.save(optimizer.state_dict(), out_dir / "optimizer.pt")
    with torch.no_grad():
        images, labels = shape_batch(cfg.eval_batch_size, cfg.image_size, _generator(seed + 2))
        accuracy = (model(images).argmax(dim=1) == labels).float().mean().item()
    return PlainResult(
        final_loss=sum(recent_losses) / len(recent_losses),
        accuracy=accuracy,
        n_params=sum(p.numel() for p in model.parameters()),
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face Trainer run: a GPT-2 with transformers' module names, kept apart from the
# package's nanoGPT model on purpose (different layout, Conv1D weights, tanh GELU).


class Conv1D(nn.Module):
    """transformers' Conv1D: a Linear whose weight is stored (in_features, out_features)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.nf)


class HFGPT2Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.c_attn = Conv1D(3 * n_embd, n_embd)
        self.c_proj = Conv1D(n_embd, n_embd)
        self.n_head = n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class HFGPT2MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = Conv1D(4 * n_embd, n_embd)
        self.c_proj = Conv1D(n_embd, 4 * n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class HFGPT2Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
        self.attn = HFGPT2Attention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
        self.mlp = HFGPT2MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class HFGPT2LMHeadModel(nn.Module):
    """``GPT2LMHeadModel``'s parameter names, order and initialisation, without transformers."""

    def __init__(self, cfg: HFSampleConfig, vocab_size: int, generator: torch.Generator):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.n_positions, cfg.n_embd),
                h=nn.ModuleList([HFGPT2Block(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer)]),
                ln_f=nn.LayerNorm(cfg.n_embd, eps=1e-5),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tie_word_embeddings=True
        for name, parameter in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled residual init
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * cfg.n_layer), generator=generator)
            elif name.endswith("weight") and parameter.dim() >= 2:
                nn.init.normal_(parameter, std=0.02, generator=generator)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The causal-LM loss with transformers' label shift (labels may equal input_ids)."""
        positions = torch.arange(input_ids.size(1))
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))


# transformers' Trainer.get_decay_parameter_names (>= 4.49): no decay for biases, norm weights.
HF_NO_DECAY_NAME_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def hf_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names the current Trainer decays: not in an ``nn.LayerNorm``, no no-decay name pattern."""
    in_layernorm = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, nn.LayerNorm)
        for name, _ in module.named_parameters()
    }
    return {
        name
        for name, _ in model.named_parameters()
        if name not in in_layernorm and not any(re.search(p, name.lower()) for p in HF_NO_DECAY_NAME_PATTERNS)
    }


def hf_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainer.create_optimizer's two groups, both in ``named_parameters()`` order."""
    decay = hf_decay_parameter_names(model)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for name, p in named if name in decay], "weight_decay": weight_decay},
        {"params": [p for name, p in named if name not in decay], "weight_decay": 0.0},
    ]


def _linear_schedule_with_warmup(
    current_step: int, *, num_warmup_steps: int, num_training_steps: int
) -> float:
    """transformers' get_linear_schedule_with_warmup multiplier."""
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    return max(
        0.0, float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps))
    )


def _gpt2_config_json(cfg: HFSampleConfig, vocab_size: int) -> dict[str, Any]:
    return {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.0,
        "bos_token_id": None,
        "dtype": "float32",
        "embd_pdrop": 0.0,
        "eos_token_id": None,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_embd": cfg.n_embd,
        "n_head": cfg.n_head,
        "n_inner": None,
        "n_layer": cfg.n_layer,
        "n_positions": cfg.n_positions,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.0,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    # transformers writes both config.json and trainer_state.json this way.
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class HFResult:
    checkpoint_dir: str
    log_history: list[dict[str, Any]]
    n_params: int
    vocab_size: int
    decay_group_size: int
    no_decay_group_size: int


def make_hf_sample(out_dir: Path, cfg: HFSampleConfig, seed: int) -> HFResult:
    """Train the tiny GPT-2 as Trainer does and write its ``checkpoint-<max_steps>/`` files."""
    from safetensors.torch import save_file

    text = generate_corpus(cfg.corpus_chars, seed)
    vocab = CharVocab.from_text(text)
    ids = torch.tensor(vocab.encode(text))
    # transformers' run_clm "group_texts": cut the token stream into whole blocks.
    blocks = ids[: len(ids) // cfg.n_positions * cfg.n_positions].view(-1, cfg.n_positions)
    steps_per_epoch = math.ceil(len(blocks) / cfg.batch_size)

    model = HFGPT2LMHeadModel(cfg, vocab.vocab_size, _generator(seed + 1))
    groups = hf_param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, fused=True
    )  # Trainer's default optim is "adamw_torch_fused" (torch >= 2.8), which also runs on CPU
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(_linear_schedule_with_warmup, num_warmup_steps=0, num_training_steps=cfg.max_steps)
    )
    sampler_generator = _generator(seed + 2)
    log_history: list[dict[str, Any]] = []
    loss_since_log, total_flos = 0.0, 0.0
    non_embedding_params = sum(
        p.numel() for n, p in model.named_parameters() if not n.endswith(("wte.weight", "wpe.weight"))
    )
    global_step = 0
    while global_step < cfg.max_steps:
        order = torch.randperm(len(blocks), generator=sampler_generator)  # a RandomSampler epoch
        for batch_indices in order.split(cfg.batch_size):
            input_ids = blocks[batch_indices]
            loss = model(input_ids, labels=input_ids)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            loss_since_log += loss.item()
            total_flos += 6.0 * input_ids.numel() * non_embedding_params
            if global_step % cfg.logging_steps == 0:
                log_history.append(
                    {
                        "epoch": global_step / steps_per_epoch,
                        "grad_norm": grad_norm.item(),
                        "learning_rate": scheduler.get_last_lr()[0],
                        "loss": round(loss_since_log / cfg.logging_steps, 4),
                        "step": global_step,
                    }
                )
                loss_since_log = 0.0
            if global_step == cfg.max_steps:
                break

    checkpoint_dir = out_dir / f"checkpoint-{cfg.max_steps}"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage, so the tied lm_head.weight is dropped, as transformers does.
    weights = {name: t.contiguous() for name, t in model.state_dict().items() if name != "lm_head.weight"}
    save_file(weights, checkpoint_dir / "model.safetensors", metadata={"format": "pt"})
    _write_json(checkpoint_dir / "config.json", _gpt2_config_json(cfg, vocab.vocab_size))
    torch.save(optimizer.state_dict(), checkpoint_dir / "optimizer.pt")
    torch.save(scheduler.state_dict(), checkpoint_dir / "scheduler.pt")
    trainer_state = {
        "best_global_step": None,
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": global_step / steps_per_epoch,
        "eval_steps": 500,
        "global_step": global_step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": log_history,
        "logging_steps": cfg.logging_steps,
        "max_steps": cfg.max_steps,
        "num_input_tokens_seen": 0,
        "num_train_epochs": math.ceil(cfg.max_steps / steps_per_epoch),
        "save_steps": cfg.max_steps,
        "stateful_callbacks": {
            "TrainerControl": {
                "args": {
                    "should_epoch_stop": False,
                    "should_evaluate": False,
                    "should_log": False,
                    "should_save": True,
                    "should_training_stop": True,
                },
                "attributes": {},
            }
        },
        "total_flos": total_flos,
        "train_batch_size": cfg.batch_size,
        "trial_name": None,
        "trial_params": None,
    }
    _write_json(checkpoint_dir / "trainer_state.json", trainer_state)
    return HFResult(
        checkpoint_dir=checkpoint_dir.name,
        log_history=log_history,
        n_params=sum(p.numel() for p in model.parameters()),
        vocab_size=vocab.vocab_size,
        decay_group_size=len(groups[0]["params"]),
        no_decay_group_size=len(groups[1]["params"]),
    )


# ---------------------------------------------------------------------------------------------
# the whole folder


@dataclass(frozen=True)
class SampleReport:
    config: SampleConfig
    nanogpt: NanoGPTResult
    plain: PlainResult
    hf: HFResult
    file_sizes: dict[str, int]  # relative path -> bytes, for every file but README and SHA256SUMS


def make_sample_states(out_dir: str | Path, config: SampleConfig | str = "full") -> SampleReport:
    """Write the sample folder into ``out_dir`` (new or empty), with README.md and SHA256SUMS."""
    config = SAMPLE_CONFIGS[config] if isinstance(config, str) else config
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"Refusing to write into {out_dir}: it is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = config.seed
    with deterministic_torch():
        # Separate seed ranges, so changing one run leaves the others' bytes alone.
        nanogpt = make_nanogpt_sample(out_dir / "nanogpt", config.nanogpt, seed)
        plain = make_plain_sample(out_dir / "plain", config.plain, seed + 100)
        hf = make_hf_sample(out_dir / "hf-trainer", config.hf, seed + 200)
    sizes = {path: (out_dir / path).stat().st_size for path in _relative_files(out_dir)}
    report = SampleReport(config=config, nanogpt=nanogpt, plain=plain, hf=hf, file_sizes=sizes)
    (out_dir / README_FILE).write_text(render_readme(report), encoding="utf-8")
    write_sha256sums(out_dir)
    return report


def _relative_files(root: Path) -> list[str]:
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and path.name != SHA256SUMS_FILE
    )


def sha256_of_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(root: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` for every file under ``root`` except SHA256SUMS itself."""
    root = Path(root)
    return {path: sha256_of_file(root / path) for path in _relative_files(root)}


def write_sha256sums(root: str | Path) -> None:
    """``sha256sum``-compatible listing, so ``cd sample_states && sha256sum -c SHA256SUMS`` works."""
    root = Path(root)
    lines = [f"{digest}  {path}\n" for path, digest in tree_sha256(root).items()]
    (root / SHA256SUMS_FILE).write_text("".join(lines), encoding="utf-8")


def read_sha256sums(path: str | Path) -> dict[str, str]:
    sums = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest
    return sums


def compare_trees(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Human-readable differences between two ``{path: sha256}`` maps (empty when equal)."""
    problems = [f"missing: {path}" for path in sorted(expected.keys() - actual.keys())]
    problems += [f"unexpected: {path}" for path in sorted(actual.keys() - expected.keys())]
    problems += [
        f"differs: {path}"
        for path in sorted(expected.keys() & actual.keys())
        if expected[path] != actual[path]
    ]
    return problems


# ---------------------------------------------------------------------------------------------
# README


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.2f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:.1f} kB"


def render_readme(report: SampleReport) -> str:
    config, nanogpt, plain, hf = report.config, report.nanogpt, report.plain, report.hf
    command = REGENERATE_COMMAND + ("" if config.name == "full" else f" --size {config.name}")
    ng, pc, hc = config.nanogpt, config.plain, config.hf
    curve = "\n".join(f"| {it} | {train:.4f} | {val:.4f} |" for it, train, val in nanogpt.curve)
    hf_curve = "\n".join(f"| {entry['step']} | {entry['loss']:.4f} |" for entry in hf.log_history)
    files = "\n".join(f"| `{path}` | {size:,} |" for path, size in report.file_sizes.items())
    total = sum(report.file_sizes.values())
    return f"""# Sample optimizer states

Small, real AdamW checkpoints in three common layouts, for trying `adapprox` without any download.
Every file is generated by this repository (configuration `{config.name}`, seed {config.seed}) and
regenerates bit-identically with the same torch build on the same kind of CPU:

    {command}            # rewrite this folder
    {command} --check    # regenerate into a temporary folder and compare with SHA256SUMS

Training runs in float32 on one CPU thread with deterministic algorithms. The text and the images
are generated by this repository's code (`adapprox_cli.train.corpus`, `scripts/sample_builder.py`).

## `nanogpt/`: a nanoGPT character-level run

- `ckpt.pt`: nanoGPT's exact layout, loadable with `torch.load(..., weights_only=True)`:
  - `model`: the state dict (tied `lm_head.weight` shares storage with `transformer.wte.weight`);
  - `optimizer`: AdamW with nanoGPT's two groups, the {nanogpt.decay_group_size} tensors of >= 2 dims
    (weight decay {ng.weight_decay}) then the {nanogpt.no_decay_group_size} LayerNorm weights (no decay);
  - `model_args`, `iter_num` ({ng.max_iters}), `best_val_loss` (a 0-d tensor), `config`.
- `train.bin`, `val.bin` (uint16 token ids) and `meta.pkl` (`vocab_size`, `itos`, `stoi`): the data
  it was trained on, so training can resume from this folder.
- model: n_layer={ng.n_layer}, n_head={ng.n_head}, n_embd={ng.n_embd}, block_size={ng.block_size}, \
vocab_size={nanogpt.vocab_size}, bias=False, dropout=0.0; {nanogpt.n_params:,} parameters.
- data: {ng.corpus_chars:,} generated characters, split 90/10 into {nanogpt.train_tokens:,} train \
and {nanogpt.val_tokens:,} val tokens.
- training: {ng.max_iters} iterations of batch {ng.batch_size}; AdamW betas ({ng.beta1}, {ng.beta2}); \
lr {ng.learning_rate}, {ng.warmup_iters} warmup iterations, cosine decay to {ng.min_lr}; grad clip {ng.grad_clip}.
- losses (mean of {ng.eval_iters} batches; an untrained model scores ln {nanogpt.vocab_size} = \
{math.log(nanogpt.vocab_size):.4f}):

| iter | train loss | val loss |
|---|---|---|
{curve}

## `plain/optimizer.pt`: a bare `torch.save(optimizer.state_dict())`

- AdamW (lr {pc.learning_rate}, weight decay {pc.weight_decay}, one group) built from \
`model.named_parameters()`, so the group carries `param_names`.
- model: a small conv net, `conv1` and `conv2` (4-D weights), `hidden`, `classifier` \
with {plain.n_params:,} parameters.
- task: tell {len(SHAPE_CLASSES)} kinds of shapes ({", ".join(SHAPE_CLASSES)}) apart in noisy \
{pc.image_size}x{pc.image_size} images; {pc.steps} steps of batch {pc.batch_size}.
- final training loss {plain.final_loss:.4f} (mean of the last {min(20, pc.steps)} steps); accuracy {plain.accuracy:.3f} \
on {pc.eval_batch_size} unseen images.

## `hf-trainer/{hf.checkpoint_dir}/`: a Hugging Face Trainer checkpoint

The files Trainer writes at a save step, for a tiny `GPT2LMHeadModel` (made without transformers):

- `config.json`: the GPT-2 config;
- `model.safetensors`: keys in alphabetical order, Conv1D weights stored (in, out), the tied
  `lm_head.weight` dropped;
- `optimizer.pt`: AdamW with `fused=True` (Trainer's default `adamw_torch_fused`) and the current
  Trainer groups: {hf.decay_group_size} tensors with weight decay {hc.weight_decay}, then \
{hf.no_decay_group_size} biases and LayerNorm weights without, each in `named_parameters()` order;
- `scheduler.pt`: the LambdaLR state of a linear decay to 0;
- `trainer_state.json`: global step, log history, etc.
- `training_args.bin` and `rng_state.pth` are left out: the first needs transformers' classes to load.
- model: n_layer={hc.n_layer}, n_head={hc.n_head}, n_embd={hc.n_embd}, n_positions={hc.n_positions}, \
vocab_size={hf.vocab_size} (one id per character); {hf.n_params:,} parameters.
- training: {hc.max_steps} steps of batch {hc.batch_size} on {hc.corpus_chars:,} generated characters; \
lr {hc.learning_rate}, betas ({hc.adam_beta1}, {hc.adam_beta2}).

| step | training loss (mean since the previous log) |
|---|---|
{hf_curve}

## Files

| file | bytes |
|---|---|
{files}

Total {_size(total)}, plus this README and `SHA256SUMS`.
"""
