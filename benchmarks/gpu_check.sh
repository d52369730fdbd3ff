#!/usr/bin/env bash
# One prepared GPU run (issue: the GPU path): CUDA-only tests + `fvar bench` train / distill / sample /
# tokenize figures beside the official VAR code's H100 figures, in at most ~8 minutes on one CUDA GPU.
#   bash benchmarks/gpu_check.sh [--out DIR] [--budget-s 480]
#   bash benchmarks/gpu_check.sh --dry-run [--out DIR]   # any machine: every command parses and starts
# Run from a checkout with fvar installed (pip install -e ".[dev]"); writes DIR/gpu_check.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
