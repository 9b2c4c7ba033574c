"""The token dispatcher's settings, one frozen object shared by the Megatron and DeepSpeed adapters.

``DispatcherSettings(mode="hierarchical", overlap=False, equal_tokens=None, dispatch_format="native")``:

* ``mode``: ``"hierarchical"`` (inter-node once per node, then the intra-node fan-out; on one node the
  pairs plan), ``"flat"`` (one all-to-all over the expert-parallel group, every remote (token, expert) pair
  sent; it builds the node / rank / expert tree at the source so its sums equal the hierarchical plan's bit
  for bit, which costs host work the default's one-node pairs plan does not do: a reference for checks,
  slower than the default on one node, ``benchmarks/RESULTS.md``) or ``"allgather"`` (EP groups
  inside one node only: every token all-gathered, each rank keeps its experts' pairs, combine by a
  reduce-scatter, as Megatron's allgather dispatcher; refused at the dispatcher's construction on a group
  spanning nodes. Sums in another order than the pairs plan's: allclose, not bitwise, to it;
  ``docs/dispatcher.md``).
* ``overlap``: split the two-stage plan by origin so the inter-node transfer of other nodes' rows overlaps
  this node's rows' work; a no-op on one node or with ``mode="flat"`` / ``"allgather"``. Off by default: it hides at most
  the local experts' compute, and where measured the split cost more than that (docs/overlap.md).
  Results are bitwise equal either way.
* ``equal_tokens``: whether every EP rank passes the same number of tokens in every layer call. Then the
  ``"allgather"`` mode sizes its routing all-gather locally and runs no count exchange
  (:mod:`locmoe_plugin.comm.gathered_routing`; bitwise the same results, one collective fewer). A rank with
  another count cannot be recovered from (gloo aborts the process, NCCL may wait forever), so it is a
  promise the caller makes. ``None`` (default): the framework decides - the Megatron adapter promises it
  (Megatron hands every rank ``[seq / TP, micro-batch]`` tokens) unless ``variable_seq_lengths`` is set, the
  DeepSpeed layer and the core ``TokenDispatcher`` do not. Other modes ignore it.
* ``dispatch_format``: how rows travel in the dispatch direction (the dispatch's forward and the combine's
  backward; :mod:`locmoe_plugin.comm.row_codec`): ``"native"`` (default: the hidden states' dtype), ``"fp8"``
  (E4M3 with one fp32 scale per 128 features, DeepSeek-V3's and DeepEP's FP8 dispatch; 0.52 x the bytes of
  bf16 rows at hidden 2048) or ``"int8"`` (the same blocks in int8, for devices whose FP8 casts are missing
  or untested). The experts still compute in the hidden states' dtype on the decoded rows; combine results
  and input gradients travel native. With ``overlap`` the overlapped routes move the encoded rows
  alike. The quality cost is measured in
  ``benchmarks/RESULTS.md``.

All four settings shape collectives, so every rank must hold the same: :meth:`DispatcherSettings.agreement`
gives them, by name, to :func:`locmoe_plugin.agreement.check_agreement`. The public entry points keep
taking a plain mode string (``locmoe_spec(..., dispatcher="flat")``, DeepSpeed's ``"dispatcher"`` /
``"overlap"`` keys); :meth:`DispatcherSettings.of` turns what they were given into this object.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..config import ConfigError
from .row_codec import DISPATCH_FORMATS

#: the dispatcher modes a user chooses between
DISPATCHER_MODES = ("hierarchical", "flat", "allgather")


@dataclass(frozen=True, kw_only=True)
class DispatcherSettings:
    """How the LocMoE dispatcher moves tokens (see the module doc). Frozen; validated at construction."""

    mode: str = "hierarchical"
    overlap: bool = False
    equal_tokens: bool | None = None
    dispatch_format: str = "native"

    def __post_init__(self) -> None:
        if self.mode not in DISPATCHER_MODES:
            raise ConfigError(
                f"dispatcher={self.mode!r} is not one of {', '.join(map(repr, DISPATCHER_MODES))}: pick one of them"
            )
        if not isinstance(self.overlap, bool):
            raise ConfigError(f"overlap={self.overlap!r} must be True or False (off by default)")
        if self.equal_tokens is not None and not isinstance(self.equal_tokens, bool):
            raise ConfigError(f"equal_tokens={self.equal_tokens!r} must be True, False or None (the framework "
                              f"decides)")
        if self.dispatch_format not in DISPATCH_FORMATS:
            raise ConfigError(f"dispatch_format={self.dispatch_format!r} is not one of "
                              f"{', '.join(map(repr, DISPATCH_FORMATS))}: pick one of them")

    @classmethod
    def of(cls, value: "DispatcherSettings | str | None" = None, *, overlap: bool | None = None) -> "DispatcherSettings":
        """``value`` as settings: a :class:`DispatcherSettings` as it is, a mode string (overlap off), or
        None (the defaults); ``overlap``, where given, replaces the overlap setting."""
        if value is None:
            value = cls()
        elif isinstance(value, str):
            value = cls(mode=value)
        elif not isinstance(value, cls):
            raise ConfigError(
                f"dispatcher={value!r} is neither a mode ({', '.join(map(repr, DISPATCHER_MODES))}) nor "
                f"DispatcherSettings(mode=..., overlap=...)"
            )
        return value if overlap is None else replace(value, overlap=overlap)

    def agreement(self) -> dict[str, Any]:
        """The settings by name, for the rank-agreement check (all four shape collectives)."""
        return {"dispatcher": self.mode, "overlap": self.overlap, "equal_tokens": self.equal_tokens,
                "dispatch_format": self.dispatch_format}
