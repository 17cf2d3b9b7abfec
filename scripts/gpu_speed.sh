#!/usr/bin/env bash
# The GPU measurements behind the README's Speed section, in one run of at most 8 minutes on one GPU:
#   OUT=runs/gpu_speed bash scripts/gpu_speed.sh
# Steps run in order of value (paper geometry G = 2, then G = 1, G = 4 with kernel profiles; end to end
# from JPEG files; the Fashion-MNIST geometry under each compile mode; the test suite), each under its own
# time limit, each writing its log and JSON under $OUT as it goes, so a step cut short loses only itself.
# Compile caches live in .cache/compile (git-ignored): carry it and a second run starts warm.
# Without CUDA every step runs a tiny CPU version of itself (CPU=1 forces that), to test this script.
set -uo pipefail
OUT=${OUT:-runs/gpu_speed}
mkdir -p "$OUT" .cache/compile
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/compile/inductor TRITON_CACHE_DIR=$PWD/.cache/compile/triton
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
PY=${PYTHON:-python3}
if [ "${CPU:-0}" = 1 ] || ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  GPU=0; echo "no CUDA (or CPU=1): every step runs its tiny CPU version"
else
  GPU=1
fi
step() {  # step NAME SECONDS COMMAND...   (records the step's exit code and seconds in $OUT/steps.jsonl)
  local name=$1 limit=$2 start rc; shift 2
  echo "=== $name (limit ${limit}s, $(date +%T))"
  start=$(date +%s)
  timeout "$limit" "$@" 2>&1 | grep --line-buffered -v -e DeprecationWarning -e "warnings.warn" | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start )), \"timed_out\": $([ "$rc" = 124 ] && echo true || echo false)}" >> "$OUT/steps.jsonl"
}
$PY -c "import torch, torchvision, subprocess; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', 'commit', \
subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip() or '?')" \
  | tee "$OUT/env.log"
if [ "$GPU" = 1 ]; then
  PAPER="--geometry paper --precision bf16 --channels-last --compile --batch 256 --steps 20 --rounds 3 --profile"
  step model_paper_g2 100 $PY scripts/benchmark.py $PAPER --groups 2 --out "$OUT/model_paper_g2.json"
  step model_paper_g1 70 $PY scripts/benchmark.py $PAPER --groups 1 --out "$OUT/model_paper_g1.json"
  step model_paper_g4 100 $PY scripts/benchmark.py $PAPER --groups 4 --out "$OUT/model_paper_g4.json"
  step e2e_jpeg 75 $PY scripts/benchmark.py --e2e jpeg --groups 2 --precision bf16 --channels-last --compile \
    --batch 256 --steps 20 --rounds 2 --jpeg-files 8192 --workers 14 --out "$OUT/e2e_jpeg.json"
  for mode in default reduce-overhead; do
    step "model_fashion_$mode" 35 $PY scripts/benchmark.py --geometry fashion_mnist --groups 1 2 4 --batch 128 \
      --steps 30 --rounds 3 --compile --compile-mode $mode --out "$OUT/model_fashion_$mode.json"
  done
  step pytest 50 $PY -m pytest -q -x -p no:cacheprovider tests/test_speed_paths.py tests/test_layers.py \
    tests/test_compile.py tests/test_equivalence.py
else
  TINY="--device cpu --batch 8 --steps 1 --rounds 1"
  step model_paper_g2 120 $PY scripts/benchmark.py --geometry fashion_mnist $TINY --groups 2 --profile \
    --out "$OUT/model_paper_g2.json"
  step model_paper_g1 60 $PY scripts/benchmark.py --geometry fashion_mnist $TINY --groups 1 --out "$OUT/model_paper_g1.json"
  step model_paper_g4 60 $PY scripts/benchmark.py --geometry fashion_mnist $TINY --groups 4 --out "$OUT/model_paper_g4.json"
  step e2e_jpeg 240 $PY scripts/benchmark.py --e2e jpeg --groups 2 $TINY --jpeg-files 24 --workers 2 \
    --out "$OUT/e2e_jpeg.json"
  step model_fashion_default 60 $PY scripts/benchmark.py --geometry fashion_mnist $TINY --groups 2 \
    --out "$OUT/model_fashion_default.json"
  step pytest 120 $PY -m pytest -q -x -p no:cacheprovider tests/test_speed_paths.py
fi
echo "steps:"; cat "$OUT/steps.jsonl"
