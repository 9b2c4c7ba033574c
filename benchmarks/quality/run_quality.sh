#!/usr/bin/env bash
# The quality study (issue 7): every router trained on the same tokens, seed and schedule through
# megatron-core, through `locmoe demo` (which measures each the same way: validation loss curve, load,
# tokens per expert, drops, cross-node share, capacity factor and delta, step time).
#
#   bash benchmarks/quality/run_quality.sh OUT [extra locmoe demo flags]
#
# Defaults: NPROC=4 ranks as 2 logical nodes x GPUS_PER_NODE=2 (EP = NPROC), NCCL over NVLink (the node
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
python3 -m locmoe_plugin.cli demo --backend "${BACKEND:-nccl}" --nproc "$NPROC" --gpus-per-node "$GPUS_PER_NODE" \
  --systems "$SYSTEMS" --steps "$STEPS" --num-layers 4 --hidden-size 512 --num-heads 8 --num-experts 32 \
  --topk 2 --ffn-hidden-size 1024 --seq-len 256 --micro-batch 8 --eval-interval 50 --eval-batches 8 \
  --no-progress --out "$out" "$@"
