"""Shared fixtures: a fake Ascend stack (``torch_npu`` is not installable here: it needs CANN)."""

import importlib.abc
import importlib.util
import sys
import types

import pytest
import torch

TRANSFER = "torch_npu.contrib.transfer_to_npu"





class _TransferLoader(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves torch_npu.contrib.transfer_to_npu as a real import, so its body (a counter) runs."""

    def __init__(self, torch_npu_mod):
        self.torch_npu = torch_npu_mod

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname == TRANSFER else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        self.torch_npu.transfer_applied += 1


@pytest.fixture
def fake_npu(monkeypatch):
    """A fake ``torch_npu`` (with ``torch_npu.contrib.transfer_to_npu`` counting its imports in
    ``torch_npu.transfer_applied``) and a fake ``torch.npu``; yields ``(torch.npu, torch_npu)``."""
    class FakeStream:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class FakeEvent:
        def __init__(self, enable_timing=False, **_):
            self.enable_timing = enable_timing

    calls = []
    npu = types.SimpleNamespace(
        is_available=lambda: True,
        current_device=lambda: 0,
        device_count=lambda: 8,
        set_device=lambda i: calls.append(("set_device", i)),
        synchronize=lambda: calls.append(("synchronize",)),
        manual_seed=lambda s: calls.append(("manual_seed", s)),
        memory_allocated=lambda: 4096,
        current_stream=lambda: "current",
        stream=lambda s: ("ctx", s),
        Stream=FakeStream,
        Event=FakeEvent,
        calls=calls,
    )
    torch_npu = types.ModuleType("torch_npu")
    torch_npu.__path__ = []
    torch_npu.transfer_applied = 0
    contrib = types.ModuleType("torch_npu.contrib")
    contrib.__path__ = []
    torch_npu.contrib = contrib
    monkeypatch.setitem(sys.modules, "torch_npu", torch_npu)
    monkeypatch.setitem(sys.modules, "torch_npu.contrib", contrib)
    monkeypatch.setattr(sys, "meta_path", [_TransferLoader(torch_npu), *sys.meta_path])
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    try:
        yield npu, torch_npu
    finally:
        sys.modules.pop(TRANSFER, None)


