"""Dispatch + combine, forward and backward: hierarchical vs flat all-to-all vs Megatron's dispatcher.

Run on one host with torchrun; add node emulation with launch/emulate_nodes.sh:

  torchrun --standalone --nproc-per-node 8 benchmarks/bench_dispatch.py --gpus-per-node 8
  launch/emulate_nodes.sh --nodes 2 --nproc-per-node 8 -- benchmarks/bench_dispatch.py --gpus-per-node 4

Same routing for every system: each rank draws uniform random distinct experts per token (seeded) and
random combine weights. The "expert" is the multiplication by the combine weight (Megatron applies
probs in its experts; our combine applies them), so only data movement and its bookkeeping is timed;
with --expert-ffn N each local expert is a d -> N -> d GELU MLP (same weights for every system).

Systems:
  hierarchical  this package, TokenDispatcher("hierarchical"): rail-aligned inter-node stage + intra-node
                fan-out; on a one-node group it runs the single-stage pairs plan (comm.dispatcher.resolve_mode)
  hier_tree     one node only: the two-stage plan forced (exact_tree=True; per-rank deduplication, sums in
                the node / rank / expert tree, bitwise equal to the exact flat plan)
  flat          this package, one EP-wide NCCL all-to-all of (token, expert) pairs ("flat_fast" plan)
  megatron      megatron-core's MoEAlltoAllTokenDispatcher (the 'alltoall' dispatcher), unfused permute
  hier_overlap  hierarchical, TokenDispatcher.forward with --chunks chunks pipelined on side streams
Prints a table (rank 0) and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch
import torch.distributed as dist

from locmoe_plugin import Topology
from locmoe_plugin.comm import TokenDispatcher, build_comm_groups
from locmoe_plugin.device import get_accelerator
from locmoe_plugin.routing import index_to_dense


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus-per-node", type=int, default=int(os.environ.get("LOCMOE_GPUS_PER_NODE", 8)))
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, nargs="+", default=[32, 64])
    p.add_argument("--topk", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--systems", nargs="+", default=["hierarchical", "hier_tree", "flat", "megatron"])
    p.add_argument("--iters", type=int, default=10, help="timed iterations per system and round")
    p.add_argument("--rounds", type=int, default=1,
                   help="time the systems in this many rounds (each round in a seeded shuffled order); ms = "
                        "median over rounds, and the ratio columns (flat/hier, ...) = medians of per-round ratios")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--json", default=None)
    p.add_argument("--profile", default=None, help="write rank 0's torch.profiler table of the last config here")
    p.add_argument("--expert-ffn", type=int, default=0,
                   help="0: the expert only scales by the weight; N: each local expert is a SwiGLU-free MLP "
                        "d -> N -> d (GELU), so chunked overlap has compute to hide transfers behind")
    p.add_argument("--chunks", type=int, default=4, help="chunks of the 'hier_overlap' system")
    return p.parse_args()


def megatron_dispatcher(num_experts: int, topk: int, hidden: int, dtype):
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    ep = dist.get_world_size()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)
    cfg = TransformerConfig(
        num_layers=1, hidden_size=hidden, num_attention_heads=8, num_moe_experts=num_experts,
        moe_router_topk=topk, moe_token_dispatcher_type="alltoall", expert_model_parallel_size=ep,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, moe_permute_fusion=False,
        add_bias_linear=False, moe_router_pre_softmax=topk == 1,  # Megatron refuses top-1 otherwise
    )
    local = num_experts // ep
    first = dist.get_rank() * local
    return MoEAlltoAllTokenDispatcher(local, list(range(first, first + local)), cfg, get_default_pg_collection())


def make_experts(num_local: int, hidden: int, ffn: int, dev, dtype, seed: int):
    """Local expert MLPs (or None): list of (W1 [d, ffn], W2 [ffn, d])."""
    if not ffn:
        return None
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(hidden, ffn, generator=g) / hidden**0.5).to(dev, dtype),
             (torch.randn(ffn, hidden, generator=g) / ffn**0.5).to(dev, dtype)) for _ in range(num_local)]


def apply_experts(experts, inp, tokens_per_expert):
    if experts is None:
        return inp * 1.0
    outs, start = [], 0
    for (w1, w2), c in zip(experts, tokens_per_expert):
        outs.append(torch.nn.functional.gelu(inp[start : start + c] @ w1) @ w2)
        start += c
    return torch.cat(outs)


def run_megatron(disp, x, routing_map, probs, experts=None):
    h, p = disp.dispatch_preprocess(x, routing_map, probs)
    h, p = disp.token_dispatch(h, p)
    h, tpe, p = disp.dispatch_postprocess(h, p)
    out = apply_experts(experts, h, [int(v) for v in tpe.tolist()]) * p.unsqueeze(-1).to(h.dtype)
    out = disp.combine_preprocess(out)
    out = disp.token_combine(out)
    return disp.combine_postprocess(out)


def main() -> None:
    args = parse()
    if args.rounds < 1 or args.iters < 1 or args.warmup < 0:
        raise SystemExit(f"--rounds {args.rounds} and --iters {args.iters} must be >= 1, --warmup >= 0")
    acc = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not acc.is_cpu:
        acc.set_device(local_rank)
    dist.init_process_group(backend=acc.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = acc.device(None if acc.is_cpu else local_rank)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows = []
    for E in args.experts:
        topo = Topology.from_ranks_per_node(world, min(args.gpus_per_node, world), E, ep_rank=rank)
        groups = build_comm_groups(topo, dist.group.WORLD)
        for k in args.topk:
            g = torch.Generator().manual_seed(1000 * E + 10 * k + rank)
            s, d = args.tokens, args.hidden
            x = torch.randn(s, d, generator=g).to(dev, dtype)
            ids = torch.rand(s, E, generator=g).argsort(-1)[:, :k].to(dev)
            w = torch.softmax(torch.randn(s, k, generator=g), -1).to(dev)
            cot = torch.randn(s, d, generator=g).to(dev, dtype)
            probs, rmap = index_to_dense(ids, w, E)
            experts = make_experts(E // world, d, args.expert_ffn, dev, dtype, seed=E * 100 + rank)
            outs, res, built = {}, {}, {}
            for system in args.systems:
                if system == "megatron":
                    try:
                        mdisp = megatron_dispatcher(E, k, d, dtype)
                    except Exception as exc:  # report, keep the other rows
                        res[system] = {"error": f"{type(exc).__name__}: {exc}"[:200]}  # not timed
                        continue

                    def step():
                        xx = x.clone().requires_grad_(True)
                        pp = probs.clone().requires_grad_(True)
                        y = run_megatron(mdisp, xx, rmap, pp, experts)
                        y.backward(cot)
                        return y
                elif system == "hier_overlap":
                    disp = TokenDispatcher(groups, "hierarchical")

                    def step(disp=disp):
                        xx = x.clone().requires_grad_(True)
                        ww = w.clone().requires_grad_(True)
                        y = disp.forward(xx, ids, ww, lambda inp, tpe: apply_experts(experts, inp, tpe), args.chunks)
                        y.backward(cot)
                        return y
                elif system == "hier_tree" and topo.num_nodes > 1:
                    continue  # across nodes "hierarchical" already is the two-stage plan
                else:
                    disp = TokenDispatcher(
                        groups, "flat_fast" if system == "flat" else "hierarchical", exact_tree=system == "hier_tree"
                    )

                    def step(disp=disp):
                        xx = x.clone().requires_grad_(True)
                        ww = w.clone().requires_grad_(True)
                        inp, h = disp.dispatch(xx, ids, ww)
                        y = disp.combine(apply_experts(experts, inp, h.tokens_per_expert), h)
                        y.backward(cot)
                        return y
                built[system] = (step, None if system == "megatron" else disp)
            # every system is built first, then timed in rounds (--rounds), so slow drifts of the machine fall
            # on all systems alike: first --warmup untimed iterations of each, then per round every system in
            # a seeded shuffled order (the same on every rank), one warm-up iteration and --iters timed each;
            # per round the median of --iters, then the median over rounds
            per_round = {system: [] for system in built}
            for r in range(-1, args.rounds):
                order = list(built)
                random.Random(1000 + r).shuffle(order)
                for system in order:
                    step = built[system][0]
                    warm = args.warmup if r < 0 else 1
                    samples = []
                    for it in range(warm + (0 if r < 0 else args.iters)):
                        dist.barrier()
                        acc.synchronize()
                        t0 = time.perf_counter()
                        y = step()
                        acc.synchronize()
                        if it >= warm:
                            samples.append(time.perf_counter() - t0)
                    outs[system] = y.detach()
                    if r < 0:
                        continue
                    ms = torch.tensor([statistics.median(samples) * 1e3], device=dev, dtype=torch.float64)
                    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
                    per_round[system].append(ms.item())
            for system, (step, disp) in built.items():
                if args.profile and E == args.experts[-1] and k == args.topk[-1]:
                    from torch.profiler import ProfilerActivity, profile

                    acts = [ProfilerActivity.CPU] + ([] if acc.is_cpu else [ProfilerActivity.CUDA])
                    with profile(activities=acts) as prof:
                        for _ in range(3):
                            step()
                        acc.synchronize()
                    if rank == 0:
                        sort = "cpu_time_total" if acc.is_cpu else "cuda_time_total"
                        with open(args.profile, "a") as f:
                            f.write(f"\n===== {system} E={E} k={k} (3 steps)\n")
                            f.write(prof.key_averages().table(sort_by=sort, row_limit=30))
                res[system] = {"ms": statistics.median(per_round[system]), "ms_rounds": per_round[system]}
                if disp is not None:
                    tr = disp.traffic
                    calls = max(tr.calls // (args.chunks if system == "hier_overlap" else 1), 1)  # per step
                    b = torch.tensor([tr.inter_bytes / calls, tr.intra_bytes / calls], device=dev, dtype=torch.float64)
                    dist.all_reduce(b)
                    res[system].update(inter_node_MiB=b[0].item() / 2**20, intra_node_MiB=b[1].item() / 2**20)
            if "hierarchical" in outs:
                for other in outs:
                    diff = (outs[other].float() - outs["hierarchical"].float()).abs().max().reshape(1)
                    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
                    res[other]["max_abs_diff_vs_hierarchical"] = diff.item()
            e2n = topo.expert_to_node.to(dev)
            cross = (e2n[ids] != topo.node).float().mean().reshape(1)
            dist.all_reduce(cross)
            rows.append({"experts": E, "topk": k, "cross_node_pair_share": cross.item() / world, "systems": res})
            if rank == 0:
                print(json.dumps(rows[-1]), flush=True)
    if rank == 0:
        meta = {
            "ranks": world, "nodes": world // min(args.gpus_per_node, world), "tokens_per_rank": args.tokens,
            "hidden": args.hidden, "dtype": args.dtype, "iters": args.iters, "warmup": args.warmup,
            "rounds": args.rounds,
            "device": torch.cuda.get_device_name() if not acc.is_cpu else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        }
        print_table(meta, rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=2)
    dist.destroy_process_group()


def ratio(systems: dict, a: str, b: str) -> float:
    """``a``'s time over ``b``'s: the median of the per-round ratios (one round: of the medians)."""
    ra, rb = systems.get(a, {}).get("ms_rounds"), systems.get(b, {}).get("ms_rounds")
    if not ra or not rb:
        return float("nan")
    return statistics.median(x / y for x, y in zip(ra, rb))


def print_table(meta, rows) -> None:
    print(f"\n{meta['ranks']} ranks as {meta['nodes']} node(s), {meta['tokens_per_rank']} tokens/rank, hidden "
          f"{meta['hidden']}, {meta['dtype']}, {meta['device']}; dispatch+combine fwd+bwd, median ms (max over ranks)"
          + (f"; {meta['rounds']} interleaved rounds (ratios: median of per-round ratios)" if meta["rounds"] > 1 else ""))
    print(f"{'E':>3} {'k':>2} {'cross':>6} {'hier ms':>8} {'tree ms':>8} {'flat ms':>8} {'mcore ms':>9} {'overlap ms':>9} "
          f"{'flat/hier':>9} {'flat/tree':>9} {'mcore/hier':>10} {'hier inter MiB':>14} {'flat inter MiB':>14}")
    for r in rows:
        s = r["systems"]

        def ms(name):
            return s.get(name, {}).get("ms", float("nan"))

        h, t, f, m, o = ms("hierarchical"), ms("hier_tree"), ms("flat"), ms("megatron"), ms("hier_overlap")
        print(f"{r['experts']:>3} {r['topk']:>2} {r['cross_node_pair_share']:>6.2f} {h:>8.2f} {t:>8.2f} {f:>8.2f} {m:>9.2f} "
              f"{o:>9.2f} {ratio(s, 'flat', 'hierarchical'):>9.2f} {ratio(s, 'flat', 'hier_tree'):>9.2f} "
              f"{ratio(s, 'megatron', 'hierarchical'):>10.2f} "
              f"{s.get('hierarchical', {}).get('inter_node_MiB', float('nan')):>14.1f} "
              f"{s.get('flat', {}).get('inter_node_MiB', float('nan')):>14.1f}")


if __name__ == "__main__":
    main()
