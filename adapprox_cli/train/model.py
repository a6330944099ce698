"""A small GPT with nanoGPT's module names, so a nanoGPT ``ckpt.pt`` loads straight into it.

The layout follows karpathy/nanoGPT ``model.py`` (pre-LayerNorm blocks, a tied LM head, GELU
MLP, learned positions) and keeps its parameter names, ``model_args`` keys and initialisation,
because the optimizer state of a nanoGPT checkpoint is indexed by exactly this parameter order
(see ``nanogpt_param_groups``). Attention always goes through ``F.scaled_dot_product_attention``
(nanoGPT's "flash" path), so there is no ``attn.bias`` mask buffer; checkpoints written by old
torch versions carry one, and ``model_state_from_checkpoint`` drops it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F

from adapprox_cli.errors import InputError
from adapprox_cli.formatting import format_shape

# The keys and order of nanoGPT's train.py ``model_args`` dict, saved in every ckpt.pt.
MODEL_ARGS_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
# torch.compile wraps the model; its state-dict keys then start with this prefix.
COMPILE_PREFIX = "_orig_mod."


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64, as in nanoGPT
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms; False is a bit better and faster

    def model_args(self) -> dict[str, Any]:
        """The ``model_args`` dict nanoGPT stores in ``ckpt.pt``, in its key order."""
        values = asdict(self)
        return {key: values[key] for key in MODEL_ARGS_KEYS}


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (``nn.LayerNorm`` has no ``bias=False`` in older torch)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # batch, sequence length, embedding dimension
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs): heads become a batch dimension
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, generator: torch.Generator | None = None):
        """Build and initialise the model; ``generator`` makes the initial weights reproducible."""
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the token embedding and the output projection are one tensor. Registered
        # first as wte, so named_parameters() lists it once, as transformer.wte.weight, while
        # state_dict() holds it under both names (as nanoGPT's checkpoints do).
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(lambda module: _init_weights(module, generator))
        # GPT-2's scaled init of the residual projections: the residual stream sums 2 per layer.
        for name, parameter in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(
                    parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer), generator=generator
                )

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position embeddings are left out by default, as in nanoGPT.

        The token embeddings are counted because they are tied to the LM head weights.
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(logits, loss)``.

        With ``targets`` the logits cover every position and the loss is the mean cross-entropy.
        Without, as in nanoGPT, only the last position's logits are computed (all that sampling
        needs) and the loss is None.
        """
        device = idx.device
        t = idx.size(1)
        if t > self.config.block_size:
            raise ValueError(
                f"Cannot forward a sequence of length {t}, block size is only {self.config.block_size}"
            )
        pos = torch.arange(0, t, dtype=torch.long, device=device)

        tok_emb = self.transformer.wte(idx)  # (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)

        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # a list index keeps the time dimension
            loss = None
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend ``idx`` (b, t) by ``max_new_tokens`` sampled tokens. Call ``model.eval()`` first."""
        for _ in range(max_new_tokens):
            # Crop the context to the last block_size tokens: positions beyond have no embedding.
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size :]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def _init_weights(module: nn.Module, generator: torch.Generator | None) -> None:
    # nanoGPT's init: N(0, 0.02) for every Linear and Embedding weight, zero biases.
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02, generator=generator)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02, generator=generator)


def gpt_config_from_model_args(model_args: Mapping[str, Any], source: str = "the checkpoint") -> GPTConfig:
    """Validate a nanoGPT ``model_args`` dict and turn it into a ``GPTConfig``.

    Unknown extra keys are ignored (forks add their own); a missing key or a value that cannot
    build a model is an ``InputError`` naming ``source``.
    """
    missing = [key for key in MODEL_ARGS_KEYS if key not in model_args]
    if missing:
        raise InputError(
            f"{source}: model_args lacks {', '.join(missing)} (has: {', '.join(map(str, model_args)) or 'nothing'}); "
            f"a nanoGPT checkpoint stores {', '.join(MODEL_ARGS_KEYS)}"
        )
    types = {f.name: f.type for f in fields(GPTConfig)}
    values: dict[str, Any] = {}
    for key in MODEL_ARGS_KEYS:
        value = model_args[key]
        expected = {"int": int, "float": (int, float), "bool": bool}[types[key]]
        if (isinstance(value, bool) and types[key] != "bool") or not isinstance(value, expected):
            raise InputError(f"{source}: model_args[{key!r}] is {value!r}; expected a {types[key]}")
        values[key] = value
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        if values[key] < 1:
            raise InputError(f"{source}: model_args[{key!r}] is {values[key]}; it must be at least 1")
    if values["n_embd"] % values["n_head"]:
        raise InputError(
            f"{source}: model_args n_embd={values['n_embd']} is not divisible by n_head={values['n_head']}"
        )
    return GPTConfig(**values)


def gpt_from_model_args(
    model_args: Mapping[str, Any], generator: torch.Generator | None = None, source: str = "the checkpoint"
) -> GPT:
    """A freshly initialised ``GPT`` of the shape a nanoGPT ``model_args`` dict describes."""
    return GPT(gpt_config_from_model_args(model_args, source), generator=generator)


def strip_compile_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop torch.compile's ``_orig_mod.`` prefix, as nanoGPT's own resume code does."""
    return {
        (key[len(COMPILE_PREFIX) :] if key.startswith(COMPILE_PREFIX) else key): value
        for key, value in state_dict.items()
    }


def model_state_from_checkpoint(
    checkpoint: Mapping[str, Any], source: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """The ``model`` state dict of a nanoGPT checkpoint dict, ready for ``GPT.load_state_dict``.

    Removes the compile prefix and the causal-mask buffers (``*.attn.bias``, 4-D) that nanoGPT
    registers on torch versions without flash attention; this model computes the mask itself.
    """
    if "model" not in checkpoint or not isinstance(checkpoint["model"], Mapping):
        raise InputError(
            f"{source} has no 'model' state dict (keys: {', '.join(map(str, checkpoint))}); "
            "pass a nanoGPT ckpt.pt, which stores the weights under 'model'"
        )
    state = strip_compile_prefix(checkpoint["model"])
    return {
        key: value for key, value in state.items() if not (key.endswith(".attn.bias") and value.dim() == 4)
    }


def gpt_from_checkpoint(checkpoint: Mapping[str, Any], source: str = "the checkpoint") -> GPT:
    """Rebuild the ``GPT`` a nanoGPT checkpoint dict describes and load its weights."""
    if "model_args" not in checkpoint:
        raise InputError(
            f"{source} has no 'model_args' (keys: {', '.join(map(str, checkpoint))}); "
            "pass a nanoGPT ckpt.pt, which records the model shape there"
        )
    model = gpt_from_model_args(checkpoint["model_args"], source=source)
    state = model_state_from_checkpoint(checkpoint, source)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} {format_shape(state[key].shape)} vs {format_shape(expected[key].shape)}"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched))
            if items
        )
        raise InputError(
            f"{source}: the model weights do not fit a nanoGPT GPT built from its model_args ({details}); "
            "is this a nanoGPT checkpoint of an unmodified model.py?"
        )
    model.load_state_dict(state)
    return model


def nanogpt_param_groups(
    model: nn.Module, weight_decay: float, with_names: bool = False
) -> list[dict[str, Any]]:
    """nanoGPT's two AdamW groups: >=2-D tensors decayed, the rest (biases, norms) not.

    Both groups keep ``named_parameters()`` order, which fixes the optimizer-state indices:
    all >=2-D parameters first, then all <2-D ones. With ``with_names`` each entry is a
    ``(name, parameter)`` pair, so torch (>= 2.6) records ``param_names`` in the state dict;
    nanoGPT itself passes bare tensors.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decay = [(name, p) for name, p in named if p.dim() >= 2]
    no_decay = [(name, p) for name, p in named if p.dim() < 2]
    if not with_names:
        decay = [p for _, p in decay]
        no_decay = [p for _, p in no_decay]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def nanogpt_learning_rate(
    iteration: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float
) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to ``min_lr``, then ``min_lr``."""
    if iteration < warmup_iters:
        return learning_rate * (iteration + 1) / (warmup_iters + 1)
    if iteration >= lr_decay_iters:  # at == the cosine is at its end anyway; >= avoids 0/0
        return min_lr
    decay_ratio = (iteration - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # runs from 1 to 0
    return min_lr + coeff * (learning_rate - min_lr)
