"""The demo's RoutingMonitor: counts per layer, the busiest expert and the busiest rank, dropped pairs."""

import pytest
import torch

from locmoe_plugin.demo.metrics import RoutingMonitor


class _FixedRouter(torch.nn.Module):
    """Returns a fixed routing map [tokens, experts]."""

    def __init__(self, routing_map: torch.Tensor):
        super().__init__()
        self.routing_map = routing_map

    def forward(self, x):
        return self.routing_map


def test_rank_and_expert_load_of_a_hand_routing():
    # 8 experts on 2 ranks (experts 0-3 on rank 0, on node 0; 4-7 on rank 1, node 1); 4 tokens of this rank
    # (node 0), top-2; token 3 keeps one pair only (one dropped). Rank 0 gets 5 rows, rank 1 gets 2.
    rm = torch.zeros(4, 8, dtype=torch.bool)
    for t, experts in enumerate([(0, 1), (0, 2), (3, 4), (7,)]):
        rm[t, list(experts)] = True
    router = _FixedRouter(rm)
    node_of_expert = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    monitor = RoutingMonitor([router], lambda out: out, node_of_expert, my_node=0, topk=2, ranks=2)
    monitor.begin_step()
    router(torch.zeros(4, 1))
    got = monitor.end_step(torch.device("cpu"))
    monitor.remove()
    assert got["rank_max_over_mean_load"] == pytest.approx(5 / 3.5)
    assert got["max_over_mean_load"] == pytest.approx(2 / (7 / 8))  # expert 0 has 2 of the 7 rows
    assert got["cross_node_share"] == pytest.approx(2 / 7) and got["dropped_pairs"] == 1
    assert got["tokens_per_expert"] == [2, 1, 1, 1, 1, 0, 0, 1]


def test_ranks_must_divide_the_experts():
    with pytest.raises(ValueError, match="must divide the 8 experts"):
        RoutingMonitor([], lambda out: out, torch.zeros(8, dtype=torch.long), my_node=0, topk=2, ranks=3)
