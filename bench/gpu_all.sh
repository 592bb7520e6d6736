#!/usr/bin/env bash
# Every GPU figure of issue 13 in one go (about 6-9 minutes on one H100/H200): model MFU for Base 8 frames and
# Large 16 frames, eager and compiled, bf16; the loader's CPU cost with augment_on=device on this node's CPUs;
# checkpoint steps vs other steps on CUDA (pinned shared staging, device-to-host copies not waited for on the step).
# Results go to bench/results/gpu/*.json and the tables to stdout; paste them into docs/benchmarks.md.
#
#   bash bench/gpu_all.sh            # from the repository root, with the project's venv active
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=bench/results/gpu
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
# Batches from the measured memory figures (docs/benchmarks.md): Base 8 frames ~1 GiB of activations per sample,
# Large 16 frames ~6.7 GiB per sample without activation checkpointing (so Large runs with it, vision blocks).
for mode in "" "--compile"; do
  tag=${mode:+compiled}; tag=${tag:-eager}
  $PY -m bench model --device cuda --dtype bf16 --presets base --frames 8 --batch 32 --steps 5 --warmup 3 \
      $mode --json "$OUT/model_base_f8_$tag.json"
  $PY -m bench model --device cuda --dtype bf16 --presets large --frames 16 --batch 8 --steps 5 --warmup 3 \
      $mode --json "$OUT/model_large_f16_$tag.json"
done
$PY -m bench model --device cuda --dtype bf16 --presets large --frames 16 --batch 32 --steps 3 --warmup 3 \
    --checkpointing --compile --json "$OUT/model_large_f16_b32_ckpt_compiled.json"
$PY -m bench loader --path cpu,device --batches 20 --num-workers 4 --out "$OUT/loader.json"
# Checkpoint steps vs other steps with the model on the GPU (tiny: ~1 min each; base, local storage: ~2-4 min,
# a few GB per checkpoint written while training goes on). Tables to stdout and bench/results/gpu/ckpt.md.
{
  $PY -m bench ckpt --device cuda --steps 24 --every 3 --repeat 2
  $PY -m bench ckpt --device cuda --steps 24 --every 3 --storage local
  $PY -m bench ckpt --device cuda --steps 24 --every 3 --storage local --no-checkpoint   # the ratio's floor
  $PY -m bench ckpt --device cuda --preset base --storage local --steps 44 --every 20
} | tee "$OUT/ckpt.md"
