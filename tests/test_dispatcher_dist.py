"""Hierarchical vs flat all-to-all on gloo: bitwise parity, autograd, empty ranks, drops, bytes.

One spawn per world size runs many cases (imports cost seconds per process):
4 ranks = 2 nodes x 2 and 4 nodes x 1; 8 ranks = 2 nodes x 4 and 4 nodes x 2. With more than 2 nodes
the overlapped path moves the remote rows, one block per source node, in one rail collective each way
and works on each block in turn (all-local, all-remote, dropped-slot and empty-rank cases included).
"""

import pytest
import torch

from ._dist import run_workers

pytestmark = pytest.mark.multiproc

D = 16


def _expert_fn(inp, tokens_per_expert, first_expert, W):
    """tanh(x @ W_e) per expert, row-exact: a row's result does not depend on the rows beside it (a BLAS
    matmul may pick another kernel for another row count), so experts run per origin in the overlapped
    forward give the same bits as experts run on all rows at once."""
    outs, start = [], 0
    for le, c in enumerate(tokens_per_expert):
        outs.append(torch.tanh((inp[start : start + c].unsqueeze(2) * W[first_expert + le]).sum(1)))
        start += c
    return torch.cat(outs) if outs else inp[:0]


def _case_inputs(rank, E, k, s, seed, drop_p, only_experts=None):
    g = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randn(s, D, generator=g)
    pool = torch.arange(E) if only_experts is None else torch.tensor(only_experts)
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(s)]) if s else torch.zeros(0, k, dtype=torch.long)
    drop = torch.rand(s, k, generator=g) < drop_p
    ids = torch.where(drop, -1, ids)
    w = torch.where(drop, 0.0, torch.rand(s, k, generator=g))
    return x, ids, w


def _reversed_rail_sum(ext, rail_hop):
    """A deliberately wrong summation order: each token's node copies summed last to first."""
    n = rail_hop.index.numel()
    out = ext.new_zeros((rail_hop.prev_rows,) + tuple(ext.shape[1:]))
    return out.index_add_(0, rail_hop.index.flip(0), ext[:n].flip(0))


# system -> (mode, overlap, through forward(expert_fn))
SYSTEMS = {
    "hierarchical": ("hierarchical", False, False),
    "flat": ("flat", False, False),
    "flat_fast": ("flat_fast", False, False),
    "overlap": ("hierarchical", True, False),  # split by origin, experts on all pairs at once
    "overlap_fwd": ("hierarchical", True, True),  # split by origin, experts per origin (forward)
}


def _run_modes(groups, x, ids, w, W, corrupt=False, wrong_order=False):
    from locmoe_plugin.comm import TokenDispatcher

    t = groups.topology
    first = t.ep_rank * t.experts_per_rank
    res = {}
    for system, (mode, overlap, through_forward) in SYSTEMS.items():
        xx = x.clone().requires_grad_(True)
        ww = w.clone().requires_grad_(True)
        disp = TokenDispatcher(groups, mode, exact_tree=True, overlap=overlap)
        if wrong_order and overlap:
            disp.order_hook = _reversed_rail_sum
        if through_forward:
            y = disp.forward(xx, ids, ww, lambda inp, tpe: _expert_fn(inp, tpe, first, W))
        else:
            inp, h = disp.dispatch(xx, ids, ww)
            tpe = h.tokens_per_expert
            if corrupt and mode == "hierarchical" and len(tpe) > 1 and tpe[0] != tpe[1]:
                tpe = (tpe[1], tpe[0]) + tuple(tpe[2:])  # a deliberately wrong split of the expert rows
            y = disp.combine(_expert_fn(inp, tpe, first, W), h)
        (y * torch.linspace(-1, 1, D)).sum().backward()
        res[system] = dict(y=y.detach(), gx=xx.grad, gw=ww.grad, traffic=disp.traffic.to_dict(),
                           split=None if through_forward else h.plan.origin_split is not None)
    ref = torch.zeros_like(x)
    ref_gw = torch.zeros_like(w)  # d sum(y * c) / d w[tok, j] = c . expert_j(x[tok]); 0 for a dropped slot
    for tok in range(x.shape[0]):
        for j in range(ids.shape[1]):
            if ids[tok, j] >= 0:
                ref[tok] += w[tok, j] * torch.tanh(x[tok] @ W[ids[tok, j]])
                ref_gw[tok, j] = (torch.tanh(x[tok] @ W[ids[tok, j]]) * torch.linspace(-1, 1, D)).sum()
    res["ref"] = ref
    res["ref_gw"] = ref_gw
    # tokens with two or more experts on one remote node: hierarchical must send strictly fewer bytes
    e2n = torch.tensor(t.node_of_rank).repeat_interleave(t.experts_per_rank)
    valid = ids >= 0
    remote = valid & (e2n[ids.clamp_min(0)] != t.node)
    per_node = torch.zeros(x.shape[0], t.num_nodes, dtype=torch.long)
    per_node.scatter_add_(1, e2n[ids.clamp_min(0)], remote.long())
    res["shared_remote_node"] = bool((per_node >= 2).any())
    return res


def _worker(rank, world, layouts):
    import torch.distributed as dist

    from locmoe_plugin import Topology
    from locmoe_plugin.comm import build_comm_groups

    out = []
    for rpn, E, k in layouts:
        topo = Topology.from_ranks_per_node(world, rpn, E, ep_rank=rank)
        groups = build_comm_groups(topo, dist.group.WORLD)
        W = torch.randn(E, D, D, generator=torch.Generator().manual_seed(5)) / 4
        e_r = topo.experts_per_rank
        own = [e for q in topo.ranks_of_node(topo.node) for e in range(q * e_r, (q + 1) * e_r)]
        others = [e for e in range(E) if e not in own]
        cases = {
            "uneven": _case_inputs(rank, E, k, 5 + 7 * rank, 1, 0.0),
            "drops": _case_inputs(rank, E, k, 12, 2, 0.3),
            # rank 1 has no tokens at all; experts only on ranks 0 and world-1: the others receive nothing
            "empty": _case_inputs(
                rank, E, min(k, 2), 0 if rank == 1 else 9, 3, 0.1,
                only_experts=list(range(E // world)) + list(range(E - E // world, E)),
            ),
            "all_dropped": _case_inputs(rank, E, k, 4, 4, 1.0),
            # every pair stays on the token's node / every pair crosses nodes
            "all_local": _case_inputs(rank, E, min(k, len(own)), 8, 7, 0.1, only_experts=own),
            "all_remote": _case_inputs(rank, E, k, 8, 8, 0.1, only_experts=others) if others else None,
        }
        for name, case in cases.items():
            if case is None:
                continue
            x, ids, w = case
            out.append(((rpn, E, k), name, _run_modes(groups, x, ids, w, W)))
        x, ids, w = cases["uneven"]
        out.append(((rpn, E, k), "corrupt", _run_modes(groups, x, ids, w, W, corrupt=True)))
        if rpn < world:  # several nodes: the overlapped path with a wrong rail-level summation order
            x, ids, w = _case_inputs(rank, E, k, 40, 6, 0.0)
            out.append(((rpn, E, k), "wrong_order", _run_modes(groups, 100 * x, ids, w, W, wrong_order=True)))
    return out


def _check(results):
    saw_strict = False
    for rank_results in results:
        for layout, name, r in rank_results:
            h, f, ff = r["hierarchical"], r["flat"], r["flat_fast"]
            tag = f"{layout} {name}"
            if name in ("corrupt", "wrong_order"):
                continue
            # the split runs exactly when some row crosses nodes (all_local: none anywhere -> unsplit)
            several_nodes = layout[0] < len(results)
            if name in ("all_local", "all_remote", "uneven"):
                assert r["overlap"]["split"] == (several_nodes and name != "all_local"), tag
            # bitwise parity of output, input gradient and weight gradient; overlapped == not == flat
            for other in ("flat", "overlap", "overlap_fwd"):
                for key in ("y", "gx", "gw"):
                    assert torch.equal(h[key], r[other][key]), f"{tag} {other} {key}"
                assert r[other]["traffic"] == (h if other != "flat" else f)["traffic"], f"{tag} {other}"
            torch.testing.assert_close(h["y"], r["ref"], rtol=1e-5, atol=1e-5, msg=tag)
            torch.testing.assert_close(h["gw"], r["ref_gw"], rtol=1e-5, atol=1e-5, msg=tag)
            torch.testing.assert_close(ff["gw"], r["ref_gw"], rtol=1e-5, atol=1e-5, msg=tag)
            torch.testing.assert_close(ff["y"], h["y"], rtol=1e-5, atol=1e-6, msg=tag)
            torch.testing.assert_close(ff["gx"], h["gx"], rtol=1e-5, atol=1e-6, msg=tag)
            assert f["traffic"] == ff["traffic"], tag
            hi, fi = h["traffic"]["inter_bytes"], f["traffic"]["inter_bytes"]
            assert hi <= fi, tag
            if r["shared_remote_node"]:
                assert hi < fi, tag
                saw_strict = True
            if name == "all_dropped":
                assert (h["y"] == 0).all() and (h["gx"] == 0).all() and fi == 0
    assert saw_strict
    # the deliberately wrong split must break the comparison on some rank (the test can fail)
    broken = [
        not torch.equal(r["hierarchical"]["y"], r["flat"]["y"])
        for rank_results in results
        for _, name, r in rank_results
        if name == "corrupt"
    ]
    assert any(broken)
    # the overlapped path summing the node copies in the wrong order must differ somewhere (the
    # comparison above can fail); layouts with >= 3 nodes per token only
    wrong = [
        not torch.equal(r["overlap"]["y"], r["hierarchical"]["y"])
        for rank_results in results
        for layout, name, r in rank_results
        if name == "wrong_order" and layout[0] * 3 <= len(results)
    ]
    assert not wrong or any(wrong), "a reversed rail-level sum gave identical results"
    return wrong


def test_hierarchical_equals_flat_4_ranks_2x2_4x1_and_one_node():
    wrong = _check(run_workers(_worker, 4, [(2, 8, 3), (2, 4, 2), (4, 8, 3), (1, 8, 3)]))
    assert wrong and any(wrong)  # 4 nodes x 1, k = 3: tokens with three node copies exist


def test_hierarchical_equals_flat_8_ranks_2x4_and_4x2():
    wrong = _check(run_workers(_worker, 8, [(4, 16, 4), (2, 8, 3)]))
    assert wrong and any(wrong)  # 4 nodes x 2, k = 3: tokens with three node copies exist


def test_chunks_argument_names_overlap():
    from locmoe_plugin import Topology
    from locmoe_plugin.comm import CommGroups, TokenDispatcher

    topo = Topology.from_ranks_per_node(1, 1, 4, ep_rank=0)
    disp = TokenDispatcher(CommGroups(topo, None, None, None, (0,)), "hierarchical", overlap=True)
    assert not disp.overlap_active  # one node: nothing to hide
    with pytest.raises(ValueError, match="overlap=True"):
        disp.forward(torch.ones(2, D), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), lambda i, t: i, chunks=2)


def _bytes_worker(rank, world):
    import torch.distributed as dist

    from locmoe_plugin import Topology
    from locmoe_plugin.comm import TokenDispatcher, build_comm_groups

    topo = Topology.from_ranks_per_node(4, 2, 8, ep_rank=rank)  # experts 2r, 2r+1 on rank r
    groups = build_comm_groups(topo, dist.group.WORLD)
    if rank == 0:  # token 0 -> experts 4 (rank 2) and 6 (rank 3); token 1 -> experts 4 and 5 (rank 2)
        ids = torch.tensor([[4, 6], [4, 5]])
    else:
        ids = torch.zeros(0, 2, dtype=torch.long)
    x = torch.ones(ids.shape[0], D)
    w = torch.full(ids.shape, 0.5)
    out = {}
    for mode in ("hierarchical", "flat"):
        disp = TokenDispatcher(groups, mode)
        inp, h = disp.dispatch(x, ids, w)
        disp.combine(inp, h)
        out[mode] = disp.traffic.to_dict()
    # bad input on one rank: every rank raises the same error after the count exchange, none hangs
    bad = torch.tensor([[99, 0]]) if rank == 1 else torch.zeros(0, 2, dtype=torch.long)
    for mode in ("hierarchical", "flat_fast"):  # flat_fast counts pairs per expert only: same check
        try:
            TokenDispatcher(groups, mode).dispatch(torch.ones(bad.shape[0], D), bad, torch.ones(bad.shape))
            out[f"bad_ids_error_{mode}"] = None
        except ValueError as exc:
            out[f"bad_ids_error_{mode}"] = str(exc)
    return out


def test_hand_worked_bytes():
    """2 nodes x 2 ranks, 8 experts, d=16 fp32 (64 B per row). Rank 0 (node 0) sends token 0 to experts
    4, 6 (ranks 2, 3 on node 1) and token 1 to experts 4, 5 (both on rank 2).
    flat: 4 pairs cross the network: 256 B each way.
    hierarchical: each token crosses once to rank 2 (its rail peer): 128 B each way; rank 2 then
    forwards token 0 to rank 3 inside node 1: 64 B intra-node each way."""
    res = run_workers(_bytes_worker, 4)
    assert res[0]["flat"]["dispatch_inter_bytes"] == 256 and res[0]["flat"]["combine_inter_bytes"] == 256
    assert res[0]["flat"]["intra_bytes"] == 0
    assert res[0]["hierarchical"]["dispatch_inter_bytes"] == 128
    assert res[0]["hierarchical"]["combine_inter_bytes"] == 128
    assert res[0]["hierarchical"]["intra_bytes"] == 0
    assert res[2]["hierarchical"]["dispatch_intra_bytes"] == 64 and res[2]["hierarchical"]["combine_intra_bytes"] == 64
    assert res[2]["hierarchical"]["inter_bytes"] == 0
    for r in (1, 3):
        assert res[r]["hierarchical"]["inter_bytes"] == res[r]["hierarchical"]["intra_bytes"] == 0
    for r in range(4):
        for mode in ("hierarchical", "flat_fast"):
            assert "expert ids outside [-1, 8) on EP rank(s) [1]" in res[r][f"bad_ids_error_{mode}"]


def _single_rank_worker(rank, world):
    import torch.distributed as dist

    from locmoe_plugin import Topology
    from locmoe_plugin.comm import build_comm_groups

    groups = build_comm_groups(Topology.single_node(1, 4), dist.group.WORLD)
    W = torch.randn(4, D, D, generator=torch.Generator().manual_seed(6)) / 4
    return [_run_modes(groups, *_case_inputs(0, 4, 2, 9, seed, p), W) for seed, p in ((1, 0.0), (2, 0.4))]


def test_one_rank_group_all_modes():
    """EP = 1 (no peer, no all-to-all): every mode is a local permutation and must still be exact."""
    for r in run_workers(_single_rank_worker, 1)[0]:
        h, f, ff = r["hierarchical"], r["flat"], r["flat_fast"]
        assert torch.equal(h["y"], f["y"]) and torch.equal(h["gx"], f["gx"])
        for m in (h, ff):
            torch.testing.assert_close(m["y"], r["ref"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(m["gw"], r["ref_gw"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ff["gx"], h["gx"], rtol=1e-5, atol=1e-6)
        assert h["traffic"]["inter_bytes"] == ff["traffic"]["inter_bytes"] == 0


def test_hierarchical_runs_the_pairs_plan_on_one_node_only():
    from locmoe_plugin import Topology
    from locmoe_plugin.comm.dispatcher import resolve_mode

    one, two = Topology.single_node(4, 8), Topology.from_ranks_per_node(4, 2, 8)
    assert resolve_mode("hierarchical", one) == "flat_fast"
    assert resolve_mode("hierarchical", one, exact_tree=True) == "hierarchical"
    assert resolve_mode("hierarchical", two) == "hierarchical"
    assert resolve_mode("flat", one) == "flat" and resolve_mode("flat", two) == "flat"


def _one_node_worker(rank, world):
    import torch.distributed as dist

    from locmoe_plugin import Topology
    from locmoe_plugin.comm import TokenDispatcher, build_comm_groups

    groups = build_comm_groups(Topology.single_node(world, 8, ep_rank=rank), dist.group.WORLD)
    W = torch.randn(8, D, D, generator=torch.Generator().manual_seed(7)) / 4
    x, ids, w = _case_inputs(rank, 8, 3, 13 + 3 * rank, 4, 0.25)
    out = {}
    for name, mode, exact in (("default", "hierarchical", False), ("tree", "hierarchical", True), ("pairs", "flat_fast", False)):
        disp = TokenDispatcher(groups, mode, exact_tree=exact)
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        inp, h = disp.dispatch(xx, ids, ww)
        y = disp.combine(_expert_fn(inp, h.tokens_per_expert, rank * 4, W), h)
        (y * torch.linspace(-1, 1, D)).sum().backward()
        out[name] = dict(plan=disp.plan_mode, y=y.detach(), gx=xx.grad, gw=ww.grad, intra=disp.traffic.intra_bytes)
    return out


def test_hierarchical_on_one_node_matches_the_two_stage_plan():
    """2 ranks on one node: the default hierarchical dispatcher builds the pairs plan (bitwise the
    flat_fast result, pairs' bytes) and agrees with the forced two-stage plan to fp32 rounding."""
    for r in run_workers(_one_node_worker, 2):
        d, t, p = r["default"], r["tree"], r["pairs"]
        assert (d["plan"], t["plan"], p["plan"]) == ("flat_fast", "hierarchical", "flat_fast")
        for key in ("y", "gx", "gw"):
            assert torch.equal(d[key], p[key])
            torch.testing.assert_close(d[key], t[key], rtol=1e-5, atol=1e-6)
        assert d["intra"] == p["intra"] >= t["intra"]
