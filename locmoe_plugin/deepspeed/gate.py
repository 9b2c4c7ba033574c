"""``LocMoEGate``: the LocMoE router behind DeepSpeed's gate contract, usable wherever
``deepspeed.moe.sharded_moe.TopKGate`` is (e.g. ``MOELayer(LocMoEGate(...), experts, ...)``), with
DeepSpeed's own dispatch.

Contract, by the installed DeepSpeed's call: ``gate(input, used_token, sparse_routes, use_tutel)``.
DeepSpeed >= 0.19.4 asks for the index form (``sparse_routes=True``):
``(l_aux, capacity, num_experts, indices [k, s] int32 (-1 = dropped), locations [k, s] int32,
gates [k, s] fp32, exp_counts [E])``; older DeepSpeed calls ``gate(input, used_token)`` and gets the
dense form ``(l_aux, combine_weights [s, E, C], dispatch_mask [s, E, C] bool, exp_counts [E])``.

Same math as the Megatron router and :class:`~locmoe_plugin.deepspeed.LocMoE` (one core router).
With a dense gate, plain top-k routing, no capacity (DeepSpeed ``drop_tokens=False``), ``renormalize``
off for k=1, and DeepSpeed's randomness off (``use_rts=False``, ``top2_2nd_expert_sampling=False``),
it selects the same experts with the same weights as TopKGate for every k (tested for k = 1, 2, 4).
The router keeps its own count all-reduce here (``aux_loss_scope="ep_group"``): the gate returns ``l_aux``
before DeepSpeed's dispatch, whose count exchange is not the plugin's, so nothing can be folded into it
(:class:`~locmoe_plugin.deepspeed.LocMoE` folds it into its dispatcher's).
Intended differences: capacity drops follow LocMoE's drop policy (TopKGate: random or position for
k=1, first choices before second for k=2, by probability for k>2, renormalising after the drop);
``exp_counts`` counts every slot before capacity (TopKGate k=2 counts first choices only); ``l_aux`` is
LocMoE's loss sum (aux + locality + z), whose aux term equals TopKGate's for k=1 and k>2 when
``aux_loss_coeff=1`` and ``aux_loss_scope="local"`` (TopKGate k=2 uses first choices only).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..agreement import config_settings
from ..config import LocMoEConfig
from ..router import LocMoERouter
from ..routing import count_ids
from ..topology import Topology
from .layer import LAYER_KEYS


def buffer_locations(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[s, k]`` position of each kept pair in its expert's buffer (token order; -1 dropped): the
    rank of the pair among the pairs of the same expert, ordered by token then slot."""
    s, k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    key = torch.where(flat >= 0, flat, num_experts)
    order = torch.argsort(key, stable=True)
    counts = count_ids(key, num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts[key[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    return torch.where(flat >= 0, rank, -1).reshape(s, k)


class LocMoEGate(nn.Module):
    """DeepSpeed gate contract over :class:`LocMoERouter`.

    Args:
        model_dim: hidden size. num_experts: n. k: top-k (LocMoE+'s l for ``hybrid``).
        locmoe: other :class:`LocMoEConfig` fields (e.g. the DeepSpeed config's ``"locmoe"`` section).
        ep_group: DeepSpeed's expert-parallel group (or set later by ``_set_ep_group``, as TopKGate).
    """

    def __init__(self, model_dim: int, num_experts: int, k: int = 1, locmoe: Mapping[str, Any] | None = None,
                 ep_group=None) -> None:
        super().__init__()
        settings = {key: v for key, v in dict(locmoe or {}).items() if key not in LAYER_KEYS}  # the layer's keys
        config = LocMoEConfig.from_dict({"num_experts": num_experts, "hidden_size": model_dim, "topk": k, **settings})
        self.router = LocMoERouter(config)
        self.k = k
        self.num_experts = num_experts
        self.ep_group = None
        if ep_group is not None:
            self._set_ep_group(ep_group)

    def _set_ep_group(self, ep_group) -> None:
        assert self.ep_group is None, "Attempting to override an existing ep_group"
        self.ep_group = ep_group
        topo = Topology.for_group(ep_group, self.num_experts, self.router.config.gpus_per_node,
                                  settings=config_settings(self.router.config), where="LocMoEGate (DeepSpeed)")
        self.router.bind(topo, ep_group if topo.ep_size > 1 else None)

    def forward(self, input: torch.Tensor, used_token: torch.Tensor | None = None, sparse_routes: bool = False,
                use_tutel: bool = False):
        if used_token is not None:
            raise NotImplementedError("LocMoEGate does not support DeepSpeed's used_token mask; pass None")
        if use_tutel:
            raise NotImplementedError("LocMoEGate does not support Tutel's dispatcher; use_tutel=False")
        out = self.router(input.reshape(-1, input.shape[-1]))
        a = out.assignment
        n = self.num_experts
        kept = a.tokens_per_expert()
        capacity = out.stats.capacity
        if capacity is None:  # dropless: the largest expert load over the EP group sizes DeepSpeed's buffers
            cap = kept.max().reshape(1) if kept.numel() else kept.new_zeros(1)
            if self.ep_group is not None and dist.is_initialized() and dist.get_world_size(self.ep_group) > 1:
                dist.all_reduce(cap, op=dist.ReduceOp.MAX, group=self.ep_group)
            capacity = cap[0]
        locations = buffer_locations(a.expert_ids, n)
        exp_counts = a.requested_per_expert().detach()
        l_aux = out.total_loss
        if sparse_routes:
            return (l_aux, capacity, n, a.expert_ids.t().to(torch.int32), locations.clamp_min(0).t().to(torch.int32),
                    a.weights.t().contiguous(), exp_counts)
        c = int(capacity)  # device-to-host sync: DeepSpeed's dense form needs the buffer size
        s = a.expert_ids.shape[0]
        combine = a.weights.new_zeros(s, n, max(c, 1))
        valid = a.expert_ids >= 0
        tok = torch.arange(s, device=combine.device).unsqueeze(1).expand_as(a.expert_ids)
        combine = combine.index_put((tok[valid], a.expert_ids[valid], locations[valid]), a.weights[valid])
        return l_aux, combine, combine > 0, exp_counts
