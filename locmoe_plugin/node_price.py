"""Byte-priced selection: the cross-node budget's ``"node"`` mechanism charges its price once per remote node.

LocMoE's hierarchical dispatcher sends one copy of a token to each node that hosts one of its experts, and
fans it out to the experts inside that node over the fast links. The inter-node bytes are therefore
proportional to the (token, remote node) copies, not to the (token, expert) pairs: once a token crosses to a
node, its further experts there cost no more inter-node bytes. The ``"selection"`` mechanism prices every
remote *pair*; this one prices each remote *node*, so a token that goes abroad takes every expert there
that it prefers.

Per token, with ``score`` its selection scores (gate probabilities plus the expert bias; token-expert
affinities plus the bias for "hybrid"), ``own`` its rank's node, ``k`` its experts and ``lam`` the price:

    V_own = sum of the top-k scores among own's experts
    V_m   = sum of the top-k scores among own's experts and node m's experts          (m != own)
    gain_m = V_m - V_own - lam
    experts = top-k over own + argmax_m gain_m   if max_m gain_m > 0
              top-k over own                      otherwise

So a token reaches at most one remote node. With 2 nodes that is the exact byte-priced choice (the only
other node is the one candidate). With more nodes it is also a node limit of 2 nodes per token, its own
and one other (DeepSeek-V3's node-limited routing with M = 2, the own node always among them): a token
whose best k experts spread over several remote nodes gets the best k of its own node and one of them.

Ties: ``gain_m == 0`` stays home (the remote node must gain strictly more than ``lam``); among remote nodes
of equal gain the lowest node id wins; inside the chosen nodes, ``torch.topk``'s order. Needs at least
``k`` experts on every node (``LocMoERouter`` refuses a topology with fewer): a token can always be served
at home. Vectorised over tokens and nodes: one top-k per node over ``[s, N, E]``, one over the ``[s, N, 2k]``
candidate pools, an argmax and one masked top-k over ``[s, n]``; no host sync (the price is a device
tensor), so the selection is CUDA-graph safe.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


class NodeRows:
    """A rank's node layout, its own node first: what :func:`node_priced_topk` reads.

    Args:
        expert_to_node: ``[n]`` int64, the node hosting each expert.
        own_node: this rank's node.
        num_nodes: N, nodes of the EP group (each hosting ``n / N`` experts).

    Attributes (tensors on ``expert_to_node``'s device; the router keeps them as buffers):
        experts_by_row: ``[N, E]`` int64, row 0 the own node's experts, rows 1..N-1 the other nodes' in
            ascending node id (so ties between remote nodes go to the lowest id), experts ascending.
        expert_row: ``[n]`` int64, the row of each expert's node (0 = own node).
        remote_row: ``[N]`` bool, False for row 0, True else.
    """

    def __init__(self, expert_to_node: torch.Tensor, own_node: int, num_nodes: int) -> None:
        order = [own_node] + [m for m in range(num_nodes) if m != own_node]
        row_of_node = torch.empty(num_nodes, dtype=torch.long)
        row_of_node[torch.tensor(order)] = torch.arange(num_nodes)
        self.expert_row = row_of_node.to(expert_to_node.device)[expert_to_node]
        # stable sort by row: each row's experts in ascending id
        self.experts_by_row = torch.argsort(self.expert_row, stable=True).reshape(num_nodes, -1)
        self.remote_row = torch.arange(num_nodes, device=expert_to_node.device) > 0


def node_priced_topk(scores: torch.Tensor, experts_by_row: torch.Tensor, expert_row: torch.Tensor,
                     remote_row: torch.Tensor, price: torch.Tensor | float, topk: int) -> torch.Tensor:
    """The experts of each token under the byte price (module docstring): ``[s, k]`` int64.

    Args:
        scores: ``[s, n]`` the selection scores (finite).
        experts_by_row, expert_row, remote_row: :class:`NodeRows` of this rank.
        price: ``lam``, a 0-d tensor (no host sync) or a float, >= 0.
        topk: k, at most the experts per node ``E``.
    """
    s = scores.shape[0]
    num_rows = experts_by_row.shape[0]
    scores = scores.detach()  # only indices leave: no autograd graph (nor its saved [s, N, E] tensors)
    by_row = scores[:, experts_by_row]  # [s, N, E]
    best = by_row.topk(topk, dim=-1).values  # [s, N, k], descending: each node's k best scores
    # candidate pool of row m: own's k best and m's k best (row 0: own's k best, nothing else)
    own = best[:, :1].expand(s, num_rows, topk)
    others = best.masked_fill(~remote_row.view(1, num_rows, 1), NEG_INF)
    value = torch.cat([own, others], dim=-1).topk(topk, dim=-1).values.sum(-1)  # [s, N]: V_m (V_own in row 0)
    # row 0 keeps V_own; a remote row must beat it by more than lam: argmax returns the first of equal maxima
    row = torch.where(remote_row, value - price, value).argmax(-1, keepdim=True)  # [s, 1]
    blocked = (expert_row != 0) & (expert_row != row)  # [s, n]: neither the own node nor the chosen one
    return scores.masked_fill(blocked, NEG_INF).topk(topk, dim=-1).indices
