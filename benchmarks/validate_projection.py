"""Check ``locmoe project`` against measured layer runs: predict each 2-emulated-node x 2 run from the
same call's one-node x 4 run (calibration: expert GEMM rate, NVLink bandwidth, fixed per-layer costs)
plus that call's measured inter-node link bandwidth, and print predicted vs measured.

Leave-one-out: nothing measured on the 2-node layout enters the prediction except the link probe
(``inter_node_bw_GBps``) and the routing the run produced (cross-node share; for LocMoE the busiest
rank's cross-node bytes over the mean, recovered from the recorded floor). Usage, from the repo root:

    python benchmarks/validate_projection.py [benchmarks/results] [--json OUT]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from locmoe_plugin.projection import ClusterSpec, ModelSpec, RoutingSpec, predict_layer  # noqa: E402
from locmoe_plugin.projection.calibration import (calibration_from_layer_results, inter_link,  # noqa: E402
                                                   two_stage_extra_ms)

# The emulated nodes' link (launch/emulate_nodes.sh: NCCL's socket transport over loopback) where a run
# did not measure its duplex: every byte sent or received is a copy by the same host, one budget for both
# directions.
EMULATED_DUPLEX = "shared"

SYSTEMS = {"mcore_alltoall": "megatron_alltoall", "locmoe_grap": "locmoe_hier", "locmoe_dense": "locmoe_hier"}


def two_node_results(run_dir: str, one_node: dict) -> dict | None:
    """The run's 2-node result dict: its JSON, or the per-system JSON lines and the link line of its log."""
    path = os.path.join(run_dir, "layer_2nodes_4gpu.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    log = os.path.join(run_dir, "layer_2nodes.log")
    if not os.path.exists(log):
        return None
    systems, bw = {}, None
    for line in open(log):
        m = re.match(r"\s+(\w+): (\{.*\})\s*$", line)
        if m:
            systems[m.group(1)] = json.loads(m.group(2))
        m = re.search(r"inter-node bw ([\d.]+) GB/s per rank", line)
        if m:
            bw = float(m.group(1))
    if not systems or bw is None:
        return None
    meta = dict(one_node["meta"], nodes=2, gpus_per_node=2, inter_node_bw_GBps=bw)
    return {"meta": meta, "systems": systems}


def busiest_inter_ratio(v: dict, bw_GBps: float, ranks: int) -> float:
    """The busiest rank's cross-node bytes sent over the mean rank's: from the per-rank counts
    (``inter_bytes_per_rank["dispatch"]``: what each rank sends in dispatch) where recorded, else from the
    recorded floor (floor_inter_ms = 2 x (max dispatch + max combine bytes) / bw); 1 where neither is
    recorded or nothing crosses."""
    per = v.get("inter_bytes_per_rank")
    if per:
        sent = per["dispatch"]
        mean = sum(sent) / len(sent)
        return max(1.0, max(sent) / mean) if mean > 0 else 1.0
    mean = v.get("inter_node_MiB", 0.0) * 2**20 / ranks
    if "floor_inter_ms" not in v or mean <= 0:
        return 1.0
    busiest = v["floor_inter_ms"] / 1e3 * bw_GBps * 1e9 / 2
    return max(1.0, busiest / mean)


def dispatch_two_stage_ms(root: str, topk: int) -> float | None:
    """The two-stage plan's extra host time on one node from every one-node ``bench_dispatch.py`` JSON
    under ``root`` that has ``hier_tree`` rows (:func:`two_stage_extra_ms`)."""
    res = []
    for path in sorted(glob.glob(os.path.join(root, "**", "dispatch_1node_*.json"), recursive=True)):
        with open(path) as f:
            res.append(json.load(f))
    return two_stage_extra_ms(res, topk)


def row_calibration(one: dict, name: str, bw: float, two_stage: float | None):
    """The one-node calibration with ``name``'s own row setting its fixed cost (the GrAP and dense rows share
    the "locmoe" key and differ in router cost)."""
    return calibration_from_layer_results(one, inter_bw_GBps=bw, two_stage_ms=two_stage, fixed_from=name)


def validate(root: str) -> list[dict]:
    rows = []
    for one_path in sorted(glob.glob(os.path.join(root, "**", "layer_1node_4gpu.json"), recursive=True)):
        run_dir = os.path.dirname(one_path)
        with open(one_path) as f:
            one = json.load(f)
        two = two_node_results(run_dir, one)
        if two is None:
            continue
        m, m2 = one["meta"], two["meta"]
        link = inter_link(m2)
        bw = link["bandwidth_GBps"]
        duplex = link.get("duplex")
        two_stage = dispatch_two_stage_ms(root, m["topk"])
        model = ModelSpec(hidden=m["hidden"], ffn=m["ffn"], experts=m["experts"], topk=m["topk"],
                          tokens_per_rank=m["tokens_per_rank"], dtype=m["dtype"], swiglu=False)
        for name, system in SYSTEMS.items():
            v = two["systems"].get(name)
            if v is None or name not in one["systems"]:
                continue
            cal = row_calibration(one, name, bw, two_stage)
            u_x = busiest_inter_ratio(v, bw, m2["ranks"])
            # rows: only where both layouts record them (old one-node runs fold the busiest rank's rows into
            # the calibrated GEMM rate)
            u = max(1.0, v.get("rank_max_over_mean_rows", 1.0)) if "rank_max_over_mean_rows" in one["systems"][name] else 1.0
            variants = [("model", duplex or EMULATED_DUPLEX)]
            if duplex is None and u_x > 1.05:
                variants.append(("full duplex", "full"))
            for label, dup in variants:
                cluster = ClusterSpec(nodes=m2["nodes"], gpus_per_node=m2["gpus_per_node"], intra_bw_GBps=200.0,
                                      intra_latency_us=0.0, inter_bw_GBps=bw, inter_latency_us=0.0,
                                      peak_tflops=1000.0, inter_duplex=dup)
                cal_v = replace(cal, inter_node={**cal.inter_node, "duplex": dup})
                routing = RoutingSpec(cross_node_share=min(1.0, v["cross_node_share"]), imbalance=u,
                                      inter_imbalance=u_x, chunks=1)
                t = predict_layer(system, cluster, model, routing, cal_v)
                rows.append({"run": os.path.relpath(run_dir, root), "commit": m2.get("commit") or m.get("commit"),
                             "system": name, "share": v["cross_node_share"], "imbalance": u, "inter_imbalance": u_x,
                             "duplex": dup, "variant": label, "link_GBps": bw,
                             "two_stage_ms": two_stage if name.startswith("locmoe") else 0.0,
                             "one_node_ms": one["systems"][name]["ms"], "measured_ms": v["ms"],
                             "predicted_ms": t.layer_ms, "error": t.layer_ms / v["ms"] - 1})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", nargs="?", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    a = p.parse_args()
    rows = validate(a.root)
    if not rows:
        print(f"no run under {a.root} has both layer_1node_4gpu.json and a 2-node result", file=sys.stderr)
        return 1
    print(f"{'run':<46} {'system':<14} {'share':>5} {'x-imb':>5} {'duplex':>6} {'link':>5} {'2-stg':>5} "
          f"{'1-node':>6} {'measured':>8} {'predicted':>9} {'error':>7}")
    for r in rows:
        print(f"{r['run']:<46} {r['system']:<14} {r['share']:>5.3f} {r['inter_imbalance']:>5.2f} {r['duplex']:>6} "
              f"{r['link_GBps']:>5.2f} {r['two_stage_ms'] or 0:>5.2f} {r['one_node_ms']:>6.2f} {r['measured_ms']:>8.2f} "
              f"{r['predicted_ms']:>9.2f} {100 * r['error']:>+6.1f}%")
    main_rows = [r for r in rows if r["variant"] == "model"]
    errs = [abs(r["error"]) for r in main_rows]
    print(f"mean |error| {100 * sum(errs) / len(errs):.1f} %, max {100 * max(errs):.1f} % over {len(errs)} "
          f"predictions (first row of each system; the others: the same with a full-duplex link)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
