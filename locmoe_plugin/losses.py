"""Router losses. Each returns a scalar fp32 tensor already multiplied by its coefficient.

Locality loss (our reading of LocMoE's ``mu * KL(D_c || D_l)``; the paper gives neither mu nor D_l):
  Taken literally, ``KL(D_c || D_l)`` is infinite wherever the "fully localised" D_l is zero. We use the
  finite direction ``KL(D_l || D_c)`` and take D_l to be the fully localised distribution *nearest* to
  D_c: D_c restricted to the experts of the token's own node and renormalised,
  ``D_l(i) = D_c(i) / m  (i local),  0 otherwise``, with ``m = sum_{i local} D_c(i)``. Then

      KL(D_l || D_c) = sum_{i local} D_c(i)/m * log(1/m) = -log m,

  the negative log of the routing probability that stays on the token's node, averaged over tokens
  and computed stably from logits as ``logsumexp(all) - logsumexp(local)``. Properties (tested):
  finite (a node always hosts at least one expert), differentiable, 0 exactly when all of a token's
  probability sits on its own node (however it is spread there, which leaves intra-node balance to
  the aux loss), and identically 0 with zero gradient when every expert is local (single node).
  D_c is the router's full softmax over experts, per token. Default mu: see
  :data:`locmoe_plugin.config.DEFAULT_LOCALITY_LOSS_COEFF`.
"""

from __future__ import annotations

import torch


def _token_mean(per_token: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens, or over the ``valid`` ones (0 when none is)."""
    if valid is None:
        return per_token.mean(0)
    w = valid.to(per_token.dtype).reshape((-1,) + (1,) * (per_token.dim() - 1))
    return (per_token * w).sum(0) / w.sum().clamp_min(1)


def switch_aux_loss(
    probs: torch.Tensor, requested_per_expert: torch.Tensor, total_pairs, coeff: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch load-balance loss ``alpha * n * sum_i f_i * P_i``.

    Args:
        probs: ``[s, n]`` full softmax of this rank's tokens (carries the gradient).
        requested_per_expert: ``[n]`` routed pairs per expert before capacity (any dtype; fp32 saves a
            conversion); may be summed over the expert-parallel group so the balance is global.
        total_pairs: number of routed pairs those counts cover (``s * k``, summed likewise; int or 0-d
            tensor), or None: the counts' own sum (the same number when they count every routed pair).
        coeff: alpha.
        valid: ``[s]`` bool, the tokens that count (padding excluded); None = all.

    ``f_i = requested_i / total_pairs`` (share of pairs), ``P_i = mean_t probs[t, i]``. Equals ``alpha``
    at perfect balance with uniform probabilities. Computed as one dot product of the per-expert sums,
    ``(alpha n / tokens) * sum_i f_i * sum_t probs[t, i]`` (a few kernels; no ``[s, n]`` temporary).
    """
    n = probs.shape[-1]
    if coeff == 0 or probs.shape[0] == 0:
        return probs.sum() * 0.0
    counts = requested_per_expert if requested_per_expert.dtype == probs.dtype else requested_per_expert.to(probs.dtype)
    if total_pairs is None and valid is None:
        f = counts / counts.sum()  # >= this rank's s * k > 0 pairs
    else:  # no pair at all (every token padding): f = 0, not NaN
        f = counts / (counts.sum() if total_pairs is None else torch.as_tensor(total_pairs)).clamp_min(1)
    if valid is None:
        return torch.einsum("i,ti->", f, probs) * (coeff * n / probs.shape[0])  # one op: sum_t then dot
    w = valid.to(probs.dtype)
    return torch.dot(f, w @ probs) * (coeff * n) / w.sum().clamp_min(1)


def locality_loss(logits: torch.Tensor, local_mask: torch.Tensor, coeff: float,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """``mu * mean_t -log(sum_{i on the token's node} softmax(logits_t)_i)``.

    Args:
        logits: ``[s, n]`` fp32 gate logits of tokens that all live on one node (one rank's batch).
        local_mask: ``[n]`` bool, experts hosted by that node.
    """
    if coeff == 0 or logits.shape[0] == 0:
        return logits.sum() * 0.0
    local = logits.masked_fill(~local_mask, float("-inf"))
    both = torch.logsumexp(torch.stack([logits, local]), -1)  # one call for all and local: fewer kernels
    per_token = both[0] - both[1]
    return coeff * _token_mean(per_token, valid)


def z_loss(logits: torch.Tensor, coeff: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE): ``coeff * mean_t logsumexp(logits_t)^2``; keeps logits small."""
    if coeff == 0 or logits.shape[0] == 0:
        return logits.sum() * 0.0
    return coeff * _token_mean(torch.logsumexp(logits, -1).square(), valid)
