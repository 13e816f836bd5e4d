#!/usr/bin/env bash
# The train-step benchmark at paper scale on one GPU (estimated at 6 to 7 minutes on one H200, not yet
# run on one; installs nothing): ViT-B/16 at 224, bf16 autocast, synthetic batches already on the GPU,
# every method beside a plain timm ViT step, MFU against the measured bf16 matmul peak, and the fast
# paths before/after (unfused attention, per-parameter AdamW, full-context captions). Then
# torch.compile for the plain step, MAE and MUG. Writes OUT/table.md, OUT/compiled.md, OUT/results/.
#   bash benchmark/gpu_bench.sh [OUT]        (run from a checkout with `pip install -e .` done)
set -euo pipefail
out="${1:-gpu-bench}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# 256 per GPU: the paper's 4,096 over 16 GPUs, and SimCLR's two views still fit. One round of
# trainer-vs-bare-loop: a dedicated GPU's step times do not drift as a shared CPU's do.
python -m mugbench.cli bench --preset paper --device cuda --methods mae,simclr,clip,slip,flip,coca,cap,mug \
  --batch-size 256 --steps 20 --warmup 5 --rounds 1 --variants math-attention,loop-adamw,full-context-text \
  --results "$out/results" | tee "$out/table.md"
# Compiling takes about a minute per model: three of them, in a budget of its own.
timeout 150 python -m mugbench.cli bench --preset paper --device cuda --methods mae,mug --batch-size 256 \
  --steps 20 --warmup 5 --rounds 1 --compile --results "$out/results-compiled" | tee "$out/compiled.md" || true
