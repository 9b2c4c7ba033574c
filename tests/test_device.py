"""Tests for locmoe_plugin.device: cpu fallback, error messages, npu via a fake torch_npu."""

import sys
import types

import pytest
import torch
import torch.distributed as dist

from locmoe_plugin import device as dev

from .conftest import TRANSFER


@pytest.fixture(autouse=True)
def clean_cache(monkeypatch):
    """Fresh cache, no LOCMOE_DEVICE, and (unless a test fakes them) no cuda and no torch_npu."""
    monkeypatch.delenv(dev.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # A None entry in sys.modules makes `import torch_npu` raise ImportError even if installed.
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    dev.reset_accelerator_cache()
    yield
    dev.reset_accelerator_cache()


def test_default_resolves_to_cpu():
    acc = dev.get_accelerator()
    assert acc == dev.Accelerator("cpu", "gloo")
    assert acc.is_cpu and acc.module is None
    assert acc.device() == torch.device("cpu") and acc.device(3) == torch.device("cpu")
    assert acc.current_device() == 0 and acc.device_count() == 1 and acc.memory_allocated() == 0
    acc.set_device(0)
    acc.synchronize()
    assert dev.get_accelerator() is acc  # cached


def test_env_var_cpu(monkeypatch):
    monkeypatch.setenv(dev.ENV_VAR, " CPU ")
    acc = dev.get_accelerator()
    assert acc.device_type == "cpu" and acc.backend == "gloo"


def test_backend_for():
    assert [dev.backend_for(t) for t in ("cuda", "npu", "cpu")] == ["nccl", "hccl", "gloo"]
    with pytest.raises(ValueError):
        dev.backend_for("tpu")


def test_cpu_stream_and_event_standins():
    acc = dev.get_accelerator("cpu")
    s = acc.Stream()
    start, end = acc.Event(enable_timing=True), acc.Event(enable_timing=True)
    with pytest.raises(RuntimeError):
        start.elapsed_time(end)  # not recorded yet
    start.record()
    with acc.stream(s) as entered:
        assert entered is s
        torch.ones(4).sum()
    s.wait_stream(acc.current_stream())
    s.wait_event(start)
    recorded = s.record_event()
    end.record(s)
    end.wait()
    s.synchronize()
    end.synchronize()
    assert s.query() and end.query() and recorded.query()
    assert end.elapsed_time(end) == 0.0
    assert start.elapsed_time(end) >= 0.0


def test_cpu_manual_seed_is_deterministic():
    acc = dev.get_accelerator("cpu")
    acc.manual_seed(1234)
    a = torch.rand(5)
    acc.manual_seed(1234)
    assert torch.equal(a, torch.rand(5))


@pytest.mark.parametrize("bad", ["gpu", "tpu", "cuda:0"])
def test_invalid_env_value(monkeypatch, bad):
    monkeypatch.setenv(dev.ENV_VAR, bad)
    with pytest.raises(ValueError, match="allowed values: cuda, npu, cpu"):
        dev.get_accelerator()


def test_invalid_prefer():
    with pytest.raises(ValueError, match="allowed values"):
        dev.get_accelerator("rocm")


@pytest.mark.parametrize("how", ["prefer", "env"])
def test_npu_without_torch_npu(monkeypatch, how):
    if how == "env":
        monkeypatch.setenv(dev.ENV_VAR, "npu")
    with pytest.raises(ImportError) as info:
        dev.get_accelerator("npu" if how == "prefer" else None)
    msg = str(info.value)
    assert "torch-npu==" + torch.__version__.split("+")[0] in msg
    assert "set_env.sh" in msg and "CANN" in msg
    with pytest.raises(ImportError, match="torch-npu"):
        dev.apply_transfer_to_npu()


def test_cuda_unavailable():
    with pytest.raises(RuntimeError, match="LOCMOE_DEVICE=cpu"):
        dev.get_accelerator("cuda")


def test_init_process_group_for_cpu(tmp_path):
    assert not dist.is_initialized()
    try:
        store = f"file://{tmp_path}/store"
        assert dev.init_process_group_for(init_method=store, rank=0, world_size=1)
        assert dist.get_backend() == "gloo"
        assert not dev.init_process_group_for()  # already initialized: no-op
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------- fake Ascend stack (tests/conftest.py)


def test_fake_npu_auto_detected(fake_npu):
    npu, _ = fake_npu
    acc = dev.get_accelerator()
    assert acc.device_type == "npu" and acc.backend == "hccl"
    assert acc.module is npu
    assert isinstance(acc.Stream(priority=-1), npu.Stream)
    assert acc.Stream(priority=-1).kwargs == {"priority": -1}
    ev = acc.Event(enable_timing=True)
    assert isinstance(ev, npu.Event) and ev.enable_timing
    assert acc.current_device() == 0 and acc.device_count() == 8 and acc.memory_allocated() == 4096
    assert acc.current_stream() == "current" and acc.stream("s") == ("ctx", "s")
    acc.set_device(3)
    acc.synchronize()
    acc.manual_seed(7)
    assert npu.calls == [("set_device", 3), ("synchronize",), ("manual_seed", 7)]


def test_fake_npu_wins_over_cuda(fake_npu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.get_accelerator().device_type == "npu"


def test_fake_npu_unavailable_falls_back(fake_npu, monkeypatch):
    npu, _ = fake_npu
    monkeypatch.setattr(npu, "is_available", lambda: False)
    assert dev.get_accelerator().device_type == "cpu"
    with pytest.raises(RuntimeError, match="npu"):
        dev.get_accelerator("npu")


def test_fake_npu_env_and_prefer_override(fake_npu, monkeypatch):
    monkeypatch.setenv(dev.ENV_VAR, "npu")
    assert dev.get_accelerator().backend == "hccl"
    assert dev.get_accelerator("cpu").backend == "gloo"  # explicit prefer beats the env var
    monkeypatch.setenv(dev.ENV_VAR, "cpu")
    assert dev.get_accelerator().backend == "gloo"  # env change takes effect without a reset


def test_apply_transfer_to_npu_idempotent(fake_npu):
    _, torch_npu = fake_npu
    assert TRANSFER not in sys.modules
    assert dev.apply_transfer_to_npu() is True
    assert torch_npu.transfer_applied == 1
    assert dev.apply_transfer_to_npu() is True
    assert torch_npu.transfer_applied == 1
    assert TRANSFER in sys.modules


def test_init_process_group_for_npu_passes_hccl(fake_npu, monkeypatch):
    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    assert dev.init_process_group_for(dev.get_accelerator(), world_size=8, rank=1)
    assert seen == {"backend": "hccl", "world_size": 8, "rank": 1}


def test_fake_cleaned_up_after_npu_tests():
    # Runs after the fake-npu tests (file order); the fixture's teardown must have undone them.
    assert dev.get_accelerator().is_cpu
    assert TRANSFER not in sys.modules
    assert not isinstance(getattr(torch, "npu", None), types.SimpleNamespace)


def test_device_type_for_backend_roundtrip():
    from locmoe_plugin.device import backend_for, device_type_for_backend

    for dt in ("cuda", "npu", "cpu"):
        assert device_type_for_backend(backend_for(dt)) == dt
    with pytest.raises(ValueError, match="unknown backend 'mpi'"):
        device_type_for_backend("mpi")
