"""Settings chosen by measurement that the library and the CLI share (no torch import here, so the
CLI can show them in ``--help`` without loading torch)."""

from __future__ import annotations

# [decided] Adapprox's tol: the largest relative distance (Frobenius) of the stored second moment
# to the dense EMA Adam would hold. Resuming the sample nanoGPT (benchmarks/bench_resume.py
# --tol-grid, 2 seeds), tol 0.15 kept AdamW's loss with the state <= 55% of AdamW's with a
# float32 first moment; 0.1 and 0.05 kept the loss too but held 57% and 65%.
DEFAULT_TOL = 0.15
