"""Communication: flat and hierarchical (locality-aware) All-to-All token dispatch."""

from .dispatcher import DispatchHandle, TokenDispatcher, TrafficCounter
from .groups import CommGroups, build_comm_groups
from .build import build_plan
from .plan import Plan, Traffic

__all__ = [
    "CommGroups",
    "DispatchHandle",
    "Plan",
    "TokenDispatcher",
    "Traffic",
    "TrafficCounter",
    "build_comm_groups",
    "build_plan",
]
