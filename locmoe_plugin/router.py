"""The framework-free LocMoE router: gate -> capacity -> routing -> losses -> telemetry.

The Megatron and DeepSpeed adapters wrap this one module, so both frameworks get identical math. It
takes its topology and expert-parallel group as arguments and reads no global state in forward.

Hash routing (``routing="hash"``) builds no gate: ``forward`` takes the token ids, the experts come from
:func:`locmoe_plugin.routing.hash_experts`, and no loss is computed (there are no gate probabilities for
the aux or z-loss and no gate to teach locality; ``aux_loss_coeff`` is accepted and unused).

Collectives in forward (all on the EP group, all ranks call them in the same order):
  * the first forward (and the first after :meth:`LocMoERouter.bind`): one all-gather of a fingerprint of
    the config, the input's dtype and last dimension (:mod:`locmoe_plugin.agreement`); ranks that
    disagree raise the same error naming the setting, before any other collective;
  * ``aux_loss_scope="ep_group"`` with an aux-loss coefficient > 0, or with ``expert_bias_rate > 0`` or a
    ``cross_node_budget`` in a training forward under grad: one all-reduce of ``n + 1`` numbers (per-expert
    pairs, ranks with non-finite logits; plus the cross-node pairs with a budget), shared by all three -
    none when the counts are folded into the dispatcher's count exchange (:meth:`LocMoERouter.fold_counts_with`,
    :mod:`locmoe_plugin.folded_counts`; then ``RouterOutput.pending`` is completed by the dispatcher);
  * capacity ``bound``/``adaptive``: a tiny all-reduce at estimation steps only.

LocMoE+ (``routing="hybrid"``) ranks its expert choice by the unbiased token-expert cosine; the locality
bias moves only the token choice (see ``forward``).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .agreement import check_agreement, config_settings, group_active
from .budget import CrossNodeBudget
from .capacity import CapacityController
from .config import ConfigError, LocMoEConfig, unconstrained_share
from .folded_counts import FoldedCounts
from .gate import build_gate, row_norm
from .losses import locality_loss, switch_aux_loss, z_loss
from .node_price import NodeRows
from .routing import Assignment, count_valid_ids, route
from .row_bias import add_row_bias
from .telemetry import RoutingStats
from .topology import Topology


@dataclass
class RouterOutput:
    """What one router call produces.

    Attributes:
        assignment: index form (``expert_ids``/``weights`` ``[s, k]``; -1 / 0 for dropped pairs).
        probs: ``[s, n]`` fp32 full softmax of the gate logits (hash routing: 1/k on each requested
            expert).
        logits: ``[s, n]`` fp32 gate logits; None for hash routing (no gate).
        losses: scaled loss tensors ``{"aux", "locality", "z"}`` (each 0-d, differentiable).
        stats: telemetry of this call.
        total: the sum of the losses that can be non-zero (0-d), or None when there is none; the
            locality loss of a single node (identically 0) is left out of it, so its backward costs nothing.
        pending: with the counts folded into the dispatcher's count exchange
            (:meth:`LocMoERouter.fold_counts_with`), the count-dependent work (aux loss, expert-bias and
            budget steps) left to the dispatcher; ``losses`` gets its ``"aux"`` and ``total`` is set when
            it completes. None otherwise.
    """

    assignment: Assignment
    probs: torch.Tensor
    logits: torch.Tensor | None
    losses: dict[str, torch.Tensor]
    stats: RoutingStats
    total: torch.Tensor | None = None
    pending: FoldedCounts | None = None

    @property
    def total_loss(self) -> torch.Tensor:
        """Sum of the scaled losses (a 0-d tensor, 0 when every coefficient is 0)."""
        if self.pending is not None and not self.pending.done:
            raise RuntimeError("the router's losses wait for the dispatcher's count exchange: pass "
                               "RouterOutput.pending to TokenDispatcher.forward / start_counts first")
        if self.total is not None:
            return self.total
        if not self.losses:
            return self.probs.new_zeros(())
        return sum(self.losses.values())

    def to_megatron(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs [s, n], routing_map [s, n] bool)`` as Megatron's router contract returns them."""
        return self.assignment.to_megatron()


def validate_against_topology(config: LocMoEConfig, topology: Topology) -> None:
    """Checks that need both the config and the placement; raise before any collective."""
    if topology.num_experts != config.num_experts:
        raise ConfigError(
            f"topology was built for {topology.num_experts} experts but the config has "
            f"num_experts={config.num_experts}; build both from the same expert count"
        )
    if (config.cross_node_budget is not None and config.budget_mechanism == "node" and topology.num_nodes > 1
            and topology.experts_per_node < config.topk):
        raise ConfigError(
            f"budget_mechanism='node' keeps a token on its own node unless another node is worth its price, so "
            f"every node must host at least topk={config.topk} experts; the {topology.num_nodes} nodes host "
            f"{topology.experts_per_node} each: use budget_mechanism='selection', lower topk, or place at least "
            f"{config.topk} experts per node (more experts, or more EP ranks per node)"
        )
    if config.cross_node_budget is not None and config.budget_mechanism == "node" and topology.num_nodes > 2:
        warnings.warn(
            f"budget_mechanism='node' on {topology.num_nodes} nodes: each token reaches its own node and at most "
            f"one other, a node limit of 2 on top of the budget; measured on 4 emulated nodes x 1 (budget 0.3, "
            f"with the expert bias 0.001, 3 seeds, docs/locality.md) it cost +4.6 % validation loss against +1.05 % "
            f"for 'selection'. "
            f"Prefer budget_mechanism='selection' on more than 2 nodes",
            stacklevel=3,
        )
    m = config.max_nodes_per_token
    if m is not None:
        if m > topology.num_nodes:
            raise ConfigError(
                f"max_nodes_per_token={m} exceeds the {topology.num_nodes} node(s) of the expert-parallel "
                f"group; use at most {topology.num_nodes} (or None for no limit)"
            )
        if config.topk > m * topology.experts_per_node:
            raise ConfigError(
                f"topk={config.topk} cannot fit on max_nodes_per_token={m} node(s) of "
                f"{topology.experts_per_node} experts each; raise max_nodes_per_token or lower topk"
            )


class LocMoERouter(nn.Module):
    """LocMoE / LocMoE+ router for the tokens of one rank.

    Args:
        config: routing settings.
        topology: placement of the EP group (default: one rank, one node: the locality loss is 0).
        group: the EP process group for the global aux loss and capacity agreement (None: local only).
        init_method: initialiser of the dense gate's weight ``[n, d]`` (e.g. Megatron's init method).
        device: where the dense gate's weight lives.

    ``gate`` is None for hash routing.
    """

    def __init__(
        self,
        config: LocMoEConfig,
        topology: Topology | None = None,
        group=None,
        init_method: Callable[[torch.Tensor], object] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        topology = topology or Topology.single_node(1, config.num_experts)
        validate_against_topology(config, topology)
        self.config = config
        self.topology = topology
        self.group = group
        self.gate = None if config.routing == "hash" else build_gate(config, init_method=init_method, device=device)
        self.capacity = CapacityController(config, group)
        self.register_buffer("expert_to_node", topology.expert_to_node.clone(), persistent=False)
        self.register_buffer("local_expert_mask", topology.local_expert_mask(), persistent=False)
        # the count of a telemetry counter that is 0 by construction (dropless: drops; one node: crossing
        # pairs): one shared 0-d int64 zero, never written, instead of a new tensor (a kernel) per forward;
        # a stats field that *is* this tensor is 0 by construction (the Megatron adapter sums no such field)
        self.register_buffer("zero_count", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.register_parameter("locality_bias", self._new_locality_bias(topology, device))
        # loss-free balancing offsets (config.expert_bias_rate); fp32, saved with the model
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, device=device)
                             if config.expert_bias_rate > 0 else None)
        # cross-node traffic budget: the dual variable (locality-loss coefficient or selection margin) of
        # docs/locality.md
        self.budget = None if config.cross_node_budget is None else CrossNodeBudget(
            config.cross_node_budget_on(topology.num_nodes), device=device, mechanism=config.budget_mechanism,
            warmup=config.cross_node_budget_warmup, start_share=unconstrained_share(topology.num_nodes))
        self._set_node_rows(topology)
        #: the locality loss's coefficient in the last forward (float, or 0-d fp32 with the "loss" budget)
        self.last_locality_coeff: float | torch.Tensor = config.locality_loss_coeff
        self.last_stats: RoutingStats | None = None
        #: whether the ranks of ``group`` agreed on the settings (checked at the first forward)
        self._settings_checked = False
        self._group_sums: tuple | None = None  # (group, whether the counts are all-reduced over it)
        #: whether the EP group's counts may come from a dispatcher's count exchange (fold_counts_with)
        self.folds_counts = False

    def _set_node_rows(self, topology: Topology) -> None:
        """The "node" budget's layout tables (:class:`~locmoe_plugin.node_price.NodeRows`) as buffers next to
        ``expert_to_node`` (they follow ``.to()``); other mechanisms keep none."""
        if self.budget is None or self.budget.mechanism != "node":
            return
        rows = NodeRows(self.expert_to_node, topology.node, topology.num_nodes)
        for name in ("experts_by_row", "expert_row", "remote_row"):
            self.register_buffer(name, getattr(rows, name), persistent=False)

    def _new_locality_bias(self, topology: Topology, device) -> nn.Parameter | None:
        """``[ep_size, n]`` zeros when ``config.locality_bias`` and the EP group has several ranks."""
        if not self.config.locality_bias or topology.ep_size < 2:
            return None
        return nn.Parameter(torch.zeros(topology.ep_size, self.config.num_experts, device=device))

    def bind(self, topology: Topology, group=None) -> None:
        """Place the router on an expert-parallel group known only after construction (DeepSpeed
        creates its groups later): new topology (locality mask, cross-node counts) and group."""
        validate_against_topology(self.config, topology)
        old = self.locality_bias
        if (None if old is None else old.shape[0]) != (topology.ep_size if self.config.locality_bias and
                                                        topology.ep_size > 1 else None):
            raise ConfigError(
                f"the router was built for {self.topology.ep_size} expert-parallel ranks and its locality "
                f"bias has one row per rank; bind() got {topology.ep_size}: build the router with a topology "
                f"of the final EP size (e.g. Topology.single_node(ep_size, n)) before creating the optimizer"
            )
        self.topology = topology
        self.group = group
        self.capacity.group = group
        self._settings_checked = False
        self.folds_counts = False  # decided again for the new group (fold_counts_with)
        device = self.expert_to_node.device
        self.expert_to_node = topology.expert_to_node.to(device)
        self.local_expert_mask = topology.local_expert_mask().to(device)
        if self.budget is not None:  # a default budget and the warm-up's start follow the new layout
            self.budget.budget = self.config.cross_node_budget_on(topology.num_nodes)
            self.budget.start_share = unconstrained_share(topology.num_nodes)
        self._set_node_rows(topology)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A checkpoint saved without loss-free balancing (or one of Megatron's ``TopKRouter``) loads into a
        router with it: the offsets start at zero, as in a fresh router. A checkpoint of this router saved
        with the other gate, or with / without the learned locality bias, is one error naming the settings
        it was saved with (LocMoE+ changed its defaults from GrAP with the locality loss to the dense
        gate with the cross-node budget), also for ``strict=False``."""
        if self.expert_bias is not None:
            state_dict.setdefault(prefix + "expert_bias", torch.zeros_like(self.expert_bias))
        if prefix + "_extra_state" in state_dict:  # a LocMoE router's checkpoint (strict or not: a gate
            # that does not load routes untrained)
            error_msgs.extend(self._settings_mismatch(state_dict, prefix))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _settings_mismatch(self, state_dict, prefix) -> list[str]:
        """Messages for a LocMoE router checkpoint whose gate or locality bias this router does not have."""
        dense_here = self.gate is not None and hasattr(self.gate, "weight")
        dense_there = prefix + "gate.weight" in state_dict
        bias_here, bias_there = self.locality_bias is not None, prefix + "locality_bias" in state_dict
        msgs = []
        if dense_here and not dense_there:
            msgs.append(f"{prefix}gate.weight: the checkpoint's router has no learned gate (it was saved with "
                        f"gate='grap', e.g. LocMoE+ before its defaults changed); load it with gate='grap' "
                        f"(Megatron --locmoe-gate grap; for that LocMoE+ also --locmoe-locality-loss-coeff 0.01 "
                        f"--locmoe-resonance-mass 0)")
        elif dense_there and not dense_here and self.gate is not None:
            msgs.append(f"{prefix}gate.weight: the checkpoint's router has a learned gate; load it with "
                        f"gate='dense' (Megatron --locmoe-gate dense)")
        if bias_there and not bias_here:
            msgs.append(f"{prefix}locality_bias: the checkpoint's router was saved with the learned locality bias; "
                        f"load it with locality_loss_coeff > 0 (e.g. 0.01; Megatron --locmoe-locality-loss-coeff "
                        f"0.01), or locality_bias=True")
        elif bias_here and not bias_there:
            msgs.append(f"{prefix}locality_bias: the checkpoint's router has no locality bias; load it with "
                        f"locality_bias=False (Megatron --locmoe-locality-bias off) or the cross-node budget")
        return msgs

    def get_extra_state(self) -> dict:
        """Saved with the module: the capacity controller's delta / factor / step count, so a resumed
        run keeps its ``bound`` / ``adaptive`` capacity, and the cross-node budget's multiplier."""
        state = {"capacity": self.capacity.state_dict()}
        if self.budget is not None:
            state["budget"] = self.budget.state_dict_extra()
        return state

    def set_extra_state(self, state) -> None:
        """A checkpoint without budget state (saved without a budget) leaves the multiplier at 0."""
        if state:
            if not isinstance(state, dict):
                raise ConfigError(f"the checkpoint's LocMoE router state is a {type(state).__name__}, not a dict: "
                                  f"the checkpoint is damaged or not a LocMoE router's")
            self.capacity.load_state_dict(state.get("capacity", {}))
            if self.budget is not None:
                self.budget.load_state_dict_extra(state.get("budget", {}))

    # ------------------------------------------------------------------------------------------
    def _global_counts(self, counts: torch.Tensor, bad: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``[n]`` fp32 copy of the per-expert counts, ``bad`` (0-d: ranks whose logits are not all finite;
        None when not asked for, see :attr:`_reads_bad`) and, with a cross-node budget, the pairs among the
        counts that cross nodes (0-d; else None), summed over the EP group when asked: one all-reduce of
        ``n`` numbers plus one per extra. fp32 holds integer counts exactly up to 2**24 per expert (the aux
        loss, the expert bias and the budget read them as fp32); the local int64 counts stay for the
        telemetry. Which extras travel depends only on the config and topology, alike on every rank."""
        counts_f = counts.to(torch.float32)
        extras = [] if bad is None else [bad.to(torch.float32).reshape(1)]
        if self._budget_acts:
            # remote experts: the local mask's complement, read by masked_fill (no per-forward mask kernel)
            extras.append(counts_f.masked_fill(self.local_expert_mask, 0).sum().reshape(1))
        packed = torch.cat([counts_f, *extras]) if extras else counts_f
        if self._sums_over_group():
            dist.all_reduce(packed, group=self.group)
        if not extras:
            return packed, None, None
        n = self.config.num_experts
        return packed[:n], (None if bad is None else packed[n]), (packed[-1] if self._budget_acts else None)

    def fold_counts_with(self, dispatcher_group, one_node_too: bool = False) -> bool:
        """Take the EP group's counts from the count exchange of a dispatcher on ``dispatcher_group`` (one
        all-reduce per forward fewer; :mod:`locmoe_plugin.folded_counts`) when the math allows:
        ``aux_loss_scope="ep_group"`` on a group of several ranks, and ``dispatcher_group`` is this router's
        group (any capacity: the router's own counts ride in the exchange), and the group spans nodes or
        ``one_node_too``. A decision from settings only, alike on every EP rank. On one node the router keeps
        its all-reduce by default: there the fold saves an NVLink all-reduce of ``n`` numbers, and a one-node
        layer measured no faster with it (docs/overlap.md, "The router's counts ride in the count exchange");
        across nodes it saves a collective on the inter-node link. ``one_node_too``: a dispatcher that
        exchanges no counts on one node but gathers the routing itself
        (:attr:`~locmoe_plugin.comm.TokenDispatcher.gathers_routing`), where the fold removes the router's
        all-reduce and adds no collective.
        Then a forward called with ``fold_counts=True`` that needs the counts returns them pending
        (``RouterOutput.pending``), and its caller must hand that to the dispatcher's
        :meth:`~locmoe_plugin.comm.TokenDispatcher.start_counts` (or ``forward(..., folded=...)``) before
        reading the losses; other forwards all-reduce as before. Returns whether it folds."""
        self.folds_counts = (self._sums_over_group() and dispatcher_group is self.group
                             and (self.topology.num_nodes > 1 or bool(one_node_too)))
        return self.folds_counts

    def _sums_over_group(self) -> bool:
        """Whether :meth:`_global_counts` all-reduces: ``aux_loss_scope="ep_group"`` on a group of several
        ranks. Decided once per group object (a process group's size is fixed), not in every forward."""
        cached = self._group_sums
        if cached is None or cached[0] is not self.group:
            cached = self._group_sums = (self.group, self.config.aux_loss_scope == "ep_group"
                                         and group_active(self.group))
        return cached[1]

    @property
    def _reads_bad(self) -> bool:
        """Whether forwards count the ranks with non-finite logits: only the expert bias and the budget read
        it (to skip their step on such a batch). A setting, not the training state, so the all-reduce has
        the same size on every rank in every forward."""
        return self.expert_bias is not None or self._budget_acts

    @property
    def _budget_acts(self) -> bool:
        """The cross-node budget only acts across nodes: on one node no pair crosses, its controller would stay
        at 0, so it costs nothing there (no offset, no count, no update; every EP rank decides alike)."""
        return self.budget is not None and self.topology.num_nodes > 1

    def _selection_bias(self) -> torch.Tensor | None:
        """``[n]`` fp32 offsets of the selection scores: the expert bias plus the "selection" budget's local
        preference (None when neither is on)."""
        offset = self.budget.selection_offset(self.local_expert_mask) if self._budget_acts else None
        if offset is None:
            return self.expert_bias
        return offset if self.expert_bias is None else offset + self.expert_bias

    def _node_price(self) -> tuple | None:
        """The "node" budget's ``(experts_by_row, expert_row, remote_row, lam)`` for :func:`route`; None for
        other mechanisms, and on one node (nothing to price: the selection is the plain top-k)."""
        price = self.budget.node_price() if self._budget_acts else None
        if price is None:
            return None
        return self.experts_by_row, self.expert_row, self.remote_row, price

    def _apply_group_counts(self, losses: dict[str, torch.Tensor], counts: torch.Tensor, bad: torch.Tensor | None,
                            cross_pairs: torch.Tensor | None, *, probs: torch.Tensor, valid: torch.Tensor | None,
                            update_bias: bool, update_budget: bool) -> None:
        """What the EP group's counts feed (``counts [n]`` fp32, ``bad`` / ``cross_pairs`` 0-d fp32 or None):
        the aux loss into ``losses`` (first, wherever the other losses already are), the expert-bias and the
        budget steps. The all-reduce path and the folded one (:meth:`_finish_folded`) run this same code."""
        c = self.config
        if c.aux_loss_coeff > 0:  # total pairs = the counts' sum (every routed, counted pair is in them)
            rest = dict(losses)
            losses.clear()  # the same dict object (the telemetry holds it), the aux loss first
            losses["aux"] = switch_aux_loss(probs, counts, None, c.aux_loss_coeff, valid)
            losses.update(rest)
        # both after this batch's selection: the next forward routes with the new offsets; a batch with
        # non-finite logits on any rank moves neither (its routing is noise)
        if update_bias:
            self._update_expert_bias(counts, bad)
        if update_budget:
            self.budget.update(cross_pairs, counts.sum() * (bad == 0))  # 0 pairs: no step

    def _finish_folded(self, output: RouterOutput, counts: torch.Tensor, bad: torch.Tensor | None,
                       cross_pairs: torch.Tensor | None, **kwargs) -> None:
        """:class:`FoldedCounts`' completion: :meth:`_apply_group_counts` on ``output``'s losses, then its total
        (summed in the same order as a forward that all-reduced: aux, locality, z)."""
        self._apply_group_counts(output.losses, counts, bad, cross_pairs, **kwargs)
        output.total = self._loss_total(output.losses)

    def _loss_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The sum of the losses that can be non-zero, in ``losses``' order (None: none); one node's
        locality loss (identically 0) is left out."""
        total = None
        for key, loss in losses.items():
            if key == "locality" and self.topology.num_nodes == 1:
                continue  # identically 0 (kept in `losses` for the log and for gradient checks)
            total = loss if total is None else total + loss
        return total

    def _fold(self, counts: torch.Tensor, bad: torch.Tensor | None, probs: torch.Tensor,
              valid: torch.Tensor | None, update_bias: bool, update_budget: bool) -> FoldedCounts:
        """This forward's :class:`FoldedCounts`: its extra bins are what :meth:`_global_counts` would all-reduce,
        as integers: ``counts [n]`` int64 (requested pairs per expert, padding left out), then the non-finite
        flag when read."""
        extra = counts if bad is None else torch.cat([counts, bad.reshape(1)])  # bool promoted to int64
        finish = functools.partial(self._finish_folded, probs=probs, valid=valid, update_bias=update_bias,
                                   update_budget=update_budget)
        return FoldedCounts(extra, self.topology, reads_bad=bad is not None, crosses=self._budget_acts,
                            finish=finish)

    @torch.no_grad()
    def _update_expert_bias(self, counts: torch.Tensor, bad: torch.Tensor) -> None:
        """``b += rate * sign(mean - load)``: under-loaded experts gain, over-loaded ones lose. Only in
        training forwards under grad (not in evaluation, nor in the no-grad first pass of activation
        checkpointing, whose recompute updates once). A batch with non-finite logits on any rank of the
        group (``bad > 0``) moves nothing: its routing is noise, and one such batch must not shift the
        offsets for the rest of the run (no host sync: the step is multiplied by 0)."""
        load = counts.float()
        step = torch.sign(load.mean() - load) * (bad == 0)
        self.expert_bias.add_(step, alpha=self.config.expert_bias_rate)

    def forward(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, fold_counts: bool = False) -> RouterOutput:
        """Route ``hidden [..., d]`` (flattened to ``[s, d]``).

        ``token_ids [...]`` (the leading shape of ``hidden``, any integer dtype) is required by hash
        routing and ignored by the other modes. ``valid [...]`` bool marks the tokens the losses count
        (padding excluded, as Megatron's TopKRouter does); every token is still routed and dispatched.
        ``fold_counts=True``: the caller passes ``RouterOutput.pending`` to the dispatcher's count exchange
        (a layer that dispatches next, every EP rank alike); folded only where :meth:`fold_counts_with`
        allowed it.
        """
        c = self.config
        if not self._settings_checked:
            # before this forward's first collective: ranks that disagree raise together, none hangs
            check_agreement({**config_settings(c), "input dtype": str(hidden.dtype),
                             "input last dimension": hidden.shape[-1] if hidden.dim() else None},
                            self.group, where="LocMoE router")
            self._settings_checked = True
        if hidden.dim() < 1 or hidden.shape[-1] != c.hidden_size:
            raise ValueError(
                f"hidden has shape {tuple(hidden.shape)}, but the router was built for hidden_size="
                f"{c.hidden_size}: pass [..., {c.hidden_size}] (tokens x hidden), or build the router with "
                f"the model's hidden size"
            )
        # [s, d] view made only where it is read (GrAP reads [..., d] directly: one op less per forward)
        x = hidden if hidden.dim() == 2 else None
        s = hidden.numel() // c.hidden_size
        if c.routing == "hash":
            x = hidden.reshape(-1, c.hidden_size)
            if token_ids is None:
                raise ValueError(
                    "routing='hash' picks experts from the token ids: call the router as "
                    "router(hidden, token_ids) with one id per token"
                )
            if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
                raise TypeError(
                    f"token_ids has dtype {token_ids.dtype}: hash routing needs integer token ids "
                    f"(torch.long), not values that would be truncated; pass the tokenizer's ids"
                )
            if token_ids.numel() != s:
                raise ValueError(
                    f"token_ids has {token_ids.numel()} ids for {s} tokens: pass one id per token, "
                    f"shaped like hidden without its last dimension"
                )
            token_ids, logits = token_ids.reshape(-1).to(x.device), None
        elif c.gate == "grap":
            token_ids, logits = None, self.gate(hidden)  # [s, n] from any leading shape
        else:
            x = hidden.reshape(-1, c.hidden_size)
            token_ids, logits = None, self.gate(x)
        if valid is not None:
            valid = valid.reshape(-1).to(device=hidden.device, dtype=torch.bool)
            if valid.numel() != s:
                raise ValueError(f"valid has {valid.numel()} entries for {s} tokens: one per token")

        if self.expert_bias is not None and self.expert_bias.dtype != torch.float32:
            # half-precision wrappers (Megatron's Float16Module, .half()) cast buffers; increments of
            # ~1e-3 vanish in bf16, so the offsets live in fp32 (as Megatron keeps its expert bias)
            self.expert_bias.data = self.expert_bias.data.float()
        if self.budget is not None and self.budget.strength.dtype != torch.float32:
            self.budget.float()  # likewise: the preference's steps (~1e-3) need fp32
        # the capacity estimate reads the token features' own affinity, without the locality bias
        hybrid = c.routing == "hybrid"
        needs_affinity = hybrid or self.capacity.needs_affinity(self.training)
        if x is None and needs_affinity:
            x = hidden.reshape(-1, c.hidden_size)
        # the tokens' norms, read once: the hybrid with the locality bias takes a second affinity below
        norm = row_norm(x) if needs_affinity else None
        affinity = self.gate.affinity(x, logits, norm) if needs_affinity else None
        capacity = self.capacity.capacity(s, affinity, self.training, valid=valid)
        choice_affinity = affinity  # the hybrid's token choice; its expert choice ranks by `affinity`
        if self.locality_bias is not None:
            # one kernel: logits + scale * bias[rank] (the parameter follows the module's dtype; logits are
            # fp32); its backward sums the logits' gradient over tokens into the row (row_bias.py)
            logits = add_row_bias(logits, self.locality_bias, self.topology.ep_rank, c.locality_bias_scale)
            # the bias is a logit offset: the hybrid's token choice uses the cosine of the biased logits (the
            # gate's per-token, per-expert normalisation applied to the offset too; added to the cosine as
            # is, an offset of order 1 outweighs every token's content, cosines ~0.1). Its expert choice
            # still ranks by the unbiased cosine: divided by ||x||, the offset would put small-norm tokens
            # first whatever their content.
            choice_affinity = self.gate.affinity(x, logits, norm) if hybrid else None

        node_limit = None
        if c.max_nodes_per_token is not None and c.max_nodes_per_token < self.topology.num_nodes:
            node_limit = (self.expert_to_node, self.topology.num_nodes, c.max_nodes_per_token)

        assignment, probs = route(
            logits,
            topk=c.topk,
            mode=c.routing,
            renormalize=c.renormalize,
            renormalize_kept=c.renormalize_kept,
            affinity=choice_affinity,
            expert_choice_affinity=affinity if hybrid else None,
            resonance_mass=c.resonance_mass,
            capacity=capacity,
            drop_policy=c.drop_policy,
            node_limit=node_limit,
            token_ids=token_ids,
            num_experts=c.num_experts,
            seed=c.hash_seed,
            # with the locality loss, capacity follows each node's share of this rank's demand
            capacity_nodes=(self.expert_to_node, self.topology.num_nodes)
            if capacity is not None and (c.locality_loss_coeff > 0 or self.budget is not None)
            and self.topology.num_nodes > 1 else None,
            expert_bias=self._selection_bias(),
            node_price=self._node_price(),
        )

        requested = assignment.requested_per_expert()
        losses = {}
        # mu of this forward: the "loss" budget's lam from before this forward's update, plus the fixed mu
        budget_mu = None if self.budget is None else self.budget.locality_coeff()
        locality_coeff = c.locality_loss_coeff if budget_mu is None else budget_mu + c.locality_loss_coeff
        learning = self.training and torch.is_grad_enabled()
        update_bias = self.expert_bias is not None and learning
        update_budget = self._budget_acts and learning
        pending = None
        if logits is not None and (c.aux_loss_coeff > 0 or update_bias or update_budget):
            bad = (~torch.isfinite(logits)).any() if self._reads_bad else None
            if valid is None:
                local_counts = requested
            else:
                ids = torch.where(valid.unsqueeze(1), assignment.requested_ids, -1)  # padding: not counted
                local_counts = count_valid_ids(ids, c.num_experts)
            if fold_counts and self.folds_counts:  # the dispatcher's count exchange completes it (same numbers)
                pending = self._fold(local_counts, bad, probs, valid, update_bias, update_budget)
            else:
                counts, bad, cross_pairs = self._global_counts(local_counts, bad)
                self._apply_group_counts(losses, counts, bad, cross_pairs, probs=probs, valid=valid,
                                         update_bias=update_bias, update_budget=update_budget)
        self.last_locality_coeff = locality_coeff
        if c.locality_loss_coeff > 0 or budget_mu is not None:
            if self.topology.num_nodes > 1 and budget_mu is not None:  # a tensor coefficient: no host sync
                unit = locality_loss(logits, self.local_expert_mask, 1.0, valid)
                losses["locality"] = unit * locality_coeff.to(unit.dtype)
            elif self.topology.num_nodes > 1:
                losses["locality"] = locality_loss(logits, self.local_expert_mask, c.locality_loss_coeff, valid)
            else:  # every expert is local: the loss is 0 with zero gradient; a sum over no tokens gives that
                losses["locality"] = logits[:0].sum()
        if c.z_loss_coeff > 0:
            losses["z"] = z_loss(logits, c.z_loss_coeff, valid)

        # telemetry in few kernels: dropless -> kept = requested, nothing dropped; one node -> no remote pair
        if capacity is None:
            kept_per_expert, dropped = requested, self.zero_count
        else:
            kept_per_expert = assignment.tokens_per_expert()
            dropped = (~assignment.kept).sum()
        if self.topology.num_nodes > 1:
            cross = kept_per_expert.masked_fill(self.local_expert_mask, 0).sum()
        else:
            cross = self.zero_count
        stats = RoutingStats(
            tokens_per_expert=kept_per_expert,
            requested_per_expert=requested,
            num_tokens=s,
            dropped_pairs=dropped,
            cross_node_pairs=cross,
            capacity=capacity,
            capacity_factor=self.capacity.factor,
            delta=self.capacity.delta,
            q_hat=self.capacity.q_hat,
            capacity_deferred=self.capacity.deferred,
            losses=losses,  # detached when read (RoutingStats.to_dict): no op per loss here
        )
        self.last_stats = stats
        if pending is not None:  # the total is summed when the counts arrive, with the aux loss first
            out = RouterOutput(assignment, probs, logits, losses, stats, None, pending)
            pending.output = out
            return out
        return RouterOutput(assignment, probs, logits, losses, stats, self._loss_total(losses))

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"routing={c.routing}, gate={c.gate if self.gate is not None else None}, topk={c.topk}, "
            f"capacity={c.capacity}, "
            f"topology=({self.topology.describe()})"
        )
