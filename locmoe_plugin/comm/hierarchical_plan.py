"""The hierarchical (two-stage) plan: rail hop across nodes, node hop inside the node, canonical hop.

Rank ``me`` on node ``a`` with local index ``j`` (N nodes x R ranks):
  1. rail hop (group ``rail``, N members): each token once to each node hosting one of its experts, to
     the rank with local index ``j`` there; the own-node copy stays on ``me`` (no network). Rows arrive
     node-major: ``[rail_rows]`` = blocks from node 0, 1, ... N-1 (own node's block = this rank's rows).
  2. node hop (group ``node``, R members): each rail row to each rank of this node holding one of its
     experts, once per rank. Rows arrive source-rank-major, inside a block node-major.
  3. canonical hop (local): one row per (token, expert) pair in (local expert, source, token) order.
On a one-node group the rail hop is left out and the node hop runs on the EP group.

A hop whose group moves no row between two of its members (every rank reads the same count table, so
all members agree) runs as a local gather: no collective, for the metadata and the payload alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .canonical import bits_to_fp32, canonical_hop, token_metadata
from .counts import RoutingCounts, topology_tensors
from .groups import CommGroups
from .hops import Hop, fused_broadcast, mask_hop, run_broadcast
from .packed_rows import hop_forward_with_meta
from .plan import Plan, Traffic
from .return_path import ReturnPath


def rail_group_moves(counts: RoutingCounts, t, local_index: int) -> bool:
    """Whether any member of the rail group of ``local_index`` sends a row to another node (the same
    answer on every member: read from the all-gathered counts)."""
    to_node = counts.rows_to_node
    return any(to_node[r][b] for r in t.rail(local_index) for b in range(t.num_nodes) if t.node_of_rank[r] != b)


def node_group_moves(counts: RoutingCounts, t, node: int, origin_nodes) -> bool:
    """Whether any member of ``node``'s node group sends another member a (token, rank) row whose token
    comes from one of ``origin_nodes`` (the same answer on every member)."""
    to_rank = counts.rows_to_rank
    ranks_here = t.ranks_of_node(node)
    origin_ranks = [t.ranks_of_node(b) for b in origin_nodes]  # once, not per (rank, node) pair
    return any(to_rank[ranks_b[i]][p] for i in range(t.ranks_per_node) for ranks_b in origin_ranks
               for p in ranks_here if p != ranks_here[i])


def crosses_nodes(counts: RoutingCounts, t) -> bool:
    """Whether any EP rank sends a row to another node (the same answer on every EP rank)."""
    return any(c for r in range(t.ep_size) for b, c in enumerate(counts.rows_to_node[r]) if b != t.node_of_rank[r])


def rail_stage(expert_ids: torch.Tensor, weights: torch.Tensor, groups: CommGroups,
               counts: RoutingCounts) -> tuple[Hop | None, torch.Tensor]:
    """The rail hop (None on one node; built from the counts, no collective) and the tokens' metadata
    rows ``[s, 2k + 1]`` int64 (:func:`.canonical.token_metadata`)."""
    t = groups.topology
    k = expert_ids.shape[1]
    meta = token_metadata(expert_ids, weights, t.ep_rank)
    if t.num_nodes == 1:
        return None, meta
    rows_to_node, rail, node = counts.rows_to_node, t.rail(t.local_index), t.node
    rail_hop = mask_hop(
        counts.node_mask,
        sum(rows_to_node[t.ep_rank]),
        min(t.num_nodes, k),
        blocks=rows_to_node[t.ep_rank],
        level_counts=counts.node_copies[t.ep_rank],
        group=groups.rail if rail_group_moves(counts, t, t.local_index) else None,
        out_splits=[rows_to_node[rail[b]][node] for b in range(t.num_nodes)],
    )[0]
    return rail_hop, meta


@dataclass(frozen=True)
class NodeStage:
    """Rail-level rows of the tokens of some origin nodes -> this rank's canonical pairs of them.

    Attributes:
        node_hop: rail-level rows -> node-level rows (group ``node``, or the EP group on one node;
            ``group=None`` when no member moves a row of these origins).
        canonical: node-level rows -> pairs in canonical order (local hop).
        pair_weight / pair_src_key / slot: ``[pairs]`` fp32 combine weight, int64 source key and int64
            source slot of each pair.
        tokens_per_expert: pairs per local expert (host ints).
    """

    node_hop: Hop
    canonical: Hop
    pair_weight: torch.Tensor
    pair_src_key: torch.Tensor
    slot: torch.Tensor
    tokens_per_expert: tuple[int, ...]

    @classmethod
    def received(cls, node_hop: Hop, node_meta: torch.Tensor, origin_nodes, groups: CommGroups,
                 counts: RoutingCounts) -> "NodeStage":
        """The receive half: ``node_meta [node_rows, 2k + 1]`` int64, the metadata of the node-level rows
        ``node_hop`` (:func:`node_hop_of`) delivered here -> the canonical hop and the pairs' metadata
        (local work, no collective)."""
        t = groups.topology
        k = (node_meta.shape[1] - 1) // 2
        sources = [q for b in origin_nodes for q in t.ranks_of_node(b)]
        # one node: the rows arrive by source rank, tokens in order, i.e. sorted by source key; across
        # nodes by sending local rank, inside by origin node (node-major rail rows), tokens in order
        arrival = [t.rail(i)[b] for i in range(t.ranks_per_node) for b in sorted(origin_nodes)]
        canon, slot, tpe = canonical_hop(node_meta[:, :k], node_meta[:, k], groups, counts,
                                         src_sorted=t.num_nodes == 1, sources=sorted(sources),
                                         arrival=arrival if t.num_nodes > 1 else None)
        pair_meta = node_meta.index_select(0, canon.index)
        pair_weight = bits_to_fp32(pair_meta[:, k + 1 :].gather(1, slot.unsqueeze(1)).squeeze(1))
        return cls(node_hop, canon, pair_weight, pair_meta[:, k], slot, tpe)


def node_hop_of(rail_meta: torch.Tensor, origin_nodes, groups: CommGroups, counts: RoutingCounts) -> Hop:
    """The send half of the node stage: ``rail_meta [rows, 2k + 1]`` int64, the rail-level rows of the
    tokens of ``origin_nodes`` (node-major; on one node: this rank's tokens) -> their node hop (group
    ``node``, or the EP group on one node; ``group=None`` when no member moves a row of these origins).
    Built from the rows' expert ids and the host counts: no collective."""
    t = groups.topology
    k = (rail_meta.shape[1] - 1) // 2
    me, node = t.ep_rank, t.node
    dev = rail_meta.device
    rail = t.rail(t.local_index)
    ranks_here = t.ranks_of_node(node)
    rail_ids = rail_meta[:, :k]
    if t.num_nodes == 1:  # the rows are this rank's tokens: the counts already hold that mask
        need_rank = counts.rank_mask
    else:  # [rows, R] the ranks of this node each rail row needs
        dest_local = topology_tensors(t, dev)["node_local_of_expert"][rail_ids]  # -1 -> R (column cut off)
        need_rank = torch.zeros(rail_ids.shape[0], t.ranks_per_node + 1, dtype=torch.bool, device=dev)
        need_rank.scatter_(1, dest_local, True)
        need_rank = need_rank[:, : t.ranks_per_node]
    rails_by_local = [t.rail(i) for i in range(t.ranks_per_node)]
    rows_to_rank = counts.rows_to_rank
    node_blocks = tuple(sum(rows_to_rank[rail[b]][q] for b in origin_nodes) for q in ranks_here)
    moves = node_group_moves(counts, t, node, origin_nodes)
    return mask_hop(
        need_rank,
        sum(node_blocks),
        min(t.ranks_per_node, k),
        blocks=node_blocks,
        level_counts=[sum(counts.rank_copies_on_node[rail[b]][node][c] for b in origin_nodes)
                      for c in range(counts.rank_levels)],
        group=(groups.node if t.num_nodes > 1 else groups.ep) if moves else None,
        out_splits=[sum(rows_to_rank[rails_by_local[i][b]][me] for b in origin_nodes)
                    for i in range(t.ranks_per_node)],
    )[0]


_NOT_ARRIVED = "the rows have not reached their experts yet: dispatch the tokens before combining"


class NodeRoute:
    """The node stage of some origin nodes' rail-level rows, built in two halves so that its metadata
    needs no all-to-all of its own: the node hop from the rail-level rows' metadata when the route is
    made (:func:`node_hop_of`, no collective); the canonical hop (:meth:`NodeStage.received`) at the
    first :meth:`broadcast`, from the metadata that arrives packed behind each payload row in the node
    hop's all-to-all (:func:`.packed_rows.hop_forward_with_meta`).

    Attributes:
        node_hop: rail-level rows -> node-level rows.
        first_index: ``[rail-level rows]`` int64 gather that comes before the node hop (None: identity).
        stage: the built :class:`NodeStage` (None until the first broadcast).
    """

    def __init__(self, rail_meta: torch.Tensor, origin_nodes, groups: CommGroups, counts: RoutingCounts,
                 first_index: torch.Tensor | None = None) -> None:
        self.node_hop = node_hop_of(rail_meta, origin_nodes, groups, counts)
        self.first_index = first_index
        self.stage: NodeStage | None = None
        self._origin_nodes, self._groups, self._counts = tuple(origin_nodes), groups, counts
        self._steps: tuple = ()

    def broadcast(self, rows: torch.Tensor, meta: torch.Tensor | None = None,
                  packed: torch.Tensor | None = None) -> torch.Tensor:
        """``rows [n, F]`` (the rail-level rows after ``first_index``) -> ``[pairs, F]`` in canonical order.
        The first call needs ``meta [n, 2k + 1]`` int64, the rows' metadata: it travels with them and
        builds the stage (``packed``: both already packed, as the rail hop delivered them); later calls
        (the backward's broadcasts) move the payload alone."""
        if self.stage is not None:
            return run_broadcast(rows, self._steps)
        if meta is None:
            raise RuntimeError("the node route's first broadcast needs the rows' metadata")
        node_rows, node_meta, _ = hop_forward_with_meta(self.node_hop, rows, meta, self.first_index, packed)
        self.stage = NodeStage.received(self.node_hop, node_meta, self._origin_nodes, self._groups, self._counts)
        self._steps = fused_broadcast((self.node_hop, self.stage.canonical), self.first_index)
        return node_rows.index_select(0, self.stage.canonical.index)

    def built(self) -> NodeStage:
        if self.stage is None:
            raise RuntimeError(_NOT_ARRIVED)
        return self.stage

    @property
    def tokens_per_expert(self) -> tuple[int, ...]:
        return self.built().tokens_per_expert

    def reduce(self, pairs: torch.Tensor) -> torch.Tensor:
        """``pairs [pairs, F]`` -> ``[rail-level rows, F]`` (sums in the unsplit order)."""
        stage = self.built()
        return self.node_hop.backward(stage.canonical.backward(pairs))


class HierarchicalRoute:
    """The unsplit two-stage plan's route, whose metadata rides with the payload: the rail hop is known
    from the counts before any payload moves; the first :meth:`broadcast` sends each token row with its
    metadata packed behind it (:mod:`.packed_rows`) through the rail hop, makes the node route from the
    arrived rail-level metadata and sends the node hop the same way. The receiver needs each row's
    metadata only after receipt, so no metadata all-to-all runs at all. Later broadcasts (backward)
    and every reduce move the payload alone through the same hops: sums as in :mod:`.plan`.

    Attributes:
        rail_hop: tokens -> rail-level rows (None on one node).
        token_meta: ``[s, 2k + 1]`` int64 the tokens' metadata rows (:func:`.canonical.token_metadata`).
        node: the node route of every origin (None until the first broadcast).
    """

    def __init__(self, rail_hop: Hop | None, token_meta: torch.Tensor, groups: CommGroups,
                 counts: RoutingCounts) -> None:
        self.rail_hop, self.token_meta = rail_hop, token_meta
        self.node: NodeRoute | None = None
        self._groups, self._counts = groups, counts
        self._steps: tuple = ()
        self._return_path: ReturnPath | None = None

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """``x [s, F]`` -> ``[num_pairs, F]`` in canonical order."""
        if self.node is not None:
            return run_broadcast(x, self._steps)
        if self.rail_hop is None:
            rail_rows, rail_meta, rail_packed = x, self.token_meta, None
        else:
            rail_rows, rail_meta, rail_packed = hop_forward_with_meta(self.rail_hop, x, self.token_meta)
        node = NodeRoute(rail_meta, range(self._groups.topology.num_nodes), self._groups, self._counts)
        out = node.broadcast(rail_rows, rail_meta, rail_packed)
        first_hops = () if self.rail_hop is None else (self.rail_hop,)
        self._steps = fused_broadcast(first_hops + (node.node_hop, node.stage.canonical))
        self.node = node
        return out

    def reduce(self, y: torch.Tensor) -> torch.Tensor:
        """``y [num_pairs, F]`` -> ``[s, F]``: sums in the fixed node / rank / expert tree."""
        self._built()
        y = self.node.reduce(y)
        return y if self.rail_hop is None else self.rail_hop.backward(y)

    def pair_weight(self) -> torch.Tensor:
        """``[num_pairs]`` fp32 combine weight of each pair (after the first broadcast)."""
        return self._built().pair_weight

    def return_path(self) -> ReturnPath:
        """The combine weights' gradient route (built once, after the first broadcast)."""
        if self._return_path is None:
            stage = self._built()
            k = (self.token_meta.shape[1] - 1) // 2
            self._return_path = ReturnPath.build(stage.pair_src_key, stage.slot, k, self._groups, self._counts)
        return self._return_path

    def _built(self) -> NodeStage:
        if self.node is None:
            raise RuntimeError(_NOT_ARRIVED)
        return self.node.built()


def hierarchical_traffic(counts: RoutingCounts, t) -> Traffic:
    """Payload rows of the two-stage plan this rank sends: rail rows to other nodes, node-hop rows
    (of every origin) to the other ranks of this node."""
    me, node = t.ep_rank, t.node
    rail = t.rail(t.local_index)
    inter = sum(c for b, c in enumerate(counts.rows_to_node[me]) if b != node)
    intra = sum(counts.rows_to_rank[rail[b]][q] for q in t.ranks_of_node(node) if q != me for b in range(t.num_nodes))
    return Traffic(inter_rows=inter, intra_rows=intra)


def tokens_per_local_expert(counts: RoutingCounts, t) -> tuple[int, ...]:
    """Pairs per local expert of this rank (host ints, from the count table)."""
    mine = range(t.ep_rank * t.experts_per_rank, (t.ep_rank + 1) * t.experts_per_rank)
    return tuple(sum(c[e] for c in counts.pairs_to_expert) for e in mine)


def build_hierarchical_plan(expert_ids: torch.Tensor, weights: torch.Tensor, groups: CommGroups,
                            counts: RoutingCounts) -> Plan:
    """This rank's hierarchical plan for ``expert_ids [s, k]`` and ``weights [s, k]``: the rail hop and
    the tokens' metadata rows (``[s, 2k + 1]`` int64); no collective here. The metadata moves with the
    payload at the first broadcast (:class:`HierarchicalRoute`)."""
    t = groups.topology
    rail_hop, meta = rail_stage(expert_ids, weights, groups, counts)
    return Plan(hops=(), num_tokens=expert_ids.shape[0], pair_weight=None,
                tokens_per_expert=tokens_per_local_expert(counts, t), traffic=hierarchical_traffic(counts, t),
                mode="hierarchical", packed_route=HierarchicalRoute(rail_hop, meta, groups, counts))
