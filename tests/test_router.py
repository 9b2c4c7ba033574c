"""The framework-free router: losses, telemetry, capacity modes, locality learning, CLI."""

import json
import math

import pytest
import torch

from locmoe_plugin import LocMoEConfig, LocMoERouter, Topology, collect_stats, format_stats
from locmoe_plugin.bounds import ec_min_exact
from locmoe_plugin.capacity import CapacityController, capacity_from_factor
from locmoe_plugin.cli import main as cli_main


def test_cross_node_pairs_hand_example():
    # d = n = 4: GrAP logits are the features themselves. Experts 0,1 on node 0 (this rank), 2,3 on node 1.
    topo = Topology.from_ranks_per_node(2, 1, 4, ep_rank=0)
    cfg = LocMoEConfig(num_experts=4, hidden_size=4, topk=2, routing="locmoe", gate="grap", locality_loss_coeff=0.01)
    x = torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.0, 0.0, 5.0, 4.0], [5.0, 0.0, 4.0, 0.0]])
    out = LocMoERouter(cfg, topo)(x)
    assert out.assignment.expert_ids.tolist() == [[0, 1], [2, 3], [0, 2]]
    d = out.stats.to_dict()
    assert d["cross_node_pairs"] == 3 and d["routed_pairs"] == 6 and d["cross_node_share"] == 0.5
    assert d["tokens_per_expert"] == [2, 1, 2, 1]
    assert d["max_over_mean_load"] == pytest.approx(2 / 1.5)
    assert set(out.losses) == {"aux", "locality"}


@pytest.mark.parametrize("routing", ["topk", "locmoe", "hybrid"])
@pytest.mark.parametrize("gate", ["grap", "dense"])
def test_zero_tokens_and_zero_norm_give_no_nan(routing, gate):
    topo = Topology.from_ranks_per_node(2, 1, 8, ep_rank=1)
    cfg = LocMoEConfig(num_experts=8, hidden_size=32, topk=2, routing=routing, gate=gate, z_loss_coeff=1e-3)
    router = LocMoERouter(cfg, topo)
    x = torch.zeros(6, 32, requires_grad=True)
    out = router(x)
    assert torch.isfinite(out.assignment.weights).all() and torch.isfinite(out.probs).all()
    out.total_loss.backward()
    assert torch.isfinite(x.grad).all()
    empty = router(torch.zeros(0, 32))
    assert empty.assignment.expert_ids.shape == (0, 2) and torch.isfinite(empty.total_loss)


def test_single_node_locality_loss_is_exactly_zero():
    cfg = LocMoEConfig(num_experts=8, hidden_size=64, topk=2, locality_loss_coeff=0.01)
    x = torch.randn(16, 64, requires_grad=True)
    out = LocMoERouter(cfg, Topology.single_node(4, 8))(x)
    assert out.losses["locality"].item() == 0.0
    (g,) = torch.autograd.grad(out.losses["locality"], x)
    assert (g == 0).all()


def test_drops_are_counted_never_silent():
    topo = Topology.from_ranks_per_node(4, 2, 8, ep_rank=0)
    cfg = LocMoEConfig(num_experts=8, hidden_size=64, topk=2, capacity="factor", capacity_factor=0.5, min_capacity=0,
                       locality_loss_coeff=0.0)
    x = torch.randn(64, 64)
    out = LocMoERouter(cfg, topo)(x)
    st = out.stats
    assert st.capacity == capacity_from_factor(0.5, 64, 2, 8, 0) == 8
    assert int(st.tokens_per_expert.max()) <= 8
    assert int(st.dropped_pairs) == 64 * 2 - int(st.tokens_per_expert.sum()) > 0
    assert torch.equal(st.requested_per_expert - st.tokens_per_expert, (st.requested_per_expert - 8).clamp_min(0))
    # with the locality loss the limit follows each node's share of the demand (node 0: experts 0-3)
    st = LocMoERouter(cfg.replace(locality_loss_coeff=0.01), topo)(x).stats
    req = st.requested_per_expert
    share0 = float(req[:4].sum()) * 2 / float(req.sum())
    limit = torch.tensor([math.ceil(8 * share0)] * 4 + [math.ceil(8 * (2 - share0))] * 4)
    assert torch.equal(st.tokens_per_expert, torch.minimum(req, limit))
    assert int(st.dropped_pairs) == int((req - limit).clamp_min(0).sum())


def test_locality_loss_teaches_grap_routing_to_stay_on_node():
    """Through the parameter-free GrAP gate, the locality loss moves hidden states so that tokens pick
    experts on their own node: the cross-node share drops from ~50 % to near 0 (while aux keeps balance)."""
    torch.manual_seed(0)
    topo = Topology.from_ranks_per_node(2, 1, 8, ep_rank=0)
    cfg = LocMoEConfig(num_experts=8, hidden_size=64, topk=2, locality_loss_coeff=1.0)
    router = LocMoERouter(cfg, topo)
    x = torch.nn.Parameter(torch.randn(256, 64))
    opt = torch.optim.Adam([x], lr=0.05)
    first = router(x).stats.to_dict()["cross_node_share"]
    for _ in range(60):
        opt.zero_grad()
        router(x).losses["locality"].backward()
        opt.step()
    last = router(x).stats.to_dict()["cross_node_share"]
    assert first > 0.3 and last < 0.05


# ----------------------------------------------------------------------------- capacity modes
def test_capacity_factor_mode_formula():
    cfg = LocMoEConfig(num_experts=8, hidden_size=64, topk=2, capacity="factor", capacity_factor=1.25)
    assert CapacityController(cfg).capacity(100, None, True) == math.ceil(1.25 * 100 * 2 / 8) == 32
    assert CapacityController(cfg).capacity(1, None, True) == 4  # min_capacity


def test_capacity_bound_mode_uses_theorem_once():
    cfg = LocMoEConfig(num_experts=16, hidden_size=5120, topk=1, capacity="bound", delta=0.03)
    ctl = CapacityController(cfg)
    assert not ctl.needs_affinity(True) or ctl.factor is None
    assert ctl.capacity(1000, torch.rand(1000, 16), True) == math.ceil(1.9648101763405457 * 1000 / 16)
    assert ctl.factor == pytest.approx(1.9648, abs=1e-4)
    # estimated delta: mean top-1 affinity of the first batch, then frozen
    cfg2 = LocMoEConfig(num_experts=4, hidden_size=512, topk=1, capacity="bound")
    ctl2 = CapacityController(cfg2)
    aff = torch.tensor([[0.10, 0.0, 0.0, 0.0], [0.0, 0.30, 0.0, 0.0]])
    ctl2.capacity(2, aff, True)
    assert ctl2.delta == pytest.approx(0.2)
    assert ctl2.factor == pytest.approx(min(4.0, max(0.5, ec_min_exact(0.2, 512, 4))))
    assert not ctl2.needs_affinity(True)


def test_capacity_adaptive_reestimates_every_interval():
    cfg = LocMoEConfig(num_experts=2, hidden_size=64, topk=1, capacity="adaptive", adaptive_interval=3)
    ctl = CapacityController(cfg)
    # owners: t0, t2 -> expert 0; t1, t3 -> expert 1. Expert 0: other t3 (0.35) >= own t2 (0.3): 1 of 4
    # pairs misranked; expert 1: 0 of 4. q = 1/8; chance q(n=2) = 1/6 -> factor 2.0 * (1/8) * 6 = 1.5
    aff = torch.tensor([[0.5, 0.1], [0.2, 0.4], [0.3, 0.1], [0.35, 0.6]])
    ctl.capacity(4, aff, True)
    assert ctl.q_hat == pytest.approx(1 / 8) and ctl.factor == pytest.approx(1.5)
    ctl.capacity(4, aff, True)
    assert not ctl.needs_affinity(True)  # step 2 of 3: no estimate
    ctl.capacity(4, aff, True)
    assert ctl.steps == 3 and ctl.needs_affinity(True)  # step 3: re-estimate
    assert not ctl.needs_affinity(False)  # eval forwards never re-estimate
    resonant = torch.tensor([[0.9, 0.0], [0.1, 0.8], [0.7, 0.2], [0.0, 0.95]])  # q = 0 -> clamped to 0.5
    ctl.capacity(4, resonant, True)
    assert ctl.q_hat == 0 and ctl.factor == 0.5 and ctl.steps == 4
    assert not ctl.needs_affinity(True)


def test_adaptive_starts_at_the_isotropic_factor_on_isotropic_tokens():
    """Monte Carlo: on tokens uniform on the sphere the misranking rate is near chance, 1 / (2 (n + 1)),
    so LocMoE+'s adaptive factor starts near ``capacity_factor_isotropic`` (GrAP affinities of one token
    are slightly negatively dependent at finite d, which puts q a few per cent below chance)."""
    d, n = 512, 16
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, d, generator=g)
    cfg = LocMoEConfig(num_experts=n, hidden_size=d, topk=1, routing="hybrid", capacity="adaptive")
    router = LocMoERouter(cfg)
    router.train()(x)
    assert router.capacity.q_hat == pytest.approx(1 / (2 * (n + 1)), rel=0.08)
    assert router.capacity.factor == pytest.approx(2.0, rel=0.08)


def test_capacity_state_roundtrip():
    cfg = LocMoEConfig(num_experts=4, hidden_size=64, topk=1, capacity="adaptive", delta=0.2)
    a = CapacityController(cfg)
    a.capacity(2, torch.full((2, 4), 0.3), True)
    b = CapacityController(cfg)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()


# ----------------------------------------------------------------------------- telemetry / CLI
def test_collect_and_format_stats():
    model = torch.nn.ModuleDict({"layer0": LocMoERouter(LocMoEConfig(num_experts=4, hidden_size=16, topk=1))})
    assert collect_stats(model) == {}
    model["layer0"](torch.randn(8, 16))
    stats = collect_stats(model)
    assert list(stats) == ["layer0"]
    line = format_stats(stats)
    assert line.startswith("layer0: cross_node_share=0")


def test_cli_capacity_json(capsys):
    assert cli_main(["capacity", "--hidden-size", "5120", "--num-experts", "16", "--delta", "0.03", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ec_min_exact"] == pytest.approx(1.9648, rel=1e-3)
    assert out["ec_min_erfc"] == pytest.approx(1.9664, rel=1e-3)
    assert 0 < out["p_delta"] < 1


def test_cli_bad_input_is_one_line(capsys):
    assert cli_main(["capacity", "--hidden-size", "5120", "--num-experts", "16", "--delta", "2"]) == 2
    err = capsys.readouterr().err
    assert "delta" in err and "Traceback" not in err


def test_total_loss_is_a_tensor_even_without_losses():
    cfg = LocMoEConfig(num_experts=4, hidden_size=16, topk=1, routing="topk", aux_loss_coeff=0.0)
    out = LocMoERouter(cfg)(torch.randn(3, 16))
    assert out.losses == {} and torch.is_tensor(out.total_loss) and out.total_loss.item() == 0.0


def test_node_limited_router_keeps_each_token_on_one_node():
    topo = Topology.from_ranks_per_node(4, 1, 8, ep_rank=0)  # 4 nodes, 2 experts each
    for routing in ("locmoe", "hybrid"):
        cfg = LocMoEConfig(num_experts=8, hidden_size=64, topk=2, routing=routing, max_nodes_per_token=1)
        ids = LocMoERouter(cfg, topo)(torch.randn(50, 64)).assignment.requested_ids
        nodes = topo.expert_to_node[ids]
        assert (nodes[:, 0] == nodes[:, 1]).all()


@pytest.mark.parametrize("routing", ["topk", "locmoe"])
def test_padding_is_left_out_of_the_losses(routing):
    """With ``valid``, every loss equals the loss of the valid tokens alone; all tokens are still routed."""
    topo = Topology.from_ranks_per_node(4, 2, 8, ep_rank=1)
    cfg = LocMoEConfig(num_experts=8, hidden_size=32, topk=2, routing=routing, gate="dense", z_loss_coeff=1e-3,
                       locality_loss_coeff=0.01 if routing == "locmoe" else None)
    torch.manual_seed(0)
    r = LocMoERouter(cfg, topo)
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(3))
    valid = torch.arange(24) % 3 != 0
    masked = r(x, valid=valid)
    alone = r(x[valid])
    assert masked.losses.keys() == alone.losses.keys() and len(masked.losses) >= 2
    for key in masked.losses:
        assert torch.allclose(masked.losses[key], alone.losses[key], rtol=1e-6, atol=0), key
    assert masked.assignment.expert_ids.shape == (24, 2)  # padding is routed all the same
    nothing = r(x, valid=torch.zeros(24, dtype=torch.bool))  # all padding: finite zeros, no NaN
    assert all(torch.isfinite(v) and v == 0 for v in nothing.losses.values())
    with pytest.raises(ValueError, match="one per token"):
        r(x, valid=valid[:5])


def test_softmax_topk_node_has_the_composed_gradient():
    """The fused softmax -> top-k -> renormalise node: gradcheck in fp64, and in fp32 the same values and
    (to rounding) the same gradients as the composed ops, for gradients through the weights, through the
    probabilities (the aux loss's path), both, and through capacity drops."""
    from locmoe_plugin.routing import route
    from locmoe_plugin.softmax_topk import softmax_topk

    g = torch.Generator().manual_seed(11)
    l64 = torch.randn(9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: softmax_topk(x, 3)[:2], (l64,))
    logits = torch.randn(40, 16, generator=g) * 3
    f = torch.rand(16, generator=g)
    cot = torch.randn(40, 4, generator=g)
    allowed = torch.ones(40, 16, dtype=torch.bool)  # forces the composed path, same selection
    for capacity in (None, 7):
        for use in ("weights", "probs", "both"):
            grads, outs = [], []
            for kwargs in ({}, {"allowed": allowed}):
                x = logits.clone().requires_grad_(True)
                a, probs = route(x, topk=4, mode="locmoe", capacity=capacity, **kwargs)
                loss = {"weights": (a.weights * cot).sum(), "probs": (probs @ f).sum(),
                        "both": (a.weights * cot).sum() + (probs @ f).sum()}[use]
                grads.append(torch.autograd.grad(loss, x)[0])
                outs.append((a.expert_ids, a.weights.detach(), probs.detach()))
            for u, v in zip(*outs):
                assert torch.equal(u, v)
            torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=2e-6, msg=f"{use}, capacity {capacity}")
            assert grads[0].abs().sum() > 0


def test_checkpoint_of_other_gate_or_locality_bias_names_the_settings():
    """LocMoE+ changed its defaults (GrAP + locality loss -> dense gate + cross-node budget): a checkpoint
    of the old defaults loaded into the new ones is one error naming the settings it was saved with."""
    topo = Topology.from_ranks_per_node(2, 1, 8, ep_rank=0)
    old = LocMoERouter(LocMoEConfig(num_experts=8, hidden_size=16, routing="hybrid", gate="grap",
                                    locality_loss_coeff=0.01, resonance_mass=0), topology=topo)
    new = LocMoERouter(LocMoEConfig(num_experts=8, hidden_size=16, routing="hybrid"), topology=topo)
    with pytest.raises(RuntimeError) as err:
        new.load_state_dict(old.state_dict())
    assert "gate='grap'" in str(err.value) and "locality_loss_coeff" in str(err.value)
    with pytest.raises(RuntimeError, match="gate='dense'"):
        old.load_state_dict(new.state_dict())
    # a non-strict load too (the gate would route untrained); the same settings load
    with pytest.raises(RuntimeError, match="gate='grap'"):
        new.load_state_dict(old.state_dict(), strict=False)
    LocMoERouter(old.config, topology=topo).load_state_dict(old.state_dict())
