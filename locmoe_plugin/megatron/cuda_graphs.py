"""Megatron's partial CUDA graphs (``--cuda-graph-impl`` with ``--cuda-graph-scope moe_router``): what of
LocMoE a graph can capture, checked once at construction.

Capturable: the router in the modes that read nothing back to the host in forward (capacity ``none`` or
``factor``; gates, routings other than ``hash``, losses, expert bias, telemetry): every counter is a device
tensor, the telemetry sums live in one persistent buffer that a replay adds to, and no shape depends on
the data. Not capturable, refused with one message:
  * capacity ``bound`` / ``adaptive``: the factor is estimated on the host (a device-to-host read and a
    Python step counter at estimation steps);
  * routing ``hash``: the token ids come from a Python hook; a replay would reuse the captured ids;
  * ``LocMoELayer`` with the dispatch preprocess (``moe_preprocess``, which the ``local`` implementation
    adds to ``moe_router`` by itself), the whole MoE (``moe``) or the whole layer: its preprocess starts
    the count exchange (an all-gather and an asynchronous copy of the table to the host, which
    ``token_dispatch`` waits for: the layer's one host sync; in the ``allgather`` mode the routing
    all-gather, read back in ``token_dispatch``) and hands it over as Python state, which a replay does
    not rebuild.

A captured router keeps its own count all-reduce instead of folding it into ``LocMoELayer``'s count
exchange (:func:`captures_router`): a replay runs no Python, so nothing could hand its counts over to the
dispatcher's later, uncaptured phase (``docs/overlap.md``).
"""

from __future__ import annotations

from ..config import ConfigError, LocMoEConfig

#: scopes that put the router inside a graph ("full layer": an empty scope list captures the whole layer)
_ROUTER_SCOPES = {"moe_router", "moe", "full layer", "full_iteration"}


def captured_scopes(config) -> set[str]:
    """Names of the CUDA-graph scopes of a Megatron ``TransformerConfig`` (0.16: ``cuda_graph_scope``; later
    ``cuda_graph_modules``); empty when no graph is captured."""
    impl = getattr(config, "cuda_graph_impl", "none") or "none"
    if impl == "none":
        return set()
    scopes = getattr(config, "cuda_graph_modules", None)
    if scopes is None:
        scopes = getattr(config, "cuda_graph_scope", None)
    if isinstance(scopes, str):
        scopes = scopes.split(",")
    names = {getattr(s, "name", str(s)) for s in (scopes or ())}
    return {"full layer"} if not names or "full" in names else names


def captures_router(config) -> bool:
    """Whether the configured CUDA graphs capture the router (then it keeps its own count all-reduce: a
    replay runs no Python, so it could not hand its counts to the dispatcher's later exchange)."""
    return bool(captured_scopes(config) & _ROUTER_SCOPES)


def check_cuda_graph_support(config, locmoe: LocMoEConfig, with_locmoe_dispatcher: bool) -> None:
    """Raise ConfigError if the configured CUDA graphs would capture a part of LocMoE that cannot be
    captured (see the module doc)."""
    if not captures_router(config):
        return
    scopes = captured_scopes(config)
    problems = []
    if locmoe.capacity in ("bound", "adaptive"):
        problems.append(f"capacity {locmoe.capacity!r} estimates its factor on the host; use --locmoe-capacity "
                        f"factor (or none)")
    if locmoe.routing == "hash":
        problems.append("routing 'hash' reads the token ids from a Python hook, which a replay skips; "
                        "change --locmoe-routing")
    if with_locmoe_dispatcher and scopes - {"moe_router", "attn", "mlp", "mamba"}:
        problems.append("LocMoELayer's dispatch preprocess starts the count exchange (an asynchronous copy to "
                        "the host; in the allgather mode the routing all-gather) and hands it to token_dispatch "
                        "as Python state that a graph replay does not rebuild; capture only the router: "
                        "--cuda-graph-impl transformer_engine --cuda-graph-scope moe_router (the 'local' "
                        "implementation always adds moe_preprocess)")
    if problems:
        impl = getattr(config, "cuda_graph_impl", None)
        raise ConfigError(f"CUDA graphs (cuda_graph_impl={impl!r}, scopes {sorted(scopes)}) would capture the "
                          f"LocMoE router, but: " + "; ".join(problems))
