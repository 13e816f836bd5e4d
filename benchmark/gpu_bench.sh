#!/usr/bin/env bash
# The train-step benchmark at paper scale on one GPU (about 5 minutes on one H200; installs nothing):
# ViT-B/16 at 224, bf16 autocast, synthetic batches already on the GPU, every method beside a plain
# timm ViT step, MFU against the measured bf16 matmul peak. Writes OUT/table.md and OUT/results/.
#   bash benchmark/gpu_bench.sh [OUT]        (run from a checkout with `pip install -e .` done)
set -euo pipefail
out="${1:-gpu-bench}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# 256 per GPU: the paper's 4,096 over 16 GPUs, and SimCLR's two views still fit.
python -m mugbench.cli bench --preset paper --device cuda --methods mae,simclr,clip,slip,flip,coca,cap,mug \
  --batch-size 256 --steps 20 --warmup 5 --results "$out/results" | tee "$out/table.md"
