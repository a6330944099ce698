"""Crafted checkpoints a hostile or careless source could hand to adapprox, one builder per class.

Every builder takes the loaded dict of a small, valid nanoGPT-layout checkpoint (``base``: model,
optimizer, model_args, iter_num, config, with train.bin/val.bin/meta.pkl in ``base_dir``) and a
fresh directory, writes one damaged or malicious checkpoint there and returns its path. The
files are kilobytes; what they *declare* (40000x40000 moments, a 100000x100000 DCP tensor,
n_embd 8192) is what a careless reader would allocate.

``CASES`` maps each class to the commands that must refuse it with exit code 2; every other
command may accept the file (exit 0) or refuse it (exit 2), but never crash (exit 1, traceback),
modify it, leave temporary files or allocate far beyond the file's real data.
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

COMMANDS = ("inspect", "spectrum", "compare", "estimate", "convert", "train")
ALL = frozenset(COMMANDS)
WRITERS = frozenset({"convert", "train"})  # commands that must refuse a damaged but loadable state
HUGE = 40000  # side of the declared moment matrices (6.4 GB in float32 if materialised)


def _matrix_index(osd: dict) -> int:
    """The flat index of the first 2-D moment in the optimizer state."""
    return next(i for i, s in osd["state"].items() if s["exp_avg_sq"].dim() == 2)


def _save_nanogpt(obj: dict, base_dir: Path, directory: Path) -> Path:
    """``obj`` as ckpt.pt beside a copy of the base dataset (so ``train`` gets that far)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("train.bin", "val.bin", "meta.pkl"):
        shutil.copy(base_dir / name, directory / name)
    path = directory / "ckpt.pt"
    torch.save(obj, path)
    return path


def _with_moment(base: dict, key: str, value: torch.Tensor) -> dict:
    obj = copy.copy(base)
    osd = copy.deepcopy(base["optimizer"])
    osd["state"][_matrix_index(osd)][key] = value
    obj["optimizer"] = osd
    return obj


# --- memory bombs ---------------------------------------------------------------------------------


def stride0_moments(base: dict, base_dir: Path, d: Path) -> Path:
    """A 1-element storage expanded to HUGE x HUGE: passes weights_only, 6.4 GB if materialised."""
    obj = _with_moment(base, "exp_avg_sq", torch.full((1,), 1e-4).expand(HUGE, HUGE))
    return _save_nanogpt(obj, base_dir, d)


def overlapping_moments(base: dict, base_dir: Path, d: Path) -> Path:
    """A HUGE x HUGE view with strides (1, 1) over 2*HUGE elements: every row overlaps the next."""
    storage = torch.rand(2 * HUGE)
    obj = _with_moment(base, "exp_avg", storage.as_strided((HUGE, HUGE), (1, 1)))
    return _save_nanogpt(obj, base_dir, d)


def stride0_weights(base: dict, base_dir: Path, d: Path) -> Path:
    """A model weight declared HUGE x HUGE over one stored element, next to a sound optimizer."""
    obj = copy.copy(base)
    obj["model"] = {**base["model"], "transformer.wte.weight": torch.zeros(1).expand(HUGE, HUGE)}
    return _save_nanogpt(obj, base_dir, d)


def model_args_bomb(base: dict, base_dir: Path, d: Path) -> Path:
    """model_args say n_embd 8192 while the stored weights are tiny (3.7 GB model if built first)."""
    obj = copy.copy(base)
    obj["model_args"] = {**base["model_args"], "n_embd": 8192, "n_layer": 12}
    return _save_nanogpt(obj, base_dir, d)


def batch_size_bomb(base: dict, base_dir: Path, d: Path) -> Path:
    """config.batch_size 200000: the first forward pass alone needs tens of GB."""
    obj = copy.copy(base)
    obj["config"] = {**base["config"], "batch_size": 200000}
    return _save_nanogpt(obj, base_dir, d)


# --- torch.distributed.checkpoint -----------------------------------------------------------------


def _dcp(d: Path) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from checkpoint_factories import make_dcp

    return make_dcp(d).path


def _edit_dcp_metadata(path: Path, edit: Callable[[object], None]) -> None:
    with open(path / ".metadata", "rb") as f:
        md = pickle.load(f)  # the test's own file
    edit(md)
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)


def _first_state_key(md) -> str:
    return next(k for k in md.state_dict_metadata if k.endswith("exp_avg_sq") and "weight" in k)


def dcp_huge_metadata(base: dict, base_dir: Path, d: Path) -> Path:
    """.metadata declares one moment as 100000 x 100000 (40 GB if allocated from the declaration)."""
    path = _dcp(d)

    def edit(md) -> None:
        meta = md.state_dict_metadata[_first_state_key(md)]
        meta.size = torch.Size([100000, 100000])
        for chunk in meta.chunks:
            chunk.sizes = torch.Size([100000, 100000])

    _edit_dcp_metadata(path, edit)
    return path


def dcp_truncated(base: dict, base_dir: Path, d: Path) -> Path:
    path = _dcp(d)
    data = next(path.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    return path


def dcp_size_mismatch(base: dict, base_dir: Path, d: Path) -> Path:
    """A moment declared larger (7 x 4) than the bytes stored for it (6 x 4)."""
    path = _dcp(d)

    def edit(md) -> None:
        meta = md.state_dict_metadata[_first_state_key(md)]
        meta.size = torch.Size([7, 4])
        for chunk in meta.chunks:
            chunk.sizes = torch.Size([7, 4])

    _edit_dcp_metadata(path, edit)
    return path


def dcp_path_traversal(base: dict, base_dir: Path, d: Path) -> Path:
    """Every storage item points at ../../../../etc/passwd instead of the .distcp file."""
    path = _dcp(d)

    def edit(md) -> None:
        for info in md.storage_data.values():
            info.relative_path = "../../../../etc/passwd"

    _edit_dcp_metadata(path, edit)
    return path


# --- paths that leave the checkpoint --------------------------------------------------------------


def hf_index_escape(base: dict, base_dir: Path, d: Path) -> Path:
    """A Trainer checkpoint whose model.safetensors.index.json sends the loader outside its folder."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from checkpoint_factories import make_hf_trainer

    path = make_hf_trainer(d).path
    outside = d / "outside.safetensors"
    (path / "model.safetensors").rename(outside)
    index = {"metadata": {}, "weight_map": {"transformer.wte.weight": "../outside.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def hf_deep_json(base: dict, base_dir: Path, d: Path) -> Path:
    """A Trainer checkpoint whose index and trainer_state JSON are nested 100000 deep."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from checkpoint_factories import make_hf_trainer

    path = make_hf_trainer(d).path
    deep = '{"weight_map":' + "[" * 100000 + "]" * 100000 + "}"
    (path / "model.safetensors.index.json").write_text(deep)
    (path / "trainer_state.json").write_text(deep)
    return path


def deepspeed_latest_escape(base: dict, base_dir: Path, d: Path) -> Path:
    """A DeepSpeed folder whose ``latest`` tag names a step directory outside it."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from checkpoint_factories import make_deepspeed

    make_deepspeed(d / "elsewhere")  # writes elsewhere/ds/latest + elsewhere/ds/global_step3/
    ckpt = d / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text("../elsewhere/ds/global_step3")
    return ckpt


def deepspeed_shape_bomb(base: dict, base_dir: Path, d: Path) -> Path:
    """DeepSpeed param_shapes declare the first weight 100000 x 100000 over its small flat slice."""
    import sys
    from collections import OrderedDict

    sys.path.insert(0, str(Path(__file__).parent))
    from checkpoint_factories import deepspeed_names, make_deepspeed

    path = make_deepspeed(d).path
    with deepspeed_names():
        for f in (path / "global_step3").glob("*model_states.pt"):
            states = torch.load(f, weights_only=False)
            first = states["param_shapes"][0]
            name = next(iter(first))
            states["param_shapes"][0] = OrderedDict(
                (k, torch.Size([100000, 100000]) if k == name else v) for k, v in first.items()
            )
            torch.save(states, f)
    return path


def deepspeed_stride0_partition(base: dict, base_dir: Path, d: Path) -> Path:
    """A ZeRO flat exp_avg_sq partition expanded from one stored element to HUGE * HUGE."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from checkpoint_factories import deepspeed_names, make_deepspeed

    path = make_deepspeed(d).path
    with deepspeed_names():
        f = sorted((path / "global_step3").glob("*optim_states.pt"))[0]
        obj = torch.load(f, weights_only=False)
        state = obj["optimizer_state_dict"]["base_optimizer_state"]["state"]
        state[0]["exp_avg_sq"] = torch.full((1,), 1e-4).expand(HUGE * HUGE)
        torch.save(obj, f)
    return path


def safetensors_shape_bomb(base: dict, base_dir: Path, d: Path) -> Path:
    """An export whose param_shapes metadata declares a 100000 x 100000 parameter."""
    path = _export(d)

    def edit(header: dict) -> None:
        shapes = json.loads(header["__metadata__"]["param_shapes"])
        shapes[0] = [100000, 100000]
        header["__metadata__"]["param_shapes"] = json.dumps(shapes)

    _rewrite_header(path, edit)
    return path


# --- untrusted text -------------------------------------------------------------------------------

MARKUP_NAMES = ["[/x]", "[link=http://evil.example]click[/link]", "\x1b]0;pwned\x07title", "[bold]b[/bold]"]


def markup_names(base: dict, base_dir: Path, d: Path) -> Path:
    """A plain optimizer file whose param_names hold Rich markup and terminal escape sequences."""
    osd = copy.deepcopy(base["optimizer"])
    count = sum(len(g["params"]) for g in osd["param_groups"])
    names = [MARKUP_NAMES[i % len(MARKUP_NAMES)] + f".{i}" for i in range(count)]
    start = 0
    for g in osd["param_groups"]:
        g["param_names"] = names[start : start + len(g["params"])]
        start += len(g["params"])
    d.mkdir(parents=True, exist_ok=True)
    path = d / "optimizer.pt"
    torch.save(osd, path)
    return path


# --- damaged but loadable states ------------------------------------------------------------------


def negative_exp_avg_sq(base: dict, base_dir: Path, d: Path) -> Path:
    v = base["optimizer"]["state"][_matrix_index(base["optimizer"])]["exp_avg_sq"]
    return _save_nanogpt(_with_moment(base, "exp_avg_sq", -v - 1e-3), base_dir, d)


def nan_exp_avg(base: dict, base_dir: Path, d: Path) -> Path:
    m = base["optimizer"]["state"][_matrix_index(base["optimizer"])]["exp_avg"].clone()
    m[0, 0] = float("nan")
    return _save_nanogpt(_with_moment(base, "exp_avg", m), base_dir, d)


def inf_exp_avg(base: dict, base_dir: Path, d: Path) -> Path:
    m = base["optimizer"]["state"][_matrix_index(base["optimizer"])]["exp_avg"].clone()
    m[-1, -1] = float("inf")
    return _save_nanogpt(_with_moment(base, "exp_avg", m), base_dir, d)


def nan_exp_avg_sq(base: dict, base_dir: Path, d: Path) -> Path:
    v = base["optimizer"]["state"][_matrix_index(base["optimizer"])]["exp_avg_sq"].clone()
    v[1, 1] = float("nan")
    return _save_nanogpt(_with_moment(base, "exp_avg_sq", v), base_dir, d)


def inf_exp_avg_sq(base: dict, base_dir: Path, d: Path) -> Path:
    v = base["optimizer"]["state"][_matrix_index(base["optimizer"])]["exp_avg_sq"].clone()
    v[:, 0] = float("inf")
    return _save_nanogpt(_with_moment(base, "exp_avg_sq", v), base_dir, d)


def nan_step(base: dict, base_dir: Path, d: Path) -> Path:
    return _save_nanogpt(_with_moment(base, "step", torch.tensor(float("nan"))), base_dir, d)


def inf_step(base: dict, base_dir: Path, d: Path) -> Path:
    return _save_nanogpt(_with_moment(base, "step", torch.tensor(float("inf"))), base_dir, d)


def _with_group(base: dict, **hp) -> dict:
    obj = copy.copy(base)
    osd = copy.deepcopy(base["optimizer"])
    for g in osd["param_groups"]:
        g.update(hp)
    obj["optimizer"] = osd
    return obj


def nan_lr(base: dict, base_dir: Path, d: Path) -> Path:
    obj = _with_group(base, lr=float("nan"))
    obj["config"] = {**base["config"], "learning_rate": float("nan")}
    return _save_nanogpt(obj, base_dir, d)


def impossible_betas(base: dict, base_dir: Path, d: Path) -> Path:
    obj = _with_group(base, betas=(1.5, 0.99))
    obj["config"] = {**base["config"], "beta1": 1.5}
    return _save_nanogpt(obj, base_dir, d)


def negative_iter_num(base: dict, base_dir: Path, d: Path) -> Path:
    return _save_nanogpt({**base, "iter_num": -5}, base_dir, d)


def transposed_moments(base: dict, base_dir: Path, d: Path) -> Path:
    i = _matrix_index(base["optimizer"])
    state = base["optimizer"]["state"][i]
    obj = _with_moment(base, "exp_avg_sq", state["exp_avg_sq"].T.contiguous())
    obj["optimizer"]["state"][i]["exp_avg"] = state["exp_avg"].T.contiguous()
    return _save_nanogpt(obj, base_dir, d)


def wrong_numel_moments(base: dict, base_dir: Path, d: Path) -> Path:
    i = _matrix_index(base["optimizer"])
    v = base["optimizer"]["state"][i]["exp_avg_sq"]
    obj = _with_moment(base, "exp_avg_sq", v[:-1].clone())
    obj["optimizer"]["state"][i]["exp_avg"] = base["optimizer"]["state"][i]["exp_avg"][:-1].clone()
    return _save_nanogpt(obj, base_dir, d)


def integer_moments(base: dict, base_dir: Path, d: Path) -> Path:
    v = base["optimizer"]["state"][_matrix_index(base["optimizer"])]["exp_avg_sq"]
    return _save_nanogpt(_with_moment(base, "exp_avg_sq", (v * 1e6).to(torch.int32)), base_dir, d)


def complex_moments(base: dict, base_dir: Path, d: Path) -> Path:
    v = base["optimizer"]["state"][_matrix_index(base["optimizer"])]["exp_avg_sq"]
    return _save_nanogpt(_with_moment(base, "exp_avg_sq", v.to(torch.complex64)), base_dir, d)


# --- safetensors and zip integrity -----------------------------------------------------------------


def _export(d: Path) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from checkpoint_factories import adapprox_state_dict

    from adapprox_cli.checkpoints import write_adapprox_safetensors

    sd, names, shapes = adapprox_state_dict()
    d.mkdir(parents=True, exist_ok=True)
    return write_adapprox_safetensors(
        d / "state.safetensors", sd, names, "plain", "adapprox", param_shapes=shapes
    )


def _rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def safetensors_overlap(base: dict, base_dir: Path, d: Path) -> Path:
    """Two tensors whose data_offsets overlap (the second starts inside the first)."""
    path = _export(d)

    def edit(header: dict) -> None:
        tensors = sorted(
            (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
        )
        a, b = (header[k] for k in tensors[:2])
        b_len = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + b_len]  # inside a, or over it

    _rewrite_header(path, edit)
    return path


def safetensors_size_mismatch(base: dict, base_dir: Path, d: Path) -> Path:
    """A tensor whose shape needs more bytes than its data_offsets give it."""
    path = _export(d)

    def edit(header: dict) -> None:
        name = next(k for k in header if k != "__metadata__" and len(header[k]["shape"]) == 2)
        header[name]["shape"] = [header[name]["shape"][0] * 1000, header[name]["shape"][1]]

    _rewrite_header(path, edit)
    return path


def safetensors_deep_header(base: dict, base_dir: Path, d: Path) -> Path:
    """A header JSON nested 100000 deep (RecursionError in a naive json.loads)."""
    d.mkdir(parents=True, exist_ok=True)
    body = b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"
    path = d / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    return path


def truncated_zip(base: dict, base_dir: Path, d: Path) -> Path:
    """A zip torch.save cut at two thirds (an interrupted copy)."""
    path = _save_nanogpt(base, base_dir, d)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    return path


def legacy_truncated(base: dict, base_dir: Path, d: Path) -> Path:
    """A legacy (non-zip) torch.save cut in the middle."""
    d.mkdir(parents=True, exist_ok=True)
    path = d / "optimizer.pt"
    torch.save(base["optimizer"], path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def bad_param_indices(base: dict, base_dir: Path, d: Path) -> Path:
    """param_groups list indices that are not integers, repeat, or are astronomically large."""
    osd = copy.deepcopy(base["optimizer"])
    osd["param_groups"][0]["params"] = [10**30, "x", 0, 0]
    d.mkdir(parents=True, exist_ok=True)
    path = d / "optimizer.pt"
    torch.save(osd, path)
    return path


def flipped_byte(base: dict, base_dir: Path, d: Path) -> Path:
    """A valid zip torch.save with one byte flipped inside a stored tensor (CRC-32 now wrong)."""
    path = _save_nanogpt(base, base_dir, d)
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    # The local header is 30 bytes + name + extra; the data follows it (stored, uncompressed).
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    return path


@dataclass(frozen=True)
class Case:
    build: Callable[[dict, Path, Path], Path]
    refuse: frozenset[str]  # commands that must exit 2
    why: str = ""


CASES: dict[str, Case] = {
    "stride0_moments": Case(stride0_moments, ALL),
    "overlapping_moments": Case(overlapping_moments, ALL),
    "stride0_weights": Case(stride0_weights, ALL),
    "deepspeed_stride0_partition": Case(deepspeed_stride0_partition, ALL),
    "model_args_bomb": Case(model_args_bomb, frozenset({"train"})),
    "batch_size_bomb": Case(batch_size_bomb, frozenset({"train"})),
    "dcp_huge_metadata": Case(dcp_huge_metadata, ALL),
    "dcp_truncated": Case(dcp_truncated, ALL - {"inspect"}),
    "dcp_size_mismatch": Case(dcp_size_mismatch, ALL),
    "dcp_path_traversal": Case(dcp_path_traversal, ALL),
    "hf_index_escape": Case(hf_index_escape, ALL),
    "hf_deep_json": Case(hf_deep_json, ALL),
    "deepspeed_latest_escape": Case(deepspeed_latest_escape, ALL),
    "deepspeed_shape_bomb": Case(deepspeed_shape_bomb, ALL),
    "safetensors_shape_bomb": Case(safetensors_shape_bomb, ALL),
    "markup_names": Case(markup_names, frozenset({"train"})),
    "negative_exp_avg_sq": Case(negative_exp_avg_sq, WRITERS),
    "nan_exp_avg": Case(nan_exp_avg, WRITERS),
    "inf_exp_avg": Case(inf_exp_avg, WRITERS),
    "nan_exp_avg_sq": Case(nan_exp_avg_sq, WRITERS),
    "inf_exp_avg_sq": Case(inf_exp_avg_sq, WRITERS),
    "nan_step": Case(nan_step, WRITERS),
    "inf_step": Case(inf_step, WRITERS),
    "nan_lr": Case(nan_lr, WRITERS),
    "impossible_betas": Case(impossible_betas, WRITERS),
    "negative_iter_num": Case(negative_iter_num, frozenset({"train"})),
    "transposed_moments": Case(transposed_moments, WRITERS),
    "wrong_numel_moments": Case(wrong_numel_moments, WRITERS),
    "integer_moments": Case(integer_moments, WRITERS),
    "complex_moments": Case(complex_moments, WRITERS),
    "safetensors_overlap": Case(safetensors_overlap, ALL),
    "safetensors_size_mismatch": Case(safetensors_size_mismatch, ALL),
    "safetensors_deep_header": Case(safetensors_deep_header, ALL),
    "truncated_zip": Case(truncated_zip, ALL),
    "legacy_truncated": Case(legacy_truncated, ALL),
    "bad_param_indices": Case(bad_param_indices, ALL),
    # torch.load does not check CRCs; inspect --check and convert --verify (the suite's convert) do.
    "flipped_byte": Case(flipped_byte, frozenset({"convert"})),
}
