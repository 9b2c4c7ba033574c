#!/usr/bin/env bash
# The GPU-machine run of the end-to-end benchmark (bench_e2e.py): a GPT MoE trained through megatron-core's
# DDP and optimizer, per system and layout, in pieces of at most 9 minutes each. From the repo root, wheels
# installed, corpus in data/python-doc-corpus:
#   NGPU=4 bash benchmarks/run_gpu_e2e.sh OUT PIECE
# PIECE (in order of priority; each writes OUT/e2e_<layout>_<system>.json and skips systems already there,
# so a piece cut short is finished by running it again):
#   1  one node x NGPU            mcore_alltoall, locmoe, locmoe_topk
#   2  2 emulated nodes, fast link mcore_alltoall, locmoe, locmoe_topk
#   3  2 emulated nodes, slow link mcore_alltoall, locmoe, locmoe_topk
#   4  one node x NGPU            mcore_grouplimited, locmoe_plus, deepspeed_moe
#   5  2 emulated nodes, fast link mcore_grouplimited, locmoe_plus, deepspeed_moe
#   6  2 emulated nodes, slow link mcore_grouplimited, locmoe_plus, deepspeed_moe
# E2E_ARGS adds bench_e2e.py options (e.g. "--steps 30 --measure 8"); LIMIT_S (default 540) bounds the piece:
# a launch is stopped when it would run past it (its finished systems are kept). Prints the table of every
# result under OUT last, and writes OUT/e2e.png.
set -uo pipefail
out=${1:?usage: run_gpu_e2e.sh OUT PIECE}
piece=${2:?usage: run_gpu_e2e.sh OUT PIECE (1-6)}
NGPU=${NGPU:-4}
LIMIT_S=${LIMIT_S:-540}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export LOCMOE_COMMIT=${LOCMOE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
start=$(date +%s)
nvidia-smi -L > "$out/gpus.txt" 2>/dev/null || true
case "$piece" in
  1|2|3) megatron_systems="mcore_alltoall,locmoe,locmoe_topk" ds=0 ;;
  4|5|6) megatron_systems="mcore_grouplimited,locmoe_plus" ds=1 ;;
  *) echo "run_gpu_e2e.sh: PIECE must be 1-6" >&2; exit 2 ;;
esac
case "$piece" in
  1|4) layout=1node link="" ;;
  2|5) layout=2nodes link=fast ;;
  3|6) layout=2nodes link=slow ;;
esac
filter() { grep -v -E "Warning|warn\(|return func|No existing process group|^\s*$" ; }
launch() {  # launch SYSTEMS LOGNAME: one torchrun job, bounded by what is left of LIMIT_S
  local left=$(( LIMIT_S - ($(date +%s) - start) ))
  if [ "$left" -le 30 ]; then echo "skipped $1 ($left s left)"; return; fi
  if [ "$layout" = 2nodes ]; then
    timeout "$left" launch/emulate_nodes.sh --nodes 2 --nproc-per-node "$NGPU" --link "$link" -- \
      benchmarks/bench_e2e.py --systems "$1" --out "$out" ${E2E_ARGS:-} 2>&1 | filter | tee -a "$out/$2.log" \
      | grep -E "^(bandwidth|bench_e2e|[0-9]x[0-9])|Error|error" 
  else
    timeout "$left" python3 -m torch.distributed.run --standalone --nproc-per-node "$NGPU" benchmarks/bench_e2e.py \
      --systems "$1" --out "$out" ${E2E_ARGS:-} 2>&1 | filter | tee -a "$out/$2.log" \
      | grep -E "^(bandwidth|bench_e2e|[0-9]x[0-9])|Error|error"
  fi
}
launch "$megatron_systems" "e2e_piece$piece"
[ "$ds" = 1 ] && launch deepspeed_moe "e2e_piece${piece}_deepspeed"
echo "piece $piece: $(( $(date +%s) - start )) s"
echo
python3 benchmarks/e2e_report.py "$out"
