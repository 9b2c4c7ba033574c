import json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, "benchmarks")
from link_probe import LinkProbe, ProbeGroups, format_links
dist.init_process_group("nccl")
lr = int(os.environ["LOCAL_RANK"]); torch.cuda.set_device(lr); dev = torch.device("cuda", lr)
ctx = ProbeGroups(dev, torch.cuda.synchronize, int(os.environ["LOCMOE_GPUS_PER_NODE"]))
out = {}
for mib in (32.0, 8.0):
    p = LinkProbe(ctx, mib, 10)
    for i in range(3):
        p.take(str(i))
    out[mib] = p.summary("inter_node")
    if dist.get_rank() == 0:
        print(os.environ.get("TAG"), f"{mib} MiB:", format_links(p), flush=True)
if dist.get_rank() == 0:
    json.dump(out, open(os.environ["PROBE_OUT"], "w"), indent=1)
dist.destroy_process_group()
