#!/usr/bin/env bash
# How evaluation scales over the ranks of a torchrun job, side by side in one run: METHOD pre-trained with the
# toy preset (one process, about 2 minutes on 2 cores), then `mugbench eval` of it with every protocol (toy
# sets and recipes) in one process and under torchrun with NPROC processes, one thread each, and the ratio
# of their wall times. The records of both are kept under OUT/one and OUT/many for comparison.
# (A smoke run's evaluation is too small to show it: about 5 s of work beside 5 s of start-up per process,
# and 1,000 UperNet iterations at 32 px are bound by mmengine's per-iteration overhead, not by compute.)
#   bash benchmark/eval_scaling.sh [NPROC=2] [METHOD=mug] [OUT=eval-scaling]   (from a checkout, installed)
set -euo pipefail
nproc="${1:-2}" method="${2:-mug}" out="${3:-eval-scaling}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export HF_HUB_OFFLINE=1 MUGBENCH_CACHE="${MUGBENCH_CACHE:-$out/cache}"
cd "$out"
python -m mugbench.cli run --preset toy --methods "$method" --evals knn > train.log 2>&1
run_dir=$(ls -d runs/toy/toy/"$method"-seed0-*)
evals=(--evals knn,linear,finetune,zeroshot,retrieval,captioning,reconstruction,segmentation)

seconds() {  # wall time of a command, in seconds
  local start end
  start=$(date +%s.%N)
  "$@"
  end=$(date +%s.%N)
  python -c "print(round($end - $start, 1))"
}
export OMP_NUM_THREADS=1
one=$(seconds sh -c "python -m mugbench.cli eval --checkpoint $run_dir ${evals[*]} --results one > one.log 2>&1")
many=$(seconds sh -c "python -m torch.distributed.run --standalone --nproc-per-node $nproc -m mugbench.cli eval \
  --checkpoint $run_dir ${evals[*]} --results many > many.log 2>&1")
python -c "print(f'mugbench eval of a toy $method run, every protocol: one process {$one} s, $nproc processes {$many} s '
           f'(ratio {$many / $one:.2f}; one thread per process)')" | tee ratio.txt
