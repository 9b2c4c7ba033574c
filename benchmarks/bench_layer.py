"""One full MoE layer, forward + backward: LocMoE (router trained with its locality loss on real text)
against megatron-core's MoELayer (alltoall, allgather, group-limited) and DeepSpeed's MoE.

Router training lives in ``layer_training.py``, the run context and the Megatron layer builder in
``layer_setup.py`` (beside this file); this file builds the systems, times them and reports.

Run on one host with torchrun; add node emulation with launch/emulate_nodes.sh:

  torchrun --standalone --nproc-per-node 4 benchmarks/bench_layer.py --gpus-per-node 4
  launch/emulate_nodes.sh --nodes 2 --nproc-per-node 4 -- benchmarks/bench_layer.py --gpus-per-node 2

Phase 1, training (per gate in --gates): a small byte-level language model
    embedding(256 -> d) -> causal depthwise-conv mixing block -> RMSNorm -> LocMoELayer (megatron-core
    MoELayer + LocMoEMegatronRouter, hierarchical dispatcher, SequentialMLP experts) -> RMSNorm -> head
is trained for next-byte prediction on the real English corpus of ``locmoe_plugin.demo.corpus``
(Python documentation sources) with LM loss + aux loss + LocMoE's locality loss (coefficient --mu), fp32
(TF32), AdamW. Expert parallelism = world size; each rank trains on its own random windows. The dense
(non-expert) parameters - embedding, mixing block, norms, head, the dense gate and the router's locality
bias - are synchronised (gradient all-reduce) over --sync: "world" (default) = ordinary data parallelism
over all ranks; "node" = within each node only (every node keeps its own replica of the dense part).
With iid data on every rank and one content-only router shared by all ranks, the expected cross-node
share is (N-1)/N whatever the loss (50 % on 2 nodes): the locality loss lowers it through the router's
locality bias (LocMoEConfig.locality_bias, one learned row of routing-score offsets per EP rank).
--ablations adds train-only runs that show this: "nobias" (locality bias off), "mu0" (no locality loss),
"node" (node-local sync, no bias).

The baselines' router is trained the same way (--baseline-router trained, default): the same ByteLM
with megatron-core's MoELayer + TopKRouter + aux loss (no locality term), same data, steps and sync.

Phase 2, timing: every rank takes --tokens held-out tokens (validation windows), runs each trained
model's layers before its MoE layer, and times fwd+bwd of one MoE layer on those hidden states (bf16):
  locmoe_<gate>      (a) LocMoELayer with the trained router and experts (hierarchical dispatcher)
  locmoe_allgather   (a') the same layer of the first gate with dispatcher="allgather" (tokens all-gathered,
                     results reduce-scattered; equal token counts, so no count exchange and the router's
                     counts ride in the routing all-gather); one node only: in the default systems on one node
  locmoe_allgather_counted  (a'* ) the same with the count exchange and the router's own all-reduce (what the
                     layer runs under variable_seq_lengths; identical results); not in the default systems
  locmoe_unfolded    (a'') the same layer of the first gate with the router's own count all-reduce instead of
                     its counts riding in the dispatcher's count exchange (identical results; an A/B of the
                     fold, which acts on EP groups spanning nodes); not in the default systems
  locmoe_overlap     (a''') the same layer of the first gate with the dispatcher's overlap on
                     (DispatcherSettings(overlap=True), Megatron --locmoe-overlap on; a no-op on one node);
                     not in the default systems
  locmoe_grouped     (g) the layer of the first gate with LocMoE's grouped experts (LocMoEGroupedMLP:
                     SequentialMLP's parameters, every local expert in two grouped GEMMs; Megatron
                     --locmoe-grouped-experts on); locmoe_allgather_grouped the same in allgather mode;
                     mcore_alltoall_grouped / mcore_allgather_grouped Megatron's layers (b) / (c) with them
                     (same weights): which part of a difference is the experts'. Not in the default systems
  mcore_alltoall     (b) megatron-core MoELayer, TopKRouter + aux loss, 'alltoall' dispatcher, with the
                     trained TopKRouter model's router and experts, on that model's hidden states
  mcore_allgather    (c) same, 'allgather' dispatcher
  mcore_grouplimited (d) same as (b) with moe_router_num_groups = nodes, moe_router_group_topk = 1
                     (the router was trained without the group limit)
  deepspeed_moe      (e) deepspeed.moe.layer.MoE, TopKGate k, capacity factor --ds-capacity-factor; its
                     gate weight = the trained TopKRouter's, on the same hidden states; its own experts
  locmoe_ds          (e') locmoe_plugin.deepspeed.LocMoE (dropless), router (gate, locality bias) and hidden states of the
                     first trained gate, its own experts
  locmoe_ds_no_overlap the same with "overlap": false (locmoe_ds runs the default, overlap on: across
                     nodes the local experts compute while other nodes' rows cross the network)
  locmoe_ds_modules  locmoe_ds with "grouped_experts": "off" (each expert module on its rows; locmoe_ds runs its
                     two-layer experts as two grouped GEMMs, the default); not in the default systems
Median of --iters after --warmup, max over ranks. With --rounds R > 1 every system is built first and the
systems are then timed in R rounds, so that a machine's drift during the run (measured: the same
one-node command 1.000 x and 1.265 x Megatron's time in consecutive calls) hits all of them alike; the
table then gives the median over rounds and the median of the per-round ratios. Before the first round
every system runs its --warmup iterations (untimed); each round runs the systems in an order shuffled
per round (seeded, the same on every rank), each with one warm-up iteration before its --iters, so no
system always opens a round or always follows the same one. --manual-gc collects once before the timing
and keeps Python's garbage collector off during it (as Megatron-LM's --manual-gc does in training), so
collector pauses land on no system. With rounds, each system's row of "host:" lines gives the host's
time in the step's forward and backward calls (perf_counter around each, no device sync between them:
the host's issue work plus any host wait inside the call; the autograd thread's, for backward) and the
device tail (wall less both), medians over rounds, max over ranks; they are in the JSON as host_ms_rounds.

Per system: cross-node share of routed (kept) pairs, inter-node MiB (one forward dispatch + combine,
summed over ranks; backward moves the same again): LocMoE from its dispatcher's TrafficCounter;
Megatron alltoall = remote (token, expert) pairs x d x bytes x 2; allgather = s x d x bytes x (ranks on
other nodes) x 2 (all-gather + reduce-scatter, logical payload); DeepSpeed = its padded capacity
buffers for remote experts x 2. And max/mean expert load over the EP group.

Floor of each Megatron LocMoE row = 2 x (inter bytes of one rank's dispatch + combine) / inter-node
bandwidth + 2 x (intra-node exchange time of that rank's dispatch + combine bytes) + expert GEMM time;
"2 x" = forward and backward; each term is the max over ranks. Measured here: inter-node bandwidth =
bytes one rank sends to the other nodes / time of an all_to_all over its rail group (the ranks with the
same local index on every node, all rails at once, --bw-mib MiB per peer); intra-node exchange time =
an all_to_all over the node's ranks carrying that many bytes to the node peers; GEMM time = fwd+bwd of
the layer's own SequentialMLP on the rows its experts received.

Link probe (link_probe.py): the inter-node link (rail all_to_all rate, 4 KiB latency, one-way rate) and
the intra-node one are sampled before the timing and after every timing round (with --rounds 1: before
and after the timing); the JSON records every sample (meta.inter_node_link.samples,
meta.intra_node_link.samples) and the median of each figure, which the floors, the table and
`locmoe project --calibration` use. The probe sends --bw-mib MiB per peer, by default the layer's own
rail message (one row per token: 32 MiB at 8192 tokens x hidden 2048 bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # the benchmark's own modules, also when loaded by file path (tests)
    sys.path.insert(0, HERE)

from layer_setup import Ctx, build_megatron_layer, host_calls_of, time_it  # noqa: E402
from layer_training import _budget_mechanism, _budget_warmup, corpus_batch, train  # noqa: E402
from link_probe import LinkProbe, a2a_time, format_links, layer_probe_mib, take_sample  # noqa: E402
from manual_gc import automatic_collection  # noqa: E402
from locmoe_plugin.comm.row_codec import DISPATCH_FORMATS  # noqa: E402
from locmoe_plugin.comm.settings import DispatcherSettings  # noqa: E402
from locmoe_plugin.config import BUDGET_MECHANISMS  # noqa: E402
from locmoe_plugin.megatron.router import dense_routing_map  # noqa: E402


DEFAULT_SYSTEMS = ("locmoe", "mcore_alltoall", "mcore_allgather", "mcore_grouplimited", "deepspeed_moe", "locmoe_ds",
                   "locmoe_ds_no_overlap")
ONE_NODE_SYSTEMS = ("locmoe_allgather",)  # the allgather dispatcher is refused on EP groups spanning nodes
#: LocMoE layers of the first gate with one dispatcher setting changed (compared with that gate's default layer)
FIRST_GATE_VARIANTS = ("locmoe_allgather", "locmoe_allgather_counted", "locmoe_unfolded", "locmoe_overlap",
                       "locmoe_grouped", "locmoe_allgather_grouped")
GROUPED = "_grouped"  # a Megatron-built row's suffix: LocMoEGroupedMLP experts instead of SequentialMLP


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus-per-node", type=int, default=int(os.environ.get("LOCMOE_GPUS_PER_NODE", 0)) or None,
                   help="ranks per (emulated) node; default $LOCMOE_GPUS_PER_NODE, else the world size")
    p.add_argument("--tokens", type=int, default=8192, help="timed tokens per rank")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="timed layers' dtype")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1,
                   help="> 1: build every system first, then time them in this many rounds (--iters each, a "
                        "seeded shuffled order per round) and report the median over rounds and, per system, the "
                        "median of its per-round ratios to mcore_alltoall; machine drift then hits every system alike")
    p.add_argument("--manual-gc", action="store_true",
                   help="gc.collect() before timing and the collector off while timing (all systems alike)")
    p.add_argument("--systems", nargs="*", default=None,
                   help=f"default: {' '.join(DEFAULT_SYSTEMS)}, and on one node also {' '.join(ONE_NODE_SYSTEMS)}")
    p.add_argument("--ds-capacity-factor", type=float, default=1.25)
    p.add_argument("--aux-coeff", type=float, default=0.01)
    # training
    p.add_argument("--gates", nargs="+", default=["dense", "grap"], choices=["dense", "grap"])
    p.add_argument("--mu", type=float, nargs="+", default=[0.05, 0.1],
                   help="LocMoE locality-loss coefficient of each gate in --gates (one value: all gates)")
    p.add_argument("--budget", type=float, default=None,
                   help="LocMoE routers: cross-node traffic budget (LocMoEConfig.cross_node_budget), in training "
                        "and in the timed steps; pass --mu 0 for the budget alone. Default: none")
    p.add_argument("--budget-mechanism", choices=BUDGET_MECHANISMS, default=None,
                   help="how --budget acts (LocMoEConfig.budget_mechanism): loss = its controller sets the locality "
                        "loss's coefficient (locality bias on); selection = a margin on the local experts' "
                        "selection scores; node = a price per remote node a token is sent to (bytes, not pairs). "
                        "Default: LocMoEConfig's")
    p.add_argument("--budget-warmup", type=int, default=0,
                   help="with --budget: training forwards over which the budget's target falls linearly from the "
                        "unconstrained share (N-1)/N to --budget (LocMoEConfig.cross_node_budget_warmup). Default: 0")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="after 20 warm-up steps: constant --lr, or cosine decay to 0.1 x --lr at the last step "
                        "(ends with small steps: less seed-to-seed spread of the final loss)")
    p.add_argument("--eval-batches", type=int, default=1,
                   help="validation batches (of --train-batch x --seq tokens per rank) for the held-out loss")
    p.add_argument("--eval-seed", type=int, default=7,
                   help="seed of the held-out windows (one set for every --seed, so the seeds of a quality "
                        "comparison differ in training only, not in what they are evaluated on). Default: %(default)s")
    p.add_argument("--expert-bias-rate", type=float, default=0.0,
                   help="LocMoE routers: loss-free balancing rate (LocMoEConfig.expert_bias_rate), in training "
                        "and in the timed training steps; 0 = off")
    p.add_argument("--dispatch-format", default="native", choices=list(DISPATCH_FORMATS),
                   help="LocMoE layers (trained and timed, Megatron's and DeepSpeed's): how token rows and output "
                        "gradients travel to the experts (DispatcherSettings.dispatch_format: native, fp8 or int8 "
                        "with one fp32 scale per 128 features). Default: %(default)s")
    p.add_argument("--aux-scope", default="ep_group", choices=["ep_group", "local"],
                   help="LocMoE routers' aux_loss_scope: counts summed over the EP group (one all-reduce per "
                        "layer forward) or this rank's tokens only, as Megatron's 'aux_loss' type")
    p.add_argument("--sync", default="world", choices=["node", "world"])
    p.add_argument("--baseline-router", default="trained", choices=["trained", "untrained"],
                   help="trained: the baselines' TopKRouter (and DeepSpeed's gate) comes from the same training "
                        "with Megatron's MoELayer + TopKRouter + aux loss (no locality loss), timed on that "
                        "model's hidden states; untrained: a fresh TopKRouter on the first gate's hidden states")
    p.add_argument("--ablations", nargs="*", default=[], choices=["nobias", "mu0", "node"],
                   help="extra train-only runs with the first gate: no locality bias; mu = 0; node-local sync "
                        "without bias")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--corpus", default=None, help="text file/folder (default: load_corpus()'s default)")
    p.add_argument("--bw-mib", type=float, default=None,
                   help="link probe's MiB per peer; default: one row per token, --tokens x --hidden x the timed "
                        "dtype's bytes (32 MiB at the defaults), the layer's own rail message (link_probe.py)")
    p.add_argument("--json", default=None)
    p.add_argument("--calibration", default=None, help="also write a `locmoe project --calibration` JSON here")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)



# ------------------------------------------------------------------------------------------ routing stats
def routing_stats(ctx: Ctx, expert_ids: torch.Tensor) -> dict:
    """``expert_ids [s, k]`` (-1 = dropped) of this rank -> cross-node share, remote pairs, load (global)."""
    kept = expert_ids >= 0
    ids = expert_ids.clamp_min(0)
    remote = kept & (ctx.expert_node[ids] != ctx.node)
    load = torch.bincount(ids[kept], minlength=ctx.args.experts).to(torch.float64)
    dist.all_reduce(load)
    tot = ctx.allsum([remote.sum().item(), kept.sum().item(), (~kept).sum().item()])
    return {"cross_node_share": tot[0] / max(tot[1], 1), "remote_pairs_this_rank": int(remote.sum().item()),
            "dropped_share": tot[2] / max(tot[1] + tot[2], 1),
            "max_over_mean_load": (load.max() / load.mean().clamp_min(1e-9)).item(),
            "rank_max_over_mean_rows": rank_imbalance(load, ctx.world), "tokens_per_expert": load}


def rank_imbalance(load: torch.Tensor, world: int) -> float:
    """Global rows per expert ``[E]`` -> the busiest EP rank's rows over the mean rank's (experts placed
    contiguously, E / world per rank): what the per-rank expert GEMMs wait for."""
    per_rank = load.to(torch.float64).reshape(world, -1).sum(1)
    return (per_rank.max() / per_rank.mean().clamp_min(1e-9)).item()


def routing_map_ids(routing_map: torch.Tensor, k: int) -> torch.Tensor:
    """``routing_map [s, n]`` bool -> ``[s, k]`` ids (-1 padding)."""
    s, n = routing_map.shape
    ar = torch.arange(n, device=routing_map.device).expand(s, n)
    keyed = torch.where(routing_map, ar, n)
    ids = keyed.sort(-1).values[:, :k]
    return torch.where(ids < n, ids, -1)


# ------------------------------------------------------------------------------------------ floor
def rescale_floors(results: dict, bw_used: float, bw_final: float) -> None:
    """The LocMoE rows' floors were computed while building, at the link probe's rate then (``bw_used``);
    restate their inter-node term at the run's final median rate ``bw_final`` (both bytes/s)."""
    if not (bw_used > 0 and bw_final > 0) or bw_used == bw_final:
        return
    for r in results.values():
        if "floor_inter_ms" in r:
            new = r["floor_inter_ms"] * bw_used / bw_final
            r["floor_ms"] += new - r["floor_inter_ms"]
            r["floor_inter_ms"] = new


def per_rank(ctx: Ctx, value: float) -> list[float]:
    """``value`` of every rank, in rank order."""
    v = [0.0] * ctx.world
    v[ctx.rank] = float(value)
    return ctx.allsum(v)


def inter_sends_per_rank(ctx: Ctx, expert_ids: torch.Tensor, row_bytes: int) -> dict:
    """Cross-node bytes per rank of a pairs all-to-all of ``expert_ids [s, k]`` (-1 = dropped), in the
    dispatcher's TrafficCounter convention (per token owner): ``dispatch`` (its remote pairs sent) and
    ``combine`` (the same rows coming back), plus ``received`` (the remote rows it receives in dispatch)."""
    kept = expert_ids >= 0
    dest = expert_ids[kept] // (ctx.args.experts // ctx.world)
    mine = torch.bincount(dest, minlength=ctx.world).to(torch.float64).tolist()  # pairs to each rank
    rows = [per_rank(ctx, c) for c in mine]  # rows[q][p]: pairs rank p sends to rank q
    node = [p // ctx.gpn for p in range(ctx.world)]
    disp = [row_bytes * sum(rows[q][p] for q in range(ctx.world) if node[q] != node[p]) for p in range(ctx.world)]
    comb = [row_bytes * sum(rows[p][q] for q in range(ctx.world) if node[q] != node[p]) for p in range(ctx.world)]
    return {"dispatch": disp, "combine": disp, "received": comb}


def gemm_time(ctx: Ctx, layer, tokens_per_expert: list[int], dtype) -> float:
    """ms of fwd+bwd of ``layer.experts`` on ``tokens_per_expert`` rows per local expert, max over ranks."""
    rows = sum(tokens_per_expert)
    x = torch.randn(rows, ctx.args.hidden, device=ctx.dev, dtype=dtype)
    probs = torch.ones(rows, device=ctx.dev, dtype=torch.float32)
    tpe = torch.tensor(tokens_per_expert, dtype=torch.long)
    cot = torch.randn_like(x)

    def step():
        xx = x.clone().requires_grad_(True)
        out = layer.experts(xx, tpe, probs)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(cot)

    return time_it(ctx, step, 2, 5)


# ------------------------------------------------------------------------------------------ systems
def time_system(ctx: Ctx, step) -> float:
    """Time ``step`` now, or (``--rounds`` > 1) keep it for the interleaved rounds and return NaN."""
    if ctx.args.rounds > 1:
        ctx.deferred[ctx.current] = step
        return float("nan")
    with automatic_collection(ctx.args.manual_gc, collect_first=True):
        return time_it(ctx, step, ctx.args.warmup, ctx.args.iters)


def round_order(names: list[str], r: int) -> list[str]:
    """Round ``r``'s order of the systems: a shuffle seeded by ``r`` (the same on every rank), so no
    system always opens a round or always follows the same one."""
    order = list(names)
    random.Random(1000 + r).shuffle(order)
    return order


def time_rounds(ctx: Ctx, results: dict) -> None:
    """Timing of the deferred systems in rounds (see :func:`round_order`): ``results[name]["ms"]`` = median over rounds, plus the
    per-round times and, against mcore_alltoall, the per-round ratios and their median. With a link probe
    (``ctx.link_probe``) a sample of the links is taken before the first round and after every round."""
    a = ctx.args
    per = {name: [] for name in ctx.deferred}
    host = {name: [] for name in ctx.deferred}  # per round: (forward, backward) host ms, see time_it
    with automatic_collection(a.manual_gc, collect_first=True):
        for name, step in ctx.deferred.items():  # warm-up pass (--warmup iterations each), not recorded
            time_it(ctx, step, a.warmup, 1)
        take_sample(ctx, "before round 1")
        for r in range(a.rounds):  # each system: one warm-up iteration, then --iters timed
            for name in round_order(list(ctx.deferred), r):
                per[name].append(time_it(ctx, ctx.deferred[name], 1, a.iters))
                host[name].append(ctx.last_host_ms)
            take_sample(ctx, f"after round {r + 1}")
            ctx.log(f"  round {r + 1}/{a.rounds}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in per.items()))
    base = per.get("mcore_alltoall")
    for name, ms in per.items():
        results[name]["ms"] = statistics.median(ms)
        results[name]["ms_rounds"] = ms
        if all(h is not None for h in host[name]):
            results[name]["host_ms_rounds"] = host[name]
        if base:
            ratios = [x / b for x, b in zip(ms, base)]
            results[name]["ratio_rounds"] = ratios
            results[name]["ratio_median"] = statistics.median(ratios)
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            results[name]["ratio_quartiles"] = [q[0], q[2]]
    ctx.deferred.clear()


def time_megatron(ctx: Ctx, layer, x, cot) -> float:
    params = list(layer.parameters())

    def forward():
        for p in params:
            p.grad = None
        y, _ = layer(x.clone().requires_grad_(True))
        return y

    return time_system(ctx, host_calls_of(ctx, forward, lambda y: y.backward(cot)))


def time_deepspeed(ctx: Ctx, layer, x, cot) -> float:
    params = list(layer.parameters())

    def forward():
        for p in params:
            p.grad = None
        y, l_aux, _ = layer(x.clone().requires_grad_(True))
        return y, l_aux

    def backward(out):
        y, l_aux = out
        torch.autograd.backward([y, l_aux], [cot, torch.ones_like(l_aux)])

    return time_system(ctx, host_calls_of(ctx, forward, backward))


_DS_READY = False


def deepspeed_ready(ctx: Ctx):
    global _DS_READY
    if not _DS_READY:
        if ctx.acc.is_cpu:
            os.environ["DS_ACCELERATOR"] = "cpu"
        from locmoe_plugin.testing.deepspeed_init import init_deepspeed_distributed

        init_deepspeed_distributed(ctx.acc.backend)
        _DS_READY = True


def ds_expert(ctx: Ctx):
    a = ctx.args
    return nn.Sequential(nn.Linear(a.hidden, a.ffn, bias=False), nn.GELU(), nn.Linear(a.ffn, a.hidden, bias=False))


def system_names(args) -> list[tuple[str, str]]:
    """``(row name, gate whose model's hidden states it runs on)`` for every requested system. A LocMoE row runs
    on the hidden states of the model its router was trained in: ``locmoe`` (every gate) or ``locmoe_<gate>``
    (one of ``--gates``) on that gate's model; the LocMoE variants and our DeepSpeed layer on the first gate's."""
    rows = []
    for system in args.systems:
        if system == "locmoe":
            rows += [(f"locmoe_{g}", g) for g in args.gates]
        elif system.startswith("locmoe_ds") or system in FIRST_GATE_VARIANTS:
            rows.append((system, args.gates[0]))
        elif system.startswith("locmoe_"):
            gate = system[len("locmoe_"):]
            if gate not in args.gates:
                raise SystemExit(f"--systems {system}: no such LocMoE row; name a trained gate's layer "
                                 f"(locmoe_{'|locmoe_'.join(args.gates)}, or locmoe for all of --gates), "
                                 f"or one of {', '.join(FIRST_GATE_VARIANTS)}, locmoe_ds, locmoe_ds_no_overlap")
            rows.append((system, gate))
        else:  # Megatron and DeepSpeed baselines: the trained TopKRouter model (or the first gate's)
            rows.append((system, "topk" if args.baseline_router == "trained" else args.gates[0]))
    return rows


def run_systems(ctx: Ctx, trained: dict, hidden: dict, cot, results: dict):
    """Time every system on this rank's held-out hidden states ``hidden[gate] [T, B, d]``."""
    a = ctx.args
    d, elt = a.hidden, torch.empty((), dtype=ctx.dtype).element_size()
    for name, gate in system_names(a):
        # baselines: the trained TopKRouter model's router and experts (or, untrained router: the first
        # gate's experts and Megatron's fresh TopKRouter)
        expert_state = {k: v for k, v in trained[gate]["state"].items()
                        if k.startswith("experts.") or (gate == "topk" and k.startswith("router."))}
        x = hidden[gate]
        s = x.shape[0] * x.shape[1]
        ctx.current = name
        try:
            res = run_one(ctx, name, trained, expert_state, x, cot, d, elt, s)
        except Exception as exc:  # keep the other rows; the error is the result
            import traceback

            if ctx.rank == 0:
                traceback.print_exc()
            res = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        results[name] = res
        if "error" in res:
            ctx.deferred.pop(name, None)
        ctx.log(f"  {name}: {json.dumps(res)}")
        if not ctx.acc.is_cpu and not ctx.deferred:
            torch.cuda.empty_cache()
    if ctx.deferred:
        time_rounds(ctx, results)


def run_one(ctx, name, trained, expert_state, x, cot, d, elt, s) -> dict:
    a = ctx.args
    remote_ranks = ctx.world - ctx.gpn
    grouped = name.endswith(GROUPED) and name.startswith(("locmoe_", "mcore_"))
    base = name[: -len(GROUPED)] if grouped else name
    if name.startswith("locmoe_") and not name.startswith("locmoe_ds"):
        allgather = base in ("locmoe_allgather", "locmoe_allgather_counted")
        gate = a.gates[0] if name in FIRST_GATE_VARIANTS else name[len("locmoe_"):]
        settings = {"gate": gate, "routing": "locmoe", "locality_loss_coeff": trained[gate]["summary"]["mu"],
                    "gpus_per_node": ctx.gpn, "aux_loss_scope": a.aux_scope, "expert_bias_rate": a.expert_bias_rate,
                    "cross_node_budget": a.budget, "budget_mechanism": _budget_mechanism(a),
                    "cross_node_budget_warmup": _budget_warmup(a)}
        mode = "allgather" if allgather else "hierarchical"
        layer = build_megatron_layer(ctx, "alltoall", ctx.dtype, settings,
                                     locmoe_dispatcher=DispatcherSettings(
                                         mode=mode, overlap=name == "locmoe_overlap",
                                         dispatch_format=a.dispatch_format,
                                         # the count exchange, as without equal token counts
                                         equal_tokens=False if name == "locmoe_allgather_counted" else None),
                                     grouped_experts=grouped)
        if name == "locmoe_unfolded":
            layer.token_dispatcher.fold_router_counts(layer.router, fold=False)
        missing, unexpected = layer.load_state_dict(trained[gate]["state"], strict=False)
        if [m for m in missing if not m.endswith("_extra_state")] or unexpected:
            raise RuntimeError(f"trained state does not fit: missing {missing}, unexpected {unexpected}")
        if layer.router.core.expert_bias is not None:  # fp32 offsets, not their bf16 copy
            layer.router.core.expert_bias.data = trained[gate]["state"]["router.core.expert_bias"].float().clone()
        layer.train()
        ms = time_megatron(ctx, layer, x, cot)
        # routing and traffic of one more forward on the same tokens
        disp = layer.token_dispatcher
        disp.traffic.reset()
        with torch.no_grad():
            layer(x)
        st = layer.router.last_stats
        tr = disp.traffic
        tpe_global = st.tokens_per_expert.clone().to(torch.float64)
        dist.all_reduce(tpe_global)
        per = a.experts // ctx.world
        mine = [int(v) for v in tpe_global[ctx.rank * per : (ctx.rank + 1) * per].tolist()]
        res = {"ms": ms}
        budget = layer.router.core.budget
        if budget is not None:  # the timed steps' target: the budget once the trained warm-up is restored
            res["budget_target"] = float(budget.target())
        tot = ctx.allsum([st.cross_node_pairs.item(), st.tokens_per_expert.sum().item(), tr.inter_bytes,
                          tr.intra_bytes])
        res.update(cross_node_share=tot[0] / max(tot[1], 1), inter_node_MiB=tot[2] / 2**20,
                   intra_node_MiB=tot[3] / 2**20,
                   max_over_mean_load=(tpe_global.max() / tpe_global.mean().clamp_min(1e-9)).item(),
                   rank_max_over_mean_rows=rank_imbalance(tpe_global, ctx.world))
        # floor
        bw = ctx.bw_inter
        inter_s = 2 * (ctx.allmax(tr.dispatch_inter_bytes) + ctx.allmax(tr.combine_inter_bytes)) / bw if bw else 0.0
        intra_s = 2 * (a2a_time(ctx, ctx.node_group, ctx.allmax(tr.dispatch_intra_bytes))
                       + a2a_time(ctx, ctx.node_group, ctx.allmax(tr.combine_intra_bytes)))
        gemm_ms = gemm_time(ctx, layer, mine, ctx.dtype)
        floor = inter_s * 1e3 + intra_s * 1e3 + gemm_ms
        res.update(floor_ms=floor, floor_inter_ms=inter_s * 1e3, floor_intra_ms=intra_s * 1e3, floor_gemm_ms=gemm_ms,
                   inter_bytes_per_rank={"dispatch": per_rank(ctx, tr.dispatch_inter_bytes),
                                         "combine": per_rank(ctx, tr.combine_inter_bytes)},
                   trained=trained[gate]["summary"])
        return res
    if name.startswith("mcore_"):
        dispatcher = "allgather" if base == "mcore_allgather" else "alltoall"
        torch.manual_seed(a.seed + 5)
        layer = build_megatron_layer(ctx, dispatcher, ctx.dtype, None, group_limited=base == "mcore_grouplimited",
                                     grouped_experts=grouped)
        missing, unexpected = layer.load_state_dict(expert_state, strict=False)
        if unexpected or any(k.split(".")[0] in {p.split(".")[0] for p in expert_state}
                             and not k.endswith("_extra_state") for k in missing):
            raise RuntimeError(f"trained state does not fit: missing {missing}, unexpected {unexpected}")
        layer.train()
        with torch.no_grad():
            rmap = dense_routing_map(layer.router(x), a.experts)
        stats = routing_stats(ctx, routing_map_ids(rmap, a.topk))
        if dispatcher == "alltoall":
            stats["inter_bytes_per_rank"] = inter_sends_per_rank(ctx, routing_map_ids(rmap, a.topk), d * elt)
        ms = time_megatron(ctx, layer, x, cot)
        if dispatcher == "alltoall":
            inter = ctx.allsum([stats["remote_pairs_this_rank"] * d * elt * 2])[0]
        else:
            inter = ctx.world * s * d * elt * remote_ranks * 2
        stats.pop("remote_pairs_this_rank")
        per = a.experts // ctx.world
        load = stats.pop("tokens_per_expert")
        # the same expert-GEMM measure as LocMoE's floor, on this router's rows per local expert
        gemm_ms = gemm_time(ctx, layer, [int(v) for v in load[ctx.rank * per : (ctx.rank + 1) * per].tolist()], ctx.dtype)
        return {"ms": ms, **stats, "inter_node_MiB": inter / 2**20, "floor_gemm_ms": gemm_ms}
    if name == "deepspeed_moe":
        deepspeed_ready(ctx)
        from deepspeed.moe.layer import MoE

        torch.manual_seed(a.seed + 6)
        layer = MoE(a.hidden, ds_expert(ctx), num_experts=a.experts, ep_size=ctx.world, k=a.topk,
                    capacity_factor=a.ds_capacity_factor, eval_capacity_factor=a.ds_capacity_factor,
                    drop_tokens=True)
        layer.set_deepspeed_parallelism()
        layer = layer.to(ctx.dev, ctx.dtype)
        gate_w = layer.deepspeed_moe.gate.wg
        gate_w.float()
        if "router.weight" in expert_state:  # the trained TopKRouter's weight [E, d] as DeepSpeed's gate
            gate_w.weight.data.copy_(expert_state["router.weight"])
        layer.train()
        with torch.no_grad():
            out = layer.deepspeed_moe.gate(x.reshape(-1, d), None, True)
        cap, idx = int(out[1]), out[3]  # indices [k, s], negative = dropped
        stats = routing_stats(ctx, torch.where(idx.t() >= 0, idx.t(), -1).long())
        stats.pop("tokens_per_expert")
        ms = time_deepspeed(ctx, layer, x, cot)
        remote_experts = a.experts * remote_ranks // ctx.world
        inter = ctx.world * remote_experts * cap * d * elt * 2
        stats.pop("remote_pairs_this_rank")
        return {"ms": ms, **stats, "inter_node_MiB": inter / 2**20, "capacity": cap}
    if name.startswith("locmoe_ds"):
        deepspeed_ready(ctx)
        from locmoe_plugin.deepspeed import LocMoE

        gate = a.gates[0]
        overlap = not name.endswith("no_overlap")
        torch.manual_seed(a.seed + 6)
        settings = {"gate": gate, "routing": "locmoe", "locality_loss_coeff": trained[gate]["summary"]["mu"],
                    "gpus_per_node": ctx.gpn, "aux_loss_scope": a.aux_scope, "overlap": overlap,
                    "expert_bias_rate": a.expert_bias_rate, "dispatch_format": a.dispatch_format,
                    "grouped_experts": "off" if name == "locmoe_ds_modules" else "auto"}
        layer = LocMoE(a.hidden, ds_expert(ctx), num_experts=a.experts, ep_size=ctx.world, k=a.topk,
                       locmoe=settings)
        layer.set_deepspeed_parallelism()
        layer = layer.to(ctx.dev, ctx.dtype)
        layer.router.float()
        if gate == "dense":
            w = trained[gate]["state"]["router.core.gate.weight"]
            layer.router.gate.weight.data.copy_(w)
        bias = trained[gate]["state"].get("router.core.locality_bias")
        if bias is not None:  # the trained router's locality bias (one row per EP rank)
            layer.router.locality_bias.data.copy_(bias)
        ebias = trained[gate]["state"].get("router.core.expert_bias")
        if ebias is not None:  # and its loss-free balancing offsets
            layer.router.expert_bias.data = ebias.float().clone()
        layer.train()
        ms = time_deepspeed(ctx, layer, x, cot)
        layer.traffic.reset()
        with torch.no_grad():
            layer(x)
        st = layer.router.last_stats
        tr = layer.traffic
        load = st.tokens_per_expert.to(torch.float64)
        dist.all_reduce(load)
        tot = ctx.allsum([st.cross_node_pairs.item(), st.tokens_per_expert.sum().item(), tr.inter_bytes,
                          tr.intra_bytes])
        return {"ms": ms, "cross_node_share": tot[0] / max(tot[1], 1), "inter_node_MiB": tot[2] / 2**20,
                "intra_node_MiB": tot[3] / 2**20, "max_over_mean_load": (load.max() / load.mean()).item(),
                "rank_max_over_mean_rows": rank_imbalance(load, ctx.world), "overlap": overlap,
                "inter_bytes_per_rank": {"dispatch": per_rank(ctx, tr.dispatch_inter_bytes),
                                         "combine": per_rank(ctx, tr.combine_inter_bytes)}}
    raise ValueError(f"unknown system {name}")


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    args = parse()
    ctx = Ctx(args)
    if args.systems is None:
        # the one-node systems right after the LocMoE rows, so the table lists them together
        args.systems = ["locmoe", *(ONE_NODE_SYSTEMS if ctx.nodes == 1 else ()), *DEFAULT_SYSTEMS[1:]]
    if ctx.acc.is_cpu:
        from locmoe_plugin.demo import cpu_shims  # Megatron's CUDA calls on CPU (never on a GPU)

        cpu_shims.install()
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from megatron.core import __version__ as mcore_version
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(expert_model_parallel_size=ctx.world)
    from locmoe_plugin.demo.corpus import load_corpus

    corpus = load_corpus(args.corpus)
    ctx.log(f"bench_layer: {ctx.world} ranks as {ctx.nodes} node(s) x {ctx.gpn}, backend {ctx.acc.backend}, "
            f"megatron-core {mcore_version}, torch {torch.__version__}; corpus {corpus.source}: "
            f"{corpus.train.numel() / 1e6:.1f} MB train, {corpus.val.numel() / 1e6:.2f} MB val")

    # phase 1: training
    trained, ablations = {}, []
    if len(args.mu) not in (1, len(args.gates)):
        raise SystemExit(f"--mu takes one value or one per gate ({len(args.gates)})")
    mus = dict(zip(args.gates, args.mu * len(args.gates) if len(args.mu) == 1 else args.mu))
    for gate in args.gates:
        ctx.log(f"training: gate {gate}, mu {mus[gate]}, sync {args.sync}")
        model, summary = train(ctx, corpus, gate, mus[gate], args.sync, f"{gate}/mu={mus[gate]}/{args.sync}")
        trained[gate] = {"model": model, "summary": summary,
                         "state": {k: (v.detach().clone() if torch.is_tensor(v) else v)
                                   for k, v in model.moe.state_dict().items()}}
    if args.baseline_router == "trained" and any(not s.startswith("locmoe") for s in args.systems):
        ctx.log("training: megatron-core TopKRouter + aux loss (baselines), sync " + args.sync)
        model, summary = train(ctx, corpus, "topk", 0.0, args.sync, f"topk/mu=0/{args.sync}")
        trained["topk"] = {"model": model, "summary": summary,
                           "state": {k: (v.detach().clone() if torch.is_tensor(v) else v)
                                     for k, v in model.moe.state_dict().items()}}
    for ab in args.ablations:
        gate = args.gates[0]
        mu = 0.0 if ab == "mu0" else mus[gate]
        sync = "node" if ab == "node" else args.sync
        bias = ab not in ("nobias", "node")
        ctx.log(f"ablation (train only): gate {gate}, mu {mu}, sync {sync}, locality bias {bias and mu > 0}")
        m, summary = train(ctx, corpus, gate, mu, sync, f"{gate}/mu={mu}/{sync}/bias={bias and mu > 0}", bias)
        ablations.append(summary)
        del m

    # held-out hidden states (validation windows) from the first gate's model; other gates' models
    # give their own (each LocMoE row is timed on its own model's hidden states)
    tgen = torch.Generator().manual_seed(args.seed + 99 + 1000 * ctx.rank)
    batch = max(1, args.tokens // args.seq)
    vt, _ = corpus_batch(corpus.val, batch, args.seq, tgen, ctx.dev)
    hidden = {}
    with torch.no_grad():
        for gate, tr in trained.items():
            hidden[gate] = tr["model"].pre_moe(vt)[1].to(ctx.dtype)
    for tr in trained.values():
        del tr["model"]
    if not ctx.acc.is_cpu:
        torch.cuda.empty_cache()
    g = torch.Generator().manual_seed(args.seed + 3 + ctx.rank)
    cot = torch.randn(hidden[args.gates[0]].shape, generator=g).to(ctx.dev, ctx.dtype)

    # phase 2: timing, with the links probed before it and after every timing round (link_probe.py)
    results = {}
    elt = torch.empty((), dtype=ctx.dtype).element_size()
    ctx.link_probe = LinkProbe(ctx, args.bw_mib or layer_probe_mib(batch * args.seq, args.hidden, elt))
    take_sample(ctx, "before timing")
    ctx.bw_inter = bw_used = ctx.link_probe.inter_bandwidth_Bps()  # the LocMoE floors' rate while building
    ctx.log(f"link probe ({ctx.link_probe.mib:g} MiB per peer): " + format_links(ctx.link_probe))
    ctx.log(f"timing: {batch * args.seq} tokens/rank, hidden {args.hidden}, ffn {args.ffn}, {args.experts} experts, "
            f"top-{args.topk}, {args.dtype}; fwd+bwd median of {args.iters} after {args.warmup}, max over ranks")
    run_systems(ctx, trained, hidden, cot, results)
    if args.rounds <= 1:
        take_sample(ctx, "after timing")
    ctx.bw_inter = ctx.link_probe.inter_bandwidth_Bps()
    rescale_floors(results, bw_used, ctx.bw_inter)
    link = ctx.link_probe.summary("inter_node")
    ctx.log("link probe, median of every sample: " + format_links(ctx.link_probe))

    meta = {"ranks": ctx.world, "nodes": ctx.nodes, "gpus_per_node": ctx.gpn, "tokens_per_rank": batch * args.seq,
            "hidden": args.hidden, "ffn": args.ffn, "experts": args.experts, "topk": args.topk, "dtype": args.dtype,
            "iters": args.iters, "warmup": args.warmup, "rounds": args.rounds, "megatron_core": mcore_version, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if not ctx.acc.is_cpu else "cpu",
            "date": time.strftime("%Y-%m-%d"), "commit": os.environ.get("LOCMOE_COMMIT", "unknown"),
            "inter_node_bw_GBps": ctx.bw_inter / 1e9, "inter_node_link": link,
            "intra_node_link": ctx.link_probe.summary("intra_node"), "mu": mus, "sync": args.sync,
            "train_steps": args.train_steps, "ds_capacity_factor": args.ds_capacity_factor,
            "aux_scope": args.aux_scope, "expert_bias_rate": args.expert_bias_rate, "budget": args.budget,
            "budget_mechanism": _budget_mechanism(args), "budget_warmup": _budget_warmup(args), "dispatch_format": args.dispatch_format, "seed": args.seed, "eval_seed": args.eval_seed, "eval_batches": args.eval_batches, "lr_schedule": args.lr_schedule}
    try:
        import deepspeed

        meta["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001
        pass
    out = {"meta": meta, "training": [t["summary"] for t in trained.values()], "ablations": ablations,
           "systems": results}
    if ctx.rank == 0:
        print_table(out)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)
        if args.calibration:
            from locmoe_plugin.projection import write_calibration

            write_calibration(args.calibration, out)
    dist.barrier()
    dist.destroy_process_group()


def print_table(out: dict) -> None:
    m = out["meta"]
    print(f"\n== {m['ranks']} ranks as {m['nodes']} node(s) x {m['gpus_per_node']}, {m['device']}, "
          f"{m['tokens_per_rank']} tokens/rank, d {m['hidden']}, ffn {m['ffn']}, E {m['experts']}, top-{m['topk']}, "
          f"{m['dtype']}; inter-node bw {m['inter_node_bw_GBps']:.2f} GB/s per rank"
          + (f" (median of {len(m['inter_node_link']['samples'])} probes)" if (m.get("inter_node_link") or {}).get("samples") else "")
          + (f"; {m['rounds']} interleaved rounds (ms: median over rounds; x a2a: median of per-round ratios)"
             if m.get("rounds", 1) > 1 else ""))
    for t in out["training"] + out["ablations"]:
        print(f"trained {t['tag']}: LM loss {t['lm_loss_first10']:.3f} -> {t['lm_loss_last10']:.3f} "
              f"(val {t['val_lm_loss']:.3f}) in {t['steps']} steps, cross-node share {t['cross_node_share_last10']:.3f} "
              f"(val {t['val_cross_node_share']:.3f}), {t['train_seconds']:.1f} s")
    base = out["systems"].get("mcore_alltoall", {}).get("ms")
    print(f"{'system':<22} {'ms':>8} {'x a2a':>6} {'cross':>6} {'inter MiB':>10} {'load max/mean':>13} "
          f"{'rank rows':>9} {'floor ms':>9} {'(inter+intra+gemm)':>22}")
    for name, r in out["systems"].items():
        if "error" in r:
            print(f"{name:<22} ERROR {r['error'][:100]}")
            continue
        ratio = r.get("ratio_median", r["ms"] / base if base else float("nan"))
        fl = (f"{r['floor_ms']:>9.2f} {r['floor_inter_ms']:>7.2f}+{r['floor_intra_ms']:.2f}+{r['floor_gemm_ms']:.2f}"
              if "floor_ms" in r else f"{'':>9} {'gemm':>7} {r['floor_gemm_ms']:.2f}" if "floor_gemm_ms" in r else "")
        print(f"{name:<22} {r['ms']:>8.2f} {ratio:>6.2f} {r.get('cross_node_share', float('nan')):>6.3f} "
              f"{r.get('inter_node_MiB', float('nan')):>10.1f} {r.get('max_over_mean_load', float('nan')):>13.2f} "
              f"{r.get('rank_max_over_mean_rows', float('nan')):>9.3f} {fl}")
    for line in comparisons(out) + host_lines(out):
        print(line)


def host_lines(out: dict) -> list[str]:
    """Per system timed in rounds: the host's time in the step's forward and backward calls (medians over
    rounds of each round's median, max over ranks; see ``layer_setup.host_calls_of``) and the rest of the
    step's wall time, which the device still needed after the host was done."""
    rows = {k: v for k, v in out["systems"].items() if "host_ms_rounds" in v}
    if not rows:
        return []
    lines = [f"host: {'system':<26} {'wall ms':>8} {'forward call':>12} {'backward call':>13} {'device tail':>11}"]
    for name, r in rows.items():
        f = statistics.median(h[0] for h in r["host_ms_rounds"])
        b = statistics.median(h[1] for h in r["host_ms_rounds"])
        tail = statistics.median(w - h[0] - h[1] for w, h in zip(r["ms_rounds"], r["host_ms_rounds"]))
        lines.append(f"host: {name:<26} {r['ms']:>8.2f} {f:>12.2f} {b:>13.2f} {tail:>11.2f}")
    return lines


def _median_ratio(r: dict, other: dict) -> float:
    """``r``'s time over ``other``'s: the median of the per-round ratios with --rounds, else of the medians."""
    if "ms_rounds" in r and "ms_rounds" in other:
        return statistics.median(x / y for x, y in zip(r["ms_rounds"], other["ms_rounds"]))
    return r["ms"] / other["ms"]


def _quartiles(r: dict, other: dict) -> str:
    """`` [per-round ratios: quartiles q1-q3]`` of ``r`` over ``other`` with --rounds, else ``""``."""
    if "ms_rounds" not in r or "ms_rounds" not in other or len(r["ms_rounds"]) < 2:
        return ""
    q = statistics.quantiles([x / y for x, y in zip(r["ms_rounds"], other["ms_rounds"])], n=4)
    return f" [per-round ratios: quartiles {q[0]:.3f}-{q[2]:.3f}]"


def comparisons(out: dict) -> list[str]:
    """Each LocMoE row's time relative to the other systems (median of per-round ratios with --rounds;
    below 1 = faster) and, over several nodes, its cross-node share of kept (token, expert) pairs."""
    sy = {k: v for k, v in out["systems"].items() if "ms" in v}
    a2a = sy.get("mcore_alltoall", {}).get("ms")
    first_gate = next(iter(out["meta"].get("mu") or {}), None)  # --gates' first (mu is recorded per gate)
    lines = []
    for name in [k for k in sy if k.startswith("locmoe_") and not k.startswith("locmoe_ds")]:
        r = sy[name]
        if not a2a:
            break
        ratio = r.get("ratio_median", r["ms"] / a2a)  # with --rounds: the median of the per-round ratios
        checks = [f"{name} / mcore_alltoall = {ratio:.3f}"]
        if "ratio_quartiles" in r:
            q1, q3 = r["ratio_quartiles"]
            checks[0] += f" [per-round ratios: quartiles {q1:.3f}-{q3:.3f} over {len(r['ratio_rounds'])} rounds]"
        for other in ("mcore_allgather", "mcore_alltoall_grouped", "mcore_allgather_grouped"):
            if other in sy:
                checks.append(f"{name} / {other} = {_median_ratio(r, sy[other]):.3f}" + _quartiles(r, sy[other]))
        for variant in ("locmoe_unfolded", "locmoe_overlap"):  # the same gate's layer: fold off / overlap on
            if variant in sy and name == f"locmoe_{first_gate}":
                checks.append(f"{name} / {variant} = {_median_ratio(r, sy[variant]):.3f}" + _quartiles(r, sy[variant]))
        if name == "locmoe_allgather" and "locmoe_allgather_counted" in sy:
            other = sy["locmoe_allgather_counted"]
            checks.append(f"{name} / locmoe_allgather_counted = {_median_ratio(r, other):.3f}" + _quartiles(r, other))
        if out["meta"]["nodes"] > 1:
            for other in ("mcore_grouplimited", "deepspeed_moe"):
                if other in sy:
                    checks.append(f"{name} / {other} = {_median_ratio(r, sy[other]):.3f}")
            checks.append(f"{name} cross-node share = {r['cross_node_share']:.3f}")
        lines += ["compare: " + c for c in checks]
    if "locmoe_ds" in sy:  # our DeepSpeed layer: grouped experts against its expert modules, and DeepSpeed's MoE
        for other in ("locmoe_ds_modules", "deepspeed_moe"):
            if other in sy:
                lines.append(f"compare: locmoe_ds / {other} = {_median_ratio(sy['locmoe_ds'], sy[other]):.3f}"
                             + _quartiles(sy["locmoe_ds"], sy[other]))
    return lines

if __name__ == "__main__":
    main()
