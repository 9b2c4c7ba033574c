"""``locmoe bandwidth``: the all-to-all bandwidth inside a node and between nodes of the current layout.

Every multi-node result depends on the link between nodes; this command measures it with the
collective the dispatchers use, so a result can name the link it ran on:

- intra-node: ``all_to_all_single`` over each node's ranks (all nodes at once);
- inter-node: ``all_to_all_single`` over each rail (the ranks with the same local index on every node,
  all rails at once), i.e. the path the hierarchical dispatcher's inter-node stage takes; and an
  ``all_to_all_single`` over every rank, in which every rank of the other nodes is a peer (the pattern of
  the pairs all-to-alls), with the same inter-node bytes per rank.

Bandwidth = bytes one rank sends to the other members of its group / the collective's time (median
of ``--iters`` after 2 warm-ups, slowest rank), in GB/s per rank (1 GB = 1e9 bytes). ``--mib`` is the
payload to each peer. The link settings in force (``LOCMOE_LINK`` from ``launch/emulate_nodes.sh
--link``, NCCL's socket variables) are printed and returned beside the numbers.

Run standalone (``--nproc P`` spawns P local processes) or under a launcher that sets RANK /
WORLD_SIZE / LOCAL_RANK (torchrun, ``launch/emulate_nodes.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from ..device import backend_for, get_accelerator
from .launch import add_launch_arguments, init_process_group, launched, set_spawned_rank, spawn_local

#: environment variables that shape the link between (emulated) nodes, recorded with each measurement
LINK_ENV = ("LOCMOE_LINK", "NCCL_NSOCKS_PERTHREAD", "NCCL_SOCKET_NTHREADS", "NCCL_NCHANNELS_PER_NET_PEER",
            "NCCL_P2P_NET_CHUNKSIZE", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE",
            "NCCL_NET")


def link_settings() -> dict:
    """The link's name (``LOCMOE_LINK``; "slow" / "fast" under ``launch/emulate_nodes.sh``, else
    "unnamed") and the NCCL variables that shape it, as set in this process."""
    env = {k: os.environ[k] for k in LINK_ENV[1:] if k in os.environ}
    return {"link": os.environ.get("LOCMOE_LINK", "unnamed"), "env": env}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_launch_arguments(p, gpus_per_node_default="the world size")
    p.add_argument("--mib", type=float, default=32.0, help="MiB each rank sends to each peer")
    p.add_argument("--iters", type=int, default=5, help="timed all-to-alls per group (after 2 warm-ups)")


def time_all_to_all(group, out: torch.Tensor, inp: torch.Tensor, dev, sync, iters: int,
                    out_splits=None, in_splits=None) -> float:
    """Median seconds of ``all_to_all_single(out, inp, out_splits, in_splits, group=group)`` over ``iters``
    calls after 2 warm-ups (:func:`time_collective`). A collective: every rank calls it (each for its own
    group, all groups at once)."""
    return time_collective(lambda: dist.all_to_all_single(out, inp, out_splits, in_splits, group=group),
                           dev, sync, iters)


def time_collective(call, dev, sync, iters: int) -> float:
    """Median seconds of ``call()`` (one collective) over ``iters`` calls after 2 warm-ups, each between a
    world barrier and a device ``sync()``; the slowest rank of the world. Every rank calls it."""
    samples = []
    for it in range(2 + iters):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        call()
        sync()
        if it >= 2:
            samples.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(samples)], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _a2a_seconds(group, per_peer_bytes: int, dev, sync, iters: int) -> float:
    """Median seconds of one ``all_to_all_single`` over ``group`` with ``per_peer_bytes`` to each member,
    slowest rank of the world (every rank calls this for its own group, all groups at once)."""
    n = dist.get_world_size(group)
    numel = max(1, per_peer_bytes // 2) * n  # bf16 elements
    buf = torch.ones(numel, dtype=torch.bfloat16, device=dev)
    return time_all_to_all(group, torch.empty_like(buf), buf, dev, sync, iters)


def node_and_rail_groups(gpus_per_node: int) -> tuple[object, object]:
    """``(node group, rail group)`` of this rank, with ``gpus_per_node`` consecutive ranks per node: its
    node's ranks, and the ranks of its local index on every node. Every rank creates every group, in the
    same order (a collective: call it on every rank, with ``gpus_per_node`` dividing the world size)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    nodes = world // gpus_per_node
    node_group = rail_group = None
    for n in range(nodes):
        g = dist.new_group(list(range(n * gpus_per_node, (n + 1) * gpus_per_node)))
        if n == rank // gpus_per_node:
            node_group = g
    for j in range(gpus_per_node):
        g = dist.new_group([n * gpus_per_node + j for n in range(nodes)])
        if j == rank % gpus_per_node:
            rail_group = g
    return node_group, rail_group


def measure_bandwidth(gpus_per_node: int, dev, sync, mib: float = 32.0, iters: int = 5) -> dict:
    """Intra- and inter-node all-to-all bandwidth of the current world (a collective: every rank calls
    it with the same arguments). Creates its node and rail groups once per call (every rank creates
    every group, in the same order). Returns GB/s per rank (None where the layout has no such link:
    one rank per node has no intra-node peer, one node has no inter-node one) plus the link settings.

    Two inter-node figures: ``inter_node_gbps`` over the rail group (one peer on each other node: the
    hierarchical plan's inter-node hop; ``mib`` MiB to each peer) and ``inter_node_all_peers_gbps``, the
    bytes one rank sends to the other nodes' ranks over the time of an all-to-all over the whole world
    (every remote rank a peer: the pairs all-to-all of Megatron's ``alltoall`` dispatcher, DeepSpeed and
    LocMoE's flat plan; its intra-node part runs beside it) with ``mib / gpus_per_node`` MiB to every rank:
    the same inter-node bytes per rank as the rail exchange, and buffers of the same size at any world
    size. A link whose all-peers figure is well above the rail figure gives a rank more rate the more
    remote peers it has (on the emulated nodes' socket transport it was 1.6 x with 8 sockets x 8 threads,
    which fits a limit per connection), and the rail hop does not get the link's whole rate."""
    world = dist.get_world_size()
    if gpus_per_node < 1 or world % gpus_per_node:
        raise ValueError(f"--gpus-per-node {gpus_per_node} must divide the world size {world}")
    if mib <= 0 or iters < 1:
        raise ValueError("--mib must be > 0 and --iters >= 1")
    nodes = world // gpus_per_node
    node_group, rail_group = node_and_rail_groups(gpus_per_node)
    per_peer = int(mib * 2**20)
    out = {"ranks": world, "nodes": nodes, "ranks_per_node": gpus_per_node, "mib_per_peer": mib, **link_settings()}
    for name, group, peers in (("intra_node", node_group, gpus_per_node - 1), ("inter_node", rail_group, nodes - 1)):
        if peers == 0:
            out[f"{name}_gbps"] = out[f"{name}_ms"] = None
            continue
        sec = _a2a_seconds(group, per_peer, dev, sync, iters)
        out[f"{name}_ms"] = sec * 1e3
        out[f"{name}_gbps"] = per_peer * peers / sec / 1e9
    remote = world - gpus_per_node  # ranks on the other nodes
    out["inter_node_all_peers_gbps"] = out["inter_node_all_peers_ms"] = None
    if nodes > 1:
        each = max(2, per_peer // gpus_per_node // 2 * 2)  # whole bf16 elements: (nodes - 1) x per_peer across nodes
        sec = _a2a_seconds(None, each, dev, sync, iters)
        out["inter_node_all_peers_ms"] = sec * 1e3
        out["inter_node_all_peers_gbps"] = each * remote / sec / 1e9
    return out


def format_bandwidth(r: dict) -> str:
    def gb(v):
        return "-" if v is None else f"{v:.2f} GB/s"

    ratio = (f" (intra / inter {r['intra_node_gbps'] / r['inter_node_gbps']:.0f} x)"
             if r["intra_node_gbps"] and r["inter_node_gbps"] else "")
    env = " ".join(f"{k}={v}" for k, v in r["env"].items()) or "NCCL defaults"
    return (f"bandwidth: {r['ranks']} ranks = {r['nodes']} node(s) x {r['ranks_per_node']}, link {r['link']} ({env}), "
            f"all-to-all {r['mib_per_peer']:g} MiB per peer: intra-node {gb(r['intra_node_gbps'])}, "
            f"inter-node {gb(r['inter_node_gbps'])} per rank{ratio}" + _all_peers(r))


def _all_peers(r: dict) -> str:
    """The all-peers inter-node figure beside the rail one, where measured (more than one node)."""
    if not r.get("inter_node_all_peers_gbps") or not r.get("inter_node_gbps"):
        return ""
    return (f"; with every remote rank a peer {r['inter_node_all_peers_gbps']:.2f} GB/s per rank "
            f"({r['inter_node_all_peers_gbps'] / r['inter_node_gbps']:.2f} x the rail's one peer per node)")


def _worker(args: argparse.Namespace, result_path: str | None) -> None:
    acc = init_process_group(args.backend)
    local = int(os.environ.get("LOCAL_RANK", 0))
    try:
        dev = acc.device(None if acc.is_cpu else local)
        r = measure_bandwidth(args.gpus_per_node or dist.get_world_size(), dev, acc.synchronize, args.mib, args.iters)
        if dist.get_rank() == 0:
            print(format_bandwidth(r), flush=True)
            for path in (result_path, args.json):
                if path:
                    with open(path, "w") as f:
                        json.dump(r, f, indent=2)
    finally:
        dist.destroy_process_group()


def _spawn_entry(local_rank: int, args: argparse.Namespace, port: int, result_path: str) -> None:
    set_spawned_rank(local_rank, args.nproc, port)
    _worker(args, result_path if local_rank == 0 else None)


def run(args: argparse.Namespace) -> int:
    if args.backend is None:
        args.backend = backend_for(get_accelerator().device_type)
    joined = launched()
    world = int(os.environ["WORLD_SIZE"]) if joined else args.nproc
    if args.gpus_per_node is None:
        from ..env import env_int

        args.gpus_per_node = env_int("LOCMOE_GPUS_PER_NODE", 1)  # a bad value: one error naming the variable
    gpn = args.gpus_per_node or world
    if gpn < 1 or world % gpn:
        raise ValueError(f"--gpus-per-node {gpn} must divide the number of ranks {world}")
    if args.mib <= 0 or args.iters < 1:
        raise ValueError("--mib must be > 0 and --iters >= 1")
    if joined:
        _worker(args, None)
        return 0
    result, failure = spawn_local(_spawn_entry, args, "bandwidth.json")
    if failure or result is None:
        print(f"bandwidth: a rank failed: {failure}", file=sys.stderr)
        return 1
    return 0
