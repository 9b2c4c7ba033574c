"""A small GPT-style MoE model trained through ``deepspeed.initialize`` with LocMoE layers.

Every block's FFN is ``locmoe_plugin.deepspeed.LocMoE`` (a ``deepspeed.moe.layer.MoE``); the optimizer
gets DeepSpeed's MoE parameter groups; ZeRO stage and LocMoE settings come from the DeepSpeed config
(its ``"locmoe"`` section). The data are synthetic but learnable: each sequence follows
``t[i+1] = (a * t[i] + b) mod V`` for one of a few (a, b) pairs, so the loss falls quickly (real text:
``locmoe demo``). Prints one JSON line per step on rank 0 and a final JSON summary.

  DS_ACCELERATOR=cpu deepspeed --num_gpus 4 launch/deepspeed/train_gpt_moe.py --ep-size 4 --gpus-per-node 2
  deepspeed --num_gpus 8 launch/deepspeed/train_gpt_moe.py --ep-size 8 --gpus-per-node 8   # one GPU host
  (several hosts: --hostfile launch/deepspeed/hostfile; Ascend: DS_ACCELERATOR=npu, HCCL)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds-config", default=os.path.join(os.path.dirname(__file__), "ds_config.json"))
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--ep-size", type=int, default=4)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=97)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--gpus-per-node", type=int, default=None, help="ranks per node for LocMoE's topology")
    p.add_argument("--save-dir", default=None, help="save a checkpoint at the end, reload it and compare")
    p.add_argument("--zero-stage", type=int, default=None, help="override the config's ZeRO stage (1 or 2)")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args()


class Block(nn.Module):
    def __init__(self, args, settings):
        from locmoe_plugin.deepspeed import LocMoE

        super().__init__()
        h = args.hidden
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.attn = nn.MultiheadAttention(h, args.heads, batch_first=True)
        expert = nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.Linear(2 * h, h))
        self.moe = LocMoE(h, expert, num_experts=args.experts, ep_size=args.ep_size, k=args.k, locmoe=settings)

    def forward(self, x):
        s = x.shape[1]
        causal = torch.triu(torch.ones(s, s, dtype=torch.bool, device=x.device), 1)
        a = self.ln1(x)
        x = x + self.attn(a, a, a, attn_mask=causal, need_weights=False)[0]
        h, l_aux, _ = self.moe(self.ln2(x))
        return x + h, l_aux


class TinyGPT(nn.Module):
    def __init__(self, args, settings):
        super().__init__()
        self.emb = nn.Embedding(args.vocab, args.hidden)
        self.pos = nn.Parameter(torch.zeros(args.seq, args.hidden))
        self.blocks = nn.ModuleList(Block(args, settings) for _ in range(args.layers))
        self.ln = nn.LayerNorm(args.hidden)
        self.head = nn.Linear(args.hidden, args.vocab, bias=False)

    def forward(self, tokens):
        x = self.emb(tokens) + self.pos[: tokens.shape[1]]
        aux = x.new_zeros(())
        for blk in self.blocks:
            x, l_aux = blk(x)
            aux = aux + l_aux
        return self.head(self.ln(x)), aux


def batch(step: int, rank: int, args, n: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed * 7919 + step * 131 + rank)
    pairs = torch.tensor([[3, 1], [5, 2], [7, 3], [11, 4]])
    ab = pairs[torch.randint(0, len(pairs), (n,), generator=g)]
    t = torch.empty(n, args.seq + 1, dtype=torch.long)
    t[:, 0] = torch.randint(0, args.vocab, (n,), generator=g)
    for i in range(args.seq):
        t[:, i + 1] = (ab[:, 0] * t[:, i] + ab[:, 1]) % args.vocab
    return t.to(device)


def main() -> int:
    args = parse()
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from locmoe_plugin import collect_stats
    from locmoe_plugin.deepspeed import locmoe_settings_from_ds_config

    deepspeed.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    with open(args.ds_config) as f:
        ds_config = json.load(f)
    settings = locmoe_settings_from_ds_config(ds_config)
    if args.gpus_per_node is not None:
        settings["gpus_per_node"] = args.gpus_per_node
    ds_config.pop("locmoe", None)  # DeepSpeed rejects no keys, but keep its config its own
    if args.zero_stage is not None:
        ds_config.setdefault("zero_optimization", {})["stage"] = args.zero_stage

    torch.manual_seed(args.seed)
    model = TinyGPT(args, settings)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "params"})
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    device = engine.device
    micro = ds_config["train_micro_batch_size_per_gpu"]
    losses, t0 = [], time.time()
    for step in range(args.steps):
        data = batch(step, rank, args, micro, device)
        logits, aux = engine(data[:, :-1])
        lm = nn.functional.cross_entropy(logits.reshape(-1, args.vocab).float(), data[:, 1:].reshape(-1))
        engine.backward(lm + aux)
        engine.step()
        lm_mean = lm.detach().clone()
        torch.distributed.all_reduce(lm_mean)
        losses.append(lm_mean.item() / world)
        if rank == 0:
            st = collect_stats(engine.module)
            cross = sum(s.to_dict()["cross_node_share"] for s in st.values()) / max(len(st), 1)
            print(json.dumps({"step": step, "lm_loss": round(losses[-1], 4), "aux": round(float(aux), 5),
                              "cross_node_share": round(cross, 4)}), flush=True)
    summary = {"first_loss": losses[0], "last_loss": losses[-1], "steps": args.steps, "world": world,
               "seconds": round(time.time() - t0, 1)}
    if args.save_dir:
        engine.save_checkpoint(args.save_dir, tag="final")
        torch.manual_seed(args.seed + 1)  # different init: the load must restore everything
        fresh = TinyGPT(args, settings)
        fgroups = split_params_into_different_moe_groups_for_optimizer({"params": list(fresh.parameters()), "name": "params"})
        engine2, _, _, _ = deepspeed.initialize(model=fresh, model_parameters=fgroups, config=ds_config)
        engine2.load_checkpoint(args.save_dir, tag="final")
        same_params = all(torch.equal(a, b) for a, b in zip(engine.module.parameters(), engine2.module.parameters()))
        sd1, sd2 = engine.optimizer.state_dict(), engine2.optimizer.state_dict()
        same_opt = _nested_equal(sd1, sd2)
        if not same_opt and rank == 0:
            print("optimizer state entries that differ:", [k for k in sd1 if not _nested_equal(sd1[k], sd2.get(k))])
        flags = torch.tensor([float(same_params), float(same_opt)], device=device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        summary.update(checkpoint_params_equal=bool(flags[0]), checkpoint_optimizer_equal=bool(flags[1]))
    if rank == 0:
        print("SUMMARY " + json.dumps(summary), flush=True)
    # every rank done before any tears down; then the groups' worker threads stop before the interpreter
    # exits (left running, gloo's threads can abort a rank at exit: "terminate called without an active
    # exception")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


def _nested_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_nested_equal(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dict__") and type(a) is type(b):  # e.g. the loss scaler object
        return _nested_equal(vars(a), vars(b))
    return a == b


if __name__ == "__main__":
    code = main()
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        # The process groups are destroyed above, yet on CPU a native thread of the collectives can still be
        # joinable when the interpreter runs its native destructors, which then aborts a finished rank
        # ("terminate called without an active exception"). Leave without them, after flushing the output.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
