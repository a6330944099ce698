"""What a conversion did, as plain data: per-matrix ranks and errors, memory before and after."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ConversionReport", "MatrixConversion"]


@dataclass
class MatrixConversion:
    """One factored matrix: its rank and the relative error of the stored second moment."""

    index: int
    name: str
    shape: tuple[int, ...]
    rank: int
    rank_max: int
    relative_error: float | None  # ||V - clamp(Q U^T, 0)||_F / ||V||_F; None for a rollback


@dataclass
class ConversionReport:
    """What a conversion did: per-matrix ranks and errors, and the state memory before and after."""

    source_optimizer: str
    target_optimizer: str
    matrices: list[MatrixConversion]
    dense_params: int
    bytes_before: int
    bytes_after: int
    step: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    source: str | None = None
    source_format: str | None = None
    output: str | None = None
    output_format: str | None = None
    verified: bool | None = None

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 0.0

    @property
    def max_error(self) -> float | None:
        errors = [m.relative_error for m in self.matrices if m.relative_error is not None]
        return max(errors) if errors else None

    def adapprox_settings(self) -> dict[str, Any]:
        """The Adapprox settings a container records beside the state (the fixed rank is not one)."""
        return {k: v for k, v in self.settings.items() if k != "rank"}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        data["max_error"] = self.max_error
        return data
