"""Megatron-core adapter (megatron-core >= 0.16, < 0.20). Importing this package does not import
Megatron; the classes do, when built.

Done: the LocMoE router through ``MoESubmodules(router=...)``. Still to come: the hierarchical token
dispatcher inside MoELayer, the ``--locmoe`` flags / ``enable()`` / wrapper, and checkpoint mapping.
"""

from .compat import UnsupportedMegatronError, check_supported, megatron_core_version
from .router import LocMoEMegatronRouter, locmoe_config_from_megatron

__all__ = [
    "LocMoEMegatronRouter",
    "UnsupportedMegatronError",
    "check_supported",
    "locmoe_config_from_megatron",
    "megatron_core_version",
]
