"""Optimizer-state memory accounting: how many numbers each optimizer stores for given shapes.

Pure arithmetic over parameter shapes (no tensors), so it works for a checkpoint, for a preset
architecture, or for a live model. Counts are numbers of stored values; multiply by the bytes
per value of the state dtype for bytes (``state_bytes``).

The Adapprox accounting reproduces the paper's savings exactly (see ``PAPER_SAVINGS``): AdamW
stores 2N; Adapprox stores N for the first moment (when beta1 > 0), k (m + n) for every factored
matrix and a dense second moment for everything else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

from adapprox_cli.lowrank import is_factored, matrix_view_shape, rank_cap, square_matricize_shape

__all__ = [
    "PAPER_SAVINGS",
    "PRESETS",
    "PRESET_HEADS",
    "adafactor_state_numbers",
    "adalomo_state_numbers",
    "adam_mini_block",
    "adam_mini_block_numbers",
    "adam_mini_state_numbers",
    "adamw_state_numbers",
    "adapprox_state_numbers",
    "badam_state_numbers",
    "came_state_numbers",
    "coap_state_numbers",
    "galore_matrix_numbers",
    "galore_state_numbers",
    "gpt2_names",
    "gpt2_shapes",
    "lion_state_numbers",
    "llama_names",
    "llama_shapes",
    "microadam_state_bits",
    "muon_state_numbers",
    "preset_named_shapes",
    "preset_shapes",
    "savings_vs_adamw",
    "shampoo_state_numbers",
    "smmf_sign_bits",
    "smmf_state_numbers",
    "soap_state_numbers",
    "state_bytes",
    "state_size",
    "torchao_low_bit_state",
]

Shape = tuple[int, ...]


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def adamw_state_numbers(shapes: Iterable[Shape]) -> int:
    """AdamW: exp_avg and exp_avg_sq, each the size of the parameter."""
    return sum(2 * _numel(s) for s in shapes)


def adapprox_state_numbers(
    shapes: Iterable[Shape],
    rank: int | Mapping[int, int] | None = None,
    *,
    first_moment: bool = True,
    rank_max: int | None = None,
    sketch_columns: int = 0,
) -> int:
    """Numbers Adapprox stores: N if first_moment, k (m + n) per factored matrix, dense otherwise.

    rank: one rank for every factored matrix (clamped to that matrix's k_max), a mapping from
    the shape's position in ``shapes`` to its rank, or None for k_max everywhere.
    sketch_columns: the dense-EMA sketch each factored matrix also keeps, ``sketch_columns``
    x min(m, n) numbers: ``lowrank.DENSE_SKETCH_COLUMNS`` for the optimizer's default
    ``rank_rule="dense"``, 0 (the default) for the paper's accounting and ``rank_rule="step"``.
    """
    total = 0
    for i, shape in enumerate(shapes):
        numel = _numel(shape)
        if first_moment:
            total += numel
        if is_factored(shape, rank_max):
            m, n = matrix_view_shape(shape)
            k_max = rank_cap(m, n, rank_max)
            if rank is None:
                k = k_max
            elif isinstance(rank, Mapping):
                k = rank.get(i, k_max)
            else:
                k = min(int(rank), k_max)
            total += k * (m + n) + sketch_columns * min(m, n)
        else:
            total += numel
    return total


def state_size(
    shapes: Iterable[Shape],
    rank: int | Mapping[int, int] | None = None,
    *,
    first_moment: bool = True,
    rank_max: int | None = None,
    sketch_columns: int = 0,
) -> dict[str, float]:
    """Adapprox vs AdamW state for these shapes: numbers stored and the saving in percent."""
    shapes = [tuple(s) for s in shapes]
    adamw = adamw_state_numbers(shapes)
    ours = adapprox_state_numbers(
        shapes, rank, first_moment=first_moment, rank_max=rank_max, sketch_columns=sketch_columns
    )
    return {
        "adamw_numbers": adamw,
        "adapprox_numbers": ours,
        "ratio": ours / adamw if adamw else 0.0,
        "saving_percent": savings_vs_adamw(ours, adamw),
    }


def savings_vs_adamw(numbers: float, adamw_numbers: float) -> float:
    return 100.0 * (1.0 - numbers / adamw_numbers) if adamw_numbers else 0.0


# --------------------------------------------------------------------------- architectures


def gpt2_shapes(n_layer: int, n_embd: int, vocab_size: int = 50257, n_positions: int = 1024) -> list[Shape]:
    """Parameter shapes of a Hugging Face GPT-2 (Conv1D layout, lm_head tied to wte)."""
    d = n_embd
    shapes: list[Shape] = [(vocab_size, d), (n_positions, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attn.c_attn, attn.c_proj
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp.c_fc, mlp.c_proj
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def llama_shapes(
    n_layer: int = 32, dim: int = 4096, intermediate: int = 11008, vocab_size: int = 32000
) -> list[Shape]:
    """Parameter shapes of a LLaMA-style model (no biases, RMSNorm weights, untied lm_head)."""
    shapes: list[Shape] = [(vocab_size, dim)]
    for _ in range(n_layer):
        shapes += [(dim, dim)] * 4  # q, k, v, o
        shapes += [(intermediate, dim), (intermediate, dim), (dim, intermediate)]  # gate, up, down
        shapes += [(dim,), (dim,)]  # input and post-attention RMSNorm
    shapes += [(dim,), (vocab_size, dim)]  # final norm, lm_head
    return shapes


PRESETS: dict[str, dict] = {
    "gpt2-124m": dict(kind="gpt2", n_layer=12, n_embd=768),
    "gpt2-355m": dict(kind="gpt2", n_layer=24, n_embd=1024),
    "gpt2-774m": dict(kind="gpt2", n_layer=36, n_embd=1280),
    "gpt2-1.5b": dict(kind="gpt2", n_layer=48, n_embd=1600),
    "llama-7b": dict(kind="llama", n_layer=32, dim=4096, intermediate=11008, vocab_size=32000),
}


def preset_shapes(name: str) -> list[Shape]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    spec = dict(PRESETS[name])
    kind = spec.pop("kind")
    return gpt2_shapes(**spec) if kind == "gpt2" else llama_shapes(**spec)


# The paper's reported savings vs AdamW (percent), at k = k_max and k = 1, with and without the
# first moment. GPT-2 117M in the paper is the 124M-parameter Hugging Face model.
PAPER_SAVINGS: dict[str, dict[str, float]] = {
    "gpt2-124m": {"k_max_with_m": 34.50, "k1_with_m": 49.87, "k_max_without_m": 84.50, "k1_without_m": 99.87},
    "gpt2-355m": {"k_max_with_m": 33.85, "k1_with_m": 49.89, "k_max_without_m": 83.85, "k1_without_m": 99.89},
}


# --------------------------------------------------------------------------- peers
#
# What other memory-efficient optimizers store, counted the way each implementation lays out its
# state (step counters and python scalars are not counted, as for AdamW above). All functions
# return numbers of stored values at the state dtype; SMMF's first-moment signs are separate bits.


def _adafactor_factored_numbers(shape: Shape) -> int:
    # Adafactor and CAME factor the last two dimensions; leading dimensions are batch dimensions:
    # row statistics of shape shape[:-1] and column statistics of shape shape[:-2] + shape[-1:].
    *lead, m, n = shape
    return _numel(lead) * (m + n)


def adafactor_state_numbers(shapes: Iterable[Shape], *, first_moment: bool = False) -> int:
    """Adafactor (torch.optim.Adafactor, Hugging Face, fairseq): factored second moment.

    >= 2-D parameters keep row and column statistics over their last two dimensions; vectors
    and scalars a dense second moment. ``first_moment=True`` is Hugging Face's ``beta1`` option
    (a full ``exp_avg``); torch.optim.Adafactor has none.
    """
    total = 0
    for shape in shapes:
        numel = _numel(shape)
        total += _adafactor_factored_numbers(shape) if len(shape) >= 2 else numel
        if first_moment:
            total += numel
    return total


def came_state_numbers(shapes: Iterable[Shape]) -> int:
    """CAME: a full first moment, plus Adafactor's factored second moment and factored instability.

    >= 2-D: ``exp_avg_sq_row/col`` and ``exp_avg_res_row/col`` (same shapes as Adafactor's);
    otherwise a dense ``exp_avg_sq``.
    """
    total = 0
    for shape in shapes:
        numel = _numel(shape)
        total += numel + (2 * _adafactor_factored_numbers(shape) if len(shape) >= 2 else numel)
    return total


# Adam-mini 1.1.x partitions parameters by substrings of their lower-cased names, in this order.
ADAM_MINI_FULL_NAMES = ("bias",)
ADAM_MINI_EMBEDDING_NAMES = ("embed", "embd", "wte", "lm_head", "output", "final_layer")
ADAM_MINI_HEAD_NAMES = ("k_proj", "q_proj", "wq", "wk", "query", "key")
ADAM_MINI_ROW_NAMES = ("v_proj", "wv", "value", "o_proj", "wo", "attn.proj", "feed_forward", "linear", "mlp")
ADAM_MINI_BLOCKS = ("full", "head", "row", "tensor")


def adam_mini_block(name: str, shape: Shape, *, num_heads: int | None = None, default: str = "row") -> str:
    """The block Adam-mini gives a parameter: "full", "head", "row" or "tensor".

    Rules of Adam-mini 1.1.x (substring of the lower-cased name): ``bias`` -> full Adam;
    embedding/output names -> one value per row (token); query/key names -> one value per head
    (``num_heads`` equal row blocks; "row" when the head count is unknown or does not divide the
    rows); value, attention-output and MLP names -> one value per row (output neuron). Other
    matrices get ``default``: "row" here, while Adam-mini itself uses one value for the whole
    tensor ("tensor"). Other vectors and scalars (norm weights) get one value ("tensor").
    """
    if default not in ("row", "tensor"):
        raise ValueError(f"default must be 'row' or 'tensor', got {default!r}")
    lowered = name.lower()
    matrix = len(shape) >= 2
    if any(s in lowered for s in ADAM_MINI_FULL_NAMES):
        return "full"
    if not matrix:
        return "tensor"
    if any(s in lowered for s in ADAM_MINI_EMBEDDING_NAMES):
        return "row"
    if any(s in lowered for s in ADAM_MINI_HEAD_NAMES):
        rows = int(shape[0])
        return "head" if num_heads and num_heads > 0 and rows % num_heads == 0 else "row"
    if any(s in lowered for s in ADAM_MINI_ROW_NAMES):
        return "row"
    return default


def adam_mini_block_numbers(block: str, shape: Shape, num_heads: int | None = None) -> int:
    """Second-moment values one Adam-mini block kind stores for a parameter of this shape."""
    if block == "full":
        return _numel(shape)
    if block == "row":
        return int(shape[0]) if len(shape) >= 1 else 1
    if block == "head":
        if not num_heads:
            raise ValueError("block 'head' needs num_heads")
        return int(num_heads)
    if block == "tensor":
        return 1
    raise ValueError(f"block must be one of {', '.join(ADAM_MINI_BLOCKS)}, got {block!r}")


def adam_mini_state_numbers(
    named_shapes: Iterable[tuple[str, Shape]], *, num_heads: int | None = None, default: str = "row"
) -> int:
    """Adam-mini: a full first moment plus one second-moment value per block (``adam_mini_block``)."""
    total = 0
    for name, shape in named_shapes:
        block = adam_mini_block(name, shape, num_heads=num_heads, default=default)
        total += _numel(shape) + adam_mini_block_numbers(block, shape, num_heads)
    return total


def smmf_state_numbers(shapes: Iterable[Shape], *, vector_reshape: bool = True) -> int:
    """SMMF: rank-1 NNMF factors of both moments on the square-matricized tensor.

    Every tensor (vectors too, with ``vector_reshape``) is viewed as its most square (r, c)
    shape; the first and the second moment each keep r + c numbers. The first moment's signs
    are counted separately by ``smmf_sign_bits``. Without ``vector_reshape``, vectors keep plain
    Adam state (2 n).
    """
    total = 0
    for shape in shapes:
        numel = _numel(shape)
        if len(shape) < 2 and not vector_reshape:
            total += 2 * numel
            continue
        rows, cols = square_matricize_shape(numel)
        total += 2 * (rows + cols)
    return total


def smmf_sign_bits(shapes: Iterable[Shape], *, vector_reshape: bool = True) -> int:
    """SMMF's first-moment signs: one bit per element, as in the SMMF paper (1-bit packing).

    (The official code keeps a bool tensor, one byte per element.)
    """
    return sum(_numel(s) for s in shapes if len(s) >= 2 or vector_reshape)


def galore_matrix_numbers(shape: Shape, rank: int) -> int:
    """GaLore for one weight: Adam moments of the projected gradient plus the projector.

    For an m x n matrix view at rank r = min(rank, m, n) GaLore projects the shorter side:
    moments of shape (max, r) twice and a projector of (min, r), r (2 max(m, n) + min(m, n))
    numbers. Falls back to Adam (2 m n) when projecting would store more, and for vectors.
    """
    view = matrix_view_shape(shape)
    numel = _numel(shape)
    if view is None or rank < 1:
        return 2 * numel
    m, n = view
    r = min(rank, m, n)
    projected = r * (2 * max(m, n) + min(m, n))
    return min(projected, 2 * numel)


def galore_state_numbers(shapes: Iterable[Shape], rank: int = 128) -> int:
    """GaLore at ``rank`` applied to every weight matrix (its best case; GaLore's own scripts
    project only attention and MLP weights and leave embeddings to Adam)."""
    return sum(galore_matrix_numbers(tuple(s), rank) for s in shapes)


def coap_state_numbers(shapes: Iterable[Shape], rank: int = 128) -> int:
    """COAP (Xiao et al., arXiv:2412.00071): GaLore's layout, a projector and the Adam moments of
    the projected gradient per matrix (its correlation-aware projection update keeps no other
    persistent buffer); vectors keep Adam."""
    return galore_state_numbers(shapes, rank)


def adalomo_state_numbers(shapes: Iterable[Shape]) -> int:
    """AdaLomo (Lv et al., arXiv:2310.10195): Adafactor's factored second moment, no first moment.

    (It also fuses the update into the backward pass, so it keeps no gradients either; that
    saving belongs to the gradient budget, not to the optimizer state counted here.)"""
    return adafactor_state_numbers(shapes, first_moment=False)


def _layer_block(name: str) -> str:
    # "model.layers.3.mlp.up_proj.weight" -> "model.layers.3": BAdam's default blocks are layers.
    match = re.match(r"^(.*?\.\d+)(?:\.|$)", name)
    return match.group(1) if match else name


def badam_state_numbers(named_shapes: Iterable[tuple[str, Shape]]) -> int:
    """BAdam (Luo et al., arXiv:2404.02827): block coordinate descent, Adam state for the active
    block only, freed when the block switches. Blocks are transformer layers (names up to the
    first number); every other parameter is a block of its own (``include_embedding``), so this
    is 2 x the largest block."""
    blocks: dict[str, int] = {}
    for name, shape in named_shapes:
        key = _layer_block(name)
        blocks[key] = blocks.get(key, 0) + _numel(shape)
    return 2 * max(blocks.values(), default=0)


MICROADAM_WINDOW = 10  # m gradients kept (the paper's default)
MICROADAM_DENSITY = 0.01  # top-k: 1% of the entries of each gradient


def microadam_state_bits(
    shapes: Iterable[Shape], *, window: int = MICROADAM_WINDOW, density: float = MICROADAM_DENSITY
) -> int:
    """MicroAdam (Modoranu et al., arXiv:2405.15593): no dense moments; a window of ``window``
    sparse gradients (top ``density`` entries, a bf16 value and an int16 index each) and a 4-bit
    quantized error-feedback buffer, ~0.9 bytes per parameter at the defaults (the paper's 0.9d).
    The per-bucket min/max of the quantizer (two bf16 per bucket of thousands) is not counted."""
    bits = 0
    for shape in shapes:
        numel = _numel(shape)
        bits += 4 * numel + window * math.ceil(density * numel) * (16 + 16)
    return bits


SOAP_MAX_PRECOND_DIM = 10_000  # SOAP's default: larger dimensions are left unpreconditioned


def soap_state_numbers(shapes: Iterable[Shape], *, max_precond_dim: int = SOAP_MAX_PRECOND_DIM) -> int:
    """SOAP (Vyas et al., arXiv:2409.11321): Adam's two moments in the rotated basis plus, per
    dimension <= ``max_precond_dim`` of a >= 2-D tensor, Shampoo's statistics GG and its
    eigenbasis Q (d x d each). Vectors get plain Adam (``precondition_1d=False``). More than
    AdamW by construction."""
    total = 0
    for shape in shapes:
        total += 2 * _numel(shape)
        if len(shape) >= 2:
            total += sum(2 * int(d) ** 2 for d in shape if int(d) <= max_precond_dim)
    return total


def shampoo_state_numbers(shapes: Iterable[Shape]) -> int:
    """Shampoo (Gupta et al., arXiv:1802.09568): per dimension d of every tensor, the statistics
    (d x d) and its inverse root (d x d), as in the paper's Algorithm 2 (no blocking, no
    momentum or grafting). More than AdamW for any layer wider than a few dimensions."""
    return sum(2 * int(d) ** 2 for shape in shapes for d in shape)


def lion_state_numbers(shapes: Iterable[Shape]) -> int:
    """Lion (Chen et al., arXiv:2302.06675): one momentum buffer the size of the parameter."""
    return sum(_numel(s) for s in shapes)


MUON_ADAMW_NAMES = ("embed", "embd", "wte", "wpe", "lm_head", "output")


def muon_state_numbers(named_shapes: Iterable[tuple[str, Shape]]) -> int:
    """Muon (Jordan et al. 2024; Liu et al., arXiv:2502.16982): one momentum buffer per hidden
    matrix; embeddings, the output head and vectors are trained by AdamW (two buffers), as the
    Muon reference code and Moonlight do."""
    total = 0
    for name, shape in named_shapes:
        adamw = len(shape) < 2 or any(s in name.lower() for s in MUON_ADAMW_NAMES)
        total += (2 if adamw else 1) * _numel(shape)
    return total


TORCHAO_MIN_NUMEL = 4096  # torchao quantizes a state only from this size, in whole blocks


def torchao_low_bit_state(shapes: Iterable[Shape], *, bits: int) -> tuple[int, int]:
    """torchao's AdamW8bit / AdamW4bit (``torchao.optim``): both moments as block-wise quantized
    codes (Dettmers et al., arXiv:2110.02861, blocks of 256; Li et al., arXiv:2309.01507, blocks
    of 128 for 4 bits), one scale per block and the code book (256 or 16 values) per tensor.
    Tensors under 4096 elements or not a whole number of blocks keep plain 32-bit moments.

    Returns (numbers at the state dtype: scales, code books, plain moments; packed code bits).
    """
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    block = 256 if bits == 8 else 128
    numbers = code_bits = 0
    for shape in shapes:
        numel = _numel(shape)
        if numel >= TORCHAO_MIN_NUMEL and numel % block == 0:
            numbers += 2 * (numel // block + 2**bits)
            code_bits += 2 * bits * numel
        else:
            numbers += 2 * numel
    return numbers, code_bits


def state_bytes(numbers: int, bytes_per_number: int = 4, bits: int = 0) -> int:
    """Bytes for ``numbers`` values of ``bytes_per_number`` each, plus ``bits`` of packed codes
    (SMMF's sign bits, quantized states)."""
    return numbers * bytes_per_number + (bits + 7) // 8


# --------------------------------------------------------------------------- preset names


def gpt2_names(n_layer: int) -> list[str]:
    """Hugging Face GPT-2 parameter names, in the order of ``gpt2_shapes``."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        names += [h + s for s in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias")]
        names += [h + s for s in ("attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias")]
        names += [h + s for s in ("mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")]
    return [*names, "transformer.ln_f.weight", "transformer.ln_f.bias"]


def llama_names(n_layer: int = 32) -> list[str]:
    """LLaMA parameter names (Hugging Face), in the order of ``llama_shapes``."""
    names = ["model.embed_tokens.weight"]
    for i in range(n_layer):
        layer = f"model.layers.{i}."
        names += [layer + f"self_attn.{p}_proj.weight" for p in ("q", "k", "v", "o")]
        names += [layer + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        names += [layer + "input_layernorm.weight", layer + "post_attention_layernorm.weight"]
    return [*names, "model.norm.weight", "lm_head.weight"]


PRESET_HEADS: dict[str, int] = {
    "gpt2-124m": 12,
    "gpt2-355m": 16,
    "gpt2-774m": 20,
    "gpt2-1.5b": 25,
    "llama-7b": 32,
}


def preset_named_shapes(name: str) -> list[tuple[str, Shape]]:
    """(parameter name, shape) pairs of a preset architecture, in optimizer order."""
    shapes = preset_shapes(name)
    spec = PRESETS[name]
    names = gpt2_names(spec["n_layer"]) if spec["kind"] == "gpt2" else llama_names(spec["n_layer"])
    return list(zip(names, shapes, strict=True))
