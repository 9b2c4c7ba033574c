"""DeepSpeed's process-group setup for CPU runs (tests, the demo, benchmark smoke runs)."""

from __future__ import annotations

import sys


def init_deepspeed_distributed(backend: str) -> None:
    """``deepspeed.init_distributed(dist_backend=backend)``; with ``backend="gloo"`` (CPU) DeepSpeed's
    shared-memory op is not compiled first (it would take ~1 minute of g++ per fresh cache and is not needed
    for gloo). Set ``DS_ACCELERATOR`` before the first ``import deepspeed``."""
    import deepspeed

    if backend == "gloo":
        shm = sys.modules.get("deepspeed.comm.torch")
        if shm is not None and hasattr(shm, "build_shm_op"):
            shm.build_shm_op = lambda *a, **k: None
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
