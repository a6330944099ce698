"""Mapping flat optimizer indices to parameter names.

An optimizer state dict numbers parameters 0..N-1 in the order they were handed to the
optimizer, split into groups. Names come, in this order of preference, from (1) the file itself
(``param_names``, FQN keys, DeepSpeed ``param_shapes``), (2) the model's parameter order plus the
grouping rule the training code used (nanoGPT's dim rule, Hugging Face's current and old decay
rules, one group), each chosen only if the group sizes agree and EVERY state shape equals the
parameter shape at that position. Several rules that fit but disagree mean the file does not tell
which is right: then, as when nothing fits, parameters get anonymous names ``param_{i}`` and the
checkpoint a warning. A wrong name is worse than no name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from adapprox_cli.checkpoints.core import FACTOR_KEYS, SECOND_MOMENT_KEY, anonymous_name, matrix_view_shape
from adapprox_cli.errors import UnsupportedStateError
from adapprox_cli.formatting import natural_key

# Wrapper prefixes added by torch.compile, DDP, Lightning < 2.1, FSDP and activation checkpointing.
_WRAPPER_COMPONENTS = ("_orig_mod", "_forward_module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
# Buffers that appear in model state dicts but are not parameters.
_BUFFER_SUFFIXES = (
    "running_mean",
    "running_var",
    "num_batches_tracked",
    "masked_bias",
    "inv_freq",
    "position_ids",
)


@dataclass
class ModelParam:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None


@dataclass
class NameCandidate:
    source: str  # the names_source label if accepted
    names: list[str]
    shapes: list[tuple[int, ...]]
    group_sizes: list[int] | None = None  # sizes the rule implies; None: any split of the order
    note: str | None = None  # a warning to keep when this candidate is accepted
    dtypes: list[torch.dtype | None] | None = None


@dataclass
class StateEvidence:
    """What the optimizer state says about one parameter's shape."""

    exact: tuple[int, ...] | None = None  # from exp_avg_sq / exp_avg
    matrix: tuple[int, int] | None = None  # from Adapprox factors (m x k, n x k) only


@dataclass
class NameChoice:
    names: list[str]
    shapes: list[tuple[int, ...]]
    source: str
    warnings: list[str] = field(default_factory=list)
    dtypes: list[torch.dtype | None] | None = None


def normalize_name(name: str) -> str:
    """Strip wrapper prefixes: ``_orig_mod.``, ``_forward_module.``, FSDP/checkpoint wrappers, DDP ``module.``."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_COMPONENTS]
    if parts and parts[0] == "module" and len(parts) > 1:  # DDP wraps at the top only
        parts = parts[1:]
    return ".".join(parts)


def normalize_keys(model_state: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A model state dict with ``normalize_name`` applied to every key; None stays None."""
    if model_state is None:
        return None
    return {normalize_name(k): v for k, v in model_state.items()}


def evidence_of(state: Mapping[str, object]) -> StateEvidence:
    for key in (SECOND_MOMENT_KEY, "exp_avg"):
        t = state.get(key)
        if isinstance(t, torch.Tensor):
            return StateEvidence(exact=tuple(t.shape))
    q, u = (state.get(k) for k in FACTOR_KEYS)
    if isinstance(q, torch.Tensor) and isinstance(u, torch.Tensor):
        return StateEvidence(matrix=(int(q.shape[0]), int(u.shape[0])))
    return StateEvidence()


def model_params_from_state_dict(model_state: Mapping[str, torch.Tensor]) -> list[ModelParam]:
    """The model's parameters in ``named_parameters()`` order, recovered from its state dict.

    ``state_dict()`` keeps registration order but adds buffers and repeats tied weights;
    ``named_parameters()`` lists a tied tensor once, under its first name, and has no buffers.
    """
    seen_storage: set[tuple[int, int, tuple, tuple]] = set()
    params = []
    for raw_name, t in model_state.items():
        if not isinstance(t, torch.Tensor) or _is_buffer(raw_name, t.shape, t.dtype):
            continue
        if t.numel() > 0:
            # Tied weights share storage after torch.load, so the second name is a duplicate.
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if key in seen_storage:
                continue
            seen_storage.add(key)
        params.append(ModelParam(normalize_name(raw_name), tuple(t.shape), t.dtype))
    return params


def _is_buffer(name: str, shape: Iterable[int], dtype: torch.dtype | None) -> bool:
    shape = tuple(shape)
    if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        return True
    if name.endswith(_BUFFER_SUFFIXES):
        return True
    # The causal-mask buffer of GPT-style attention (nanoGPT on old torch, old GPT-2): (1, 1, T, T).
    return name.endswith("attn.bias") and len(shape) == 4


def refuse_flat_shards(
    model_names: Iterable[str], evidence: list[StateEvidence], params: list[ModelParam], source
) -> None:
    """FSDP1 ``use_orig_params=False`` states hold one flat 1-D shard per rank; they cannot be unflattened."""
    names = list(model_names)
    flat = [n for n in names if "_flat_param" in n or "flat_param" in n.split(".")[-1]]
    if flat:
        raise UnsupportedStateError(
            f"{source} is an FSDP flat-parameter shard ({flat[0]}); it cannot be unflattened without FSDP's "
            "metadata. Save the optimizer with FSDP.optim_state_dict(model, optim) or torch.distributed.checkpoint"
        )
    if not params:
        return
    numels = {_numel(p.shape) for p in params}
    for e in evidence:
        if e.exact is not None and len(e.exact) == 1 and e.exact[0] not in numels:
            raise UnsupportedStateError(
                f"{source} holds a 1-D optimizer state of {e.exact[0]} elements that matches no parameter of the "
                "model: an FSDP flat-parameter shard (use_orig_params=False). Save the optimizer with "
                "FSDP.optim_state_dict(model, optim) or torch.distributed.checkpoint"
            )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- candidates from a model's parameter order --------------------------------------------------


def model_order_candidate(params: list[ModelParam], note: str | None = None) -> NameCandidate:
    """The optimizer saw ``model.parameters()`` in order (one group, or groups that slice it)."""
    return NameCandidate(
        "single-group",
        [p.name for p in params],
        [p.shape for p in params],
        None,
        note,
        [p.dtype for p in params],
    )


def nanogpt_candidate(params: list[ModelParam], note: str | None = None) -> NameCandidate:
    """nanoGPT ``configure_optimizers``: group 0 = params with dim >= 2, group 1 = the rest, each in order."""
    decay = [p for p in params if len(p.shape) >= 2]
    rest = [p for p in params if len(p.shape) < 2]
    return _grouped("nanogpt-order", [decay, rest], note)


def hf_decay_candidates(params: list[ModelParam], note: str | None = None) -> list[NameCandidate]:
    """Trainer.create_optimizer: group 0 = decayed params, group 1 = the rest, in named_parameters order.

    Current rule (transformers >= 4.49): no decay for names matching bias/layernorm/rmsnorm/norm
    patterns or for params of nn.LayerNorm modules. Old rule: no decay for "bias" names or
    nn.LayerNorm params, so RMSNorm weights were decayed. Module types are not in the file; a
    module whose parameters are exactly a 1-D weight and a 1-D bias of one size is taken as a
    LayerNorm (a bias-free LayerNorm is then misread, and the shape check rejects the rule).
    """
    layernorm_modules = _layernorm_like_modules(params)

    def in_layernorm(name: str) -> bool:
        return name.rpartition(".")[0] in layernorm_modules

    current = [p for p in params if not (_HF_NO_DECAY.search(p.name.lower()) or in_layernorm(p.name))]
    old = [p for p in params if not ("bias" in p.name or in_layernorm(p.name))]
    out = []
    for source, decay in (("hf-decay-rule", current), ("hf-decay-rule-old", old)):
        decay_names = {p.name for p in decay}
        out.append(_grouped(source, [decay, [p for p in params if p.name not in decay_names]], note))
    return out


_HF_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def window_candidates(params: list[ModelParam], count: int, note: str | None = None) -> list[NameCandidate]:
    """Contiguous slices of the model order, for one of several optimizers over part of a model."""
    if count >= len(params) or count == 0:
        return []
    return [model_order_candidate(params[i : i + count], note) for i in range(len(params) - count + 1)]


def _grouped(source: str, groups: list[list[ModelParam]], note: str | None) -> NameCandidate:
    flat = [p for g in groups for p in g]
    return NameCandidate(
        source,
        [p.name for p in flat],
        [p.shape for p in flat],
        [len(g) for g in groups],
        note,
        [p.dtype for p in flat],
    )


def _layernorm_like_modules(params: list[ModelParam]) -> set[str]:
    by_module: dict[str, dict[str, tuple[int, ...]]] = {}
    for p in params:
        module, _, leaf = p.name.rpartition(".")
        by_module.setdefault(module, {})[leaf] = p.shape
    return {
        m
        for m, leaves in by_module.items()
        if set(leaves) == {"weight", "bias"}
        and len(leaves["weight"]) == 1
        and leaves["weight"] == leaves["bias"]
    }


# --- recovering named_parameters() order from alphabetical safetensors keys --------------------

# Registration order of submodules in transformers' modelling code, per model_type. Only the
# relative order of siblings matters; unknown components sort after known ones, naturally.
_REGISTRATION_ORDER: dict[str, list[str]] = {
    "gpt2": [
        "transformer",
        "wte",
        "wpe",
        "h",
        "ln_1",
        "attn",
        "c_attn",
        "q_attn",
        "ln_2",
        "crossattention",
        "ln_cross_attn",
        "mlp",
        "c_fc",
        "c_proj",
        "ln_f",
        "lm_head",
        "score",
    ],
    "llama": [
        "model",
        "embed_tokens",
        "layers",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "q_norm",
        "k_norm",
        "mlp",
        "gate_proj",
        "up_proj",
        "down_proj",
        "input_layernorm",
        "post_attention_layernorm",
        "norm",
        "lm_head",
        "score",
    ],
}
for _alias in ("mistral", "qwen2", "qwen3"):
    _REGISTRATION_ORDER[_alias] = _REGISTRATION_ORDER["llama"]
_LEAF_ORDER = ["weight", "bias"]  # nn.Linear/LayerNorm/Conv1D register weight before bias


def _component_key(part: str, known: list[str]) -> tuple:
    if part.isdigit():
        return (0, int(part), ())
    rank = known.index(part) if part in known else len(known)
    return (1, rank, natural_key(part))


def order_names(names: Iterable[str], model_type: str | None = None) -> list[str]:
    """Sort state-dict keys into a guess of ``named_parameters()`` order.

    Component by component: numbers numerically (``h.2`` before ``h.10``), the registration order
    of ``model_type``'s modelling code when known, otherwise natural order, weight before bias.
    """
    known = _REGISTRATION_ORDER.get(model_type or "", [])

    def key(name: str) -> tuple:
        parts = name.split(".")
        body = tuple(_component_key(p, known) for p in parts[:-1])
        return (*body, _component_key(parts[-1], known + _LEAF_ORDER))

    return sorted(names, key=key)


def has_registration_order(model_type: str | None) -> bool:
    return (model_type or "") in _REGISTRATION_ORDER


def reorder(params: list[ModelParam], order: list[str]) -> list[ModelParam]:
    by_name = {p.name: p for p in params}
    return [by_name[n] for n in order]


# --- choosing -------------------------------------------------------------------------------------


def _nonzero(sizes: Iterable[int]) -> list[int]:
    return [s for s in sizes if s]


def rejection_reason(c: NameCandidate, evidence: list[StateEvidence], group_sizes: list[int]) -> str | None:
    """Why a candidate does not fit the optimizer state, or None when every check passes."""
    if len(c.names) != len(evidence):
        return f"{c.source}: {len(c.names)} names for {len(evidence)} optimizer entries"
    if c.group_sizes is not None and _nonzero(c.group_sizes) != _nonzero(group_sizes):
        return f"{c.source}: group sizes {c.group_sizes} differ from the file's {group_sizes}"
    for i, (e, shape) in enumerate(zip(evidence, c.shapes, strict=True)):
        if e.exact is not None and tuple(e.exact) != tuple(shape):
            return f"{c.source}: entry {i} has shape {list(e.exact)} but {c.names[i]} is {list(shape)}"
        if e.exact is None and e.matrix is not None and matrix_view_shape(shape) != e.matrix:
            return f"{c.source}: entry {i} has factors for {list(e.matrix)} but {c.names[i]} is {list(shape)}"
    return None


def choose_names(
    tiers: list[list[NameCandidate]], evidence: list[StateEvidence], group_sizes: list[int]
) -> NameChoice:
    """The first tier with fitting candidates decides; fitting candidates that disagree give no names."""
    reasons: list[str] = []
    for tier in tiers:
        fitting = []
        for c in tier:
            reason = rejection_reason(c, evidence, group_sizes)
            if reason is None:
                fitting.append(c)
            else:
                reasons.append(reason)
        if not fitting:
            continue
        distinct = {tuple(c.names) for c in fitting}
        if len(distinct) > 1:
            rules = sorted({c.source for c in fitting})
            return anonymous_choice(
                evidence,
                f"{len(distinct)} different name orders fit every shape ({', '.join(rules)}); parameters are "
                "left anonymous rather than possibly misnamed",
            )
        chosen = fitting[0]
        warnings = [chosen.note] if chosen.note else []
        if all(e.exact is None and e.matrix is None for e in evidence):
            warnings.append(
                "no parameter has optimizer state yet, so the names could not be checked against shapes"
            )
        return NameChoice(
            list(chosen.names), [tuple(s) for s in chosen.shapes], chosen.source, warnings, chosen.dtypes
        )
    if not any(tiers):
        return anonymous_choice(
            evidence, "the file carries no parameter names and no model to take them from"
        )
    shown = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
    return anonymous_choice(evidence, f"no naming rule fits the optimizer state ({shown})")


def anonymous_choice(evidence: list[StateEvidence], why: str) -> NameChoice:
    shapes = [e.exact if e.exact is not None else (e.matrix or ()) for e in evidence]
    return NameChoice(
        [anonymous_name(i) for i in range(len(evidence))],
        [tuple(s) for s in shapes],
        "anonymous",
        [f"parameter names unknown: {why}"],
    )
