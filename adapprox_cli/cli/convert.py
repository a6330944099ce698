"""``adapprox convert PATH -o OUT``: AdamW state to Adapprox factors, or back."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adapprox_cli.cli.app import app
from adapprox_cli.cli.options import CheckpointPath, JsonOption, OptimizerIndexOption, SeedOption, TrustOption
from adapprox_cli.defaults import DEFAULT_TOL
from adapprox_cli.formatting import format_shape


@app.command("convert")
def convert_command(
    path: CheckpointPath,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the converted checkpoint.")],
    to: Annotated[
        str | None,
        typer.Option(
            "--to", help="Target optimizer: adapprox or adamw (default: the other one than the input)."
        ),
    ] = None,
    tol: Annotated[
        float,
        typer.Option(
            "--tol",
            help="Largest relative distance (Frobenius) of the stored second moment to AdamW's; "
            "the optimizer keeps it there while training.",
        ),
    ] = DEFAULT_TOL,
    rank: Annotated[
        int | None,
        typer.Option("--rank", help="Factor every matrix at this rank (clamped to k_max) instead."),
    ] = None,
    rank_max: Annotated[
        int | None, typer.Option("--rank-max", help="Largest rank of any matrix (default min(m, n) // 4).")
    ] = None,
    beta1: Annotated[
        float | None,
        typer.Option("--beta1", help="First-moment decay of the Adapprox state; 0 drops exp_avg."),
    ] = None,
    first_moment: Annotated[
        str | None, typer.Option("--first-moment", help="Adapprox first-moment form: gradient or update.")
    ] = None,
    output_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="auto (the input's container), plain (a bare optimizer state dict) or safetensors.",
        ),
    ] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Read the output back and check shapes, ranks and errors.")
    ] = False,
    seed: SeedOption = 0,
    json_output: JsonOption = False,
    trust_checkpoint: TrustOption = False,
    optimizer_index: OptimizerIndexOption = 0,
) -> None:
    """Convert an AdamW checkpoint's optimizer state to Adapprox (or an Adapprox one back to AdamW).

    Each weight matrix's exp_avg_sq becomes low-rank factors at the rank the optimizer would
    settle on for --tol; exp_avg, step and the learning rate, betas, eps and weight decay carry
    over. The input is never modified, and the output appears only once it is complete.

    Examples:

        adapprox convert out/ckpt.pt -o out/ckpt-adapprox.pt --verify

        adapprox convert checkpoint-500/ -o checkpoint-500-adapprox/ --tol 0.02

        adapprox convert out/ckpt-adapprox.pt -o out/ckpt-adamw.pt --to adamw
    """
    from adapprox_cli.convert import convert_checkpoint
    from adapprox_cli.render import callback_progress, show_progress

    settings = {"rank_max": rank_max, "first_moment": first_moment, "seed": seed}
    with callback_progress("factoring", show_progress(json_output)) as update:
        report = convert_checkpoint(
            path,
            output,
            to=to,
            output_format=output_format,
            tol=tol,
            rank=rank,
            beta1=beta1,
            force=force,
            verify=verify,
            check_input=verify,  # --verify also compares the input's own checksums
            trust_checkpoint=trust_checkpoint,
            optimizer_index=optimizer_index,
            progress=update,
            **{k: v for k, v in settings.items() if v is not None},
        )
    if json_output:
        from adapprox_cli.render import print_json

        print_json(report.to_dict())
        return
    _render(report)


def _render(report) -> None:
    from adapprox_cli.render import human_bytes, safe_text, stdout_console, table, warn

    console = stdout_console()
    rows = [
        (
            m.name,
            format_shape(m.shape),
            m.rank,
            m.rank_max,
            "-" if m.relative_error is None else f"{m.relative_error:.4f}",
        )
        for m in report.matrices
    ]
    title = f"{report.source_optimizer} → {report.target_optimizer}: factored second moments"
    console.print(table(title, ["parameter", "shape", "rank", "k_max", "rel. error"], rows, right_from=2))
    console.print(
        f"{len(report.matrices)} matrices, {report.dense_params} dense second moments; optimizer state "
        f"{human_bytes(report.bytes_before)} → {human_bytes(report.bytes_after)} "
        f"({100 * report.ratio:.1f}% of before)"
        + (f"; largest error {report.max_error:.4f}" if report.max_error is not None else "")
    )
    verified = " (verified)" if report.verified else ""
    console.print(f"wrote [bold]{safe_text(report.output)}[/] ({report.output_format}){verified}")
    for message in report.warnings:
        warn(message)
