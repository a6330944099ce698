"""Resume the sample nanoGPT checkpoint with AdamW, Adapprox and Adafactor, plus Adapprox ablations.

Every run starts from ``sample_states/nanogpt/ckpt.pt`` (AdamW, iter 300) and
trains ``--steps`` more iterations (500 by default) on CPU with ``adapprox_cli.train.loop.train``,
the code behind ``adapprox train``: the same data, the checkpoint's schedule continued
(nanoGPT's cosine has reached min_lr = 3e-4 at iter 300, so the rate stays there), batch 16 x 64
tokens, grad clip 1. The AdamW state is converted to Adapprox (or seeded into Adafactor's
row/column statistics) at the start. Final val loss is measured on the same 40 fixed batches
(40 x 16 x 64 tokens) for every run, so differences between runs are paired.

torch.optim.Adafactor scales its step by the weights' RMS (a relative step size), so the
schedule's rate is multiplied by a factor for it and several factors are run; the best one is
its row in the headline comparison.

Rows:
- adamw, adapprox (default settings), adafactor (lr x1, x10, x30, x100);
- adapprox ablations: tol=0 (rank grows to k_max), beta1=0 (no first moment),
  first_moment=update, cosine guidance on, warm start off;
- adamw and adapprox at a constant lr of 1e-3 instead of the schedule's 3e-4.
The headline rows run with ``--seeds`` sampler seeds (2 by default) and report the mean.

Columns: final val/train loss, optimizer state bytes and ratio to AdamW, the ranks reached
(min/median/max over the factored matrices), the step time (forward, backward, optimizer step)
and its ratio to AdamW's. Step times are medians from a separate phase of short runs (30 steps)
interleaved round by round (3 rounds), so a busy spell of the shared machine hits all settings alike.

Targets: Adapprox val loss within 1% of AdamW's and below Adafactor's; state <= 55% of AdamW's.

``--tol-grid T ...`` adds, per tol, the rank rules side by side (headline rows, every seed):
``adapprox dense tol=T`` (the default rule), ``adapprox step tol=T`` (the rule before) and
``adapprox dense tol=T bf16 m`` (bfloat16 first moment). Every Adapprox run also tracks a dense
shadow of AdamW's second moment: D starts at the checkpoint's exp_avg_sq and takes the same
clipped gradients, D = beta2 D + (1 - beta2) G^2; "distance" is ||max(Q U^T, 0) - D||_F / ||D||_F
after every step of every factored matrix (median, 90th percentile).

    PYTHONPATH=. python benchmarks/bench_resume.py [--quick] [--json PATH] [--steps N] [--tol-grid T ...]
"""

from __future__ import annotations

import hashlib
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import base_parser, configure_threads, print_table, write_json

from adapprox_cli.optim import Adapprox
from adapprox_cli.train.loop import TrainConfig, train

CHECKPOINT = Path(__file__).resolve().parent.parent / "sample_states" / "nanogpt" / "ckpt.pt"

# (label, optimizer, Adapprox options, lr factor, headline); "@ lr 1e-3" rows override the schedule.
VARIANTS: list[tuple[str, str, dict[str, Any], float, bool]] = [
    ("adamw", "adamw", {}, 1.0, True),
    ("adapprox", "adapprox", {}, 1.0, True),
    ("adafactor lr x1", "adafactor", {}, 1.0, False),
    ("adafactor lr x10", "adafactor", {}, 10.0, False),
    ("adafactor lr x30", "adafactor", {}, 30.0, False),
    ("adafactor lr x100", "adafactor", {}, 100.0, False),
    ("adapprox tol=0 (k_max)", "adapprox", {"tol": 0.0}, 1.0, False),
    ("adapprox beta1=0", "adapprox", {"beta1": 0.0}, 1.0, False),
    ("adapprox first_moment=update", "adapprox", {"first_moment": "update"}, 1.0, False),
    ("adapprox cosine guidance", "adapprox", {"cosine_guidance": True}, 1.0, False),
    ("adapprox no warm start", "adapprox", {"warm_start": False}, 1.0, False),
    ("adamw @ lr 1e-3", "adamw", {}, 1.0, False),
    ("adapprox @ lr 1e-3", "adapprox", {}, 1.0, False),
]
# A constant rate 3.3x the schedule's min_lr: whether the comparison holds when the rate is not
# what limits AdamW.
HIGHER_LR = {"learning_rate": 1e-3, "decay_lr": False}
QUICK_VARIANTS = ("adamw", "adapprox", "adafactor lr x10")


class DenseShadow:
    """Wraps ``Adapprox.step`` for one run: a float64 dense EMA per factored matrix, fed the
    gradients the step sees, against which the stored moment is measured after the step."""

    def __init__(self) -> None:
        saved = torch.load(CHECKPOINT, map_location="cpu", weights_only=False)["optimizer"]
        ids = [pid for group in saved["param_groups"] for pid in group["params"]]
        self.initial = [saved["state"].get(pid, {}).get("exp_avg_sq") for pid in ids]
        self.dense: dict[int, torch.Tensor] = {}
        self.distances: list[float] = []

    def __enter__(self) -> DenseShadow:
        self.original = Adapprox.step
        shadow = self

        @torch.no_grad()
        def step(opt, closure=None):
            params = [p for group in opt.param_groups for p in group["params"]]
            beta2 = opt.param_groups[0]["betas"][1]
            watched = [(i, p) for i, p in enumerate(params) if "exp_avg_sq_q" in opt.state.get(p, {})]
            for i, p in watched:
                d = shadow.dense.setdefault(i, shadow.initial[i].double().reshape(p.shape[0], -1).clone())
                g = p.grad.double().reshape(d.shape)
                d.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            result = shadow.original(opt, closure)
            for i, p in watched:
                state, d = opt.state[p], shadow.dense[i]
                product = (state["exp_avg_sq_q"] @ state["exp_avg_sq_u"].T).double().clamp_(min=0.0)
                shadow.distances.append(
                    float(torch.linalg.matrix_norm(product - d) / torch.linalg.matrix_norm(d))
                )
            return result

        Adapprox.step = step
        return self

    def __exit__(self, *exc) -> None:
        Adapprox.step = self.original


def run_variant(
    label: str,
    optimizer: str,
    options: dict[str, Any],
    lr_scale: float,
    steps: int,
    eval_iters: int,
    seed: int,
) -> dict[str, Any]:
    started = time.perf_counter()
    shadow = DenseShadow()
    config = TrainConfig(
        checkpoint=CHECKPOINT,
        steps=steps,
        **(HIGHER_LR if label.endswith("@ lr 1e-3") else {}),
        optimizer=optimizer,
        optimizer_options=dict(options),
        lr_scale=lr_scale,
        eval_iters=eval_iters,
        seed=seed,
        out_dir=None,
        handle_signals=False,
    )
    if optimizer == "adapprox":
        with shadow:
            result = train(config)
    else:
        result = train(config)
    distances = sorted(shadow.distances)
    ranks = sorted(result.ranks.values()) if result.ranks else []
    return {
        "label": label,
        "optimizer": optimizer,
        "options": options,
        "lr_scale": lr_scale,
        "seed": seed,
        "val_loss": result.final_val_loss,
        "train_loss": result.final_train_loss,
        "state_bytes": result.state_bytes,
        "ranks": ranks,
        "rank_by_param": result.ranks,
        "step_time": result.step_time,
        "wall_s": time.perf_counter() - started,
        "conversion_bytes": result.conversion.bytes_after if result.conversion else None,
        "distance_median": statistics.median(distances) if distances else None,
        "distance_p90": distances[int(0.9 * (len(distances) - 1))] if distances else None,
    }


def interleaved_step_times(
    variants: list[tuple[str, str, dict[str, Any], float, bool]], steps: int, rounds: int
) -> dict[str, float]:
    """Median step time of each optimizer setting, from short runs interleaved round by round.

    The long runs above go one after another, so a busy spell of a shared machine lands on
    whichever runs then; here every setting runs ``steps`` steps in each of ``rounds`` rounds,
    and the median over all those steps (first step of each run excluded) is its time.
    """
    timed = {}  # one entry per distinct setting: the lr rows and Adafactor's lr factors cost the same
    for label, optimizer, options, _, _ in variants:
        timed.setdefault((optimizer, tuple(sorted(options.items()))), label)
    samples: dict[str, list[float]] = {label: [] for label in timed.values()}
    for _ in range(rounds):
        for (optimizer, options), label in timed.items():
            result = train(
                TrainConfig(
                    checkpoint=CHECKPOINT,
                    steps=steps,
                    optimizer=optimizer,
                    optimizer_options=dict(options),
                    final_eval=False,
                    out_dir=None,
                    handle_signals=False,
                )
            )
            samples[label] += [h["dt"] for h in result.history[1:]]
    medians = {label: statistics.median(times) for label, times in samples.items()}
    # Rows that share a setting share its time.
    return {label: medians[timed[(o, tuple(sorted(opts.items())))]] for label, o, opts, _, _ in variants}


def _mean_or_none(values: list[float | None]) -> float | None:
    return statistics.fmean(values) if values and None not in values else None


def summarise(runs: list[dict[str, Any]], adamw: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for label in dict.fromkeys(r["label"] for r in runs):
        group = [r for r in runs if r["label"] == label]
        ranks = group[0]["ranks"]
        row = {
            "label": label,
            "seeds": len(group),
            "val_loss": statistics.fmean(r["val_loss"] for r in group),
            "val_losses": [r["val_loss"] for r in group],
            "train_loss": statistics.fmean(r["train_loss"] for r in group),
            "state_bytes": group[0]["state_bytes"],
            "rank_min": ranks[0] if ranks else None,
            "rank_median": ranks[len(ranks) // 2] if ranks else None,
            "rank_max": ranks[-1] if ranks else None,
            "step_time": group[0]["interleaved_step_time"],
            "distance_median": _mean_or_none([r["distance_median"] for r in group]),
            "distance_p90": _mean_or_none([r["distance_p90"] for r in group]),
        }
        row["val_vs_adamw_percent"] = 100 * (row["val_loss"] / adamw["val_loss"] - 1)
        row["state_ratio"] = row["state_bytes"] / adamw["state_bytes"]
        row["time_ratio"] = row["step_time"] / adamw["step_time"]
        rows.append(row)
    return rows


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--steps", type=int, default=None, help="steps after the checkpoint (default 500, quick 60)"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="sampler seeds for the headline rows (default 2)"
    )
    parser.add_argument(
        "--eval-iters", type=int, default=None, help="validation batches (default 40, quick 10)"
    )
    parser.add_argument("--only", nargs="*", help="run only these variant labels")
    parser.add_argument(
        "--timing-rounds", type=int, default=None, help="interleaved timing rounds (3, quick 1)"
    )
    parser.add_argument("--timing-steps", type=int, default=30, help="steps per timing run (default 30)")
    parser.add_argument(
        "--tol-grid",
        nargs="*",
        type=float,
        default=[],
        help="tols for the rank-rule rows (dense, step, bf16 m)",
    )
    args = parser.parse_args()
    configure_threads(args.threads)
    if not CHECKPOINT.is_file():
        raise SystemExit(f"{CHECKPOINT} is missing; run scripts/make_sample_states.py first")
    steps = args.steps or (60 if args.quick else 500)
    seeds = args.seeds or (1 if args.quick else 2)
    eval_iters = args.eval_iters or (10 if args.quick else 40)
    variants = [v for v in VARIANTS if not args.quick or v[0] in QUICK_VARIANTS]
    if args.only:
        variants = [v for v in variants if v[0] in args.only or v[0] == "adamw"]
    for tol in args.tol_grid:
        variants += [
            (f"adapprox dense tol={tol:g}", "adapprox", {"tol": tol, "rank_rule": "dense"}, 1.0, True),
            (f"adapprox step tol={tol:g}", "adapprox", {"tol": tol, "rank_rule": "step"}, 1.0, True),
            (
                f"adapprox dense tol={tol:g} bf16 m",
                "adapprox",
                {"tol": tol, "first_moment_dtype": "bfloat16"},
                1.0,
                True,
            ),
        ]

    runs = []
    for index in range(seeds):
        seed = args.seed + index
        for label, optimizer, options, lr_scale, headline in variants:
            if index > 0 and not headline:
                continue
            run = run_variant(label, optimizer, options, lr_scale, steps, eval_iters, seed)
            runs.append(run)
            print(
                f"{label:32s} seed {seed}: val {run['val_loss']:.4f} train {run['train_loss']:.4f} "
                f"state {run['state_bytes']:,} B step {1000 * run['step_time']:.1f} ms ({run['wall_s']:.0f} s)",
                flush=True,
            )

    rounds = args.timing_rounds or (1 if args.quick else 3)
    step_times = interleaved_step_times(variants, args.timing_steps, rounds)
    for run in runs:
        run["interleaved_step_time"] = step_times[run["label"]]
    adamw_runs = [r for r in runs if r["label"] == "adamw"]
    adamw = {
        "val_loss": statistics.fmean(r["val_loss"] for r in adamw_runs),
        "state_bytes": adamw_runs[0]["state_bytes"],
        "step_time": step_times["adamw"],
    }
    rows = summarise(runs, adamw)
    headers = [
        "variant",
        "seeds",
        "val loss",
        "vs AdamW %",
        "train loss",
        "state bytes",
        "state / AdamW",
        "ranks min/med/max",
        "dist med",
        "dist p90",
        "step ms",
        "time / AdamW",
    ]
    print_table(
        f"Resume {CHECKPOINT.parent.name}/ckpt.pt for {steps} steps (CPU, {args.threads} thread(s))",
        headers,
        [
            (
                r["label"],
                r["seeds"],
                r["val_loss"],
                r["val_vs_adamw_percent"],
                r["train_loss"],
                r["state_bytes"],
                r["state_ratio"],
                "-" if r["rank_min"] is None else f"{r['rank_min']}/{r['rank_median']}/{r['rank_max']}",
                "-" if r["distance_median"] is None else r["distance_median"],
                "-" if r["distance_p90"] is None else r["distance_p90"],
                1000 * r["step_time"],
                r["time_ratio"],
            )
            for r in rows
        ],
    )
    by_label = {r["label"]: r for r in rows}
    adafactors = [r for r in rows if r["label"].startswith("adafactor")]
    best_adafactor = min(adafactors, key=lambda r: r["val_loss"]) if adafactors else None
    adapprox = by_label.get("adapprox")
    targets = {}
    if adapprox:
        targets["val_within_1pct_of_adamw"] = adapprox["val_loss"] <= 1.01 * adamw["val_loss"]
        targets["state_at_most_55pct_of_adamw"] = adapprox["state_ratio"] <= 0.55
        if best_adafactor:
            targets["val_below_best_adafactor"] = adapprox["val_loss"] < best_adafactor["val_loss"]
        print(
            "\ntargets: "
            + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in targets.items())
            + (
                f" (best Adafactor: {best_adafactor['label']}, {best_adafactor['val_loss']:.4f})"
                if best_adafactor
                else ""
            )
        )
    write_json(
        args.json,
        {
            "checkpoint_sha256": hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest(),
            "steps": steps,
            "seeds": seeds,
            "eval_iters": eval_iters,
            "timing": {"rounds": rounds, "steps": args.timing_steps, "median_step_s": step_times},
            "runs": runs,
            "rows": rows,
            "targets": targets,
        },
    )


if __name__ == "__main__":
    main()
