"""Payload rows and their routing metadata in one buffer, so one all-to-all moves both.

A row of the packed buffer is the payload row's bytes followed by the metadata row's bytes (``uint8``,
``[rows, F * element size + 8 * M]``). The split after receipt reinterprets the bytes (a view, no
conversion), so bf16 payload and int64 expert ids / source keys / fp32 weight bits all arrive exact.
"""

from __future__ import annotations

import torch

from .hops import Hop, all_to_all_rows


def pack_rows(payload: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """``payload [n, F]`` (any dtype) and ``meta [n, M]`` int64 -> ``[n, F * element size + 8 * M]`` uint8."""
    n = payload.shape[0]
    payload_bytes = payload.shape[1] * payload.element_size()
    return torch.cat([payload.contiguous().view(torch.uint8).view(n, payload_bytes),
                      meta.contiguous().view(torch.uint8).view(n, 8 * meta.shape[1])], 1)


def unpack_rows(packed: torch.Tensor, dtype: torch.dtype, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack_rows`: ``packed [n, B]`` uint8 -> ``(payload [n, features] dtype, meta
    [n, M] int64)``; strided views into ``packed`` where the byte offsets allow, else fresh copies (read
    them, do not write them)."""
    n = packed.shape[0]
    cut = features * dtype.itemsize
    tail = packed.shape[1] - cut
    if n and packed.stride(1) == 1 and packed.stride(0) % 8 == 0 and packed.storage_offset() % 8 == 0 and cut % 8 == 0:
        # every row's payload and metadata start where their dtypes may be viewed from (the usual case:
        # row bytes a multiple of 8, a buffer from an all-to-all): views, no copy
        return packed[:, :cut].view(dtype), packed[:, cut:].view(torch.int64)
    # otherwise copied into fresh buffers: a slice of the packed rows may start at an offset the wider
    # dtype cannot be viewed from (a one-row slice counts as contiguous and would not be copied)
    payload = packed.new_empty((n, cut)).copy_(packed[:, :cut]).view(dtype).view(n, features)
    meta = packed.new_empty((n, tail)).copy_(packed[:, cut:]).view(torch.int64).view(n, tail // 8)
    return payload, meta


def hop_forward_with_meta(hop: Hop, x: torch.Tensor, meta: torch.Tensor, first_index: torch.Tensor | None = None,
                          packed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hop.forward`` of ``x [prev, F]`` and of its metadata rows ``meta [prev, M]`` int64 in one
    all-to-all (each metadata row packed behind its payload row); ``first_index``: a gather of both that
    comes before the hop. ``packed``: ``x`` and ``meta`` already packed (:func:`pack_rows`, e.g. the rows
    an earlier hop delivered), so the rows are gathered once, not packed again. Returns ``(rows
    [received, F], meta rows [received, M], packed rows [received, B])``, the first two bit for bit what
    ``hop.forward`` of each alone gives (views into the third where aligned, :func:`unpack_rows`). A hop
    without a group is a local gather."""
    index = hop.index if first_index is None else first_index.index_select(0, hop.index)
    if packed is None:
        packed = pack_rows(x, meta)
    sent = packed.index_select(0, index)
    if hop.group is not None:
        sent = all_to_all_rows(sent, hop.out_splits, hop.blocks, hop.group)
    rows, meta_rows = unpack_rows(sent, x.dtype, x.shape[1])
    return rows, meta_rows, sent
