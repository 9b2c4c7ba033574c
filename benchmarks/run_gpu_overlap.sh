#!/usr/bin/env bash
# Chunked overlap with real expert MLPs (d -> 1408 -> d per expert): hierarchical without and with
# --chunks 4, flat, and Megatron's alltoall dispatcher, 1 node and 2 emulated nodes. Usage (repo root):
#   NGPU=8 bash benchmarks/run_gpu_overlap.sh "$OUT"
set -uo pipefail
out=${1:-benchmarks/results}
NGPU=${NGPU:-8}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
half=$(( NGPU / 2 ))
args=(--experts 32 --topk ${OVERLAP_TOPK:-2 4 8} --expert-ffn 1408 --chunks 4 --systems hierarchical hier_overlap flat megatron)
python3 -m torch.distributed.run --standalone --nproc-per-node "$NGPU" benchmarks/bench_dispatch.py \
  --gpus-per-node "$NGPU" --json "$out/overlap_1node_${NGPU}gpu.json" "${args[@]}" 2>&1 \
  | grep -v -E "Warning|warn" > "$out/overlap_1node.log"; tail -6 "$out/overlap_1node.log"
launch/emulate_nodes.sh --nodes 2 --nproc-per-node "$NGPU" -- benchmarks/bench_dispatch.py \
  --gpus-per-node "$half" --json "$out/overlap_2nodes_${NGPU}gpu.json" "${args[@]}" 2>&1 \
  | grep -v -E "Warning|warn" > "$out/overlap_2nodes.log"; tail -6 "$out/overlap_2nodes.log"
