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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from locmoe_plugin.projection import ClusterSpec, ModelSpec, RoutingSpec, predict_layer  # noqa: E402
from locmoe_plugin.projection.calibration import calibration_from_layer_results  # noqa: E402

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
    """The busiest rank's cross-node bytes over the mean rank's, from the recorded floor (floor_inter_ms =
    2 x busiest rank's forward bytes / bw); 1 where not recorded or nothing crosses."""
    mean = v.get("inter_node_MiB", 0.0) * 2**20 / ranks
    if "floor_inter_ms" not in v or mean <= 0:
        return max(1.0, v.get("rank_max_over_mean_rows", 1.0))
    busiest = v["floor_inter_ms"] / 1e3 * bw_GBps * 1e9 / 2
    return max(1.0, busiest / mean)


def validate(root: str) -> list[dict]:
    rows = []
    for one_path in sorted(glob.glob(os.path.join(root, "**", "layer_1node_4gpu.json"), recursive=True)):
        run_dir = os.path.dirname(one_path)
        with open(one_path) as f:
            one = json.load(f)
        two = two_node_results(run_dir, one)
        if two is None:
            continue
        m2 = two["meta"]
        bw = m2["inter_node_bw_GBps"]
        cal = calibration_from_layer_results(one, inter_bw_GBps=bw)
        m = one["meta"]
        model = ModelSpec(hidden=m["hidden"], ffn=m["ffn"], experts=m["experts"], topk=m["topk"],
                          tokens_per_rank=m["tokens_per_rank"], dtype=m["dtype"], swiglu=False)
        cluster = ClusterSpec(nodes=2, gpus_per_node=2, intra_bw_GBps=200.0, intra_latency_us=0.0,
                              inter_bw_GBps=bw, inter_latency_us=0.0, peak_tflops=1000.0)
        for name, system in SYSTEMS.items():
            v = two["systems"].get(name)
            if v is None or name not in one["systems"]:
                continue
            imb = busiest_inter_ratio(v, bw, m2["ranks"]) if name.startswith("locmoe") else \
                max(1.0, v.get("rank_max_over_mean_rows", 1.0))
            for label, u in (("with imbalance", imb), ("balanced", 1.0)):
                routing = RoutingSpec(cross_node_share=min(1.0, v["cross_node_share"]), imbalance=u, chunks=1)
                if name.startswith("locmoe") and name != "locmoe_grap":
                    # the calibration's "locmoe" fixed cost is the GrAP row's; this row has its own
                    cal_row = calibration_from_layer_results({"meta": m, "systems": {name: one["systems"][name]}},
                                                             inter_bw_GBps=bw)
                    cal_row = type(cal)(**{**cal.__dict__, "fixed_ms": {**cal.fixed_ms, **cal_row.fixed_ms}})
                else:
                    cal_row = cal
                t = predict_layer(system, cluster, model, routing, cal_row)
                rows.append({"run": os.path.relpath(run_dir, root), "commit": m2.get("commit") or m.get("commit"),
                             "system": name, "share": v["cross_node_share"], "imbalance": u, "variant": label,
                             "link_GBps": bw, "one_node_ms": one["systems"][name]["ms"], "measured_ms": v["ms"],
                             "predicted_ms": t.layer_ms, "error": t.layer_ms / v["ms"] - 1})
                if u == 1.0:
                    break
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
    print(f"{'run':<44} {'system':<15} {'share':>5} {'imbal':>5} {'link GB/s':>9} {'1-node ms':>9} "
          f"{'measured':>9} {'predicted':>9} {'error':>7}")
    for r in rows:
        print(f"{r['run']:<44} {r['system']:<15} {r['share']:>5.3f} {r['imbalance']:>5.2f} {r['link_GBps']:>9.2f} "
              f"{r['one_node_ms']:>9.2f} {r['measured_ms']:>9.2f} {r['predicted_ms']:>9.2f} {100 * r['error']:>+6.1f}%")
    main_rows = [r for r in rows if r["variant"] == "with imbalance"]
    errs = [abs(r["error"]) for r in main_rows]
    print(f"mean |error| {100 * sum(errs) / len(errs):.1f} %, max {100 * max(errs):.1f} % over {len(errs)} "
          f"predictions (first row of each system)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
