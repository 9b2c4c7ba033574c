"""Cross-node traffic budget: a dual variable that holds the EP group's cross-node share at a target.

``LocMoEConfig.cross_node_budget = B`` asks that at most a share ``B`` of the expert-parallel group's
routed (token, expert) pairs go to an expert on another node. The router keeps one scalar, the
*local preference* ``lam >= 0``, and selects experts by

    select_score[t, i] = score[t, i] + lam * 1{expert i is on token t's node}

(``score`` = gate probability, or affinity for "hybrid"; the expert bias, if any, is added as well). The
preference acts on the selection only: the combine weights stay the unbiased probabilities, so a token's
output and the gate's gradient are those of the experts it picked. In probability terms a remote expert
is picked over a local one only when its probability is higher by more than ``lam``: ``lam`` is a score
margin within which near-tied candidates go to the local expert, and ``lam >= 1`` (probabilities) forces
full locality.

Update (projected dual ascent on the constraint ``share <= B``), after every training forward under grad,
from the counts the router already all-reduces over the EP group for the aux loss and the expert bias
(one more number rides on that tensor: no extra collective):

    share = sum_ranks(cross-node pairs) / sum_ranks(routed pairs)        (requested pairs, before capacity)
    lam  <- clip(lam + rate * (share - B), 0, max_strength)

Every rank of the EP group sees the same reduced numbers and applies the same fp32 operations, so ``lam``
stays equal on all of them without being communicated; it is saved in the router's extra state.
Data-parallel replicas of the EP group keep their own ``lam`` (as with the expert bias). When the share is
below the budget without help (e.g. one node, or a learned locality loss already does the work), ``lam``
stays at 0 and routing is unchanged: the budget is an upper bound, not a target to reach from below.
"""

from __future__ import annotations

import torch

#: Step of the dual update per unit of share error. Top-k probabilities of a trained gate are ~0.05-0.5
#: apart, so holding a low budget can take ``lam`` ~1. At 0.2 a share 0.4 above the budget moves ``lam``
#: by 0.08 per step: on a synthetic peaked gate (tests) the share settles within ~40 steps; noise of
#: +-0.02 in one batch's share (a few thousand pairs) moves ``lam`` by 0.004.
DEFAULT_RATE = 0.2
#: Upper clip of ``lam``: above 2 every local expert outranks every remote one for scores in [-1, 1]
#: (probabilities and cosine affinities), so larger values change nothing and would only slow the way back.
MAX_STRENGTH = 2.0


class CrossNodeBudget(torch.nn.Module):
    """The controller of one router.

    Args:
        budget: the largest cross-node share, in [0, 1] (validated by :class:`LocMoEConfig`).
        rate: step of the update per unit of share error (:data:`DEFAULT_RATE`).
        max_strength: upper clip of the preference (:data:`MAX_STRENGTH`).

    Buffers (fp32, 0-d, not in ``state_dict``; saved through :meth:`state_dict_extra`):
        strength: ``lam``, the local preference added to the local experts' selection scores.
        share: the last measured EP-group share (NaN before the first update).
    """

    def __init__(self, budget: float, rate: float = DEFAULT_RATE, max_strength: float = MAX_STRENGTH,
                 device=None) -> None:
        super().__init__()
        self.budget = float(budget)
        self.rate = float(rate)
        self.max_strength = float(max_strength)
        self.register_buffer("strength", torch.zeros((), device=device), persistent=False)
        self.register_buffer("share", torch.full((), float("nan"), device=device), persistent=False)
        self.steps = 0

    def selection_offset(self, local_expert_mask: torch.Tensor) -> torch.Tensor:
        """``[n]`` fp32: ``lam`` on the experts of this rank's node (``local_expert_mask [n]`` bool), 0 else."""
        return local_expert_mask.float() * self.strength.float()

    @torch.no_grad()
    def update(self, cross_pairs: torch.Tensor, pairs: torch.Tensor) -> None:
        """One dual step from the EP group's summed ``cross_pairs`` and ``pairs`` (0-d tensors, same on
        every rank). No pairs (every token padding): no step. No host sync: the step is a masked fill."""
        total = pairs.float()
        share = cross_pairs.float() / total.clamp_min(1)
        stepped = (self.strength.float() + self.rate * (share - self.budget)).clamp(0.0, self.max_strength)
        has_pairs = total > 0
        self.strength.copy_(torch.where(has_pairs, stepped, self.strength.float()))
        self.share.copy_(torch.where(has_pairs, share, self.share.float()))
        self.steps += 1

    def state_dict_extra(self) -> dict:
        """What a checkpoint keeps: ``{"strength", "share", "steps", "budget"}`` as Python numbers."""
        return {"strength": float(self.strength), "share": float(self.share), "steps": self.steps,
                "budget": self.budget}

    def load_state_dict_extra(self, state: dict) -> None:
        """Restore :meth:`state_dict_extra`'s values. A checkpoint saved with another budget keeps its
        ``lam`` (a warm start; the controller moves it to the new budget). An empty ``state`` (a checkpoint
        saved without a budget) restarts the controller as a fresh one: ``lam`` = 0."""
        state = state or {"strength": 0.0}
        self.strength.fill_(float(state["strength"]))
        self.share.fill_(float(state.get("share", float("nan"))))
        self.steps = int(state.get("steps", 0))

    def extra_repr(self) -> str:
        return f"budget={self.budget}, rate={self.rate}, max_strength={self.max_strength}"
