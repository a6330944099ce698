"""``adapprox inspect PATH``: what an optimizer checkpoint holds, without touching its tensors."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from adapprox_cli.cli.app import app
from adapprox_cli.cli.options import (
    CheckpointPath,
    JsonOption,
    OptimizerIndexOption,
    ParamsRegex,
    TrustOption,
)
from adapprox_cli.formatting import format_shape

# Hyper-parameters every torch Adam group carries: shown in their own columns, or not at all
# when they hold a default (decoupled_weight_decay is already in the optimizer kind).
_GROUP_COLUMNS = ("lr", "betas", "eps", "weight_decay")
_QUIET_VALUES = {
    "amsgrad": (False,),
    "maximize": (False,),
    "foreach": (None, False),
    "capturable": (False,),
    "differentiable": (False,),
    "fused": (None, False),
    "decoupled_weight_decay": (True, False, None),
}


@app.command("inspect")
def inspect_command(
    path: CheckpointPath,
    params: ParamsRegex = None,
    json_output: JsonOption = False,
    trust_checkpoint: TrustOption = False,
    optimizer_index: OptimizerIndexOption = 0,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Also verify the CRC-32 of every member of zip torch.save files (reads every byte).",
        ),
    ] = False,
) -> None:
    """Show a checkpoint's format, optimizer, step, param groups, parameters and state memory.

    The last column shows the second moments the analysis commands use: matrices, >2-D weights as (shape[0], rest); vectors and scalars are skipped but counted in memory.

    Examples:

        adapprox inspect out/ckpt.pt

        adapprox inspect checkpoint-500/ --params 'attn' --json
    """
    from adapprox_cli.checkpoints import describe_checkpoint, load_checkpoint

    integrity = None
    if check:
        from adapprox_cli.checkpoints.integrity import check_integrity

        integrity = check_integrity(path)
    checkpoint = load_checkpoint(path, trust_checkpoint=trust_checkpoint, optimizer_index=optimizer_index)
    info = describe_checkpoint(checkpoint, params)
    if integrity is not None:
        info["integrity"] = integrity.to_dict()
    if json_output:
        from adapprox_cli.render import print_json

        print_json(info)
        return
    _render(info)


def _render(info: dict[str, Any]) -> None:
    from adapprox_cli.render import human_bytes, safe_text, stdout_console, table, warn

    console = stdout_console()
    console.print(f"[bold]{safe_text(info['path'])}[/]")
    console.print(
        f"format [cyan]{info['format']}[/]   optimizer [cyan]{info['optimizer']}[/]   "
        f"step [cyan]{info['step'] if info['step'] is not None else '-'}[/]"
    )
    groups = _group_rows(info)
    with_other = any(row[-1] for row in groups)
    columns = ["group", "params", *_GROUP_COLUMNS] + ["other"] * with_other
    console.print(
        _folding(table("Param groups", columns, [row if with_other else row[:-1] for row in groups]))
    )
    # Columns that are the same for every parameter are said once, under the table.
    params = info["params"]
    dtypes = {p["dtype"] for p in params}
    keys = {" ".join(p["state_keys"]) for p in params if p["state_keys"]}
    columns = (
        ["#", "name", "shape"] + ["dtype"] * (len(dtypes) > 1) + ["state"] * (len(keys) > 1) + ["analysed as"]
    )
    rows = [
        (p["index"], p["name"], format_shape(p["shape"]))
        + ((p["dtype"],) if len(dtypes) > 1 else ())
        + ((" ".join(p["state_keys"]) or "(none)",) if len(keys) > 1 else ())
        + (_analysed(p),)
        for p in params
    ]
    title = "Parameters" + (f" matching {info['params_filter']!r}" if info["params_filter"] else "")
    console.print(_folding(table(title, columns, rows, right_from=len(columns))))
    common = ([f"dtype {next(iter(dtypes))}"] if len(dtypes) == 1 else []) + (
        [f"state {next(iter(keys))}"] if len(keys) == 1 else []
    )
    if common:
        console.print(safe_text("every parameter: " + ", ".join(common)))
    analysed = info["analysed"]
    console.print(
        f"{info['num_params']} parameters ({info['num_params_with_state']} with state); "
        f"{analysed['count']} second moments analysed as matrices, {analysed['skipped']} skipped (vectors, scalars "
        f"or no state); optimizer state {human_bytes(info['total_state_bytes'])}; names from {info['names_source']}"
    )
    integrity = info.get("integrity")
    if integrity is not None:
        members = sum(integrity["checked"].values())
        console.print(
            safe_text(f"CRC-32 intact: {members} members of {len(integrity['checked'])} zip file(s)")
            + (
                safe_text(f"; no checksums in {', '.join(integrity['unchecked'])}")
                if integrity["unchecked"]
                else ""
            )
        )
    for message in info["warnings"]:
        warn(message)


def _folding(t: Any) -> Any:
    # Long parameter names and state keys wrap instead of being cut off in narrow terminals.
    for column in t.columns[2:]:
        column.no_wrap = False
        column.overflow = "fold"
    return t


def _group_rows(info: dict[str, Any]) -> list[tuple]:
    rows = []
    for g in info["param_groups"]:
        other = {
            k: v
            for k, v in g.items()
            if k not in ("group", "num_params", *_GROUP_COLUMNS)
            and not (k in _QUIET_VALUES and v in _QUIET_VALUES[k])
        }
        rows.append(
            (
                g["group"],
                g["num_params"],
                *(_value(g.get(k)) for k in _GROUP_COLUMNS),
                ", ".join(f"{k}={_value(v)}" for k, v in other.items()),
            )
        )
    return rows


def _value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_value(x) for x in v) + ")"
    return str(v)


def _analysed(p: dict[str, Any]) -> str:
    if p["analysed"]:
        view = format_shape(p["matrix_shape"])
        return view + (f" (rank {p['rank']})" if p["rank"] is not None else "")
    if not p["state_keys"]:
        return "skipped (no state)"
    return "skipped (matrix without second moment)" if p["matrix_shape"] else f"skipped ({len(p['shape'])}-D)"
