"""Autograd for the origin-split dispatch (:mod:`.origin_split`): four kinds of step, each a
``torch.autograd.Function``, joined by a small record of the rail collectives in flight.

Dispatch (:func:`dispatch_blocks`):
    ``_LaunchRail(x)``          -> local pairs, one link per rail step: every step's rows (and their
                                   metadata) launched in one collective, the local rows (and theirs)
                                   through the node hop;
    ``_ArriveBlock(link_i)``    -> the pairs of the block of step ``i``: wait, route made from the
                                   metadata, node hop. One per step, in step order.
Combine (:func:`combine_blocks`):
    ``_ReduceBlock(pairs_i)``   -> link_i: the block reduced in the node, given to the rail return (one
                                   collective, launched with the last block).
    ``_FinishReduce(local, links)`` -> ``[s, F]``: local rows reduced, wait, rail level summed in node order.

The ``link`` tensors carry no data of their own to the next step (it reads the receive buffer from
the record); they exist so autograd runs the backward steps in the reverse order, and their gradient
*is* the receive buffer of the backward's own rail step: launched in the later step's backward
(``_ArriveBlock``'s, ``_FinishReduce``'s) and waited in the earlier one's, so it travels while autograd
runs the work between them (after the blocks' backward: the local experts' backward).

The per-block steps are also joined by a ``chain`` (a zero-size tensor each passes to the next), so
their backward runs in one fixed order on every rank, whatever order the autograd engine would pick for
independent branches (e.g. experts of different sizes): each backward step runs a node-group collective,
which all members of the node must enter in the same order. Dispatch blocks go forward in step order
(their backward runs last step first); combine blocks go forward last step first (so their backward
takes the blocks in arrival order of the backward's own rail steps).

With a row codec (:mod:`.row_codec`, ``dispatch_format`` fp8 / int8) the dispatch direction moves encoded
rows: the dispatch's forward encodes the tokens once, every hop (rail and node) moves the encoded bytes
(with the metadata packed behind them), and each route decodes its pairs; the combine's backward does the
same with the output gradient. Since decoding is row by row and the hops only copy rows, each route's
pairs are bit for bit the unsplit codec path's (``decode(broadcast(encode(x)))``). In the combine's
backward the rail receive buffer holds encoded rows, which cannot be a link's gradient (dtype and width
differ): the record keeps it (``InFlight.backward_encoded``) and the link gets a stand-in of the link's
shape that takes no memory (an expanded scalar), read by nothing. The forward's links are such stand-ins
too. The reduce direction stays native.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .origin_split import OriginSplit
from .row_codec import RowCodec


def _encoded(codec: RowCodec | None, rows: torch.Tensor) -> torch.Tensor:
    """``rows [n, F]`` as they travel: themselves, or ``uint8 [n, row_bytes(F)]`` under a codec."""
    return rows if codec is None else codec.encode(rows)


def _decoded(codec: RowCodec | None, rows: torch.Tensor, features: int, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`_encoded` on rows that travelled: ``[n, features]`` of ``dtype``."""
    return rows if codec is None else codec.decode(rows, features, dtype)


class InFlight:
    """The rail transfer in flight between two autograd steps: the forward's receive buffer per step
    index, and each direction's batch (:class:`.rail_steps.RailBatch`: its steps move in one collective).
    One record per dispatch (and one per combine)."""

    __slots__ = ("forward", "forward_batch", "backward_batch", "backward_encoded")

    def __init__(self) -> None:
        self.forward: dict[int, torch.Tensor] = {}
        self.backward_encoded: dict[int, torch.Tensor] = {}  # step -> encoded receive buffer (combine's backward)
        self.forward_batch = self.backward_batch = None

    def batch(self, split: OriginSplit, backward: bool, back: bool):
        """This record's forward (or ``backward``) rail batch, made at its first step (``back``: the
        return trip's direction)."""
        name = "backward_batch" if backward else "forward_batch"
        if getattr(self, name) is None:
            setattr(self, name, split.rail_batch(back=back))
        return getattr(self, name)

    def wait_forward(self, i: int) -> torch.Tensor:
        """Step ``i``'s forward receive buffer, once the forward batch's collective completed."""
        buf = self.forward.pop(i)
        self.forward_batch.wait()
        return buf

    def wait_backward(self) -> None:
        """Wait for the backward batch's collective (idempotent; nothing if no step was given)."""
        if self.backward_batch is not None:
            self.backward_batch.wait()


class _LaunchRail(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, split: OriginSplit, flight: InFlight, codec: RowCodec | None):
        ctx.split, ctx.flight = split, flight
        payload = _encoded(codec, x)
        links = []
        for i in range(len(split.steps)):
            gather = split.send_index(i)
            rows = payload.index_select(0, gather)  # [rows for step i's node, F or row bytes]
            # the payload moves first, its routing metadata packed behind each row; the local rows'
            # work is queued behind the launches
            flight.forward[i] = split.start_step(i, rows, flight.batch(split, False, back=False),
                                                 meta=split.token_meta.index_select(0, gather))
            # the link: shape and dtype of the step's rows as the caller sees them (its gradient is the
            # backward's receive buffer)
            links.append(rows if codec is None else x.new_zeros(()).expand(rows.shape[0], x.shape[1]))
        local = _decoded(codec, split.local.broadcast(payload, split.token_meta), x.shape[1], x.dtype)
        return (local, x.new_zeros(0), *links)

    @staticmethod
    def backward(ctx, grad_local_pairs, grad_chain, *grad_links):
        split, flight = ctx.split, ctx.flight
        local_rows = split.local.reduce(grad_local_pairs.contiguous())
        flight.wait_backward()  # every grad_links[i] is a slice of the backward batch's one receive buffer
        return split.sum_rail(local_rows, list(grad_links)), None, None, None


class _ArriveBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, link, chain, split: OriginSplit, flight: InFlight, i: int, codec: RowCodec | None):
        ctx.split, ctx.flight, ctx.i = split, flight, i
        packed = flight.wait_forward(i)
        d = link.shape[1]
        if codec is None:
            rows, meta = split.arrived(i, packed, link.dtype, d)
        else:
            rows, meta = split.arrived(i, packed, torch.uint8, codec.row_bytes(d))
        # the block arrived packed (payload and metadata per row): its node hop gathers those rows as they are
        pairs = _decoded(codec, split.step_route(i).broadcast(rows, meta, packed), d, link.dtype)
        return pairs, chain.new_zeros(0)

    @staticmethod
    def backward(ctx, grad_pairs, grad_chain):
        split, flight, i = ctx.split, ctx.flight, ctx.i
        rail_rows = split.step_route(i).reduce(grad_pairs.contiguous())
        buf = split.start_step(i, rail_rows, flight.batch(split, True, back=True))
        return buf, grad_chain, None, None, None, None


class _ReduceBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pairs, chain, split: OriginSplit, flight: InFlight, i: int, codec: RowCodec | None):
        ctx.split, ctx.flight, ctx.i, ctx.codec = split, flight, i, codec
        rail_rows = split.step_route(i).reduce(pairs)  # [block rows, F]
        flight.forward[i] = split.start_step(i, rail_rows, flight.batch(split, False, back=True))
        return rail_rows, chain.new_zeros(0)

    @staticmethod
    def backward(ctx, grad_link, grad_chain):
        flight, codec, route = ctx.flight, ctx.codec, ctx.split.step_route(ctx.i)
        flight.wait_backward()  # grad_link is its receive buffer (with a codec: a stand-in; the record has it)
        received = grad_link if codec is None else flight.backward_encoded.pop(ctx.i)
        grad_pairs = _decoded(codec, route.broadcast(received), grad_link.shape[1], grad_link.dtype)
        return grad_pairs, grad_chain, None, None, None, None


class _FinishReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_pairs, chain, split: OriginSplit, flight: InFlight, codec: RowCodec | None, *links):
        ctx.split, ctx.flight, ctx.codec = split, flight, codec
        local_rows = split.local.reduce(local_pairs)
        return split.sum_rail(local_rows, [flight.wait_forward(i) for i in range(len(links))])

    @staticmethod
    def backward(ctx, grad):
        split, flight, codec = ctx.split, ctx.flight, ctx.codec
        grad = grad.contiguous()
        payload = _encoded(codec, grad)
        bufs = []
        for i in range(len(split.steps)):
            buf = split.start_step(i, payload.index_select(0, split.send_index(i)),
                                   flight.batch(split, True, back=False))
            if codec is not None:
                flight.backward_encoded[i] = buf
                buf = grad.new_zeros(()).expand(buf.shape[0], grad.shape[1])  # the stand-in (module doc)
            bufs.append(buf)
        local = _decoded(codec, split.local.broadcast(payload), grad.shape[1], grad.dtype)
        return (local, grad.new_zeros(0), None, None, None, *bufs)


def dispatch_blocks(x: torch.Tensor, split: OriginSplit, codec: RowCodec | None = None
                    ) -> Iterator[tuple[int, torch.Tensor]]:
    """``x [s, F]`` -> yields ``(origin node, pairs [pairs of that origin, F])``: this node's first (the
    rail transfer in flight), then each other node's block, in step order, once the transfer arrived.
    Consume it lazily to work on the local rows while the remote ones travel. ``codec``: rows travel
    encoded and arrive decoded (module doc)."""
    flight = InFlight()
    local_pairs, chain, *links = _LaunchRail.apply(x, split, flight, codec)
    yield split.node, local_pairs
    for i, link in enumerate(links):
        pairs, chain = _ArriveBlock.apply(link, chain, split, flight, i, codec)
        yield split.steps[i].recv_node, pairs


def combine_blocks(pairs_by_node: dict[int, torch.Tensor], split: OriginSplit,
                   codec: RowCodec | None = None) -> torch.Tensor:
    """Every route's (weighted) pairs, origin node -> ``[pairs, F]`` -> ``[s, F]``: each remote block
    reduced in the node (last step first), their rail return launched as one collective, the local pairs
    reduced while they travel, then every token's node copies summed in node order. ``codec``: the
    backward's output gradient travels encoded (module doc); the forward is native."""
    flight = InFlight()
    local = pairs_by_node[split.node]
    chain = local.new_zeros(0)
    links = [None] * len(split.steps)
    for i in reversed(range(len(split.steps))):
        links[i], chain = _ReduceBlock.apply(pairs_by_node[split.steps[i].recv_node], chain, split, flight, i,
                                             codec)
    return _FinishReduce.apply(local, chain, split, flight, codec, *links)


def broadcast_split(x: torch.Tensor, split: OriginSplit, codec: RowCodec | None = None) -> torch.Tensor:
    """``x [s, F]`` -> ``[num_pairs, F]`` in canonical order (the rail transfer overlaps the local rows'
    node hop)."""
    return split.merge(dict(dispatch_blocks(x, split, codec)))


def reduce_split(y: torch.Tensor, split: OriginSplit, codec: RowCodec | None = None) -> torch.Tensor:
    """``y [num_pairs, F]`` canonical -> ``[s, F]`` (the rail returns overlap the later reduces)."""
    return combine_blocks({b: y.index_select(0, pos) for b, pos in split.positions.items()}, split, codec)
