"""The demo's DeepSpeed systems: the same small byte-level GPT, trained through ``deepspeed.initialize``.

- ``baseline``: ``deepspeed.moe.layer.MoE`` (``TopKGate``: softmax top-k, Switch aux loss, capacity
  factor 1.25 with token dropping, DeepSpeed's defaults for training) and its flat all-to-all;
- ``locmoe`` / ``locmoe+``: :class:`locmoe_plugin.deepspeed.LocMoE` with the same settings as the
  Megatron demo, hierarchical all-to-all.

Attention is ``torch.nn.MultiheadAttention`` (causal), learned positions; DeepSpeed's MoE parameter
groups, ZeRO stage 0, fp32.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from ..routing import index_to_dense
from .corpus import VOCAB_SIZE
from .megatron_job import locmoe_settings, save_partial

BASELINE_CAPACITY_FACTOR = 1.25


class _Block(nn.Module):
    def __init__(self, name: str, opts):
        from deepspeed.moe.layer import MoE

        from ..deepspeed import LocMoE

        super().__init__()
        h, world = opts.hidden_size, torch.distributed.get_world_size()
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.attn = nn.MultiheadAttention(h, opts.num_heads, batch_first=True, bias=False)
        expert = nn.Sequential(nn.Linear(h, opts.ffn_hidden_size, bias=False), nn.GELU(),
                               nn.Linear(opts.ffn_hidden_size, h, bias=False))
        settings = locmoe_settings(name, opts)
        if settings is None:
            self.moe = MoE(h, expert, num_experts=opts.num_experts, ep_size=world, k=opts.topk,
                           capacity_factor=BASELINE_CAPACITY_FACTOR, eval_capacity_factor=BASELINE_CAPACITY_FACTOR,
                           min_capacity=4)
        else:
            self.moe = LocMoE(h, expert, num_experts=opts.num_experts, ep_size=world, k=opts.topk, locmoe=settings)

    def forward(self, x, mask):
        a = self.ln1(x)
        x = x + self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        h, l_aux, _ = self.moe(self.ln2(x))
        return x + h, l_aux


class _GPT(nn.Module):
    def __init__(self, name: str, opts):
        super().__init__()
        self.emb = nn.Embedding(VOCAB_SIZE, opts.hidden_size)
        self.pos = nn.Parameter(torch.randn(opts.seq_len, opts.hidden_size) * 0.02)
        self.blocks = nn.ModuleList(_Block(name, opts) for _ in range(opts.num_layers))
        self.ln = nn.LayerNorm(opts.hidden_size)
        self.head = nn.Linear(opts.hidden_size, VOCAB_SIZE, bias=False)

    def forward(self, tokens, labels):
        s = tokens.shape[1]
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=tokens.device), 1)
        x = self.emb(tokens) + self.pos[:s]
        aux = x.new_zeros(())
        for blk in self.blocks:
            x, l_aux = blk(x, mask)
            aux = aux + l_aux
        lm = nn.functional.cross_entropy(self.head(self.ln(x)).float().reshape(-1, VOCAB_SIZE), labels.reshape(-1))
        return lm, aux


def _routing_map(num_experts: int):
    """Routing map ``[s, n]`` from a LocMoE ``RouterOutput`` or a DeepSpeed gate's output: 0.19's sparse
    form ``(l_aux, C, E, indices [k, s] (-1 = dropped), locations, gates, counts)`` or the older dense
    form ``(l_aux, combine_weights [s, E, C], dispatch_mask, counts)``."""

    def extract(output):
        if hasattr(output, "assignment"):
            ids = output.assignment.expert_ids
        elif len(output) == 7:
            ids = output[3].t().long()
        else:
            return output[1].sum(-1) > 0
        return index_to_dense(ids, torch.ones(ids.shape, device=ids.device), num_experts)[1]

    return extract


class DeepSpeedSystem:
    def __init__(self, name: str, opts, dev, extra_config: dict | None = None):
        """``extra_config``: DeepSpeed config entries added to the demo's (e.g. ``{"bf16": {"enabled": True}}``)."""
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        model = _GPT(name, opts)
        groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "params"})
        self.optimizer = torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.95), weight_decay=0.01)
        config = {"train_micro_batch_size_per_gpu": opts.micro_batch, "gradient_clipping": 1.0,
                  "zero_optimization": {"stage": 0}, "steps_per_print": 10**9, **(extra_config or {})}
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=config)
        self.routers = [b.moe.deepspeed_moe.gate if name == "baseline" else b.moe.router for b in model.blocks]
        self.routing_map = _routing_map(opts.num_experts)
        self._aux = None

    def train(self, mode: bool) -> None:
        self.engine.train(mode)

    def loss(self, tokens, labels):
        lm, self._aux = self.engine(tokens, labels)
        return lm

    def step(self, loss) -> None:
        self.engine.backward(loss + self._aux)
        self.engine.step()


def run_rank(opts, accel, dev, corpus) -> list[dict]:
    from ..testing.deepspeed_init import init_deepspeed_distributed
    from .train import train_system

    warnings.filterwarnings("ignore")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    init_deepspeed_distributed(opts.backend)
    results = []
    for name in opts.systems:
        torch.manual_seed(opts.seed)
        results.append(train_system(name, DeepSpeedSystem(name, opts, dev), opts, corpus, accel, dev))
        save_partial(results, opts)
    return results
