"""The ``allgather`` dispatcher (EP group inside one node) on gloo, 4 ranks as one node x 4, fp32.

Against the pairs plan (``flat_fast``, what the default builds on one node) and a per-token reference:
outputs, input gradients and combine-weight gradients allclose (bitwise at top-1, where a token has one
row); the experts see the same rows in the same order. Cases: uneven token counts, drop-heavy, a rank
without tokens and ranks without pairs, everything dropped, no tokens anywhere, top-1..4, one and two
experts per rank. Then the Megatron ``LocMoELayer`` with ``dispatcher="allgather"`` against the default
one (outputs, input and every weight gradient). One spawn for all of it; the refusal across nodes and
the settings need none.
"""

import pytest
import torch

from ._dist import run_workers
from .test_dispatcher_dist import D, _case_inputs, _expert_fn

MODES = ("flat_fast", "allgather")


def _run(groups, x, ids, w, W, mode):
    from locmoe_plugin.comm import TokenDispatcher

    t = groups.topology
    xx = x.clone().requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    disp = TokenDispatcher(groups, mode)
    inp, h = disp.dispatch(xx, ids, ww)
    y = disp.combine(_expert_fn(inp, h.tokens_per_expert, t.ep_rank * t.experts_per_rank, W), h)
    (y * torch.linspace(-1, 1, D)).sum().backward()
    return dict(y=y.detach(), gx=xx.grad, gw=ww.grad, inp=inp.detach(), tpe=h.tokens_per_expert,
                plan=disp.plan_mode, traffic=disp.traffic.to_dict())


def _reference(x, ids, w, W):
    ref = torch.zeros_like(x)
    for tok in range(x.shape[0]):
        for j in range(ids.shape[1]):
            if ids[tok, j] >= 0:
                ref[tok] += w[tok, j] * torch.tanh(x[tok] @ W[ids[tok, j]])
    return ref


def _core_cases(rank, world):
    import torch.distributed as dist

    from locmoe_plugin import Topology
    from locmoe_plugin.comm import build_comm_groups

    out = []
    for E, ks in ((8, (1, 2, 3, 4)), (4, (3,))):
        topo = Topology.from_ranks_per_node(world, world, E, ep_rank=rank)
        groups = build_comm_groups(topo, dist.group.WORLD)
        W = torch.randn(E, D, D, generator=torch.Generator().manual_seed(5)) / 4
        for k in ks:
            cases = {
                "uneven": _case_inputs(rank, E, k, 5 + 7 * rank, 1, 0.0),
                "drops": _case_inputs(rank, E, k, 12, 2, 0.6),
                # rank 1 has no tokens; experts only on ranks 0 and 3: ranks 1 and 2 receive nothing
                "empty": _case_inputs(rank, E, min(k, 2), 0 if rank == 1 else 9, 3, 0.1,
                                      only_experts=list(range(E // world)) + list(range(E - E // world, E))),
                "all_dropped": _case_inputs(rank, E, k, 4, 4, 1.0),
                "no_tokens": _case_inputs(rank, E, k, 0, 5, 0.0),
            }
            for name, (x, ids, w) in cases.items():
                res = {mode: _run(groups, x, ids, w, W, mode) for mode in MODES}
                res["again"] = _run(groups, x, ids, w, W, "allgather")
                res["ref"] = _reference(x, ids, w, W)
                res["rows_max"] = max(5 + 7 * q for q in range(world)) if name == "uneven" else x.shape[0] if name != "empty" else 9
                out.append(((E, k, name), res))
    return out


def _megatron_cases(rank, world):
    from locmoe_plugin.demo import cpu_shims

    cpu_shims.install()
    from megatron.core import parallel_state

    from locmoe_plugin.megatron.dispatcher import make_locmoe_layer_class

    from .megatron_helpers import D as MD, build_layer, fwd_bwd

    LocMoELayer = make_locmoe_layer_class()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
    out = {}
    for topk in (2, 4):
        torch.manual_seed(11)
        layers = {m: build_layer(LocMoELayer, 1, world, {"gpus_per_node": world}, topk, dispatcher=m)
                  for m in ("hierarchical", "allgather")}
        layers["allgather"].load_state_dict(layers["hierarchical"].state_dict())
        torch.manual_seed(400 + rank)
        x = torch.randn(3 + 2 * rank, 2, MD)
        cot = torch.randn_like(x)
        res = {}
        for m, layer in layers.items():
            y, gx = fwd_bwd(layer, x, cot)
            res[m] = dict(y=y, gx=gx, plan=layer.token_dispatcher.core.plan_mode,
                          grads={n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None})
        out[topk] = res
    parallel_state.destroy_model_parallel()
    return out


def _worker(rank, world):
    return _core_cases(rank, world), _megatron_cases(rank, world)


def _close(a, b, msg):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=msg)


@pytest.mark.multiproc
def test_allgather_matches_the_pairs_plan_on_one_node():
    pytest.importorskip("megatron.core")
    results = run_workers(_worker, 4)
    for rank, (core, megatron) in enumerate(results):
        for (E, k, name), r in core:
            tag = f"rank {rank} E={E} k={k} {name}"
            a, p = r["allgather"], r["flat_fast"]
            assert a["plan"] == "allgather" and p["plan"] == "flat_fast", tag
            # the experts see identical inputs; only the combine's sum order differs
            assert a["tpe"] == p["tpe"] and torch.equal(a["inp"], p["inp"]), tag
            for key in ("y", "gx", "gw"):
                _close(a[key], p[key], f"{tag} {key}")
                assert torch.equal(a[key], r["again"][key]), f"{tag} {key}: not deterministic"
                assert torch.isfinite(a[key]).all(), tag
                if k == 1:  # one row per token: nothing to reorder
                    assert torch.equal(a[key], p[key]), f"{tag} {key}: top-1 not bitwise"
            _close(a["y"], r["ref"], f"{tag} reference")
            # all-gather: this rank's (padded) block to each of the 3 peers; the combine sends as many back
            assert a["traffic"]["dispatch_intra_bytes"] == 3 * r["rows_max"] * D * 4, tag
            assert a["traffic"]["inter_bytes"] == 0, tag
        for topk, r in megatron.items():
            a, h = r["allgather"], r["hierarchical"]
            assert a["plan"] == "allgather" and h["plan"] == "flat_fast"
            _close(a["y"], h["y"], f"megatron k={topk} y")
            _close(a["gx"], h["gx"], f"megatron k={topk} gx")
            assert a["grads"].keys() == h["grads"].keys() and any("router" in n for n in a["grads"])
            for n in a["grads"]:
                _close(a["grads"][n], h["grads"][n], f"megatron k={topk} grad {n}")


def test_allgather_is_refused_across_nodes():
    from locmoe_plugin import Topology
    from locmoe_plugin.comm import CommGroups, TokenDispatcher
    from locmoe_plugin.config import ConfigError

    two_nodes = Topology.from_ranks_per_node(4, 2, 8)
    groups = CommGroups(topology=two_nodes, ep=None, rail=None, node=None, ep_global_ranks=None)
    with pytest.raises(ConfigError, match=r"spans 2 nodes.*dispatcher='hierarchical'"):
        TokenDispatcher(groups, "allgather")
    one_node = CommGroups(topology=Topology.from_ranks_per_node(4, 4, 8), ep=None, rail=None, node=None,
                          ep_global_ranks=None)
    assert TokenDispatcher(one_node, "allgather").plan_mode == "allgather"
    assert TokenDispatcher(one_node, "allgather", exact_tree=True).plan_mode == "allgather"


def test_allgather_is_a_dispatcher_setting():
    from locmoe_plugin.comm.settings import DispatcherSettings

    assert DispatcherSettings.of("allgather") == DispatcherSettings(mode="allgather", overlap=False)
    assert DispatcherSettings(mode="hierarchical").mode == "hierarchical"  # the default is unchanged
