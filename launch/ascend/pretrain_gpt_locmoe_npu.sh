#!/usr/bin/env bash
# The Megatron-LM + LocMoE job of launch/megatron/pretrain_gpt_locmoe.sh on Ascend NPUs.
#
#   MEGATRON_LM=/path/to/Megatron-LM NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=6000 \
#     GPUS_PER_NODE=8 HCCL_IF_IP=<this node's IP> launch/ascend/pretrain_gpt_locmoe_npu.sh [more flags]
#
# The environment comes from env.sh (CANN set_env.sh, LOCMOE_DEVICE=npu, HCCL settings). The
# locmoe-megatron wrapper calls enable(), which applies torch_npu.contrib.transfer_to_npu before
# Megatron-LM starts, so Megatron's torch.cuda calls run on the NPU and its "nccl" process groups
# are created as HCCL groups (keep Megatron's default --distributed-backend nccl).
# GPUS_PER_NODE = NPUs per node. The model and data knobs are those of the GPU script.
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=env.sh
source "$here/env.sh"   # before `set -u`: CANN's set_env.sh reads unset variables
set -euo pipefail
python3 -c "import torch_npu" 2>/dev/null || { echo "torch_npu is not importable: install it (matching torch) and CANN" >&2; exit 2; }
[ "${EMULATE_NODES:-0}" = 0 ] || { echo "EMULATE_NODES uses NCCL host ids and is GPU-only" >&2; exit 2; }
# No TransformerEngine / Apex / torch.compile on the NPU path: plain PyTorch kernels
# (the GPU script's TRANSFORMER_IMPL=local already turns the TE / Apex fusions off).
exec "$here/../megatron/pretrain_gpt_locmoe.sh" --no-bias-swiglu-fusion --no-bias-dropout-fusion "$@"
