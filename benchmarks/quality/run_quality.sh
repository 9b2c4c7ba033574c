#!/usr/bin/env bash
# The quality study: every router trained on the same tokens, seed and schedule through
# megatron-core, through `locmoe demo` (which measures each the same way: validation loss curve, load,
# tokens per expert, drops, cross-node share, capacity factor and delta, step time).
#
#   bash benchmarks/quality/run_quality.sh OUT [extra locmoe demo flags]
#
# One `locmoe demo` run per system, into OUT/systems/<n>-<system>/: a system whose results.json exists is
# skipped, so running the same command again resumes a study cut short (e.g. by a 10-minute device call:
# each system takes about 45-50 s on 2-4 H200 at the defaults). At the end the finished systems are merged
# into OUT/table.txt and OUT/quality.png (`python -m locmoe_plugin.demo.report`).
#
# PYTHON picks the interpreter (default python3). Defaults: NPROC=4 ranks as 2 logical nodes x GPUS_PER_NODE=2 (EP = NPROC), NCCL over NVLink (the node
# split is logical: routing, locality loss and the hierarchical dispatcher see 2 nodes; add
# --emulate-nodes to also slow the link between them), a 4-layer GPT (hidden 512, 8 heads, 32 experts
# top-2, expert FFN 1024, RoPE) on the byte-level Python-documentation corpus, seq 256, 8 sequences per
# rank per step, STEPS=300, AdamW 3e-3 cosine. Systems (see `locmoe demo --help`): Megatron TopKRouter +
# aux loss (baseline), hash router, LocMoE (GrAP + locality loss, capacity bound), LocMoE+ (hybrid,
# adaptive capacity), LocMoE with a dense gate, LocMoE with mu = 0, and the mu sweep.
set -euo pipefail
out=${1:?usage: run_quality.sh OUT [locmoe demo flags]}
shift
NPROC=${NPROC:-4} GPUS_PER_NODE=${GPUS_PER_NODE:-2} STEPS=${STEPS:-300}
SYSTEMS=${SYSTEMS:-"baseline;hash;locmoe:capacity=bound;locmoe+;locmoe:gate=dense;locmoe:mu=0;locmoe:mu=0.003;locmoe:mu=0.03;locmoe:mu=0.1"}
IFS=';' read -r -a systems <<< "$SYSTEMS"
runs=()
i=0
for sys in "${systems[@]}"; do
  i=$((i + 1))
  dir="$out/systems/$(printf '%02d' "$i")-$(echo "$sys" | tr -c 'A-Za-z0-9.=+\n' '_')"
  runs+=("$dir")
  if [ -f "$dir/results.json" ]; then echo "== $sys: done ($dir)"; continue; fi
  echo "== $sys"
  "${PYTHON:-python3}" -m locmoe_plugin.cli demo --backend "${BACKEND:-nccl}" --nproc "$NPROC" --gpus-per-node "$GPUS_PER_NODE" \
    --systems "$sys" --steps "$STEPS" --num-layers 4 --hidden-size 512 --num-heads 8 --num-experts 32 \
    --topk 2 --ffn-hidden-size 1024 --seq-len 256 --micro-batch 8 --eval-interval 50 --eval-batches 8 \
    --no-progress --out "$dir" "$@"
done
"${PYTHON:-python3}" -m locmoe_plugin.demo.report "${runs[@]}" --png "$out/quality.png" | tee "$out/table.txt"
