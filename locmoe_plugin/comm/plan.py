"""Routing plans: how token rows travel from their source rank to expert pairs and back.

A plan is a chain of *hops*. Each hop gathers rows of the previous level by an index (a copy) and, for
a communication hop, exchanges them with one ``all_to_all_single`` on a process group. Going forward
(:meth:`Plan.broadcast`) every step is a copy. Going back (:meth:`Plan.reduce`) each hop reverses its
all-to-all and sums the returned copies of each previous-level row in send order; inside one
destination block every previous-level row occurs at most once, so the sum order is fixed by the
block order (gathers and adds; where a sparse level uses ``index_add_``, its rows are distinct, so no two
additions into one element race): deterministic on every device, and the *same tree of additions* in
every mode:

    y[t] = sum over nodes (node order) of
             sum over ranks of that node (local order) of
               sum over that rank's experts (local expert order) of  w * expert(x[t])

That is why the hierarchical and the flat (exact) plans give bitwise-equal outputs and input gradients
in fp32, the property ``locmoe check-comm`` checks on a new cluster.

Plans (rank p on node a with local index j; N nodes x R ranks; E_r experts per rank):
  * hierarchical: [rail hop: each token once to each node hosting one of its experts, to the rank with
    the same local index there ("rail-aligned"; own-node rows go to p itself, no network)]
    -> [node hop: fan out over the node to the ranks holding the experts, once per rank]
    -> [local hop: one row per (token, expert) pair, in canonical order].
  * flat exact: local hops that build the same tree at the source, then one EP-wide all-to-all of
    (token, expert) pairs (Megatron's alltoall dispatcher sends the same pairs), then the canonical
    local hop at the expert rank.
  * flat fast: the EP-wide all-to-all of pairs only; its reduce sums a token's pairs in send order
    (deterministic, but not the node / rank tree). The benchmark baseline.

Canonical pair order at an expert rank: (local expert, source EP rank, source token index), so the
expert MLPs see identical input tensors whatever the plan.

Host syncs: one per plan (``# device-to-host sync: split sizes``), after an all-gather of every rank's
counts (one histogram per rank, see :class:`_Counts`); all later index work sizes its outputs from those
host counts.

The combine weights' gradient does not go through the reduce: each (token, slot) has at most one pair, so
:meth:`Plan.pair_values_to_slots` sends each pair's value straight back to its source slot (one EP-wide
all-to-all of 8-byte words, no sums).

Host cost: on one node the layer is bound by the host's kernel launches, not by bytes, so the builders
avoid sorts where the order is known (:func:`mask_hop`: copy numbers from a cumsum; one node: rows arrive
sorted by source) and reuse the count pass's masks; ``benchmarks/op_count.py`` counts the ops per phase.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..topology import Topology
from .groups import CommGroups

def _all_gather_single_fn():
    """Newer torch (2.13 here) names it ``all_gather_single`` and warns on ``all_gather_into_tensor``;
    older torch has only the old name. The new one is taken only with the ``(output, input, group)``
    signature the plan calls it with."""
    fn = getattr(dist, "all_gather_single", None)
    try:
        params = list(inspect.signature(fn).parameters)[:3] if fn is not None else []
    except (TypeError, ValueError):
        params = []
    return fn if params == ["output_tensor", "input_tensor", "group"] else dist.all_gather_into_tensor


_ALL_GATHER_SINGLE = _all_gather_single_fn()

SRC_SHIFT = 1 << 31  # source key = ep_rank * SRC_SHIFT + token index (tokens per rank < 2**31)


def all_to_all_rows(x: torch.Tensor, out_splits, in_splits, group) -> torch.Tensor:
    """``all_to_all_single`` over dim 0 (no autograd). ``group=None`` means a local copy."""
    if group is None:
        return x.clone()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), list(out_splits), list(in_splits), group=group)
    return out


def true_positions(mask: torch.Tensor, total: int) -> torch.Tensor:
    """Row-major flat indices of the True entries of ``mask``; ``total`` (their count) is known on the
    host, so no device-to-host sync: ``[total]`` int64."""
    flat = mask.reshape(-1)
    pos = torch.cumsum(flat, 0) - 1
    out = torch.empty(total + 1, dtype=torch.long, device=mask.device)
    # entries that are False all land on the phantom slot ``total``, which is cut off
    out.scatter_(0, torch.where(flat, pos, total), torch.arange(flat.numel(), device=mask.device))
    return out[:total]


def _occurrence(index: torch.Tensor) -> torch.Tensor:
    """For each entry of ``index``, how many earlier entries hold the same row (0 for the first)."""
    n = index.numel()
    dev = index.device
    order = torch.argsort(index, stable=True)
    srt = index[order]
    ar = torch.arange(n, device=dev)
    first = torch.ones(n, dtype=torch.bool, device=dev)
    first[1:] = srt[1:] != srt[:-1]
    group_start = torch.cummax(torch.where(first, ar, 0), 0).values if n else ar
    return torch.empty_like(ar).scatter_(0, order, ar - group_start)


@dataclass(frozen=True)
class Hop:
    """One step of a plan.

    Attributes:
        index: ``[rows_sent]`` int64 rows of the previous level in send order (a gather).
        blocks: rows of ``index`` per destination, in order (host ints).
        prev_rows: number of rows of the previous level.
        first: ``[prev_rows]`` position of each previous row's first copy (``rows_sent`` = none).
        more: for c = 1, 2, ...: ``(rows, positions)`` of the rows' (c+1)-th copies.
        group: process group of the all-to-all, or None for a local hop.
        out_splits: rows received from each peer of ``group`` (host ints).

    The reduce takes each row's first copy with one gather and adds its later copies level by level
    (copies sit in send order, i.e. destination-block order): no atomics, the same order on every
    device. Rows that were never sent get 0.
    """

    index: torch.Tensor
    blocks: tuple[int, ...]
    prev_rows: int
    first: torch.Tensor
    more: tuple
    group: object | None = None
    out_splits: tuple[int, ...] | None = None

    @classmethod
    def build(cls, index, blocks, prev_rows, fan_in, group=None, out_splits=None, level_counts=None,
              occ=None, occ_base=0) -> "Hop":
        """``fan_in``: most copies one previous row can have. ``level_counts[c]``: entries that are a
        row's (c+1)-th copy (host ints; None: every level is gathered padded). ``occ``: each entry's
        copy number (``occ_base`` = first), when the caller knows it without a sort (see :func:`mask_hop`).

        Copy c of row r is located with one scatter into a ``[fan_in, prev_rows]`` table (unsent:
        ``rows_sent``, the zero row of the reduce). A level that most rows reach is kept as that padded
        column (one gather + one add in the reduce); a sparse level keeps only its rows (one gather + one
        ``index_add_`` of distinct rows, so still deterministic), found with one stable sort of ``occ``."""
        n = index.numel()
        dev = index.device
        levels = max(1, fan_in)
        if occ is None:
            occ, occ_base = _occurrence(index), 0
        ar = torch.arange(n, device=dev)
        # copy c of row r at (c + occ_base) * prev_rows + r: the first occ_base blocks stay unused
        base = occ_base * prev_rows
        slot = torch.full((base + levels * prev_rows,), n, dtype=torch.long, device=dev)
        slot.scatter_(0, occ * prev_rows + index, ar)  # occ - occ_base < fan_in: every entry has its own cell
        slot = slot[base:]
        first = slot[:prev_rows]
        if level_counts is None:
            level_counts = [prev_rows] * levels  # all padded
        sparse = [c for c in range(1, levels) if 0 < level_counts[c] and 4 * level_counts[c] <= prev_rows]
        rows_by_level = by_level = None
        if sparse:
            # entries grouped by level, in position order inside a level (a stable sort); the host-known
            # level sizes cut it with slices (occ_base shifts every key alike: same order)
            by_level = torch.argsort(occ, stable=True)
            rows_by_level = index.index_select(0, by_level)
        more = []
        start = level_counts[0] if sparse else 0
        for c in range(1, levels):
            m = level_counts[c]
            if m and c in sparse:
                more.append((rows_by_level[start : start + m], by_level[start : start + m]))
            elif m:
                more.append((None, slot[c * prev_rows : (c + 1) * prev_rows]))
            start += m
        blocks = tuple(blocks)
        return cls(index, blocks, prev_rows, first, tuple(more), group, None if out_splits is None else tuple(out_splits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.index_select(0, self.index)
        if self.group is None:
            return rows
        return all_to_all_rows(rows, self.out_splits, self.blocks, self.group)

    def backward(self, y: torch.Tensor) -> torch.Tensor:
        n = self.index.numel()
        tail = tuple(y.shape[1:])
        if self.group is not None:
            ext = y.new_empty((n + 1,) + tail)
            dist.all_to_all_single(ext[:n], y.contiguous(), list(self.blocks), list(self.out_splits), group=self.group)
            ext[n].zero_()
        else:
            ext = torch.cat([y, y.new_zeros((1,) + tail)])
        out = ext.index_select(0, self.first)
        for rows, pos in self.more:
            if rows is None:  # padded level: every previous row, pad -> the zero row
                out.add_(ext.index_select(0, pos))
            else:  # sparse level: its rows are distinct, so one add per element (deterministic)
                out.index_add_(0, rows, ext.index_select(0, pos))
        return out


def mask_hop(mask: torch.Tensor, n_sent: int, fan_in: int, blocks, level_counts=None, group=None,
             out_splits=None) -> tuple[Hop, torch.Tensor]:
    """The hop that sends row r to destination d wherever ``mask [rows, D]`` is True, destination-major
    (rows in order inside a destination block; ``n_sent`` = the mask's True count, known on the host).

    The copy number of each entry is the row's running count over the destinations (a cumsum), so no
    sort is needed. Also returns each entry's flat ``d * rows + r`` position (for per-entry lookups)."""
    rows, d = mask.shape
    flat = mask.t().reshape(-1)
    cell = torch.empty(n_sent + 1, dtype=torch.long, device=mask.device)
    # 1-based send positions; False cells land on the phantom slot 0, which is cut off
    cell.scatter_(0, torch.where(flat, torch.cumsum(flat, 0), 0), torch.arange(flat.numel(), device=mask.device))
    cell = cell[1:]
    index = cell % max(rows, 1)
    occ1 = torch.cumsum(mask, 1).t().reshape(-1).index_select(0, cell)  # 1-based copy numbers
    hop = Hop.build(index, blocks, rows, fan_in, group, out_splits, level_counts, occ=occ1, occ_base=1)
    return hop, cell


@dataclass(frozen=True)
class Traffic:
    """Payload rows this rank sends per dispatch (a combine sends the same rows back).

    ``inter_rows``: rows to ranks on other nodes; ``intra_rows``: rows to other ranks of this node.
    Multiply by ``hidden * element size`` for bytes (:meth:`bytes`).
    """

    inter_rows: int = 0
    intra_rows: int = 0

    def bytes(self, hidden: int, element_size: int) -> tuple[int, int]:
        """``(inter_node_bytes, intra_node_bytes)`` of one direction."""
        return self.inter_rows * hidden * element_size, self.intra_rows * hidden * element_size


@dataclass(frozen=True)
class Plan:
    """A built plan (this rank's part). ``pair_weight [n_pairs]`` fp32: each final row's combine weight
    (carried with the metadata, no autograd: see the dispatcher); ``tokens_per_expert``: rows per local
    expert (host ints), in canonical order."""

    hops: tuple[Hop, ...]
    num_tokens: int
    pair_weight: torch.Tensor
    tokens_per_expert: tuple[int, ...]
    traffic: Traffic
    mode: str
    _bcast: tuple = field(default=(), repr=False)
    _ret: tuple = field(default=(), repr=False)
    _pairs: "_PairsRoute | None" = field(default=None, repr=False)

    def pair_values_to_slots(self, v: torch.Tensor, k: int) -> torch.Tensor:
        """``v [num_pairs]`` (one value per pair, at the expert rank) -> ``[s, k]`` fp32 at the source,
        each value in its pair's (token, slot), 0 in slots without a kept pair. Every slot has at most
        one pair, so this is a permutation, not a sum: one EP-wide all-to-all of ``(slot, value)`` int32
        words (8 bytes a pair; ``flat_fast``: the fp32 values alone, the source knows their slots), no
        reduce levels. The router's weight gradient goes back this way."""
        if self._pairs is not None:
            return self._pairs.values_to_slots(v, self.num_tokens, k)
        order, slot_key, send_splits, recv_splits, group = self._ret
        words = torch.stack([slot_key, v.float().index_select(0, order).view(torch.int32)], 1)
        back = all_to_all_rows(words, recv_splits, send_splits, group)
        out = torch.zeros(self.num_tokens * k, dtype=torch.float32, device=v.device)
        out.scatter_(0, back[:, 0].long(), back.view(torch.float32)[:, 1])
        return out.view(self.num_tokens, k)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """``x [s, F]`` -> ``[num_pairs, F]`` rows in canonical pair order (copies only)."""
        if self._pairs is not None:
            return self._pairs.broadcast(x)
        for index, hop in self._bcast:
            x = x.index_select(0, index)
            if hop is not None:
                x = all_to_all_rows(x, hop.out_splits, hop.blocks, hop.group)
        return x

    def reduce(self, y: torch.Tensor) -> torch.Tensor:
        """``y [num_pairs, F]`` -> ``[s, F]``: sums in the fixed node / rank / expert tree (``flat_fast``:
        over each token's slots)."""
        if self._pairs is not None:
            return self._pairs.reduce(y, self.num_tokens)
        for hop in reversed(self.hops):
            y = hop.backward(y)
        return y


@dataclass(frozen=True)
class _PairsRoute:
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


def _pairs_source_order(expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> tuple:
    """The source half of the pairs plan, which needs no counts: queued before the count exchange's host
    sync, so the GPU runs it while the host waits, and fewer launches follow the sync. Slots expert-major
    (stable: tokens in order inside an expert), dropped (and invalid) slots last: ``(order [s*k], position of
    each slot in that order [s*k], token of each ordered slot, fp32 weights in that order)``."""
    s, k = expert_ids.shape
    order = torch.argsort(torch.where(expert_ids >= 0, expert_ids, num_experts).reshape(-1), stable=True)
    pos = torch.empty_like(order).scatter_(0, order, torch.arange(s * k, device=order.device))
    w = weights.detach().float().reshape(-1).index_select(0, order)
    return order, pos, order // k, w


def _build_pairs_plan(expert_ids: torch.Tensor, groups: CommGroups, counts: _Counts, source: tuple) -> Plan:
    t = groups.topology
    s, k = expert_ids.shape
    me, e_r, p = t.ep_rank, t.experts_per_rank, t.ep_size
    dev = expert_ids.device
    send_splits = tuple(sum(counts.C[me][q * e_r : (q + 1) * e_r]) for q in range(p))
    recv_splits = tuple(sum(counts.C[q][me * e_r : (me + 1) * e_r]) for q in range(p))
    n_src, m = sum(send_splits), sum(recv_splits)
    tt = _topology_tensors(t, dev)
    order, pos, order_tok, order_w = source
    send_slot = order[:n_src]
    slot_pos = pos.clamp_max(n_src)  # the slots not sent (dropped) read the extra zero row at n_src
    # expert rank: received blocks by source, each expert-major; the rows' local experts come from the counts
    sizes = counts.local_sizes(me * e_r, e_r)  # [P * E_r] device: pairs from source q for local expert e
    row_expert = torch.repeat_interleave(tt["local_expert_pattern"], sizes, output_size=m)
    canon_src = torch.argsort(row_expert, stable=True)
    recv_src = torch.empty_like(canon_src).scatter_(0, canon_src, torch.arange(m, device=dev))
    group = groups.ep if p > 1 else None
    route = _PairsRoute(send_slot, order_tok[:n_src], slot_pos, canon_src, recv_src, send_splits, recv_splits, group)
    w = all_to_all_rows(order_w[:n_src], recv_splits, send_splits, group)
    a = t.node
    tpe = tuple(sum(c[me * e_r + i] for c in counts.C) for i in range(e_r))
    inter = sum(c for q, c in enumerate(send_splits) if t.node_of_rank[q] != a)
    intra = sum(c for q, c in enumerate(send_splits) if t.node_of_rank[q] == a and q != me)
    return Plan(hops=(), num_tokens=s, pair_weight=w.index_select(0, canon_src),
                tokens_per_expert=tpe, traffic=Traffic(inter_rows=inter, intra_rows=intra), mode="flat_fast",
                _pairs=route)


def _fused_broadcast(hops: tuple[Hop, ...]) -> tuple:
    """Compose consecutive local gathers so broadcast does one gather before each all-to-all."""
    steps = []
    pending: torch.Tensor | None = None
    for hop in hops:
        idx = hop.index if pending is None else pending.index_select(0, hop.index)
        if hop.group is None:
            pending = idx
        else:
            steps.append((idx, hop))
            pending = None
    if pending is not None:
        steps.append((pending, None))
    return tuple(steps)


# ---------------------------------------------------------------------------------------- builders
@functools.lru_cache(maxsize=64)
def _topology_tensors(t: Topology, device: torch.device) -> dict[str, torch.Tensor]:
    """Index tensors that depend only on the topology, made once per device: building them from
    Python lists in every call would be a host-to-device copy (a hidden sync) per dispatch."""
    node_order = _node_order(t)
    local_of = torch.full((t.ep_size + 1,), t.ranks_per_node, dtype=torch.long)  # phantom: not this node
    local_of[list(t.ranks_of_node(t.node))] = torch.arange(t.ranks_per_node)
    ranks_ib = [[t.ranks_of_node(b)[i] for b in range(t.num_nodes)] for i in range(t.ranks_per_node)]
    local_col = torch.full((t.num_experts + 1,), t.experts_per_rank, dtype=torch.long)  # id + 1 -> local expert
    local_col[1 + t.ep_rank * t.experts_per_rank : 1 + (t.ep_rank + 1) * t.experts_per_rank] = torch.arange(
        t.experts_per_rank
    )
    return {
        "local_expert_pattern": torch.arange(t.experts_per_rank).repeat(t.ep_size).to(device),  # [P * E_r]
        "local_col": local_col.to(device),  # (expert id + 1) -> this rank's local expert, or E_r (id -1 / elsewhere)
        "arange": torch.arange(t.num_experts, device=device),  # [:k] (k <= E)
        "ranks_node_major": torch.tensor(node_order, device=device),
        "local_of": local_of.to(device),
        "q_ib": torch.tensor(ranks_ib, device=device),  # [R, N]: EP rank of local index i on node b
    }


@functools.lru_cache(maxsize=64)
def _count_layout(t: Topology, k: int, device: torch.device) -> dict:
    """Bins of the routing-count histogram (see :class:`_Counts`) and their device offsets."""
    l1, l2, l3 = min(t.num_nodes, k), min(t.ranks_per_node, k), min(t.experts_per_rank, k)
    o2 = l1 + 1
    o3 = o2 + t.num_nodes * (l2 + 1)
    o4 = o3 + t.ep_size * (l3 + 1)
    return {
        "levels": (l1, l2, l3),
        "o2": o2, "o3": o3, "o4": o4, "bins": o4 + t.num_experts + 2,
        "off2": (o2 + torch.arange(t.num_nodes) * (l2 + 1)).to(device),
        "off3": (o3 + torch.arange(t.ep_size) * (l3 + 1)).to(device),
        "one": torch.ones((), dtype=torch.long, device=device),
        "node_major_is_identity": list(_node_order(t)) == list(range(t.ep_size)),
    }


def _node_order(t: Topology) -> list[int]:
    return [r for n in range(t.num_nodes) for r in t.ranks_of_node(n)]


class _Counts:
    """Every rank's routing counts, all-gathered once and read on the host (the plan's one sync).

    Per rank: rows to each node ``U [N]``, rows to each EP rank ``T [P]``, pairs per expert ``C [E]``, and
    for the reduce the copies per level: tokens with more than c destination nodes ``H1 [L1]``, with
    more than c ranks on node b ``H2 [N, L2]``, with more than c experts on rank q ``H3 [P, L3]``.

    On the device it is one histogram: per token, its number of nodes, its ranks on each node and its
    experts on each rank (each clamped to its level count), and its expert ids (-1 and invalid ids in
    two extra bins), scatter-added into one int64 vector; the host turns those histograms into the counts
    above. ``node_mask [s, N]``: the nodes each token needs (the rail hop's mask). ``per_token=False``
    (the flat_fast plan) counts only the pairs per expert (``C``)."""

    def __init__(self, groups: CommGroups, expert_ids: torch.Tensor, k: int, per_token: bool = True):
        t = groups.topology
        s = expert_ids.shape[0]
        dev = expert_ids.device
        lay = _count_layout(t, k, dev)
        self.L1, self.L2, self.L3 = l1, l2, l3 = lay["levels"]
        n, p, e, e_r = t.num_nodes, t.ep_size, t.num_experts, t.experts_per_rank
        valid = (expert_ids >= 0) & (expert_ids < e)
        one = lay["one"]
        id_keys = torch.where(valid, expert_ids, e + (expert_ids != -1))  # -1 -> bin e, bad -> e + 1
        if not per_token:
            # pairs per expert only (what the flat_fast plan needs): no per-token, per-node, per-rank levels
            lay = {"bins": e + 2, "o4": 0, "o2": 0, "o3": 0, "levels": (0, 0, 0)}
            self.L1 = self.L2 = self.L3 = l1 = l2 = l3 = 0
            self.rank_mask = self.node_mask = None
            keys = id_keys.reshape(-1)
        else:
            rank = torch.where(valid, expert_ids // e_r, p)
            per_rank = torch.zeros(s, p + 1, dtype=torch.long, device=dev).scatter_add_(1, rank, one.expand(s, k))[:, :p]
            used = per_rank > 0
            self.rank_mask = used  # [s, P] the EP ranks each token needs (EP order)
            if n == 1:
                per_node = used.sum(1, keepdim=True)
            else:
                if not lay["node_major_is_identity"]:
                    used = used.index_select(1, _topology_tensors(t, dev)["ranks_node_major"])
                per_node = used.reshape(s, n, t.ranks_per_node).sum(-1)
            self.node_mask = per_node > 0
            keys = torch.cat(
                [
                    self.node_mask.sum(1, keepdim=True).clamp_max(l1),
                    per_node.clamp_max(l2) + lay["off2"],
                    per_rank.clamp_max(l3) + lay["off3"],
                    id_keys + lay["o4"],
                ],
                1,
            ).reshape(-1)
        local = torch.zeros(lay["bins"], dtype=torch.long, device=dev).scatter_add_(0, keys, one.expand(keys.numel()))
        if groups.ep is not None and t.ep_size > 1:
            table = local.new_empty(t.ep_size * lay["bins"])
            _ALL_GATHER_SINGLE(table, local, group=groups.ep)
        else:
            table = local
        self._table, self._bins, self._o4 = table, lay["bins"], lay["o4"]
        flat = table.tolist()  # device-to-host sync: split sizes
        rows = [flat[i * lay["bins"] : (i + 1) * lay["bins"]] for i in range(len(flat) // lay["bins"])]
        o2, o3, o4 = lay["o2"], lay["o3"], lay["o4"]

        def at_least(hist, levels):  # hist[v] = tokens with value v -> tokens with value > c, c < levels
            return [sum(hist[c + 1 :]) for c in range(levels)]

        if per_token:
            self.H1 = [at_least(r[: l1 + 1], l1) for r in rows]
            self.H2 = [[at_least(r[o2 + b * (l2 + 1) : o2 + (b + 1) * (l2 + 1)], l2) for b in range(n)] for r in rows]
            self.H3 = [[at_least(r[o3 + q * (l3 + 1) : o3 + (q + 1) * (l3 + 1)], l3) for q in range(p)] for r in rows]
            self.U = [[h[0] for h in h2] for h2 in self.H2]
            self.T = [[h[0] for h in h3] for h3 in self.H3]
        self.C = [r[o4 : o4 + e] for r in rows]
        bad = [r[o4 + e + 1] for r in rows]
        if any(bad):
            # every rank saw the same table: all raise together, nobody hangs in a later collective
            raise ValueError(
                f"expert ids outside [-1, {e}) on EP rank(s) "
                f"{[i for i, b in enumerate(bad) if b]}: ids must be expert indices or -1 (dropped)"
            )

    def local_sizes(self, first_expert: int, n_local: int) -> torch.Tensor:
        """``[P * n_local]`` (device, source-major): pairs every EP rank routed to experts ``first_expert ..
        first_expert + n_local - 1``, read from the all-gathered table (no host-to-device copy)."""
        o = self._o4 + first_expert
        return self._table.view(-1, self._bins)[:, o : o + n_local].reshape(-1)


def _expert_mask(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[s, E]`` bool: the experts each token is routed to (ids -1 left out; ids were validated)."""
    s = expert_ids.shape[0]
    col = torch.where(expert_ids >= 0, expert_ids, num_experts)
    mask = torch.zeros(s, num_experts + 1, dtype=torch.bool, device=expert_ids.device)
    return mask.scatter_(1, col, True)[:, :num_experts]


def _canonical_hop(ids: torch.Tensor, src_key: torch.Tensor, groups: CommGroups, counts: _Counts,
                   src_sorted: bool = False):
    """At this expert rank: ``ids [m, k]`` of the rows received (all slots), ``src_key [m]``. Returns
    the local hop rows -> pairs in (local expert, source) order, and each pair's slot.

    ``src_sorted``: the rows arrive in ascending ``src_key`` order (one node: blocks by source rank,
    tokens in order), so the canonical order is the local-expert-major listing of the rows, without a
    sort."""
    t = groups.topology
    me = t.ep_rank
    m, k = ids.shape
    e_r = t.experts_per_rank
    first = me * e_r
    tpe = tuple(sum(c[e] for c in counts.C) for e in range(first, first + e_r))
    # rows here are (token, this rank) rows (k slots) or single pairs (k == 1)
    levels = [sum(h[me][c] for h in counts.H3) for c in range(counts.L3)] if k > 1 else None
    if src_sorted:
        # slot_of[r, e]: the slot of local expert e in row r, k where the row has none (ids of a row are
        # distinct); column e_r collects the other experts' slots and is cut off
        col = _topology_tensors(t, ids.device)["local_col"].index_select(0, (ids + 1).reshape(-1)).view(m, k)
        slot_of = torch.full((m, e_r + 1), k, dtype=torch.long, device=ids.device)
        slot_of.scatter_(1, col, _topology_tensors(t, ids.device)["arange"][:k].expand(m, k))
        slot_of = slot_of[:, :e_r]
        hop, cell = mask_hop(slot_of < k, sum(tpe), min(k, e_r), tpe, levels)
        return hop, slot_of.t().reshape(-1).index_select(0, cell), tpe
    local_e = ids - first
    mine = (local_e >= 0) & (local_e < e_r)
    key = torch.where(mine, local_e * (t.ep_size * SRC_SHIFT) + src_key.unsqueeze(1), torch.iinfo(torch.int64).max)
    order = torch.argsort(key.reshape(-1), stable=True)[: sum(tpe)]
    hop = Hop.build(order // k, tpe, m, min(k, e_r), level_counts=levels)
    return hop, order % k, tpe


def _bits(w: torch.Tensor) -> torch.Tensor:
    """fp32 values -> int64 holding their bit patterns (to ride in the int64 metadata exactly)."""
    return w.float().contiguous().view(torch.int32).long()


def _unbits(b: torch.Tensor) -> torch.Tensor:
    return b.to(torch.int32).view(torch.float32)


def _return_path(pair_src_key: torch.Tensor, slot: torch.Tensor, k: int, groups: CommGroups,
                 counts: _Counts) -> tuple:
    """Pairs at this expert rank grouped by source EP rank (a stable sort), each with its
    ``token * k + slot`` at the source, and the split sizes both ways (host ints from the counts)."""
    t = groups.topology
    me, e_r = t.ep_rank, t.experts_per_rank
    mine = range(me * e_r, (me + 1) * e_r)
    send = [sum(counts.C[q][e] for e in mine) for q in range(t.ep_size)]
    recv = [sum(counts.C[me][q * e_r : (q + 1) * e_r]) for q in range(t.ep_size)]
    order = torch.argsort(pair_src_key // SRC_SHIFT, stable=True)
    slot_key = ((pair_src_key % SRC_SHIFT) * k + slot).index_select(0, order).to(torch.int32)
    group = groups.ep if t.ep_size > 1 else None
    return order, slot_key, tuple(send), tuple(recv), group


def build_plan(
    expert_ids: torch.Tensor, groups: CommGroups, mode: str = "hierarchical", weights: torch.Tensor | None = None
) -> Plan:
    """Build this rank's plan for ``expert_ids [s, k]`` (int64, -1 = not routed) and combine
    ``weights [s, k]`` (default 1). Collective over the EP group (all-gather of counts, then the
    metadata all-to-alls); every EP rank must call it.

    ``mode``: ``"hierarchical"``, ``"flat"`` (exact tree) or ``"flat_fast"``.
    """
    if mode not in ("hierarchical", "flat", "flat_fast"):
        raise ValueError(f"dispatch mode {mode!r} is not 'hierarchical', 'flat' or 'flat_fast'")
    t = groups.topology
    expert_ids = expert_ids.long()
    s, k = expert_ids.shape
    if weights is None:
        weights = torch.ones(s, k, device=expert_ids.device)
    source = _pairs_source_order(expert_ids, weights, t.num_experts) if mode == "flat_fast" else None
    # raises on invalid ids, on every rank alike
    counts = _Counts(groups, expert_ids, k, per_token=mode != "flat_fast")
    if mode == "flat_fast":
        return _build_pairs_plan(expert_ids, groups, counts, source)
    node_mask = counts.node_mask
    me, a, j = t.ep_rank, t.node, t.local_index
    dev = expert_ids.device
    tok = torch.arange(s, device=dev)
    src_key = me * SRC_SHIFT + tok
    meta = torch.cat([expert_ids, src_key.unsqueeze(1), _bits(weights.detach())], 1)  # [s, 2k + 1]

    def node_of(r):
        return t.node_of_rank[r]

    if mode == "hierarchical":
        rail = t.rail(j)  # EP rank of local index j on each node
        node_a = t.ranks_of_node(a)
        if t.num_nodes > 1:
            # hop 1 (rail): token rows to each node hosting one of its experts, node-major
            h1, _ = mask_hop(
                node_mask,
                sum(counts.U[me]),
                min(t.num_nodes, k),
                blocks=counts.U[me],
                level_counts=counts.H1[me],
                group=groups.rail,
                out_splits=[counts.U[rail[b]][a] for b in range(t.num_nodes)],
            )
            meta1 = h1.forward(meta)
            first_hops: tuple[Hop, ...] = (h1,)
        else:  # one node: no rail stage, the node hop starts from the tokens (once per rank)
            meta1, first_hops = meta, ()
        ids1 = meta1[:, :k]
        mrows = ids1.shape[0]
        # hop 2 (node): node rows to each local rank holding one of their experts, rank-major
        if t.num_nodes == 1:  # the rows are this rank's tokens: the counts already hold that mask
            need = counts.rank_mask
        else:
            rank1 = torch.where(ids1 >= 0, ids1 // t.experts_per_rank, t.ep_size)
            local_of = _topology_tensors(t, dev)["local_of"]
            need = torch.zeros(mrows, t.ranks_per_node + 1, dtype=torch.bool, device=dev)
            need.scatter_(1, local_of[rank1], True)
            need = need[:, : t.ranks_per_node]
        src_rails = [t.rail(jj) for jj in range(t.ranks_per_node)]
        blocks2 = tuple(sum(counts.T[rail[b]][q] for b in range(t.num_nodes)) for q in node_a)
        h2, _ = mask_hop(
            need,
            sum(blocks2),
            min(t.ranks_per_node, k),
            blocks=blocks2,
            level_counts=[sum(counts.H2[rail[b]][a][c] for b in range(t.num_nodes)) for c in range(counts.L2)],
            group=groups.node if t.num_nodes > 1 else groups.ep,
            out_splits=[sum(counts.T[src_rails[jj][b]][me] for b in range(t.num_nodes)) for jj in range(t.ranks_per_node)],
        )
        meta2 = h2.forward(meta1)
        # one node: the rows arrive by source rank, tokens in order, i.e. sorted by source key
        h3, slot, tpe = _canonical_hop(meta2[:, :k], meta2[:, k], groups, counts, src_sorted=t.num_nodes == 1)
        pair_w = _unbits(meta2[:, k + 1 :].index_select(0, h3.index).gather(1, slot.unsqueeze(1)).squeeze(1))
        ret = _return_path(meta2[:, k].index_select(0, h3.index), slot, k, groups, counts)
        hops = first_hops + (h2, h3)
        inter = sum(c for b, c in enumerate(counts.U[me]) if b != a)
        intra = sum(c for q, c in zip(node_a, blocks2) if q != me)
        traffic = Traffic(inter_rows=inter, intra_rows=intra)
    else:
        has, rank_mask = _expert_mask(expert_ids, t.num_experts), counts.rank_mask
        e_r = t.experts_per_rank
        pairs_to = [sum(counts.C[me][q * e_r : (q + 1) * e_r]) for q in range(t.ep_size)]
        from_ = [sum(counts.C[q][me * e_r : (me + 1) * e_r]) for q in range(t.ep_size)]
        n_pairs_src = sum(pairs_to)
        slot_of = torch.zeros(s, t.num_experts + 1, dtype=torch.long, device=dev)
        slot_of.scatter_(1, torch.where(expert_ids >= 0, expert_ids, t.num_experts), torch.arange(k, device=dev).expand(s, k))
        slot_of = slot_of[:, : t.num_experts]
        # exact: build the node / rank / expert levels at the source (see module doc)
        ranks_ib = [[t.ranks_of_node(b)[i] for b in range(t.num_nodes)] for i in range(t.ranks_per_node)]
        q_ib = _topology_tensors(t, dev)["q_ib"]  # [R, N]
        h_q = has.reshape(s, t.ep_size, e_r)  # [s, P, E_r]
        pair_mask = h_q[:, q_ib.reshape(-1), :].reshape(s, t.ranks_per_node, t.num_nodes, e_r).permute(3, 1, 2, 0)
        rank_ibt = rank_mask[:, q_ib.reshape(-1)].reshape(s, t.ranks_per_node, t.num_nodes).permute(1, 2, 0)
        node_bt = node_mask.t()
        node_row_of = torch.cumsum(node_bt.reshape(-1), 0).reshape(node_bt.shape) - 1  # [N, s]
        rank_row_of = torch.cumsum(rank_ibt.reshape(-1), 0).reshape(rank_ibt.shape) - 1  # [R, N, s]
        n_node_rows = sum(counts.U[me])
        blocks_i = tuple(sum(counts.T[me][q] for q in ranks_ib[i]) for i in range(t.ranks_per_node))
        blocks_e = tuple(sum(counts.C[me][q * e_r + ee] for q in range(t.ep_size)) for ee in range(e_r))
        l1 = Hop.build(true_positions(node_bt, n_node_rows) % max(s, 1), counts.U[me], s, min(t.num_nodes, k))
        p2 = true_positions(rank_ibt, sum(blocks_i))
        bt2 = p2 % (t.num_nodes * max(s, 1))
        l2 = Hop.build(node_row_of.reshape(-1)[bt2], blocks_i, n_node_rows, min(t.ranks_per_node, k))
        p3 = true_positions(pair_mask, n_pairs_src)
        ibt3 = p3 % (t.ranks_per_node * t.num_nodes * max(s, 1))
        l3 = Hop.build(rank_row_of.reshape(-1)[ibt3], blocks_e, sum(blocks_i), min(e_r, k))
        # decode each pair: expert id, token
        ee3 = p3 // (t.ranks_per_node * t.num_nodes * max(s, 1))
        ib3 = ibt3 // max(s, 1)
        pair_t = ibt3 % max(s, 1)
        pair_q = q_ib.reshape(-1)[ib3]
        pair_e = pair_q * e_r + ee3
        to_rank = torch.argsort(pair_q, stable=True)
        local_hops = (l1, l2, l3)
        send = Hop.build(to_rank, pairs_to, n_pairs_src, 1, group=groups.ep, out_splits=from_)
        pair_slot = slot_of[pair_t, pair_e]
        pair_meta = torch.stack([pair_e, me * SRC_SHIFT + pair_t, pair_slot, meta[pair_t, k + 1 + pair_slot]], 1)
        recv = send.forward(pair_meta)
        # recv [m, 4]: expert id, source key, slot and weight bits of each pair received
        h_can, _, tpe = _canonical_hop(recv[:, :1], recv[:, 1], groups, counts)
        slot = recv[:, 2].index_select(0, h_can.index)
        pair_w = _unbits(recv[:, 3].index_select(0, h_can.index))
        ret = _return_path(recv[:, 1].index_select(0, h_can.index), slot, k, groups, counts)
        hops = local_hops + (send, h_can)
        inter = sum(c for q, c in enumerate(pairs_to) if node_of(q) != a)
        intra = sum(c for q, c in enumerate(pairs_to) if node_of(q) == a and q != me)
        traffic = Traffic(inter_rows=inter, intra_rows=intra)

    return Plan(
        hops=hops,
        num_tokens=s,
        pair_weight=pair_w,
        tokens_per_expert=tpe,
        traffic=traffic,
        mode=mode,
        _bcast=_fused_broadcast(hops),
        _ret=ret,
    )
