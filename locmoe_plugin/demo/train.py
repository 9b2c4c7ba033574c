"""The demo's training loop, shared by the Megatron and DeepSpeed jobs: the same data, schedule and
measurements for every system (see :mod:`locmoe_plugin.demo.metrics`)."""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.distributed as dist

from .corpus import sample_batch
from .metrics import RoutingMonitor, WireCounter


class Progress:
    """A one-line progress bar on a terminal (redrawn at most twice a second); elsewhere (logs, CI) one
    line per tenth of the run."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.time()

    def update(self, step: int, loss: float, cross: float) -> None:
        if not self.enabled:
            return
        now = time.time()
        if self.tty and now - self.last < 0.5 and step < self.total:
            return
        if not self.tty and step % max(1, self.total // 10) and step < self.total:
            return
        self.last = now
        width = 24
        done = int(width * step / self.total)
        line = (f"  {self.label:<9} [{'#' * done}{'.' * (width - done)}] {step:>4}/{self.total}  "
                f"loss {loss:6.3f}  cross-node {cross:5.3f}  {now - self.t0:6.1f} s")
        sys.stderr.write(("\r" + line + ("\n" if step == self.total else "")) if self.tty else line + "\n")
        sys.stderr.flush()


def _lr(step: int, opts) -> float:
    warm = max(1, opts.steps // 20)
    if step < warm:
        return opts.lr * (step + 1) / warm
    t = (step - warm) / max(1, opts.steps - warm)
    return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _capacity_state(routers) -> dict:
    """Mean over layers of the LocMoE routers' capacity factor and affinity threshold delta (None for
    routers without them: the frameworks' own, or a dropless LocMoE router)."""
    out = {}
    for key in ("capacity_factor", "delta"):
        values = [getattr(r.last_stats, key, None) for r in routers if getattr(r, "last_stats", None) is not None]
        values = [float(v) for v in values if v is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def train_system(name: str, system, opts, corpus, accel, dev) -> dict:
    """Train ``system`` (built by a framework job: ``loss(tokens, labels)``, ``step(loss)``, ``train(mode)``,
    ``routers``, ``routing_map(output)``, ``optimizer``) for ``opts.steps`` steps; rank 0's dict is the
    result."""
    rank, world = dist.get_rank(), dist.get_world_size()
    node_of = lambda r: r // opts.gpus_per_node  # noqa: E731 - EP group = world, ranks in node order
    node_of_expert = torch.arange(opts.num_experts) // (opts.num_experts // world) // opts.gpus_per_node
    monitor = RoutingMonitor(system.routers, system.routing_map, node_of_expert, node_of(rank), opts.topk)
    gen = torch.Generator().manual_seed(opts.seed * 1000 + rank)
    val_gen = torch.Generator().manual_seed(opts.seed * 1000 + 500 + rank)
    val_batches = [sample_batch(corpus.val, opts.micro_batch, opts.seq_len, val_gen) for _ in range(opts.eval_batches)]

    def evaluate() -> float:
        system.train(False)
        with torch.no_grad():
            losses = [system.loss(t.to(dev), y.to(dev)) for t, y in val_batches]
        system.train(True)
        v = torch.stack(losses).mean().reshape(1).to(dev)
        dist.all_reduce(v)
        return float(v) / world

    history = {"step": [], "loss": [], "cross_node_share": [], "max_over_mean_load": [], "dropped_pairs": [],
               "capacity_factor": [], "delta": []}
    val_curve = {"step": [], "loss": []}
    tail_from = opts.steps - max(1, opts.steps // 5)
    tail_tokens = torch.zeros(opts.num_experts, dtype=torch.float64)
    wire = WireCounter(node_of)
    train_time = 0.0
    progress = Progress(name, opts.steps, rank == 0 and opts.progress)
    system.train(True)
    for step in range(opts.steps):
        tokens, labels = sample_batch(corpus.train, opts.micro_batch, opts.seq_len, gen)
        for g in system.optimizer.param_groups:
            g["lr"] = _lr(step, opts)
        accel.synchronize()
        t0 = time.perf_counter()
        monitor.begin_step()
        with wire:
            loss = system.loss(tokens.to(dev), labels.to(dev))
            system.step(loss)
        accel.synchronize()
        train_time += time.perf_counter() - t0
        routing = monitor.end_step(dev)
        lv = loss.detach().float().reshape(1)
        dist.all_reduce(lv)
        history["step"].append(step + 1)
        history["loss"].append(float(lv) / world)
        for key in ("cross_node_share", "max_over_mean_load", "dropped_pairs"):
            history[key].append(routing[key])
        for key, value in _capacity_state(system.routers).items():
            history[key].append(value)
        if step >= tail_from:
            tail_tokens += torch.tensor(routing["tokens_per_expert"], dtype=torch.float64)
        if (step + 1) % opts.eval_interval == 0 or step + 1 == opts.steps:
            val_curve["step"].append(step + 1)
            val_curve["loss"].append(evaluate())
        progress.update(step + 1, history["loss"][-1], routing["cross_node_share"])
    monitor.remove()
    totals = torch.tensor([wire.inter_bytes, wire.intra_bytes], dtype=torch.long, device=dev)
    dist.all_reduce(totals)
    slowest = torch.tensor([train_time], dtype=torch.float32, device=dev)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    tail = slice(tail_from, None)

    def mean(xs):
        return sum(xs) / max(len(xs), 1)

    return {
        "system": name,
        "train_loss": mean(history["loss"][tail]),
        "val_loss": val_curve["loss"][-1],
        "tokens_per_s": opts.steps * world * opts.micro_batch * opts.seq_len / float(slowest[0]),
        "cross_node_share": mean(history["cross_node_share"][tail]),
        "max_over_mean_load": mean(history["max_over_mean_load"][tail]),
        "dropped_pairs": sum(history["dropped_pairs"]),
        "inter_node_bytes_per_step": float(totals[0]) / opts.steps,
        "intra_node_bytes_per_step": float(totals[1]) / opts.steps,
        "tokens_per_expert": (tail_tokens / (opts.steps - tail_from)).tolist(),
        "history": history,
        "val_curve": val_curve,
    }
