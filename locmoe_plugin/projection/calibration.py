"""Measured figures that replace the model's defaults: a small JSON file the benchmarks write.

Schema (``"schema": "locmoe-projection-calibration/1"``; every field but ``schema`` optional)::

    {"schema": "locmoe-projection-calibration/1",
     "source": {"device": ..., "date": ..., "commit": ..., "layout": "1 node x 4", ...},
     "expert_gemm_tflops": 221.0,          # achieved fwd+bwd expert GEMM rate (FLOP count of the model)
     "fixed_ms": {"megatron_alltoall": 4.1, "locmoe": 7.2, ...},   # per layer fwd+bwd, not GEMM nor payload
     "fixed_ms_multi_node": {"locmoe": ...},                        # where the plan differs across nodes
     "intra_node": {"bandwidth_GBps": 235.0, "latency_us": 0.0},
     "inter_node": {"bandwidth_GBps": 2.48, "latency_us": 0.0, "duplex": "full",
                    "collective_GBps": 3.9, "flat_GBps": 2.6, "one_way_GBps": 3.0}}

``inter_node.collective_GBps`` (optional): the rate of an all-gather / reduce-scatter over the EP group, as
the inter-node bytes per rank the model gives it ((N - 1) s rows) per second; it prices Megatron's
``allgather`` layer, whose collectives NCCL runs as rings at another rate than an all-to-all.
``inter_node.flat_GBps`` (optional): the cross-node rate of an all-to-all over the EP group (every rank of
the other nodes a peer); it prices the pairs all-to-alls (Megatron ``alltoall`` and group-limited,
DeepSpeed, LocMoE's flat plan), ``bandwidth_GBps`` (one rail peer per rank) the hierarchical rail stage.
Absent, those systems get ``bandwidth_GBps``. ``inter_node.one_way_GBps`` (optional): the rate when only one
direction sends; against ``bandwidth_GBps`` it says how much a rank that sends more than it receives pays
(``ClusterSpec.inter_one_way_bw_GBps``); absent, ``duplex`` decides ("full": nothing shared, "shared": all).

``fixed_ms_multi_node["locmoe"]`` from a one-node run: LocMoE runs its single-stage pairs plan on one node
and its two-stage plan across nodes, so the one-node fixed cost plus the two-stage plan's extra host work,
measured on one node with the two-stage plan forced (``bench_dispatch.py``'s ``hier_tree`` rows,
``exact_tree=True``, against its ``hierarchical`` rows): :func:`two_stage_extra_ms`.

``fixed_ms`` keys: ``megatron_alltoall``, ``megatron_group_limited``, ``megatron_allgather``, ``deepspeed_moe``, ``locmoe`` (the
LocMoE systems; the overlapped one pays it per chunk). A missing key falls back to ``megatron_alltoall``'s,
then 0. :func:`calibration_from_layer_results` derives a calibration from ``benchmarks/bench_layer.py``'s
JSON; the benchmark writes it with ``--calibration FILE``.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, replace

from ..config import ConfigError

SCHEMA = "locmoe-projection-calibration/1"
_KEYS = {"schema", "source", "expert_gemm_tflops", "fixed_ms", "fixed_ms_multi_node", "intra_node", "inter_node"}
# bench_layer system -> calibration key
BENCH_SYSTEMS = {"mcore_alltoall": "megatron_alltoall", "mcore_grouplimited": "megatron_group_limited",
                 "mcore_allgather": "megatron_allgather", "deepspeed_moe": "deepspeed_moe", "locmoe_grap": "locmoe", "locmoe_dense": "locmoe",
                 "locmoe_ds_no_overlap": "locmoe"}


@dataclass(frozen=True, kw_only=True)
class Calibration:
    expert_gemm_tflops: float | None = None
    fixed_ms: dict = field(default_factory=dict)
    fixed_ms_multi_node: dict = field(default_factory=dict)
    intra_node: dict | None = None
    inter_node: dict | None = None
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.expert_gemm_tflops is not None and not self.expert_gemm_tflops > 0:
            raise ConfigError(f"calibration expert_gemm_tflops={self.expert_gemm_tflops!r}: must be > 0 or absent")
        for name in ("fixed_ms", "fixed_ms_multi_node"):
            for k, v in getattr(self, name).items():
                if not (isinstance(v, (int, float)) and v >= 0):
                    raise ConfigError(f"calibration {name}[{k!r}]={v!r}: must be a number >= 0 (ms)")
        for name in ("intra_node", "inter_node"):
            link = getattr(self, name)
            if link is None:
                continue
            if (not all(link.get(k, 1.0) > 0 for k in ("bandwidth_GBps", "collective_GBps", "flat_GBps",
                                                          "one_way_GBps"))
                    or not link.get("latency_us", 0.0) >= 0):
                raise ConfigError(f"calibration {name}={link!r}: bandwidth_GBps, collective_GBps, flat_GBps and "
                                  f"one_way_GBps must be > 0 and latency_us >= 0")
            if link.get("duplex", "full") not in ("full", "shared"):
                raise ConfigError(f"calibration {name}={link!r}: duplex must be 'full' or 'shared'")

    def fixed_for(self, system: str, ep_nodes: int) -> float:
        key = "locmoe" if system.startswith("locmoe_") else system
        for table in ((self.fixed_ms_multi_node, self.fixed_ms) if ep_nodes > 1 else (self.fixed_ms,)):
            if key in table:
                return float(table[key])
        return float(self.fixed_ms.get("megatron_alltoall", 0.0))

    def apply(self, cluster):
        """``cluster`` with the measured link figures in place of its own."""
        over = {}
        for name, pre in (("intra_node", "intra"), ("inter_node", "inter")):
            link = getattr(self, name) or {}
            if "bandwidth_GBps" in link:
                over[f"{pre}_bw_GBps"] = float(link["bandwidth_GBps"])
            if "latency_us" in link:
                over[f"{pre}_latency_us"] = float(link["latency_us"])
            if pre == "inter" and link.get("duplex"):
                over["inter_duplex"] = link["duplex"]
            if pre == "inter" and "collective_GBps" in link:
                over["inter_collective_bw_GBps"] = float(link["collective_GBps"])
            if pre == "inter" and "flat_GBps" in link:
                over["inter_flat_bw_GBps"] = float(link["flat_GBps"])
            if pre == "inter" and "one_way_GBps" in link:
                over["inter_one_way_bw_GBps"] = float(link["one_way_GBps"])
        return replace(cluster, **over)

    def to_dict(self) -> dict:
        d = {"schema": SCHEMA, "source": self.source, "expert_gemm_tflops": self.expert_gemm_tflops,
             "fixed_ms": self.fixed_ms, "fixed_ms_multi_node": self.fixed_ms_multi_node,
             "intra_node": self.intra_node, "inter_node": self.inter_node}
        return {k: v for k, v in d.items() if v not in (None, {})}


def calibration_from_dict(d: dict) -> Calibration:
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise ConfigError(f"not a calibration file: expected \"schema\": \"{SCHEMA}\" (write one with "
                          "benchmarks/bench_layer.py --calibration FILE or "
                          "benchmarks/e2e_report.py --calibration DIR)")
    unknown = set(d) - _KEYS
    if unknown:
        raise ConfigError(f"calibration has unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    return Calibration(**{k: v for k, v in d.items() if k != "schema"})


def load_calibration(path: str) -> Calibration:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read calibration {path!r}: {exc}; pass a JSON file written by "
                          "benchmarks/bench_layer.py --calibration or benchmarks/e2e_report.py --calibration") from exc
    return calibration_from_dict(d)


def two_stage_extra_ms(dispatch_results: list[dict], topk: int) -> float | None:
    """The two-stage plan's extra time per layer (dispatch + combine, forward + backward) on one node, ms.

    ``dispatch_results``: ``bench_dispatch.py`` JSON dicts of one-node runs; every row with top-``topk``
    and both ``hier_tree`` (the two-stage plan forced, ``exact_tree=True``) and ``hierarchical`` (there the
    single-stage pairs plan) gives ``hier_tree ms - hierarchical ms``: host work (more launches and a
    second count exchange), since on one node both plans move their bytes over NVLink in well under a
    millisecond. Returns the median of those differences (floored at 0), or None if no row has them."""
    diffs = []
    for res in dispatch_results:
        if res.get("meta", {}).get("nodes", 1) != 1:
            continue
        for row in res.get("rows", []):
            sy = row.get("systems", {})
            if row.get("topk") == topk and "ms" in sy.get("hier_tree", {}) and "ms" in sy.get("hierarchical", {}):
                diffs.append(sy["hier_tree"]["ms"] - sy["hierarchical"]["ms"])
    if not diffs:
        return None
    return max(0.0, statistics.median(diffs))


#: a link whose one-way rate exceeds this multiple of the exchange's per-direction rate is read as "shared"
#: (one budget for both directions, as a socket link where every byte either way is a host copy), else "full"
SHARED_DUPLEX_RATIO = 1.5
#: the figures of one link probe sample that :func:`link_summary` takes the median of
LINK_FIGURES = ("bandwidth_GBps", "latency_us", "one_way_GBps", "collective_GBps", "flat_GBps")


def duplex_of(one_way_GBps: float, bandwidth_GBps: float) -> str:
    """"shared" when one-way traffic runs > :data:`SHARED_DUPLEX_RATIO` x the exchange's per-direction rate."""
    return "shared" if one_way_GBps > SHARED_DUPLEX_RATIO * bandwidth_GBps else "full"


def link_summary(samples: list[dict], **extra) -> dict:
    """One link's figures from repeated probe ``samples`` (each a dict of some of :data:`LINK_FIGURES`,
    plus ``when``): the median of each figure over the samples that have it, ``duplex`` from the median
    one-way and exchange rates (where both are measured), ``samples`` kept as given, ``extra`` added."""
    if not samples:
        raise ValueError("link_summary needs at least one sample")
    out = dict(extra)
    for key in LINK_FIGURES:
        vals = [float(s[key]) for s in samples if s.get(key) is not None]
        if vals:
            out[key] = statistics.median(vals)
    if "one_way_GBps" in out and "bandwidth_GBps" in out:
        out["duplex"] = duplex_of(out["one_way_GBps"], out["bandwidth_GBps"])
    out["samples"] = list(samples)
    return out


def inter_link(meta: dict, inter_bw_GBps: float | None = None) -> dict | None:
    """The inter-node link of a ``bench_layer.py`` (or ``bench_dispatch.py --probe-link``) run, as the model
    reads it: ``bandwidth_GBps``, ``latency_us``, ``duplex``, the pattern rates (``one_way_GBps``,
    ``collective_GBps``, ``flat_GBps``, where probed) and ``probe_samples`` (how many probes the
    figures come from). Where the run recorded repeated probes (``inter_node_link.samples``), the median of each
    figure over them and the duplex of the medians (:func:`link_summary`); else its one-shot probe
    (``inter_node_link``), else the one-shot ``inter_node_bw_GBps`` (``probe_samples`` 1). ``inter_bw_GBps`` replaces
    the bandwidth."""
    link = dict(meta.get("inter_node_link") or {})
    count = 1
    if link.get("samples"):
        count = len(link["samples"])
        link = link_summary(link["samples"])
    link = {k: link[k] for k in ("bandwidth_GBps", "latency_us", "duplex", "one_way_GBps", "collective_GBps",
                                 "flat_GBps") if k in link}
    bw = inter_bw_GBps or link.get("bandwidth_GBps") or meta.get("inter_node_bw_GBps") or None
    if not bw:
        return None
    link.update(bandwidth_GBps=bw, probe_samples=count)
    link.setdefault("latency_us", 0.0)
    return link


def calibration_from_layer_results(out: dict, inter_bw_GBps: float | None = None,
                                   two_stage_ms: float | None = None, fixed_from: str | None = None) -> Calibration:
    """A calibration from ``bench_layer.py``'s result dict (``{"meta": ..., "systems": ...}``).

    * expert GEMM rate: the LocMoE rows' ``floor_gemm_ms`` (the layer's own experts, fwd + bwd, on the rows
      the busiest rank received) against the model's FLOPs for ``s k x rank imbalance`` rows of a GELU MLP
      (bench_layer's experts); the rank imbalance is the run's ``rank_max_over_mean_rows`` where recorded,
      else 1.
    * intra-node bandwidth: the LocMoE rows' intra-node bytes per rank over their measured exchange time.
    * inter-node link: the run's probe (:func:`inter_link`), or ``inter_bw_GBps``.
    * fixed costs (one-node runs only, or ``fixed_ms_multi_node`` from runs across nodes): each system's
      measured ms minus the model's GEMM and payload terms for that run's layout and routing (floored at 0).
      The LocMoE rows (``locmoe_grap``, ``locmoe_dense``, ``locmoe_ds_no_overlap``) share the ``"locmoe"`` key.
      From a one-node run with ``two_stage_ms`` (:func:`two_stage_extra_ms`), also
      ``fixed_ms_multi_node["locmoe"]`` = the LocMoE fixed cost + ``two_stage_ms``. Two rows share the
      ``"locmoe"`` key: the first present in that order sets it, or ``fixed_from`` names the row.
    """
    from .cluster import ClusterSpec
    from .cost import predict_layer
    from .workload import ModelSpec, RoutingSpec

    m, systems = out["meta"], out["systems"]
    s, d, f, k, ranks = m["tokens_per_rank"], m["hidden"], m["ffn"], m["topk"], m["ranks"]
    model = ModelSpec(hidden=d, ffn=f, experts=m["experts"], topk=k, tokens_per_rank=s, dtype=m["dtype"],
                      swiglu=False)
    loc = [v for name, v in systems.items() if name in ("locmoe_grap", "locmoe_dense") and "floor_gemm_ms" in v]
    tflops = intra_bw = None
    if loc:
        rates = [model.expert_flops_per_row * s * k * v.get("rank_max_over_mean_rows", 1.0) / (v["floor_gemm_ms"] * 1e9)
                 for v in loc if v["floor_gemm_ms"] > 0]
        tflops = max(rates) if rates else None
        bws = [2 * v["intra_node_MiB"] * 2**20 / ranks / (v["floor_intra_ms"] * 1e6)
               for v in loc if v.get("floor_intra_ms", 0) > 0 and v.get("intra_node_MiB", 0) > 0]
        intra_bw = max(bws) if bws else None
    link = inter_link(m, inter_bw_GBps)
    inter = link["bandwidth_GBps"] if link else None
    cal = Calibration(expert_gemm_tflops=tflops,
                      intra_node={"bandwidth_GBps": intra_bw, "latency_us": 0.0} if intra_bw else None,
                      inter_node=link)
    cluster = ClusterSpec(nodes=m["nodes"], gpus_per_node=m["gpus_per_node"], intra_bw_GBps=intra_bw or 200.0,
                          intra_latency_us=0.0, inter_bw_GBps=inter or 1.0, inter_latency_us=0.0,
                          peak_tflops=(tflops or 300.0) / 0.6)
    fixed = {}
    order = sorted(BENCH_SYSTEMS, key=lambda name: name != fixed_from)
    for name in order:
        key, v = BENCH_SYSTEMS[name], systems.get(name)
        if not v or key in fixed or v.get("ms") is None or v["ms"] != v["ms"]:
            continue
        routing = RoutingSpec(cross_node_share=min(1.0, v.get("cross_node_share", 0.0)),
                              imbalance=max(1.0, v.get("rank_max_over_mean_rows", 1.0)),
                              capacity_factor=m.get("ds_capacity_factor", 1.25))
        system = {"locmoe": "locmoe_hier"}.get(key, key)
        t = predict_layer(system, cluster, model, routing, cal)
        fixed[key] = max(0.0, v["ms"] - t.gemm_ms - t.comm_ms)
    src = {k2: m.get(k2) for k2 in ("device", "date", "commit", "ranks", "nodes", "gpus_per_node", "torch",
                                    "megatron_core")}
    src["layout"] = f"{m['nodes']} node(s) x {m['gpus_per_node']}"
    multi = m["nodes"] > 1
    multi_fixed = fixed if multi else {}
    if not multi and two_stage_ms is not None and "locmoe" in fixed:
        multi_fixed = {"locmoe": fixed["locmoe"] + two_stage_ms}
        src["two_stage_extra_ms"] = two_stage_ms
    return replace(cal, fixed_ms={} if multi else fixed, fixed_ms_multi_node=multi_fixed, source=src)


def write_calibration(path: str, out: dict, two_stage_ms: float | None = None) -> Calibration:
    """Derive a calibration from ``bench_layer.py``'s result dict and write it to ``path`` (JSON)."""
    cal = calibration_from_layer_results(out, two_stage_ms=two_stage_ms)
    with open(path, "w") as f:
        json.dump(cal.to_dict(), f, indent=2)
    return cal
