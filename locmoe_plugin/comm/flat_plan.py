"""The flat exact plan: the node / rank / expert levels built at the source, then one EP-wide all-to-all
of (token, expert) pairs, then the canonical hop at the expert rank. Its sums follow the same tree as
the hierarchical plan's (bitwise-equal results), with the traffic of Megatron's alltoall dispatcher."""

from __future__ import annotations

import torch

from .canonical import bits_to_fp32, canonical_hop, token_metadata
from .counts import SRC_SHIFT, RoutingCounts, topology_tensors
from .groups import CommGroups
from .hops import Hop, true_positions
from .plan import Plan, Traffic, tree_plan


def expert_mask(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[s, E]`` bool: the experts each token is routed to (ids -1 left out; ids were validated)."""
    s = expert_ids.shape[0]
    col = torch.where(expert_ids >= 0, expert_ids, num_experts)
    mask = torch.zeros(s, num_experts + 1, dtype=torch.bool, device=expert_ids.device)
    return mask.scatter_(1, col, True)[:, :num_experts]


def build_flat_plan(expert_ids: torch.Tensor, weights: torch.Tensor, groups: CommGroups,
                    counts: RoutingCounts) -> Plan:
    """This rank's flat exact plan (collective over the EP group: one all-to-all of ``[pairs, 4]``
    metadata words)."""
    t = groups.topology
    s, k = expert_ids.shape
    me = t.ep_rank
    dev = expert_ids.device
    meta = token_metadata(expert_ids, weights, me)
    e_r, ranks, nodes = t.experts_per_rank, t.ranks_per_node, t.num_nodes
    tokens = max(s, 1)
    pairs_to_rank = [sum(counts.pairs_to_expert[me][q * e_r : (q + 1) * e_r]) for q in range(t.ep_size)]
    pairs_from_rank = [sum(counts.pairs_to_expert[q][me * e_r : (me + 1) * e_r]) for q in range(t.ep_size)]
    n_pairs_sent = sum(pairs_to_rank)
    slot_of = torch.zeros(s, t.num_experts + 1, dtype=torch.long, device=dev)  # [s, E] slot of each expert
    slot_of.scatter_(1, torch.where(expert_ids >= 0, expert_ids, t.num_experts), torch.arange(k, device=dev).expand(s, k))
    slot_of = slot_of[:, : t.num_experts]
    # the node / rank / expert levels at the source, indexed [local index i, node b, token]
    ranks_by_local = [[t.ranks_of_node(b)[i] for b in range(nodes)] for i in range(ranks)]
    rank_of_local_node = topology_tensors(t, dev)["q_ib"]  # [R, N]: EP rank of local index i on node b
    has_expert = expert_mask(expert_ids, t.num_experts).reshape(s, t.ep_size, e_r)  # [s, P, E_r]
    pair_mask = has_expert[:, rank_of_local_node.reshape(-1), :].reshape(s, ranks, nodes, e_r).permute(3, 1, 2, 0)  # [E_r, R, N, s]
    rank_mask = counts.rank_mask[:, rank_of_local_node.reshape(-1)].reshape(s, ranks, nodes).permute(1, 2, 0)  # [R, N, s]
    node_mask = counts.node_mask.t()  # [N, s]
    node_row_of = torch.cumsum(node_mask.reshape(-1), 0).reshape(node_mask.shape) - 1  # [N, s]
    rank_row_of = torch.cumsum(rank_mask.reshape(-1), 0).reshape(rank_mask.shape) - 1  # [R, N, s]
    n_node_rows = sum(counts.rows_to_node[me])
    rank_blocks = tuple(sum(counts.rows_to_rank[me][q] for q in ranks_by_local[i]) for i in range(ranks))
    expert_blocks = tuple(sum(counts.pairs_to_expert[me][q * e_r + le] for q in range(t.ep_size)) for le in range(e_r))
    node_level = Hop.build(true_positions(node_mask, n_node_rows) % tokens, counts.rows_to_node[me], s, min(nodes, k))
    rank_node_token = true_positions(rank_mask, sum(rank_blocks)) % (nodes * tokens)
    rank_level = Hop.build(node_row_of.reshape(-1)[rank_node_token], rank_blocks, n_node_rows, min(ranks, k))
    pair_pos = true_positions(pair_mask, n_pairs_sent)  # flat positions in [E_r, R, N, s]
    pair_local_node_token = pair_pos % (ranks * nodes * tokens)
    expert_level = Hop.build(rank_row_of.reshape(-1)[pair_local_node_token], expert_blocks, sum(rank_blocks), min(e_r, k))
    # decode each pair: expert id, token
    pair_local_expert = pair_pos // (ranks * nodes * tokens)
    pair_local_node = pair_local_node_token // tokens
    pair_token = pair_local_node_token % tokens
    pair_rank = rank_of_local_node.reshape(-1)[pair_local_node]
    pair_expert = pair_rank * e_r + pair_local_expert
    to_rank = torch.argsort(pair_rank, stable=True)
    send = Hop.build(to_rank, pairs_to_rank, n_pairs_sent, 1, group=groups.ep, out_splits=pairs_from_rank)
    pair_slot = slot_of[pair_token, pair_expert]
    pair_meta = torch.stack([pair_expert, me * SRC_SHIFT + pair_token, pair_slot, meta[pair_token, k + 1 + pair_slot]], 1)
    recv = send.forward(pair_meta)  # [m, 4]: expert id, source key, slot and weight bits of each pair received
    canon, _, tpe = canonical_hop(recv[:, :1], recv[:, 1], groups, counts)
    slot = recv[:, 2].index_select(0, canon.index)
    pair_weight = bits_to_fp32(recv[:, 3].index_select(0, canon.index))
    pair_src_key = recv[:, 1].index_select(0, canon.index)
    return tree_plan(mode="flat", hops=(node_level, rank_level, expert_level, send, canon), k=k,
                     pair_weight=pair_weight, pair_src_key=pair_src_key, slot=slot,
                     traffic=Traffic.of_rank_sends(pairs_to_rank, t), groups=groups, counts=counts,
                     num_tokens=s, tokens_per_expert=tpe)
