"""``enable()``: make an unmodified Megatron-LM run LocMoE when ``--locmoe`` is on its command line.

Megatron-LM has no plug-in registry for arguments or layer specs, so two explicit patch objects do it.
Each says what it replaces, is idempotent (applying twice changes nothing) and removable
(``disable()`` restores the originals):

* ``megatron-args``: wraps ``megatron.training.arguments.add_megatron_arguments`` so Megatron's own
  parser also knows the ``--locmoe*`` flags (the official ``extra_args_provider`` would need an edit of
  ``pretrain_gpt.py``; ``locmoe_plugin.megatron.add_arguments`` is that provider for scripts you own).
* ``megatron-moe-spec``: wraps ``megatron.core.models.gpt.moe_module_specs.get_moe_module_spec_for_backend``
  (and the name ``gpt_layer_specs`` imported from it) so that, when LocMoE is on, the MoE spec of every
  GPT layer is turned into ``LocMoELayer`` + ``LocMoEMegatronRouter`` by :func:`locmoe_spec` - the
  official ``MoESubmodules.router`` seam, applied where Megatron-LM builds its specs.
* ``megatron-moe-metrics`` (megatron-core >= 0.18: ``MoEMetricsTracker.report``) and
  ``megatron-moe-metrics-legacy`` (0.16 / 0.17: ``moe_utils.track_moe_metrics``): Megatron-LM's
  ``training_log`` reports only the tracker names it knows (``load_balancing_loss``, ``z_loss``...);
  with LocMoE on, the LocMoE metrics (:data:`LOCMOE_METRICS`) are added to that list, so they are
  reduced across ranks and printed in the training log like ``load_balancing_loss``.

On Ascend (``torch_npu`` importable), ``enable()`` also applies ``torch_npu.contrib.transfer_to_npu``
so Megatron's own CUDA calls run on the NPU, and process groups use HCCL.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from ..comm.settings import DispatcherSettings
from ..device import apply_transfer_to_npu, get_accelerator
from .compat import check_supported
from .metrics import LOCMOE_METRICS, flush_locmoe_metrics, register_report_flusher
from .token_ids import attach_token_ids


def _owner(obj, attr: str):
    """``(object holding the last part of the dotted attr, last part)``; AttributeError if absent."""
    *path, name = attr.split(".")
    for part in path:
        obj = getattr(obj, part)
    return obj, name


@dataclass
class Patch:
    """Replace ``module.attr`` (and the same object imported by name into ``also``) by ``wrap(original)``.
    ``attr`` may be dotted (``Class.method``)."""

    name: str
    module: str
    attr: str
    wrap: Callable[[Callable], Callable]
    replaces: str
    also: tuple[str, ...] = ()
    _saved: dict = field(default_factory=dict, repr=False)

    @property
    def applied(self) -> bool:
        return bool(self._saved)

    def _targets(self):
        for name in (self.module,) + self.also:
            try:
                yield importlib.import_module(name)
            except ImportError:
                if name == self.module:
                    raise

    def apply(self) -> bool:
        """Apply once; returns False if it was already applied."""
        if self.applied:
            return False
        owner, name = _owner(importlib.import_module(self.module), self.attr)
        original = getattr(owner, name)
        wrapped = self.wrap(original)
        wrapped.__locmoe_patch__ = self.name
        for mod in self._targets():
            try:
                owner, name = _owner(mod, self.attr)
            except AttributeError:
                continue
            if getattr(owner, name, None) is original:
                self._saved[mod.__name__] = original
                setattr(owner, name, wrapped)
        return True

    def remove(self) -> bool:
        if not self.applied:
            return False
        for modname, original in self._saved.items():
            owner, name = _owner(importlib.import_module(modname), self.attr)
            setattr(owner, name, original)
        self._saved.clear()
        return True


# ------------------------------------------------------------------------------------ settings source
_explicit: dict[str, Any] = {}


def _current_settings():
    """``(overrides, dispatcher)`` if LocMoE is on: explicit settings from ``enable(settings=...)``,
    else Megatron-LM's parsed ``--locmoe`` flags; None otherwise. Read at model-build time only."""
    if _explicit:
        return _explicit["locmoe"], _explicit["dispatcher"]
    try:
        from megatron.training import get_args
    except ImportError:
        return None
    try:
        args = get_args()
    except AssertionError:  # args not parsed yet (a spec built outside Megatron-LM's pretrain)
        return None
    if args is None or not getattr(args, "locmoe", False):
        return None
    from .args import settings_from_args

    return settings_from_args(args)


def _grouped_experts() -> str:
    """``enable(grouped_experts=...)``, else Megatron-LM's ``--locmoe-grouped-experts`` (read with the settings)."""
    if _explicit:
        return _explicit["grouped_experts"]
    from megatron.training import get_args

    from .args import grouped_experts_from_args

    return grouped_experts_from_args(get_args())


def _wrap_args(original):
    def add_megatron_arguments(parser):
        from .args import add_arguments

        parser = original(parser)
        if not any(a.dest == "locmoe" for a in parser._actions):
            add_arguments(parser)
        return parser

    return add_megatron_arguments


def _wrap_moe_spec(original):
    def get_moe_module_spec_for_backend(*args, **kwargs):
        spec = original(*args, **kwargs)
        settings = _current_settings()
        if settings is None:
            return spec
        from .spec import locmoe_spec

        overrides, dispatcher = settings
        return locmoe_spec(spec, overrides, dispatcher, grouped_experts=_grouped_experts())

    return get_moe_module_spec_for_backend


def _wrap_gpt_init(original):
    """After a GPTModel is built, hook its token ids for LocMoE hash routers (``attach_token_ids``)."""

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        settings = _current_settings()
        if settings is not None and settings[0].get("routing") == "hash" and getattr(self, "_locmoe_ids", None) is None:
            self._locmoe_ids = attach_token_ids(self)

    return __init__


def _wrap_track_names(original):
    """Record the LocMoE routers' pending telemetry, then add :data:`LOCMOE_METRICS` to an explicit
    ``track_names`` when LocMoE is on (the same list on every rank, as the tracker's all-reduces need)."""
    sig = inspect.signature(original)

    def with_locmoe_metrics(*args, **kwargs):
        flush_locmoe_metrics()  # the routers' summed telemetry joins the tracker (stale LocMoE names leave)
        bound = sig.bind(*args, **kwargs)
        names = bound.arguments.get("track_names")
        if names is not None and _current_settings() is not None:
            names = [names] if isinstance(names, str) else list(names)
            bound.arguments["track_names"] = names + [n for n in LOCMOE_METRICS if n not in names]
        return original(*bound.args, **bound.kwargs)

    return with_locmoe_metrics


PATCHES = (
    Patch(
        name="megatron-args",
        module="megatron.training.arguments",
        attr="add_megatron_arguments",
        wrap=_wrap_args,
        replaces="Megatron-LM's argument registration: adds the --locmoe* flags after Megatron's own",
    ),
    Patch(
        name="megatron-moe-spec",
        module="megatron.core.models.gpt.moe_module_specs",
        attr="get_moe_module_spec_for_backend",
        wrap=_wrap_moe_spec,
        replaces="the MoE layer spec of GPT layers: MoELayer -> LocMoELayer with the LocMoE router",
        also=("megatron.core.models.gpt.gpt_layer_specs",),
    ),
    Patch(
        name="megatron-gpt-token-ids",
        module="megatron.core.models.gpt.gpt_model",
        attr="GPTModel.__init__",
        wrap=_wrap_gpt_init,
        replaces="GPTModel construction: with --locmoe-routing hash, the model's token ids reach the LocMoE "
                 "routers (attach_token_ids); nothing else changes",
    ),
    Patch(
        name="megatron-moe-metrics",
        module="megatron.core.transformer.moe.moe_logging",
        attr="MoEMetricsTracker.report",
        wrap=_wrap_track_names,
        replaces="the MoE metrics report (megatron-core >= 0.18): LocMoE metrics join track_names",
    ),
    Patch(
        name="megatron-moe-metrics-legacy",
        module="megatron.core.transformer.moe.moe_utils",
        attr="track_moe_metrics",
        wrap=_wrap_track_names,
        replaces="track_moe_metrics (megatron-core 0.16 / 0.17): LocMoE metrics join track_names",
        also=("megatron.training.training",),
    ),
)


#: the patches through which Megatron's MoE metrics report flushes the LocMoE routers first
METRICS_PATCHES = tuple(p for p in PATCHES if p.name.startswith("megatron-moe-metrics"))
for _patch in METRICS_PATCHES:  # while one is applied, the routers defer their loss records to the report
    register_report_flusher(_patch)


def enable(settings: dict | None = None, dispatcher: DispatcherSettings | str = "hierarchical",
           grouped_experts: str = "auto") -> list[str]:
    """Apply the patches (idempotent). ``settings``: LocMoE overrides to use without Megatron-LM's
    argument parser (megatron-core scripts), with ``dispatcher`` and ``grouped_experts`` (see
    :func:`~locmoe_plugin.megatron.spec.locmoe_spec`); without it, ``--locmoe`` on the command line decides.
    Returns the names of the patches applied by this call."""
    check_supported()
    if settings is not None:
        from ..grouped_experts import check_grouped_experts_mode

        _explicit.update(locmoe=dict(settings), dispatcher=DispatcherSettings.of(dispatcher),
                         grouped_experts=check_grouped_experts_mode(grouped_experts))
    if get_accelerator().device_type == "npu":
        apply_transfer_to_npu()
    return _apply(PATCHES)


def _apply(patches) -> list[str]:
    """Apply ``patches`` (idempotent); a patch whose target this Megatron lacks is skipped (e.g.
    megatron.training, absent in plain megatron-core: flags come from the caller). Returns the names
    applied by this call."""
    applied = []
    for p in patches:
        try:
            if p.apply():
                applied.append(p.name)
        except (ImportError, AttributeError):  # not in this megatron version
            continue
    return applied


def enable_metrics_report() -> list[str]:
    """Apply only the metrics-report patches (what ``enable()`` does for the report): Megatron's MoE
    metrics report then flushes the LocMoE routers first, so they sum their losses and telemetry on the
    device between reports. For scripts that build ``LocMoELayer`` themselves and report Megatron's tracker
    (benchmarks use it to run as Megatron-LM with ``--locmoe`` does). Returns the names applied."""
    return _apply(METRICS_PATCHES)


def disable() -> list[str]:
    """Remove the patches and explicit settings; returns the names removed."""
    _explicit.clear()
    return [p.name for p in PATCHES if p.remove()]


def status() -> dict[str, bool]:
    return {p.name: p.applied for p in PATCHES}
