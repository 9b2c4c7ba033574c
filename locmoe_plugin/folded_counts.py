"""The router's EP-wide routing counts taken from the dispatcher's count exchange (no all-reduce of its own).

A router with ``aux_loss_scope="ep_group"`` needs the expert-parallel group's pairs per expert (the aux
loss, the expert bias), the ranks whose logits were not finite (the expert bias and the budget skip such a
batch) and, with a cross-node budget, the pairs that cross nodes. Standalone it all-reduces them
(:meth:`locmoe_plugin.router.LocMoERouter._global_counts`). The dispatcher all-gathers every rank's
routing histogram anyway (:class:`locmoe_plugin.comm.counts.RoutingCounts`), so the router leaves its
count-dependent work in a :class:`FoldedCounts` whose bins ride in that all-gather, and the dispatcher
completes it right after the all-gather, on the device: one collective per layer forward fewer, no host
sync added.

When (:meth:`~locmoe_plugin.router.LocMoERouter.fold_counts_with` decides once, from settings, alike on
every EP rank): ``aux_loss_scope="ep_group"`` on a group that spans nodes, or on one node where the
dispatcher gathers the routing itself (``one_node_too``: the ``allgather`` mode with equal token counts,
whose :class:`~locmoe_plugin.comm.gathered_routing.GatheredRouting` offers the same table interface), and
the dispatcher's EP group is the router's group; per forward, the caller says that the dispatcher follows
(``fold_counts=True``).

What rides: this rank's own numbers, the ones the all-reduce would sum (``[n + 1]`` or ``[n]`` int64,
the same size on every rank): ``[0, n)`` the pairs per expert it requested (before capacity; padding
tokens left out), then, when the expert bias or the budget reads it, 1 if its logits were not all finite.
The plan's own per-expert bins are not reused: they count kept slots (after capacity drops) and padding
tokens, so reading the load from them would be exact only for dropless batches without padding, and
padding would need ``n`` more bins anyway. From the ``[P, row_bins]`` table: the counts are the ``[P, n]``
block's sum over ranks; the crossing pairs its sum over the cells whose expert is on another node than
the source rank.

Numerics: the all-reduce sums fp32 copies of integer counts, exact below 2**24 per expert; here the same
integers are summed in fp32 too. Both give the same fp32 values, so the aux loss (value and gradient), the
expert-bias step and the budget step are bitwise the same as with the all-reduce.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from .topology import Topology


@functools.lru_cache(maxsize=64)
def rank_local_experts(topology: Topology, device: torch.device) -> torch.Tensor:
    """``[P, n]`` bool: expert ``e`` is on the node of EP rank ``r`` (made once per topology and device)."""
    node_of_rank = torch.tensor(topology.node_of_rank)
    return (node_of_rank.unsqueeze(1) == topology.expert_to_node.cpu().unsqueeze(0)).to(device)


class FoldedCounts:
    """A router forward's count-dependent work, completed from the dispatcher's count table.

    Args:
        extra_bins: ``[m]`` int64, this rank's bins for the table (``m`` = n, or n + 1 with ``reads_bad``;
            see the module doc).
        topology: the router's (and dispatcher's) EP topology.
        reads_bad: whether the last extra bin is the non-finite-logits flag.
        crosses: whether the crossing pairs are needed (a cross-node budget that acts).
        finish: ``finish(output, counts [n] fp32, bad 0-d fp32 | None, cross_pairs 0-d fp32 | None)``, the
            router's work on the EP group's counts (the same code its all-reduce path runs).

    ``output`` (the :class:`~locmoe_plugin.router.RouterOutput` it completes) is set by the router and
    released by :meth:`complete`; ``done`` says whether :meth:`complete` ran. Megatron's adapter completes it in ``dispatch_preprocess``, the
    DeepSpeed layer in ``TokenDispatcher.forward``; until then the output has no ``"aux"`` loss and no
    ``total``.
    """

    def __init__(self, extra_bins: torch.Tensor, topology: Topology, reads_bad: bool, crosses: bool,
                 finish: Callable) -> None:
        self.extra_bins = extra_bins
        self.topology = topology
        self.reads_bad = reads_bad
        self.crosses = crosses
        self._finish = finish
        self.output = None
        self.done = False

    def complete(self, counts) -> None:
        """Read the EP group's counts from ``counts`` (a started
        :class:`~locmoe_plugin.comm.counts.RoutingCounts` whose rows carry :attr:`extra_bins`; device work
        only, no host wait) and run the router's work on them. Once only."""
        if self.done:
            raise RuntimeError("these folded router counts were already completed: one count exchange per "
                               "router forward")
        n = self.topology.num_experts
        table = counts.table.view(-1, counts.row_bins)  # [P, row_bins], identical on every EP rank
        extra = table[:, counts.extra_columns()]
        requested = extra[:, :n]  # [P, n] each rank's requested pairs per expert (padding left out)
        group_counts = requested.sum(0, dtype=torch.float32)  # integers: exact in fp32 below 2**24
        bad = extra[:, n].sum(dtype=torch.float32) if self.reads_bad else None
        cross = None
        if self.crosses:
            local = rank_local_experts(self.topology, requested.device)
            cross = requested.masked_fill(local, 0).sum(dtype=torch.float32)
        self._finish(self.output, group_counts, bad, cross)
        self.done = True
        # the output holds this object (``pending``) and this object the output: drop the back references so
        # the pair (probs, logits and their graph) is freed by reference counting, not only by a garbage
        # collection pass (Megatron's --manual-gc runs those rarely)
        self.output = self._finish = None
