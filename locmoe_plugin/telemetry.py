"""Per-layer routing telemetry: load, drops, cross-node share, capacity, delta, loss values.

Stats are kept as device tensors (no host sync in forward); :meth:`RoutingStats.to_dict` turns them
into Python numbers when a logger asks (one device-to-host sync per call). :func:`collect_stats`
gathers the latest stats of every LocMoE router in a model, keyed by module name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist


@dataclass
class RoutingStats:
    """One router call on one rank.

    Attributes:
        tokens_per_expert: ``[n]`` int64 kept (token, expert) pairs per expert.
        requested_per_expert: ``[n]`` int64 pairs per expert before capacity.
        num_tokens: tokens routed by this rank.
        dropped_pairs: 0-d int64, pairs removed by capacity.
        cross_node_pairs: 0-d int64, kept pairs whose expert lives on another node.
        capacity: pairs one expert may take (None = dropless).
        capacity_factor / delta / q_hat: the capacity controller's current values (None if unused).
        losses: loss values, e.g. ``{"aux": ..., "locality": ..., "z": ...}``; the router's own loss tensors
            (not detached, which would cost an op per loss and forward): read them through :meth:`to_dict`
            or ``.detach()``.
    """

    tokens_per_expert: torch.Tensor
    requested_per_expert: torch.Tensor
    num_tokens: int
    dropped_pairs: torch.Tensor
    cross_node_pairs: torch.Tensor
    capacity: int | None = None
    capacity_factor: float | None = None
    delta: float | None = None
    q_hat: float | None = None
    #: why this forward's capacity estimate was deferred (empty / all-padding / non-finite batch), or None
    capacity_deferred: str | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def routed_pairs(self) -> torch.Tensor:
        return self.tokens_per_expert.sum()

    @property
    def cross_node_share(self) -> float:
        """Kept pairs whose expert is on another node / kept pairs (0.0 without kept pairs); a
        device-to-host sync, as :meth:`to_dict`."""
        routed = int(self.routed_pairs)
        return int(self.cross_node_pairs) / routed if routed else 0.0

    def reduced(self, group=None) -> "RoutingStats":
        """Counts summed over ``group`` (e.g. the EP group; None: the default process group) for a global
        view; a collective every rank of the group must call. Without an initialised process group, these
        stats (one process is the whole group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        packed = torch.cat(
            [
                self.tokens_per_expert,
                self.requested_per_expert,
                torch.stack([self.dropped_pairs, self.cross_node_pairs]).to(self.tokens_per_expert.dtype),
                torch.full((1,), self.num_tokens, dtype=self.tokens_per_expert.dtype,
                           device=self.tokens_per_expert.device),
            ]
        )
        dist.all_reduce(packed, group=group)
        n = self.tokens_per_expert.numel()
        return RoutingStats(
            tokens_per_expert=packed[:n],
            requested_per_expert=packed[n : 2 * n],
            num_tokens=int(packed[-1]),  # device-to-host sync: logging only
            dropped_pairs=packed[2 * n],
            cross_node_pairs=packed[2 * n + 1],
            capacity=self.capacity,
            capacity_factor=self.capacity_factor,
            delta=self.delta,
            q_hat=self.q_hat,
            capacity_deferred=self.capacity_deferred,
            losses=dict(self.losses),
        )

    def to_dict(self) -> dict[str, float | int | list | None]:
        """Python numbers for logging (device-to-host sync)."""
        load = self.tokens_per_expert.double()
        routed = float(load.sum())
        mean = routed / max(load.numel(), 1)
        out: dict = {
            "tokens": int(self.num_tokens),
            "routed_pairs": int(routed),
            "dropped_pairs": int(self.dropped_pairs),
            "cross_node_pairs": int(self.cross_node_pairs),
            "cross_node_share": self.cross_node_share,
            "max_load": int(load.max()) if load.numel() else 0,
            "mean_load": mean,
            "max_over_mean_load": float(load.max()) / mean if mean else 0.0,
            "capacity": self.capacity,
            "capacity_factor": self.capacity_factor,
            "delta": self.delta,
            "q_hat": self.q_hat,
            "capacity_deferred": self.capacity_deferred,
            "tokens_per_expert": [int(v) for v in self.tokens_per_expert.tolist()],
        }
        for name, value in self.losses.items():
            out[f"{name}_loss"] = float(value.detach())
        return out


def collect_stats(model: torch.nn.Module) -> dict[str, RoutingStats]:
    """Latest :class:`RoutingStats` of every LocMoE router in ``model`` (a module with a ``last_stats``
    attribute), keyed by the module's qualified name. A router inside another one (the framework-free
    router that an adapter's router wraps, whose stats the adapter shows) is listed once, under the
    outer name."""
    out: dict[str, RoutingStats] = {}
    for name, m in model.named_modules():
        if any(name.startswith(outer + ".") for outer in out):
            continue
        if getattr(m, "last_stats", None) is not None:
            out[name] = m.last_stats
    return out


def format_stats(stats: dict[str, RoutingStats], keys: Iterable[str] = (
    "cross_node_share", "max_over_mean_load", "dropped_pairs", "capacity", "delta"
)) -> str:
    """One line per layer, for a log."""
    lines = []
    for name, st in stats.items():
        d = st.to_dict()
        parts = []
        for k in keys:
            v = d.get(k)
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
        lines.append(f"{name}: " + " ".join(parts))
    return "\n".join(lines)
