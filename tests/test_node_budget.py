"""The cross-node budget's "node" mechanism (``budget_mechanism="node"``): its price is paid once per remote node a
token reaches. Hand-checked selections on 2 and 3 nodes, a plain per-token reference, the router (weights,
expert bias, one node, checkpoints, bad input), the controller on a toy run and equal state on gloo ranks."""

import argparse
import importlib.util
import os
import sys

import pytest
import torch

from locmoe_plugin import LocMoEConfig, LocMoERouter
from locmoe_plugin.budget import CrossNodeBudget
from locmoe_plugin.config import ConfigError
from locmoe_plugin.node_price import NodeRows, node_priced_topk
from locmoe_plugin.routing import route
from locmoe_plugin.topology import Topology

from ._dist import run_workers
from .test_cross_node_budget import _shares


def _pick(scores, num_nodes, own, price, topk=2):
    """Sorted expert ids of each token of ``scores [s, n]`` (experts contiguous per node)."""
    scores = torch.tensor(scores, dtype=torch.float32)
    n = scores.shape[-1]
    rows = NodeRows(torch.arange(n) // (n // num_nodes), own, num_nodes)
    ids = node_priced_topk(scores, rows.experts_by_row, rows.expert_row, rows.remote_row,
                           torch.tensor(price), topk)
    return ids.sort(-1).values.tolist()


def test_two_nodes_hand_checked():
    # own node 0 = experts {0, 1}. V_own = 0.1 + 0.2 = 0.3; with node 1: 0.4 + 0.3 = 0.7; gain = 0.4 - lam
    token = [[0.1, 0.2, 0.4, 0.3]]
    assert _pick(token, 2, 0, 0.39) == [[2, 3]]  # both pairs cross, in one copy
    assert _pick(token, 2, 0, 0.41) == [[0, 1]]
    # a mixed token: V_own = 0.35 + 0.05 = 0.4, with node 1: 0.4 + 0.35 = 0.75, gain 0.35 - lam
    mixed = [[0.35, 0.05, 0.4, 0.2]]
    assert _pick(mixed, 2, 0, 0.34) == [[0, 2]] and _pick(mixed, 2, 0, 0.36) == [[0, 1]]
    # an exact tie (binary fractions: gain 0.5 - 0.5 = 0) stays home; price 0 is the plain top-k
    tie = [[0.25, 0.25, 0.5, 0.5]]
    assert _pick(tie, 2, 0, 0.5) == [[0, 1]] and _pick(tie, 2, 0, 0.49) == [[2, 3]]
    assert _pick(tie, 2, 0, 0.0) == [[2, 3]]
    # the same tokens seen from node 1 (its own experts {2, 3}): row order follows the rank's node
    assert _pick(token, 2, 1, 1.0) == [[2, 3]] and _pick([[0.4, 0.3, 0.1, 0.2]], 2, 1, 0.39) == [[0, 1]]
    # several tokens at once, vectorised: each decides for itself
    assert _pick(token + mixed + tie, 2, 0, 0.37) == [[2, 3], [0, 1], [2, 3]]


def test_three_nodes_hand_checked():
    # own node 1 = experts {2, 3}: V_own = 0.15; with node 0: 0.30 + 0.10 = 0.40 (gain 0.25 - lam); with
    # node 2: 0.25 + 0.25 = 0.50 (gain 0.35 - lam). The pair-priced top-2 {0, 4} would reach two remote nodes.
    token = [[0.30, 0.05, 0.10, 0.05, 0.25, 0.25]]
    assert _pick(token, 3, 1, 0.0) == [[4, 5]]
    assert _pick(token, 3, 1, 0.34) == [[4, 5]] and _pick(token, 3, 1, 0.36) == [[2, 3]]
    # equal gains on two remote nodes: the lower node id
    twin = [[0.30, 0.20, 0.05, 0.05, 0.20, 0.30]]
    assert _pick(twin, 3, 1, 0.1) == [[0, 1]]
    # own node last (row order 2, 0, 1): own {4, 5}; V_own = 0.05; node 0 gains 0.40 - 0.05, node 1 0.30
    assert _pick([[0.25, 0.15, 0.20, 0.10, 0.03, 0.02]], 3, 2, 0.32) == [[0, 1]]
    assert _pick([[0.25, 0.15, 0.20, 0.10, 0.03, 0.02]], 3, 2, 0.36) == [[4, 5]]


def _reference(scores, expert_to_node, own, price, topk):
    """Per token, per node, in plain Python: the rule of locmoe_plugin/node_price.py."""
    out = []
    for row in scores.tolist():
        def best(nodes):
            cand = sorted(((v, e) for e, v in enumerate(row) if int(expert_to_node[e]) in nodes), reverse=True)
            return sum(v for v, _ in cand[:topk]), sorted(e for _, e in cand[:topk])

        value, ids = best({own})
        top_gain = 0.0
        for m in sorted(set(expert_to_node.tolist()) - {own}):
            v, chosen = best({own, m})
            if v - value - price > top_gain:
                top_gain, ids = v - value - price, chosen
        out.append(ids)
    return out


@pytest.mark.parametrize("num_nodes, per_node, topk, own", [(2, 4, 2, 1), (3, 2, 2, 0), (4, 3, 3, 2)])
def test_matches_a_per_token_reference_and_reaches_one_remote_node(num_nodes, per_node, topk, own):
    g = torch.Generator().manual_seed(num_nodes)
    n = num_nodes * per_node
    # nodes interleaved over experts (not contiguous): the row tables gather them
    expert_to_node = torch.arange(n) % num_nodes
    rows = NodeRows(expert_to_node, own, num_nodes)
    scores = torch.softmax(3 * torch.randn(400, n, generator=g), -1) + 0.01 * torch.randn(n, generator=g)
    for price in (0.0, 0.05, 0.2, 0.6):
        ids = node_priced_topk(scores, rows.experts_by_row, rows.expert_row, rows.remote_row,
                               torch.tensor(price), topk)
        assert ids.sort(-1).values.tolist() == _reference(scores, expert_to_node, own, price, topk)
        remote_nodes = [set(expert_to_node[t].tolist()) - {own} for t in ids]
        assert all(len(r) <= 1 for r in remote_nodes)  # a token's remote pairs all lie on one node
        assert all(len(set(t)) == topk for t in ids.tolist())  # k distinct experts
    assert sum(len(r) for r in remote_nodes) < 400  # the highest price keeps some tokens home


def _router(topk=2, nodes=2, per_node_ranks=1, experts=4, rank=0, **settings):
    cfg = LocMoEConfig(num_experts=experts, hidden_size=experts, topk=topk, gate="dense", routing="locmoe",
                       aux_loss_coeff=0.0, cross_node_budget=0.0, budget_mechanism="node", **settings)
    r = LocMoERouter(cfg, topology=Topology.from_ranks_per_node(nodes * per_node_ranks, per_node_ranks, experts,
                                                                ep_rank=rank))
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(experts))
    return r.eval()


def test_router_weights_expert_bias_and_one_node():
    r = _router(expert_bias_rate=1e-3)
    assert r.config.locality_bias is False and r.config.locality_loss_coeff == 0.0
    x = torch.log(torch.tensor([[0.1, 0.2, 0.4, 0.3]]))  # probabilities through the identity gate
    r.budget.strength.fill_(0.39)
    out = r(x)
    assert out.assignment.expert_ids.tolist() == [[2, 3]]
    assert out.assignment.weights[0].tolist() == pytest.approx([0.4 / 0.7, 0.3 / 0.7])  # renormalised probs
    r.budget.strength.fill_(0.41)
    out = r(x)
    assert out.assignment.expert_ids.tolist() == [[1, 0]]
    assert out.assignment.weights[0].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert torch.allclose(out.probs, torch.tensor([[0.1, 0.2, 0.4, 0.3]]))
    out.assignment.weights[0, 0].backward()  # the weights carry the gate's gradient, as under "selection"
    assert r.gate.weight.grad.abs().sum() > 0
    # the expert bias shifts the selection scores (not the weights): +0.05 on expert 3 lifts the gain to 0.45
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.05]))
    out = r(x)
    assert out.assignment.expert_ids.tolist() == [[2, 3]]
    assert out.assignment.weights[0].tolist() == pytest.approx([0.4 / 0.7, 0.3 / 0.7])
    assert r._selection_bias() is r.expert_bias  # no margin rides on the bias under this mechanism
    # one node: nothing to price, the plain top-k whatever lam
    one = LocMoERouter(r.config, topology=Topology.single_node(2, 4))
    with torch.no_grad():
        one.gate.weight.copy_(torch.eye(4))
    one.eval().budget.strength.fill_(1.0)
    assert one(x).assignment.expert_ids.tolist() == [[2, 3]] and one._node_price() is None


def test_controller_holds_the_pair_share_and_cuts_copies():
    """A toy run (fixed peaked gate, fresh random tokens): the pair share goes to the budget, and at the same pair
    share fewer tokens cross than under the per-pair margin (the bytes of the hierarchical dispatcher)."""
    copies, lams = {}, {}
    for mechanism in ("node", "selection"):
        shares, r = _shares(0.2, mechanism=mechanism)
        assert abs(shares[0] - 0.5) < 0.1
        for i in range(100, 200, 10):
            assert abs(sum(shares[i:i + 10]) / 10 - 0.2) <= 0.03, (mechanism, i)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            ids = r(torch.randn(4096, 16, generator=g)).assignment.requested_ids
        remote = ~r.local_expert_mask[ids]
        copies[mechanism] = remote.any(-1).float().mean().item()
        pair_share = remote.float().mean().item()
        assert abs(pair_share - 0.2) <= 0.05, (mechanism, pair_share)
        lams[mechanism] = r.budget.strength.item()
    assert 0 < lams["node"] <= 1.0
    assert copies["node"] < 0.8 * copies["selection"], copies


def test_update_rate_limit_and_checkpoints():
    b = CrossNodeBudget(0.1, mechanism="node")
    assert (b.rate, b.max_strength) == (0.2, 1.0)
    b.update(torch.tensor(6), torch.tensor(10))  # the pair share 0.6: lam = 0.2 * (0.6 - 0.1) = 0.1
    assert b.strength.item() == pytest.approx(0.1) and b.node_price() is b.strength
    assert b.selection_offset(torch.tensor([True, False])) is None and b.locality_coeff() is None
    for _ in range(20):
        b.update(torch.tensor(10), torch.tensor(10))
    assert b.strength.item() == 1.0  # clipped: a price of 1 keeps every token home
    assert CrossNodeBudget(0.1).node_price() is None
    # the router's checkpoint round trip; a margin from a selection checkpoint is no price: lam restarts
    _, r = _shares(0.2, steps=30, mechanism="node")
    state = r.get_extra_state()
    assert state["budget"]["mechanism"] == "node" and state["budget"]["strength"] > 0
    fresh = LocMoERouter(r.config, topology=r.topology)
    fresh.load_state_dict(r.state_dict())
    assert fresh.budget.strength.item() == r.budget.strength.item() and fresh.budget.steps == 30
    _, sel = _shares(0.2, steps=30)
    fresh.set_extra_state(sel.get_extra_state())
    assert fresh.budget.strength.item() == 0.0 and fresh.budget.steps == 0
    sel.set_extra_state(state)
    assert sel.budget.strength.item() == 0.0


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match=r"at least topk=3 experts; the 2 nodes host 2 each: use budget_mechanism="):
        _router(topk=3)  # 4 experts on 2 nodes
    one_node = _router(topk=3, nodes=1, per_node_ranks=2)  # one node hosts all 4: nothing to price, accepted
    with pytest.raises(ConfigError, match="at least topk=3"):  # a later placement is checked as well
        one_node.bind(Topology.from_ranks_per_node(2, 1, 4, ep_rank=0))
    with pytest.raises(ConfigError, match="max_nodes_per_token=2 with budget_mechanism='node'"):
        LocMoEConfig(num_experts=8, hidden_size=16, topk=2, cross_node_budget=0.2, budget_mechanism="node",
                     max_nodes_per_token=2)
    rows = NodeRows(torch.tensor([0, 0, 1, 1]), 0, 2)
    with pytest.raises(ValueError, match="no allowed mask and no node_limit"):
        route(torch.zeros(3, 4), topk=2, allowed=torch.ones(3, 4, dtype=torch.bool),
              node_price=(rows.experts_by_row, rows.expert_row, rows.remote_row, 0.1))


def test_entry_points_accept_the_mechanism():
    from locmoe_plugin.demo.megatron_job import locmoe_settings

    opts = argparse.Namespace(gpus_per_node=2, locality_coeff=0.01, locmoe_capacity="none", steps=10)
    assert locmoe_settings("locmoe:budget=0.2,budget_mechanism=node", opts)["budget_mechanism"] == "node"
    # DeepSpeed's "locmoe" section is read by LocMoEConfig.from_dict
    c = LocMoEConfig.from_dict({"num_experts": 8, "hidden_size": 16, "cross_node_budget": 0.2,
                                "budget_mechanism": "node"})
    assert c.budget_mechanism == "node" and c.locality_bias is False
    pytest.importorskip("megatron.core")
    from locmoe_plugin.megatron.args import add_arguments, settings_from_args

    p = add_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--locmoe", "--locmoe-cross-node-budget", "0.2", "--locmoe-budget-mechanism", "node"])
    args.num_experts, args.hidden_size, args.moe_router_topk = 8, 64, 2
    assert settings_from_args(args)[0]["budget_mechanism"] == "node"


def test_budget_curve_runs_the_mechanism_under_its_own_names(tmp_path, capsys):
    quality = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "quality")
    sys.path.insert(0, quality)
    try:
        spec = importlib.util.spec_from_file_location("run_budget_curve", os.path.join(quality, "run_budget_curve.py"))
        run = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(run)
    finally:
        sys.path.remove(quality)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "budget-0.2-selection_seed-1.json").write_text("{}")  # another mechanism's result
    assert run.main([str(tmp_path), "--budgets", "0.2,off", "--seeds", "1", "--mechanism", "node",
                     "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cmds = dict(line.split(": ", 1) for line in lines[1:])
    assert sorted(cmds) == ["budget-0.2-node_seed-1", "budget-off_seed-1"]
    assert cmds["budget-0.2-node_seed-1"].endswith("--budget 0.2 --budget-mechanism node")


def _worker(rank, world):
    import torch.distributed as dist

    topo = Topology.from_ranks_per_node(world, 2, 8, ep_rank=rank)
    shares, r = _shares(0.2, steps=120, rank=rank, group=dist.group.WORLD, topo=topo, mechanism="node")
    return {"shares": shares, "extra": r.get_extra_state()["budget"], "rows": r.experts_by_row.tolist()}


def test_four_ranks_two_nodes_share_one_state():
    res = run_workers(_worker, 4)
    assert all(r["extra"] == res[0]["extra"] and r["shares"] == res[0]["shares"] for r in res)  # bitwise
    assert res[0]["extra"]["strength"] > 0 and res[0]["extra"]["mechanism"] == "node"
    assert [r["rows"][0] for r in res] == [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7]]  # own node first
    shares = res[0]["shares"]
    for i in range(70, 120, 10):
        assert abs(sum(shares[i:i + 10]) / 10 - 0.2) <= 0.03


def test_more_than_two_nodes_warns_of_the_node_limit():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # two nodes: no warning
        _router(nodes=2, experts=4)
    with pytest.warns(UserWarning, match=r"budget_mechanism='node' on 3 nodes.*Prefer budget_mechanism='selection'"):
        _router(nodes=3, experts=6)
    two = _router(nodes=2, experts=6)  # bound later to 3 nodes (DeepSpeed binds its EP group after building)
    with pytest.warns(UserWarning, match=r"budget_mechanism='node' on 3 nodes"):
        two.bind(Topology.from_ranks_per_node(3, 1, 6))
