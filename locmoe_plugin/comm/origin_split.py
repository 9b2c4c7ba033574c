"""The hierarchical plan split by origin: one route per origin node of the rows.

From the one count table of a hierarchical plan (N > 1 nodes), one route per node ``b``:
  * local route (``b`` = this node): this rank's own-node rail block (no inter-node hop) -> node hop ->
    canonical pairs whose source rank is on this node;
  * a remote route per other node ``b``: the block of rows node ``b`` sends here over the rail ->
    node hop -> canonical pairs whose source is on node ``b``.

The rail transfer is described per source node (:mod:`.rail_steps`: ``N - 1`` ring-shifted steps, one
block each way per step; with 2 nodes one step, the unsplit rail transfer) and moves as one collective
per direction; each remote block is then fanned out inside the node (and its experts run) on its own route.

No metadata all-to-all crosses nodes: the remote rows' routing metadata (expert ids, source key,
combine-weight bits; ``[rows, 2k + 1]`` int64) rides in the same rail step as their payload, packed
behind each payload row (:mod:`.packed_rows`), and a remote route is made when its block arrives. No
metadata all-to-all runs inside the node either: each route's node hop is built from its rail-level
rows' metadata (no collective) and carries the node-level rows' metadata packed behind the payload;
each route's canonical hop is built when they arrive. Where each route's pairs sit in the canonical
order is derived on the device from the all-gathered count table (blocks of (local expert, source
rank) pairs of known sizes).

Dispatch (:mod:`.overlap`): the rail transfer is launched asynchronously (on the rail process group's
own communication stream under NCCL / HCCL; gloo runs it on its own thread); while they are in flight
the local rows take their node hop and (in :meth:`TokenDispatcher.forward`) their experts; then each
block in step order: wait, make its route from the arrived metadata, node hop (and experts). Combine
mirrors it: each remote block is reduced inside the node and their rail return launched; while they
travel the local rows are reduced; the rail level then sums every token's copies in node order.
Backward swaps the two: the rail transfer of each direction is launched first and waited last, so they
overlap the local rows' gradient work (with ``forward(expert_fn)``, the local experts' backward too).

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

from .counts import RoutingCounts, topology_tensors
from .groups import CommGroups
from .hierarchical_plan import NodeRoute, rail_stage
from .hops import Hop, true_positions
from .packed_rows import pack_rows, unpack_rows
from .rail_steps import RailBatch, RailStep, rail_steps
from .return_path import ReturnPath


class OriginSplit:
    """A hierarchical plan split by origin node (see the module doc). Each route is a
    :class:`.hierarchical_plan.NodeRoute`: its node hop moves the payload with the metadata packed behind
    each row, and the canonical hop is built when they arrive. A remote route is made once, when its
    block (and its metadata) arrives over the rail (:meth:`arrived`).

    Attributes:
        rail_hop: the unsplit rail hop (tokens -> rail-level rows); its gathers sum the rail level.
        steps: the rail transfer's steps (:func:`.rail_steps.rail_steps`), one per other node.
        node: this rank's node; own_block: ``(start, rows)`` of its block in the rail hop's send order.
        token_meta: ``[s, 2k + 1]`` int64 the tokens' metadata rows (they travel with the payload).
        routes: origin node -> its route (this node's from the start; another node's once its block arrived).
        positions: origin node -> ``[pairs of that origin]`` int64 positions of its pairs in the plan's
            canonical order (ascending).
        num_pairs: pairs at this rank (every route).
    """

    def __init__(self, *, rail_hop: Hop, steps: tuple[RailStep, ...], token_meta: torch.Tensor,
                 local: NodeRoute, positions: dict[int, torch.Tensor], num_pairs: int, groups: CommGroups,
                 counts: RoutingCounts, k: int) -> None:
        t = groups.topology
        self.rail_hop, self.steps, self.token_meta = rail_hop, steps, token_meta
        self.node = t.node
        start = sum(rail_hop.blocks[: t.node])
        self.own_block = (start, rail_hop.blocks[t.node])
        self.routes: dict[int, NodeRoute] = {t.node: local}
        self.positions, self.num_pairs, self.k = positions, num_pairs, k
        self._groups, self._counts = groups, counts
        self._return_path: ReturnPath | None = None
        self.order_hook = None  # test-only: ``hook(ext, rail_hop) -> [s, F]`` sums the rail level in another order

    @property
    def local(self) -> NodeRoute:
        return self.routes[self.node]

    def step_route(self, i: int) -> NodeRoute:
        """The route of the block that arrives at step ``i`` (0-based), once it arrived."""
        route = self.routes.get(self.steps[i].recv_node)
        if route is None:
            raise RuntimeError("the remote rows have not arrived yet: dispatch the tokens before combining")
        return route

    # ------------------------------------------------------------------------------ rail transfers
    def rail_batch(self, back: bool = False) -> RailBatch:
        """A fresh record of one direction of the rail transfer (``back``: the return trip), whose steps
        move in one collective (:class:`.rail_steps.RailBatch`)."""
        return RailBatch(self.steps, self.rail_hop.group, len(self.rail_hop.blocks), back=back)

    def start_step(self, i: int, rows: torch.Tensor, batch: RailBatch, meta: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """Give rail step ``i``'s ``rows`` to ``batch`` (its direction), with ``meta`` packed behind each row
        where given (:mod:`.packed_rows`); ``-> receive buffer``, filled once the batch's one collective,
        launched with its last step, completes (``batch.wait()``)."""
        if meta is not None:
            rows = pack_rows(rows, meta)
        return batch.add(i, rows)

    def send_index(self, i: int) -> torch.Tensor:
        """``[rows sent at step i]`` int64 token of each row this rank sends at step ``i``."""
        return self.steps[i].send_index(self.rail_hop)

    def arrived(self, i: int, packed: torch.Tensor, dtype: torch.dtype, features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The block received at step ``i``, ``packed`` (payload and metadata, see :meth:`start_step`) ->
        ``(payload [block rows, features], metadata [block rows, 2k + 1] int64)``; makes the block's route
        from the metadata the first time (no collective)."""
        payload, meta = unpack_rows(packed, dtype, features)
        origin = self.steps[i].recv_node
        if origin not in self.routes:
            self.routes[origin] = NodeRoute(meta, [origin], self._groups, self._counts)
        return payload, meta

    def sum_rail(self, local_rows: torch.Tensor, returned: list[torch.Tensor]) -> torch.Tensor:
        """Rail level of the reduce: own-node rows ``[own rows, F]`` and the rows returned at each step
        (``returned[i] [rows sent at step i, F]``) back into send order, then each token's copies summed
        in node order (the unsplit hop's gathers)."""
        n = self.rail_hop.index.numel()
        start, own = self.own_block
        ext = local_rows.new_empty((n + 1,) + tuple(local_rows.shape[1:]))
        ext[start : start + own].copy_(local_rows)
        for step, rows in zip(self.steps, returned):
            ext[step.send_at : step.send_at + step.send_rows].copy_(rows)
        ext[n].zero_()
        if self.order_hook is not None:
            return self.order_hook(ext, self.rail_hop)
        return self.rail_hop.sum_copies(ext)

    def merge(self, pairs_by_node: dict[int, torch.Tensor]) -> torch.Tensor:
        """Every route's pairs (origin node -> ``[pairs, ...]``) -> ``[num_pairs, ...]`` in the plan's
        canonical order (a permutation)."""
        first = pairs_by_node[self.node]
        out = first.new_empty((self.num_pairs,) + tuple(first.shape[1:]))
        for b, pairs in pairs_by_node.items():
            out.index_copy_(0, self.positions[b], pairs)
        return out

    def _arrived_routes(self) -> dict[int, NodeRoute]:
        if len(self.routes) < len(self.positions):
            raise RuntimeError("the remote rows have not arrived yet: dispatch the tokens before combining")
        return self.routes

    def pair_weight(self) -> torch.Tensor:
        """``[num_pairs]`` fp32 combine weight of each pair in canonical order (after every block arrived)."""
        return self.merge({b: r.built().pair_weight for b, r in self._arrived_routes().items()})

    def return_path(self) -> ReturnPath:
        """The combine weights' gradient route of every route's pairs (built once, after arrival)."""
        if self._return_path is None:
            stages = {b: r.built() for b, r in self._arrived_routes().items()}
            self._return_path = ReturnPath.build(self.merge({b: s.pair_src_key for b, s in stages.items()}),
                                                 self.merge({b: s.slot for b, s in stages.items()}), self.k,
                                                 self._groups, self._counts)
        return self._return_path


def pair_source_node(counts: RoutingCounts, t, num_pairs: int) -> torch.Tensor:
    """``[num_pairs]`` int64: the node of each pair's source rank (canonical order), built on the device
    from the all-gathered count table: the canonical order is blocks of (local expert, source rank)
    pairs, local-expert-major, of the sizes the table holds (no host sync)."""
    e_r = t.experts_per_rank
    first = t.ep_rank * e_r
    per_expert = counts.table.view(t.ep_size, -1)[:, counts.expert_columns()]  # [P, E] pairs per source and expert
    sizes = per_expert[:, first : first + e_r].t().reshape(-1)  # [E_r * P]
    source_node = topology_tensors(t, sizes.device)["node_of_rank"]  # [P]
    return torch.repeat_interleave(source_node.repeat(e_r), sizes, output_size=num_pairs)


def build_origin_split(expert_ids: torch.Tensor, weights: torch.Tensor, groups: CommGroups,
                       counts: RoutingCounts) -> OriginSplit:
    """This rank's hierarchical plan split by origin, on a group spanning nodes: the rail hop, its steps
    and the local route's node hop (no collective); each route's canonical hop follows when its rows
    arrive."""
    t = groups.topology
    if t.num_nodes < 2:
        raise ValueError("build_origin_split needs an EP group spanning nodes")
    node, k = t.node, expert_ids.shape[1]
    rail_hop, meta = rail_stage(expert_ids, weights, groups, counts)
    send_at, own = sum(rail_hop.blocks[:node]), rail_hop.blocks[node]
    local_gather = rail_hop.index[send_at : send_at + own]
    mine = range(t.ep_rank * t.experts_per_rank, (t.ep_rank + 1) * t.experts_per_rank)
    pairs_from = [sum(counts.pairs_to_expert[q][e] for q in t.ranks_of_node(b) for e in mine) for b in range(t.num_nodes)]
    source_node = pair_source_node(counts, t, sum(pairs_from))
    positions = {b: true_positions(source_node == b, c) for b, c in enumerate(pairs_from)}
    local = NodeRoute(meta.index_select(0, local_gather), [node], groups, counts, first_index=local_gather)
    return OriginSplit(rail_hop=rail_hop, steps=rail_steps(rail_hop, counts, t), token_meta=meta, local=local,
                       positions=positions, num_pairs=sum(pairs_from), groups=groups, counts=counts, k=k)
