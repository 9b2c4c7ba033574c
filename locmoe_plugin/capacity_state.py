"""Saving and resuming the capacity controller's state (delta, factor, measured share, steps).

Checkpoints are checked when they load: a non-finite or out-of-range value (e.g. a delta of NaN written
after a broken batch, a negative factor, a string) is refused with :class:`ConfigError` naming the value
and the fix, instead of loading silently and breaking the capacity for the rest of the run.

Resuming with changed capacity settings follows one rule: **the new config wins**, and a warning names
each setting that changed (``old -> new``). What a run *measured* is kept (the step count, a delta
estimated from tokens - unless the new config sets ``delta``); what follows from settings is derived
again from the new config: ``factor`` mode takes the configured ``capacity_factor``; ``bound`` and
``adaptive`` keep their factor only when no capacity setting changed, else ``bound`` recomputes it from
delta and ``adaptive`` re-estimates it at the next forward. Checkpoints written before the settings were saved
(no ``"settings"`` entry) are treated as if every setting were unchanged, except that a ``factor``
router always uses its configured factor and a saved factor is clamped to the new range.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

from .config import ConfigError, LocMoEConfig

#: the config fields a capacity state depends on (saved with it, compared on resume)
CAPACITY_SETTINGS = ("capacity", "capacity_factor", "delta", "capacity_factor_min", "capacity_factor_max",
                     "hidden_size", "num_experts", "capacity_bound_form", "capacity_factor_isotropic")

_FIX = ("remove the LocMoE routers' capacity state from the checkpoint (their '_extra_state' entries) so "
        "the capacity is estimated again, or resume from an earlier checkpoint")


def capacity_settings(config: LocMoEConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in CAPACITY_SETTINGS}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_capacity_state(state: Any) -> dict:
    """``state`` as a dict, or :class:`ConfigError` when a value is of the wrong type, non-finite or out of
    range (delta in (0, 1), factor > 0, q_hat in [0, 1], steps / skipped integers >= 0)."""
    if not isinstance(state, Mapping):
        raise ConfigError(f"the checkpoint's LocMoE capacity state is a {type(state).__name__}, not a mapping: {_FIX}")
    checks = {
        "delta": (lambda v: _number(v) and 0 < v < 1, "a finite number in (0, 1)"),
        "factor": (lambda v: _number(v) and v > 0, "a finite number > 0"),
        "q_hat": (lambda v: _number(v) and 0 <= v <= 1, "a finite number in [0, 1]"),
    }
    for key, (ok, what) in checks.items():
        value = state.get(key)
        if value is not None and not ok(value):
            raise ConfigError(
                f"the checkpoint's LocMoE capacity state has {key}={value!r}, which must be {what} or None "
                f"(a non-finite value comes from a run that trained through broken batches, or the file is "
                f"damaged): {_FIX}"
            )
    for key in ("steps", "skipped"):
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"the checkpoint's LocMoE capacity state has {key}={value!r}, not an integer >= 0: {_FIX}")
    settings = state.get("settings")
    if settings is not None and not isinstance(settings, Mapping):
        raise ConfigError(f"the checkpoint's LocMoE capacity settings are a {type(settings).__name__}, not a mapping: {_FIX}")
    return dict(state)


def resume_capacity_state(saved: Any, config: LocMoEConfig) -> dict:
    """The controller state to resume with under ``config`` (see the module doc); warns naming each
    changed setting. Raises :class:`ConfigError` for a state :func:`validate_capacity_state` refuses."""
    state = validate_capacity_state(saved)
    old = state.get("settings")
    new = capacity_settings(config)
    if old is not None:
        # only the settings the checkpoint recorded (older ones lack the later fields)
        changes = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in CAPACITY_SETTINGS if k in old and old[k] != new[k]]
    else:  # older checkpoint: only a factor router's configured factor can be compared
        changes = []
        if config.capacity == "factor" and state.get("factor") not in (None, config.capacity_factor):
            changes.append(f"capacity_factor: {state['factor']!r} -> {config.capacity_factor!r}")
    mode = config.capacity
    if config.delta is not None:
        delta = config.delta
    elif old is not None and (old.get("delta") is not None or old.get("capacity") not in ("bound", "adaptive")):
        delta = None  # the old delta came from the old config (or was never measured): estimate it afresh
    else:
        delta = state.get("delta")
    factor, q_hat = None, None
    if mode == "factor":
        factor = config.capacity_factor
    elif mode in ("bound", "adaptive") and state.get("factor") is not None and not changes and delta is not None:
        factor = min(config.capacity_factor_max, max(config.capacity_factor_min, state["factor"]))
        q_hat = state.get("q_hat")
    if changes:
        warnings.warn(
            "LocMoE capacity: resuming with changed settings; the new config wins (" + "; ".join(changes)
            + f"). Capacity mode {mode!r}: " + {
                "none": "dropless, the saved capacity is unused.",
                "factor": f"factor {config.capacity_factor}.",
                "bound": "the factor is computed again from delta at the next forward.",
                "adaptive": "the factor is estimated again at the next forward.",
            }[mode],
            stacklevel=3,
        )
    return {"delta": delta if mode in ("bound", "adaptive") else config.delta, "factor": factor, "q_hat": q_hat,
            "steps": state.get("steps", 0), "skipped": state.get("skipped", 0)}
