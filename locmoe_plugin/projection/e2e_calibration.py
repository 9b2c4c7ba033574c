"""A projection calibration from the end-to-end benchmark's results (``benchmarks/bench_e2e.py``).

One layout's results (every system's ``e2e_<layout>_<system>.json`` of one folder, the plain variants:
``variant == system``) give, through the profiling step's synchronised phase times (rank 0's;
``breakdown_ms``, forward + backward, summed over the model's layers, divided by the layer count):

* expert GEMM rate: the model's expert FLOPs for ``s k`` rows (``s`` = tokens per rank per step, the
  profiling step's whole batch) over the ``experts`` phase, the fastest of LocMoE's dropless rows
  (``locmoe``, ``locmoe_topk``; they run the shipped grouped experts where the run asked for them). The
  phase is rank 0's and ``s k`` the mean rank's rows: the rate is off by rank 0's load against the mean
  (a short run's busiest rank holds 1.5-1.9 x the mean rows; the run records the busiest, not rank 0's).
  The layer benchmark's calibration, which knows the busiest rank's rows and time, is the sharper one.
* intra- and inter-node links: each run's ``locmoe bandwidth`` figures: the rail all-to-all as
  ``bandwidth_GBps`` and, where measured, the all-peers all-to-all as ``flat_GBps``; the calibration
  carries those of a LocMoE row, else of a Megatron row (DeepSpeed runs in a launch of its own, on a link
  measured apart). Latencies are 0: the fixed costs hold them.
* fixed costs: each system's whole MoE time per layer (``router + dispatch + experts + combine``; DeepSpeed's
  split of its layer puts part of its all-to-all in "experts") less the model's GEMM and payload terms at
  its own run's link (floored at 0): what a layer spends on neither expert GEMMs at the calibrated rate nor
  payload (router, permutes, plan, host waits, slower experts). One node: ``fixed_ms`` (and with
  ``two_stage_ms``, ``fixed_ms_multi_node["locmoe"]`` = LocMoE's + ``two_stage_ms``, as for the layer
  benchmark); across nodes: ``fixed_ms_multi_node``. A pairs all-to-all (Megatron, DeepSpeed) across
  nodes is priced at the all-peers rate, so where a run did not measure it (results before the figure
  existed) those systems' costs across nodes are left out rather than priced at the rail's rate.
  LocMoE+ is left out: it drops pairs by design, so its rows are not ``s k``. The routing is priced at the
  mean rank's (imbalance 1), as rank 0's phases are timed.

The profiling step synchronises at every phase boundary, so its phases carry their host launch time whole:
the fixed costs are what a layer costs when nothing hides its host work. Attention, the dense part's
gradients and the optimizer are not part of a calibration: the model prices attention at the expert GEMM
rate and the dense gradients from the link (:mod:`.cost`).
"""

from __future__ import annotations

from ..config import ConfigError
from .calibration import Calibration

#: bench_e2e system -> calibration key (the first present of LocMoE's systems, in this order, sets "locmoe")
E2E_SYSTEMS = {"mcore_alltoall": "megatron_alltoall", "mcore_grouplimited": "megatron_group_limited",
               "deepspeed_moe": "deepspeed_moe", "locmoe": "locmoe", "locmoe_topk": "locmoe"}
LOCMOE_ROWS = ("locmoe", "locmoe_topk")
#: systems whose transfer is a pairs all-to-all (every remote rank a peer)
PAIRS_SYSTEMS = ("mcore_alltoall", "mcore_grouplimited", "deepspeed_moe")
MOE_PHASES = ("router", "dispatch", "experts", "combine")


def calibrated_rows(rows: list[dict]) -> list[dict]:
    """The results a calibration reads: plain variants (``variant == system``) of :data:`E2E_SYSTEMS`."""
    return [r for r in rows if r.get("variant", r["system"]) == r["system"] and r["system"] in E2E_SYSTEMS]


def _per_layer(row: dict, phases) -> float:
    b, layers = row["breakdown_ms"], row["model"]["num_layers"]
    return sum(b["forward"].get(p, 0.0) + b["backward"].get(p, 0.0) for p in phases) / layers


def _links(row: dict) -> tuple[dict | None, dict | None]:
    """(intra-node, inter-node) calibration links of one run's bandwidth check (None where absent)."""
    bw = row["bandwidth"]
    intra = {"bandwidth_GBps": bw["intra_node_gbps"], "latency_us": 0.0} if bw.get("intra_node_gbps") else None
    inter = None
    if row["nodes"] > 1 and bw.get("inter_node_gbps"):
        inter = {"bandwidth_GBps": bw["inter_node_gbps"], "latency_us": 0.0}
        if bw.get("inter_node_all_peers_gbps"):
            inter["flat_GBps"] = bw["inter_node_all_peers_gbps"]
    return intra, inter


def calibration_from_e2e_results(rows: list[dict], two_stage_ms: float | None = None) -> Calibration:
    """The calibration of one layout's end-to-end results (see the module docstring). ``rows``: result
    dicts as ``bench_e2e.py`` writes them, one layout; variants other than the plain system are skipped."""
    from .cluster import ClusterSpec
    from .cost import predict_layer
    from .workload import ModelSpec, RoutingSpec

    rows = calibrated_rows(rows)
    layouts = {r["layout"] for r in rows}
    if len(layouts) != 1:
        raise ConfigError(f"an end-to-end calibration takes one layout's results, got {sorted(layouts) or 'none'}: "
                          "pass the rows of one layout (benchmarks/e2e_report.py --calibration writes one per layout)")
    by_system = {r["system"]: r for r in rows}
    main = next(by_system[n] for n in (*LOCMOE_ROWS, "mcore_alltoall", "mcore_grouplimited", "deepspeed_moe")
                if n in by_system)
    m, world, nodes = main["model"], main["world"], main["nodes"]
    s = main["tokens_per_step"] // world
    model = ModelSpec(hidden=m["hidden_size"], ffn=m["ffn_hidden_size"], experts=m["num_experts"], topk=m["topk"],
                      tokens_per_rank=s, dtype=m["dtype"], swiglu=False, layers=m["num_layers"], seq=m["seq_len"])
    rates = [model.expert_flops_per_row * s * model.topk / (_per_layer(r, ("experts",)) * 1e9)
             for r in rows if r["system"] in LOCMOE_ROWS and _per_layer(r, ("experts",)) > 0]
    tflops = max(rates) if rates else None
    fixed, left_out = {}, []
    for name, key in E2E_SYSTEMS.items():
        r = by_system.get(name)
        if r is None or key in fixed:
            continue
        intra, inter = _links(r)
        if nodes > 1 and name in PAIRS_SYSTEMS and not (inter and "flat_GBps" in inter):
            left_out.append(name)
            continue
        cal = Calibration(expert_gemm_tflops=tflops, intra_node=intra, inter_node=inter)
        cluster = ClusterSpec(nodes=nodes, gpus_per_node=r["gpus_per_node"], intra_bw_GBps=200.0, intra_latency_us=0.0,
                              inter_bw_GBps=1.0, inter_latency_us=0.0, peak_tflops=(tflops or 300.0) / 0.6)
        routing = RoutingSpec(cross_node_share=min(1.0, r.get("cross_node_share") or 0.0))
        t = predict_layer({"locmoe": "locmoe_hier"}.get(key, key), cluster, model, routing, cal)
        fixed[key] = max(0.0, _per_layer(r, MOE_PHASES) - t.gemm_ms - t.comm_ms)
    src = {"benchmark": "bench_e2e", "layout": main["layout"], "nodes": nodes, "gpus_per_node": main["gpus_per_node"],
           "commit": main.get("commit"), "device": main.get("device"), "date": main.get("date"),
           "systems": sorted(by_system)}
    if left_out:
        src["left_out_without_all_peers_rate"] = left_out
    multi_fixed = fixed if nodes > 1 else {}
    if nodes == 1 and two_stage_ms is not None and "locmoe" in fixed:
        multi_fixed = {"locmoe": fixed["locmoe"] + two_stage_ms}
        src["two_stage_extra_ms"] = two_stage_ms
    intra, inter = _links(main)
    return Calibration(expert_gemm_tflops=tflops, intra_node=intra, inter_node=inter,
                       fixed_ms={} if nodes > 1 else fixed, fixed_ms_multi_node=multi_fixed, source=src)
