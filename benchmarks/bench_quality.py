"""Training quality: AdamW vs Adapprox variants on the bundled character-level GPT.

The model is the project's nanoGPT-compatible GPT (default 3 layers, 4 heads, d = 128, block 64,
no biases), trained on the project-generated corpus (1M characters, 90/10 split) with batch 32,
lr 2e-3, linear warmup then cosine decay to 2e-4, gradient-norm clipping 1.0 and weight decay
0.1 on >= 2-D tensors (nanoGPT's groups), for --steps steps and --seeds seeds. A seed fixes the
initial weights and the batch sequence, so every optimizer sees the same data for a given seed.
Every optimizer keeps its library defaults otherwise (AdamW: betas (0.9, 0.999), eps 1e-8;
Adapprox: its defaults, each variant changing one setting).

Reported per configuration: final validation loss (mean over a fixed set of validation batches)
as median and [min, max] over seeds; the paired difference to AdamW (same seed), median over
seeds; optimizer state bytes / AdamW's; the ranks at the end (min / median / max over the
factored matrices); and the whole-step (forward, backward, optimizer) and optimizer-only time
ratios to AdamW (median step times of each run, paired by seed). The runs are sequential, in an
order rotated every seed, so slow phases of the shared machine do not fall on one configuration.
"""

from __future__ import annotations

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
    optimizer_state_bytes,
    param_groups,
    print_table,
    summary,
    train_char_model,
    write_json,
)

from adapprox_cli.optim import Adapprox

# name: keyword arguments of Adapprox (None: torch.optim.AdamW). Each variant changes one setting
# from the library defaults, so every comparison below is one decision.
CONFIGS: dict[str, dict | None] = {
    "AdamW": None,
    "Adapprox-defaults": {},
    "first_moment=update": {"first_moment": "update"},
    "first_moment=gradient": {"first_moment": "gradient"},
    "beta1=0": {"betas": (0.0, 0.999)},
    "cold-l=5": {"warm_start": False, "power_iters": 5},
    "warm-l=1": {"warm_start": True, "power_iters": 1},
    "tol=0.01": {"tol": 0.01},
    "tol=0.05": {"tol": 0.05},
    "tol=0.1": {"tol": 0.1},
    "tol=0.15": {"tol": 0.15},
    "rank_jump=False": {"rank_jump": False},
    "rank_rule=step": {"rank_rule": "step"},
    "first_moment_dtype=bfloat16": {"first_moment_dtype": "bfloat16"},
    "rule-before (step, tol=0.05)": {"rank_rule": "step", "tol": 0.05},
}


def build_optimizer(name: str, model: torch.nn.Module, config: CharModelConfig, seed: int):
    groups = param_groups(model, config.weight_decay)
    settings = CONFIGS[name]
    if settings is None:
        return torch.optim.AdamW(groups, lr=config.learning_rate)
    return Adapprox(groups, lr=config.learning_rate, seed=seed, **settings)


def unique_configs(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """Variants equal to the library defaults are run once; returns (configs to run, alias -> run)."""
    defaults = Adapprox([torch.nn.Parameter(torch.zeros(1))]).defaults
    aliases, runs = {}, []
    for name in names:
        settings = CONFIGS[name]
        if (
            name != "Adapprox-defaults"
            and settings is not None
            and all(
                defaults[key] == (tuple(value) if isinstance(value, tuple) else value)
                for key, value in settings.items()
            )
            and "Adapprox-defaults" in names
        ):
            aliases[name] = "Adapprox-defaults"
        else:
            runs.append(name)
    return runs, aliases


def run_one(name: str, task, config: CharModelConfig, seed: int, val_batches) -> dict:
    model = build_model(config, task.vocab_size, seed)
    optimizer = build_optimizer(name, model, config, seed)
    started = time.perf_counter()
    result = train_char_model(model, optimizer, task, config, seed, val_batches)
    record = {
        "config": name,
        "seed": seed,
        "final_val_loss": result.final_val_loss,
        "final_train_loss": sum(result.train_losses[-20:]) / len(result.train_losses[-20:]),
        "wall_seconds": time.perf_counter() - started,
        "step_seconds_median": median(result.step_seconds),
        "optimizer_seconds_median": median(result.optimizer_seconds),
        "state_bytes": optimizer_state_bytes(optimizer),
    }
    if isinstance(optimizer, Adapprox):
        ranks = list(optimizer.ranks().values())
        record["ranks"] = optimizer.ranks()
        record["rank_summary"] = {"min": min(ranks), "median": median(ranks), "max": max(ranks)}
    print(
        f"  seed {seed} {name:<22} val {result.final_val_loss:.4f}  {record['wall_seconds']:.0f} s",
        flush=True,
    )
    return record


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per run (default 400; quick 40)"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per configuration (default 3; quick 1)"
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=list(CONFIGS),
        default=None,
        metavar="NAME",
        help="configurations to run (default: all; AdamW is always included): " + ", ".join(CONFIGS),
    )
    parser.add_argument("--n-layer", type=int, default=None, help="model layers (default 3)")
    parser.add_argument("--n-embd", type=int, default=None, help="model width (default 128)")
    parser.add_argument("--n-head", type=int, default=None, help="attention heads (default 4)")
    parser.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default 2e-3; min lr = lr / 10)"
    )
    args = parser.parse_args()
    configure_threads(args.threads)

    if args.quick:
        config = CharModelConfig(
            n_layer=1, n_embd=64, n_head=2, steps=40, warmup_steps=5, corpus_chars=200_000, eval_batches=5
        )
        seeds, names = args.seeds or 1, list(CONFIGS)
    else:
        config = CharModelConfig(steps=400, warmup_steps=40, eval_batches=40)
        seeds, names = args.seeds or 3, list(CONFIGS)
    config = replace(
        config,
        steps=args.steps or config.steps,
        n_layer=args.n_layer or config.n_layer,
        n_embd=args.n_embd or config.n_embd,
        n_head=args.n_head or config.n_head,
    )
    if args.steps:
        config = replace(config, warmup_steps=max(1, args.steps // 10))
    if args.lr:
        config = replace(config, learning_rate=args.lr, min_lr=args.lr / 10)
    if args.configs:
        names = ["AdamW"] + [n for n in args.configs if n != "AdamW"]
    runs, aliases = unique_configs(names)
    print(
        f"model: {config.n_layer} layers, d={config.n_embd}, block {config.block_size}, batch {config.batch_size}, "
        f"{config.steps} steps, lr {config.learning_rate}; seeds {seeds}; threads {torch.get_num_threads()}"
    )
    if aliases:
        print(
            "same as the library defaults, run once: " + ", ".join(f"{a} = {b}" for a, b in aliases.items())
        )

    task = char_task(config)
    val_batches = fixed_batches(task.val, config, config.eval_batches, seed=1)
    started = time.perf_counter()
    records: list[dict] = []
    for seed in range(args.seed, args.seed + seeds):
        shift = (seed - args.seed) % len(runs)
        for name in runs[shift:] + runs[:shift]:
            records.append(run_one(name, task, config, seed, val_batches))
    total_seconds = time.perf_counter() - started

    by_config = {name: [r for r in records if r["config"] == aliases.get(name, name)] for name in names}
    adamw = {r["seed"]: r for r in by_config["AdamW"]}
    summaries, rows = {}, []
    for name in names:
        recs = by_config[name]
        losses = summary([r["final_val_loss"] for r in recs])
        deltas = [r["final_val_loss"] - adamw[r["seed"]]["final_val_loss"] for r in recs]
        entry = {
            "same_run_as": aliases.get(name),
            "val_loss": losses,
            "train_loss": summary([r["final_train_loss"] for r in recs]),
            "delta_vs_adamw": summary(deltas),
            "deltas_vs_adamw": deltas,
            "state_ratio_vs_adamw": median(
                [r["state_bytes"] / adamw[r["seed"]]["state_bytes"] for r in recs]
            ),
            "step_time_ratio_vs_adamw": median(
                [r["step_seconds_median"] / adamw[r["seed"]]["step_seconds_median"] for r in recs]
            ),
            "optimizer_time_ratio_vs_adamw": median(
                [r["optimizer_seconds_median"] / adamw[r["seed"]]["optimizer_seconds_median"] for r in recs]
            ),
        }
        if "rank_summary" in recs[0]:
            entry["ranks_end"] = {
                key: median([r["rank_summary"][key] for r in recs]) for key in ("min", "median", "max")
            }
        summaries[name] = entry
        ranks = entry.get("ranks_end")
        rows.append(
            [
                name,
                losses["median"],
                f"[{losses['min']:.4f}, {losses['max']:.4f}]",
                entry["delta_vs_adamw"]["median"],
                f"[{entry['delta_vs_adamw']['min']:+.4f}, {entry['delta_vs_adamw']['max']:+.4f}]",
                entry["state_ratio_vs_adamw"],
                f"{ranks['min']:.0f}/{ranks['median']:.0f}/{ranks['max']:.0f}" if ranks else "-",
                entry["step_time_ratio_vs_adamw"],
                entry["optimizer_time_ratio_vs_adamw"],
            ]
        )
    print_table(
        f"Final validation loss over {seeds} seed(s), {config.steps} steps (lower is better; delta = minus AdamW, same seed)",
        [
            "config",
            "val loss (median)",
            "[min, max]",
            "delta vs AdamW",
            "delta [min, max]",
            "state / AdamW",
            "ranks min/med/max",
            "step time / AdamW",
            "opt. time / AdamW",
        ],
        rows,
    )

    # Head-to-head comparisons for the three defaults, paired by seed.
    def paired(a: str, b: str) -> dict | None:
        if a not in by_config or b not in by_config:
            return None
        la = {r["seed"]: r["final_val_loss"] for r in by_config[a]}
        lb = {r["seed"]: r["final_val_loss"] for r in by_config[b]}
        diffs = [la[s] - lb[s] for s in sorted(la) if s in lb]
        return {
            "a": a,
            "b": b,
            "a_minus_b": diffs,
            "median": median(diffs),
            "wins_a": sum(d < 0 for d in diffs),
            "n": len(diffs),
        }

    decisions = [
        p
        for p in (
            paired("first_moment=gradient", "first_moment=update"),
            paired("first_moment=gradient", "beta1=0"),
            paired("warm-l=1", "cold-l=5"),
            paired("tol=0.05", "tol=0.01"),
            paired("tol=0.1", "tol=0.05"),
        )
        if p is not None
    ]
    print_table(
        "Decisions: paired differences of final val loss (A - B, same seed; negative = A better)",
        ["A", "B", "median A - B", "per seed", "A better in"],
        [
            [
                d["a"],
                d["b"],
                d["median"],
                ", ".join(f"{x:+.4f}" for x in d["a_minus_b"]),
                f"{d['wins_a']}/{d['n']}",
            ]
            for d in decisions
        ],
    )
    print(f"\ntotal {total_seconds / 60:.1f} min")
    write_json(
        args.json,
        {
            "benchmark": "quality",
            "quick": args.quick,
            "config": asdict(config),
            "seeds": seeds,
            "adapprox_defaults": {
                k: v for k, v in Adapprox([torch.nn.Parameter(torch.zeros(1))]).defaults.items()
            },
            "summaries": summaries,
            "decisions": decisions,
            "runs": records,
            "total_seconds": total_seconds,
        },
    )


if __name__ == "__main__":
    main()
