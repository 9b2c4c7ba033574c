"""pytest fixtures for tests of code that uses locmoe-plugin. Enable them in your ``conftest.py``::

    pytest_plugins = ["locmoe_plugin.testing.pytest_plugin"]

Fixtures:

* ``megatron_cpu`` - megatron-core's CPU shims for the test (skipped without megatron-core, refused
  where an accelerator is present);
* ``run_ranks`` - :func:`locmoe_plugin.testing.run_ranks` (``run_ranks(fn, world_size, *args, nodes=K,
  timeout=s)``);
* ``fake_world`` - a factory: ``with fake_world(world_size=64, nodes=8, rank=0) as world: ...``
  (:func:`locmoe_plugin.testing.fake_process_group`);
* ``fake_megatron_world`` - a factory that also initialises megatron-core's parallel state and the CPU
  shims: ``with fake_megatron_world(world_size=64, nodes=8) as world: megatron_moe_layer(...)``.
"""

from __future__ import annotations

import contextlib

import pytest

from . import fake_group, spawn
from .cpu_shims import megatron_cpu_shims


def _needs_megatron() -> None:
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'locmoe-plugin[megatron]')")


@pytest.fixture
def megatron_cpu():
    """megatron-core's CPU shims for the duration of the test."""
    _needs_megatron()
    with megatron_cpu_shims():
        yield


@pytest.fixture
def run_ranks():
    """:func:`locmoe_plugin.testing.run_ranks`."""
    return spawn.run_ranks


@pytest.fixture
def fake_world():
    """A factory of :func:`locmoe_plugin.testing.fake_process_group` context managers."""
    return fake_group.fake_process_group


@pytest.fixture
def fake_megatron_world():
    """A factory: ``fake_megatron_world(world_size, nodes=1, rank=0, **parallel_state_kwargs)`` - the fake
    group, megatron-core's parallel state on it (expert parallelism over the whole group by default) and
    the CPU shims, for one ``with`` block."""
    _needs_megatron()

    @contextlib.contextmanager
    def make(world_size: int, nodes: int = 1, rank: int = 0, **kwargs):
        with fake_group.fake_process_group(world_size, nodes=nodes, rank=rank) as world, megatron_cpu_shims(), \
                fake_group.megatron_parallel_state(**kwargs):
            yield world

    return make
