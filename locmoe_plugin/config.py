"""The one configuration object of LocMoE routing, shared by the Megatron and DeepSpeed adapters.

Every field is validated in ``__post_init__``; a bad value raises :class:`ConfigError` with a message
that says what is wrong and how to fix it, before any tensor is built or any collective is issued.
Fields left as ``None`` take a default that depends on the routing mode (resolved in
``__post_init__``, so the frozen object always holds concrete values).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

GATES = ("grap", "dense")
ROUTINGS = ("topk", "locmoe", "hybrid")
CAPACITIES = ("none", "factor", "bound", "adaptive")
DROP_POLICIES = ("score", "position")
AUX_SCOPES = ("ep_group", "local")

#: Default locality-loss coefficient mu for routing "locmoe" / "hybrid". The papers give no value.
#: With our loss, mu * -log(share of the token's routing probability on its own node), mu = 0.01
#: gives the same order of magnitude as the Switch aux loss (alpha = 0.01) at a 50 % local share.
DEFAULT_LOCALITY_LOSS_COEFF = 0.01


class ConfigError(ValueError):
    """An invalid LocMoE setting. The message names the field, the value and the fix."""


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}: pick one of them")


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r} must be an integer >= {low}")


def _non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name}={value!r} must be a finite number >= 0 (0 disables it)")


@dataclass(frozen=True, kw_only=True)
class LocMoEConfig:
    """LocMoE / LocMoE+ routing settings (framework-free).

    Routing modes:
      * ``topk``   - plain token choice: softmax over gate logits, top-k, Switch aux loss. The baseline.
      * ``locmoe`` - LocMoE: the same selection, plus the locality loss that teaches the (GrAP) gate to
        prefer experts on the token's own node. Locality is learned, not forced.
      * ``hybrid`` - LocMoE+: token choice of the top-``topk`` (the paper's l) experts by token-expert
        affinity, then expert choice: each expert keeps at most C of the tokens that chose it, ranked by
        highest affinity. Needs a capacity mode other than "none" (default "adaptive").

    Capacity modes (C = tokens one expert may take from one rank's batch):
      * ``none``     - dropless (Megatron's default).
      * ``factor``   - C = ceil(capacity_factor * s * k / n), at least ``min_capacity``.
      * ``bound``    - LocMoE: the factor is LocMoE's Theorem-1 bound 1 / (n * p_delta), with delta
        estimated once from the first batch (or given as ``delta``), clamped to
        [capacity_factor_min, capacity_factor_max].
      * ``adaptive`` - LocMoE+: the factor is re-estimated every ``adaptive_interval`` steps from the
        measured share of token-expert affinities >= delta, reduced over the expert-parallel group so
        every rank agrees; never below ``capacity_factor_min``.
    """

    num_experts: int
    hidden_size: int
    topk: int = 2
    gate: str = "grap"
    routing: str = "locmoe"
    #: Renormalise the combine weights of a token over its selected experts (Megatron's default
    #: softmax-after-top-k gives the same numbers). Irrelevant for topk == 1 when False gives raw prob.
    renormalize: bool = True
    aux_loss_coeff: float = 0.01
    #: Where the aux loss measures balance. "ep_group" (default): expert loads f_i are summed over the
    #: expert-parallel group (one all-reduce of n counts per layer), so balance is global while the
    #: locality loss keeps each node's tokens at home. "local": this rank's tokens only, which fights
    #: the locality loss (local balance wants every rank to use every node's experts).
    aux_loss_scope: str = "ep_group"
    #: None -> DEFAULT_LOCALITY_LOSS_COEFF for "locmoe"/"hybrid", 0 for "topk".
    locality_loss_coeff: float | None = None
    z_loss_coeff: float = 0.0
    #: None -> "none" for "topk"/"locmoe", "adaptive" for "hybrid".
    capacity: str | None = None
    capacity_factor: float | None = None
    min_capacity: int = 4
    capacity_factor_min: float = 0.5
    capacity_factor_max: float = 4.0
    #: Fixed affinity threshold for "bound"/"adaptive"; None -> estimated from the first batch.
    delta: float | None = None
    adaptive_interval: int = 100
    #: Which routed (token, expert) pairs an expert keeps when over capacity: highest "score"
    #: (gate probability; affinity for "hybrid") or first by token "position".
    drop_policy: str = "score"
    #: Node-limited routing: each token's experts lie on at most this many nodes (None = no limit).
    max_nodes_per_token: int | None = None
    #: Ranks of the expert-parallel group per node; None = detect (LOCAL_WORLD_SIZE or host names).
    gpus_per_node: int | None = None

    def __post_init__(self) -> None:
        _int_at_least("num_experts", self.num_experts, 1)
        _int_at_least("hidden_size", self.hidden_size, 1)
        _int_at_least("topk", self.topk, 1)
        if self.topk > self.num_experts:
            raise ConfigError(
                f"topk={self.topk} is larger than num_experts={self.num_experts}: "
                f"a token cannot choose more experts than exist; use topk <= {self.num_experts}"
            )
        _choice("gate", self.gate, GATES)
        _choice("routing", self.routing, ROUTINGS)
        if self.gate == "grap" and self.hidden_size % self.num_experts:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_experts {self.num_experts}: "
                f"GrAP needs d % n == 0 (one group of d/n features per expert); use gate='dense' or "
                f"a hidden size that is a multiple of {self.num_experts}"
            )
        _non_negative("aux_loss_coeff", self.aux_loss_coeff)
        _choice("aux_loss_scope", self.aux_loss_scope, AUX_SCOPES)
        _non_negative("z_loss_coeff", self.z_loss_coeff)
        if self.locality_loss_coeff is None:
            mu = 0.0 if self.routing == "topk" else DEFAULT_LOCALITY_LOSS_COEFF
            object.__setattr__(self, "locality_loss_coeff", mu)
        _non_negative("locality_loss_coeff", self.locality_loss_coeff)
        if self.routing == "topk" and self.locality_loss_coeff > 0:
            raise ConfigError(
                f"locality_loss_coeff={self.locality_loss_coeff} needs routing='locmoe' or 'hybrid': "
                f"routing='topk' is the plain baseline; set locality_loss_coeff=0 or change routing"
            )

        if self.capacity is None:
            object.__setattr__(self, "capacity", "adaptive" if self.routing == "hybrid" else "none")
        _choice("capacity", self.capacity, CAPACITIES)
        if self.routing == "hybrid" and self.capacity == "none":
            raise ConfigError(
                "routing='hybrid' (LocMoE+) needs a capacity for its expert-choice step: "
                "set capacity to 'factor', 'bound' or 'adaptive'"
            )
        if self.capacity == "factor":
            if self.capacity_factor is None:
                raise ConfigError("capacity='factor' needs capacity_factor (e.g. 1.25)")
        if self.capacity_factor is not None:
            if self.capacity != "factor":
                raise ConfigError(
                    f"capacity_factor={self.capacity_factor} is only used with capacity='factor' "
                    f"(capacity is {self.capacity!r}); remove it or set capacity='factor'"
                )
            if not (isinstance(self.capacity_factor, (int, float)) and self.capacity_factor > 0):
                raise ConfigError(f"capacity_factor={self.capacity_factor!r} must be > 0 (e.g. 1.25)")
        _int_at_least("min_capacity", self.min_capacity, 0)
        if not (0 < self.capacity_factor_min <= self.capacity_factor_max):
            raise ConfigError(
                f"capacity_factor_min={self.capacity_factor_min} and capacity_factor_max="
                f"{self.capacity_factor_max} must satisfy 0 < min <= max"
            )
        if self.delta is not None and not (0 < self.delta < 1):
            raise ConfigError(
                f"delta={self.delta} is outside (0, 1): it is a cosine-similarity threshold "
                f"(LocMoE measured ~0.03); leave it None to estimate it from the first batch"
            )
        _int_at_least("adaptive_interval", self.adaptive_interval, 1)
        _choice("drop_policy", self.drop_policy, DROP_POLICIES)
        if self.max_nodes_per_token is not None:
            _int_at_least("max_nodes_per_token", self.max_nodes_per_token, 1)
        if self.gpus_per_node is not None:
            _int_at_least("gpus_per_node", self.gpus_per_node, 1)

    # ------------------------------------------------------------------ helpers
    @property
    def drops_tokens(self) -> bool:
        return self.capacity != "none"

    def replace(self, **changes: Any) -> "LocMoEConfig":
        """A validated copy with some fields changed (``None``-defaulted fields are re-resolved
        only if they are passed explicitly)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "LocMoEConfig":
        """Build from a mapping (a JSON config section); unknown keys are an error, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown LocMoE option(s) {unknown}; known options: {sorted(known)}")
        return cls(**dict(values))
