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
import warnings

import torch
import torch.distributed as dist

from .agreement import group_active
from .bounds import ec_min_erfc, ec_min_exact, ec_min_exp
from .capacity_state import capacity_settings, resume_capacity_state
from .config import LocMoEConfig
from .resonance import misranking_counts, resonance_factor

_BOUND_FORMS = {"exact": ec_min_exact, "erfc": ec_min_erfc, "exp": ec_min_exp}


def estimate_delta(affinity: torch.Tensor) -> torch.Tensor:
    """Mean top-1 affinity, ``affinity [s, n] -> 0-d`` fp32 (no sync). 0 for an empty batch."""
    if affinity.shape[0] == 0:
        return affinity.new_zeros(())
    return affinity.max(dim=-1).values.mean()


def usable_for_estimation(affinity: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``[s]`` bool: the tokens a capacity estimate may read, from ``affinity [s, n]``.

    Left out: padding (``valid`` False, or an all-zero affinity row: a zero hidden state), and every
    token of a batch with any non-finite affinity (a NaN / inf batch is broken as a whole; its numbers
    would pin delta or the factor for the rest of the run). No host sync."""
    usable = (affinity != 0).any(dim=-1) & torch.isfinite(affinity).all()
    return usable if valid is None else usable & valid


def estimation_skip_reason(tokens: float, nonfinite_ranks: float) -> str:
    """Why a group's batches gave no usable token (``tokens`` and ``nonfinite_ranks`` summed over the
    group)."""
    if tokens == 0:
        return "empty batch"
    if nonfinite_ranks:
        return "non-finite affinities (NaN / inf)"
    return "every token is padding (all-zero hidden states or masked)"


def capacity_from_factor(factor: float, num_tokens: int, topk: int, num_experts: int, min_capacity: int) -> int:
    """``max(min_capacity, ceil(factor * s * k / n))``."""
    return max(min_capacity, math.ceil(factor * num_tokens * topk / num_experts))


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
        #: why the last call's estimate was deferred (None: it was not), see :meth:`capacity`
        self.deferred: str | None = None
        #: estimates deferred so far (batches with no usable token at an estimation step)
        self.skipped = 0
        self._retry = False  # a deferred estimate is due at the next training forward
        self._warned = False

    @property
    def mode(self) -> str:
        return self.config.capacity

    def needs_affinity(self, training: bool) -> bool:
        """Whether the next :meth:`capacity` call will read the affinity (so the router computes it)."""
        if self.mode == "bound":
            return self.factor is None
        if self.mode == "adaptive":
            due = self._retry or self.steps % self.config.adaptive_interval == 0
            return self.factor is None or (training and due)
        return False

    def _pooled(self, values: list[torch.Tensor]) -> list[float]:
        """0-d tensors summed over the group (one all-reduce), as Python floats."""
        # fp32 (every backend reduces it): pair counts past 2**24 round at 6e-8 relative, harmless in a ratio
        both = torch.stack([v.float() for v in values])
        if group_active(self.group):
            dist.all_reduce(both, group=self.group)
        return both.tolist()  # device-to-host sync: estimation steps only

    def _defer(self, tokens: float, nonfinite_ranks: float) -> None:
        """No usable token in the group's batches: keep the current estimate and measure at the next
        training forward (every rank reaches this together: the counts were pooled)."""
        self.deferred = estimation_skip_reason(tokens, nonfinite_ranks)
        self.skipped += 1
        self._retry = True
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"LocMoE capacity ({self.mode}): a batch with no usable token ({self.deferred}) was left out "
                f"of the capacity estimate, which is deferred to the next batch; RoutingStats."
                f"capacity_deferred names later ones (capacity state 'skipped' counts them)",
                stacklevel=4,
            )

    def _clamp(self, factor: float) -> float:
        c = self.config
        return min(c.capacity_factor_max, max(c.capacity_factor_min, factor))

    def _ensure_delta(self, affinity: torch.Tensor, usable: torch.Tensor) -> float | None:
        """delta, estimated once as the token-weighted group mean of the usable tokens' top-1 affinity
        (a rank with few or no tokens weighs little or nothing); None when deferred."""
        if self.delta is None:
            top1 = affinity.max(dim=-1).values if affinity.shape[0] else affinity.new_zeros(0)
            finite = torch.isfinite(affinity).all()
            total, count, rows, bad = self._pooled(
                [torch.where(usable, top1, 0.0).sum(), usable.sum(), affinity.new_tensor(affinity.shape[0]), ~finite])
            if count == 0:
                self._defer(rows, bad)
                return None
            self.delta = min(max(total / count, 1e-6), 1 - 1e-6)
        return self.delta

    def _estimate(self, affinity: torch.Tensor, usable: torch.Tensor) -> None:
        c = self.config
        delta = self._ensure_delta(affinity, usable)
        if delta is None:
            return
        if self.mode == "bound":
            self.factor = self._clamp(_BOUND_FORMS[c.capacity_bound_form](delta, c.hidden_size, c.num_experts))
            return
        # unusable tokens become zero rows, which misranking_counts leaves out
        u, pairs = misranking_counts(torch.where(usable.unsqueeze(-1), affinity, 0.0))
        misranked, compared, count, rows, bad = self._pooled(
            [u.sum(), pairs.sum(), usable.sum(), affinity.new_tensor(affinity.shape[0]), ~torch.isfinite(affinity).all()])
        if count == 0:
            self._defer(rows, bad)
            return
        if compared:
            self.q_hat = misranked / compared
            self.factor = self._clamp(resonance_factor(self.q_hat, c.num_experts, c.capacity_factor_isotropic))
        elif self.factor is None:  # nothing to measure yet: an untrained router's factor
            self.factor = self._clamp(c.capacity_factor_isotropic)

    def capacity(self, num_tokens: int, affinity: torch.Tensor | None, training: bool,
                 valid: torch.Tensor | None = None) -> int | None:
        """Capacity for a batch of ``num_tokens`` tokens; ``affinity [s, n]`` is read only when
        :meth:`needs_affinity` said so, ``valid [s]`` bool (False = padding) only then too. Advances the
        step counter in training mode.

        Batches with no usable token (:func:`usable_for_estimation`: empty, all padding, non-finite) are
        left out of the estimate, which is deferred to the next training forward; until a first estimate
        exists, such a batch gets the factor ``capacity_factor_max``."""
        self.deferred = None
        if self.mode == "none":
            return None
        if self.needs_affinity(training):
            if affinity is None:
                raise ValueError("capacity estimation needs the affinity; call needs_affinity() first")
            self._retry = False
            affinity = affinity.detach()
            self._estimate(affinity, usable_for_estimation(affinity, valid))
        if training:
            self.steps += 1
        c = self.config
        factor = c.capacity_factor_max if self.factor is None else self.factor
        return capacity_from_factor(factor, num_tokens, c.topk, c.num_experts, c.min_capacity)

    def state_dict(self) -> dict:
        return {"delta": self.delta, "factor": self.factor, "q_hat": self.q_hat, "steps": self.steps,
                "skipped": self.skipped, "settings": capacity_settings(self.config)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`'s output: checked, and with changed settings the new config
        wins (:mod:`locmoe_plugin.capacity_state`)."""
        state = resume_capacity_state(state, self.config)
        self.delta, self.factor, self.q_hat = state["delta"], state["factor"], state["q_hat"]
        self.steps, self.skipped = state["steps"], state["skipped"]
