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
from .hops import Hop, mask_hop
from .plan import Plan, Traffic, tree_plan


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
    def build(cls, rail_meta: torch.Tensor, origin_nodes, groups: CommGroups, counts: RoutingCounts) -> "NodeStage":
        """``rail_meta [rows, 2k + 1]`` int64: the rail-level rows of the tokens of ``origin_nodes``
        (node-major; on one node: this rank's tokens). Collective over the node group (one all-to-all
        of the metadata rows, inside the node) unless no member moves a row of these origins."""
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
            dest_rank = torch.where(rail_ids >= 0, rail_ids // t.experts_per_rank, t.ep_size)
            need_rank = torch.zeros(rail_ids.shape[0], t.ranks_per_node + 1, dtype=torch.bool, device=dev)
            need_rank.scatter_(1, topology_tensors(t, dev)["local_of"][dest_rank], True)
            need_rank = need_rank[:, : t.ranks_per_node]
        rails_by_local = [t.rail(i) for i in range(t.ranks_per_node)]
        rows_to_rank = counts.rows_to_rank
        node_blocks = tuple(sum(rows_to_rank[rail[b]][q] for b in origin_nodes) for q in ranks_here)
        moves = node_group_moves(counts, t, node, origin_nodes)
        node_hop = mask_hop(
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
        node_meta = node_hop.forward(rail_meta)  # [node_rows, 2k + 1]
        sources = [q for b in origin_nodes for q in t.ranks_of_node(b)]
        # one node: the rows arrive by source rank, tokens in order, i.e. sorted by source key
        canon, slot, tpe = canonical_hop(node_meta[:, :k], node_meta[:, k], groups, counts,
                                         src_sorted=t.num_nodes == 1, sources=sorted(sources))
        pair_meta = node_meta.index_select(0, canon.index)
        pair_weight = bits_to_fp32(pair_meta[:, k + 1 :].gather(1, slot.unsqueeze(1)).squeeze(1))
        return cls(node_hop, canon, pair_weight, pair_meta[:, k], slot, tpe)


def hierarchical_traffic(counts: RoutingCounts, t) -> Traffic:
    """Payload rows of the two-stage plan this rank sends: rail rows to other nodes, node-hop rows
    (of every origin) to the other ranks of this node."""
    me, node = t.ep_rank, t.node
    rail = t.rail(t.local_index)
    inter = sum(c for b, c in enumerate(counts.rows_to_node[me]) if b != node)
    intra = sum(counts.rows_to_rank[rail[b]][q] for q in t.ranks_of_node(node) if q != me for b in range(t.num_nodes))
    return Traffic(inter_rows=inter, intra_rows=intra)


def build_hierarchical_plan(expert_ids: torch.Tensor, weights: torch.Tensor, groups: CommGroups,
                            counts: RoutingCounts) -> Plan:
    """This rank's hierarchical plan for ``expert_ids [s, k]`` and ``weights [s, k]``; moves the metadata
    rows (``[rows, 2k + 1]`` int64) through the rail and node hops (collective over the EP group)."""
    t = groups.topology
    rail_hop, meta = rail_stage(expert_ids, weights, groups, counts)
    rail_meta = meta if rail_hop is None else rail_hop.forward(meta)  # [rail_rows, 2k + 1]
    stage = NodeStage.build(rail_meta, range(t.num_nodes), groups, counts)
    first_hops = () if rail_hop is None else (rail_hop,)
    return tree_plan(mode="hierarchical", hops=first_hops + (stage.node_hop, stage.canonical), k=expert_ids.shape[1],
                     pair_weight=stage.pair_weight, pair_src_key=stage.pair_src_key, slot=stage.slot,
                     traffic=hierarchical_traffic(counts, t), groups=groups, counts=counts,
                     num_tokens=expert_ids.shape[0], tokens_per_expert=stage.tokens_per_expert)
