"""``adapprox estimate`` against the memory the optimizer then settles at, on the sample nanoGPT.

Reads the runs of ``bench_resume.py --tol-grid`` (their ranks after the last step) and, for the
same checkpoint, the ranks ``estimate_memory`` predicts at each tol (its default "exact" rule:
the smallest rank whose truncation error of the checkpoint's exp_avg_sq is <= tol). Reported per
rank rule and tol: predicted / settled factor memory (sum of k (m + n) over the factored
matrices, median over seeds) and the same with the dense-EMA sketch counted on both sides.
Target (the issue behind the rule): within 0.75-1.33x for the default rule.

    PYTHONPATH=. python benchmarks/bench_estimate.py [--runs benchmarks/results/resume_tol.json] [--json PATH]
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from common import base_parser, configure_threads, print_table, write_json

from adapprox_cli import lowrank
from adapprox_cli.analysis import estimate_memory, moments_from_checkpoint
from adapprox_cli.checkpoints import load_checkpoint

CHECKPOINT = Path(__file__).resolve().parent.parent / "sample_states" / "nanogpt" / "ckpt.pt"
RUNS = Path(__file__).resolve().parent / "results" / "resume_tol.json"


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--runs", type=Path, default=RUNS, help="bench_resume.py --tol-grid JSON")
    args = parser.parse_args()
    configure_threads(args.threads)
    runs = [r for r in json.loads(args.runs.read_text())["runs"] if r["optimizer"] == "adapprox"]
    tols = sorted({r["options"]["tol"] for r in runs})
    moments = moments_from_checkpoint(load_checkpoint(CHECKPOINT))
    report = estimate_memory(moments, tolerances=tols)
    shapes = [m.matrix_shape for m in report.matrices]
    rows = []
    for tol in tols:
        predicted = sum(m.ranks[tol] * (a + b) for m, (a, b) in zip(report.matrices, shapes))
        sketch = sum(lowrank.DENSE_SKETCH_COLUMNS * min(a, b) for a, b in shapes)
        for label in dict.fromkeys(r["label"] for r in runs if r["options"]["tol"] == tol):
            settled = []
            for run in (r for r in runs if r["label"] == label):
                ranks = list(run["rank_by_param"].values())  # factored matrices, in parameter order
                settled.append(sum(k * (a + b) for k, (a, b) in zip(ranks, shapes, strict=True)))
            factor = statistics.median(settled)
            dense_rule = run["options"].get("rank_rule", "dense") == "dense"
            with_sketch = (predicted + sketch) / (factor + sketch) if dense_rule else None
            rows.append(
                {
                    "label": label,
                    "tol": tol,
                    "predicted_factor_numbers": predicted,
                    "settled_factor_numbers": factor,
                    "predicted_over_settled": predicted / factor,
                    "with_sketch_predicted_over_settled": with_sketch,
                }
            )
    print_table(
        "estimate (exact rule on the checkpoint) vs the ranks the optimizer settled at",
        ["variant", "tol", "predicted k(m+n)", "settled k(m+n)", "predicted / settled", "incl. sketch"],
        [
            (
                r["label"],
                r["tol"],
                r["predicted_factor_numbers"],
                r["settled_factor_numbers"],
                r["predicted_over_settled"],
                "-"
                if r["with_sketch_predicted_over_settled"] is None
                else r["with_sketch_predicted_over_settled"],
            )
            for r in rows
        ],
    )
    write_json(args.json, {"runs": str(args.runs), "rows": rows})


if __name__ == "__main__":
    main()
