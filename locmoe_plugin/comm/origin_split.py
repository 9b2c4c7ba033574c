"""The hierarchical plan split by origin: rows that start on this node and rows that come from others.

From the one count table of a hierarchical plan (N > 1 nodes), two routes:
  * local route: this rank's own-node rail block (no inter-node hop) -> node hop -> canonical pairs whose
    source rank is on this node;
  * remote route: the rail transfer of rows to and from other nodes -> node hop -> canonical pairs whose
    source is on another node.

No metadata all-to-all crosses nodes: the remote rows' routing metadata (expert ids, source key,
combine-weight bits; ``[rows, 2k + 1]`` int64) rides in the same rail all-to-all as their payload,
packed behind each payload row (:mod:`.packed_rows`), and the remote route is made when those rows
arrive. No metadata all-to-all runs inside the node either: each route's node hop is built from its
rail-level rows' metadata (no collective) and carries the node-level rows' metadata packed behind the
payload; each route's canonical hop is built when they arrive. Where each route's pairs sit in the canonical order is derived on the device from
the all-gathered count table (blocks of (local expert, source rank) pairs of known sizes).

Dispatch (:func:`.overlap.launch_remote` then :func:`.overlap.finish_remote`): the rail transfer of the
remote rows is launched as an asynchronous collective (it runs on the rail process group's own
communication stream under NCCL / HCCL; gloo runs it on its own thread); while it is in flight the local
rows take their node hop and (in :meth:`TokenDispatcher.forward`) their experts; then the remote route
is made from the arrived metadata and the remote rows take their node hop. Combine mirrors it
(:func:`.overlap.reduce_remote` then :func:`.overlap.finish_reduce`): the remote rows are reduced inside
the node and their rail return is launched; while it travels the local rows are reduced; the rail
level then sums every token's copies in node order. Backward swaps the two: the remote rows' rail
transfer of each direction is launched first and waited last, so it overlaps the local rows' gradient
work (with ``forward(expert_fn)``, the local experts' backward too).

Bitwise equality with the unsplit plan: every row of every level has one origin (a rail row's origin
is its source node; node-hop and canonical rows inherit it), so each row's copies lie entirely in one
route, in the same relative order as in the unsplit hops (destination blocks keep their order; the
canonical order sorts by source key). The sums of the node and canonical levels are therefore the same
additions; the rail level (the only sum mixing origins) is done once on the reassembled send-order
buffer with the unsplit rail hop's own gathers. Results equal the unsplit and flat plans bit for bit.

Collectives whose group moves no rows (every rank knows every count) are skipped by all members alike.
When no row crosses nodes anywhere in the EP group (:func:`.hierarchical_plan.crosses_nodes`, the same
answer on every rank) there is nothing to hide and the dispatcher keeps the unsplit plan.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .counts import RoutingCounts, topology_tensors
from .groups import CommGroups
from .hierarchical_plan import NodeRoute, rail_stage
from .hops import Hop, true_positions
from .packed_rows import pack_rows, unpack_rows
from .return_path import ReturnPath


class OriginSplit:
    """A hierarchical plan split by origin (see the module doc). Each route is a
    :class:`.hierarchical_plan.NodeRoute`: its node hop moves the payload with the metadata packed behind
    each row, and the canonical hop is built when they arrive. The remote route is made once, when the
    remote rows (and their metadata) arrive over the rail (:meth:`arrived`).

    Attributes:
        rail_hop: the unsplit rail hop (tokens -> rail-level rows); its gathers sum the rail level.
        own_block: ``(start, rows)`` of the own-node block in the rail hop's send order (the remote
            blocks are the rows before and after it, in node order).
        remote_gather: ``[remote rows sent]`` int64 token of each remote row in send order.
        remote_meta: ``[remote rows sent, 2k + 1]`` int64 their metadata rows (sent with the payload).
        token_meta: ``[s, 2k + 1]`` int64 the tokens' metadata rows (the local route's travel with its payload).
        remote_send_splits / remote_recv_splits: the rail all-to-all of remote rows (own node: 0).
        local: the local route (its first broadcast starts at the tokens ``[s, F]``); remote: the remote
            route (None until the remote rows arrived; it starts at the received rail rows).
        local_positions / remote_positions: ``[local / remote pairs]`` int64 positions of each route's
            pairs in the plan's canonical order (ascending).
        num_pairs: pairs at this rank (both routes).
    """

    def __init__(self, *, rail_hop: Hop, own_block: tuple[int, int], remote_gather: torch.Tensor,
                 remote_meta: torch.Tensor, token_meta: torch.Tensor, remote_send_splits: tuple[int, ...],
                 remote_recv_splits: tuple[int, ...], local: NodeRoute, local_positions: torch.Tensor,
                 remote_positions: torch.Tensor, num_pairs: int, groups: CommGroups, counts: RoutingCounts,
                 k: int) -> None:
        self.rail_hop, self.own_block = rail_hop, own_block
        self.remote_gather, self.remote_meta, self.token_meta = remote_gather, remote_meta, token_meta
        self.remote_send_splits, self.remote_recv_splits = remote_send_splits, remote_recv_splits
        self.local, self.remote = local, None
        self.local_positions, self.remote_positions = local_positions, remote_positions
        self.num_pairs, self.k = num_pairs, k
        self._groups, self._counts = groups, counts
        self._return_path: ReturnPath | None = None
        self.order_hook = None  # test-only: ``hook(ext, rail_hop) -> [s, F]`` sums the rail level in another order

    @property
    def rail_moves(self) -> bool:
        """Whether any member of the rail group sends a row to another node (else every member skips
        the rail collective). The unsplit rail hop holds its group only then (every row it sends to
        another node is a remote row), so this is read from the hop, the same answer on every member."""
        return self.rail_hop.group is not None

    # ------------------------------------------------------------------------------ rail transfers
    def start_rail(self, rows: torch.Tensor, send_splits, recv_splits,
                   meta: torch.Tensor | None = None) -> tuple[torch.Tensor, object]:
        """Launch the rail all-to-all of ``rows`` (asynchronous, on the rail group's own communication
        stream), with ``meta`` packed behind each row where given (:mod:`.packed_rows`); returns
        ``(receive buffer, work or None)``."""
        if meta is not None:
            rows = pack_rows(rows, meta)
        out = rows.new_empty((sum(recv_splits),) + tuple(rows.shape[1:]))
        if not self.rail_moves:
            return out, None
        work = dist.all_to_all_single(out, rows.contiguous(), list(recv_splits), list(send_splits),
                                      group=self.rail_hop.group, async_op=True)
        return out, work

    def arrived(self, packed: torch.Tensor, dtype: torch.dtype, features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The received remote rail rows ``packed`` (payload and metadata, see :meth:`start_rail`) ->
        ``(payload [remote rail rows, features], metadata [remote rail rows, 2k + 1] int64)``; makes the
        remote route from the metadata the first time (no collective)."""
        payload, meta = unpack_rows(packed, dtype, features)
        if self.remote is None:
            t = self._groups.topology
            others = [b for b in range(t.num_nodes) if b != t.node]
            self.remote = NodeRoute(meta, others, self._groups, self._counts)
        return payload, meta

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
        if self.order_hook is not None:
            return self.order_hook(ext, self.rail_hop)
        return self.rail_hop.sum_copies(ext)

    def merge(self, local_pairs: torch.Tensor, remote_pairs: torch.Tensor) -> torch.Tensor:
        """Both routes' pairs -> ``[num_pairs, ...]`` in the plan's canonical order (a permutation)."""
        out = local_pairs.new_empty((self.num_pairs,) + tuple(local_pairs.shape[1:]))
        out.index_copy_(0, self.local_positions, local_pairs)
        return out.index_copy_(0, self.remote_positions, remote_pairs)

    def _arrived_route(self) -> NodeRoute:
        if self.remote is None:
            raise RuntimeError("the remote rows have not arrived yet: dispatch the tokens before combining")
        return self.remote

    def pair_weight(self) -> torch.Tensor:
        """``[num_pairs]`` fp32 combine weight of each pair in canonical order (after the remote rows arrived)."""
        return self.merge(self.local.built().pair_weight, self._arrived_route().built().pair_weight)

    def return_path(self) -> ReturnPath:
        """The combine weights' gradient route of both routes' pairs (built once, after arrival)."""
        if self._return_path is None:
            remote = self._arrived_route().built()
            local = self.local.built()
            self._return_path = ReturnPath.build(self.merge(local.pair_src_key, remote.pair_src_key),
                                                 self.merge(local.slot, remote.slot), self.k, self._groups,
                                                 self._counts)
        return self._return_path


def pair_is_local(counts: RoutingCounts, t, num_pairs: int) -> torch.Tensor:
    """``[num_pairs]`` bool: whether each pair of this rank (canonical order) comes from this node, built
    on the device from the all-gathered count table: the canonical order is blocks of (local expert,
    source rank) pairs, local-expert-major, of the sizes the table holds (no host sync)."""
    e_r = t.experts_per_rank
    first = t.ep_rank * e_r
    per_expert = counts.table.view(t.ep_size, -1)[:, counts.expert_columns()]  # [P, E] pairs per source and expert
    sizes = per_expert[:, first : first + e_r].t().reshape(-1)  # [E_r * P]
    source_local = topology_tensors(t, sizes.device)["node_of_rank"] == t.node  # [P]
    return torch.repeat_interleave(source_local.repeat(e_r), sizes, output_size=num_pairs)


def build_origin_split(expert_ids: torch.Tensor, weights: torch.Tensor, groups: CommGroups,
                       counts: RoutingCounts) -> OriginSplit:
    """This rank's hierarchical plan split by origin, on a group spanning nodes: the rail hop and the
    local route's node hop (no collective); each route's canonical hop follows when its rows arrive."""
    t = groups.topology
    if t.num_nodes < 2:
        raise ValueError("build_origin_split needs an EP group spanning nodes")
    me, node, k = t.ep_rank, t.node, expert_ids.shape[1]
    rail_hop, meta = rail_stage(expert_ids, weights, groups, counts)
    # rail level: send blocks by node; rail-level rows arrive by node too (own block = own rows)
    send_blocks, recv_blocks = list(rail_hop.blocks), list(rail_hop.out_splits)
    send_at, own = sum(send_blocks[:node]), send_blocks[node]
    local_gather = rail_hop.index[send_at : send_at + own]
    remote_gather = torch.cat([rail_hop.index[:send_at], rail_hop.index[send_at + own :]])
    e_r = t.experts_per_rank
    first = me * e_r
    num_pairs = sum(counts.pairs_to_expert[q][e] for q in range(t.ep_size) for e in range(first, first + e_r))
    is_local = pair_is_local(counts, t, num_pairs)
    local_sources = t.ranks_of_node(node)
    n_local = sum(counts.pairs_to_expert[q][e] for q in local_sources for e in range(first, first + e_r))
    local = NodeRoute(meta.index_select(0, local_gather), [node], groups, counts, first_index=local_gather)
    return OriginSplit(
        rail_hop=rail_hop, own_block=(send_at, own), remote_gather=remote_gather,
        remote_meta=meta.index_select(0, remote_gather), token_meta=meta,
        remote_send_splits=tuple(0 if b == node else c for b, c in enumerate(send_blocks)),
        remote_recv_splits=tuple(0 if b == node else c for b, c in enumerate(recv_blocks)),
        local=local, local_positions=true_positions(is_local, n_local), remote_positions=true_positions(~is_local, num_pairs - n_local), num_pairs=num_pairs,
        groups=groups, counts=counts, k=k,
    )
