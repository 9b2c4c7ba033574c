"""The router's EP-wide counts folded into the dispatcher's count exchange (locmoe_plugin/folded_counts.py):
bitwise the same aux loss, router-weight gradients, expert bias and budget state as the router's own
all-reduce, on 4 gloo ranks (2 nodes x 2) over a few training steps, with padding masks, a capacity that
drops pairs, a non-finite batch on one rank (every rank skips its steps) and an evaluation forward; and on
one node x 4 through the allgather mode's routing all-gather (equal token counts, a step without tokens). One
spawn."""

import gc
import weakref

import pytest
import torch

from ._dist import run_workers

pytestmark = pytest.mark.multiproc

E, D, K, S = 8, 16, 2, 24

CONFIGS = {
    # dense gate, the "selection" cross-node budget, expert bias, aux and z losses
    "locmoe_selection": dict(routing="locmoe", aux_loss_coeff=0.01, z_loss_coeff=1e-3, expert_bias_rate=0.01),
    # the "loss" budget (locality loss coefficient from the budget) with padding masks
    "locmoe_loss_padding": dict(routing="locmoe", budget_mechanism="loss", aux_loss_coeff=0.01,
                                expert_bias_rate=0.01, padding=True),
    # LocMoE with GrAP, the learned locality loss and bias
    "locmoe_grap_locality": dict(routing="locmoe", gate="grap", locality_loss_coeff=0.01, aux_loss_coeff=0.01),
    # LocMoE+ with a capacity that drops pairs (the aux loss counts requested pairs, before the drops), padding
    "hybrid_dropping": dict(routing="hybrid", capacity="factor", capacity_factor=1.0, min_capacity=0,
                            aux_loss_coeff=0.01, expert_bias_rate=0.01, padding=True),
    # plain top-k, aux loss only, the flat_fast (pairs) count layout
    "topk_flat_fast": dict(routing="topk", aux_loss_coeff=0.01, mode="flat_fast"),
    # one node x 4, the allgather mode with equal token counts: the counts ride in the routing all-gather
    # (comm.gathered_routing); expert bias, padding, and a step in which no rank holds a token
    "allgather_equal_one_node": dict(routing="topk", aux_loss_coeff=0.01, expert_bias_rate=0.01, padding=True,
                                     mode="allgather"),
}


def _bits(t):
    t = t.detach()
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _run(rank, world, name, settings, folded_path):
    import torch.distributed as dist

    from locmoe_plugin import LocMoEConfig, LocMoERouter, Topology
    from locmoe_plugin.comm import TokenDispatcher, build_comm_groups

    settings = dict(settings)
    padding, mode = settings.pop("padding", False), settings.pop("mode", "hierarchical")
    equal = mode == "allgather"  # one node, every rank the same token count
    topo = Topology.from_ranks_per_node(world, world if equal else 2, E, ep_rank=rank)
    cfg = LocMoEConfig(num_experts=E, hidden_size=D, topk=K, **settings)
    torch.manual_seed(0)  # the same gate on every rank and in both paths
    router = LocMoERouter(cfg, topo, group=dist.group.WORLD).train()
    disp = TokenDispatcher(build_comm_groups(topo, dist.group.WORLD), mode, equal_tokens=equal)
    assert disp.gathers_routing == equal
    folds = router.fold_counts_with(disp.groups.ep, one_node_too=disp.gathers_routing) if folded_path else False
    g = torch.Generator().manual_seed(10 + rank)
    steps = []
    for step in range(4):
        x = torch.randn(S if equal else S + 4 * rank, D, generator=g)
        if equal and step == 3:
            x = x[:0]  # no rank holds a token
        if step == 2 and rank == 1:
            x[3] = float("inf")  # non-finite logits on one rank: no expert-bias or budget step anywhere
        valid = (torch.rand(x.shape[0], generator=g) > 0.3) if padding else None
        if padding and rank == 2 and step == 1:
            valid[:] = False  # every token of one rank is padding
        cot = torch.randn(x.shape[0], D, generator=g)
        router.zero_grad(set_to_none=True)
        out = router(x, valid=valid, fold_counts=True)
        assert (out.pending is not None) == folds, (name, folds)
        a = out.assignment
        y = disp.forward(x, a.expert_ids, a.weights, lambda inp, tpe: torch.tanh(inp), folded=out.pending)
        ((y * cot).sum() + out.total_loss).backward()
        grads = [_bits(p.grad) for p in router.parameters() if p.grad is not None]
        steps.append({
            "losses": {key: _bits(v) for key, v in out.losses.items()},
            "total": _bits(out.total_loss),
            "grads": grads if step != 2 else None,  # the non-finite step's gradients are NaN
            "bias": None if router.expert_bias is None else _bits(router.expert_bias.clone()),
            "budget": None if router.budget is None else (_bits(router.budget.strength.clone()),
                                                          router.budget.steps),
        })
    router.eval()
    with torch.no_grad():  # evaluation: the aux loss from the folded counts, no state moves
        x = torch.randn(S, D, generator=g)
        out = router(x, fold_counts=True)
        a = out.assignment
        disp.forward(x, a.expert_ids, a.weights, lambda inp, tpe: inp, folded=out.pending)
        steps.append({"eval_losses": {key: _bits(v) for key, v in out.losses.items()},
                      "bias": None if router.expert_bias is None else _bits(router.expert_bias.clone()),
                      # a call that does not say the dispatcher follows keeps the router's own all-reduce
                      "standalone_pending": router(x).pending is not None})
    # a completed output is freed by reference counting alone (no cycle through its pending counts), as
    # under Megatron's --manual-gc
    ref = weakref.ref(out)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del out, a
        steps[-1]["freed_without_gc"] = ref() is None
    finally:
        if enabled:
            gc.enable()
    return folds, steps


def _one_node_keeps_the_all_reduce(rank, world):
    """On one node x 4 the router does not fold (it keeps its all-reduce), and its output is complete."""
    import torch.distributed as dist

    from locmoe_plugin import LocMoEConfig, LocMoERouter, Topology
    from locmoe_plugin.comm import TokenDispatcher, build_comm_groups

    topo = Topology.from_ranks_per_node(world, world, E, ep_rank=rank)
    router = LocMoERouter(LocMoEConfig(num_experts=E, hidden_size=D, topk=K, routing="topk", aux_loss_coeff=0.01),
                          topo, group=dist.group.WORLD).train()
    disp = TokenDispatcher(build_comm_groups(topo, dist.group.WORLD))
    folds = router.fold_counts_with(disp.groups.ep)
    out = router(torch.randn(S, D), fold_counts=True)
    return folds, out.pending is None and "aux" in out.losses


def _worker(rank, world):
    out = {}
    for name, settings in CONFIGS.items():
        out[name] = {path: _run(rank, world, name, settings, path) for path in (False, True)}
    out["one_node"] = _one_node_keeps_the_all_reduce(rank, world)
    return out


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_folded_counts_bitwise_equal_to_the_all_reduce_2x2():
    results = run_workers(_worker, 4)
    for rank, res in enumerate(results):
        assert res["one_node"] == (False, True), rank  # one node: no fold, the all-reduce path complete
        for name in CONFIGS:
            (folds_old, old), (folds_new, new) = res[name][False], res[name][True]
            assert not folds_old and folds_new, (rank, name)
            assert len(old) == len(new)
            for step, (a, b) in enumerate(zip(old, new)):
                assert _equal(a, b), (rank, name, step, a, b)
            assert "aux" in new[0]["losses"] and "aux" in new[-1]["eval_losses"], (rank, name)
            assert not new[-1]["standalone_pending"], (rank, name)
            assert new[-1]["freed_without_gc"], (rank, name)
            if new[0]["bias"] is not None:  # the non-finite batch (step 2) moved no state on any rank
                assert _equal(new[2]["bias"], new[1]["bias"]), (rank, name)
                assert not _equal(new[1]["bias"], new[0]["bias"]), (rank, name)  # other steps do move it
                assert _equal(new[-1]["bias"], new[3]["bias"]), (rank, name)  # evaluation moves nothing
            if new[0]["budget"] is not None:
                assert _equal(new[2]["budget"][0], new[1]["budget"][0]), (rank, name)
