"""Time of one MoE layer (forward + backward, the busiest rank) and of a training step, per system.

Per layer: ``fixed + gemm + 4 all-to-alls`` (dispatch and combine, forward and backward, each moving
the rows of :mod:`.traffic` one way; under ``ModelSpec.dispatch_format`` the two in the dispatch direction of
LocMoE's systems, overlapped ones included, move encoded rows on more than one node, and the encoding's own
passes are not charged):
  * a pairs all-to-all (Megatron ``alltoall``, DeepSpeed, LocMoE flat) runs its inter- and intra-node
    parts at once: ``latency + max(inter bytes / inter bw, intra bytes / intra bw)``; Megatron's
    ``allgather`` layer the same with its all-gather / reduce-scatter rows. Where a calibration probed
    them, the pairs all-to-alls run at the all-peers rate (``ClusterSpec.inter_flat_bw_GBps``) and the
    ``allgather`` layer at its collectives' rate (``inter_collective_bw_GBps``);
  * the hierarchical one runs its rail stage, then its node stage:
    ``(inter latency + inter bytes / inter bw) + (intra latency + intra bytes / intra bw)``;
  * with the overlap (split by origin, ``docs/overlap.md``): each of the 4 rail transfers of the rows
    that cross nodes hides the work on this node's own rows that runs beside it, at most the transfer's
    own time (:func:`overlap_hidden_ms`): their intra-node hop in each transfer, and in DeepSpeed's layer
    (``locmoe_hier_overlap``, ``TokenDispatcher.forward(expert_fn)``) their experts' forward (beside the
    dispatch) and backward (beside the gradients' return); Megatron's six phases run the experts on all
    rows between ``token_dispatch`` and ``token_combine``, so there only the intra-node hop hides
    (``locmoe_hier_overlap_phases``). The share of a rank's expert rows that come from its own node is
    ``1 - pair share``. What the overlap adds (the experts run once per origin node, one route per
    origin) is not charged, so the figure is the most the overlap can give.
Bytes and GEMM rows of dropless systems scale by the routing's ``imbalance`` (the busiest rank); the
cross-node bytes by its ``inter_imbalance`` where given, through :func:`inter_scale` (the link's duplex: what
one direction reaches alone against both at once).
``fixed`` is the per-layer time that is neither GEMM nor payload (router, permutes, plan, host launches,
kernel gaps): 0 unless a calibration measured it (:mod:`.calibration`).
Step = layers x (MoE layer + attention block at the same GEMM rate). ``step_dp_ms`` adds the dense
parameters' gradient all-reduce across nodes whole (:func:`dense_grad_reduce_ms`); the step with it hidden
behind the backward is ``step_ms``, so the two bracket the step. Left out: pipeline bubbles, optimizer,
congestion, stragglers, topology beyond two levels.
"""

from __future__ import annotations

from dataclasses import dataclass

from .calibration import Calibration
from .cluster import ClusterSpec
from .traffic import Rows, allgather_rows, capacity, expected_rows, node_pmfs, padded_rows
from .workload import DTYPE_BYTES, ModelSpec, RoutingSpec
from ..config import ConfigError

SYSTEMS = ("megatron_alltoall", "megatron_group_limited", "deepspeed_moe", "locmoe_flat", "locmoe_hier",
           "locmoe_hier_overlap")
BASELINE = "megatron_alltoall"
# Also predicted on request (validation against measured runs), not in the default table: Megatron's
# ``allgather`` dispatcher (the whole EP group's tokens to every rank, a collective rather than pairs), and
# LocMoE's overlap inside Megatron's six phases (only the intra-node hop hides).
EXTRA_SYSTEMS = ("megatron_allgather", "locmoe_hier_overlap_phases")
#: the systems whose dispatch direction takes ``ModelSpec.dispatch_format`` across nodes (LocMoE's dispatcher,
#: with and without the overlap; on one node the format is a no-op)
CODEC_SYSTEMS = ("locmoe_flat", "locmoe_hier", "locmoe_hier_overlap", "locmoe_hier_overlap_phases")


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
    dp_grad_ms: float = 0.0
    step_dp_ms: float = 0.0


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


def inter_scale(u: float, ranks: int, one_way_ratio: float = 1.0) -> float:
    """The busiest rank's cross-node time over a balanced rank's, when it sends ``u`` x the mean bytes.

    Its link carries what it sends (``u``) and what it receives (``v = (P - u) / (P - 1)``, the other ranks'
    mean send, in expectation; dispatch rows it receives are combine rows it sends back, so over a layer both
    directions carry ``u + v`` either way). With ``b`` the balanced exchange's per-direction rate, one
    direction alone reaches ``one_way_ratio x b`` (``r`` in [1, 2]) and both together ``2 b``, so the time
    scales by ``max(u / r, (u + v) / 2)``: ``u`` on a full-duplex link (``r = 1``: IB / RoCE, the sends
    decide), ``(u + v) / 2`` where both directions share one budget (``r = 2``: a socket link whose every byte
    either way is a host copy), in between where the probe measured in between
    (:attr:`~.cluster.ClusterSpec.inter_one_way_ratio`)."""
    if ranks < 2:
        return u
    r = min(2.0, max(1.0, one_way_ratio))
    v = max(0.0, ranks - u) / (ranks - 1)
    return max(u / r, (u + v) / 2)


def _a2a_parts_ms(rows: Rows, model: ModelSpec, cl: ClusterSpec, scale: float, scale_inter: float,
                  inter_bw_GBps: float | None = None, row_bytes: int | None = None) -> tuple[float, float]:
    """(inter-node, intra-node) transfer time of one all-to-all's rows (``row_bytes`` each, default
    ``hidden x elt``), without latencies, in ms."""
    b = row_bytes or model.hidden * model.elt
    return (rows.inter * b * scale_inter / ((inter_bw_GBps or cl.inter_bw_GBps) * 1e6),
            rows.intra * b * scale / (cl.intra_bw_GBps * 1e6))


def _a2a_ms(rows: Rows, model: ModelSpec, cl: ClusterSpec, n: int, hierarchical: bool, scale: float,
            scale_inter: float, inter_bw_GBps: float | None = None, row_bytes: int | None = None) -> float:
    t_inter, t_intra = _a2a_parts_ms(rows, model, cl, scale, scale_inter, inter_bw_GBps, row_bytes)
    lat_inter, lat_intra = cl.inter_latency_us / 1e3, cl.intra_latency_us / 1e3
    if hierarchical and n > 1:
        return lat_inter + t_inter + lat_intra + t_intra
    return (lat_inter if n > 1 else lat_intra) + max(t_inter, t_intra)


def dense_grad_reduce_ms(cluster: ClusterSpec, model: ModelSpec) -> float:
    """Inter-node time of one step's data-parallel synchronisation of the dense parameters
    (:attr:`ModelSpec.dense_params_per_layer` x layers) over every GPU of the job, in ms.

    The data-parallel group of the dense parameters spans all ``N = nodes x G`` GPUs. With the replicated
    optimizer a ring all-reduce of the gradients (``S_g`` bytes in ``model.grad_dtype``) sends
    ``2 (N - 1) / N x S_g`` per GPU; with the distributed one a reduce-scatter of the gradients and an
    all-gather of the updated parameters (``S_p`` bytes in ``model.dtype``) send ``(N - 1) / N x (S_g +
    S_p)``. With one ring per NIC (NCCL's channels over the node's G NICs) each NIC carries 1 / G of it at
    the inter-node rate. 0 on one node: there it runs over NVLink / HCCS beside the backward (and the
    forward, for the distributed optimizer's all-gather). Megatron
    overlaps it with the backward (and the parameters' all-gather with the next forward), where it shares
    the NICs with the MoE layers' all-to-alls; how much of it hides depends on how long those leave the
    NICs idle, so :class:`LayerTime` gives the step without it and with it added whole."""
    if cluster.nodes <= 1:
        return 0.0
    n, g = cluster.nodes * cluster.gpus_per_node, cluster.gpus_per_node
    params = model.layers * model.dense_params_per_layer
    grad_bytes = params * DTYPE_BYTES[model.grad_dtype]
    sent = (grad_bytes + params * model.elt if model.optimizer == "distributed" else 2 * grad_bytes)
    return (n - 1) / n * sent / g / (cluster.inter_bw_GBps * 1e6)


def overlap_hidden_ms(rail_ms: float, node_ms: float, gemm_ms: float, local_share: float, experts: bool,
                      dispatch: tuple[float, float] | None = None) -> float:
    """Time the split-by-origin overlap hides per layer (forward + backward), in ms.

    Each of the 4 rail transfers (dispatch and combine, forward and backward; ``rail_ms`` each) runs beside
    the work on this node's own rows (``local_share`` of the rank's rows) and hides at most its own time:
    that work's intra-node hop (``node_ms`` per transfer) in all four; with ``experts`` also the local
    experts' forward (a third of ``gemm_ms``) beside the dispatch and their backward (two thirds) beside
    the gradients' return to their sources. ``dispatch``: ``(rail_ms, node_ms)`` of the two transfers in
    the dispatch direction (the dispatch's forward, the combine's backward) where a dispatch format
    shrinks their rows; default the same as the others."""
    if rail_ms <= 0 or local_share <= 0:
        return 0.0
    e = 1.0 if experts else 0.0
    rail_d, node_d = dispatch or (rail_ms, node_ms)
    node, node_d = local_share * node_ms, local_share * node_d
    return (min(rail_ms, node) + min(rail_d, node_d)  # the combine's forward and backward
            + min(rail_d, node_d + local_share * e * gemm_ms / 3)  # the dispatch's forward
            + min(rail_ms, node + local_share * e * 2 * gemm_ms / 3))  # the dispatch's backward


def predict_layer(system: str, cluster: ClusterSpec, model: ModelSpec, routing: RoutingSpec,
                  calibration: Calibration | None = None) -> LayerTime:
    """Predicted time and bytes of ``system`` (one of :data:`SYSTEMS` or :data:`EXTRA_SYSTEMS`)."""
    if system not in SYSTEMS + EXTRA_SYSTEMS:
        raise ConfigError(f"unknown system {system!r}: use one of {SYSTEMS + EXTRA_SYSTEMS}")
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
    else:
        if routing.pairs_per_copy is None:
            own, rem = node_pmfs("share", n, r, e, k, share=routing.share_on(n))
        else:
            own, rem = node_pmfs("copies", n, r, e, k, share=routing.share_on(n), pairs_per_copy=routing.pairs_per_copy)
    hier = system.startswith("locmoe_hier")
    if system == "deepspeed_moe":
        rows = padded_rows(n, r, e, k, s, routing.capacity_factor)
        rows_gemm = e * capacity(k, s, routing.capacity_factor, e)  # E_r local experts x P sources x C rows
        scale = scale_inter = 1.0  # padded: every rank moves and computes full buffers whatever the imbalance
    elif system == "megatron_allgather":
        rows = allgather_rows(n, r, s)  # every rank moves the same rows; its experts still get u x the rows
        scale, scale_inter = 1.0, inter_scale(1.0, n * r, cl.inter_one_way_ratio)
    else:
        rows = expected_rows("hierarchical" if hier else "pairs", n, r, e, k, s, own, rem)
        scale, scale_inter = u, inter_scale(routing.inter_scale, n * r, cl.inter_one_way_ratio)
    gemm_scale = u if system == "megatron_allgather" else scale
    gemm = rows_gemm * gemm_scale * model.expert_flops_per_row / (tflops * 1e9)
    # where a calibration probed them: the allgather layer's collectives and the pairs all-to-alls (every
    # remote rank a peer) at their own rates; the hierarchical rail stage at the rail rate
    pattern_bw = (cl.inter_collective_bw_GBps if system == "megatron_allgather"
                  else None if hier else cl.inter_flat_bw_GBps)
    one = _a2a_ms(rows, model, cl, n, hier, scale, scale_inter, pattern_bw)
    b = model.hidden * model.elt
    # LocMoE's dispatch direction (dispatch forward, combine backward) in the dispatch format
    b_disp = model.dispatch_row_bytes if system in CODEC_SYSTEMS and n > 1 else b
    one_disp = one if b_disp == b else _a2a_ms(rows, model, cl, n, hier, scale, scale_inter, pattern_bw, b_disp)
    fixed = cal.fixed_for(system, n)
    jj_share = (n - 1) * float(sum(j * p for j, p in enumerate(rem))) / k if n > 1 else 0.0
    comm = 2 * one + 2 * one_disp
    layer = fixed + gemm + comm
    if system.startswith("locmoe_hier_overlap"):
        rail, node = _a2a_parts_ms(rows, model, cl, scale, scale_inter)
        rail_d, node_d = _a2a_parts_ms(rows, model, cl, scale, scale_inter, row_bytes=b_disp)
        if n > 1 and rows.inter > 0:  # nothing crosses: the dispatcher runs the unsplit plan
            lat_inter, lat_intra = cl.inter_latency_us / 1e3, cl.intra_latency_us / 1e3
            layer -= overlap_hidden_ms(rail + lat_inter, node + lat_intra, gemm, 1.0 - jj_share,
                                       experts=system == "locmoe_hier_overlap",
                                       dispatch=(rail_d + lat_inter, node_d + lat_intra))
    attn = s * model.attention_flops_per_token / (tflops * 1e9)
    step = model.layers * (layer + attn)
    dp = dense_grad_reduce_ms(cl, model)
    return LayerTime(system=system, ep_nodes=n, layer_ms=layer, step_ms=step,
                     fixed_ms=fixed, gemm_ms=gemm, comm_ms=comm, inter_bytes=2 * rows.inter * (b + b_disp),
                     intra_bytes=2 * rows.intra * (b + b_disp), pair_share=jj_share, dp_grad_ms=dp, step_dp_ms=step + dp)


def predict(cluster: ClusterSpec, model: ModelSpec, routing: RoutingSpec, calibration: Calibration | None = None,
            systems=SYSTEMS) -> dict[str, LayerTime]:
    return {name: predict_layer(name, cluster, model, routing, calibration) for name in systems}
