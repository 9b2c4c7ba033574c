"""What every part of the MoE-layer benchmark shares: the run context (process groups, device, logging),
the timer, and how a Megatron MoE layer is built (Megatron's own router or LocMoE's)."""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from link_probe import all_max  # noqa: E402
from locmoe_plugin.comm.bandwidth import node_and_rail_groups  # noqa: E402
from locmoe_plugin.device import get_accelerator  # noqa: E402


# ------------------------------------------------------------------------------------------ helpers
class Ctx:
    def __init__(self, args):
        self.args = args
        self.acc = get_accelerator()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if not self.acc.is_cpu:
            self.acc.set_device(self.local_rank)
        dist.init_process_group(backend=self.acc.backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dev = self.acc.device(None if self.acc.is_cpu else self.local_rank)
        self.gpn = args.gpus_per_node or self.world
        self.current = None  # the system being built (run_systems)
        self.deferred = {}  # system -> fwd+bwd step, timed in rounds when --rounds > 1
        self.host_calls: list[tuple[float, float]] = []  # (forward s, backward s) per step, see host_calls_of
        self.last_host_ms: tuple[float, float] | None = None  # time_it's host split of the steps it timed
        if self.world % self.gpn:
            raise SystemExit(f"world {self.world} is not divisible by --gpus-per-node {self.gpn}")
        self.nodes = self.world // self.gpn
        self.node = self.rank // self.gpn
        self.dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        self.node_group, self.rail_group = node_and_rail_groups(self.gpn)  # every rank creates every group
        self.expert_node = torch.arange(args.experts, device=self.dev) // (args.experts // self.world) // self.gpn

    def sync(self):
        self.acc.synchronize()

    def allmax(self, v: float) -> float:
        return all_max(v, self.dev)

    def allsum(self, values) -> list[float]:
        t = torch.tensor([float(v) for v in values], device=self.dev, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def log(self, *a):
        if self.rank == 0:
            print(*a, flush=True)


def time_it(ctx: Ctx, step, warmup: int, iters: int) -> float:
    """Median ms of ``step()`` over ``iters`` after ``warmup``, max over ranks. Where ``step`` records its
    calls' host time (:func:`host_calls_of`), ``ctx.last_host_ms`` is set to the medians over the timed
    steps of its forward and backward calls, in ms, each the max over ranks; else to None."""
    samples = []
    ctx.host_calls.clear()
    for it in range(warmup + iters):
        dist.barrier()
        ctx.sync()
        t0 = time.perf_counter()
        step()
        ctx.sync()
        if it >= warmup:
            samples.append(time.perf_counter() - t0)
        else:
            ctx.host_calls.clear()
    ctx.last_host_ms = None
    if ctx.host_calls:  # the same step on every rank, so every rank takes this branch
        ctx.last_host_ms = tuple(ctx.allmax(statistics.median(c[i] for c in ctx.host_calls) * 1e3) for i in (0, 1))
    return ctx.allmax(statistics.median(samples) * 1e3)


def host_calls_of(ctx: Ctx, forward, backward):
    """A fwd+bwd step that records how long its ``forward()`` and ``backward(out)`` calls take on the host
    (``time.perf_counter`` around each call, no device sync between them). On a GPU the kernels run
    asynchronously, so a call's time is the host's work to issue its kernels plus any host wait inside it
    (a dispatcher's count read in the forward); backward's is the autograd thread's issue time (the caller
    blocks until the engine has run every node). The step's wall time less both is the tail the device
    still needs after the host is done."""

    def step():
        t0 = time.perf_counter()
        out = forward()
        t1 = time.perf_counter()
        backward(out)
        ctx.host_calls.append((t1 - t0, time.perf_counter() - t1))

    return step


def megatron_config(ctx: Ctx, dispatcher: str, dtype, group_limited: bool = False):
    from megatron.core.transformer import TransformerConfig

    a = ctx.args
    kw = dict(
        num_layers=1, hidden_size=a.hidden, num_attention_heads=16, num_moe_experts=a.experts,
        moe_router_topk=a.topk, moe_token_dispatcher_type=dispatcher, expert_model_parallel_size=ctx.world,
        expert_tensor_parallel_size=1, ffn_hidden_size=a.ffn, moe_ffn_hidden_size=a.ffn, add_bias_linear=False,
        moe_aux_loss_coeff=a.aux_coeff, moe_router_load_balancing_type="aux_loss", moe_permute_fusion=False,
        moe_grouped_gemm=False, bf16=dtype == torch.bfloat16, params_dtype=dtype,
        use_cpu_initialization=ctx.acc.is_cpu,
    )
    if group_limited:
        kw.update(moe_router_num_groups=ctx.nodes, moe_router_group_topk=1)
    return TransformerConfig(**kw)


def build_megatron_layer(ctx: Ctx, dispatcher: str, dtype, locmoe: dict | None = None, group_limited=False,
                         locmoe_dispatcher="hierarchical", grouped_experts=False):
    """MoELayer (``locmoe=None``: TopKRouter, Megatron's ``dispatcher``) or LocMoELayer (LocMoE router, the
    LocMoE dispatcher as ``locmoe_dispatcher``: a mode string or a ``DispatcherSettings``, e.g. with the overlap);
    experts: megatron-core's ``SequentialMLP``, or with ``grouped_experts`` LocMoE's ``LocMoEGroupedMLP`` (the
    same parameters, two grouped GEMMs)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.spec_utils import ModuleSpec

    from locmoe_plugin.megatron.dispatcher import make_locmoe_layer_class
    from locmoe_plugin.megatron.enable import enable_metrics_report
    from locmoe_plugin.megatron.router import LocMoEMegatronRouter

    enable_metrics_report()  # as Megatron-LM with --locmoe: router losses summed for the report (idempotent)

    cfg = megatron_config(ctx, dispatcher, dtype, group_limited)
    experts = ModuleSpec(module=SequentialMLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                         linear_fc2=RowParallelLinear))
    if locmoe is None:
        cls, router = MoELayer, TopKRouter
    else:
        cls = make_locmoe_layer_class()
        router = functools.partial(LocMoEMegatronRouter, locmoe=locmoe, dispatcher=locmoe_dispatcher,
                                   with_locmoe_dispatcher=True)
    submodules = MoESubmodules(experts=experts, router=router)
    if grouped_experts:
        from locmoe_plugin.megatron.grouped_mlp import with_grouped_experts

        submodules = with_grouped_experts(submodules)
    layer = cls(cfg, submodules=submodules, layer_number=1,
                pg_collection=moe_utils.get_default_pg_collection())
    layer.set_layer_number(1)
    return layer.to(ctx.dev)

