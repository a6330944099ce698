"""``adapprox train PATH --steps N``: resume a checkpoint with Adapprox (or AdamW, Adafactor)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from adapprox_cli.cli.app import app
from adapprox_cli.cli.options import JsonOption, PlotOption, TrustOption
from adapprox_cli.errors import InputError


@app.command("train")
def train_command(
    path: Annotated[
        Path,
        typer.Argument(
            help="A nanoGPT-layout ckpt.pt (model, optimizer, model_args, iter_num, config), or its directory.",
            show_default=False,
        ),
    ],
    steps: Annotated[
        int, typer.Option("--steps", help="Optimizer steps to run after the checkpoint's iter_num.")
    ] = 100,
    optimizer: Annotated[str, typer.Option("--optimizer", help="adapprox, adamw or adafactor.")] = "adapprox",
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="package.module:factory returning the nn.Module (default: GPT from model_args)."
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Directory with train.bin, val.bin, meta.pkl (default: beside PATH)."),
    ] = None,
    text: Annotated[
        Path | None,
        typer.Option("--text", help="Train on this UTF-8 text, encoded with the checkpoint's vocabulary."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Directory for ckpt.pt and the plots (default: adapprox-runs/<checkpoint>-<optimizer>/ "
            "in the current directory; the input checkpoint's folder is left alone).",
        ),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (bf16 autocast on CUDA).")
    ] = "auto",
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Sequences per micro-batch.")] = None,
    block_size: Annotated[int | None, typer.Option("--block-size", help="Tokens per sequence.")] = None,
    grad_accum: Annotated[
        int, typer.Option("--grad-accum", help="Micro-batches per step (per process).")
    ] = 1,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Peak learning rate (default: the checkpoint's).")
    ] = None,
    min_lr: Annotated[
        float | None, typer.Option("--min-lr", help="Final learning rate of the cosine.")
    ] = None,
    warmup_iters: Annotated[
        int | None, typer.Option("--warmup-iters", help="Linear warmup iterations.")
    ] = None,
    lr_decay_iters: Annotated[
        int | None, typer.Option("--lr-decay-iters", help="Iteration where the cosine reaches --min-lr.")
    ] = None,
    decay_lr: Annotated[
        bool | None,
        typer.Option("--decay-lr/--no-decay-lr", help="Warmup + cosine schedule, or a constant --lr."),
    ] = None,
    eval_interval: Annotated[
        int,
        typer.Option(
            "--eval-interval",
            help="Evaluate before the first step and every this many steps (0: only at the end).",
        ),
    ] = 0,
    eval_iters: Annotated[int, typer.Option("--eval-iters", help="Batches per evaluation.")] = 20,
    save_interval: Annotated[
        int, typer.Option("--save-interval", help="Write a checkpoint every this many steps (0: at the end).")
    ] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the batch sampler.")] = 1337,
    tol: Annotated[
        float | None,
        typer.Option(
            "--tol", help="Adapprox: largest relative distance of the stored second moment to Adam's."
        ),
    ] = None,
    beta1: Annotated[float | None, typer.Option("--beta1", help="First-moment decay; 0 stores none.")] = None,
    first_moment: Annotated[
        str | None, typer.Option("--first-moment", help="Adapprox: gradient (Adam's form) or update.")
    ] = None,
    rank_max: Annotated[
        int | None, typer.Option("--rank-max", help="Adapprox: largest rank per matrix.")
    ] = None,
    metrics: Annotated[
        Path | None,
        typer.Option("--metrics", help="Append per-step and eval metrics to this JSON-lines file."),
    ] = None,
    plot: PlotOption = None,
    compare: Annotated[
        str | None, typer.Option("--compare", help="Also run adamw or adafactor from the same checkpoint.")
    ] = None,
    json_output: JsonOption = False,
    trust_checkpoint: TrustOption = False,
) -> None:
    """Resume training from a checkpoint; an AdamW state is converted to Adapprox on the fly.

    The learning-rate schedule (warmup + cosine) continues from the checkpoint's iter_num and
    config. Ctrl-C saves a checkpoint at the next step boundary and exits; run the command on
    the saved ckpt.pt to continue exactly where it stopped. Under torchrun every process trains
    a replica (DDP) and only rank 0 writes.

    Examples:

        adapprox train sample_states/nanogpt/ckpt.pt --steps 500 --eval-interval 100 --plot loss.png

        adapprox train out/ckpt.pt --steps 200 --compare adamw

        torchrun --nproc-per-node 2 -m adapprox_cli train out/ckpt.pt --steps 100 --device cpu
    """
    from adapprox_cli.train.loop import OPTIMIZERS, TrainConfig, compare_optimizers, plot_loss_curves, train

    if optimizer not in OPTIMIZERS:
        raise InputError(f"--optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if compare is not None and compare not in ("adamw", "adafactor", "adapprox"):
        raise InputError(f"--compare {compare!r}: choose adamw or adafactor")
    if steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}")
    if plot is not None:
        from adapprox_cli.plots import check_plot_path

        plot = check_plot_path(plot)  # before training: a bad path must not waste the run
    options = {"tol": tol, "beta1": beta1, "first_moment": first_moment, "rank_max": rank_max}
    # e.g. "nanogpt-ckpt" for sample_states/nanogpt/ckpt.pt, "checkpoint-500" for a Trainer directory
    run_name = path.name if path.is_dir() else f"{path.parent.name}-{path.stem}".strip("-")
    config = TrainConfig(
        checkpoint=path,
        steps=steps,
        optimizer=optimizer,
        model=model,
        data_dir=data,
        text=text,
        out_dir=out
        if out is not None
        else Path("adapprox-runs") / f"{run_name}-{'compare' if compare else optimizer}",
        device=device,
        batch_size=batch_size,
        block_size=block_size,
        grad_accum=grad_accum,
        learning_rate=lr,
        min_lr=min_lr,
        warmup_iters=warmup_iters,
        lr_decay_iters=lr_decay_iters,
        decay_lr=decay_lr,
        eval_interval=eval_interval,
        eval_iters=eval_iters,
        save_interval=save_interval,
        seed=seed,
        metrics_path=metrics,
        optimizer_options={k: v for k, v in options.items() if v is not None},
        trust_checkpoint=trust_checkpoint,
    )
    master = os.environ.get("RANK", "0") == "0"
    with _Progress(enabled=master and not json_output) as progress:
        if compare:
            results = compare_optimizers(config, [compare], callback=progress.update)
        else:
            results = {optimizer: train(config, lambda record: progress.update(optimizer, record))}
    if not master:
        return
    if plot is None and compare:
        plot = Path(config.out_dir) / "loss.png"  # a comparison always comes with its curves
    if plot is not None:
        plot_loss_curves(results, plot)
    if json_output:
        from adapprox_cli.render import print_json

        data_out = {name: _summary(result) for name, result in results.items()}
        print_json(data_out if compare else data_out[optimizer])
        return
    _render(results, plot)


def _summary(result: Any) -> dict[str, Any]:
    data = result.to_dict()
    data.pop("history")
    return data


class _Progress:
    """A Rich progress bar on stderr: loss, tokens/s and optimizer-state memory per step."""

    def __init__(self, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from adapprox_cli.render import stderr_console

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("state {task.fields[mem]}"),
            TimeRemainingColumn(),
            console=stderr_console(),
            disable=not enabled,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def update(self, name: str, record: dict[str, Any]) -> None:
        from adapprox_cli.render import human_bytes

        event = record.get("event")
        if event == "start":
            self.tasks[name] = self.bar.add_task(
                name, total=record["steps"], loss="-", tps="-", mem=human_bytes(record["state_bytes"])
            )
        elif event == "step" and name in self.tasks:
            self.bar.update(
                self.tasks[name],
                completed=record["step"],
                loss=f"{record['loss']:.4f}",
                tps=f"{record['tokens_per_s']:,.0f}",
                mem=human_bytes(record["state_bytes"]),
            )
        elif event == "eval":
            self.bar.console.print(
                f"{name} iter {record['iter']}: train loss {record['train']:.4f}, val loss {record['val']:.4f}"
            )
        elif event == "save":
            self.bar.console.print(f"{name} iter {record['iter']}: saved {record['path']}")


def _render(results: dict[str, Any], plot: Path | None) -> None:
    from adapprox_cli.render import human_bytes, stdout_console, table, warn

    console = stdout_console()
    adamw_bytes = next(
        (r.conversion.bytes_before for r in results.values() if r.conversion is not None), None
    )
    rows = []
    for name, r in results.items():
        rows.append(
            (
                name,
                f"{r.start_iter} → {r.end_iter}",
                _loss(r.final_train_loss),
                _loss(r.final_val_loss),
                human_bytes(r.state_bytes),
                f"{1000 * r.step_time:.1f} ms",
                f"{r.tokens_per_second:,.0f}",
            )
        )
    console.print(
        table(
            "Training", ["optimizer", "iterations", "train loss", "val loss", "state", "step", "tok/s"], rows
        )
    )
    for name, r in results.items():
        if r.conversion is not None:
            c = r.conversion
            console.print(
                f"{name}: converted the checkpoint's {c.source_optimizer} state "
                f"({human_bytes(c.bytes_before)} → {human_bytes(c.bytes_after)})"
            )
            for message in c.warnings:
                warn(message)
        if r.ranks:
            ranks = sorted(r.ranks.values())
            console.print(
                f"{name}: ranks of {len(ranks)} factored matrices: min {ranks[0]}, "
                f"median {ranks[len(ranks) // 2]}, max {ranks[-1]}"
                + (f"; state {100 * r.state_bytes / adamw_bytes:.1f}% of AdamW's" if adamw_bytes else "")
            )
        if r.interrupted:
            warn(f"{name}: interrupted at iteration {r.end_iter}")
        for path in r.checkpoints[-1:]:
            console.print(f"{name}: checkpoint [bold]{path}[/]")
    if plot is not None:
        console.print(f"loss curves: [bold]{plot}[/]")


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
