"""One process that plays one rank of an expert-parallel group of any size, on torch's fake process group.

Torch's fake backend (``torch.testing._internal.distributed.fake_pg``) accepts every collective without
moving data (an all-gather repeats the local input, an all-to-all fills its output from it; an
all-to-all that sends nothing receives zeros here), so a single process can build LocMoE
routers and Megatron MoE layers for, say, 64 ranks as 8 nodes, and check shapes, configurations, the
topology and the errors raised for bad settings - in a second, without spawning. Values that depend on
other ranks (summed loads, the other ranks' tokens) are meaningless there: test numbers with
:func:`~locmoe_plugin.testing.run_ranks` on real gloo ranks.

::

    from locmoe_plugin import LocMoEConfig
    from locmoe_plugin.testing import fake_process_group

    with fake_process_group(world_size=64, nodes=8, rank=3) as world:
        router = world.router(LocMoEConfig(num_experts=128, hidden_size=256, routing="hybrid"))
        assert router.topology.num_nodes == 8 and router.topology.node == 0
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from ..config import LocMoEConfig
from ..topology import Topology


@dataclass(frozen=True)
class FakeWorld:
    """The fake group :func:`fake_process_group` made: ``rank`` of ``world_size`` ranks on ``nodes`` nodes
    (consecutive ranks share a node); the default process group is the expert-parallel group."""

    world_size: int
    rank: int
    nodes: int

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nodes

    @property
    def group(self):
        import torch.distributed as dist

        return dist.group.WORLD

    def topology(self, num_experts: int) -> Topology:
        """The placement of ``num_experts`` experts over the group (as the adapters compute it)."""
        return Topology.for_group(self.group, num_experts, self.ranks_per_node)

    def router(self, config: LocMoEConfig, **kwargs: Any):
        """A :class:`~locmoe_plugin.router.LocMoERouter` for this rank of the group (``kwargs``: the
        router's ``init_method`` / ``device``)."""
        from ..router import LocMoERouter

        return LocMoERouter(config, topology=self.topology(config.num_experts), group=self.group, **kwargs)


def _fake_store():
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as exc:  # pragma: no cover - depends on the torch build
        raise RuntimeError("this torch build has no fake process group (torch.testing._internal."
                           "distributed.fake_pg); use run_ranks with real gloo ranks instead") from exc
    return FakeStore()


def _fake_all_to_all_single(real):
    """``all_to_all_single`` for the fake group. Its all-gathers give every rank this rank's values (a
    symmetric world), so a rank that sends nothing across nodes can still be told that rows arrive; the
    fake backend refuses an empty send with a non-empty receive. Such a call receives zeros: the fake
    group moves no data either way."""

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
        if input.numel() == 0 and output.numel() > 0:
            input, input_split_sizes = output.new_zeros(output.shape), output_split_sizes
        return real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    return all_to_all_single


@contextlib.contextmanager
def fake_process_group(world_size: int, nodes: int = 1, rank: int = 0) -> Iterator[FakeWorld]:
    """Initialise the default process group on torch's fake backend as ``rank`` of ``world_size`` ranks
    on ``nodes`` emulated nodes (``LOCMOE_GPUS_PER_NODE`` is set to ``world_size / nodes`` inside the
    block); destroyed, and the variable restored, on exit. Refused if a process group already exists."""
    import torch.distributed as dist

    for name, value, low in (("world_size", world_size, 1), ("nodes", nodes, 1), ("rank", rank, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    if world_size % nodes:
        raise ValueError(f"nodes={nodes} does not divide world_size={world_size}: nodes hold equal rank counts")
    if rank >= world_size:
        raise ValueError(f"rank={rank} is outside a world of {world_size} ranks")
    if dist.is_initialized():
        raise RuntimeError("a default process group already exists in this process; the fake group needs its "
                           "own (destroy the other one, or run this test in a separate process)")
    old = os.environ.get("LOCMOE_GPUS_PER_NODE")
    os.environ["LOCMOE_GPUS_PER_NODE"] = str(world_size // nodes)
    dist.init_process_group("fake", store=_fake_store(), rank=rank, world_size=world_size)
    real_all_to_all = dist.all_to_all_single
    dist.all_to_all_single = _fake_all_to_all_single(real_all_to_all)
    try:
        yield FakeWorld(world_size=world_size, rank=rank, nodes=nodes)
    finally:
        dist.all_to_all_single = real_all_to_all
        dist.destroy_process_group()
        if old is None:
            os.environ.pop("LOCMOE_GPUS_PER_NODE", None)
        else:
            os.environ["LOCMOE_GPUS_PER_NODE"] = old


@contextlib.contextmanager
def megatron_parallel_state(expert_model_parallel_size: int | None = None, **kwargs: Any) -> Iterator[None]:
    """megatron-core's ``parallel_state`` initialised on the current default group (fake or real) for the
    block, destroyed on exit. ``expert_model_parallel_size`` defaults to the world size; ``kwargs`` go to
    ``initialize_model_parallel`` (e.g. ``tensor_model_parallel_size``)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        raise RuntimeError("megatron_parallel_state needs a process group: use it inside fake_process_group(...) "
                           "or in a run_ranks worker")
    ep = dist.get_world_size() if expert_model_parallel_size is None else expert_model_parallel_size
    if dist.get_backend() == "fake":
        kwargs.setdefault("create_gloo_process_groups", False)  # gloo groups cannot be made on the fake backend
    ps.initialize_model_parallel(expert_model_parallel_size=ep, **kwargs)
    try:
        yield
    finally:
        ps.destroy_model_parallel()


def megatron_moe_layer(*, num_experts: int, hidden_size: int, topk: int = 2, locmoe: Mapping | None = None,
                       dispatcher: Any = None, layer_number: int = 1, **config: Any):
    """A megatron-core ``TransformerLayer`` (local spec, no TransformerEngine) whose MLP is a LocMoE layer,
    built as :func:`~locmoe_plugin.megatron.locmoe_spec` builds it, on the current ``parallel_state``.

    ``locmoe``: LocMoE settings (``LocMoEConfig`` fields beyond the Megatron config's); ``config``: extra
    ``TransformerConfig`` fields. Needs megatron-core, :func:`megatron_parallel_state`, and on a CPU-only
    machine :func:`~locmoe_plugin.testing.megatron_cpu_shims`. The layer is on the CPU
    (``use_cpu_initialization``); its ``.mlp`` is the ``LocMoELayer``, ``.mlp.router`` the LocMoE router.

    ``dispatcher`` (a mode string or :class:`~locmoe_plugin.comm.settings.DispatcherSettings`) defaults to
    the hierarchical plan without the split-by-origin overlap: on the fake group collectives move no real
    data, so the count table disagrees with what arrives, and only the unsplit plan tolerates that (the
    forward then runs for shapes and settings; its values mean nothing).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    from ..megatron.spec import locmoe_spec

    values = dict(
        num_layers=1, hidden_size=hidden_size, num_attention_heads=4, num_moe_experts=num_experts,
        moe_router_topk=topk, moe_token_dispatcher_type="alltoall", add_bias_linear=False,
        ffn_hidden_size=4 * hidden_size, moe_ffn_hidden_size=4 * hidden_size, use_cpu_initialization=True,
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
    )
    values.update(config)
    if dispatcher is None:
        from ..comm.settings import DispatcherSettings

        dispatcher = DispatcherSettings(mode="hierarchical", overlap=False)
    spec = locmoe_spec(get_gpt_layer_local_spec(num_experts=num_experts), locmoe, dispatcher)
    return build_module(spec, config=TransformerConfig(**values), layer_number=layer_number)
