"""LocMoE+ expert-token resonance: the capacity schedule and the expert-choice threshold.

Source: arXiv 2406.00023, latest version ("Expert-Token Resonance MoE"), section "Training Strategy":
Eq. (5)-(6) (hybrid TCR + ECR), Eq. (10) (the false-positive probability ``q_i``), Theorem 5,
Corollary 6 and Remark 7. docs/locmoe_plus.md derives every choice below.

Resonance measure (Eq. 10)
--------------------------
``q_i = P(delta_{r,i} >= delta_{o,i})``: the chance that a token ``r`` that does not belong to expert
``i`` scores at least as high on ``i`` as a token ``o`` that does. We measure it on each batch with the
token's own best expert as its owner (``o`` ranges over the tokens whose highest unbiased affinity is
``i``, ``r`` over the others) and pool the experts by pairs: ``q_hat = sum_i U_i / sum_i m_i (s - m_i)``
with ``U_i`` the misordered (own, other) pairs of expert ``i`` (Mann-Whitney) and ``m_i`` its own tokens.

Chance level. When a token's n affinities are exchangeable and continuous (isotropic tokens, the paper's
"early training"), ``q = 1 / (2 (n + 1))`` exactly, whatever their distribution: with
``u = F(affinity)``, an owner's affinity is the max of n uniforms (density ``n u^(n-1)``) and
``P(other > u, other not its row's max) = (1 - u) - (1 - u^n) / n``, divided by ``1 - 1/n``; the integral
is ``(1/(n+1) - 1/(2n)) * n / (n - 1) = 1 / (2 (n + 1))``. It falls to 0 as each expert's tokens stand out
on that expert (the paper's "later training").

Capacity schedule (Corollary 6)
-------------------------------
Theorem 5 / Corollary 6: ECR succeeds with ``C >= 2 s q_i`` (then ``P >= 1 - e^{-3C/16}``), and TCR needs
``C = Theta(s)`` while ``q_i = Theta(1)``; both regimes read ``C`` proportional to ``s q``. The paper gives
no constant for the switch, so we fix it at chance level::

    c_f = isotropic_factor * q_hat / q_iso = isotropic_factor * 2 (n + 1) * q_hat

``isotropic_factor`` (config ``capacity_factor_isotropic``) is the factor at chance-level routing; the
caller clamps the result to ``[capacity_factor_min, capacity_factor_max]``. The factor starts large on
an untrained router and falls as measured affinities concentrate. (The earlier ``1 / (n * p_hat)`` with
``p_hat`` the share of affinities >= delta is >= 1/n and tends to 1.0 as tokens cluster: it never fell
below the floor by itself.)

Expert choice threshold (Eq. 6)
-------------------------------
"The expert chooses its Top-l tokens where l is determined by a threshold of the sum of affinity
scores". Our reading: expert ``i`` ranks the tokens that chose it by unbiased affinity and keeps the
shortest prefix whose summed affinity (negative affinities count 0) reaches ``mass`` times the sum over
all its candidates (config ``resonance_mass``; None = off). ``mass = 1`` keeps every candidate with a
positive affinity; below 1 the tail of weakly resonating tokens is dropped. This is a per-expert,
per-batch limit on top of the schedule's capacity; the paper's "Bottom-C" in Eq. 6 contradicts its own
text ("top-scored tokens"), and we keep the highest affinities.
"""

from __future__ import annotations

import torch

__all__ = ["chance_misranking", "misranking_counts", "resonance_factor", "summed_affinity_keep"]


def chance_misranking(num_experts: int) -> float:
    """``q`` of exchangeable continuous affinities (an untrained router): ``1 / (2 (n + 1))``."""
    return 1.0 / (2.0 * (num_experts + 1))


def misranking_counts(affinity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mann-Whitney counts of Eq. (10) for each expert: ``affinity [s, n] -> (U [n], pairs [n])`` int64.

    ``U_i``: (own, other) token pairs in which the other token's affinity to ``i`` is at least the own
    token's (a token owns its highest-affinity expert). ``pairs_i = m_i * o_i`` with ``m_i`` the owners
    and ``o_i`` the others. Tokens whose affinity row is not finite or all zero (zero-norm tokens) are
    left out. Equal affinities are ordered by token index (a measure-zero event for real features).
    Sums over ranks stay exact (integers); no host sync.
    """
    s, n = affinity.shape
    a = affinity.detach().float()
    usable = torch.isfinite(a).all(-1) & (a != 0).any(-1)  # [s]
    a = torch.where(usable.unsqueeze(-1), a, float("-inf"))
    own = torch.zeros(s, n, dtype=torch.bool, device=a.device)
    if s:
        own.scatter_(1, a.argmax(-1, keepdim=True), True)
    own &= usable.unsqueeze(-1)
    other = usable.unsqueeze(-1) & ~own
    order = torch.argsort(a, dim=0, descending=True, stable=True)  # per expert, highest first
    own_sorted = own.gather(0, order).long()
    other_sorted = other.gather(0, order).long()
    others_before = torch.cumsum(other_sorted, 0) - other_sorted  # others ranked above each position
    u = (own_sorted * others_before).sum(0)
    pairs = own.sum(0) * other.sum(0)
    return u, pairs


def resonance_factor(q_hat: float, num_experts: int, isotropic_factor: float) -> float:
    """Corollary 6's capacity factor before clamping: ``isotropic_factor * q_hat / q_iso(n)``."""
    return isotropic_factor * q_hat / chance_misranking(num_experts)


def summed_affinity_keep(expert_ids: torch.Tensor, scores: torch.Tensor, num_experts: int,
                         mass: float, order: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (6)'s threshold: which pairs each expert keeps, ``[s, k]`` bool.

    Args:
        expert_ids: ``[s, k]`` int64 chosen experts (``-1``: no pair, never kept).
        scores: ``[s, k]`` unbiased affinity of each pair (cosine).
        mass: in (0, 1]; an expert keeps its highest-affinity pairs while the affinity summed over the
            pairs ranked above stays below ``mass`` times its candidates' total (clamped at 0 below).
            So its best positive pair is always kept, and ``mass = 1`` keeps exactly its positive pairs.
        order: ``[s * k]`` the pairs expert-major, highest ``scores`` first (ties: lower index), as
            :func:`locmoe_plugin.routing.score_order` gives it for capacity: reused instead of sorting again.
            The same keep results: it differs from this function's own order (by scores clamped at 0) only
            in where pairs of affinity <= 0 sit, after every positive pair of their expert either way, and
            those add 0 to the running sums and are never kept.
    """
    flat = expert_ids.reshape(-1)
    w = scores.reshape(-1).detach().float().clamp_min(0)
    valid = flat >= 0
    if mass >= 1.0:
        return (valid & (w > 0)).reshape(expert_ids.shape)
    key = torch.where(valid, flat, num_experts)
    if order is None:
        order = torch.argsort(w, descending=True, stable=True)
        order = order[torch.argsort(key[order], stable=True)]  # expert-major, highest affinity first
    key_sorted, w_sorted = key[order], w[order]
    total = torch.zeros(num_experts + 1, device=w.device).scatter_add_(0, key_sorted, w_sorted)
    running = torch.cumsum(w_sorted, 0)
    start = torch.cumsum(total, 0) - total  # running mass where each expert's segment starts
    before = running - w_sorted - start[key_sorted]
    keep_sorted = (before < mass * total[key_sorted]) & (w_sorted > 0)
    keep = torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted)
    return (keep & valid).reshape(expert_ids.shape)
