"""LocMoE's losses and telemetry in Megatron's MoE metrics tracker, recorded when Megatron reports.

Each :class:`~locmoe_plugin.megatron.router.LocMoEMegatronRouter` sums its telemetry (cross-node share,
drops, max/mean load) per layer in one small device tensor and adds to it in forward (one kernel);
:func:`flush_locmoe_metrics` records the sums in the tracker, where they appear in Megatron's training log
like ``load_balancing_loss``. Megatron's tracker takes a few host ops per metric and call, host time the
layer cannot spare on one node, hence the deferral.

Who flushes: :func:`locmoe_plugin.megatron.enable` (or :func:`~locmoe_plugin.megatron.enable_metrics_report`)
patches Megatron's metrics report to call :func:`flush_locmoe_metrics` first; a training loop that reports
the tracker itself calls it before reporting. While such a patch is applied (:func:`report_flushes`), the
routers also sum their loss values on the device and record them at the flush.

This module imports no Megatron module at import time and no other module of this adapter.
"""

from __future__ import annotations

import weakref

#: LocMoE's telemetry in Megatron's MoE metrics tracker (the losses are recorded as TopKRouter records its own)
TELEMETRY_METRICS = ("locmoe_cross_node_share", "locmoe_dropped_share", "locmoe_max_over_mean_load")
#: the router's losses in Megatron's tracker (TopKRouter's names where it has the same loss)
LOSS_METRICS = {"aux": "load_balancing_loss", "locality": "locmoe_locality_loss", "z": "z_loss"}
#: what a LocMoE router records in the tracker besides the losses TopKRouter also records
LOCMOE_METRICS = ("locmoe_locality_loss", *TELEMETRY_METRICS)

# every LocMoE router not yet freed
_live: weakref.WeakSet = weakref.WeakSet()
# routers (anything with ``flush_telemetry()``) whose sums live in a persistent device buffer, added once when
# the buffer is made: flushed at every report, since a CUDA graph replay of the router adds to the buffer
# without running any Python that could mark the router as having new telemetry
_accumulating: weakref.WeakSet = weakref.WeakSet()
# objects with an ``applied`` flag (the metrics-report patches of enable.py register here)
_report_flushers: list = []


def register_report_flusher(patch) -> None:
    """Count ``patch`` (anything with an ``applied`` flag) among the ways Megatron's report flushes the
    routers first; see :func:`report_flushes`."""
    if patch not in _report_flushers:
        _report_flushers.append(patch)


def report_flushes() -> bool:
    """Whether Megatron's MoE metrics report flushes the LocMoE routers first (a registered report patch is
    applied): then the routers also sum their loss values on the device and record them at the flush,
    instead of recording each forward's (a few host ops per loss and forward saved; the same totals)."""
    return any(p.applied for p in _report_flushers)


def flush_locmoe_metrics() -> None:
    """Record every LocMoE router's telemetry summed since the last flush into Megatron's MoE metrics
    tracker (one record per metric and layer, as if recorded at each forward: the tracker only sums).

    Call it before reporting Megatron's tracker in your own training loop; with
    :func:`locmoe_plugin.megatron.enable`'s metrics patch, Megatron's report calls it first."""
    for router in list(_accumulating):
        router.flush_telemetry()
    drop_stale_locmoe_metrics()


def drop_stale_locmoe_metrics() -> bool:
    """Remove LocMoE's own names (``locmoe_*``) from Megatron's MoE metrics tracker when no LocMoE router
    is alive in this process (an earlier LocMoE model was freed), so a later stock model's report does not
    list them as zeros. The names the stock router shares (``load_balancing_loss``, ``z_loss``) stay.
    Returns whether names were removed."""
    if _live:
        return False
    try:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
    except ImportError:
        return False
    tracker = get_moe_layer_wise_logging_tracker()
    stale = [name for name in tracker if name.startswith("locmoe_")]
    for name in stale:
        del tracker[name]
    return bool(stale)
