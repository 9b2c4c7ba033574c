"""The demo's megatron-core systems: a small GPT (``GPTModel``, local spec, RoPE) whose MLPs are MoE layers.

- ``baseline``: megatron-core ``MoELayer`` with ``TopKRouter`` (softmax top-k, Switch aux loss) and the
  flat ``alltoall`` dispatcher: what a Megatron user runs today;
- ``locmoe``: ``LocMoELayer`` + LocMoE router (LocMoEConfig's defaults: dense gate, top-k, cross-node
  budget) and the hierarchical dispatcher;
- ``locmoe+``: LocMoE+ (hybrid token/expert choice, adaptive capacity, summed-affinity threshold; dense
  gate and cross-node budget by default) on the hierarchical dispatcher.
- ``hash``: the hash router (token id -> experts; ``attach_token_ids`` feeds it the ids).

Each LocMoE system takes LocMoE options after a colon (:func:`parse_system`), e.g. ``locmoe:mu=0.03,gate=dense``.

Data parallelism = expert parallelism = all ranks (TP = PP = 1): dense gradients are averaged over the
data-parallel group by hand (Megatron's DDP wrapper is not needed at this size), expert gradients stay
on their rank.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.distributed as dist

from ..config import DEFAULT_CROSS_NODE_BUDGET
from ..megatron.router import dense_routing_map  # imports no Megatron module itself
from .corpus import VOCAB_SIZE


#: demo systems: the LocMoE settings each starts from (None: the framework's own router)
BASE_SETTINGS = {
    "baseline": None,
    "locmoe": {"routing": "locmoe"},  # LocMoEConfig's defaults: the dense gate and the cross-node budget
    "locmoe+": {"routing": "hybrid"},  # LocMoEConfig's defaults: dense gate, budget, adaptive, resonance 0.9
    "hash": {"routing": "hash"},
}
#: short option names accepted after a system name: ``locmoe:mu=0.03,gate=dense``
ALIASES = {"mu": "locality_loss_coeff", "budget": "cross_node_budget", "budget_warmup": "cross_node_budget_warmup"}


def parse_system(spec: str) -> tuple[str, dict]:
    """``"locmoe:mu=0.03,capacity=bound"`` -> ``("locmoe", {"locality_loss_coeff": 0.03, "capacity":
    "bound"})``. Values are parsed as numbers where they look like numbers, ``true`` / ``false`` as bools."""
    name, _, opts = spec.partition(":")
    if name not in BASE_SETTINGS:
        raise ValueError(f"--systems: unknown system {name!r}; choose from {', '.join(BASE_SETTINGS)}")
    overrides = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--systems: {spec!r}: options are key=value (e.g. locmoe:mu=0.03,gate=dense)")
        if value.lower() in ("true", "false"):
            value = value.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    continue
        overrides[ALIASES.get(key, key)] = value
    if name == "baseline" and overrides:
        raise ValueError(f"--systems: {spec!r}: the baseline takes no LocMoE options")
    return name, overrides


def locmoe_settings(system: str, opts) -> dict | None:
    """The full LocMoE settings of a demo system spec (shared with the DeepSpeed job); None for the
    baseline. ``--locality-coeff`` and ``--locmoe-capacity`` apply unless the spec sets them."""
    name, overrides = parse_system(system)
    base = BASE_SETTINGS[name]
    if base is None:
        return None
    settings = {"gpus_per_node": opts.gpus_per_node, **base}
    budgeted = "cross_node_budget" in overrides or (
        DEFAULT_CROSS_NODE_BUDGET is not None and name in ("locmoe", "locmoe+"))
    if name != "hash" and not budgeted:  # with a budget, mu defaults to 0 (LocMoEConfig)
        settings["locality_loss_coeff"] = opts.locality_coeff
    if name == "locmoe":
        settings["capacity"] = opts.locmoe_capacity
    if name == "locmoe+":
        settings["adaptive_interval"] = max(1, opts.steps // 10)
    settings.update(overrides)
    return settings


class MegatronSystem:
    def __init__(self, name: str, opts, accel, dev):
        from megatron.core import parallel_state as ps
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer import TransformerConfig

        from ..megatron.spec import locmoe_spec

        cfg = TransformerConfig(
            num_layers=opts.num_layers, hidden_size=opts.hidden_size, num_attention_heads=opts.num_heads,
            ffn_hidden_size=opts.ffn_hidden_size, moe_ffn_hidden_size=opts.ffn_hidden_size,
            num_moe_experts=opts.num_experts, moe_router_topk=opts.topk, moe_aux_loss_coeff=opts.aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss", moe_token_dispatcher_type="alltoall",
            expert_model_parallel_size=dist.get_world_size(), use_cpu_initialization=accel.is_cpu,
            add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
            masked_softmax_fusion=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
            persist_layer_norm=False,
        )
        spec = get_gpt_layer_local_spec(num_experts=opts.num_experts)
        settings = locmoe_settings(name, opts)
        if settings is not None:
            spec = locmoe_spec(spec, settings, dispatcher="hierarchical")
        self.model = GPTModel(cfg, spec, vocab_size=VOCAB_SIZE, max_sequence_length=opts.seq_len,
                              position_embedding_type="rope").to(dev)
        if settings is not None and settings["routing"] == "hash":
            from ..megatron.router import attach_token_ids

            attach_token_ids(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opts.lr, betas=(0.9, 0.95), weight_decay=0.01)
        self.dp_group = ps.get_data_parallel_group()
        self.num_experts = opts.num_experts
        self.routers = [m for n, m in self.model.named_modules() if n.endswith("mlp.router")]
        self.mask = torch.triu(torch.ones(opts.seq_len, opts.seq_len, dtype=torch.bool, device=dev), 1)[None, None]

    def routing_map(self, output):
        return dense_routing_map(output, self.num_experts)

    def train(self, mode: bool) -> None:
        self.model.train(mode)

    def loss(self, tokens, labels):
        pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.model(tokens, pos, self.mask, labels=labels).float().mean()

    def step(self, loss) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None and getattr(p, "allreduce", True)]
        if grads and dist.get_world_size(self.dp_group) > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.dp_group)
            flat /= dist.get_world_size(self.dp_group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()


def save_partial(results: list[dict], opts) -> None:
    """Rank 0 keeps the finished systems' results in ``OUT/partial.json`` (a long run cut short keeps them)."""
    if dist.get_rank() == 0 and opts.out:
        import json
        import os

        os.makedirs(opts.out, exist_ok=True)
        with open(os.path.join(opts.out, "partial.json"), "w") as f:
            json.dump(results, f)


def run_rank(opts, accel, dev, corpus) -> list[dict]:
    """Train every system of ``opts.systems`` in turn (same seed each) on this rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from .train import train_system

    logging.getLogger("megatron").setLevel(logging.ERROR)  # per-layer construction notices
    warnings.filterwarnings("ignore")
    if accel.is_cpu:
        from .cpu_shims import install

        install()
    ps.initialize_model_parallel(expert_model_parallel_size=dist.get_world_size())
    results = []
    try:
        for name in opts.systems:
            torch.manual_seed(opts.seed)
            model_parallel_cuda_manual_seed(opts.seed)
            system = MegatronSystem(name, opts, accel, dev)
            results.append(train_system(name, system, opts, corpus, accel, dev))
            del system
            save_partial(results, opts)
    finally:
        ps.destroy_model_parallel()
    return results
