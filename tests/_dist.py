"""Spawn gloo worker processes for multi-process tests.

``run_workers(fn, world_size, *args)`` starts ``world_size`` processes that each call
``fn(rank, world_size, *args)`` inside an initialised gloo process group and returns the list of
their return values (pickled through files). A worker's exception fails the test with its traceback.
Keep several cases in one spawn: each process pays ~7 s of imports when Megatron/DeepSpeed load.
"""

from __future__ import annotations

import os
import pickle
import tempfile
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
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_entry, args=(world_size, fn, args, tmp), nprocs=world_size, join=False,
                                 start_method="spawn")
        while not ctx.join(timeout=timeout):
            pass
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
