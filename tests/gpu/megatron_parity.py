"""GPU version of the Megatron parity tests (run with torchrun on the GPU machine, NCCL):
LocMoELayer (router + hierarchical / flat dispatcher) against megatron-core's MoELayer with its alltoall
dispatcher and against a dense reference from the gathered expert weights; prints one line per case
and exits 1 on any mismatch.

  torchrun --standalone --nproc-per-node 4 tests/gpu/megatron_parity.py --gpus-per-node 2
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from tests.megatron_helpers import D, build_layer as _build, dense_reference, fwd_bwd  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus-per-node", type=int, default=2)
    args = p.parse_args()
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    from megatron.core import __version__ as mver
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from locmoe_plugin.megatron.dispatcher import make_locmoe_layer_class

    LocMoELayer = make_locmoe_layer_class()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
    ep = parallel_state.get_expert_model_parallel_group()
    ok = True
    for topk in (2, 4):
        for routing in ("locmoe", "hybrid"):
            locmoe = {"gpus_per_node": args.gpus_per_node, "routing": routing}
            if routing == "hybrid":
                locmoe.update(capacity="factor", capacity_factor=1.0, min_capacity=0)
            torch.manual_seed(7)
            mega = _build(MoELayer, 1, world, locmoe, topk).cuda()
            ours = {m: _build(LocMoELayer, 1, world, locmoe, topk, dispatcher=m).cuda() for m in ("hierarchical", "flat")}
            for layer in ours.values():
                layer.load_state_dict(mega.state_dict())
            torch.manual_seed(100 + rank)
            x = torch.randn(64 + 8 * rank, 2, D, device="cuda")
            cot = torch.randn_like(x)
            res = {"megatron": fwd_bwd(mega, x, cot)}
            for m, layer in ours.items():
                res[m] = fwd_bwd(layer, x, cot)
            ref = dense_reference(mega, x, cot, ep)
            errs = torch.stack([
                max((res[n][i] - ref[i]).abs().max() for n in ("megatron", "hierarchical", "flat")) for i in (0, 1)
            ] + [
                (res["hierarchical"][0] - res["flat"][0]).abs().max(),
                (res["hierarchical"][1] - res["flat"][1]).abs().max(),
                (res["hierarchical"][0] - res["megatron"][0]).abs().max(),
            ])
            dist.all_reduce(errs, op=dist.ReduceOp.MAX)
            e = errs.tolist()
            good = e[0] < 1e-4 and e[1] < 1e-4 and e[2] == 0 and e[3] == 0 and (topk != 2 or e[4] == 0)
            ok &= good
            if rank == 0:
                print(f"megatron-core {mver} k={topk} {routing}: max|y-ref| {e[0]:.2e} max|grad-ref| {e[1]:.2e} "
                      f"hier-vs-flat y {e[2]:.1e} grad {e[3]:.1e} hier-vs-megatron y {e[4]:.1e} -> "
                      f"{'OK' if good else 'MISMATCH'}", flush=True)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
