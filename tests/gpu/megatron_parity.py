"""GPU version of the Megatron parity tests (run with torchrun on the GPU machine, NCCL):
LocMoELayer (router + hierarchical / flat dispatcher) against megatron-core's MoELayer with its alltoall
dispatcher and against a dense reference from the gathered expert weights; on one node (``--gpus-per-node``
= the world size) also LocMoELayer's ``allgather`` mode, without the count exchange (equal token counts)
against the same mode with it (``equal_tokens=False``: bitwise equal) and against the reference; and LocMoE's grouped
experts (``LocMoEGroupedMLP``) against megatron-core's ``SequentialMLP`` in both layers, fp32 and bf16 (the
same weights; outputs, input and weight gradients). Prints one line per case and exits 1 on any mismatch.

  torchrun --standalone --nproc-per-node 4 tests/gpu/megatron_parity.py --gpus-per-node 2
  torchrun --standalone --nproc-per-node 4 tests/gpu/megatron_parity.py --gpus-per-node 4
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
            # on one node "hierarchical" runs the pairs plan, whose sums are not the flat tree's beyond top-2
            tree = args.gpus_per_node < world or topk <= 2
            good = e[0] < 1e-4 and e[1] < 1e-4 and (not tree or e[2] == e[3] == 0) and (topk != 2 or e[4] == 0)
            ok &= good
            if rank == 0:
                print(f"megatron-core {mver} k={topk} {routing}: max|y-ref| {e[0]:.2e} max|grad-ref| {e[1]:.2e} "
                      f"hier-vs-flat y {e[2]:.1e} grad {e[3]:.1e} hier-vs-megatron y {e[4]:.1e} -> "
                      f"{'OK' if good else 'MISMATCH'}", flush=True)
    if args.gpus_per_node == world:
        ok &= _allgather_modes(rank, world, ep, LocMoELayer, mver)
    ok &= _grouped_experts(rank, world, args.gpus_per_node, MoELayer, LocMoELayer, mver)
    dist.destroy_process_group()
    return 0 if ok else 1


def _allgather_modes(rank, world, ep, LocMoELayer, mver) -> bool:
    """One node: the allgather mode with and without the count exchange, bitwise equal to each other."""
    from locmoe_plugin.comm.settings import DispatcherSettings

    ok = True
    for topk in (2, 4):
        locmoe = {"gpus_per_node": world}
        torch.manual_seed(7)
        layers = {eq: _build(LocMoELayer, 1, world, locmoe, topk,
                             dispatcher=DispatcherSettings(mode="allgather", equal_tokens=eq)).cuda()
                  for eq in (True, False)}
        layers[False].load_state_dict(layers[True].state_dict())
        gathers = [layers[eq].token_dispatcher.core.gathers_routing for eq in (True, False)]
        torch.manual_seed(200 + rank)
        x = torch.randn(96, 2, D, device="cuda")  # the same token count on every rank
        cot = torch.randn_like(x)
        res = {eq: fwd_bwd(layer, x, cot) for eq, layer in layers.items()}
        # copies: the dense reference below runs the first layer's router again and adds to its gradients
        grads = {eq: {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
                 for eq, layer in layers.items()}
        ref = dense_reference(layers[True], x, cot, ep)
        assert grads[True].keys() == grads[False].keys()
        diffs = {"y": res[True][0] - res[False][0], "input grad": res[True][1] - res[False][1],
                 **{n: grads[True][n] - grads[False][n] for n in grads[True]}}
        errs = torch.tensor([(res[True][i] - ref[i]).abs().max().item() for i in (0, 1)]
                            + [d.abs().max().item() for d in diffs.values()], device="cuda")
        dist.all_reduce(errs, op=dist.ReduceOp.MAX)
        e = errs.tolist()
        differ = {name: v for name, v in zip(diffs, e[2:]) if v != 0}
        good = gathers == [True, False] and e[0] < 1e-4 and e[1] < 1e-4 and not differ
        ok &= good
        if rank == 0:
            print(f"megatron-core {mver} k={topk} allgather, no count exchange: max|y-ref| {e[0]:.2e} max|grad-ref| "
                  f"{e[1]:.2e} vs the count exchange: "
                  f"{'bitwise equal' if not differ else 'differ in ' + str({k: f'{v:.1e}' for k, v in differ.items()})} "
                  f"-> {'OK' if good else 'MISMATCH'}", flush=True)
    return ok


def _grouped_experts(rank, world, gpn, MoELayer, LocMoELayer, mver) -> bool:
    """LocMoEGroupedMLP against SequentialMLP with the same weights: max differences over the ranks of the
    output, the input gradient and the experts' weight gradients, each relative to the largest value."""
    ok = True
    for cls in (MoELayer, LocMoELayer):
        for dtype in (torch.float32, torch.bfloat16):
            extra = {"params_dtype": dtype, "bf16": dtype == torch.bfloat16}
            torch.manual_seed(7)
            layers = {g: _build(cls, 1, world, {"gpus_per_node": gpn}, 4, grouped=g, **extra).cuda() for g in (False, True)}
            layers[True].load_state_dict(layers[False].state_dict())
            torch.manual_seed(300 + rank)
            x = torch.randn(64 + 8 * rank, 2, D, device="cuda", dtype=dtype)
            cot = torch.randn_like(x)
            res = {}
            for g, layer in layers.items():
                y, gx = fwd_bwd(layer, x, cot)
                res[g] = [y, gx] + [p.grad for p in layer.experts.parameters()]
            rel = torch.stack([((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
                               for a, b in zip(res[True], res[False])])
            dist.all_reduce(rel, op=dist.ReduceOp.MAX)
            e = rel.tolist()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            good = max(e) <= tol
            ok &= good
            if rank == 0:
                print(f"megatron-core {mver} {cls.__name__} grouped experts vs SequentialMLP {dtype}: max rel diff "
                      f"y {e[0]:.1e} input grad {e[1]:.1e} weight grads {max(e[2:]):.1e} -> {'OK' if good else 'MISMATCH'}",
                      flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
