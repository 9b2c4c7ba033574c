"""Host-side op count of one LocMoE MoE layer step, per phase (router, plan, send, experts, reduce and
their backward): how many aten ops (on a GPU, roughly the kernel launches) each phase issues.

On one node the layer is bound by these launches, not by bytes (``RESULTS.md``, "a profile"), so this is
the number to drive down. It runs on CPU (gloo) on any machine:

  python3 benchmarks/op_count.py [--nproc 4] [--gpus-per-node 4] [--experts 32 --topk 4 --tokens 512] [--megatron]

"core" is the framework-free router + TokenDispatcher with toy experts, its plan built as ``--mode`` names
it (``exact_tree=True``: on one node ``hierarchical`` counts the two-stage plan, which the dispatcher
itself replaces there by ``flat_fast``; pass ``--mode flat_fast`` for what a one-node layer runs);
``--megatron`` adds the two full megatron-core layers (labels: the router, the experts and the six
dispatcher phases), which use the dispatcher's default plan; ``--allgather`` with it adds megatron-core's
allgather layer and ``LocMoELayer`` with ``dispatcher="allgather"`` (one node only).

Counts are top-level aten ops (an op called inside another op is not counted again), from
``torch.profiler`` on rank 0, for one forward + backward after a warm-up step.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PHASES = ("router", "prepare", "send", "experts", "combine")
# ops that only make views or allocate (no kernel on a GPU)
NO_KERNEL = {
    "aten::" + n
    for n in ("view", "reshape", "_reshape_alias", "slice", "select", "t", "transpose", "unsqueeze", "squeeze",
              "expand", "as_strided", "detach", "alias", "resolve_conj", "resolve_neg", "empty", "empty_like",
              "new_empty", "empty_strided", "narrow", "split", "split_with_sizes", "permute", "lift_fresh",
              "_unsafe_view", "numpy_T", "unbind", "chunk", "to", "_to_copy_noop", "result_type", "is_nonzero",
              "item", "_local_scalar_dense", "lift_fresh_copy", "scalar_tensor")
}


def _worker(rank: int, world: int, a: argparse.Namespace) -> dict | None:
    """One gloo rank (:func:`locmoe_plugin.testing.run_ranks`); rank 0 returns the counts."""
    from torch.profiler import record_function

    from locmoe_plugin.comm import TokenDispatcher, build_comm_groups
    from locmoe_plugin.config import LocMoEConfig
    from locmoe_plugin.router import LocMoERouter
    from locmoe_plugin.topology import Topology

    torch.manual_seed(0)
    topo = Topology.from_ranks_per_node(world, a.gpus_per_node, a.experts, rank)
    cfg = LocMoEConfig(num_experts=a.experts, hidden_size=a.hidden, topk=a.topk, gate=a.gate, routing=a.routing,
                       capacity=a.capacity, locality_loss_coeff=a.mu, aux_loss_coeff=0.01)
    router = LocMoERouter(cfg, topo, group=dist.group.WORLD)
    disp = TokenDispatcher(build_comm_groups(topo, dist.group.WORLD), a.mode, exact_tree=True)  # the plan as named
    e_r = a.experts // world
    # one weight pair per local expert, as megatron-core's SequentialMLP
    w1 = [torch.nn.Parameter(torch.randn(a.hidden, a.ffn) * 0.02) for _ in range(e_r)]
    w2 = [torch.nn.Parameter(torch.randn(a.ffn, a.hidden) * 0.02) for _ in range(e_r)]

    def experts(inp, tpe):
        outs = [torch.nn.functional.gelu(x @ w1[e]) @ w2[e] for e, x in enumerate(inp.split(list(tpe)))]
        return torch.cat(outs)

    x = torch.randn(a.tokens, a.hidden, requires_grad=True)

    def step():
        with record_function("phase:router"):
            out = router(x)
        a_ = out.assignment
        with record_function("phase:prepare"):
            plan = disp.prepare(a_.expert_ids, a_.weights)
        with record_function("phase:send"):
            inp, handle = disp.dispatch(x, a_.expert_ids, a_.weights, plan)
        with record_function("phase:experts"):
            y = experts(inp, handle.tokens_per_expert)
        with record_function("phase:combine"):
            z = disp.combine(y, handle)
        (z.square().mean() + out.total_loss).backward()

    counted = {"core": _count(step)}
    if a.megatron:
        counted.update(_megatron_layers(a, rank, world))
    return counted if rank == 0 else None


def _count(step) -> tuple[dict, dict, dict]:
    """Run ``step`` once (warm-up), then once under the profiler: ops and kernels per phase label."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts: dict[str, int] = collections.Counter()
    kernels: dict[str, int] = collections.Counter()
    knames: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    events = [ev for ev in prof.events() if ev.name.startswith("aten::")]
    # a parent whose work is done by a child op (e.g. matmul -> mm) is not counted itself
    has_child = {id(ev.cpu_parent) for ev in events if ev.cpu_parent is not None and ev.name not in NO_KERNEL}
    for ev in events:
        label = "other"
        p = ev.cpu_parent
        while p is not None:
            if p.name.startswith("phase:"):
                label = p.name[6:]
                break
            if p.name.startswith("autograd::engine::evaluate_function: "):
                label = "bwd " + p.name.split(": ", 1)[1]
                break
            p = p.cpu_parent
        if id(ev) not in has_child and ev.name not in NO_KERNEL:
            kernels[label] += 1  # an op that does work itself: about one kernel launch on a GPU
            knames[label][ev.name] += 1
        par = ev.cpu_parent
        if par is not None and par.name.startswith("aten::"):
            continue  # nested in another aten op
        counts[label] += 1
    return dict(counts), dict(kernels), {k: dict(v) for k, v in knames.items()}


def build_megatron_layers(a: argparse.Namespace, world: int, device: torch.device | None = None,
                          dtype: torch.dtype = torch.float32) -> dict:
    """``{"megatron alltoall": MoELayer (TopKRouter + alltoall dispatcher), "LocMoELayer": ...}`` at the same
    config (``a``: hidden, ffn, experts, topk, gate, routing, mu, gpus_per_node, report_flush, allgather), EP =
    ``world`` over the default process group; ``a.allgather`` adds ``"megatron allgather"`` and
    ``"LocMoELayer allgather"``. On a CPU (``device`` None or CPU) megatron-core's CUDA calls are shimmed
    (:mod:`locmoe_plugin.demo.cpu_shims`); elsewhere the layers are moved to ``device``."""
    import functools

    from megatron.core import parallel_state

    on_cpu = device is None or device.type == "cpu"
    if on_cpu:
        from locmoe_plugin.demo import cpu_shims

        cpu_shims.install()
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.spec_utils import ModuleSpec

    from locmoe_plugin.megatron.dispatcher import make_locmoe_layer_class
    from locmoe_plugin.megatron.router import LocMoEMegatronRouter

    if a.report_flush:  # as Megatron-LM with --locmoe: the routers' losses are recorded at the report
        from locmoe_plugin.megatron.enable import enable_metrics_report

        enable_metrics_report()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
    cfg = TransformerConfig(num_layers=1, hidden_size=a.hidden, num_attention_heads=4, num_moe_experts=a.experts,
                            moe_router_topk=a.topk, moe_token_dispatcher_type="alltoall",
                            expert_model_parallel_size=world, use_cpu_initialization=on_cpu, moe_aux_loss_coeff=0.01,
                            add_bias_linear=False, ffn_hidden_size=a.ffn, moe_ffn_hidden_size=a.ffn,
                            moe_router_load_balancing_type="aux_loss", params_dtype=dtype,
                            bf16=dtype == torch.bfloat16)
    experts = ModuleSpec(module=SequentialMLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                       linear_fc2=RowParallelLinear))
    pgc = moe_utils.get_default_pg_collection()
    router = functools.partial(LocMoEMegatronRouter, with_locmoe_dispatcher=True,
                               locmoe={"gpus_per_node": a.gpus_per_node, "gate": a.gate, "routing": a.routing,
                                       "locality_loss_coeff": a.mu})
    layers = {
        "megatron alltoall": MoELayer(cfg, submodules=MoESubmodules(experts=experts, router=TopKRouter),
                                      layer_number=1, pg_collection=pgc),
        "LocMoELayer": make_locmoe_layer_class()(cfg, submodules=MoESubmodules(experts=experts, router=router),
                                                 layer_number=1, pg_collection=pgc),
    }
    if getattr(a, "allgather", False):
        import dataclasses

        gather_cfg = dataclasses.replace(cfg, moe_token_dispatcher_type="allgather")
        gather_router = functools.partial(router, dispatcher="allgather")
        layers["megatron allgather"] = MoELayer(gather_cfg, submodules=MoESubmodules(experts=experts, router=TopKRouter),
                                                layer_number=1, pg_collection=pgc)
        layers["LocMoELayer allgather"] = make_locmoe_layer_class()(
            cfg, submodules=MoESubmodules(experts=experts, router=gather_router), layer_number=1, pg_collection=pgc)
    if getattr(a, "grouped_experts", False):
        from locmoe_plugin.megatron.grouped_mlp import with_grouped_experts

        layers["LocMoELayer grouped experts"] = make_locmoe_layer_class()(
            cfg, submodules=with_grouped_experts(MoESubmodules(experts=experts, router=router)), layer_number=1,
            pg_collection=pgc)
    for layer in layers.values():
        layer.set_layer_number(1)
        if not on_cpu:
            layer.to(device)
    return layers


def _megatron_layers(a: argparse.Namespace, rank: int, world: int) -> dict:
    """megatron-core's MoELayer (TopKRouter + alltoall dispatcher) and LocMoELayer at the same config."""
    from torch.profiler import record_function

    layers = build_megatron_layers(a, world)
    out = {}
    torch.manual_seed(1 + rank)
    x = torch.randn(a.tokens, 1, a.hidden)

    def labelled(fn, label):
        def run(*args, **kwargs):
            with record_function("phase:" + label):
                return fn(*args, **kwargs)
        return run

    for name, layer in layers.items():
        layer.route = labelled(layer.route, "router")  # MoELayer.route: router.forward; LocMoELayer: route_indices
        layer.experts.forward = labelled(layer.experts.forward, "experts")
        td = layer.token_dispatcher
        for ph in ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess", "combine_preprocess",
                   "token_combine", "combine_postprocess"):
            setattr(td, ph, labelled(getattr(td, ph), ph))

        def step(layer=layer):
            xi = x.clone().requires_grad_(True)
            y, _ = layer(xi)
            y.square().mean().backward()

        out[name] = _count(step)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: nproc (one node)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=64)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--gate", default="grap")
    p.add_argument("--routing", default="locmoe")
    p.add_argument("--capacity", default=None)
    p.add_argument("--mu", type=float, default=0.01)
    p.add_argument("--mode", default="hierarchical")
    p.add_argument("--megatron", action="store_true",
                   help="also count megatron-core's MoELayer (TopKRouter + alltoall) and LocMoELayer")
    p.add_argument("--allgather", action="store_true",
                   help="with --megatron: also count megatron-core's allgather layer and LocMoELayer with "
                        "dispatcher='allgather' (one node)")
    p.add_argument("--grouped-experts", action="store_true",
                   help="with --megatron: also count LocMoELayer with LocMoEGroupedMLP experts (two grouped GEMMs "
                        "instead of SequentialMLP's loop over experts)")
    p.add_argument("--detail", action="store_true", help="list the kernels of each phase")
    p.add_argument("--report-flush", action="store_true",
                   help="with --megatron: apply enable()'s metrics-report patch (as Megatron-LM with --locmoe), "
                        "so the LocMoE router sums its loss values for the report instead of logging each")
    a = p.parse_args(argv)
    a.gpus_per_node = a.gpus_per_node or a.nproc
    return a


def count(a: argparse.Namespace) -> dict:
    """Spawn ``a.nproc`` gloo ranks and return rank 0's ``{layer: (ops, kernels, kernel names)}`` per phase."""
    from locmoe_plugin.testing import run_ranks, values

    return values(run_ranks(_worker, a.nproc, a, timeout=600))[0]


def comparison(counted: dict, ours_name: str = "LocMoELayer", theirs_name: str = "megatron alltoall") -> str | None:
    """One line: a LocMoELayer's kernels and router ops against a Megatron layer's (None without them)."""
    if ours_name not in counted or theirs_name not in counted:
        return None
    ours, theirs = counted[ours_name], counted[theirs_name]
    k_ours, k_theirs = sum(ours[1].values()), sum(theirs[1].values())
    return (f"{ours_name} {k_ours} kernels vs {theirs_name} {k_theirs} ({k_ours - k_theirs:+d}); "
            f"routers: {ours[0].get('router', 0)} ops / {ours[1].get('router', 0)} kernels vs "
            f"{theirs[0].get('router', 0)} / {theirs[1].get('router', 0)}")


def main() -> None:
    a = parse_args()
    counted = count(a)
    print(f"{a.nproc} ranks = {a.nproc // a.gpus_per_node} node(s) x {a.gpus_per_node}, {a.tokens} tokens/rank, "
          f"{a.experts} experts, top-{a.topk}, gate {a.gate}, routing {a.routing}, capacity {a.capacity}, "
          f"mode {a.mode}")
    for what, (counts, kernels, names) in counted.items():
        print(f"== {what}")
        print(f"  {'phase':40s} {'ops':>5s} {'kernels':>8s}")
        for label, c in sorted(counts.items(), key=lambda kv: -kernels.get(kv[0], 0)):
            print(f"  {label:40s} {c:5d} {kernels.get(label, 0):8d}")
            if a.detail:
                for n, m in sorted(names.get(label, {}).items(), key=lambda kv: -kv[1]):
                    print(f"      {n:36s} {m:4d}")
        print(f"  {'total':40s} {sum(counts.values()):5d} {sum(kernels.values()):8d}")
    print("ops: top-level aten ops; kernels: aten ops that compute or copy, without such an op inside "
          "(views and allocations left out)")
    for line in (comparison(counted), comparison(counted, "LocMoELayer allgather", "megatron allgather"),
                 comparison(counted, "LocMoELayer grouped experts")):
        if line:
            print(line)


if __name__ == "__main__":
    main()
