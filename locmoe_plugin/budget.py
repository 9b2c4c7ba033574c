"""Cross-node traffic budget: a dual variable that holds the EP group's cross-node share at a target.

``LocMoEConfig.cross_node_budget = B`` asks that at most a share ``B`` of the expert-parallel group's
routed (token, expert) pairs go to an expert on another node. The router keeps one scalar ``lam >= 0``,
the Lagrange multiplier of the constraint ``share <= B``, and ``LocMoEConfig.budget_mechanism`` says
where it acts:

* ``"loss"``: ``lam`` is the coefficient of the locality loss, ``lam * mean_t(-log p_local(t))`` (added
  to an explicit ``locality_loss_coeff``), with the learned locality bias on. The gate itself learns to
  put probability mass on the token's node, so the combine weights follow the selection; the bias is
  what lets the loss move traffic when every rank sees alike data (see ``LocMoEConfig.locality_bias``).
* ``"selection"``: ``lam`` is a margin added to the local experts' *selection* scores,
  ``select_score[t, i] = score[t, i] + lam * 1{expert i is on token t's node}`` (``score`` = gate
  probability, or affinity for "hybrid"; plus the expert bias, if any). The combine weights stay the
  unbiased probabilities: a remote expert is picked over a local one only when its probability is higher
  by more than ``lam``, and ``lam >= 1`` (probabilities) forces full locality. The gate is not taught
  anything, so locally picked experts can carry small renormalised weights.
* ``"node"``: ``lam`` is a price paid once per remote *node* a token is sent to, not per remote pair
  (:mod:`locmoe_plugin.node_price`): the hierarchical dispatcher sends one copy of a token per destination
  node, so inter-node bytes follow (token, remote node) copies, and a token's further experts on a node it
  already reaches cost no bytes. A token takes its top-k over its own node plus the one remote node whose
  experts raise the sum of its top-k selection scores by the most, if by more than ``lam``; else over its
  own node only (with more than 2 nodes also a limit of 2 nodes per token). Combine weights as for
  "selection": the unbiased probabilities of the chosen experts. Needs at least k experts per node.
  The controller still measures the *pair* share, so the budget keeps its meaning across mechanisms.

Update (projected dual ascent), after every training forward under grad, from the counts the router
already all-reduces over the EP group for the aux loss and the expert bias (one more number rides on that
tensor: no extra collective):

    share = sum_ranks(cross-node pairs) / sum_ranks(routed pairs)        (requested pairs, before capacity)
    lam  <- clip(lam + rate * (share - B), 0, max_strength)

with ``rate`` / ``max_strength`` per mechanism (:data:`RATES`, :data:`MAX_STRENGTHS`). The loss of a
forward uses the ``lam`` from before its own update (``mu_t = lam_t``); the selection of a forward uses it
likewise. Every rank of the EP group sees the same reduced numbers and applies the same fp32 operations,
so ``lam`` stays equal on all of them without being communicated; it is saved in the router's extra state.
Data-parallel replicas of the EP group keep their own ``lam`` (as with the expert bias). When the share is
below the budget without help (e.g. one node), ``lam`` stays at 0: the budget is an upper bound, not a
target to reach from below.

Warm-up (``LocMoEConfig.cross_node_budget_warmup = W > 0``): the update's target is not ``B`` from the
start but moves linearly, over the controller's first ``W`` updates, from the unconstrained share
``S0 = (N-1)/N`` of the EP group's N nodes (what content-only routing sends across nodes: no constraint)
down to ``B``:

    target(t) = B + (S0 - B) * max(0, 1 - t / W)        t = updates so far (0 at the first one)
    lam      <- clip(lam + rate * (share - target(t)), 0, max_strength)

so the first update aims at ``S0`` and the ``W``-th and later ones at ``B`` (a budget above ``S0``: ``B``
throughout). Linear rather than cosine: the target falls by the same ``(S0 - B) / W`` per step, so the
integrating controller trails it by a constant lag (a cosine's steepest slope, mid-way, is pi/2 times the
linear one's and its flat end spends the last steps barely moving), and the schedule reads directly off
the logged share. ``t`` is an int64 device counter (capture-safe, immune to half-precision casts of the
module), advanced by every update, saved with ``lam``. ``W = 0`` takes the path without it: the update is
bitwise the one without warm-up.
"""

from __future__ import annotations

import torch

from .config import BUDGET_MECHANISMS

MECHANISMS = BUDGET_MECHANISMS

#: Step of the dual update per unit of share error, per mechanism.
#:
#: "selection": top-k probabilities of a trained gate are ~0.05-0.5 apart, so holding a low budget can
#: take ``lam`` ~1. At 0.2 a share 0.4 above the budget moves ``lam`` by 0.08 per step: on a synthetic
#: peaked gate (tests) the share settles within ~40 steps; noise of +-0.02 in one batch's share (a few
#: thousand pairs) moves ``lam`` by 0.004.
#:
#: "loss": useful locality coefficients are mu ~0.003-0.3 (0.03 left a share of 0.06 and 0.3 a share of 0
#: at EP = 4 over 2 nodes; 0.1 gave 0 in the CPU demo). The share answers a change of mu only as fast as
#: the optimizer moves the locality bias (Adam: ~``lr * locality_bias_scale`` per step, tens of steps to
#: an offset of order 1), so a fast integrator winds up far past the needed mu while the bias catches up.
#: At 0.01 a share 0.4 above the budget raises mu by 0.004 per step (0.03 in ~8 steps, 0.1 in ~25), a
#: share 0.1 below it lowers mu by 0.001 per step, and batch noise of +-0.02 moves mu by 2e-4.
#:
#: "node": ``lam`` is a price in the same units, probability mass, and of the same order: a token's gain from a
#: remote node is the selection mass its best experts there add over the own node's experts they displace,
#: ~0.05-0.5 for a trained top-k gate like the "selection" margin's differences, so the same rate (on the
#: synthetic peaked gate of the tests the share settles within ~40 steps as well).
RATES = {"selection": 0.2, "loss": 0.01, "node": 0.2}
#: Upper clip of ``lam``, per mechanism. "selection": above 2 every local expert outranks every remote one
#: for scores in [-1, 1] (probabilities and cosine affinities), so larger values change nothing and would
#: only slow the way back. "loss": 0.5, above the mu that gave full locality in every measurement (0.1-0.3);
#: a larger clip only lengthens the wind-down (at most 0.001 per step for a budget of 0.1) after an overshoot.
#: "node": 1.0. A gain is a difference of two sums of k probabilities of one softmax, ``V_m - V_own <= 1 - V_own
#: < 1``, so ``lam = 1`` keeps every token home (full locality) with probability scores; only an expert bias
#: or "hybrid"'s cosine scores can gain more (there 1.0 is the strongest price the controller sets).
MAX_STRENGTHS = {"selection": 2.0, "loss": 0.5, "node": 1.0}


class CrossNodeBudget(torch.nn.Module):
    """The controller of one router.

    Args:
        budget: the largest cross-node share, in [0, 1] (validated by :class:`LocMoEConfig`).
        mechanism: "selection" (``lam`` = margin on the local experts' selection scores), "node" (``lam`` =
            price per remote node a token reaches) or "loss" (``lam`` = locality-loss coefficient); see the
            module docstring.
        rate: step of the update per unit of share error (None: :data:`RATES` of the mechanism).
        max_strength: upper clip of ``lam`` (None: :data:`MAX_STRENGTHS` of the mechanism).
        warmup: ``W``, updates over which the target moves from ``start_share`` down to ``budget`` (0: the
            budget from the first update; validated by :class:`LocMoEConfig`).
        start_share: where the warm-up starts, the unconstrained share ``(N-1)/N`` of the EP group's layout
            (:func:`locmoe_plugin.config.unconstrained_share`; the router sets it again when it is bound to another group).

    Buffers (0-d, not in ``state_dict``; saved through :meth:`state_dict_extra`):
        strength: fp32 ``lam``, the multiplier (margin or loss coefficient).
        share: fp32, the last measured EP-group share (NaN before the first update).
        warmup_step: int64 ``t``, updates counted towards the warm-up (stops at ``W``; stays 0 for ``W = 0``).
    """

    def __init__(self, budget: float, rate: float | None = None, max_strength: float | None = None,
                 device=None, mechanism: str = "selection", warmup: int = 0, start_share: float = 0.5) -> None:
        super().__init__()
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism={mechanism!r}: choose one of {', '.join(MECHANISMS)}")
        self.budget = float(budget)
        self.mechanism = mechanism
        self.rate = float(RATES[mechanism] if rate is None else rate)
        self.max_strength = float(MAX_STRENGTHS[mechanism] if max_strength is None else max_strength)
        self.warmup = int(warmup)
        self.start_share = float(start_share)
        self.register_buffer("strength", torch.zeros((), device=device), persistent=False)
        self.register_buffer("share", torch.full((), float("nan"), device=device), persistent=False)
        self.register_buffer("warmup_step", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.steps = 0

    def target(self) -> torch.Tensor | float:
        """The share the next update aims at: ``budget`` (a float) without warm-up, else ``target(t)`` of the
        module docstring as a 0-d fp32 tensor (computed on the device: no host sync)."""
        if not self.warmup:
            return self.budget
        start = max(self.start_share, self.budget)
        remaining = 1.0 - self.warmup_step.float() / self.warmup  # 1 at t = 0, 0 from t = W on
        # budget + (start - budget) * remaining: exactly the budget once the remaining share is 0
        return remaining * (start - self.budget) + self.budget

    def selection_offset(self, local_expert_mask: torch.Tensor) -> torch.Tensor | None:
        """"selection": ``[n]`` fp32, ``lam`` on the experts of this rank's node (``local_expert_mask [n]``
        bool), 0 else. "loss": None (the selection is left alone)."""
        if self.mechanism != "selection":
            return None
        return local_expert_mask.float() * self.strength.float()

    def node_price(self) -> torch.Tensor | None:
        """"node": ``lam`` itself (0-d fp32, read by this forward's selection before its update), the price of
        a remote node (:func:`locmoe_plugin.node_price.node_priced_topk`). Other mechanisms: None."""
        return self.strength if self.mechanism == "node" else None

    def locality_coeff(self) -> torch.Tensor | None:
        """"loss": a 0-d fp32 copy of ``lam`` (a copy, so the update after the forward leaves the graph's
        saved coefficient alone), the locality loss's coefficient for this forward. "selection": None."""
        if self.mechanism != "loss":
            return None
        return self.strength.float().clone()

    @torch.no_grad()
    def update(self, cross_pairs: torch.Tensor, pairs: torch.Tensor) -> None:
        """One dual step from the EP group's summed ``cross_pairs`` and ``pairs`` (0-d tensors, same on
        every rank). No pairs (every token padding): no step. No host sync: the step is a masked fill."""
        total = pairs.float()
        share = cross_pairs.float() / total.clamp_min(1)
        stepped = (self.strength.float() + self.rate * (share - self.target())).clamp(0.0, self.max_strength)
        has_pairs = total > 0
        self.strength.copy_(torch.where(has_pairs, stepped, self.strength.float()))
        self.share.copy_(torch.where(has_pairs, share, self.share.float()))
        if self.warmup:  # the schedule runs in training forwards, with or without pairs
            self.warmup_step.add_(1).clamp_(max=self.warmup)
        self.steps += 1

    def state_dict_extra(self) -> dict:
        """What a checkpoint keeps: ``{"strength", "share", "steps", "warmup_step", "budget", "mechanism"}`` as
        Python numbers and a string."""
        return {"strength": float(self.strength), "share": float(self.share), "steps": self.steps,
                "warmup_step": int(self.warmup_step), "budget": self.budget, "mechanism": self.mechanism}

    def load_state_dict_extra(self, state: dict) -> None:
        """Restore :meth:`state_dict_extra`'s values. A checkpoint saved with another budget keeps its
        ``lam`` (a warm start; the controller moves it to the new budget). An empty ``state`` (a checkpoint
        saved without a budget), or one saved with another mechanism (a margin is no loss coefficient, nor
        a price per node; checkpoints without a "mechanism" entry were saved by the selection mechanism),
        restarts the controller as a fresh one: ``lam`` = 0 and the warm-up from its start. The warm-up resumes where
        it was (at most this controller's ``W``: a shorter warm-up than the checkpoint's may be over); a
        checkpoint saved before the warm-up was recorded counts its ``steps`` as done."""
        if not state or state.get("mechanism", "selection") != self.mechanism:
            state = {"strength": 0.0}
        self.strength.fill_(float(state["strength"]))
        self.share.fill_(float(state.get("share", float("nan"))))
        self.steps = int(state.get("steps", 0))
        self.warmup_step.fill_(min(int(state.get("warmup_step", self.steps)), self.warmup))

    def extra_repr(self) -> str:
        return (f"budget={self.budget}, mechanism={self.mechanism}, rate={self.rate}, "
                f"max_strength={self.max_strength}" + (f", warmup={self.warmup}" if self.warmup else ""))
