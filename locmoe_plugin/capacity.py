"""Expert capacity: how many routed pairs one expert may take from one rank's batch.

Modes (``LocMoEConfig.capacity``):
  * ``none``: dropless.
  * ``factor``: ``C = max(min_capacity, ceil(c_f * s * k / n))``.
  * ``bound`` (LocMoE): ``c_f`` is Theorem 1's ``ec_min = 1 / (n * p_delta)``, computed once, from the
    configured delta or from the first training batch's delta (below), clamped to
    ``[capacity_factor_min, capacity_factor_max]``.
  * ``adaptive`` (LocMoE+): every ``adaptive_interval`` training forwards, ``c_f = capacity_factor_isotropic
    * q_hat / q_chance`` with ``q_hat`` the measured misranking rate of LocMoE+'s Eq. (10) (how often a
    token that does not belong to an expert scores above one that does) and ``q_chance = 1 / (2 (n + 1))``
    its value on an untrained router (Corollary 6: C proportional to s q; see
    :mod:`locmoe_plugin.resonance`), clamped to ``[capacity_factor_min, capacity_factor_max]``. It starts
    near ``capacity_factor_isotropic`` and falls as tokens concentrate on their experts. A batch with no
    measurable pair (empty, or every token on one expert) keeps the previous factor.

delta estimate: the mean over tokens of each token's highest affinity (how well a token matches the
expert it fits best; LocMoE reports ~0.03 at d=5120, n=16). Measurements are all-reduced over the
expert-parallel group, so every rank uses the same factor. The factor becomes a Python float at
estimation steps only (one named device-to-host sync); other steps issue no sync and no collective.

Note: the step counter counts training-mode forwards. Under activation recomputation a forward runs
twice; with ``adaptive`` the factor may then change between a forward and its recomputation at an
estimation step, which changes that step's drops. Use ``bound``/``factor`` with full recomputation.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .bounds import ec_min_erfc, ec_min_exact, ec_min_exp
from .config import LocMoEConfig
from .resonance import misranking_counts, resonance_factor

_BOUND_FORMS = {"exact": ec_min_exact, "erfc": ec_min_erfc, "exp": ec_min_exp}


def estimate_delta(affinity: torch.Tensor) -> torch.Tensor:
    """Mean top-1 affinity, ``affinity [s, n] -> 0-d`` fp32 (no sync). 0 for an empty batch."""
    if affinity.shape[0] == 0:
        return affinity.new_zeros(())
    return affinity.max(dim=-1).values.mean()


def capacity_from_factor(factor: float, num_tokens: int, topk: int, num_experts: int, min_capacity: int) -> int:
    """``max(min_capacity, ceil(factor * s * k / n))``."""
    return max(min_capacity, math.ceil(factor * num_tokens * topk / num_experts))


def _group_active(group) -> bool:
    return group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class CapacityController:
    """Holds the current capacity factor (and delta) of one router; see the module doc.

    Args:
        config: the router's config.
        group: the expert-parallel process group the estimates are agreed over (None: this rank only).
    """

    def __init__(self, config: LocMoEConfig, group=None) -> None:
        self.config = config
        self.group = group
        self.delta: float | None = config.delta
        self.factor: float | None = config.capacity_factor if config.capacity == "factor" else None
        self.q_hat: float | None = None
        self.steps = 0

    @property
    def mode(self) -> str:
        return self.config.capacity

    def needs_affinity(self, training: bool) -> bool:
        """Whether the next :meth:`capacity` call will read the affinity (so the router computes it)."""
        if self.mode == "bound":
            return self.factor is None
        if self.mode == "adaptive":
            return self.factor is None or (training and self.steps % self.config.adaptive_interval == 0)
        return False

    def _mean_over_group(self, value: torch.Tensor) -> torch.Tensor:
        if _group_active(self.group):
            value = value.clone()
            dist.all_reduce(value, group=self.group)
            value /= dist.get_world_size(self.group)
        return value

    def _clamp(self, factor: float) -> float:
        c = self.config
        return min(c.capacity_factor_max, max(c.capacity_factor_min, factor))

    def _ensure_delta(self, affinity: torch.Tensor) -> float:
        if self.delta is None:
            d = self._mean_over_group(estimate_delta(affinity.detach()).reshape(1))
            # device-to-host sync: delta (once per router)
            self.delta = min(max(float(d.item()), 1e-6), 1 - 1e-6)
        return self.delta

    def _estimate(self, affinity: torch.Tensor) -> None:
        c = self.config
        delta = self._ensure_delta(affinity)
        if self.mode == "bound":
            self.factor = self._clamp(_BOUND_FORMS[c.capacity_bound_form](delta, c.hidden_size, c.num_experts))
            return
        u, pairs = misranking_counts(affinity)
        both = torch.stack([u.sum(), pairs.sum()])  # int64: exact when summed over ranks
        if _group_active(self.group):
            dist.all_reduce(both, group=self.group)
        # device-to-host sync: misranked and compared pairs (every adaptive_interval steps)
        misranked, compared = both.tolist()
        if compared:
            self.q_hat = misranked / compared
            self.factor = self._clamp(resonance_factor(self.q_hat, c.num_experts, c.capacity_factor_isotropic))
        elif self.factor is None:  # nothing to measure yet: an untrained router's factor
            self.factor = self._clamp(c.capacity_factor_isotropic)

    def capacity(self, num_tokens: int, affinity: torch.Tensor | None, training: bool) -> int | None:
        """Capacity for a batch of ``num_tokens`` tokens; ``affinity [s, n]`` is read only when
        :meth:`needs_affinity` said so. Advances the step counter in training mode."""
        if self.mode == "none":
            return None
        if self.needs_affinity(training):
            if affinity is None:
                raise ValueError("capacity estimation needs the affinity; call needs_affinity() first")
            self._estimate(affinity)
        if training:
            self.steps += 1
        c = self.config
        return capacity_from_factor(self.factor, num_tokens, c.topk, c.num_experts, c.min_capacity)

    def state_dict(self) -> dict:
        return {"delta": self.delta, "factor": self.factor, "q_hat": self.q_hat, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.delta, self.factor = state.get("delta"), state.get("factor")
        self.q_hat, self.steps = state.get("q_hat"), int(state.get("steps", 0))
