"""Helpers shared by the Megatron tests on CPU (gloo) and on the GPU machine (NCCL): build a MoE layer
with the LocMoE router, run forward+backward, and a dense reference from the gathered expert weights.
No pytest import here (the GPU machine runs these through torchrun)."""

import functools

import torch

D = 32


def build_layer(layer_cls, tp, ep, locmoe, topk, dispatcher="hierarchical", grouped=False, **config):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from locmoe_plugin.megatron.router import LocMoEMegatronRouter

    if locmoe.get("routing", "locmoe") in ("locmoe", "hybrid") and "cross_node_budget" not in locmoe:
        # the learned locality loss, not the default cross-node budget: the budget's controller moves in every
        # training forward, so a reference that routes again would route differently
        locmoe = {"locality_loss_coeff": 0.01, **locmoe}
    cfg = TransformerConfig(**{**dict(
        num_layers=1, hidden_size=D, num_attention_heads=4, num_moe_experts=8, moe_router_topk=topk,
        moe_token_dispatcher_type="alltoall", tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1, sequence_parallel=tp > 1, use_cpu_initialization=True,
        moe_aux_loss_coeff=0.01, add_bias_linear=False, ffn_hidden_size=16, moe_ffn_hidden_size=16,
        # with a dropping LocMoE capacity, Megatron's own dispatchers (0.19) must be told the token
        # count is dynamic; LocMoE's capacity settings still decide (they override this value)
        moe_expert_capacity_factor=locmoe.get("capacity_factor") if locmoe.get("capacity") == "factor" else None,
    ), **config})
    spec = MoESubmodules(
        experts=ModuleSpec(module=SequentialMLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                           linear_fc2=RowParallelLinear)),
        router=functools.partial(LocMoEMegatronRouter, locmoe=locmoe, dispatcher=dispatcher,
                                 with_locmoe_dispatcher=layer_cls.__name__ == "LocMoELayer"),
    )
    if grouped:  # SequentialMLP -> LocMoEGroupedMLP (True: mode "on"; or a mode)
        from locmoe_plugin.megatron.grouped_mlp import with_grouped_experts

        spec = with_grouped_experts(spec, "on" if grouped is True else grouped)
    layer = layer_cls(cfg, submodules=spec, layer_number=1, pg_collection=moe_utils.get_default_pg_collection())
    layer.set_layer_number(1)
    return layer


def fwd_bwd(layer, x, cot):
    x = x.clone().requires_grad_(True)
    y, _ = layer(x)
    (y * cot).sum().backward()
    return y.detach(), x.grad


def dense_reference(layer, x, cot, world_ep_group):
    import torch.distributed as dist

    def gather(w):
        parts = [torch.empty_like(w) for _ in range(dist.get_world_size(world_ep_group))]
        dist.all_gather(parts, w.detach().contiguous(), group=world_ep_group)
        return parts

    fc1 = [w for ws in zip(*[gather(e.linear_fc1.weight) for e in layer.experts.local_experts]) for w in ws]
    fc2 = [w for ws in zip(*[gather(e.linear_fc2.weight) for e in layer.experts.local_experts]) for w in ws]
    xr = x.clone().requires_grad_(True)
    out = layer.router.core(xr.reshape(-1, D))
    probs, _ = out.to_megatron()
    flat = xr.reshape(-1, D)
    ref = sum(probs[:, e : e + 1] * (torch.nn.functional.gelu(flat @ fc1[e].t()) @ fc2[e].t()) for e in range(8))
    ((ref.reshape(x.shape) * cot).sum() + out.total_loss).backward()
    return ref.detach().reshape(x.shape), xr.grad


