"""GPU version of the dispatch-format test (NCCL, CUDA tensors): with ``dispatch_format`` fp8 or int8 the
dispatcher equals the native one on decoded rows, bit for bit (forward, the combine's backward, the
dispatch's backward), for the hierarchical, flat and (one node) allgather plans, and sends fewer bytes;
the overlapped path with a codec equals the unsplit one with it (2 nodes x 2 and 4 nodes x 1).
Rank results are gathered to rank 0, which checks them; exits 1 on a mismatch.

  launch/emulate_nodes.sh --nodes 2 --nproc-per-node 4 -- tests/gpu/codec_parity.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from tests.test_dispatch_format import (  # noqa: E402
    _codec_overlap_worker, _codec_worker, check_codec_overlap_results, check_codec_results)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def main() -> int:
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    res = _to_cpu(_codec_worker(rank, world, device=f"cuda:{local}"))
    res_overlap = _to_cpu(_codec_overlap_worker(rank, world, device=f"cuda:{local}"))
    gathered = [None] * world if rank == 0 else None
    dist.gather_object((res, res_overlap), gathered, dst=0)
    code = 0
    if rank == 0:
        try:
            check_codec_results([g[0] for g in gathered])
            check_codec_overlap_results([g[1] for g in gathered])
            print(f"codec parity on {torch.cuda.get_device_name()} x {world}: "
                  f"{len(gathered[0][0])} + {len(gathered[0][1])} overlapped cases per rank, every property holds")
        except AssertionError as exc:
            print(f"codec parity FAILED: {exc!r}")
            code = 1
    dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
