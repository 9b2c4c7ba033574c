"""The ``allgather`` dispatcher (EP group inside one node) on gloo, 4 ranks as one node x 4, fp32.

Against the pairs plan (``flat_fast``, what the default builds on one node) and a per-token reference:
outputs, input gradients and combine-weight gradients allclose (bitwise at top-1, where a token has one
row); the experts see the same rows in the same order. Cases: uneven token counts, drop-heavy, a rank
without tokens and ranks without pairs, everything dropped, no tokens anywhere, top-1..4, one and two
experts per rank. Where every rank holds the same number of tokens, the plan without a count exchange
(``equal_tokens=True``, :mod:`locmoe_plugin.comm.gathered_routing`) against the one with it: bitwise equal,
and bad ids or a repeated id on one rank raise on every rank. Then the Megatron ``LocMoELayer`` with
``dispatcher="allgather"`` against the default one (outputs, input and every weight gradient), and its
equal-token path (router counts folded into the routing all-gather: one all-gather and no all-reduce
before the payload moves) against the count-exchange path it keeps under ``variable_seq_lengths``, bitwise. One spawn for
all of it; the refusal across nodes and the settings need none.
"""

import contextlib

import pytest
import torch

from ._dist import run_workers
from .test_dispatcher_dist import D, _case_inputs, _expert_fn

MODES = ("flat_fast", "allgather")


def _run(groups, x, ids, w, W, mode, equal_tokens=False):
    from locmoe_plugin.comm import TokenDispatcher

    t = groups.topology
    xx = x.clone().requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    disp = TokenDispatcher(groups, mode, equal_tokens=equal_tokens)
    assert disp.gathers_routing == (equal_tokens and mode == "allgather")
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
                if name in ("drops", "all_dropped", "no_tokens"):  # the same token count on every rank
                    res["equal"] = _run(groups, x, ids, w, W, "allgather", equal_tokens=True)
                res["ref"] = _reference(x, ids, w, W)
                res["rows_max"] = max(5 + 7 * q for q in range(world)) if name == "uneven" else x.shape[0] if name != "empty" else 9
                out.append(((E, k, name), res))
    return out, _refusals(rank, world)


def _refusals(rank, world):
    """The error each rank raises for bad input to the equal-token plan (None: no error)."""
    import torch.distributed as dist

    from locmoe_plugin import Topology
    from locmoe_plugin.comm import TokenDispatcher, build_comm_groups

    groups = build_comm_groups(Topology.from_ranks_per_node(world, world, 8, ep_rank=rank), dist.group.WORLD)
    out = {}
    for name, (slot, value) in {"bad_id": ((2, 1), 99), "repeated": ((3, 1), None)}.items():
        x, ids, w = _case_inputs(rank, 8, 2, 6, 7, 0.0)
        if rank == 2:  # one rank only: every rank must raise all the same
            ids[slot] = value if value is not None else ids[slot[0], 0]
        try:
            TokenDispatcher(groups, "allgather", equal_tokens=True).dispatch(x, ids, w)
            out[name] = None
        except ValueError as err:
            out[name] = str(err)
    return out


def _megatron_cases(rank, world):
    from locmoe_plugin.demo import cpu_shims

    cpu_shims.install()
    from megatron.core import parallel_state

    from locmoe_plugin.comm.settings import DispatcherSettings
    from locmoe_plugin.megatron.dispatcher import make_locmoe_layer_class

    from .megatron_helpers import D as MD, build_layer, fwd_bwd

    LocMoELayer = make_locmoe_layer_class()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
    out = {}
    for topk in (2, 4):
        torch.manual_seed(11)
        layers = {m: build_layer(LocMoELayer, 1, world, {"gpus_per_node": world}, topk, dispatcher=m)
                  for m in ("hierarchical", "allgather")}
        # Megatron's variable sequence lengths: token counts may differ, the count exchange stays
        layers["varlen"] = build_layer(LocMoELayer, 1, world, {"gpus_per_node": world}, topk,
                                       dispatcher="allgather", variable_seq_lengths=True)
        # the same, withdrawn by the settings (--locmoe-equal-tokens off): uneven calls work
        layers["settings_off"] = build_layer(LocMoELayer, 1, world, {"gpus_per_node": world}, topk,
                                             dispatcher=DispatcherSettings(mode="allgather", equal_tokens=False))
        for m in ("allgather", "varlen", "settings_off"):
            layers[m].load_state_dict(layers["hierarchical"].state_dict())
        torch.manual_seed(400 + rank)
        uneven = torch.randn(3 + 2 * rank, 2, MD)
        equal = torch.randn(5, 2, MD)
        res = {}
        for m, layer in layers.items():
            core = layer.token_dispatcher.core
            for shape, x in (("uneven", uneven), ("equal", equal)):
                if m == "allgather" and shape == "uneven":
                    continue  # equal token counts are the contract of that path
                for p in layer.parameters():
                    p.grad = None
                with _counted_collectives() as calls:
                    y, gx = fwd_bwd(layer, x, torch.ones_like(x) * torch.linspace(-1, 1, MD))
                res[m, shape] = dict(y=y, gx=gx, plan=core.plan_mode, gathers=core.gathers_routing,
                                     folds=layer.router._folds, calls=calls,
                                     grads={n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None})
        out[topk] = res
    parallel_state.destroy_model_parallel()
    return out


@contextlib.contextmanager
def _counted_collectives():
    """Counts the all-gathers and all-reduces issued inside (forward and backward)."""
    import torch.distributed as dist

    from locmoe_plugin.comm import block_collectives, counts

    calls = {"all_gather": 0, "all_reduce": 0}
    saved = counts.ALL_GATHER_SINGLE, block_collectives.ALL_GATHER_SINGLE, dist.all_reduce

    def gather(*a, **kw):
        calls["all_gather"] += 1
        return saved[0](*a, **kw)

    def reduce(*a, **kw):
        calls["all_reduce"] += 1
        return saved[2](*a, **kw)

    counts.ALL_GATHER_SINGLE = block_collectives.ALL_GATHER_SINGLE = gather
    dist.all_reduce = reduce
    try:
        yield calls
    finally:
        counts.ALL_GATHER_SINGLE, block_collectives.ALL_GATHER_SINGLE, dist.all_reduce = saved


def _worker(rank, world):
    return _core_cases(rank, world), _megatron_cases(rank, world)


def _close(a, b, msg):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=msg)


@pytest.mark.multiproc
def test_allgather_matches_the_pairs_plan_on_one_node():
    pytest.importorskip("megatron.core")
    results = run_workers(_worker, 4)
    for rank, ((core, refusals), megatron) in enumerate(results):
        assert "outside [-1, 8) on EP rank(s) [2]" in refusals["bad_id"], (rank, refusals)
        assert "lists one expert in two of its slots on EP rank(s) [2]" in refusals["repeated"], (rank, refusals)
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
            if "equal" in r:  # no count exchange: the same plan, bit for bit
                q = r["equal"]
                assert q["tpe"] == a["tpe"] and q["traffic"] == a["traffic"], tag
                for key in ("y", "gx", "gw", "inp"):
                    assert torch.equal(q[key], a[key]), f"{tag} {key}: equal-token plan differs"
        for topk, r in megatron.items():
            for m, shape in (("allgather", "equal"), ("varlen", "equal"), ("varlen", "uneven"),
                             ("settings_off", "uneven")):
                a, h, tag = r[m, shape], r["hierarchical", shape], f"megatron k={topk} {m} {shape}"
                assert a["plan"] == "allgather" and h["plan"] == "flat_fast", tag
                _close(a["y"], h["y"], f"{tag} y")
                _close(a["gx"], h["gx"], f"{tag} gx")
                assert a["grads"].keys() == h["grads"].keys() and any("router" in n for n in a["grads"]), tag
                for n in a["grads"]:
                    _close(a["grads"][n], h["grads"][n], f"{tag} grad {n}")
            a, v = r["allgather", "equal"], r["varlen", "equal"]
            assert a["gathers"] and a["folds"] and not v["gathers"] and not v["folds"]
            assert not r["settings_off", "uneven"]["gathers"] and not r["settings_off", "uneven"]["folds"]
            for key in ("y", "gx"):  # the settings' way and the config's way to the count exchange agree
                assert torch.equal(r["settings_off", "uneven"][key], r["varlen", "uneven"][key])
            # forward + backward: one all-gather for the routing and the counts, one for the payload, one for the
            # combine's gradient; the count exchange and the router's all-reduce are gone
            assert a["calls"] == {"all_gather": 3, "all_reduce": 0}, a["calls"]
            assert v["calls"]["all_gather"] == 4 and v["calls"]["all_reduce"] >= 1, v["calls"]
            for key in ("y", "gx"):
                assert torch.equal(a[key], v[key]), f"megatron k={topk} {key}: equal-token path differs"
            for n in a["grads"]:
                assert torch.equal(a["grads"][n], v["grads"][n]), f"megatron k={topk} grad {n} differs"


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


def test_equal_token_checks_name_the_ranks():
    from locmoe_plugin.comm.gathered_routing import check_gathered

    ids = torch.tensor([[0, 1], [2, -1], [3, 4]]).expand(4, 3, 2).clone()  # [P, s, k]
    check_gathered([3] * 4, 3, 0, 1, ids, 8)
    with pytest.raises(ValueError, match=r"passed \[3, 3, 2, 3\] tokens.*equal_tokens=False"):
        check_gathered([3, 3, 2, 3], 3, 0, 1, ids, 8)
    bad = ids.clone()
    bad[1, 2, 0] = -3
    with pytest.raises(ValueError, match=r"outside \[-1, 8\) on EP rank\(s\) \[1\]"):
        check_gathered([3] * 4, 3, 1, 1, bad, 8)
    twice = ids.clone()
    twice[3, 0, 1] = 0
    twice[2, 1, 0] = -1  # two dropped slots in one token are fine
    with pytest.raises(ValueError, match=r"two of its slots on EP rank\(s\) \[3\]"):
        check_gathered([3] * 4, 3, 0, 2, twice, 8)
