"""How many CPU threads the CLI should use: commands timed at each thread count, idle and loaded.

Each command runs as a user would run it (a fresh `python -m adapprox_cli` process, so import
time is included) with `--threads T`; thread counts are interleaved round by round and the
median wall time is reported, with each count's ratio to the best one in the same condition.
`--load K` adds K busy processes (pure Python spin loops, stopped at the end) to stand for a
machine shared with other jobs.

    PYTHONPATH=. python benchmarks/bench_threads.py --json benchmarks/results/threads.json
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import base_parser, environment, median, print_table, write_json

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_states" / "nanogpt" / "ckpt.pt"


def _spin(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def make_large_checkpoint(path: Path, rows: int, cols: int, count: int) -> Path:
    """An AdamW state of `count` (rows x cols) matrices with a realistic, nearly rank-1 V."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(count):
        r, c = torch.rand(rows, 1, generator=g), torch.rand(1, cols, generator=g)
        noise = torch.rand(rows, cols, generator=g) * 0.05
        state[i] = {
            "step": torch.tensor(100.0),
            "exp_avg": torch.randn(rows, cols, generator=g) * 1e-3,
            "exp_avg_sq": (r * c + noise) * 1e-6,
        }
    groups = [
        {
            "params": list(range(count)),
            "lr": 1e-3,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": 0.1,
            "amsgrad": False,
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "decoupled_weight_decay": True,
        }
    ]
    torch.save({"state": state, "param_groups": groups}, path)
    return path


def run_once(command: list[str], threads: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="Agg")
    env.pop("OMP_NUM_THREADS", None)
    env.pop("ADAPPROX_THREADS", None)
    argv = [sys.executable, "-m", "adapprox_cli", "--threads", str(threads), *command]
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats (default 3)")
    parser.add_argument("--load", type=int, nargs="*", default=[0, 2], help="busy processes per condition")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    counts = sorted({1, 2, cores} | ({cores // 2} if cores >= 4 else set()))
    counts = [c for c in counts if c <= cores]
    with tempfile.TemporaryDirectory() as tmp:
        large = make_large_checkpoint(Path(tmp) / "large.pt", 1536, 6144, 2 if not args.quick else 1)
        commands = {
            "demo": ["demo"],
            "spectrum sample": ["spectrum", str(SAMPLE)],
            "compare sample": ["compare", str(SAMPLE), "--rank", "5"],
            "estimate sample": ["estimate", str(SAMPLE)],
            "spectrum large": ["spectrum", str(large)],
            "compare large": ["compare", str(large), "--rank", "5"],
        }
        if args.quick:
            commands = {k: v for k, v in commands.items() if k in ("spectrum sample", "spectrum large")}
        results = []
        for load in args.load:
            stop_at = time.time() + 3600
            spinners = [mp.Process(target=_spin, args=(stop_at,), daemon=True) for _ in range(load)]
            for p in spinners:
                p.start()
            try:
                for name, command in commands.items():
                    times = {c: [] for c in counts}
                    for _ in range(args.rounds):
                        for c in counts:
                            times[c].append(run_once(command, c))
                    medians = {c: median(v) for c, v in times.items()}
                    best = min(medians.values())
                    for c in counts:
                        results.append(
                            {
                                "load": load,
                                "command": name,
                                "threads": c,
                                "median_s": medians[c],
                                "vs_best": medians[c] / best,
                            }
                        )
                    print(
                        f"load {load} {name}: " + ", ".join(f"{c}t {medians[c]:.2f}s" for c in counts),
                        flush=True,
                    )
            finally:
                for p in spinners:
                    p.terminate()
                    p.join()
    rows = [[r["load"], r["command"], r["threads"], r["median_s"], r["vs_best"]] for r in results]
    print_table(
        f"CLI wall time by thread count ({cores} cores; medians of {args.rounds})",
        ["busy procs", "command", "threads", "median s", "/ best"],
        rows,
    )
    write_json(args.json, {"environment": environment(), "cores": cores, "results": results})


if __name__ == "__main__":
    main()
