"""Several optimizers resumed from the same checkpoint with the same data, and a one-line verdict."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from adapprox_cli.train.loop import TrainConfig, TrainResult, prepare_run, train

__all__ = ["compare_optimizers", "comparison_run", "comparison_verdict"]


def compare_optimizers(
    config: TrainConfig, others: list[str], callback: Callable[[str, dict[str, Any]], None] | None = None
) -> dict[str, TrainResult]:
    """Run ``config.optimizer`` and each of ``others`` from the same checkpoint, with the same data."""
    results: dict[str, TrainResult] = {}
    runs = {
        name: prepare_run(comparison_run(config, name))
        for name in [config.optimizer, *[o for o in others if o != config.optimizer]]
    }  # every run's out_dir checked before the first one trains
    for name, run in runs.items():
        results[name] = train(run, (lambda record, _n=name: callback(_n, record)) if callback else None)
        if results[name].interrupted:
            break
    return results


def comparison_run(config: TrainConfig, name: str) -> TrainConfig:
    """The run of optimizer ``name`` in a comparison: ``out_dir/name/``, ``metrics-name.jsonl``."""
    return replace(
        config,
        optimizer=name,
        out_dir=Path(config.out_dir) / name if config.out_dir is not None else None,
        metrics_path=_suffixed(config.metrics_path, name) if config.metrics_path is not None else None,
    )


def _suffixed(path: Path, name: str) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}-{name}{path.suffix}")


def comparison_verdict(results: dict[str, TrainResult]) -> str | None:
    """One line: did the first optimizer hold the second's loss, and with how much of its state?

    Compares the final validation losses (train losses when a run has no evaluation); "held"
    means at most 1% above.
    """
    if len(results) < 2:
        return None
    (name, first), (other_name, other) = list(results.items())[:2]
    use_val = first.final_val_loss is not None and other.final_val_loss is not None
    loss, baseline = (
        (first.final_val_loss, other.final_val_loss)
        if use_val
        else (first.final_train_loss, other.final_train_loss)
    )
    if loss is None or not baseline:
        return None
    change = 100 * (loss - baseline) / baseline
    share = f"{100 * first.state_bytes / other.state_bytes:.0f}%" if other.state_bytes else "-"
    which = "validation" if use_val else "training"
    label, other_label = _display_name(name), _display_name(other_name)
    if change <= 1.0:
        return (
            f"{label} held {other_label}'s {which} loss ({change:+.1f}%) with {share} of its optimizer state"
        )
    return (
        f"{label} did not hold {other_label}'s {which} loss ({change:+.1f}%, more than 1% above) "
        f"with {share} of its optimizer state"
    )


def _display_name(name: str) -> str:
    return {"adapprox": "Adapprox", "adamw": "AdamW", "adafactor": "Adafactor"}.get(name, name)
