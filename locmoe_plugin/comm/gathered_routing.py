"""The ``allgather`` plan without a count exchange, for EP groups whose ranks hold equal token counts.

Megatron passes every rank of an expert-parallel group the same number of tokens per layer call
(``[seq / TP, micro-batch]``; its own allgather dispatcher relies on it too), so the size of every rank's
block of the routing all-gather is known locally and no count exchange has to size it. What the count
table gave the ``allgather`` plan is then read from the gathered routing itself:

* this rank's pairs per local expert, and the checks that must raise on every rank alike (ids outside
  ``[-1, E)``, a token listing one expert twice): one counting sort over the gathered slots of every
  expert (:mod:`.counting_sort`), whose bins are rotated so this rank's experts come first
  (:func:`rotated_bins`); its histogram is the same on every rank up to that rotation, so all ranks raise
  together. Read on the host once, after the gather (the layer's one host sync, where Megatron's
  allgather dispatcher reads its ``tokens_per_expert``);
* the router's folded counts (:mod:`locmoe_plugin.folded_counts`): their bins ride in a header row behind
  the routing, so the router needs no all-reduce either. One collective before the payload moves, against
  two (count all-gather, routing all-gather) plus the router's all-reduce otherwise.

Block of EP rank ``q`` in the gather, ``[s + h, w]`` int64 with ``w = k + ceil(k / 2)``::

    rows [0, s)      expert ids [k], then the combine weights as fp32 bits (:func:`.allgather_plan.pack_routing`)
    rows [s, s + h)  the header, flattened: [0] s; [1, 1 + m) the extra bins

Contract: every EP rank passes the same ``s`` in every call. It is a promise, not a check: a rank with
another ``s`` makes the gather itself fail, which aborts the process (gloo) or may wait forever (NCCL)
before any header is read. So the dispatcher takes this path only where the caller promises it
(``TokenDispatcher(..., equal_tokens=True)``, ``DispatcherSettings.equal_tokens``; the Megatron adapter by
default, except with ``variable_seq_lengths``). The headers' token counts are compared after the gather, a
last guard for backends whose gather returns.

Numerics: the experts see the same rows in the same order (canonical: local expert, source rank, source
token), and the plan's sums are the count-exchange ``allgather`` plan's (:mod:`.allgather_plan`): results
are bitwise equal to it.
"""

from __future__ import annotations

import functools

import torch

from .allgather_plan import pack_routing, plan_from_slot_positions, routed_weights
from .block_collectives import gather_blocks
from .counting_sort import EXTRA_BINS, count_pairs, slot_bins, slot_positions
from .counts import count_layout, invalid_ids_error, repeated_ids_error
from .groups import CommGroups
from .plan import Plan
from ..topology import Topology

HEADER = 1  # the token count, then the extra bins


@functools.lru_cache(maxsize=64)
def rotated_bins(t: Topology, device: torch.device) -> torch.Tensor:
    """``[E + 3]`` int64: slot bin (:func:`.counting_sort.slot_bins`) -> the bin of the sort that puts this
    rank's experts first: expert ``e`` -> ``(e - first) mod E``, the extra bins unchanged. Made once per
    topology and device."""
    e, first = t.num_experts, t.ep_rank * t.experts_per_rank
    table = torch.arange(e + EXTRA_BINS)
    table[:e] = (table[:e] - first) % e
    return table.to(device)


class GatheredRouting:
    """Every EP rank's routing, all-gathered once with its header (see the module doc); device work only.

    Attributes:
        gathered: ``[P * (s + h), w]`` int64 every rank's block, rank order.
        tokens: ``s``, this rank's (and, by the contract, every rank's) token count.
        k: slots per token.

    For :class:`locmoe_plugin.folded_counts.FoldedCounts` it offers the count table's interface:
    :attr:`table`, :attr:`row_bins`, :meth:`extra_columns`.
    """

    def __init__(self, groups: CommGroups, expert_ids: torch.Tensor, weights: torch.Tensor,
                 extra: torch.Tensor | None = None) -> None:
        t = groups.topology
        s, k = expert_ids.shape
        m = 0 if extra is None else extra.numel()
        width = k + (k + 1) // 2
        head_rows = -(-(HEADER + m) // width)
        block = pack_routing(expert_ids, weights, s + head_rows, pad=False)
        head = block[s:].view(-1)
        head[0].fill_(s)
        if extra is not None:
            head[HEADER : HEADER + m].copy_(extra)
        self.group = groups.ep if t.ep_size > 1 else None
        self.gathered = gather_blocks(block, s + head_rows, self.group)
        self.tokens, self.k, self.width, self.head_rows = s, k, width, head_rows
        self._extra = slice(s * width + HEADER, s * width + HEADER + m)

    @property
    def table(self) -> torch.Tensor:
        """``[P * row_bins]`` int64: every rank's block flattened, identical on every EP rank."""
        return self.gathered.view(-1)

    @property
    def row_bins(self) -> int:
        """Values of one rank's block (``table.view(P, row_bins)``)."""
        return (self.tokens + self.head_rows) * self.width

    def extra_columns(self) -> slice:
        """Where the ``extra`` bins sit in one rank's flattened block (empty when none were given)."""
        return self._extra

    def blocks(self) -> torch.Tensor:
        """``[P, s + h, w]`` view of :attr:`gathered`."""
        return self.gathered.view(-1, self.tokens + self.head_rows, self.width)


def check_gathered(sizes: list[int], tokens: int, invalid: int, fullest_cell: int, ids: torch.Tensor,
                   num_experts: int) -> None:
    """Raise on every rank alike (every argument is the same on every EP rank): a rank's token count other
    than ``tokens``, ids outside ``[-1, E)``, a token listing one expert twice. ``ids [P, s, k]``: the
    gathered ids, read only on the way to an error, to name the ranks."""
    if any(size != tokens for size in sizes):
        raise ValueError(
            f"the EP ranks passed {sizes} tokens to an allgather dispatcher built with equal_tokens=True: "
            f"every rank must hold the same number of tokens per call; build the dispatcher with "
            f"equal_tokens=False (a count exchange sizes the gather) or use dispatcher='hierarchical'"
        )
    if invalid:
        ranks = ((ids < -1) | (ids >= num_experts)).flatten(1).any(1).nonzero().flatten().tolist()
        raise invalid_ids_error(num_experts, ranks)
    if fullest_cell > 1:
        ordered = ids.sort(-1).values
        twice = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
        ranks = twice.flatten(1).any(1).nonzero().flatten().tolist()
        raise repeated_ids_error(ranks)


def build_gathered_plan(routing: GatheredRouting, groups: CommGroups) -> Plan:
    """This rank's ``allgather`` plan from ``routing`` (no collective; one host read of ``E + 4 + P`` ints:
    the sort's histogram and every rank's token count).

    The counting sort runs over the ``[T, k]`` gathered slots (``T = P * s``) with every expert's bin,
    rotated so this rank's ``E_r`` experts are bins ``0 .. E_r - 1`` (:func:`rotated_bins`): their pairs
    take positions ``0 .. n - 1`` in canonical order, every other slot points at ``n``, and the histogram
    counts every expert's pairs, the invalid ids and the fullest (token, expert) cell of the whole group."""
    t = groups.topology
    s, k = routing.tokens, routing.k
    e, e_r, p = t.num_experts, t.experts_per_rank, t.ep_size
    dev = routing.gathered.device
    blocks = routing.blocks()
    ids = blocks[:, :s, :k]  # [P, s, k] view
    bins = rotated_bins(t, dev)[slot_bins(ids, e)].view(p * s, k)
    before, hist = count_pairs(bins, e, count_layout(t, k, dev)["one"], pair_bins=e_r)
    slot_pos = slot_positions(bins, before)  # [T, k]
    host = torch.cat([hist, blocks[:, s, 0]]).tolist()  # device-to-host sync: split sizes
    check_gathered(host[e + EXTRA_BINS + 1 :], s, host[e] + host[e + 1], host[e + EXTRA_BINS], ids, e)
    return plan_from_slot_positions(slot_pos, routed_weights(blocks[:, :s], k), tuple(host[:e_r]), s, s,
                                    routing.group, p)
