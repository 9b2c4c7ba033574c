"""What the demo measures while it trains, the same way for every system.

- :class:`RoutingMonitor` hooks every MoE router and reads the routing map ``[tokens, experts]`` from
  its output (Megatron's ``(probs, routing_map)``, DeepSpeed's gate tuple or a LocMoE ``RouterOutput``,
  through a per-framework ``routing_map(output)`` function), and counts, per training step and layer:
  tokens per expert, routed (token, expert) pairs whose expert sits on another node than the token, and
  pairs dropped by capacity (``tokens x k - routed``).
- :class:`WireCounter` wraps ``torch.distributed.all_to_all_single`` for the duration of a ``with`` block
  and adds up the bytes each rank sends to ranks of another node (forward and backward, payload and
  routing metadata), whichever dispatcher issues the call: bytes measured at the collective API, not
  derived from the routing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..megatron.router import routing_hook_targets  # imports no Megatron module itself


class RoutingMonitor:
    """Counts routing per step over all ranks. ``node_of_expert[e]`` is expert e's node; ``my_node`` the
    node of this rank's tokens; ``ranks``: the expert-parallel ranks, holding contiguous equal blocks of
    experts (for the busiest rank's rows)."""

    def __init__(self, routers, routing_map, node_of_expert: torch.Tensor, my_node: int, topk: int, group=None,
                 ranks: int = 1):
        if ranks < 1 or node_of_expert.numel() % ranks:
            raise ValueError(f"RoutingMonitor: ranks={ranks} must divide the {node_of_expert.numel()} experts "
                             f"(each rank holds an equal block of them)")
        self.ranks = ranks
        self.num_layers = len(routers)
        self.routing_map = routing_map
        self.remote = node_of_expert != my_node
        self.topk = topk
        self.group = group
        self._step = None
        # a LocMoE router inside LocMoELayer routes through its route_indices module: hook both
        self.handles = [t.register_forward_hook(self._hook(i)) for i, r in enumerate(routers)
                        for t in routing_hook_targets(r)]

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            if not module.training or self._step is None:
                return
            rm = self.routing_map(output).detach()
            if self._step.device != rm.device:  # counts stay on the routing's device: no host sync per layer
                self._step = self._step.to(rm.device)
                self.remote = self.remote.to(rm.device)  # once, not a host-to-device copy per layer
            row = self._step[layer]
            row[: rm.shape[1]] += rm.sum(0)
            row[-2] += (rm & self.remote).sum()  # a mask product: boolean indexing would sync
            row[-1] += rm.shape[0] * self.topk - rm.sum()

        return hook

    def begin_step(self) -> None:
        self._step = torch.zeros(self.num_layers, self.remote.numel() + 2, dtype=torch.long)

    def end_step(self, device) -> dict:
        """All-reduce this step's counts (one transfer to the host); returns global cross-node share,
        max/mean expert load and the busiest rank's rows over the mean rank's (each a mean over layers),
        dropped pairs and tokens per expert summed over layers."""
        counts = self._step.to(device)
        if dist.is_initialized():
            dist.all_reduce(counts, group=self.group)
        counts = counts.cpu().double()
        self._step = None
        load = counts[:, :-2]
        routed = load.sum().clamp_min(1)
        per_rank = load.reshape(load.shape[0], self.ranks, -1).sum(2)  # [layers, ranks]: contiguous expert blocks
        return {
            "cross_node_share": float(counts[:, -2].sum() / routed),
            "max_over_mean_load": float((load.max(1).values / load.mean(1).clamp_min(1e-9)).mean()),
            "rank_max_over_mean_load": float((per_rank.max(1).values / per_rank.mean(1).clamp_min(1e-9)).mean()),
            "dropped_pairs": int(counts[:, -1].sum()),
            "routed_pairs": int(routed),
            "tokens_per_expert": load.sum(0).tolist(),
        }

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class WireCounter:
    """Bytes this rank sends through ``all_to_all_single`` to ranks on other nodes / on its own node.

    ``node_of_global_rank(r)`` gives each global rank's node. Use as a context manager; counting is
    active only inside the block (the original function is restored on exit).
    """

    def __init__(self, node_of_global_rank):
        self.node_of = node_of_global_rank
        self.inter_bytes = 0
        self.intra_bytes = 0
        self._orig = None
        self._ranks: dict = {}

    def _group_ranks(self, group):
        key = id(group)
        if key not in self._ranks:
            self._ranks[key] = dist.get_process_group_ranks(group) if group is not None else list(
                range(dist.get_world_size()))
        return self._ranks[key]

    def __enter__(self):
        self._orig = orig = dist.all_to_all_single
        me = self.node_of(dist.get_rank())

        def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            ranks = self._group_ranks(group)
            rows = input.shape[0] if input.dim() else 1
            row_bytes = input.numel() // max(rows, 1) * input.element_size()
            splits = list(input_split_sizes) if input_split_sizes is not None else [rows // len(ranks)] * len(ranks)
            for r, n in zip(ranks, splits):
                if r == dist.get_rank():
                    continue
                if self.node_of(r) == me:
                    self.intra_bytes += int(n) * row_bytes
                else:
                    self.inter_bytes += int(n) * row_bytes
            return orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        dist.all_to_all_single = counted
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self._orig
        return False
