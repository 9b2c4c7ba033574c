"""Counting sort of (token, expert) pairs into expert-major order, without a comparison sort.

A token's expert ids are distinct, so its pairs are the cells of an ``[E, s]`` table (expert, token); the
expert-major, token-ordered position of a pair is the number of pairs in the cells before its cell, one
in-place cumsum over the flattened table. No sort, no ``repeat_interleave``, no host sync: a fixed
handful of kernels per call, which is what a launch-bound one-node layer needs.

Slot bins (:func:`slot_bins`, shared with the count histogram of :mod:`.counts`): ``0 .. E-1`` the expert
id; ``E`` an id ``>= E`` and ``E + 1`` an id ``< -1`` (both invalid, raised on the host by the counts);
``E + 2`` the id ``-1`` (slot not routed). Slots outside ``0 .. E-1`` go after every pair.
"""

from __future__ import annotations

import torch

EXTRA_BINS = 3  # invalid high, invalid low, not routed (-1)


def slot_bins(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``expert_ids [s, k]`` int64 -> ``[s, k]`` int64 bin of each slot in ``0 .. E + 2`` (see the
    module doc): two elementwise kernels, ``clamp`` to ``[-2, E]`` then ``remainder`` by ``E + 3``
    (``-2 -> E + 1``, ``-1 -> E + 2``)."""
    return expert_ids.clamp(-2, num_experts).remainder_(num_experts + EXTRA_BINS)


def count_pairs(bins: torch.Tensor, num_experts: int, one: torch.Tensor | None = None,
                histogram: bool = True, positions: bool = True,
                pair_bins: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The counting sort's device pass over ``bins [s, k]`` (from :func:`slot_bins`). Returns

      * ``before [(E + 3) * s + 1]`` int64: at cell ``bin * s + t``, the number of (expert, token) pairs in
        the cells before it (an exclusive cumsum). For a slot routed to expert ``e`` that is its pair's
        position in the expert-major order; every cell of the extra bins reads the number of pairs ``n``
        (they are cleared before the cumsum), so a slot not routed points at ``n``, one past the last pair;
      * ``hist [E + 4]`` int64: slots per bin (``E + 3``), then the most slots one (expert, token) cell
        holds: 1 when every token's expert ids are distinct (the counts raise on more).

    ``one``: a 0-dim int64 1 on the device (cached by the caller; made here if None). ``histogram=False``:
    ``hist`` is None and its two kernels are skipped (a caller that has its counts from elsewhere);
    ``positions=False``: ``before`` is None and the ``zero_`` and ``cumsum_`` are skipped (the histogram only).
    ``pair_bins``: only bins ``[0, pair_bins)`` become pairs (default ``E``): the cells of every later bin are
    cleared before the cumsum like the extra bins', so their slots point at ``n`` too (the histogram still
    counts every bin). Kernels: ``zeros``, ``scatter_add_``, ``sum``, ``amax``, ``zero_``, ``cumsum_``."""
    s, k = bins.shape
    e, nb = num_experts, num_experts + EXTRA_BINS
    before = torch.zeros(nb * s + 1, dtype=torch.long, device=bins.device)
    cells = before[1:].view(nb, s)  # slots per (bin, token) cell; before[0] stays 0
    if one is None:
        one = torch.ones((), dtype=torch.long, device=bins.device)
    cells.scatter_add_(0, bins.t(), one.expand(k, s))
    hist = None
    if histogram:
        hist = _histogram(cells, e)
    if not positions:
        return None, hist
    cells[e if pair_bins is None else pair_bins :].zero_()  # the extra bins (and any after pair_bins) hold no pairs
    before.cumsum_(0)  # before[c] = pairs in cells 0 .. c-1 (before[0] = 0 shifts the sum by one cell)
    return before, hist


def _histogram(cells: torch.Tensor, e: int) -> torch.Tensor:
    """``[E + 4]`` int64 from the ``[bins, s]`` cell table (see :func:`count_pairs`)."""
    nb, s = cells.shape
    hist = torch.empty(nb + 1, dtype=torch.long, device=cells.device)
    torch.sum(cells, 1, out=hist[:nb])
    if s:
        torch.amax(cells[:e], dim=(0, 1), out=hist[nb])
    else:
        hist[nb:].zero_()
    return hist


def slot_positions(bins: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """``[s, k]`` int64 position of each slot's pair in the expert-major order (``n`` = the number of pairs
    for slots not routed): ``before`` read at cell ``(bin, t)``, one ``gather`` over its ``[s, bins]``
    transposed view."""
    s = bins.shape[0]
    return before[:-1].view(-1, s).t().gather(1, bins) if s else bins.clone()
