"""Hops: the steps a plan is made of, each a gather of rows and, for a communication hop, one
``all_to_all_single`` on a process group.

Going forward (:meth:`Hop.forward`) a hop copies rows. Going back (:meth:`Hop.backward`) it reverses
its all-to-all and sums the returned copies of each previous-level row in send order; inside one
destination block every previous-level row occurs at most once, so the sum order is fixed by the block
order (gathers and adds; where a sparse level uses ``index_add_``, its rows are distinct, so no two
additions into one element race): deterministic on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def all_to_all_rows(x: torch.Tensor, out_splits, in_splits, group) -> torch.Tensor:
    """``all_to_all_single`` over dim 0 (no autograd). ``group=None`` means a local copy."""
    if group is None:
        return x.clone()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), list(out_splits), list(in_splits), group=group)
    return out


def true_positions(mask: torch.Tensor, total: int) -> torch.Tensor:
    """Row-major flat indices of the True (bool) or 1 (int64 0/1) entries of ``mask``; ``total`` (their
    count) is known on the host, so no device-to-host sync: ``[total]`` int64. An int64 mask spares the
    cumsum its conversion (one copy kernel)."""
    flat = mask.reshape(-1)
    if flat.dtype != torch.long:
        flat = flat.long()
    out = torch.empty(total + 1, dtype=torch.long, device=mask.device)
    # the k-th set entry (running count k) lands on slot k; every unset entry (count * 0) on the
    # phantom slot 0, which is cut off
    out.scatter_(0, torch.cumsum(flat, 0).mul_(flat), torch.arange(flat.numel(), device=mask.device))
    return out[1:]


def copy_numbers(index: torch.Tensor) -> torch.Tensor:
    """``index [n]`` -> ``[n]`` int64: for each entry, how many earlier entries hold the same row (0 for the first)."""
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
            occ, occ_base = copy_numbers(index), 0
        ar = torch.arange(n, device=dev)
        # copy c of row r at (c + occ_base) * prev_rows + r: the first occ_base blocks stay unused
        base = occ_base * prev_rows
        slot = torch.full((base + levels * prev_rows,), n, dtype=torch.long, device=dev)
        slot.scatter_(0, index.add(occ, alpha=prev_rows), ar)  # occ - occ_base < fan_in: every entry has its own cell
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
        return cls(index, blocks, prev_rows, first, tuple(more), group,
                   None if out_splits is None else tuple(out_splits))

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
        return self.sum_copies(ext)

    def sum_copies(self, ext: torch.Tensor) -> torch.Tensor:
        """``ext [rows_sent + 1, F]`` (the returned copies in send order, then a zero row) -> ``[prev_rows,
        F]``: each previous-level row's copies summed in send order."""
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
    # [D, rows] int64 0/1: one copy (transpose and conversion at once), shared by both cumsums below
    by_dest = torch.empty((d, rows), dtype=torch.long, device=mask.device).copy_(mask.t())
    cell = true_positions(by_dest, n_sent)  # flat d * rows + r positions, destination-major
    index = cell % max(rows, 1)
    occ1 = torch.cumsum(by_dest, 0).view(-1).index_select(0, cell)  # 1-based copy numbers
    hop = Hop.build(index, blocks, rows, fan_in, group, out_splits, level_counts, occ=occ1, occ_base=1)
    return hop, cell



def fused_broadcast(hops: tuple[Hop, ...], first_index: torch.Tensor | None = None) -> tuple:
    """Compose consecutive local gathers so broadcast does one gather before each all-to-all;
    ``first_index``: a gather that comes before the first hop."""
    steps = []
    pending: torch.Tensor | None = first_index
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


def run_broadcast(x: torch.Tensor, steps: tuple) -> torch.Tensor:
    """Run :func:`fused_broadcast`'s ``(index, hop)`` steps on ``x [rows, F]`` (copies only)."""
    for index, hop in steps:
        x = x.index_select(0, index)
        if hop is not None:
            x = all_to_all_rows(x, hop.out_splits, hop.blocks, hop.group)
    return x
