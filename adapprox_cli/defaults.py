"""Settings chosen by measurement that the library and the CLI share (no torch import here, so the
CLI can show them in ``--help`` without loading torch)."""

from __future__ import annotations

# [decided] Adapprox's tol: the largest relative distance (Frobenius) of the stored second moment
# to the dense EMA Adam would hold. Resuming the sample nanoGPT (benchmarks/bench_resume.py
# --tol-grid, 2 seeds) every tol in 0.05-0.15 kept AdamW's loss, and only 0.15 kept the state
# <= 55% of AdamW's with a float32 first moment; but from scratch (bench_quality.py, 200 steps,
# 2 seeds) tol 0.15 ended 0.4-0.6 above AdamW's loss where 0.05 ended 0.26 below it. 0.05 is the
# value safe on both; a bfloat16 first moment brings its state to 0.40 of AdamW's.
DEFAULT_TOL = 0.05
