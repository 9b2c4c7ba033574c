"""Spawn gloo worker processes for multi-process tests.

``run_workers(fn, world_size, *args, timeout=...)`` starts ``world_size`` processes that each call
``fn(rank, world_size, *args)`` inside an initialised gloo process group and returns the list of
their return values (pickled through files). A worker's exception fails the test with its traceback.
Keep several cases in one spawn: each process pays ~7 s of imports when Megatron/DeepSpeed load.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world_size, fn, args, tmp):
    os.environ.setdefault("LOCMOE_DEVICE", "cpu")
    result_path = os.path.join(tmp, f"result{rank}.pkl")
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        payload = ("ok", out)
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        payload = ("error", traceback.format_exc())
    with open(result_path, "wb") as f:
        pickle.dump(payload, f)
    if dist.is_initialized():
        if payload[0] == "ok":
            dist.barrier()
        dist.destroy_process_group()


def run_workers(fn, world_size, *args, timeout=300):
    """Run ``fn`` on ``world_size`` gloo ranks; ``timeout`` seconds for all of them (spawn included).
    At the deadline every worker still running is killed and the test fails naming them, so a hang
    (ranks waiting in different collectives) fails instead of stalling the test run."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_entry, args=(world_size, fn, args, tmp), nprocs=world_size, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:
                    p.join(5)
                done = [r for r in range(world_size) if os.path.exists(os.path.join(tmp, f"result{r}.pkl"))]
                raise AssertionError(
                    f"deadline of {timeout} s passed: ranks {alive} were still running (killed); ranks {done} "
                    f"had written a result - a collective that not every rank reached, or a too short timeout"
                )
        results = []
        for rank in range(world_size):
            path = os.path.join(tmp, f"result{rank}.pkl")
            if not os.path.exists(path):
                raise AssertionError(f"rank {rank} wrote no result")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
