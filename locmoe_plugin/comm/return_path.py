"""The return path of the combine weights' gradient: each pair's value straight back to its source slot.

Each (token, slot) has at most one pair, so sending one value per pair back to the source is a
permutation, not a sum: one EP-wide all-to-all of ``(slot, value)`` int32 words (8 bytes a pair), no
reduce levels. The router's weight gradient goes back this way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .counts import SRC_SHIFT, RoutingCounts
from .groups import CommGroups
from .hops import all_to_all_rows


@dataclass(frozen=True)
class ReturnPath:
    """Pairs at this expert rank grouped by source EP rank.

    Attributes:
        order: ``[num_pairs]`` int64, canonical pair index of each value in send order (by source rank).
        slot_key: ``[num_pairs]`` int32, ``token * k + slot`` at the source of each value in send order.
        send_splits: values sent to each EP rank (host ints).
        recv_splits: values received from each EP rank (host ints).
        group: the EP group (None on a one-rank group: a local copy).
    """

    order: torch.Tensor
    slot_key: torch.Tensor
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    group: object | None

    @classmethod
    def build(cls, pair_src_key: torch.Tensor, slot: torch.Tensor, k: int, groups: CommGroups,
              counts: RoutingCounts) -> "ReturnPath":
        """``pair_src_key [num_pairs]`` (``ep_rank * SRC_SHIFT + token``) and ``slot [num_pairs]`` of each
        canonical pair at this expert rank; split sizes both ways come from the host counts."""
        t = groups.topology
        me, e_r = t.ep_rank, t.experts_per_rank
        mine = range(me * e_r, (me + 1) * e_r)
        send = [sum(counts.pairs_to_expert[q][e] for e in mine) for q in range(t.ep_size)]
        recv = [sum(counts.pairs_to_expert[me][q * e_r : (q + 1) * e_r]) for q in range(t.ep_size)]
        order = torch.argsort(pair_src_key // SRC_SHIFT, stable=True)
        slot_key = ((pair_src_key % SRC_SHIFT) * k + slot).index_select(0, order).to(torch.int32)
        group = groups.ep if t.ep_size > 1 else None
        return cls(order, slot_key, tuple(send), tuple(recv), group)

    def values_to_slots(self, v: torch.Tensor, num_tokens: int, k: int) -> torch.Tensor:
        """``v [num_pairs]`` (canonical order, at the expert rank) -> ``[num_tokens, k]`` fp32 at the
        source, 0 in slots without a kept pair."""
        words = torch.stack([self.slot_key, v.float().index_select(0, self.order).view(torch.int32)], 1)
        back = all_to_all_rows(words, self.recv_splits, self.send_splits, self.group)
        out = torch.zeros(num_tokens * k, dtype=torch.float32, device=v.device)
        out.scatter_(0, back[:, 0].long(), back.view(torch.float32)[:, 1])
        return out.view(num_tokens, k)
