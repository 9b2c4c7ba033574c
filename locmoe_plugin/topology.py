"""Which ranks of an expert-parallel (EP) group share a node, and which experts each node hosts.

The topology is an explicit, immutable object built once (from a ranks-per-node count, from the EP
group's global ranks and the GPUs per node, or detected) and passed to the router and the dispatcher;
nothing in forward reads global state to find it.

Expert layout (Megatron's and DeepSpeed's): EP rank r hosts the contiguous experts
``[r * E_r, (r + 1) * E_r)`` with ``E_r = num_experts / ep_size``. Nodes may hold any EP ranks, but
every node must hold the same number of them (the hierarchical dispatcher pairs rank j of one node with
rank j of every other node: the "rail").
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from functools import cached_property
from typing import Mapping, Sequence

import torch

from .config import ConfigError
from .env import env_int


def describe_gpus_per_node(gpus_per_node: int | None) -> str:
    """How :meth:`Topology.detect` will place ranks on nodes, as a comparable string: the explicit
    value, ``LOCAL_WORLD_SIZE``'s, or host names."""
    if gpus_per_node is not None:
        return str(gpus_per_node)
    local = env_int("LOCAL_WORLD_SIZE", 1)
    return f"{local} (LOCAL_WORLD_SIZE)" if local is not None else "detected from host names"


class TopologyError(ConfigError):
    """The EP group cannot be split into nodes as asked. The message says how to fix it."""


@dataclass(frozen=True)
class Topology:
    """Placement of one EP group.

    Args:
        node_of_rank: ``[ep_size]`` node index of each EP rank (any hashable labels; renumbered
            0..N-1 in order of first appearance).
        num_experts: experts of the layer, divisible by ``ep_size``.
        ep_rank: this process's rank inside the EP group (0 for single-process use).
    """

    node_of_rank: tuple[int, ...]
    num_experts: int
    ep_rank: int = 0

    def __post_init__(self) -> None:
        labels = tuple(self.node_of_rank)
        if not labels:
            raise TopologyError("node_of_rank is empty: an expert-parallel group has at least one rank")
        renum: dict = {}
        nodes = tuple(renum.setdefault(x, len(renum)) for x in labels)
        object.__setattr__(self, "node_of_rank", nodes)
        ep = len(nodes)
        if self.num_experts < 1 or self.num_experts % ep:
            raise TopologyError(
                f"num_experts {self.num_experts} is not divisible by the expert-parallel size {ep}: "
                f"every EP rank must host the same number of experts; use a multiple of {ep} experts "
                f"or another expert-parallel size"
            )
        counts = [nodes.count(n) for n in range(len(renum))]
        if len(set(counts)) != 1:
            raise TopologyError(
                f"nodes hold different numbers of expert-parallel ranks ({counts}): the hierarchical "
                f"dispatcher needs the same number of EP ranks on every node; check gpus_per_node and "
                f"the parallel layout (TP x EP must tile each node evenly)"
            )
        if not 0 <= self.ep_rank < ep:
            raise TopologyError(f"ep_rank {self.ep_rank} is outside the expert-parallel group of size {ep}")

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_ranks_per_node(
        cls, ep_size: int, ranks_per_node: int, num_experts: int, ep_rank: int = 0
    ) -> "Topology":
        """EP ranks ``[0, ranks_per_node)`` on node 0, the next ``ranks_per_node`` on node 1, ..."""
        if ranks_per_node < 1 or ep_size < 1:
            raise TopologyError(f"ranks_per_node={ranks_per_node} and ep_size={ep_size} must be >= 1")
        if ep_size % ranks_per_node:
            raise TopologyError(
                f"ranks per node {ranks_per_node} does not divide the expert-parallel size {ep_size}: "
                f"each node must hold the same number of EP ranks; use a divisor of {ep_size} "
                f"(or 1 node: ranks_per_node={ep_size})"
            )
        return cls(tuple(r // ranks_per_node for r in range(ep_size)), num_experts, ep_rank)

    @classmethod
    def from_global_ranks(
        cls, global_ranks: Sequence[int], gpus_per_node: int, num_experts: int, ep_rank: int = 0
    ) -> "Topology":
        """Node of each EP rank = its global rank // ``gpus_per_node`` (the launcher's placement:
        torchrun and the deepspeed launcher number ranks node by node). Handles EP groups strided by
        tensor parallelism (e.g. TP=2: EP group {0, 2, 4, 6} on one 8-GPU node)."""
        if gpus_per_node < 1:
            raise TopologyError(f"gpus_per_node={gpus_per_node} must be >= 1")
        return cls(tuple(int(g) // gpus_per_node for g in global_ranks), num_experts, ep_rank)

    @classmethod
    def single_node(cls, ep_size: int, num_experts: int, ep_rank: int = 0) -> "Topology":
        return cls((0,) * ep_size, num_experts, ep_rank)

    @classmethod
    def detect(
        cls, group, num_experts: int, gpus_per_node: int | None = None
    ) -> "Topology":
        """Topology of an initialised process ``group``.

        ``gpus_per_node`` (explicit) wins; then ``LOCAL_WORLD_SIZE`` (set by torchrun and the deepspeed
        launcher); else the host names of all ranks are all-gathered over ``group`` (a collective:
        every rank of the group must call this).
        """
        import torch.distributed as dist

        ranks = dist.get_process_group_ranks(group)
        ep_rank = dist.get_rank(group)
        if gpus_per_node is None:
            gpus_per_node = env_int("LOCAL_WORLD_SIZE", 1)
        if gpus_per_node is not None:
            return cls.from_global_ranks(ranks, gpus_per_node, num_experts, ep_rank)
        hosts: list = [None] * len(ranks)
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        return cls(tuple(hosts), num_experts, ep_rank)

    @classmethod
    def for_group(cls, group, num_experts: int, gpus_per_node: int | None = None,
                  settings: Mapping[str, object] | None = None, where: str = "LocMoE") -> "Topology":
        """Topology of an expert-parallel process ``group`` (None or no distributed run: one rank).

        ``gpus_per_node`` (explicit) wins, then ``LOCMOE_GPUS_PER_NODE`` (set by
        ``launch/emulate_nodes.sh``), then :meth:`detect` (``LOCAL_WORLD_SIZE`` or host names).

        First, one collective over ``group`` checks that every rank resolved the same GPUs per node and
        passed the same ``settings`` (e.g. the router config and dispatcher mode,
        :func:`locmoe_plugin.agreement.check_agreement`): ranks that disagree raise the same error
        instead of hanging in the host-name exchange or in ``new_group``."""
        import torch.distributed as dist

        from .agreement import check_agreement

        if group is None or not (dist.is_available() and dist.is_initialized()):
            return cls.single_node(1, num_experts)
        if gpus_per_node is None:
            gpus_per_node = env_int("LOCMOE_GPUS_PER_NODE", 1)
        check_agreement({**(settings or {}), "num_experts": num_experts,
                         "gpus_per_node": describe_gpus_per_node(gpus_per_node)}, group, where=where)
        return cls.detect(group, num_experts, gpus_per_node)

    # ---------------------------------------------------------------- derived facts
    @property
    def ep_size(self) -> int:
        return len(self.node_of_rank)

    @property
    def num_nodes(self) -> int:
        return max(self.node_of_rank) + 1

    @property
    def ranks_per_node(self) -> int:
        return self.ep_size // self.num_nodes

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def experts_per_node(self) -> int:
        return self.experts_per_rank * self.ranks_per_node

    @property
    def node(self) -> int:
        """This rank's node."""
        return self.node_of_rank[self.ep_rank]

    @property
    def local_index(self) -> int:
        """This rank's position among the EP ranks of its node (its rail)."""
        return self.local_index_of(self.ep_rank)

    def ranks_of_node(self, node: int) -> tuple[int, ...]:
        """EP ranks on ``node``, in EP-rank order."""
        return tuple(r for r, n in enumerate(self.node_of_rank) if n == node)

    def local_index_of(self, ep_rank: int) -> int:
        return self.ranks_of_node(self.node_of_rank[ep_rank]).index(ep_rank)

    def rail(self, local_index: int) -> tuple[int, ...]:
        """EP ranks with the same local index on every node, in node order (one per node)."""
        return tuple(self.ranks_of_node(n)[local_index] for n in range(self.num_nodes))

    def rank_of_expert(self, expert: int) -> int:
        return expert // self.experts_per_rank

    def experts_of_rank(self, ep_rank: int) -> range:
        e = self.experts_per_rank
        return range(ep_rank * e, (ep_rank + 1) * e)

    def experts_of_node(self, node: int) -> tuple[int, ...]:
        return tuple(e for r in self.ranks_of_node(node) for e in self.experts_of_rank(r))

    @cached_property
    def expert_to_node(self) -> torch.Tensor:
        """``[num_experts]`` int64: the node hosting each expert (CPU tensor; move it once)."""
        per_rank = torch.tensor(self.node_of_rank, dtype=torch.int64)
        return per_rank.repeat_interleave(self.experts_per_rank)

    @cached_property
    def expert_to_rank(self) -> torch.Tensor:
        """``[num_experts]`` int64: the EP rank hosting each expert."""
        return torch.arange(self.ep_size, dtype=torch.int64).repeat_interleave(self.experts_per_rank)

    def local_expert_mask(self, node: int | None = None) -> torch.Tensor:
        """``[num_experts]`` bool: True for experts on ``node`` (default: this rank's node)."""
        return self.expert_to_node == (self.node if node is None else node)

    def describe(self) -> str:
        return (
            f"{self.num_nodes} node(s) x {self.ranks_per_node} EP rank(s), {self.experts_per_rank} "
            f"expert(s) per rank, {self.experts_per_node} per node"
        )
