"""``locmoe demo``: the main job. Trains a small GPT-style MoE model on real English text, once with the
baseline a Megatron user has today (``TopKRouter`` + aux loss, flat all-to-all) and once with LocMoE
(GrAP gate + locality loss, hierarchical all-to-all), same seed, data and schedule, on ranks split into
(emulated) nodes; prints a table and writes a PNG.

Default: CPU, 4 processes on gloo as 2 nodes x 2, a 2-layer byte-level model with 8 experts (top-2),
a few minutes on 2 cores. ``--backend nccl`` (or ``hccl``) puts one rank on each accelerator; under a
launcher that sets RANK / WORLD_SIZE (torchrun, ``launch/emulate_nodes.sh``) the demo joins it instead of
spawning. See :mod:`locmoe_plugin.demo.corpus` for the corpus and tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from ..env import env_int
from .megatron_job import BASE_SETTINGS, parse_system


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--framework", choices=("megatron", "deepspeed"), default="megatron",
                   help="megatron: megatron-core GPTModel (baseline = TopKRouter + alltoall); deepspeed: "
                        "deepspeed.initialize (baseline = DeepSpeed MoE's TopKGate)")
    p.add_argument("--nproc", type=int, default=4, help="processes to spawn (ignored under torchrun)")
    p.add_argument("--gpus-per-node", type=int, default=2, help="ranks per (emulated) node")
    p.add_argument("--backend", choices=("gloo", "nccl", "hccl"), default="gloo",
                   help="gloo runs on CPU; nccl / hccl put one rank per GPU / NPU")
    p.add_argument("--steps", type=int, default=150, help="training steps per system")
    p.add_argument("--systems", default="baseline,locmoe",
                   help=f"';'-separated (or ',' without options), from {', '.join(BASE_SETTINGS)}, each optionally "
                        f"with LocMoE options: 'baseline;locmoe:mu=0.03,gate=dense;locmoe+;hash'")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--ffn-hidden-size", type=int, default=256, help="hidden size of each expert")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--aux-loss-coeff", type=float, default=0.01)
    p.add_argument("--locality-coeff", type=float, default=0.01,
                   help="mu of LocMoE's locality loss, for systems without a cross-node budget (locmoe and locmoe+ "
                        "have one by default; 'locmoe+:mu=0.01' selects the loss instead)")
    p.add_argument("--locmoe-capacity", choices=("none", "factor", "bound"), default="none",
                   help="LocMoE's expert capacity (locmoe+ always uses adaptive)")
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", default=None,
                   help="text file or folder (default: Debian's Python documentation sources, fetched once)")
    p.add_argument("--out", default=None, help="folder for results.json and demo.png (default locmoe_runs/demo-TIME)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per CPU rank")
    p.add_argument("--emulate-nodes", action="store_true",
                   help="nccl only: give each node's ranks their own NCCL host id, so traffic between "
                        "emulated nodes takes NCCL's socket transport (one-host multi-node test)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def validate(opts: argparse.Namespace, world: int) -> None:
    """All checks that need no process group, before any is created (messages name the flags)."""
    if not opts.systems:
        raise ValueError("--systems names no system: give one or more, e.g. --systems baseline,locmoe")
    if opts.nproc < 1 or opts.threads < 1:
        raise ValueError("--nproc and --threads must be >= 1")
    if opts.gpus_per_node < 1 or world % opts.gpus_per_node:
        raise ValueError(f"--gpus-per-node {opts.gpus_per_node} does not divide the {world} ranks: every "
                         f"(emulated) node holds the same number of ranks; use a divisor of {world}")
    if opts.num_experts < 1 or opts.num_experts % world:
        raise ValueError(f"--num-experts {opts.num_experts} is not a positive multiple of the {world} ranks: "
                         f"every rank hosts the same number of experts")
    if opts.hidden_size % opts.num_experts:
        raise ValueError(f"--hidden-size {opts.hidden_size} is not divisible by --num-experts {opts.num_experts}: "
                         f"the GrAP gate needs d % n == 0")
    if opts.hidden_size % opts.num_heads:
        raise ValueError(f"--hidden-size {opts.hidden_size} is not divisible by --num-heads {opts.num_heads}")
    if not 1 <= opts.topk <= opts.num_experts:
        raise ValueError(f"--topk {opts.topk} must be between 1 and --num-experts {opts.num_experts}")
    for name in ("steps", "seq_len", "micro_batch", "eval_interval", "eval_batches", "num_layers"):
        if getattr(opts, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    from ..config import LocMoEConfig
    from .megatron_job import locmoe_settings

    for system in opts.systems:
        parse_system(system)
        settings = locmoe_settings(system, opts)
        if settings is None:
            continue
        if opts.framework == "deepspeed" and settings["routing"] == "hash":
            raise ValueError("--systems: hash routing needs token ids, which DeepSpeed's MoE layer does not get; "
                             "use --framework megatron")
        try:
            LocMoEConfig.from_dict(dict(num_experts=opts.num_experts, hidden_size=opts.hidden_size, topk=opts.topk,
                                        **settings))
        except ValueError as exc:
            raise ValueError(f"--systems {system!r}: {exc}") from None


def prepare_outputs(opts: argparse.Namespace) -> None:
    """Read the corpus and create ``--out`` before any rank starts: a missing, empty or too short corpus
    and an unwritable folder fail here (exit 2 / 3), not inside the ranks after a first system trained."""
    from .corpus import load_corpus

    corpus = load_corpus(opts.corpus, seed=opts.seed)
    for split in ("train", "val"):
        size = getattr(corpus, split).numel()
        if size <= opts.seq_len + 1:
            raise ValueError(f"--corpus {opts.corpus}: its {split} split has {size} bytes, fewer than --seq-len "
                             f"{opts.seq_len} + 2; give more text or a shorter --seq-len")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".locmoe-write-test"
    probe.write_text("")
    probe.unlink()


def _accelerator(backend: str):
    from ..device import device_type_for_backend, get_accelerator

    return get_accelerator(device_type_for_backend(backend))


def _rank_main(opts: argparse.Namespace) -> list | None:
    import torch.distributed as dist

    import torch

    from .corpus import load_corpus

    accel = _accelerator(opts.backend)
    if opts.framework == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", accel.device_type)
    if not accel.is_cpu:
        accel.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if accel.device_type == "npu":
            from ..device import apply_transfer_to_npu

            apply_transfer_to_npu()
    if accel.is_cpu:
        torch.set_num_threads(opts.threads)
    dev = torch.device("cpu") if accel.is_cpu else accel.device(accel.current_device())
    corpus = load_corpus(opts.corpus, seed=opts.seed)
    if opts.framework == "deepspeed":
        from .deepspeed_job import run_rank
    else:
        from .megatron_job import run_rank
        dist.init_process_group(backend=opts.backend)
    try:
        results = run_rank(opts, accel, dev, corpus)
        rank = dist.get_rank()
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return None
    for r in results:
        r.update(corpus=corpus.source, corpus_train_bytes=int(corpus.train.numel()))
    return results


def _spawn_entry(local_rank: int, opts: argparse.Namespace, port: int, result_path: str) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(opts.nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(opts.nproc))
    if opts.emulate_nodes and opts.backend == "nccl":
        os.environ.update(NCCL_HOSTID=f"emunode{local_rank // opts.gpus_per_node}", NCCL_IB_DISABLE="1",
                          NCCL_SOCKET_IFNAME="lo")
    results = _rank_main(opts)
    if results is not None:
        with open(result_path, "w") as f:
            json.dump(results, f)


def run_demo(args: argparse.Namespace) -> int:
    from . import report
    from .corpus import fetch_corpus

    sep = ";" if ";" in args.systems or ":" in args.systems else ","
    args.systems = [s.strip() for s in args.systems.split(sep) if s.strip()]
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = env_int("WORLD_SIZE", 1) if launched else args.nproc
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # spawned ranks: no import-time fallback notices
    validate(args, world)
    args.world = world
    if args.corpus is None:
        args.corpus = str(fetch_corpus(quiet=True))  # once, before any rank starts
    rank0 = not launched or env_int("RANK", 0) == 0
    args.out = str(args.out or Path("locmoe_runs") / time.strftime("demo-%Y%m%d-%H%M%S"))
    if rank0:
        prepare_outputs(args)
    if rank0:
        print(f"locmoe demo: {len(args.systems)} systems x {args.steps} steps, {world} ranks = "
              f"{world // args.gpus_per_node} nodes x {args.gpus_per_node} ({args.backend}); GPT {args.num_layers} "
              f"layers, hidden {args.hidden_size}, {args.num_experts} experts top-{args.topk}, "
              f"{args.micro_batch}x{args.seq_len} bytes per rank per step; corpus {args.corpus}", flush=True)
    t0 = time.time()
    if launched:
        results = _rank_main(args)
        if not rank0:
            return 0
    else:
        import torch.multiprocessing as mp

        from ..comm.launch import free_port

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "results.json")
            try:
                mp.start_processes(_spawn_entry, args=(args, free_port(), path), nprocs=args.nproc,
                                   start_method="spawn")
            except mp.ProcessExitedException as exc:
                print(f"locmoe demo: a rank failed: {exc}", file=sys.stderr)
                return 1
            with open(path) as f:
                results = json.load(f)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.json", "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"}, "results": results}, f, indent=1)
    print(f"\nResults ({time.time() - t0:.0f} s; corpus: {results[0]['corpus']}):")
    print(report.format_table(results))
    print(report.notes())
    if len(results) > 2 or any(v is not None for r in results for v in r["history"]["capacity_factor"]):
        print(report.capacity_table(results, args))
    png = report.plot(results, out / "demo.png")
    print(f"plot: {png}" if png else "plot: skipped (install matplotlib for the PNG)")
    print(f"results: {out / 'results.json'}")
    return 0
