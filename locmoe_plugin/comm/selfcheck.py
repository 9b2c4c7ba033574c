"""``locmoe check-comm``: hierarchical vs flat dispatch+combine on this machine or cluster.

Routes random tokens with a seeded generator, runs both modes and the overlapped hierarchical path
(``overlap=True``: split by origin, the inter-node transfer asynchronous; on one node the same as
hierarchical) forward and backward through a small deterministic expert function, and reports the
largest absolute difference of outputs, input gradients and combine-weight gradients against the
hierarchical mode (must be exactly 0 in fp32), bytes that cross nodes in each, and the median time of
each. Exit status 1 on any mismatch.

With ``--dispatch-format fp8`` (or ``int8``) the hierarchical, flat and overlapped modes send their rows
encoded (:mod:`.row_codec`) and a fourth run is the native hierarchical mode on the decoded tokens and output
gradient (``decode(encode(x))``): the codec's runs must equal it bit for bit too, which checks the encoding,
the transfer of one-byte rows and the decoding on this machine's devices and collectives. On one node the
format is a no-op (rows stay native inside a node), so there the fourth run takes the raw rows.

Run it standalone (``--nproc P`` spawns P local processes) or under a launcher that sets RANK /
WORLD_SIZE / LOCAL_RANK (torchrun, ``launch/emulate_nodes.sh``); then ``--nproc`` is ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from ..device import backend_for, device_type_for_backend, get_accelerator
from .launch import accelerator_for, add_launch_arguments, init_process_group, launched, set_spawned_rank, spawn_local
from .row_codec import DISPATCH_FORMATS, row_codec


SYSTEMS = ("hierarchical", "flat", "overlap")
#: the runs with a dispatch format: the last is the native hierarchical mode on decoded inputs
CODEC_SYSTEMS = ("hierarchical", "flat", "overlap", "native_decoded")


def systems_for(dispatch_format: str) -> tuple[str, ...]:
    return SYSTEMS if dispatch_format == "native" else CODEC_SYSTEMS


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_launch_arguments(p, gpus_per_node_default="2")
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=5, help="timed iterations per mode (after 1 warm-up)")
    p.add_argument("--dispatch-format", choices=DISPATCH_FORMATS, default="native",
                   help="rows in the dispatch direction: native, or fp8 / int8 codes with an fp32 scale per 128 "
                        "features, checked against the native plan on the decoded rows (default native)")


def _expert(inp: torch.Tensor, tpe, first: int, W: torch.Tensor) -> torch.Tensor:
    outs, start = [], 0
    for le, c in enumerate(tpe):
        outs.append(torch.tanh(inp[start : start + c] @ W[first + le]))
        start += c
    return torch.cat(outs) if outs else inp[:0]


def _check_worker(args: argparse.Namespace, result_path: str | None) -> int:
    from ..topology import Topology
    from .dispatcher import TokenDispatcher
    from .groups import build_comm_groups

    rank, world = dist.get_rank(), dist.get_world_size()
    acc = accelerator_for(args.backend)
    dev = acc.device(int(os.environ.get("LOCAL_RANK", 0)) if not acc.is_cpu else None)
    topo = Topology.from_ranks_per_node(world, args.gpus_per_node, args.experts, ep_rank=rank)
    groups = build_comm_groups(topo, dist.group.WORLD)

    g = torch.Generator().manual_seed(args.seed * 1000 + rank)
    s, d, e, k = args.tokens, args.hidden, args.experts, args.topk
    x = torch.randn(s, d, generator=g).to(dev)
    ids = torch.rand(s, e, generator=g).argsort(-1)[:, :k]  # uniform random distinct experts
    drop = torch.rand(s, k, generator=g) < 0.1  # some slots dropped, as capacity would
    ids = torch.where(drop, -1, ids).to(dev)
    w = torch.where(drop, 0.0, torch.rand(s, k, generator=g)).to(dev)
    W = (torch.randn(e, d, d, generator=torch.Generator().manual_seed(args.seed)) / d**0.5).to(dev)
    cot = torch.randn(s, d, generator=g).to(dev)  # fixed upstream gradient
    fmt = getattr(args, "dispatch_format", "native")
    codec = row_codec(fmt)
    systems = systems_for(fmt)

    results, times, traffic = {}, {}, {}
    format_active = False  # whether the codec's runs encode (the dispatcher sends rows native on one node)
    for mode in systems:
        # the two-stage plan even on one node
        disp = TokenDispatcher(groups, "hierarchical" if mode in ("overlap", "native_decoded") else mode,
                               exact_tree=True, overlap=mode == "overlap",
                               dispatch_format="native" if mode == "native_decoded" else fmt)
        format_active |= disp.codec is not None
        decoded = mode == "native_decoded" and format_active
        x_in = codec.decode(codec.encode(x), d, x.dtype) if decoded else x
        cot_in = codec.decode(codec.encode(cot), d, cot.dtype) if decoded else cot
        samples = []
        for it in range(args.iters + 1):
            xx, ww = x_in.clone().requires_grad_(True), w.clone().requires_grad_(True)
            dist.barrier()
            acc.synchronize()
            t0 = time.perf_counter()
            inp, h = disp.dispatch(xx, ids, ww)
            y = disp.combine(_expert(inp, h.tokens_per_expert, rank * topo.experts_per_rank, W), h)
            y.backward(cot_in)
            acc.synchronize()
            if it:
                samples.append(time.perf_counter() - t0)
        results[mode] = (y.detach(), xx.grad, ww.grad)
        times[mode] = statistics.median(samples) * 1e3 if samples else 0.0
        per_call = {k2: v // disp.traffic.calls for k2, v in disp.traffic.to_dict().items() if k2 != "calls"}
        traffic[mode] = per_call

    others = systems[1:]  # each compared with the hierarchical mode
    diffs = torch.stack([
        (results["hierarchical"][i].float() - results[other][i].float()).abs().max()
        if results[other][i].numel() else torch.zeros((), device=dev)
        for other in others
        for i in range(3)
    ])
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    sums = torch.tensor([traffic[m][key] for m in systems for key in ("inter_bytes", "intra_bytes")],
                        dtype=torch.float64, device=dev)
    dist.all_reduce(sums)
    tms = torch.tensor([times[m] for m in systems], dtype=torch.float64, device=dev)
    dist.all_reduce(tms, op=dist.ReduceOp.MAX)
    diff_of = {m: dict(zip(("output", "grad_input", "grad_weights"), diffs[3 * j : 3 * j + 3].tolist()))
               for j, m in enumerate(others)}
    report = {
        "ranks": world, "nodes": topo.num_nodes, "ranks_per_node": topo.ranks_per_node,
        "backend": args.backend, "tokens_per_rank": s, "hidden": d, "experts": e, "topk": k,
        "dispatch_format": fmt, "format_active": format_active, "systems": list(systems),
        "max_abs_diff": diff_of["flat"],
        **{f"max_abs_diff_{m}": diff_of[m] for m in others[1:]},
        "inter_node_bytes": {m: int(sums[2 * i]) for i, m in enumerate(systems)},
        "intra_node_bytes": {m: int(sums[2 * i + 1]) for i, m in enumerate(systems)},
        "time_ms": {m: tms[i].item() for i, m in enumerate(systems)},
        "ok": all(v == 0 for dd in diff_of.values() for v in dd.values()),
    }
    if rank == 0:
        _print_report(report)
        for path in (result_path, args.json):
            if path:
                with open(path, "w") as f:
                    json.dump(report, f, indent=2)
    return 0 if report["ok"] else 1


def _print_report(r: dict) -> None:
    mb = 1 / 2**20
    systems = r["systems"]
    fmt = r["dispatch_format"]
    print(f"check-comm: {r['ranks']} ranks = {r['nodes']} node(s) x {r['ranks_per_node']}, backend {r['backend']}, "
          f"{r['tokens_per_rank']} tokens/rank, hidden {r['hidden']}, {r['experts']} experts, top-{r['topk']}"
          + ("" if fmt == "native" else f", rows in {fmt} (native_decoded: native rows of the decoded tokens)"
             if r["format_active"] else f", {fmt} a no-op on one node (native_decoded: native rows of the raw tokens)"))
    print(f"{'mode':<15} {'inter-node MiB':>15} {'intra-node MiB':>15} {'fwd+bwd ms':>11}")
    for m in systems:
        print(f"{m:<15} {r['inter_node_bytes'][m] * mb:>15.3f} {r['intra_node_bytes'][m] * mb:>15.3f} "
              f"{r['time_ms'][m]:>11.2f}")
    for other in systems[1:]:
        key = "max_abs_diff" if other == "flat" else f"max_abs_diff_{other}"
        dd = r[key]
        print(f"max |hierarchical - {other}|: output {dd['output']:.3g}, input grad {dd['grad_input']:.3g}, "
              f"weight grad {dd['grad_weights']:.3g}")
    print(f"{' == '.join(systems)}, bit for bit  ->  {'OK' if r['ok'] else 'MISMATCH'}")


def _spawn_entry(local_rank: int, args: argparse.Namespace, port: int, result_path: str) -> None:
    set_spawned_rank(local_rank, args.nproc, port)
    init_process_group(args.backend)
    try:
        rc = _check_worker(args, result_path if local_rank == 0 else None)
    finally:
        dist.destroy_process_group()
    if rc:
        sys.exit(rc)


def validate(args: argparse.Namespace, world: int, world_source: str = "--nproc") -> None:
    """Every check that needs no collective, before any process group exists (messages name the flags)."""
    if world < 1:
        raise ValueError(f"{world_source} {world} must be >= 1")
    if args.gpus_per_node < 1 or world % args.gpus_per_node:
        raise ValueError(
            f"--gpus-per-node {args.gpus_per_node} does not divide the {world} ranks ({world_source}): every "
            f"(emulated) node holds the same number of ranks; use a divisor of {world}"
        )
    if args.experts < 1 or args.experts % world:
        raise ValueError(f"--experts {args.experts} is not a positive multiple of the {world} ranks ({world_source}): "
                         f"every rank hosts the same number of experts")
    if not 1 <= args.topk <= args.experts:
        raise ValueError(f"--topk {args.topk} must be between 1 and --experts {args.experts}")
    if args.tokens < 0 or args.hidden < 1 or args.iters < 1:
        raise ValueError("--tokens must be >= 0, --hidden >= 1 and --iters >= 1")
    device_type = device_type_for_backend(args.backend)
    if device_type != "cpu":
        try:
            get_accelerator(device_type)
        except (RuntimeError, ImportError) as exc:
            raise ValueError(f"--backend {args.backend} needs {device_type} devices, and none is usable here "
                             f"({exc}); on a CPU machine use --backend gloo") from None


def run(args: argparse.Namespace) -> int:
    from ..env import env_int

    if args.gpus_per_node is None:
        args.gpus_per_node = env_int("LOCMOE_GPUS_PER_NODE", 1) or 2
    if args.backend is None:
        args.backend = backend_for(get_accelerator().device_type)
    joined = launched()
    world = env_int("WORLD_SIZE", 1) if joined else args.nproc
    validate(args, world, "WORLD_SIZE" if joined else "--nproc")
    if args.json:  # an unwritable report path fails now, not after the whole check
        with open(args.json, "a"):
            pass
    if joined:
        env_int("RANK", 0)
        print(f"check-comm: RANK={os.environ['RANK']} and WORLD_SIZE={world} are set: joining that launched run "
              f"(MASTER_ADDR={os.environ.get('MASTER_ADDR', '(unset)')}, MASTER_PORT="
              f"{os.environ.get('MASTER_PORT', '(unset)')}); unset RANK and WORLD_SIZE to spawn --nproc "
              f"processes here", file=sys.stderr, flush=True)
        init_process_group(args.backend)
        try:
            return _check_worker(args, None)
        finally:
            dist.destroy_process_group()
    report, failure = spawn_local(_spawn_entry, args, "report.json")
    if report is None:
        print(f"check-comm: a rank failed: {failure}", file=sys.stderr)
        return 1
    return 0 if json.loads(report)["ok"] else 1
