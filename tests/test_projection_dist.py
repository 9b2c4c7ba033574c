"""The projection's traffic terms against the dispatcher's own TrafficCounter on gloo (2 nodes x 2)."""

import numpy as np
import pytest
import torch

from ._dist import run_workers

pytestmark = pytest.mark.multiproc

E, K, S, D = 16, 4, 3000, 8


def _routing(rank, share, seed):
    """Each token: m ~ Bin(k, share) experts on the other node, k - m on its own, uniform and distinct."""
    g = torch.Generator().manual_seed(seed * 10 + rank)
    node, g_per_node = rank // 2, E // 2
    own = torch.arange(node * g_per_node, (node + 1) * g_per_node)
    other = torch.arange((1 - node) * g_per_node, (2 - node) * g_per_node)
    m = (torch.rand(S, K, generator=g) < share).sum(1)
    rows = []
    for t in range(S):
        a = own[torch.randperm(g_per_node, generator=g)[: K - m[t]]]
        b = other[torch.randperm(g_per_node, generator=g)[: m[t]]]
        rows.append(torch.cat([a, b]))
    return torch.stack(rows)


def _worker(rank, world):
    import torch.distributed as dist

    from locmoe_plugin.comm import TokenDispatcher, build_comm_groups
    from locmoe_plugin.topology import Topology

    topo = Topology.from_ranks_per_node(world, 2, E, ep_rank=rank)
    groups = build_comm_groups(topo, dist.group.WORLD)
    out = []
    for share in (0.1, 0.6):
        ids = _routing(rank, share, 7)
        x = torch.randn(S, D)
        w = torch.ones(S, K)
        res = {"share": share, "ids": ids.numpy()}
        for mode in ("hierarchical", "flat_fast"):
            disp = TokenDispatcher(groups, mode)
            inp, h = disp.dispatch(x, ids, w)
            disp.combine(inp, h)
            res[mode] = disp.traffic.to_dict()
        out.append(res)
    return out


def test_traffic_terms_match_the_counter():
    from locmoe_plugin.projection import count_rows, expected_rows
    from locmoe_plugin.projection.traffic import node_pmfs

    results = run_workers(_worker, 4)
    row = D * 4  # fp32
    for case in range(2):
        share = results[0][case]["share"]
        ids = [results[p][case]["ids"] for p in range(4)]
        counted = count_rows(ids, 2, 2, E)
        own, rem = node_pmfs("share", 2, 2, E, K, share=share)
        for plan, mode in (("hierarchical", "hierarchical"), ("pairs", "flat_fast")):
            exp = expected_rows(plan, 2, 2, E, K, S, own, rem)
            for p in range(4):
                tr = results[p][case][mode]
                c = counted[p][plan]
                # exact: the same routing counted here and by the dispatcher (dispatch + combine)
                assert tr["dispatch_inter_bytes"] == c.inter * row == tr["combine_inter_bytes"]
                assert tr["dispatch_intra_bytes"] == c.intra * row == tr["combine_intra_bytes"]
            # the closed form is an expectation: 4 ranks x 3000 tokens, within 3 %
            mean_inter = np.mean([counted[p][plan].inter for p in range(4)])
            mean_intra = np.mean([counted[p][plan].intra for p in range(4)])
            assert mean_inter == pytest.approx(exp.inter, rel=0.03), (plan, share)
            assert mean_intra == pytest.approx(exp.intra, rel=0.03), (plan, share)
