#!/usr/bin/env bash
# One script for a lent GPU machine: GPU-marked tests, then the benchmarks with the card named.
#   bash benchmarks/gpu_check.sh          (from the repository root; needs .venv built by make)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
timeout 300 $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -15
timeout 200 $PY benchmarks/forward_speed.py --gpu --iters 20 2>&1 | tail -8
timeout 60 $PY -m caffe_compat.cli time -m models/tiny_resnet/deploy.prototxt --gpu 0 --phase test -n 50 --no-per-layer 2>&1 | tail -3
