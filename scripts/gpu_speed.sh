#!/usr/bin/env bash
# The GPU measurements behind the README's Speed section, in one run on one GPU machine:
#   OUT=runs/gpu_speed bash scripts/gpu_speed.sh
# Needs Fashion-MNIST where data.fashion_mnist finds it (e.g. FASHION_MNIST_DIR). Each step has
# its own time limit and writes its log and JSON under $OUT as it goes.
set -uo pipefail
OUT=${OUT:-runs/gpu_speed}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | grep -v -e DeprecationWarning -e "warnings.warn" | tee "$OUT/$name.log"
}
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/env.log"
# model only, paper geometry: G = 1, 2, 4 in bf16, NHWC, batch 256, eager and compiled, beside the reference
step model_paper 200 $PY scripts/benchmark.py --geometry paper --groups 1 2 4 --precision bf16 --channels-last \
  --compile --batch 256 --steps 20 --rounds 3 --out "$OUT/model_paper.json"
# model only, Fashion-MNIST geometry, fp32 batch 128 (as train.py's fashion configs)
step model_fashion 50 $PY scripts/benchmark.py --geometry fashion_mnist --groups 1 2 4 --batch 128 --steps 30 \
  --rounds 3 --out "$OUT/model_fashion.json"
# train.py's loop end to end: fake data, a generated JPEG tree (GPU decode), Fashion-MNIST; G = 2
step e2e 180 $PY scripts/benchmark.py --e2e fake jpeg fashion_mnist --groups 2 --precision bf16 --channels-last \
  --compile --batch 256 --steps 20 --rounds 3 --out "$OUT/e2e.json"
# the test suite on a one-GPU machine
step pytest 120 $PY -m pytest -q -x -p no:cacheprovider -n 8
