"""Payload and metadata rows packed into one buffer come back bit for bit."""

import pytest
import torch

from locmoe_plugin.comm.packed_rows import pack_rows, unpack_rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [0, 1, 3])
def test_pack_unpack_is_exact(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    payload = (torch.randn(rows, 5, generator=g) * 1e3).to(dtype)
    meta = torch.randint(-(2**62), 2**62, (rows, 9), generator=g)
    if rows:
        meta[0, 0] = torch.iinfo(torch.int64).min  # extremes survive too
        meta[-1, -1] = torch.iinfo(torch.int64).max
    packed = pack_rows(payload, meta)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, 5 * payload.element_size() + 9 * 8)
    got_payload, got_meta = unpack_rows(packed[:], dtype, 5)
    assert got_payload.dtype == dtype and got_payload.shape == payload.shape
    assert torch.equal(got_payload.view(torch.uint8), payload.view(torch.uint8))
    assert torch.equal(got_meta, meta)


def test_unpack_of_a_row_slice_at_an_odd_offset():
    payload = torch.randn(4, 3, dtype=torch.float32).to(torch.bfloat16)  # 6 payload bytes a row
    meta = torch.arange(8).view(4, 2)
    got_payload, got_meta = unpack_rows(pack_rows(payload, meta)[1:2], torch.bfloat16, 3)
    assert torch.equal(got_meta, meta[1:2]) and torch.equal(got_payload.float(), payload[1:2].float())


@pytest.mark.parametrize("dtype, features", [(torch.bfloat16, 4), (torch.float32, 6)])
def test_aligned_rows_unpack_as_views(dtype, features):
    """Row bytes a multiple of 8 (the usual hidden sizes): payload and metadata are views into the packed
    rows, also for a slice of rows (e.g. one block of a receive buffer), and read back exact."""
    g = torch.Generator().manual_seed(features)
    payload = torch.randn(5, features, generator=g).to(dtype)
    meta = torch.randint(-(2**62), 2**62, (5, 3), generator=g)
    packed = pack_rows(payload, meta)
    for rows in (slice(0, 5), slice(2, 4), slice(3, 4)):
        block = packed[rows]
        got_payload, got_meta = unpack_rows(block, dtype, features)
        assert got_payload.data_ptr() == block.data_ptr()  # no copy
        assert got_meta.data_ptr() == block.data_ptr() + features * payload.element_size()
        assert torch.equal(got_payload.view(torch.uint8), payload[rows].view(torch.uint8))
        assert torch.equal(got_meta, meta[rows])
