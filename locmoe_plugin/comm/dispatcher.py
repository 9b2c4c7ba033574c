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

from ..device import get_accelerator
from .groups import CommGroups
from .build import build_plan
from .plan import Plan

MODES = ("hierarchical", "flat", "flat_fast")


def resolve_mode(mode: str, topology, exact_tree: bool = False) -> str:
    """The plan :class:`TokenDispatcher` builds for a requested mode on a topology.

    On an EP group that fits in one node, ``"hierarchical"`` has no inter-node stage: its only work would
    be deduplicating rows per destination rank over NVLink, and on one node the dispatch is bound by the
    host's kernel launches, not by bytes (``benchmarks/RESULTS.md``, 2 x H200: the two-stage plan took
    1.07-1.45 x the pairs plan's time on one node). So there it runs ``"flat_fast"``, the single-stage
    pairs plan with the fewest host ops (Megatron's alltoall dispatcher sends the same pairs); on groups
    spanning nodes, the two-stage plan. ``exact_tree=True`` keeps every mode as named: the two-stage plan
    on one node too, whose sums follow the same node / rank / expert tree as ``"flat"`` (bitwise equal
    outputs and gradients, what ``locmoe check-comm`` and the parity tests compare).
    """
    if mode == "hierarchical" and topology.num_nodes == 1 and not exact_tree:
        return "flat_fast"
    return mode


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan: Plan):
        ctx.plan = plan
        return plan.broadcast(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.plan.reduce(grad.contiguous()), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, plan: Plan):
        ctx.plan = plan
        return plan.reduce(y)

    @staticmethod
    def backward(ctx, grad):
        return ctx.plan.broadcast(grad.contiguous()), None


class _PairWeights(torch.autograd.Function):
    """``weights [s, k]`` -> ``[num_pairs]``: the values travelled with the plan's metadata; each pair's
    gradient goes straight back to its (token, slot) (:meth:`Plan.pair_values_to_slots`: one slot, one
    pair, so no sums are involved)."""

    @staticmethod
    def forward(ctx, weights, plan: Plan):
        ctx.plan, ctx.k, ctx.dtype = plan, weights.shape[1], weights.dtype
        return plan.pair_weight.clone()

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
    dispatcher). ``dispatch_*`` count token rows out, ``combine_*`` count result rows back."""

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
            Megatron-style dispatcher; deterministic, but its sums are not the node/rank tree).
        exact_tree: build the mode as named on every topology (the two-stage plan on one node too), so
            ``"hierarchical"`` and ``"flat"`` agree bitwise; for checks, not for speed.

    Attributes:
        plan_mode: the plan actually built (:func:`resolve_mode`).
    """

    def __init__(self, groups: CommGroups, mode: str = "hierarchical", exact_tree: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"dispatcher mode {mode!r} is not one of {MODES}")
        self.groups = groups
        self.mode = mode
        self.plan_mode = resolve_mode(mode, groups.topology, exact_tree)
        self.traffic = TrafficCounter()

    @property
    def topology(self):
        return self.groups.topology

    def prepare(self, expert_ids: torch.Tensor, weights: torch.Tensor) -> Plan:
        """Build the routing plan (the count exchange, its one host sync, the metadata exchange)
        without moving payload; pass it to :meth:`dispatch` as ``plan``."""
        return build_plan(expert_ids, self.groups, self.plan_mode, weights)

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
        expert_input = _Broadcast.apply(x, plan)
        pair_w = _PairWeights.apply(weights.float(), plan)
        inter, intra = plan.traffic.bytes(x.shape[-1], x.element_size())
        self.traffic.dispatch_inter_bytes += inter
        self.traffic.dispatch_intra_bytes += intra
        self.traffic.calls += 1
        return expert_input, pair_w

    def reduce(self, rows: torch.Tensor, plan: Plan) -> torch.Tensor:
        """The payload half of :meth:`combine`, without weights: ``rows [num_pairs, d]`` -> ``[s, d]``."""
        out = _Reduce.apply(rows, plan)
        inter, intra = plan.traffic.bytes(rows.shape[-1], rows.element_size())
        self.traffic.combine_inter_bytes += inter
        self.traffic.combine_intra_bytes += intra
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
        chunks: int = 1,
    ) -> torch.Tensor:
        """Dispatch, run ``expert_fn(expert_input, tokens_per_expert)``, combine; pipelined in chunks.

        The tokens are split into ``chunks`` contiguous chunks (each with its own plan). On a GPU or
        NPU, chunk c+1's dispatch (its inter-node transfer first) runs on a side stream while the
        experts compute chunk c on the current stream and chunk c-1's combine runs on a third stream;
        autograd replays each op on the stream it ran on, so the backward overlaps the same way. On
        CPU, or with ``chunks=1``, the chunks run one after another. Results equal the unchunked call
        up to the expert function's own dependence on batch composition (none for row-wise MLPs).
        """
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks={chunks!r} must be an integer >= 1 (1 = no overlap)")
        d = hidden.shape[-1]
        x = hidden.reshape(-1, d)
        s = x.shape[0]
        # every rank must use the same number of chunks (each chunk is a collective); empty chunks are fine
        bounds = [(c * s) // chunks for c in range(chunks + 1)]
        parts = [slice(bounds[c], bounds[c + 1]) for c in range(chunks)]
        acc = get_accelerator(x.device.type)
        if acc.is_cpu or chunks == 1:
            outs = []
            for sl in parts:
                inp, handle = self.dispatch(x[sl], expert_ids[sl], weights[sl])
                outs.append(self.combine(expert_fn(inp, handle.tokens_per_expert), handle))
            return torch.cat(outs).reshape(hidden.shape[:-1] + (outs[0].shape[-1],))

        main, s_disp, s_comb = acc.current_stream(), acc.Stream(), acc.Stream()
        s_disp.wait_stream(main)
        s_comb.wait_stream(main)
        with acc.stream(s_disp):
            plans = [self.prepare(expert_ids[sl], weights[sl]) for sl in parts]

        def launch(c):
            with acc.stream(s_disp):
                inp, handle = self.dispatch(x[parts[c]], expert_ids[parts[c]], weights[parts[c]], plans[c])
                done = acc.Event()
                done.record(s_disp)
            return inp, handle, done

        outs = []
        pending = launch(0)
        for c in range(chunks):
            inp, handle, done = pending
            if c + 1 < chunks:
                pending = launch(c + 1)  # its transfers overlap the expert compute below
            main.wait_event(done)
            inp.record_stream(main)
            out = expert_fn(inp, handle.tokens_per_expert)
            s_comb.wait_stream(main)
            out.record_stream(s_comb)
            with acc.stream(s_comb):
                y = self.combine(out, handle)
            outs.append(y)
        main.wait_stream(s_comb)
        for y in outs:
            y.record_stream(main)
        return torch.cat(outs).reshape(hidden.shape[:-1] + (outs[0].shape[-1],))
