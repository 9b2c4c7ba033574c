"""locmoe-plugin: LocMoE / LocMoE+ routing and a locality-aware hierarchical All-to-All dispatcher.

The core (this package's top level and ``comm/``) is framework-free; ``locmoe_plugin.megatron`` and
``locmoe_plugin.deepspeed`` are thin adapters that import their frameworks lazily.
"""

from .config import ConfigError, LocMoEConfig
from .router import LocMoERouter, RouterOutput
from .routing import Assignment
from .telemetry import RoutingStats, collect_stats, format_stats
from .topology import Topology, TopologyError

__version__ = "0.1.0"

__all__ = [
    "Assignment",
    "ConfigError",
    "LocMoEConfig",
    "LocMoERouter",
    "RouterOutput",
    "RoutingStats",
    "Topology",
    "TopologyError",
    "collect_stats",
    "format_stats",
    "__version__",
]
