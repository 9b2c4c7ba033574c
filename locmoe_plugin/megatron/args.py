"""``--locmoe`` command-line flags for Megatron-LM (an ``extra_args_provider``), and their translation
into router settings. Defaults and help text come from :class:`~locmoe_plugin.config.LocMoEConfig`;
Megatron's own flags keep their meaning (``--num-experts``, ``--moe-router-topk``,
``--moe-aux-loss-coeff``, ``--moe-z-loss-coeff``, ``--expert-model-parallel-size``).
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

from ..comm.row_codec import DISPATCH_FORMATS
from ..comm.settings import DISPATCHER_MODES, DispatcherSettings
from .compat import capacity_from_megatron
from ..config import (AUX_SCOPES, BUDGET_MECHANISMS, CAPACITIES, DEFAULT_BUDGET_MECHANISM, DEFAULT_CROSS_NODE_BUDGET,
                      DEFAULT_RESONANCE_MASS, DROP_POLICIES, GATES, ROUTINGS, ConfigError, LocMoEConfig)

_DEFAULTS = {f.name: f.default for f in LocMoEConfig.__dataclass_fields__.values()}
#: why Megatron's expert bias is refused with LocMoE (here and by the router, for configs built in code)
TOPK_EXPERT_BIAS_ERROR = (
    "--moe-router-enable-expert-bias (moe_router_enable_expert_bias) is TopKRouter's loss-free balancing, for "
    "sigmoid scores; the LocMoE router routes by softmax and has its own: use --locmoe-expert-bias-rate R "
    "(expert_bias_rate, e.g. 1e-3) and leave it off"
)
DISPATCHERS = DISPATCHER_MODES

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
    "locmoe_cross_node_budget_warmup": "cross_node_budget_warmup",
    "locmoe_resonance_mass": "resonance_mass",
}


#: LocMoEConfig field -> the Megatron-LM flag that sets it (for messages in the user's terms)
FIELD_FLAGS = {
    **{field: "--" + flag.replace("_", "-") for flag, field in _FIELDS.items()},
    "num_experts": "--num-experts",
    "hidden_size": "--hidden-size",
    "topk": "--moe-router-topk",
    "aux_loss_coeff": "--moe-aux-loss-coeff",
    "z_loss_coeff": "--moe-z-loss-coeff",
    "dispatcher": "--locmoe-dispatcher",
    "overlap": "--locmoe-overlap",
    "equal_tokens": "--locmoe-equal-tokens",
    "dispatch_format": "--locmoe-dispatch-format",
    "capacity_factor_max": "capacity_factor_max (no flag)",
}
_FIELD_PATTERN = re.compile(
    r"(?<![-\w.])(" + "|".join(sorted(map(re.escape, FIELD_FLAGS), key=len, reverse=True))
    + r")(?:=('[^']*'|[^\s,:;)]+))?(?![\w-])"
)


def with_flag_names(message: str) -> str:
    """``message`` with LocMoEConfig field names written as the flags that set them:
    ``capacity_factor=inf`` -> ``--locmoe-capacity-factor inf``. A one-word field (``routing``,
    ``delta``...) is rewritten only where a value follows (``routing='hash'``), not in prose."""

    def flag(m: re.Match) -> str:
        field, value = m.group(1), m.group(2)
        if value is None:
            return FIELD_FLAGS[field] if "_" in field else field
        return f"{FIELD_FLAGS[field]} {value.strip(chr(39))}"

    return _FIELD_PATTERN.sub(flag, message)


def flag_named(settings: dict) -> dict:
    """``settings`` keyed ``"field (--flag)"`` where a flag sets the field (for disagreement messages)."""
    return {f"{k} ({FIELD_FLAGS[k]})" if k in FIELD_FLAGS else k: v for k, v in settings.items()}


def _on_off(value: str) -> bool:
    """argparse type of ``--locmoe-locality-bias``."""
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected 'on' or 'off', got {value!r}")
    return value == "on"


def _non_negative_float(value: str) -> float:
    """argparse type of a coefficient or rate: a finite number >= 0."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (0 = off), got {value!r}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the LocMoE flags to ``parser`` (use as Megatron-LM's ``extra_args_provider``)."""
    g = parser.add_argument_group("LocMoE", "LocMoE / LocMoE+ routing and hierarchical all-to-all (locmoe-plugin)")
    g.add_argument("--locmoe", action="store_true", help="use the LocMoE router and dispatcher in every MoE layer")
    g.add_argument("--locmoe-gate", choices=GATES, default=_DEFAULTS["gate"],
                   help="dense: learned linear gate (default for --locmoe-routing topk/locmoe/hybrid); grap: "
                        "parameter-free grouped average pooling (LocMoE's gate; needs hidden size %% experts == 0)")
    g.add_argument("--locmoe-routing", choices=ROUTINGS, default=_DEFAULTS["routing"],
                   help="topk: plain top-k; locmoe: top-k + locality loss; hybrid: LocMoE+ token/expert choice; "
                        "hash: experts from a fixed hash of the token id (Hash Layers baseline; needs "
                        "locmoe_plugin.megatron.attach_token_ids(model))")
    g.add_argument("--locmoe-locality-loss-coeff", type=_non_negative_float, default=None,
                   help="mu of the locality loss (default: 0 for locmoe/hybrid, which have the cross-node budget "
                        "instead; 0 for topk/hash). Giving it for locmoe/hybrid selects the learned locality loss "
                        "without the default budget")
    g.add_argument("--locmoe-locality-bias", type=_on_off, default=None,
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
    g.add_argument("--locmoe-expert-bias-rate", type=_non_negative_float, default=_DEFAULTS["expert_bias_rate"],
                   help="loss-free load balancing: per-expert selection offsets moved by this rate towards "
                        "balance after every training forward (0 = off; e.g. 1e-3). LocMoE's form of "
                        "--moe-router-enable-expert-bias, which needs sigmoid scores")
    g.add_argument("--locmoe-cross-node-budget", type=float, default=_DEFAULTS["cross_node_budget"],
                   help="cross-node traffic budget: at most this share (0..1) of routed pairs go to another node; "
                        "a controller adapts the locality strength online (see --locmoe-budget-mechanism; the "
                        "fixed locality loss then defaults to 0; see docs/locality.md). Default: "
                        f"{DEFAULT_CROSS_NODE_BUDGET} on 2 nodes, scaled with the EP group's N nodes by "
                        "2 (N-1)/N (0.3 on 4), for --locmoe-routing locmoe/hybrid, unless "
                        "--locmoe-locality-loss-coeff is given (then no budget); off otherwise")
    g.add_argument("--locmoe-budget-mechanism", choices=BUDGET_MECHANISMS, default=None,
                   help="how the cross-node budget acts: loss = its controller sets the locality loss's coefficient "
                        "(with the locality bias; the gate learns where to send tokens); selection = a margin on "
                        "the local experts' selection scores only; node = a price paid once per remote node a "
                        "token is sent to (inter-node bytes, not pairs; at most one remote node per token). "
                        f"Default: {DEFAULT_BUDGET_MECHANISM}")
    g.add_argument("--locmoe-cross-node-budget-warmup", type=int, default=_DEFAULTS["cross_node_budget_warmup"],
                   metavar="STEPS",
                   help="ramp the cross-node budget in: over the router's first STEPS training forwards the "
                        "controller's target falls linearly from the unconstrained share (N-1)/N of N nodes to "
                        "--locmoe-cross-node-budget (0 = the budget from the start; see docs/locality.md)")
    g.add_argument("--locmoe-resonance-mass", type=float, default=_DEFAULTS["resonance_mass"],
                   help="LocMoE+ (hybrid) expert choice: each expert keeps its highest-affinity tokens while their "
                        "summed affinity stays below this share (0..1] of its candidates' total; 0 = off. Default: "
                        f"{DEFAULT_RESONANCE_MASS} for hybrid (see docs/locmoe_plus.md)")
    g.add_argument("--locmoe-dispatcher", choices=DISPATCHERS, default="hierarchical",
                   help="hierarchical: each token crosses to a remote node once (on a one-node EP group: "
                        "one all-to-all of (token, expert) pairs, the plan with the fewest host ops); flat: "
                        "one all-to-all of pairs summed in the two-stage plan's order (bitwise equal to hierarchical "
                        "on groups that span nodes); allgather: EP groups inside one node only, every token "
                        "all-gathered and the results reduce-scattered, as Megatron's allgather dispatcher "
                        "(allclose, not bitwise, to the other modes; see docs/dispatcher.md)")
    g.add_argument("--locmoe-overlap", choices=("on", "off"), default="off",
                   help="split the hierarchical dispatch by origin so the inter-node transfer of other nodes' "
                        "rows runs while this node's rows move (default off: it measured slower than it hid at our sizes, see "
                        "docs/overlap.md; no-op on one node; results bitwise equal)")
    g.add_argument("--locmoe-equal-tokens", choices=("auto", "on", "off"), default="auto",
                   help="whether every EP rank passes the same number of tokens per MoE layer call; with "
                        "--locmoe-dispatcher allgather the layer then runs no count exchange. auto (default): on, "
                        "unless --variable-seq-lengths; off: keep the count exchange (a layer called with other "
                        "token counts per rank would abort or hang the gather otherwise)")
    g.add_argument("--locmoe-dispatch-format", choices=DISPATCH_FORMATS, default="native",
                   help="how token rows (and, in backward, the output gradients) travel to the experts: native "
                        "(default: the hidden states' dtype), fp8 (E4M3 with one fp32 scale per 128 features, as "
                        "DeepEP's FP8 dispatch: about half the bytes of bf16) or int8 (the same blocks in int8). "
                        "The experts compute in the hidden states' dtype on the decoded rows; results travel "
                        "back native. Across nodes only (inside one node rows travel native); works with --locmoe-overlap on. Quality cost: benchmarks/RESULTS.md")
    g.add_argument("--locmoe-grouped-experts", choices=("auto", "on", "off"), default="auto",
                   help="run megatron-core's SequentialMLP experts of every LocMoE layer as two grouped GEMMs "
                        "(same parameters and checkpoints; no loop over experts: fewer launches, see "
                        "docs/one_node.md). auto (default): where the expert config allows it (no bias, no "
                        "fp8/fp4, --expert-tensor-parallel-size 1, no --delay-wgrad-compute), SequentialMLP's loop "
                        "otherwise; on: refuse such a config; off: SequentialMLP. TEGroupedMLP experts "
                        "(--moe-grouped-gemm with TransformerEngine) are kept")
    g.add_argument("--locmoe-overlap-chunks", type=int, default=None,
                   help="removed: the chunked overlap is replaced by --locmoe-overlap {on,off}")
    return parser


def _require_parsed_flags(args: Any) -> None:
    """A namespace from another parser (a plain argparse one) lacks Megatron's or LocMoE's flags: one
    error that names them and the fix, instead of an AttributeError later."""
    missing_megatron = [name for name in ("hidden_size",) if not hasattr(args, name)]
    missing_locmoe = [name for name in ("locmoe_dispatcher",) if not hasattr(args, name)]
    if missing_megatron or missing_locmoe:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing_megatron + missing_locmoe)
        raise ConfigError(
            f"settings_from_args reads Megatron-LM's parsed arguments with the LocMoE flags, and these lack "
            f"{flags}: parse with Megatron-LM's parser and add_arguments as its extra_args_provider"
            + (" (add_arguments(parser) adds the --locmoe-* flags)" if missing_locmoe else "")
            + ", or pass LocMoE settings directly (a dict of LocMoEConfig fields) to locmoe_spec(spec, settings) "
              "or enable(settings=...)"
        )


def grouped_experts_from_args(args: Any) -> str:
    """``--locmoe-grouped-experts`` (``"auto"`` on a namespace without the flag)."""
    return getattr(args, "locmoe_grouped_experts", "auto")


def settings_from_args(args: Any) -> tuple[dict, DispatcherSettings]:
    """``(locmoe overrides for LocMoEConfig, dispatcher settings)`` from parsed arguments. Validates
    everything that can be checked before a process group exists; raises :class:`ConfigError`."""
    if not getattr(args, "locmoe", False):
        raise ConfigError("--locmoe is not set")
    if not getattr(args, "num_experts", None):
        raise ConfigError("--locmoe needs an MoE model: add --num-experts N (and --moe-router-topk K)")
    _require_parsed_flags(args)
    if getattr(args, "locmoe_overlap_chunks", None) is not None:
        raise ConfigError(
            f"--locmoe-overlap-chunks {args.locmoe_overlap_chunks} is removed: use --locmoe-overlap on (the "
            f"inter-node transfer overlaps this node's rows) or --locmoe-overlap off (default)"
        )
    overlap = getattr(args, "locmoe_overlap", "off") == "on"
    if overlap and getattr(args, "overlap_moe_expert_parallel_comm", False):
        from .dispatcher import OVERLAP_CONFLICT_ERROR

        raise ConfigError(OVERLAP_CONFLICT_ERROR)
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
    base.update(capacity_from_megatron(cf, overrides))  # as the router maps it (hybrid keeps adaptive)
    try:
        LocMoEConfig.from_dict({**base, **overrides})
    except ConfigError as exc:  # the user set flags: speak of flags
        raise ConfigError(with_flag_names(str(exc))) from None
    ep = getattr(args, "expert_model_parallel_size", 1) or 1
    if args.num_experts % ep:
        raise ConfigError(f"--num-experts {args.num_experts} is not divisible by --expert-model-parallel-size {ep}")
    gpn = overrides.get("gpus_per_node")
    if gpn is not None:
        # with expert tensor parallelism 1 (required), an EP group is ep consecutive ranks
        from ..topology import Topology

        try:
            Topology.from_global_ranks(range(ep), gpn, args.num_experts)
        except ConfigError as exc:
            raise ConfigError(f"--locmoe-gpus-per-node {gpn} with --expert-model-parallel-size {ep}: {exc}") from None
    equal_tokens = {"auto": None, "on": True, "off": False}[getattr(args, "locmoe_equal_tokens", "auto")]
    fmt = getattr(args, "locmoe_dispatch_format", "native")
    try:
        dispatcher = DispatcherSettings(mode=args.locmoe_dispatcher, overlap=overlap, equal_tokens=equal_tokens,
                                        dispatch_format=fmt)
    except ConfigError as exc:
        raise ConfigError(with_flag_names(str(exc))) from None
    return overrides, dispatcher
