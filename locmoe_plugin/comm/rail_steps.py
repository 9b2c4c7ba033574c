"""The rail (inter-node) transfer of the remote rows, split into one step per source node.

Rank ``me`` on node ``a`` of ``N`` nodes exchanges its remote rows with its rail peers (the ranks of
its local index on the other nodes) in ``N - 1`` ring-shifted steps: at step ``d`` (1 .. N-1) it sends
the rows of its tokens that node ``(a + d) % N`` needs and receives the rows node ``(a - d) % N`` sends
it. Each arrived block can then be fanned out inside the node (and its experts run) while the later
steps are still travelling. With 2 nodes there is one step, the same single transfer as the unsplit
rail hop's (one block = every remote row). The return trip (combine, and the dispatch's backward) runs
each step the other way: the results of node ``(a - d) % N``'s rows go back to it, and this rank's rows
that went to ``(a + d) % N`` come back.

Each step is an ``all_to_all_single`` on the rail group with zero split sizes except the one peer,
not a ``batch_isend_irecv`` pair: every member of the rail group enters every step, so

* NCCL / HCCL run it on the rail group's own communicator and stream, as the unsplit rail hop does
  (NCCL's ``all_to_all_single`` posts a send / receive only to peers with a non-zero split, so a step
  moves one block each way); point-to-point calls would make NCCL set up separate communicators lazily
  and require every member to join the group's first batched call;
* gloo runs ``all_to_all_single`` with any split sizes, zeros included, on its own thread when
  launched asynchronously, as the unsplit rail hop already does;
* a step is skipped only when the count table (the same on every rank) shows no member of the rail
  group moving a row at that step, so every member skips it together and nothing hangs.

All steps of one direction are launched at once (asynchronously, in step order on every member) and
waited one by one; under NCCL they run in that order on the group's stream, so block ``d`` is ready
after ``d`` transfers while the work on earlier blocks proceeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .counts import RoutingCounts
from .hops import Hop


@dataclass(frozen=True)
class RailStep:
    """One step ``d`` of the rail transfer at this rank (rail group member ``b`` is node ``b``).

    Attributes:
        send_node: ``(a + d) % N``, the node this rank's rows go to.
        recv_node: ``(a - d) % N``, the node whose block arrives here (its origin).
        send_at / send_rows: where this rank's rows for ``send_node`` sit in the rail hop's send order,
            and how many (host ints).
        recv_rows: rows arriving from ``recv_node`` (host int).
        moves: whether any member of the rail group moves a row at this step (the same on every member).
    """

    send_node: int
    recv_node: int
    send_at: int
    send_rows: int
    recv_rows: int
    moves: bool

    def send_index(self, rail_hop: Hop) -> torch.Tensor:
        """``[send_rows]`` int64 tokens of the rows sent at this step, in send order."""
        return rail_hop.index[self.send_at : self.send_at + self.send_rows]


def rail_steps(rail_hop: Hop, counts: RoutingCounts, t) -> tuple[RailStep, ...]:
    """The ``N - 1`` steps of this rank's rail transfer, from the rail hop (send blocks by node, receive
    counts by node) and the all-gathered counts (which steps any member moves). Host arithmetic only."""
    n, a = t.num_nodes, t.node
    rail = t.rail(t.local_index)
    to_node = counts.rows_to_node
    starts = [sum(rail_hop.blocks[:b]) for b in range(n)]
    steps = []
    for d in range(1, n):
        dest, origin = (a + d) % n, (a - d) % n
        moves = rail_hop.group is not None and any(to_node[rail[c]][(c + d) % n] for c in range(n))
        steps.append(RailStep(send_node=dest, recv_node=origin, send_at=starts[dest],
                              send_rows=rail_hop.blocks[dest], recv_rows=rail_hop.out_splits[origin], moves=moves))
    return tuple(steps)


def start_step(step: RailStep, rows: torch.Tensor, group, num_nodes: int, back: bool = False) -> tuple[torch.Tensor, object]:
    """Launch one step asynchronously on the rail ``group``: ``rows [send_rows, B]`` to ``send_node``,
    ``[recv_rows, B]`` from ``recv_node`` (``back=True``: the return trip, ``rows [recv_rows, B]`` back
    to ``recv_node`` and ``[send_rows, B]`` from ``send_node``). Returns ``(receive buffer, work or
    None)``; a step no member moves is skipped (``None``)."""
    out_rows, out_peer, in_rows, in_peer = (
        (step.send_rows, step.send_node, step.recv_rows, step.recv_node) if back
        else (step.recv_rows, step.recv_node, step.send_rows, step.send_node))
    out = rows.new_empty((out_rows,) + tuple(rows.shape[1:]))
    if not step.moves:
        return out, None
    out_splits, in_splits = [0] * num_nodes, [0] * num_nodes
    out_splits[out_peer], in_splits[in_peer] = out_rows, in_rows
    work = dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=group, async_op=True)
    return out, work
