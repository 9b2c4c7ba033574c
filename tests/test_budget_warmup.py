"""Warm-up of the cross-node budget (``LocMoEConfig.cross_node_budget_warmup``): the target's schedule by
hand, that the controller follows it, that W = 0 is the update without warm-up bit for bit, equal state on
every rank, checkpoints, and bad values."""

import argparse

import pytest
import torch

from locmoe_plugin import LocMoEConfig, LocMoERouter
from locmoe_plugin.budget import CrossNodeBudget
from locmoe_plugin.config import unconstrained_share
from locmoe_plugin.config import ConfigError
from locmoe_plugin.topology import Topology

from ._dist import run_workers


def _targets(budget: CrossNodeBudget, steps: int) -> list[float]:
    """The target before each of ``steps`` updates (each update sees share = its target: lam stays 0)."""
    out = []
    for _ in range(steps):
        out.append(float(budget.target()))
        budget.update(torch.tensor(0), torch.tensor(0))  # no pairs: no dual step, but the schedule runs
    return out


def test_target_schedule_hand_worked():
    # 2 nodes: from (2-1)/2 = 0.5 down to 0.1 over 4 updates, linearly: 0.4 / 4 = 0.1 per update
    b = CrossNodeBudget(0.1, warmup=4, start_share=unconstrained_share(2))
    assert _targets(b, 7) == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1], abs=1e-7)
    assert float(b.target()) == pytest.approx(0.1, abs=1e-8) and int(b.warmup_step) == 4  # the counter stops at W
    # 4 nodes: from 0.75 to 0 over 3 updates: 0.75, 0.5, 0.25, then 0
    b = CrossNodeBudget(0.0, warmup=3, start_share=unconstrained_share(4))
    assert _targets(b, 5) == pytest.approx([0.75, 0.5, 0.25, 0.0, 0.0], abs=1e-7)
    # a budget above the unconstrained share constrains nothing to warm up from: the budget throughout
    b = CrossNodeBudget(0.7, warmup=10, start_share=0.5)
    assert _targets(b, 3) == pytest.approx([0.7, 0.7, 0.7])
    # the dual step aims at this update's target: lam = 0 + 0.5 * (0.6 - 0.5) = 0.05, then
    # 0.05 + 0.5 * (0.6 - 0.4) = 0.15, then 0.15 + 0.5 * (0.1 - 0.3) = 0.05
    b = CrossNodeBudget(0.1, rate=0.5, warmup=4, start_share=0.5)
    for cross, want in ((6, 0.05), (6, 0.15), (1, 0.05)):
        b.update(torch.tensor(cross), torch.tensor(10))
        assert b.strength.item() == pytest.approx(want, abs=1e-7)


def test_router_starts_from_its_layout_and_rebinds():
    cfg = LocMoEConfig(num_experts=8, hidden_size=16, topk=2, cross_node_budget=0.1, cross_node_budget_warmup=50)
    r = LocMoERouter(cfg, topology=Topology.from_ranks_per_node(4, 1, 8, ep_rank=0))
    assert r.budget.warmup == 50 and r.budget.start_share == 0.75 and float(r.budget.target()) == 0.75
    r.bind(Topology.from_ranks_per_node(4, 2, 8, ep_rank=0))  # 2 nodes x 2
    assert r.budget.start_share == 0.5 and float(r.budget.target()) == 0.5


def _router(warmup, rank=0, group=None, topo=None, budget=0.1):
    torch.manual_seed(0)
    cfg = LocMoEConfig(num_experts=8, hidden_size=16, topk=2, gate="dense", routing="locmoe",
                       cross_node_budget=budget, cross_node_budget_warmup=warmup)
    r = LocMoERouter(cfg, topology=topo or Topology.from_ranks_per_node(2, 1, 8, ep_rank=rank), group=group).train()
    with torch.no_grad():  # a peaked gate: margins of order 0.1 are needed (as in test_cross_node_budget)
        r.gate.weight.normal_(0.0, 1.0)
    return r


def _run(r, steps, rank=0, seed=100):
    """``steps`` training forwards on fresh random tokens: [(target, share, lam)] after each."""
    g = torch.Generator().manual_seed(seed + rank)
    trace = []
    for _ in range(steps):
        target = float(r.budget.target())
        r(torch.randn(256, 16, generator=g))
        trace.append((target, r.budget.share.item(), r.budget.strength.item()))
    return trace


def test_share_follows_the_ramp_then_holds_the_budget():
    trace = _run(_router(100), 170)
    shares = [s for _, s, _ in trace]
    assert trace[0][0] == 0.5 and abs(shares[0] - 0.5) < 0.1
    assert max(lam for _, _, lam in trace[:5]) < 0.05  # no constraint at the start: lam barely moves
    for i in range(20, 100, 10):  # during the ramp the share trails the falling target by a small lag
        window = sum(shares[i:i + 10]) / 10
        target = sum(t for t, _, _ in trace[i:i + 10]) / 10
        assert -0.03 <= window - target <= 0.1, (i, window, target)
    for i in range(140, 170, 10):  # 40 steps after the ramp: the budget, as without warm-up
        assert abs(sum(shares[i:i + 10]) / 10 - 0.1) <= 0.03
    # without warm-up the share is at the budget from step ~40 on; with it, still ~0.3 at step 50
    plain = [s for _, s, _ in _run(_router(0), 60)]
    assert sum(plain[50:60]) / 10 < 0.15 < sum(shares[50:60]) / 10


def test_no_warmup_is_the_update_without_it_bit_for_bit():
    r = _router(0)
    assert r.budget.target() == 0.1 and isinstance(r.budget.target(), float)
    lam = torch.zeros(())
    g = torch.Generator().manual_seed(100)
    for _ in range(40):
        r(torch.randn(256, 16, generator=g))
        # the controller's rule without warm-up (target = the budget), on the share it measured
        lam = (lam + r.budget.rate * (r.budget.share - 0.1)).clamp(0.0, r.budget.max_strength)
        assert torch.equal(r.budget.strength, lam)
    assert int(r.budget.warmup_step) == 0 and "warmup" not in repr(r.budget)


def test_evaluation_and_no_grad_forwards_do_not_advance_the_schedule():
    r = _router(50)
    _run(r, 5)
    r.eval()
    r(torch.randn(64, 16))
    r.train()
    with torch.no_grad():
        r(torch.randn(64, 16))
    assert int(r.budget.warmup_step) == 5 and r.budget.steps == 5
    h = _router(50).bfloat16()  # half-precision wrappers cast floating buffers only: the count stays exact
    assert h.budget.warmup_step.dtype == torch.long


def test_checkpoint_round_trip():
    r = _router(50)
    _run(r, 30)
    state = r.state_dict()
    assert r.get_extra_state()["budget"]["warmup_step"] == 30
    fresh = _router(50)
    fresh.load_state_dict(state)
    assert int(fresh.budget.warmup_step) == 30 and fresh.budget.strength.item() == r.budget.strength.item()
    # resumed and uninterrupted runs go on alike, bit for bit
    assert _run(fresh, 30, seed=7) == _run(r, 30, seed=7)
    assert int(r.budget.warmup_step) == 50  # stopped at W
    # a shorter warm-up than the checkpoint's progress: over
    short = _router(20)
    short.load_state_dict(state)
    assert int(short.budget.warmup_step) == 20 and float(short.budget.target()) == pytest.approx(0.1)
    # a checkpoint saved before the warm-up was recorded: its update count is the progress
    old = {k: v for k, v in r.get_extra_state()["budget"].items() if k != "warmup_step"}
    old["steps"] = 12
    fresh.set_extra_state({"budget": old})
    assert int(fresh.budget.warmup_step) == 12
    # one saved without a budget, or with the other mechanism: a fresh controller, the warm-up from its start
    fresh.set_extra_state({"capacity": {}})
    assert int(fresh.budget.warmup_step) == 0 and fresh.budget.strength.item() == 0.0
    fresh.set_extra_state({"budget": {**r.get_extra_state()["budget"], "mechanism": "loss"}})
    assert int(fresh.budget.warmup_step) == 0


def test_bad_values_are_refused():
    base = dict(num_experts=8, hidden_size=16, topk=2, cross_node_budget=0.1)
    for bad in (-1, 1.5, 300.0, "300", True, None):
        with pytest.raises(ConfigError, match=r"cross_node_budget_warmup=.* whole number of training steps >= 0"):
            LocMoEConfig(**base, cross_node_budget_warmup=bad)
    for no_budget in (dict(locality_loss_coeff=0.01), dict(routing="topk")):
        with pytest.raises(ConfigError, match="no cross_node_budget is set: set cross_node_budget .* or remove "
                                              "cross_node_budget_warmup"):
            LocMoEConfig(num_experts=8, hidden_size=16, cross_node_budget_warmup=300, **no_budget)
    # the default budget of routing "locmoe" is a budget: it takes the warm-up
    assert LocMoEConfig(num_experts=8, hidden_size=16, cross_node_budget_warmup=300).cross_node_budget == 0.2
    assert LocMoEConfig(**base).cross_node_budget_warmup == 0


def test_entry_points():
    from locmoe_plugin.demo.megatron_job import locmoe_settings

    opts = argparse.Namespace(gpus_per_node=2, locality_coeff=0.01, locmoe_capacity="none", steps=10)
    s = locmoe_settings("locmoe:cross_node_budget=0.1,cross_node_budget_warmup=300", opts)
    assert s["cross_node_budget"] == 0.1 and s["cross_node_budget_warmup"] == 300
    assert locmoe_settings("locmoe:budget=0.1,budget_warmup=300", opts)["cross_node_budget_warmup"] == 300
    ds = {"num_experts": 8, "hidden_size": 16, "cross_node_budget": 0.1, "cross_node_budget_warmup": 300}
    assert LocMoEConfig.from_dict(ds).cross_node_budget_warmup == 300  # the DeepSpeed "locmoe" section
    pytest.importorskip("megatron.core")
    from locmoe_plugin.megatron.args import add_arguments, settings_from_args

    p = add_arguments(argparse.ArgumentParser())

    def parsed(*flags):
        args = p.parse_args(["--locmoe", *flags])
        args.num_experts, args.hidden_size, args.moe_router_topk = 8, 64, 2
        return args

    s = settings_from_args(parsed("--locmoe-cross-node-budget", "0.1", "--locmoe-cross-node-budget-warmup", "300"))[0]
    assert s["cross_node_budget"] == 0.1 and s["cross_node_budget_warmup"] == 300
    assert "cross_node_budget_warmup" not in settings_from_args(parsed("--locmoe-cross-node-budget", "0.1"))[0]
    with pytest.raises(SystemExit):
        p.parse_args(["--locmoe", "--locmoe-cross-node-budget-warmup", "1.5"])
    with pytest.raises(ConfigError, match="--locmoe-cross-node-budget-warmup -5 must be"):
        settings_from_args(parsed("--locmoe-cross-node-budget-warmup", "-5"))
    with pytest.raises(ConfigError, match="set --locmoe-cross-node-budget"):
        settings_from_args(parsed("--locmoe-locality-loss-coeff", "0.01", "--locmoe-cross-node-budget-warmup", "9"))


def _worker(rank, world):
    import torch.distributed as dist

    topo = Topology.from_ranks_per_node(world, 2, 8, ep_rank=rank)  # 2 nodes x 2
    r = _router(40, rank=rank, group=dist.group.WORLD, topo=topo)
    trace = _run(r, 60, rank=rank)  # each rank its own tokens; the controller reads the group's counts
    return {"trace": trace, "extra": r.get_extra_state()["budget"]}


def test_four_ranks_two_nodes_share_one_schedule():
    res = run_workers(_worker, 4)
    assert all(r["trace"] == res[0]["trace"] for r in res)  # targets, shares and lam bitwise equal
    assert all(r["extra"] == res[0]["extra"] for r in res)
    assert res[0]["extra"]["warmup_step"] == 40 and res[0]["extra"]["steps"] == 60
    targets = [t for t, _, _ in res[0]["trace"]]
    assert targets[0] == 0.5 and targets[20] == pytest.approx(0.3) and targets[40:] == [pytest.approx(0.1)] * 20
