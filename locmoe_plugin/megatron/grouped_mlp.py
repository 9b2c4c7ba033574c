"""``LocMoEGroupedMLP``: megatron-core's ``SequentialMLP`` run as two grouped GEMMs.

The same module as ``SequentialMLP`` (its parameters, initialisation, state dict and distributed
checkpoint: one ``MLP`` per local expert), with a forward that stacks the local experts' weights and
runs every expert at once (:mod:`locmoe_plugin.grouped_experts`) instead of a Python loop over them.
Checkpoints move between the two unchanged. The per-expert ``MLP`` modules hold the parameters but their
``forward`` is not called, so forward hooks registered on them do not run (``off`` where a hook matters).
For megatron-core without TransformerEngine, whose only training experts are ``SequentialMLP``;
``TEGroupedMLP`` is grouped already and is kept as it is.

Cost: one copy of the local experts' weights per forward (the stack; at 8 experts of 2048 x 1408 in
bf16, 92 MB), against about a dozen launches per expert it saves. Math: megatron-core's ``MLP`` without
bias (fc1, the activation or gated unit, the combine weight, fc2); see :func:`check_grouped_experts`
for what is refused.

``locmoe_spec`` and Megatron-LM's ``--locmoe-grouped-experts`` put it in place of ``SequentialMLP`` in
every LocMoE layer (:func:`with_grouped_experts` does it for any ``MoESubmodules``), in one of three
modes: ``"auto"`` (the default) runs the grouped form where the config allows it and ``SequentialMLP``'s
own loop otherwise (:func:`grouped_experts_refusal` says why; logged once per layer build), ``"on"``
refuses such a config with that message, ``"off"`` keeps ``SequentialMLP``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch

from ..config import ConfigError
from ..grouped_experts import check_grouped_experts_mode, expert_mlp

_log = logging.getLogger(__name__)


def grouped_experts_refusal(config) -> str | None:
    """Why the grouped form cannot run this config's expert MLP, naming the fix; None where it can."""
    fix = "or set --locmoe-grouped-experts off (megatron-core's SequentialMLP runs it)"
    if config.add_bias_linear:
        return f"LocMoE's grouped experts have no bias: add --disable-bias-linear, {fix}"
    if getattr(config, "fp8", None) or getattr(config, "fp4", None):
        return f"LocMoE's grouped experts run in the parameters' dtype, not fp8/fp4: {fix}"
    if (getattr(config, "expert_tensor_parallel_size", 1) or 1) > 1:
        return f"LocMoE's grouped experts need whole experts per rank: set --expert-tensor-parallel-size 1, {fix}"
    if getattr(config, "delay_wgrad_compute", False):
        return f"LocMoE's grouped experts compute weight gradients in the backward: drop --delay-wgrad-compute, {fix}"
    if getattr(config, "use_te_activation_func", False):
        return f"LocMoE's grouped experts apply the activation themselves: drop --use-te-activation-func, {fix}"
    return None


def check_grouped_experts(config) -> None:
    """Raise :class:`ConfigError` with :func:`grouped_experts_refusal`'s message where there is one."""
    why = grouped_experts_refusal(config)
    if why is not None:
        raise ConfigError(why)


def activation_of(config):
    """``h [m, F1] -> [m, F]``: megatron-core's expert activation (``MLP`` without bias): the gated unit
    ``act(x_glu) * (x_linear + glu_linear_offset)`` over the two halves, with its clamp, or ``act(h)``."""
    act = config.activation_func
    if not config.gated_linear_unit:
        return act
    clamp = getattr(config, "activation_func_clamp_value", None)
    offset = getattr(config, "glu_linear_offset", 0.0)

    def glu(h: torch.Tensor) -> torch.Tensor:
        x_glu, x_linear = torch.chunk(h, 2, dim=-1)
        if clamp is not None:
            x_glu = x_glu.clamp(min=None, max=clamp)
            x_linear = x_linear.clamp(min=-clamp, max=clamp)
        return act(x_glu) * (x_linear + offset)

    return glu


@functools.cache
def make_grouped_mlp_class():
    """The ``LocMoEGroupedMLP`` class (made once; megatron-core is imported here, not at module import)."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    class LocMoEGroupedMLP(SequentialMLP):
        """``SequentialMLP``'s parameters and checkpoints; forward: every local expert in two grouped GEMMs
        (``grouped="on"``), or where the config allows it (``"auto"``; else ``SequentialMLP``'s loop)."""

        def __init__(self, num_local_experts, config, submodules, *args, grouped: str = "on", **kwargs):
            if grouped not in ("auto", "on"):
                raise ConfigError(f"LocMoEGroupedMLP(grouped={grouped!r}): expected 'auto' or 'on' "
                                  f"(for 'off' build megatron-core's SequentialMLP)")
            if config.moe_apply_probs_on_input and config.moe_router_topk != 1:
                raise ConfigError("--moe-apply-probs-on-input needs --moe-router-topk 1")
            why = grouped_experts_refusal(config)
            if grouped == "on" and why is not None:
                raise ConfigError(why)
            super().__init__(num_local_experts, config, submodules, *args, **kwargs)
            self.grouped = why is None
            if why is not None:
                _log.info("--locmoe-grouped-experts auto: SequentialMLP's loop over experts (%s)", why)
            self._activation = activation_of(self.config)

        def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert, permuted_probs: torch.Tensor):
            """``[n, H]`` rows sorted by local expert, ``tokens_per_expert [E]`` (a host or device tensor),
            ``permuted_probs [n]`` -> ``([n, H], None)``."""
            if not self.grouped:
                return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
            x, probs = permuted_local_hidden_states, permuted_probs
            if self.config.moe_apply_probs_on_input:  # top-1 only, checked at construction
                x, probs = (probs.unsqueeze(-1) * x).to(x.dtype), None
            fc1 = torch.stack([e.linear_fc1.weight for e in self.local_experts])  # [E, F1, H]
            fc2 = torch.stack([e.linear_fc2.weight for e in self.local_experts])  # [E, H, F]
            return expert_mlp(x, tokens_per_expert, fc1, fc2, self._activation, probs), None

    return LocMoEGroupedMLP


def with_grouped_experts(submodules, mode: str = "on"):
    """``MoESubmodules`` whose ``SequentialMLP`` experts (a ``ModuleSpec`` or a ``functools.partial``, the
    two forms megatron-core's specs use) are ``LocMoEGroupedMLP`` in ``mode`` (``"auto"`` | ``"on"``;
    ``"off"`` returns ``submodules``); other experts are returned as given."""
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    check_grouped_experts_mode(mode)
    experts, grouped = submodules.experts, make_grouped_mlp_class()
    if mode == "off":
        return submodules
    if isinstance(experts, ModuleSpec) and experts.module is SequentialMLP:
        experts = dataclasses.replace(experts, module=grouped, params={**(experts.params or {}), "grouped": mode})
    elif isinstance(experts, functools.partial) and experts.func is SequentialMLP:
        experts = functools.partial(grouped, *experts.args, **{**experts.keywords, "grouped": mode})
    else:
        return submodules
    return dataclasses.replace(submodules, experts=experts)
