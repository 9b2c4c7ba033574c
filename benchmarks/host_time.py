"""Host time of one MoE layer's forward + backward where the host bounds it (tiny hidden size): LocMoELayer
against megatron-core's own alltoall MoELayer, built as ``op_count.py --megatron`` builds them, timed in
interleaved rounds, plus a cProfile top list of where LocMoELayer's host time goes; ``--allgather`` adds
megatron-core's allgather layer and LocMoELayer's ``dispatcher="allgather"`` (one node).

On a CPU every op runs on the host, so at hidden 64 the time of a step is its op dispatch and Python work;
on a GPU at such sizes the kernels are shorter than their launches and the step time is again the host's.

  python3 benchmarks/host_time.py [--nproc 4] [--topk 4 2] [--rounds 9] [--iters 10] [--out DIR]
  torchrun --standalone --nproc-per-node 4 benchmarks/host_time.py --dtype bf16 --out DIR   # on GPUs

Without torchrun's environment it spawns ``--nproc`` gloo ranks on the CPU (one node); under torchrun it
runs on the device of :mod:`locmoe_plugin.device` with its backend. Per top-k: both layers run
``--warmup`` steps, then ``--rounds`` rounds in which each layer (order alternating per round) runs one
untimed step and ``--iters`` timed ones; a round's figure is the median step time, the max over ranks (a
collective waits for the slowest rank), and the main thread's CPU time per step (``time.thread_time``:
the host's own work, without the time spent blocked on peers, which on an oversubscribed CPU machine is
most of the wall time), the mean over ranks. Reported: each layer's median over rounds, the median and
quartiles of the per-round ratio LocMoELayer / Megatron for both measures; rank 0's main-thread CPU time
and wall time per part of each layer (router, the six dispatcher phases, experts, forward, backward; the
wall beyond the CPU is where the thread waited); and
(``--profile-steps`` > 0) rank 0's cProfile: LocMoELayer's top functions by own time, locmoe_plugin's own
functions, both layers' own time grouped by where it runs, and the collectives per step. Python's garbage
collector is off while timing (as Megatron-LM's ``--manual-gc``), so its pauses land on neither layer.
``--out DIR`` writes ``host_time.json`` there.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from manual_gc import automatic_collection  # noqa: E402
from op_count import build_megatron_layers  # noqa: E402

NAMES = ("megatron alltoall", "LocMoELayer")  # always timed; --allgather adds the names below
ALLGATHER_NAMES = ("megatron allgather", "LocMoELayer allgather")
#: the ratios reported: (layer, baseline), where both were timed
RATIOS = (("LocMoELayer", "megatron alltoall"), ("LocMoELayer", "megatron allgather"),
          ("LocMoELayer allgather", "megatron allgather"))


def layer_names(a: argparse.Namespace) -> tuple[str, ...]:
    return NAMES + (ALLGATHER_NAMES if a.allgather else ())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=4, help="CPU ranks to spawn (ignored under torchrun)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: all ranks on one node")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=64)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, nargs="+", default=[4, 2])
    p.add_argument("--gate", default="grap")
    p.add_argument("--routing", default="locmoe")
    p.add_argument("--mu", type=float, default=0.01)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profile-steps", type=int, default=20, help="LocMoELayer steps under cProfile (0: none)")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--allgather", action="store_true",
                   help="also time megatron-core's allgather layer and LocMoELayer with dispatcher='allgather' "
                        "(an EP group inside one node)")
    p.add_argument("--out", default=None, help="directory for host_time.json")
    a = p.parse_args(argv)
    a.report_flush = True  # as Megatron-LM with --locmoe (op_count's --report-flush)
    return a


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _reduce_over_ranks(v: float, device, op) -> float:
    t = torch.tensor([v], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.item()


def measure(a: argparse.Namespace, topk: int, rank: int, world: int, acc, device) -> dict:
    """Both layers at ``topk``: per-round ms (max over ranks) and, on rank 0, LocMoELayer's profile."""
    a = argparse.Namespace(**{**vars(a), "topk": topk})
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    layers = build_megatron_layers(a, world, None if acc.is_cpu else device, dtype)
    torch.manual_seed(1 + rank)
    x = torch.randn(a.tokens, 1, a.hidden, device=device, dtype=dtype)

    def stepper(layer):
        def step():
            xi = x.detach().requires_grad_(True)
            y, _ = layer(xi)
            y.float().square().mean().backward()
        return step

    names = layer_names(a)
    steps = {n: stepper(layers[n]) for n in names}

    def timed(step, iters: int) -> tuple[float, float]:
        """Median wall ms and median main-thread CPU ms of ``iters`` steps. On a GPU the CPU figure is the
        time to issue a step, including the driver's spin in the step's own host syncs (the count
        exchange), not the final synchronize."""
        wall, cpu = [], []
        for _ in range(iters):
            dist.barrier()
            acc.synchronize()
            t0, c0 = time.perf_counter(), time.thread_time()
            step()
            cpu.append(time.thread_time() - c0)  # the host's work to issue the step (before the final wait)
            acc.synchronize()
            wall.append(time.perf_counter() - t0)
        return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3

    for n in names:
        timed(steps[n], a.warmup)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    cpu_round: dict[str, list[float]] = {n: [] for n in names}
    with automatic_collection(off=True, collect_first=True):
        for r in range(a.rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                timed(steps[n], 1)
                wall, cpu = timed(steps[n], a.iters)
                per_round[n].append(_reduce_over_ranks(wall, device, dist.ReduceOp.MAX))
                cpu_round[n].append(_reduce_over_ranks(cpu, device, dist.ReduceOp.SUM) / world)
    res = {"topk": topk, "ms_rounds": per_round, "cpu_ms_rounds": cpu_round}
    parts = {n: phase_host_ms(layers[n], steps[n], a.iters * 2) for n in names}
    res["phase_cpu_ms"] = {n: p[0] for n, p in parts.items()}
    res["phase_wall_ms"] = {n: p[1] for n, p in parts.items()}
    if a.profile_steps > 0:
        res["profile_groups"] = {}
        for n in names:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(a.profile_steps):
                steps[n]()
            prof.disable()
            if rank == 0:
                st = pstats.Stats(prof, stream=io.StringIO())
                res["profile_groups"][n] = {k: v * 1e3 / a.profile_steps for k, v in own_time_groups(st).items()}
                res.setdefault("collectives", {})[n] = collective_calls(st, a.profile_steps)
                if n == "LocMoELayer":
                    buf = io.StringIO()
                    st.stream = buf
                    st.sort_stats("tottime").print_stats(a.profile_top)
                    res["profile"] = buf.getvalue()
                    res["profile_locmoe_plugin"] = plugin_top(st, a.profile_top, a.profile_steps)
    return res


PHASES = ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess", "combine_preprocess", "token_combine",
          "combine_postprocess")


def phase_host_ms(layer, step, iters: int) -> tuple[dict[str, float], dict[str, float]]:
    """Main-thread CPU ms and wall ms per step in each part of ``layer``'s forward (router, the six
    dispatcher phases, experts), the whole forward and the backward (the step less its forward), means over
    ``iters`` steps (after one untimed), with no device sync between the steps. Wall less CPU is the time
    the thread was blocked (on a GPU: a host read waiting for the device, unless the driver spins, which
    counts as CPU); on a GPU the backward's wall is the autograd thread's issue time. The wrappers are
    removed afterwards."""
    cpu: dict[str, float] = {}
    wall: dict[str, float] = {}

    def timed(fn, label):
        def run(*args, **kwargs):
            c0, w0 = time.thread_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                cpu[label] = cpu.get(label, 0.0) + time.thread_time() - c0
                wall[label] = wall.get(label, 0.0) + time.perf_counter() - w0
        return run

    td = layer.token_dispatcher
    targets = [(layer, "route", "router"), (layer, "forward", "forward"), (layer.experts, "forward", "experts")]
    targets += [(td, ph, ph) for ph in PHASES]
    for obj, attr, label in targets:
        setattr(obj, attr, timed(getattr(obj, attr), label))
    try:
        step()
        cpu.clear()
        wall.clear()
        c0, w0 = time.thread_time(), time.perf_counter()
        for _ in range(iters):
            step()
        totals = (time.thread_time() - c0, time.perf_counter() - w0)
    finally:
        for obj, attr, _ in targets:
            del obj.__dict__[attr]  # the instance attribute set above; the class's method shows again
    out = []
    for spent, total in zip((cpu, wall), totals):
        ms = {k: v * 1e3 / iters for k, v in spent.items()}
        ms["backward"] = total * 1e3 / iters - ms["forward"]
        out.append(ms)
    return out[0], out[1]


def own_time_groups(st: pstats.Stats) -> dict[str, float]:
    """Seconds of own time (cProfile ``tottime``) by where the function lives: waits on a collective
    (the peers' time, not this rank's work), torch's C functions (op dispatch and the ops themselves),
    the Python of locmoe_plugin, megatron, torch and the rest."""
    groups: dict[str, float] = {}
    for (file, _line, func), (_cc, _nc, tt, _ct, _callers) in st.stats.items():
        if "_distributed_c10d.wait" in func:
            g = "collective waits"
        elif file == "~":
            g = "C functions (torch ops, builtins)"
        elif "locmoe_plugin" in file:
            g = "locmoe_plugin Python"
        elif "megatron" in file:
            g = "megatron Python"
        elif "torch" in file:
            g = "torch Python (autograd, nn, distributed)"
        else:
            g = "other Python"
        groups[g] = groups.get(g, 0.0) + tt
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_to_all_single",
               "all_to_all", "reduce_scatter_tensor", "broadcast", "barrier")


def collective_calls(st: pstats.Stats, steps: int) -> dict[str, float]:
    """torch.distributed collectives per step (calls into ``distributed_c10d``'s public functions)."""
    out = {}
    for (file, _line, func), (_cc, nc, _tt, _ct, _callers) in st.stats.items():
        if file.endswith("distributed_c10d.py") and func in COLLECTIVES:
            out[func] = out.get(func, 0) + nc / steps
    return out


def plugin_top(st: pstats.Stats, top: int, steps: int) -> list[tuple[str, float, float]]:
    """locmoe_plugin's functions by own time: ``(file:line(function), own ms per step, calls per step)``."""
    rows = [(f"{file.split('locmoe_plugin/')[-1]}:{line}({func})", tt * 1e3 / steps, nc / steps)
            for (file, line, func), (_cc, nc, tt, _ct, _callers) in st.stats.items() if "locmoe_plugin" in file]
    return sorted(rows, key=lambda r: -r[1])[:top]


def summary(res: dict) -> dict:
    """Per measure (wall, main-thread CPU): median ms per layer over rounds and the per-round ratio
    LocMoELayer / Megatron alltoall (median, quartiles; ``<what>_ratio``), and every timed pair of
    :data:`RATIOS` as ``<what>_ratios["layer / baseline"] = (median, q1, q3)``."""
    out = {"topk": res["topk"], "rounds": len(res["ms_rounds"]["LocMoELayer"])}
    for key in ("ms_rounds", "cpu_ms_rounds"):
        ms = res[key]
        what = key[: -len("_rounds")]
        out[what] = {n: statistics.median(v) for n, v in ms.items()}
        out[what + "_quartiles"] = {n: _quartiles(v) for n, v in ms.items()}
        out[what + "_ratios"] = {}
        for layer, base in RATIOS:
            if layer in ms and base in ms:
                ratios = [o / m for o, m in zip(ms[layer], ms[base])]
                out[what + "_ratios"][f"{layer} / {base}"] = (statistics.median(ratios), *_quartiles(ratios))
        med, q1, q3 = out[what + "_ratios"]["LocMoELayer / megatron alltoall"]
        out[what + "_ratio"], out[what + "_ratio_quartiles"] = med, (q1, q3)
    return out


def run_rank(a: argparse.Namespace, rank: int, world: int) -> dict | None:
    """Measure on this rank of an initialised process group; rank 0 returns the results."""
    from locmoe_plugin.device import get_accelerator

    acc = get_accelerator()
    device = acc.device(None if acc.is_cpu else int(os.environ.get("LOCAL_RANK", 0)))
    a.gpus_per_node = a.gpus_per_node or world
    results = [measure(a, k, rank, world, acc, device) for k in a.topk]
    if rank == 0:
        out = {"config": {k: v for k, v in vars(a).items() if k not in ("out",)}, "world": world,
               "device": str(device), "commit": os.environ.get("LOCMOE_COMMIT"), "torch": torch.__version__,
               "results": results,
               "summary": [summary(r) for r in results]}
        return out
    return None


def _spawned(rank: int, world: int, a: argparse.Namespace) -> dict | None:
    """One CPU rank (:func:`locmoe_plugin.testing.run_ranks`)."""
    torch.set_num_threads(1)  # several ranks share the cores
    return run_rank(a, rank, world)


def report(a: argparse.Namespace, out: dict) -> None:
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "host_time.json"), "w") as f:
            json.dump(out, f, indent=1)
    for r in out["results"]:
        for key, what in (("phase_cpu_ms", "main-thread CPU ms"), ("phase_wall_ms", "wall ms (CPU and waits)")):
            ph = r[key]
            names = list(ph)
            print(f"== top-{r['topk']}: {what} per step by part, rank 0")
            print(f"     {'':22s} " + " ".join(f"{n:>22s}" for n in names))
            for label in ("router", *PHASES, "experts", "forward", "backward"):
                print(f"     {label:22s} " + " ".join(f"{ph[n].get(label, 0.0):22.3f}" for n in names))
        if "profile" not in r:
            continue
        print(f"== cProfile of LocMoELayer, top-{r['topk']}, {a.profile_steps} fwd+bwd steps, rank 0")
        print(r["profile"])
        print("   locmoe_plugin functions by own time (ms per step under cProfile, calls per step):")
        for name, ms, calls in r["profile_locmoe_plugin"]:
            print(f"     {name:70s} {ms:6.3f} {calls:5.0f}")
        print("   own time by where it runs (ms per step under cProfile):")
        groups = r["profile_groups"]
        print(f"     {'':45s} " + " ".join(f"{n:>22s}" for n in groups))
        for g in groups["LocMoELayer"]:
            print(f"     {g:45s} " + " ".join(f"{groups[n].get(g, 0.0):22.2f}" for n in groups))
        print("   collectives per step: " + "; ".join(
            f"{n}: " + ", ".join(f"{k} {v:g}" for k, v in sorted(c.items())) for n, c in r["collectives"].items()))
    print(f"{out['world']} ranks ({out['device']}), {a.tokens} tokens/rank, hidden {a.hidden}, ffn {a.ffn}, "
          f"{a.experts} experts, gate {a.gate}, routing {a.routing}, {a.dtype}; {a.rounds} interleaved rounds "
          f"x {a.iters} steps of forward + backward")
    print("  wall: median over rounds of each round's median step, max over ranks; CPU: the main thread's CPU "
          "time per step (no waiting), mean over ranks; [quartiles over rounds]; ratios: median of per-round "
          "ratios [quartiles]")
    for s in out["summary"]:
        for what in ("ms", "cpu_ms"):
            label = "wall" if what == "ms" else "CPU"
            layers = "; ".join(f"{n} {v:.2f} [{s[what + '_quartiles'][n][0]:.2f}-{s[what + '_quartiles'][n][1]:.2f}]"
                               for n, v in s[what].items())
            print(f"  top-{s['topk']} {label:>4s} ms: {layers}")
            for pair, (med, q1, q3) in s[what + "_ratios"].items():
                print(f"  top-{s['topk']} {label:>4s} ratio {pair}: {med:.3f} [{q1:.3f}-{q3:.3f}]")


def main(argv: list[str] | None = None) -> dict | None:
    a = parse_args(argv)
    if "RANK" in os.environ:  # torchrun: this process is one rank
        from locmoe_plugin.device import get_accelerator

        acc = get_accelerator()
        if not acc.is_cpu:
            acc.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(acc.backend)
        if not acc.is_cpu:
            from megatron.core import parallel_state
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            parallel_state.initialize_model_parallel(expert_model_parallel_size=dist.get_world_size())
            model_parallel_cuda_manual_seed(0)
        out = run_rank(a, dist.get_rank(), dist.get_world_size())
        if out is not None:
            report(a, out)
        dist.barrier()
        dist.destroy_process_group()
        return out
    from locmoe_plugin.testing import run_ranks, values

    out = values(run_ranks(_spawned, a.nproc, a, timeout=1800))[0]
    report(a, out)
    return out


if __name__ == "__main__":
    main()
