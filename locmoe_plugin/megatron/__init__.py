"""Megatron-core adapter (megatron-core >= 0.16, < 0.20). Importing this package does not import
Megatron; the functions and classes do, when called or built.

Three ways in (README, "Megatron"): ``locmoe-megatron pretrain_gpt.py ... --locmoe`` (wrapper),
``import locmoe_plugin.megatron.auto`` or ``enable()`` (patch objects, see ``enable.py``), or, for your
own megatron-core script, ``locmoe_spec(spec, ...)`` / ``MoESubmodules(router=partial(LocMoEMegatronRouter,
...))`` and ``add_arguments`` as ``extra_args_provider``.
"""

from .args import add_arguments, settings_from_args
from .compat import UnsupportedMegatronError, check_supported, megatron_core_version
from .enable import PATCHES, disable, enable, enable_metrics_report, status
from .metrics import flush_locmoe_metrics
from .router import LocMoEMegatronRouter, dense_routing_map, locmoe_config_from_megatron
from .token_ids import attach_token_ids
from .spec import count_locmoe_layers, locmoe_spec

__all__ = [
    "LocMoEMegatronRouter",
    "PATCHES",
    "UnsupportedMegatronError",
    "add_arguments",
    "attach_token_ids",
    "check_supported",
    "count_locmoe_layers",
    "dense_routing_map",
    "disable",
    "enable",
    "enable_metrics_report",
    "flush_locmoe_metrics",
    "locmoe_config_from_megatron",
    "locmoe_spec",
    "megatron_core_version",
    "settings_from_args",
    "status",
]
