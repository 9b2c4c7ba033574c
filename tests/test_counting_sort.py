"""The pairs plan's counting sort (comm/counting_sort.py) and the one-rank pairs plan built on it: hand-worked
bins and histograms, positions equal to a stable argsort's, bitwise sums, and the refusal of repeated or
invalid ids. One rank, no process group: fast."""

import pytest
import torch

from locmoe_plugin import Topology
from locmoe_plugin.comm import TokenDispatcher
from locmoe_plugin.comm.counting_sort import count_pairs, slot_bins, slot_positions
from locmoe_plugin.comm.groups import CommGroups


def _one_rank_groups(num_experts):
    topo = Topology.from_ranks_per_node(1, 1, num_experts, ep_rank=0)
    return CommGroups(topology=topo, ep=None, rail=None, node=None, ep_global_ranks=(0,))


def test_slot_bins_hand_worked():
    ids = torch.tensor([[0, 2, -1, 3, 7, -2, -5]])
    # E = 3: experts keep their id; >= E -> E, < -1 -> E + 1, -1 -> E + 2
    assert slot_bins(ids, 3).tolist() == [[0, 2, 5, 3, 3, 4, 4]]


def test_count_pairs_hand_worked():
    ids = torch.tensor([[1, -1], [0, 1], [-1, -1]])  # E = 3, s = 3, k = 2
    bins = slot_bins(ids, 3)
    before, hist = count_pairs(bins, 3)
    # pairs in expert-major order: (e0, t1), (e1, t0), (e1, t1)
    assert slot_positions(bins, before).tolist() == [[1, 3], [0, 2], [3, 3]]
    # slots per bin: e0 1, e1 2, e2 0, invalid 0 and 0, not routed 3; the fullest cell holds 1 slot
    assert hist.tolist() == [1, 2, 0, 0, 0, 3, 1]
    assert count_pairs(slot_bins(torch.tensor([[2, 2]]), 3), 3)[1][-1].item() == 2  # a repeated id
    before, hist = count_pairs(bins[:0], 3)
    assert before.tolist() == [0] and hist.tolist() == [0] * 7


@pytest.mark.parametrize("s,k,e,drop", [(1, 1, 1, 0.0), (37, 4, 8, 0.2), (64, 2, 16, 0.5), (9, 3, 4, 1.0)])
def test_positions_equal_a_stable_argsort(s, k, e, drop):
    g = torch.Generator().manual_seed(s * 100 + k)
    ids = torch.rand(s, e, generator=g).argsort(1)[:, :k]
    ids = torch.where(torch.rand(s, k, generator=g) < drop, -1, ids)
    bins = slot_bins(ids, e)
    before, hist = count_pairs(bins, e)
    pos = slot_positions(bins, before).reshape(-1)
    keys = torch.where(ids >= 0, ids, e).reshape(-1)
    order = torch.argsort(keys, stable=True)
    n = int((ids >= 0).sum())
    want = torch.empty_like(order).scatter_(0, order, torch.arange(s * k))
    valid = keys < e
    assert torch.equal(pos[valid], want[valid])
    assert (pos[~valid] == n).all()
    assert hist[:e].tolist() == torch.bincount(ids[ids >= 0], minlength=e).tolist()
    assert hist[e + 2].item() == s * k - n


def test_one_rank_pairs_plan_sums_slots_in_order_bitwise():
    e, s, k, d = 4, 23, 3, 8
    g = torch.Generator().manual_seed(3)
    ids = torch.rand(s, e, generator=g).argsort(1)[:, :k]
    drop = torch.rand(s, k, generator=g) < 0.3
    ids = torch.where(drop, -1, ids)
    w = torch.where(drop, 0.0, torch.rand(s, k, generator=g)).requires_grad_(True)
    x = torch.randn(s, d, generator=g, requires_grad=True)
    scale = torch.arange(1.0, e + 1)

    def experts(inp, tpe):  # expert j multiplies by j + 1: row-exact
        return inp * scale.repeat_interleave(torch.tensor(tpe)).unsqueeze(1)

    disp = TokenDispatcher(_one_rank_groups(e), "flat_fast")
    inp, handle = disp.dispatch(x, ids, w)
    y = disp.combine(experts(inp, handle.tokens_per_expert), handle)
    assert handle.tokens_per_expert == tuple(int((ids == j).sum()) for j in range(e))
    ref = (x.unsqueeze(1) * scale[ids.clamp_min(0)].unsqueeze(2) * w.unsqueeze(2)).where(~drop.unsqueeze(2), 0.0).sum(1)
    assert torch.equal(y, ref)
    c = torch.linspace(-1, 1, d)
    (gx, gw) = torch.autograd.grad((y * c).sum(), (x, w))
    (rx, rw) = torch.autograd.grad((ref * c).sum(), (x, w))
    assert torch.allclose(gx, rx, rtol=0, atol=1e-6) and torch.allclose(gw, rw, rtol=0, atol=1e-6)
    assert torch.equal(gw[drop], torch.zeros(int(drop.sum())))


@pytest.mark.parametrize("ids,match", [
    ([[1, 1], [0, 2]], r"lists one expert in two of its slots on EP rank\(s\) \[0\].*distinct"),
    ([[1, 4], [0, 2]], r"expert ids outside \[-1, 4\)"),
    ([[1, -2], [0, 2]], r"expert ids outside \[-1, 4\)"),
])
def test_repeated_or_invalid_ids_raise(ids, match):
    disp = TokenDispatcher(_one_rank_groups(4), "flat_fast")
    ids = torch.tensor(ids)
    with pytest.raises(ValueError, match=match):
        disp.dispatch(torch.randn(2, 4), ids, torch.ones(2, 2))
