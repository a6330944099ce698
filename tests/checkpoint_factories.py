"""Tiny generators of real checkpoint layouts, for tests.

Each ``make_*`` writes one checkpoint under a directory and returns a ``Truth``: the path, and the
names, shapes and state tensors the loader must recover, in optimizer order. The states come from
real ``torch.optim`` steps on small parameter sets named like the real models (nanoGPT, GPT-2 and
Qwen2 as Hugging Face names them); the containers reproduce the keys of each format without the
third-party libraries (DeepSpeed classes are pickled under their qualified names by stand-ins).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import math
import os
import pickle
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn


@dataclass
class Truth:
    path: Path
    names: list[str]  # in optimizer order
    shapes: list[tuple[int, ...]]
    states: list[dict[str, torch.Tensor]]  # clones of the optimizer state per flat index ({} if none)
    step: int | None = None
    group_sizes: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


# --- parameters and real optimizer steps -----------------------------------------------------------


def make_params(
    spec: list[tuple[str, tuple[int, ...]]], seed: int = 0, dtype=torch.float32
) -> dict[str, nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return {name: nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for name, shape in spec}


def run_steps(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter], steps: int = 3, seed: int = 1
) -> None:
    """A few steps with non-uniform gradients so exp_avg_sq has a real spread of values."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.rand(p.shape, generator=g).to(p.dtype) * 3 for p in params]
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sum(
            ((p.float() ** 2) * w.float()).sum() + (p.float() * w.float()).sum() ** 2 * 1e-3
            for p, w in zip(params, weights)
        )
        loss.backward()
        optimizer.step()


def states_in_order(optimizer: torch.optim.Optimizer) -> list[dict[str, torch.Tensor]]:
    sd = optimizer.state_dict()
    order = [i for g in sd["param_groups"] for i in g["params"]]
    return [{k: v.clone() for k, v in sd["state"].get(i, {}).items()} for i in order]


def adamw(groups, **kw) -> torch.optim.AdamW:
    kw.setdefault("lr", 1e-2)
    kw.setdefault("betas", (0.9, 0.99))
    kw.setdefault("foreach", False)
    return torch.optim.AdamW(groups, **kw)


# --- 1. plain torch.save(optimizer.state_dict()) and wrappers ---------------------------------------

MLP_SPEC = [
    ("0.weight", (16, 8)),
    ("0.bias", (16,)),
    ("1.weight", (16,)),
    ("1.bias", (16,)),
    ("2.weight", (4, 16)),
    ("2.bias", (4,)),
]


def make_plain(
    tmp: Path,
    *,
    wrapper: str | None = None,
    param_names: bool = False,
    sparse: bool = False,
    legacy: bool = False,
    dtype: torch.dtype = torch.float32,
    name: str = "optimizer.pt",
) -> Truth:
    """``wrapper``: None (bare state dict), "optimizer" or "optimizer_state_dict" (with model_state_dict)."""
    params = make_params(MLP_SPEC, dtype=dtype)
    groups = (
        [{"params": list(params.values()), "param_names": list(params)}]
        if param_names
        else list(params.values())
    )
    opt = adamw(groups, weight_decay=0.1)
    stepped = [params["2.weight"], params["2.bias"]] if sparse else list(params.values())
    run_steps(opt, stepped)
    sd = opt.state_dict()
    obj: object = sd
    if wrapper == "optimizer":
        obj = {"optimizer": sd, "epoch": 3}
    elif wrapper == "optimizer_state_dict":
        obj = {
            "epoch": 3,
            "model_state_dict": {k: p.detach() for k, p in params.items()},
            "optimizer_state_dict": sd,
            "loss": 0.5,
        }
    path = tmp / name
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return Truth(
        path, list(params), [tuple(p.shape) for p in params.values()], states_in_order(opt), 3, [len(params)]
    )


# --- 2. nanoGPT ckpt.pt ------------------------------------------------------------------------------


class TinyNanoGPT(nn.Module):
    """nanoGPT's parameter names and registration order; the forward only needs to make gradients."""

    def __init__(
        self, vocab: int = 11, block: int = 8, embd: int = 8, layers: int = 2, attn_bias_buffer: bool = True
    ):
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab, embd),
                "wpe": nn.Embedding(block, embd),
                "h": nn.ModuleList([_Block(embd, block, attn_bias_buffer) for _ in range(layers)]),
                "ln_f": nn.LayerNorm(embd),
            }
        )
        self.lm_head = nn.Linear(embd, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1])
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


class _Block(nn.Module):
    def __init__(self, embd: int, block: int, attn_bias_buffer: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(embd)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(embd, 3 * embd)
        self.attn.c_proj = nn.Linear(embd, embd)
        if attn_bias_buffer:  # older torch (no flash attention) registers the causal mask
            self.attn.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))
        self.ln_2 = nn.LayerNorm(embd)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(embd, 4 * embd)
        self.mlp.c_proj = nn.Linear(4 * embd, embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn.c_attn(self.ln_1(x)).chunk(3, dim=-1)
        x = x + self.attn.c_proj(torch.tanh(q * k) * v)
        return x + self.mlp.c_proj(torch.nn.functional.gelu(self.mlp.c_fc(self.ln_2(x))))


def make_nanogpt(
    tmp: Path, *, compiled: bool = False, attn_bias_buffer: bool = True, layers: int = 2
) -> Truth:
    torch.manual_seed(0)
    model = TinyNanoGPT(layers=layers, attn_bias_buffer=attn_bias_buffer)
    named = dict(model.named_parameters())
    decay = [n for n, p in named.items() if p.dim() >= 2]
    nodecay = [n for n, p in named.items() if p.dim() < 2]
    opt = adamw(
        [
            {"params": [named[n] for n in decay], "weight_decay": 0.1},
            {"params": [named[n] for n in nodecay], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    idx = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        opt.zero_grad()
        model(idx).square().mean().backward()
        opt.step()
    state = model.state_dict()
    if compiled:
        state = OrderedDict((f"_orig_mod.{k}", v) for k, v in state.items())
    ckpt = {
        "model": state,
        "optimizer": opt.state_dict(),
        "model_args": {
            "n_layer": layers,
            "n_head": 2,
            "n_embd": 8,
            "block_size": 8,
            "bias": True,
            "vocab_size": 11,
            "dropout": 0.0,
        },
        "iter_num": 3,
        "best_val_loss": torch.tensor(2.53),
        "config": {
            "learning_rate": 1e-3,
            "beta1": 0.9,
            "beta2": 0.99,
            "weight_decay": 0.1,
            "dtype": "float32",
            "compile": compiled,
        },
    }
    (tmp / "out").mkdir(exist_ok=True)
    path = tmp / "out" / "ckpt.pt"
    torch.save(ckpt, path)
    order = decay + nodecay
    return Truth(
        path,
        order,
        [tuple(named[n].shape) for n in order],
        states_in_order(opt),
        3,
        [len(decay), len(nodecay)],
    )


def make_nanogpt_meta(tmp: Path) -> Path:
    path = tmp / "meta.pkl"
    chars = sorted(set("hello world"))
    with open(path, "wb") as f:
        pickle.dump(
            {
                "vocab_size": len(chars),
                "itos": dict(enumerate(chars)),
                "stoi": {c: i for i, c in enumerate(chars)},
            },
            f,
        )
    return path


# --- 3. Hugging Face Trainer checkpoint-N/ -------------------------------------------------------------


def gpt2_spec(
    layers: int = 2, embd: int = 8, vocab: int = 13, positions: int = 6
) -> list[tuple[str, tuple[int, ...]]]:
    """GPT2LMHeadModel.named_parameters(): Conv1D weights are (in, out); lm_head is tied, so absent."""
    spec = [("transformer.wte.weight", (vocab, embd)), ("transformer.wpe.weight", (positions, embd))]
    for i in range(layers):
        h = f"transformer.h.{i}"
        spec += [
            (f"{h}.ln_1.weight", (embd,)), (f"{h}.ln_1.bias", (embd,)),
            (f"{h}.attn.c_attn.weight", (embd, 3 * embd)), (f"{h}.attn.c_attn.bias", (3 * embd,)),
            (f"{h}.attn.c_proj.weight", (embd, embd)), (f"{h}.attn.c_proj.bias", (embd,)),
            (f"{h}.ln_2.weight", (embd,)), (f"{h}.ln_2.bias", (embd,)),
            (f"{h}.mlp.c_fc.weight", (embd, 4 * embd)), (f"{h}.mlp.c_fc.bias", (4 * embd,)),
            (f"{h}.mlp.c_proj.weight", (4 * embd, embd)), (f"{h}.mlp.c_proj.bias", (embd,)),
        ]  # fmt: skip
    return [*spec, ("transformer.ln_f.weight", (embd,)), ("transformer.ln_f.bias", (embd,))]


def qwen2_spec(
    layers: int = 2, embd: int = 8, kv: int = 4, inter: int = 12, vocab: int = 13
) -> list[tuple[str, tuple[int, ...]]]:
    """Qwen2ForCausalLM.named_parameters(): RMSNorm weights only, q/k/v biases, untied lm_head."""
    spec = [("model.embed_tokens.weight", (vocab, embd))]
    for i in range(layers):
        p = f"model.layers.{i}"
        spec += [
            (f"{p}.self_attn.q_proj.weight", (embd, embd)), (f"{p}.self_attn.q_proj.bias", (embd,)),
            (f"{p}.self_attn.k_proj.weight", (kv, embd)), (f"{p}.self_attn.k_proj.bias", (kv,)),
            (f"{p}.self_attn.v_proj.weight", (kv, embd)), (f"{p}.self_attn.v_proj.bias", (kv,)),
            (f"{p}.self_attn.o_proj.weight", (embd, embd)),
            (f"{p}.mlp.gate_proj.weight", (inter, embd)), (f"{p}.mlp.up_proj.weight", (inter, embd)),
            (f"{p}.mlp.down_proj.weight", (embd, inter)),
            (f"{p}.input_layernorm.weight", (embd,)), (f"{p}.post_attention_layernorm.weight", (embd,)),
        ]  # fmt: skip
    return [*spec, ("model.norm.weight", (embd,)), ("lm_head.weight", (vocab, embd))]


def hf_decays(name: str, rule: str, layernorm_modules: set[str]) -> bool:
    """Trainer's decay rule, written from its description (current: >= 4.49, old: 4.4-4.48)."""
    import re

    in_layernorm = name.rpartition(".")[0] in layernorm_modules
    if rule == "current":
        return not (
            re.search(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)", name.lower())
            or in_layernorm
        )
    return not ("bias" in name or in_layernorm)


def make_hf_trainer(
    tmp: Path, *, arch: str = "gpt2", rule: str = "current", layers: int = 2, global_step: int = 3
) -> Truth:
    spec = gpt2_spec(layers) if arch == "gpt2" else qwen2_spec(layers)
    layernorms = {n.rpartition(".")[0] for n, _ in spec if ".ln_" in n} if arch == "gpt2" else set()
    params = make_params(spec)
    decay = [n for n in params if hf_decays(n, rule, layernorms)]
    nodecay = [n for n in params if n not in decay]
    opt = adamw(
        [
            {"params": [params[n] for n in decay], "weight_decay": 0.01},
            {"params": [params[n] for n in nodecay], "weight_decay": 0.0},
        ],
        lr=5e-5,
        betas=(0.9, 0.999),
        fused=False,
    )
    run_steps(opt, list(params.values()), steps=global_step)
    from safetensors.torch import save_file

    ckpt = tmp / f"checkpoint-{global_step}"
    ckpt.mkdir(parents=True)
    save_file(
        {n: p.detach().contiguous() for n, p in params.items()},
        ckpt / "model.safetensors",
        metadata={"format": "pt"},
    )
    torch.save(opt.state_dict(), ckpt / "optimizer.pt")
    torch.save(
        {"base_lrs": [5e-5, 5e-5], "last_epoch": global_step, "_step_count": global_step + 1},
        ckpt / "scheduler.pt",
    )
    torch.save(
        {
            "python": (3, (1, 2), None),
            "numpy": np.random.RandomState(0).get_state(),
            "cpu": torch.get_rng_state(),
        },
        ckpt / "rng_state.pth",
    )
    (ckpt / "training_args.bin").write_bytes(b"never loaded: holds transformers classes")
    model_type = "gpt2" if arch == "gpt2" else "qwen2"
    (ckpt / "config.json").write_text(
        json.dumps({"model_type": model_type, "n_layer": layers, "architectures": ["X"]})
    )
    (ckpt / "generation_config.json").write_text("{}")
    log = [{"loss": 4.0, "grad_norm": 1.0, "learning_rate": 5e-5, "epoch": 0.5, "step": 1}]
    (ckpt / "trainer_state.json").write_text(
        json.dumps({"global_step": global_step, "epoch": 1.0, "log_history": log, "max_steps": 6})
    )
    order = decay + nodecay
    return Truth(
        ckpt,
        order,
        [tuple(params[n].shape) for n in order],
        states_in_order(opt),
        global_step,
        [len(decay), len(nodecay)],
    )


# --- 4. Lightning .ckpt --------------------------------------------------------------------------------


def make_lightning(tmp: Path) -> tuple[Truth, Truth]:
    """Two optimizers (manual optimization): Adam over net.0 + net.1 (BatchNorm), AdamW over net.3."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))
    first = list(net[0].parameters()) + list(net[1].parameters())
    opt0 = torch.optim.Adam(first, lr=1e-2, foreach=False)
    opt1 = torch.optim.AdamW(net[3].parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    x = torch.randn(16, 6)
    for _ in range(2):
        for opt in (opt0, opt1):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    state_dict = OrderedDict((f"net.{k}", v) for k, v in net.state_dict().items())
    ckpt = {
        "epoch": 0,
        "global_step": 4,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}}},
        "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min'}": {"best_model_score": None}},
        "optimizer_states": [opt0.state_dict(), opt1.state_dict()],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.01},
    }
    path = tmp / "epoch=0-step=4.ckpt"
    torch.save(ckpt, path)
    names0 = ["net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias"]
    names1 = ["net.3.weight", "net.3.bias"]
    shapes = {n: tuple(v.shape) for n, v in state_dict.items()}
    return (
        Truth(path, names0, [shapes[n] for n in names0], states_in_order(opt0), 2, [4]),
        Truth(path, names1, [shapes[n] for n in names1], states_in_order(opt1), 2, [2]),
    )


# --- 5. accelerate save_state ---------------------------------------------------------------------------


def make_accelerate(tmp: Path, *, layers: int = 12, safetensors: bool = True) -> Truth:
    """An nn.Sequential of ``layers`` Linear layers (keys 0..11: alphabetical order puts 10 before 2)."""
    spec = []
    for i in range(layers):
        spec += [(f"{i}.weight", (5 + i, 4 + i)), (f"{i}.bias", (5 + i,))]
    params = make_params(spec)
    opt = adamw(list(params.values()), weight_decay=0.0)
    run_steps(opt, list(params.values()), steps=2)
    d = tmp / "state"
    d.mkdir()
    torch.save(opt.state_dict(), d / "optimizer.bin")
    if safetensors:
        from safetensors.torch import save_file

        save_file({n: p.detach() for n, p in params.items()}, d / "model.safetensors")
    else:
        torch.save({n: p.detach() for n, p in params.items()}, d / "pytorch_model.bin")
    torch.save({"step_count": 2}, d / "scheduler.bin")
    torch.save(
        {"random_state": np.random.RandomState(0).get_state(), "torch_manual_seed": torch.get_rng_state()},
        d / "random_states_0.pkl",
    )
    return Truth(
        d, list(params), [tuple(p.shape) for p in params.values()], states_in_order(opt), 2, [len(params)]
    )


# --- 6. torch.distributed.checkpoint --------------------------------------------------------------------


def make_dcp(tmp: Path, *, style: str = "nested", prefix: str = "optim") -> Truth:
    """A real single-process ``dcp.save`` of ``get_state_dict`` output; style "flattened" is torchtitan's."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.LayerNorm(3))
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW(
        [{"params": [named["0.weight"], named["2.weight"]], "weight_decay": 0.1},
         {"params": [named["0.bias"], named["2.bias"], named["3.weight"], named["3.bias"]], "weight_decay": 0.0}],
        lr=1e-2, foreach=False,
    )  # fmt: skip
    x = torch.randn(5, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    truth_states = states_in_order(opt)
    names = ["0.weight", "2.weight", "0.bias", "2.bias", "3.weight", "3.bias"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = StateDictOptions(flatten_optimizer_state_dict=style == "flattened")
        msd, osd = get_state_dict(model, opt, options=options)
        d = tmp / f"dcp_{style}"
        payload = {"model": msd, **osd} if style == "flattened" else {"model": msd, prefix: osd}
        dcp.save(payload, checkpoint_id=d, no_dist=True)
    return Truth(d, names, [tuple(named[n].shape) for n in names], truth_states, 3, [2, 4])


# --- 7. DeepSpeed ZeRO ----------------------------------------------------------------------------------


class _ZeroStageEnum(enum.IntEnum):
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


@dataclasses.dataclass
class _FragmentAddress:
    numel: int
    start: int


class _LossScaler:
    def __init__(self) -> None:
        self.cur_scale = 1.0
        self.dynamic = False


_DS_CLASSES = {
    "deepspeed.runtime.zero.config": ("ZeroStageEnum", _ZeroStageEnum),
    "deepspeed.utils.tensor_fragment": ("fragment_address", _FragmentAddress),
    "deepspeed.runtime.fp16.loss_scaler": ("LossScaler", _LossScaler),
}


@contextlib.contextmanager
def deepspeed_names() -> Iterator[None]:
    """Let pickle write the stand-ins under DeepSpeed's qualified names (fake modules, removed after)."""
    added, saved = [], {}
    for module, (qualname, cls) in _DS_CLASSES.items():
        saved[cls] = (cls.__module__, cls.__qualname__, cls.__name__)
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        cls.__module__, cls.__qualname__, cls.__name__ = module, qualname, qualname
        setattr(sys.modules[module], qualname, cls)
    try:
        yield
    finally:
        for cls, (module, qualname, name) in saved.items():
            cls.__module__, cls.__qualname__, cls.__name__ = module, qualname, name
        for name in reversed(added):
            del sys.modules[name]


DS_SPEC = [
    ("embed.weight", (7, 5)), ("layers.0.attn.weight", (5, 5)), ("layers.0.mlp.weight", (9, 5)),
    ("layers.0.norm.weight", (5,)), ("layers.0.mlp.bias", (9,)), ("head.bias", (3,)),
]  # fmt: skip


def make_deepspeed(
    tmp: Path,
    *,
    stage: int = 2,
    world: int = 2,
    drop_rank: int | None = None,
    paddings: bool = True,
    bf16_files: bool = False,
) -> Truth:
    """A ZeRO checkpoint as DeepSpeed writes it: ``latest`` + ``global_step3/`` with per-rank flat partitions."""
    params = make_params(DS_SPEC)
    groups = [[n for n, s in DS_SPEC if len(s) >= 2], [n for n, s in DS_SPEC if len(s) < 2]]
    opt = adamw(
        [
            {"params": [params[n] for n in g], "weight_decay": 0.1 if i == 0 else 0.0}
            for i, g in enumerate(groups)
        ]
    )
    run_steps(opt, list(params.values()))
    truth_states = states_in_order(opt)
    order = [n for g in groups for n in g]
    by_name = dict(zip(order, truth_states))
    step_dir = tmp / "ds" / "global_step3"
    step_dir.mkdir(parents=True)
    (tmp / "ds" / "latest").write_text("global_step3")
    param_shapes = [OrderedDict((n, torch.Size(params[n].shape)) for n in g) for g in groups]
    group_hp = [
        {k: v for k, v in g.items() if k != "params"} | {"params": [i]}
        for i, g in enumerate(opt.state_dict()["param_groups"])
    ]
    common = {
        "buffer_names": [], "param_shapes": param_shapes, "frozen_param_shapes": None, "shared_params": {},
        "frozen_param_fragments": None, "lr_scheduler": None, "data_sampler": None, "random_ltd": None,
        "sparse_tensor_module_names": set(), "skipped_steps": 0, "global_steps": 3, "global_samples": 24,
        "dp_world_size": world, "mp_world_size": 1, "ds_config": {"zero_optimization": {"stage": stage}}, "ds_version": "0.19.8",
    }  # fmt: skip
    with deepspeed_names():
        if stage == 0:
            torch.save(
                {
                    "module": {n: p.detach() for n, p in params.items()},
                    "optimizer": opt.state_dict(),
                    **common,
                },
                step_dir / "mp_rank_00_model_states.pt",
            )
        elif stage in (1, 2):
            torch.save(
                {"module": {n: p.detach() for n, p in params.items()}, "optimizer": None, **common},
                step_dir / "mp_rank_00_model_states.pt",
            )
            pads = [[(i % 2) * 2 if paddings else 0 for i in range(len(g))] for g in groups]
            rank_states = _partition_stage12(groups, by_name, pads, world)
            for r in range(world):
                osd = {
                    "zero_stage": _ZeroStageEnum(stage), "loss_scaler": _LossScaler(), "dynamic_loss_scale": False,
                    "overflow": False, "clip_grad": 1.0,
                    "base_optimizer_state": {"state": rank_states[r], "param_groups": group_hp},
                    "single_partition_of_fp32_groups": [rank_states[r][g]["exp_avg"].clone() for g in range(len(groups))],
                    "group_paddings": [0] * len(groups), "param_alignment_paddings": pads,
                    "partition_count": [world] * len(groups),
                    "param_slice_mappings": [{n: _FragmentAddress(params[n].numel(), 0) for n in g} for g in groups],
                    "ds_version": "0.19.8",
                }  # fmt: skip
                prefix = "bf16_" if bf16_files else ""
                torch.save(
                    {"optimizer_state_dict": osd, "ds_config": {}, "ds_version": "0.19.8"},
                    step_dir / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                )
        else:
            rank_states = _partition_stage3(groups, by_name, world)
            for r in range(world):
                placeholders = {n: torch.empty(0) for n in params}
                torch.save(
                    {"module": placeholders, "optimizer": None, **common},
                    step_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt",
                )
                osd = {
                    "zero_stage": _ZeroStageEnum.weights, "loss_scaler": _LossScaler(), "dynamic_loss_scale": False,
                    "overflow": False, "partition_count": world,
                    "optimizer_state_dict": {"state": rank_states[r], "param_groups": group_hp},
                    "fp32_flat_groups": [rank_states[r][g]["exp_avg"].clone() for g in range(len(groups))],
                }  # fmt: skip
                torch.save(
                    {"optimizer_state_dict": osd, "ds_config": {}, "ds_version": "0.19.8"},
                    step_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                )
    if drop_rank is not None:
        for f in step_dir.glob(f"*zero_pp_rank_{drop_rank}_mp_rank_00_optim_states.pt"):
            f.unlink()
    return Truth(
        tmp / "ds", order, [tuple(params[n].shape) for n in order], truth_states, 3, [len(g) for g in groups]
    )


def _partition_stage12(groups, by_name, pads, world) -> list[dict[int, dict[str, torch.Tensor]]]:
    ranks: list[dict[int, dict[str, torch.Tensor]]] = [{} for _ in range(world)]
    for g, names in enumerate(groups):
        for key in ("exp_avg", "exp_avg_sq"):
            pieces = []
            for i, n in enumerate(names):
                pieces += [by_name[n][key].flatten(), torch.full((pads[g][i],), 7.0)]  # padding holds junk
            flat = torch.cat(pieces)
            align = 2 * world
            flat = torch.cat(
                [flat, torch.full((math.ceil(flat.numel() / align) * align - flat.numel(),), 9.0)]
            )
            for r, chunk in enumerate(flat.chunk(world)):
                ranks[r].setdefault(g, {"step": by_name[names[0]]["step"].clone()})[key] = chunk.clone()
    return ranks


def _partition_stage3(groups, by_name, world) -> list[dict[int, dict[str, torch.Tensor]]]:
    ranks: list[dict[int, dict[str, torch.Tensor]]] = [{} for _ in range(world)]
    for g, names in enumerate(groups):
        for key in ("exp_avg", "exp_avg_sq"):
            per_rank: list[list[torch.Tensor]] = [[] for _ in range(world)]
            for n in names:
                flat = by_name[n][key].flatten()
                part = math.ceil(flat.numel() / world)
                flat = torch.cat([flat, torch.full((part * world - flat.numel(),), 5.0)])
                for r in range(world):
                    per_rank[r].append(flat[r * part : (r + 1) * part])
            for r in range(world):
                ranks[r].setdefault(g, {"step": by_name[names[0]]["step"].clone()})[key] = torch.cat(
                    per_rank[r]
                )
    return ranks


# --- 8. states adapprox refuses --------------------------------------------------------------------------


def make_sgd(tmp: Path, *, momentum: float = 0.9) -> Path:
    params = make_params(MLP_SPEC)
    opt = torch.optim.SGD(list(params.values()), lr=0.1, momentum=momentum)
    run_steps(opt, list(params.values()), steps=2)
    torch.save(opt.state_dict(), tmp / "sgd.pt")
    return tmp / "sgd.pt"


def make_adafactor(tmp: Path, *, flavour: str = "torch") -> Path:
    params = make_params(MLP_SPEC)
    if flavour == "torch":
        opt = torch.optim.Adafactor(list(params.values()), lr=0.01)
        run_steps(opt, list(params.values()), steps=2)
        sd = opt.state_dict()
    else:  # transformers.optimization.Adafactor's keys
        sd = {
            "state": {
                0: {"step": 2, "exp_avg_sq_row": torch.rand(16), "exp_avg_sq_col": torch.rand(8), "RMS": 0.1}
            },
            "param_groups": [{"lr": None, "eps": (1e-30, 1e-3), "scale_parameter": True, "params": [0]}],
        }
    path = tmp / f"adafactor_{flavour}.pt"
    torch.save(sd, path)
    return path


def make_bnb_like(tmp: Path) -> Path:
    """bitsandbytes 8-bit Adam's state keys (uint8 moments with quantisation maps)."""
    sd = {
        "state": {0: {"step": torch.tensor(3.0), "state1": torch.zeros(16, 8, dtype=torch.uint8), "state2": torch.zeros(16, 8, dtype=torch.uint8),
                      "qmap1": torch.linspace(-1, 1, 256), "qmap2": torch.linspace(0, 1, 256), "absmax1": torch.ones(1), "absmax2": torch.ones(1)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "optim_bits": 8, "params": [0]}],
    }  # fmt: skip
    path = tmp / "bnb8bit.pt"
    torch.save(sd, path)
    return path


def make_fsdp1_flat(tmp: Path, *, with_model: bool = True) -> Path:
    """An FSDP1 (use_orig_params=False) rank shard: one flat 1-D state for the whole module."""
    flat = torch.rand(433)
    sd = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": flat.clone(), "exp_avg_sq": flat.square()}},
          "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "params": [0]}]}  # fmt: skip
    obj: dict = {"optimizer": sd}
    if with_model:
        obj["model"] = {"_fsdp_wrapped_module._flat_param": torch.rand(866)}
    else:  # a model whose parameters the flat shard does not match
        obj["model"] = {n: torch.rand(s) for n, s in MLP_SPEC}
    path = tmp / "fsdp1_rank0.pt"
    torch.save(obj, path)
    return path


# --- 9. Adapprox states ---------------------------------------------------------------------------------


def adapprox_state_dict(rank: int = 2, seed: int = 0) -> tuple[dict, list[str], list[tuple[int, ...]]]:
    """An Adapprox-style state: factors for matrices, a dense exp_avg_sq for vectors (algorithm.md §6)."""
    g = torch.Generator().manual_seed(seed)
    spec = [("w1", (16, 8)), ("b1", (16,)), ("conv", (6, 2, 3, 3)), ("w2", (4, 16))]
    state = {}
    for i, (_, shape) in enumerate(spec):
        entry = {"step": torch.tensor(5.0), "exp_avg": torch.randn(shape, generator=g)}
        if len(shape) >= 2:
            m, n = shape[0], math.prod(shape[1:])
            entry["exp_avg_sq_q"] = torch.randn(m, rank, generator=g)
            entry["exp_avg_sq_u"] = torch.randn(n, rank, generator=g)
        else:
            entry["exp_avg_sq"] = torch.rand(shape, generator=g)
        state[i] = entry
    groups = [
        {
            "lr": 1e-3,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": 0.0,
            "rank_max": 4,
            "params": list(range(len(spec))),
        }
    ]
    return {"state": state, "param_groups": groups}, [n for n, _ in spec], [s for _, s in spec]


# --- 10. broken and hostile files ------------------------------------------------------------------------


class _RunsCommand:
    """Unpickling this runs a shell command (here: it creates the marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def make_malicious(tmp: Path, marker: Path, *, kind: str = "zip") -> Path:
    """kind: "zip" / "legacy" torch.save files, "pickle" (meta.pkl), "dcp" (a DCP dir with an evil .metadata)."""
    payload = _RunsCommand(marker)
    if kind == "zip":
        path = tmp / "evil.pt"
        torch.save({"state": {}, "param_groups": [], "x": payload}, path)
    elif kind == "legacy":
        path = tmp / "evil_legacy.pt"
        torch.save({"x": payload}, path, _use_new_zipfile_serialization=False)
    elif kind == "pickle":
        path = tmp / "meta.pkl"
        path.write_bytes(pickle.dumps({"vocab_size": 3, "x": payload}))
    else:
        path = make_dcp(tmp).path
        (path / ".metadata").write_bytes(pickle.dumps(payload))
    return path


def make_truncated(tmp: Path) -> Path:
    src = make_plain(tmp, name="full.pt").path
    data = src.read_bytes()
    path = tmp / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    return path


def make_empty(tmp: Path) -> Path:
    path = tmp / "empty.pt"
    path.write_bytes(b"")
    return path


def make_garbage(tmp: Path) -> Path:
    path = tmp / "garbage.pt"
    path.write_bytes(np.random.default_rng(0).bytes(2048))
    return path
