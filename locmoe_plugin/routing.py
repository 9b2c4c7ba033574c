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

Hash routing (:func:`hash_experts`, ``route(None, mode="hash", ...)``) needs no gate: the experts come
from a fixed hash of the token id, computed with exact integer arithmetic (no overflow), so every
process, run and device agrees on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .device import is_stream_capturing
from .node_price import node_priced_topk
from .resonance import summed_affinity_keep
from .softmax_topk import softmax_topk

NEG_INF = float("-inf")
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # odd 2**32 / phi: spaces the per-slot hash inputs


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
        return count_valid_ids(self.expert_ids, self.num_experts)

    def requested_per_expert(self) -> torch.Tensor:
        """``[n]`` int64 pairs per expert before capacity (the load the router asked for)."""
        return count_ids(self.requested_ids, self.num_experts)  # requested ids are never -1

    def to_megatron(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs [s, n] fp32, routing_map [s, n] bool)``; a dropped pair is absent from both."""
        return index_to_dense(self.expert_ids, self.weights, self.num_experts)


_DEVICE_ONES: dict[torch.device, torch.Tensor] = {}


def _device_one(device: torch.device) -> torch.Tensor:
    """A 0-d int64 1 on ``device``, made once and never written: the source of every count's scatter-add,
    expanded (a view) instead of a ``ones`` tensor filled per call. One made while a graph is being
    captured is not kept (it is filled only when the graph replays)."""
    one = _DEVICE_ONES.get(device)
    if one is None:
        one = torch.ones((), dtype=torch.long, device=device)
        if not is_stream_capturing(device):
            _DEVICE_ONES[device] = one
    return one


def count_ids(key: torch.Tensor, bins: int) -> torch.Tensor:
    """``[bins]`` int64 occurrences of each value of ``key`` (values in ``[0, bins)``). A scatter-add, not
    ``torch.bincount``, whose CUDA version reads the maximum back to the host (a sync per call). Kernels:
    the zeros and the scatter-add (its source is a cached 1, expanded)."""
    # put_ treats the target as flat and takes ``key`` in any shape: no reshape op
    return torch.zeros(bins, dtype=torch.long, device=key.device).put_(
        key, _device_one(key.device).expand(key.shape), accumulate=True)


def count_valid_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """``[n]`` occurrences of each expert id in ``ids``; ids of -1 are not counted."""
    flat = ids.reshape(-1)
    # -1 goes to an extra bin n that is cut off: no boolean indexing, so no host sync.
    return count_ids(torch.where(flat >= 0, flat, n), n + 1)[:n]


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


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32): c is split into 16-bit halves so no product
    exceeds 2**49 (int64 overflow is never relied on)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons' hash prospector): a bijective 32-bit multiply-xorshift mix on int64
    tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_experts(token_ids: torch.Tensor, num_experts: int, topk: int, seed: int = 0) -> torch.Tensor:
    """The ``topk`` distinct experts of each token under hash routing: ``token_ids [...]`` ->
    ``[..., topk]`` int64.

    Slot j hashes ``h_j = mix32(((id mod 2**32) xor seed) + j * 0x9E3779B9 mod 2**32)``, draws
    ``r_j = floor(h_j * (n - j) / 2**32)`` (the well-mixed high bits) and takes the r_j-th smallest
    expert not taken by slots 0..j-1 (a partial Fisher-Yates draw), so the k experts are distinct
    and each token's set is uniform over the k-subsets up to the mix's quality (bias <= n / 2**32).
    Deterministic across processes, runs and devices (exact int64 arithmetic, no Python ``hash()``).
    Balanced over token *ids*: frequent tokens still load their experts more (Roller et al. 2021).
    """
    if not 1 <= topk <= num_experts:
        raise ValueError(f"topk={topk} must be in [1, num_experts={num_experts}]")
    base = (token_ids.long() & _M32) ^ seed
    taken: list[torch.Tensor] = []
    ascending: list[torch.Tensor] = []  # the same experts, sorted per token
    for j in range(topk):
        e = (mix32((base + j * _GOLDEN) & _M32) * (num_experts - j)) >> 32
        for prev in ascending:
            e = e + (e >= prev)  # skip the taken experts, smallest first: e becomes the r_j-th free one
        taken.append(e)
        for i, prev in enumerate(ascending):  # insertion step, keeps `ascending` sorted
            ascending[i], e = torch.minimum(prev, e), torch.maximum(prev, e)
        ascending.append(e)
    return torch.stack(taken, -1)


def pair_keys(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[s * k]`` int64 queue of each flattened pair: its expert, or a phantom expert ``n`` for id -1."""
    flat = expert_ids.reshape(-1)
    return torch.where(flat >= 0, flat, num_experts)


def score_order(key: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``[s * k]`` int64 flattened pair indices expert-major (by ``key``, from :func:`pair_keys`), highest
    score first inside an expert, ties by lower index: two stable argsorts. The one order both
    :func:`capacity_keep` (policy "score") and :func:`~locmoe_plugin.resonance.summed_affinity_keep` read."""
    order = torch.argsort(scores.reshape(-1).detach(), descending=True, stable=True)
    return order[torch.argsort(key[order], stable=True)]


def capacity_keep(
    expert_ids: torch.Tensor,
    scores: torch.Tensor,
    capacity,
    num_experts: int,
    policy: str = "score",
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which pairs each expert keeps when it may take at most ``capacity`` of them: ``[s, k]`` bool.

    ``capacity``: one limit for every expert (int or 0-d tensor), or ``[n]`` per-expert limits.
    ``policy="score"`` keeps an expert's highest-scoring pairs (ties: lower token index first);
    ``"choice"`` keeps the pairs of tokens' first choices (slot 0) before any second choice, and so on,
    by score inside one choice rank (GShard's priority of first choices: a token loses its later experts
    before another token loses its first); ``"position"`` keeps the first pairs in token order. Pairs with
    id -1 are never kept. Stable argsorts give each pair its rank inside its expert's queue; no host sync.
    ``order``: policy "score" only, :func:`score_order` of these pairs when the caller has it already.
    """
    flat = expert_ids.reshape(-1)
    m = flat.numel()
    key = pair_keys(expert_ids, num_experts)  # invalid pairs queue at a phantom expert n
    if policy == "score":
        order = score_order(key, scores) if order is None else order
    elif policy == "choice":
        order = torch.argsort(scores.reshape(-1).detach(), descending=True, stable=True)
        slot = torch.arange(m, device=flat.device) % expert_ids.shape[-1]
        order = order[torch.argsort(slot[order], stable=True)]
        order = order[torch.argsort(key[order], stable=True)]
    elif policy == "position":
        order = torch.argsort(key, stable=True)
    else:
        raise ValueError(f"drop policy {policy!r} is not 'score', 'choice' or 'position'")
    counts = count_ids(key, num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(m, device=flat.device) - starts[key[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    if torch.is_tensor(capacity) and capacity.dim() == 1:
        capacity = torch.cat([capacity, capacity.new_zeros(1)])[key]  # each pair's expert's limit
    return ((rank < capacity) & (flat >= 0)).reshape(expert_ids.shape)


def node_demand_capacity(expert_ids: torch.Tensor, capacity: int, expert_to_node: torch.Tensor,
                         num_nodes: int) -> torch.Tensor:
    """Per-expert capacity ``[n]`` that follows where this rank's tokens want to go, node by node.

    ``capacity`` is the limit for a balanced batch (``c_f * s * k / n``: every node asked for 1/N of the
    pairs). Node b's experts get ``ceil(capacity * N * D_b / P)``, with ``D_b`` the pairs requested on
    node b and ``P`` all requested pairs: the same limit when demand is spread evenly over the nodes, N
    times it when all of a rank's tokens stay on its node. With the locality loss, a rank's tokens
    concentrate on its own node's experts (that is the point); a per-rank limit sized for a balanced
    spread would then drop most of them although the global load is balanced.
    """
    key = torch.where(expert_ids >= 0, expert_to_node[expert_ids.clamp_min(0)], num_nodes).reshape(-1)
    demand = count_ids(key, num_nodes + 1)[:num_nodes].float()  # fp32: NPUs lack fp64; counts < 2**24
    share = demand * num_nodes / demand.sum().clamp_min(1)
    per_node = torch.ceil(capacity * share).long()
    return per_node[expert_to_node]


def _rows_sum_to_one(w: torch.Tensor) -> torch.Tensor:
    """Each row divided by its sum; an all-zero row stays 0 (no NaN)."""
    return w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def route(
    logits: torch.Tensor | None,
    *,
    topk: int,
    mode: str = "locmoe",
    renormalize: bool = True,
    renormalize_kept: bool = False,
    affinity: torch.Tensor | None = None,
    capacity=None,
    drop_policy: str = "score",
    allowed: torch.Tensor | None = None,
    node_limit: tuple[torch.Tensor, int, int] | None = None,
    token_ids: torch.Tensor | None = None,
    num_experts: int | None = None,
    seed: int = 0,
    capacity_nodes: tuple[torch.Tensor, int] | None = None,
    expert_bias: torch.Tensor | None = None,
    expert_choice_affinity: torch.Tensor | None = None,
    resonance_mass: float | None = None,
    node_price: tuple | None = None,
) -> tuple[Assignment, torch.Tensor]:
    """Route one batch.

    Args:
        logits: ``[s, n]`` fp32 gate logits; unused (may be None) for ``hash``.
        topk: k (the paper's l for ``hybrid``).
        mode: ``"topk"`` / ``"locmoe"`` (top-k by probability), ``"hybrid"`` (LocMoE+: token choice
            by affinity, then expert choice of at most ``capacity`` tokens by affinity) or ``"hash"``
            (the experts of :func:`hash_experts`, weight ``1/k`` each - 1.0 for k = 1 - so the output
            is the mean of the token's experts; every pair scores alike, so over-full experts keep
            their first pairs in token order whatever ``drop_policy`` says).
        renormalize: combine weights of a token sum to 1 over its selected experts.
        renormalize_kept: after capacity drops, rescale a token's weights to sum to 1 over the experts
            it kept (DeepSpeed's top-2 gate does; Megatron keeps the weights from before the drops).
            A token that kept nothing keeps weight 0. Not used by ``hash``.
        affinity: ``[s, n]`` fp32 token-expert cosine; required for ``hybrid``.
        capacity: max pairs per expert (int or 0-d tensor) or None for dropless.
        allowed: ``[s, n]`` bool experts a token may choose, or None.
        node_limit: ``(expert_to_node [n], num_nodes, max_nodes)``: node-limited routing, the open nodes
            chosen by the same scores the experts are selected by (see :func:`node_limited_mask`).
        token_ids: ``[s]`` token ids, required for ``hash``.
        num_experts: n, required for ``hash``.
        seed: the hash seed for ``hash``.
        capacity_nodes: ``(expert_to_node [n], num_nodes)``: scale an int ``capacity`` per expert by the
            demand on the expert's node (:func:`node_demand_capacity`).
        expert_bias: ``[n]`` offsets added to the ranking scores (probabilities; affinities for
            ``hybrid``) for *selection* only - top-k and the node limit; the combine weights stay the
            unbiased probabilities, and an expert's over-capacity queue is unchanged (one offset per
            expert). Loss-free balancing; not used by ``hash``.
        expert_choice_affinity: ``[s, n]`` fp32, ``hybrid`` only: the scores the expert choice ranks by
            when they differ from ``affinity`` (the token choice's, e.g. with a locality offset); default
            ``affinity``. Should be a cosine, so that token norms do not reorder an expert's queue.
        resonance_mass: ``hybrid`` only: LocMoE+'s expert-choice threshold on summed affinity
            (:func:`locmoe_plugin.resonance.summed_affinity_keep`), applied with ``capacity``; None or 0: off
            (as ``LocMoEConfig.resonance_mass``).
        node_price: ``(experts_by_row [N, E], expert_row [n], remote_row [N], lam)``: the cross-node
            budget's "node" mechanism (:mod:`locmoe_plugin.node_price`, the tables of
            :class:`~locmoe_plugin.node_price.NodeRows`): the selection scores (with ``expert_bias``) pay
            ``lam`` once for the one remote node a token may use. Not with ``allowed`` / ``node_limit``.

    Returns:
        ``(assignment, probs)`` with ``probs [s, n]`` the full softmax (for the losses); for ``hash``
        the routing distribution before capacity (``1/k`` on each requested expert).
    """
    if mode == "hash":
        if token_ids is None or num_experts is None:
            raise ValueError("hash routing needs token_ids and num_experts")
        if allowed is not None or node_limit is not None:
            raise ValueError("hash routing fixes each token's experts: allowed / node_limit do not apply")
        ids = hash_experts(token_ids.reshape(-1), num_experts, topk, seed)
        weights = torch.full(ids.shape, 1.0 / topk, dtype=torch.float32, device=ids.device)
        probs, _ = index_to_dense(ids, weights, num_experts)
        kept_ids = ids
        if capacity is not None:
            keep = capacity_keep(ids, weights, capacity, num_experts, "position")
            kept_ids = torch.where(keep, ids, -1)
            weights = torch.where(keep, weights, 0.0)
        return Assignment(kept_ids, weights, ids, num_experts), probs
    if (mode != "hybrid" and renormalize and expert_bias is None and node_limit is None and allowed is None
            and node_price is None):
        # the plain top-k by probability: one autograd node with a closed-form backward (fewer kernels)
        probs, weights, top, ids = softmax_topk(logits, topk)
        rank_by = probs
    else:
        probs, weights, top, ids, rank_by, expert_choice_affinity = _select(
            logits, topk, mode, renormalize, affinity, allowed, node_limit, expert_bias, expert_choice_affinity,
            node_price)
    if capacity is None:
        kept_ids = ids
    else:
        if mode == "hybrid":
            scores = torch.gather(expert_choice_affinity, 1, ids)
        else:
            scores = top if rank_by is probs else torch.gather(rank_by, 1, ids)
        if capacity_nodes is not None:
            capacity = node_demand_capacity(ids, capacity, *capacity_nodes)
        n = logits.shape[-1]
        order = None
        if mode == "hybrid" and resonance_mass and resonance_mass < 1.0 and drop_policy == "score":
            # both limits rank an expert's pairs by the same scores: one sort for the two
            order = score_order(pair_keys(ids, n), scores)
        keep = capacity_keep(ids, scores, capacity, n, drop_policy, order=order)
        if mode == "hybrid" and resonance_mass:
            keep &= summed_affinity_keep(ids, scores, n, resonance_mass, order=order)
        kept_ids = torch.where(keep, ids, -1)
        weights = torch.where(keep, weights, 0.0)
        if renormalize_kept:  # a token that lost experts puts their weight on the ones it kept
            weights = _rows_sum_to_one(weights)
    return Assignment(kept_ids, weights, ids, logits.shape[-1]), probs


def _select(logits, topk, mode, renormalize, affinity, allowed, node_limit, expert_bias, expert_choice_affinity,
            node_price=None):
    """Token choice for the cases :func:`route` does not fuse: ``(probs, weights, top, ids, rank_by,
    expert_choice_affinity)``."""
    probs = torch.softmax(logits, dim=-1)
    if mode == "hybrid":
        if affinity is None:
            raise ValueError("hybrid routing needs the token-expert affinity")
        rank_by = affinity
        if expert_choice_affinity is None:
            expert_choice_affinity = affinity
    else:
        rank_by = probs
    biased = rank_by if expert_bias is None else rank_by + expert_bias.to(rank_by.dtype)
    if node_price is not None:
        if allowed is not None or node_limit is not None:
            raise ValueError("node_price chooses each token's nodes itself (its own and at most one other): "
                             "pass no allowed mask and no node_limit with it")
        select_by = None
    else:
        if node_limit is not None:
            expert_to_node, num_nodes, max_nodes = node_limit
            limited = node_limited_mask(biased, expert_to_node, num_nodes, max_nodes, topk)
            allowed = limited if allowed is None else allowed & limited
        select_by = biased if allowed is None else biased.masked_fill(~allowed, NEG_INF)
    if select_by is probs:
        # ranked by the probabilities themselves, with no offset, limit or mask: :func:`route` sends that case
        # here only without renormalisation (it fuses the renormalised one), so topk's values are the weights
        top, ids = torch.topk(probs, topk, dim=-1)  # [s, k]
        weights = top
    else:
        if select_by is None:
            ids = node_priced_topk(biased, *node_price, topk)  # [s, k]
        else:
            ids = torch.topk(select_by, topk, dim=-1).indices  # [s, k]
        weights = top = torch.gather(probs, 1, ids)
        if renormalize:
            weights = _rows_sum_to_one(weights)
    return probs, weights, top, ids, rank_by, expert_choice_affinity
