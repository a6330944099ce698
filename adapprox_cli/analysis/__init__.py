"""Analyses of saved Adam moments: spectra, approximation errors, and the memory Adapprox saves.

Three entry points, one per CLI command, each returning plain dataclasses (``to_dict()`` gives
JSON-ready data); nothing here prints:

- ``spectrum_report`` (``spectrum``): singular values, stable rank, energy shares and the ranks
  each error tolerance needs, for every matrix-shaped moment.
- ``compare_methods`` (``compare``): every approximation method of ``methods.METHODS`` on every
  matrix, with its error relative to the Eckart-Young optimum.
- ``estimate_memory`` / ``estimate_preset`` / ``estimate_config`` (``estimate``): the rank
  adaptive S-RSI settles on at a tolerance, and the optimizer-state memory of AdamW, Adapprox
  and its peers.

Their input is ``(name, tensor)`` pairs or ``Moment`` objects (``moments``): ``load_moments``
reads them from a checkpoint. Moments are upcast to the compute dtype one matrix at a time and
released afterwards. ``analyse_run`` (``runs``) runs one analysis over the checkpoints of a
training run. How the numbers are computed, and why, is told in ``numerics``.

Modules import one way: runs -> spectrum, compare, estimate -> moments, numerics.
"""

from adapprox_cli.analysis.compare import (
    DEFAULT_METHODS,
    CompareReport,
    CompareRow,
    CompareSummary,
    compare_methods,
)
from adapprox_cli.analysis.estimate import (
    PEER_OPTIMIZERS,
    PRECISIONS,
    EstimateReport,
    MatrixRanks,
    MemoryRow,
    PeerOptimizer,
    PeerSettings,
    estimate_config,
    estimate_memory,
    estimate_preset,
    estimate_shapes,
    ranks_from_sibling,
    simulate_adaptive_rank,
    training_totals,
)
from adapprox_cli.analysis.moments import (
    Moment,
    ProgressCallback,
    as_moments,
    checkpoint_num_heads,
    common_name_prefix,
    load_moments,
    moments_from_checkpoint,
    resolve_dtype,
    select_moments,
    state_bytes_per_number,
)
from adapprox_cli.analysis.numerics import exact_squared_singular_values, gram_eigenvalues, tail_errors
from adapprox_cli.analysis.runs import (
    WEIGHTED,
    RunReport,
    StageResult,
    Trend,
    analyse_run,
    run_trends,
    stage_quantities,
)
from adapprox_cli.analysis.spectrum import (
    DEFAULT_ERROR_TOLERANCES,
    MatrixSpectrum,
    SpectrumReport,
    spectrum_report,
)
from adapprox_cli.analysis.trained import (
    RankHistory,
    RunComparison,
    RunRanks,
    ranks_against_run,
    read_rank_history,
)
from adapprox_cli.devices import resolve_device

__all__ = [
    "DEFAULT_ERROR_TOLERANCES",
    "DEFAULT_METHODS",
    "PEER_OPTIMIZERS",
    "PRECISIONS",
    "WEIGHTED",
    "CompareReport",
    "CompareRow",
    "CompareSummary",
    "EstimateReport",
    "MatrixRanks",
    "MatrixSpectrum",
    "MemoryRow",
    "Moment",
    "PeerOptimizer",
    "PeerSettings",
    "ProgressCallback",
    "RankHistory",
    "RunComparison",
    "RunRanks",
    "RunReport",
    "SpectrumReport",
    "StageResult",
    "Trend",
    "analyse_run",
    "as_moments",
    "checkpoint_num_heads",
    "common_name_prefix",
    "compare_methods",
    "estimate_config",
    "estimate_memory",
    "estimate_preset",
    "estimate_shapes",
    "exact_squared_singular_values",
    "gram_eigenvalues",
    "load_moments",
    "moments_from_checkpoint",
    "ranks_against_run",
    "ranks_from_sibling",
    "read_rank_history",
    "resolve_device",
    "resolve_dtype",
    "run_trends",
    "select_moments",
    "simulate_adaptive_rank",
    "spectrum_report",
    "stage_quantities",
    "state_bytes_per_number",
    "tail_errors",
    "training_totals",
]
