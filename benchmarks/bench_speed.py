"""S-RSI speed vs torch.linalg.svd and torch.svd_lowrank on GPT-2-sized second moments.

Matrices (float32): 768 x 3072 (GPT-2 mlp.c_fc) and 50257 x 768 (GPT-2 token embedding). They
are synthetic but built like Adam's second moment: V = mean over T = 256 steps of G_t^2 with
G_t = diag(r) (S + N_t) diag(c): log-normal row and column scales r, c (sigma 0.5), a fixed
rank-8 "signal" S (entries of std 0.5) and fresh unit Gaussian noise N_t each step. So V is
non-negative, dominated by the rank-1 scale profile (what Adafactor captures), with a decaying
tail: rank-1/8/32 truncation errors about 0.28/0.14/0.05, in the range of the real moments
bench_accuracy.py measures on the char model (0.08-0.37 at rank 1). For the warm start, V_prev is
that average and V = 0.99 V_prev + 0.01 G^2 with one more gradient: a ten times larger
step-to-step change than Adam's beta2 = 0.999, i.e. a conservative test of warm starting.

Timed (medians of interleaved repeats; ratios of medians from the same run):
- full: torch.linalg.svd(V, full_matrices=False) (rank-independent), the exact floor;
- S-RSI cold l=5 and warm l=1 (p=5), the optimizer's private ``_srsi`` body (no input checks,
  the Frobenius norm for the free errors included);
- torch.svd_lowrank(V, q=k+p, niter=l) at the same l (equal rank and work);
- equal accuracy: for error levels 1.01x and 1.001x the exact SVD error, the fewest iterations
  with which each method (S-RSI cold, S-RSI warm, torch.svd_lowrank) reaches the level (median
  error over draws), and those configurations' times.
- S-RSI v0: the S-RSI body as first written (common.srsi_before_patch: V^T Q as ``v.T @ q``, whose
  MKL kernel is very slow for a narrow Q on this CPU, and ||V||^2 via a full temporary), timed
  beside the library's to show what the two fixes bought. Same arithmetic and random draws.
Targets: S-RSI >= 20x faster than full SVD at rank <= 32; no slower than svd_lowrank at equal accuracy.
"""

from __future__ import annotations

import time

import torch
from common import (
    base_parser,
    configure_threads,
    interleaved_timings,
    median,
    print_table,
    realistic_second_moment,
    srsi_before_patch,
    time_call,
    truncation_errors,
    write_json,
)

from adapprox_cli import lowrank

OVERSAMPLE = 5
ACCURACY_LEVELS = (1.01, 1.001)  # "equal accuracy": error <= level x the exact SVD error
MAX_ITERS = 10


def factor_error(v: torch.Tensor, q: torch.Tensor, u: torch.Tensor, norm: float) -> float:
    """||V - Q U^T||_F / ||V||_F (the true error of the rank-k factors, not an estimate)."""
    residual = torch.addmm(v, q, u.T, alpha=-1.0)
    return float(torch.linalg.vector_norm(residual, dtype=torch.float64)) / norm


def srsi_factors(v, rank, power_iters, seed, warm=None):
    """The optimizer's hot path: lowrank._srsi (no input validation), then the leading k columns."""
    generator = torch.Generator().manual_seed(seed)
    q, u, _, _ = lowrank._srsi(v, rank, OVERSAMPLE, power_iters, generator, warm)
    return q[:, :rank], u[:, :rank]


def srsi_v0_factors(v, rank, power_iters, seed, warm=None):
    generator = torch.Generator().manual_seed(seed)
    q, u, _, _ = srsi_before_patch(v, rank, OVERSAMPLE, power_iters, generator, warm)
    return q[:, :rank], u[:, :rank]


def svd_lowrank_factors(v, rank, niter, seed):
    torch.manual_seed(seed)
    left, s, right = torch.svd_lowrank(v, q=min(rank + OVERSAMPLE, *v.shape), niter=niter)
    return left[:, :rank], right[:, :rank] * s[:rank]


class Method:
    """One randomized method at a given iteration count: how to run it, and its median error."""

    def __init__(self, kind: str, v, rank, warm_q, norm, draws):
        self.kind, self.v, self.rank, self.warm_q, self.norm, self.draws = kind, v, rank, warm_q, norm, draws
        self.errors: dict[int, float] = {}

    def name(self, iters: int) -> str:
        return {
            "cold": f"S-RSI cold l={iters}",
            "warm": f"S-RSI warm l={iters}",
            "cold0": f"S-RSI v0 cold l={iters}",
            "warm0": f"S-RSI v0 warm l={iters}",
            "halko": f"svd_lowrank niter={iters}",
        }[self.kind]

    def run(self, iters: int, seed: int = 1):
        if self.kind == "halko":
            return svd_lowrank_factors(self.v, self.rank, iters, seed)
        factors = srsi_v0_factors if self.kind.endswith("0") else srsi_factors
        return factors(self.v, self.rank, iters, seed, self.warm_q if self.kind.startswith("warm") else None)

    def runner(self, iters: int):
        return lambda: self.run(iters)

    def error(self, iters: int) -> float:
        if iters not in self.errors:
            self.errors[iters] = median(
                [factor_error(self.v, *self.run(iters, d), self.norm) for d in range(self.draws)]
            )
        return self.errors[iters]

    def cheapest(self, target: float) -> int | None:
        """The fewest iterations whose median error is <= target (None if MAX_ITERS is not enough)."""
        for iters in range(MAX_ITERS + 1):
            if self.error(iters) <= target:
                return iters
        return None


EQUAL_RANK = [("cold", 5), ("halko", 5), ("cold", 1), ("warm", 1), ("halko", 1), ("cold0", 5), ("warm0", 1)]
KINDS = ("cold", "warm", "halko", "cold0", "warm0")


def bench_shape(m: int, n: int, ranks, repeats: int, svd_repeats: int, draws: int, seed: int) -> dict:
    print(f"\n== {m} x {n} ==", flush=True)
    v_prev, v = realistic_second_moment(m, n, seed)
    norm = float(torch.linalg.vector_norm(v, dtype=torch.float64))

    # Exact SVD: the floor at every rank, and the time to beat. The repeats are interleaved with
    # an S-RSI call so that a slow spell of the machine shows up in both.
    seconds, (_, s_full, _) = time_call(lambda: torch.linalg.svd(v, full_matrices=False))
    floor = truncation_errors(s_full)
    more = interleaved_timings(
        {
            "svd": lambda: torch.linalg.svd(v, full_matrices=False),
            "srsi": lambda: srsi_factors(v, max(ranks), 5, 0),
        },
        repeats=max(svd_repeats - 1, 0),
        warmup=0,
    )
    svd_times = [seconds] + more["svd"]
    svd_seconds = median(svd_times)
    print(
        f"full SVD: {svd_seconds:.2f} s (median of {len(svd_times)}: {', '.join(f'{t:.2f}' for t in svd_times)})",
        flush=True,
    )
    print("rank-1..5 SVD errors: " + ", ".join(f"{float(e):.3f}" for e in floor[:5]), flush=True)

    results = []
    for rank in ranks:
        warm_q, _ = srsi_factors(v_prev, rank, 5, 99)  # the previous step's stored factor (k columns)
        methods = {kind: Method(kind, v, rank, warm_q, norm, draws) for kind in KINDS}
        configs = {methods[kind].name(iters): (kind, iters) for kind, iters in EQUAL_RANK}
        svd_error = float(floor[rank - 1])
        equal_accuracy = {}
        for level in ACCURACY_LEVELS:
            cheapest = {kind: methods[kind].cheapest(level * svd_error) for kind in ("cold", "warm", "halko")}
            equal_accuracy[level] = cheapest
            for kind, iters in cheapest.items():
                if iters is not None:
                    configs[methods[kind].name(iters)] = (kind, iters)
        functions = {name: methods[kind].runner(iters) for name, (kind, iters) in configs.items()}
        times = interleaved_timings(functions, repeats=repeats, warmup=1)
        seconds = {name: median(t) for name, t in times.items()}
        errors = {name: methods[kind].error(iters) for name, (kind, iters) in configs.items()}
        level_rows = []
        for level, cheapest in equal_accuracy.items():
            halko = cheapest["halko"]
            halko_seconds = seconds[methods["halko"].name(halko)] if halko is not None else None
            for kind in ("cold", "warm"):
                iters = cheapest[kind]
                own = seconds[methods[kind].name(iters)] if iters is not None else None
                level_rows.append(
                    {
                        "level": level,
                        "variant": kind,
                        "srsi_iters": iters,
                        "svd_lowrank_niter": halko,
                        "srsi_seconds": own,
                        "svd_lowrank_seconds": halko_seconds,
                        "time_ratio": own / halko_seconds if own is not None and halko_seconds else None,
                    }
                )
        results.append(
            {
                "rank": rank,
                "svd_error": svd_error,
                "seconds": seconds,
                "times": times,
                "error": errors,
                "error_ratio_to_svd": {name: e / svd_error for name, e in errors.items()},
                "speedup_vs_full_svd": {name: svd_seconds / t for name, t in seconds.items()},
                "equal_accuracy": level_rows,
                "iteration_errors": {kind: methods[kind].errors for kind in ("cold", "warm", "halko")},
            }
        )
        print(f"rank {rank}: done", flush=True)
    return {"shape": [m, n], "full_svd_seconds": svd_seconds, "full_svd_times": svd_times, "by_rank": results}


def _iters(value, label):
    return f"{label}={value}" if value is not None else f"none <= {MAX_ITERS}"


def _ms(seconds):
    return None if seconds is None else seconds * 1e3


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--repeats", type=int, default=None, help="timing rounds per variant (default 7; quick 3)"
    )
    parser.add_argument(
        "--svd-repeats", type=int, default=None, help="full-SVD timings per shape (default 3; quick 1)"
    )
    parser.add_argument("--draws", type=int, default=3, help="random draws per error measurement (default 3)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 32], help="ranks k (default 1 8 32)")
    args = parser.parse_args()
    configure_threads(args.threads)
    if args.quick:
        shapes = [(768, 3072), (4096, 768)]
        repeats, svd_repeats = args.repeats or 3, args.svd_repeats or 1
    else:
        shapes = [(768, 3072), (50257, 768)]
        repeats, svd_repeats = args.repeats or 7, args.svd_repeats or 3
    print(f"threads: {torch.get_num_threads()}; p = {OVERSAMPLE}; medians of {repeats} interleaved rounds")

    started = time.perf_counter()
    shape_results = [
        bench_shape(m, n, args.ranks, repeats, svd_repeats, args.draws, args.seed) for m, n in shapes
    ]

    for result in shape_results:
        m, n = result["shape"]
        rows = []
        for row in result["by_rank"]:
            for name, seconds in sorted(row["seconds"].items(), key=lambda item: item[0]):
                rows.append(
                    [
                        row["rank"],
                        name,
                        seconds * 1e3,
                        row["speedup_vs_full_svd"][name],
                        row["error"][name],
                        row["error_ratio_to_svd"][name],
                    ]
                )
        print_table(
            f"{m} x {n} float32: full SVD {result['full_svd_seconds'] * 1e3:.0f} ms (median); randomized methods, p={OVERSAMPLE}",
            ["rank", "method", "ms (median)", "x faster than full SVD", "rel. error", "error / SVD error"],
            rows,
        )
        rows = []
        for row in result["by_rank"]:
            for entry in row["equal_accuracy"]:
                rows.append(
                    [
                        row["rank"],
                        f"<= {entry['level']} x SVD",
                        f"S-RSI {entry['variant']}",
                        _iters(entry["srsi_iters"], "l"),
                        _iters(entry["svd_lowrank_niter"], "niter"),
                        _ms(entry["srsi_seconds"]),
                        _ms(entry["svd_lowrank_seconds"]),
                        entry["time_ratio"],
                    ]
                )
        print_table(
            f"{m} x {n}: equal accuracy (fewest iterations reaching the error level, median of draws; time ratio < 1: S-RSI faster)",
            [
                "rank",
                "error level",
                "variant",
                "S-RSI",
                "svd_lowrank",
                "S-RSI ms",
                "svd_lowrank ms",
                "S-RSI / svd_lowrank",
            ],
            rows,
        )

    # Targets: speed vs full SVD for the paper's setting (cold l=5) and the optimizer's (warm l=1).
    rows_all = [row for result in shape_results for row in result["by_rank"]]

    def worst_speedup(name: str) -> float:
        return min(row["speedup_vs_full_svd"][name] for row in rows_all if row["rank"] <= 32)

    def worst_equal(variant: str) -> float | None:
        ratios = [
            e["time_ratio"]
            for row in rows_all
            for e in row["equal_accuracy"]
            if e["variant"] == variant and e["time_ratio"] is not None
        ]
        return max(ratios) if ratios else None

    v0_gain = [
        row["seconds"][f"S-RSI v0 {v}"] / row["seconds"][f"S-RSI {v}"]
        for row in rows_all
        for v in ("cold l=5", "warm l=1")
    ]
    targets = {
        "speedup_vs_full_svd_cold_l5_worst": worst_speedup("S-RSI cold l=5"),
        "speedup_vs_full_svd_warm_l1_worst": worst_speedup("S-RSI warm l=1"),
        "speedup_vs_full_svd_warm_l0_worst": worst_speedup("S-RSI warm l=0")
        if all("S-RSI warm l=0" in row["speedup_vs_full_svd"] for row in rows_all)
        else None,
        "equal_accuracy_time_ratio_cold_worst": worst_equal("cold"),
        "equal_accuracy_time_ratio_warm_worst": worst_equal("warm"),
        "library_gain_over_v0_median": median(v0_gain),
        "library_gain_over_v0_max": max(v0_gain),
    }
    targets["target_speedup_met_cold_l5"] = targets["speedup_vs_full_svd_cold_l5_worst"] >= 20
    targets["target_speedup_met_warm_l1"] = targets["speedup_vs_full_svd_warm_l1_worst"] >= 20
    for variant in ("cold", "warm"):
        ratio = targets[f"equal_accuracy_time_ratio_{variant}_worst"]
        targets[f"target_equal_accuracy_met_{variant}"] = None if ratio is None else ratio <= 1.05
    print_table(
        "Targets (worst case over shapes and ranks <= 32)",
        ["target", "measured", "met"],
        [
            [
                ">= 20x faster than full SVD: S-RSI cold l=5 (paper's setting)",
                targets["speedup_vs_full_svd_cold_l5_worst"],
                targets["target_speedup_met_cold_l5"],
            ],
            [
                ">= 20x faster than full SVD: S-RSI warm l=1 (optimizer default)",
                targets["speedup_vs_full_svd_warm_l1_worst"],
                targets["target_speedup_met_warm_l1"],
            ],
            [
                "no slower than svd_lowrank at equal accuracy: S-RSI cold (time ratio, 5% noise margin)",
                targets["equal_accuracy_time_ratio_cold_worst"],
                targets["target_equal_accuracy_met_cold"],
            ],
            [
                "no slower than svd_lowrank at equal accuracy: S-RSI warm (time ratio, 5% noise margin)",
                targets["equal_accuracy_time_ratio_warm_worst"],
                targets["target_equal_accuracy_met_warm"],
            ],
            [
                "library S-RSI vs v0 body: time gain median / max",
                f"{targets['library_gain_over_v0_median']:.2f} / {targets['library_gain_over_v0_max']:.2f}",
                None,
            ],
        ],
    )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    write_json(
        args.json,
        {
            "benchmark": "speed",
            "quick": args.quick,
            "oversample": OVERSAMPLE,
            "repeats": repeats,
            "matrices": "synthetic second moments, see module docstring",
            "shapes": shape_results,
            "targets": targets,
        },
    )


if __name__ == "__main__":
    main()
