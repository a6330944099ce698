"""Adapprox step time and state bytes vs AdamW(foreach=True) and Adafactor on GPT-2 small shapes.

Parameters: the 124,439,808-parameter GPT-2 small in Hugging Face shapes
(``adapprox_cli.memory.gpt2_shapes(12, 768)``, lm_head tied to wte), float32, on the CPU (or
CUDA with ``--device cuda``; skipped cleanly when there is none). One parameter set is shared
by all optimizers (each keeps its own state), so memory stays bounded; the updates use lr 1e-5.

Gradients are generated once and reused every step. Default ``--grads structured``: every 2-D
gradient is G = signs * sqrt(W) with W a synthetic second moment with a realistic spectrum
(common.realistic_second_moment: log-normal row/column scales, a rank-8 signal, noise averaged
over 256 steps; rank-1/8/32 errors about 0.28/0.14/0.05 at 768 x 3072). Adam's V is then
(1 - beta2^t) W, so the adaptive ranks settle where W's truncation error meets ``tol``; the
script steps the Adapprox optimizers until no rank changes (at most --max-settle steps) before
timing. ``--grads gaussian`` feeds iid N(0, 1) gradients instead (no structure: ranks climb
towards k_max, a worst case). A fixed-rank k_max configuration (rank_init = rank_min = 192)
shows the worst-case step and state regardless of gradients. 1-D gradients are N(0, 1).

Timing: after one warm-up step each, the optimizers step in rotated round-robin order for
--rounds rounds (medians; ratios to AdamW from the same rounds). Breakdown of Adapprox's step:
``adapprox_cli.optim._srsi`` (S-RSI; ``_srsi_batched`` on the batched path), ``_rank_choices``
(rank selection, with its one host sync on the loop) and ``_finite_flags`` (NaN/Inf check) are wrapped with timers; "rest" is the remainder
(rebuilding V = clamp(Q U^T) * beta2 + (1 - beta2) G^2, sqrt, the update, clipping, moments).
A torch.profiler table of one Adapprox step lists the most expensive operators.
"Adapprox b1=0.9, S-RSI v0" runs the library optimizer with the S-RSI body as first written
swapped in (common.srsi_before_patch: V^T Q as v.T @ q, ||V||^2 via a full temporary), to show
what the library's later fixes of those two lines bought inside a real step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict

import torch
from common import (
    base_parser,
    configure_threads,
    median,
    optimizer_state_bytes,
    print_table,
    realistic_second_moment,
    srsi_before_patch,
    structured_gradient,
    synchronize,
    write_json,
)

import adapprox_cli.optim as optim_module
from adapprox_cli.lowrank import DENSE_SKETCH_COLUMNS
from adapprox_cli.memory import adamw_state_numbers, adapprox_state_numbers, gpt2_shapes
from adapprox_cli.optim import Adapprox

LR = 1e-5
WRAPPED = ("_srsi", "_srsi_batched", "_rank_choices", "_finite_flags")


class Breakdown:
    """Accumulates the seconds spent in the wrapped optimizer internals during one step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            synchronize(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start
            return out

        return timed


# The S-RSI body as first written (common.srsi_before_patch), to show what its two fixes bought.
PATCHES = {"_srsi": srsi_before_patch}


@contextlib.contextmanager
def instrumented(breakdown: Breakdown | None, patches: dict | None = None):
    """Swap ``adapprox_cli.optim``'s private helpers for timed (and optionally patched) ones."""
    originals = {name: getattr(optim_module, name) for name in WRAPPED}
    try:
        for name, fn in (patches or {}).items():
            setattr(optim_module, name, fn)
        if breakdown is not None:
            for name in WRAPPED:
                setattr(optim_module, name, breakdown.wrap(name, getattr(optim_module, name)))
        yield
    finally:
        for name, fn in originals.items():
            setattr(optim_module, name, fn)


def make_parameters(shapes, grads_kind: str, device: torch.device, seed: int):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for index, shape in enumerate(shapes):
        p = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(device))
        if len(shape) >= 2 and grads_kind == "structured":
            m, n = shape[0], math.prod(shape[1:])
            _, w = realistic_second_moment(m, n, seed=seed + 1000 + index)
            grad = structured_gradient(w, seed=seed + 2000 + index).reshape(shape)
            del w
        else:
            grad = torch.randn(shape, generator=generator)
        p.grad = grad.to(device)
        params.append(p)
    return params


def build_optimizers(params, include_patch: bool, include_fixed: bool):
    optimizers = {
        "AdamW (foreach)": (torch.optim.AdamW(params, lr=LR, foreach=True), None),
        "Adafactor (torch)": (torch.optim.Adafactor(params, lr=LR), None),
        "Adapprox b1=0.9": (Adapprox(params, lr=LR, foreach=False), None),
        "Adapprox b1=0.9, batched": (Adapprox(params, lr=LR, foreach=True), None),
        "Adapprox b1=0": (Adapprox(params, lr=LR, betas=(0.0, 0.999), foreach=False), None),
    }
    if include_patch:
        optimizers["Adapprox b1=0.9, S-RSI v0"] = (Adapprox(params, lr=LR, foreach=False), PATCHES)
    if include_fixed:
        optimizers["Adapprox b1=0.9, k=k_max"] = (
            Adapprox(params, lr=LR, rank_init=192, rank_min=192, foreach=False),
            None,
        )
    return optimizers


def is_adapprox(optimizer) -> bool:
    return isinstance(optimizer, Adapprox)


def step(optimizer, patches, breakdown: Breakdown | None, device) -> float:
    with instrumented(breakdown if is_adapprox(optimizer) else None, patches):
        synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        synchronize(device)
        return time.perf_counter() - start


def settle_ranks(optimizers, max_steps: int, device) -> dict[str, int]:
    """Step the adaptive Adapprox optimizers until no rank changes; returns steps taken per optimizer."""
    taken = {}
    for name, (optimizer, patches) in optimizers.items():
        if not is_adapprox(optimizer) or optimizer.defaults["rank_min"] > 1:
            continue
        previous, count = None, 0
        while count < max_steps:
            step(optimizer, patches, None, device)
            count += 1
            ranks = optimizer.ranks()
            if ranks == previous:
                break
            previous = ranks
        taken[name] = count
        print(
            f"{name}: ranks settled after {count} steps (median rank {median(list(ranks.values())):.0f})",
            flush=True,
        )
    return taken


def profile_step(optimizer, patches, device, rows: int = 14):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with instrumented(None, patches), torch.profiler.profile(activities=activities) as prof:
        optimizer.step()
        synchronize(device)
    averages = prof.key_averages()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = averages.table(sort_by=key, row_limit=rows)
    total = sum(getattr(e, key) for e in averages)
    top = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:rows]
    return table, [
        {"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total}
        for e in top
    ]


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (skipped with a message when CUDA is absent)"
    )
    parser.add_argument(
        "--layers", type=int, default=None, help="GPT-2 layers (default 12; quick 2 at d=256)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed round-robin rounds (default 5; quick 2)"
    )
    parser.add_argument("--max-settle", type=int, default=40, help="most steps to wait for ranks to settle")
    parser.add_argument(
        "--grads", choices=("structured", "gaussian"), default="structured", help="gradient model"
    )
    parser.add_argument("--no-patch", action="store_true", help="leave out the S-RSI v0 variant")
    parser.add_argument("--no-fixed", action="store_true", help="leave out the fixed k = k_max variant")
    args = parser.parse_args()
    configure_threads(args.threads)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available on this machine: skipping the GPU optimizer benchmark.")
        write_json(args.json, {"benchmark": "optimizer", "device": args.device, "skipped": "no CUDA device"})
        return
    device = torch.device(args.device)
    if args.quick:
        shapes = gpt2_shapes(args.layers or 2, 256, vocab_size=8192, n_positions=256)
        rounds = args.rounds or 2
    else:
        shapes = gpt2_shapes(args.layers or 12, 768)
        rounds = args.rounds or 5
    n_params = sum(math.prod(s) for s in shapes)
    print(
        f"{len(shapes)} tensors, {n_params:,} parameters on {device}; threads {torch.get_num_threads()}; "
        f"gradients: {args.grads}",
        flush=True,
    )

    started = time.perf_counter()
    params = make_parameters(shapes, args.grads, device, args.seed)
    print(f"gradients built in {time.perf_counter() - started:.0f} s", flush=True)
    grad_checksum = float(sum(p.grad.double().sum() for p in params))
    optimizers = build_optimizers(params, not args.no_patch, not args.no_fixed)

    settle_started = time.perf_counter()
    settled = settle_ranks(optimizers, args.max_settle, device)
    settle_seconds = time.perf_counter() - settle_started

    names = list(optimizers)
    for name in names:  # one warm-up step each (allocates AdamW/Adafactor state)
        step(*optimizers[name], None, device)
    times: dict[str, list[float]] = {name: [] for name in names}
    breakdowns: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            optimizer, patches = optimizers[name]
            breakdown = Breakdown(device)
            times[name].append(step(optimizer, patches, breakdown, device))
            breakdowns[name].append(dict(breakdown.seconds))
        print(f"round {round_index + 1}/{rounds} done", flush=True)
    assert abs(float(sum(p.grad.double().sum() for p in params)) - grad_checksum) < 1e-6 * (
        1 + abs(grad_checksum)
    ), "an optimizer modified the shared gradients"

    adamw_seconds = median(times["AdamW (foreach)"])
    adamw_bytes = optimizer_state_bytes(optimizers["AdamW (foreach)"][0])
    rows, results = [], {}
    for name in names:
        optimizer, _ = optimizers[name]
        seconds = median(times[name])
        state = optimizer_state_bytes(optimizer)
        entry = {
            "seconds": seconds,
            "times": times[name],
            "time_ratio_vs_adamw": seconds / adamw_seconds,
            "state_bytes": state,
            "state_ratio_vs_adamw": state / adamw_bytes,
        }
        if is_adapprox(optimizer):
            ranks = optimizer.ranks()
            entry["ranks"] = ranks
            entry["rank_summary"] = {
                "min": min(ranks.values()),
                "median": median(list(ranks.values())),
                "max": max(ranks.values()),
            }
            # Cross-check with the memory accounting used for the paper's numbers (4 bytes/number).
            beta1 = optimizer.defaults["betas"][0]
            # The dense-EMA sketch (rank_rule="dense") counts too: 4 min(m, n) per factored matrix.
            sketch = DENSE_SKETCH_COLUMNS if optimizer.defaults.get("rank_rule") == "dense" else 0
            numbers = adapprox_state_numbers(shapes, ranks, first_moment=beta1 > 0, sketch_columns=sketch)
            entry["accounting_ratio_vs_adamw"] = numbers / adamw_state_numbers(shapes)
            parts = {key: median([b.get(key, 0.0) for b in breakdowns[name]]) for key in WRAPPED}
            parts["rest"] = seconds - sum(parts.values())
            entry["breakdown_seconds"] = parts
        results[name] = entry
        rank_text = (
            f"{entry['rank_summary']['min']}/{entry['rank_summary']['median']:.0f}/{entry['rank_summary']['max']}"
            if "ranks" in entry
            else "-"
        )
        rows.append(
            [
                name,
                seconds * 1e3,
                entry["time_ratio_vs_adamw"],
                state / 2**20,
                entry["state_ratio_vs_adamw"],
                rank_text,
            ]
        )
    print_table(
        f"{n_params:,} params, {device}, {torch.get_num_threads()} thread(s): step time (median of {rounds} interleaved rounds) "
        "and state",
        ["optimizer", "step ms", "time / AdamW", "state MiB", "state / AdamW", "ranks min/med/max"],
        rows,
    )
    rows = []
    for name in names:
        entry = results[name]
        if "breakdown_seconds" not in entry:
            continue
        parts = entry["breakdown_seconds"]
        total = entry["seconds"]
        rows.append(
            [
                name,
                total * 1e3,
                (parts["_srsi"] + parts["_srsi_batched"]) * 1e3,
                (parts["_srsi"] + parts["_srsi_batched"]) / total,
                parts["_rank_choices"] * 1e3,
                parts["_rank_choices"] / total,
                parts["_finite_flags"] * 1e3,
                parts["rest"] * 1e3,
                parts["rest"] / total,
            ]
        )
    print_table(
        "Adapprox step breakdown (medians)",
        [
            "optimizer",
            "step ms",
            "S-RSI ms",
            "S-RSI share",
            "rank sel. ms",
            "rank share",
            "finite check ms",
            "rest ms",
            "rest share",
        ],
        rows,
    )

    profile_name = "Adapprox b1=0.9"
    table, top_ops = profile_step(*optimizers[profile_name], device)
    print(f"\n### torch.profiler: one step of {profile_name}, operators by self time\n")
    print(table)

    with_m = results["Adapprox b1=0.9"]["state_ratio_vs_adamw"]
    without_m = results["Adapprox b1=0"]["state_ratio_vs_adamw"]
    targets = {
        "state_ratio_with_first_moment": with_m,
        "target_with_first_moment_met": with_m <= 0.55,
        "state_ratio_without_first_moment": without_m,
        "target_without_first_moment_met": without_m <= 0.10,
    }
    print_table(
        "Targets (state bytes vs AdamW, at the settled ranks)",
        ["target", "measured", "met"],
        [
            ["<= 55% of AdamW with beta1 > 0", with_m, targets["target_with_first_moment_met"]],
            ["<= 10% of AdamW with beta1 = 0", without_m, targets["target_without_first_moment_met"]],
        ],
    )
    print(f"\ntotal {time.perf_counter() - started:.0f} s (rank settling {settle_seconds:.0f} s)")
    write_json(
        args.json,
        {
            "benchmark": "optimizer",
            "quick": args.quick,
            "device": str(device),
            "grads": args.grads,
            "n_params": n_params,
            "n_tensors": len(shapes),
            "rounds": rounds,
            "lr": LR,
            "settle_steps": settled,
            "results": results,
            "profile_top_ops": top_ops,
            "targets": targets,
        },
    )


if __name__ == "__main__":
    main()
