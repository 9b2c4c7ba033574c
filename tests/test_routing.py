"""Routing: top-k, LocMoE, LocMoE+ hybrid, capacity, node-limited; index and Megatron forms."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from locmoe_plugin.routing import capacity_keep, dense_to_index, index_to_dense, node_limited_mask, route


def test_topk_hand_example():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0 + 1e-9], [0.1, 0.2, 0.3, 0.4]]))
    a, probs = route(logits, topk=2, mode="topk", renormalize=False)
    assert a.expert_ids.tolist() == [[0, 1], [3, 2]]
    torch.testing.assert_close(a.weights, torch.tensor([[0.5, 0.3], [0.4, 0.3]]), atol=1e-6, rtol=1e-6)
    a, _ = route(logits, topk=2, mode="topk", renormalize=True)
    torch.testing.assert_close(a.weights, torch.tensor([[0.625, 0.375], [4 / 7, 3 / 7]]), atol=1e-6, rtol=1e-6)
    dense, rmap = a.to_megatron()
    assert rmap.tolist() == [[True, True, False, False], [False, False, True, True]]
    torch.testing.assert_close(dense[1], torch.tensor([0.0, 0.0, 3 / 7, 4 / 7]))


def test_capacity_keep_by_score_and_position_hand_example():
    # 4 tokens, k=1, all choose expert 1; capacity 2
    ids = torch.tensor([[1], [1], [1], [1]])
    scores = torch.tensor([[0.1], [0.9], [0.5], [0.7]])
    assert capacity_keep(ids, scores, 2, 3, "score").flatten().tolist() == [False, True, False, True]
    assert capacity_keep(ids, scores, 2, 3, "position").flatten().tolist() == [True, True, False, False]
    # invalid ids are never kept; a 0-d tensor capacity works the same (no host sync needed)
    ids2 = torch.tensor([[0, -1], [0, 2]])
    keep = capacity_keep(ids2, torch.ones(2, 2), torch.tensor(1), 3, "score")
    assert keep.tolist() == [[True, False], [False, True]]


def test_capacity_keep_first_choices_first_hand_example():
    # 3 tokens, k=2, expert 0 may keep 2 pairs. Expert 0 is token 0's and token 1's second choice (scores
    # 0.9, 0.8) and token 2's first (0.2). "score" keeps tokens 0 and 1 (0.9, 0.8); "choice" keeps token 2's
    # first choice, then the best second choice (token 0, 0.9); expert 1 (capacity 2) keeps tokens 0, 1.
    ids = torch.tensor([[1, 0], [1, 0], [0, 1]])
    scores = torch.tensor([[0.95, 0.9], [0.85, 0.8], [0.2, 0.1]])
    assert capacity_keep(ids, scores, 2, 2, "score").tolist() == [[True, True], [True, True], [False, False]]
    assert capacity_keep(ids, scores, 2, 2, "choice").tolist() == [[True, True], [True, False], [True, False]]
    with pytest.raises(ValueError, match="'score', 'choice' or 'position'"):
        capacity_keep(ids, scores, 2, 2, "random")


def test_renormalize_kept_moves_a_dropped_experts_weight_to_the_kept_one():
    # k=2 of 3 experts, capacity 1: both tokens want expert 0 (same probability: token 0 keeps it, lower
    # index first); token 1 keeps only expert 2, whose weight e^1/(e^2+e^1) = 0.269 becomes 1.0
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    a, _ = route(logits, topk=2, mode="locmoe", capacity=1)
    b, _ = route(logits, topk=2, mode="locmoe", capacity=1, renormalize_kept=True)
    assert a.expert_ids.tolist() == b.expert_ids.tolist() == [[0, 1], [-1, 2]]
    w = math.exp(1) / (math.exp(2) + math.exp(1))
    torch.testing.assert_close(a.weights, torch.tensor([[1 - w, w], [0.0, w]]))
    torch.testing.assert_close(b.weights, torch.tensor([[1 - w, w], [0.0, 1.0]]))
    # a token that kept nothing stays at weight 0 (no NaN)
    c, _ = route(logits, topk=2, mode="locmoe", capacity=torch.tensor([0, 1, 0]), renormalize_kept=True)
    assert c.weights[1].tolist() == [0.0, 0.0] and torch.isfinite(c.weights).all()


def test_hybrid_expert_choice_keeps_highest_affinity_and_reports_drops():
    # 3 tokens, 2 experts, l=1. affinity: all prefer expert 0 with 0.9, 0.2, 0.5; capacity 2
    aff = torch.tensor([[0.9, 0.1], [0.2, 0.1], [0.5, 0.3]])
    logits = torch.zeros(3, 2)
    a, _ = route(logits, topk=1, mode="hybrid", affinity=aff, capacity=2)
    assert a.requested_ids.flatten().tolist() == [0, 0, 0]
    assert a.expert_ids.flatten().tolist() == [0, -1, 0]  # token 1 (lowest affinity) dropped
    assert a.weights[1].item() == 0.0
    assert a.tokens_per_expert().tolist() == [2, 0]


def test_node_limited_mask_hand_example():
    # 4 experts on 2 nodes (experts 0,1 | 2,3), at most 1 node, k=2 -> node score = sum of its top-2
    scores = torch.tensor([[0.4, 0.0, 0.3, 0.3], [0.5, 0.4, 0.05, 0.05]])
    e2n = torch.tensor([0, 0, 1, 1])
    m = node_limited_mask(scores, e2n, 2, 1, 2)
    assert m.tolist() == [[False, False, True, True], [True, True, False, False]]
    a, _ = route(torch.log(scores + 1e-9), topk=2, mode="topk", allowed=m)
    assert sorted(a.expert_ids[0].tolist()) == [2, 3]


def test_node_limited_with_interleaved_nodes():
    # nodes need not host contiguous experts: experts 0,2 on node 0, experts 1,3 on node 1
    scores = torch.tensor([[0.4, 0.35, 0.0, 0.25]])
    m = node_limited_mask(scores, torch.tensor([0, 1, 0, 1]), 2, 1, 2)
    assert m.tolist() == [[False, True, False, True]]


@settings(max_examples=60, deadline=None)
@given(
    s=st.integers(0, 40),
    n=st.sampled_from([2, 4, 8, 16]),
    k=st.integers(1, 4),
    mode=st.sampled_from(["topk", "locmoe", "hybrid"]),
    cap=st.one_of(st.none(), st.integers(0, 12)),
    policy=st.sampled_from(["score", "position"]),
    seed=st.integers(0, 2**16),
)
def test_routing_properties(s, n, k, mode, cap, policy, seed):
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, n, generator=g)
    aff = torch.randn(s, n, generator=g).tanh()
    a, probs = route(logits, topk=k, mode=mode, affinity=aff, capacity=cap, drop_policy=policy)
    # distinct experts per token before capacity
    if s:
        assert (a.requested_ids.sort(-1).values.diff(dim=-1) != 0).all()
    # kept ids are a subset of the requested ones; dropped pairs have weight 0
    kept = a.expert_ids >= 0
    assert torch.equal(a.expert_ids[kept], a.requested_ids[kept])
    assert (a.weights[~kept] == 0).all()
    # no expert above capacity, and every drop is accounted for
    tpe = a.tokens_per_expert()
    if cap is not None:
        assert int(tpe.max()) <= cap
        # an expert drops only when full
        req = a.requested_per_expert()
        assert torch.equal(torch.minimum(req, torch.tensor(cap)), tpe)
    else:
        assert kept.all()
    assert int(tpe.sum()) + int((~kept).sum()) == s * k
    # the two forms describe the same assignment
    dense, rmap = a.to_megatron()
    assert torch.equal(rmap.sum(0), tpe)
    ids2, w2 = dense_to_index(dense, rmap, k)
    d2, m2 = index_to_dense(ids2, w2, n)
    assert torch.equal(m2, rmap) and torch.equal(d2, dense)
    # renormalised weights of a token with no drop sum to 1
    full = kept.all(-1)
    if full.any():
        torch.testing.assert_close(a.weights[full].sum(-1), torch.ones(int(full.sum())))
    assert torch.isfinite(probs).all()


def test_hybrid_needs_affinity():
    with pytest.raises(ValueError, match="affinity"):
        route(torch.zeros(2, 2), topk=1, mode="hybrid", capacity=1)


def test_node_demand_capacity_hand_worked():
    """4 experts, 2 nodes (experts 0, 1 on node 0; 2, 3 on node 1), balanced capacity 1 (k = 1, 4 tokens)."""
    from locmoe_plugin.routing import capacity_keep, node_demand_capacity

    e2n = torch.tensor([0, 0, 1, 1])
    ids = torch.tensor([[0], [0], [1], [1]])  # all on node 0: share 2 -> limit 2 there, 0 on node 1
    cap = node_demand_capacity(ids, 1, e2n, 2)
    assert cap.tolist() == [2, 2, 0, 0]
    assert capacity_keep(ids, torch.ones(4, 1), cap, 4, "position").all()  # nothing dropped
    assert capacity_keep(ids, torch.ones(4, 1), 1, 4, "position").sum() == 2  # a flat limit drops half
    ids = torch.tensor([[0], [0], [0], [2]])  # node 0: 3 of 4 -> ceil(1.5) = 2; node 1: ceil(0.5) = 1
    cap = node_demand_capacity(ids, 1, e2n, 2)
    assert cap.tolist() == [2, 2, 1, 1]
    assert capacity_keep(ids, torch.ones(4, 1), cap, 4, "position").reshape(-1).tolist() == [True, True, False, True]
    ids = torch.tensor([[0], [1], [2], [3]])  # spread evenly: the balanced limit everywhere
    assert node_demand_capacity(ids, 1, e2n, 2).tolist() == [1, 1, 1, 1]
    ids = torch.tensor([[-1], [0], [-1], [3]])  # dropped slots ask for nothing
    assert node_demand_capacity(ids, 3, e2n, 2).tolist() == [3, 3, 3, 3]
