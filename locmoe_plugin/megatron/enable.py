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

On Ascend (``torch_npu`` importable), ``enable()`` also applies ``torch_npu.contrib.transfer_to_npu``
so Megatron's own ``torch.cuda`` calls run on the NPU, and process groups use HCCL.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from ..device import apply_transfer_to_npu, get_accelerator
from .compat import check_supported


@dataclass
class Patch:
    """Replace ``module.attr`` (and the same object imported by name into ``also``) by ``wrap(original)``."""

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
        original = getattr(importlib.import_module(self.module), self.attr)
        wrapped = self.wrap(original)
        wrapped.__locmoe_patch__ = self.name
        for mod in self._targets():
            if getattr(mod, self.attr, None) is original:
                self._saved[mod.__name__] = original
                setattr(mod, self.attr, wrapped)
        return True

    def remove(self) -> bool:
        if not self.applied:
            return False
        for modname, original in self._saved.items():
            setattr(importlib.import_module(modname), self.attr, original)
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
        return locmoe_spec(spec, overrides, dispatcher)

    return get_moe_module_spec_for_backend


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
)


def enable(settings: dict | None = None, dispatcher: str = "hierarchical") -> list[str]:
    """Apply the patches (idempotent). ``settings``: LocMoE overrides to use without Megatron-LM's
    argument parser (megatron-core scripts); without it, ``--locmoe`` on the command line decides.
    Returns the names of the patches applied by this call."""
    check_supported()
    if settings is not None:
        _explicit.update(locmoe=dict(settings), dispatcher=dispatcher)
    if get_accelerator().device_type == "npu":
        apply_transfer_to_npu()
    applied = []
    for p in PATCHES:
        try:
            if p.apply():
                applied.append(p.name)
        except ImportError:  # megatron.training absent (plain megatron-core): flags come from the caller
            continue
    return applied


def disable() -> list[str]:
    """Remove the patches and explicit settings; returns the names removed."""
    _explicit.clear()
    return [p.name for p in PATCHES if p.remove()]


def status() -> dict[str, bool]:
    return {p.name: p.applied for p in PATCHES}
