"""Router training for the MoE-layer benchmark: a byte-level LM around one MoE layer, trained on real text
so the routers (Megatron's TopKRouter, LocMoE with its settings) are timed as training leaves them."""

from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from locmoe_plugin.comm.settings import DispatcherSettings  # noqa: E402
from locmoe_plugin.megatron.router import dense_routing_map, routing_hook_targets  # noqa: E402

from layer_setup import Ctx, build_megatron_layer  # noqa: E402



# ------------------------------------------------------------------------------------------ training
class ByteLM(nn.Module):
    """embedding -> causal depthwise-conv mixing block -> RMSNorm -> MoE layer -> RMSNorm -> head."""

    def __init__(self, d: int, moe: nn.Module, kernel: int = 8):
        super().__init__()
        self.emb = nn.Embedding(256, d)
        self.norm0 = nn.RMSNorm(d)
        self.conv = nn.Conv1d(d, d, kernel, groups=d, padding=kernel - 1)
        self.mix = nn.Linear(d, d, bias=False)
        self.norm1 = nn.RMSNorm(d)
        self.moe = moe
        self.norm2 = nn.RMSNorm(d)
        self.head = nn.Linear(d, 256, bias=False)

    def pre_moe(self, tokens):
        """``tokens [B, T]`` -> residual ``h [B, T, d]`` and the MoE input ``u [T, B, d]``."""
        T = tokens.shape[1]
        h = self.emb(tokens)
        c = self.conv(self.norm0(h).transpose(1, 2))[..., :T].transpose(1, 2)
        h = h + self.mix(F.gelu(c))
        return h, self.norm1(h).transpose(0, 1).contiguous()

    def forward(self, tokens):
        h, u = self.pre_moe(tokens)
        y, _ = self.moe(u)
        return self.head(self.norm2(h + y.transpose(0, 1)))


def _budget_mechanism(a) -> str | None:
    """The budget's mechanism as LocMoEConfig resolves it (None without a budget)."""
    from locmoe_plugin.config import DEFAULT_BUDGET_MECHANISM

    return None if a.budget is None else a.budget_mechanism or DEFAULT_BUDGET_MECHANISM


def eval_seed(a) -> int:
    """Seed of the held-out windows: ``--eval-seed``; a namespace from before the option drew them from
    ``--seed`` + 7 (each training seed its own windows)."""
    value = getattr(a, "eval_seed", None)
    return a.seed + 7 if value is None else value


def _budget_warmup(a) -> int:
    """``--budget-warmup`` (0 without it, or from a namespace that predates it)."""
    return getattr(a, "budget_warmup", 0) or 0


def train(ctx: Ctx, corpus, gate: str, mu: float, sync: str, tag: str, bias: bool = True):
    """Train a ByteLM whose MoE layer is a LocMoELayer (``gate`` "dense"/"grap") or, for ``gate="topk"``,
    megatron-core's MoELayer with TopKRouter + aux loss (the baselines' router); return (model, summary)."""
    from megatron.core import tensor_parallel

    a = ctx.args
    torch.manual_seed(a.seed)  # same dense init on every rank
    if not ctx.acc.is_cpu:
        tensor_parallel.model_parallel_cuda_manual_seed(a.seed)
    locmoe = None if gate == "topk" else {"gate": gate, "routing": "locmoe", "locality_loss_coeff": mu,
                                          "gpus_per_node": ctx.gpn, "aux_loss_scope": a.aux_scope,
                                          "locality_bias": bias and (mu > 0 or _budget_mechanism(a) == "loss"),
                                          "expert_bias_rate": a.expert_bias_rate,
                                          "cross_node_budget": a.budget, "budget_mechanism": _budget_mechanism(a),
                                          "cross_node_budget_warmup": _budget_warmup(a)}
    dispatcher = DispatcherSettings(dispatch_format=a.dispatch_format)  # LocMoE layers only
    moe = build_megatron_layer(ctx, "alltoall", torch.float32, locmoe, locmoe_dispatcher=dispatcher)
    model = ByteLM(a.hidden, moe).to(ctx.dev)
    expert_params = list(model.moe.experts.parameters())
    eids = {id(p) for p in expert_params}
    dense_params = [p for p in model.parameters() if id(p) not in eids]
    group = ctx.node_group if sync == "node" else dist.group.WORLD
    gsize = dist.get_world_size(group)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(a.seed + 1000 * ctx.rank)
    routed_map = {}
    num_experts = model.moe.router.config.num_moe_experts
    for target in routing_hook_targets(model.moe.router):
        target.register_forward_hook(
            lambda mod, inp, out: routed_map.__setitem__("map", dense_routing_map(out, num_experts)))
    remote_mask = ctx.expert_node != ctx.node
    losses, cross, routed, loads = [], [], [], []
    t0 = time.perf_counter()
    for step in range(a.train_steps):
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / 20) * (
                1.0 if a.lr_schedule == "constant" else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.train_steps)))
        tokens, labels = corpus_batch(corpus.train, a.train_batch, a.seq, gen, ctx.dev)
        logits = model(tokens)
        loss = F.cross_entropy(logits.reshape(-1, 256), labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in dense_params if p.grad is not None]
        if gsize > 1 and grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=group)
            flat /= gsize
            off = 0
            for g in grads:
                g.copy_(flat[off : off + g.numel()].view_as(g))
                off += g.numel()
        opt.step()
        rmap = routed_map["map"]
        losses.append(loss.detach())
        cross.append((rmap & remote_mask).sum().float())
        routed.append(rmap.sum().float())
        loads.append(rmap.sum(0).float())
        if (step + 1) % 50 == 0 or step == 0:
            w = slice(max(0, len(losses) - 10), len(losses))
            lm = ctx.allsum([torch.stack(losses[w]).mean().item()])[0] / ctx.world
            cr = ctx.allsum([torch.stack(cross[w]).sum().item(), torch.stack(routed[w]).sum().item()])
            core = getattr(model.moe.router, "core", None)
            target = "" if core is None or core.budget is None else f" (target {float(core.budget.target()):.3f})"
            ctx.log(f"  [{tag}] step {step + 1:4d}  LM loss {lm:.3f}  cross-node share {cr[0] / max(cr[1], 1):.3f}"
                    f"{target}  ({time.perf_counter() - t0:.1f} s)")
    ctx.sync()
    train_s = time.perf_counter() - t0
    n = min(10, len(losses))
    first = ctx.allsum([torch.stack(losses[:n]).mean().item()])[0] / ctx.world
    last = ctx.allsum([torch.stack(losses[-n:]).mean().item()])[0] / ctx.world
    cr = ctx.allsum([torch.stack(cross[-n:]).sum().item(), torch.stack(routed[-n:]).sum().item()])
    load = torch.stack(loads[-n:]).sum(0)  # per expert over the last n steps, summed over ranks
    dist.all_reduce(load)
    # held-out LM loss and cross-node share on validation windows: the same windows for every model and,
    # from --eval-seed (not --seed), for every training seed, so seeds differ in training only
    vgen = torch.Generator().manual_seed(eval_seed(a) + 1000 * ctx.rank)
    model.eval()
    vloss = vcross = vrouted = 0.0
    with torch.no_grad():
        for _ in range(a.eval_batches):
            vt, vl = corpus_batch(corpus.val, a.train_batch, a.seq, vgen, ctx.dev)
            vloss += F.cross_entropy(model(vt).reshape(-1, 256), vl.reshape(-1)).item() / a.eval_batches
            rmap = routed_map["map"]
            vcross += (rmap & remote_mask).sum().item()
            vrouted += rmap.sum().item()
        vcr = ctx.allsum([vloss, vcross, vrouted])
    model.train()
    core = getattr(model.moe.router, "core", None)
    strength = None if core is None or core.budget is None else core.budget.strength.item()
    summary = {"tag": tag, "gate": gate, "mu": mu, "sync": sync, "locality_bias": locmoe is not None and
               locmoe["locality_bias"], "expert_bias_rate": a.expert_bias_rate if locmoe is not None else None,
               "steps": a.train_steps,
               "tokens_per_rank_per_step": a.train_batch * a.seq, "lm_loss_first10": first, "lm_loss_last10": last,
               "val_lm_loss": vcr[0] / ctx.world, "cross_node_share_last10": cr[0] / max(cr[1], 1),
               "val_cross_node_share": vcr[1] / max(vcr[2], 1), "train_seconds": train_s,
               "max_over_mean_load_last10": (load.max() / load.mean()).item(),
               "cross_node_budget": None if locmoe is None else a.budget, "budget_strength": strength,
               "eval_batches": a.eval_batches, "seed": a.seed}
    ctx.log(f"  [{tag}] done: LM loss {first:.3f} -> {last:.3f} (val {summary['val_lm_loss']:.3f}), cross-node "
            f"share {summary['cross_node_share_last10']:.3f} (val {summary['val_cross_node_share']:.3f}), max/mean "
            f"load {summary['max_over_mean_load_last10']:.2f}, {train_s:.1f} s")
    return model, summary


def corpus_batch(stream, batch, seq, gen, dev):
    from locmoe_plugin.demo.corpus import sample_batch

    x, y = sample_batch(stream, batch, seq, gen)
    return x.to(dev), y.to(dev)

