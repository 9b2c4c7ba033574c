"""Token dispatcher: ``dispatch`` token rows to the experts' ranks, ``combine`` the results back.

Stateless per call: :meth:`TokenDispatcher.dispatch` returns ``(expert_input, handle)`` and
:meth:`TokenDispatcher.combine` consumes the handle. The only thing kept on ``self`` between calls
is the cumulative traffic counter (telemetry).

Autograd: dispatch is a copy whose adjoint is the plan's fixed-order reduce, and combine is that reduce
whose adjoint is the copy; the combine weights ride along as a ``[s, k]`` tensor broadcast the same
way, so gradients reach the router through them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import ConfigError
from .build import PLAN_MODES, build_plan, start_counts
from .counts import RoutingCounts
from .gathered_routing import GatheredRouting, build_gathered_plan
from .groups import CommGroups
from .hierarchical_plan import crosses_nodes, hierarchical_traffic, tokens_per_local_expert
from .origin_split import build_origin_split
from .overlap import broadcast_split, combine_blocks, dispatch_blocks, reduce_split
from .plan import Plan
from .row_codec import RowCodec, row_codec

MODES = PLAN_MODES

ALLGATHER_ACROSS_NODES_ERROR = (
    "dispatcher='allgather' needs an expert-parallel group inside one node, and this one spans {nodes} nodes: "
    "an all-gather would send every token to every node; use dispatcher='hierarchical' (the default) across "
    "nodes, or an EP group of at most gpus_per_node ranks"
)


def resolve_mode(mode: str, topology, exact_tree: bool = False) -> str:
    """The plan :class:`TokenDispatcher` builds for a requested mode on a topology.

    On an EP group that fits in one node, ``"hierarchical"`` has no inter-node stage: its only work would
    be deduplicating rows per destination rank over NVLink, and on one node the dispatch is bound by the
    host's kernel launches, not by bytes (``benchmarks/RESULTS.md``, 2 x H200: the two-stage plan took
    1.07-1.45 x the pairs plan's time on one node). So there it runs ``"flat_fast"``, the single-stage
    pairs plan with the fewest host ops (Megatron's alltoall dispatcher sends the same pairs); on groups
    spanning nodes, the two-stage plan. ``exact_tree=True`` keeps every mode as named: the two-stage plan
    on one node too, whose sums follow the same node / rank / expert tree as ``"flat"`` (bitwise equal
    outputs and gradients, what ``locmoe check-comm`` and the parity tests compare). ``"allgather"`` (one
    node only, :mod:`.allgather_plan`) is always built as named.
    """
    if mode == "hierarchical" and topology.num_nodes == 1 and not exact_tree:
        return "flat_fast"
    return mode


def _connected(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """``expert_fn``'s output of one origin block, checked to carry an autograd history when its input does
    (the overlapped backward launches a block's rail step from that input's gradient)."""
    if inp.requires_grad and torch.is_grad_enabled() and out.grad_fn is None:
        raise ValueError(
            "expert_fn returned a tensor without autograd history for a block whose input requires grad; "
            "compute the output from the input rows (an empty block too: run the experts on the 0-row input)"
        )
    return out


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan: Plan):
        ctx.plan = plan
        return plan.broadcast(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.plan.reduce(grad.contiguous()), None


class _EncodedBroadcast(torch.autograd.Function):
    """:class:`_Broadcast` with the rows encoded on the way (:mod:`.row_codec`): ``x [s, d]`` -> decoded
    ``[num_pairs, d]``; the backward is the plain reduce (the codec passes gradients straight through)."""

    @staticmethod
    def forward(ctx, x, plan: Plan, codec: RowCodec):
        ctx.plan = plan
        return codec.decode(plan.broadcast(codec.encode(x)), x.shape[1], x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return ctx.plan.reduce(grad.contiguous()), None, None


class _Reduce(torch.autograd.Function):
    """The plan's reduce; its backward broadcasts the output gradient, encoded by ``codec`` if one is given
    (the dispatch direction)."""

    @staticmethod
    def forward(ctx, y, plan: Plan, codec: RowCodec | None):
        ctx.plan, ctx.codec = plan, codec
        return plan.reduce(y)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if ctx.codec is None:
            return ctx.plan.broadcast(grad), None, None
        return ctx.codec.decode(ctx.plan.broadcast(ctx.codec.encode(grad)), grad.shape[1], grad.dtype), None, None


class _PairWeights(torch.autograd.Function):
    """``weights [s, k]`` -> ``[num_pairs]``: the values travelled with the plan's metadata; each pair's
    gradient goes straight back to its (token, slot) (:meth:`Plan.pair_values_to_slots`: one slot, one
    pair, so no sums are involved)."""

    @staticmethod
    def forward(ctx, weights, plan: Plan):
        ctx.plan, ctx.k, ctx.dtype = plan, weights.shape[1], weights.dtype
        return plan.combine_weights().clone()

    @staticmethod
    def backward(ctx, grad):
        return ctx.plan.pair_values_to_slots(grad, ctx.k).to(ctx.dtype), None


@dataclass(frozen=True)
class DispatchHandle:
    """What :meth:`TokenDispatcher.combine` needs from its dispatch.

    Attributes:
        plan: the routing plan (indices, split sizes).
        pair_weights: ``[num_pairs]`` fp32 combine weight of each expert row (carries autograd).
        tokens_per_expert: rows per local expert (host ints), the grouping of ``expert_input``.
        hidden_shape: the caller's token tensor shape, restored by combine.
    """

    plan: Plan
    pair_weights: torch.Tensor
    tokens_per_expert: tuple[int, ...]
    hidden_shape: torch.Size


@dataclass
class TrafficCounter:
    """Bytes this rank sent, summed since the last :meth:`reset` (per layer: one counter per
    dispatcher). ``dispatch_*`` count token rows out (encoded bytes under a ``dispatch_format`` codec),
    ``combine_*`` count result rows back."""

    dispatch_inter_bytes: int = 0
    dispatch_intra_bytes: int = 0
    combine_inter_bytes: int = 0
    combine_intra_bytes: int = 0
    calls: int = 0

    @property
    def inter_bytes(self) -> int:
        return self.dispatch_inter_bytes + self.combine_inter_bytes

    @property
    def intra_bytes(self) -> int:
        return self.dispatch_intra_bytes + self.combine_intra_bytes

    def reset(self) -> None:
        self.dispatch_inter_bytes = self.dispatch_intra_bytes = 0
        self.combine_inter_bytes = self.combine_intra_bytes = 0
        self.calls = 0

    def to_dict(self) -> dict:
        return {
            "dispatch_inter_bytes": self.dispatch_inter_bytes,
            "dispatch_intra_bytes": self.dispatch_intra_bytes,
            "combine_inter_bytes": self.combine_inter_bytes,
            "combine_intra_bytes": self.combine_intra_bytes,
            "inter_bytes": self.inter_bytes,
            "intra_bytes": self.intra_bytes,
            "calls": self.calls,
        }


class TokenDispatcher:
    """Hierarchical (or flat) all-to-all dispatch over one expert-parallel group.

    Args:
        groups: from :func:`locmoe_plugin.comm.build_comm_groups`.
        mode: ``"hierarchical"`` (default: the two-stage rail + node plan on a group spanning nodes; on a
            one-node group the single-stage pairs plan, see :func:`resolve_mode`), ``"flat"`` (one
            EP-wide all-to-all of (token, expert) pairs, sums in the same fixed tree, bitwise equal to
            the two-stage plan) or ``"flat_fast"`` (the same pairs with one gather per side: the
            Megatron-style dispatcher; deterministic, but its sums are not the node/rank tree) or
            ``"allgather"`` (one-node EP groups only, refused across nodes with a :class:`ConfigError`: every
            token all-gathered, the local pairs selected, combined by an index-add and a reduce-scatter,
            as Megatron's allgather dispatcher; deterministic, allclose to the other plans, see
            :mod:`.allgather_plan`).
        exact_tree: build the mode as named on every topology (the two-stage plan on one node too), so
            ``"hierarchical"`` and ``"flat"`` agree bitwise; for checks, not for speed.
        overlap: split the two-stage plan by origin (:mod:`.origin_split`) so the inter-node (rail)
            transfer of rows from and to other nodes runs while this node's rows move and compute.
            Only the hierarchical plan on a group spanning nodes has an inter-node stage to hide; elsewhere
            it is a no-op (``overlap_active`` says which); a layer call whose count table shows no row
            crossing nodes runs the unsplit plan too. Results are bitwise equal either way.
        equal_tokens: the caller guarantees that every EP rank passes the same number of tokens in every
            call (Megatron does). The ``"allgather"`` plan then sizes its routing all-gather locally and
            exchanges no counts (:mod:`.gathered_routing`: one collective fewer, bitwise the same results);
            other modes ignore it. A rank with another count cannot be recovered from (gloo aborts, NCCL
            may wait forever), so leave it False where token counts may differ.
        dispatch_format: ``"native"``, ``"fp8"`` or ``"int8"``: how rows travel in the dispatch direction
            (:mod:`.row_codec`; with ``overlap`` too: the overlapped routes move encoded rows,
            :mod:`.overlap`). Only on an EP group spanning nodes: inside one node every row moves over
            NVLink / HCCS, where encoding and decoding cost more than the bytes they save (measured in
            ``benchmarks/RESULTS.md``), so there the rows travel native.

    Attributes:
        plan_mode: the plan actually built (:func:`resolve_mode`).
        overlap_active: whether plans are split by origin (``overlap`` on a hierarchical plan across nodes).
        gathers_routing: whether the count exchange is the routing all-gather itself (``"allgather"`` with
            ``equal_tokens``); then :meth:`start_counts` needs the combine weights.
        codec: the :class:`.row_codec.RowCodec` in use (None for ``"native"`` and on one node).
    """

    def __init__(self, groups: CommGroups, mode: str = "hierarchical", exact_tree: bool = False,
                 overlap: bool = False, equal_tokens: bool = False, dispatch_format: str = "native") -> None:
        if mode not in MODES:
            raise ValueError(f"dispatcher mode {mode!r} is not one of {MODES}")
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap={overlap!r} must be True or False")
        codec = row_codec(dispatch_format)
        if mode == "allgather" and groups.topology.num_nodes > 1:
            # refused, not replaced by the default: the user asked for one collective pattern by name, and
            # a plan that silently differs across nodes would make timings and numerics compare other things
            raise ConfigError(ALLGATHER_ACROSS_NODES_ERROR.format(nodes=groups.topology.num_nodes))
        self.groups = groups
        self.mode = mode
        self.plan_mode = resolve_mode(mode, groups.topology, exact_tree)
        self.overlap = overlap
        self.overlap_active = overlap and self.plan_mode == "hierarchical" and groups.topology.num_nodes > 1
        self.gathers_routing = self.plan_mode == "allgather" and bool(equal_tokens)
        self.dispatch_format = dispatch_format
        self.codec = codec if groups.topology.num_nodes > 1 else None
        self.traffic = TrafficCounter()
        self.order_hook = None  # test-only: permutes the rail-level sum order of split plans

    @property
    def topology(self):
        return self.groups.topology

    def start_counts(self, expert_ids: torch.Tensor, folded=None,
                     weights: torch.Tensor | None = None) -> "RoutingCounts | GatheredRouting":
        """The device half of the count exchange (all-gather and an asynchronous copy to the host, no
        host wait): call early (Megatron: ``dispatch_preprocess``) and pass the result to :meth:`prepare`.
        With :attr:`gathers_routing` the exchange is the routing all-gather itself
        (:class:`.gathered_routing.GatheredRouting`), which carries ``weights [s, k]`` (required then).

        ``folded``: a router forward's :class:`~locmoe_plugin.folded_counts.FoldedCounts` (its
        ``RouterOutput.pending``): its bins ride in this rank's row of the table and it is completed right
        after the all-gather, on the device (aux loss, expert-bias and budget steps; no host wait), so the
        router needs no all-reduce of its own. Every EP rank passes one or none alike (the router's choice
        depends on settings and the training mode only)."""
        extra = None if folded is None else folded.extra_bins
        if self.gathers_routing:
            if weights is None:
                raise ValueError("an allgather dispatcher with equal_tokens=True gathers the combine weights with "
                                 "the routing: pass start_counts(expert_ids, weights=weights)")
            counts = GatheredRouting(self.groups, expert_ids.long(), weights, extra)
        else:
            counts = start_counts(expert_ids, self.groups, self.plan_mode, extra)
        if folded is not None:
            folded.complete(counts)
        return counts

    def prepare(self, expert_ids: torch.Tensor, weights: torch.Tensor,
                counts: "RoutingCounts | GatheredRouting | None" = None) -> Plan:
        """Build the routing plan (the count exchange's one host wait; the flat plan's metadata exchange)
        without moving payload; pass it to :meth:`dispatch` as ``plan``. ``counts``: from
        :meth:`start_counts`.

        The hierarchical plan, split by origin or not, exchanges no metadata here: each hop's rows carry
        theirs packed behind the payload, and the receive side is built when they arrive."""
        if counts is None:
            counts = self.start_counts(expert_ids, weights=weights)
        if isinstance(counts, GatheredRouting):
            return build_gathered_plan(counts, self.groups)
        # nothing crosses nodes anywhere in the EP group (every rank reads the same table, so all ranks
        # agree): nothing to hide, the unsplit plan costs less (one expert call, fewer gathers)
        if self.overlap_active and crosses_nodes(counts.wait_host(), self.topology):
            expert_ids = expert_ids.long()
            split = build_origin_split(expert_ids, weights, self.groups, counts)
            split.order_hook = self.order_hook
            t = self.topology
            return Plan(hops=(), num_tokens=expert_ids.shape[0], pair_weight=None,
                        tokens_per_expert=tokens_per_local_expert(counts, t), traffic=hierarchical_traffic(counts, t), mode="hierarchical", origin_split=split)
        return build_plan(expert_ids, self.groups, self.plan_mode, weights, counts=counts)

    def dispatch(
        self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, plan: Plan | None = None
    ) -> tuple[torch.Tensor, DispatchHandle]:
        """Send token rows to the ranks of their experts.

        Args:
            hidden: ``[..., d]`` tokens of this rank (flattened to ``[s, d]``).
            expert_ids: ``[s, k]`` int64 expert of each slot, ``-1`` = not routed (dropped).
            weights: ``[s, k]`` combine weight of each slot (0 where the id is -1); autograd flows.

        Returns:
            ``expert_input [num_pairs, d]`` grouped by local expert (``handle.tokens_per_expert``
            rows each, in order), and the handle for :meth:`combine`.
        """
        d = hidden.shape[-1]
        x = hidden.reshape(-1, d)
        if expert_ids.dim() != 2 or expert_ids.shape[0] != x.shape[0] or weights.shape != expert_ids.shape:
            raise ValueError(
                f"expert_ids {tuple(expert_ids.shape)} and weights {tuple(weights.shape)} must both be "
                f"[tokens, k] with tokens = {x.shape[0]} (hidden {tuple(hidden.shape)})"
            )
        if plan is None:
            plan = self.prepare(expert_ids, weights)
        expert_input, pair_w = self.send(x, weights, plan)
        return expert_input, DispatchHandle(plan, pair_w, plan.tokens_per_expert, hidden.shape)

    def send(self, x: torch.Tensor, weights: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """The payload half of :meth:`dispatch`: ``x [s, d]`` -> ``expert_input [num_pairs, d]`` and the
        pairs' combine weights ``[num_pairs]`` fp32 (autograd to ``weights [s, k]``)."""
        if plan.origin_split is not None:
            expert_input = broadcast_split(x, plan.origin_split, self.codec)
        elif self.codec is not None:
            expert_input = _EncodedBroadcast.apply(x, plan, self.codec)
        else:
            expert_input = _Broadcast.apply(x, plan)
        pair_w = _PairWeights.apply(weights.float(), plan)
        self._count_traffic(plan, x, dispatch=True)
        return expert_input, pair_w

    def reduce(self, rows: torch.Tensor, plan: Plan) -> torch.Tensor:
        """The payload half of :meth:`combine`, without weights: ``rows [num_pairs, d]`` -> ``[s, d]``."""
        if plan.origin_split is not None:
            out = reduce_split(rows, plan.origin_split, self.codec)
        else:
            out = _Reduce.apply(rows, plan, self.codec)
        self._count_traffic(plan, rows, dispatch=False)
        return out

    def combine(self, expert_output: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Weight each expert row by its combine weight and sum back to the tokens.

        ``expert_output [num_pairs, d]`` in the order of ``expert_input`` -> ``[..., d]`` like the
        dispatched hidden states. Dropped slots contribute nothing; a token with no kept slot gets 0.
        """
        weighted = expert_output * handle.pair_weights.unsqueeze(1).to(expert_output.dtype)
        out = self.reduce(weighted, handle.plan)
        return out.reshape(handle.hidden_shape[:-1] + (expert_output.shape[-1],))

    def forward(
        self,
        hidden: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        expert_fn: Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor],
        chunks: int | None = None,
        mark: Callable[[str], None] | None = None,
        folded=None,
    ) -> torch.Tensor:
        """Dispatch, run ``expert_fn(expert_input, tokens_per_expert)``, combine.

        With the overlap active (``overlap=True``, hierarchical plan across nodes) the experts run once per
        origin node: on this node's rows while the other nodes' rows cross the network, then on each other
        node's block (one block per other node, all moved by one rail collective, :mod:`.rail_steps`)::

            launch the rail transfer of the remote rows | local node hop, local experts
            wait; per block: its node hop, its experts
            per block: reduce in the node; launch the rail return | local reduce
            wait; sum every token's node copies in node order

        Backward: the rail steps returning the remote rows' gradients are launched before the local
        experts' backward and waited after it. ``expert_fn`` must treat rows independently (as expert MLPs do):
        then the result equals the unsplit call bit for bit. Its output must be computed from its input
        (autograd-connected, also for an empty block): a block's backward rail step is launched when the
        gradient reaches that block's input, so an output cut off from it would leave the step unlaunched on
        this rank while the others wait; an output without an autograd history is refused. ``chunks`` was the old chunked overlap: pass
        ``overlap=True`` to the constructor instead. ``folded``: the router's pending counts
        (``RouterOutput.pending``), completed in the count exchange (:meth:`start_counts`). ``mark(name)``: called (host side) at
        ``"rail_launched"``, ``"local_experts_start"``, ``"local_experts_end"`` and ``"rail_waited"`` (the
        last block arrived) of the overlapped path, e.g. to record device events for a timeline.
        """
        if chunks is not None:
            raise ValueError(
                f"chunks={chunks!r}: the chunked overlap is gone; construct TokenDispatcher(..., overlap=True) "
                f"(rows from other nodes travel while this node's rows compute)"
            )
        d = hidden.shape[-1]
        x = hidden.reshape(-1, d)
        plan = None
        if self.overlap_active or folded is not None:
            plan = self.prepare(expert_ids, weights, self.start_counts(expert_ids, folded, weights))
        if plan is None or plan.origin_split is None:
            inp, handle = self.dispatch(x, expert_ids, weights, plan)
            out = self.combine(expert_fn(inp, handle.tokens_per_expert), handle)
            return out.reshape(hidden.shape[:-1] + (out.shape[-1],))
        split = plan.origin_split
        self._count_traffic(plan, x, dispatch=True)
        mark = mark or (lambda name: None)
        blocks = dispatch_blocks(x, split, self.codec)  # consumed lazily: a block's experts run before the next wait
        node, local_in = next(blocks)
        mark("rail_launched")
        mark("local_experts_start")
        outs = {node: _connected(expert_fn(local_in, split.local.tokens_per_expert), local_in)}
        mark("local_experts_end")
        for i, (origin, pairs) in enumerate(blocks):
            if i == len(split.steps) - 1:
                mark("rail_waited")
            outs[origin] = _connected(expert_fn(pairs, split.routes[origin].tokens_per_expert), pairs)
        pair_w = _PairWeights.apply(weights.float(), plan)  # the remote pairs' weights arrived with their rows
        weighted = {b: y * pair_w.index_select(0, split.positions[b]).unsqueeze(1).to(y.dtype) for b, y in outs.items()}
        out = combine_blocks(weighted, split, self.codec)
        self._count_traffic(plan, out, dispatch=False)
        return out.reshape(hidden.shape[:-1] + (out.shape[-1],))

    def _count_traffic(self, plan: Plan, rows: torch.Tensor, dispatch: bool) -> None:
        if dispatch and self.codec is not None:
            inter, intra = plan.traffic.bytes(self.codec.row_bytes(rows.shape[-1]), 1)
        else:
            inter, intra = plan.traffic.bytes(rows.shape[-1], rows.element_size())
        if dispatch:
            self.traffic.dispatch_inter_bytes += inter
            self.traffic.dispatch_intra_bytes += intra
            self.traffic.calls += 1
        else:
            self.traffic.combine_inter_bytes += inter
            self.traffic.combine_intra_bytes += intra
