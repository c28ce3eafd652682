#!/usr/bin/env bash
# One call on a GPU machine: environment facts; a CUDA smoke test (the tiny float32 model: logits against
# transformers', the CUDA-graph decode's greedy tokens against the eager step's); then qwenvl vs transformers
# on random 3B- and 7B-shape weights built on the GPU (bfloat16; a 2000x1000 image for the vision tower and
# decode, a 1036x1036 one for the time to first token; 256 greedy tokens). Results in $OUT (./gpu-results).
#   bash benchmarks/gpu.sh            # ~4-6 min on one H100/H200-class GPU (estimated: not yet run on one)
set -euo pipefail
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}  # the lent H200s: python3 is the one holding CUDA torch (2.11) and transformers (5.17)
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # qwenvl_cli from this tree, installed or not
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA: nothing to measure')"
export PYTHONUNBUFFERED=1
"$PY" benchmarks/bench_gpu.py --preset tiny --dtype float32 --rounds 1 --new-tokens 64 --image 448x448 \
  --out "$OUT/gpu-tiny-fp32.json" 2>&1 | tee "$OUT/gpu-tiny-fp32.txt"
"$PY" benchmarks/bench_gpu.py --preset 3b --dtype bfloat16 --rounds 3 --out "$OUT/gpu-3b-bf16.json" \
  2>&1 | tee "$OUT/gpu-3b-bf16.txt"
"$PY" benchmarks/bench_gpu.py --preset 7b --dtype bfloat16 --rounds 2 --image 1036x1036 --out "$OUT/gpu-7b-bf16.json" \
  2>&1 | tee "$OUT/gpu-7b-bf16.txt"
