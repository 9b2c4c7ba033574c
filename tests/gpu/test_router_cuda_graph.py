"""GPU: the LocMoE router captured in a CUDA graph replays exactly like eager forwards on new inputs."""

import pytest
import torch

from locmoe_plugin.config import LocMoEConfig
from locmoe_plugin.router import LocMoERouter
from locmoe_plugin.topology import Topology

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SETTINGS = [
    {},
    {"capacity": "factor", "capacity_factor": 1.0},
    {"routing": "hybrid", "capacity": "factor", "capacity_factor": 1.0},
    {"gate": "dense", "z_loss_coeff": 1e-3, "max_nodes_per_token": 1},
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_router_graph_replay_matches_eager(settings):
    torch.manual_seed(0)
    cfg = LocMoEConfig(num_experts=32, hidden_size=256, topk=4, locality_loss_coeff=0.01, **settings)
    router = LocMoERouter(cfg, Topology.from_ranks_per_node(4, 2, 32, 0), device="cuda").cuda()
    static_x = torch.randn(1024, 256, device="cuda", requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph requires
        for _ in range(2):
            router(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = router(static_x)
    captured = (out.assignment.expert_ids, out.assignment.weights, out.total_loss, out.stats.tokens_per_expert)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(3):
        with torch.no_grad():
            static_x.copy_(torch.randn(1024, 256, device="cuda", generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        ref = router(static_x.detach().clone())
        want = (ref.assignment.expert_ids, ref.assignment.weights, ref.total_loss, ref.stats.tokens_per_expert)
        for got, exp in zip(captured, want):
            assert torch.equal(got, exp)
