"""``LocMoE``: a drop-in for ``deepspeed.moe.layer.MoE`` with LocMoE routing and the hierarchical
dispatcher.

It *is* a ``deepspeed.moe.layer.MoE`` (so ``deepspeed.initialize``, the MoE optimizer parameter groups
and checkpointing find it): DeepSpeed's ``Experts`` are kept as they are (expert parameters keep
``allreduce=False`` and their group name), and DeepSpeed's expert-parallel groups
(``deepspeed.utils.groups``, created by ``set_deepspeed_parallelism`` / ``deepspeed.initialize``) are
split into nodes for the dispatcher. ``forward`` returns ``(output, l_aux, exp_counts)`` like DeepSpeed's
MoE, with LocMoE's locality loss (and z-loss) inside ``l_aux``; ``exp_counts`` are the tokens each
expert kept (after capacity).

``l_aux`` is already scaled, unlike DeepSpeed's raw balance loss: each loss carries its coefficient from
the config (``aux_loss_coeff``, ``locality_loss_coeff``, ``z_loss_coeff``). Add it to the loss as is; a
loop that multiplies it by a coefficient again weakens balancing and locality by that factor
(docs/deepspeed.md).

Collectives: with the EP-wide aux loss on an EP group that spans nodes, the router takes its EP-wide
counts from the dispatcher's count all-gather (``LocMoERouter.fold_counts_with``), one collective per
forward fewer; ``l_aux`` is complete once the layer's forward returns. ``LocMoEGate`` (DeepSpeed's own
``MOELayer`` and dispatch) keeps the router's all-reduce: its ``l_aux`` is returned before any dispatch.

Differences from DeepSpeed's TopKGate (intended): LocMoE's capacity modes (``none`` = dropless by
default) replace DeepSpeed's ``capacity_factor`` / ``drop_tokens``; no random token selection or
second-expert sampling; combine weights are renormalised over a token's top-k before any drop.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import torch
from torch import nn

try:
    from deepspeed.moe.layer import MoE as _DeepSpeedMoE
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("locmoe_plugin.deepspeed needs deepspeed: pip install 'locmoe-plugin[deepspeed]'") from exc

from ..comm import TokenDispatcher, build_comm_groups
from ..comm.groups import all_group_ranks
from ..comm.settings import DispatcherSettings
from ..agreement import config_settings
from ..config import ConfigError, LocMoEConfig
from ..grouped_experts import TWO_LAYER_FORM, check_grouped_experts_mode, expert_mlp, two_layer_parts
from ..router import LocMoERouter
from ..topology import Topology

#: keys of the DeepSpeed config's "locmoe" section that set the layer's dispatcher, not LocMoEConfig fields
LAYER_KEYS = ("dispatcher", "overlap", "equal_tokens", "dispatch_format", "overlap_chunks", "grouped_experts")


def locmoe_settings_from_ds_config(ds_config: Mapping | str | None) -> dict:
    """The ``"locmoe"`` section of a DeepSpeed config (a dict or a JSON file path), or ``{}``."""
    if ds_config is None:
        return {}
    if isinstance(ds_config, str):
        with open(ds_config) as f:
            ds_config = json.load(f)
    if not isinstance(ds_config, Mapping):
        raise ConfigError(f"the DeepSpeed config must be a JSON object (a mapping), got a {type(ds_config).__name__}")
    section = ds_config.get("locmoe", {})
    if not isinstance(section, Mapping):
        raise ConfigError(f'the "locmoe" section of the DeepSpeed config must be an object, got {type(section).__name__}')
    return dict(section)


def _grouped_parts(experts: nn.Module, mode: str):
    """Each local expert's ``(fc1, activation, fc2)`` where its experts run as grouped GEMMs: ``mode`` "on" (refused
    unless every expert is of :data:`TWO_LAYER_FORM` with one activation type) or "auto" (where they are); else
    None (each expert module runs on its rows)."""
    check_grouped_experts_mode(mode, '"grouped_experts":')
    parts = [two_layer_parts(e) for e in experts.deepspeed_experts]
    fits = bool(parts) and all(p is not None for p in parts) and len({type(p[1]) for p in parts}) == 1
    if mode == "on" and not fits:
        raise ConfigError(f'"grouped_experts": "on" needs experts of the form {TWO_LAYER_FORM}; '
                          f'set "auto" or "off" to run other experts as their own modules')
    return parts if fits and mode != "off" else None


class _LocMoELayer(nn.Module):
    """Replaces DeepSpeed's ``MOELayer`` inside :class:`LocMoE` (router + dispatcher + DeepSpeed's experts)."""

    def __init__(self, config: LocMoEConfig, experts: nn.Module, ep_size: int, dispatcher: DispatcherSettings,
                 grouped_experts: str = "auto") -> None:
        super().__init__()
        self.config = config
        # placeholder topology of the final EP size until DeepSpeed's EP group exists (bind() then places
        # it); the locality bias, one row per EP rank, is thus created before the optimizer is built
        self.router = LocMoERouter(config, Topology.single_node(ep_size, config.num_experts))
        self.experts = experts
        self.grouped_parts = _grouped_parts(experts, grouped_experts)
        self.ep_size = ep_size
        self.dispatcher_settings = dispatcher
        self.dispatcher: TokenDispatcher | None = None
        self.l_aux = None
        self.exp_counts = None

    def _set_ep_group(self, ep_group) -> None:
        """Called by ``MoE._create_process_groups`` once DeepSpeed's EP group exists (a collective)."""
        settings = {**config_settings(self.config), **self.dispatcher_settings.agreement()}
        topo = Topology.for_group(ep_group, self.config.num_experts, self.config.gpus_per_node, settings=settings,
                                  where="LocMoE layer (DeepSpeed)")
        if topo.ep_size != self.ep_size:
            raise ConfigError(f"DeepSpeed's expert-parallel group has {topo.ep_size} ranks, the layer ep_size={self.ep_size}")
        self.router.bind(topo, ep_group if topo.ep_size > 1 else None)
        groups = build_comm_groups(topo, ep_group, all_group_ranks(ep_group))
        d = self.dispatcher_settings
        self.dispatcher = TokenDispatcher(groups, d.mode, overlap=d.overlap, equal_tokens=bool(d.equal_tokens),
                                          dispatch_format=d.dispatch_format)
        # EP-wide aux loss across nodes (or gathered with the routing): the router's counts come from the
        # dispatcher's count exchange
        self.router.fold_counts_with(groups.ep, one_node_too=self.dispatcher.gathers_routing)

    def _run_experts(self, inp: torch.Tensor, tokens_per_expert) -> torch.Tensor:
        """``inp [n, H]`` rows sorted by local expert -> ``[n, H]``: two grouped GEMMs where the experts are of
        :data:`~locmoe_plugin.grouped_experts.TWO_LAYER_FORM` and grouping is on, else each expert module."""
        if self.grouped_parts is not None:
            fc1 = torch.stack([p[0].weight for p in self.grouped_parts])  # [E, F, H]
            fc2 = torch.stack([p[2].weight for p in self.grouped_parts])  # [E, H, F]
            return expert_mlp(inp, tokens_per_expert, fc1, fc2, self.grouped_parts[0][1])
        outs, start = [], 0
        for expert, count in zip(self.experts.deepspeed_experts, tokens_per_expert):
            out = expert(inp[start : start + count])
            outs.append(out[0] if isinstance(out, tuple) else out)
            start += count
        return torch.cat(outs)

    def forward(self, hidden: torch.Tensor, used_token: torch.Tensor | None = None) -> torch.Tensor:
        if used_token is not None:
            raise NotImplementedError("LocMoE does not support DeepSpeed's used_token mask; pass None")
        if self.dispatcher is None:
            raise RuntimeError(
                "the LocMoE layer has no expert-parallel group yet: run deepspeed.initialize(...) or call "
                "layer.set_deepspeed_parallelism() first"
            )
        x = hidden.reshape(-1, hidden.shape[-1])
        out = self.router(x, fold_counts=True)  # the dispatcher below completes out.pending, if any
        a = out.assignment
        # with the overlap (hierarchical across nodes) the experts run on this node's rows while the other
        # nodes' rows cross the network, then on those (TokenDispatcher.forward)
        # out.pending (folded counts): completed in the dispatcher's count exchange, before l_aux is read
        y = self.dispatcher.forward(x, a.expert_ids, a.weights, self._run_experts, folded=out.pending)
        self.l_aux = out.total_loss
        self.exp_counts = out.stats.tokens_per_expert
        return y.reshape(hidden.shape)


class LocMoE(_DeepSpeedMoE):
    """``deepspeed.moe.layer.MoE`` with LocMoE routing.

    Args:
        hidden_size, expert, num_experts, ep_size, k: as DeepSpeed's MoE (``k`` is LocMoE's top-k / l).
        locmoe: LocMoE settings: a :class:`LocMoEConfig`, or a dict of its fields plus ``"dispatcher"``
            (``"hierarchical"`` | ``"flat"`` | ``"allgather"``, the last one node only), ``"equal_tokens"`` (true:
            every rank passes the same number of tokens per call, and ``"allgather"`` runs no count exchange;
            default false), ``"overlap"`` (false by default; true: the inter-node
            transfer of other nodes' rows runs while this node's rows go through the experts; a no-op on one node),
            ``"dispatch_format"`` (``"native"``, default; ``"fp8"`` or ``"int8"``: token rows and output gradients
            travel as one byte per feature plus a scale per 128, see :mod:`locmoe_plugin.comm.row_codec`)
            and ``"grouped_experts"`` (``"auto"``, default: experts of the form ``nn.Sequential(nn.Linear(bias=False),
            activation, nn.Linear(bias=False))`` run as two grouped GEMMs, no loop over experts, as Megatron's
            ``LocMoEGroupedMLP``; ``"on"``: refuse other experts; ``"off"``: each expert module on its rows)
            - e.g. the ``"locmoe"`` section of the DeepSpeed config (:func:`locmoe_settings_from_ds_config`).
        **moe_kwargs: passed to DeepSpeed's MoE (``use_residual``, ``enable_expert_tensor_parallelism``...);
            its gate options (``capacity_factor``, ``drop_tokens``, ``use_rts``...) do not apply.
    """

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int = 1, ep_size: int = 1, k: int = 1,
                 locmoe: LocMoEConfig | Mapping[str, Any] | None = None, **moe_kwargs) -> None:
        super().__init__(hidden_size, expert, num_experts=num_experts, ep_size=ep_size, k=k, **moe_kwargs)
        settings = {} if locmoe is None else locmoe
        if isinstance(settings, LocMoEConfig):
            config, dispatcher, grouped = settings, DispatcherSettings(), "auto"
        else:
            settings = dict(settings)
            dispatcher = DispatcherSettings(mode=settings.pop("dispatcher", "hierarchical"),
                                            overlap=settings.pop("overlap", False),
                                            equal_tokens=settings.pop("equal_tokens", None),
                                            dispatch_format=settings.pop("dispatch_format", "native"))
            grouped = settings.pop("grouped_experts", "auto")
            if "overlap_chunks" in settings:
                raise ConfigError(
                    f'"overlap_chunks": {settings["overlap_chunks"]!r} is removed: use "overlap": true (the '
                    f'inter-node transfer overlaps this node\'s expert compute) or "overlap": false (default)'
                )
            config = LocMoEConfig.from_dict({"num_experts": num_experts, "hidden_size": hidden_size, "topk": k, **settings})
        if config.routing == "hash":
            raise ConfigError(
                "routing='hash' needs token ids, which DeepSpeed's MoE layer does not receive; use it with "
                "Megatron (attach_token_ids) or call LocMoERouter(hidden, token_ids) yourself"
            )
        if (config.num_experts, config.hidden_size, config.topk) != (num_experts, hidden_size, k):
            raise ConfigError(
                f"the LocMoE config (experts {config.num_experts}, hidden {config.hidden_size}, topk {config.topk}) "
                f"disagrees with the layer (num_experts {num_experts}, hidden_size {hidden_size}, k {k})"
            )
        # keep DeepSpeed's Experts (allreduce=False, group name); drop its TopKGate and MOELayer
        self.deepspeed_moe = _LocMoELayer(config, self.deepspeed_moe.experts, ep_size, dispatcher, grouped)

    @property
    def router(self) -> LocMoERouter:
        return self.deepspeed_moe.router

    @property
    def traffic(self):
        d = self.deepspeed_moe.dispatcher
        return None if d is None else d.traffic
