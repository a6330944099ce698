"""What tol bounds: the factored second moment against the dense EMA Adam holds, rule by rule.

Real gradients: the bundled nanoGPT (``sample_states/nanogpt/ckpt.pt``, AdamW at iter 300) is
trained ``--steps`` more iterations with AdamW on its own data (batch 16 x 64, grad clip 1, the
schedule's min_lr 3e-4); a fresh model of the same shape is trained from initialisation with
AdamW (lr 1e-3) for the from-scratch start. Every factored matrix's clipped gradient feeds, open
loop (the weights follow AdamW in every case, so all rules see the same gradients):

- the dense EMA D_t = beta2 D_{t-1} + (1 - beta2) G_t^2 in float64 (ground truth; beta2 = 0.99
  as in the checkpoint);
- the factored EMA under each rank rule, replicating ``optim._single_tensor_adapprox``: V_t =
  max(beta2 Q U^T + (1 - beta2) G^2, (1 - beta2) G^2) in float32, ``lowrank._srsi`` at width
  min(k, k_max) + p with the previous Q as warm start (from step 2 of a fresh state), p = 5,
  power_iters = 1, the test matrix seeded by (seed, parameter index, step), rank_min 1, k_max =
  min(m, n) // 4.

Starts: "converted": the checkpoint's exp_avg_sq factored at tol as ``convert`` does
(``convert.factor_second_moment``), the sketch initialised with the exact D_0 Omega; "scratch":
rank 1, zero factors, zero sketch.

Rules:
- ``today``: the smallest rank whose one-step truncation error of V_t is <= tol (adaptive_rank);
- ``sketch cC``: the smallest rank whose distance to D_t, estimated from a C-column sketch
  S = D Omega (``lowrank.sketched_distances``, denominator sqrt(C) ||V_t||_F), is <= tol; the
  sketch is kept on the smaller side of the matrix (c * min(m, n) numbers);
- ``sketch c4 /||S||``: the same with ||S||_F as the denominator;
- ``oracle``: the same rule with the exact distance to D_t (what a perfect sketch would give);
- ``+jump``: the first evaluation may take any rank up to k_max (sketch width k_max + p).

Reported per start and tol: the distance ||max(Q U^T, 0) - D_t||_F / ||D_t||_F after every step
of every matrix (median, 90th percentile, max), the same without the clamp, the median of the
rule's own estimate at the chosen rank, the ranks (median over matrices at the end), the factor
memory (sketch included) at the end as a ratio to the dense exp_avg_sq, and the static prediction
``adapprox estimate`` makes today (the smallest rank whose exact truncation error of D is <= tol,
on D_0 for the converted start, on the final D for both) as a memory ratio to the settled ranks.

    PYTHONPATH=. python benchmarks/bench_tol.py [--steps N] [--json PATH] [--quick]
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import base_parser, configure_threads, print_table, write_json

from adapprox_cli import lowrank
from adapprox_cli.convert import factor_second_moment
from adapprox_cli.optim import is_factored
from adapprox_cli.train.data import get_batch, read_nanogpt_dataset
from adapprox_cli.train.model import gpt_from_checkpoint, gpt_from_model_args, nanogpt_param_groups

CHECKPOINT = Path(__file__).resolve().parent.parent / "sample_states" / "nanogpt" / "ckpt.pt"
TOLS = (0.01, 0.02, 0.05, 0.1)
OVERSAMPLE = 5
POWER_ITERS = 1
BETA2 = 0.99
# (label, kind, sketch columns, denominator, jump)
RULES: list[tuple[str, str, int, str, bool]] = [
    ("today", "today", 0, "", False),
    ("today +jump", "today", 0, "", True),
    ("sketch c2", "sketch", 2, "norm", False),
    ("sketch c4", "sketch", 4, "norm", False),
    ("sketch c4 /||S||", "sketch", 4, "sketch", False),
    ("sketch c8", "sketch", 8, "norm", False),
    ("sketch c4 +jump", "sketch", 4, "norm", True),
    ("oracle", "oracle", 0, "", False),
]
QUICK_RULES = ("today", "sketch c4", "sketch c4 +jump", "oracle")


@dataclass
class Simulation:
    """One matrix's factored EMA under one rule, fed the same gradients as the dense shadow."""

    rule: tuple[str, str, int, str, bool]
    tol: float
    index: int
    m: int
    n: int
    k_max: int
    q: torch.Tensor
    u: torch.Tensor
    step: int
    seed: int
    sketch: torch.Tensor | None = None
    omega: torch.Tensor | None = None
    evaluated: bool = False
    distances: list[float] = field(default_factory=list)
    unclamped: list[float] = field(default_factory=list)
    estimates: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)

    @property
    def transposed(self) -> bool:
        return self.m > self.n  # keep the sketch on the smaller side

    def init_sketch(self, dense: torch.Tensor | None) -> None:
        _, kind, columns, _, _ = self.rule
        if kind != "sketch":
            return
        side = self.m if self.transposed else self.n
        self.omega = lowrank.dense_sketch_test_matrix(side, columns, seed=self.seed, keys=(self.index,))
        if dense is None:
            self.sketch = torch.zeros(self.n if self.transposed else self.m, columns)
        else:
            source = dense.T if self.transposed else dense
            self.sketch = lowrank.dense_sketch(source.float().contiguous(), self.omega)

    def advance(self, g: torch.Tensor, dense: torch.Tensor) -> None:
        """One optimizer step on gradient g (float32); ``dense`` is D_t, already updated."""
        _, kind, _, denominator, jump = self.rule
        self.step += 1
        fresh = g.square().mul_(1.0 - BETA2)
        v = torch.addmm(fresh, self.q, self.u.T, alpha=BETA2)
        torch.maximum(v, fresh, out=v)
        current = self.q.shape[1]
        jumping = jump and not self.evaluated
        width = self.k_max if jumping else min(current, self.k_max)
        generator = lowrank.seeded_generator(self.seed, self.index, self.step)
        warm = self.q if self.step > 1 else None
        q_s, u_s, _, errors = lowrank._srsi(v, width, OVERSAMPLE, POWER_ITERS, generator, warm)
        if kind == "today":
            estimates = errors
        elif kind == "oracle":
            eye = torch.eye(self.n, dtype=torch.float64)
            estimates = lowrank.sketched_distances(dense, q_s, u_s, eye)
        else:
            if self.transposed:
                lowrank.update_dense_sketch(self.sketch, g.T, self.omega, BETA2)
            else:
                lowrank.update_dense_sketch(self.sketch, g, self.omega, BETA2)
            norm_sq = lowrank._frobenius_sq(v) if denominator == "norm" else None
            if self.transposed:
                s = u_s.norm(dim=0)
                z = u_s / torch.where(s > 0, s, torch.ones_like(s))
                estimates = lowrank.sketched_distances(
                    self.sketch, z, q_s * s, self.omega, dense_frobenius_sq=norm_sq
                )
            else:
                estimates = lowrank.sketched_distances(
                    self.sketch, q_s, u_s, self.omega, dense_frobenius_sq=norm_sq
                )
        k = lowrank.dense_ema_rank(
            estimates,
            current,
            rank_min=1,
            rank_max=self.k_max,
            oversample=OVERSAMPLE,
            tol=self.tol,
            jump=jumping,
        )
        self.evaluated = True
        self.q, self.u = q_s[:, :k].contiguous(), u_s[:, :k].contiguous()
        product = (self.q @ self.u.T).double()
        self.unclamped.append(lowrank.relative_error(dense, product))
        self.distances.append(lowrank.relative_error(dense, product.clamp_(min=0.0)))
        self.estimates.append(float(estimates[k - 1]))
        self.ranks.append(k)

    def numbers(self) -> int:
        sketch = 0 if self.sketch is None else self.sketch.numel()
        return self.q.numel() + self.u.numel() + sketch


def truncation_rank(v: torch.Tensor, tol: float, k_max: int) -> int:
    """The static rule ``estimate`` uses: the smallest r whose exact truncation error is <= tol."""
    errors = lowrank.truncated_svd(v, 1).relative_errors.tolist()
    return next((r for r in range(1, k_max + 1) if errors[r - 1] <= tol), k_max)


def record_gradients(start: str, steps: int, seed: int) -> tuple[list[str], list[torch.Tensor], list]:
    """(names, D_0 per matrix, gradients per step) of the factored matrices under AdamW."""
    container = torch.load(CHECKPOINT, map_location="cpu", weights_only=False)
    data = read_nanogpt_dataset(CHECKPOINT.parent)
    if start == "converted":
        model = gpt_from_checkpoint(container)
        lr = float(container["config"].get("min_lr", 3e-4))
    else:
        model = gpt_from_model_args(container["model_args"], generator=torch.Generator().manual_seed(seed))
        lr = 1e-3
    groups = nanogpt_param_groups(model, 0.1)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, BETA2), foreach=False)
    if start == "converted":
        optimizer.load_state_dict(container["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = lr
    names = {id(p): name for name, p in model.named_parameters()}
    matrices = [p for p in groups[0]["params"] if is_factored(p.shape)]
    initial = [
        optimizer.state[p]["exp_avg_sq"].double().clone()
        if start == "converted"
        else torch.zeros(p.shape, dtype=torch.float64)
        for p in matrices
    ]
    generator = torch.Generator().manual_seed(10_000 + seed)
    gradients = []
    for _ in range(steps):
        x, y = get_batch(data.train, 64, 16, generator)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        gradients.append([p.grad.detach().float().clone() for p in matrices])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [names[id(p)] for p in matrices], initial, gradients


def run_start(start: str, steps: int, rules: list, tols: list[float], seed: int) -> list[dict[str, Any]]:
    started = time.perf_counter()
    names, initial, gradients = record_gradients(start, steps, seed)
    print(
        f"{start}: recorded {steps} steps of {len(names)} matrices ({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    rows = []
    for tol in tols:
        sims_by_rule: dict[str, list[Simulation]] = {rule[0]: [] for rule in rules}
        predicted_start = 0
        for index, d0 in enumerate(initial):
            m, n = d0.shape
            k_max = lowrank.default_rank_max(m, n)
            if start == "converted":
                q0, u0 = factor_second_moment(
                    d0, tol=tol, oversample=OVERSAMPLE, generator=lowrank.seeded_generator(seed, index)
                )
                q0, u0 = q0.float(), u0.float()
                predicted_start += truncation_rank(d0, tol, k_max) * (m + n)
            else:
                q0, u0 = torch.zeros(m, 1), torch.zeros(n, 1)
            for rule in rules:
                sim = Simulation(
                    rule,
                    tol,
                    index,
                    m,
                    n,
                    k_max,
                    q0.clone(),
                    u0.clone(),
                    0 if start == "scratch" else 300,
                    seed,
                )
                sim.init_sketch(d0 if start == "converted" else None)
                sims_by_rule[rule[0]].append(sim)
        dense = [d.clone() for d in initial]
        for step_gradients in gradients:
            for index, g in enumerate(step_gradients):
                dense[index].mul_(BETA2).addcmul_(g.double(), g.double(), value=1.0 - BETA2)
                for sims in sims_by_rule.values():
                    sims[index].advance(g, dense[index])
        predicted_end = sum(
            truncation_rank(d, tol, lowrank.default_rank_max(*d.shape)) * sum(d.shape) for d in dense
        )
        dense_numbers = sum(d.numel() for d in dense)
        for rule in rules:
            sims = sims_by_rule[rule[0]]
            distances = sorted(x for s in sims for x in s.distances)
            settled = [round(statistics.median(s.ranks[-20:])) for s in sims]
            settled_numbers = sum(r * (s.m + s.n) for r, s in zip(settled, sims))
            row = {
                "start": start,
                "tol": tol,
                "rule": rule[0],
                "distance_median": statistics.median(distances),
                "distance_p90": distances[int(0.9 * (len(distances) - 1))],
                "distance_max": distances[-1],
                "distance_median_last50": statistics.median(x for s in sims for x in s.distances[-50:]),
                "unclamped_median": statistics.median(x for s in sims for x in s.unclamped),
                "estimate_median": statistics.median(x for s in sims for x in s.estimates),
                "distance_step1_median": statistics.median(s.distances[0] for s in sims),
                "rank_median_end": statistics.median(settled),
                "ranks_end": settled,
                "ranks_over_steps_median": statistics.median(r for s in sims for r in s.ranks),
                "memory_vs_dense": sum(s.numbers() for s in sims) / dense_numbers,
                "factor_memory_vs_dense": settled_numbers / dense_numbers,
                "static_end_vs_settled": predicted_end / settled_numbers,
                "static_start_vs_settled": predicted_start / settled_numbers if predicted_start else None,
            }
            row["distance_over_tol"] = row["distance_median"] / tol
            rows.append(row)
        print(f"{start} tol {tol}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    return rows


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--steps", type=int, default=None, help="steps per start (default 200, quick 30)")
    parser.add_argument("--starts", nargs="*", default=["converted", "scratch"])
    parser.add_argument(
        "--tols", nargs="*", type=float, default=list(TOLS), help="tolerances (default 0.01 0.02 0.05 0.1)"
    )
    parser.add_argument("--rules", nargs="*", help="run only these rule labels")
    args = parser.parse_args()
    configure_threads(args.threads)
    steps = args.steps or (30 if args.quick else 200)
    rules = [r for r in RULES if not args.quick or r[0] in QUICK_RULES]
    if args.rules:
        rules = [r for r in RULES if r[0] in args.rules]
    rows = []
    for start in args.starts:
        rows += run_start(start, steps, rules, args.tols, args.seed)
    for start in args.starts:
        print_table(
            f"{start} start, {steps} real AdamW steps of the sample GPT (beta2 {BETA2}, p {OVERSAMPLE}, l {POWER_ITERS})",
            [
                "tol",
                "rule",
                "dist med",
                "/ tol",
                "dist p90",
                "dist max",
                "last-50 med",
                "no-clamp med",
                "estimate med",
                "step-1 med",
                "rank med (end)",
                "memory / dense",
                "static(end) / settled",
                "static(D0) / settled",
            ],
            [
                (
                    r["tol"],
                    r["rule"],
                    r["distance_median"],
                    r["distance_over_tol"],
                    r["distance_p90"],
                    r["distance_max"],
                    r["distance_median_last50"],
                    r["unclamped_median"],
                    r["estimate_median"],
                    r["distance_step1_median"],
                    r["rank_median_end"],
                    r["memory_vs_dense"],
                    r["static_end_vs_settled"],
                    r["static_start_vs_settled"],
                )
                for r in rows
                if r["start"] == start
            ],
        )
    write_json(
        args.json,
        {"steps": steps, "beta2": BETA2, "oversample": OVERSAMPLE, "power_iters": POWER_ITERS, "rows": rows},
    )


if __name__ == "__main__":
    main()
