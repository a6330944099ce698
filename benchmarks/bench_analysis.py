"""Speed and memory of ``adapprox spectrum`` and ``adapprox compare`` on a GPT-2-124M checkpoint.

Generates (once, into benchmarks/out/, not committed) a nanoGPT ``ckpt.pt`` of GPT-2 124M
(50257-token tied embedding, 12 layers, d = 768) holding an AdamW state whose moments have the
structure real ones have (``synthetic_moments``): per-row scales (Zipf-like token frequencies
for the embedding, log-normal elsewhere), per-column scales, a low-rank part and the noise of
averaging over ~50 steps; float32, ~1.5 GB. Spectra come out rank-1 dominated (stable rank
~1.05-1.15) as on real nanoGPT states.

Then runs each phase in its own process, so that every peak-memory figure is that phase's own:

  load          torch.load of the whole file (no mmap), the baseline every tool pays
  svdvals       naive exact analysis: torch.linalg.svdvals on every matrix (float32)
  svd_lowrank   torch.svd_lowrank(q=70) on every matrix (float32)
  spectrum      adapprox spectrum PATH --top 60 --json (in-process CLI call, loader included)
  compare       adapprox compare PATH --rank 5 --json (exact SVD optimum included)

and reports wall time (process start to exit, and of the work alone), CPU time, peak RSS and
the growth of anonymous memory over the post-import baseline, checked against the targets:
spectrum <= 8 s, compare <= 30 s, memory <= 3x the largest tensor + the mapped file.

    PYTHONPATH=. python benchmarks/bench_analysis.py [--threads 2] [--json benchmarks/results/analysis.json]
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, configure_threads, environment, print_table, write_json

OUT_DIR = Path(__file__).resolve().parent / "out"
PHASES = ("load", "svdvals", "svd_lowrank", "spectrum", "compare")
TARGETS = {"spectrum": 8.0, "compare": 30.0}
GPT2 = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
QUICK = dict(n_layer=2, n_head=4, n_embd=128, block_size=256, vocab_size=4096)


# --------------------------------------------------------------------------- the checkpoint


def nanogpt_shapes(
    n_layer: int, n_embd: int, block_size: int, vocab_size: int, **_: Any
) -> list[tuple[str, tuple]]:
    """nanoGPT's named_parameters() (bias=True, lm_head tied to wte, so absent)."""
    d = n_embd
    named = [("transformer.wte.weight", (vocab_size, d)), ("transformer.wpe.weight", (block_size, d))]
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        named += [(h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,))]
        named += [(h + "attn.c_attn.weight", (3 * d, d)), (h + "attn.c_attn.bias", (3 * d,))]
        named += [(h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,))]
        named += [(h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,))]
        named += [(h + "mlp.c_fc.weight", (4 * d, d)), (h + "mlp.c_fc.bias", (4 * d,))]
        named += [(h + "mlp.c_proj.weight", (d, 4 * d)), (h + "mlp.c_proj.bias", (d,))]
    return [*named, ("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]


def synthetic_moments(
    name: str, shape: tuple, seed: int, averaged_steps: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """exp_avg and exp_avg_sq with the structure of real AdamW moments, drawn directly.

    A gradient entry is g_ij = a_i b_j x_ij: row scales a (Zipf-like token frequencies for the
    embedding, log-normal elsewhere), column scales b, and x of unit variance with some low-rank
    correlation. The second moment averages g^2 over ~``averaged_steps`` steps (beta2 = 0.98), so
    V = a^2 b^2 (Gamma noise of mean 1 and variance 2 / steps + c L): rank-1 dominated, with a
    low-rank part L of weight c (larger for MLP weights, as measured on real nanoGPT states).
    """
    torch.manual_seed(seed)
    k = averaged_steps
    if len(shape) == 1:
        scale = torch.exp(torch.randn(shape))
        noise = torch.distributions.Gamma(torch.tensor(k / 2), torch.tensor(k / 2)).sample(shape)
        return 1e-4 * scale * torch.randn(shape), 1e-8 * scale.square() * noise
    m, n = shape
    if "wte" in name:  # token frequencies: a Zipf law over a shuffled vocabulary
        rows = (1.0 / torch.arange(1, m + 1, dtype=torch.float32) ** 0.8)[torch.randperm(m)]
        rows = rows * torch.exp(0.3 * torch.randn(m))
    else:
        rows = torch.exp(torch.randn(m))
    cols = torch.exp(0.7 * torch.randn(n))
    weight = 0.3 if "mlp" in name else 0.1
    low = (torch.randn(m, 4) @ torch.randn(4, n)).square_().div_(4)
    exp_avg_sq = torch.distributions.Gamma(torch.tensor(k / 2), torch.tensor(k / 2)).sample((m, n))
    exp_avg_sq.add_(low, alpha=weight).mul_(rows[:, None]).mul_(cols[None, :] * 1e-6)
    del low
    exp_avg = torch.randn(m, n).mul_(rows.sqrt()[:, None]).mul_(cols.sqrt()[None, :] * 3e-4)
    return exp_avg, exp_avg_sq


def generate(path: Path, config: dict, seed: int) -> None:
    named = nanogpt_shapes(**config)
    model = {
        name: torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.02
        for i, (name, shape) in enumerate(named)
    }
    model["lm_head.weight"] = model["transformer.wte.weight"]  # tied: one storage in the file
    decay = [i for i, (_, s) in enumerate(named) if len(s) >= 2]
    nodecay = [i for i, (_, s) in enumerate(named) if len(s) < 2]
    order = decay + nodecay
    state = {}
    for index, i in enumerate(order):
        name, shape = named[i]
        exp_avg, exp_avg_sq = synthetic_moments(name, shape, seed * 1000 + i)
        state[index] = {"step": torch.tensor(50.0), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    group = dict(lr=6e-4, betas=(0.9, 0.98), eps=1e-8, amsgrad=False, foreach=None, maximize=False,
                 capturable=False, differentiable=False, fused=None, decoupled_weight_decay=True)  # fmt: skip
    groups = [
        {**group, "weight_decay": 0.1, "params": list(range(len(decay)))},
        {**group, "weight_decay": 0.0, "params": list(range(len(decay), len(order)))},
    ]
    checkpoint = {
        "model": model,
        "optimizer": {"state": state, "param_groups": groups},
        "model_args": {**config, "bias": True, "dropout": 0.0},
        "iter_num": 50,
        "best_val_loss": torch.tensor(3.3),
        "config": {"learning_rate": 6e-4, "beta2": 0.98, "weight_decay": 0.1, "dtype": "float32"},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- measuring one phase


class MemorySampler:
    """Peak anonymous and file-backed resident memory, sampled from /proc/self/status."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> dict[str, int]:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    values[key] = int(rest.split()[0]) * 1024
        return values

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.read()
            for key in self.peak:
                self.peak[key] = max(self.peak[key], now[key])
            time.sleep(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def matrices(state_dict: dict) -> list[torch.Tensor]:
    out = []
    for entry in state_dict["state"].values():
        v = entry["exp_avg_sq"]
        if v.ndim >= 2:
            out.append(v.reshape(v.shape[0], -1))
    return out


def run_cli(args: list[str]) -> dict:
    from adapprox_cli.cli import app

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        app(args=args, prog_name="adapprox", standalone_mode=False)
    return json.loads(buffer.getvalue())


def run_phase(phase: str, path: Path) -> dict[str, Any]:
    import adapprox_cli.analysis
    import adapprox_cli.checkpoints
    import adapprox_cli.cli  # noqa: F401

    baseline = MemorySampler.read()
    extra: dict[str, Any] = {}
    with MemorySampler() as sampler:
        start, cpu = time.perf_counter(), time.process_time()
        if phase == "load":
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            extra["tensors"] = len(checkpoint["optimizer"]["state"])
        elif phase in ("svdvals", "svd_lowrank"):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for v in matrices(checkpoint["optimizer"]):
                if phase == "svdvals":
                    torch.linalg.svdvals(v)
                else:
                    torch.svd_lowrank(v, q=min(70, *v.shape), niter=2)
            extra["matrices"] = len(matrices(checkpoint["optimizer"]))
        elif phase == "spectrum":
            report = run_cli(["spectrum", str(path), "--top", "60", "--json"])
            extra = _spectrum_summary(report)
        elif phase == "compare":
            report = run_cli(["compare", str(path), "--rank", "5", "--json"])
            extra = {
                s["method"]: {k: s[k] for k in ("weighted_error", "weighted_vs_optimum", "seconds")}
                for s in report["summary"]
            }
        else:
            raise ValueError(phase)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    final = MemorySampler.read()
    return {
        "phase": phase,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rss": final["VmHWM"],
        "baseline_rss": baseline["VmRSS"],
        "peak_anon_growth": max(sampler.peak["RssAnon"], final["RssAnon"]) - baseline["RssAnon"],
        "peak_file": max(sampler.peak["RssFile"], final["RssFile"]),
        "threads": torch.get_num_threads(),
        "extra": extra,
    }


def _spectrum_summary(report: dict) -> dict[str, Any]:
    by_name = {m["name"]: m for m in report["matrices"]}
    wte = by_name.get("transformer.wte.weight", report["matrices"][0])
    stable = sorted(m["stable_rank"] for m in report["matrices"] if m["stable_rank"] is not None)
    return {
        "matrices": len(report["matrices"]),
        "methods": sorted({m["method"] for m in report["matrices"]}),
        "median_stable_rank": stable[len(stable) // 2],
        "wte": {k: wte[k] for k in ("stable_rank", "energy_share", "rank_for_error")},
    }


# --------------------------------------------------------------------------- orchestration


def main() -> None:
    parser = base_parser(__doc__)
    parser.set_defaults(threads=0)
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where the generated checkpoint lives")
    parser.add_argument("--regenerate", action="store_true", help="rebuild the checkpoint even if present")
    parser.add_argument(
        "--phases", default=",".join(PHASES), help="comma-separated subset of " + ", ".join(PHASES)
    )
    parser.add_argument("--phase", help=argparse_hidden())
    parser.add_argument("--ckpt", type=Path, help=argparse_hidden())
    args = parser.parse_args()
    configure_threads(args.threads)
    if args.phase == "generate":
        generate(args.ckpt, QUICK if args.quick else GPT2, args.seed)
        return
    if args.phase:
        print(json.dumps(run_phase(args.phase, args.ckpt)))
        return

    config = QUICK if args.quick else GPT2
    path = args.out / ("ckpt-quick.pt" if args.quick else "ckpt-gpt2-124m.pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.regenerate or not path.exists():
        print(f"generating {path} ...", flush=True)
        start = time.perf_counter()
        _child(["--phase", "generate", "--ckpt", str(path)] + ["--quick"] * args.quick, args.threads)
        print(f"  done in {time.perf_counter() - start:.1f} s", flush=True)
    named = nanogpt_shapes(**config)
    largest = max(math.prod(s) for _, s in named) * 4
    file_size = path.stat().st_size
    results = []
    for phase in args.phases.split(","):
        start = time.perf_counter()
        result = json.loads(
            _child(["--phase", phase, "--ckpt", str(path)], args.threads).strip().splitlines()[-1]
        )
        result["process_seconds"] = time.perf_counter() - start
        results.append(result)
        print(f"  {phase}: {result['process_seconds']:.1f} s", flush=True)
    _report(results, largest, file_size, config, args.json)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def _child(argv: list[str], threads: int) -> str:
    cmd = [sys.executable, __file__, *argv, "--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")
    return done.stdout


def _report(results: list[dict], largest: int, file_size: int, config: dict, json_path: Path | None) -> None:
    mib = 1 << 20
    budget = 3 * largest + file_size
    rows = []
    for r in results:
        target = TARGETS.get(r["phase"])
        rows.append([
            r["phase"], r["process_seconds"], r["seconds"], r["cpu_seconds"], r["peak_rss"] / mib,
            r["peak_anon_growth"] / mib, r["peak_file"] / mib,
            "-" if target is None else ("yes" if r["process_seconds"] <= target else "NO"),
        ])  # fmt: skip
    print_table(
        f"GPT-2 {config['n_layer']}-layer d={config['n_embd']} checkpoint: {file_size / mib:.0f} MiB, "
        f"largest tensor {largest / mib:.0f} MiB, {torch.get_num_threads()} threads",
        [
            "phase",
            "process s",
            "work s",
            "CPU s",
            "peak RSS MiB",
            "anon growth MiB",
            "file-backed MiB",
            "in time",
        ],
        rows,
    )
    by_phase = {r["phase"]: r for r in results}
    ratios = []
    for name in ("svdvals", "svd_lowrank", "load"):
        for ours in ("spectrum", "compare"):
            if name in by_phase and ours in by_phase:
                ratios.append(
                    [
                        f"{name} / {ours}",
                        by_phase[name]["process_seconds"] / by_phase[ours]["process_seconds"],
                    ]
                )
    if ratios:
        print_table("Time ratios (process wall time)", ["ratio", "value"], ratios)
    memory = [
        [r["phase"], r["peak_anon_growth"] / largest, r["peak_rss"] - r["baseline_rss"] <= budget]
        for r in results
        if r["phase"] in ("spectrum", "compare")
    ]
    if memory:
        print_table(
            "Memory: anonymous growth in units of the largest tensor; RSS growth <= 3x largest + file",
            ["phase", "anon growth / largest", "within budget"],
            memory,
        )
    for r in results:
        if r["extra"]:
            print(f"{r['phase']}: {json.dumps(r['extra'])}")
    write_json(json_path, {"config": config, "largest_tensor_bytes": largest, "file_bytes": file_size,
                           "results": results, "env": environment()})  # fmt: skip


if __name__ == "__main__":
    main()
