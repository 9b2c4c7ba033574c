"""``locmoe bandwidth`` (locmoe_plugin.comm.bandwidth): the rail and all-peers inter-node figures, on gloo."""

import torch

from locmoe_plugin.comm import bandwidth
from tests._dist import run_workers

MIB = 1 / 16  # 64 KiB per peer: a quick gloo exchange


def _measure(rank, world, gpus_per_node, fixed_seconds):
    if fixed_seconds:  # the formulas, apart from the timing: the world all-to-all "takes" 1 ms, a group's 2 ms
        import torch.distributed as dist

        bandwidth._a2a_seconds = lambda group, *a: 1e-3 if dist.get_world_size(group) == world else 2e-3
    r = bandwidth.measure_bandwidth(gpus_per_node, torch.device("cpu"), lambda: None, mib=MIB, iters=1)
    return {k: r[k] for k in r if k.endswith(("_gbps", "_ms"))} | {"line": bandwidth.format_bandwidth(r)}


def test_two_nodes_report_the_rail_and_every_remote_peer():
    per_peer = int(MIB * 2**20)
    fixed = run_workers(_measure, 4, 2, True)[0]
    assert fixed["inter_node_gbps"] == per_peer * 1 / 2e-3 / 1e9  # one rail peer
    # the two ranks of the other node, half as much to each: the rail's inter-node bytes per rank
    assert fixed["inter_node_all_peers_gbps"] == per_peer / 2 * 2 / 1e-3 / 1e9
    assert "2.00 x the rail's one peer per node" in fixed["line"]
    timed = run_workers(_measure, 4, 2, False)[0]
    assert timed["inter_node_all_peers_gbps"] > 0 and timed["inter_node_all_peers_ms"] > 0
    assert "with every remote rank a peer" in timed["line"]


def test_one_node_has_no_inter_node_figures():
    r = run_workers(_measure, 2, 2, False)[0]
    assert r["inter_node_gbps"] is None and r["inter_node_all_peers_gbps"] is None
    assert r["intra_node_gbps"] > 0 and "every remote rank" not in r["line"]
