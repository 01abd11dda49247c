#!/usr/bin/env bash
# The GPU tables of docs/performance.md, in one command on a fresh GPU machine where torch and
# torchvision (with numba, h5py, click, joblib, opencv-python-headless) are installed; under 8
# minutes. Run from anywhere: it works from the repository's own files, installs nothing.
#   bash benchmarks/gpu_check.sh             # on the GPU
#   bash benchmarks/gpu_check.sh --dry-run   # tiny sizes on the CPU: what `make test` checks
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
