"""``build_plan``: one count exchange, then the builder of the requested plan kind.

Every builder has the same interface, ``(expert_ids [s, k] int64, weights [s, k], groups, counts) ->
Plan``, and reads its split sizes from the one :class:`.counts.RoutingCounts` exchange.
"""

from __future__ import annotations

from typing import Callable

import torch

from .allgather_plan import build_allgather_plan
from .counts import RoutingCounts
from .flat_plan import build_flat_plan
from .groups import CommGroups
from .hierarchical_plan import build_hierarchical_plan
from .pairs_plan import build_pairs_plan, pairs_source_order
from .plan import Plan

PlanBuilder = Callable[[torch.Tensor, torch.Tensor, CommGroups, RoutingCounts], Plan]

PLAN_MODES = ("hierarchical", "flat", "flat_fast", "allgather")
PER_PAIR_COUNT_MODES = ("flat_fast", "allgather")  # count pairs per expert only (no per-token levels)


def _build_flat_fast(expert_ids, weights, groups, counts, source=None) -> Plan:
    """``counts`` started with ``per_token=False`` (it runs the pairs' counting sort)."""
    if source is None:
        source = pairs_source_order(counts, weights)
    return build_pairs_plan(expert_ids, groups, counts, source)


PLAN_BUILDERS: dict[str, PlanBuilder] = {
    "hierarchical": build_hierarchical_plan,
    "flat": build_flat_plan,
    "flat_fast": _build_flat_fast,
    "allgather": build_allgather_plan,
}


def check_mode(mode: str) -> None:
    if mode not in PLAN_MODES:
        raise ValueError(f"dispatch mode {mode!r} is not one of {', '.join(map(repr, PLAN_MODES))}")


def start_counts(expert_ids: torch.Tensor, groups: CommGroups, mode: str,
                 extra: torch.Tensor | None = None) -> RoutingCounts:
    """The device half of the count exchange for ``mode`` (no host wait; see :mod:`.counts`); ``extra [m]``
    int64 bins ride along in this rank's row (:meth:`.counts.RoutingCounts.extra_columns`)."""
    expert_ids = expert_ids.long()
    return RoutingCounts.started(groups, expert_ids, expert_ids.shape[1], per_token=mode not in PER_PAIR_COUNT_MODES,
                                 positions=mode == "flat_fast",  # only the pairs plan sends from these positions
                                 extra=extra)


def build_plan(
    expert_ids: torch.Tensor, groups: CommGroups, mode: str = "hierarchical", weights: torch.Tensor | None = None,
    counts: RoutingCounts | None = None,
) -> Plan:
    """Build this rank's plan for ``expert_ids [s, k]`` (int64, -1 = not routed) and combine
    ``weights [s, k]`` (default 1). Collective over the EP group (all-gather of counts; the flat
    plan's metadata all-to-all; the hierarchical plan's metadata moves with its payload later); every EP
    rank must call it.

    ``mode``: ``"hierarchical"``, ``"flat"`` (exact tree), ``"flat_fast"`` or ``"allgather"`` (one node). ``counts``: an exchange
    already started with :func:`start_counts` (same ids and mode); its host wait happens here.
    """
    check_mode(mode)
    expert_ids = expert_ids.long()
    s, k = expert_ids.shape
    if weights is None:
        weights = torch.ones(s, k, device=expert_ids.device)
    if counts is None:
        counts = start_counts(expert_ids, groups, mode)
    # the pairs plan's source order needs only the device half of the counts: queued before the host wait
    source = pairs_source_order(counts, weights) if mode == "flat_fast" else None
    counts.wait_host()  # raises on invalid ids, on every rank alike
    if mode == "flat_fast":
        return _build_flat_fast(expert_ids, weights, groups, counts, source)
    return PLAN_BUILDERS[mode](expert_ids, weights, groups, counts)
