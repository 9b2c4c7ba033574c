#!/usr/bin/env bash
# Megatron-LM's pretrain_gpt.py with LocMoE (router + hierarchical all-to-all), over torchrun.
# The script is run unmodified through `python -m locmoe_plugin.megatron.launcher` (enables the patches).
#
#   # each node (same command, its own NODE_RANK):
#   MEGATRON_LM=/path/to/Megatron-LM NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=6000 GPUS_PER_NODE=8 \
#     launch/megatron/pretrain_gpt_locmoe.sh [more Megatron / --locmoe-* flags; later flags win]
#   # one host, its GPUs split into K emulated nodes (launch/emulate_nodes.sh):
#   MEGATRON_LM=... GPUS_PER_NODE=4 EMULATE_NODES=2 launch/megatron/pretrain_gpt_locmoe.sh
#
# Model / run knobs (env, defaults): NUM_LAYERS 4, HIDDEN 1024, HEADS 16, NUM_EXPERTS 32, TOPK 4,
# MOE_FFN 1024, EP (all GPUs), SEQ 1024, MBS 2, GBS 16, TRAIN_ITERS 60, LR 3e-4, LOG_INTERVAL 5,
# LOCMOE_ROUTING locmoe, LOCMOE_DISPATCHER hierarchical, TRANSFORMER_IMPL local (or transformer_engine).
# Data: DATA_PATH (+ TOKENIZER_TYPE, TOKENIZER_MODEL) or, unset, Megatron's mock data (random tokens)
# with NullTokenizer and VOCAB (32000). PYTHON (python3). DRY_RUN=1 prints the command only.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout (the directory holding pretrain_gpt.py)}"
[ -f "$MEGATRON_LM/pretrain_gpt.py" ] || { echo "no pretrain_gpt.py in MEGATRON_LM=$MEGATRON_LM" >&2; exit 2; }
PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0} MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-6000}
GPUS_PER_NODE=${GPUS_PER_NODE:-8} EMULATE_NODES=${EMULATE_NODES:-0}
if [ "$EMULATE_NODES" -gt 0 ]; then
  [ "$NNODES" -eq 1 ] || { echo "EMULATE_NODES needs NNODES=1 (one host)" >&2; exit 2; }
  [ $((GPUS_PER_NODE % EMULATE_NODES)) -eq 0 ] || { echo "GPUS_PER_NODE not divisible by EMULATE_NODES" >&2; exit 2; }
  node_gpus=$((GPUS_PER_NODE / EMULATE_NODES))   # GPUs of one emulated node
else
  node_gpus=$GPUS_PER_NODE
fi
world=$((NNODES * GPUS_PER_NODE))
EP=${EP:-$world}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

args=(
  --num-layers "${NUM_LAYERS:-4}" --hidden-size "${HIDDEN:-1024}" --num-attention-heads "${HEADS:-16}"
  --seq-length "${SEQ:-1024}" --max-position-embeddings "${SEQ:-1024}"
  --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear
  --num-experts "${NUM_EXPERTS:-32}" --moe-router-topk "${TOPK:-4}" --moe-ffn-hidden-size "${MOE_FFN:-1024}"
  --expert-model-parallel-size "$EP" --moe-aux-loss-coeff 0.01 --moe-token-dispatcher-type alltoall
  --micro-batch-size "${MBS:-2}" --global-batch-size "${GBS:-16}" --train-iters "${TRAIN_ITERS:-60}"
  --lr "${LR:-3e-4}" --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 5
  --weight-decay 0.1 --clip-grad 1.0 --adam-beta2 0.95 --bf16
  --log-interval "${LOG_INTERVAL:-5}" --log-throughput --eval-iters 0 --eval-interval 100000
  --transformer-impl "${TRANSFORMER_IMPL:-local}"
  --locmoe --locmoe-routing "${LOCMOE_ROUTING:-locmoe}" --locmoe-dispatcher "${LOCMOE_DISPATCHER:-hierarchical}"
  --locmoe-gpus-per-node "$node_gpus"
)
if [ "${TRANSFORMER_IMPL:-local}" = local ]; then   # no TransformerEngine / Apex: plain PyTorch kernels
  args+=(--no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-rope-fusion --no-persist-layer-norm)
fi
if [ -n "${DATA_PATH:-}" ]; then
  args+=(--data-path "$DATA_PATH" --split 99,1,0 --tokenizer-type "${TOKENIZER_TYPE:-GPT2BPETokenizer}")
  [ -z "${TOKENIZER_MODEL:-}" ] || args+=(--tokenizer-model "$TOKENIZER_MODEL")
else
  args+=(--mock-data --tokenizer-type NullTokenizer --vocab-size "${VOCAB:-32000}")
fi
entry=(-m locmoe_plugin.megatron.launcher "$MEGATRON_LM/pretrain_gpt.py" "${args[@]}" "$@")

if [ "$EMULATE_NODES" -gt 0 ]; then
  cmd=("$repo/launch/emulate_nodes.sh" --nodes "$EMULATE_NODES" --nproc-per-node "$GPUS_PER_NODE" -- "${entry[@]}")
else
  cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE"
       --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "${entry[@]}")
fi
echo "+ ${cmd[*]}" >&2
[ "${DRY_RUN:-0}" = 1 ] || exec "${cmd[@]}"
