"""Ranks agree on the settings that shape a collective, or fail together with one clear error.

If two ranks of a group disagree on, say, ``topk`` or ``gpus_per_node``, they issue different
collectives (different sizes, different ``new_group`` calls, an all-reduce one rank skips) and the job
hangs or aborts inside the communication library with no word of the cause. :func:`check_agreement`
runs first: one all-gather of a fixed-size fingerprint (an int64 hash of the named settings). Only when
the fingerprints differ - and then on every rank, since every rank sees every fingerprint - a second
all-gather of the settings themselves builds the error, so every rank raises the same
:class:`DisagreementError` naming each setting that differs and each rank's value.

Callers name their settings in a plain mapping; adding a setting to the check is one more entry::

    check_agreement({**config_settings(config), **dispatcher_settings.agreement()}, group,
                    where="LocMoE layer")

Values must have a stable ``repr`` (numbers, strings, bools, None, tuples of them, dtypes).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Mapping

import torch
import torch.distributed as dist

from .config import ConfigError


class DisagreementError(ConfigError):
    """Ranks of a process group disagree on a setting that shapes a collective. Raised on every rank
    with the same message."""


def config_settings(config: Any) -> dict[str, Any]:
    """Every field of a config dataclass (``LocMoEConfig``), by name: a new field joins the check
    without further code."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def fingerprint(settings: Mapping[str, Any]) -> int:
    """A signed 64-bit hash of ``settings`` (independent of their order); equal settings give equal
    fingerprints on every process."""
    text = "\n".join(f"{key}={settings[key]!r}" for key in sorted(settings))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def group_active(group) -> bool:
    """Whether ``group`` has several ranks in an initialised process group (else collectives are skipped)."""
    return group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _collective_device(group) -> torch.device:
    """The device a tensor collective on ``group`` needs (the CPU for gloo)."""
    from .device import device_type_for_backend, get_accelerator

    backend = str(dist.get_backend(group)).lower()
    if backend in ("gloo", "fake", "mpi"):
        return torch.device("cpu")
    acc = get_accelerator(device_type_for_backend(backend))
    return acc.device(acc.current_device())


def describe_disagreement(per_rank: list[Mapping[str, Any]], ranks: list[int]) -> str:
    """The message for settings ``per_rank`` (one mapping per rank, in group order) that differ."""
    keys = sorted({k for s in per_rank for k in s})
    missing = object()
    lines = []
    for key in keys:
        values = [s.get(key, missing) for s in per_rank]
        if any(repr(v) != repr(values[0]) for v in values):
            shown = ", ".join(f"rank {r}: {'(not set)' if v is missing else repr(v)}" for r, v in zip(ranks, values))
            lines.append(f"  {key}: {shown}")
    return "\n".join(lines)


def check_agreement(settings: Mapping[str, Any], group=None, *, where: str = "LocMoE") -> None:
    """Raise :class:`DisagreementError` on every rank of ``group`` unless all of them pass equal
    ``settings``. A collective over ``group`` (every rank must call it, before any collective these
    settings shape); nothing when ``group`` is None or has one rank.

    Cost: one all-gather of one int64 per rank; on a mismatch, one more all-gather of the settings.
    """
    if not group_active(group):
        return
    mine = torch.tensor([fingerprint(settings)], dtype=torch.int64, device=_collective_device(group))
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    if all(int(g) == int(gathered[0]) for g in gathered):
        return
    # every rank saw the same fingerprints, so every rank takes this path: the second collective matches
    per_rank: list = [None] * len(gathered)
    dist.all_gather_object(per_rank, {k: repr(v) for k, v in settings.items()}, group=group)
    per_rank = [{k: _Shown(v) for k, v in s.items()} for s in per_rank]
    ranks = list(dist.get_process_group_ranks(group))
    raise DisagreementError(
        f"{where}: the ranks disagree on settings that must be equal on every rank (they shape the "
        f"collectives; a run would hang or abort):\n{describe_disagreement(per_rank, ranks)}\n"
        f"give every rank the same values (same flags, config file and environment, e.g. "
        f"LOCMOE_GPUS_PER_NODE / LOCAL_WORLD_SIZE)"
    )


class _Shown(str):
    """A value as its sender's ``repr`` (objects need not unpickle alike on every rank)."""

    def __repr__(self) -> str:
        return str(self)
