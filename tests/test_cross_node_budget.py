"""Cross-node traffic budget (``LocMoEConfig.cross_node_budget``): the controller's update rule, that it
holds the share at the budget, equal state on every rank, checkpoints, and bad values."""

import argparse
import math

import pytest
import torch

from locmoe_plugin import LocMoEConfig, LocMoERouter
from locmoe_plugin.budget import CrossNodeBudget
from locmoe_plugin.config import ConfigError
from locmoe_plugin.topology import Topology

from ._dist import run_workers


def test_update_rule_hand_worked():
    b = CrossNodeBudget(0.2, rate=0.5, max_strength=1.0)
    assert b.strength.item() == 0.0 and math.isnan(b.share.item())
    b.update(torch.tensor(6), torch.tensor(10))  # share 0.6: lam = 0 + 0.5 * (0.6 - 0.2) = 0.2
    assert b.strength.item() == pytest.approx(0.2) and b.share.item() == pytest.approx(0.6)
    b.update(torch.tensor(1), torch.tensor(10))  # share 0.1: lam = 0.2 + 0.5 * (0.1 - 0.2) = 0.15
    assert b.strength.item() == pytest.approx(0.15)
    b.update(torch.tensor(0), torch.tensor(10))  # 0.15 - 0.1 = 0.05
    b.update(torch.tensor(0), torch.tensor(10))  # 0.05 - 0.1 -> clipped at 0
    assert b.strength.item() == 0.0
    b.update(torch.tensor(10), torch.tensor(10))
    b.update(torch.tensor(10), torch.tensor(10))
    b.update(torch.tensor(10), torch.tensor(10))  # 0.4, 0.8, 1.2 -> clipped at 1.0
    assert b.strength.item() == 1.0
    b.update(torch.tensor(0), torch.tensor(0))  # no pairs: no step
    assert b.strength.item() == 1.0 and b.share.item() == pytest.approx(1.0)
    # the offset: lam on the local experts only
    assert b.selection_offset(torch.tensor([True, False, True])).tolist() == [1.0, 0.0, 1.0]


def _four_experts_top1_remote(mechanism: str):
    """A budget-0 router on node 0 of 2 (experts {0, 1} local) whose identity gate gives the one token ``x``
    the probabilities [0.1, 0.2, 0.4, 0.3]: top-1 is the remote expert 2. ``-> (router, x)``"""
    cfg = LocMoEConfig(num_experts=4, hidden_size=4, topk=1, gate="dense", routing="locmoe", aux_loss_coeff=0.0,
                       cross_node_budget=0.0, budget_mechanism=mechanism)
    r = LocMoERouter(cfg, topology=Topology.from_ranks_per_node(2, 1, 4, ep_rank=0))
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(4))
    return r, torch.log(torch.tensor([[0.1, 0.2, 0.4, 0.3]]))


def test_preference_changes_selection_not_weights():
    r, x = _four_experts_top1_remote("selection")
    cfg = r.config
    assert cfg.locality_loss_coeff == 0.0 and cfg.locality_bias is False  # the controller is the locality term
    r.eval()
    assert r(x).assignment.expert_ids.tolist() == [[2]]
    r.budget.strength.fill_(0.19)  # 0.2 + 0.19 < 0.4: the remote expert still wins by more than the margin
    assert r(x).assignment.expert_ids.tolist() == [[2]]
    r.budget.strength.fill_(0.21)  # 0.2 + 0.21 > 0.4: the local expert 1, with its unbiased weight
    out = r(x)
    assert out.assignment.expert_ids.tolist() == [[1]]
    assert out.assignment.weights.item() == pytest.approx(1.0)  # renormalised top-1
    assert torch.allclose(out.probs, torch.tensor([[0.1, 0.2, 0.4, 0.3]]))


def _shares(budget, steps=200, rank=0, group=None, topo=None, seed=0, mechanism="selection"):
    """Train-mode forwards of a fixed random dense gate on fresh random tokens under ``mechanism`` (one that
    needs no training: "selection" or "node"); per-step EP-group shares (the controller's own measurement)
    and the router."""
    torch.manual_seed(seed)
    cfg = LocMoEConfig(num_experts=8, hidden_size=16, topk=2, gate="dense", routing="locmoe",
                       cross_node_budget=budget, budget_mechanism=mechanism)
    topo = topo or Topology.from_ranks_per_node(2, 1, 8, ep_rank=rank)
    r = LocMoERouter(cfg, topology=topo, group=group).train()
    with torch.no_grad():  # a peaked gate (top probabilities ~0.3-0.6), so margins of order 0.1 are needed
        r.gate.weight.normal_(0.0, 1.0)
    g = torch.Generator().manual_seed(100 + rank)
    shares = []
    for _ in range(steps):
        r(torch.randn(256, 16, generator=g))
        shares.append(r.budget.share.item())
    return shares, r


@pytest.mark.parametrize("budget", [0.3, 0.1, 0.0])
def test_share_held_at_the_budget_after_warm_up(budget):
    shares, r = _shares(budget)
    assert abs(shares[0] - 0.5) < 0.1  # the first forward routes by content only: about (N-1)/N
    for i in range(100, 200, 10):  # after warm-up every 10-step window holds the budget
        window = sum(shares[i:i + 10]) / 10
        assert abs(window - budget) <= 0.03, (i, window)
    assert r.budget.strength.item() > 0


def test_budget_above_the_natural_share_leaves_routing_alone():
    shares, r = _shares(0.9, steps=30)
    assert r.budget.strength.item() == 0.0
    assert abs(sum(shares) / len(shares) - 0.5) < 0.05


def test_evaluation_and_no_grad_forwards_leave_the_state_alone():
    _, r = _shares(0.2, steps=20)
    before = r.get_extra_state()["budget"]
    r.eval()
    r(torch.randn(64, 16))
    r.train()
    with torch.no_grad():
        r(torch.randn(64, 16))
    assert r.get_extra_state()["budget"] == before


def test_checkpoint_round_trip_and_half_precision():
    _, r = _shares(0.2, steps=30)
    state = r.get_extra_state()
    assert state["budget"]["steps"] == 30 and state["budget"]["strength"] > 0
    fresh = LocMoERouter(r.config, topology=r.topology)
    fresh.load_state_dict(r.state_dict())
    assert fresh.budget.strength.item() == r.budget.strength.item()
    assert fresh.budget.steps == 30
    # a checkpoint saved without a budget: the preference starts at 0
    plain = LocMoERouter(r.config.replace(cross_node_budget=None, budget_mechanism=None, locality_loss_coeff=0.0),
                         topology=r.topology)
    fresh.load_state_dict(plain.state_dict(), strict=False)
    assert fresh.budget.strength.item() == 0.0
    # bf16 wrappers: the preference goes back to fp32 on the first forward
    h = LocMoERouter(r.config, topology=r.topology).train().bfloat16()
    h(torch.randn(16, 16, dtype=torch.bfloat16))
    assert h.budget.strength.dtype == torch.float32


def test_bad_values_are_refused():
    base = dict(num_experts=8, hidden_size=16, topk=2)
    for bad in (-0.1, 1.5, float("nan"), True, "0.2"):
        with pytest.raises(ConfigError, match=r"cross_node_budget=.*share in \[0, 1\]"):
            LocMoEConfig(**base, cross_node_budget=bad)
    for routing in ("topk", "hash"):
        with pytest.raises(ConfigError, match="routing='locmoe'"):
            LocMoEConfig(**base, routing=routing, cross_node_budget=0.2)
    with pytest.raises(ConfigError, match="aux_loss_scope='ep_group'"):
        LocMoEConfig(**base, cross_node_budget=0.2, aux_loss_scope="local")
    assert LocMoEConfig(**base, cross_node_budget=0).cross_node_budget == 0
    assert LocMoEConfig(**base, routing="hybrid", cross_node_budget=1.0).locality_loss_coeff == 0.0
    # an explicit mu stays: both terms
    assert LocMoEConfig(**base, cross_node_budget=0.2, locality_loss_coeff=0.01).locality_loss_coeff == 0.01


def test_default_budget_is_one_constant(monkeypatch):
    import locmoe_plugin.config as config

    assert LocMoEConfig(num_experts=8, hidden_size=16).cross_node_budget == config.DEFAULT_CROSS_NODE_BUDGET == 0.2
    monkeypatch.setattr(config, "DEFAULT_CROSS_NODE_BUDGET", 0.3)
    c = LocMoEConfig(num_experts=8, hidden_size=16)
    assert c.cross_node_budget == 0.3 and c.locality_loss_coeff == 0.0
    assert c.budget_mechanism == config.DEFAULT_BUDGET_MECHANISM
    assert c.locality_bias is (c.budget_mechanism == "loss")
    assert LocMoEConfig(num_experts=8, hidden_size=16, routing="topk").cross_node_budget is None
    assert LocMoEConfig(num_experts=8, hidden_size=16, locality_loss_coeff=0.01).cross_node_budget is None


def test_default_budget_scales_with_nodes(monkeypatch):
    """Left to its default, the budget is the same fraction (40 %) of the unconstrained share (N-1)/N on
    every layout; a budget given explicitly is applied as given. The router applies it for its EP group's
    node count, also after bind() to another layout."""
    import locmoe_plugin.config as config
    from locmoe_plugin.config import default_cross_node_budget

    assert [default_cross_node_budget(n) for n in (1, 2, 4, 8)] == pytest.approx([0.2, 0.2, 0.3, 0.35])
    cfg = LocMoEConfig(num_experts=8, hidden_size=16)
    assert cfg.cross_node_budget == 0.2  # the field shows the 2-node value
    assert cfg.cross_node_budget_on(4) == pytest.approx(0.3)
    explicit = LocMoEConfig(num_experts=8, hidden_size=16, cross_node_budget=0.2)
    assert explicit.cross_node_budget_on(4) == 0.2
    assert LocMoEConfig(num_experts=8, hidden_size=16, routing="topk").cross_node_budget_on(4) is None
    # replace() keeps a defaulted budget defaulted and an explicit one explicit
    assert cfg.replace(topk=1).cross_node_budget_on(4) == pytest.approx(0.3)
    assert explicit.replace(topk=1).cross_node_budget_on(4) == 0.2

    four_nodes = Topology.from_ranks_per_node(4, 1, 8)
    two_nodes = Topology.from_ranks_per_node(4, 2, 8)
    router = LocMoERouter(cfg, four_nodes)
    assert router.budget.budget == pytest.approx(0.3)
    router.bind(two_nodes)
    assert router.budget.budget == pytest.approx(0.2)
    assert LocMoERouter(explicit, four_nodes).budget.budget == 0.2

    # a round trip through to_dict / from_dict keeps the budget defaulted; hybrid routing scales alike
    assert LocMoEConfig.from_dict(cfg.to_dict()).cross_node_budget_on(4) == pytest.approx(0.3)
    assert LocMoEConfig.from_dict(explicit.to_dict()).cross_node_budget_on(4) == 0.2
    assert LocMoEConfig(num_experts=8, hidden_size=16, routing="hybrid").cross_node_budget_on(4) == pytest.approx(0.3)
    # the warm-up starts from the bound layout's unconstrained share and ends at its default budget
    warm = LocMoERouter(cfg.replace(cross_node_budget_warmup=10), two_nodes)
    warm.bind(four_nodes)
    assert warm.budget.target().item() == pytest.approx(0.75)
    warm.budget.warmup_step.fill_(10)
    assert warm.budget.target().item() == pytest.approx(0.3)

    monkeypatch.setattr(config, "DEFAULT_CROSS_NODE_BUDGET", 0.1)
    assert default_cross_node_budget(4) == pytest.approx(0.15)
    monkeypatch.setattr(config, "DEFAULT_CROSS_NODE_BUDGET", None)
    assert default_cross_node_budget(4) is None


def test_entry_points():
    from locmoe_plugin.demo.megatron_job import locmoe_settings

    opts = argparse.Namespace(gpus_per_node=2, locality_coeff=0.01, locmoe_capacity="none", steps=10)
    s = locmoe_settings("locmoe:cross_node_budget=0.2", opts)
    assert s["cross_node_budget"] == 0.2 and "locality_loss_coeff" not in s
    assert locmoe_settings("locmoe:budget=0.1", opts)["cross_node_budget"] == 0.1
    assert locmoe_settings("locmoe:budget=0.1,budget_mechanism=selection", opts)["budget_mechanism"] == "selection"
    assert LocMoEConfig.from_dict({"num_experts": 8, "hidden_size": 16, "cross_node_budget": 0.3}).cross_node_budget == 0.3
    pytest.importorskip("megatron.core")
    from locmoe_plugin.megatron.args import add_arguments, settings_from_args

    p = add_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--locmoe", "--locmoe-cross-node-budget", "0.2"])
    args.num_experts, args.hidden_size, args.moe_router_topk = 8, 64, 2
    assert settings_from_args(args)[0]["cross_node_budget"] == 0.2
    args = p.parse_args(["--locmoe", "--locmoe-cross-node-budget", "0.2", "--locmoe-budget-mechanism", "selection"])
    args.num_experts, args.hidden_size, args.moe_router_topk = 8, 64, 2
    assert settings_from_args(args)[0]["budget_mechanism"] == "selection"
    with pytest.raises(SystemExit):
        p.parse_args(["--locmoe", "--locmoe-budget-mechanism", "margin"])
    args = p.parse_args(["--locmoe", "--locmoe-cross-node-budget", "1.2"])
    args.num_experts, args.hidden_size, args.moe_router_topk = 8, 64, 2
    with pytest.raises(ConfigError, match="cross.node.budget"):
        settings_from_args(args)


# ---- the "loss" mechanism: lam is the locality loss's coefficient -------------------------------------------

def test_loss_mechanism_update_hand_worked():
    b = CrossNodeBudget(0.1, mechanism="loss")
    assert (b.rate, b.max_strength) == (0.01, 0.5)
    b.update(torch.tensor(6), torch.tensor(10))  # share 0.6: lam = 0 + 0.01 * (0.6 - 0.1) = 0.005
    assert b.strength.item() == pytest.approx(0.005)
    b.update(torch.tensor(0), torch.tensor(10))  # 0.005 - 0.001 = 0.004
    assert b.strength.item() == pytest.approx(0.004)
    assert b.selection_offset(torch.tensor([True, False])) is None  # the selection is left alone
    coeff = b.locality_coeff()
    b.update(torch.tensor(10), torch.tensor(10))  # 0.004 + 0.009 = 0.013; the copy taken before stays
    assert coeff.item() == pytest.approx(0.004) and b.strength.item() == pytest.approx(0.013)
    for _ in range(100):
        b.update(torch.tensor(10), torch.tensor(10))
    assert b.strength.item() == 0.5  # clipped
    assert CrossNodeBudget(0.1).locality_coeff() is None  # selection: no loss coefficient


def test_loss_mechanism_sets_the_locality_coefficient_not_the_selection():
    r, x = _four_experts_top1_remote("loss")
    cfg = r.config
    assert cfg.locality_loss_coeff == 0.0 and cfg.locality_bias is True  # the gate learns through the bias
    r.train()
    r.budget.strength.fill_(0.05)
    out = r(x)
    assert out.assignment.expert_ids.tolist() == [[2]]  # no margin on the selection
    # the loss of this forward uses lam before its update: 0.05 * -log(p_local = 0.1 + 0.2)
    assert out.losses["locality"].item() == pytest.approx(0.05 * -math.log(0.3), rel=1e-5)
    assert r.budget.strength.item() == pytest.approx(0.05 + 0.01 * (1.0 - 0.0))  # share 1 (remote top-1)
    out.total_loss.backward()  # the update after the forward does not disturb the graph
    grad = r.locality_bias.grad[0]
    assert grad[:2].lt(0).all() and grad[2:].gt(0).all()  # descent raises the local experts' offsets
    # an explicit mu adds to lam
    r2 = LocMoERouter(cfg.replace(locality_loss_coeff=0.01), topology=r.topology).eval()
    with torch.no_grad():
        r2.gate.weight.copy_(torch.eye(4))
    r2.budget.strength.fill_(0.05)
    assert r2(x).losses["locality"].item() == pytest.approx(0.06 * -math.log(0.3), rel=1e-5)
    # lam = 0: a zero loss that still carries the graph
    r2.budget.strength.zero_()
    r3 = LocMoERouter(cfg, topology=r.topology).eval()
    assert r3(x).losses["locality"].item() == 0.0
    # with the expert bias, the selection offsets are the expert bias alone
    r4 = LocMoERouter(cfg.replace(expert_bias_rate=1e-3), topology=r.topology).train()
    r4.budget.strength.fill_(0.3)
    r4(torch.randn(8, 4))
    assert r4._selection_bias() is r4.expert_bias


def _train_loss_mechanism(budget, steps, rank=0, group=None, topo=None):
    """A dense router trained by Adam on its aux + locality losses under the "loss" mechanism, fresh random
    tokens each step; per-step shares, lam after each step, and the router."""
    torch.manual_seed(0)
    cfg = LocMoEConfig(num_experts=8, hidden_size=16, topk=2, gate="dense", routing="locmoe",
                       cross_node_budget=budget, budget_mechanism="loss")
    topo = topo or Topology.from_ranks_per_node(2, 1, 8, ep_rank=rank)
    r = LocMoERouter(cfg, topology=topo, group=group).train()
    opt = torch.optim.Adam(r.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(100 + rank)
    shares, lams = [], []
    for _ in range(steps):
        r(torch.randn(256, 16, generator=g)).total_loss.backward()
        opt.step()
        opt.zero_grad()
        shares.append(r.budget.share.item())
        lams.append(r.budget.strength.item())
    return shares, lams, r


def test_loss_mechanism_keeps_the_share_under_the_budget():
    shares, lams, r = _train_loss_mechanism(0.2, steps=120)
    assert abs(shares[0] - 0.5) < 0.1 and max(lams[:10]) > 0  # starts at (N-1)/N: lam rises
    assert max(lams) <= 0.5
    # Adam moves the locality bias at a fixed speed whatever the loss's size, so the share swings between ~0
    # and ~0.5 while lam crosses the value that balances the local aux loss (this router has no group, so its
    # aux loss balances its own tokens over both nodes and pulls the bias back): a limit cycle. Dual ascent
    # keeps the time-averaged share at or below the budget, which is what this checks.
    assert sum(shares[40:]) / len(shares[40:]) <= 0.2 + 0.03
    assert min(shares[40:]) < 0.05 and min(lams[40:]) < max(lams[40:])  # lam moves both ways
    # checkpoint round trip: lam, steps and the mechanism
    fresh = LocMoERouter(r.config, topology=r.topology)
    fresh.load_state_dict(r.state_dict())
    assert fresh.budget.strength.item() == r.budget.strength.item() and fresh.budget.steps == 120
    assert r.get_extra_state()["budget"]["mechanism"] == "loss"
    # a margin is no loss coefficient: a selection-mechanism checkpoint, or one saved before the mechanism
    # was recorded (always a selection margin), restarts lam at 0; the other way round as well
    _, sel = _shares(0.2, steps=20)
    old = sel.get_extra_state()
    fresh.set_extra_state(old)
    assert fresh.budget.strength.item() == 0.0 and fresh.budget.steps == 0
    del old["budget"]["mechanism"]
    sel2 = LocMoERouter(sel.config, topology=sel.topology)
    sel2.set_extra_state(old)
    assert sel2.budget.strength.item() == sel.budget.strength.item() > 0
    sel2.set_extra_state(r.get_extra_state())
    assert sel2.budget.strength.item() == 0.0


def test_budget_mechanism_config():
    base = dict(num_experts=8, hidden_size=16, topk=2)
    sel = LocMoEConfig(**base, cross_node_budget=0.1, budget_mechanism="selection")
    assert sel.locality_bias is False and sel.locality_loss_coeff == 0.0
    loss = LocMoEConfig(**base, cross_node_budget=0.1, budget_mechanism="loss")
    assert loss.locality_bias is True and loss.locality_loss_coeff == 0.0
    assert LocMoEConfig(**base, locality_loss_coeff=0.01).budget_mechanism is None  # no budget, no mechanism
    with pytest.raises(ConfigError, match="budget_mechanism='margin' .* 'loss', 'selection'|budget_mechanism"):
        LocMoEConfig(**base, cross_node_budget=0.1, budget_mechanism="margin")
    with pytest.raises(ConfigError, match="no cross_node_budget is set: set cross_node_budget"):
        LocMoEConfig(**base, locality_loss_coeff=0.01, budget_mechanism="loss")
    with pytest.raises(ConfigError, match="leave locality_bias on"):
        LocMoEConfig(**base, cross_node_budget=0.1, budget_mechanism="loss", locality_bias=False)
    with pytest.raises(ConfigError, match="locality_bias is trained by the locality loss"):
        LocMoEConfig(**base, cross_node_budget=0.1, budget_mechanism="selection", locality_bias=True)
    assert LocMoEConfig.from_dict({**base, "cross_node_budget": 0.1, "budget_mechanism": "selection"}) == sel


def _worker(rank, world):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from locmoe_plugin.demo import cpu_shims

    from .megatron_helpers import D, build_layer

    # core router on 4 ranks = 2 nodes x 2, one group: same lam everywhere, group share at the budget
    topo = Topology.from_ranks_per_node(world, 2, 8, ep_rank=rank)
    shares, r = _shares(0.2, steps=150, rank=rank, group=dist.group.WORLD, topo=topo)
    out = {"shares": shares, "strength": r.budget.strength.item(), "extra": r.get_extra_state()["budget"]}
    # the "loss" mechanism: each rank trains its own copy on its own tokens; lam follows the group's counts
    loss_shares, lams, _ = _train_loss_mechanism(0.2, steps=20, rank=rank, group=dist.group.WORLD, topo=topo)
    out.update(loss_shares=loss_shares, lams=lams)
    # Megatron router, "loss" mechanism (a tensor loss coefficient through Megatron's loss plumbing): lam
    # rides in the router's state dict (core._extra_state) and round-trips
    cpu_shims.install()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
    locmoe = {"routing": "locmoe", "cross_node_budget": 0.1, "budget_mechanism": "loss", "gpus_per_node": 2}
    torch.manual_seed(0)
    layer = build_layer(MoELayer, 1, world, locmoe, topk=2, dispatcher="flat")
    g = torch.Generator().manual_seed(rank)
    for _ in range(5):
        x = torch.randn(16, 2, D, generator=g).requires_grad_(True)
        y, _ = layer(x)
        y.sum().backward()
    core = layer.router.core
    state = layer.router.state_dict()
    torch.manual_seed(0)
    fresh = build_layer(MoELayer, 1, world, locmoe, topk=2, dispatcher="flat")
    fresh.router.load_state_dict(state)
    out.update(mcore_strength=core.budget.strength.item(), mcore_loaded=fresh.router.core.budget.strength.item(),
               mcore_steps=fresh.router.core.budget.steps,
               mcore_bias_grad=core.locality_bias.grad[rank].abs().sum().item())  # the bias is on and trained
    parallel_state.destroy_model_parallel()
    return out


def test_four_ranks_two_nodes():
    pytest.importorskip("megatron.core")
    res = run_workers(_worker, 4)
    strengths = [r["strength"] for r in res]
    assert len(set(strengths)) == 1 and strengths[0] > 0  # bitwise equal on every rank
    assert all(r["extra"] == res[0]["extra"] for r in res)
    shares = res[0]["shares"]
    assert all(r["shares"] == shares for r in res)  # every rank measured the same group share
    for i in range(70, 150, 10):
        assert abs(sum(shares[i:i + 10]) / 10 - 0.2) <= 0.03
    lams = res[0]["lams"]
    assert max(lams) > 0 and all(r["lams"] == lams and r["loss_shares"] == res[0]["loss_shares"] for r in res)
    mc = [r["mcore_strength"] for r in res]
    assert len(set(mc)) == 1 and mc[0] > 0
    assert all(r["mcore_loaded"] == r["mcore_strength"] and r["mcore_steps"] == 5 for r in res)
    assert all(r["mcore_bias_grad"] > 0 for r in res)
