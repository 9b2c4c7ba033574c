"""LocMoE router for megatron-core's ``MoELayer`` (0.16 to 0.19), plugged in through the official seam
``MoESubmodules(router=...)``.

It wraps the framework-free :class:`locmoe_plugin.router.LocMoERouter` (the same math the DeepSpeed
adapter uses) and honours Megatron's router contract: built as ``router(config=..., pg_collection=...
[, is_mtp_layer=...])``, ``forward(hidden, padding_mask=None) -> (probs [s, n] fp32, routing_map [s, n]
bool)``, ``set_layer_number(n)``. Its losses ride on ``probs`` through Megatron's
``MoEAuxLossAutoScaler`` (so they follow the pipeline schedule's loss scaling) and are logged with
Megatron's aux-loss tracker, next to LocMoE's telemetry (cross-node share, drops, max/mean load),
which therefore appears in Megatron's training log like ``load_balancing_loss`` does. The telemetry is
summed per layer on the device and recorded when Megatron reports (:func:`~.metrics.flush_locmoe_metrics`).

With a LocMoE capacity that drops tokens and *Megatron's own* dispatchers (``MoELayer`` rather than
``LocMoELayer``), ``moe_expert_capacity_factor`` must be set (Megatron otherwise sizes its buffers as
tokens x top-k); the router refuses the combination at construction. LocMoE's capacity decides the drops.

Use: ``MoESubmodules(experts=..., router=functools.partial(LocMoEMegatronRouter, locmoe=settings))``
where ``settings`` is a dict of :class:`~locmoe_plugin.config.LocMoEConfig` fields beyond what the
TransformerConfig already says (experts, hidden size, top-k, aux / z-loss coefficients).

Hash routing (``{"routing": "hash"}``) reads each token's id from :mod:`.token_ids`
(:func:`attach_token_ids`); the deferred recording of losses and telemetry lives in :mod:`.metrics`.
Both names stay importable from here.
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping

import torch

from ..agreement import config_settings
from ..comm.settings import DispatcherSettings
from ..config import ConfigError, LocMoEConfig
from ..router import LocMoERouter
from ..routing import index_to_dense
from ..topology import Topology
from .compat import aux_loss_coeff, capacity_from_megatron, check_supported
from .cuda_graphs import captures_router, check_cuda_graph_support
from . import metrics
from .metrics import LOSS_METRICS, TELEMETRY_METRICS, drop_stale_locmoe_metrics, flush_locmoe_metrics
from .token_ids import TokenIdsHandle, attach_token_ids, current_token_ids

__all__ = [
    "LOSS_METRICS",
    "TELEMETRY_METRICS",
    "LocMoEMegatronRouter",
    "IndexRouting",
    "TokenIdsHandle",
    "attach_token_ids",
    "current_token_ids",
    "dense_routing_map",
    "drop_stale_locmoe_metrics",
    "flush_locmoe_metrics",
    "locmoe_config_from_megatron",
    "routing_hook_targets",
]

def dense_routing_map(output, num_experts: int) -> torch.Tensor:
    """``[s, n]`` bool routing map of a router's output in either form: Megatron's ``(probs [s, n],
    routing_map [s, n] bool)`` or LocMoE's index form ``(weights [s, k], expert_ids [s, k])`` (what
    :class:`IndexRouting` returns); for forward hooks that count routing (see :func:`routing_hook_targets`)."""
    probs, routing_map = output
    if routing_map.dtype == torch.bool:
        return routing_map
    return index_to_dense(routing_map, probs.detach(), num_experts)[1]


def routing_hook_targets(router: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose forward hooks see every routing of ``router``: the router itself (Megatron's
    ``MoELayer`` calls its ``forward``) and, for :class:`LocMoEMegatronRouter`, its ``route_indices``
    (``LocMoELayer`` calls that). One of them runs per routing; read either output with
    :func:`dense_routing_map`."""
    indices = getattr(router, "route_indices", None)
    return [router] + ([indices] if isinstance(indices, torch.nn.Module) else [])


class IndexRouting(torch.nn.Module):
    """``LocMoEMegatronRouter.route_indices``: the router's routing in index form, ``hidden [S, B, d]`` ->
    ``(weights [s, k] fp32, expert_ids [s, k] int64)`` with ``-1`` / 0 for a dropped pair; the losses'
    backward rides on ``weights``, telemetry and losses are recorded as by ``forward``.

    ``LocMoELayer`` routes through it: its dispatcher takes this form, which saves building the dense form
    and converting it back (about 15 kernels per layer and forward). A module (no parameters, nothing in
    the state dict) rather than a method so that forward hooks can observe it (:func:`routing_hook_targets`).
    """

    def __init__(self, router: "LocMoEMegatronRouter") -> None:
        super().__init__()
        self._router = weakref.ref(router)  # not a child module: no cycle in the module tree

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None = None, dispatch_follows: bool = False):
        """``dispatch_follows=True`` (``LocMoELayer.route``): ``LocMoELayer``'s ``dispatch_preprocess`` runs next and
        completes the losses from its count exchange when the router folds its counts into it
        (:meth:`LocMoEMegatronRouter.fold_counts_with`); any other call keeps the router's own all-reduce."""
        return self._router()._route(hidden, padding_mask, index_form=True, dispatch_follows=dispatch_follows)


def locmoe_config_from_megatron(config, overrides: Mapping[str, Any] | None = None) -> LocMoEConfig:
    """A :class:`LocMoEConfig` from a Megatron ``TransformerConfig`` plus LocMoE-only ``overrides``.

    Taken from Megatron: ``num_moe_experts``, ``hidden_size``, ``moe_router_topk``,
    ``moe_aux_loss_coeff`` and ``moe_z_loss_coeff`` (overrides win). Capacity: Megatron's
    ``moe_expert_capacity_factor`` maps to ``capacity="factor"`` only where the overrides choose no
    capacity mode and the routing mode's own default is dropless (``topk``, ``locmoe``, ``hash``);
    LocMoE+ (``routing="hybrid"``) keeps its adaptive capacity, since Megatron's own dispatchers need the
    factor set for any dropping router (see :class:`LocMoEMegatronRouter`) - it must not switch modes.
    """
    if not getattr(config, "num_moe_experts", None):
        raise ConfigError("LocMoE needs an MoE model: set num_moe_experts (--num-experts) in the Megatron config")
    values: dict[str, Any] = dict(
        num_experts=config.num_moe_experts,
        hidden_size=config.hidden_size,
        topk=config.moe_router_topk,
        aux_loss_coeff=aux_loss_coeff(config),
        z_loss_coeff=float(getattr(config, "moe_z_loss_coeff", None) or 0.0),
    )
    overrides = dict(overrides or {})
    values.update(capacity_from_megatron(getattr(config, "moe_expert_capacity_factor", None), overrides))
    values.update(overrides)
    if values.get("capacity") not in (None, "factor"):
        values.pop("capacity_factor", None)
    return LocMoEConfig.from_dict(values)


def _param_device(config) -> torch.device:
    """Where Megatron puts router parameters: the CPU with ``use_cpu_initialization``, else the
    current accelerator (as ``TopKRouter`` does)."""
    from ..device import get_accelerator

    acc = get_accelerator()
    if getattr(config, "use_cpu_initialization", False) or acc.is_cpu:
        return torch.device("cpu")
    return acc.device(acc.current_device())


class LocMoEMegatronRouter(torch.nn.Module):
    """Megatron router wrapping :class:`LocMoERouter`.

    Args:
        config: Megatron ``TransformerConfig``.
        pg_collection: Megatron's process groups (``ep`` for the topology and the global aux loss,
            ``tp_cp`` for loss logging). Default: Megatron's globals (``get_default_pg_collection``).
        is_mtp_layer: accepted for megatron-core >= 0.19; LocMoE routes MTP layers the same way.
        locmoe: LocMoE-only settings (dict of ``LocMoEConfig`` fields), e.g. ``{"routing": "hybrid"}``.
        dispatcher: the token dispatcher's settings used by ``LocMoELayer``: a mode (``"hierarchical"``,
            ``"flat"`` or, one node only, ``"allgather"``; overlap off) or :class:`~locmoe_plugin.comm.settings.DispatcherSettings`.
        with_locmoe_dispatcher: True when the layer is ``LocMoELayer`` (set by :func:`locmoe_spec`).
    """

    def __init__(
        self,
        config,
        pg_collection=None,
        is_mtp_layer: bool = False,
        locmoe: Mapping | None = None,
        dispatcher: DispatcherSettings | str = "hierarchical",
        with_locmoe_dispatcher: bool = False,
    ):
        check_supported()
        dispatcher = DispatcherSettings.of(dispatcher)
        super().__init__()
        #: what ``LocMoELayer``'s dispatcher does (the rank-agreement check below covers it)
        self.dispatcher_settings = dispatcher
        self.config = config
        self.is_mtp_layer = is_mtp_layer
        self.layer_number: int | None = None
        #: ``route_indices(hidden, padding_mask=None) -> (weights [s, k] fp32, expert_ids [s, k] int64)``:
        #: the routing in index form, for ``LocMoELayer`` (see :class:`IndexRouting`)
        self.route_indices = IndexRouting(self)
        self._telemetry_sum: torch.Tensor | None = None  # raw telemetry counts summed since the last flush
        self._loss_sums: dict[str, torch.Tensor] = {}  # loss values summed since the last flush (deferred)
        self._telemetry_forwards = 0
        self._folded: _FoldedRoute | None = None  # a routing whose losses wait for the count exchange
        self._folds = False  # whether LocMoELayer's dispatcher takes the counts (fold_counts_with)
        metrics._live.add(self)
        # what forward adds up, one fp32 row per forward into one persistent buffer (one kernel; the same
        # memory every time, so a CUDA graph replay of the router adds to what the flush reads):
        # [deferred loss values..., kept pairs, busiest expert's pairs, 1, crossing pairs, dropped pairs]; a
        # forward adds a prefix: the last two only where they can be non-zero (several nodes; a capacity)
        self._sums: torch.Tensor | None = None
        self._sum_keys: tuple[str, ...] = ()
        # the forward count's 1, made once (never written): no fill kernel per forward; fp32 as the row, so
        # the row's stack casts only the integer counts
        self.register_buffer("_one_count", torch.ones((), dtype=torch.float32, device=_param_device(config)),
                             persistent=False)
        if getattr(config, "moe_router_enable_expert_bias", False):
            # finalize_model_grads would then update every module with an `expert_bias` by TopKRouter's rules
            from .args import TOPK_EXPERT_BIAS_ERROR

            raise ConfigError(TOPK_EXPERT_BIAS_ERROR)
        self.locmoe_config = locmoe_config_from_megatron(config, locmoe)
        if (
            self.locmoe_config.drops_tokens
            and not with_locmoe_dispatcher
            and getattr(config, "moe_expert_capacity_factor", None) is None
        ):
            raise ConfigError(
                f"LocMoE capacity {self.locmoe_config.capacity!r} drops tokens, but Megatron's own token "
                f"dispatchers size their buffers as tokens x top-k unless moe_expert_capacity_factor is set: "
                f"set --moe-expert-capacity-factor (any value; LocMoE's capacity mode "
                f"{self.locmoe_config.capacity!r} decides) or use LocMoELayer "
                f"(--locmoe / locmoe_spec), whose dispatcher handles drops"
            )
        check_cuda_graph_support(config, self.locmoe_config, with_locmoe_dispatcher)
        self._graph_captured = captures_router(config)
        recompute = getattr(config, "recompute_granularity", None)
        reruns_router = recompute == "full" or (recompute == "selective" and "moe" in (config.recompute_modules or ()))
        moves_in_forward = self.locmoe_config.expert_bias_rate > 0 or self.locmoe_config.cross_node_budget is not None
        if moves_in_forward and reruns_router and (
            (getattr(config, "pipeline_model_parallel_size", 1) or 1) > 1
        ):
            # the offsets move in each training forward under grad, i.e. in the recompute; the pipeline
            # schedule runs several micro-batches' no-grad forwards before their recomputes, so a recompute
            # would route with offsets moved since its forward, and the gradients would be of other routing
            raise ConfigError(
                f"expert_bias_rate={self.locmoe_config.expert_bias_rate} / "
                f"{'a cross-node budget' if self.locmoe_config.cross_node_budget is not None else 'no budget'} "
                f"with recompute_granularity={recompute!r} "
                f"and pipeline parallelism: the recomputed routing would differ from the forward's; drop "
                f"--recompute-granularity full / 'moe' from --recompute-modules, or set --locmoe-expert-bias-rate 0 "
                f"and leave out the cross-node budget (routing 'locmoe' and 'hybrid' have one by default: pass "
                f"--locmoe-locality-loss-coeff 0.01 for the learned locality loss without a budget)"
            )
        if self.locmoe_config.routing == "hash" and reruns_router:
            raise ConfigError(
                f"LocMoE routing='hash' reads the token ids that attach_token_ids() keeps only while "
                f"GPTModel.forward runs, but recompute_granularity={recompute!r} reruns the router during "
                f"backward: drop --recompute-granularity full / 'moe' from --recompute-modules, or change routing"
            )
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        ep_group = getattr(pg_collection, "ep", None)
        # every setting that shapes a collective, checked over the EP group before the first one
        from .args import flag_named

        settings = {**config_settings(self.locmoe_config), **dispatcher.agreement(),
                    "with the LocMoE dispatcher": with_locmoe_dispatcher,
                    "overlap (--overlap-moe-expert-parallel-comm)":
                        bool(getattr(config, "overlap_moe_expert_parallel_comm", False)),
                    # decides equal_tokens=None (whether the allgather mode runs a count exchange)
                    "--variable-seq-lengths": bool(getattr(config, "variable_seq_lengths", False))}
        topology = Topology.for_group(ep_group, config.num_moe_experts, self.locmoe_config.gpus_per_node,
                                      settings=flag_named(settings), where="LocMoE router (Megatron)")
        if topology.ep_size == 1:
            ep_group = None
        self.tp_cp_group = getattr(pg_collection, "tp_cp", None)
        self.core = LocMoERouter(
            self.locmoe_config,
            topology=topology,
            group=ep_group,
            init_method=getattr(config, "init_method", None),
            device=_param_device(config),
        )
        # dense gate weight and locality bias: like TopKRouter's weight (sequence-parallel grads)
        for param in (getattr(self.core.gate, "weight", None), self.core.locality_bias):
            if param is not None:
                setattr(param, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Accept checkpoints of Megatron's ``TopKRouter``: its ``weight`` [n, d] is the dense gate."""
        legacy, ours = prefix + "weight", prefix + "core.gate.weight"
        if legacy in state_dict and ours not in state_dict:
            if self.locmoe_config.gate != "dense":
                error_msgs.append(
                    f"{legacy}: the checkpoint holds a learned (TopKRouter) gate, but this LocMoE router uses "
                    f"gate={self.locmoe_config.gate!r}; load it with --locmoe-gate dense"
                )
                state_dict.pop(legacy)
            else:
                state_dict[ours] = state_dict.pop(legacy)
            state_dict.setdefault(prefix + "core._extra_state", None)  # TopKRouter has no capacity state
            if self.core.locality_bias is not None:  # nor a locality bias: start it neutral
                state_dict.setdefault(prefix + "core.locality_bias", torch.zeros_like(self.core.locality_bias))
        for key in ("expert_bias", "bias"):
            if prefix + key in state_dict:
                error_msgs.append(
                    f"{prefix + key}: the checkpoint's router has a {key.replace('_', ' ')} "
                    f"(TopKRouter option) that the LocMoE router does not implement"
                    + (": LocMoE's own loss-free balancing is --locmoe-expert-bias-rate R (e.g. 1e-3); its "
                       "offsets start at zero (TopKRouter's are for sigmoid scores and do not carry over)"
                       if key == "expert_bias" else "")
                )
                state_dict.pop(prefix + key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @property
    def topology(self) -> Topology:
        return self.core.topology

    @property
    def last_stats(self):
        return self.core.last_stats

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def _log(self, name: str, value: torch.Tensor) -> None:
        from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker

        num_layers = self.config.num_layers + (getattr(self.config, "mtp_num_layers", None) or 0)
        save_to_aux_losses_tracker(name, value.detach().float(), self.layer_number, num_layers,
                                   reduce_group=self.tp_cp_group)

    def _log_loss(self, key: str, value: torch.Tensor) -> None:
        """A loss value (coefficient included) into the tracker as Megatron logs its own: without the
        coefficient, under Megatron's names."""
        c = self.locmoe_config
        if key == "locality" and torch.is_tensor(self.core.last_locality_coeff):
            # the "loss" budget's coefficient moves every step: divided by the last forward's (exact for one
            # forward per flush); a coefficient of 0 gave a loss of 0, logged as 0
            self._log(LOSS_METRICS[key], value / self.core.last_locality_coeff.clamp_min(1e-12))
            return
        coeff = {"aux": c.aux_loss_coeff, "locality": c.locality_loss_coeff, "z": c.z_loss_coeff}[key]
        self._log(LOSS_METRICS[key], value / coeff)

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """Megatron's router contract: ``hidden [S, B, d]`` (or ``[s, d]``) -> ``(probs [s, n] fp32,
        routing_map [s, n] bool)``; the losses' backward rides on ``probs``.

        ``padding_mask [S, B]``: True marks padding, as ``MoELayer`` passes it to ``TopKRouter`` (which
        counts ``~padding_mask`` as the valid tokens). As there, padding tokens are still routed and
        dispatched but left out of the losses (aux, locality, z). Hash routing reads the token ids from
        :func:`current_token_ids`.
        """
        return self._route(hidden, padding_mask, index_form=False)

    def fold_counts_with(self, dispatcher_group, one_node_too: bool = False) -> bool:
        """Leave the EP group's counts to ``LocMoELayer``'s dispatcher on ``dispatcher_group`` (see
        :meth:`LocMoERouter.fold_counts_with`): then a forward's losses are attached to the probs that
        ``dispatch_preprocess`` returns (:meth:`take_folded`), not to the router's. Not under a CUDA graph
        that captures the router (a replay would skip the Python that hands the counts over): there the
        router keeps its all-reduce. ``one_node_too``: as there. Returns whether it folds."""
        self._folds = self.core.fold_counts_with(dispatcher_group, one_node_too) and not self._graph_captured
        return self._folds

    def take_folded(self) -> "_FoldedRoute | None":
        """The last forward's routing whose losses wait for the dispatcher's count exchange (None: nothing
        waits); taken once (``LocMoELayer``'s ``dispatch_preprocess`` calls it right after the route)."""
        folded, self._folded = self._folded, None
        return folded

    def _route(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None, index_form: bool,
               dispatch_follows: bool = False):
        """The routing of :meth:`forward` (``index_form=False``, dense) or :attr:`route_indices` (True);
        ``dispatch_follows``: see :class:`IndexRouting`."""
        token_ids = current_token_ids() if self.locmoe_config.routing == "hash" else None
        valid = None if padding_mask is None else ~padding_mask.bool()
        if self._folded is not None:
            raise RuntimeError(
                "the previous routing's losses were never completed: with folded counts every route is "
                "followed by LocMoELayer's dispatch_preprocess (call the router through LocMoELayer)"
            )
        out = self.core(hidden, token_ids, valid, fold_counts=self._folds and dispatch_follows)
        if index_form:
            probs, routing_map = out.assignment.weights, out.assignment.expert_ids
        else:
            probs, routing_map = out.to_megatron()
        if out.pending is not None:  # completed in dispatch_preprocess, which attaches the losses
            self._folded = _FoldedRoute(self, out)
            return probs, routing_map
        return self._attach_losses(out, probs), routing_map

    def _attach_losses(self, out, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` with the router's losses attached (``MoEAuxLossAutoScaler``), the losses logged (or summed
        for the flush) and the telemetry summed."""
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        if out.total is not None:
            # one autoscaler for the sum: each loss gets the same scaled gradient as with one per loss
            probs = MoEAuxLossAutoScaler.apply(probs, out.total)
        if self.layer_number is None:  # as the tracker: no layer number, nothing recorded
            return probs
        deferred = out.losses if metrics.report_flushes() else {}  # recorded at the flush, summed on the device
        if not deferred:
            for key, loss in out.losses.items():
                self._log_loss(key, loss)
        # raw counts summed per layer on the device: kept pairs, the busiest expert's kept pairs, forwards,
        # kept pairs crossing nodes, dropped pairs; ratios at the flush. Four ops: sum, max, stack, add_. The
        # core router hands out its shared zero for a count that is 0 by construction (one node: crossing
        # pairs; dropless: drops): those are left out of the row (the buffer's tail stays 0)
        st = out.stats
        load = st.tokens_per_expert
        zero = self.core.zero_count
        tail = () if st.dropped_pairs is zero and st.cross_node_pairs is zero else (
            (st.cross_node_pairs,) if st.dropped_pairs is zero else (st.cross_node_pairs, st.dropped_pairs))
        with torch.no_grad():
            row = torch.stack([*deferred.values(), load.sum(), load.max(), self._one_count, *tail])
            if self._sums is None or self._sum_keys != tuple(deferred) or self._sums.shape != row.shape:
                # the deferred losses changed (report patch toggled) or the row did: record what was summed
                self._flush_sums()
                self._sums, self._sum_keys = torch.zeros_like(row), tuple(deferred)
                metrics._accumulating.add(self)  # once per buffer, not per forward
            self._sums.add_(row)
        return probs

    def _flush_sums(self) -> None:
        """Move the persistent buffer's sums into ``_loss_sums`` / ``_telemetry_sum`` /
        ``_telemetry_forwards`` (what :meth:`flush_telemetry` records) and zero the buffer in place."""
        sums = getattr(self, "_sums", None)  # absent on stand-ins that carry only the flushed sums (tests)
        if sums is None:
            return
        n = len(self._sum_keys)
        snap = torch.zeros(n + 5, dtype=sums.dtype, device=sums.device)  # the row's absent tail: 0
        snap[: sums.numel()] = sums
        sums.zero_()
        for i, key in enumerate(self._sum_keys):
            self._loss_sums[key] = snap[i] if key not in self._loss_sums else self._loss_sums[key] + snap[i]
        counts = snap[[n + 3, n + 4, n, n + 1]]  # crossing, dropped, kept, busiest (the flush's order)
        self._telemetry_sum = counts if self._telemetry_sum is None else self._telemetry_sum + counts
        self._telemetry_forwards = self._telemetry_forwards + snap[n + 2]

    def flush_telemetry(self) -> None:
        """Record this layer's summed loss values (when deferred, see :func:`~.metrics.report_flushes`) and telemetry
        since the last flush in Megatron's tracker (see :func:`flush_locmoe_metrics`): each share pooled over
        the forwards (crossing / kept pairs, dropped /
        requested pairs, mean busiest-expert load / mean load), recorded times the number of forwards
        because the tracker sums one record per forward and Megatron divides by the micro-batches. The
        sums are device tensors (the forward count too: CUDA graph replays add to it), so a layer that did
        not run since the last flush records zeros, which leave the tracker's sums unchanged."""
        if hasattr(self, "_sums"):
            self._flush_sums()
        if self.layer_number is not None:
            for key, total in self._loss_sums.items():  # the tracker sums records: one record of the sum
                self._log_loss(key, total)
        self._loss_sums = {}
        if self._telemetry_sum is not None and self.layer_number is not None:
            cross, dropped, kept, peak = self._telemetry_sum.double()
            values = torch.stack([cross / kept.clamp_min(1), dropped / (kept + dropped).clamp_min(1),
                                  peak * self.locmoe_config.num_experts / kept.clamp_min(1)])
            values = values * self._telemetry_forwards
            for i, name in enumerate(TELEMETRY_METRICS):
                self._log(name, values[i])
        self._telemetry_sum = None
        self._telemetry_forwards = 0


class _FoldedRoute:
    """A routing of :class:`LocMoEMegatronRouter` whose losses wait for ``LocMoELayer``'s count exchange.

    ``counts``: the core router's :class:`~locmoe_plugin.folded_counts.FoldedCounts`, for
    ``TokenDispatcher.start_counts``; :meth:`attach` (after it completed) attaches the losses to the probs
    ``dispatch_preprocess`` returns and records them and the telemetry, as an unfolded route does itself."""

    def __init__(self, router: LocMoEMegatronRouter, out) -> None:
        self.router, self.out = router, out

    @property
    def counts(self):
        return self.out.pending

    def attach(self, probs: torch.Tensor) -> torch.Tensor:
        return self.router._attach_losses(self.out, probs)
