#!/usr/bin/env bash
# The GPU benchmarks of issue 8 as one command (runs unchanged on any CUDA or TPU machine):
#   bash experiments/bench/run_gpu.sh [OUT_DIR]
# 1. ResNet-50 train step, 224x224, bf16, largest batch that fits, CE and LCL-SC: images/s, MFU
#    (XLA cost analysis of the compiled step) and the LCL-SC / CE step-time ratio, plus a profile;
# 2. the grain input pipeline with this machine's CPU workers (must beat the step's images/s);
# 3. saliency maps/s of every method, ResNet-18 at 224x224, on the accelerator.
set -euo pipefail
OUT=${1:-${OUT:-runs/bench_gpu}}
mkdir -p "$OUT"
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>/dev/null || true
$PY "$HERE/train_step.py" --arch resnet50 --image-size 224 --dtype bfloat16 --batch auto --losses ce,lcl_sc \
    --out "$OUT/train_step.json" --profile "$OUT/trace" | tee "$OUT/train_step.md"
$PY "$HERE/pipeline_throughput.py" --batch 256 --sizes 224 --workers 0 4 8 $(( $(nproc) > 8 ? $(nproc) - 2 : 2 )) | tee "$OUT/pipeline.md"
$PY "$HERE/saliency_throughput.py" --batch 32 --heavy-batch 8 | tee "$OUT/saliency.md"
echo "results in $OUT"
