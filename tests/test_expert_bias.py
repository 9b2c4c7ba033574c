"""Loss-free balancing (``LocMoEConfig.expert_bias_rate``): selection offsets, their update, and where
they stay out (combine weights, evaluation, hash routing, Megatron's TopKRouter flag)."""

import argparse

import pytest
import torch

from locmoe_plugin import LocMoEConfig, LocMoERouter
from locmoe_plugin.config import ConfigError
from locmoe_plugin.routing import route


def test_bias_changes_selection_not_weights():
    # probs of one token: softmax(log([0.5, 0.3, 0.2])) = [0.5, 0.3, 0.2]
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    a, probs = route(logits, topk=1, renormalize=False)
    assert a.expert_ids.tolist() == [[0]]
    # +0.35 on expert 2: scores 0.5, 0.3, 0.55 -> expert 2 chosen, weight its unbiased 0.2
    a, probs = route(logits, topk=1, renormalize=False, expert_bias=torch.tensor([0.0, 0.0, 0.35]))
    assert a.expert_ids.tolist() == [[2]]
    assert a.weights.item() == pytest.approx(0.2)
    assert torch.allclose(probs, torch.tensor([[0.5, 0.3, 0.2]]))
    # top-2 with renormalisation: experts {0, 2}, weights 0.5 / 0.7 and 0.2 / 0.7
    a, _ = route(logits, topk=2, expert_bias=torch.tensor([0.0, 0.0, 0.35]))
    got = dict(zip(a.expert_ids[0].tolist(), a.weights[0].tolist()))
    assert got == pytest.approx({2: 0.2 / 0.7, 0: 0.5 / 0.7})


def test_update_rule_hand_worked():
    cfg = LocMoEConfig(num_experts=4, hidden_size=8, topk=1, gate="dense", routing="topk", aux_loss_coeff=0.0,
                       expert_bias_rate=0.1)
    r = LocMoERouter(cfg).train()
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[0, 0] = 1.0
        r.gate.weight[1, 1] = 1.0
    # 3 tokens prefer expert 0, 1 prefers expert 1: load [3, 1, 0, 0], mean 1 -> sign [-1, 0, +1, +1]
    x = torch.zeros(4, 8)
    x[:3, 0] = 5.0
    x[3, 1] = 5.0
    out = r(x)
    assert out.stats.requested_per_expert.tolist() == [3, 1, 0, 0]
    assert r.expert_bias.tolist() == pytest.approx([-0.1, 0.0, 0.1, 0.1])
    assert r.expert_bias.dtype == torch.float32
    # evaluation and no-grad forwards route with the bias but leave it alone
    before = r.expert_bias.clone()
    r.eval()
    r(x)
    r.train()
    with torch.no_grad():
        r(x)
    assert torch.equal(r.expert_bias, before)


def _load_ratio(rate: float) -> float:
    torch.manual_seed(0)
    cfg = LocMoEConfig(num_experts=8, hidden_size=16, topk=2, gate="dense", routing="topk", aux_loss_coeff=0.0,
                       expert_bias_rate=rate)
    r = LocMoERouter(cfg).train()
    with torch.no_grad():
        r.gate.weight.normal_()
        r.gate.weight[0] += 2.0  # expert 0 is everyone's favourite
    g = torch.Generator().manual_seed(1)
    loads = []
    for step in range(300):
        x = torch.randn(256, 16, generator=g).abs()
        loads.append(r(x).stats.requested_per_expert.float())
    last = torch.stack(loads[-50:]).sum(0)
    return (last.max() / last.mean()).item()


def test_bias_balances_a_skewed_gate():
    skewed, balanced = _load_ratio(0.0), _load_ratio(1e-2)
    assert skewed > 2.0
    assert balanced < 1.25
    assert balanced < skewed / 2


def test_bias_survives_half_precision_and_checkpoints():
    cfg = LocMoEConfig(num_experts=4, hidden_size=8, topk=2, expert_bias_rate=1e-3)
    r = LocMoERouter(cfg).train().bfloat16()
    assert r.expert_bias.dtype == torch.bfloat16
    r(torch.randn(16, 8, dtype=torch.bfloat16))
    assert r.expert_bias.dtype == torch.float32  # kept in fp32 from the first forward on
    assert "expert_bias" in r.state_dict()
    r2 = LocMoERouter(cfg)
    r2.load_state_dict(r.state_dict())
    assert torch.equal(r2.expert_bias, r.expert_bias.float())
    plain = LocMoERouter(LocMoEConfig(num_experts=4, hidden_size=8, topk=2))
    assert "expert_bias" not in plain.state_dict()
    # a checkpoint without the offsets loads into a router with them: they start at zero
    r3 = LocMoERouter(cfg)
    r3.expert_bias.fill_(0.5)
    r3.load_state_dict(plain.state_dict())
    assert torch.equal(r3.expert_bias, torch.zeros(4))


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="expert_bias_rate"):
        LocMoEConfig(num_experts=4, hidden_size=8, topk=2, expert_bias_rate=-1e-3)
    with pytest.raises(ConfigError, match="hash routing has no gate"):
        LocMoEConfig(num_experts=4, hidden_size=8, topk=2, routing="hash", expert_bias_rate=1e-3)


def test_megatron_flag_and_refusal():
    pytest.importorskip("megatron.core")
    from locmoe_plugin.megatron.args import add_arguments, settings_from_args

    p = add_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--locmoe", "--locmoe-expert-bias-rate", "0.001"])
    args.num_experts, args.hidden_size, args.moe_router_topk = 8, 64, 2
    overrides, _ = settings_from_args(args)
    assert overrides["expert_bias_rate"] == 0.001
    args.moe_router_enable_expert_bias = True
    with pytest.raises(ConfigError, match="--locmoe-expert-bias-rate"):
        settings_from_args(args)


def test_megatron_refuses_the_bias_where_a_recompute_would_route_differently():
    pytest.importorskip("megatron.core")
    from megatron.core.transformer import TransformerConfig

    from locmoe_plugin.megatron.router import LocMoEMegatronRouter

    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_moe_experts=8, moe_router_topk=2,
                moe_token_dispatcher_type="alltoall", recompute_granularity="selective", recompute_modules=["moe"])
    tc = TransformerConfig(**base)
    tc.pipeline_model_parallel_size = 2  # set after construction: no pipeline groups are needed to check
    with pytest.raises(ConfigError, match="recomputed routing would differ"):
        LocMoEMegatronRouter(tc, locmoe={"expert_bias_rate": 1e-3})
    tc = TransformerConfig(**base)
    tc.moe_router_enable_expert_bias = True
    with pytest.raises(ConfigError, match="--locmoe-expert-bias-rate"):
        LocMoEMegatronRouter(tc, locmoe={})
