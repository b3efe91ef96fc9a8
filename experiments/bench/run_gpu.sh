#!/usr/bin/env bash
# The GPU benchmarks of issues 8, 16 and 17 as one command (runs unchanged on any CUDA or TPU machine):
#   bash experiments/bench/run_gpu.sh [OUT_DIR]
# In order of priority, each step under its own time limit so one slow step cannot lose the others:
# 1. every backbone's train step at 224 px, bf16, batch 128: JAX images/s, MFU (XLA cost analysis of
#    the compiled step), forward GFLOP/image, next to the same model in PyTorch in the same process
#    (timm, channels_last, AMP bf16, eager) -> backbones.json / backbones.md;
# 2. ResNet-50 224 px bf16 batch 256, CE and LCL-SC: MFU and the LCL-SC / CE step-time ratio
#    -> train_step.json / train_step.md;
# 3. ResNet-50 and ViT-B/16 in PyTorch with torch.compile (the strongest PyTorch baseline) -> torch_compile.*;
# 4. a SimCLR pretraining step (B frames x 2 views, views drawn on the device) vs a supervised CE step on
#    2B frames of the same ResNet-50, and the augmentation's share -> pretrain_step.jsonl;
# 5. the grain input pipeline with this machine's CPU workers (must beat the step's images/s) -> pipeline.md.
# BENCH_LIMIT_S scales every step's limit (default 1.0).
set -uo pipefail
OUT=${1:-${OUT:-runs/bench_gpu}}
mkdir -p "$OUT"
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
SCALE=${BENCH_LIMIT_S:-1.0}
SIZE=${BENCH_SIZE:-224}     # smaller values only to try the script out on a CPU
BATCH=${BENCH_BATCH:-128}
STEPS=${BENCH_STEPS:-10}
lim() { $PY -c "print(int($1 * $SCALE))"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>/dev/null || true
$PY -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())" | tee "$OUT/versions.txt"

ARCHS=${ARCHS:-resnet50,vit_base_patch16,tf_efficientnetv2_s,convnext_tiny,vit_small_patch16,densenet121,inception_v3,efficientnetv2_s,resnet18,alexnet}
timeout "$(lim 300)" $PY "$HERE/backbones.py" --archs "$ARCHS" --image-size "$SIZE" --dtype bfloat16 --batch "$BATCH" \
    --steps "$STEPS" --repeats 3 --torch --out "$OUT/backbones.json" > "$OUT/backbones.md" 2> "$OUT/backbones.log"
echo "backbones: rc $?"; cat "$OUT/backbones.md"
timeout "$(lim 110)" $PY "$HERE/train_step.py" --arch resnet50 --image-size "$SIZE" --dtype bfloat16 --batch $((2 * BATCH)) \
    --losses ce,lcl_sc --steps "$STEPS" --repeats 3 --out "$OUT/train_step.json" > "$OUT/train_step.md" 2> "$OUT/train_step.log"
echo "train_step: rc $?"; cat "$OUT/train_step.md"
timeout "$(lim 110)" $PY "$HERE/backbones.py" --archs resnet50,vit_base_patch16 --image-size "$SIZE" --dtype bfloat16 \
    --batch "$BATCH" --steps "$STEPS" --repeats 3 --torch --torch-compile --out "$OUT/torch_compile.json" \
    > "$OUT/torch_compile.md" 2> "$OUT/torch_compile.log"
echo "torch_compile: rc $?"; cat "$OUT/torch_compile.md"
timeout "$(lim 150)" $PY "$HERE/pretrain_step.py" --arch resnet50 --size "$SIZE" --batch "$BATCH" --dtype bfloat16 \
    --repeats 5 --out "$OUT/pretrain_step.jsonl" > "$OUT/pretrain_step.log" 2>&1
echo "pretrain_step: rc $?"; cat "$OUT/pretrain_step.jsonl"
timeout "$(lim 60)" $PY "$HERE/pipeline_throughput.py" --batch $((2 * BATCH)) --sizes "$SIZE" --steps "$STEPS" \
    --workers 0 $(( $(nproc) > 8 ? $(nproc) - 2 : 2 )) > "$OUT/pipeline.md" 2> "$OUT/pipeline.log"
echo "pipeline: rc $?"; cat "$OUT/pipeline.md"
echo "results in $OUT"
