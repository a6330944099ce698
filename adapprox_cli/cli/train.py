"""``adapprox train PATH --steps N``: resume a checkpoint with Adapprox (or AdamW, Adafactor)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from adapprox_cli.cli.app import app
from adapprox_cli.cli.options import JsonOption, PlotOption, TrustOption
from adapprox_cli.defaults import DEFAULT_TOL
from adapprox_cli.errors import InputError
from adapprox_cli.validation import check_at_least


@app.command("train")
def train_command(
    ctx: typer.Context,
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
    until: Annotated[
        int | None,
        typer.Option(
            "--until", help="Train until this iteration instead of for --steps.", show_default=False
        ),
    ] = None,
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
            help="Directory for ckpt.pt and the plots; one run per directory (see --resume, --force). "
            "The input checkpoint's folder is left alone.",
            show_default="adapprox-runs/FOLDER-CHECKPOINT-OPTIMIZER/, e.g. adapprox-runs/nanogpt-ckpt-adapprox/",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="--out holds an earlier run: continue from its ckpt.pt instead of PATH."
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="--out holds an earlier run: replace it and its metrics.")
    ] = False,
    device: Annotated[
        str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (bf16 autocast on CUDA).")
    ] = "auto",
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size", help="Sequences per micro-batch.", show_default="the checkpoint's, else 12"
        ),
    ] = None,
    block_size: Annotated[
        int | None,
        typer.Option("--block-size", help="Tokens per sequence.", show_default="the checkpoint's"),
    ] = None,
    grad_accum: Annotated[
        int, typer.Option("--grad-accum", help="Micro-batches per step (per process).")
    ] = 1,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="Peak learning rate. A schedule still running continues with this peak; one that has "
            "ended (iter_num >= lr_decay_iters) would keep every step at min_lr, so --lr then starts a "
            "fresh warmup + cosine over this run (to --min-lr, default lr/10, at the last step).",
            show_default="the checkpoint's",
        ),
    ] = None,
    min_lr: Annotated[
        float | None,
        typer.Option("--min-lr", help="Final learning rate of the cosine.", show_default="the checkpoint's"),
    ] = None,
    warmup_iters: Annotated[
        int | None,
        typer.Option(
            "--warmup-iters",
            help="Linear warmup iterations.",
            show_default="the checkpoint's; a tenth of the steps for a fresh schedule",
        ),
    ] = None,
    lr_decay_iters: Annotated[
        int | None,
        typer.Option(
            "--lr-decay-iters",
            help="Iteration where the cosine reaches --min-lr.",
            show_default="the checkpoint's",
        ),
    ] = None,
    decay_lr: Annotated[
        bool | None,
        typer.Option(
            "--decay-lr/--no-decay-lr",
            help="Warmup + cosine schedule, or a constant --lr.",
            show_default="the checkpoint's",
        ),
    ] = None,
    eval_interval: Annotated[
        int | None,
        typer.Option(
            "--eval-interval",
            help="Evaluate before the first step and every this many steps (0: only at the end).",
            show_default="a quarter of the steps (5 evaluations)",
        ),
    ] = None,
    eval_iters: Annotated[int, typer.Option("--eval-iters", help="Batches per evaluation.")] = 20,
    save_interval: Annotated[
        int, typer.Option("--save-interval", help="Write a checkpoint every this many steps (0: at the end).")
    ] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the batch sampler.")] = 1337,
    tol: Annotated[
        float | None,
        typer.Option(
            "--tol",
            help="Adapprox: largest relative distance of the stored second moment to Adam's.",
            show_default=f"the state's, else {DEFAULT_TOL}",
        ),
    ] = None,
    beta1: Annotated[
        float | None,
        typer.Option("--beta1", help="First-moment decay; 0 stores none.", show_default="the state's"),
    ] = None,
    first_moment: Annotated[
        str | None,
        typer.Option(
            "--first-moment",
            help="Adapprox: gradient (Adam's form) or update.",
            show_default="the state's, else gradient",
        ),
    ] = None,
    rank_max: Annotated[
        int | None,
        typer.Option(
            "--rank-max",
            help="Adapprox: largest rank per matrix.",
            show_default="the state's, else min(m, n) // 4",
        ),
    ] = None,
    metrics: Annotated[
        Path | None,
        typer.Option(
            "--metrics",
            help="Write per-step and eval metrics to this JSON-lines file (with --compare one per "
            "optimizer: M-adapprox.jsonl, M-adamw.jsonl).",
        ),
    ] = None,
    plot: PlotOption = None,
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            help="Also run adamw or adafactor from the same checkpoint (writes --out/NAME/ and --out/loss.png).",
        ),
    ] = None,
    fsdp: Annotated[
        bool,
        typer.Option(
            "--fsdp", help="Under torchrun: shard weights and optimizer state with FSDP2 instead of DDP."
        ),
    ] = False,
    json_output: JsonOption = False,
    trust_checkpoint: TrustOption = False,
) -> None:
    """Resume training from a checkpoint; an AdamW state is converted to Adapprox on the fly.

    The learning-rate schedule (warmup + cosine) continues from the checkpoint's iter_num and
    config (see --lr for an ended one). Ctrl-C (SIGINT) or SIGTERM saves a checkpoint at the next
    step boundary and exits with 130 or 143; run the same command with --resume (or train the saved
    ckpt.pt: it records its data) to continue exactly where it stopped. Under torchrun every
    process trains a replica (DDP) and only rank 0 writes; with --fsdp the weights and the
    optimizer state are sharded by rows over the processes (FSDP2) and rank 0 writes the
    gathered state.

    Examples:

        adapprox train sample_states/nanogpt/ckpt.pt --steps 500 --eval-interval 100 --plot loss.png

        adapprox train out/ckpt.pt --steps 200 --compare adamw

        torchrun --nproc-per-node 2 -m adapprox_cli train out/ckpt.pt --steps 100 --device cpu

        torchrun --nproc-per-node 2 -m adapprox_cli train out/ckpt.pt --steps 100 --device cpu --fsdp
    """
    from adapprox_cli.train.compare import compare_optimizers
    from adapprox_cli.train.loop import OPTIMIZERS, TrainConfig, train

    if optimizer not in OPTIMIZERS:
        raise InputError(f"--optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if compare is not None and compare not in ("adamw", "adafactor", "adapprox"):
        raise InputError(f"--compare {compare!r}: choose adamw or adafactor")
    # By name: Typer may vendor click, whose ParameterSource enum then lives elsewhere.
    steps_given = getattr(ctx.get_parameter_source("steps"), "name", None) == "COMMANDLINE"
    if steps_given and until is not None:
        raise InputError("--steps and --until both say how long to train: pass one of them")
    check_at_least(steps, 1, "steps")
    if plot is not None:
        from adapprox_cli.plots import check_plot_path

        plot = check_plot_path(plot)  # before training: a bad path must not waste the run
    options = {"tol": tol, "beta1": beta1, "first_moment": first_moment, "rank_max": rank_max}
    config = TrainConfig(
        checkpoint=path,
        steps=steps,
        until=until,
        optimizer=optimizer,
        model=model,
        data_dir=data,
        text=text,
        out_dir=out if out is not None else _default_out(path, "compare" if compare else optimizer),
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
        resume=resume,
        force=force,
        fsdp=fsdp,
    )
    master = os.environ.get("RANK", "0") == "0"
    with _Progress(enabled=master and not json_output) as progress:
        if compare:
            results = compare_optimizers(config, [compare], callback=progress.update)
        else:
            results = {optimizer: train(config, lambda record: progress.update(optimizer, record))}
    if master:
        _report(results, Path(config.out_dir), plot, bool(compare), json_output)
    # Stopped by SIGINT/SIGTERM: the checkpoint is saved, but `train && next` must not carry on.
    stopped = next((r.stop_signal for r in results.values() if r.stop_signal), None)
    if stopped:
        raise typer.Exit(128 + int(stopped))


def _default_out(path: Path, label: str) -> Path:
    # e.g. "nanogpt-ckpt" for sample_states/nanogpt/ckpt.pt, "checkpoint-500" for a Trainer directory
    run_name = path.name if path.is_dir() else f"{path.parent.name}-{path.stem}".strip("-")
    return Path("adapprox-runs") / f"{run_name}-{label}"


def _report(
    results: dict[str, Any], out_dir: Path, plot: Path | None, compared: bool, json_output: bool
) -> None:
    """The loss curves, then the runs as JSON or as a table (rank 0 only)."""
    from adapprox_cli.plots import plot_loss_curves
    from adapprox_cli.train.compare import comparison_verdict

    if plot is None and compared:
        plot = out_dir / "loss.png"  # a comparison always comes with its curves
    if plot is not None:
        plot_loss_curves(results, plot)
    verdict = comparison_verdict(results) if compared else None
    if json_output:
        from adapprox_cli.render import print_json

        # One shape with or without --compare: a list of runs, the first the --optimizer one.
        print_json(
            {
                "runs": [_summary(result) for result in results.values()],
                "verdict": verdict,
                "plot": str(plot) if plot is not None else None,
            }
        )
    else:
        _render(results, plot, verdict)


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
        self.started = False

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.started:
            self.bar.__exit__(*exc)

    def update(self, name: str, record: dict[str, Any]) -> None:
        # Started at the first record, so a run refused before its first step leaves only the
        # one-line error on stderr (an ended live display leaves a blank line behind).
        if not self.started:
            self.bar.__enter__()
            self.started = True
        from adapprox_cli.render import human_bytes, safe_text

        event = record.get("event")
        if event == "start":
            from adapprox_cli.render import warn

            for note in record.get("notes", []):
                warn(f"{name}: {note}")
            self.tasks[name] = self.bar.add_task(
                name, total=record["steps"], loss="-", tps="-", mem=human_bytes(record["state_bytes"])
            )
        elif event == "step" and name in self.tasks:
            self.bar.update(
                self.tasks[name],
                completed=record["step"],
                loss=f"{record['loss']:.4f}",
                tps=f"{record['tokens_per_s']:,.0f}",  # running value: ends on the summary's tok/s
                mem=human_bytes(record["state_bytes"]),
            )
        elif event == "eval":
            self.bar.console.print(
                f"{name} iter {record['iter']}: train loss {record['train']:.4f}, val loss {record['val']:.4f}"
            )
        elif event == "save":
            self.bar.console.print(safe_text(f"{name} iter {record['iter']}: saved {record['path']}"))


def _render(results: dict[str, Any], plot: Path | None, verdict: str | None) -> None:
    from adapprox_cli.render import human_bytes, safe_text, stdout_console, table, warn

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
    console.print("tok/s: training tokens per wall second of the optimizer steps, evaluation excluded")
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
            console.print(f"{name}: checkpoint [bold]{safe_text(path)}[/]")
        if r.metrics_path is not None:
            console.print(f"{name}: metrics [bold]{safe_text(r.metrics_path)}[/]")
    if plot is not None:
        console.print(f"loss curves: [bold]{safe_text(plot)}[/]")
    if verdict is not None:
        console.print(verdict)


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
