"""How token rows travel in the dispatch direction: as they are, or as one byte per feature plus scales.

The dispatch direction is the dispatch's forward (token rows to the experts) and the combine's backward
(each token's output gradient to its experts' ranks): the two transfers DeepSeek-V3 sends in FP8 and
DeepEP's FP8 dispatch sends the same way. The combine's forward and the dispatch's backward (sums of
expert results and of input gradients) stay in the caller's dtype.

Formats (:data:`DISPATCH_FORMATS`):

* ``"native"``: rows as they are (no codec).
* ``"fp8"``: FP8 E4M3 values, one fp32 scale per block of 128 features (DeepSeek-V3's 1 x 128 tiles).
* ``"int8"``: int8 values with the same blocks, for devices whose FP8 casts are missing or untested (Ascend NPUs).

Encoded row ``[d]`` -> ``uint8 [d + 4 * ceil(d / 128)]``: ``d`` one-byte codes, then the block scales'
fp32 bytes. At hidden 2048 in bf16 that is 2112 bytes instead of 4096 (0.52 x).

Numerics (fp32 throughout): ``scale = amax(|block|) / max_code`` (448 for E4M3, 127 for int8); codes
``round(x / scale)`` (E4M3: the cast's round-to-nearest-even; int8: ``torch.round``, clamped to
+-127); decoded ``code * scale``, cast to the caller's dtype. An all-zero block gets scale 1, so zeros
decode to exact zeros and nothing divides by 0 (so does an fp32 block below ``max_code`` x the smallest
float, whose quotient underflows; its values decode to 0). A non-finite value makes its block's scale
non-finite, so the whole block decodes non-finite: the step's non-finite guard still sees it. Error of one element
before the final cast: E4M3 ``<= max(2**-4 * |x|, 2**-10 * scale)`` (3 mantissa bits; subnormals below
``2**-6 * scale``), int8 ``<= scale / 2``.

Gradients pass straight through a codec (the rounding's derivative is taken as 1): the dispatch's
backward returns the received gradient rows summed in the plan's order, as without a codec.
"""

from __future__ import annotations

import math

import torch

from ..config import ConfigError

#: the formats a user chooses between (``DispatcherSettings.dispatch_format``)
DISPATCH_FORMATS = ("native", "fp8", "int8")

#: features per scale
BLOCK = 128


class RowCodec:
    """One byte per feature and one fp32 scale per :data:`BLOCK` features (see the module doc).

    Args:
        fmt: ``"fp8"`` or ``"int8"``.
    """

    def __init__(self, fmt: str) -> None:
        if fmt == "fp8":
            if not hasattr(torch, "float8_e4m3fn"):
                raise ConfigError(f"dispatch_format='fp8' needs torch.float8_e4m3fn (torch {torch.__version__} "
                                  f"lacks it): use dispatch_format='int8' or 'native'")
            self.code_dtype, self.max_code = torch.float8_e4m3fn, 448.0
        elif fmt == "int8":
            self.code_dtype, self.max_code = torch.int8, 127.0
        else:
            raise ConfigError(f"dispatch_format={fmt!r} has no codec: use 'fp8' or 'int8' ('native' sends rows "
                              f"as they are)")
        self.fmt = fmt

    def __repr__(self) -> str:
        return f"RowCodec({self.fmt!r})"

    @staticmethod
    def blocks(d: int) -> int:
        """Scales per row of ``d`` features."""
        return math.ceil(d / BLOCK)

    def row_bytes(self, d: int) -> int:
        """Bytes of one encoded row of ``d`` features."""
        return d + 4 * self.blocks(d)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x [n, d]`` (any float dtype) -> ``uint8 [n, row_bytes(d)]``.

        Passes over the rows: ``|x|`` and its block maxima in ``x``'s dtype (exact), ``x / scale`` in fp32 (type
        promotion: the same values as ``x.float() / scale``), the clamp in place, and the cast written straight
        into the codes' bytes of the output."""
        n, d = x.shape
        nb = self.blocks(d)
        if nb * BLOCK != d:
            x = torch.nn.functional.pad(x, (0, nb * BLOCK - d))
        xb = x.reshape(n, nb, BLOCK)  # a copy only where x is not contiguous
        amax = xb.abs().amax(dim=2, keepdim=True).float()  # [n, nb, 1]
        scale = amax / self.max_code
        # an all-zero block, or an fp32 one whose largest value is below max_code x the smallest float (the
        # quotient underflows to 0): scale 1, so nothing divides by 0 (a NaN amax keeps its NaN scale)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = xb / scale  # fp32 [n, nb, BLOCK]
        if self.code_dtype == torch.int8:
            q = q.round_().clamp_(-self.max_code, self.max_code)
        else:
            q = q.clamp_(-self.max_code, self.max_code)  # saturate, never round past the largest code
        out = torch.empty((n, self.row_bytes(d)), dtype=torch.uint8, device=x.device)
        out[:, :d].view(self.code_dtype).copy_(q.view(n, nb * BLOCK)[:, :d])
        out[:, d:].copy_(scale.view(n, nb).view(torch.uint8).view(n, 4 * nb))
        return out

    def decode(self, packed: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
        """``uint8 [n, row_bytes(d)]`` -> ``[n, d]`` of ``dtype``: ``code * scale`` in fp32, rounded once to
        ``dtype`` (written there by the multiply)."""
        n = packed.shape[0]
        nb = self.blocks(d)
        if packed.shape[1] != self.row_bytes(d):
            raise ValueError(f"encoded rows of {packed.shape[1]} bytes cannot hold {d} features "
                             f"({self.row_bytes(d)} bytes in {self.fmt})")
        vals = packed[:, :d].view(self.code_dtype).float()  # one-byte codes: viewable at any offset
        # the scales' bytes copied out: the received rows' offsets need not suit an fp32 view
        scale = packed.new_empty((n, 4 * nb)).copy_(packed[:, d:]).view(torch.float32).view(n, nb, 1)
        if nb * BLOCK != d:
            vals = torch.nn.functional.pad(vals, (0, nb * BLOCK - d))
            return (vals.view(n, nb, BLOCK) * scale).view(n, nb * BLOCK)[:, :d].to(dtype).contiguous()
        out = torch.empty((n, d), dtype=dtype, device=packed.device)
        torch.mul(vals.view(n, nb, BLOCK), scale, out=out.view(n, nb, BLOCK))
        return out


def row_codec(fmt: str) -> RowCodec | None:
    """The codec of a dispatch format; None for ``"native"``."""
    if fmt not in DISPATCH_FORMATS:
        raise ConfigError(f"dispatch_format={fmt!r} is not one of {', '.join(map(repr, DISPATCH_FORMATS))}")
    return None if fmt == "native" else RowCodec(fmt)
