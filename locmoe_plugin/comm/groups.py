"""Process groups of the hierarchical dispatcher, built once from an explicit topology.

For one expert-parallel (EP) group split into N nodes x R ranks:
  * ``ep``    - the EP group itself (flat all-to-all, the count exchange);
  * ``rail``  - this rank and the ranks with the same local index on every other node (N members, in
    node order): stage 1, the only stage that crosses nodes;
  * ``node``  - the R EP ranks of this rank's node (local order): stage 2 over the fast links.

``torch.distributed.new_group`` is collective over the *whole* world, so every process must create
every subgroup of every EP group in the same order: pass all EP groups' global ranks (e.g. all
data-parallel replicas' EP groups in Megatron) to :func:`build_comm_groups`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.distributed as dist

from ..agreement import check_agreement
from ..topology import Topology


@dataclass(frozen=True)
class CommGroups:
    """The groups one rank uses, with the topology they were built from (EP-rank indexed)."""

    topology: Topology
    ep: object
    rail: object | None
    node: object | None
    ep_global_ranks: tuple[int, ...]


def _subgroups(rank_lists: list[list[int]], backend=None):
    mine, _ = dist.new_subgroups_by_enumeration(rank_lists, backend=backend)
    return mine


def build_comm_groups(
    topology: Topology,
    ep_group,
    all_ep_global_ranks: Sequence[Sequence[int]] | None = None,
    backend: str | None = None,
) -> CommGroups:
    """Create the rail and node groups of every EP group (a world-wide collective), keep ours.

    Args:
        topology: this rank's topology (``topology.ep_rank`` = rank in ``ep_group``). Every EP group is
            assumed to have the same node shape (same ``node_of_rank`` pattern), as in Megatron and
            DeepSpeed where all EP groups are translations of one another.
        ep_group: this rank's EP process group.
        all_ep_global_ranks: global ranks of every EP group in the world (default: ``ep_group`` is the
            only one, i.e. it is the whole world).
        backend: backend for the subgroups (default: the world's).
    """
    t = topology
    # new_group is collective over the whole world: every rank must enumerate the same subgroups, so the
    # node shape is checked world-wide first (ranks that disagree on gpus_per_node raise, not hang)
    check_agreement({"expert-parallel size": t.ep_size, "nodes per expert-parallel group": t.num_nodes,
                     "ranks per node (gpus_per_node)": t.ranks_per_node,
                     "node of each expert-parallel rank": t.node_of_rank, "num_experts": t.num_experts},
                    dist.group.WORLD if dist.is_initialized() else None, where="LocMoE dispatcher groups")
    ep_ranks = tuple(dist.get_process_group_ranks(ep_group))
    if all_ep_global_ranks is None:
        all_ep_global_ranks = [ep_ranks]
    all_ep_global_ranks = [tuple(g) for g in all_ep_global_ranks]
    if ep_ranks not in all_ep_global_ranks:
        raise ValueError(f"this rank's EP group {ep_ranks} is not in all_ep_global_ranks")
    rails: list[list[int]] = []
    nodes: list[list[int]] = []
    for group in all_ep_global_ranks:
        if len(group) != t.ep_size:
            raise ValueError(f"EP group {group} has {len(group)} ranks; the topology has {t.ep_size}")
        rails += [[group[r] for r in t.rail(j)] for j in range(t.ranks_per_node)]
        nodes += [[group[r] for r in t.ranks_of_node(n)] for n in range(t.num_nodes)]
    # a process group orders its members by global rank; the plans index peers in node / local order
    for members in rails + nodes + [list(g) for g in all_ep_global_ranks]:
        if list(members) != sorted(members):
            raise ValueError(
                f"ranks {list(members)} are not in ascending global-rank order: number nodes and local ranks "
                f"so that global rank grows with node and local index (torchrun and the deepspeed launcher do)"
            )
    rail = _subgroups(rails, backend) if t.num_nodes > 1 else None
    node = _subgroups(nodes, backend) if t.num_nodes > 1 else None
    return CommGroups(topology=t, ep=ep_group, rail=rail, node=node, ep_global_ranks=ep_ranks)


def all_group_ranks(group) -> list[list[int]]:
    """Global ranks of every group of the same kind as ``group`` across the world (e.g. all
    data-parallel replicas' EP groups), by one all-gather of each rank's member list: a world-wide
    collective, for :func:`build_comm_groups`."""
    mine = list(dist.get_process_group_ranks(group))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    groups: list[list[int]] = []
    for g in gathered:
        if list(g) not in groups:
            groups.append(list(g))
    if len({len(g) for g in groups}) != 1:
        raise ValueError(f"process groups of unequal size: {groups}")
    return groups
