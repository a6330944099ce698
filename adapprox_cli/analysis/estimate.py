"""The rank adaptive S-RSI settles on at a tolerance, and the optimizer-state memory of AdamW,
Adapprox and its peers (``adapprox estimate``): from a checkpoint's moments, or from parameter
shapes alone (a preset, a Hugging Face config) at fixed ranks."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from adapprox_cli import lowrank, memory
from adapprox_cli.analysis.moments import Moment, ProgressCallback, as_moments, load_matrix, resolve_dtype
from adapprox_cli.analysis.numerics import exact_squared_singular_values, frobenius_sq, tail_errors
from adapprox_cli.defaults import DEFAULT_TOL
from adapprox_cli.devices import resolve_device
from adapprox_cli.errors import ParameterError
from adapprox_cli.formatting import dtype_name
from adapprox_cli.validation import check_at_least

__all__ = [
    "PEER_OPTIMIZERS",
    "PRECISIONS",
    "EstimateReport",
    "MatrixRanks",
    "MemoryRow",
    "PeerOptimizer",
    "estimate_config",
    "estimate_memory",
    "estimate_preset",
    "estimate_shapes",
    "ranks_from_sibling",
    "simulate_adaptive_rank",
    "training_totals",
]


@dataclass
class MatrixRanks:
    """The rank Adapprox settles on for one factored matrix, per tolerance."""

    name: str
    matrix_shape: tuple[int, int]
    rank_max: int
    ranks: dict[float, int]
    errors: dict[float, float]  # relative error reached at that rank
    capped: dict[float, bool]  # True when even rank_max misses the tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "matrix_shape": list(self.matrix_shape),
            "rank_max": self.rank_max,
            "ranks": {str(t): r for t, r in self.ranks.items()},
            "errors": {str(t): e for t, e in self.errors.items()},
            "capped": {str(t): c for t, c in self.capped.items()},
        }


@dataclass
class MemoryRow:
    """Optimizer-state memory of one optimizer configuration."""

    # adamw | adapprox | adapprox_no_m | a PEER_OPTIMIZERS key
    optimizer: str
    label: str
    setting: str  # "tol=0.05", "k=192", "r=128" or ""
    numbers: int
    bits: int
    bytes: int
    saving_percent: float  # vs AdamW

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EstimateReport:
    source: str  # checkpoint path or preset name
    parameters: int  # elements of every parameter counted
    bytes_per_number: int
    rule: str  # how ranks were chosen: "exact", "as-rsi" or "fixed"
    matrices: list[MatrixRanks]
    memory: list[MemoryRow]
    settings: dict[str, Any]
    # Planning from shapes: per row, weights + gradients + state at each of PRECISIONS.
    totals: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the numbers rest on that may not hold

    def to_dict(self) -> dict[str, Any]:
        out = {
            "source": self.source,
            "parameters": self.parameters,
            "bytes_per_number": self.bytes_per_number,
            "rule": self.rule,
            "settings": self.settings,
            "matrices": [m.to_dict() for m in self.matrices],
            "memory": [r.to_dict() for r in self.memory],
        }
        if self.totals:
            out["training_totals"] = self.totals
        if self.warnings:
            out["warnings"] = self.warnings
        return out


@dataclass(frozen=True)
class PeerSettings:
    """The knobs of the peers whose state depends on more than the shapes."""

    galore_rank: int = 128  # GaLore's and COAP's projection rank
    num_heads: int | None = None  # Adam-mini's per-head blocks of attention matrices
    adam_mini_default: str = "row"  # Adam-mini's block for a matrix its name rules do not place


@dataclass(frozen=True)
class PeerOptimizer:
    """A peer optimizer ``estimate`` compares against: its memory row from the parameter shapes."""

    key: str
    label: str
    # (named shapes, peer settings) -> (setting shown, numbers, packed bits)
    count: Callable[[list[tuple[str, tuple[int, ...]]], PeerSettings], tuple[str, int, int]] = field(
        repr=False
    )


# The one list of peers, in table order (after AdamW and the Adapprox rows).
PEER_OPTIMIZERS = (
    PeerOptimizer(
        "adafactor", "Adafactor", lambda ns, p: ("", memory.adafactor_state_numbers(_shapes(ns)), 0)
    ),
    PeerOptimizer(
        "adafactor_m",
        "Adafactor (beta1)",
        lambda ns, p: ("", memory.adafactor_state_numbers(_shapes(ns), first_moment=True), 0),
    ),
    PeerOptimizer("came", "CAME", lambda ns, p: ("", memory.came_state_numbers(_shapes(ns)), 0)),
    PeerOptimizer(
        "adam_mini",
        "Adam-mini",
        lambda ns, p: (
            "",
            memory.adam_mini_state_numbers(ns, num_heads=p.num_heads, default=p.adam_mini_default),
            0,
        ),
    ),
    PeerOptimizer(
        "smmf",
        "SMMF",
        lambda ns, p: ("", memory.smmf_state_numbers(_shapes(ns)), memory.smmf_sign_bits(_shapes(ns))),
    ),
    PeerOptimizer(
        "galore",
        "GaLore",
        lambda ns, p: (f"r={p.galore_rank}", memory.galore_state_numbers(_shapes(ns), p.galore_rank), 0),
    ),
    PeerOptimizer(
        "coap",
        "COAP",
        lambda ns, p: (f"r={p.galore_rank}", memory.coap_state_numbers(_shapes(ns), p.galore_rank), 0),
    ),
    PeerOptimizer("adalomo", "AdaLomo", lambda ns, p: ("", memory.adalomo_state_numbers(_shapes(ns)), 0)),
    PeerOptimizer("badam", "BAdam", lambda ns, p: ("active block", memory.badam_state_numbers(ns), 0)),
    PeerOptimizer(
        "microadam",
        "MicroAdam",
        lambda ns, p: (
            f"m={memory.MICROADAM_WINDOW}, 1%",
            0,
            memory.microadam_state_bits(_shapes(ns)),
        ),
    ),
    PeerOptimizer(
        "torchao_adamw8bit",
        "torchao AdamW8bit",
        lambda ns, p: ("", *memory.torchao_low_bit_state(_shapes(ns), bits=8)),
    ),
    PeerOptimizer(
        "torchao_adamw4bit",
        "torchao AdamW4bit",
        lambda ns, p: ("", *memory.torchao_low_bit_state(_shapes(ns), bits=4)),
    ),
    PeerOptimizer("lion", "Lion", lambda ns, p: ("", memory.lion_state_numbers(_shapes(ns)), 0)),
    PeerOptimizer("muon", "Muon", lambda ns, p: ("+AdamW", memory.muon_state_numbers(ns), 0)),
    PeerOptimizer("fadam", "FAdam", lambda ns, p: ("", memory.adamw_state_numbers(_shapes(ns)), 0)),
    PeerOptimizer("soap", "SOAP", lambda ns, p: ("", memory.soap_state_numbers(_shapes(ns)), 0)),
    PeerOptimizer("shampoo", "Shampoo", lambda ns, p: ("", memory.shampoo_state_numbers(_shapes(ns)), 0)),
)

_LABELS = {
    "adamw": "AdamW",
    "adapprox": "Adapprox",
    "adapprox_no_m": "Adapprox (beta1=0)",
    **{peer.key: peer.label for peer in PEER_OPTIMIZERS},
}


def _shapes(named_shapes: list[tuple[str, tuple[int, ...]]]) -> list[tuple[int, ...]]:
    return [s for _, s in named_shapes]


def simulate_adaptive_rank(
    v: Tensor,
    tol: float,
    *,
    rank_max: int | None = None,
    rank_min: int = 1,
    oversample: int = 5,
    power_iters: int = 5,
    generator: torch.Generator | None = None,
) -> tuple[int, float, int]:
    """The rank AS-RSI settles on for a fixed V: (rank, relative error there, rounds).

    Runs ``lowrank.as_rsi`` from rank 1 as the optimizer does step after step (warm-started from
    the previous factor), on the same matrix, until the rank stops changing. The rank grows by at
    most ``oversample`` per round, so this takes about rank / oversample rounds. If the ranks
    cycle (a tolerance right at a sketch's noise level), the largest rank of the cycle is kept.
    """
    m, n = v.shape
    k_max = lowrank.rank_cap(m, n, rank_max)
    rank, warm, history = max(1, rank_min), None, []
    for rounds in range(1, k_max // max(1, oversample) + 20):
        factors = lowrank.as_rsi(
            v, rank, rank_min=rank_min, rank_max=k_max, tol=tol, oversample=oversample,
            power_iters=power_iters, generator=generator, warm_start=warm,
        )  # fmt: skip
        if factors.rank == rank:
            return rank, _sketch_error(factors, rank), rounds
        history.append(rank)
        if factors.rank in history:  # a cycle: keep its largest rank
            chosen = max(history[history.index(factors.rank) :])
            return chosen, _sketch_error(factors, chosen), rounds
        rank, warm = factors.rank, factors.q
    return rank, _sketch_error(factors, rank), rounds


def _sketch_error(factors: lowrank.LowRankFactors, rank: int) -> float:
    errors = factors.relative_errors
    return float(errors[min(rank, len(errors)) - 1]) if len(errors) else 0.0


def estimate_memory(
    moments: Iterable[tuple[str, Tensor] | Moment],
    *,
    tolerances: Sequence[float] = (DEFAULT_TOL,),
    rank_max: int | None = None,
    fixed_ranks: Sequence[int] = (),
    rule: str = "exact",
    galore_rank: int = 128,
    bytes_per_number: int = 4,
    num_heads: int | None = None,
    adam_mini_default: str = "row",
    oversample: int = 5,
    power_iters: int = 5,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    source: str = "",
    progress: ProgressCallback | None = None,
    sketch_columns: int = 0,
) -> EstimateReport:
    """Ranks Adapprox picks per tolerance, and the state memory of AdamW, Adapprox and peers.

    ``moments`` should hold every parameter with optimizer state (vectors too: they count in
    the memory totals). Matrices Adapprox factors (``lowrank.is_factored``) get a rank per
    tolerance, with ``rule``:

    - "exact" (default): the smallest rank r in [1, k_max] whose optimal (truncated-SVD) error
      is <= tol, or k_max when none is. This is the fixed point of the optimizer's AS-RSI rule
      for a matrix that stops changing, with an exact sketch.
    - "as-rsi": run ``lowrank.as_rsi`` from rank 1 until the rank stops changing
      (``simulate_adaptive_rank``); randomized, slower, and equal to "exact" or a rank above it
      (a sketch's error can only overestimate the optimum).

    ``fixed_ranks`` adds Adapprox rows with one rank for every factored matrix (clamped to its
    k_max), computed from the shapes alone. ``sketch_columns`` adds the dense-EMA sketch to the
    tol rows (``lowrank.DENSE_SKETCH_COLUMNS`` x min(m, n) per factored matrix, what the
    optimizer's default ``rank_rule="dense"`` keeps; ``adapprox estimate`` passes it).

    What the "exact" tol rows predict: the rank whose exact truncation error of the checkpoint's
    second moment is <= tol. Under the optimizer's default rule (tol bounds the distance to the
    dense EMA) that is the memory the optimizer settles at, measured 0.84-1.0x of the settled
    factor memory on the sample nanoGPT (``benchmarks/bench_tol.py``, ``bench_resume.py``).
    """
    if rule not in ("exact", "as-rsi"):
        raise ParameterError("rule", f"{{name}} must be exact or as-rsi, got {rule!r}")
    tolerances = sorted({float(t) for t in tolerances}, reverse=True)
    if not tolerances or any(not (0 <= t < 1) for t in tolerances):
        got = ", ".join(map(str, tolerances)) or "none"
        raise ParameterError("tolerances", f"{{name}} values must be in [0, 1), got {got}")
    if rank_max is not None:
        check_at_least(rank_max, 1, "rank_max")
    for k in fixed_ranks:
        check_at_least(k, 1, "fixed_ranks")
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    moments = as_moments(moments)
    factored = [(i, m) for i, m in enumerate(moments) if lowrank.is_factored(m.shape, rank_max)]
    matrices = []
    for done, (_, moment) in enumerate(factored):
        if progress:
            progress(done, len(factored), moment.name)
        v = load_matrix(moment, dtype, device)
        matrices.append(
            _matrix_ranks(
                moment,
                v,
                tolerances,
                rank_max,
                rule,
                oversample=oversample,
                power_iters=power_iters,
                seed=seed,
            )
        )
        del v
    if progress:
        progress(len(factored), len(factored), "")
    named_shapes = [(m.name, m.shape) for m in moments]
    ranks_by_tol = {
        t: {i: r.ranks[t] for (i, _), r in zip(factored, matrices, strict=True)} for t in tolerances
    }
    settings_ranks: dict[str, Any] = {f"tol={t:g}": ranks_by_tol[t] for t in tolerances}
    settings_ranks.update({f"k={k}": int(k) for k in fixed_ranks})
    peers = PeerSettings(galore_rank, num_heads, adam_mini_default)
    memory_rows = _memory_rows(
        named_shapes,
        settings_ranks,
        peers,
        bytes_per_number,
        rank_max=rank_max,
        sketch_columns=sketch_columns,
    )
    settings = dict(
        tolerances=tolerances, rank_max=rank_max, fixed_ranks=list(fixed_ranks), galore_rank=galore_rank,
        num_heads=num_heads,
        adam_mini_default=adam_mini_default, oversample=oversample, power_iters=power_iters,
        dtype=dtype_name(dtype), device=str(device), seed=seed,
    )  # fmt: skip
    parameters = sum(m.numel for m in moments)
    return EstimateReport(source, parameters, bytes_per_number, rule, matrices, memory_rows, settings)


def _matrix_ranks(
    moment: Moment,
    v: Tensor,
    tolerances: Sequence[float],
    rank_max: int | None,
    rule: str,
    *,  # the as-rsi rule's sketch settings
    oversample: int,
    power_iters: int,
    seed: int,
) -> MatrixRanks:
    m, n = v.shape
    k_max = lowrank.rank_cap(m, n, rank_max)
    fro_sq = frobenius_sq(v, moment.name)
    ranks, errors, capped = {}, {}, {}
    if rule == "exact":
        tails = tail_errors(exact_squared_singular_values(v), fro_sq)
        for t in tolerances:
            r = lowrank.settled_rank(tails[1:], rank_max=k_max, tol=t)
            capped[t] = r is None
            ranks[t] = k_max if capped[t] else r
            errors[t] = float(tails[ranks[t]])
    else:
        for t in tolerances:
            generator = lowrank.seeded_generator(seed, moment.index, device=v.device)
            ranks[t], errors[t], _ = simulate_adaptive_rank(
                v, t, rank_max=k_max, oversample=oversample, power_iters=power_iters, generator=generator
            )
            capped[t] = errors[t] > t
    return MatrixRanks(moment.name, (m, n), k_max, ranks, errors, capped)


def _memory_rows(
    named_shapes: list[tuple[str, tuple[int, ...]]],
    adapprox_ranks: dict[str, dict[int, int] | int | None],
    peers: PeerSettings,
    bytes_per_number: int,
    *,
    rank_max: int | None = None,
    sketch_columns: int = 0,
) -> list[MemoryRow]:
    """AdamW, Adapprox with and without first moment for each rank setting, then the peers."""
    shapes = [s for _, s in named_shapes]
    counts: list[tuple[str, str, int, int]] = [("adamw", "", memory.adamw_state_numbers(shapes), 0)]
    for setting, ranks in adapprox_ranks.items():
        # A tol row is the state the optimizer settles at: with the sketch its default
        # rank_rule="dense" keeps per factored matrix when asked; a fixed-rank row is the paper's.
        sketch = sketch_columns if setting.startswith("tol=") else 0
        for key, first in (("adapprox", True), ("adapprox_no_m", False)):
            numbers = memory.adapprox_state_numbers(
                shapes, ranks, first_moment=first, rank_max=rank_max, sketch_columns=sketch
            )
            counts.append((key, setting, numbers, 0))
    for peer in PEER_OPTIMIZERS:
        setting, numbers, bits = peer.count(named_shapes, peers)
        counts.append((peer.key, setting, numbers, bits))
    adamw_bytes = memory.state_bytes(counts[0][2], bytes_per_number)
    rows = []
    for key, setting, numbers, bits in counts:
        size = memory.state_bytes(numbers, bytes_per_number, bits)
        saving = memory.savings_vs_adamw(size, adamw_bytes)
        rows.append(MemoryRow(key, _LABELS[key], setting, numbers, bits, size, saving))
    return rows


def estimate_preset(
    preset: str,
    ranks: Sequence[int | None] = (None, 1),
    *,
    galore_rank: int = 128,
    bytes_per_number: int = 4,
    adam_mini_default: str = "row",
) -> EstimateReport:
    """Memory of a preset architecture (``memory.PRESETS``) at fixed Adapprox ranks; no checkpoint.

    ``ranks``: one rank for every factored matrix, clamped to its k_max = min(m, n) // 4; None
    means k_max. The defaults give the two ends of the paper's range.
    """
    if preset not in memory.PRESETS:
        raise ParameterError("preset", f"{{name}} must be one of {', '.join(memory.PRESETS)}, got {preset!r}")
    return estimate_shapes(
        memory.preset_named_shapes(preset),
        preset,
        ranks,
        galore_rank=galore_rank,
        bytes_per_number=bytes_per_number,
        num_heads=memory.PRESET_HEADS.get(preset),
        adam_mini_default=adam_mini_default,
    )


def estimate_config(
    config: dict[str, Any],
    source: str,
    ranks: Sequence[int | None] = (None, 1),
    *,
    galore_rank: int = 128,
    adam_mini_default: str = "row",
    sibling: EstimateReport | None = None,
) -> EstimateReport:
    """Memory of the model a Hugging Face config.json describes, at fixed Adapprox ranks, and
    at the ranks ``sibling`` (``estimate_memory`` of a smaller model of the same family)
    measured at each of its tolerances (``ranks_from_sibling``)."""
    from adapprox_cli.model_shapes import config_named_shapes

    named_shapes = config_named_shapes(config, source)
    heads = config.get("num_attention_heads") or config.get("n_head")
    return estimate_shapes(
        named_shapes,
        source,
        ranks,
        galore_rank=galore_rank,
        num_heads=heads if isinstance(heads, int) and heads > 0 else None,
        adam_mini_default=adam_mini_default,
        sibling=sibling,
    )


def _matrix_kind(name: str) -> str:
    # "h.7.mlp.c_fc.weight" and "h.0.mlp.c_fc.weight" are one kind of matrix.
    return re.sub(r"\d+", "#", name)


def ranks_from_sibling(
    named_shapes: list[tuple[str, tuple[int, ...]]], sibling: EstimateReport, tol: float
) -> dict[int, int]:
    """Ranks for a larger model's matrices from those measured on a smaller sibling at ``tol``.

    Each kind of matrix (name with layer numbers ignored) takes the largest rank / k_max the
    sibling needed for that kind, applied to its own k_max (rounded up, at least 1): a [decided]
    assumption that the share of directions a tolerance needs carries over with width; it errs
    towards more memory, since absolute ranks usually grow more slowly than k_max. Kinds the
    sibling lacks get k_max. Keys are positions in ``named_shapes``, as
    ``memory.adapprox_state_numbers`` takes them.
    """
    share: dict[str, float] = {}
    for m in sibling.matrices:
        kind = _matrix_kind(m.name)
        share[kind] = max(share.get(kind, 0.0), m.ranks[tol] / m.rank_max)
    out = {}
    for i, (name, shape) in enumerate(named_shapes):
        view = lowrank.matrix_view_shape(shape)
        if view is None or not lowrank.is_factored(shape):
            continue
        k_max = lowrank.rank_cap(*view)
        out[i] = max(1, min(k_max, math.ceil(share.get(_matrix_kind(name), 1.0) * k_max)))
    return out


def _sibling_coverage_warning(
    named_shapes: list[tuple[str, tuple[int, ...]]], sibling: EstimateReport, source: str
) -> str | None:
    """A warning when the sibling measured few of the kinds of matrix the planned model has.

    A kind the sibling lacks is planned at k_max, so a sibling of another family (other names)
    makes every "from the sibling" row the k_max row in disguise.
    """
    measured = {_matrix_kind(m.name) for m in sibling.matrices}
    kinds = {_matrix_kind(name) for name, shape in named_shapes if lowrank.is_factored(shape)}
    missing = sorted(kinds - measured)
    if not kinds or len(missing) * 2 < len(kinds):
        return None
    example = next(iter(sorted(measured)), "none")
    return (
        f"{sibling.source} measured {len(kinds) - len(missing)} of the {len(kinds)} kinds of factored "
        f"matrix of {source} (it has e.g. {example}; {source} has {missing[0]}): the others are planned "
        "at k_max; give the checkpoint of a smaller model of the same family"
    )


def estimate_shapes(
    named_shapes: list[tuple[str, tuple[int, ...]]],
    source: str,
    ranks: Sequence[int | None] = (None, 1),
    *,
    galore_rank: int = 128,
    bytes_per_number: int = 4,
    num_heads: int | None = None,
    adam_mini_default: str = "row",
    sibling: EstimateReport | None = None,
) -> EstimateReport:
    """State memory of every optimizer for these parameter shapes at fixed Adapprox ranks (and
    at the ranks a measured ``sibling`` gives, see ``ranks_from_sibling``), and the training
    totals (weights + gradients + state) at the usual precisions."""
    for k in ranks:
        if k is not None:  # None: k_max
            check_at_least(k, 1, "ranks")
    k_maxes = sorted({lowrank.rank_cap(*v) for _, s in named_shapes if (v := lowrank.matrix_view_shape(s))})
    settings_ranks: dict[str, int | None] = {}
    for k in ranks:
        if k is None:
            label = f"k={k_maxes[0]} (k_max)" if len(k_maxes) == 1 else "k=k_max"
        else:
            label = f"k={k}" if all(k <= km for km in k_maxes) else f"k={k} (clamped to k_max)"
        settings_ranks[label] = k
    measured: dict[str, Any] = {}
    if sibling is not None:
        for t in sibling.settings["tolerances"]:
            measured[f"tol={t:g} (from {sibling.source})"] = ranks_from_sibling(named_shapes, sibling, t)
    peers = PeerSettings(galore_rank, num_heads, adam_mini_default)
    rows = _memory_rows(named_shapes, {**measured, **settings_ranks}, peers, bytes_per_number)
    parameters = sum(math.prod(s) for _, s in named_shapes)
    settings = dict(ranks=list(ranks), galore_rank=galore_rank, adam_mini_default=adam_mini_default)
    if sibling is not None:
        settings["sibling"] = sibling.source
        settings["sibling_tolerances"] = list(sibling.settings["tolerances"])
    report = EstimateReport(source, parameters, bytes_per_number, "fixed", [], rows, settings)
    report.totals = training_totals(rows, parameters)
    if sibling is not None and (warning := _sibling_coverage_warning(named_shapes, sibling, source)):
        report.warnings.append(warning)
    return report


# Bytes per parameter for weights + gradients (+ fp32 master copy), and per state value, of the
# precisions people train in. Activations are not counted: they depend on batch and sequence.
PRECISIONS = {
    "fp32": (4 + 4, 4),  # fp32 weights and gradients, fp32 state
    "bf16 + fp32 master": (2 + 2 + 4, 4),  # bf16 weights and gradients, fp32 master weights and state
    "pure bf16": (2 + 2, 2),  # bf16 weights, gradients and state (no master copy)
}


def training_totals(rows: Sequence[MemoryRow], parameters: int) -> list[dict[str, Any]]:
    """Per optimizer row: weights + gradients + optimizer state, in bytes, for each of PRECISIONS."""
    totals = []
    for r in rows:
        per_precision = {
            name: parameters * weight_bytes + memory.state_bytes(r.numbers, state_bytes, r.bits)
            for name, (weight_bytes, state_bytes) in PRECISIONS.items()
        }
        totals.append(
            {"optimizer": r.optimizer, "label": r.label, "setting": r.setting, "bytes": per_precision}
        )
    return totals
