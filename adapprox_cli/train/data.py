"""Character-level data in nanoGPT's on-disk layout: ``train.bin``, ``val.bin`` and ``meta.pkl``.

nanoGPT's ``prepare.py`` writes token ids as raw little-endian uint16 (``tofile``) and the
vocabulary as a plain pickle ``{'vocab_size', 'itos', 'stoi'}``. We write the same files and
read them back defensively: token files through ``np.memmap`` (nothing is loaded until a batch
needs it) and ``meta.pkl`` through the restricted unpickler of ``checkpoints.safe_load``, which
builds nothing but plain builtins (dicts, lists, ints, floats, strings), because a pickle from
someone else can otherwise run arbitrary code when loaded.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapprox_cli.checkpoints.safe_load import META_PKL_GLOBALS, RefusedGlobal, unpickle_restricted
from adapprox_cli.errors import InputError

TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
META_FILE = "meta.pkl"
TOKEN_DTYPE = np.uint16  # nanoGPT's choice: every vocabulary up to GPT-2's 50257 fits
# Fixed so meta.pkl is byte-identical across Python versions (3.14 changed the default to 5).
META_PICKLE_PROTOCOL = 4


@dataclass(frozen=True)
class CharVocab:
    """A character vocabulary: ``stoi`` maps a character to its id, ``itos`` the reverse."""

    stoi: dict[str, int]
    itos: dict[int, str]

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        """nanoGPT's rule: every distinct character of the text, sorted, numbered from 0."""
        chars = sorted(set(text))
        return cls(stoi={ch: i for i, ch in enumerate(chars)}, itos=dict(enumerate(chars)))

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], source: str = "meta.pkl") -> CharVocab:
        """Validate a nanoGPT ``meta.pkl`` dict and build the vocabulary from it."""
        stoi, itos = meta.get("stoi"), meta.get("itos")
        if not isinstance(stoi, dict) or not isinstance(itos, dict):
            raise InputError(
                f"{source} has no character vocabulary (keys: {', '.join(map(str, meta))}); "
                "a nanoGPT character-level meta.pkl holds 'stoi' and 'itos' dicts"
            )
        if not all(isinstance(ch, str) and len(ch) == 1 and isinstance(i, int) for ch, i in stoi.items()):
            raise InputError(
                f"{source}: 'stoi' must map single characters to int ids; this is not a character-level "
                "vocabulary (BPE data has no meta.pkl in nanoGPT)"
            )
        if itos != {i: ch for ch, i in stoi.items()}:
            raise InputError(
                f"{source}: 'itos' is not the inverse of 'stoi'; recreate meta.pkl from your text"
            )
        if sorted(itos) != list(range(len(itos))):
            raise InputError(
                f"{source}: the token ids are not 0..{len(itos) - 1}; recreate meta.pkl from your text"
            )
        declared = meta.get("vocab_size", len(itos))
        if declared != len(itos):
            raise InputError(
                f"{source}: vocab_size is {declared!r} but 'stoi' has {len(itos)} characters; "
                "recreate meta.pkl from your text"
            )
        return cls(stoi=dict(stoi), itos=dict(itos))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def to_meta(self) -> dict[str, Any]:
        """The dict nanoGPT pickles into ``meta.pkl``, with its key order."""
        return {"vocab_size": self.vocab_size, "itos": dict(self.itos), "stoi": dict(self.stoi)}

    def unknown_characters(self, text: str) -> list[str]:
        """Characters of ``text`` that have no id, sorted."""
        return sorted(set(text) - self.stoi.keys())

    def encode(self, text: str) -> list[int]:
        unknown = self.unknown_characters(text)
        if unknown:
            raise InputError(
                f"the text has {len(unknown)} character(s) outside the vocabulary: {_show_characters(unknown)}; "
                "remove or replace them"
            )
        return [self.stoi[ch] for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[int(i)] for i in ids)


def _show_characters(chars: list[str], limit: int = 12) -> str:
    # repr() so that a tab, a non-breaking space or a stray "\r" is visible in the message.
    shown = ", ".join(repr(ch) for ch in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")


# ---------------------------------------------------------------------------------------------
# meta.pkl


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read a nanoGPT ``meta.pkl`` without ever executing code from it."""
    path = Path(path)
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise InputError(
            f"{path}: no such file; a nanoGPT data directory has meta.pkl beside train.bin and val.bin"
        ) from None
    except OSError as exc:
        raise InputError(
            f"{path}: cannot read it ({exc.strerror}); check the path and its permissions"
        ) from None
    try:
        meta = unpickle_restricted(payload, META_PKL_GLOBALS, path)
    except RefusedGlobal as exc:
        raise InputError(
            f"{path} asks to import {exc.global_name} while loading; refused, since that can run code: a nanoGPT "
            "meta.pkl holds only a dict of ints and strings, so recreate it from your text"
        ) from None
    except pickle.UnpicklingError as exc:
        raise InputError(f"{path} is not a valid pickle ({exc}); recreate meta.pkl from your text") from None
    except Exception as exc:  # truncated or garbage bytes surface as many different exceptions
        raise InputError(
            f"{path} is not a readable pickle ({type(exc).__name__}: {exc}); recreate meta.pkl from your text"
        ) from None
    if not isinstance(meta, dict):
        raise InputError(
            f"{path} holds a {type(meta).__name__}, not a dict; a nanoGPT meta.pkl is a dict with "
            "vocab_size, itos and stoi"
        )
    return meta


def write_meta(path: str | Path, vocab: CharVocab) -> None:
    with open(path, "wb") as f:
        pickle.dump(vocab.to_meta(), f, protocol=META_PICKLE_PROTOCOL)


def read_vocab(path: str | Path) -> CharVocab:
    """The character vocabulary of a nanoGPT ``meta.pkl``."""
    return CharVocab.from_meta(read_meta(path), source=str(path))


# ---------------------------------------------------------------------------------------------
# train.bin / val.bin


def write_tokens(path: str | Path, ids: Iterable[int] | np.ndarray) -> None:
    """Write token ids as nanoGPT does: raw uint16, no header."""
    array = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
    if array.size and (array.min() < 0 or array.max() > np.iinfo(TOKEN_DTYPE).max):
        raise ValueError(
            f"Token ids must lie in 0..65535 for a uint16 file, got {array.min()}..{array.max()}"
        )
    array.astype(TOKEN_DTYPE).tofile(path)


def read_tokens(path: str | Path, vocab_size: int | None = None) -> np.memmap:
    """Map a nanoGPT token file read-only; with ``vocab_size``, check every id is below it.

    The check reads the whole file once, which is cheap for character data and worth it: an
    out-of-range id would otherwise surface as an index error deep inside the embedding.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; a nanoGPT data directory holds train.bin and val.bin")
    size = path.stat().st_size
    if size == 0 or size % np.dtype(TOKEN_DTYPE).itemsize:
        raise InputError(
            f"{path} is {size} bytes, not a whole, non-empty number of uint16 token ids; "
            "write it with np.array(ids, dtype=np.uint16).tofile(path)"
        )
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
    if vocab_size is not None:
        largest = int(tokens.max())
        if largest >= vocab_size:
            raise InputError(
                f"{path} holds token id {largest}, but the vocabulary has only {vocab_size} ids; "
                "the data and meta.pkl (or the checkpoint) come from different preparations"
            )
    return tokens


@dataclass(frozen=True)
class NanoGPTData:
    """The two splits of a nanoGPT data directory and its vocabulary (None without meta.pkl)."""

    train: np.ndarray
    val: np.ndarray
    vocab: CharVocab | None


def write_nanogpt_dataset(
    out_dir: str | Path, text: str, vocab: CharVocab | None = None, val_fraction: float = 0.1
) -> CharVocab:
    """Encode ``text`` and write ``train.bin``, ``val.bin`` and ``meta.pkl`` as nanoGPT's prepare.py.

    The split is positional (first 90% train, last 10% val by default), like nanoGPT's.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"Invalid val_fraction: {val_fraction} (must be between 0 and 1)")
    vocab = vocab if vocab is not None else CharVocab.from_text(text)
    ids = vocab.encode(text)
    split = int(len(ids) * (1.0 - val_fraction))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tokens(out_dir / TRAIN_FILE, ids[:split])
    write_tokens(out_dir / VAL_FILE, ids[split:])
    write_meta(out_dir / META_FILE, vocab)
    return vocab


def read_nanogpt_dataset(data_dir: str | Path, require_meta: bool = False) -> NanoGPTData:
    """Read a nanoGPT data directory; ids are checked against ``meta.pkl`` when it is there."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: no such directory; pass the folder that holds train.bin and val.bin")
    meta_path = data_dir / META_FILE
    if meta_path.is_file():
        vocab = read_vocab(meta_path)
    elif require_meta:
        raise InputError(
            f"{meta_path}: no such file; character-level training needs the vocabulary that nanoGPT's "
            "prepare.py writes there"
        )
    else:
        vocab = None
    vocab_size = vocab.vocab_size if vocab is not None else None
    return NanoGPTData(
        train=read_tokens(data_dir / TRAIN_FILE, vocab_size),
        val=read_tokens(data_dir / VAL_FILE, vocab_size),
        vocab=vocab,
    )


def encode_text_file(path: str | Path, vocab: CharVocab) -> np.ndarray:
    """Encode a UTF-8 text file with an existing vocabulary (e.g. a checkpoint's meta.pkl)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; pass a plain UTF-8 text file") from None
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it to UTF-8 first"
        ) from None
    except OSError as exc:
        raise InputError(
            f"{path}: cannot read it ({exc.strerror}); check the path and its permissions"
        ) from None
    if not text:
        raise InputError(f"{path} is empty; pass a text file with some content")
    unknown = vocab.unknown_characters(text)
    if unknown:
        raise InputError(
            f"{path} has {len(unknown)} character(s) the model's vocabulary lacks: "
            f"{_show_characters(unknown)}; remove or replace them, or train from scratch on this text"
        )
    return np.array(vocab.encode(text), dtype=TOKEN_DTYPE)


# ---------------------------------------------------------------------------------------------
# batches


def check_block_size(data: np.ndarray, block_size: int, source: str = "the data") -> None:
    """A batch needs ``block_size + 1`` consecutive tokens (inputs plus the shifted targets)."""
    if len(data) <= block_size:
        raise InputError(
            f"{source} has {len(data)} tokens, too few for block_size {block_size} "
            f"(needs at least {block_size + 1}); use more text or a smaller block size"
        )


def get_batch(
    data: np.ndarray,
    block_size: int,
    batch_size: int,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's sampler: ``batch_size`` random windows ``x`` and the same windows shifted by one, ``y``.

    The start offsets come only from ``generator``, so saving its ``get_state()`` with a run and
    restoring it resumes the exact batch sequence. Slicing the memmap reads just these windows.
    """
    check_block_size(data, block_size)
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in starts])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in starts])
    return x.to(device), y.to(device)
