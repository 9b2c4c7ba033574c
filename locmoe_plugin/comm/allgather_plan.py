"""The ``allgather`` plan: every rank gathers every token and keeps the pairs of its own experts.

For an EP group inside one node (NVLink), where an all-gather and a reduce-scatter move bytes more
efficiently than an all-to-all of the same rows: a rank receives ``(P - 1) * s`` token rows, against
``(P - 1) * s * k / P`` (balanced load) for the all-to-all of pairs, as many at ``k = P`` and fewer for
``k > P``. Megatron's ``MoEAllGatherTokenDispatcher`` moves the same rows.

Dispatch (``T = P * rows_max`` gathered tokens, :mod:`.block_collectives` for unequal counts)::

    routing [s, k + ceil(k/2)] int64 (expert ids, combine weights as fp32 bits)  --all-gather-->  [T, ...]
    local pairs: slots whose expert is on this rank, counting-sorted by local expert, tokens in gathered
                 order = the canonical (local expert, source rank, source token) order of every plan
    x [s, F]  --all-gather-->  [T, F]  --index_select(token_row)-->  expert rows [n, F]

Combine (the adjoint): expert rows ``[n, F]`` (already weighted) are added into a zeroed ``[T, F]``
buffer with ``index_put_(accumulate=True)``, then reduce-scattered to ``[s, F]``. Backward runs the
adjoint collectives: the dispatch's gradient is that reduce, the combine's gradient that gather.

Numerics: a token's rows on one rank are added in canonical order (local expert order): on CUDA
``index_put_`` with ``accumulate=True`` is torch's deterministic index-add (it sorts the indices
stably, then adds each index's rows in order), on CPU it adds sequentially; then the reduce-scatter sums
the ranks' partial sums in the collective's order. So results repeat run to run, but the sums are not
the pairs plan's (one sum over a token's slots) nor the tree plans' order: ``allclose``, not bitwise,
to the other plans. At top-1 every token has one row: the results equal the pairs plan's bit for bit.
In bf16 each rank's partial sum is rounded before the cross-rank sum (as in Megatron's allgather
dispatcher). Expert inputs are identical to every other plan's (same rows, same order).

Combine weights travel as fp32 bits in the routing all-gather; their gradient goes back by one fp32
reduce-scatter of ``[T, k]`` in which each slot is non-zero on at most one rank (its expert's), so the
sum is exact.

Host: the count table (:mod:`.counts`, its one host sync) gives every rank's token count and this rank's
pairs per local expert; nothing else is read back.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .block_collectives import gather_blocks, reduce_scatter_blocks
from .counting_sort import count_pairs, slot_bins, slot_positions
from .counts import RoutingCounts, count_layout
from .groups import CommGroups
from .plan import Plan, Traffic


@dataclass(frozen=True)
class AllGatherRoute:
    """This rank's route of the ``allgather`` plan.

    Attributes: ``token_row [n]`` int64 the gathered row ``[0, P * rows_max)`` of each local pair, in
    canonical order; ``slot_pos [P * rows_max, k]`` int64 the pair position of each gathered slot, ``n``
    where the slot's expert is elsewhere, not routed, or the row is padding; ``num_tokens`` ``s``;
    ``rows_max`` the largest token count of the group; ``group`` the EP group (None: one rank)."""

    token_row: torch.Tensor
    slot_pos: torch.Tensor
    num_tokens: int
    rows_max: int
    group: object | None

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """``x [s, F]`` -> ``[n, F]`` rows of the local pairs (all-gather, one ``index_select``)."""
        return gather_blocks(x, self.rows_max, self.group).index_select(0, self.token_row)

    def reduce(self, y: torch.Tensor) -> torch.Tensor:
        """``y [n, F]`` -> ``[s, F]``: each token's rows added in canonical order into a zeroed ``[T, F]``,
        then summed over the ranks by one reduce-scatter (module doc: numerics)."""
        full = y.new_zeros((self.slot_pos.shape[0],) + tuple(y.shape[1:]))
        full.index_put_((self.token_row,), y, accumulate=True)
        return reduce_scatter_blocks(full, self.num_tokens, self.group)

    def values_to_slots(self, v: torch.Tensor, num_tokens: int, k: int) -> torch.Tensor:
        """``v [n]`` (one value per local pair) -> ``[s, k]`` fp32 at the source, 0 in slots without a kept
        pair: each slot is filled on its expert's rank only, so the reduce-scatter's sum is exact."""
        ext = torch.nn.functional.pad(v.float(), (0, 1))  # [n + 1]: a zero for the slots not here
        per_slot = ext.index_select(0, self.slot_pos.view(-1)).view(self.slot_pos.shape)
        return reduce_scatter_blocks(per_slot, num_tokens, self.group)


def pack_routing(expert_ids: torch.Tensor, weights: torch.Tensor, rows_max: int, pad: bool = True) -> torch.Tensor:
    """``expert_ids [s, k]`` int64 and ``weights [s, k]`` -> ``[rows_max, k + ceil(k / 2)]`` int64: the ids,
    then the weights as fp32 bits, two to a column (one tensor, one all-gather; int64 ids need no
    conversion on either side); padding rows carry id -1 (no pair), or are left uninitialised with
    ``pad=False`` (a caller that writes them itself)."""
    s, k = expert_ids.shape
    packed = torch.empty(rows_max, k + (k + 1) // 2, dtype=torch.long, device=expert_ids.device)
    packed[:s, :k].copy_(expert_ids)
    routed_weights(packed, k)[:s].copy_(weights.detach())
    if pad and s < rows_max:
        packed[s:, :k].fill_(-1)
    return packed


def routed_weights(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The ``[..., rows, k]`` fp32 view of the weights in a :func:`pack_routing` tensor ``[..., rows, w]``."""
    return packed[..., k:].view(torch.float32)[..., :k]


@functools.lru_cache(maxsize=8)
def _row_numbers(rows: int, device: torch.device) -> torch.Tensor:
    """``[rows, 1]`` int64 ``0 .. rows - 1``, made once per gathered size (the same every step)."""
    return torch.arange(rows, device=device).unsqueeze(1)


def local_slot_positions(gathered_ids: torch.Tensor, first_expert: int, local_experts: int, one: torch.Tensor) -> torch.Tensor:
    """``gathered_ids [T, k]`` int64 -> ``[T, k]`` int64: each slot's position among this rank's pairs in
    canonical order (a counting sort by local expert, :mod:`.counting_sort`), ``n`` (the number of local
    pairs) for every other slot. Ids were validated by the count table on every rank."""
    local = gathered_ids - first_expert if first_expert else gathered_ids
    bins = slot_bins(local, local_experts)  # 0 .. E_r - 1 this rank's experts; the extra bins: elsewhere / -1
    before, _ = count_pairs(bins, local_experts, one, histogram=False)
    return slot_positions(bins, before)


def build_allgather_plan(expert_ids: torch.Tensor, weights: torch.Tensor, groups: CommGroups,
                         counts: RoutingCounts) -> Plan:
    """This rank's ``allgather`` plan (collective over the EP group: the routing all-gather). ``counts``:
    started with ``per_token=False`` and waited on the host."""
    t = groups.topology
    s, k = expert_ids.shape
    me, e_r, p = t.ep_rank, t.experts_per_rank, t.ep_size
    dev = expert_ids.device
    rows_max = max(counts.slots_per_rank) // k
    group = groups.ep if p > 1 else None
    routing = gather_blocks(pack_routing(expert_ids, weights, rows_max), rows_max, group)  # [T, k + ceil(k/2)]
    tokens_per_expert = tuple(sum(row[me * e_r + e] for row in counts.pairs_to_expert) for e in range(e_r))
    slot_pos = local_slot_positions(routing[:, :k], me * e_r, e_r, count_layout(t, k, dev)["one"])
    return plan_from_slot_positions(slot_pos, routed_weights(routing, k), tokens_per_expert, s, rows_max, group, p)


def plan_from_slot_positions(slot_pos: torch.Tensor, slot_weights: torch.Tensor, tokens_per_expert: tuple[int, ...],
                             num_tokens: int, rows_max: int, group, ranks: int) -> Plan:
    """The ``allgather`` plan from each gathered slot's pair position ``slot_pos [P * rows_max, k]`` int64
    (``n`` where the slot has no pair here) and its combine weight ``slot_weights`` (fp32, the same slots in
    the same order; ``[P * rows_max, k]`` or with the rank as a leading dimension), ``tokens_per_expert``
    this rank's pairs per local expert (host ints). Two ``index_put_``: each pair's gathered row and weight."""
    n = sum(tokens_per_expert)
    dev, k = slot_pos.device, slot_pos.shape[1]
    rows = _row_numbers(slot_pos.shape[0], dev).expand(-1, k)
    # slots not here all write position n, past the pairs (cut off): which of them lands there is moot
    token_row = torch.empty(n + 1, dtype=torch.long, device=dev).index_put_((slot_pos,), rows)[:n]
    pair_weight = torch.empty(n + 1, dtype=torch.float32, device=dev).index_put_(
        (slot_pos.view(slot_weights.shape),), slot_weights)[:n]
    route = AllGatherRoute(token_row, slot_pos, num_tokens, rows_max, group)
    return Plan(hops=(), num_tokens=num_tokens, pair_weight=pair_weight, tokens_per_expert=tokens_per_expert,
                traffic=Traffic(intra_rows=(ranks - 1) * rows_max), mode="allgather", gather_route=route)
