"""GPU check of Megatron's 1F1B all-to-all overlap (megatron-core's ``overlap_moe_expert_parallel_comm``,
Megatron-LM's ``--overlap-moe-expert-parallel-comm``) with LocMoE's dispatcher (``--locmoe-overlap off``).

The end-to-end benchmark's GPT (``benchmarks/bench_e2e.py``, bf16, Megatron's DDP and optimizer, two
micro-batches per step through megatron-core's schedule) is trained ``--steps`` steps twice from the same
weights and batches: with the overlap off and on. Compared per system: the first step's loss (the same
forward: must be equal), every parameter's reduced gradient after the first step (largest difference over the
largest gradient, over all parameters and ranks) and the losses of the later steps. Megatron's own
``alltoall`` system is compared the same way: its differences are what the schedule alone changes (the order
in which its nodes accumulate gradients): LocMoE's gradient difference must stay within 4 x Megatron's or bf16's
relative step (2^-8), whichever is larger, and Megatron's within 2^-8. Prints one line per system; exits 1 where a
check fails.

  torchrun --standalone --nproc-per-node 2 tests/gpu/megatron_1f1b.py
  launch/emulate_nodes.sh --nodes 2 --nproc-per-node 2 -- tests/gpu/megatron_1f1b.py
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)

import bench_e2e  # noqa: E402
from locmoe_plugin.demo.corpus import load_corpus, sample_batch  # noqa: E402

#: LocMoE's gradient difference may exceed Megatron's by this factor (both are bf16 accumulation-order effects)
GRAD_FACTOR = 4.0
#: floor of the gradient check: bf16's relative step (2^-8) for systems whose own difference is below it
GRAD_FLOOR = 2.0 ** -8


def train(name: str, ep_overlap: str, opts, accel, dev, corpus, steps: int):
    """Losses of ``steps`` steps and every parameter's reduced gradient after the first."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(opts.seed)
    model_parallel_cuda_manual_seed(opts.seed)
    system = bench_e2e.MegatronE2E(name, opts, accel, dev, "fp32", "replicated", ep_overlap)
    system.train(True)
    gen = torch.Generator().manual_seed(opts.seed * 1000 + dist.get_rank())
    losses, grads = [], None
    for step in range(steps):
        tokens, labels = (t.to(dev) for t in sample_batch(corpus.train, opts.micro_batch, opts.seq_len, gen))
        loss = system.loss(tokens, labels)  # both micro-batches' forward and backward, through the schedule
        finalize_model_grads([system.model])
        if step == 0:
            grads = [p.main_grad.detach().float().clone() for p in system.model.parameters()]
        system.optimizer.step()
        losses.append(float(loss))
    del system
    return losses, grads


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--systems", default="mcore_alltoall,locmoe,locmoe_topk")
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    opts = bench_e2e.parse(["--out", "/tmp/unused", "--num-layers", "4", "--hidden-size", "512", "--num-heads", "8",
                            "--num-experts", str(4 * world), "--topk", "2", "--ffn-hidden-size", "512",
                            "--seq-len", "1024", "--micro-batch", "2", "--microbatches", "2",
                            "--ep-overlap", "off,1f1b", "--steps", "5", "--measure", "1"])
    opts.gpus_per_node = opts.gpus_per_node or world
    accel, dev = bench_e2e._setup(opts)
    corpus = load_corpus(opts.corpus, seed=opts.seed)
    from megatron.core import __version__ as mver
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(expert_model_parallel_size=world)
    results = {}
    for name in a.systems.split(","):
        off = train(name, "off", opts, accel, dev, corpus, a.steps)
        on = train(name, "1f1b", opts, accel, dev, corpus, a.steps)
        if rank == 0:
            print(f"{name}: trained with the overlap off and on", flush=True)
        diff = torch.stack([(x - y).abs().max() for x, y in zip(on[1], off[1])]).max()
        scale = torch.stack([y.abs().max() for y in off[1]]).max()
        stats = torch.stack([diff, scale])
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        later = max((abs(x - y) / abs(y) for x, y in zip(on[0][1:], off[0][1:])), default=0.0)
        results[name] = {"loss0": (off[0][0], on[0][0]), "grad_rel": float(stats[0] / stats[1]),
                         "later_rel": later, "losses": (off[0], on[0])}
    ps.destroy_model_parallel()
    ok = True
    if rank == 0:
        ref = results.get("mcore_alltoall")
        for name, r in results.items():
            yardstick = ref is not None and name != "mcore_alltoall"
            bound = max(GRAD_FLOOR, GRAD_FACTOR * ref["grad_rel"]) if yardstick else GRAD_FLOOR
            good = r["loss0"][0] == r["loss0"][1] and r["grad_rel"] <= bound
            ok &= good
            print(f"megatron-core {mver}, {world // opts.gpus_per_node} x {opts.gpus_per_node}, {name}: 1F1B vs off: "
                  f"first loss {r['loss0'][1]:.6f} / {r['loss0'][0]:.6f}, gradient max diff / max "
                  f"{r['grad_rel']:.2e} (bound {bound:.2e}" + (")" if yardstick else ", the yardstick)")
                  + f", later losses within {r['later_rel']:.2e} relative (off {', '.join(f'{v:.4f}' for v in r['losses'][0])}; "
                  f"1f1b {', '.join(f'{v:.4f}' for v in r['losses'][1])}) -> {'OK' if good else 'MISMATCH'}", flush=True)
    flag = torch.tensor([float(ok)], device=dev)
    dist.broadcast(flag, 0)
    dist.destroy_process_group()
    return 0 if flag.item() == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
