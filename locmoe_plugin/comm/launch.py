"""What ``locmoe check-comm`` and ``locmoe bandwidth`` share: the launcher options, the per-process setup
and the local spawn.

Both run standalone (``--nproc P`` spawns P local processes) or join a launcher that set RANK /
WORLD_SIZE / LOCAL_RANK (torchrun, ``launch/emulate_nodes.sh``; then ``--nproc`` is ignored).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from typing import Callable

import torch
import torch.distributed as dist

from ..device import Accelerator, device_type_for_backend, get_accelerator


def add_launch_arguments(p: argparse.ArgumentParser, gpus_per_node_default: str) -> None:
    """``--nproc``, ``--gpus-per-node``, ``--backend`` and ``--json``; ``gpus_per_node_default`` says in
    the help what an unset ``--gpus-per-node`` means to the command."""
    p.add_argument("--nproc", type=int, default=4, help="processes to spawn (ignored under torchrun)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help=f"ranks per (emulated) node (default: $LOCMOE_GPUS_PER_NODE, else {gpus_per_node_default})")
    p.add_argument("--backend", choices=("gloo", "nccl", "hccl"), default=None,
                   help="default: from the device (nccl on CUDA, hccl on Ascend, gloo on CPU)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")


def launched() -> bool:
    """Whether a launcher set RANK and WORLD_SIZE (then this process joins its run)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def accelerator_for(backend: str) -> Accelerator:
    return get_accelerator(device_type_for_backend(backend))


def init_process_group(backend: str) -> Accelerator:
    """Select this process's device (LOCAL_RANK) and join the process group; returns the accelerator."""
    acc = accelerator_for(backend)
    if not acc.is_cpu:
        acc.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return acc


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a locally spawned process group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_spawned_rank(local_rank: int, nproc: int, port: int) -> None:
    """The environment a launcher would set, for process ``local_rank`` of ``nproc`` spawned here."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(nproc))
    torch.set_num_threads(1)


def spawn_local(entry: Callable, args: argparse.Namespace, result_name: str) -> tuple[str | None, str]:
    """Run ``entry(local_rank, args, port, result_path)`` in ``args.nproc`` spawned processes; rank 0
    writes its result to ``result_path``. Returns ``(that file's text or None, the failure or "")``."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, result_name)
        failure = ""
        try:
            mp.start_processes(entry, args=(args, free_port(), path), nprocs=args.nproc, start_method="spawn")
        except mp.ProcessExitedException as exc:
            failure = str(exc)
        if not os.path.exists(path):
            return None, failure or "no result written"
        with open(path) as f:
            return f.read(), failure
