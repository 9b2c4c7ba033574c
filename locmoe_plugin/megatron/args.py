"""``--locmoe`` command-line flags for Megatron-LM (an ``extra_args_provider``), and their translation
into router settings. Defaults and help text come from :class:`~locmoe_plugin.config.LocMoEConfig`;
Megatron's own flags keep their meaning (``--num-experts``, ``--moe-router-topk``,
``--moe-aux-loss-coeff``, ``--moe-z-loss-coeff``, ``--expert-model-parallel-size``).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..config import (AUX_SCOPES, BUDGET_MECHANISMS, CAPACITIES, DEFAULT_BUDGET_MECHANISM, DROP_POLICIES, GATES,
                      ROUTINGS, ConfigError, LocMoEConfig)

_DEFAULTS = {f.name: f.default for f in LocMoEConfig.__dataclass_fields__.values()}
#: why Megatron's expert bias is refused with LocMoE (here and by the router, for configs built in code)
TOPK_EXPERT_BIAS_ERROR = (
    "--moe-router-enable-expert-bias (moe_router_enable_expert_bias) is TopKRouter's loss-free balancing, for "
    "sigmoid scores; the LocMoE router routes by softmax and has its own: use --locmoe-expert-bias-rate R "
    "(expert_bias_rate, e.g. 1e-3) and leave it off"
)
DISPATCHERS = ("hierarchical", "flat")

#: flag -> LocMoEConfig field
_FIELDS = {
    "locmoe_gate": "gate",
    "locmoe_routing": "routing",
    "locmoe_locality_loss_coeff": "locality_loss_coeff",
    "locmoe_locality_bias": "locality_bias",
    "locmoe_aux_loss_scope": "aux_loss_scope",
    "locmoe_capacity": "capacity",
    "locmoe_capacity_factor": "capacity_factor",
    "locmoe_min_capacity": "min_capacity",
    "locmoe_capacity_factor_min": "capacity_factor_min",
    "locmoe_renormalize_kept": "renormalize_kept",
    "locmoe_delta": "delta",
    "locmoe_adaptive_interval": "adaptive_interval",
    "locmoe_drop_policy": "drop_policy",
    "locmoe_max_nodes_per_token": "max_nodes_per_token",
    "locmoe_gpus_per_node": "gpus_per_node",
    "locmoe_hash_seed": "hash_seed",
    "locmoe_expert_bias_rate": "expert_bias_rate",
    "locmoe_cross_node_budget": "cross_node_budget",
    "locmoe_budget_mechanism": "budget_mechanism",
}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the LocMoE flags to ``parser`` (use as Megatron-LM's ``extra_args_provider``)."""
    g = parser.add_argument_group("LocMoE", "LocMoE / LocMoE+ routing and hierarchical all-to-all (locmoe-plugin)")
    g.add_argument("--locmoe", action="store_true", help="use the LocMoE router and dispatcher in every MoE layer")
    g.add_argument("--locmoe-gate", choices=GATES, default=_DEFAULTS["gate"],
                   help="grap: parameter-free grouped average pooling (LocMoE); dense: learned linear gate")
    g.add_argument("--locmoe-routing", choices=ROUTINGS, default=_DEFAULTS["routing"],
                   help="topk: plain top-k; locmoe: top-k + locality loss; hybrid: LocMoE+ token/expert choice; "
                        "hash: experts from a fixed hash of the token id (Hash Layers baseline; needs "
                        "locmoe_plugin.megatron.router.attach_token_ids(model))")
    g.add_argument("--locmoe-locality-loss-coeff", type=float, default=None,
                   help="mu of the locality loss (default 0.01 for locmoe/hybrid, 0 for topk/hash)")
    g.add_argument("--locmoe-locality-bias", type=lambda v: {"on": True, "off": False}[v], default=None,
                   metavar="{on,off}",
                   help="learned per-rank routing-score offset through which the locality loss moves traffic "
                        "onto the token's node (default: on with the locality loss)")
    g.add_argument("--locmoe-aux-loss-scope", choices=AUX_SCOPES, default=_DEFAULTS["aux_loss_scope"],
                   help="balance measured over the expert-parallel group (default) or this rank's tokens")
    g.add_argument("--locmoe-capacity", choices=CAPACITIES, default=None,
                   help="none (dropless), factor, bound (LocMoE Theorem 1), adaptive (LocMoE+); "
                        "default: none, or adaptive for hybrid; --moe-expert-capacity-factor implies factor")
    g.add_argument("--locmoe-capacity-factor", type=float, default=None, help="capacity factor for --locmoe-capacity factor")
    g.add_argument("--locmoe-min-capacity", type=int, default=_DEFAULTS["min_capacity"], help="smallest capacity per expert")
    g.add_argument("--locmoe-delta", type=float, default=None,
                   help="affinity threshold of the capacity bound (default: estimated from the first batch)")
    g.add_argument("--locmoe-adaptive-interval", type=int, default=_DEFAULTS["adaptive_interval"],
                   help="steps between re-estimations of the adaptive capacity")
    g.add_argument("--locmoe-capacity-factor-min", type=float, default=_DEFAULTS["capacity_factor_min"],
                   help="floor of the bound/adaptive capacity factor (LocMoE+ settles on it: higher keeps more "
                        "pairs per expert; see benchmarks/RESULTS.md)")
    g.add_argument("--locmoe-renormalize-kept", action="store_true",
                   help="after capacity drops, a token's combine weights sum to 1 over the experts it kept")
    g.add_argument("--locmoe-drop-policy", choices=DROP_POLICIES, default=_DEFAULTS["drop_policy"],
                   help="which pairs an over-full expert keeps: highest score, first choices first, or first position")
    g.add_argument("--locmoe-max-nodes-per-token", type=int, default=None,
                   help="node-limited routing: each token's experts on at most this many nodes")
    g.add_argument("--locmoe-gpus-per-node", type=int, default=None,
                   help="GPUs per node (default: LOCMOE_GPUS_PER_NODE, LOCAL_WORLD_SIZE, or host names)")
    g.add_argument("--locmoe-hash-seed", type=int, default=_DEFAULTS["hash_seed"],
                   help="seed of the token-id hash for --locmoe-routing hash")
    g.add_argument("--locmoe-expert-bias-rate", type=float, default=_DEFAULTS["expert_bias_rate"],
                   help="loss-free load balancing: per-expert selection offsets moved by this rate towards "
                        "balance after every training forward (0 = off; e.g. 1e-3). LocMoE's form of "
                        "--moe-router-enable-expert-bias, which needs sigmoid scores")
    g.add_argument("--locmoe-cross-node-budget", type=float, default=_DEFAULTS["cross_node_budget"],
                   help="cross-node traffic budget: at most this share (0..1) of routed pairs go to another node; "
                        "a controller adapts the locality strength online (see --locmoe-budget-mechanism; the "
                        "fixed locality loss then defaults to 0; see docs/locality.md). Default: off")
    g.add_argument("--locmoe-budget-mechanism", choices=BUDGET_MECHANISMS, default=None,
                   help="how the cross-node budget acts: loss = its controller sets the locality loss's coefficient "
                        "(with the locality bias; the gate learns where to send tokens); selection = a margin on "
                        f"the local experts' selection scores only. Default: {DEFAULT_BUDGET_MECHANISM}")
    g.add_argument("--locmoe-dispatcher", choices=DISPATCHERS, default="hierarchical",
                   help="hierarchical: each token crosses to a remote node once (on a one-node EP group: "
                        "one all-to-all of (token, expert) pairs, the plan with the fewest host ops); flat: "
                        "one all-to-all of pairs summed in the two-stage plan's order (bitwise equal to hierarchical "
                        "on groups that span nodes)")
    g.add_argument("--locmoe-overlap-chunks", type=int, default=1,
                   help="chunked overlap; must be 1 under Megatron (MoELayer drives the dispatcher's phases)")
    return parser


def settings_from_args(args: Any) -> tuple[dict, str]:
    """``(locmoe overrides for LocMoEConfig, dispatcher mode)`` from parsed arguments. Validates
    everything that can be checked before a process group exists; raises :class:`ConfigError`."""
    if not getattr(args, "locmoe", False):
        raise ConfigError("--locmoe is not set")
    if not getattr(args, "num_experts", None):
        raise ConfigError("--locmoe needs an MoE model: add --num-experts N (and --moe-router-topk K)")
    if getattr(args, "locmoe_overlap_chunks", 1) != 1:
        raise ConfigError(
            f"--locmoe-overlap-chunks {args.locmoe_overlap_chunks}: under Megatron the MoELayer calls the "
            f"dispatcher phase by phase (use Megatron's --overlap-moe-expert-parallel-comm); set it to 1"
        )
    if getattr(args, "moe_router_enable_expert_bias", False):
        raise ConfigError(TOPK_EXPERT_BIAS_ERROR)
    overrides = {}
    for flag, field in _FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None and value != _DEFAULTS.get(field, object()):
            overrides[field] = value
    if "capacity_factor" in overrides and "capacity" not in overrides:
        overrides["capacity"] = "factor"
    # the full config must validate now (hidden size vs experts, coefficients, capacity...)
    cf = getattr(args, "moe_expert_capacity_factor", None)
    base = dict(num_experts=args.num_experts, hidden_size=args.hidden_size, topk=getattr(args, "moe_router_topk", 2))
    if cf is not None and "capacity" not in overrides:
        base.update(capacity="factor", capacity_factor=cf)
    LocMoEConfig.from_dict({**base, **overrides})
    ep = getattr(args, "expert_model_parallel_size", 1) or 1
    if args.num_experts % ep:
        raise ConfigError(f"--num-experts {args.num_experts} is not divisible by --expert-model-parallel-size {ep}")
    gpn = overrides.get("gpus_per_node")
    if gpn is not None:
        # with expert tensor parallelism 1 (required), an EP group is ep consecutive ranks
        from ..topology import Topology

        Topology.from_global_ranks(range(ep), gpn, args.num_experts)
    return overrides, args.locmoe_dispatcher
