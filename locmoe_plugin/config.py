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
ROUTINGS = ("topk", "locmoe", "hybrid", "hash")
CAPACITIES = ("none", "factor", "bound", "adaptive")
BOUND_FORMS = ("exact", "erfc", "exp")
DROP_POLICIES = ("score", "choice", "position")
AUX_SCOPES = ("ep_group", "local")

#: Default locality-loss coefficient mu for routing "locmoe" / "hybrid". The papers give no value.
#: With our loss, mu * -log(share of the token's routing probability on its own node), mu = 0.01
#: gives the same order of magnitude as the Switch aux loss (alpha = 0.01) at a 50 % local share.
DEFAULT_LOCALITY_LOSS_COEFF = 0.01

#: Cross-node budget that routing "locmoe" and "hybrid" (LocMoE+) get on an EP group over 2 nodes when
#: neither ``cross_node_budget`` nor ``locality_loss_coeff`` is given (with ``aux_loss_scope="ep_group"``);
#: None would mean no budget, the learned locality loss instead. On N nodes the router scales it with the
#: share that routing blind to placement sends across, (N-1)/N (:func:`default_cross_node_budget`): 0.2 on
#: 2 nodes, 0.3 on 4, 0.35 on 8, always 40 % of the unconstrained crossing. Measured (3 seeds paired with
#: Megatron's TopKRouter, benchmarks/RESULTS.md "Cross-node budget curve"): 0.2 on 2 nodes x 2 cost
#: +0.50 % validation loss for 67 % fewer inter-node bytes than Megatron's alltoall; on 4 nodes x 1 the
#: unscaled 0.2 cost +2.25 % and the scaled 0.3 +1.05 % (74 % and 63 % fewer bytes). LocMoE+ with it
#: (and the dense gate) measured -0.8 % val loss against TopKRouter on 2 nodes (docs/locmoe_plus.md).
DEFAULT_CROSS_NODE_BUDGET: float | None = 0.2
#: LocMoE+'s expert-choice threshold on summed affinity when ``resonance_mass`` is not given (routing
#: "hybrid"). 0.9: with the dense gate and the default budget it kept 40 % fewer tokens per expert than a
#: capacity-factor-1.25 buffer at a mean validation loss 0.8 % below TopKRouter's (3 seeds, 2 nodes x 1,
#: docs/locmoe_plus.md). ``resonance_mass=0`` turns the threshold off.
DEFAULT_RESONANCE_MASS = 0.9
#: How a cross-node budget acts when ``budget_mechanism`` is not given (see locmoe_plugin/budget.py).
#: "selection": on the CPU demo (5 seeds, docs/locality.md) it held the share at the budget, while "loss"
#: undershot to near full locality, at quality costs not distinguishable from each other (+1.4 / +1.8 %).
DEFAULT_BUDGET_MECHANISM = "selection"
BUDGET_MECHANISMS = ("loss", "node", "selection")


def unconstrained_share(num_nodes: int) -> float:
    """``(N-1)/N``: the expected cross-node share of routing that ignores where experts sit, over ``N`` nodes
    of equally many experts (the start of the budget's warm-up; the default budget's scale)."""
    return (num_nodes - 1) / num_nodes


def default_cross_node_budget(num_nodes: int) -> float | None:
    """The default budget on an EP group over ``num_nodes`` nodes: :data:`DEFAULT_CROSS_NODE_BUDGET` (its
    2-node value) times ``unconstrained_share(N) / unconstrained_share(2)``, i.e. the same fraction of the
    unconstrained cross-node share on every layout; one node gets the 2-node value (a budget changes nothing
    there). None when :data:`DEFAULT_CROSS_NODE_BUDGET` is None."""
    if DEFAULT_CROSS_NODE_BUDGET is None:
        return None
    scale = unconstrained_share(max(int(num_nodes), 2)) / unconstrained_share(2)
    return round(min(1.0, DEFAULT_CROSS_NODE_BUDGET * scale), 12)


#: LocMoEConfig fields whose None means "resolve from the other settings" (see __post_init__)
_RESOLVED_FIELDS = ("gate", "cross_node_budget", "budget_mechanism", "locality_loss_coeff", "locality_bias",
                    "capacity", "resonance_mass")


class ConfigError(ValueError):
    """An invalid LocMoE setting. The message names the field, the value and the fix."""


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}: pick one of them")


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r} must be an integer >= {low}")


def _finite(name: str, value: Any, what: str) -> None:
    """A real number (not a bool, not a string), finite; else ConfigError saying ``what`` it must be."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be {what}")


def _non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name}={value!r} must be a finite number >= 0 (0 disables it)")


@dataclass(frozen=True, kw_only=True)
class LocMoEConfig:
    """LocMoE / LocMoE+ routing settings (framework-free).

    Routing modes:
      * ``topk``   - plain token choice: softmax over gate logits, top-k, Switch aux loss. The baseline.
      * ``locmoe`` - LocMoE: the same selection, kept mostly on the token's own node. By default a
        cross-node budget (``cross_node_budget``, 0.2) holds the share of routed pairs that cross nodes:
        a controller adds a margin to the local experts' selection scores (no loss). Given
        ``locality_loss_coeff`` instead, locality is learned: the locality loss acts through the gate and
        through the *locality bias* (see ``locality_bias``).
      * ``hybrid`` - LocMoE+: token choice of the top-``topk`` (the paper's l) experts by token-expert
        affinity (the cosine between the token and the gate's weight row of the expert: a learned row with
        the default dense gate, a fixed GrAP group with ``gate="grap"``), then expert choice: each expert
        keeps at most C of the tokens that chose it, ranked by highest unbiased affinity, and only while
        the affinity summed over those ranked above stays below ``resonance_mass`` (0.9 by default) of
        its candidates' total.
        Needs a capacity mode other than "none" (default "adaptive"). Like "locmoe", it defaults to the
        dense gate and the cross-node budget; ``gate="grap", locality_loss_coeff=0.01,
        resonance_mass=0`` gives the earlier GrAP / locality-loss LocMoE+.
      * ``hash``   - Hash Layers (Roller et al. 2021), the LocMoE paper's baseline: each token goes to
        ``topk`` distinct experts picked by a fixed hash of its token id (seeded by ``hash_seed``), with
        weight 1/k each. No gate is built (the model gets no router parameters), so the gate-only
        settings do not apply: ``gate`` must stay "grap" (its d % n rule is not checked),
        ``renormalize`` and ``aux_loss_scope`` are unused, and ``aux_loss_coeff`` is accepted but unused
        (Megatron's ``--moe-aux-loss-coeff`` feeds it; there are no gate probabilities to balance and
        the hash already spreads token ids evenly). ``locality_loss_coeff`` (default 0 here) and
        ``z_loss_coeff`` must be 0, ``max_nodes_per_token`` unset, and capacity "none" or "factor"
        (``bound`` / ``adaptive`` derive the capacity from gate affinities). The router needs the token
        ids in forward (``LocMoERouter.forward(hidden, token_ids)``).

    Capacity modes (C = tokens one expert may take from one rank's batch):
      * ``none``     - dropless (Megatron's default).
      * ``factor``   - C = ceil(capacity_factor * s * k / n), at least ``min_capacity``.
      * ``bound``    - LocMoE: the factor is LocMoE's Theorem-1 bound 1 / (n * p_delta) (or its erfc /
        exponential form, ``capacity_bound_form``), with delta estimated once from the first batch (or
        given as ``delta``), clamped to [capacity_factor_min, capacity_factor_max].
      * ``adaptive`` - LocMoE+: every ``adaptive_interval`` steps the factor is re-estimated from how well
        tokens resonate with their experts (the misranking rate q of the paper's Eq. 10, reduced over the
        expert-parallel group so every rank agrees): ``capacity_factor_isotropic * q / q_chance``, large
        on an untrained router and falling as affinities concentrate (Corollary 6), clamped to
        [capacity_factor_min, capacity_factor_max]. See locmoe_plugin/resonance.py, docs/locmoe_plus.md.
    """

    #: n, experts in the layer (over the whole expert-parallel group).
    num_experts: int
    #: d, the hidden size of the tokens routed (GrAP needs d % n == 0).
    hidden_size: int
    #: Experts per token (k; LocMoE+'s l).
    topk: int = 2
    #: "grap": parameter-free grouped average pooling, one group of d/n features per expert (LocMoE);
    #: "dense": a learned linear gate ``[n, d]``. None -> "dense" for routing "topk", "locmoe" and "hybrid"
    #: (the gate of the measured default points: benchmarks/RESULTS.md "Cross-node budget curve",
    #: docs/locmoe_plus.md; LocMoE+'s affinity is then the cosine between a token and a learned gate row),
    #: "grap" for "hash" (which builds no gate).
    gate: str | None = None
    #: "topk", "locmoe", "hybrid" (LocMoE+) or "hash": see the routing modes above.
    routing: str = "locmoe"
    #: Renormalise the combine weights of a token over its selected experts (Megatron's default
    #: softmax-after-top-k gives the same numbers). Irrelevant for topk == 1 when False gives raw prob.
    renormalize: bool = True
    #: With capacity drops: rescale a token's combine weights to sum to 1 over the experts it kept
    #: (DeepSpeed's top-2 gate does; Megatron's capacity keeps the weights from before the drops).
    #: Off by default, as Megatron (the measured effect on quality is in the benchmark results).
    renormalize_kept: bool = False
    #: alpha of the Switch load-balance loss ``alpha * n * sum_i f_i P_i`` (0 disables it).
    aux_loss_coeff: float = 0.01
    #: Where the aux loss measures balance. "ep_group" (default): expert loads f_i are summed over the
    #: expert-parallel group (one all-reduce of n counts per layer), so balance is global while the
    #: locality loss keeps each node's tokens at home. "local": this rank's tokens only, which fights
    #: the locality loss (local balance wants every rank to use every node's experts).
    aux_loss_scope: str = "ep_group"
    #: None -> 0 for "topk" / "hash", and for "locmoe" / "hybrid" with a cross-node budget (their default
    #: with ``aux_loss_scope="ep_group"``); else DEFAULT_LOCALITY_LOSS_COEFF. Giving it for "locmoe" /
    #: "hybrid" selects the learned locality loss without the default budget.
    locality_loss_coeff: float | None = None
    #: Coefficient of the router z-loss (mean squared logsumexp of the gate logits; 0 = off).
    z_loss_coeff: float = 0.0
    #: None -> "none" for "topk"/"locmoe", "adaptive" for "hybrid".
    capacity: str | None = None
    #: c_f of capacity "factor" (C = ceil(c_f * s * k / n)); only with capacity="factor".
    capacity_factor: float | None = None
    #: Smallest capacity per expert, whatever the factor gives.
    min_capacity: int = 4
    #: Floor of the "bound" / "adaptive" factor. LocMoE+'s adaptive factor settles on it, so it sets how
    #: many pairs an expert keeps: higher keeps more (fewer drops, more tokens per expert); the measured
    #: trade-off against validation loss is in the benchmark results.
    capacity_factor_min: float = 0.5
    #: Ceiling of the "bound" / "adaptive" factor.
    capacity_factor_max: float = 4.0
    #: Fixed affinity threshold for "bound"/"adaptive"; None -> estimated from the first batch.
    delta: float | None = None
    #: Steps between re-estimations of the "adaptive" capacity.
    adaptive_interval: int = 100
    #: "adaptive": the factor when affinities rank no better than chance (an untrained router, the
    #: paper's C = Theta(s) phase); it scales with the measured misranking rate from there.
    capacity_factor_isotropic: float = 2.0
    #: "bound": Theorem 1's exact beta form, its large-d "erfc" form, or the "exp" form of LocMoE+'s
    #: Remark 7, C_min = (1/n) exp(d delta^2 / (2 - delta^2)).
    capacity_bound_form: str = "exact"
    #: "hybrid": the expert-choice threshold on summed affinity (LocMoE+ Eq. 6): each expert keeps its
    #: highest-affinity tokens until the affinity summed over those ranked above reaches this share of
    #: its candidates' total; 1.0 keeps exactly the tokens with a positive affinity. 0: off (the
    #: schedule's capacity alone limits each expert). None -> DEFAULT_RESONANCE_MASS (0.9) for "hybrid";
    #: the other routings have no expert choice and take only None or 0.
    resonance_mass: float | None = None
    #: Which routed (token, expert) pairs an expert keeps when over capacity: highest "score"
    #: (gate probability; affinity for "hybrid"), tokens' first "choice"s before their second ones (by
    #: score inside a choice rank), or first by token "position".
    drop_policy: str = "score"
    #: Node-limited routing: each token's experts lie on at most this many nodes (None = no limit).
    max_nodes_per_token: int | None = None
    #: A learned routing-score offset per expert-parallel rank (``[ep_size, n]``, zero at start, this
    #: rank's row added to its gate logits; "hybrid" makes its token choice by the cosine of the biased
    #: logits and its expert choice by the unbiased cosine). It is the
    #: router's only rank-aware input: the gate sees token content only and is replicated over data-
    #: parallel ranks, so on data that is distributed alike on every rank the expected cross-node share
    #: is (N-1)/N for N nodes whatever the gate learns (a token's node is independent of its content);
    #: the locality loss can move traffic only through this bias. None -> on when the locality loss is.
    locality_bias: bool | None = None
    #: The bias is read as ``locality_bias_scale * parameter``. Adam-type optimizers move a parameter by
    #: about ``lr`` per step whatever its gradient's size, so the scale makes the bias move by about
    #: ``scale * lr`` per step: routing scores need offsets of order 1, which at lr 1e-4..1e-3 and scale
    #: 1 would take thousands of steps. (Plain SGD would see an effective lr of ``scale**2 * lr``.)
    locality_bias_scale: float = 10.0
    #: Loss-free load balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3): an ``[n]`` fp32 bias
    #: added to the scores the experts are *selected* by (probabilities; affinities for "hybrid"), never
    #: to the combine weights, moved by ``rate * sign(mean load - load)`` after every training forward
    #: (under grad) from the per-expert counts the router already has - summed over the EP group with
    #: ``aux_loss_scope="ep_group"``, so the bias stays equal on the group's ranks and no extra
    #: collective is issued. With "local" each rank balances its own tokens over every expert, which
    #: (like the local aux loss) undoes the locality loss on several nodes. 0 = off. A parameter-free
    #: gate (GrAP) can balance only through the hidden states; this bias balances it directly.
    #: Data-parallel replicas of the EP group each keep their own bias (they see different tokens); the
    #: bias is saved with the model. Updating in forward keeps it framework-free, but an activation
    #: recompute of the router must route as its forward did: under Megatron, recomputing the MoE layer
    #: together with pipeline parallelism (several forwards before their recomputes) is refused.
    expert_bias_rate: float = 0.0
    #: Cross-node traffic budget: the largest share, in [0, 1], of the EP group's routed (token, expert)
    #: pairs whose expert sits on another node (None = the default where it applies, else off; 1.0 never
    #: constrains). Left to its default, this field shows DEFAULT_CROSS_NODE_BUDGET (the 2-node value) and
    #: the router applies :meth:`cross_node_budget_on` for its EP group's node count. A controller
    #: (:class:`locmoe_plugin.budget.CrossNodeBudget`) raises the locality strength (``budget_mechanism``:
    #: the locality loss's coefficient, or a selection margin) until the measured share is at most the
    #: budget (see docs/locality.md). With a
    #: budget, ``locality_loss_coeff`` defaults to 0 (the controller is the locality term); needs routing
    #: "locmoe" or "hybrid" and ``aux_loss_scope="ep_group"`` (the share is read from its reduced counts).
    cross_node_budget: float | None = None
    #: How the budget's controller acts (None = DEFAULT_BUDGET_MECHANISM; only with a budget). "loss": its
    #: multiplier is the locality loss's coefficient (added to ``locality_loss_coeff``) and the locality
    #: bias is on, so the gate learns where to send tokens and the combine weights follow. "selection":
    #: its multiplier is a margin added to the local experts' selection scores only (the gate is not taught).
    #: "node": its multiplier is a price paid once per remote node a token is sent to (the dispatcher sends
    #: one copy per node, so bytes follow nodes, not pairs): a token takes its top-k over its own node plus
    #: the one other node that raises its top-k score sum by more than the price (at most 2 nodes per
    #: token; needs at least topk experts per node; not with ``max_nodes_per_token``).
    budget_mechanism: str | None = None
    #: Warm-up of the cross-node budget, in the router's training forwards (the controller's updates: optimizer
    #: steps x gradient-accumulation micro-batches; evaluation, no-grad forwards and the no-grad first pass
    #: of activation recomputation do not count). During the first W, the controller's target falls
    #: linearly from the unconstrained share (N-1)/N of the EP group's N nodes (no constraint) to
    #: ``cross_node_budget``, so routing starts free and tightens gradually (see locmoe_plugin/budget.py).
    #: The count is saved in checkpoints with the controller. 0 = the budget from the first step.
    cross_node_budget_warmup: int = 0
    #: Ranks of the expert-parallel group per node; None = detect (LOCAL_WORLD_SIZE or host names).
    gpus_per_node: int | None = None
    #: Seed of the token-id hash for routing="hash", in [0, 2**32); a different seed is a different
    #: fixed token -> experts map.
    hash_seed: int = 0

    def __post_init__(self) -> None:
        # fields left to their routing-dependent default; replace() resolves them again
        object.__setattr__(self, "_defaulted", frozenset(n for n in _RESOLVED_FIELDS if getattr(self, n) is None))
        _int_at_least("num_experts", self.num_experts, 1)
        _int_at_least("hidden_size", self.hidden_size, 1)
        _int_at_least("topk", self.topk, 1)
        if self.topk > self.num_experts:
            raise ConfigError(
                f"topk={self.topk} is larger than num_experts={self.num_experts}: "
                f"a token cannot choose more experts than exist; use topk <= {self.num_experts}"
            )
        _choice("routing", self.routing, ROUTINGS)
        if self.gate is None:
            object.__setattr__(self, "gate", "grap" if self.routing == "hash" else "dense")
        _choice("gate", self.gate, GATES)
        hashed = self.routing == "hash"
        if hashed and self.gate != "grap":
            raise ConfigError(
                f"gate={self.gate!r} with routing='hash': hash routing picks experts from the token id and "
                f"builds no gate, so a learned gate would never be trained or used; leave gate at 'grap'"
            )
        if self.gate == "grap" and not hashed and self.hidden_size % self.num_experts:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_experts {self.num_experts}: "
                f"GrAP needs d % n == 0 (one group of d/n features per expert); use gate='dense' or "
                f"a hidden size that is a multiple of {self.num_experts}"
            )
        _non_negative("aux_loss_coeff", self.aux_loss_coeff)
        _choice("aux_loss_scope", self.aux_loss_scope, AUX_SCOPES)
        _non_negative("z_loss_coeff", self.z_loss_coeff)
        if hashed and self.z_loss_coeff > 0:
            raise ConfigError(
                f"z_loss_coeff={self.z_loss_coeff} with routing='hash': the z-loss regularises gate logits "
                f"and hash routing has no gate; set z_loss_coeff=0 (--moe-z-loss-coeff) or change routing"
            )
        if (self.cross_node_budget is None and self.locality_loss_coeff is None
                and self.routing in ("locmoe", "hybrid") and self.aux_loss_scope == "ep_group"):
            object.__setattr__(self, "cross_node_budget", DEFAULT_CROSS_NODE_BUDGET)
        budget = self.cross_node_budget
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget <= 1:
                raise ConfigError(
                    f"cross_node_budget={budget!r} must be a share in [0, 1] (e.g. 0.2 = at most 20 % of routed "
                    f"pairs cross nodes); for no budget with routing 'locmoe' or 'hybrid', give "
                    f"locality_loss_coeff instead"
                )
            if self.routing in ("topk", "hash"):
                raise ConfigError(
                    f"cross_node_budget={budget} needs a routing with a locality term: routing={self.routing!r} "
                    f"has none; set routing='locmoe' (or 'hybrid'), or remove cross_node_budget"
                )
            if self.aux_loss_scope != "ep_group":
                raise ConfigError(
                    f"cross_node_budget={budget} reads the cross-node share from the per-expert counts summed "
                    f"over the expert-parallel group: set aux_loss_scope='ep_group' or remove cross_node_budget"
                )
        if budget is None and self.budget_mechanism is not None:
            raise ConfigError(
                f"budget_mechanism={self.budget_mechanism!r} says how a cross-node budget acts, and no "
                f"cross_node_budget is set: set cross_node_budget (e.g. 0.1) or remove budget_mechanism"
            )
        warmup = self.cross_node_budget_warmup
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ConfigError(
                f"cross_node_budget_warmup={warmup!r} must be a whole number of training steps >= 0 (e.g. 300; "
                f"0 = no warm-up)"
            )
        if warmup and budget is None:
            raise ConfigError(
                f"cross_node_budget_warmup={warmup} ramps a cross-node budget in, and no cross_node_budget is set: "
                f"set cross_node_budget (e.g. 0.1) or remove cross_node_budget_warmup"
            )
        if budget is not None:
            if self.budget_mechanism is None:
                object.__setattr__(self, "budget_mechanism", DEFAULT_BUDGET_MECHANISM)
            _choice("budget_mechanism", self.budget_mechanism, BUDGET_MECHANISMS)
        budget_loss = self.budget_mechanism == "loss"
        if self.locality_loss_coeff is None:
            learned = self.routing not in ("topk", "hash") and budget is None
            object.__setattr__(self, "locality_loss_coeff", DEFAULT_LOCALITY_LOSS_COEFF if learned else 0.0)
        _non_negative("locality_loss_coeff", self.locality_loss_coeff)
        if self.routing in ("topk", "hash") and self.locality_loss_coeff > 0:
            why = "is the plain baseline" if self.routing == "topk" else "has no gate to teach locality"
            raise ConfigError(
                f"locality_loss_coeff={self.locality_loss_coeff} needs routing='locmoe' or 'hybrid': "
                f"routing={self.routing!r} {why}; set locality_loss_coeff=0 or change routing"
            )

        for flag in ("renormalize", "renormalize_kept"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag}={getattr(self, flag)!r} must be True or False")
        _non_negative("locality_bias_scale", self.locality_bias_scale)
        if self.locality_bias is None:
            object.__setattr__(self, "locality_bias", self.locality_loss_coeff > 0 or budget_loss)
        elif not isinstance(self.locality_bias, bool):
            raise ConfigError(f"locality_bias={self.locality_bias!r} must be True, False or None (automatic)")
        elif budget_loss and not self.locality_bias:
            raise ConfigError(
                "budget_mechanism='loss' moves traffic through the locality bias (the gate sees token content "
                "only, which is alike on every node): leave locality_bias on (None), or set "
                "budget_mechanism='selection'"
            )
        elif self.locality_bias and self.locality_loss_coeff == 0 and not budget_loss:
            raise ConfigError(
                "locality_bias is trained by the locality loss, which is off (locality_loss_coeff=0; routing "
                "'locmoe' and 'hybrid' use the cross-node budget by default): set locality_loss_coeff > 0 with "
                "routing 'locmoe' or 'hybrid', or locality_bias=False"
            )

        _non_negative("expert_bias_rate", self.expert_bias_rate)
        if hashed and self.expert_bias_rate > 0:
            raise ConfigError(
                f"expert_bias_rate={self.expert_bias_rate} with routing='hash': the bias shifts gate scores "
                f"and hash routing has no gate; set expert_bias_rate=0 or change routing"
            )

        if self.capacity is None:
            object.__setattr__(self, "capacity", "adaptive" if self.routing == "hybrid" else "none")
        _choice("capacity", self.capacity, CAPACITIES)
        if self.routing == "hybrid" and self.capacity == "none":
            raise ConfigError(
                "routing='hybrid' (LocMoE+) needs a capacity for its expert-choice step: "
                "set capacity to 'factor', 'bound' or 'adaptive'"
            )
        if hashed and self.capacity in ("bound", "adaptive"):
            raise ConfigError(
                f"capacity={self.capacity!r} with routing='hash': it sets the capacity from token-expert "
                f"affinities of the gate, and hash routing has no gate; use capacity='factor' (with "
                f"capacity_factor) or 'none'"
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
            _finite("capacity_factor", self.capacity_factor, "a finite number > 0 (e.g. 1.25)")
            if self.capacity_factor <= 0:
                raise ConfigError(f"capacity_factor={self.capacity_factor!r} must be > 0 (e.g. 1.25)")
        _int_at_least("min_capacity", self.min_capacity, 0)
        for name in ("capacity_factor_min", "capacity_factor_max"):
            _finite(name, getattr(self, name), "a finite number > 0")
        if not (0 < self.capacity_factor_min <= self.capacity_factor_max):
            raise ConfigError(
                f"capacity_factor_min={self.capacity_factor_min} and capacity_factor_max="
                f"{self.capacity_factor_max} must satisfy 0 < min <= max"
            )
        if self.delta is not None:
            _finite("delta", self.delta, "a number in (0, 1), e.g. 0.03")
        if self.delta is not None and not (0 < self.delta < 1):
            raise ConfigError(
                f"delta={self.delta} is outside (0, 1): it is a cosine-similarity threshold "
                f"(LocMoE measured ~0.03); leave it None to estimate it from the first batch"
            )
        if self.delta is not None and self.capacity not in ("bound", "adaptive"):
            raise ConfigError(
                f"delta={self.delta!r} is only used with capacity 'bound' or 'adaptive' (capacity is "
                f"{self.capacity!r}); remove it or choose one of those capacity modes"
            )
        _int_at_least("adaptive_interval", self.adaptive_interval, 1)
        iso = self.capacity_factor_isotropic
        if isinstance(iso, bool) or not isinstance(iso, (int, float)) or not (0 < iso < math.inf):
            raise ConfigError(f"capacity_factor_isotropic={iso!r} must be a finite number > 0 (e.g. 2.0)")
        _choice("capacity_bound_form", self.capacity_bound_form, BOUND_FORMS)
        if self.resonance_mass is None and self.routing == "hybrid":
            object.__setattr__(self, "resonance_mass", DEFAULT_RESONANCE_MASS)
        rm = self.resonance_mass
        if rm is not None:
            if isinstance(rm, bool) or not isinstance(rm, (int, float)) or not (0 <= rm <= 1):
                raise ConfigError(
                    f"resonance_mass={rm!r} must be in (0, 1] (share of an expert's summed affinity it keeps), "
                    f"0 (off) or None (the default: {DEFAULT_RESONANCE_MASS} for routing 'hybrid')"
                )
            if rm > 0 and self.routing != "hybrid":
                raise ConfigError(
                    f"resonance_mass={rm} is LocMoE+'s expert-choice threshold and needs routing='hybrid' "
                    f"(routing is {self.routing!r}); remove it (or set it to 0) or set routing='hybrid'"
                )
        _choice("drop_policy", self.drop_policy, DROP_POLICIES)
        if self.max_nodes_per_token is not None:
            _int_at_least("max_nodes_per_token", self.max_nodes_per_token, 1)
            if self.budget_mechanism == "node":
                raise ConfigError(
                    f"max_nodes_per_token={self.max_nodes_per_token} with budget_mechanism='node': that mechanism "
                    f"chooses each token's nodes itself (its own node and at most one other); remove "
                    f"max_nodes_per_token, or use budget_mechanism='selection' with it"
                )
            if hashed:
                raise ConfigError(
                    f"max_nodes_per_token={self.max_nodes_per_token} with routing='hash': node-limited "
                    f"routing ranks nodes by gate scores, and the hash fixes each token's experts; "
                    f"remove max_nodes_per_token or change routing"
                )
        if self.gpus_per_node is not None:
            _int_at_least("gpus_per_node", self.gpus_per_node, 1)
        seed = self.hash_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ConfigError(f"hash_seed={self.hash_seed!r} must be an integer in [0, 2**32)")
        if self.hash_seed and not hashed:
            raise ConfigError(
                f"hash_seed={self.hash_seed} is only used with routing='hash' (routing is "
                f"{self.routing!r}); remove it or set routing='hash'"
            )

    # ------------------------------------------------------------------ helpers
    @property
    def drops_tokens(self) -> bool:
        return self.capacity != "none"

    def cross_node_budget_on(self, num_nodes: int) -> float | None:
        """The budget a router applies on an EP group over ``num_nodes`` nodes: ``cross_node_budget`` as
        given, or, where it was left to its default, :func:`default_cross_node_budget` of the node count
        (0.2 on 2 nodes, 0.3 on 4); None without a budget."""
        if self.cross_node_budget is None:
            return None
        if "cross_node_budget" in self._defaulted:
            return default_cross_node_budget(num_nodes)
        return float(self.cross_node_budget)

    def replace(self, **changes: Any) -> "LocMoEConfig":
        """A validated copy with some fields changed. Fields this config left to their default (None at
        construction: gate, budget, mechanism, locality loss and bias, capacity, resonance mass) are
        resolved again for the new values, as a fresh construction would; fields given explicitly keep
        their values unless changed."""
        reset = {name: None for name in self._defaulted if name not in changes}
        return dataclasses.replace(self, **reset, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as given: None where a field was left to its default (the attributes hold the resolved
        values), so ``from_dict(to_dict())`` rebuilds the same config, defaults included (a defaulted
        cross-node budget stays scaled with the node count, :meth:`cross_node_budget_on`)."""
        values = dataclasses.asdict(self)
        values.update({name: None for name in self._defaulted})
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "LocMoEConfig":
        """Build from a mapping (a JSON config section); unknown or missing required keys are an error."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"LocMoE options must be a mapping of option names to values, got a "
                              f"{type(values).__name__}: {values!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in values]
        if missing:
            raise ConfigError(f"LocMoE options lack {missing}: give {', '.join(missing)}")
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown LocMoE option(s) {unknown}; known options: {sorted(known)}")
        return cls(**dict(values))
