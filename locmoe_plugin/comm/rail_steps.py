"""The rail (inter-node) transfer of the remote rows, one block per source node, as one collective.

Rank ``me`` on node ``a`` of ``N`` nodes exchanges its remote rows with its rail peers (the ranks of
its local index on the other nodes). The transfer is described as ``N - 1`` ring-shifted steps: at step
``d`` (1 .. N-1) it sends the rows of its tokens that node ``(a + d) % N`` needs and receives the rows
node ``(a - d) % N`` sends it; each step's block has its own route through the node (its origin's
metadata). The return trip (combine, and the dispatch's backward) runs each step the other way: the
results of node ``(a - d) % N``'s rows go back to it, and this rank's rows that went to ``(a + d) % N``
come back. With 2 nodes there is one step, the same single transfer as the unsplit rail hop's.

Every step of one direction moves in **one** ``all_to_all_single`` on the rail group
(:class:`RailBatch`): it is launched once the last step's rows are given, and each step's receive
buffer is its peer's slice of the one output. One collective rather than one per step: under NCCL the
steps of one group run one after another, one peer at a time, which on a link whose rate grows with the
peers served at once (NCCL's socket transport, several NICs per node) made the overlapped layer much
slower than the plain one (measured in docs/overlap.md). What the single collective gives up is working
on an early block while later ones travel; the local rows' work still runs while the whole transfer is
in flight. With more than one step the steps' rows are concatenated into the send buffer (one copy of
the remote rows; with 2 nodes the one step's rows are sent as they are).

* NCCL / HCCL run it on the rail group's own communicator and stream, as the unsplit rail hop does;
  gloo runs it on its own thread when launched asynchronously.
* It is skipped only when the count table (the same on every rank) shows no member of the rail group
  moving a row at any step, so every member skips it together and nothing hangs.
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


class RailBatch:
    """The steps of one direction of the rail transfer at this rank, moved by one ``all_to_all_single``.

    ``add(i, rows)`` gives step ``i``'s rows (``[send_rows, B]``; ``back=True``, the return trip:
    ``[recv_rows, B]``) and returns step ``i``'s receive buffer, a slice of the one output (``[recv_rows,
    B]``; back: ``[send_rows, B]``), written once the collective completes. The collective is launched
    when every step's rows are in; :meth:`wait` (idempotent) makes the caller's stream wait for it. Every
    rail member gives its steps in the same code path, so all launch the one collective together."""

    def __init__(self, steps: tuple[RailStep, ...], group, num_nodes: int, back: bool = False) -> None:
        self.steps, self.group, self.num_nodes, self.back = steps, group, num_nodes, back
        self.moves = any(st.moves for st in steps)
        out_rows = [self._sizes(st)[:2] for st in steps]  # (rows, peer) each step receives
        self._total = sum(n for n, _ in out_rows)
        # each step's slice of the output, which all_to_all_single fills in peer (node) order
        starts = [sum(m for m, peer in out_rows if peer < p) for _, p in out_rows]
        self._slice = [slice(start, start + n) for start, (n, _) in zip(starts, out_rows)]
        self._rows: list[torch.Tensor | None] = [None] * len(steps)
        self._out: torch.Tensor | None = None
        self._work = None
        self._launched = False

    def _sizes(self, st: RailStep) -> tuple[int, int, int, int]:
        """(rows out, their peer, rows in, their peer) of one step, in this direction."""
        return ((st.send_rows, st.send_node, st.recv_rows, st.recv_node) if self.back
                else (st.recv_rows, st.recv_node, st.send_rows, st.send_node))

    def add(self, i: int, rows: torch.Tensor) -> torch.Tensor:
        if self._out is None:
            self._out = rows.new_empty((self._total,) + tuple(rows.shape[1:]))
        self._rows[i] = rows
        buf = self._out[self._slice[i]]
        if all(r is not None for r in self._rows):
            self._launch()
        return buf

    def _launch(self) -> None:
        self._launched = True
        if not self.moves:
            return
        out_splits, in_splits = [0] * self.num_nodes, [0] * self.num_nodes
        by_peer = {}
        for st, rows in zip(self.steps, self._rows):
            out_rows, out_peer, in_rows, in_peer = self._sizes(st)
            out_splits[out_peer], in_splits[in_peer] = out_rows, in_rows
            by_peer[in_peer] = rows
        inp = torch.cat([by_peer[b] for b in sorted(by_peer)]) if len(by_peer) > 1 else next(iter(by_peer.values()))
        self._work = dist.all_to_all_single(self._out, inp.contiguous(), out_splits, in_splits, group=self.group,
                                            async_op=True)
        self._rows = [None] * len(self.steps)  # the input stays alive in the collective, not here

    def wait(self) -> None:
        if not self._launched:
            raise RuntimeError("a rail step is waited before every step of its direction was given")
        if self._work is not None:
            self._work.wait()
            self._work = None
