"""Autograd for the origin-split dispatch (:mod:`.origin_split`): four steps, each a
``torch.autograd.Function``, joined by a small record of the collective in flight.

Dispatch:  ``launch_remote(x)``   -> ``(local_pairs, remote_link)``  rail transfer of the remote rows and
                                     their metadata launched, local rows (and theirs) through the node hop;
           ``finish_remote(link)`` -> ``remote_pairs``               wait, remote route built from the
                                                                     metadata, remote rows through the node hop.
Combine:   ``reduce_remote(remote_pairs)`` -> ``remote_link``         remote rows reduced in the node, rail
                                                                     return launched;
           ``finish_reduce(local_pairs, link)`` -> ``[s, F]``        local rows reduced, wait, rail level
                                                                     summed in node order.

The ``link`` tensors carry no data of their own to the next step (it reads the receive buffer from
the record); they exist so autograd runs the backward steps in the reverse order, and their gradient
*is* the receive buffer of the backward's own rail transfer: launched in the later step's backward
(``finish_remote``'s, ``finish_reduce``'s) and waited in the earlier one's, so it travels while autograd
runs the work between them (after ``finish_remote``'s backward: the local experts' backward).
"""

from __future__ import annotations

import torch

from .origin_split import OriginSplit


class InFlight:
    """The rail collective in flight between two steps: ``(receive buffer, work or None)`` of the
    forward and the work of the backward. One record per dispatch (and one per combine)."""

    __slots__ = ("forward", "backward_work")

    def __init__(self) -> None:
        self.forward = None
        self.backward_work = None

    def wait_forward(self) -> torch.Tensor:
        buf, work = self.forward
        if work is not None:
            work.wait()
        self.forward = None
        return buf

    def wait_backward(self) -> None:
        if self.backward_work is not None:
            self.backward_work.wait()
        self.backward_work = None


class _LaunchRemote(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, split: OriginSplit, flight: InFlight):
        ctx.split, ctx.flight = split, flight
        remote_rows = x.index_select(0, split.remote_gather)  # [remote rows sent, F] node-major
        # the payload moves first, its routing metadata packed behind each row; the local rows' work is
        # queued behind its launch
        flight.forward = split.start_rail(remote_rows, split.remote_send_splits, split.remote_recv_splits,
                                          meta=split.remote_meta)
        return split.local.broadcast(x, split.token_meta), remote_rows

    @staticmethod
    def backward(ctx, grad_local_pairs, grad_remote_link):
        split, flight = ctx.split, ctx.flight
        local_rows = split.local.reduce(grad_local_pairs.contiguous())
        flight.wait_backward()  # grad_remote_link is its receive buffer
        return split.sum_rail(local_rows, grad_remote_link), None, None


class _FinishRemote(torch.autograd.Function):
    @staticmethod
    def forward(ctx, remote_link, split: OriginSplit, flight: InFlight):
        ctx.split, ctx.flight = split, flight
        rows, meta = split.arrived(flight.wait_forward(), remote_link.dtype, remote_link.shape[1])
        return split.remote.broadcast(rows, meta)

    @staticmethod
    def backward(ctx, grad_remote_pairs):
        split, flight = ctx.split, ctx.flight
        rail_rows = split.remote.reduce(grad_remote_pairs.contiguous())
        buf, flight.backward_work = split.start_rail(rail_rows, split.remote_recv_splits, split.remote_send_splits)
        return buf, None, None


class _ReduceRemote(torch.autograd.Function):
    @staticmethod
    def forward(ctx, remote_pairs, split: OriginSplit, flight: InFlight):
        ctx.split, ctx.flight = split, flight
        rail_rows = split.remote.reduce(remote_pairs)  # [remote rail rows, F]
        flight.forward = split.start_rail(rail_rows, split.remote_recv_splits, split.remote_send_splits)
        return rail_rows

    @staticmethod
    def backward(ctx, grad_link):
        ctx.flight.wait_backward()  # grad_link is its receive buffer
        return ctx.split.remote.broadcast(grad_link), None, None


class _FinishReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_pairs, remote_link, split: OriginSplit, flight: InFlight):
        ctx.split, ctx.flight = split, flight
        local_rows = split.local.reduce(local_pairs)
        return split.sum_rail(local_rows, flight.wait_forward())

    @staticmethod
    def backward(ctx, grad):
        split, flight = ctx.split, ctx.flight
        grad = grad.contiguous()
        buf, flight.backward_work = split.start_rail(grad.index_select(0, split.remote_gather),
                                                     split.remote_send_splits, split.remote_recv_splits)
        return split.local.broadcast(grad), buf, None, None


def launch_remote(x: torch.Tensor, split: OriginSplit, flight: InFlight) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [s, F]`` -> ``(local_pairs [local pairs, F], remote_link)``; the remote rows' rail transfer
    is in flight on return."""
    return _LaunchRemote.apply(x, split, flight)


def finish_remote(remote_link: torch.Tensor, split: OriginSplit, flight: InFlight) -> torch.Tensor:
    """Wait for the rail transfer; ``-> remote_pairs [remote pairs, F]``."""
    return _FinishRemote.apply(remote_link, split, flight)


def reduce_remote(remote_pairs: torch.Tensor, split: OriginSplit, flight: InFlight) -> torch.Tensor:
    """Reduce the remote pairs inside the node and launch their rail return; ``-> remote_link``."""
    return _ReduceRemote.apply(remote_pairs, split, flight)


def finish_reduce(local_pairs: torch.Tensor, remote_link: torch.Tensor, split: OriginSplit,
                  flight: InFlight) -> torch.Tensor:
    """Reduce the local pairs, wait for the rail return; ``-> [s, F]`` summed in node order."""
    return _FinishReduce.apply(local_pairs, remote_link, split, flight)


def broadcast_split(x: torch.Tensor, split: OriginSplit) -> torch.Tensor:
    """Both dispatch steps back to back: ``x [s, F]`` -> ``[num_pairs, F]`` in canonical order (the
    rail transfer overlaps the local rows' node hop)."""
    flight = InFlight()
    local_pairs, link = launch_remote(x, split, flight)
    remote_pairs = finish_remote(link, split, flight)
    return split.merge(local_pairs, remote_pairs)


def reduce_split(y: torch.Tensor, split: OriginSplit) -> torch.Tensor:
    """Both combine steps: ``y [num_pairs, F]`` canonical -> ``[s, F]`` (the rail return overlaps the
    local rows' reduce)."""
    flight = InFlight()
    link = reduce_remote(y.index_select(0, split.remote_positions), split, flight)
    return finish_reduce(y.index_select(0, split.local_positions), link, split, flight)
