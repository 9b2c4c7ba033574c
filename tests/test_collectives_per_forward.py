"""Collectives per layer forward of the two-stage dispatch: no metadata all-to-all, in the node or across;
and of router + dispatcher: the router's count all-reduce folded into the dispatcher's count all-gather.

Every hop's routing metadata rides packed behind its payload rows, so one forward
(``TokenDispatcher.forward(expert_fn)``) runs the count all-gather and payload all-to-alls only. One
spawn of 4 gloo ranks: 2 nodes x 2 and 4 nodes x 1. With more than 2 nodes the overlapped path moves
the remote rows in one rail all-to-all per source node each way (a step no rail member moves a row in
is skipped by all).

Router + dispatcher (``LocMoERouter`` then ``TokenDispatcher.forward(..., folded=out.pending)``, as the
DeepSpeed layer runs them; dropless, aux loss and expert bias): with the counts folded
(:meth:`LocMoERouter.fold_counts_with`) the layer forward issues no all-reduce, one collective fewer than
the router's own all-reduce path, at 2 nodes x 2 (the EP group is the world) and 2 nodes x 1 (two EP
groups of 2).
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


def _count_layer_forward(router, disp, x):
    """``(collectives, all-reduces)`` of one training forward of router + dispatcher (no backward)."""
    import torch.distributed as dist

    from locmoe_plugin.comm import counts as counts_module

    calls = []
    saved = counts_module.ALL_GATHER_SINGLE, dist.all_to_all_single, dist.all_reduce

    def counted(kind, fn):
        def call(*a, **kw):
            calls.append(kind)
            return fn(*a, **kw)
        return call

    counts_module.ALL_GATHER_SINGLE = counted("all_gather", saved[0])
    dist.all_to_all_single, dist.all_reduce = counted("all_to_all", saved[1]), counted("all_reduce", saved[2])
    try:
        out = router(x, fold_counts=True)
        a = out.assignment
        disp.forward(x, a.expert_ids, a.weights, lambda inp, tpe: torch.tanh(inp), folded=out.pending)
        out.total_loss  # complete on return
    finally:
        counts_module.ALL_GATHER_SINGLE, dist.all_to_all_single, dist.all_reduce = saved
    return len(calls), calls.count("all_reduce")


def _layer_counts(rank, world):
    """Collectives of one router + dispatcher forward, all-reduce path and folded, at 2 x 2 and 2 x 1."""
    import torch.distributed as dist

    from locmoe_plugin import LocMoEConfig, LocMoERouter, Topology
    from locmoe_plugin.comm import TokenDispatcher, build_comm_groups

    E, k, s = 8, 2, 16
    pairs = [[0, 1], [2, 3]]
    subgroups = [dist.new_group(p) for p in pairs]  # every rank creates every group
    out = {}
    for layout, rpn, group, members in (("2x2", 2, dist.group.WORLD, None), ("2x1", 1, subgroups[rank // 2], pairs)):
        ep_rank = dist.get_rank(group)
        topo = Topology.from_ranks_per_node(2 * rpn, rpn, E, ep_rank=ep_rank)
        disp = TokenDispatcher(build_comm_groups(topo, group, members), "hierarchical")
        # dense gate, random routing (rows cross nodes); the aux loss and the expert bias read the counts
        cfg = LocMoEConfig(num_experts=E, hidden_size=D, topk=k, routing="topk", aux_loss_coeff=0.01,
                           expert_bias_rate=0.01)
        x = torch.randn(s, D, generator=torch.Generator().manual_seed(rank))
        for folded in (False, True):
            torch.manual_seed(7)  # the same gate on every rank and in both forms: the same routing, rows crossing nodes
            router = LocMoERouter(cfg, topo, group=group).train()
            assert router.fold_counts_with(disp.groups.ep) if folded else True
            _count_layer_forward(router, disp, x)  # the first forward's settings agreement is not counted
            out[(layout, folded)] = _count_layer_forward(router, disp, x)
    return out


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
    out["layer"] = _layer_counts(rank, world)
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
        # 4 nodes: every source node's block (3) moves in one rail collective each way, as unsplit
        (1, "random", True): (3, 3, 2),
        (1, "next_node", False): (3, 3, 2),
        (1, "next_node", True): (3, 3, 2),
        "detached_expert_fn": "refused",
        # router + dispatcher, (collectives, all-reduces): the router's all-reduce, then the dispatcher's 5 (2 x 2)
        # or 3 (2 x 1: no node hop); folded into the count all-gather: one fewer, no all-reduce
        "layer": {("2x2", False): (6, 1), ("2x2", True): (5, 0), ("2x1", False): (4, 1), ("2x1", True): (3, 0)},
    }
    for rank, got in enumerate(results):
        assert got == expected, f"rank {rank}: {got}"
