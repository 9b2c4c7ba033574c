"""Payload rows and their routing metadata in one buffer, so one all-to-all moves both.

A row of the packed buffer is the payload row's bytes followed by the metadata row's bytes (``uint8``,
``[rows, F * element size + 8 * M]``). The split after receipt reinterprets the bytes (a view, no
conversion), so bf16 payload and int64 expert ids / source keys / fp32 weight bits all arrive exact.
"""

from __future__ import annotations

import torch


def pack_rows(payload: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """``payload [n, F]`` (any dtype) and ``meta [n, M]`` int64 -> ``[n, F * element size + 8 * M]`` uint8."""
    n = payload.shape[0]
    payload_bytes = payload.shape[1] * payload.element_size()
    return torch.cat([payload.contiguous().view(torch.uint8).view(n, payload_bytes),
                      meta.contiguous().view(torch.uint8).view(n, 8 * meta.shape[1])], 1)


def unpack_rows(packed: torch.Tensor, dtype: torch.dtype, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack_rows`: ``packed [n, B]`` uint8 -> ``(payload [n, features] dtype, meta
    [n, M] int64)``."""
    n = packed.shape[0]
    cut = features * torch.empty((), dtype=dtype).element_size()
    # copied into fresh buffers: a slice of the packed rows may start at an offset the wider dtype
    # cannot be viewed from (a one-row slice counts as contiguous and would not be copied)
    payload = packed.new_empty((n, cut)).copy_(packed[:, :cut]).view(dtype).view(n, features)
    tail = packed.shape[1] - cut
    meta = packed.new_empty((n, tail)).copy_(packed[:, cut:]).view(torch.int64).view(n, tail // 8)
    return payload, meta
