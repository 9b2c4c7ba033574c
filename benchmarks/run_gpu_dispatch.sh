#!/usr/bin/env bash
# The GPU-machine run behind benchmarks/RESULTS.md's dispatch table: wheels installed, then check-comm
# and bench_dispatch.py on NGPU GPUs as one node and as 2 emulated nodes. Usage (from the repo root):
#   NGPU=8 bash benchmarks/run_gpu_dispatch.sh "$OUT"
set -uo pipefail
out=${1:-benchmarks/results}
NGPU=${NGPU:-8}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$out/gpus.txt"
half=$(( NGPU / 2 ))
launch/emulate_nodes.sh --nodes 2 --nproc-per-node "$NGPU" -- -m locmoe_plugin.cli check-comm \
  --gpus-per-node "$half" --tokens 4096 --hidden 1024 --experts 32 --topk 4 --json "$out/check_comm_2nodes.json" \
  2>&1 | grep -v -E "Warning|warn" | tee "$out/check_comm.log"
# one node too: check-comm forces the two-stage plan (exact_tree), so hierarchical == flat bitwise here as well
python3 -m torch.distributed.run --standalone --nproc-per-node "$NGPU" -m locmoe_plugin.cli check-comm \
  --gpus-per-node "$NGPU" --tokens 4096 --hidden 1024 --experts 32 --topk 4 --json "$out/check_comm_1node.json" \
  2>&1 | grep -v -E "Warning|warn" | tee -a "$out/check_comm.log"
python3 -m torch.distributed.run --standalone --nproc-per-node "$NGPU" benchmarks/bench_dispatch.py \
  --gpus-per-node "$NGPU" --json "$out/dispatch_1node_${NGPU}gpu.json" --profile "$out/profile_1node.txt" ${BENCH_ARGS:-} 2>&1 \
  | grep -v -E "Warning|warn" > "$out/dispatch_1node.log"; tail -12 "$out/dispatch_1node.log"
launch/emulate_nodes.sh --nodes 2 --nproc-per-node "$NGPU" -- benchmarks/bench_dispatch.py \
  --gpus-per-node "$half" --json "$out/dispatch_2nodes_${NGPU}gpu.json" ${BENCH_ARGS:-} 2>&1 \
  | grep -v -E "Warning|warn" > "$out/dispatch_2nodes.log"; tail -12 "$out/dispatch_2nodes.log"
