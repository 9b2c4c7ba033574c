"""Where a LocMoE MoE layer's forward + backward spends its time, next to megatron-core's own alltoall
MoELayer, on CUDA: device-to-host syncs (``torch.cuda.set_sync_debug_mode("warn")``, each call site),
then a ``torch.profiler`` trace of a few iterations (wall time per iteration, GPU kernel time and count,
host time, the top kernels and the top host-side ops).

  torchrun --standalone --nproc-per-node 4 benchmarks/profile_layer.py [--gpus-per-node 2] [--profile-dir D]
      [--systems "megatron alltoall" locmoe "megatron allgather" "locmoe allgather"]

The ``allgather`` pair (Megatron's allgather dispatcher, LocMoE's ``dispatcher="allgather"``) needs an EP
group inside one node. A system named twice is built once and profiled at each place it is named (its
second trace is ``NAME_2.json``): profiling A B A B shows which differences follow the layer and which the
place in the run.

A sync stalls the host until the GPU queue drains, so kernels queued after it cannot overlap the host's
Python work (Megatron's alltoall dispatcher needs one, for the split sizes; so does LocMoE's plan).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: the layers --systems picks from (the allgather pair needs an EP group inside one node)
SYSTEMS = ("megatron alltoall", "locmoe", "megatron allgather", "locmoe allgather")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--profile-dir", default=None, help="write a Chrome trace per layer (rank 0)")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--with-stack", action="store_true", help="record Python frames in the trace (slower host)")
    p.add_argument("--systems", nargs="+", default=["megatron alltoall", "locmoe"], choices=SYSTEMS)
    a = p.parse_args()
    from locmoe_plugin.device import get_accelerator

    acc = get_accelerator()
    acc.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(acc.backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
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

    ps.initialize_model_parallel(expert_model_parallel_size=world)
    model_parallel_cuda_manual_seed(0)
    def config(dispatcher):
        return TransformerConfig(num_layers=1, hidden_size=a.hidden, num_attention_heads=8,
                                 num_moe_experts=a.experts, moe_router_topk=a.topk,
                                 moe_token_dispatcher_type=dispatcher, expert_model_parallel_size=world,
                                 moe_aux_loss_coeff=0.01, add_bias_linear=False, ffn_hidden_size=a.ffn,
                                 moe_ffn_hidden_size=a.ffn, bf16=True, params_dtype=torch.bfloat16,
                                 moe_router_load_balancing_type="aux_loss")

    experts = ModuleSpec(module=SequentialMLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                       linear_fc2=RowParallelLinear))
    pgc = moe_utils.get_default_pg_collection()

    def build(name):
        if name.startswith("megatron"):
            return MoELayer(config(name.split()[1]), submodules=MoESubmodules(experts=experts, router=TopKRouter),
                            layer_number=1, pg_collection=pgc)
        router = functools.partial(LocMoEMegatronRouter, locmoe={"gpus_per_node": a.gpus_per_node or world},
                                   dispatcher="allgather" if name.endswith("allgather") else "hierarchical",
                                   with_locmoe_dispatcher=True)
        return make_locmoe_layer_class()(config("alltoall"), submodules=MoESubmodules(experts=experts, router=router),
                                         layer_number=1, pg_collection=pgc)

    dev = acc.device(acc.current_device())
    layers = {name: build(name).to(dev) for name in dict.fromkeys(a.systems)}
    x = torch.randn(a.tokens, 1, a.hidden, device=dev, dtype=torch.bfloat16)
    seen: collections.Counter = collections.Counter()
    for name in a.systems:
        layer = layers[name]
        seen[name] += 1
        layer.set_layer_number(1)
        for _ in range(2):  # warm-up: lazy inits and caches
            y, _ = layer(x.clone().requires_grad_())
            y.float().sum().backward()
        acc.synchronize()
        sites: collections.Counter = collections.Counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            y, _ = layer(x.clone().requires_grad_())
            y.float().sum().backward()
            torch.cuda.set_sync_debug_mode("default")
        for w in caught:
            if "synchroniz" not in str(w.message):
                continue
            sites[f"{os.path.relpath(w.filename)}:{w.lineno}"] += 1
        if rank == 0:
            print(f"== {name}: {sum(sites.values())} device-to-host syncs in one forward + backward")
            for site, n in sites.most_common():
                print(f"   {n} x {site}")
        profile_layer(name if seen[name] == 1 else f"{name}_{seen[name]}", layer, x, a, acc, rank)
    dist.barrier()
    dist.destroy_process_group()


def profile_layer(name, layer, x, a, acc, rank) -> None:
    import time

    from torch.profiler import ProfilerActivity, profile

    from torch.profiler import record_function

    def step():
        y, _ = layer(x.clone().requires_grad_())
        with record_function("phase:backward"):
            y.float().sum().backward()

    walls = []
    for _ in range(a.iters):
        acc.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        step()
        acc.synchronize()
        walls.append(time.perf_counter() - t0)
    undo = _label_phases(layer)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=a.with_stack) as prof:
        for _ in range(a.iters):
            step()
        acc.synchronize()
    undo()
    if rank != 0:
        return
    phases = collections.Counter()
    for e in prof.events():
        if e.name.startswith("phase:"):
            phases[e.name[6:]] += e.cpu_time_total / a.iters / 1e3
    print("   host time per phase (ms per iteration, under the profiler; forward phases, then the whole backward):")
    for k, v in phases.items():
        print(f"     {v:7.3f}  {k}")
    ev = prof.key_averages()
    kernels = [e for e in ev if e.device_type.name == "CUDA"]
    gpu_us = sum(e.self_device_time_total for e in kernels) / a.iters
    n_kernels = sum(e.count for e in kernels) / a.iters
    cpu_ops = [e for e in ev if e.device_type.name == "CPU" and e.key.startswith(("aten::", "c10d::", "nccl"))]
    walls.sort()
    print(f"   wall {walls[len(walls) // 2] * 1e3:.2f} ms / iteration (median of {a.iters}); GPU kernels "
          f"{gpu_us / 1e3:.2f} ms in {n_kernels:.0f} launches; aten ops {sum(e.count for e in cpu_ops) / a.iters:.0f}")
    print("   top kernels (ms per iteration, launches):")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]:
        print(f"     {e.self_device_time_total / a.iters / 1e3:7.3f} {e.count / a.iters:5.0f}  {e.key[:90]}")
    print("   top host ops (self CPU ms per iteration, calls):")
    for e in sorted(cpu_ops, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"     {e.self_cpu_time_total / a.iters / 1e3:7.3f} {e.count / a.iters:5.0f}  {e.key[:90]}")
    if a.profile_dir:
        os.makedirs(a.profile_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(a.profile_dir, name.replace(" ", "_") + ".json"))


def _label_phases(layer):
    """Wrap the router, the experts, the six dispatcher phases and (LocMoE) the plan's count exchange
    in profiler ranges; returns a function that takes the wrappers off."""
    from torch.profiler import record_function

    from locmoe_plugin.comm.counts import RoutingCounts

    def labelled(fn, label):
        def run(*args, **kwargs):
            with record_function("phase:" + label):
                return fn(*args, **kwargs)
        return run

    undo = []

    def wrap(obj, attr, label):
        had = attr in vars(obj)
        old = getattr(obj, attr)
        setattr(obj, attr, labelled(old, label))
        undo.append(lambda: setattr(obj, attr, old) if had else delattr(obj, attr))

    wrap(layer, "route", "router")  # MoELayer.route calls router.forward; LocMoELayer.route route_indices
    wrap(layer.experts, "forward", "experts")
    for ph in ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess", "combine_preprocess",
               "token_combine", "combine_postprocess"):
        wrap(layer.token_dispatcher, ph, ph)
    # the plan's count exchange: started on the device in dispatch_preprocess, its one host wait later
    wrap(RoutingCounts, "wait_host", "  plan: count exchange host sync")
    return lambda: [u() for u in reversed(undo)]


if __name__ == "__main__":
    main()
