"""What one optimizer step launches: aten ops, linear-algebra calls, host reads, peak temporaries.

On a GPU every aten op is a kernel launch and every host read (``.item()``, ``.tolist()``,
``bool(tensor)``, a decomposition's info check) a synchronisation, so these counts predict the
overhead of a step where timing on this CPU cannot. Counted in one steady-state step (after
``--warmup`` steps) on a GPT-2-shaped parameter set (default 12 layers, d = 128, 50 matrices
and vectors) for ``torch.optim.AdamW(foreach=True)``, Adapprox's per-parameter loop
(``foreach=False``) and its batched multi-tensor path (``foreach=True``), with their step times
(median of ``--rounds``, interleaved) as ratios to AdamW.

    PYTHONPATH=. python benchmarks/bench_step_ops.py --json benchmarks/results/step_ops.json
"""

from __future__ import annotations

import collections
import contextlib
import time
import weakref

import torch
from common import base_parser, configure_threads, median, print_table, write_json
from torch.utils._python_dispatch import TorchDispatchMode

from adapprox_cli.memory import gpt2_shapes
from adapprox_cli.optim import Adapprox

LINALG_OPS = ("linalg", "cholesky", "triangular", "eigh", "svd", "qr")


class StepCounter(TorchDispatchMode):
    """Counts aten calls and tracks the bytes of live tensors the step allocates (peak)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.live: dict[int, list[int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[str(func.overloadpacket)] += 1
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if not key:
                    continue
                if key not in self.live:
                    self.live[key] = [storage.nbytes(), 0]
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                self.live[key][1] += 1
                weakref.finalize(tensor, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]


@contextlib.contextmanager
def recording_host_reads():
    """Records every call of the Tensor methods that copy a value to the host, with its tensor."""
    reads: list[tuple[str, torch.Tensor]] = []
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__")}

    def wrap(name, original):
        def recorded(self, *args, **kwargs):
            reads.append((name, self))
            return original(self, *args, **kwargs)

        return recorded

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _step_counters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [s["step"] for s in optimizer.state.values() if isinstance(s.get("step"), torch.Tensor)]


def device_reads(optimizer, reads) -> list[str]:
    """The reads that would synchronise a GPU: all but those of the per-parameter step counters,
    which AdamW and Adapprox both keep on the CPU (reading them costs no sync)."""
    counters = _step_counters(optimizer)
    return [name for name, tensor in reads if not any(tensor is c for c in counters)]


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5, help="steps before counting (ranks settle)")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per optimizer")
    args = parser.parse_args()
    configure_threads(args.threads)
    shapes = gpt2_shapes(args.layers, args.width, vocab_size=8192 if args.quick else 50257)
    generator = torch.Generator().manual_seed(args.seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    optimizers = {
        "AdamW (foreach)": torch.optim.AdamW(params, lr=1e-5, foreach=True),
        "Adapprox loop": Adapprox(params, lr=1e-5, foreach=False),
        "Adapprox batched": Adapprox(params, lr=1e-5, foreach=True),
    }
    results = {}
    for name, optimizer in optimizers.items():
        for _ in range(args.warmup):
            optimizer.step()
        counter = StepCounter()
        counters_before = _step_counters(optimizer)  # Adapprox replaces them out of place
        with recording_host_reads() as reads, counter:
            optimizer.step()
        reads = [(n, t) for n, t in reads if not any(t is c for c in counters_before)]
        synced = device_reads(optimizer, reads)
        linalg = sum(n for op, n in counter.ops.items() if any(k in op for k in LINALG_OPS))
        results[name] = {
            "aten_ops": sum(counter.ops.values()),
            "linalg_calls": linalg,
            "host_reads": len(synced),
            "host_reads_by_kind": dict(collections.Counter(synced)),
            "peak_temporaries_over_params": counter.peak / param_bytes,
            "top_ops": counter.ops.most_common(10),
            "times": [],
        }
    names = list(optimizers)
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            optimizers[name].step()
            results[name]["times"].append(time.perf_counter() - start)
    adamw = results["AdamW (foreach)"]
    for entry in results.values():
        entry["step_ms"] = median(entry["times"]) * 1e3
        entry["ops_vs_adamw"] = entry["aten_ops"] / adamw["aten_ops"]
        entry["time_vs_adamw"] = entry["step_ms"] / adamw["step_ms"]
    rows = [
        [
            name,
            r["aten_ops"],
            r["ops_vs_adamw"],
            r["linalg_calls"],
            r["host_reads"],
            r["peak_temporaries_over_params"],
            r["step_ms"],
            r["time_vs_adamw"],
        ]
        for name, r in results.items()
    ]
    print_table(
        f"One steady-state step, {len(shapes)} tensors ({args.layers} layers, d={args.width}), "
        f"{torch.get_num_threads()} thread(s)",
        [
            "optimizer",
            "aten ops",
            "ops / AdamW",
            "linalg calls",
            "host reads",
            "peak temp / params",
            "step ms",
            "time / AdamW",
        ],
        rows,
    )
    write_json(
        args.json,
        {
            "benchmark": "step_ops",
            "shapes": len(shapes),
            "layers": args.layers,
            "width": args.width,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
