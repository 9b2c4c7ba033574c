"""A projection calibration from the end-to-end benchmark's results (``benchmarks/bench_e2e.py``).

One layout's results (every system's ``e2e_<layout>_<system>.json`` of one folder, the plain variants:
``variant == system``) give, through the profiling step's synchronised phase times (rank 0's;
``breakdown_ms``, forward + backward, summed over the model's layers, divided by the layer count):

* expert GEMM rate: the model's expert FLOPs for ``s k`` rows (``s`` = tokens per rank per step, the
  profiling step's whole batch) over the ``experts`` phase, the fastest of LocMoE's rows (``locmoe``,
  ``locmoe_topk``, ``locmoe_plus``; they run the shipped grouped experts where the run asked for them), as
  the layer benchmark's calibration does. Rank 0's rows stand for the mean rank's: the routing's imbalance
  over the measured steps is recorded beside the result, not per phase.
* intra- and inter-node links: the run's ``locmoe bandwidth`` figures: the rail all-to-all as
  ``bandwidth_GBps`` and, where measured, the all-peers all-to-all as ``flat_GBps``.
* fixed costs: each system's ``router + dispatch + combine`` phases per layer less the model's payload
  time for that layout and routing (floored at 0): what a layer spends on neither expert GEMMs nor
  payload (router, permutes, plan, host waits). One node: ``fixed_ms`` (and with ``two_stage_ms``,
  ``fixed_ms_multi_node["locmoe"]`` = LocMoE's + ``two_stage_ms``, as for the layer benchmark);
  across nodes: ``fixed_ms_multi_node``.

Attention, the dense part's gradients and the optimizer are not part of a calibration: the model prices
attention at the expert GEMM rate and the dense gradients from the link (:mod:`.cost`).
"""

from __future__ import annotations

from ..config import ConfigError
from .calibration import Calibration

#: bench_e2e system -> calibration key (the first present of LocMoE's systems, in this order, sets "locmoe")
E2E_SYSTEMS = {"mcore_alltoall": "megatron_alltoall", "mcore_grouplimited": "megatron_group_limited",
               "deepspeed_moe": "deepspeed_moe", "locmoe": "locmoe", "locmoe_topk": "locmoe", "locmoe_plus": "locmoe"}
LOCMOE_ROWS = ("locmoe", "locmoe_topk", "locmoe_plus")
MOE_PHASES = ("router", "dispatch", "combine")


def _per_layer(row: dict, phases) -> float:
    b, layers = row["breakdown_ms"], row["model"]["num_layers"]
    return sum(b["forward"].get(p, 0.0) + b["backward"].get(p, 0.0) for p in phases) / layers


def calibration_from_e2e_results(rows: list[dict], two_stage_ms: float | None = None) -> Calibration:
    """The calibration of one layout's end-to-end results (see the module docstring). ``rows``: result
    dicts as ``bench_e2e.py`` writes them, one layout; variants other than the plain system are skipped."""
    from .cluster import ClusterSpec
    from .cost import predict_layer
    from .workload import ModelSpec, RoutingSpec

    rows = [r for r in rows if r.get("variant", r["system"]) == r["system"] and r["system"] in E2E_SYSTEMS]
    layouts = {r["layout"] for r in rows}
    if len(layouts) != 1:
        raise ConfigError(f"an end-to-end calibration takes one layout's results, got {sorted(layouts) or 'none'}: "
                          "pass the rows of one layout (benchmarks/e2e_report.py --calibration writes one per layout)")
    first = rows[0]
    m, world, nodes = first["model"], first["world"], first["nodes"]
    s = first["tokens_per_step"] // world
    model = ModelSpec(hidden=m["hidden_size"], ffn=m["ffn_hidden_size"], experts=m["num_experts"], topk=m["topk"],
                      tokens_per_rank=s, dtype=m["dtype"], swiglu=False, layers=m["num_layers"], seq=m["seq_len"])
    rates = [model.expert_flops_per_row * s * model.topk / (_per_layer(r, ("experts",)) * 1e9)
             for r in rows if r["system"] in LOCMOE_ROWS and _per_layer(r, ("experts",)) > 0]
    tflops = max(rates) if rates else None
    bw = first["bandwidth"]
    intra = bw.get("intra_node_gbps")
    inter = None
    if nodes > 1 and bw.get("inter_node_gbps"):
        inter = {"bandwidth_GBps": bw["inter_node_gbps"]}
        if bw.get("inter_node_all_peers_gbps"):
            inter["flat_GBps"] = bw["inter_node_all_peers_gbps"]
    intra_node = {"bandwidth_GBps": intra, "latency_us": 0.0} if intra else None
    cal = Calibration(expert_gemm_tflops=tflops, intra_node=intra_node, inter_node=inter)
    cluster = ClusterSpec(nodes=nodes, gpus_per_node=first["gpus_per_node"], intra_bw_GBps=intra or 200.0,
                          intra_latency_us=0.0, inter_bw_GBps=(inter or {}).get("bandwidth_GBps", 1.0),
                          inter_latency_us=0.0, peak_tflops=(tflops or 300.0) / 0.6)
    fixed = {}
    by_system = {r["system"]: r for r in rows}
    for name, key in E2E_SYSTEMS.items():
        r = by_system.get(name)
        if r is None or key in fixed:
            continue
        routing = RoutingSpec(cross_node_share=min(1.0, r.get("cross_node_share") or 0.0))
        system = {"locmoe": "locmoe_hier"}.get(key, key)
        t = predict_layer(system, cluster, model, routing, cal)
        fixed[key] = max(0.0, _per_layer(r, MOE_PHASES) - t.comm_ms)
    src = {"benchmark": "bench_e2e", "layout": first["layout"], "nodes": nodes, "gpus_per_node": first["gpus_per_node"],
           "commit": first.get("commit"), "device": first.get("device"), "date": first.get("date"),
           "systems": sorted(by_system)}
    multi_fixed = fixed if nodes > 1 else {}
    if nodes == 1 and two_stage_ms is not None and "locmoe" in fixed:
        multi_fixed = {"locmoe": fixed["locmoe"] + two_stage_ms}
        src["two_stage_extra_ms"] = two_stage_ms
    return Calibration(expert_gemm_tflops=tflops, intra_node=intra_node, inter_node=inter,
                       fixed_ms={} if nodes > 1 else fixed, fixed_ms_multi_node=multi_fixed, source=src)
