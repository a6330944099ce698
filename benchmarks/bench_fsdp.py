"""Adapprox under FSDP2 on CPU: per-rank optimizer state against AdamW, and the optimizer's collectives.

Two processes (gloo on 127.0.0.1, forked) shard an MLP stack (``--blocks`` blocks of
Linear(d, 4d) and Linear(4d, d) with biases, d = ``--dim``) with ``fully_shard`` per Linear and
on the model, then train ``--steps`` steps on random data after 2 warm-up steps, once with
torch AdamW and once with Adapprox (default settings: adaptive rank, k_max = min(m, n) / 4).

Per rank: optimizer state bytes held locally (DTensor shards, not global sizes), the optimizer
step time, and the time and numbers in Adapprox's own all-reduces per step (Gram matrices,
Q^T V, ||V||^2, skip flags, clip sums, ranks; timed around ``dist.all_reduce`` by
``adapprox_cli.distributed.measure_collectives``). For scale: the parameter count, i.e. the
numbers FSDP2's gradient reduce-scatter moves per step. Also the one-process Adapprox state
(what each rank would hold without sharding the factors).

    PYTHONPATH=. python benchmarks/bench_fsdp.py [--quick] [--json PATH] [--dim D] [--steps N]
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import base_parser, configure_threads, print_table, write_json
from torch import nn

from adapprox_cli.distributed import local_state_bytes, measure_collectives
from adapprox_cli.optim import Adapprox

WORLD = 2
WARMUP = 2


def _model(dim: int, blocks: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)]
    return nn.Sequential(*layers)


def _optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, foreach=False)
    return Adapprox(params, lr=1e-3)


def _worker(rank: int, port: int, dim: int, blocks: int, steps: int, threads: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    configure_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for name in ("adamw", "adapprox"):
        model = _model(dim, blocks)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = _optimizer(name, model.parameters())
        generator = torch.Generator().manual_seed(rank)
        step_s, collective_s, calls, elements = [], [], [], []
        for step in range(WARMUP + steps):
            x = torch.randn(16, dim, generator=generator)
            loss = model(x).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            with measure_collectives() as timer:
                start = time.perf_counter()
                optimizer.step()
                elapsed = time.perf_counter() - start
            if step >= WARMUP:
                step_s.append(elapsed)
                collective_s.append(timer.seconds)
                calls.append(timer.calls)
                elements.append(timer.elements)
        results[name] = {
            "state_bytes": local_state_bytes(optimizer),
            "step_ms": 1e3 * statistics.median(step_s),
            "collective_ms": 1e3 * statistics.median(collective_s),
            "collective_calls": statistics.median(calls),
            "collective_elements": statistics.median(elements),
            "ranks": sorted(optimizer.ranks().values()) if name == "adapprox" else None,
        }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process_state(dim: int, blocks: int) -> int:
    model = _model(dim, blocks)
    optimizer = Adapprox(model.parameters(), lr=1e-3)
    model(torch.randn(16, dim)).square().mean().backward()
    optimizer.step()
    return optimizer.state_bytes()


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=512, help="model width d (default 512)")
    parser.add_argument("--blocks", type=int, default=4, help="MLP blocks (default 4)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps (default 10)")
    args = parser.parse_args()
    if args.quick:
        args.dim, args.steps = 64, 3
    configure_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _worker,
            args=(_free_port(), args.dim, args.blocks, args.steps, args.threads, out),
            nprocs=WORLD,
            join=True,
            start_method="fork",
        )
        per_rank = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(WORLD)]
    params = sum(p.numel() for p in _model(args.dim, args.blocks).parameters())
    one_process = _one_process_state(args.dim, args.blocks)
    rows = []
    for rank, results in enumerate(per_rank):
        adamw, adapprox = results["adamw"], results["adapprox"]
        rows.append(
            [
                rank,
                adamw["state_bytes"],
                adapprox["state_bytes"],
                adapprox["state_bytes"] / adamw["state_bytes"],
                adamw["step_ms"],
                adapprox["step_ms"],
                adapprox["collective_ms"],
                adapprox["collective_calls"],
                adapprox["collective_elements"],
            ]
        )
    print_table(
        f"FSDP2, {WORLD} CPU processes (gloo), {args.blocks} blocks d={args.dim} "
        f"({params:,} parameters; one-process Adapprox state {one_process:,} B)",
        [
            "rank",
            "AdamW state B",
            "Adapprox state B",
            "Adapprox / AdamW",
            "AdamW step ms",
            "Adapprox step ms",
            "collectives ms/step",
            "all-reduces/step",
            "numbers reduced/step",
        ],
        rows,
    )
    write_json(
        args.json,
        {
            "benchmark": "fsdp",
            "world_size": WORLD,
            "dim": args.dim,
            "blocks": args.blocks,
            "steps": args.steps,
            "parameters": params,
            "one_process_adapprox_state_bytes": one_process,
            "per_rank": per_rank,
            "ranks": per_rank[0]["adapprox"]["ranks"],
        },
    )


if __name__ == "__main__":
    main()
