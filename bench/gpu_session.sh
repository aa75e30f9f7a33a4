#!/usr/bin/env bash
# Everything a session with a CUDA GPU should run, in one go (about 5 minutes on an H100):
#   the GPU-marked tests, the training-step table, preprocessing throughput, the op-count proxy.
# Usage: bash bench/gpu_session.sh [out_dir]   (results as text + the tables appended to bench/RESULTS.md)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-bench_out}}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/device.txt" 2>&1
"$PY" -m pytest -q tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.txt"
"$PY" bench/train_step.py --steps 30 --record 2>&1 | tee "$OUT/train_step.txt"
"$PY" bench/prepare_speed.py --record 2>&1 | tee "$OUT/prepare_speed.txt"
"$PY" bench/op_count.py 2>&1 | tee "$OUT/op_count.txt"
"$PY" bench/preview_overhead.py --record 2>&1 | tee "$OUT/preview_overhead.txt"
cp bench/RESULTS.md "$OUT/RESULTS.md"
