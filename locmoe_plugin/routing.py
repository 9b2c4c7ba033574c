"""Routing: gate logits -> which experts each token goes to, and with what weight.

Everything here is index-based (sort / gather / scatter on ``[s, k]`` tensors), never a dense one-hot
einsum, and issues no device-to-host sync: the capacity C may be a Python int or a 0-d tensor.

Two output forms describe the same assignment:
  * index form (:class:`Assignment`): ``expert_ids [s, k]`` int64 with ``-1`` for a dropped pair,
    ``weights [s, k]`` fp32 with 0 where the id is -1;
  * Megatron form (:meth:`Assignment.to_megatron`): ``probs [s, n]`` fp32 (combine weight, 0 where
    not routed) and ``routing_map [s, n]`` bool.

Drop rule: a pair an expert does not keep loses its weight; the token's other weights are *not*
renormalised (as Switch / Megatron / DeepSpeed do), so the layer output is the kept experts' part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Assignment:
    """One batch's routing (index form).

    Attributes:
        expert_ids: ``[s, k]`` int64, the expert of each kept pair, ``-1`` where dropped by capacity.
        weights: ``[s, k]`` fp32 combine weights, 0 where ``expert_ids == -1``. Carries autograd.
        requested_ids: ``[s, k]`` int64, the experts the tokens chose before capacity (never -1).
        num_experts: n.
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor
    requested_ids: torch.Tensor
    num_experts: int

    @property
    def kept(self) -> torch.Tensor:
        """``[s, k]`` bool: pairs that survived capacity."""
        return self.expert_ids >= 0

    def tokens_per_expert(self) -> torch.Tensor:
        """``[n]`` int64 kept pairs per expert."""
        return _bincount_valid(self.expert_ids, self.num_experts)

    def requested_per_expert(self) -> torch.Tensor:
        """``[n]`` int64 pairs per expert before capacity (the load the router asked for)."""
        return _bincount_valid(self.requested_ids, self.num_experts)

    def to_megatron(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs [s, n] fp32, routing_map [s, n] bool)``; a dropped pair is absent from both."""
        return index_to_dense(self.expert_ids, self.weights, self.num_experts)


def _bincount_valid(ids: torch.Tensor, n: int) -> torch.Tensor:
    flat = ids.reshape(-1)
    # -1 goes to an extra bin n that is cut off: no boolean indexing, so no host sync.
    return torch.bincount(torch.where(flat >= 0, flat, n), minlength=n + 1)[:n]


def index_to_dense(
    expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index form -> ``(probs [s, n], routing_map [s, n] bool)``. Ids of -1 are left out."""
    s = expert_ids.shape[0]
    col = torch.where(expert_ids >= 0, expert_ids, num_experts)
    probs = weights.new_zeros(s, num_experts + 1).scatter(1, col, weights)[:, :num_experts]
    routing_map = torch.zeros(s, num_experts + 1, dtype=torch.bool, device=expert_ids.device)
    routing_map.scatter_(1, col, True)
    return probs, routing_map[:, :num_experts]


def dense_to_index(
    probs: torch.Tensor, routing_map: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron form -> index form ``(expert_ids [s, k], weights [s, k])``; tokens routed to fewer
    than k experts are padded with id -1 and weight 0. Ids come in ascending expert order."""
    n = routing_map.shape[1]
    ar = torch.arange(n, device=routing_map.device)
    # routed experts sort first (key = expert id), unrouted last (key = n + id)
    key = torch.where(routing_map, ar, ar + n)
    order = torch.topk(key, k, dim=1, largest=False).indices
    hit = torch.gather(routing_map, 1, order)
    ids = torch.where(hit, order, -1)
    weights = torch.where(hit, torch.gather(probs, 1, order), 0.0)
    return ids, weights


def node_limited_mask(
    scores: torch.Tensor, expert_to_node: torch.Tensor, num_nodes: int, max_nodes: int, topk: int
) -> torch.Tensor:
    """Experts a token may use under node-limited routing: ``[s, n]`` bool.

    Each node's score is the sum of its ``ceil(topk / max_nodes)`` best expert scores (DeepSeek-V3 /
    Megatron group-limited routing, with groups = nodes); the ``max_nodes`` best nodes stay open.
    ``scores`` must be non-negative-comparable (probabilities or logits both work).
    """
    s, n = scores.shape
    per_node = n // num_nodes
    # gather experts node-major (nodes need not host contiguous experts)
    perm = torch.argsort(expert_to_node, stable=True)
    by_node = scores[:, perm].reshape(s, num_nodes, per_node)
    take = min(per_node, -(-topk // max_nodes))
    node_score = by_node.topk(take, dim=-1).values.sum(-1)  # [s, N]
    best = node_score.topk(max_nodes, dim=-1).indices  # [s, M]
    open_node = torch.zeros(s, num_nodes, dtype=torch.bool, device=scores.device).scatter_(1, best, True)
    return torch.gather(open_node, 1, expert_to_node.expand(s, n))


def capacity_keep(
    expert_ids: torch.Tensor,
    scores: torch.Tensor,
    capacity,
    num_experts: int,
    policy: str = "score",
) -> torch.Tensor:
    """Which pairs each expert keeps when it may take at most ``capacity`` of them: ``[s, k]`` bool.

    ``policy="score"`` keeps an expert's highest-scoring pairs (ties: lower token index first);
    ``"position"`` keeps the first pairs in token order. Pairs with id -1 are never kept. Two stable
    argsorts give each pair its rank inside its expert's queue; no host sync.
    """
    flat = expert_ids.reshape(-1)
    m = flat.numel()
    key = torch.where(flat >= 0, flat, num_experts)  # invalid pairs queue at a phantom expert n
    if policy == "score":
        by_score = torch.argsort(scores.reshape(-1).detach(), descending=True, stable=True)
        order = by_score[torch.argsort(key[by_score], stable=True)]
    elif policy == "position":
        order = torch.argsort(key, stable=True)
    else:
        raise ValueError(f"drop policy {policy!r} is not 'score' or 'position'")
    counts = torch.bincount(key, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(m, device=flat.device) - starts[key[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    return ((rank < capacity) & (flat >= 0)).reshape(expert_ids.shape)


def route(
    logits: torch.Tensor,
    *,
    topk: int,
    mode: str = "locmoe",
    renormalize: bool = True,
    affinity: torch.Tensor | None = None,
    capacity=None,
    drop_policy: str = "score",
    allowed: torch.Tensor | None = None,
    node_limit: tuple[torch.Tensor, int, int] | None = None,
) -> tuple[Assignment, torch.Tensor]:
    """Route one batch.

    Args:
        logits: ``[s, n]`` fp32 gate logits.
        topk: k (the paper's l for ``hybrid``).
        mode: ``"topk"`` / ``"locmoe"`` (top-k by probability) or ``"hybrid"`` (LocMoE+: token choice
            by affinity, then expert choice of at most ``capacity`` tokens by affinity).
        affinity: ``[s, n]`` fp32 token-expert cosine; required for ``hybrid``.
        capacity: max pairs per expert (int or 0-d tensor) or None for dropless.
        allowed: ``[s, n]`` bool experts a token may choose, or None.
        node_limit: ``(expert_to_node [n], num_nodes, max_nodes)``: node-limited routing, the open nodes
            chosen by the same scores the experts are selected by (see :func:`node_limited_mask`).

    Returns:
        ``(assignment, probs)`` with ``probs [s, n]`` the full softmax (for the losses).
    """
    probs = torch.softmax(logits, dim=-1)
    if mode == "hybrid":
        if affinity is None:
            raise ValueError("hybrid routing needs the token-expert affinity")
        rank_by = affinity
    else:
        rank_by = probs
    if node_limit is not None:
        expert_to_node, num_nodes, max_nodes = node_limit
        limited = node_limited_mask(rank_by, expert_to_node, num_nodes, max_nodes, topk)
        allowed = limited if allowed is None else allowed & limited
    select_by = rank_by if allowed is None else rank_by.masked_fill(~allowed, NEG_INF)
    ids = torch.topk(select_by, topk, dim=-1).indices  # [s, k]
    weights = torch.gather(probs, 1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    if capacity is None:
        kept_ids = ids
    else:
        scores = torch.gather(rank_by, 1, ids)
        keep = capacity_keep(ids, scores, capacity, logits.shape[-1], drop_policy)
        kept_ids = torch.where(keep, ids, -1)
        weights = torch.where(keep, weights, 0.0)
    return Assignment(kept_ids, weights, ids, logits.shape[-1]), probs
