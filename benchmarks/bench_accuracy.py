"""How close S-RSI and Adafactor get to the exact truncated SVD on REAL second moments.

The second moments come from training the bundled character-level GPT with torch.optim.AdamW
inside this script (project-generated corpus, nothing downloaded). For every 2-D ``exp_avg_sq``:

1. Static accuracy: S-RSI (p=5, l=5, cold, float32 as in the optimizer) at ranks 1, 5, 20;
   its true relative error ||V - Q U^T||_F / ||V||_F (float64) divided by the exact truncated-SVD
   error at the same rank (float64 SVD; the Eckart-Young floor). Target: <= 1.01.
   Also: Adafactor's rank-1 factorization error / rank-1 SVD error, and the gap between S-RSI's
   free error estimate (algorithm notes section 3.5) and its true error.
2. Warm start across a sequence: AdamW's V_t snapshotted at every step for a few dozen steps;
   warm-started S-RSI (previous factor + p fresh directions, l = 1 or 0) carried along the
   sequence vs cold S-RSI (l = 5 and l = 1) at each snapshot; errors / SVD error and time.
4. The recursion: Adapprox's V update (V = beta2 clamp(Q U^T) + (1 - beta2) G^2, warm S-RSI,
   adaptive rank, tol 0.01/0.05/0.1) fed the AdamW run's own gradients, compared at the end with
   AdamW's exact exp_avg_sq: the error the per-step truncations accumulate.
3. Inside the optimizer: Adapprox (its defaults: warm start, l = 1) trains the same model;
   at sampled steps the dense V it factors is intercepted (wrapping ``adapprox_cli.optim._srsi``)
   and the factor error at the current rank is compared with the exact SVD and with cold l = 5.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace

import torch
from common import (
    CharModelConfig,
    base_parser,
    build_model,
    char_task,
    configure_threads,
    fixed_batches,
    median,
    named_matrices,
    param_groups,
    print_table,
    summary,
    train_char_model,
    truncation_errors,
    write_json,
)

import adapprox_cli.optim as optim_module
from adapprox_cli import lowrank
from adapprox_cli.formatting import format_shape
from adapprox_cli.optim import Adapprox

RANKS = (1, 5, 20)
OVERSAMPLE = 5
SHADOW_TOLS = (0.01, 0.05, 0.1)


def exact_errors(v64: torch.Tensor) -> torch.Tensor:
    """err[r-1] = exact truncated-SVD relative error at rank r (float64)."""
    return truncation_errors(torch.linalg.svdvals(v64))


def true_error(v64: torch.Tensor, q: torch.Tensor, u: torch.Tensor) -> float:
    return lowrank.relative_error(v64, q.double() @ u.double().T)


def ratio(error: float, floor: float) -> float:
    if floor <= 1e-12:
        return 1.0 if error <= 1e-12 else math.inf
    return error / floor


def run_srsi(v: torch.Tensor, rank: int, power_iters: int, seed: int, warm: torch.Tensor | None = None):
    generator = torch.Generator().manual_seed(seed)
    return lowrank.srsi(
        v, rank, oversample=OVERSAMPLE, power_iters=power_iters, generator=generator, warm_start=warm
    )


# --------------------------------------------------------------------------- 1. static accuracy


def static_accuracy(moments: dict[str, torch.Tensor], draws: int) -> dict:
    rows = []
    for name, v64 in moments.items():
        v32 = v64.float()
        floor = exact_errors(v64)
        row = {"matrix": name, "shape": list(v64.shape)}
        for rank in RANKS:
            if rank > min(v64.shape):
                continue
            ratios, gaps = [], []
            for draw in range(draws):
                factors = run_srsi(v32, rank, 5, seed=draw)
                err = true_error(v64, factors.q, factors.u)
                ratios.append(ratio(err, float(floor[rank - 1])))
                gaps.append(abs(factors.error - err))
            row[f"svd_err_k{rank}"] = float(floor[rank - 1])
            row[f"srsi_ratio_k{rank}"] = max(ratios)  # worst of the draws
            row[f"estimate_gap_k{rank}"] = max(gaps)
        adafactor_err = lowrank.relative_error(v64, lowrank.adafactor_rank1(v64))
        row["adafactor_err"] = adafactor_err
        row["adafactor_ratio"] = ratio(adafactor_err, float(floor[0]))
        rows.append(row)
    aggregate = {}
    for key in (
        [f"srsi_ratio_k{r}" for r in RANKS] + ["adafactor_ratio"] + [f"estimate_gap_k{r}" for r in RANKS]
    ):
        values = [row[key] for row in rows if key in row]
        aggregate[key] = {"median": median(values), "max": max(values)}
    return {"per_matrix": rows, "aggregate": aggregate, "draws": draws}


# --------------------------------------------------------------------------- 2. warm vs cold on a sequence


SEQUENCE_VARIANTS = {
    # name: (warm start?, power iterations)
    "cold l=5": (False, 5),
    "cold l=1": (False, 1),
    "warm l=1": (True, 1),
    "warm l=0": (True, 0),
}


def sequence_accuracy(snapshots: list[dict[str, torch.Tensor]], ranks: tuple[int, ...]) -> dict:
    """Carry warm-started factors along AdamW's V_t sequence; cold variants restart every step."""
    names = list(snapshots[0])
    results = {}
    for rank in ranks:
        per_variant = {
            variant: {"ratios": [], "late_ratios": [], "seconds": []} for variant in SEQUENCE_VARIANTS
        }
        previous_q = {(variant, name): None for variant in SEQUENCE_VARIANTS for name in names}
        for t, snapshot in enumerate(snapshots):
            floors = {name: float(exact_errors(v)[rank - 1]) for name, v in snapshot.items()}
            for variant, (warm, iters) in SEQUENCE_VARIANTS.items():
                step_seconds = 0.0
                for index, (name, v64) in enumerate(snapshot.items()):
                    v32 = v64.float()
                    start_q = previous_q[(variant, name)] if warm else None
                    # The first snapshot has no previous factor: the optimizer's first step is cold.
                    seed = 1_000 * t + index
                    start = time.perf_counter()
                    factors = run_srsi(
                        v32, rank, iters if start_q is not None or not warm else 1, seed, start_q
                    )
                    step_seconds += time.perf_counter() - start
                    previous_q[(variant, name)] = factors.q
                    if t == 0:
                        continue
                    r = ratio(true_error(v64, factors.q, factors.u), floors[name])
                    per_variant[variant]["ratios"].append(r)
                    if t >= len(snapshots) // 2:
                        per_variant[variant]["late_ratios"].append(r)
                if t > 0:
                    per_variant[variant]["seconds"].append(step_seconds)
        results[rank] = {
            variant: {
                "ratio": summary(data["ratios"]),
                "ratio_second_half": summary(data["late_ratios"]),
                "seconds_per_snapshot": median(data["seconds"]),
            }
            for variant, data in per_variant.items()
        }
    return {"snapshots": len(snapshots), "matrices": names, "by_rank": results}


# --------------------------------------------------------------------------- 4. the recursion vs Adam's V


class ShadowMoments:
    """Adapprox's second-moment recursion fed with the AdamW run's own gradients.

    Replicates the factored branch of ``adapprox_cli.optim._single_tensor_adapprox`` (same
    functions, same order): V = beta2 * clamp(Q U^T, 0) + (1 - beta2) G^2, S-RSI warm-started
    from Q (l = 1, p = 5), the AS-RSI rank rule with ``tol``, k_max = min(m, n) // 4. AdamW's
    exp_avg_sq with the same beta2 is the exact EMA this recursion approximates, so comparing the
    two at the end measures how much error the per-step truncation accumulates, which the
    per-step ``tol`` does not see (it is measured against a V that is already low-rank but for
    the newest (1 - beta2) G^2 term).
    """

    def __init__(self, matrices, tols, beta2: float = 0.999, power_iters: int = 1, seed: int = 0):
        self.matrices, self.tols, self.beta2, self.power_iters, self.seed = (
            matrices,
            tols,
            beta2,
            power_iters,
            seed,
        )
        self.factors = {
            (tol, name): (torch.zeros(p.shape[0], 1), torch.zeros(p.shape[1], 1))
            for tol in tols
            for name, p in matrices
        }
        self.step = 0
        self.rank_history = {key: [] for key in self.factors}

    def __call__(self, optimizer, args, kwargs) -> None:  # an optimizer step pre-hook
        self.step += 1
        for index, (name, p) in enumerate(self.matrices):
            g = p.grad.float()
            m, n = g.shape
            k_max = lowrank.default_rank_max(m, n)
            for tol in self.tols:
                q, u = self.factors[(tol, name)]
                v = torch.clamp(q @ u.T, min=0.0).mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
                generator = torch.Generator().manual_seed(self.seed + 7919 * index + self.step)
                warm = q if self.step > 1 else None
                q_s, u_s, _, errors = lowrank._srsi(
                    v, min(q.shape[1], k_max), OVERSAMPLE, self.power_iters, generator, warm
                )
                k = lowrank.adaptive_rank(
                    errors, q.shape[1], rank_min=1, rank_max=k_max, oversample=OVERSAMPLE, tol=tol
                )
                self.factors[(tol, name)] = (q_s[:, :k].contiguous(), u_s[:, :k].contiguous())
                self.rank_history[(tol, name)].append(k)

    def compare(self, adam_moments: dict[str, torch.Tensor]) -> list[dict]:
        rows = []
        for (tol, name), (q, u) in self.factors.items():
            v_adam = adam_moments[name]
            floor = exact_errors(v_adam)
            k = q.shape[1]
            reached = (floor <= tol).nonzero()
            rows.append(
                {
                    "tol": tol,
                    "matrix": name,
                    "rank": k,
                    "max_rank_seen": max(self.rank_history[(tol, name)]),
                    "recursion_error_vs_adam": lowrank.relative_error(
                        v_adam, torch.clamp(q.double() @ u.double().T, min=0)
                    ),
                    "svd_error_of_adam_at_rank": float(floor[k - 1]),
                    "rank_adam_needs_for_tol": int(reached[0]) + 1 if len(reached) else None,
                }
            )
        return rows


# --------------------------------------------------------------------------- 3. inside the optimizer


class SRSIProbe:
    """Wraps ``adapprox_cli.optim._srsi``: at sampled steps, compares its factors with the exact SVD."""

    def __init__(self, sample_every: int):
        self.sample_every = sample_every
        self.step = 0
        self.records: list[dict] = []
        self.original = optim_module._srsi

    def __enter__(self):
        optim_module._srsi = self
        return self

    def __exit__(self, *exc):
        optim_module._srsi = self.original

    def __call__(self, v, rank, oversample, power_iters, generator, warm_start, *args, **kwargs):
        out = self.original(v, rank, oversample, power_iters, generator, warm_start, *args, **kwargs)
        if self.step % self.sample_every == 0 and self.step > 0:
            q_s, u_s = out[0], out[1]
            v64 = v.double()
            floor = float(exact_errors(v64)[rank - 1])
            got = true_error(v64, q_s[:, :rank], u_s[:, :rank])
            cold = lowrank.srsi(
                v, rank, oversample=oversample, power_iters=5, generator=torch.Generator().manual_seed(7)
            )
            self.records.append(
                {
                    "step": self.step,
                    "shape": list(v.shape),
                    "rank": rank,
                    "warm_start": warm_start is not None,
                    "svd_err": floor,
                    "optimizer_ratio": ratio(got, floor),
                    "cold_l5_ratio": ratio(true_error(v64, cold.q, cold.u), floor),
                }
            )
        return out


def optimizer_accuracy(task, config: CharModelConfig, seed: int, sample_every: int, val_batches) -> dict:
    model = build_model(config, task.vocab_size, seed)
    optimizer = Adapprox(param_groups(model, config.weight_decay), lr=config.learning_rate, seed=seed)
    probe = SRSIProbe(sample_every)

    def count_step(step: int) -> None:
        probe.step = step + 2  # the probe sees the *next* optimizer step's calls

    probe.step = 1
    with probe:
        result = train_char_model(model, optimizer, task, config, seed, val_batches, after_step=count_step)
    records = probe.records
    by_step = {}
    for record in records:
        by_step.setdefault(record["step"], []).append(record)
    rows = [
        {
            "step": step,
            "median_rank": median([r["rank"] for r in recs]),
            "optimizer_ratio_median": median([r["optimizer_ratio"] for r in recs]),
            "optimizer_ratio_max": max(r["optimizer_ratio"] for r in recs),
            "cold_l5_ratio_median": median([r["cold_l5_ratio"] for r in recs]),
            "cold_l5_ratio_max": max(r["cold_l5_ratio"] for r in recs),
        }
        for step, recs in sorted(by_step.items())
    ]
    return {
        "settings": {
            "power_iters": optimizer.defaults["power_iters"],
            "warm_start": optimizer.defaults["warm_start"],
            "tol": optimizer.defaults["tol"],
            "oversample": optimizer.defaults["oversample"],
        },
        "final_val_loss": result.final_val_loss,
        "by_step": rows,
        "overall": {
            "optimizer_ratio": summary([r["optimizer_ratio"] for r in records]),
            "cold_l5_ratio": summary([r["cold_l5_ratio"] for r in records]),
        },
        "records": records,
    }


# --------------------------------------------------------------------------- main


def collect_adamw_moments(task, config: CharModelConfig, seed: int, snapshot_steps: int, val_batches, tols):
    """Train with AdamW; return the final 2-D exp_avg_sq (float64), per-step snapshots of the last
    steps, the training result, and the Adapprox recursion shadowing the run (one per tol)."""
    model = build_model(config, task.vocab_size, seed)
    optimizer = torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=config.learning_rate, betas=(0.9, 0.999)
    )
    matrices = named_matrices(model)
    shadow = ShadowMoments(matrices, tols, beta2=0.999, seed=seed)
    optimizer.register_step_pre_hook(shadow)
    snapshots: list[dict[str, torch.Tensor]] = []

    def snapshot(step: int) -> None:
        if step >= config.steps - snapshot_steps:
            snapshots.append(
                {name: optimizer.state[p]["exp_avg_sq"].double().clone() for name, p in matrices}
            )

    result = train_char_model(model, optimizer, task, config, seed, val_batches, after_step=snapshot)
    return snapshots[-1], snapshots, result, shadow


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--steps", type=int, default=None, help="AdamW/Adapprox training steps (default 300; quick 60)"
    )
    parser.add_argument(
        "--snapshots", type=int, default=None, help="per-step V_t snapshots (default 40; quick 8)"
    )
    parser.add_argument(
        "--draws", type=int, default=None, help="random draws per S-RSI measurement (default 3)"
    )
    parser.add_argument("--skip-optimizer", action="store_true", help="skip part 3 (Adapprox training run)")
    args = parser.parse_args()
    configure_threads(args.threads)

    if args.quick:
        config = CharModelConfig(
            n_layer=1, n_embd=64, n_head=2, steps=60, warmup_steps=10, corpus_chars=200_000, eval_batches=5
        )
        snapshots_count, draws, sample_every = 8, 2, 20
    else:
        config = CharModelConfig(n_layer=2, n_embd=256, n_head=4, steps=300, warmup_steps=30, eval_batches=20)
        snapshots_count, draws, sample_every = 40, 3, 50
    config = replace(config, steps=args.steps or config.steps)
    snapshots_count = args.snapshots or snapshots_count
    draws = args.draws or draws
    torch.manual_seed(args.seed)

    print(
        f"model: {config.n_layer} layers, d={config.n_embd}, {config.steps} AdamW steps; corpus {config.corpus_chars:,} chars"
    )
    task = char_task(config)
    val_batches = fixed_batches(task.val, config, config.eval_batches, seed=1)
    start = time.perf_counter()
    moments, snapshots, adamw_run, shadow = collect_adamw_moments(
        task, config, args.seed, snapshots_count, val_batches, SHADOW_TOLS
    )
    print(f"AdamW trained in {time.perf_counter() - start:.0f} s, val loss {adamw_run.final_val_loss:.3f}")

    # 1. static accuracy
    static = static_accuracy(moments, draws)
    rows = []
    for row in static["per_matrix"]:
        rows.append(
            [row["matrix"].removeprefix("transformer."), format_shape(row["shape"])]
            + [row.get(f"svd_err_k{r}") for r in RANKS]
            + [row.get(f"srsi_ratio_k{r}") for r in RANKS]
            + [row["adafactor_ratio"]]
        )
    for stat in ("median", "max"):
        rows.append(
            [stat, ""]
            + [None] * len(RANKS)
            + [static["aggregate"][f"srsi_ratio_k{r}"][stat] for r in RANKS]
            + [static["aggregate"]["adafactor_ratio"][stat]]
        )
    print_table(
        f"S-RSI (p=5, l=5, cold, float32) and Adafactor error / exact SVD error on AdamW's exp_avg_sq "
        f"(worst of {draws} draws; target S-RSI <= 1.01)",
        ["matrix", "shape"]
        + [f"SVD err k={r}" for r in RANKS]
        + [f"S-RSI/SVD k={r}" for r in RANKS]
        + ["Adafactor/SVD k=1"],
        rows,
    )
    gaps = [static["aggregate"][f"estimate_gap_k{r}"]["max"] for r in RANKS]
    print(f"\nlargest |free error estimate - true error| over all matrices and ranks: {max(gaps):.2e}")

    # 2. warm vs cold on the snapshot sequence
    sequence = sequence_accuracy(snapshots, RANKS)
    rows = []
    for rank, variants in sequence["by_rank"].items():
        cold_seconds = variants["cold l=5"]["seconds_per_snapshot"]
        for variant, data in variants.items():
            rows.append(
                [
                    rank,
                    variant,
                    data["ratio"]["median"],
                    data["ratio"]["max"],
                    data["ratio_second_half"]["median"],
                    data["ratio_second_half"]["max"],
                    data["seconds_per_snapshot"] * 1e3,
                    data["seconds_per_snapshot"] / cold_seconds,
                ]
            )
    print_table(
        f"S-RSI error / exact SVD error along AdamW's last {len(snapshots)} V_t (all {len(sequence['matrices'])} matrices; "
        "warm = previous factor + p fresh directions)",
        [
            "rank",
            "variant",
            "median",
            "max",
            "median 2nd half",
            "max 2nd half",
            "ms / snapshot",
            "time vs cold l=5",
        ],
        rows,
    )

    # 4. the recursion vs AdamW's exact EMA
    recursion = shadow.compare(moments)
    rows = []
    for tol in SHADOW_TOLS:
        recs = [r for r in recursion if r["tol"] == tol]
        for r in recs:
            rows.append(
                [
                    tol,
                    r["matrix"].removeprefix("transformer."),
                    r["rank"],
                    r["max_rank_seen"],
                    r["recursion_error_vs_adam"],
                    r["svd_error_of_adam_at_rank"],
                    r["rank_adam_needs_for_tol"],
                ]
            )
        rows.append(
            [
                tol,
                "median",
                median([r["rank"] for r in recs]),
                median([r["max_rank_seen"] for r in recs]),
                median([r["recursion_error_vs_adam"] for r in recs]),
                median([r["svd_error_of_adam_at_rank"] for r in recs]),
                median([r["rank_adam_needs_for_tol"] or math.inf for r in recs]),
            ]
        )
    print_table(
        f"Adapprox's V recursion (warm l=1, p=5, adaptive rank) fed the AdamW run's gradients for {config.steps} steps vs "
        "AdamW's exact exp_avg_sq (same beta2 = 0.999)",
        [
            "tol",
            "matrix",
            "final rank",
            "max rank seen",
            "||V_rec - V_adam|| / ||V_adam||",
            "SVD error of V_adam at that rank",
            "rank V_adam needs for tol",
        ],
        rows,
    )

    payload = {
        "benchmark": "accuracy",
        "quick": args.quick,
        "config": asdict(config),
        "adamw_val_loss": adamw_run.final_val_loss,
        "static": static,
        "sequence": sequence,
        "recursion_vs_adam": recursion,
    }

    # 3. inside the optimizer
    if not args.skip_optimizer:
        start = time.perf_counter()
        inside = optimizer_accuracy(task, config, args.seed, sample_every, val_batches)
        print(
            f"\nAdapprox trained in {time.perf_counter() - start:.0f} s, val loss {inside['final_val_loss']:.3f}"
        )
        rows = [
            [
                r["step"],
                r["median_rank"],
                r["optimizer_ratio_median"],
                r["optimizer_ratio_max"],
                r["cold_l5_ratio_median"],
                r["cold_l5_ratio_max"],
            ]
            for r in inside["by_step"]
        ]
        rows.append(
            [
                "all",
                None,
                inside["overall"]["optimizer_ratio"]["median"],
                inside["overall"]["optimizer_ratio"]["max"],
                inside["overall"]["cold_l5_ratio"]["median"],
                inside["overall"]["cold_l5_ratio"]["max"],
            ]
        )
        s = inside["settings"]
        print_table(
            f"Inside Adapprox (warm_start={s['warm_start']}, power_iters={s['power_iters']}, tol={s['tol']}): factor error at the "
            "current rank / exact SVD error of the same V, vs cold l=5 on that V",
            ["step", "median rank", "optimizer median", "optimizer max", "cold l=5 median", "cold l=5 max"],
            rows,
        )
        payload["inside_optimizer"] = inside
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
