"""GPT-2 small training steps on CUDA: Adapprox (batched path) vs torch.optim.AdamW(fused=True).

The bundled GPT (adapprox_cli/train/model.py) at n_layer 12, n_embd 768, block 1024, bf16
autocast, random tokens; each step is forward, backward and the optimizer step. Reports median
end-to-end step time and optimizer-step time, their ratios, peak CUDA memory, tokens/s, and
the host syncs of one optimizer step (torch.cuda.set_sync_debug_mode("warn") warnings).
Run: PYTHONPATH=. python3 benchmarks/bench_gpu.py [--json PATH]. Without CUDA it exits with a
message; ``--device cpu --smoke`` runs a 2-layer model for 3 steps (a test of the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

from adapprox_cli.optim import Adapprox
from adapprox_cli.train.model import GPT, GPTConfig


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(name, make_optimizer, config, device, batch, steps):
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = make_optimizer(model.parameters())
    tokens = torch.randint(0, config.vocab_size, (batch, config.block_size + 1), device=device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    total, opt_times, syncs = [], [], 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps):
        sync(device)
        start = time.perf_counter()
        with autocast:
            out = model(x, y)
        loss = out[1] if isinstance(out, tuple) else out
        loss.backward()
        sync(device)
        mid = time.perf_counter()
        if device.type == "cuda" and i == steps - 1:
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer.step()
            sync(device)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
        if i == steps - 1:
            syncs = sum("synchroniz" in str(w.message) for w in caught)
        end = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2 or steps <= 3:  # the first steps allocate state
            total.append(end - start)
            opt_times.append(end - mid)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    step_s = statistics.median(total)
    return {
        "optimizer": name,
        "step_s": step_s,
        "optimizer_step_s": statistics.median(opt_times),
        "tokens_per_s": batch * config.block_size / step_s,
        "peak_cuda_bytes": peak,
        "syncs_in_optimizer_step": syncs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="2 layers, d 64, block 64, 3 steps")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device on this machine; run it on a GPU (or --device cpu --smoke)")
        sys.exit(2)
    if args.smoke:
        config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=256, dropout=0.0)
        steps, batch = 3, 2
    else:
        config = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0)
        steps, batch = args.steps, args.batch
    fused = device.type == "cuda"
    rows = [
        run(
            "AdamW(fused)", lambda p: torch.optim.AdamW(p, lr=6e-4, fused=fused), config, device, batch, steps
        ),
        run("Adapprox", lambda p: Adapprox(p, lr=6e-4), config, device, batch, steps),
    ]
    base = rows[0]
    for row in rows:
        row["step_ratio_vs_adamw"] = row["step_s"] / base["step_s"]
        row["optimizer_ratio_vs_adamw"] = row["optimizer_step_s"] / base["optimizer_step_s"]
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"benchmark": "gpu", "device": str(device), "smoke": args.smoke, "results": rows}, f, indent=2
            )


if __name__ == "__main__":
    main()
