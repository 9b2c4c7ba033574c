#!/usr/bin/env bash
# Run a torchrun job on ONE host as K emulated nodes, to test multi-node routing on one box.
#
#   launch/emulate_nodes.sh --nodes K --nproc-per-node P [--link slow|fast] [--torchrun-args "..."] -- script.py [args...]
#   launch/emulate_nodes.sh --nodes 2 --nproc-per-node 8 -- -m locmoe_plugin.cli check-comm --gpus-per-node 4
#   launch/emulate_nodes.sh --nodes 2 --nproc-per-node 4 --link fast -- -m locmoe_plugin.cli bandwidth
#
# Each group of P/K local ranks gets its own NCCL host id, so NCCL uses NVLink/P2P inside a group and
# its socket transport (over loopback) between groups, like a cluster whose nodes are joined by a slow
# network. The script sees GPUS_PER_NODE=P/K and LOCMOE_GPUS_PER_NODE=P/K (pass them on as
# --gpus-per-node / --locmoe-gpus-per-node). For a deepspeed job use the same per-rank wrapper:
#   deepspeed --no_python --no_local_rank --num_gpus P launch/emulate_nodes.sh --rank-wrapper script.py [args]
# with GPUS_PER_NODE exported. Never enable NVLink multicast on shared machines (kept off here).
#
# --link names the link between emulated nodes (exported as LOCMOE_LINK, which benchmarks record):
#   slow  NCCL's socket defaults (measured ~2.7 GB/s per rank on 4 x H200, ~93 x below NVLink);
#   fast  NCCL_NSOCKS_PERTHREAD=8 NCCL_SOCKET_NTHREADS=8 (~6.2 GB/s, ~42 x below NVLink).
# A cluster with a 400 Gb/s NIC per GPU is about 5-10 x below NVLink: both settings are slower than that.
# Without --link, NCCL socket variables already in the environment are kept and the link is named
# "custom" if any is set, else "slow". `locmoe bandwidth` measures the link in force.
# Several jobs on the same GPUs at once: give each its own --master-port (a fixed rendezvous port instead
# of --standalone's) and --hostid-prefix (its emulated nodes get host ids PREFIXemunodeN).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

if [ "${1:-}" = "--rank-wrapper" ]; then   # per-rank mode: set this rank's host id, then run python
  shift
  : "${LOCAL_RANK:?--rank-wrapper runs under torchrun or deepspeed, which set LOCAL_RANK}"
  : "${GPUS_PER_NODE:?set GPUS_PER_NODE (ranks per emulated node)}"
  export NCCL_HOSTID="${EMULATE_HOSTID_PREFIX:-}emunode$(( LOCAL_RANK / GPUS_PER_NODE ))"
  export NCCL_IB_DISABLE=1 NCCL_SOCKET_IFNAME=lo LOCMOE_GPUS_PER_NODE="$GPUS_PER_NODE"
  exec "${PYTHON:-python3}" "$@"
fi

nodes=2 nproc=8 extra="" rdzv="--standalone" link=""
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --nproc-per-node) nproc=$2; shift 2 ;;
    --torchrun-args) extra=$2; shift 2 ;;
    --master-port) rdzv="--nnodes 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:$2"; shift 2 ;;
    --hostid-prefix) export EMULATE_HOSTID_PREFIX=$2; shift 2 ;;
    --link) link=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "emulate_nodes.sh: unknown option $1 (use -- before the script)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: emulate_nodes.sh --nodes K --nproc-per-node P -- script.py [args]" >&2; exit 2; }
if [ $(( nproc % nodes )) -ne 0 ]; then
  echo "emulate_nodes.sh: --nproc-per-node $nproc is not divisible by --nodes $nodes" >&2; exit 2
fi
case "$link" in
  slow) unset NCCL_NSOCKS_PERTHREAD NCCL_SOCKET_NTHREADS ;;
  fast) export NCCL_NSOCKS_PERTHREAD=8 NCCL_SOCKET_NTHREADS=8 ;;
  "") if [ -n "${NCCL_NSOCKS_PERTHREAD:-}${NCCL_SOCKET_NTHREADS:-}" ]; then link=custom; else link=slow; fi ;;
  *) echo "emulate_nodes.sh: --link $link: use slow (NCCL defaults) or fast (8 sockets x 8 threads)" >&2; exit 2 ;;
esac
export LOCMOE_LINK=$link
export GPUS_PER_NODE=$(( nproc / nodes ))
# shellcheck disable=SC2086
exec "${PYTHON:-python3}" -m torch.distributed.run $rdzv --nproc-per-node "$nproc" $extra \
  --no-python "$here/emulate_nodes.sh" --rank-wrapper "$@"
