"""The routing-count exchange: one all-gather of every rank's histogram, read on the host once.

Every plan sizes its all-to-alls and index work from these counts. The exchange runs in two halves so
a framework can put work between them (Megatron: ``dispatch_preprocess`` starts it, ``token_dispatch``
waits):

  * :meth:`RoutingCounts.start` - device work only: the per-token histogram, its all-gather over the EP
    group and an asynchronous device-to-host copy of the ``[P * bins]`` table (no host wait);
  * :meth:`RoutingCounts.wait_host` - the plan's one host sync (``# device-to-host sync: split sizes``),
    then pure host arithmetic.

Every rank sees the same table, so host-side decisions taken from it (raise on bad ids, skip an empty
collective) are taken by all ranks alike and nothing hangs.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.distributed as dist

from ..device import get_accelerator
from ..topology import Topology
from .counting_sort import EXTRA_BINS, count_pairs, slot_bins
from .groups import CommGroups


def _all_gather_single_fn():
    """Newer torch (2.13 here) names it ``all_gather_single`` and warns on ``all_gather_into_tensor``;
    older torch has only the old name. The new one is taken only with the ``(output, input, group)``
    signature the plan calls it with."""
    fn = getattr(dist, "all_gather_single", None)
    try:
        params = list(inspect.signature(fn).parameters)[:3] if fn is not None else []
    except (TypeError, ValueError):
        params = []
    return fn if params == ["output_tensor", "input_tensor", "group"] else dist.all_gather_into_tensor


ALL_GATHER_SINGLE = _all_gather_single_fn()

SRC_SHIFT = 1 << 31  # source key = ep_rank * SRC_SHIFT + token index (tokens per rank < 2**31)


@functools.lru_cache(maxsize=64)
def topology_tensors(t: Topology, device: torch.device) -> dict[str, torch.Tensor]:
    """Index tensors that depend only on the topology, made once per device: building them from
    Python lists in every call would be a host-to-device copy (a hidden sync) per dispatch."""
    node_order = node_major_ranks(t)
    local_of = torch.full((t.ep_size + 1,), t.ranks_per_node, dtype=torch.long)  # phantom: not this node
    local_of[list(t.ranks_of_node(t.node))] = torch.arange(t.ranks_per_node)
    ranks_ib = [[t.ranks_of_node(b)[i] for b in range(t.num_nodes)] for i in range(t.ranks_per_node)]
    local_col = torch.full((t.num_experts + 1,), t.experts_per_rank, dtype=torch.long)  # id + 1 -> local expert
    local_col[1 + t.ep_rank * t.experts_per_rank : 1 + (t.ep_rank + 1) * t.experts_per_rank] = torch.arange(
        t.experts_per_rank
    )
    # expert id -> local index on this node of the rank holding it; R elsewhere, and at index E, which a
    # -1 (not routed) reads through advanced indexing's wrap-around
    node_local_of_expert = local_of[torch.arange(t.num_experts + 1) // t.experts_per_rank]
    node_local_of_expert[t.num_experts] = t.ranks_per_node
    return {
        "node_local_of_expert": node_local_of_expert.to(device),  # [E + 1]
        "local_expert_pattern": torch.arange(t.experts_per_rank).repeat(t.ep_size).to(device),  # [P * E_r]
        "local_col": local_col.to(device),  # (expert id + 1) -> this rank's local expert, or E_r (id -1 / elsewhere)
        "arange": torch.arange(t.num_experts, device=device),  # [:k] (k <= E)
        "ranks_node_major": torch.tensor(node_order, device=device),
        "local_of": local_of.to(device),
        "node_of_rank": torch.tensor(t.node_of_rank, device=device),  # [P] node of each EP rank
        "q_ib": torch.tensor(ranks_ib, device=device),  # [R, N]: EP rank of local index i on node b
    }


@functools.lru_cache(maxsize=64)
def count_layout(t: Topology, k: int, device: torch.device) -> dict:
    """Bins of the routing-count histogram (see :class:`RoutingCounts`) and their device offsets."""
    max_nodes, max_ranks, max_experts = min(t.num_nodes, k), min(t.ranks_per_node, k), min(t.experts_per_rank, k)
    node_rank_at = max_nodes + 1
    rank_expert_at = node_rank_at + t.num_nodes * (max_ranks + 1)
    expert_at = rank_expert_at + t.ep_size * (max_experts + 1)
    return {
        "levels": (max_nodes, max_ranks, max_experts),
        "node_rank_bins": node_rank_at, "rank_expert_bins": rank_expert_at, "expert_bins": expert_at,
        "bins": expert_at + t.num_experts + EXTRA_BINS,
        "node_rank_offsets": (node_rank_at + torch.arange(t.num_nodes) * (max_ranks + 1)).to(device),
        "rank_expert_offsets": (rank_expert_at + torch.arange(t.ep_size) * (max_experts + 1)).to(device),
        "one": torch.ones((), dtype=torch.long, device=device),
        "node_major_is_identity": list(node_major_ranks(t)) == list(range(t.ep_size)),
    }


@functools.lru_cache(maxsize=64)
def pairs_count_layout(num_experts: int) -> dict:
    """Bins of the flat_fast plan's histogram: pairs per expert only (no per-token, per-node, per-rank
    levels), then :data:`.counting_sort.EXTRA_BINS`, then one more bin: the most slots in one (expert,
    token) cell, from the counting sort. Made once per expert count (never mutated)."""
    return {"bins": num_experts + EXTRA_BINS + 1, "expert_bins": 0, "node_rank_bins": 0, "rank_expert_bins": 0,
            "levels": (0, 0, 0)}


def host_ints_to_device(values, device: torch.device) -> torch.Tensor:
    """Host ints (a list, or a list of equal-length lists) -> int64 tensor on ``device``, without a host
    wait: on an accelerator the values go through pinned memory, copied asynchronously. For per-call
    tables derived from the count table (which the plan has already read on the host, so such a plan is
    never captured in a graph)."""
    table = torch.tensor(values, dtype=torch.long)
    if device.type == "cpu":
        return table
    return table.pin_memory().to(device, non_blocking=True)


def invalid_ids_error(num_experts: int, ranks: list[int]) -> ValueError:
    """The error every rank raises alike for expert ids outside ``[-1, E)`` on ``ranks``."""
    return ValueError(f"expert ids outside [-1, {num_experts}) on EP rank(s) {ranks}: ids must be expert indices "
                      f"or -1 (dropped)")


def repeated_ids_error(ranks: list[int]) -> ValueError:
    """The error every rank raises alike for a token listing one expert twice on ``ranks``."""
    return ValueError(f"a token lists one expert in two of its slots on EP rank(s) {ranks}: the k expert ids of a "
                      f"token must be distinct (mark an unused slot -1)")


def node_major_ranks(t: Topology) -> list[int]:
    return [r for n in range(t.num_nodes) for r in t.ranks_of_node(n)]


class RoutingCounts:
    """Every rank's routing counts, all-gathered once and read on the host (the plan's one sync).

    Host lists, indexed by source EP rank first:
      * ``rows_to_node [P][N]``: token rows each rank sends to each node (one per token and node);
      * ``rows_to_rank [P][P]``: (token, rank) rows each rank's tokens need on each EP rank;
      * ``pairs_to_expert [P][E]``: (token, expert) pairs each rank routes to each expert;
      * ``slots_per_rank [P]``: each rank's ``tokens * k`` (routed or not);
      * copy levels for the fixed-order reduces: ``node_copies [P][node_levels]`` tokens with more
        than c destination nodes; ``rank_copies_on_node [P][N][rank_levels]`` tokens with more than c
        ranks on node b; ``expert_copies_on_rank [P][P][expert_levels]`` tokens with more than c
        experts on rank q.

    On the device it is one histogram: per token, its number of nodes, its ranks on each node and its
    experts on each rank (each clamped to its level count), and its slot bins (expert ids; -1 and invalid
    ids in three extra bins, :func:`.counting_sort.slot_bins`), scatter-added into one int64 vector; the
    host turns those histograms into the counts above. ``extra [m]`` int64 (optional): bins a caller appends
    to this rank's row, identical in size on every rank (the router's folded counts:
    :mod:`locmoe_plugin.folded_counts`); the plan never reads them (:meth:`extra_columns`). ``node_mask [s, N]``: the nodes each token needs
    (the rail hop's mask). ``per_token=False`` (the flat_fast plan) counts only the pairs per expert
    (``C``), from the pairs plan's counting sort (``pairs_before``, ``slot_bins``: see
    :mod:`.counting_sort`), plus one more bin, the most slots one (token, expert) cell holds, so that a
    token listing one expert twice raises on every rank."""

    @classmethod
    def started(cls, groups: CommGroups, expert_ids: torch.Tensor, k: int, per_token: bool = True,
                positions: bool = True, extra: torch.Tensor | None = None) -> "RoutingCounts":
        """The device half only; call :meth:`wait_host` before reading the host lists. ``positions=False``
        (with ``per_token=False``): the histogram without the pairs' send positions (``pairs_before`` None).
        ``extra [m]`` int64: bins appended to this rank's row (same ``m`` on every rank)."""
        counts = cls()
        counts.start(groups, expert_ids, k, per_token, positions, extra)
        return counts

    def start(self, groups: CommGroups, expert_ids: torch.Tensor, k: int, per_token: bool = True,
              positions: bool = True, extra: torch.Tensor | None = None) -> None:
        t = groups.topology
        s = expert_ids.shape[0]
        dev = expert_ids.device
        lay = count_layout(t, k, dev)
        self.node_levels, self.rank_levels, self.expert_levels = max_nodes, max_ranks, max_experts = lay["levels"]
        n, p, e, e_r = t.num_nodes, t.ep_size, t.num_experts, t.experts_per_rank
        one = lay["one"]
        id_keys = slot_bins(expert_ids, e)  # [s, k]: expert id, or e / e + 1 (invalid), e + 2 (-1)
        self.slot_bins = id_keys
        self.pairs_before = None
        if not per_token:
            lay = pairs_count_layout(e)
            self.node_levels = self.rank_levels = self.expert_levels = max_nodes = max_ranks = max_experts = 0
            self.rank_mask = self.node_mask = None
            self.pairs_before, local = count_pairs(id_keys, e, one, positions=positions)  # its histogram: this rank's row
        else:
            valid = id_keys < e
            rank = torch.where(valid, expert_ids // e_r, p)
            per_rank = torch.zeros(s, p + 1, dtype=torch.long, device=dev).scatter_add_(1, rank, one.expand(s, k))[:, :p]
            used = per_rank > 0
            self.rank_mask = used  # [s, P] the EP ranks each token needs (EP order)
            if n == 1:
                per_node = used.sum(1, keepdim=True)
            else:
                if not lay["node_major_is_identity"]:
                    used = used.index_select(1, topology_tensors(t, dev)["ranks_node_major"])
                per_node = used.reshape(s, n, t.ranks_per_node).sum(-1)
            self.node_mask = per_node > 0
            keys = torch.cat(
                [
                    self.node_mask.sum(1, keepdim=True).clamp_max(max_nodes),
                    per_node.clamp_max(max_ranks) + lay["node_rank_offsets"],
                    per_rank.clamp_max(max_experts) + lay["rank_expert_offsets"],
                    id_keys + lay["expert_bins"],
                ],
                1,
            ).reshape(-1)
            local = torch.zeros(lay["bins"], dtype=torch.long, device=dev).scatter_add_(0, keys, one.expand(keys.numel()))
        bins = lay["bins"]
        if extra is not None:  # after every bin the plan reads: the plan's offsets stay as they are
            local = torch.cat([local, extra])
            bins += extra.numel()
        self._extra = slice(lay["bins"], bins)
        if groups.ep is not None and t.ep_size > 1:
            table = local.new_empty(t.ep_size * bins)
            ALL_GATHER_SINGLE(table, local, group=groups.ep)
        else:
            table = local
        self._table, self._bins, self._expert_bins = table, bins, lay["expert_bins"]
        self._num_experts = e
        self._per_token, self._num_nodes = per_token, n
        self._layout = lay  # read for its bin offsets only
        acc = get_accelerator(dev.type)
        if acc.is_cpu:
            self._host_table, self._copied = table, None
        else:
            # asynchronous copy into pinned memory; the event marks its end (waited in wait_host)
            self._host_table = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
            self._host_table.copy_(table, non_blocking=True)
            self._copied = acc.Event()
            self._copied.record()
        self._host_ready = False

    @property
    def slots_per_rank(self) -> list[int]:
        """``[P]`` each rank's ``tokens * k`` (routed or not): every slot is in an expert's bin or the -1 bin
        (a table with invalid ids raised in :meth:`wait_host`). Derived on demand: only the allgather
        plan reads it."""
        return [sum(pairs) + none for pairs, none in zip(self.pairs_to_expert, self._not_routed)]

    def wait_host(self) -> "RoutingCounts":
        """Wait for the table on the host and derive the host lists (idempotent)."""
        if self._host_ready:
            return self
        if self._copied is not None:
            self._copied.synchronize()  # device-to-host sync: split sizes (the plan's one host wait)
        flat = self._host_table.tolist()
        self._host_ready = True
        bins = self._bins
        rows = [flat[i * bins : (i + 1) * bins] for i in range(len(flat) // bins)]
        max_nodes, max_ranks, max_experts = self.node_levels, self.rank_levels, self.expert_levels
        node_rank_at, rank_expert_at, expert_at = (self._layout[key] for key in ("node_rank_bins", "rank_expert_bins", "expert_bins"))
        n, p, e = self._num_nodes, len(rows), self._num_experts

        def at_least(hist, levels):  # hist[v] = tokens with value v -> tokens with value > c, c < levels
            return [sum(hist[c + 1 :]) for c in range(levels)]

        if self._per_token:
            self.node_copies = [at_least(r[: max_nodes + 1], max_nodes) for r in rows]
            self.rank_copies_on_node = [[at_least(r[node_rank_at + b * (max_ranks + 1) : node_rank_at + (b + 1) * (max_ranks + 1)], max_ranks) for b in range(n)] for r in rows]
            self.expert_copies_on_rank = [[at_least(r[rank_expert_at + q * (max_experts + 1) : rank_expert_at + (q + 1) * (max_experts + 1)], max_experts) for q in range(p)] for r in rows]
            self.rows_to_node = [[h[0] for h in h2] for h2 in self.rank_copies_on_node]
            self.rows_to_rank = [[h[0] for h in h3] for h3 in self.expert_copies_on_rank]
        self.pairs_to_expert = [r[expert_at : expert_at + e] for r in rows]
        self._not_routed = [r[expert_at + e + EXTRA_BINS - 1] for r in rows]  # the -1 slots of each rank
        bad = [r[expert_at + e] + r[expert_at + e + 1] for r in rows]
        if any(bad):
            # every rank saw the same table: all raise together, nobody hangs in a later collective
            raise invalid_ids_error(e, [i for i, b in enumerate(bad) if b])
        if not self._per_token:
            repeated = [i for i, r in enumerate(rows) if r[expert_at + e + EXTRA_BINS] > 1]
            if repeated:
                raise repeated_ids_error(repeated)
        return self

    @property
    def table(self) -> torch.Tensor:
        """``[P * row_bins]`` int64 on the device, identical on every EP rank. The EP group's pairs per
        expert are ``table.view(P, row_bins)[:, expert_columns()].sum(0)`` (of kept slots: after capacity
        drops, padding included); the router's folded counts ride in their own columns
        (:meth:`extra_columns`, :mod:`locmoe_plugin.folded_counts`)."""
        return self._table

    def expert_columns(self) -> slice:
        """Columns of one rank's row of :attr:`table` that hold its pairs per expert."""
        return slice(self._expert_bins, self._expert_bins + self._num_experts)

    def extra_columns(self) -> slice:
        """Columns of one rank's row of :attr:`table` that hold the ``extra`` bins given to :meth:`start`
        (empty when none were)."""
        return self._extra

    @property
    def row_bins(self) -> int:
        """Bins of one rank's row of :attr:`table` (``table.view(P, row_bins)``), ``extra`` included."""
        return self._bins
