#!/usr/bin/env bash
# LocMoE+ against Megatron's TopKRouter, three seeds paired, on 4 GPUs in one call of about 6-7 minutes.
#
#   bash benchmarks/quality/run_locmoe_plus.sh OUT [extra locmoe demo flags]
#
# The model, corpus and schedule of benchmarks/quality/run_quality.sh (4-layer GPT, hidden 512, 32 experts
# top-2, 300 steps, 16 x 256 bytes per rank per step), at EP = 2 as 2 logical nodes x 1 GPU. The 4 GPUs
# form two pairs; the (seed, system) runs are dealt to the pairs alternately and each pair runs its share
# one after another (about 45-55 s per run on H100/H200), so 3 seeds x 4 systems take about 6 x 55 s.
# A run whose results.json exists is skipped (a second call resumes). Each run: OUT/seed<S>/<NN>-<system>/.
# Last, per seed, the demo's tables (validation loss, load, drops, tokens per expert, capacity factor).
#
# SEEDS (default "1234 2345 3456") and SYSTEMS (default below: the baseline, LocMoE+ at its defaults -
# dense gate, cross-node budget 0.2, summed-affinity threshold 0.9 -, LocMoE+ without the threshold, and
# LocMoE at its defaults) can be overridden.
set -euo pipefail
out=${1:?usage: run_locmoe_plus.sh OUT [locmoe demo flags]}
shift
extra=("$@")  # demo flags, used inside run_share (whose own "$@" is its pair index)
SEEDS=${SEEDS:-"1234 2345 3456"}
SYSTEMS=${SYSTEMS:-"baseline;locmoe+;locmoe+:resonance_mass=0;locmoe"}
STEPS=${STEPS:-300}
PAIRS=${PAIRS:-"0,1 2,3"}
IFS=';' read -r -a systems <<< "$SYSTEMS"
read -r -a pairs <<< "$PAIRS"
tasks=()
for seed in $SEEDS; do
  i=0
  for sys in "${systems[@]}"; do
    i=$((i + 1))
    tasks+=("$seed|$(printf '%02d' "$i")|$sys")
  done
done
run_share() {  # $1: pair index; runs tasks p, p + P, p + 2P, ...
  local p=$1 k
  for ((k = p; k < ${#tasks[@]}; k += ${#pairs[@]})); do
    IFS='|' read -r seed idx sys <<< "${tasks[$k]}"
    local dir="$out/seed$seed/$idx-$(echo "$sys" | tr -c 'A-Za-z0-9.=+\n' '_')"
    if [ -f "$dir/results.json" ]; then echo "== seed $seed $sys: done"; continue; fi
    mkdir -p "$dir"
    echo "== seed $seed $sys on GPUs ${pairs[$p]}"
    CUDA_VISIBLE_DEVICES=${pairs[$p]} "${PYTHON:-python3}" -m locmoe_plugin.cli demo --backend "${BACKEND:-nccl}" \
      --nproc 2 --gpus-per-node 1 --systems "$sys" --steps "$STEPS" --seed "$seed" --num-layers 4 \
      --hidden-size 512 --num-heads 8 --num-experts 32 --topk 2 --ffn-hidden-size 1024 --seq-len 256 \
      --micro-batch 16 --eval-interval 50 --eval-batches 8 --no-progress --out "$dir" "${extra[@]}" > "$dir/log.txt" 2>&1 \
      || echo "== seed $seed $sys FAILED (see $dir/log.txt)"
  done
}
pids=()
for ((p = 0; p < ${#pairs[@]}; p++)); do run_share "$p" & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid"; done
for seed in $SEEDS; do
  echo "== seed $seed"
  "${PYTHON:-python3}" -m locmoe_plugin.demo.report "$out/seed$seed"/*/ --png "$out/seed$seed/quality.png" \
    | tee "$out/seed$seed/table.txt"
done
