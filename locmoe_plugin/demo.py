"""``locmoe demo``: the main job.

Interim version: prints LocMoE's capacity-bound table for typical model shapes and one routing pass
of each routing mode on random tokens, split over an emulated 2 nodes x 2 ranks topology. It will be
replaced by the training demo (baseline vs LocMoE on real text through megatron-core).
"""

from __future__ import annotations

import argparse

import torch

from .bounds import capacity_bounds
from .config import LocMoEConfig
from .router import LocMoERouter
from .topology import Topology


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=4096, help="tokens per emulated rank")
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)


def run_demo(args: argparse.Namespace) -> int:
    print("LocMoE capacity lower bound ec_min = 1/(n p_delta) (Theorem 1)")
    print(f"{'d':>6} {'n':>4} {'delta':>6} {'p_delta':>10} {'exact':>8} {'erfc':>8}")
    for d, n, delta in [(5120, 16, 0.03), (4096, 64, 0.03), (2048, 32, 0.05), (1024, 32, 0.08), (512, 16, 0.1)]:
        b = capacity_bounds(delta, d, n)
        print(f"{d:>6} {n:>4} {delta:>6} {b['p_delta']:>10.4g} {b['ec_min_exact']:>8.4f} {b['ec_min_erfc']:>8.4f}")

    ep, rpn = 4, 2
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(ep, args.tokens, args.hidden_size, generator=g)
    print(f"\nOne routing pass, {args.tokens} random tokens on each of {ep} ranks (2 emulated nodes x 2), "
          f"{args.num_experts} experts, top-{args.topk}")
    print(f"{'routing':>8} {'capacity':>9} {'cross-node':>11} {'max/mean':>9} {'dropped':>8} {'aux':>8} {'locality':>9}")
    for routing, capacity in [("topk", "none"), ("locmoe", "none"), ("locmoe", "bound"), ("hybrid", "adaptive")]:
        cfg = LocMoEConfig(num_experts=args.num_experts, hidden_size=args.hidden_size, topk=args.topk,
                           routing=routing, capacity=capacity)
        rows = []
        for r in range(ep):
            topo = Topology.from_ranks_per_node(ep, rpn, args.num_experts, ep_rank=r)
            rows.append(LocMoERouter(cfg, topo).train()(x[r]).stats.to_dict())
        routed = sum(s["routed_pairs"] for s in rows)
        cross = sum(s["cross_node_pairs"] for s in rows) / max(routed, 1)
        load = torch.tensor([s["tokens_per_expert"] for s in rows]).sum(0).double()
        aux = sum(s.get("aux_loss", 0.0) for s in rows) / ep
        loc = sum(s.get("locality_loss", 0.0) for s in rows) / ep
        print(f"{routing:>8} {capacity:>9} {cross:>11.3f} {float(load.max() / load.mean()):>9.3f} "
              f"{sum(s['dropped_pairs'] for s in rows):>8} {aux:>8.4f} {loc:>9.4f}")
    return 0
