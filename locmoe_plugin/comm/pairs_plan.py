"""The ``flat_fast`` plan: one EP-wide all-to-all of (token, expert) pairs, Megatron-style."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .counting_sort import slot_positions
from .counts import RoutingCounts
from .groups import CommGroups
from .hops import all_to_all_rows
from .plan import Plan, Traffic


@functools.lru_cache(maxsize=64)
def _chunk_order(p: int, e_r: int, to_canonical: bool) -> tuple[int, ...]:
    """Which chunk goes where when regrouping ``[P, E_r]`` (q-major) chunks into ``[E_r, P]`` (e-major)
    order (``to_canonical``) or back: made once per shape, not per call."""
    if to_canonical:
        return tuple(q * e_r + e for e in range(e_r) for q in range(p))
    return tuple(e * p + q for q in range(p) for e in range(e_r))


@dataclass(frozen=True)
class PairsRoute:
    """The ``flat_fast`` plan: one EP-wide all-to-all of (token, expert) pairs, built the way Megatron's
    alltoall dispatcher does it, with no metadata exchange: the source sends its pairs expert-major (a
    counting sort, :mod:`.counting_sort`), so each received block (one per source rank) is expert-major
    too, and the expert rank gets the canonical (local expert, source, token) order by regrouping the
    received ``[source, local expert]`` chunks, whose sizes it knows from the count table (one ``cat``;
    Megatron's ``sort_chunks_by_idxs`` does the same). The reduce sums each token's slots (one gather
    ``[s, k, F]`` and a sum over k: deterministic, but not the node / rank tree of the other plans).

    Attributes: ``slot_pos [s, k]`` each slot's position in the send order (``n_src`` = not sent: the
    broadcast writes those rows past the ones it sends, the reduce reads a zero row there); ``n_src`` the
    pairs sent; ``recv_chunks`` rows received per (source q,
    local expert e), q-major (the received order); ``canon_chunks`` the same sizes e-major (the canonical
    order); ``local_experts`` E_r; the split sizes both ways and the group."""

    slot_pos: torch.Tensor
    n_src: int
    recv_chunks: tuple[int, ...]
    canon_chunks: tuple[int, ...]
    local_experts: int
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    group: object | None

    def _regroup(self, rows: torch.Tensor, to_canonical: bool) -> torch.Tensor:
        """Received order (``[P, E_r]`` chunks) <-> canonical order (``[E_r, P]`` chunks): one ``cat``;
        none when either side is 1 (the orders coincide)."""
        p, e_r = len(self.recv_splits), self.local_experts
        if p == 1 or e_r == 1:
            return rows
        chunks = rows.split(self.recv_chunks if to_canonical else self.canon_chunks)
        return torch.cat([chunks[i] for i in _chunk_order(p, e_r, to_canonical)])

    def to_canonical(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows [m, ...]`` as received (source-major) -> canonical (local-expert-major) order."""
        return self._regroup(rows, to_canonical=True)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """``x [s, F]`` -> canonical rows: each token's row written to its slots' send positions (one
        ``index_put_``; the slots not sent all land on row ``n_src``, which is cut off)."""
        s, k = self.slot_pos.shape
        rows = x.new_empty((self.n_src + 1,) + tuple(x.shape[1:]))
        rows = rows.index_put_((self.slot_pos,), x.unsqueeze(1).expand((s, k) + tuple(x.shape[1:])))[: self.n_src]
        if self.group is not None:
            rows = all_to_all_rows(rows, self.recv_splits, self.send_splits, self.group)
        return self.to_canonical(rows)

    def _back(self, y: torch.Tensor) -> torch.Tensor:
        """Canonical rows -> the source's send order, plus a row at the end that the slots not sent read:
        zeroed only when there are such slots (none without drops)."""
        recv = self._regroup(y, to_canonical=False)
        n = self.n_src
        out = y.new_empty((n + 1,) + tuple(y.shape[1:]))
        if self.group is None:
            out[:n].copy_(recv)
        else:
            dist.all_to_all_single(out[:n], recv.contiguous(), list(self.send_splits), list(self.recv_splits),
                                   group=self.group)
        if self.n_src < self.slot_pos.numel():
            out[n].zero_()
        return out

    def reduce(self, y: torch.Tensor, num_tokens: int) -> torch.Tensor:
        s, k = self.slot_pos.shape
        return self._back(y).index_select(0, self.slot_pos.view(-1)).view((s, k) + tuple(y.shape[1:])).sum(1)

    def values_to_slots(self, v: torch.Tensor, num_tokens: int, k: int) -> torch.Tensor:
        return self._back(v.float()).index_select(0, self.slot_pos.view(-1)).view(num_tokens, k)


def pairs_source_order(counts: RoutingCounts, weights: torch.Tensor) -> tuple:
    """The source half of the pairs plan, from the counting sort that :class:`.counts.RoutingCounts`
    started (``per_token=False``): queued before the count exchange's host sync, so the GPU runs it while
    the host waits, and fewer launches follow the sync. Pairs expert-major (tokens in order inside an
    expert), slots not routed after them. Returns ``(slot_pos [s, k]`` each slot's send position, the
    number of pairs for slots not routed; ``w [s * k + 1]`` fp32 the weight at each send position``)``:
    positions past the pairs hold nothing meaningful."""
    bins = counts.slot_bins
    s, k = bins.shape
    dev = bins.device
    pos = slot_positions(bins, counts.pairs_before)  # [s, k]
    # slots not routed all write position n_pairs (past the pairs sent): which of them lands there is moot
    order_w = torch.empty(s * k + 1, dtype=torch.float32, device=dev).index_put_((pos,), weights.detach().float())
    return pos, order_w


def build_pairs_plan(expert_ids: torch.Tensor, groups: CommGroups, counts: RoutingCounts, source: tuple) -> Plan:
    """This rank's pairs plan from the counts and :func:`pairs_source_order`'s ``source``."""
    t = groups.topology
    s, k = expert_ids.shape
    me, e_r, p = t.ep_rank, t.experts_per_rank, t.ep_size
    mine = [c[me * e_r : (me + 1) * e_r] for c in counts.pairs_to_expert]  # [P][E_r] pairs from q to local e
    by_expert = tuple(zip(*mine))  # [E_r][P]: the same counts, local-expert-major
    row = counts.pairs_to_expert[me]
    send_splits = tuple(sum(row[q * e_r : (q + 1) * e_r]) for q in range(p))
    recv_splits = tuple(map(sum, mine))
    n_src = sum(send_splits)
    slot_pos, order_w = source
    group = groups.ep if p > 1 else None
    route = PairsRoute(slot_pos, n_src, tuple(itertools.chain.from_iterable(mine)),
                       tuple(itertools.chain.from_iterable(by_expert)), e_r, send_splits, recv_splits, group)
    w = order_w[:n_src]
    if group is not None:
        w = all_to_all_rows(w, recv_splits, send_splits, group)
    tpe = tuple(map(sum, by_expert))
    return Plan(hops=(), num_tokens=s, pair_weight=route.to_canonical(w),
                tokens_per_expert=tpe, traffic=Traffic.of_rank_sends(send_splits, t), mode="flat_fast",
                pairs_route=route)
