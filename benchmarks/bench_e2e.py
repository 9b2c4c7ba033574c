"""End to end: a GPT MoE trained through megatron-core's training stack, per system and layout.

Every Megatron system is a megatron-core ``GPTModel`` (local layer spec, RoPE, causal attention through
torch's ``scaled_dot_product_attention`` unless ``--attention local``) wrapped in Megatron's
``DistributedDataParallel`` (overlapped, bucketed gradient reduction; fp32 gradient buffers as Megatron-LM
keeps them in bf16 training, or bf16 ones with ``--grad-reduce bf16``, Megatron-LM's ``--grad-reduce-in-bf16``) and trained
by ``megatron.core.optimizer.get_megatron_optimizer`` (Adam, bf16 with fp32 main weights, gradient
clipping 1.0; ``--optimizer distributed``: Megatron's distributed optimizer with overlapped parameter
all-gather); each step ends with ``finalize_model_grads``, as Megatron-LM's training loop does.
Data parallelism = expert parallelism = all ranks (TP = PP = 1). Systems:

  mcore_alltoall     MoELayer + TopKRouter (softmax top-k, aux loss) + 'alltoall' dispatcher, SequentialMLP
                     experts: Megatron's best MoE options without TransformerEngine
  mcore_grouplimited the same with moe_router_num_groups = nodes, moe_router_group_topk = 1
  locmoe_topk        LocMoE's hierarchical dispatcher with TopK-like routing (dense gate, softmax top-k, aux
                     loss, no locality loss)
  locmoe             LocMoE at its defaults (dense gate, cross-node budget 0.2 on 2 nodes), hierarchical dispatcher
  locmoe_allgather   the same with the allgather dispatcher (one node only: every token all-gathered, no count
                     exchange, as Megatron's equal token counts allow)
  locmoe_flat        the same with the flat dispatcher (every remote (token, expert) pair on one all-to-all over
                     the EP group, summed in the hierarchical plan's order); across nodes too
  locmoe_fp8         the same with token rows and output gradients sent as FP8 (E4M3, one fp32 scale per 128
                     features; DispatcherSettings.dispatch_format="fp8", Megatron --locmoe-dispatch-format fp8)
  locmoe_plus        LocMoE+ at its defaults (hybrid token/expert choice, dense gate, cross-node budget 0.2 on 2 nodes,
                     adaptive capacity, resonance_mass 0.9), hierarchical dispatcher
  deepspeed_moe      the same sizes through ``deepspeed.initialize`` (bf16, ZeRO 0): DeepSpeed's MoE (TopKGate,
                     capacity factor 1.25) in locmoe_plugin.demo.deepspeed_job's GPT; run it in its own launch

Data: byte-level language modelling on the real English corpus of ``locmoe_plugin.demo.corpus``; every
system sees the same batches (seeded per rank) and the same schedule (linear warm-up over ``--warmup``
steps, by default the first 10 % of them, then constant ``--lr``), so "validation loss after the same
tokens" compares like with like.

Measured per system (rank 0 writes ``OUT/e2e_<layout>_<variant>.json``, the variant being the system's name with
the suffixes of its options, e.g. ``locmoe+bf16grad``, ``mcore_alltoall+mb2+1f1b``; a variant whose JSON exists is
skipped, so an interrupted run resumes where it stopped):
- tokens/s of each of the last ``--measure`` steps (steady state: after warm-up and after the locality
  bias has settled), world x micro-batch x seq / the slowest rank's step time; median, mean, min, max,
  standard deviation;
- peak device memory (max over ranks; the system before is freed first), inter- and intra-node bytes sent
  through all_to_all per step (measured at the collective API during the measured steps), the busiest
  rank's share of them, cross-node share of routed pairs (mean and per step), the busiest expert's and
  rank's routed rows over the mean, and the device allocator's calls during the measured steps (summed
  over ranks: allocations past the cached blocks synchronise the step);
- one profiling step after them (``e2e_profile``): forward and backward time per phase (attention,
  router, dispatch, experts, combine), "grad sync" (finalize_model_grads: the part of the gradient
  reduction not hidden behind backward), optimizer, and the inter-node wait share = (all_to_all time on
  groups that span nodes + grad sync when the data-parallel group spans nodes) / the profiling step's time;
- validation loss on ``--eval-batches`` held-out batches after training, and the mean training loss of the
  measured steps;
- the all-to-all bandwidth inside and between nodes and the link's name (``locmoe bandwidth``).

  torchrun --standalone --nproc-per-node 4 benchmarks/bench_e2e.py --out OUT
  launch/emulate_nodes.sh --nodes 2 --nproc-per-node 4 --link fast -- benchmarks/bench_e2e.py --out OUT
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import statistics
import sys
import time
import warnings
import weakref

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for path in (REPO, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from e2e_profile import LinkTimer, PhaseTimer  # noqa: E402
from manual_gc import automatic_collection  # noqa: E402
from locmoe_plugin.comm.bandwidth import measure_bandwidth  # noqa: E402
from locmoe_plugin.comm.settings import DispatcherSettings  # noqa: E402
from locmoe_plugin.demo.corpus import VOCAB_SIZE, load_corpus, sample_batch  # noqa: E402
from locmoe_plugin.demo.metrics import RoutingMonitor, WireCounter  # noqa: E402
from locmoe_plugin.device import get_accelerator  # noqa: E402

#: system -> LocMoE settings (None: megatron-core's TopKRouter + alltoall dispatcher)
MEGATRON_SYSTEMS = {
    "mcore_alltoall": None,
    "mcore_grouplimited": None,
    "locmoe_topk": {"routing": "topk", "gate": "dense"},
    "locmoe": {"routing": "locmoe"},  # LocMoEConfig defaults (dense gate, cross-node budget)
    "locmoe_allgather": {"routing": "locmoe"},  # the same, allgather dispatcher (DISPATCHER below)
    "locmoe_flat": {"routing": "locmoe"},  # the same, flat dispatcher: one all-to-all over the EP group
    "locmoe_fp8": {"routing": "locmoe"},  # the same, rows in the dispatch direction as fp8 (DISPATCH_FORMAT below)
    "locmoe_plus": {"routing": "hybrid"},  # LocMoEConfig defaults (dense gate, budget, adaptive, resonance)
}
SYSTEMS = (*MEGATRON_SYSTEMS, "deepspeed_moe")
#: system -> LocMoE dispatcher mode where it is not the default hierarchical one
DISPATCHER = {"locmoe_allgather": "allgather", "locmoe_flat": "flat"}
#: system -> DispatcherSettings.dispatch_format where it is not "native"
DISPATCH_FORMAT = {"locmoe_fp8": "fp8"}
#: systems whose EP group must sit inside one node
ONE_NODE_ONLY = ("locmoe_allgather",)
PHASES = ("attention", "router", "dispatch", "experts", "combine")


def has_budget(system: str) -> bool:
    """Whether ``system`` routes with LocMoE's cross-node budget (``--locmoe-budget`` applies to it)."""
    settings = MEGATRON_SYSTEMS.get(system)
    return settings is not None and settings["routing"] != "topk"


#: --grad-reduce dtype -> suffix of the result's variant name (fp32, Megatron-LM's bf16 default, has none)
GRAD_REDUCE = {"fp32": "", "bf16": "+bf16grad"}
#: --optimizer -> suffix of the variant name: replicated (every rank all-reduces the dense gradients and steps
#: all of them) or distributed (Megatron-LM's --use-distributed-optimizer --overlap-param-gather: gradients
#: reduce-scattered, each rank steps its 1/DP shard, parameters all-gathered during the next forward)
OPTIMIZER = {"replicated": "", "distributed": "+distopt"}
#: --ep-overlap -> suffix of the variant name: off, or Megatron's 1F1B all-to-all overlap (megatron-core's
#: overlap_moe_expert_parallel_comm, Megatron-LM's --overlap-moe-expert-parallel-comm: the forward of one
#: micro-batch runs beside the backward of the one before, each one's all-to-alls on a communication stream
#: while the other computes)
EP_OVERLAP = {"off": "", "1f1b": "+1f1b"}


def microbatch_suffix(microbatches: int) -> str:
    """Suffix of the variant name for a step split into ``microbatches`` micro-batches (none for one)."""
    return f"+mb{microbatches}" if microbatches > 1 else ""


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="mcore_alltoall,locmoe,locmoe_topk",
                   help=f"comma-separated, from {', '.join(SYSTEMS)} (deepspeed_moe only on its own)")
    p.add_argument("--out", required=True, help="folder for the per-system JSON files")
    p.add_argument("--gpus-per-node", type=int, default=int(os.environ.get("LOCMOE_GPUS_PER_NODE", 0)) or None,
                   help="ranks per (emulated) node; default $LOCMOE_GPUS_PER_NODE, else the world size")
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--num-heads", type=int, default=16)
    p.add_argument("--num-experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--ffn-hidden-size", type=int, default=1408, help="hidden size of each expert")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=2,
                   help="sequences per rank per step (Megatron's micro-batch size is this over --microbatches)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--attention", choices=("sdpa", "local"), default="sdpa",
                   help="sdpa: torch's scaled_dot_product_attention (flash kernel on GPUs); local: megatron-core's "
                        "unfused DotProductAttention")
    p.add_argument("--steps", type=int, default=40, help="training steps per system")
    p.add_argument("--measure", type=int, default=10, help="the last this many steps are timed")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=None,
                   help="steps of linear learning-rate warm-up (default: --steps // 10, at least 1)")
    p.add_argument("--aux-loss-coeff", type=float, default=0.01)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--bandwidth-mib", type=float, default=32.0, help="payload per peer of the bandwidth check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", default=None, help="text file or folder (default: the demo corpus)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per CPU rank")
    p.add_argument("--manual-gc", action="store_true",
                   help="as Megatron-LM's --manual-gc: Python's automatic garbage collection off while a system "
                        "trains, one full collection before its measured steps (untimed); default: automatic, "
                        "whose passes land in whichever step allocates past its threshold, on each rank at its "
                        "own time")
    p.add_argument("--grouped-experts", choices=("off", "locmoe", "all"), default="off",
                   help="experts of the Megatron-built systems: off (default) megatron-core's SequentialMLP in "
                        "every system, so rows differ by router and dispatcher only; locmoe: LocMoE's systems with "
                        "LocMoEGroupedMLP (the plugin's default, --locmoe-grouped-experts auto), Megatron's with "
                        "SequentialMLP (each as shipped); all: LocMoEGroupedMLP in every Megatron-built system")
    p.add_argument("--grad-reduce", default="fp32",
                   help="dtype of the Megatron systems' gradient buffers and their data-parallel reduction: fp32 "
                        "(Megatron-LM's bf16 default), bf16 (its --grad-reduce-in-bf16: half the bytes on the "
                        "link), or a comma-separated list to run every system once per dtype in one launch; "
                        "deepspeed_moe runs once, reducing as DeepSpeed's engine does")
    p.add_argument("--optimizer", default="replicated",
                   help="the Megatron systems' optimizer: replicated (default; dense gradients all-reduced, every "
                        "rank steps every parameter), distributed (Megatron-LM's --use-distributed-optimizer "
                        "--overlap-param-gather: the dense gradients reduce-scattered, each rank steps its "
                        "1/data-parallel shard and the bf16 parameters are all-gathered bucket by bucket during the "
                        "next forward), or both comma-separated to run every system once per optimizer in one "
                        "launch; deepspeed_moe runs once, with DeepSpeed's engine")
    p.add_argument("--microbatches", type=int, default=1,
                   help="micro-batches per step: the step's --micro-batch sequences per rank split into this many, "
                        "run by megatron-core's schedule (forward_backward_func: gradients accumulated, the "
                        "data-parallel reduction during the last backward); 1 (default): one forward and backward "
                        "over the step's batch. Megatron-built systems only")
    p.add_argument("--ep-overlap", default="off",
                   help="off (default), 1f1b (megatron-core's overlap_moe_expert_parallel_comm, Megatron-LM's "
                        "--overlap-moe-expert-parallel-comm: micro-batch i+1's forward beside micro-batch i's "
                        "backward, their all-to-alls on a communication stream; needs --microbatches >= 2, bf16 and "
                        "a GPU), or off,1f1b to run every system both ways in one launch")
    p.add_argument("--locmoe-budget", type=float, default=None,
                   help="cross-node budget of the systems with LocMoE's routing (locmoe, locmoe_flat, locmoe_fp8, "
                        "locmoe_allgather, locmoe_plus): the largest share of routed pairs that cross nodes, in "
                        "[0, 1]; default: LocMoEConfig's (0.2 on 2 nodes)")
    a = p.parse_args(argv)
    if a.locmoe_budget is not None and not 0.0 <= a.locmoe_budget <= 1.0:
        p.error(f"--locmoe-budget {a.locmoe_budget} must be a share in [0, 1] (e.g. 0.1)")
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    for s in a.systems:
        if s not in SYSTEMS:
            p.error(f"--systems: unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
    if a.locmoe_budget is not None and not any(has_budget(s) for s in a.systems):
        p.error(f"--locmoe-budget applies to {', '.join(s for s in MEGATRON_SYSTEMS if has_budget(s))}; none is in "
                f"--systems")
    if "deepspeed_moe" in a.systems and len(a.systems) > 1:
        p.error("--systems: deepspeed_moe sets up its own process groups; run it in a launch of its own")
    a.grad_reduce = [g.strip() for g in a.grad_reduce.split(",") if g.strip()]
    if not a.grad_reduce or any(g not in GRAD_REDUCE for g in a.grad_reduce) or len(set(a.grad_reduce)) < len(a.grad_reduce):
        p.error(f"--grad-reduce: give distinct dtypes from {', '.join(GRAD_REDUCE)}, comma-separated")
    a.optimizer = [o.strip() for o in a.optimizer.split(",") if o.strip()]
    if not a.optimizer or any(o not in OPTIMIZER for o in a.optimizer) or len(set(a.optimizer)) < len(a.optimizer):
        p.error(f"--optimizer: give distinct kinds from {', '.join(OPTIMIZER)}, comma-separated")
    a.ep_overlap = [e.strip() for e in a.ep_overlap.split(",") if e.strip()]
    if not a.ep_overlap or any(e not in EP_OVERLAP for e in a.ep_overlap) or len(set(a.ep_overlap)) < len(a.ep_overlap):
        p.error(f"--ep-overlap: give distinct settings from {', '.join(EP_OVERLAP)}, comma-separated")
    if a.microbatches < 1 or a.micro_batch % a.microbatches:
        p.error(f"--microbatches {a.microbatches} must be >= 1 and divide --micro-batch {a.micro_batch} (the step's "
                f"sequences per rank)")
    if "1f1b" in a.ep_overlap and (a.microbatches < 2 or a.dtype != "bf16"):
        p.error("--ep-overlap 1f1b overlaps one micro-batch's all-to-alls with another's compute: it needs "
                "--microbatches >= 2 (and --micro-batch a multiple of it) and --dtype bf16")
    if (a.microbatches > 1 or a.ep_overlap != ["off"]) and "deepspeed_moe" in a.systems:
        p.error("--microbatches and --ep-overlap apply to the Megatron-built systems; run deepspeed_moe without them")
    if "bf16" in a.grad_reduce and a.dtype != "bf16":
        p.error("--grad-reduce bf16 reduces bf16 gradients; it needs --dtype bf16")
    if a.warmup is not None and not 1 <= a.warmup <= a.steps - a.measure:
        p.error(f"--warmup {a.warmup} must be >= 1 and at most the {a.steps - a.measure} steps before the "
                f"measured ones")
    if not 1 <= a.measure < a.steps:
        p.error(f"--measure {a.measure} must be >= 1 and below --steps {a.steps} (the first steps warm up)")
    return a


def layout_name(nodes: int, gpn: int) -> str:
    """``1x4`` on one node; ``2x2_<link>`` across emulated nodes (the link from LOCMOE_LINK)."""
    name = f"{nodes}x{gpn}"
    return name if nodes == 1 else f"{name}_{os.environ.get('LOCMOE_LINK', 'unnamed')}"


# ------------------------------------------------------------------------------------------ systems
def sdpa_attention_class():
    """megatron-core's ``DotProductAttention`` with the core computed by torch's fused SDPA (causal)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class SDPAAttention(DotProductAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            # [s, b, heads, head_dim] -> [b, heads, s, head_dim]; causal, scale 1/sqrt(head_dim)
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            if k.shape[1] != q.shape[1]:  # grouped-query attention: repeat the key/value groups
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            s, b = query.shape[0], query.shape[1]
            return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    return SDPAAttention


class MegatronE2E:
    """GPTModel + Megatron DDP (overlapped grad reduce) + Megatron optimizer; ``loss`` / ``step`` as the
    demo's training loop expects."""

    def __init__(self, name: str, opts, accel, dev, grad_reduce: str = "fp32", optimizer: str = "replicated",
                 ep_overlap: str = "off"):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer import TransformerConfig

        from locmoe_plugin.megatron.router import dense_routing_map
        from locmoe_plugin.megatron.spec import grouped_experts_spec, locmoe_spec

        bf16 = opts.dtype == "bf16"
        world = dist.get_world_size()
        kw = dict(
            num_layers=opts.num_layers, hidden_size=opts.hidden_size, num_attention_heads=opts.num_heads,
            ffn_hidden_size=opts.ffn_hidden_size, moe_ffn_hidden_size=opts.ffn_hidden_size,
            num_moe_experts=opts.num_experts, moe_router_topk=opts.topk, moe_aux_loss_coeff=opts.aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss", moe_token_dispatcher_type="alltoall",
            expert_model_parallel_size=world, use_cpu_initialization=accel.is_cpu, bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32, add_bias_linear=False, hidden_dropout=0.0,
            attention_dropout=0.0, bias_dropout_fusion=False, masked_softmax_fusion=False,
            gradient_accumulation_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
            moe_permute_fusion=False, moe_grouped_gemm=False,
            overlap_moe_expert_parallel_comm=ep_overlap == "1f1b",
        )
        if name == "mcore_grouplimited":
            kw.update(moe_router_num_groups=world // opts.gpus_per_node, moe_router_group_topk=1)
        self.config = cfg = TransformerConfig(**kw)
        spec = get_gpt_layer_local_spec(num_experts=opts.num_experts)
        if opts.attention == "sdpa":
            spec.submodules.self_attention.submodules.core_attention = sdpa_attention_class()
        settings = MEGATRON_SYSTEMS[name]
        grouped = uses_grouped_experts(name, opts)
        if settings is not None:
            settings = {**settings, "gpus_per_node": opts.gpus_per_node, "aux_loss_coeff": opts.aux_loss_coeff}
            if opts.locmoe_budget is not None and has_budget(name):
                settings["cross_node_budget"] = opts.locmoe_budget
            dispatcher = DispatcherSettings(mode=DISPATCHER.get(name, "hierarchical"),
                                            dispatch_format=DISPATCH_FORMAT.get(name, "native"))
            spec = locmoe_spec(spec, settings, dispatcher=dispatcher, grouped_experts="on" if grouped else "off")
        elif grouped:
            spec = grouped_experts_spec(spec, "on")
        model = GPTModel(cfg, spec, vocab_size=VOCAB_SIZE, max_sequence_length=opts.seq_len,
                         position_embedding_type="rope").to(dev)
        if bf16:
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(cfg, model)
        sharded = optimizer == "distributed"
        ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=True,
                                                   grad_reduce_in_fp32=grad_reduce == "fp32",
                                                   use_distributed_optimizer=sharded, overlap_param_gather=sharded)
        self.model = DistributedDataParallel(cfg, ddp_config, model)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=opts.lr, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95,
                            bf16=bf16, clip_grad=1.0, use_distributed_optimizer=sharded),
            [self.model])
        self.microbatches = opts.microbatches
        self.scheduled = opts.microbatches > 1  # training steps run through megatron-core's schedule
        self._backward_done = False  # loss() ran the schedule: the gradients of its loss are in place
        if self.scheduled:  # as Megatron-LM's training loop: no reduction until the last micro-batch's backward
            cfg.no_sync_func = self.model.no_sync
        self.dp_group = ps.get_data_parallel_group()
        inner = self.model.module.module if bf16 else self.model.module
        self.moe_layers = [layer.mlp for layer in inner.decoder.layers]
        self.attention = [layer.self_attention for layer in inner.decoder.layers]
        self.routers = [m.router for m in self.moe_layers]
        self.routing_map = lambda out: dense_routing_map(out, opts.num_experts)
        self.mask = None  # causal (SDPA: is_causal; local: Megatron's causal mask type needs none passed)
        self.grad_sync_seconds = 0.0

    def train(self, mode: bool) -> None:
        self.model.train(mode)

    def grad_buffer_dtypes(self) -> list[str]:
        """dtypes of the data-parallel (dense) gradient buffers, as DDP allocated them."""
        return sorted({str(b.grad_dtype).removeprefix("torch.") for b in self.model.buffers})

    def profile_loss(self, tokens, labels):
        """The mean loss of one forward over the whole ``[sequences, seq]`` batch, for :meth:`backward_only`."""
        pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.model(tokens, pos, self.mask, labels=labels).float().mean()

    def loss(self, tokens, labels):
        """The step's mean loss. With one micro-batch, or outside training, the forward only (:meth:`step`
        runs the backward); with several, in training, megatron-core's schedule runs every micro-batch's forward
        and backward here (the 1F1B overlap where configured) and :meth:`step` reduces and steps."""
        self._backward_done = False
        if not (self.scheduled and self.model.training and torch.is_grad_enabled()):
            return self.profile_loss(tokens, labels)
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        batches = iter(list(zip(tokens.chunk(self.microbatches), labels.chunk(self.microbatches))))

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach().clone()}  # the schedule divides the first in place

        def forward_step(data_iterator, model, return_schedule_plan=False):
            t, lab = next(data_iterator)
            pos = torch.arange(t.shape[1], device=t.device).expand_as(t)
            if return_schedule_plan:  # the 1F1B overlap: the model's layers as separately scheduled nodes
                return model.build_schedule_plan(t, pos, self.mask, labels=lab), loss_func
            return model(t, pos, self.mask, labels=lab), loss_func

        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=batches, model=[self.model],
            num_microbatches=self.microbatches, seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0] // self.microbatches, forward_only=False)
        # the schedule scales the MoE losses' gradients by 1 / micro-batches for the whole process; a later
        # backward of one forward over the whole batch (the profiling step) takes them whole
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=tokens.device))
        self._backward_done = True
        return torch.stack([o["loss"] for o in out]).mean()

    def step(self, loss, sync=None) -> None:
        from megatron.core.distributed import finalize_model_grads

        if not self._backward_done:  # else the schedule ran the backward in loss()
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            loss.backward()
        if sync is not None:
            sync()
            t0 = time.perf_counter()
        finalize_model_grads([self.model])  # waits for the overlapped gradient reduction still in flight
        if sync is not None:
            sync()
            self.grad_sync_seconds = time.perf_counter() - t0
        self.optimizer.step()

    def backward_only(self, loss) -> None:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss.backward()

    def finish(self, sync) -> tuple[float, float]:
        """After :meth:`backward_only`: (grad sync seconds, optimizer seconds), each synchronised."""
        from megatron.core.distributed import finalize_model_grads

        sync()
        t0 = time.perf_counter()
        finalize_model_grads([self.model])
        sync()
        t1 = time.perf_counter()
        self.optimizer.step()
        sync()
        return t1 - t0, time.perf_counter() - t1

    def wrap_phases(self, timer: PhaseTimer) -> None:
        for attn in self.attention:
            timer.wrap_module(attn, "attention")
        for moe in self.moe_layers:
            timer.wrap_method(moe, "route", "router")
            for method, phase in (("preprocess", "dispatch"), ("dispatch", "dispatch"),
                                  ("routed_experts_compute", "experts"), ("combine", "combine"),
                                  ("postprocess", "combine")):
                timer.wrap_method(moe, method, phase)


class DeepSpeedE2E:
    """The DeepSpeed demo system (``deepspeed.initialize``, bf16) at the benchmark's sizes."""

    def __init__(self, opts, dev):
        from locmoe_plugin.demo.deepspeed_job import DeepSpeedSystem

        bf16 = opts.dtype == "bf16"
        self.sys = DeepSpeedSystem("baseline", opts, dev, extra_config={"bf16": {"enabled": bf16}})
        self.engine, self.optimizer = self.sys.engine, self.sys.optimizer
        self.routers, self.routing_map = self.sys.routers, self.sys.routing_map
        self.blocks = self.engine.module.blocks

    def train(self, mode: bool) -> None:
        self.sys.train(mode)

    def loss(self, tokens, labels):
        return self.sys.loss(tokens, labels)

    def step(self, loss, sync=None) -> None:
        self.sys.step(loss)

    def backward_only(self, loss) -> None:
        self.engine.backward(loss + self.sys._aux)

    def finish(self, sync) -> tuple[float, float]:
        """DeepSpeed reduces gradients inside ``engine.backward`` (ZeRO 0 without overlap); the step is
        the optimizer."""
        sync()
        t0 = time.perf_counter()
        self.engine.step()
        sync()
        return 0.0, time.perf_counter() - t0

    def wrap_phases(self, timer: PhaseTimer) -> None:
        for blk in self.blocks:
            timer.wrap_module(blk.attn, "attention")
            moe = blk.moe.deepspeed_moe
            timer.wrap_module(moe.gate, "router", backward=False)  # its gates' gradient arrives with combine's
            timer.wrap_module(moe.experts, "experts")
            timer.wrap_module(moe, "moe layer")


# ------------------------------------------------------------------------------------------ one system
def _all_reduce(values, dev, op=dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=op)
    return t.tolist()


def _all_max(values, dev) -> list[float]:
    return _all_reduce(values, dev, dist.ReduceOp.MAX)


def _peak_memory_reset(accel) -> None:
    if not accel.is_cpu:
        accel.module.reset_peak_memory_stats()


ALLOCATOR_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries")


def _allocator_counts(accel) -> dict | None:
    """The caching allocator's device-allocation counters (None on CPU): a step that grows past the cached
    blocks calls the device allocator, which synchronises; retries free cached blocks first."""
    if accel.is_cpu:
        return None
    stats = accel.module.memory_stats()
    return {k: int(stats.get(k, 0)) for k in ALLOCATOR_COUNTERS}


def _peak_memory_gib(accel, dev) -> float | None:
    if accel.is_cpu:
        return None
    return _all_max([accel.module.max_memory_allocated() / 2**30], dev)[0]


def _release(model_alive: weakref.ref, accel) -> bool:
    """Free the finished system before the next one is built (its model, gradient buffers and optimizer
    state would otherwise count in the next system's peak memory: DDP's and autograd's hooks hold them in
    reference cycles that only the cycle collector frees). True where the model is gone."""
    gc.collect()
    if not accel.is_cpu:
        accel.module.empty_cache()
    released = model_alive() is None
    if not released and dist.get_rank() == 0:
        print("bench_e2e: the finished system's model is still referenced; the next system's peak memory "
              "includes it", flush=True)
    return released


def uses_grouped_experts(name: str, opts) -> bool:
    """Whether ``--grouped-experts`` gives system ``name`` LocMoEGroupedMLP experts (Megatron-built systems only)."""
    if name not in MEGATRON_SYSTEMS or opts.grouped_experts == "off":
        return False
    return opts.grouped_experts == "all" or MEGATRON_SYSTEMS[name] is not None


def _gc_collections() -> list[int]:
    """Python's garbage-collection passes so far, per generation (0, 1, 2), on this process."""
    return [g["collections"] for g in gc.get_stats()]


def _warmup_steps(opts) -> int:
    return opts.warmup if opts.warmup is not None else max(1, opts.steps // 10)


def _lr(step: int, opts) -> float:
    return opts.lr * min(1.0, (step + 1) / _warmup_steps(opts))


def profile_step(system, tokens, labels, nodes: int, node_of, accel) -> dict:
    """One training step with synchronised phase timing (see :mod:`e2e_profile`); milliseconds. One forward
    and backward over the whole batch, also for a system trained in micro-batches (``--microbatches``,
    ``--ep-overlap``): the breakdown shows where the model's work goes, not how a schedule overlaps it."""
    sync = accel.synchronize
    timer = PhaseTimer(sync)
    system.wrap_phases(timer)
    try:
        with LinkTimer(node_of, sync) as link:
            sync()
            t0 = time.perf_counter()
            loss = getattr(system, "profile_loss", system.loss)(tokens, labels)
            sync()
            fwd = time.perf_counter() - t0
            bwd = timer.backward(lambda: system.backward_only(loss))
            grad_sync, opt = system.finish(sync)
            total = time.perf_counter() - t0
    finally:
        timer.remove()
    fwd_phases, bwd_phases = dict(timer.fwd), dict(timer.bwd)
    if "moe layer" in fwd_phases:  # DeepSpeed: the MoE layer less its gate and experts = dispatch + combine
        fwd_phases["dispatch"] = fwd_phases.pop("moe layer") - fwd_phases.get("router", 0) - fwd_phases.get("experts", 0)
        bwd_phases["combine"] = bwd_phases.pop("moe layer", 0.0)
    ms = {
        "forward": {p: fwd_phases.get(p, 0.0) * 1e3 for p in PHASES},
        "backward": {p: bwd_phases.get(p, 0.0) * 1e3 for p in PHASES},
    }
    ms["forward"]["other"] = fwd * 1e3 - sum(ms["forward"].values())
    ms["backward"]["other"] = bwd * 1e3 - sum(ms["backward"].values())
    ms.update(grad_sync=grad_sync * 1e3, optimizer=opt * 1e3, total=total * 1e3, inter_node_all_to_all=link.seconds * 1e3)
    wait = link.seconds + (grad_sync if nodes > 1 else 0.0)
    ms["inter_node_wait_share"] = wait / total if total > 0 else 0.0
    return ms


def run_system(name: str, system, opts, accel, dev, corpus, bandwidth: dict) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    gpn = opts.gpus_per_node
    nodes = world // gpn
    node_of = lambda r: r // gpn  # noqa: E731 - EP group = world, ranks in node order
    node_of_expert = torch.arange(opts.num_experts) // (opts.num_experts // world) // gpn
    monitor = RoutingMonitor(system.routers, system.routing_map, node_of_expert, node_of(rank), opts.topk,
                             ranks=world)
    gen = torch.Generator().manual_seed(opts.seed * 1000 + rank)
    val_gen = torch.Generator().manual_seed(opts.seed * 1000 + 500 + rank)
    tokens_per_step = world * opts.micro_batch * opts.seq_len
    measure_from = opts.steps - opts.measure
    wire = WireCounter(node_of)
    step_s, losses, cross, dropped, expert_load, rank_load, gc_steps = [], [], [], 0, [], [], []
    _peak_memory_reset(accel)
    system.train(True)
    with automatic_collection(off=opts.manual_gc):
        t_run = time.perf_counter()
        for step in range(opts.steps):
            tokens, labels = (t.to(dev) for t in sample_batch(corpus.train, opts.micro_batch, opts.seq_len, gen))
            for g in system.optimizer.param_groups:
                g["lr"] = _lr(step, opts)
            measured = step >= measure_from
            if step == measure_from:
                if opts.manual_gc:
                    gc.collect()
                alloc_before = _allocator_counts(accel)
            monitor.begin_step()
            accel.synchronize()
            dist.barrier()
            gc_before = _gc_collections()
            t0 = time.perf_counter()
            if measured:
                with wire:
                    loss = system.loss(tokens, labels)
                    system.step(loss)
            else:
                loss = system.loss(tokens, labels)
                system.step(loss)
            accel.synchronize()
            dt = time.perf_counter() - t0
            gc_steps.append([a - b for a, b in zip(_gc_collections(), gc_before)])
            routing = monitor.end_step(dev)
            if measured:
                step_s.append(dt)
                losses.append(loss.detach().float())
                cross.append(routing["cross_node_share"])
                dropped += routing["dropped_pairs"]
                expert_load.append(routing["max_over_mean_load"])
                rank_load.append(routing["rank_max_over_mean_load"])
            if rank == 0 and (step + 1) % max(1, opts.steps // 8) == 0:
                print(f"  [{name}] step {step + 1}/{opts.steps}  loss {float(loss):.3f}  cross-node "
                      f"{routing['cross_node_share']:.3f}  {dt * 1e3:.0f} ms  ({time.perf_counter() - t_run:.0f} s)",
                      flush=True)
    monitor.remove()
    # each measured step's passes per generation, summed over the ranks
    gc_flat = _all_reduce([float(v) for c in gc_steps[measure_from:] for v in c], dev)
    gc_measured = [[int(v) for v in gc_flat[i : i + 3]] for i in range(0, len(gc_flat), 3)]
    alloc_after = _allocator_counts(accel)
    allocator = None
    if alloc_after is not None:  # summed over ranks, over the measured steps
        allocator = dict(zip(ALLOCATOR_COUNTERS, (int(v) for v in _all_reduce(
            [alloc_after[k] - alloc_before[k] for k in ALLOCATOR_COUNTERS], dev))))
    peak = _peak_memory_gib(accel, dev)
    step_s = _all_max(step_s, dev)  # the slowest rank's time of each measured step
    tps = [tokens_per_step / s for s in step_s]
    train_loss = torch.stack(losses).mean().reshape(1)
    dist.all_reduce(train_loss)
    totals = torch.tensor([wire.inter_bytes, wire.intra_bytes], dtype=torch.float64, device=dev)
    dist.all_reduce(totals)
    inter_max = _all_max([float(wire.inter_bytes)], dev)[0]  # the rank that sends most across nodes

    tokens, labels = (t.to(dev) for t in sample_batch(corpus.train, opts.micro_batch, opts.seq_len, gen))
    breakdown = profile_step(system, tokens, labels, nodes, node_of, accel)

    system.train(False)
    with torch.no_grad():
        val = [system.loss(*(t.to(dev) for t in sample_batch(corpus.val, opts.micro_batch, opts.seq_len, val_gen)))
               for _ in range(opts.eval_batches)]
    system.train(True)
    val_loss = torch.stack(val).mean().reshape(1).float()
    dist.all_reduce(val_loss)
    return {
        "system": name, "layout": layout_name(nodes, gpn), "link": bandwidth["link"] if nodes > 1 else "none",
        "nodes": nodes, "gpus_per_node": gpn, "world": world,
        "model": {k: getattr(opts, k) for k in ("num_layers", "hidden_size", "num_heads", "num_experts", "topk",
                                                "ffn_hidden_size", "seq_len", "micro_batch", "dtype", "attention")},
        "microbatches": opts.microbatches, "micro_batch_size": opts.micro_batch // opts.microbatches,
        "steps": opts.steps, "measured_steps": opts.measure, "lr": opts.lr, "lr_warmup_steps": _warmup_steps(opts),
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": {"median": statistics.median(tps), "mean": statistics.mean(tps), "min": min(tps),
                         "max": max(tps), "stdev": statistics.stdev(tps) if len(tps) > 1 else 0.0},
        "step_ms": [s * 1e3 for s in step_s],
        "peak_memory_gib": peak,
        "inter_node_bytes_per_step": float(totals[0]) / opts.measure,
        "intra_node_bytes_per_step": float(totals[1]) / opts.measure,
        "cross_node_share": statistics.mean(cross),
        "cross_node_share_steps": cross,
        "allocator_calls_measured": allocator,
        "manual_gc": bool(opts.manual_gc),
        "locmoe_budget": opts.locmoe_budget if has_budget(name) else None,  # None: LocMoEConfig's default
        # how LocMoE's dispatcher sent token rows (None: not LocMoE's dispatcher)
        "dispatch_format": DISPATCH_FORMAT.get(name, "native") if MEGATRON_SYSTEMS.get(name) is not None else None,
        "grouped_experts": uses_grouped_experts(name, opts),
        "gc_collections_steps": gc_measured,
        "inter_node_bytes_rank_max_over_mean": inter_max * world / float(totals[0]) if float(totals[0]) > 0 else None,
        "expert_load_max_over_mean": statistics.mean(expert_load),
        "rank_load_max_over_mean": statistics.mean(rank_load),
        "dropped_pairs_measured": dropped,
        "train_loss_measured": float(train_loss) / world,
        "val_loss": float(val_loss) / world,
        "val_tokens": world * opts.eval_batches * opts.micro_batch * opts.seq_len,
        "trained_tokens": opts.steps * tokens_per_step,
        "breakdown_ms": breakdown,
        "bandwidth": bandwidth,
        "wall_s": time.perf_counter() - t_run,
    }


# ------------------------------------------------------------------------------------------ main
def _setup(opts):
    accel = get_accelerator()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if not accel.is_cpu:
        accel.set_device(local)
    else:
        torch.set_num_threads(opts.threads)
    dev = accel.device(None if accel.is_cpu else local)
    return accel, dev


def json_path(opts, layout: str, system: str) -> str:
    return os.path.join(opts.out, f"e2e_{layout}_{system}.json")


def main(argv=None) -> int:
    opts = parse(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    opts.gpus_per_node = opts.gpus_per_node or world
    if world % opts.gpus_per_node or opts.num_experts % world or opts.hidden_size % opts.num_heads:
        raise SystemExit(f"bench_e2e: the world size {world} must be a multiple of --gpus-per-node "
                         f"{opts.gpus_per_node} and divide --num-experts {opts.num_experts}; --num-heads must "
                         f"divide --hidden-size")
    if "1f1b" in opts.ep_overlap and world < 2:
        raise SystemExit("bench_e2e: --ep-overlap 1f1b overlaps expert-parallel all-to-alls; it needs 2 or more ranks")
    layout = layout_name(world // opts.gpus_per_node, opts.gpus_per_node)
    one_node_only = [s for s in opts.systems if s in ONE_NODE_ONLY]
    if one_node_only and world > opts.gpus_per_node:
        raise SystemExit(f"bench_e2e: {', '.join(one_node_only)} needs an EP group inside one node ({layout} spans "
                         f"{world // opts.gpus_per_node}); run it on one node or drop it from --systems")
    if opts.systems == ["deepspeed_moe"]:  # DeepSpeed's engine reduces and steps: one run, whatever the options
        variants = [("deepspeed_moe", "deepspeed", "deepspeed", "off", "deepspeed_moe")]
    else:
        mb = microbatch_suffix(opts.microbatches)
        variants = [(s, g, o, e, s + GRAD_REDUCE[g] + OPTIMIZER[o] + mb + EP_OVERLAP[e])
                    for s in opts.systems for g in opts.grad_reduce for o in opts.optimizer for e in opts.ep_overlap]
    todo = [v for v in variants if not os.path.exists(json_path(opts, layout, v[-1]))]
    for name, *_, variant in variants:  # a result kept for resuming must be of the budget asked for now
        path = json_path(opts, layout, variant)
        if has_budget(name) and os.path.exists(path):
            with open(path) as f:
                kept = json.load(f).get("locmoe_budget")
            if kept != opts.locmoe_budget:
                raise SystemExit(f"bench_e2e: {path} holds a run at --locmoe-budget {kept} (None: the default), this "
                                 f"launch asks for {opts.locmoe_budget}: give another --out")
    if int(os.environ.get("RANK", 0)) == 0:
        for *_, variant in variants:
            if all(variant != v[-1] for v in todo):
                print(f"bench_e2e: {variant} on {layout}: {json_path(opts, layout, variant)} exists, skipped",
                      flush=True)
    if not todo:
        return 0
    os.makedirs(opts.out, exist_ok=True)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    accel, dev = _setup(opts)
    if accel.is_cpu and any(v[2] == "distributed" for v in todo):
        raise SystemExit("bench_e2e: --optimizer distributed: megatron-core's distributed optimizer takes device "
                         "(CUDA) parameters only; on CPU use --optimizer replicated")
    if accel.is_cpu and opts.dtype == "bf16" and not opts.systems == ["deepspeed_moe"]:
        raise SystemExit("bench_e2e: --dtype bf16: megatron-core's bf16 optimizer takes device (CUDA) parameters "
                         "only, and --ep-overlap 1f1b needs bf16; on CPU use --dtype fp32 and --ep-overlap off")
    corpus = load_corpus(opts.corpus, seed=opts.seed)
    deepspeed = opts.systems == ["deepspeed_moe"]
    if deepspeed:
        from locmoe_plugin.testing.deepspeed_init import init_deepspeed_distributed

        os.environ.setdefault("DS_ACCELERATOR", accel.device_type)
        init_deepspeed_distributed(accel.backend)
    else:
        dist.init_process_group(backend=accel.backend)
    try:
        bandwidth = measure_bandwidth(opts.gpus_per_node, dev, accel.synchronize, opts.bandwidth_mib)
        if dist.get_rank() == 0:
            from locmoe_plugin.comm.bandwidth import format_bandwidth

            print(format_bandwidth(bandwidth), flush=True)
        if not deepspeed:
            from megatron.core import parallel_state as ps
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            if accel.is_cpu:
                from locmoe_plugin.demo.cpu_shims import install

                install()
            ps.initialize_model_parallel(expert_model_parallel_size=world)
        for name, grad_reduce, optimizer, ep_overlap, variant in todo:  # "deepspeed" for deepspeed_moe
            torch.manual_seed(opts.seed)
            if deepspeed:
                system = DeepSpeedE2E(opts, dev)
            else:
                model_parallel_cuda_manual_seed(opts.seed)
                system = MegatronE2E(name, opts, accel, dev, grad_reduce, optimizer, ep_overlap)
            model_alive = weakref.ref(system.engine if deepspeed else system.model)
            result = run_system(name, system, opts, accel, dev, corpus, bandwidth)
            result.update(variant=variant, grad_reduce=grad_reduce, optimizer=optimizer, ep_overlap=ep_overlap,
                          grad_buffer_dtypes=None if deepspeed else system.grad_buffer_dtypes())
            del system
            result["released"] = _release(model_alive, accel)
            if dist.get_rank() == 0:
                result.update(commit=os.environ.get("LOCMOE_COMMIT", "unknown"),
                              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              device=_device_name(accel), corpus=corpus.source)
                path = json_path(opts, layout, variant)
                with open(path + ".tmp", "w") as f:
                    json.dump(result, f, indent=1)
                os.replace(path + ".tmp", path)  # a run cut short leaves no half-written result
                print(summary_line(result), flush=True)
        if not deepspeed:
            ps.destroy_model_parallel()
    finally:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _device_name(accel) -> str:
    if accel.is_cpu:
        return "cpu"
    return accel.module.get_device_name()


def summary_line(r: dict) -> str:
    t = r["tokens_per_s"]
    return (f"{r['layout']:<10} {r.get('variant', r['system']):<19} {t['median'] / 1e3:8.1f} k tok/s (min {t['min'] / 1e3:.1f}, max "
            f"{t['max'] / 1e3:.1f})  val {r['val_loss']:.3f}  cross-node {r['cross_node_share']:.3f}  "
            f"link wait {r['breakdown_ms']['inter_node_wait_share'] * 100:.0f} %")


if __name__ == "__main__":
    sys.exit(main())
