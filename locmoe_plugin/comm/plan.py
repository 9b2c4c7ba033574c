"""Routing plans: how token rows travel from their source rank to expert pairs and back.

A plan is a chain of *hops*. Each hop gathers rows of the previous level by an index (a copy) and, for
a communication hop, exchanges them with one ``all_to_all_single`` on a process group. Going forward
(:meth:`Plan.broadcast`) every step is a copy. Going back (:meth:`Plan.reduce`) each hop reverses its
all-to-all and sums the returned copies of each previous-level row in send order; inside one
destination block every previous-level row occurs at most once, so the sum order is fixed by the
block order (gathers and adds, no atomics): deterministic on every device, and the *same tree of
additions* in every mode:

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
counts; all later index work sizes its outputs from those host counts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..topology import Topology
from .groups import CommGroups

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
    def build(cls, index, blocks, prev_rows, fan_in, group=None, out_splits=None, level_counts=None) -> "Hop":
        """``fan_in``: most copies one previous row can have. ``level_counts[c]``: entries that are a
        row's (c+1)-th copy (host ints); when given, later levels gather only those rows, else a
        padded ``[prev_rows]`` gather per level."""
        n = index.numel()
        dev = index.device
        occ = _occurrence(index)
        ar = torch.arange(n, device=dev)
        first = torch.full((prev_rows + 1,), n, dtype=torch.long, device=dev)
        first.scatter_(0, torch.where(occ == 0, index, prev_rows), ar)  # phantom slot prev_rows
        first = first[:prev_rows]
        more = []
        if level_counts is None:
            for c in range(1, max(1, fan_in)):
                col = torch.full((prev_rows + 1,), n, dtype=torch.long, device=dev)
                col.scatter_(0, torch.where(occ == c, index, prev_rows), ar)
                more.append((None, col[:prev_rows]))
        elif any(level_counts[1:fan_in]):
            # every later copy at once: positions grouped by level, in position order inside a level (a
            # stable sort), then cut by the host-known level sizes (slices, no more kernels)
            by_level = torch.argsort(occ, stable=True)
            rows_by_level = index.index_select(0, by_level)
            start = level_counts[0]
            for c in range(1, max(1, fan_in)):
                m = level_counts[c]
                if m:
                    more.append((rows_by_level[start : start + m], by_level[start : start + m]))
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
            else:  # compact level: rows are distinct, so this is a plain (deterministic) update
                out.index_put_((rows,), out.index_select(0, rows) + ext.index_select(0, pos))
        return out


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
    """A built plan (this rank's part). ``pair_slot [n_pairs]``: the slot of ``expert_ids`` each final
    row came from; ``pair_weight [n_pairs]`` fp32: its combine weight (carried with the metadata, no
    autograd: see the dispatcher); ``tokens_per_expert``: rows per local expert (host ints), in
    canonical order."""

    hops: tuple[Hop, ...]
    num_tokens: int
    pair_slot: torch.Tensor
    pair_weight: torch.Tensor
    tokens_per_expert: tuple[int, ...]
    traffic: Traffic
    mode: str
    _bcast: tuple = field(default=(), repr=False)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """``x [s, F]`` -> ``[num_pairs, F]`` rows in canonical pair order (copies only)."""
        for index, hop in self._bcast:
            x = x.index_select(0, index)
            if hop is not None:
                x = all_to_all_rows(x, hop.out_splits, hop.blocks, hop.group)
        return x

    def reduce(self, y: torch.Tensor) -> torch.Tensor:
        """``y [num_pairs, F]`` -> ``[s, F]``: sums in the fixed node / rank / expert tree."""
        for hop in reversed(self.hops):
            y = hop.backward(y)
        return y


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
    node_order = [r for n in range(t.num_nodes) for r in t.ranks_of_node(n)]
    local_of = torch.full((t.ep_size + 1,), t.ranks_per_node, dtype=torch.long)  # phantom: not this node
    local_of[list(t.ranks_of_node(t.node))] = torch.arange(t.ranks_per_node)
    ranks_ib = [[t.ranks_of_node(b)[i] for b in range(t.num_nodes)] for i in range(t.ranks_per_node)]
    return {
        "node_of_rank": torch.tensor(t.node_of_rank, device=device),
        "ranks_node_major": torch.tensor(node_order, device=device),
        "local_of": local_of.to(device),
        "q_ib": torch.tensor(ranks_ib, device=device),  # [R, N]: EP rank of local index i on node b
    }


def _at_least(per_token: torch.Tensor, levels: int) -> torch.Tensor:
    """``per_token [s, *]`` counts -> ``[*, levels]``: tokens with more than c, for c < levels."""
    c = torch.arange(levels, device=per_token.device)
    return (per_token.unsqueeze(-1) > c).sum(0)


class _Counts:
    """Every rank's routing counts, all-gathered once. Per rank: rows to each node ``U [N]``, rows to
    each EP rank ``T [P]``, pairs per expert ``C [E]``, the number of invalid expert ids, and for the
    hierarchical reduce the copies per level: tokens with more than c destination nodes ``H1 [L1]``,
    with more than c ranks on node b ``H2 [N, L2]``, with more than c experts on rank q ``H3 [P, L3]``."""

    def __init__(self, groups: CommGroups, node_mask, rank_mask, has_expert, bad_ids, k: int, levels: bool = True):
        t = groups.topology
        s = has_expert.shape[0]
        # the per-level histograms serve the hierarchical reduce only; flat plans skip them
        self.L1, self.L2, self.L3 = (
            (min(t.num_nodes, k), min(t.ranks_per_node, k), min(t.experts_per_rank, k)) if levels else (0, 0, 0)
        )
        ranks_by_node = rank_mask.index_select(1, _topology_tensors(t, rank_mask.device)["ranks_node_major"])
        h1 = _at_least(node_mask.sum(1), self.L1)
        h2 = _at_least(ranks_by_node.reshape(s, t.num_nodes, t.ranks_per_node).sum(-1), self.L2)
        h3 = _at_least(has_expert.reshape(s, t.ep_size, t.experts_per_rank).sum(-1), self.L3)
        local = torch.cat(
            [node_mask.sum(0), rank_mask.sum(0), has_expert.sum(0), bad_ids.reshape(1),
             h1.reshape(-1), h2.reshape(-1), h3.reshape(-1)]
        ).to(torch.int64)
        if groups.ep is not None and t.ep_size > 1:
            parts = [torch.empty_like(local) for _ in range(t.ep_size)]
            dist.all_gather(parts, local, group=groups.ep)
            table = torch.stack(parts)
        else:
            table = local.reshape(1, -1)
        rows = table.tolist()  # device-to-host sync: split sizes
        n, p, e = t.num_nodes, t.ep_size, t.num_experts
        self.U = [r[:n] for r in rows]
        self.T = [r[n : n + p] for r in rows]
        self.C = [r[n + p : n + p + e] for r in rows]
        o = n + p + e
        bad = [r[o] for r in rows]
        o += 1
        self.H1 = [r[o : o + self.L1] for r in rows]
        o += self.L1
        self.H2 = [[r[o + b * self.L2 : o + (b + 1) * self.L2] for b in range(n)] for r in rows]
        o += n * self.L2
        self.H3 = [[r[o + q * self.L3 : o + (q + 1) * self.L3] for q in range(p)] for r in rows]
        if any(bad):
            # every rank saw the same table: all raise together, nobody hangs in a later collective
            raise ValueError(
                f"expert ids outside [-1, {e}) on EP rank(s) "
                f"{[i for i, b in enumerate(bad) if b]}: ids must be expert indices or -1 (dropped)"
            )


def _masks(expert_ids: torch.Tensor, groups: CommGroups):
    """``has_expert [s, E]``, ``rank_mask [s, P]``, ``node_mask [s, N]`` (bool) and the invalid count."""
    t = groups.topology
    s, _ = expert_ids.shape
    e = t.num_experts
    valid = (expert_ids >= 0) & (expert_ids < e)
    bad = ((expert_ids < -1) | (expert_ids >= e)).sum()
    col = torch.where(valid, expert_ids, e)
    has = torch.zeros(s, e + 1, dtype=torch.bool, device=expert_ids.device).scatter_(1, col, True)[:, :e]
    rank_mask = has.reshape(s, t.ep_size, t.experts_per_rank).any(-1)
    node_of_rank = _topology_tensors(t, expert_ids.device)["node_of_rank"]
    per_node = torch.zeros(s, t.num_nodes, dtype=torch.int32, device=expert_ids.device)
    node_mask = per_node.index_add_(1, node_of_rank, rank_mask.to(torch.int32)) > 0
    return has, rank_mask, node_mask, bad


def _canonical_hop(ids: torch.Tensor, src_key: torch.Tensor, groups: CommGroups, counts: _Counts):
    """At this expert rank: ``ids [m, k]`` of the rows received (all slots), ``src_key [m]``. Returns
    the local hop rows -> pairs in (local expert, source) order, and each pair's slot."""
    t = groups.topology
    me = t.ep_rank
    m, k = ids.shape
    first = me * t.experts_per_rank
    local_e = ids - first
    mine = (local_e >= 0) & (local_e < t.experts_per_rank)
    key = torch.where(mine, local_e * (t.ep_size * SRC_SHIFT) + src_key.unsqueeze(1), torch.iinfo(torch.int64).max)
    tpe = tuple(sum(c[e] for c in counts.C) for e in range(first, first + t.experts_per_rank))
    order = torch.argsort(key.reshape(-1), stable=True)[: sum(tpe)]
    # rows here are (token, this rank) rows (k slots) or single pairs (k == 1)
    levels = [sum(h[me][c] for h in counts.H3) for c in range(counts.L3)] if k > 1 else None
    hop = Hop.build(order // k, tpe, m, min(k, t.experts_per_rank), level_counts=levels)
    return hop, order % k, tpe


def _bits(w: torch.Tensor) -> torch.Tensor:
    """fp32 values -> int64 holding their bit patterns (to ride in the int64 metadata exactly)."""
    return w.float().contiguous().view(torch.int32).long()


def _unbits(b: torch.Tensor) -> torch.Tensor:
    return b.to(torch.int32).view(torch.float32)


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
    has, rank_mask, node_mask, bad = _masks(expert_ids, groups)
    counts = _Counts(groups, node_mask, rank_mask, has, bad, k, levels=mode == "hierarchical")
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
            h1 = Hop.build(
                index=true_positions(node_mask.t(), sum(counts.U[me])) % max(s, 1),
                blocks=counts.U[me],
                prev_rows=s,
                fan_in=min(t.num_nodes, k),
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
        rank1 = torch.where(ids1 >= 0, ids1 // t.experts_per_rank, t.ep_size)
        local_of = _topology_tensors(t, dev)["local_of"]
        need = torch.zeros(mrows, t.ranks_per_node + 1, dtype=torch.bool, device=dev)
        need.scatter_(1, local_of[rank1], True)
        need = need[:, : t.ranks_per_node]
        src_rails = [t.rail(jj) for jj in range(t.ranks_per_node)]
        blocks2 = tuple(sum(counts.T[rail[b]][q] for b in range(t.num_nodes)) for q in node_a)
        h2 = Hop.build(
            index=true_positions(need.t(), sum(blocks2)) % max(mrows, 1),
            blocks=blocks2,
            prev_rows=mrows,
            fan_in=min(t.ranks_per_node, k),
            level_counts=[sum(counts.H2[rail[b]][a][c] for b in range(t.num_nodes)) for c in range(counts.L2)],
            group=groups.node if t.num_nodes > 1 else groups.ep,
            out_splits=[sum(counts.T[src_rails[jj][b]][me] for b in range(t.num_nodes)) for jj in range(t.ranks_per_node)],
        )
        meta2 = h2.forward(meta1)
        h3, slot, tpe = _canonical_hop(meta2[:, :k], meta2[:, k], groups, counts)
        pair_w = _unbits(meta2[:, k + 1 :].index_select(0, h3.index).gather(1, slot.unsqueeze(1)).squeeze(1))
        hops = first_hops + (h2, h3)
        inter = sum(c for b, c in enumerate(counts.U[me]) if b != a)
        intra = sum(c for q, c in zip(node_a, blocks2) if q != me)
        traffic = Traffic(inter_rows=inter, intra_rows=intra)
    else:
        e_r = t.experts_per_rank
        pairs_to = [sum(counts.C[me][q * e_r : (q + 1) * e_r]) for q in range(t.ep_size)]
        from_ = [sum(counts.C[q][me * e_r : (me + 1) * e_r]) for q in range(t.ep_size)]
        n_pairs_src = sum(pairs_to)
        slot_of = torch.zeros(s, t.num_experts + 1, dtype=torch.long, device=dev)
        slot_of.scatter_(1, torch.where(expert_ids >= 0, expert_ids, t.num_experts), torch.arange(k, device=dev).expand(s, k))
        slot_of = slot_of[:, : t.num_experts]
        if mode == "flat_fast":
            # pairs in (destination rank, token, expert) order: one gather, one all-to-all
            pos = true_positions(has.reshape(s, t.num_experts).t(), n_pairs_src)  # expert-major
            pair_e, pair_t = pos // max(s, 1), pos % max(s, 1)
            local_hops: tuple[Hop, ...] = ()
            send = Hop.build(pair_t, pairs_to, s, k, group=groups.ep, out_splits=from_)
            pair_slot = slot_of[pair_t, pair_e]
            pair_meta = torch.stack([pair_e, me * SRC_SHIFT + pair_t, pair_slot, meta[pair_t, k + 1 + pair_slot]], 1)
            recv = all_to_all_rows(pair_meta, send.out_splits, send.blocks, send.group)
        else:
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
        hops = local_hops + (send, h_can)
        inter = sum(c for q, c in enumerate(pairs_to) if node_of(q) != a)
        intra = sum(c for q, c in enumerate(pairs_to) if node_of(q) == a and q != me)
        traffic = Traffic(inter_rows=inter, intra_rows=intra)

    return Plan(
        hops=hops,
        num_tokens=s,
        pair_slot=slot,
        pair_weight=pair_w,
        tokens_per_expert=tpe,
        traffic=traffic,
        mode=mode,
        _bcast=_fused_broadcast(hops),
    )
