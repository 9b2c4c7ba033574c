"""The ``flat_fast`` plan: one EP-wide all-to-all of (token, expert) pairs, Megatron-style."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .counts import RoutingCounts, topology_tensors
from .groups import CommGroups
from .hops import all_to_all_rows
from .plan import Plan, Traffic


@dataclass(frozen=True)
class PairsRoute:
    """The ``flat_fast`` plan: one EP-wide all-to-all of (token, expert) pairs, built the way Megatron's
    alltoall dispatcher does it, with no metadata exchange: the source sends its pairs expert-major (one
    stable sort of its ``s * k`` slots), so each received block (one per source rank) is expert-major too,
    and the expert rank gets the canonical (local expert, source, token) order by a stable sort of the rows'
    expert ids, which it knows from the count table. The reduce sums each token's slots (one gather
    ``[s, k, F]`` and a sum over k: deterministic, but not the node / rank tree of the other plans).

    Attributes: ``send_slot [n_src]`` slot ``t * k + j`` of each pair sent, in send order; ``send_tok`` its
    token; ``slot_pos [s * k]`` each slot's position in the send order (``n_src`` = none); ``canon_src [m]``
    received row of each canonical pair; ``recv_src [m]`` canonical pair of each received row; the split
    sizes both ways and the group."""

    send_slot: torch.Tensor
    send_tok: torch.Tensor
    slot_pos: torch.Tensor
    canon_src: torch.Tensor
    recv_src: torch.Tensor
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    group: object | None

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        rows = all_to_all_rows(x.index_select(0, self.send_tok), self.recv_splits, self.send_splits, self.group)
        return rows.index_select(0, self.canon_src)

    def _back(self, y: torch.Tensor, extra_row: bool) -> torch.Tensor:
        """Canonical rows -> the source's send order (plus a zero row at the end when asked)."""
        recv = y.index_select(0, self.recv_src)
        n = self.send_slot.numel()
        out = y.new_empty((n + int(extra_row),) + tuple(y.shape[1:]))
        if self.group is None:
            out[:n].copy_(recv)
        else:
            dist.all_to_all_single(out[:n], recv.contiguous(), list(self.send_splits), list(self.recv_splits),
                                   group=self.group)
        if extra_row:
            out[n].zero_()
        return out

    def reduce(self, y: torch.Tensor, num_tokens: int) -> torch.Tensor:
        ext = self._back(y, extra_row=True)
        k = self.slot_pos.numel() // max(num_tokens, 1)
        return ext.index_select(0, self.slot_pos).view((num_tokens, k) + tuple(y.shape[1:])).sum(1)

    def values_to_slots(self, v: torch.Tensor, num_tokens: int, k: int) -> torch.Tensor:
        back = self._back(v.float(), extra_row=False)
        out = torch.zeros(num_tokens * k, dtype=torch.float32, device=v.device)
        return out.scatter_(0, self.send_slot, back).view(num_tokens, k)


def pairs_source_order(expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> tuple:
    """The source half of the pairs plan, which needs no counts: queued before the count exchange's host
    sync, so the GPU runs it while the host waits, and fewer launches follow the sync. Slots expert-major
    (stable: tokens in order inside an expert), dropped (and invalid) slots last: ``(order [s*k], position of
    each slot in that order [s*k], token of each ordered slot, fp32 weights in that order)``."""
    s, k = expert_ids.shape
    order = torch.argsort(torch.where(expert_ids >= 0, expert_ids, num_experts).reshape(-1), stable=True)
    pos = torch.empty_like(order).scatter_(0, order, torch.arange(s * k, device=order.device))
    w = weights.detach().float().reshape(-1).index_select(0, order)
    return order, pos, order // k, w


def build_pairs_plan(expert_ids: torch.Tensor, groups: CommGroups, counts: RoutingCounts, source: tuple) -> Plan:
    """This rank's pairs plan from the counts and :func:`pairs_source_order`'s ``source``."""
    t = groups.topology
    s, k = expert_ids.shape
    me, e_r, p = t.ep_rank, t.experts_per_rank, t.ep_size
    dev = expert_ids.device
    send_splits = tuple(sum(counts.pairs_to_expert[me][q * e_r : (q + 1) * e_r]) for q in range(p))
    recv_splits = tuple(sum(counts.pairs_to_expert[q][me * e_r : (me + 1) * e_r]) for q in range(p))
    n_src, m = sum(send_splits), sum(recv_splits)
    tt = topology_tensors(t, dev)
    order, pos, order_tok, order_w = source
    send_slot = order[:n_src]
    slot_pos = pos.clamp_max(n_src)  # the slots not sent (dropped) read the extra zero row at n_src
    # expert rank: received blocks by source, each expert-major; the rows' local experts come from the counts
    sizes = counts.local_sizes(me * e_r, e_r)  # [P * E_r] device: pairs from source q for local expert e
    row_expert = torch.repeat_interleave(tt["local_expert_pattern"], sizes, output_size=m)
    canon_src = torch.argsort(row_expert, stable=True)
    recv_src = torch.empty_like(canon_src).scatter_(0, canon_src, torch.arange(m, device=dev))
    group = groups.ep if p > 1 else None
    route = PairsRoute(send_slot, order_tok[:n_src], slot_pos, canon_src, recv_src, send_splits, recv_splits, group)
    w = all_to_all_rows(order_w[:n_src], recv_splits, send_splits, group)
    a = t.node
    tpe = tuple(sum(c[me * e_r + i] for c in counts.pairs_to_expert) for i in range(e_r))
    inter = sum(c for q, c in enumerate(send_splits) if t.node_of_rank[q] != a)
    intra = sum(c for q, c in enumerate(send_splits) if t.node_of_rank[q] == a and q != me)
    return Plan(hops=(), num_tokens=s, pair_weight=w.index_select(0, canon_src),
                tokens_per_expert=tpe, traffic=Traffic(inter_rows=inter, intra_rows=intra), mode="flat_fast",
                pairs_route=route)

