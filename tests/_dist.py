"""Spawn gloo worker processes for multi-process tests: a thin wrapper over the public
:func:`locmoe_plugin.testing.run_ranks`.

``run_workers(fn, world_size, *args, timeout=300)`` starts ``world_size`` processes that each call
``fn(rank, world_size, *args)`` inside an initialised gloo process group and returns the list of their
return values. A worker's exception fails the test with its traceback; ranks still running after
``timeout`` seconds are killed and :class:`~locmoe_plugin.testing.RanksDidNotFinish` names them.
Keep several cases in one spawn: each process pays ~7 s of imports when Megatron/DeepSpeed load.
"""

from __future__ import annotations

from locmoe_plugin.testing import run_ranks, values


def run_workers(fn, world_size, *args, timeout=300):
    return values(run_ranks(fn, world_size, *args, timeout=timeout))
