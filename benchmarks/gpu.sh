#!/usr/bin/env bash
# One call on a GPU machine: environment facts, then qwenvl vs transformers on random 3B-shape weights built
# on the GPU (bfloat16, a 1600x1146 image, 64 greedy tokens), results in $OUT (default ./gpu-results).
#   bash benchmarks/gpu.sh            # ~3-5 min on one H100/H200-class GPU: build ~30 s, 3 rounds
set -euo pipefail
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA: nothing to measure')"
"$PY" benchmarks/bench_gpu.py --preset 3b --dtype bfloat16 --rounds 3 --out "$OUT/gpu-3b-bf16.json" \
  2>&1 | tee "$OUT/gpu-3b-bf16.txt"
