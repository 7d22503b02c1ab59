#!/usr/bin/env bash
# Everything a lent GPU is for, in one call of about 9 minutes (device time is short):
#   bash benchmarks/gpu_session.sh            # results in $OUT (the device tool's) or gpu_results/
# 1. gpu_checks.py: CUDA AMP (fp16 GradScaler) against the exact B_simple, and no host sync on
#    non-logging steps (torch.cuda.set_sync_debug_mode("error")), simultaneous route included.
# 2. overhead.py --preset realistic: GPT-2 small (T=1024) and ViT-B/16 in bf16-mixed, with peak
#    memory: the README's GPU targets.
# 3. overhead.py at the small sizes of the old H100 table (16-mixed), to compare.
# Each step has its own time limit, so one that runs long leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$py" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
} > "$out/device.txt" 2>&1
run() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "rc=$?" >> "$out/$name.txt"
  grep -v Warning "$out/$name.txt" | tail -25
}
run gpu_checks 150 "$py" benchmarks/gpu_checks.py
run overhead_realistic 270 "$py" benchmarks/overhead.py --device cuda --preset realistic
run overhead_small 110 "$py" benchmarks/overhead.py --device cuda --precision 16-mixed --repeats 3
