"""Softmax -> top-k -> renormalise as one autograd node, with the exact gradient written out.

Composed of torch ops, the chain leaves four backward nodes (division, its row sum, top-k's scatter,
softmax) and about a dozen kernels; here the backward is the closed form in six (``bmm`` for the row
dot products, ``sub``, ``div``, a scatter-add onto the probabilities' own gradient - the aux loss's - and
the softmax backward). With ``p = softmax(l)``, ``v = p[ids]`` (the k largest), ``S = sum(v)``, ``w = v / S``:

    dL/dv = (dL/dw - sum_j dL/dw_j w_j) / S
    dL/dp = dL/dp (from other uses, e.g. the aux loss) + scatter(ids, dL/dv)
    dL/dl = p * (dL/dp - sum_i dL/dp_i p_i)

The same derivatives autograd takes, in another order of floating-point operations (agreement to
rounding, tested against the composed ops).
"""

from __future__ import annotations

import torch


class SoftmaxTopK(torch.autograd.Function):
    """``logits [s, n]`` fp32, ``k`` -> ``(probs [s, n], weights [s, k], top [s, k], ids [s, k] int64)``:
    ``probs = softmax(logits)``, ``(top, ids) = topk(probs, k)``, ``weights = top / top.sum(-1)`` (rows sum
    to 1; ``top`` holds the token's largest probability, >= 1/n, so the sum is never 0). ``top`` and
    ``ids`` carry no gradient (``top`` is for ranking, e.g. capacity); ``probs`` and ``weights`` do."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, k: int):
        probs = torch.softmax(logits, dim=-1)
        top, ids = torch.topk(probs, k, dim=-1)
        total = top.sum(-1, keepdim=True)
        weights = top / total
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(top, ids)
        ctx.save_for_backward(probs, ids, weights, total)
        return probs, weights, top, ids

    @staticmethod
    def backward(ctx, g_probs, g_weights, _g_top, _g_ids):
        probs, ids, weights, total = ctx.saved_tensors
        if g_weights is None and g_probs is None:
            return None, None
        if g_weights is None:
            g = g_probs
        else:
            dot = torch.bmm(g_weights.unsqueeze(1), weights.unsqueeze(2)).view(-1, 1)  # [s, 1]: sum_j g_j w_j
            g_top = (g_weights - dot) / total
            if g_probs is None:
                g = torch.zeros_like(probs).scatter_(1, ids, g_top)
            else:
                g = torch.scatter_add(g_probs, 1, ids, g_top)
        return torch._softmax_backward_data(g, probs, -1, probs.dtype), None


def softmax_topk(logits: torch.Tensor, k: int):
    """:class:`SoftmaxTopK` applied: ``(probs, weights, top, ids)``."""
    return SoftmaxTopK.apply(logits, k)
