"""``locmoe project``: arguments and the run."""

from __future__ import annotations

import argparse
import json

from .calibration import load_calibration
from .cluster import PRESETS, preset, ClusterSpec
from .cost import predict
from .report import as_json, plot, sweep_table, table
from .workload import DISPATCH_FORMATS, ModelSpec, RoutingSpec

SWEEP_NODES = (2, 4, 8, 16, 32, 64, 128)


def add_arguments(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("cluster (a preset, or every figure)")
    c.add_argument("--preset", choices=sorted(PRESETS), default=None, help="h100 / h200: 8 GPUs, NVLink, "
                   "8 x 400 Gb/s NICs per node; ascend910b: 8 NPUs, HCCS, 8 x 200GE RoCE")
    c.add_argument("--nodes", type=int, default=2)
    c.add_argument("--gpus-per-node", type=int, default=None)
    c.add_argument("--intra-bw", type=float, default=None, help="GB/s per GPU per direction inside a node")
    c.add_argument("--intra-latency-us", type=float, default=None)
    c.add_argument("--inter-bw", type=float, default=None, help="GB/s per GPU per direction across nodes")
    c.add_argument("--inter-latency-us", type=float, default=None)
    c.add_argument("--inter-duplex", choices=("full", "shared"), default=None,
                   help="full: NICs send and receive at full rate at once (default); shared: one budget for both "
                        "directions (socket links)")
    c.add_argument("--inter-one-way-bw", type=float, default=None,
                   help="GB/s one direction reaches while the other is idle, between --inter-bw (full duplex) and 2 x "
                        "it (shared); overrides --inter-duplex (a calibration's probe gives it)")
    c.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak per GPU")
    c.add_argument("--gemm-efficiency", type=float, default=None, help="achieved share of the peak (default 0.6)")
    m = p.add_argument_group("model")
    m.add_argument("--hidden", type=int, default=4096)
    m.add_argument("--ffn", type=int, default=1408, help="one expert's FFN width")
    m.add_argument("--experts", type=int, default=64)
    m.add_argument("--topk", type=int, default=8)
    m.add_argument("--tokens-per-rank", type=int, default=8192)
    m.add_argument("--layers", type=int, default=24)
    m.add_argument("--seq", type=int, default=4096)
    m.add_argument("--dtype", default="bf16")
    m.add_argument("--gelu", action="store_true", help="2-matrix GELU experts (default: SwiGLU, 3 matrices)")
    m.add_argument("--grad-dtype", default="fp32",
                   help="dtype of the dense gradients' all-reduce: fp32 (Megatron-LM's default for bf16 training) "
                        "or bf16 (--grad-reduce-in-bf16)")
    m.add_argument("--optimizer", default="replicated",
                   help="how the dense parameters are stepped: replicated (default; gradients all-reduced) or "
                        "distributed (Megatron-LM's --use-distributed-optimizer: gradients reduce-scattered, "
                        "parameters all-gathered in --dtype)")
    m.add_argument("--dispatch-format", default="native",
                   help=f"LocMoE's rows in the dispatch direction across nodes (its flat, hierarchical and overlapped systems), one of "
                        f"{', '.join(DISPATCH_FORMATS)}: native, or fp8 / int8 "
                        "codes with an fp32 scale per 128 features (--locmoe-dispatch-format; the encoding's own "
                        "time is not priced)")
    r = p.add_argument_group("routing")
    r.add_argument("--cross-node-share", type=float, default=None,
                   help="LocMoE's share of pairs crossing nodes (measured, or the budget it is held to). Default: "
                        "LocMoE's default budget at each node count (0.2 on 2 nodes, 0.3 on 4, towards 0.4)")
    r.add_argument("--pairs-per-copy", type=float, default=None,
                   help="for a router that puts a token's remote pairs on one other node (--locmoe-budget-mechanism "
                        "node): its pairs per inter-node copy (cross-node pairs / inter-node rows, from the traffic "
                        "counter; measured 2.49 for the node price at share 0.285, top-4, 2 nodes x 2: "
                        "docs/projection.md). Default: the pairs spread as the share implies")
    r.add_argument("--imbalance", type=float, default=1.0, help="busiest rank's rows / mean (>= 1)")
    r.add_argument("--inter-imbalance", type=float, default=None,
                   help="busiest rank's cross-node bytes / mean (>= 1; default: --imbalance)")
    r.add_argument("--group-nodes", type=int, default=None, help="nodes per token under group-limited routing")
    r.add_argument("--capacity-factor", type=float, default=1.25, help="DeepSpeed MoE's capacity factor")
    o = p.add_argument_group("output")
    o.add_argument("--calibration", default=None, help="JSON from benchmarks/bench_layer.py --calibration or "
                   "benchmarks/e2e_report.py --calibration")
    o.add_argument("--png", default=None, help="write the speedup-vs-nodes plot here")
    o.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _cluster(a, nodes: int) -> ClusterSpec:
    over = dict(gpus_per_node=a.gpus_per_node, intra_bw_GBps=a.intra_bw, intra_latency_us=a.intra_latency_us,
                inter_bw_GBps=a.inter_bw, inter_latency_us=a.inter_latency_us, inter_duplex=a.inter_duplex,
                inter_one_way_bw_GBps=a.inter_one_way_bw, peak_tflops=a.peak_tflops,
                gemm_efficiency=a.gemm_efficiency)
    if a.preset:
        return preset(a.preset, nodes, **over)
    missing = [k for k in ("gpus_per_node", "intra_bw", "inter_bw", "peak_tflops") if getattr(a, k) is None]
    if missing:
        raise ValueError(f"no --preset and no {', '.join('--' + k.replace('_', '-') for k in missing)}: give a "
                         f"--preset ({', '.join(sorted(PRESETS))}) or every cluster figure")
    over = {k: v for k, v in over.items() if v is not None}
    over.setdefault("intra_latency_us", 0.0)
    over.setdefault("inter_latency_us", 0.0)
    return ClusterSpec(nodes=nodes, **over)


def _share_text(routing: RoutingSpec) -> str:
    if routing.cross_node_share is not None:
        return f"{routing.cross_node_share:g}"
    return "= the default budget (" + ", ".join(f"{routing.share_on(n):.2f} on {n}" for n in (2, 4, 8)) + " nodes)"


def run(a: argparse.Namespace) -> int:
    cal = load_calibration(a.calibration) if a.calibration else None
    model = ModelSpec(hidden=a.hidden, ffn=a.ffn, experts=a.experts, topk=a.topk, tokens_per_rank=a.tokens_per_rank,
                      layers=a.layers, seq=a.seq, dtype=a.dtype, swiglu=not a.gelu, grad_dtype=a.grad_dtype,
                      optimizer=a.optimizer, dispatch_format=a.dispatch_format)
    routing = RoutingSpec(cross_node_share=a.cross_node_share, pairs_per_copy=a.pairs_per_copy, imbalance=a.imbalance,
                          inter_imbalance=a.inter_imbalance, group_nodes=a.group_nodes,
                          capacity_factor=a.capacity_factor)
    cluster = _cluster(a, a.nodes)
    point = predict(cluster, model, routing, cal)
    sweep = {n: predict(cluster.with_nodes(n), model, routing, cal) for n in SWEEP_NODES}
    inputs = {"cluster": cluster.__dict__, "model": model.__dict__, "routing": routing.__dict__,
              "calibration": cal.to_dict() if cal else None}
    eff = cal.apply(cluster) if cal else cluster
    title = (f"{cluster.name}: {cluster.gpus_per_node} GPUs/node, d {model.hidden}, F {model.ffn}, E {model.experts}, "
             f"top-{model.topk}, {model.tokens_per_rank} tok/rank, LocMoE share {_share_text(routing)}")
    png = plot(sweep, a.png, title) if a.png else None
    if a.json:
        out = as_json(point, sweep, inputs)
        out["png"] = png
        print(json.dumps(out, indent=2, default=str))
        return 0
    ep = next(iter(point.values())).ep_nodes
    print(f"locmoe project: {cluster.nodes} node(s) x {cluster.gpus_per_node} ({cluster.name}; EP group {ep} node(s)), "
          f"intra {eff.intra_bw_GBps:g} GB/s, inter {eff.inter_bw_GBps:g} GB/s per GPU"
          f"{'; calibrated: ' + a.calibration if cal else '; uncalibrated: fixed per-layer costs 0'}")
    print(table(point, f"model: d {model.hidden}, F {model.ffn} ({'SwiGLU' if model.swiglu else 'GELU'}), "
                       f"E {model.experts}, top-{model.topk}, {model.tokens_per_rank} tokens/rank, {model.layers} "
                       f"layers, {model.dtype}, {model.grad_dtype} dense gradients ({model.optimizer} optimizer), LocMoE rows {model.dispatch_format}; LocMoE cross-node share {_share_text(routing)}, imbalance "
                       f"{routing.imbalance}"))
    print()
    print(sweep_table(sweep))
    if a.png:
        print(f"plot: {png}" if png else "plot: matplotlib not installed, no PNG written")
    return 0
