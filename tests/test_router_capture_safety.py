"""The router issues no host read and no data-dependent shape in the modes CUDA graphs may capture (checked
on the meta device, where any such read fails), and the Megatron adapter refuses the rest in one message."""

import types

import pytest
import torch

from locmoe_plugin.config import ConfigError, LocMoEConfig
from locmoe_plugin.megatron.cuda_graphs import captured_scopes, check_cuda_graph_support
from locmoe_plugin.router import LocMoERouter
from locmoe_plugin.topology import Topology

CAPTURABLE = [
    {},
    {"capacity": "factor", "capacity_factor": 1.0},
    {"routing": "hybrid", "capacity": "factor", "capacity_factor": 1.0, "drop_policy": "choice"},
    {"gate": "dense", "z_loss_coeff": 1e-3, "expert_bias_rate": 1e-3, "max_nodes_per_token": 1},
    {"gate": "dense", "expert_bias_rate": 1e-3, "cross_node_budget": 0.2, "budget_mechanism": "node"},
    # the budget's warm-up: its target and counter stay on the device
    {"cross_node_budget": 0.1, "cross_node_budget_warmup": 10},
]


@pytest.mark.parametrize("settings", CAPTURABLE)
def test_router_runs_on_meta_tensors(settings):
    cfg = LocMoEConfig(num_experts=8, hidden_size=32, topk=2, locality_loss_coeff=0.01, **settings)
    router = LocMoERouter(cfg, Topology.from_ranks_per_node(4, 2, 8, 0)).to("meta")
    out = router(torch.empty(6, 2, 32, device="meta"), valid=torch.ones(6, 2, dtype=torch.bool, device="meta"))
    assert out.assignment.expert_ids.shape == (12, 2) and out.total_loss.shape == ()


def test_host_estimated_capacity_reads_the_device():
    cfg = LocMoEConfig(num_experts=8, hidden_size=32, topk=2, capacity="bound")
    router = LocMoERouter(cfg).to("meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        router(torch.empty(12, 32, device="meta"))  # the factor's estimate is read on the host


def _tc(impl, scope):
    return types.SimpleNamespace(cuda_graph_impl=impl, cuda_graph_scope=scope)


def test_cuda_graph_scopes_and_refusals():
    assert captured_scopes(_tc("none", ["moe_router"])) == set()
    assert captured_scopes(_tc("transformer_engine", [])) == {"full layer"}
    enum_like = types.SimpleNamespace(name="moe_router")
    assert captured_scopes(_tc("transformer_engine", [enum_like])) == {"moe_router"}
    plain = LocMoEConfig(num_experts=8, hidden_size=32, topk=2)
    check_cuda_graph_support(_tc("transformer_engine", ["moe_router"]), plain, True)  # capturable
    check_cuda_graph_support(_tc("transformer_engine", ["attn"]), plain.replace(capacity="bound"), True)
    with pytest.raises(ConfigError, match="capture only the router"):
        check_cuda_graph_support(_tc("local", ["moe_router", "moe_preprocess"]), plain, True)
    check_cuda_graph_support(_tc("local", ["moe_router", "moe_preprocess"]), plain, False)  # Megatron's dispatcher
    with pytest.raises(ConfigError, match="capacity 'adaptive' estimates its factor on the host"):
        check_cuda_graph_support(_tc("transformer_engine", ["moe_router"]), plain.replace(capacity="adaptive"), True)
    with pytest.raises(ConfigError, match="routing 'hash'"):
        check_cuda_graph_support(_tc("transformer_engine", ["moe_router"]), LocMoEConfig(num_experts=8, hidden_size=32, topk=2, routing="hash", locality_loss_coeff=0.0), False)
