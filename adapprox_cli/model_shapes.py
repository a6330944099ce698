"""Parameter names and shapes of a Hugging Face causal language model, read from its config.json.

Planning a run before it exists needs the shapes, not the weights: `estimate --config` sizes the
optimizer state of any model a config describes. The shapes follow what transformers builds for
`AutoModelForCausalLM.from_config(config)` (checked against it in tests/test_model_shapes.py):
names and order as `model.named_parameters()` yields them, with a tied `lm_head` left out as torch
leaves it out. Pure: a dict in, a list out; transformers itself is not needed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapprox_cli.errors import InputError

__all__ = ["SUPPORTED_MODEL_TYPES", "config_named_shapes", "load_config"]

Shape = tuple[int, ...]
NamedShapes = list[tuple[str, Shape]]


def _gpt2(c: dict[str, Any]) -> NamedShapes:
    d, inner = c["n_embd"], c.get("n_inner") or 4 * c["n_embd"]
    out: NamedShapes = [
        ("transformer.wte.weight", (c["vocab_size"], d)),
        ("transformer.wpe.weight", (c["n_positions"], d)),
    ]
    for i in range(c["n_layer"]):
        p = f"transformer.h.{i}."
        # GPT-2's Conv1D stores weights as (in, out), the transpose of nn.Linear.
        out += [
            (p + "ln_1.weight", (d,)),
            (p + "ln_1.bias", (d,)),
            (p + "attn.c_attn.weight", (d, 3 * d)),
            (p + "attn.c_attn.bias", (3 * d,)),
            (p + "attn.c_proj.weight", (d, d)),
            (p + "attn.c_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)),
            (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (d, inner)),
            (p + "mlp.c_fc.bias", (inner,)),
            (p + "mlp.c_proj.weight", (inner, d)),
            (p + "mlp.c_proj.bias", (d,)),
        ]
    out += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    if not c.get("tie_word_embeddings", True):
        out.append(("lm_head.weight", (c["vocab_size"], d)))
    return out


def _llama_family(c: dict[str, Any]) -> NamedShapes:
    """LLaMA, Mistral, Qwen2 and Qwen3: grouped-query attention, gated MLP, RMSNorm."""
    kind = c["model_type"]
    d, heads = c["hidden_size"], c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or d // heads
    inner, vocab = c["intermediate_size"], c["vocab_size"]
    # Qwen2 always has q/k/v biases; LLaMA and Qwen3 only with attention_bias; Mistral never.
    qkv_bias = kind == "qwen2" or (kind in ("llama", "qwen3") and c.get("attention_bias", False))
    out_bias = kind in ("llama", "qwen3") and c.get("attention_bias", False)
    mlp_bias = kind == "llama" and c.get("mlp_bias", False)
    out: NamedShapes = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj, rows in (
            ("q_proj", heads * head_dim),
            ("k_proj", kv_heads * head_dim),
            ("v_proj", kv_heads * head_dim),
        ):
            out.append((p + f"self_attn.{proj}.weight", (rows, d)))
            if qkv_bias:
                out.append((p + f"self_attn.{proj}.bias", (rows,)))
        out.append((p + "self_attn.o_proj.weight", (d, heads * head_dim)))
        if out_bias:
            out.append((p + "self_attn.o_proj.bias", (d,)))
        if kind == "qwen3":
            out += [
                (p + "self_attn.q_norm.weight", (head_dim,)),
                (p + "self_attn.k_norm.weight", (head_dim,)),
            ]
        for proj, shape in (("gate_proj", (inner, d)), ("up_proj", (inner, d)), ("down_proj", (d, inner))):
            out.append((p + f"mlp.{proj}.weight", shape))
            if mlp_bias:
                out.append((p + f"mlp.{proj}.bias", (shape[0],)))
        out += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,))]
    out.append(("model.norm.weight", (d,)))
    if not c.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (vocab, d)))
    return out


def _gpt_neox(c: dict[str, Any]) -> NamedShapes:
    d, inner, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    bias = c.get("attention_bias", True)
    out: NamedShapes = [("gpt_neox.embed_in.weight", (vocab, d))]
    for i in range(c["num_hidden_layers"]):
        p = f"gpt_neox.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (d,)),
            (p + "input_layernorm.bias", (d,)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "post_attention_layernorm.bias", (d,)),
            (p + "attention.query_key_value.weight", (3 * d, d)),
        ]
        out += [(p + "attention.query_key_value.bias", (3 * d,))] if bias else []
        out += [(p + "attention.dense.weight", (d, d))]
        out += [(p + "attention.dense.bias", (d,))] if bias else []
        out += [
            (p + "mlp.dense_h_to_4h.weight", (inner, d)),
            (p + "mlp.dense_h_to_4h.bias", (inner,)),
            (p + "mlp.dense_4h_to_h.weight", (d, inner)),
            (p + "mlp.dense_4h_to_h.bias", (d,)),
        ]
    out += [("gpt_neox.final_layer_norm.weight", (d,)), ("gpt_neox.final_layer_norm.bias", (d,))]
    if not c.get("tie_word_embeddings", False):
        # transformers 5 names the output layer lm_head; checkpoints from 4.x call it embed_out.
        out.append(("lm_head.weight", (vocab, d)))
    return out


_FAMILIES: dict[str, Callable[[dict[str, Any]], NamedShapes]] = {
    "gpt2": _gpt2,
    "llama": _llama_family,
    "mistral": _llama_family,
    "qwen2": _llama_family,
    "qwen3": _llama_family,
    "gpt_neox": _gpt_neox,
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)
# Keys each family needs; a config without one is refused by name rather than failing mid-way.
_REQUIRED = {
    "gpt2": ("n_embd", "n_layer", "n_positions", "vocab_size"),
    "gpt_neox": ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"),
}
_LLAMA_REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)
# Far beyond any published model, small enough that counting shapes never means real work.
_MAX_DIMENSION = 1 << 24
_MAX_LAYERS = 10_000


def config_named_shapes(config: dict[str, Any], source: str = "config") -> NamedShapes:
    """(name, shape) of every parameter of the causal LM that ``config`` describes."""
    kind = config.get("model_type")
    if kind not in _FAMILIES:
        raise InputError(
            f"{source}: model_type {kind!r} is not one this tool knows the shapes of; "
            f"known: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    for key in _REQUIRED.get(kind, _LLAMA_REQUIRED):
        value = config.get(key)
        limit = _MAX_LAYERS if "layer" in key else _MAX_DIMENSION
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
            raise InputError(f"{source}: {key} must be a positive integer up to {limit}, got {value!r}")
    return _FAMILIES[kind](config)


def load_config(path: str | Path) -> dict[str, Any]:
    """A config.json (or the directory holding one) as a dict, with errors that name the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        with path.open(encoding="utf-8") as handle:
            config = json.load(handle)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; pass a Hugging Face config.json or its directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise InputError(f"{path}: not a readable JSON config ({type(error).__name__})") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: a config.json holds a JSON object, this holds {type(config).__name__}")
    return config
