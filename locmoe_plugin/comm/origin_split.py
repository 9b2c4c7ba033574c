"""The hierarchical plan split by origin: rows that start on this node and rows that come from others.

From the one count table of a hierarchical plan (N > 1 nodes), two routes share its hops:
  * local route: this rank's own-node rail block (no inter-node hop) -> node hop -> canonical pairs whose
    source rank is on this node;
  * remote route: the rail transfer of rows to and from other nodes -> node hop -> canonical pairs whose
    source is on another node.

Dispatch (:func:`launch_remote` then :func:`finish_remote`): the rail transfer of the remote rows is
launched as an asynchronous collective (it runs on the rail process group's own communication stream
under NCCL / HCCL; gloo runs it on its own thread); while it is in flight the local rows take their
node hop and (in :meth:`TokenDispatcher.forward`) their experts; then the remote rows take their node
hop. Combine mirrors it (:func:`reduce_remote` then :func:`finish_reduce`): the remote rows are reduced
inside the node and their rail return is launched; while it travels the local rows are reduced; the
rail level then sums every token's copies in node order. Backward swaps the two: the remote rows'
rail transfer of each direction is launched first and waited last, so it overlaps the local rows'
gradient work (with ``forward(expert_fn)``, the local experts' backward too).

Bitwise equality with the unsplit plan: every row of every level has one origin (a rail row's origin
is its source node; node-hop and canonical rows inherit it), so each row's copies lie entirely in one
route, in the same relative order. The sums of the node and canonical levels are therefore the same
additions; the rail level (the only sum mixing origins) is done once on the reassembled send-order
buffer with the unsplit hop's own gathers. Results equal the unsplit and flat plans bit for bit.

Collectives whose group moves no rows (every rank knows every count) are skipped by all members alike.
When no row crosses nodes anywhere in the EP group (:func:`.hierarchical_plan.crosses_nodes`, the same
answer on every rank) there is nothing to hide and the dispatcher keeps the unsplit plan.

Host and device cost over the unsplit plan: the split's index work reuses the unsplit hops' copy
numbers (no sort for the node and canonical hops of a route); each route's local gathers are composed
into one gather per all-to-all (the local route: from the tokens straight to its node hop or pairs);
the rail level's own-node block and remote blocks are contiguous slices of its send order, so the
reassembly before the rail sum is slice copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .counts import SRC_SHIFT, RoutingCounts, topology_tensors
from .groups import CommGroups
from .hierarchical_plan import node_group_moves
from .hops import Hop, fused_broadcast, run_broadcast, true_positions
from .plan import Plan


@dataclass(frozen=True)
class OriginRoute:
    """One origin's part of the node hop and canonical hop.

    Attributes:
        node_hop: rail-level rows of this origin -> node-level rows of this origin (group ``node``;
            ``group=None`` when no member of the node group moves a row of this origin).
        canonical: node-level rows of this origin -> its canonical pairs (local hop).
        pair_positions: ``[pairs]`` int64 position of each of this origin's pairs in the plan's
            canonical order (ascending).
        tokens_per_expert: this origin's pairs per local expert (host ints).
        broadcast_steps: :func:`.hops.fused_broadcast` steps to this origin's pairs (the local route's
            start at the tokens ``[s, F]``, the remote route's at its received rail rows).
    """

    node_hop: Hop
    canonical: Hop
    pair_positions: torch.Tensor
    tokens_per_expert: tuple[int, ...]
    broadcast_steps: tuple = field(default=(), repr=False)

    def broadcast(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (see ``broadcast_steps``) -> ``[pairs, F]`` in canonical order."""
        return run_broadcast(rows, self.broadcast_steps)

    def reduce(self, pairs: torch.Tensor) -> torch.Tensor:
        """``pairs [pairs, F]`` -> ``[rail rows of this origin, F]`` (sums in the unsplit order)."""
        return self.node_hop.backward(self.canonical.backward(pairs))


@dataclass(frozen=True)
class OriginSplit:
    """A hierarchical plan split by origin (see the module doc).

    Attributes:
        rail_hop: the unsplit rail hop (tokens -> rail-level rows); its gathers sum the rail level.
        own_block: ``(start, rows)`` of the own-node block in the rail hop's send order (the remote
            blocks are the rows before and after it, in node order).
        remote_gather: ``[remote rows sent]`` int64 token of each remote row in send order.
        remote_send_splits / remote_recv_splits: the rail all-to-all of remote rows (own node: 0).
        local / remote: the two routes.
        num_pairs: pairs at this rank (both routes).
    """

    rail_hop: Hop
    own_block: tuple[int, int]
    remote_gather: torch.Tensor
    remote_send_splits: tuple[int, ...]
    remote_recv_splits: tuple[int, ...]
    local: OriginRoute
    remote: OriginRoute
    num_pairs: int
    order_hook: object = field(default=None, repr=False)

    @property
    def rail_moves(self) -> bool:
        """Whether any member of the rail group sends a row to another node (else every member skips
        the rail collective). The unsplit rail hop holds its group only then (every row it sends to
        another node is a remote row), so this is read from the hop, the same answer on every member."""
        return self.rail_hop.group is not None

    # ------------------------------------------------------------------------------ rail transfers
    def start_rail(self, rows: torch.Tensor, send_splits, recv_splits) -> tuple[torch.Tensor, object]:
        """Launch the rail all-to-all of ``rows`` (asynchronous, on the rail group's own communication
        stream); returns ``(receive buffer, work or None)``."""
        out = rows.new_empty((sum(recv_splits),) + tuple(rows.shape[1:]))
        if not self.rail_moves:
            return out, None
        work = dist.all_to_all_single(out, rows.contiguous(), list(recv_splits), list(send_splits),
                                      group=self.rail_hop.group, async_op=True)
        return out, work

    def sum_rail(self, local_rows: torch.Tensor, remote_rows: torch.Tensor) -> torch.Tensor:
        """Rail level of the reduce: own-node rows ``[own rows, F]`` and returned remote rows ``[remote, F]``
        back into send order, then each token's copies summed in node order (the unsplit hop's gathers)."""
        n = self.rail_hop.index.numel()
        start, own = self.own_block
        ext = local_rows.new_empty((n + 1,) + tuple(local_rows.shape[1:]))
        ext[start : start + own].copy_(local_rows)
        ext[:start].copy_(remote_rows[:start])
        ext[start + own : n].copy_(remote_rows[start:])
        ext[n].zero_()
        if self.order_hook is not None:  # test-only: ``hook(ext, rail_hop) -> [s, F]`` in another order
            return self.order_hook(ext, self.rail_hop)
        return self.rail_hop.sum_copies(ext)

    def merge(self, local_pairs: torch.Tensor, remote_pairs: torch.Tensor) -> torch.Tensor:
        """Both routes' pairs -> ``[num_pairs, F]`` in the plan's canonical order (a permutation)."""
        out = local_pairs.new_empty((self.num_pairs,) + tuple(local_pairs.shape[1:]))
        out.index_copy_(0, self.local.pair_positions, local_pairs)
        return out.index_copy_(0, self.remote.pair_positions, remote_pairs)


def _route(is_origin_rail, rail_rank_in_origin, rail_origin_rows, node_hop: Hop, node_blocks, node_out_splits,
           node_levels, moves, canon: Hop, node_row_is_origin, n_node_rows, pair_is_origin, tpe,
           expert_levels, fan_in: tuple[int, int], first_index=None) -> OriginRoute:
    """One origin's route from the unsplit node and canonical hops (device index work only; the split
    sizes and copy levels are host ints from the count table; copy numbers from the unsplit hops)."""
    # node hop: the entries whose rail row has this origin, in send order (destination blocks keep order)
    entries = true_positions(is_origin_rail.index_select(0, node_hop.index), sum(node_blocks))
    sub_index = rail_rank_in_origin.index_select(0, node_hop.index.index_select(0, entries))
    sub_node = node_hop.restricted(entries, sub_index, node_blocks, rail_origin_rows, fan_in[0],
                                   group=node_hop.group if moves else None,
                                   out_splits=node_out_splits if moves else None, level_counts=node_levels)
    # canonical hop: this origin's pairs, rows renumbered among this origin's node-level rows
    pair_positions = true_positions(pair_is_origin, sum(tpe))
    row_rank = torch.cumsum(node_row_is_origin.long(), 0) - 1
    canon_index = row_rank.index_select(0, canon.index.index_select(0, pair_positions))
    sub_canon = canon.restricted(pair_positions, canon_index, tpe, n_node_rows, fan_in[1], level_counts=expert_levels)
    steps = fused_broadcast((sub_node, sub_canon), first_index)
    return OriginRoute(sub_node, sub_canon, pair_positions, tuple(tpe), steps)


def split_by_origin(plan: Plan, groups: CommGroups, counts: RoutingCounts) -> OriginSplit:
    """The origin split of a hierarchical ``plan`` built on a group spanning nodes (no collective)."""
    t = groups.topology
    if plan.mode != "hierarchical" or t.num_nodes < 2:
        raise ValueError("split_by_origin needs a hierarchical plan on an EP group spanning nodes")
    rail_hop, node_hop, canon = plan.hops
    me, node, j = t.ep_rank, t.node, t.local_index
    dev = plan.pair_weight.device
    nodes, ranks = t.num_nodes, t.ranks_per_node
    rail = t.rail(j)
    rails_by_local = [t.rail(i) for i in range(ranks)]
    ranks_here = t.ranks_of_node(node)
    to_rank = counts.rows_to_rank

    # rail level: send blocks by node; rail-level rows arrive by node too (own block = own rows)
    send_blocks = list(rail_hop.blocks)
    recv_blocks = list(rail_hop.out_splits)
    send_at = sum(send_blocks[:node])
    recv_at = sum(recv_blocks[:node])
    own = send_blocks[node]
    n_rail = sum(recv_blocks)
    local_gather = rail_hop.index[send_at : send_at + own]
    remote_gather = torch.cat([rail_hop.index[:send_at], rail_hop.index[send_at + own :]])
    remote_send_splits = tuple(0 if b == node else c for b, c in enumerate(send_blocks))
    remote_recv_splits = tuple(0 if b == node else c for b, c in enumerate(recv_blocks))

    rail_pos = torch.arange(n_rail, device=dev)
    rail_is_local = (rail_pos >= recv_at) & (rail_pos < recv_at + own)
    local_rank_of_rail = rail_pos - recv_at  # valid on own-node rows
    remote_rank_of_rail = torch.where(rail_pos < recv_at, rail_pos, rail_pos - own)  # valid on the others

    # canonical level: a pair's origin is its source rank's node (device only, from the source keys)
    node_of_rank = topology_tensors(t, dev)["node_of_rank"]
    pair_is_local = node_of_rank.index_select(0, plan.pair_src_key // SRC_SHIFT) == node
    # a node-level row's origin is that of its pairs (every node-level row holds >= 1 expert of this rank)
    n_node_rows = canon.prev_rows
    node_row_is_local = torch.zeros(n_node_rows + 1, dtype=torch.long, device=dev).scatter_(
        0, torch.where(pair_is_local, canon.index, n_node_rows), 1)[:n_node_rows].bool()
    fan_in = (counts.rank_levels, counts.expert_levels)  # the unsplit node and canonical hops' fan-ins

    def route_sizes(origin_local: bool):
        origin_nodes = [b for b in range(nodes) if (b == node) == origin_local]
        send = tuple(sum(to_rank[rail[b]][q] for b in origin_nodes) for q in ranks_here)
        recv = tuple(sum(to_rank[rails_by_local[i][b]][me] for b in origin_nodes) for i in range(ranks))
        levels = [sum(counts.rank_copies_on_node[rail[b]][node][c] for b in origin_nodes) for c in range(counts.rank_levels)]
        sources = [q for q in range(t.ep_size) if (t.node_of_rank[q] == node) == origin_local]
        first, e_r = me * t.experts_per_rank, t.experts_per_rank
        tpe = [sum(counts.pairs_to_expert[q][e] for q in sources) for e in range(first, first + e_r)]
        expert_levels = [sum(counts.expert_copies_on_rank[q][me][c] for q in sources) for c in range(counts.expert_levels)]
        moves = node_group_moves(counts, t, node, origin_nodes)
        return send, recv, levels, moves, tpe, expert_levels

    routes = []
    for origin_local in (True, False):
        send, recv, levels, moves, tpe, expert_levels = route_sizes(origin_local)
        routes.append(_route(
            rail_is_local if origin_local else ~rail_is_local,
            local_rank_of_rail if origin_local else remote_rank_of_rail,
            own if origin_local else n_rail - own,
            node_hop, send, recv, levels, moves, canon,
            node_row_is_local if origin_local else ~node_row_is_local,
            sum(recv), pair_is_local if origin_local else ~pair_is_local, tpe, expert_levels, fan_in,
            first_index=local_gather if origin_local else None,
        ))
    local, remote = routes
    return OriginSplit(rail_hop, (send_at, own), remote_gather, remote_send_splits, remote_recv_splits,
                       local, remote, plan.pair_weight.numel())
