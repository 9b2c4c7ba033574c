#!/usr/bin/env bash
# The GPU-machine run behind benchmarks/RESULTS.md's MoE-layer table: bench_layer.py on NGPU GPUs as
# 2 emulated nodes (launch/emulate_nodes.sh) and as one node. Usage (from the repo root, wheels
# installed, corpus in data/python-doc-corpus):
#   NGPU=4 bash benchmarks/run_gpu_layer.sh "$OUT"
# LAYOUTS="2nodes 1node" (default) picks the layouts (also "4nodes": 4 emulated nodes x NGPU/4); BENCH_ARGS
# adds bench_layer.py options to each.
# Each layout writes its own `locmoe project` calibration: calibration_{2nodes,1node}_${NGPU}gpu.json.
# TWO_STAGE=1 also times, on one node, LocMoE's two-stage plan forced against its one-node pairs plan
# (bench_dispatch.py hier_tree / hierarchical, top-4, 32 experts, its default 8192 tokens x hidden 2048,
# the layer's default size; ~1 minute): the two-stage plan's extra host time on this machine, which
# validate_projection.py adds to the one-node calibration when it predicts this call's 2-node LocMoE rows
# (dispatch_1node_${NGPU}gpu.json).
# LAYOUTS="plan2nodes" times the layer with the 2-node topology (--gpus-per-node NGPU/2) on this one node's
# links, without the socket emulation (layer_plan2nodes_${NGPU}gpu.json): every cross-node code path (the
# router's budget and locality work, the two-stage plan, the count exchange) at NVLink rates. Where a call
# has it, validate_projection.py takes LocMoE's cost across 2 nodes from it instead of the one-node run plus
# the two-stage figure.
set -uo pipefail
out=${1:-benchmarks/results}
NGPU=${NGPU:-4}
LAYOUTS=${LAYOUTS:-2nodes 1node}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export LOCMOE_COMMIT=${LOCMOE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
nvidia-smi -L | tee "$out/gpus.txt"
half=$(( NGPU / 2 ))
filter() { grep -v -E "Warning|warn\(|return func|No existing process group|^\s*$" ; }
for layout in $LAYOUTS; do
  start=$(date +%s)
  if [ "$layout" = 4nodes ]; then  # 4 emulated nodes x NGPU/4 (validate_projection.py: held out from 1node)
    launch/emulate_nodes.sh --nodes 4 --nproc-per-node "$NGPU" -- benchmarks/bench_layer.py \
      --gpus-per-node $(( NGPU / 4 )) --ablations ${ABLATIONS-nobias mu0} --json "$out/layer_4nodes_${NGPU}gpu.json" \
      --calibration "$out/calibration_4nodes_${NGPU}gpu.json" \
      ${BENCH_ARGS:-} 2>&1 | filter > "$out/layer_4nodes.log"
  elif [ "$layout" = plan2nodes ]; then  # the 2-node plan on one node's links: its host work, with no slow link
    python3 -m torch.distributed.run --standalone --nproc-per-node "$NGPU" benchmarks/bench_layer.py \
      --gpus-per-node "$half" --ablations ${ABLATIONS-nobias mu0} --json "$out/layer_plan2nodes_${NGPU}gpu.json" \
      ${BENCH_ARGS:-} 2>&1 | filter > "$out/layer_plan2nodes.log"
  elif [ "$layout" = 2nodes ]; then
    launch/emulate_nodes.sh --nodes 2 --nproc-per-node "$NGPU" -- benchmarks/bench_layer.py \
      --gpus-per-node "$half" --ablations ${ABLATIONS-nobias mu0} --json "$out/layer_2nodes_${NGPU}gpu.json" \
      --calibration "$out/calibration_2nodes_${NGPU}gpu.json" \
      ${BENCH_ARGS:-} 2>&1 | filter > "$out/layer_2nodes.log"
  else
    python3 -m torch.distributed.run --standalone --nproc-per-node "$NGPU" benchmarks/bench_layer.py \
      --gpus-per-node "$NGPU" --json "$out/layer_1node_${NGPU}gpu.json" \
      --calibration "$out/calibration_1node_${NGPU}gpu.json" ${BENCH_ARGS:-} 2>&1 \
      | filter > "$out/layer_${layout}.log"
  fi
  echo "$layout: $(( $(date +%s) - start )) s"
done
if [ "${TWO_STAGE:-0}" = 1 ]; then
  start=$(date +%s)
  python3 -m torch.distributed.run --standalone --nproc-per-node "$NGPU" benchmarks/bench_dispatch.py \
    --gpus-per-node "$NGPU" --experts 32 --topk 4 --systems hierarchical hier_tree --rounds 5 --iters 5 \
    --json "$out/dispatch_1node_${NGPU}gpu.json" 2>&1 | filter > "$out/dispatch_1node.log"
  echo "two-stage (one node): $(( $(date +%s) - start )) s"
fi
for layout in $LAYOUTS; do
  echo; sed -n '/^== /,$p' "$out/layer_${layout}.log"
done
