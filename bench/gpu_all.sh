#!/usr/bin/env bash
# Every GPU figure of issue 13 in one go (9 min 16 s on one H200 on 2026-12-04, about a minute more since): model
# MFU for Base 8 frames and Large 16 frames, eager and compiled, bf16; the loader's CPU cost with augment_on=device
# on this node's CPUs; checkpoint steps vs other steps on CUDA (pinned shared staging, device-to-host copies not
# waited for on the step). Results go to bench/results/gpu/*.json (or $GPU_OUT) and the tables to stdout; paste
# them into docs/benchmarks.md.
#
#   bash bench/gpu_all.sh            # from the repository root, with the project's venv active
#   GPU_OUT=/some/dir PYTHON=python3 bash bench/gpu_all.sh   # results elsewhere, another interpreter
#
# The order puts the cheapest figures first, so a run stopped at a time limit still leaves most of them. Each
# command's output also goes to $OUT/log.txt. Without s3fs and SeaweedFS on the node the S3 checkpoint run is
# skipped (the local-storage runs measure the same critical path).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${GPU_OUT:-bench/results/gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Batches from the measured memory figures (docs/benchmarks.md): Base 8 frames ~1 GiB of activations per sample,
# Large 16 frames ~6.7 GiB per sample without activation checkpointing (so Large runs with it, vision blocks).
model() { $PY -m bench model --device cuda --dtype bf16 "$@" || echo "[gpu_all] bench model $* failed"; }
model --presets base --frames 8 --batch 32 --steps 5 --warmup 3 --json "$OUT/model_base_f8_eager.json"
model --presets large --frames 16 --batch 8 --steps 5 --warmup 3 --json "$OUT/model_large_f16_eager.json"
$PY -m bench loader --path cpu,device --batches 20 --num-workers 4 --out "$OUT/loader.json" \
  || echo "[gpu_all] bench loader failed"
# Checkpoint steps vs other steps with the model on the GPU (tiny: ~1 min each; base, local storage: ~2-4 min,
# a few GB per checkpoint written while training goes on). Tables to stdout and $OUT/ckpt.md.
{
  $PY -m bench ckpt --device cuda --steps 48 --every 3 --storage local --repeat 2
  $PY -m bench ckpt --device cuda --steps 48 --every 3 --storage local --no-checkpoint   # the ratio's floor
  if $PY -c "import s3fs; from mplug2.s3server import weed_binary; weed_binary()" 2>/dev/null; then
    $PY -m bench ckpt --device cuda --steps 24 --every 3 --repeat 2
  else
    echo "[gpu_all] S3 checkpoint run skipped: no s3fs / SeaweedFS on this node"
  fi
} | tee "$OUT/ckpt.md"
model --presets base --frames 8 --batch 32 --steps 5 --warmup 3 --compile --json "$OUT/model_base_f8_compiled.json"
model --presets large --frames 16 --batch 8 --steps 5 --warmup 3 --compile \
  --json "$OUT/model_large_f16_compiled.json"
model --presets large --frames 16 --batch 32 --steps 3 --warmup 3 --checkpointing --compile \
  --json "$OUT/model_large_f16_b32_ckpt_compiled.json"
# four checkpoints, so that the first (which allocates the pinned staging buffers) is not half the median
$PY -m bench ckpt --device cuda --preset base --storage local --steps 164 --every 40 | tee -a "$OUT/ckpt.md"
