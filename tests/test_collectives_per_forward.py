"""Collectives per layer forward of the two-stage dispatch: no metadata all-to-all, in the node or across.

Every hop's routing metadata rides packed behind its payload rows, so one forward
(``TokenDispatcher.forward(expert_fn)``) runs the count all-gather and payload all-to-alls only. One
spawn of 4 gloo ranks: 2 nodes x 2 and 4 nodes x 1. With more than 2 nodes the overlapped path moves
the remote rows in one rail all-to-all per source node each way (a step no rail member moves a row in
is skipped by all).
"""

import pytest
import torch

from ._dist import run_workers

pytestmark = pytest.mark.multiproc

D = 8


def _count_forward(disp, x, ids, w):
    """``(collectives, collectives on a group spanning nodes, all-to-alls on the rail group)`` of one
    forward without backward."""
    import torch.distributed as dist

    from locmoe_plugin.comm import counts as counts_module

    node_group = disp.groups.node if disp.topology.num_nodes > 1 and disp.topology.ranks_per_node > 1 else None
    calls = []
    saved_gather, saved_a2a = counts_module.ALL_GATHER_SINGLE, dist.all_to_all_single

    def gather(*a, **kw):
        calls.append("ep")
        return saved_gather(*a, **kw)

    def a2a(*a, group=None, **kw):
        rail = group is not None and group is disp.groups.rail
        calls.append("node" if group is not None and group is node_group else "rail" if rail else "wide")
        return saved_a2a(*a, group=group, **kw)

    counts_module.ALL_GATHER_SINGLE, dist.all_to_all_single = gather, a2a
    try:
        disp.forward(x, ids, w, lambda inp, tpe: torch.tanh(inp))
    finally:
        counts_module.ALL_GATHER_SINGLE, dist.all_to_all_single = saved_gather, saved_a2a
    return len(calls), sum(c != "node" for c in calls), calls.count("rail")


def _worker(rank, world):
    import torch.distributed as dist

    from locmoe_plugin import Topology
    from locmoe_plugin.comm import TokenDispatcher, build_comm_groups

    out = {}
    E, k, s = 8, 3, 16
    for rpn in (2, 1):
        topo = Topology.from_ranks_per_node(world, rpn, E, ep_rank=rank)
        groups = build_comm_groups(topo, dist.group.WORLD)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(s, D, generator=g)
        w = torch.rand(s, k, generator=g)
        e_r = topo.experts_per_rank
        own = [e for q in topo.ranks_of_node(topo.node) for e in range(q * e_r, (q + 1) * e_r)]
        cases = {"random": torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(s)])}
        if rpn > 1:  # every pair on the token's own node
            cases["all_local"] = torch.tensor(own)[torch.stack([torch.randperm(len(own), generator=g)[:k]
                                                                 for _ in range(s)])]
        else:  # every pair on the next node's rank: only the first rail step moves rows
            nxt = (topo.node + 1) % topo.num_nodes * e_r
            cases["next_node"] = torch.tensor([[nxt, nxt + 1, -1]] * s)
        for name, ids in cases.items():
            for overlap in (False, True):
                disp = TokenDispatcher(groups, "hierarchical", overlap=overlap)
                out[(rpn, name, overlap)] = _count_forward(disp, x, ids, w)
        if rpn > 1:
            # an expert_fn whose output has no autograd history is refused on every rank, not left to
            # skip its block's backward rail step on some ranks
            disp = TokenDispatcher(groups, "hierarchical", overlap=True)
            try:
                disp.forward(x.clone().requires_grad_(True), cases["random"], w,
                             lambda inp, tpe: torch.zeros(inp.shape[0], D))
                out["detached_expert_fn"] = "accepted"
            except ValueError as e:
                out["detached_expert_fn"] = "refused" if "autograd history" in str(e) else str(e)
    return out


def test_collectives_per_forward_2x2_and_4x1():
    results = run_workers(_worker, 4)
    expected = {
        # count all-gather; rail out; node out; node back; rail back (2 on the rail group + the all-gather)
        (2, "random", False): (5, 3, 2),
        # count all-gather; remote rows' rail out (2 nodes: one step); local and remote node out; remote
        # node back, rail back, local node back
        (2, "random", True): (7, 3, 2),
        # nothing crosses nodes: the unsplit plan, count all-gather and the node hop each way
        (2, "all_local", False): (3, 1, 0),
        (2, "all_local", True): (3, 1, 0),
        # one rank a node: no node hop; count all-gather and the rail hop each way
        (1, "random", False): (3, 3, 2),
        # 4 nodes: one rail step per source node (3) each way
        (1, "random", True): (7, 7, 6),
        (1, "next_node", False): (3, 3, 2),
        # only step 1 (to the next node) moves rows on any rank: steps 2 and 3 are skipped everywhere
        (1, "next_node", True): (3, 3, 2),
        "detached_expert_fn": "refused",
    }
    for rank, got in enumerate(results):
        assert got == expected, f"rank {rank}: {got}"
