"""Routing plans: how token rows travel from their source rank to expert pairs and back.

A plan is a chain of hops (:mod:`.hops`). Going forward (:meth:`Plan.broadcast`) every step is a copy.
Going back (:meth:`Plan.reduce`) each hop reverses its all-to-all and sums the returned copies of each
previous-level row in send order, so the sum order is fixed and the *same tree of additions* in every
tree plan:

    y[t] = sum over nodes (node order) of
             sum over ranks of that node (local order) of
               sum over that rank's experts (local expert order) of  w * expert(x[t])

That is why the hierarchical and the flat (exact) plans give bitwise-equal outputs and input gradients
in fp32, the property ``locmoe check-comm`` checks on a new cluster.

Plan kinds (rank p on node a with local index j; N nodes x R ranks; E_r experts per rank), one builder
each behind :func:`.build.build_plan`:
  * hierarchical (:mod:`.hierarchical_plan`): [rail hop: each token once to each node hosting one of its
    experts, to the rank with the same local index there ("rail-aligned"; own-node rows go to p itself,
    no network)] -> [node hop: fan out over the node to the ranks holding the experts, once per rank]
    -> [local hop: one row per (token, expert) pair, in canonical order].
  * flat exact (:mod:`.flat_plan`): local hops that build the same tree at the source, then one EP-wide
    all-to-all of (token, expert) pairs (Megatron's alltoall dispatcher sends the same pairs), then the
    canonical local hop at the expert rank.
  * flat fast (:mod:`.pairs_plan`): the EP-wide all-to-all of pairs only; its reduce sums a token's pairs
    in send order (deterministic, but not the node / rank tree). The benchmark baseline.
  * allgather (:mod:`.allgather_plan`, one node only): every token all-gathered, the local pairs selected;
    combine by an index-add and a reduce-scatter (deterministic, not the tree).

Canonical pair order at an expert rank: (local expert, source EP rank, source token index), so the
expert MLPs see identical input tensors whatever the plan.

Host syncs: one per plan (``# device-to-host sync: split sizes``), after an all-gather of every rank's
counts (:mod:`.counts`); all later index work sizes its outputs from those host counts.

Host cost: on one node the layer is bound by the host's kernel launches, not by bytes, so the builders
avoid sorts where the order is known (:func:`.hops.mask_hop`: copy numbers from a cumsum; one node: rows
arrive sorted by source) and reuse the count pass's masks; the pairs plan orders its pairs with the count
pass's counting sort (:mod:`.counting_sort`, ``docs/one_node.md``); ``benchmarks/op_count.py`` counts the ops per
phase.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .hops import Hop, fused_broadcast, run_broadcast
from .return_path import ReturnPath

if TYPE_CHECKING:
    from .counts import RoutingCounts
    from .groups import CommGroups
    from .hierarchical_plan import HierarchicalRoute
    from .origin_split import OriginSplit
    from .allgather_plan import AllGatherRoute
    from .pairs_plan import PairsRoute


@functools.lru_cache(maxsize=64)
def _rank_classes(topology) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(other ranks of this node, ranks on other nodes)`` of the EP group: made once per topology."""
    me, node = topology.ep_rank, topology.node
    peers = tuple(q for q in range(topology.ep_size) if topology.node_of_rank[q] == node and q != me)
    others = tuple(q for q in range(topology.ep_size) if topology.node_of_rank[q] != node)
    return peers, others


@dataclass(frozen=True)
class Traffic:
    """Payload rows this rank sends per dispatch (a combine sends the same rows back).

    ``inter_rows``: rows to ranks on other nodes; ``intra_rows``: rows to other ranks of this node.
    Multiply by ``hidden * element size`` for bytes (:meth:`bytes`).
    """

    inter_rows: int = 0
    intra_rows: int = 0

    @classmethod
    def of_rank_sends(cls, rows_to_rank, topology) -> "Traffic":
        """From the rows this rank sends to each EP rank (``rows_to_rank [P]`` host ints): those to
        other nodes, and those to other ranks of this node."""
        peers_on_node, other_nodes = _rank_classes(topology)
        return cls(inter_rows=sum(rows_to_rank[q] for q in other_nodes),
                   intra_rows=sum(rows_to_rank[q] for q in peers_on_node))

    def bytes(self, hidden: int, element_size: int) -> tuple[int, int]:
        """``(inter_node_bytes, intra_node_bytes)`` of one direction."""
        return self.inter_rows * hidden * element_size, self.intra_rows * hidden * element_size


@dataclass(frozen=True)
class Plan:
    """A built plan (this rank's part).

    Attributes:
        hops: the chain of hops (empty for ``flat_fast``, which keeps its route in ``pairs_route``).
        num_tokens: ``s``, tokens of this rank.
        pair_weight: ``[num_pairs]`` fp32, each final row's combine weight (carried with the metadata, no
            autograd: see the dispatcher); None on a plan split by origin, whose remote pairs' weights
            arrive with their rows (:meth:`combine_weights`).
        tokens_per_expert: rows per local expert (host ints), in canonical order.
        traffic: payload rows this rank sends per direction.
        mode: the plan kind (``"hierarchical"``, ``"flat"``, ``"flat_fast"``, ``"allgather"``).
        broadcast_steps: ``(index, hop)`` pairs, consecutive local gathers fused (see
            :func:`.hops.fused_broadcast`).
        pair_src_key: ``[num_pairs]`` int64 ``source EP rank * SRC_SHIFT + token`` of each pair (tree plans).
        return_path: the combine weights' gradient route (tree plans).
        pairs_route: the ``flat_fast`` route.
        origin_split: the hierarchical plan split into this node's rows and other nodes' rows (for the
            overlapped dispatch; :mod:`.origin_split`); then ``hops`` is empty and the split routes the rows.
        packed_route: the hierarchical plan's route, whose node and canonical hops are built when the
            payload arrives with its metadata packed behind each row (no metadata all-to-all;
            :class:`.hierarchical_plan.HierarchicalRoute`); then ``hops`` is empty and ``pair_weight``
            None until the first broadcast (:meth:`combine_weights`).
        gather_route: the ``allgather`` route (:class:`.allgather_plan.AllGatherRoute`); then ``hops`` is empty.
    """

    hops: tuple[Hop, ...]
    num_tokens: int
    pair_weight: torch.Tensor | None
    tokens_per_expert: tuple[int, ...]
    traffic: Traffic
    mode: str
    broadcast_steps: tuple = field(default=(), repr=False)
    pair_src_key: torch.Tensor | None = field(default=None, repr=False)
    return_path: ReturnPath | None = field(default=None, repr=False)
    pairs_route: "PairsRoute | None" = field(default=None, repr=False)
    origin_split: "OriginSplit | None" = field(default=None, repr=False)
    packed_route: "HierarchicalRoute | None" = field(default=None, repr=False)
    gather_route: "AllGatherRoute | None" = field(default=None, repr=False)

    def pair_values_to_slots(self, v: torch.Tensor, k: int) -> torch.Tensor:
        """``v [num_pairs]`` (one value per pair, at the expert rank) -> ``[s, k]`` fp32 at the source,
        each value in its pair's (token, slot), 0 in slots without a kept pair (a permutation, no sums;
        see :mod:`.return_path`; ``flat_fast`` sends the fp32 values alone, the source knows their
        slots). The router's weight gradient goes back this way."""
        if self.pairs_route is not None:
            return self.pairs_route.values_to_slots(v, self.num_tokens, k)
        if self.gather_route is not None:
            return self.gather_route.values_to_slots(v, self.num_tokens, k)
        if self.origin_split is not None:
            return self.origin_split.return_path().values_to_slots(v, self.num_tokens, k)
        if self.packed_route is not None:
            return self.packed_route.return_path().values_to_slots(v, self.num_tokens, k)
        return self.return_path.values_to_slots(v, self.num_tokens, k)

    def combine_weights(self) -> torch.Tensor:
        """``[num_pairs]`` fp32 combine weight of each pair in canonical order (a split plan: once its
        remote rows have arrived; a packed route: after its first broadcast)."""
        if self.origin_split is not None:
            return self.origin_split.pair_weight()
        if self.packed_route is not None:
            return self.packed_route.pair_weight()
        return self.pair_weight

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """``x [s, F]`` -> ``[num_pairs, F]`` rows in canonical pair order (copies only)."""
        if self.pairs_route is not None:
            return self.pairs_route.broadcast(x)
        if self.gather_route is not None:
            return self.gather_route.broadcast(x)
        if self.packed_route is not None:
            return self.packed_route.broadcast(x)
        self._refuse_split("broadcast")
        return run_broadcast(x, self.broadcast_steps)

    def reduce(self, y: torch.Tensor) -> torch.Tensor:
        """``y [num_pairs, F]`` -> ``[s, F]``: sums in the fixed node / rank / expert tree (``flat_fast``:
        over each token's slots)."""
        if self.pairs_route is not None:
            return self.pairs_route.reduce(y, self.num_tokens)
        if self.gather_route is not None:
            return self.gather_route.reduce(y)
        if self.packed_route is not None:
            return self.packed_route.reduce(y)
        self._refuse_split("reduce")
        for hop in reversed(self.hops):
            y = hop.backward(y)
        return y

    def _refuse_split(self, what: str) -> None:
        """A plan split by origin has no unsplit hops: its rows move through the overlap's steps."""
        if self.origin_split is not None:
            raise RuntimeError(f"Plan.{what}() on a plan split by origin: use the dispatcher's overlapped "
                               f"path (comm.overlap: broadcast_split / reduce_split)")


def tree_plan(*, mode: str, hops: tuple[Hop, ...], k: int, pair_weight: torch.Tensor, pair_src_key: torch.Tensor,
              slot: torch.Tensor, traffic: Traffic, groups: "CommGroups", counts: "RoutingCounts",
              num_tokens: int, tokens_per_expert: tuple[int, ...]) -> Plan:
    """A tree plan (hierarchical or flat) from its hops and its canonical pairs' ``pair_weight [pairs]``
    fp32, ``pair_src_key [pairs]`` int64 and ``slot [pairs]`` int64 (the slot at the source): adds the
    combine weights' return path and the fused broadcast steps."""
    return Plan(
        hops=hops,
        num_tokens=num_tokens,
        pair_weight=pair_weight,
        tokens_per_expert=tokens_per_expert,
        traffic=traffic,
        mode=mode,
        broadcast_steps=fused_broadcast(hops),
        return_path=ReturnPath.build(pair_src_key, slot, k, groups, counts),
        pair_src_key=pair_src_key,
    )
