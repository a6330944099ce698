"""Hugging Face Trainer ``checkpoint-N/`` directories: optimizer.pt + model.safetensors + config.json.

transformers is not needed. The optimizer's order is ``named_parameters()`` split by the decay
rule; model.safetensors lists the same names alphabetically (``h.10`` before ``h.2``, tied
``lm_head.weight`` absent), so the order is reconstructed from the registration order of known
architectures (config.json ``model_type``) or a natural sort, and each decay rule (current, old)
is accepted only when the group sizes and every shape match. GPT-2's Conv1D weights are stored
(in, out), which the shapes from the file already reflect.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapprox_cli.checkpoints import names as naming
from adapprox_cli.checkpoints.core import OptimizerCheckpoint
from adapprox_cli.checkpoints.formats import CheckpointFormat
from adapprox_cli.checkpoints.formats.safetensors import load_safetensors_lazy
from adapprox_cli.checkpoints.safe_load import contained_path, safe_torch_load
from adapprox_cli.checkpoints.torch_state import build_checkpoint, find_optimizer_state_dict
from adapprox_cli.errors import InputError

OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")


def is_hf_trainer_dir(path: Path) -> bool:
    """optimizer.pt (Trainer's name), or optimizer.bin next to trainer_state.json (FSDP full state)."""
    has_trainer_state = (path / "trainer_state.json").is_file()
    return (path / "optimizer.pt").is_file() or (has_trainer_state and (path / "optimizer.bin").is_file())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not readable JSON ({exc}); re-copy the checkpoint directory") from None
    except RecursionError:
        raise InputError(
            f"{path} is JSON nested too deeply to be a checkpoint file; re-copy the checkpoint directory"
        ) from None


def load_hf_trainer(path: Path, *, trust_checkpoint: bool = False) -> OptimizerCheckpoint:
    optimizer_file = next((path / f for f in OPTIMIZER_FILES if (path / f).is_file()), None)
    if optimizer_file is None:
        raise InputError(
            f"{path} has no optimizer.pt: the Trainer saved only the model (save_only_model=True?); "
            "adapprox needs a checkpoint with optimizer state"
        )
    obj = safe_torch_load(optimizer_file, trust_checkpoint=trust_checkpoint)
    osd, keys = find_optimizer_state_dict(obj, optimizer_file)
    config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    trainer_state = read_json(path / "trainer_state.json") if (path / "trainer_state.json").is_file() else {}
    model_type = config.get("model_type") if isinstance(config, dict) else None
    model_state, ordered = load_model_state(path, trust_checkpoint=trust_checkpoint)
    params = naming.model_params_from_state_dict(model_state) if model_state else []
    count = sum(len(g["params"]) for g in osd["param_groups"])
    step = trainer_state.get("global_step") if isinstance(trainer_state, dict) else None
    return build_checkpoint(
        osd,
        path=path,
        fmt="hf-trainer",
        model_params=params or None,
        model_tiers=[hf_candidates(params, count, model_type, ordered)] if params else [],
        default_optimizer="adamw",
        step_fallback=step if isinstance(step, int) else None,
        container=obj,
        model_state=_normalized(model_state),
        extra={
            "optimizer_file": str(optimizer_file),
            "optimizer_path": keys,
            "trainer_state": trainer_state,
            "config": config,
            "model_type": model_type,
        },
    )


def hf_candidates(
    params: list[naming.ModelParam], count: int, model_type: str | None, ordered: bool = False
) -> list[naming.NameCandidate]:
    """Decay rules and one-group order over the reconstructed named_parameters() order(s)."""
    if ordered:  # a torch.save'd state dict already has named_parameters() order
        return _rules(params, None, count)
    orders = []
    if naming.has_registration_order(model_type):
        orders.append((naming.order_names([p.name for p in params], model_type), None))
    orders.append(
        (
            naming.order_names([p.name for p in params]),
            "names follow a natural sort of model.safetensors keys (weight before bias); the shapes fit, but "
            "same-shaped neighbours could be swapped if the model registers modules out of alphabetical order",
        )
    )
    return [c for order, note in orders for c in _rules(naming.reorder(params, order), note, count)]


def _rules(params: list[naming.ModelParam], note: str | None, count: int) -> list[naming.NameCandidate]:
    return [
        *naming.hf_decay_candidates(params, note),
        naming.model_order_candidate(params, note),
        naming.nanogpt_candidate(params, note),
        *naming.window_candidates(params, count, note),
    ]


def _normalized(model_state: dict | None) -> dict | None:
    return naming.normalize_keys(model_state or None)


def model_files(path: Path, stem: str = "model") -> list[Path]:
    index = path / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        return sorted({contained_path(path, f, index) for f in weight_map.values()})
    for name in (f"{stem}.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    return []


def load_model_state(
    path: Path, stem: str = "model", *, trust_checkpoint: bool = False
) -> tuple[dict | None, bool]:
    """The model weights of a checkpoint directory (memory-mapped) and whether their order is
    the model's own: safetensors files sort keys alphabetically, ``torch.save`` files keep them."""
    files = model_files(path, stem)
    if not files:
        return None, False
    state: dict = {}
    for f in files:
        if f.suffix == ".safetensors":
            state.update(load_safetensors_lazy(f)[0])
        else:
            loaded = safe_torch_load(f, trust_checkpoint=trust_checkpoint)
            state.update(loaded if isinstance(loaded, dict) else {})
    return state, all(f.suffix != ".safetensors" for f in files)


FORMAT = CheckpointFormat(
    name="hf-trainer",
    description="Hugging Face checkpoint-N/",
    load=lambda path, obj, *, trust_checkpoint=False, optimizer_index=0: load_hf_trainer(
        path, trust_checkpoint=trust_checkpoint
    ),
    detect_directory=is_hf_trainer_dir,
    write_back="directory",
    optimizer_file="optimizer.pt",
    extra_keys=("model_type", "optimizer_file"),
)
