"""Which megatron-core is installed, and the few places where 0.16 and 0.19 differ.

Supported: megatron-core >= 0.16 (the first with ``MoESubmodules.router``) and < 0.20 (the newest
tested is 0.19.2). Anything else fails with one message before a model is built.
"""

from __future__ import annotations

import inspect
import re

MIN_VERSION = (0, 16)
MAX_VERSION_EXCLUSIVE = (0, 20)


class UnsupportedMegatronError(RuntimeError):
    """The installed megatron-core is outside the supported range, or missing."""


def parse_version(text: str) -> tuple[int, ...]:
    nums = re.findall(r"\d+", text)[:3]
    return tuple(int(n) for n in nums)


def megatron_core_version() -> tuple[int, ...]:
    try:
        import megatron.core as mcore
    except ImportError as exc:
        raise UnsupportedMegatronError(
            "megatron-core is not installed: pip install 'locmoe-plugin[megatron]' "
            "(megatron-core >= 0.16, < 0.20)"
        ) from exc
    return parse_version(getattr(mcore, "__version__", "0"))


def check_supported(version: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Raise :class:`UnsupportedMegatronError` unless ``0.16 <= version < 0.20``; return it."""
    v = megatron_core_version() if version is None else version
    if not (MIN_VERSION <= tuple(v[:2]) < MAX_VERSION_EXCLUSIVE):
        shown = ".".join(map(str, v))
        raise UnsupportedMegatronError(
            f"megatron-core {shown} is not supported: locmoe-plugin needs megatron-core >= 0.16 "
            f"(MoESubmodules.router) and < 0.20 (tested: 0.16.1, 0.19.2); install one with "
            f"pip install 'megatron-core>=0.16,<0.20'"
        )
    return v


def router_init_kwargs(base_cls) -> set[str]:
    """Keyword arguments the installed Router base accepts (0.19 added ``is_mtp_layer``)."""
    return set(inspect.signature(base_cls.__init__).parameters) - {"self"}


def aux_loss_coeff(config) -> float:
    """``moe_aux_loss_coeff`` is a float, or a list (one per load-balancing type) in newer configs."""
    coeff = getattr(config, "moe_aux_loss_coeff", 0.0) or 0.0
    if isinstance(coeff, (list, tuple)):
        types = getattr(config, "moe_router_load_balancing_type", [])
        types = types if isinstance(types, (list, tuple)) else [types]
        coeff = sum(c for c, t in zip(coeff, types) if t in ("aux_loss", "seq_aux_loss", "global_aux_loss"))
    return float(coeff)


def capacity_from_megatron(capacity_factor: float | None, overrides: dict) -> dict:
    """The capacity fields Megatron's ``moe_expert_capacity_factor`` adds to LocMoE ``overrides``:
    ``capacity="factor"`` with that factor only where the overrides choose no capacity mode and the routing
    mode's own default is dropless (``topk``, ``locmoe``, ``hash``); LocMoE+ (``routing="hybrid"``) keeps
    its adaptive capacity, since Megatron's own dispatchers need the factor set for any dropping router.
    One rule for the router and for the flag validation."""
    if capacity_factor is None or overrides.get("capacity") is not None or overrides.get("routing", "locmoe") == "hybrid":
        return {}
    return {"capacity": "factor", "capacity_factor": float(capacity_factor)}
