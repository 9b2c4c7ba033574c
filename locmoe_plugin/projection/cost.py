"""Time of one MoE layer (forward + backward, the busiest rank) and of a training step, per system.

Per layer: ``fixed + gemm + 4 all-to-alls`` (dispatch and combine, forward and backward, each moving
the rows of :mod:`.traffic` one way):
  * a pairs all-to-all (Megatron ``alltoall``, DeepSpeed, LocMoE flat) runs its inter- and intra-node
    parts at once: ``latency + max(inter bytes / inter bw, intra bytes / intra bw)``; Megatron's
    ``allgather`` layer the same with its all-gather / reduce-scatter rows. Where a calibration probed
    them, the pairs all-to-alls run at the all-peers rate (``ClusterSpec.inter_flat_bw_GBps``) and the
    ``allgather`` layer at its collectives' rate (``inter_collective_bw_GBps``);
  * the hierarchical one runs its rail stage, then its node stage:
    ``(inter latency + inter bytes / inter bw) + (intra latency + intra bytes / intra bw)``;
  * with overlap (``chunks`` c): each chunk pays the fixed cost and the latencies, and communication and
    expert GEMMs pipeline: ``c fixed + (comm + gemm) / c + (c - 1) / c * max(comm, gemm)``.
Bytes and GEMM rows of dropless systems scale by the routing's ``imbalance`` (the busiest rank); the
cross-node bytes by its ``inter_imbalance`` where given, through :func:`inter_scale` (the link's duplex).
``fixed`` is the per-layer time that is neither GEMM nor payload (router, permutes, plan, host launches,
kernel gaps): 0 unless a calibration measured it (:mod:`.calibration`).
Step = layers x (MoE layer + attention block at the same GEMM rate). Left out: data-parallel gradient
reduction, pipeline bubbles, optimizer, congestion, stragglers, topology beyond two levels.
"""

from __future__ import annotations

from dataclasses import dataclass

from .calibration import Calibration
from .cluster import ClusterSpec
from .traffic import Rows, allgather_rows, capacity, expected_rows, node_pmfs, padded_rows
from .workload import ModelSpec, RoutingSpec
from ..config import ConfigError

SYSTEMS = ("megatron_alltoall", "megatron_group_limited", "deepspeed_moe", "locmoe_flat", "locmoe_hier",
           "locmoe_hier_overlap")
BASELINE = "megatron_alltoall"
# Also predicted on request (validation against measured runs), not in the default table: Megatron's
# ``allgather`` dispatcher (the whole EP group's tokens to every rank, a collective rather than pairs).
EXTRA_SYSTEMS = ("megatron_allgather",)


@dataclass(frozen=True)
class LayerTime:
    """One system on one layout. Times in ms (forward + backward of one MoE layer, busiest rank); bytes
    one rank sends per layer (forward + backward, dispatch + combine) on each link."""

    system: str
    ep_nodes: int
    layer_ms: float
    step_ms: float
    fixed_ms: float
    gemm_ms: float
    comm_ms: float
    inter_bytes: float
    intra_bytes: float
    pair_share: float


def ep_nodes_of(cluster: ClusterSpec, model: ModelSpec) -> int:
    """Nodes one expert-parallel group spans: all of them, up to one expert per GPU (E / R nodes); beyond
    that the extra nodes are data-parallel replicas and the MoE layer stops changing."""
    r, e = cluster.gpus_per_node, model.experts
    if e < r or e % r:
        raise ConfigError(f"experts={e} is not divisible by gpus_per_node={r}: every GPU of a node hosts the "
                          f"same number of experts; use a multiple of {r} experts")
    n = min(cluster.nodes, e // r)
    if e % (n * r):
        raise ConfigError(f"experts={e} is not divisible by the {n * r} GPUs of the expert-parallel group "
                          f"({n} nodes x {r}); use a node count that divides {e // r}, or a multiple of "
                          f"{n * r} experts")
    return n


def inter_scale(u: float, duplex: str, ranks: int) -> float:
    """The busiest rank's cross-node time over a balanced rank's, when it sends ``u`` x the mean bytes.

    ``"full"`` duplex: ``u`` (its sends decide). ``"shared"``: its link carries what it sends and what it
    receives, (u + v) / 2, with v = (P - u) / (P - 1) the mean of the other P - 1 ranks' sends, which is
    what it receives in expectation (dispatch rows it receives are combine rows it sends back, so both
    directions carry u + v over a layer either way)."""
    if duplex == "full" or ranks < 2:
        return u
    return (u + max(0.0, ranks - u) / (ranks - 1)) / 2


def _a2a_ms(rows: Rows, model: ModelSpec, cl: ClusterSpec, n: int, hierarchical: bool, scale: float,
            scale_inter: float, inter_bw_GBps: float | None = None) -> float:
    b = model.hidden * model.elt
    t_inter = rows.inter * b * scale_inter / ((inter_bw_GBps or cl.inter_bw_GBps) * 1e6)  # ms
    t_intra = rows.intra * b * scale / (cl.intra_bw_GBps * 1e6)
    lat_inter, lat_intra = cl.inter_latency_us / 1e3, cl.intra_latency_us / 1e3
    if hierarchical and n > 1:
        return lat_inter + t_inter + lat_intra + t_intra
    return (lat_inter if n > 1 else lat_intra) + max(t_inter, t_intra)


def predict_layer(system: str, cluster: ClusterSpec, model: ModelSpec, routing: RoutingSpec,
                  calibration: Calibration | None = None) -> LayerTime:
    """Predicted time and bytes of ``system`` (one of :data:`SYSTEMS`)."""
    cal = calibration or Calibration()
    cl = cal.apply(cluster)
    n = ep_nodes_of(cl, model)
    r, e, k, s = cl.gpus_per_node, model.experts, model.topk, model.tokens_per_rank
    tflops = cal.expert_gemm_tflops or cl.gemm_tflops
    u = routing.imbalance
    rows_gemm = s * k
    if system in ("megatron_alltoall", "deepspeed_moe", "megatron_allgather"):
        own, rem = node_pmfs("uniform", n, r, e, k)
    elif system == "megatron_group_limited":
        own, rem = node_pmfs("group", n, r, e, k, group_nodes=routing.group_nodes or min(n, 4))
    elif system.startswith("locmoe_"):
        if routing.pairs_per_copy is None:
            own, rem = node_pmfs("share", n, r, e, k, share=routing.share_on(n))
        else:
            own, rem = node_pmfs("copies", n, r, e, k, share=routing.share_on(n), pairs_per_copy=routing.pairs_per_copy)
    else:
        raise ConfigError(f"unknown system {system!r}: use one of {SYSTEMS + EXTRA_SYSTEMS}")
    hier = system.startswith("locmoe_hier")
    if system == "deepspeed_moe":
        rows = padded_rows(n, r, e, k, s, routing.capacity_factor)
        rows_gemm = e * capacity(k, s, routing.capacity_factor, e)  # E_r local experts x P sources x C rows
        scale = scale_inter = 1.0  # padded: every rank moves and computes full buffers whatever the imbalance
    elif system == "megatron_allgather":
        rows = allgather_rows(n, r, s)  # every rank moves the same rows; its experts still get u x the rows
        scale, scale_inter = 1.0, inter_scale(1.0, cl.inter_duplex, n * r)
    else:
        rows = expected_rows("hierarchical" if hier else "pairs", n, r, e, k, s, own, rem)
        scale, scale_inter = u, inter_scale(routing.inter_scale, cl.inter_duplex, n * r)
    gemm_scale = u if system == "megatron_allgather" else scale
    gemm = rows_gemm * gemm_scale * model.expert_flops_per_row / (tflops * 1e9)
    # where a calibration probed them: the allgather layer's collectives and the pairs all-to-alls (every
    # remote rank a peer) at their own rates; the hierarchical rail stage at the rail rate
    pattern_bw = (cl.inter_collective_bw_GBps if system == "megatron_allgather"
                  else None if hier else cl.inter_flat_bw_GBps)
    one = _a2a_ms(rows, model, cl, n, hier, scale, scale_inter, pattern_bw)
    fixed = cal.fixed_for(system, n)
    chunks = routing.chunks if system == "locmoe_hier_overlap" else 1
    if chunks > 1:
        lat = (cl.inter_latency_us if n > 1 else 0.0) + (cl.intra_latency_us if hier or n == 1 else 0.0)
        comm = 4 * (one + (chunks - 1) * lat / 1e3)
        layer = chunks * fixed + (comm + gemm) / chunks + (chunks - 1) / chunks * max(comm, gemm)
    else:
        comm = 4 * one
        layer = fixed + gemm + comm
    attn = s * model.attention_flops_per_token / (tflops * 1e9)
    b = model.hidden * model.elt
    jj_share = (n - 1) * float(sum(j * p for j, p in enumerate(rem))) / k if n > 1 else 0.0
    return LayerTime(system=system, ep_nodes=n, layer_ms=layer, step_ms=model.layers * (layer + attn),
                     fixed_ms=fixed, gemm_ms=gemm, comm_ms=comm, inter_bytes=4 * rows.inter * b,
                     intra_bytes=4 * rows.intra * b, pair_share=jj_share)


def predict(cluster: ClusterSpec, model: ModelSpec, routing: RoutingSpec, calibration: Calibration | None = None,
            systems=SYSTEMS) -> dict[str, LayerTime]:
    return {name: predict_layer(name, cluster, model, routing, calibration) for name in systems}
