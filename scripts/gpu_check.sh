#!/usr/bin/env bash
# CUDA tests and the GPU benchmark in one command; JSON under $OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
out="${OUT:-.}"
python3 -m pytest -q -m cuda tests/test_optim.py tests/test_optim_multi_tensor.py
python3 benchmarks/bench_gpu.py --json "$out/bench_gpu.json"
