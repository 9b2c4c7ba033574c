"""Megatron's six-phase token-dispatcher contract on top of the core hierarchical dispatcher.

``dispatch_preprocess`` -> ``token_dispatch`` -> ``dispatch_postprocess`` -> experts ->
``combine_preprocess`` -> ``token_combine`` -> ``combine_postprocess``, as ``MoELayer`` calls them, so
the layer, its shared-expert handling and Megatron's 1F1B all-to-all overlap schedule keep working.
The payload moves only in ``token_dispatch`` / ``token_combine``. ``dispatch_preprocess`` starts the
count exchange (one all-gather and an asynchronous copy of the table to the host, as Megatron's alltoall
dispatcher copies its counts on a side stream); ``token_dispatch`` waits for it (the layer's one host
sync), exchanges the routing metadata and moves the payload.

Folded router counts: in ``LocMoELayer`` (EP-wide aux loss, an EP group that spans nodes or the one-node
``allgather`` mode below, router not captured in a CUDA graph) the router does not all-reduce its
per-expert counts; ``dispatch_preprocess`` appends its extra bins to this rank's count histogram, completes
the router's aux loss, expert-bias and budget steps from the all-gathered table on the device, and returns
the probs with the router's losses attached (``MoEAuxLossAutoScaler``, as the router attaches them
otherwise): one collective per layer forward fewer (:mod:`locmoe_plugin.folded_counts`).

Equal token counts: Megatron hands every EP rank the same ``[seq / TP, micro-batch]`` tokens per call (its
own allgather dispatcher relies on that), so with ``dispatcher="allgather"`` the layer runs no count
exchange: ``dispatch_preprocess`` all-gathers the routing (ids, weights, checks and the router's folded
bins in one tensor) and ``token_dispatch`` reads this rank's pairs per expert from it
(:mod:`locmoe_plugin.comm.gathered_routing`). With ``variable_seq_lengths``, or
``DispatcherSettings(equal_tokens=False)`` (``--locmoe-equal-tokens off``: a layer called outside Megatron's
training loop with other token counts per rank), the count exchange stays.

Overlap (``overlap=True``, off by default; a no-op on a one-node EP group): Megatron's ``MoELayer`` runs the
experts between ``token_dispatch`` and ``token_combine``, on all rows at once, so the experts cannot
hide the inter-node transfer here. What overlaps: in ``token_dispatch`` the rail (inter-node) transfer
of other nodes' rows with this node's rows' intra-node hop; in ``token_combine`` the rail return of the
other nodes' rows with the reduce of this node's rows; in backward the same pairs in reverse. (The
DeepSpeed layer calls ``TokenDispatcher.forward`` and also overlaps the local experts.) Megatron's own
``--overlap-moe-expert-parallel-comm`` (its 1F1B all-to-all overlap across micro-batches) is refused together
with it (:func:`validate_parallel_config`); with LocMoE's overlap off (``--locmoe-overlap off``) it works. That
schedule frees the inputs of its dispatch node, and of its expert node (megatron-core 0.16 always; 0.19 with more
than one local expert), after their forward: where it does, ``dispatch_preprocess`` returns copies of the tokens
and weights (the router's backward keeps them) and ``dispatch_postprocess`` a copy of the dispatched rows (the
experts' backward keeps them) (:func:`schedule_frees_inputs`). It also frees the combine node's input, the
experts' output, which nothing here keeps (the combine's backward keeps only its plan).

Megatron's dispatchers keep the current micro-batch's routing on ``self`` between phases (MoELayer
calls the phases in order on one instance); this adapter does the same with the core dispatcher's
handle. Megatron's experts apply the routing probabilities themselves, so ``token_combine`` sums
unweighted rows; they get the probabilities in the activations' dtype unless ``moe_router_dtype`` is
set (Megatron's own behaviour: its router returns probs in that dtype by default).

Limits (refused with a clear error at construction): expert tensor parallelism > 1, tensor
parallelism without sequence parallelism, drop-and-pad capacity (``moe_pad_expert_input_to_capacity``), the
shared experts run inside Megatron's own dispatcher (``moe_shared_expert_overlap``).
"""

from __future__ import annotations

import functools

import torch

from ..comm.dispatcher import TokenDispatcher
from ..comm.groups import all_group_ranks, build_comm_groups
from ..comm.settings import DispatcherSettings
from ..config import ConfigError
from ..routing import dense_to_index


OVERLAP_CONFLICT_ERROR = (
    "--overlap-moe-expert-parallel-comm (Megatron's 1F1B all-to-all overlap) together with the LocMoE "
    "dispatcher's own overlap is not supported: pass --locmoe-overlap off to use Megatron's, or drop "
    "--overlap-moe-expert-parallel-comm"
)


def schedule_frees_inputs(config, node: str, num_local_experts: int) -> bool:
    """Whether Megatron's 1F1B all-to-all overlap schedule frees the inputs of its ``node`` ("moe_dispatch" or
    "mlp") right after that node's forward, by megatron-core's own policy (``should_free_input``: 0.19 asks the
    local expert count, 0.16 does not). False without the overlap; True where the policy cannot be asked."""
    if not getattr(config, "overlap_moe_expert_parallel_comm", False):
        return False
    try:
        from megatron.core.models.common.utils import should_free_input

        return bool(should_free_input(node, True, config, num_local_experts))
    except ImportError:
        pass
    try:
        from megatron.core.models.gpt.fine_grained_callables import should_free_input

        return bool(should_free_input(node, True, config))
    except ImportError:
        return True


def validate_parallel_config(config, overlap: bool = False) -> None:
    """Layouts the LocMoE dispatcher does not handle; raise before any collective."""
    etp = getattr(config, "expert_tensor_parallel_size", None) or 1
    if etp > 1:
        raise ConfigError(
            f"expert_tensor_parallel_size={etp}: the LocMoE dispatcher needs whole experts per rank; "
            f"set --expert-tensor-parallel-size 1 (tensor parallelism of the dense layers is fine)"
        )
    tp = getattr(config, "tensor_model_parallel_size", 1) or 1
    if tp > 1 and not getattr(config, "sequence_parallel", False):
        raise ConfigError(
            f"tensor_model_parallel_size={tp} without sequence parallelism: each TP rank must route its "
            f"own sequence shard; add --sequence-parallel"
        )
    if overlap and getattr(config, "overlap_moe_expert_parallel_comm", False):
        raise ConfigError(OVERLAP_CONFLICT_ERROR)
    if getattr(config, "moe_shared_expert_overlap", False):
        raise ConfigError(
            "moe_shared_expert_overlap (--moe-shared-expert-overlap) runs the shared experts inside Megatron's own "
            "alltoall dispatcher, which the LocMoE dispatcher replaces, so their output would be lost; drop the flag "
            "(the shared experts then run beside the routed ones)"
        )
    if getattr(config, "moe_pad_expert_input_to_capacity", False):
        raise ConfigError(
            "moe_pad_expert_input_to_capacity (drop-and-pad) is not supported by the LocMoE dispatcher; "
            "use LocMoE's capacity modes (--locmoe-capacity) instead"
        )


class LocMoETokenDispatcher:
    """The six phases over the core dispatcher (mixed into Megatron's ``MoETokenDispatcher`` base by
    :func:`make_dispatcher_class`, which supplies the version's other hooks, e.g. 0.19's
    ``get_expert_zero_copy_buffers``). Drop-in for megatron-core's ``MoEAlltoAllTokenDispatcher``.

    Args:
        num_local_experts / local_expert_indices / config / pg_collection: as Megatron passes them.
        topology: the router's topology (same EP group, same nodes).
        settings: :class:`~locmoe_plugin.comm.settings.DispatcherSettings` (mode; overlap, which splits the
            two-stage plan by origin, see the module doc, and is a no-op on one node).
    """

    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection, topology,
                 settings: DispatcherSettings = DispatcherSettings()):
        validate_parallel_config(config, settings.overlap)
        self.config = config
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        self.topk = config.moe_router_topk
        ep_ranks = all_group_ranks(pg_collection.ep) if topology.ep_size > 1 else None
        groups = build_comm_groups(topology, pg_collection.ep, ep_ranks)
        # Megatron hands every EP rank [seq / TP, micro-batch] tokens per call (its allgather dispatcher relies
        # on it too); only --variable-seq-lengths lets them differ, unless the settings say otherwise
        equal = settings.equal_tokens
        if equal is None:
            equal = not getattr(config, "variable_seq_lengths", False)
        self.core = TokenDispatcher(groups, settings.mode, overlap=settings.overlap, equal_tokens=equal,
                                    dispatch_format=settings.dispatch_format)
        self._take_folded = None  # the router's LocMoEMegatronRouter.take_folded when its counts are folded here
        self._plan = None
        self._routing = None  # (ids, weights, counts in flight) between dispatch_preprocess and token_dispatch
        self._hidden_shape = None
        # Megatron's 1F1B all-to-all overlap may free the inputs of its dispatch node and of its expert node right
        # after their forward (its own dispatcher hands them permuted tensors): rows that a backward keeps (the
        # router's input and weights, the experts' input) are then handed over as copies
        self._copies_dispatch_inputs = schedule_frees_inputs(config, "moe_dispatch", num_local_experts)
        self._copies_expert_inputs = schedule_frees_inputs(config, "mlp", num_local_experts)

    @property
    def traffic(self):
        return self.core.traffic

    def fold_router_counts(self, router, fold: bool = True) -> bool:
        """Take ``router``'s (a ``LocMoEMegatronRouter``'s) EP-wide counts from this dispatcher's count
        exchange where the math allows (:meth:`LocMoEMegatronRouter.fold_counts_with`); ``fold=False``: the
        router all-reduces its counts itself (the same results; for A/B timing). Call it alike on every EP
        rank, before the first forward. Returns whether it folds."""
        folds = router.fold_counts_with(self.core.groups.ep if fold else None, one_node_too=self.core.gathers_routing)
        self._take_folded = router.take_folded if folds else None
        return folds

    # ---------------------------------------------------------------------------- dispatch
    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        self._hidden_shape = hidden_states.shape
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        if routing_map.dtype != torch.bool:
            # LocMoEMegatronRouter.route_indices' form, as LocMoELayer routes: (weights [s, k], ids [s, k])
            ids, weights = routing_map, probs
        else:  # Megatron's dense form, from any router
            ids, weights = dense_to_index(probs, routing_map, self.topk)
        # the count exchange starts here; its host copy lands while the layer does other work. With the router's
        # counts folded into it, the router's losses and steps complete right after its all-gather (device work)
        folded = None if self._take_folded is None else self._take_folded()
        counts = self.core.start_counts(ids, None if folded is None else folded.counts, weights)
        self._routing = (ids, weights, counts)
        if folded is not None:
            weights = folded.attach(weights)
        if self._copies_dispatch_inputs and torch.is_grad_enabled():  # the router's backward keeps x and the weights
            x, weights = x.clone(), weights.clone()
        return x, weights

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        ids, weights, counts = self._routing
        self._routing = None
        self._plan = self.core.prepare(ids, weights, counts)  # host wait: split sizes (flat plan: metadata exchange)
        return self.core.send(hidden_states, probs, self._plan)

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        tokens_per_expert = torch.tensor(self._plan.tokens_per_expert, dtype=torch.long)
        if getattr(self.config, "moe_router_dtype", None) is None:
            # as Megatron's default (router in the activations' dtype): the experts scale their bf16 rows by
            # probs of that dtype, not by fp32 probs that would promote [tokens, ffn] to fp32 and back. The
            # routing itself stays fp32; --moe-router-dtype fp32 keeps fp32 probs here too.
            probs = probs.to(hidden_states.dtype)
        if self._copies_expert_inputs and torch.is_grad_enabled():  # the experts' backward keeps their input rows
            hidden_states = hidden_states.clone()
        return hidden_states, tokens_per_expert, probs

    # ---------------------------------------------------------------------------- combine
    def combine_preprocess(self, hidden_states: torch.Tensor):
        return hidden_states

    def token_combine(self, hidden_states: torch.Tensor):
        return self.core.reduce(hidden_states, self._plan)

    def combine_postprocess(self, hidden_states: torch.Tensor):
        out = hidden_states.reshape(self._hidden_shape[:-1] + (hidden_states.shape[-1],))
        self._plan = None
        return out


@functools.lru_cache(maxsize=None)
def make_dispatcher_class():
    """``LocMoETokenDispatcher`` on top of the installed Megatron's ``MoETokenDispatcher`` base."""
    from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

    class MegatronLocMoETokenDispatcher(LocMoETokenDispatcher, MoETokenDispatcher):
        def __init__(self, num_local_experts, local_expert_indices, config, pg_collection, topology,
                     settings: DispatcherSettings = DispatcherSettings()):
            MoETokenDispatcher.__init__(self, config=config, pg_collection=pg_collection)
            LocMoETokenDispatcher.__init__(self, num_local_experts, local_expert_indices, config, pg_collection,
                                           topology, settings)

    MegatronLocMoETokenDispatcher.__name__ = MegatronLocMoETokenDispatcher.__qualname__ = "LocMoETokenDispatcher"
    return MegatronLocMoETokenDispatcher


@functools.lru_cache(maxsize=None)
def make_locmoe_layer_class():
    """``LocMoELayer``: megatron-core's ``MoELayer`` whose token dispatcher is the LocMoE one (built
    lazily so importing this module does not import Megatron)."""
    from megatron.core.transformer.moe import moe_layer
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from .router import LocMoEMegatronRouter

    _cuda_graph_route_decorator = getattr(moe_layer, "maybe_skip_or_early_return_by_cudagraph", None)

    class _ComparesEqualToMoELayer(type(MoELayer)):
        """Megatron's ``TransformerLayer`` (0.16) passes its ``pg_collection`` only to MLP classes it lists,
        found by equality (``spec.module in (MoELayer, ...)``), and warns "Unknown MLP type" for others,
        leaving the layer on Megatron's global process groups. ``LocMoELayer`` is an ``MoELayer``, so it
        compares equal to it and gets the layer's process groups; its hash stays its own."""

        def __eq__(cls, other):
            return other is MoELayer or type.__eq__(cls, other) is True

        __hash__ = type.__hash__

    class LocMoELayer(MoELayer, metaclass=_ComparesEqualToMoELayer):
        """``MoELayer`` + LocMoE dispatcher. Needs the LocMoE router (for its topology). The dispatcher
        mode and overlap come from the router's ``dispatcher`` (a mode string or
        :class:`~locmoe_plugin.comm.settings.DispatcherSettings`; default hierarchical, overlap off)."""

        def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, **kwargs):
            router_spec = getattr(submodules, "router", None)
            dispatcher = DispatcherSettings.of(getattr(router_spec, "keywords", {}).get("dispatcher"))
            validate_parallel_config(config, dispatcher.overlap)
            super().__init__(config, submodules=submodules, layer_number=layer_number,
                             pg_collection=pg_collection, **kwargs)
            if not isinstance(self.router, LocMoEMegatronRouter):
                raise ConfigError(
                    "LocMoELayer needs the LocMoE router: MoESubmodules(router=partial(LocMoEMegatronRouter, ...))"
                )
            pgc = pg_collection
            if pgc is None:
                from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

                pgc = get_default_pg_collection()
            self.token_dispatcher = make_dispatcher_class()(
                self.num_local_experts, self.local_expert_indices, config, pgc,
                self.router.topology, self.router.dispatcher_settings,
            )
            # the router's EP-wide counts ride in the dispatcher's count exchange where the math allows
            self.token_dispatcher.fold_router_counts(self.router)

        def route(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None):
            """The LocMoE router's index form ``(weights [s, k], expert_ids [s, k])``, which this layer's
            dispatcher takes in place of Megatron's dense ``(probs, routing_map)``."""
            return self.router.route_indices(hidden_states, padding_mask, dispatch_follows=True)

        if _cuda_graph_route_decorator is not None:  # as MoELayer.route: partial CUDA graphs can skip it
            route = _cuda_graph_route_decorator("route")(route)

    return LocMoELayer
