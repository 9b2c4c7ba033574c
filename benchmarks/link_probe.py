"""The link probe of the benchmarks, repeated while the systems are timed: what ``locmoe project``'s
calibration and ``validate_projection.py`` read as the link a run's layers saw.

One sample (every rank calls it; all rails, or all nodes, at once; each figure the median of ``iters``
exchanges after 2 warm-ups, slowest rank):
  * inter-node (more than one node): ``bandwidth_GBps`` = bytes one rank sends to the other nodes / time
    of an ``all_to_all`` over its rail group (the ranks with the same local index on every node: the path
    of the hierarchical dispatcher's rail transfer), ``mib`` MiB to each rail peer, per rank and direction;
    ``latency_us`` = the same exchange with 4 KiB; ``one_way_GBps`` = the rate when only node 0's ranks
    send (a link whose one-way rate is well above the exchange's is read as shared-duplex:
    :func:`locmoe_plugin.projection.calibration.duplex_of`); ``collective_GBps`` = the inter-node bytes per
    rank of an all-gather of ``mib`` MiB per rank over the world (Megatron's ``allgather`` dispatcher's
    pattern: ``(N - 1) x mib`` MiB reach each rank from other nodes) / the mean time of that all-gather and
    of its reduce-scatter: NCCL runs these as rings whose cross-node rate differs from the all-to-all's (on
    emulated nodes 0.8-1.6 x in earlier runs), so the model prices the ``allgather`` layer with it;
    ``flat_GBps`` = the inter-node bytes per rank of an ``all_to_all`` over the world with ``mib`` MiB to
    every other rank (the pairs all-to-all of Megatron's ``alltoall`` layer, DeepSpeed and LocMoE's flat
    plan: every rank of the other nodes a peer) / its time: on the emulated fast link (8 sockets x 8
    threads per connection) a rank with two remote peers moved its bytes 1.5-1.6 x faster than over its
    one rail peer, so the model prices the pairs all-to-alls with this figure and the rail stage with
    ``bandwidth_GBps``;
  * intra-node (more than one rank per node): ``bandwidth_GBps`` of an ``all_to_all`` over the node's
    ranks, ``mib`` MiB to each node peer. Recorded beside the inter-node figure; the calibration keeps its
    intra-node rate from the LocMoE rows' own exchange (the layer's bytes).

Why repeated: on the emulated nodes (NCCL's socket transport over loopback, a host-copy link) a single
probe per run read 1.70-2.48 GB/s in three runs whose Megatron all-to-all moved its bytes at 2.07-2.20
GB/s, so a projection calibrated on one probe inherits that probe's error for every system of the run.
:class:`LinkProbe` takes a sample before the timing and after every timing round (bench_layer) or every
configuration (bench_dispatch) and reports the median of each figure with every sample
(:func:`locmoe_plugin.projection.calibration.link_summary`).

Probe size: :func:`layer_probe_mib` = one row per token, ``tokens x hidden x element bytes`` per peer
(32 MiB at 8192 tokens x hidden 2048 bf16): what one rail transfer of the hierarchical dispatcher sends
to one rail peer when every token has an expert on the other node (95 % of tokens at top-4 and a pair
share of 0.5 on 2 nodes of 32 experts), and what Megatron's ``alltoall`` sends to each remote rank on
2 nodes x 2 (``s k / P`` rows = 8192 at top-4). ``--bw-mib`` / ``--probe-mib`` set another size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from locmoe_plugin.comm.bandwidth import node_and_rail_groups, time_all_to_all, time_collective
from locmoe_plugin.projection.calibration import link_summary

#: the latency probe's payload per peer (bytes)
LATENCY_BYTES = 4096


def layer_probe_mib(tokens: int, hidden: int, elt: int) -> float:
    """MiB per peer of one row per token (``tokens x hidden x elt`` bytes): the layer's own rail message."""
    return tokens * hidden * elt / 2**20


def a2a_time(ctx, group, bytes_to_peers: float, iters: int = 5) -> float:
    """Seconds of an all_to_all over ``group`` in which this rank sends ``bytes_to_peers`` to the other
    members (equal parts; the self part is an equal part too), median, max over the world's ranks."""
    n = dist.get_world_size(group)
    if n == 1 or bytes_to_peers <= 0:
        return 0.0
    per_peer = max(1, int(math.ceil(bytes_to_peers / (n - 1) / 2)))  # bf16 elements
    buf = torch.empty(per_peer * n, dtype=torch.bfloat16, device=ctx.dev)
    return time_all_to_all(group, torch.empty_like(buf), buf, ctx.dev, ctx.sync, iters)


def one_way_time(ctx, per_peer_bytes: float, iters: int) -> float:
    """Seconds of a rail all_to_all in which only node 0's ranks send (``per_peer_bytes`` to each rail
    peer), median, max over the world's ranks."""
    n, per_peer = ctx.nodes, max(1, int(per_peer_bytes // 2))
    sender = ctx.node == 0
    send = [0] + [per_peer] * (n - 1) if sender else [0] * n
    recv = [0] * n if sender else [per_peer] + [0] * (n - 1)
    buf = torch.empty(sum(send) or 1, dtype=torch.bfloat16, device=ctx.dev)
    out = torch.empty(sum(recv) or 1, dtype=torch.bfloat16, device=ctx.dev)
    return time_all_to_all(ctx.rail_group, out[: sum(recv)], buf[: sum(send)], ctx.dev, ctx.sync, iters, recv, send)


def gather_scatter_time(ctx, bytes_per_rank: float, iters: int) -> float:
    """Seconds of an all-gather of ``bytes_per_rank`` per rank over the world, and of the reduce-scatter of
    the gathered tensor, averaged (each a median, max over the world's ranks)."""
    p = dist.get_world_size()
    block = torch.ones(max(1, int(bytes_per_rank // 2)), dtype=torch.bfloat16, device=ctx.dev)
    full = torch.empty(p * block.numel(), dtype=torch.bfloat16, device=ctx.dev)
    t_ag = time_collective(lambda: dist.all_gather_into_tensor(full, block), ctx.dev, ctx.sync, iters)
    t_rs = time_collective(lambda: dist.reduce_scatter_tensor(block, full), ctx.dev, ctx.sync, iters)
    return (t_ag + t_rs) / 2


def link_sample(ctx, mib: float, iters: int = 10) -> dict:
    """One probe of each link the layout has: ``{"inter_node": {bandwidth_GBps, latency_us, one_way_GBps,
    collective_GBps, flat_GBps}, "intra_node": {bandwidth_GBps}}`` (a key only where the layout has that link). A
    collective."""
    out = {}
    per_peer = mib * 2**20
    if ctx.nodes > 1:
        sent = per_peer * (ctx.nodes - 1)
        out["inter_node"] = {
            "bandwidth_GBps": sent / a2a_time(ctx, ctx.rail_group, sent, iters) / 1e9,
            "latency_us": a2a_time(ctx, ctx.rail_group, LATENCY_BYTES * (ctx.nodes - 1), iters) * 1e6,
            "one_way_GBps": sent / one_way_time(ctx, per_peer, iters) / 1e9,
            "collective_GBps": sent / gather_scatter_time(ctx, per_peer, iters) / 1e9,
            "flat_GBps": sent * ctx.gpn / a2a_time(ctx, None, per_peer * (dist.get_world_size() - 1), iters) / 1e9}
    if ctx.gpn > 1:
        sent = per_peer * (ctx.gpn - 1)
        out["intra_node"] = {"bandwidth_GBps": sent / a2a_time(ctx, ctx.node_group, sent, iters) / 1e9}
    return out


class LinkProbe:
    """Repeated link samples of one run. ``take(when)`` adds a sample of every link (a collective: all
    ranks call it at the same point); :meth:`summary` gives the median figures and every sample."""

    def __init__(self, ctx, mib: float, iters: int = 10) -> None:
        if not mib > 0 or iters < 1:
            raise ValueError(f"link probe: {mib} MiB per peer must be > 0 and iters {iters} >= 1")
        self.ctx, self.mib, self.iters = ctx, float(mib), iters
        self.samples: dict[str, list[dict]] = {"inter_node": [], "intra_node": []}

    def take(self, when: str) -> None:
        for link, figures in link_sample(self.ctx, self.mib, self.iters).items():
            self.samples[link].append({"when": when, **figures})

    def summary(self, link: str) -> dict | None:
        """``link`` ("inter_node" / "intra_node"): the median of each figure over the samples, the duplex of
        the medians, every sample and the probe size; None where the layout has no such link or nothing
        was sampled."""
        got = self.samples[link]
        return link_summary(got, probe_MiB_per_peer=self.mib) if got else None

    def inter_bandwidth_Bps(self) -> float:
        """The median inter-node rate so far (bytes/s per rank and direction), 0 without that link."""
        s = self.summary("inter_node")
        return s["bandwidth_GBps"] * 1e9 if s else 0.0


def take_sample(ctx, when: str) -> None:
    """A sample of ``ctx.link_probe`` (a :class:`LinkProbe`) where the run has one; nothing otherwise."""
    probe = getattr(ctx, "link_probe", None)
    if probe is not None:
        probe.take(when)


def all_max(value: float, dev: torch.device) -> float:
    """The largest ``value`` over the world's ranks (an all-reduce: every rank calls it)."""
    t = torch.tensor([float(value)], device=dev, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


@dataclass
class ProbeGroups:
    """What :func:`link_sample` needs of a run, for a benchmark without bench_layer's context: the rank's
    node and rail groups (:func:`node_and_rail_groups`, a collective)."""

    dev: torch.device
    sync: object
    gpn: int
    nodes: int = field(init=False)
    node: int = field(init=False)

    def __post_init__(self) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()
        if self.gpn < 1 or world % self.gpn:
            raise ValueError(f"--gpus-per-node {self.gpn} must divide the world size {world}")
        self.nodes, self.node = world // self.gpn, rank // self.gpn
        self.node_group, self.rail_group = node_and_rail_groups(self.gpn)


def format_links(probe: LinkProbe) -> str:
    """One line: each link's median figures over the samples so far and their range."""
    parts = []
    for link, label in (("inter_node", "inter-node"), ("intra_node", "intra-node")):
        s = probe.summary(link)
        if s is None:
            continue
        bws = [x["bandwidth_GBps"] for x in s["samples"]]
        part = (f"{label} {s['bandwidth_GBps']:.2f} GB/s per rank (median of {len(bws)}, "
                f"{min(bws):.2f}-{max(bws):.2f})")
        if "one_way_GBps" in s:
            part += f", one-way {s['one_way_GBps']:.2f} GB/s ({s['duplex']} duplex), latency {s['latency_us']:.0f} us"
        if "flat_GBps" in s:
            part += f", all-to-all over every rank {s['flat_GBps']:.2f} GB/s"
        if "collective_GBps" in s:
            part += f", all-gather / reduce-scatter {s['collective_GBps']:.2f} GB/s"
        parts.append(part)
    return "; ".join(parts) or "one rank per node on one node: no link to probe"
