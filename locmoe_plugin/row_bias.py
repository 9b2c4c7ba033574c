"""``logits [s, n] + scale * bias[row]``: one row of an ``[R, n]`` parameter added to every token's logits, as
one autograd node.

Composed of torch ops (``select`` then ``add`` with ``alpha``), the backward scales the whole ``[s, n]``
gradient, sums it over tokens and writes the row into a zero ``[R, n]`` gradient: four kernels and an
``[s, n]`` temporary. Here the gradient is the same sum, ``scale * sum_t dL/dlogits[t]`` into row ``row``
of zeros, in three (``zeros``, ``sum``, ``add_`` with ``alpha``); the logits' gradient passes through
untouched. (The token sum is taken before the scaling, not after: equal up to rounding.)
"""

from __future__ import annotations

import torch


class RowBias(torch.autograd.Function):
    """``(logits [s, n] fp32, bias [R, n] any float dtype, row: int, scale: float) -> [s, n] fp32``."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, bias: torch.Tensor, row: int, scale: float) -> torch.Tensor:
        ctx.row, ctx.scale = row, scale
        ctx.bias_shape, ctx.bias_dtype = bias.shape, bias.dtype
        b = bias[row]
        return torch.add(logits, b if b.dtype == logits.dtype else b.to(logits.dtype), alpha=scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g_bias = None
        if ctx.needs_input_grad[1]:
            g_bias = grad.new_zeros(ctx.bias_shape, dtype=ctx.bias_dtype)
            g_bias[ctx.row].add_(grad.sum(0), alpha=ctx.scale)
        return grad, g_bias, None, None


def add_row_bias(logits: torch.Tensor, bias: torch.Tensor, row: int, scale: float) -> torch.Tensor:
    """:class:`RowBias` applied: ``logits + scale * bias[row]`` (fp32, the logits' dtype)."""
    return RowBias.apply(logits, bias, row, scale)
