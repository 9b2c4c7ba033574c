"""Helpers for testing code that uses locmoe-plugin, on a CPU-only machine (docs/testing.md).

* :func:`megatron_cpu_shims` - a context manager that lets megatron-core's MoE layers run on the CPU;
* :func:`init_deepspeed_distributed` - DeepSpeed's process groups on gloo without its compiled CPU op;
* :func:`run_ranks` - N gloo ranks as K emulated nodes, with a deadline; each rank's result or error;
* :func:`fake_process_group` - one process as one rank of a group of any size (torch's fake backend),
  with :func:`megatron_parallel_state` and :func:`megatron_moe_layer` for Megatron layers on it;
* ``locmoe_plugin.testing.pytest_plugin`` - pytest fixtures for all three
  (``pytest_plugins = ["locmoe_plugin.testing.pytest_plugin"]`` in your ``conftest.py``).

Importing this package imports neither megatron-core nor DeepSpeed.
"""

from .cpu_shims import megatron_cpu_shims
from .deepspeed_init import init_deepspeed_distributed
from .fake_group import FakeWorld, fake_process_group, megatron_moe_layer, megatron_parallel_state
from .spawn import RankResult, RanksDidNotFinish, run_ranks, values

__all__ = [
    "FakeWorld",
    "RankResult",
    "RanksDidNotFinish",
    "fake_process_group",
    "init_deepspeed_distributed",
    "megatron_cpu_shims",
    "megatron_moe_layer",
    "megatron_parallel_state",
    "run_ranks",
    "values",
]
