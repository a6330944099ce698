"""``adapprox demo``: AdamW and Adapprox side by side on a small synthetic task."""

from __future__ import annotations

from typing import Annotated

import typer

from adapprox_cli.cli.app import app
from adapprox_cli.cli.options import JsonOption, SeedOption


@app.command()
def demo(
    steps: Annotated[int, typer.Option("--steps", help="Training steps for each optimizer.")] = 200,
    seed: SeedOption = 0,
    json_output: JsonOption = False,
) -> None:
    """Train one small network with AdamW and with Adapprox; print both losses and state sizes.

    A quick check that Adapprox holds AdamW's loss with a fraction of its optimizer memory,
    on a synthetic teacher-student regression (runs on the CPU in well under a minute).
    """
    from adapprox_cli import render
    from adapprox_cli.demo import demo_to_dict, run_demo
    from adapprox_cli.validation import check_at_least

    check_at_least(steps, 1, "steps")

    with render.callback_progress("training", render.show_progress(json_output)) as update:
        runs = run_demo(steps=steps, seed=seed, progress=update)
    if json_output:
        render.print_json(demo_to_dict(runs))
        return
    adamw_bytes = runs[0].state_bytes
    rows = [
        (
            r.optimizer,
            f"{r.final_loss:.4f}",
            render.human_bytes(r.state_bytes),
            f"{100 * r.state_bytes / adamw_bytes:.1f}%",
        )
        for r in runs
    ]
    render.stdout_console().print(
        render.table(
            f"{steps} steps, teacher-student MLP", ["optimizer", "final loss", "state", "vs AdamW"], rows
        )
    )
    ranks = runs[1].ranks
    if ranks:
        render.info(f"Adapprox ranks per factored matrix: {sorted(ranks.values())}")
