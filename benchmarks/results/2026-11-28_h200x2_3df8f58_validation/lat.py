import os, statistics, sys, time
import torch, torch.distributed as dist
sys.path.insert(0, "benchmarks")
from link_probe import ProbeGroups
dist.init_process_group("nccl")
lr = int(os.environ["LOCAL_RANK"]); torch.cuda.set_device(lr); dev = torch.device("cuda", lr)
ctx = ProbeGroups(dev, torch.cuda.synchronize, int(os.environ["LOCMOE_GPUS_PER_NODE"]))
W = dist.get_world_size()
def t(call, n=40):
    s = []
    for i in range(n + 5):
        dist.barrier(); torch.cuda.synchronize(); t0 = time.perf_counter(); call(); torch.cuda.synchronize()
        if i >= 5: s.append(time.perf_counter() - t0)
    x = torch.tensor([statistics.median(s)], device=dev, dtype=torch.float64); dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return float(x) * 1e6
c = torch.ones(64, dtype=torch.int64, device=dev); g = torch.empty(64 * W, dtype=torch.int64, device=dev)
f = torch.ones(8, device=dev)
r = torch.ones(2048 * 2, dtype=torch.bfloat16, device=dev); ro = torch.empty_like(r)
w4 = torch.ones(2048 * W, dtype=torch.bfloat16, device=dev); w4o = torch.empty_like(w4)
res = {"world all_gather 64 int64": t(lambda: dist.all_gather_into_tensor(g, c)),
       "world all_reduce 8 fp32": t(lambda: dist.all_reduce(f)),
       "world all_to_all 4 KiB/peer": t(lambda: dist.all_to_all_single(w4o, w4)),
       "rail all_to_all 4 KiB/peer": t(lambda: dist.all_to_all_single(ro, r, group=ctx.rail_group)),
       "node all_to_all 4 KiB/peer": t(lambda: dist.all_to_all_single(ro, r, group=ctx.node_group)),
       "barrier only": t(lambda: None)}
if dist.get_rank() == 0:
    for k, v in res.items(): print(f"{os.environ.get('TAG')}: {k}: {v:.0f} us", flush=True)
dist.destroy_process_group()
