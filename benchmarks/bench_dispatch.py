"""Dispatch + combine, forward and backward: hierarchical vs flat all-to-all vs Megatron's dispatcher.

Run on one host with torchrun; add node emulation with launch/emulate_nodes.sh:

  torchrun --standalone --nproc-per-node 8 benchmarks/bench_dispatch.py --gpus-per-node 8
  launch/emulate_nodes.sh --nodes 2 --nproc-per-node 8 -- benchmarks/bench_dispatch.py --gpus-per-node 4

Same routing for every system: each rank draws random distinct experts per token (seeded) and random
combine weights; uniform over all experts, or with --cross-share S a share S of the routed (token,
expert) pairs goes to other nodes' experts (each slot remote with probability S, its expert uniform
among the remote or the own node's experts). The "expert" is the multiplication by the combine weight (Megatron applies
probs in its experts; our combine applies them), so only data movement and its bookkeeping is timed;
with --expert-ffn N each local expert is a d -> N -> d GELU MLP (same weights for every system).

Systems:
  hierarchical  this package, TokenDispatcher("hierarchical"): rail-aligned inter-node stage + intra-node
                fan-out; on a one-node group it runs the single-stage pairs plan (comm.dispatcher.resolve_mode)
  hier_tree     one node only: the two-stage plan forced (exact_tree=True; per-rank deduplication, sums in
                the node / rank / expert tree, bitwise equal to the exact flat plan)
  flat          this package, one EP-wide NCCL all-to-all of (token, expert) pairs ("flat_fast" plan)
  megatron      megatron-core's MoEAlltoAllTokenDispatcher (the 'alltoall' dispatcher), unfused permute
  overlap       hierarchical split by origin (overlap=True) through TokenDispatcher.forward(expert_fn):
                the local experts run while the other nodes' rows cross the network (DeepSpeed's layer)
  overlap_phases  the same split through dispatch()/combine() with the experts on all rows in between
                (Megatron's six phases: the rail transfer overlaps only the local rows' intra-node hop)
  SYSTEM_fp8, SYSTEM_int8  (SYSTEM: hierarchical, flat, overlap, overlap_phases) the same with the rows of
                the dispatch direction encoded (dispatch_format, locmoe_plugin/comm/row_codec.py); their
                max_abs_diff_vs_hierarchical is the codec's rounding
Per system and configuration also: collectives per layer forward (counted by wrapping
torch.distributed's calls) and host syncs per layer forward (CUDA's sync debug mode; '-' on CPU), and
for 'overlap' a timeline from device events: local expert GEMMs vs the inter-node transfer's window.
Prints a table (rank 0) and writes JSON (--json).

--probe-link: the links are probed (link_probe.py: rail all-to-all rate, 4 KiB latency, one-way rate,
intra-node rate) before the first configuration and after each one's timing rounds; the JSON records every
sample and the median of each figure (meta.inter_node_link, meta.intra_node_link), which
validate_projection.py reads as the run's link. --probe-mib sets the size per peer, by default one row per
token (--tokens x --hidden x the dtype's bytes; 32 MiB at the defaults, about 0.3-0.5 s per sample over
the emulated nodes' socket link).
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
from locmoe_plugin.comm.row_codec import DISPATCH_FORMATS
from locmoe_plugin.device import get_accelerator
from locmoe_plugin.routing import index_to_dense

from link_probe import LinkProbe, ProbeGroups, format_links, layer_probe_mib, take_sample


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
    p.add_argument("--probe-link", action="store_true",
                   help="probe the links before the first configuration and after each one (link_probe.py) and "
                        "record every sample and their median in the JSON")
    p.add_argument("--probe-mib", type=float, default=None,
                   help="the probe's MiB per peer; default one row per token, the layer's own rail message")
    p.add_argument("--cross-share", type=float, nargs="+", default=[None],
                   help="share(s) of routed pairs sent to other nodes' experts, e.g. 0 0.15 0.5 (default: "
                        "uniform random experts)")
    args = p.parse_args()
    for share in args.cross_share:
        if share is not None and not 0 <= share <= 1:
            p.error(f"--cross-share {share} must be between 0 and 1")
    return args


def route(topo, s: int, k: int, share, g: torch.Generator) -> torch.Tensor:
    """``[s, k]`` distinct expert ids per token: uniform (``share`` None), or each slot on another node
    with probability ``share`` (clamped per token to what the node split allows), experts uniform
    inside the chosen side."""
    E = topo.num_experts
    if share is None:
        return torch.rand(s, E, generator=g).argsort(-1)[:, :k]
    e2n = topo.expert_to_node.cpu()
    own = torch.nonzero(e2n == topo.node).flatten()
    others = torch.nonzero(e2n != topo.node).flatten()
    n_remote = (torch.rand(s, k, generator=g) < share).sum(1)
    n_remote = n_remote.clamp(max(k - own.numel(), 0), min(k, others.numel()))
    own_perm = own[torch.rand(s, own.numel(), generator=g).argsort(-1)][:, :k]
    other_perm = others[torch.rand(s, others.numel(), generator=g).argsort(-1)][:, :k] if others.numel() else own_perm[:, :0]
    cand = torch.cat([other_perm, own_perm], 1)
    j = torch.arange(k).expand(s, k)
    pick = torch.where(j < n_remote[:, None], j, other_perm.shape[1] + j - n_remote[:, None])
    return cand.gather(1, pick)


class CallCounter:
    """Counts torch.distributed collectives and host syncs while active. Host syncs: the count
    exchange's named wait (``RoutingCounts.wait_host``) plus, on CUDA, every other synchronizing call that
    torch's sync debug mode reports (Megatron's dispatcher has its own)."""

    NAMES = ("all_to_all_single", "all_gather_into_tensor", "all_gather_single", "all_reduce", "all_gather",
             "broadcast", "reduce_scatter_tensor")

    def __init__(self, acc):
        self.acc, self.collectives, self.syncs, self.named_waits = acc, 0, None, 0
        self._saved = {}

    def __enter__(self):
        from locmoe_plugin.comm import counts as counts_module

        self._counts_module = counts_module
        self._saved_gather = counts_module.ALL_GATHER_SINGLE
        self._saved_wait = counts_module.RoutingCounts.wait_host
        self.named_waits = 0

        def gather(*a, **kw):
            self.collectives += 1
            return self._saved_gather(*a, **kw)

        def wait_host(counts, _wait=self._saved_wait):
            self.named_waits += 0 if counts._host_ready else 1
            if self.acc.is_cpu:
                return _wait(counts)
            torch.cuda.set_sync_debug_mode("default")  # counted once here, not again by the debug mode
            try:
                return _wait(counts)
            finally:
                torch.cuda.set_sync_debug_mode("warn")

        counts_module.ALL_GATHER_SINGLE = gather
        counts_module.RoutingCounts.wait_host = wait_host
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn

            def counted(*a, _fn=fn, **kw):
                self.collectives += 1
                return _fn(*a, **kw)

            setattr(dist, name, counted)
        if not self.acc.is_cpu:
            import warnings

            self._warn = warnings.catch_warnings(record=True)
            self._caught = self._warn.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._counts_module.ALL_GATHER_SINGLE = self._saved_gather
        self._counts_module.RoutingCounts.wait_host = self._saved_wait
        self.syncs = self.named_waits
        if not self.acc.is_cpu:
            torch.cuda.set_sync_debug_mode("default")
            self._warn.__exit__(*exc)
            self.syncs += sum("synchroniz" in str(w.message) for w in self._caught)
        return False


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


def split_format(system: str) -> tuple[str, str]:
    """``"overlap_fp8"`` -> ``("overlap", "fp8")``; a name without a format suffix -> ``(name, "native")``."""
    base, _, fmt = system.rpartition("_")
    if base in ("hierarchical", "flat", "overlap", "overlap_phases") and fmt in DISPATCH_FORMATS[1:]:
        return base, fmt
    return system, "native"


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
    run = argparse.Namespace(link_probe=None)  # what take_sample reads
    if args.probe_link:
        groups = ProbeGroups(dev=dev, sync=acc.synchronize, gpn=min(args.gpus_per_node, world))
        elt = torch.empty((), dtype=dtype).element_size()
        run.link_probe = LinkProbe(groups, args.probe_mib or layer_probe_mib(args.tokens, args.hidden, elt))
        take_sample(run, "before timing")
    for E in args.experts:
        topo = Topology.from_ranks_per_node(world, min(args.gpus_per_node, world), E, ep_rank=rank)
        groups = build_comm_groups(topo, dist.group.WORLD)
        for k, share in [(k, share) for k in args.topk for share in args.cross_share]:
            g = torch.Generator().manual_seed(1000 * E + 10 * k + rank)
            s, d = args.tokens, args.hidden
            x = torch.randn(s, d, generator=g).to(dev, dtype)
            ids = route(topo, s, k, share, g).to(dev)
            w = torch.softmax(torch.randn(s, k, generator=g), -1).to(dev)
            cot = torch.randn(s, d, generator=g).to(dev, dtype)
            probs, rmap = index_to_dense(ids, w, E)
            experts = make_experts(E // world, d, args.expert_ffn, dev, dtype, seed=E * 100 + rank)
            outs, res, built = {}, {}, {}
            for system in args.systems:
                base, fmt = split_format(system)
                if system == "megatron":
                    try:
                        mdisp = megatron_dispatcher(E, k, d, dtype)
                    except Exception as exc:  # report, keep the other rows
                        res[system] = {"error": f"{type(exc).__name__}: {exc}"[:200]}  # not timed
                        continue

                    def step(mark=None, backward=True):
                        xx = x.clone().requires_grad_(True)
                        pp = probs.clone().requires_grad_(True)
                        y = run_megatron(mdisp, xx, rmap, pp, experts)
                        if backward:
                            y.backward(cot)
                        return y
                elif base == "overlap":
                    disp = TokenDispatcher(groups, "hierarchical", overlap=True, dispatch_format=fmt)

                    def step(disp=disp, mark=None, backward=True):
                        xx = x.clone().requires_grad_(True)
                        ww = w.clone().requires_grad_(True)
                        y = disp.forward(xx, ids, ww, lambda inp, tpe: apply_experts(experts, inp, tpe), mark=mark)
                        if backward:
                            y.backward(cot)
                        return y
                elif system == "hier_tree" and topo.num_nodes > 1:
                    continue  # across nodes "hierarchical" already is the two-stage plan
                else:
                    disp = TokenDispatcher(
                        groups, "flat_fast" if base == "flat" else "hierarchical", exact_tree=system == "hier_tree",
                        overlap=base == "overlap_phases", dispatch_format=fmt,
                    )

                    def step(disp=disp, mark=None, backward=True):
                        xx = x.clone().requires_grad_(True)
                        ww = w.clone().requires_grad_(True)
                        inp, h = disp.dispatch(xx, ids, ww)
                        y = disp.combine(apply_experts(experts, inp, h.tokens_per_expert), h)
                        if backward:
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
                # one forward alone: collectives and host syncs per layer forward (max over ranks)
                dist.barrier()
                with CallCounter(acc) as counter:
                    step(backward=False)
                    acc.synchronize()
                calls = torch.tensor([counter.collectives, -1 if counter.syncs is None else counter.syncs],
                                     device=dev, dtype=torch.float64)
                dist.all_reduce(calls, op=dist.ReduceOp.MAX)
                res[system]["collectives_per_forward"] = int(calls[0])
                res[system]["host_syncs_per_forward"] = None if calls[1] < 0 else int(calls[1])
                if split_format(system)[0] == "overlap" and disp is not None and disp.overlap_active:
                    res[system]["timeline"] = timeline(step, acc, dev)
                if disp is not None:
                    tr = disp.traffic
                    calls = max(tr.calls, 1)  # per step
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
            rows.append({"experts": E, "topk": k, "cross_share_requested": share,
                         "cross_node_pair_share": cross.item() / world, "systems": res})
            take_sample(run, f"after E={E} k={k} share={share}")
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
        if run.link_probe is not None:
            meta.update(inter_node_link=run.link_probe.summary("inter_node"),
                        intra_node_link=run.link_probe.summary("intra_node"))
            print(f"link probe ({run.link_probe.mib:g} MiB per peer): {format_links(run.link_probe)}")
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


def timeline(step, acc, dev, repeats: int = 3) -> dict:
    """Device events around the overlapped forward (recorded through locmoe_plugin.device): the local
    expert GEMMs' span and the inter-node transfer's window (launch -> the compute stream has waited for
    it). ``overlap_share``: the part of the local experts' span inside that window (1.0 = all of it).
    Medians over ``repeats`` forwards, max over ranks."""
    spans = []
    for _ in range(repeats):
        events = {}

        def mark(name):
            ev = acc.Event(enable_timing=True)
            ev.record()
            events[name] = ev

        step(mark=mark, backward=False)
        acc.synchronize()
        if "rail_launched" not in events:  # no row crossed nodes: the unsplit plan ran, nothing to time
            return {}
        t = {n: events["rail_launched"].elapsed_time(ev) for n, ev in events.items()}
        experts = t["local_experts_end"] - t["local_experts_start"]
        window = t["rail_waited"]
        inside = max(0.0, min(t["local_experts_end"], window) - max(t["local_experts_start"], 0.0))
        spans.append([experts, window, inside / experts if experts > 0 else 0.0])
    med = torch.tensor([statistics.median(col) for col in zip(*spans)], device=dev, dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return {"local_experts_ms": med[0].item(), "rail_window_ms": med[1].item(), "overlap_share": med[2].item()}


def print_table(meta, rows) -> None:
    print(f"\n{meta['ranks']} ranks as {meta['nodes']} node(s), {meta['tokens_per_rank']} tokens/rank, hidden "
          f"{meta['hidden']}, {meta['dtype']}, {meta['device']}; dispatch+combine fwd+bwd, median ms (max over ranks)"
          + (f"; {meta['rounds']} interleaved rounds (ratios: median of per-round ratios)" if meta["rounds"] > 1 else ""))
    print(f"{'E':>3} {'k':>2} {'cross':>6} {'hier ms':>8} {'flat ms':>8} {'mcore ms':>9} {'ovl ms':>8} {'ovl6 ms':>8} "
          f"{'ovl/hier':>8} {'ovl6/hier':>9} {'flat/hier':>9} {'coll/fwd hier,ovl':>17} {'syncs/fwd':>9} "
          f"{'exp ms':>7} {'rail ms':>7} {'hidden':>6}")
    for r in rows:
        s = r["systems"]

        def ms(name):
            return s.get(name, {}).get("ms", float("nan"))

        def get(name, key, default="-"):
            v = s.get(name, {}).get(key)
            return default if v is None else v

        tl = s.get("overlap", {}).get("timeline", {})
        syncs = get("overlap", "host_syncs_per_forward", get("hierarchical", "host_syncs_per_forward"))
        print(f"{r['experts']:>3} {r['topk']:>2} {r['cross_node_pair_share']:>6.2f} {ms('hierarchical'):>8.2f} "
              f"{ms('flat'):>8.2f} {ms('megatron'):>9.2f} {ms('overlap'):>8.2f} {ms('overlap_phases'):>8.2f} "
              f"{ratio(s, 'overlap', 'hierarchical'):>8.3f} {ratio(s, 'overlap_phases', 'hierarchical'):>9.3f} "
              f"{ratio(s, 'flat', 'hierarchical'):>9.2f} "
              f"{str(get('hierarchical', 'collectives_per_forward')) + ',' + str(get('overlap', 'collectives_per_forward')):>17} "
              f"{str(syncs):>9} {tl.get('local_experts_ms', float('nan')):>7.2f} "
              f"{tl.get('rail_window_ms', float('nan')):>7.2f} {tl.get('overlap_share', float('nan')):>6.2f}")
        for fmt in DISPATCH_FORMATS[1:]:
            if f"hierarchical_{fmt}" not in s:
                continue
            tl = s.get(f"overlap_{fmt}", {}).get("timeline", {})
            print(f"{'':>3} {'':>2} {fmt:>6} {ms(f'hierarchical_{fmt}'):>8.2f} {ms(f'flat_{fmt}'):>8.2f} {'':>9} "
                  f"{ms(f'overlap_{fmt}'):>8.2f} {ms(f'overlap_phases_{fmt}'):>8.2f} "
                  f"{ratio(s, f'overlap_{fmt}', f'hierarchical_{fmt}'):>8.3f} "
                  f"{ratio(s, f'overlap_phases_{fmt}', f'hierarchical_{fmt}'):>9.3f} "
                  f"{ratio(s, f'flat_{fmt}', f'hierarchical_{fmt}'):>9.2f} "
                  f"{'x native: ' + format(ratio(s, f'hierarchical_{fmt}', 'hierarchical'), '.3f'):>17} {'':>9} "
                  f"{tl.get('local_experts_ms', float('nan')):>7.2f} {tl.get('rail_window_ms', float('nan')):>7.2f} "
                  f"{tl.get('overlap_share', float('nan')):>6.2f}")


if __name__ == "__main__":
    main()
