"""The last hop of the tree plans, at the expert rank: received rows -> (token, expert) pairs in
canonical order (local expert, source EP rank, source token), plus the int64 metadata rows that carry
each token's expert ids, source key and combine weights (bit patterns) through the earlier hops."""

from __future__ import annotations

import torch

from .counts import SRC_SHIFT, RoutingCounts, host_ints_to_device, topology_tensors
from .groups import CommGroups
from .hops import Hop, mask_hop


def token_metadata(expert_ids: torch.Tensor, weights: torch.Tensor, ep_rank: int) -> torch.Tensor:
    """``[s, 2k + 1]`` int64 rows: ``expert_ids [s, k]``, the source key ``ep_rank * SRC_SHIFT + token``
    and the fp32 bit patterns of ``weights [s, k]`` (exact through integer all-to-alls)."""
    s = expert_ids.shape[0]
    src_key = ep_rank * SRC_SHIFT + torch.arange(s, device=expert_ids.device)
    return torch.cat([expert_ids, src_key.unsqueeze(1), fp32_to_bits(weights.detach())], 1)


def canonical_hop(ids: torch.Tensor, src_key: torch.Tensor, groups: CommGroups, counts: RoutingCounts,
                  src_sorted: bool = False, sources=None, arrival=None):
    """At this expert rank: ``ids [m, k]`` of the rows received (all slots), ``src_key [m]``. Returns
    the local hop rows -> pairs in (local expert, source) order, each pair's slot, and the pairs per
    local expert (host ints). ``sources``: the EP ranks whose tokens the rows hold (default: all).

    ``src_sorted``: the rows arrive in ascending ``src_key`` order (one node: blocks by source rank,
    tokens in order), so the canonical order is the local-expert-major listing of the rows, without a
    sort. ``arrival``: the source EP ranks in the order their row blocks arrive, each block's tokens in
    order (the two-stage plan's node hop: by sending local rank, inside by node); each pair's canonical
    position is then its running count in its expert's column plus a per-(source, expert) offset from the
    host counts (:func:`_arrival_offsets`), again without a sort."""
    t = groups.topology
    me = t.ep_rank
    m, k = ids.shape
    e_r = t.experts_per_rank
    first = me * e_r
    sources = range(t.ep_size) if sources is None else sources
    tpe = tuple(sum(counts.pairs_to_expert[q][e] for q in sources) for e in range(first, first + e_r))
    # rows here are (token, this rank) rows (k slots) or single pairs (k == 1)
    levels = ([sum(counts.expert_copies_on_rank[q][me][c] for q in sources) for c in range(counts.expert_levels)]
              if k > 1 else None)
    if src_sorted or arrival is not None:
        # slot_of[r, e]: the slot of local expert e in row r, k where the row has none (ids of a row are
        # distinct); column e_r collects the other experts' slots and is cut off
        col = topology_tensors(t, ids.device)["local_col"].index_select(0, (ids + 1).reshape(-1)).view(m, k)
        slot_of = torch.full((m, e_r + 1), k, dtype=torch.long, device=ids.device)
        slot_of.scatter_(1, col, topology_tensors(t, ids.device)["arange"][:k].expand(m, k))
        slot_of = slot_of[:, :e_r]
    if src_sorted:
        hop, cell = mask_hop(slot_of < k, sum(tpe), min(k, e_r), tpe, levels)
        return hop, slot_of.t().reshape(-1).index_select(0, cell), tpe
    if arrival is not None:
        n = sum(tpe)
        slot_of = slot_of.contiguous()
        mask = slot_of < k  # [m, e_r]
        ones = mask.long()  # converted once for both cumsums
        offsets = host_ints_to_device(_arrival_offsets(counts, arrival, first, e_r), ids.device)  # [P, e_r]
        pos = torch.cumsum(ones, 0).add_(offsets.index_select(0, src_key // SRC_SHIFT))
        # entries without a pair all land on the phantom position n, which is cut off
        cell = torch.empty(n + 1, dtype=torch.long, device=ids.device)
        cell.scatter_(0, torch.where(mask, pos, n).reshape(-1), torch.arange(m * e_r, device=ids.device))
        cell = cell[:n]  # flat r * e_r + e of each pair, in canonical order
        occ1 = torch.cumsum(ones, 1).reshape(-1).index_select(0, cell)  # 1-based copy number of the row
        hop = Hop.build(cell // e_r, tpe, m, min(k, e_r), level_counts=levels, occ=occ1, occ_base=1)
        return hop, slot_of.reshape(-1).index_select(0, cell), tpe
    local_e = ids - first
    mine = (local_e >= 0) & (local_e < e_r)
    key = torch.where(mine, local_e * (t.ep_size * SRC_SHIFT) + src_key.unsqueeze(1), torch.iinfo(torch.int64).max)
    order = torch.argsort(key.reshape(-1), stable=True)[: sum(tpe)]
    hop = Hop.build(order // k, tpe, m, min(k, e_r), level_counts=levels)
    return hop, order % k, tpe


def _arrival_offsets(counts: RoutingCounts, arrival, first: int, e_r: int) -> list[list[int]]:
    """``[P][e_r]`` host ints: for a row of source ``q`` holding local expert ``e``, its pair's canonical
    position minus the running count (1-based) of expert ``e`` over the rows in arrival order. Canonical
    order is (expert, source ascending, token); inside a source's block tokens arrive in order, so
    position = pairs of earlier experts + pairs of ``e`` from smaller sources + the row's rank in its
    (source, ``e``) cell, and the running count = pairs of ``e`` in earlier-arriving blocks + that rank + 1."""
    pairs = {q: counts.pairs_to_expert[q][first : first + e_r] for q in arrival}
    offsets = [[0] * e_r for _ in counts.pairs_to_expert]
    ascending = sorted(arrival)
    base = 0  # pairs of the experts before e (a running sum: host work O(e_r * sources) per route)
    for e in range(e_r):
        before_sorted = base
        for q in ascending:
            offsets[q][e] = before_sorted - 1
            before_sorted += pairs[q][e]
        before_arrival = 0
        for q in arrival:
            offsets[q][e] -= before_arrival
            before_arrival += pairs[q][e]
        base = before_sorted
    return offsets


def fp32_to_bits(w: torch.Tensor) -> torch.Tensor:
    """fp32 values -> int64 holding their bit patterns (to ride in the int64 metadata exactly)."""
    return w.float().contiguous().view(torch.int32).long()


def bits_to_fp32(b: torch.Tensor) -> torch.Tensor:
    return b.to(torch.int32).view(torch.float32)
