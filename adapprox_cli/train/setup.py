"""Everything a resumed run reads and checks before its first step: the device, the checkpoint,
the model with its weights, the tokens, and whether the batch fits.

Every check runs before anything large is allocated, and each refusal names what to change.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from adapprox_cli.devices import resolve_device
from adapprox_cli.errors import InputError, ParameterError
from adapprox_cli.formatting import format_shape
from adapprox_cli.train.data import encode_text_file, read_nanogpt_dataset, read_vocab
from adapprox_cli.train.model import gpt_from_model_args, model_state_from_checkpoint
from adapprox_cli.train.parallel import Processes

if TYPE_CHECKING:
    from adapprox_cli.train.loop import TrainConfig

CHECKPOINT_NAME = "ckpt.pt"
# A smaller micro-batch keeps the step's tokens when the step accumulates more of them.
_SAME_STEP_SIZE = "(and more micro-batches per step for the same step size)"


def resolve_train_device(device: str, processes: Processes) -> str:
    resolved = resolve_device(device)
    if resolved.type != "cuda":
        return str(resolved)
    if resolved.index is None and processes.enabled:
        # under torchrun each process takes the GPU of its local rank
        resolved = torch.device("cuda", processes.local_rank)
    torch.cuda.set_device(resolved)
    return str(resolved)


def read_container(path: Path, trust_checkpoint: bool) -> tuple[Path, dict[str, Any]]:
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


def load_factory(spec: str) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ParameterError(
            "model", f"{{name}} {spec!r}: expected package.module:factory (a callable returning an nn.Module)"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ParameterError(
            "model", f"{{name}} {spec!r}: cannot import {module_name} ({exc}); is it on PYTHONPATH?"
        ) from None
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ParameterError("model", f"{{name}} {spec!r}: {module_name} has no attribute {attribute}")
    if not callable(target):
        raise ParameterError("model", f"{{name}} {spec!r}: {attribute} is not callable")
    model = target()
    if not isinstance(model, nn.Module):
        raise ParameterError(
            "model", f"{{name}} {spec!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def build_model(model_spec: str | None, container: dict[str, Any], source: str) -> nn.Module:
    """The bundled GPT from ``model_args`` (or the ``model_spec`` factory), with the checkpoint's weights."""
    if model_spec is None:
        if "model_args" not in container:
            raise ParameterError(
                "model",
                f"{source} has no model_args; pass {{name}} package.module:factory to build the model yourself",
            )
        # model_args are checked against the stored weights on the meta device first: a 5 MB file
        # must not make us allocate the 3.7 GB model its model_args claim.
        with torch.device("meta"):
            skeleton = gpt_from_model_args(container["model_args"], source=source)
        state = model_state_from_checkpoint(container, source)
        check_weights_fit(model_spec, state, skeleton.state_dict(), source)
        model = gpt_from_model_args(container["model_args"], source=source)
    else:
        model = load_factory(model_spec)
    state = model_state_from_checkpoint(container, source)
    check_weights_fit(model_spec, state, model.state_dict(), source)
    model.load_state_dict(state)
    return model.float()


def check_weights_fit(
    model_spec: str | None, state: dict[str, Any], expected: dict[str, Any], source: str
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
        what = f"the model from {model_spec}" if model_spec else "the GPT built from model_args"
        raise InputError(f"{source}: the checkpoint weights do not fit {what} ({details})")


def check_batch_fits(
    source: str, batch_size: int, block_size: int, train_tokens: int, model: nn.Module, device: str
) -> None:
    """Refuse a micro-batch larger than the training data, or one whose activations cannot fit.

    The batch size often comes from the checkpoint (a downloaded file may say 200000). The
    estimate is a lower bound of what one forward and backward pass keeps (fp32: about 16 values
    per token and layer for the block, 2 per head and position for attention, logits and their
    gradient), so what it refuses would not have fitted.
    """
    if batch_size < 1:
        raise ParameterError("batch_size", f"{source}: batch size {batch_size}; pass {{name}} N with N >= 1")
    tokens = batch_size * block_size
    if tokens > max(train_tokens, 1):
        raise ParameterError(
            "batch_size",
            f"{source}: a micro-batch of {batch_size} x {block_size} tokens is larger than the "
            f"{train_tokens} training tokens; pass a smaller {{name}} {_SAME_STEP_SIZE}",
        )
    cfg = getattr(model, "config", None)
    if cfg is None:
        return
    per_token = 4 * (cfg.n_layer * (16 * cfg.n_embd + 2 * cfg.n_head * block_size) + 2 * cfg.vocab_size)
    needed = tokens * per_token
    available = _available_memory(device)
    if available is not None and needed > available:
        from adapprox_cli.render import human_bytes

        raise ParameterError(
            "batch_size",
            f"{source}: batch size {batch_size} x {block_size} tokens needs about {human_bytes(needed)} of "
            f"activations, more than the {human_bytes(available)} available on {device}; pass a smaller "
            f"{{name}} {_SAME_STEP_SIZE}",
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


def data_source(
    config: TrainConfig, checkpoint_path: Path, ckpt_config: dict[str, Any]
) -> tuple[Path, Path | None]:
    """Where the tokens come from: data_dir/text, else beside the checkpoint, else the recorded source.

    Checkpoints written by ``train`` record their data directory (and text file), so the saved
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


def load_data(data_dir: Path, text: Path | None) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Training and validation tokens, and the vocabulary size when known."""
    if text is not None:
        meta = data_dir / "meta.pkl"
        if not meta.is_file():
            raise ParameterError(
                "data_dir",
                f"a text is encoded with the checkpoint's character vocabulary, but {meta} does not exist; "
                "pass {name} DIR with the meta.pkl the checkpoint was trained with",
            )
        vocab = read_vocab(meta)
        ids = encode_text_file(text, vocab)
        split = int(len(ids) * 0.9)
        return ids[:split], ids[split:], vocab.vocab_size
    if not (data_dir / "train.bin").is_file():
        raise ParameterError(
            "data_dir",
            f"no training data: {data_dir / 'train.bin'} does not exist; pass {{name}} DIR (train.bin, val.bin, "
            "meta.pkl) or a text file to encode",
        )
    data = read_nanogpt_dataset(data_dir)
    return data.train, data.val, data.vocab.vocab_size if data.vocab else None


def sampler_seed(seed: int, rank: int, iteration: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + iteration * 104_729) % (2**63)


def check_fsdp(config: TrainConfig) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise ParameterError(
            "fsdp",
            "{name} shards the model over the processes torchrun starts (WORLD_SIZE > 1); run it under "
            "torchrun, e.g. torchrun --nproc-per-node 2 -m adapprox_cli train ...",
        )
    if config.optimizer not in ("adapprox", "adamw"):
        raise ParameterError(
            "fsdp",
            f"{{name}} supports the adapprox and adamw optimizers, not {config.optimizer} "
            "(its state does not follow the weight rows FSDP2 shards)",
        )


def run_length(until: int | None, steps: int, start_iter: int, source: str) -> int:
    """How many optimizer steps this run takes: ``steps``, or up to iteration ``until``."""
    if until is None:
        return steps
    if until <= start_iter:
        raise ParameterError(
            "until", f"{{name}} {until}: {source} is already at iteration {start_iter}; pass a larger one"
        )
    return until - start_iter


def block_size_of(requested: int | None, ckpt_config: dict[str, Any], model: nn.Module, source: str) -> int:
    """The tokens per sequence: as requested, else the checkpoint's, else the model's, at most the model's."""
    model_block = getattr(getattr(model, "config", None), "block_size", None)
    block_size = requested or ckpt_config.get("block_size") or model_block
    if not block_size:
        raise ParameterError("block_size", f"{source} does not say its block size; pass {{name}}")
    if model_block is not None and block_size > model_block:
        raise ParameterError(
            "block_size", f"{{name}} {block_size} exceeds the model's block size {model_block}"
        )
    return block_size


def check_vocab_fits(vocab_size: int | None, model: nn.Module) -> None:
    model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab_size is not None and model_vocab is not None and vocab_size > model_vocab:
        raise InputError(
            f"the data has {vocab_size} token ids but the model only {model_vocab}; wrong data directory?"
        )


def restore_randomness(
    container: dict[str, Any], seed: int, processes: Processes, start_iter: int
) -> torch.Generator:
    """The batch sampler's generator and the global torch RNG (dropout) of this process.

    Restored from our own checkpoints (one state per rank, when the world size is the same),
    else seeded by (seed, rank, iteration): a resumed run draws what an unbroken one would have.
    """
    generator = torch.Generator().manual_seed(sampler_seed(seed, processes.rank, start_iter))
    sampler = container.get("sampler")
    if isinstance(sampler, dict) and sampler.get("world_size") == processes.world_size:
        generator.set_state(sampler["generator_states"][processes.rank])
    rng = container.get("rng")
    if isinstance(rng, dict) and len(rng.get("torch_states", [])) == processes.world_size:
        torch.set_rng_state(rng["torch_states"][processes.rank])
    else:
        torch.manual_seed(sampler_seed(seed + 1, processes.rank, start_iter))
    return generator
