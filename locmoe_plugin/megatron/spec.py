"""Turn any megatron-core layer / block spec into one whose MoE layers are LocMoE layers.

``locmoe_spec(spec, locmoe, dispatcher)`` walks a ``ModuleSpec`` tree (transformer layer specs, block
specs with their per-layer lists) and replaces every ``MoELayer`` spec by ``LocMoELayer`` with the LocMoE
router; everything else (attention, shared experts, norms) is kept, and ``SequentialMLP`` experts run as
grouped GEMMs where the config allows it (``grouped_experts``, :mod:`.grouped_mlp`). An MoE layer is found in
both forms megatron-core uses: ``ModuleSpec(module=MoELayer, submodules=MoESubmodules(...))`` (0.16)
and ``functools.partial(MoELayer, submodules=MoESubmodules(...))`` (0.19's
``get_moe_module_spec_for_backend``). Users with their own
megatron-core scripts call it on the spec they already build; ``enable()`` applies it to Megatron-LM's
GPT specs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

from ..comm.settings import DispatcherSettings


def locmoe_spec(spec: Any, locmoe: Mapping | None = None, dispatcher: DispatcherSettings | str = "hierarchical",
                grouped_experts: str = "auto") -> Any:
    """A copy of ``spec`` with every ``MoELayer`` replaced by ``LocMoELayer`` + ``LocMoEMegatronRouter``.
    ``dispatcher``: a mode (``"hierarchical"`` | ``"flat"`` | ``"allgather"``, overlap off) or
    ``DispatcherSettings(mode=..., overlap=...)``. ``grouped_experts`` (``"auto"`` | ``"on"`` | ``"off"``): their
    ``SequentialMLP`` experts become ``LocMoEGroupedMLP`` (same parameters and checkpoints, two grouped GEMMs
    instead of a loop over experts, where the config allows it with ``"auto"``; :mod:`.grouped_mlp`)."""
    dispatcher = DispatcherSettings.of(dispatcher)  # a bad value fails here, not at model build
    from ..grouped_experts import check_grouped_experts_mode
    from .grouped_mlp import with_grouped_experts

    check_grouped_experts_mode(grouped_experts)

    from .dispatcher import make_locmoe_layer_class
    from .router import LocMoEMegatronRouter

    layer_cls = make_locmoe_layer_class()
    router = functools.partial(
        LocMoEMegatronRouter, locmoe=dict(locmoe or {}), dispatcher=dispatcher, with_locmoe_dispatcher=True
    )

    def replace(sub):
        return layer_cls, with_grouped_experts(dataclasses.replace(sub, router=router), grouped_experts)

    return map_moe_layers(spec, replace)


def grouped_experts_spec(spec: Any, mode: str = "on") -> Any:
    """A copy of ``spec`` whose MoE layers (Megatron's own or LocMoE's) have ``LocMoEGroupedMLP`` experts
    in ``mode`` where they had ``SequentialMLP`` (:func:`~.grouped_mlp.with_grouped_experts`)."""
    from ..grouped_experts import check_grouped_experts_mode
    from .grouped_mlp import with_grouped_experts

    check_grouped_experts_mode(mode)
    return map_moe_layers(spec, lambda sub: (None, with_grouped_experts(sub, mode)))


def map_moe_layers(spec: Any, replace) -> Any:
    """A copy of the ``ModuleSpec`` tree ``spec`` (layer and block specs, per-layer lists) in which every
    ``MoELayer`` spec, in both forms megatron-core uses (``ModuleSpec(module=MoELayer, submodules=...)``,
    0.16; ``functools.partial(MoELayer, submodules=...)``, 0.19), becomes ``replace(submodules) ->
    (layer class or None to keep it, new submodules)``; nodes without one are returned as they are."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec

    def walk(node):
        if isinstance(node, functools.partial):
            kwargs = {k: walk(v) for k, v in node.keywords.items()}
            if isinstance(node.func, type) and issubclass(node.func, MoELayer):
                sub = kwargs.get("submodules")
                if sub is None:
                    from megatron.core.transformer.moe.moe_layer import MoESubmodules

                    sub = MoESubmodules()
                cls, kwargs["submodules"] = replace(sub)
                return functools.partial(cls or node.func, *node.args, **kwargs)
            if any(kwargs[k] is not v for k, v in node.keywords.items()):
                return functools.partial(node.func, *node.args, **kwargs)
            return node
        if isinstance(node, ModuleSpec):
            sub = walk(node.submodules)
            if isinstance(node.module, type) and issubclass(node.module, MoELayer):
                cls, sub = replace(sub)
                return dataclasses.replace(node, module=cls or node.module, submodules=sub)
            return dataclasses.replace(node, submodules=sub) if sub is not node.submodules else node
        if isinstance(node, (list, tuple)):
            items = [walk(x) for x in node]
            return node if all(a is b for a, b in zip(items, node)) else type(node)(items)
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            changes = {}
            for f in dataclasses.fields(node):
                if not f.init:
                    continue
                old = getattr(node, f.name)
                new = walk(old)
                if new is not old:
                    changes[f.name] = new
            return dataclasses.replace(node, **changes) if changes else node
        return node

    return walk(spec)


def count_locmoe_layers(spec_or_model: Any, num_layers: int | None = None) -> int:
    """How many LocMoE layers a model has (for tests and logs).

    * A built model (any ``torch.nn.Module``): its ``LocMoELayer`` modules.
    * A block spec (``TransformerBlockSubmodules`` with one spec per layer): its ``LocMoELayer`` specs.
    * A single transformer-layer spec, which Megatron repeats for every layer: its ``LocMoELayer`` specs
      (0 or 1) times ``num_layers`` (the model's layer count; without it, the count in the spec itself).
    """
    import torch

    from .dispatcher import make_locmoe_layer_class

    cls = make_locmoe_layer_class()
    if isinstance(spec_or_model, torch.nn.Module):
        return sum(isinstance(m, cls) for m in spec_or_model.modules())
    in_spec = _count_specs(spec_or_model, cls)
    if num_layers is not None and not hasattr(spec_or_model, "layer_specs"):
        return in_spec * num_layers
    return in_spec


def _count_specs(spec: Any, cls: type) -> int:
    """``LocMoELayer`` specs in a spec tree."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, functools.partial):
        return (spec.func is cls) + sum(_count_specs(v, cls) for v in spec.keywords.values())
    if isinstance(spec, ModuleSpec):
        return (spec.module is cls) + _count_specs(spec.submodules, cls)
    if isinstance(spec, (list, tuple)):
        return sum(_count_specs(x, cls) for x in spec)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return sum(_count_specs(getattr(spec, f.name), cls) for f in dataclasses.fields(spec))
    return 0
