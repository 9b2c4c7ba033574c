"""All-gather and reduce-scatter of per-rank row blocks over one group, for blocks of unequal length.

NCCL's all-gather and reduce-scatter take one block size on every rank, while the ranks of an EP group
may hold different numbers of tokens (uneven micro-batches, a rank with none). Every rank reads every
rank's token count from the routing-count table (:attr:`.counts.RoutingCounts.slots_per_rank`), so each
pads its own block to the largest, ``rows_max``, without a collective of its own; a rank already at
``rows_max`` (every rank when the counts are equal, the usual case) copies nothing.

Gathered layout ``[P * rows_max, ...]``: rank ``q``'s rows at ``q * rows_max .. q * rows_max + rows_q``,
its padding after them (uninitialised in :func:`gather_blocks`; callers never read it). ``group=None``
(one rank): no collective. ``rows_max == 0`` (no rank holds a row; every rank knows it): no collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .counts import ALL_GATHER_SINGLE

# torch 2.13 names it reduce_scatter_single and warns on reduce_scatter_tensor; older torch has only the
# old name. Both take (output, input, group=...).
REDUCE_SCATTER_SINGLE = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def padded_block(x: torch.Tensor, rows_max: int) -> torch.Tensor:
    """``x [rows, ...]`` as a ``[rows_max, ...]`` block: ``x`` itself when ``rows == rows_max``, else a copy
    with uninitialised rows after it."""
    if x.shape[0] == rows_max:
        return x.contiguous()
    block = x.new_empty((rows_max,) + tuple(x.shape[1:]))
    block[: x.shape[0]].copy_(x)
    return block


def gather_blocks(x: torch.Tensor, rows_max: int, group) -> torch.Tensor:
    """``x [rows, ...]`` (``rows <= rows_max``) -> ``[P * rows_max, ...]``: every rank's block, rank order
    (no autograd)."""
    if group is None:
        return padded_block(x, rows_max)
    size = dist.get_world_size(group)
    out = x.new_empty((size * rows_max,) + tuple(x.shape[1:]))
    if rows_max:
        ALL_GATHER_SINGLE(out, padded_block(x, rows_max), group=group)
    return out


def reduce_scatter_blocks(y: torch.Tensor, rows: int, group) -> torch.Tensor:
    """``y [P * rows_max, ...]`` -> ``[rows, ...]``: this rank's block summed over the group's ranks, its
    padding cut off (no autograd). The order of the cross-rank sum is the collective's (fixed for a given
    backend, algorithm and group: NCCL's ring, gloo's), not necessarily rank order."""
    if group is None:
        return y[:rows]
    size = dist.get_world_size(group)
    rows_max = y.shape[0] // size
    out = y.new_empty((rows_max,) + tuple(y.shape[1:]))
    if rows_max:
        REDUCE_SCATTER_SINGLE(out, y.contiguous(), group=group)
    return out[:rows]
