"""The single place in locmoe_plugin that knows about accelerators.

Every other module asks :func:`get_accelerator` for streams, events, devices and the collective
backend instead of touching ``torch.cuda`` directly. That keeps one code path working on NVIDIA
GPUs (``cuda`` + NCCL), Huawei Ascend NPUs (``npu`` + HCCL, via the optional ``torch_npu``
package) and plain CPUs (gloo), the last being what unit tests and multi-process gloo tests use.

Selection order: an explicit ``prefer`` argument, then the ``LOCMOE_DEVICE`` environment
variable, then auto-detection (npu, then cuda, then cpu). ``torch_npu`` is imported lazily
because importing it has side effects (it registers the ``npu`` device and the HCCL backend) and
fails loudly on machines without the Ascend CANN toolkit.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

ENV_VAR = "LOCMOE_DEVICE"
#: torch's device type of NVIDIA GPUs (Megatron's own device): the name every other module uses for it
CUDA = "cuda"
_BACKENDS = {CUDA: "nccl", "npu": "hccl", "cpu": "gloo"}
# "auto" is accepted so LOCMOE_DEVICE=auto can explicitly undo an inherited setting.
_ALLOWED = ("cuda", "npu", "cpu", "auto")


def backend_for(device_type: str) -> str:
    """torch.distributed backend for a device type: cuda->nccl, npu->hccl, cpu->gloo."""
    try:
        return _BACKENDS[device_type]
    except KeyError:
        allowed = sorted(_BACKENDS)
        raise ValueError(f"unknown device_type {device_type!r}; allowed: {allowed}") from None


def device_type_for_backend(backend: str) -> str:
    """The device type a collective backend runs on: nccl->cuda, hccl->npu, gloo->cpu."""
    for device_type, b in _BACKENDS.items():
        if b == backend:
            return device_type
    raise ValueError(f"unknown backend {backend!r}; allowed: {sorted(_BACKENDS.values())}")


def device_module(device_type: str):
    """torch's module of an accelerator's device type (``torch.npu`` once torch_npu is imported)."""
    return getattr(torch, device_type)


def is_stream_capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a graph (CUDA graphs; NPU graphs where torch_npu
    has the same call); False on CPU. A tensor made during capture is filled only when the graph
    replays, so a value cached for eager calls must not be made then."""
    if device.type == "cpu":
        return False
    capturing = getattr(getattr(torch, device.type, None), "is_current_stream_capturing", None)  # none on meta
    return bool(capturing()) if capturing is not None else False


def _npu_install_hint() -> str:
    # torch_npu releases track torch releases one-to-one, so the matching version is torch's own
    # version without the local build suffix (e.g. "2.5.1+cpu" -> "2.5.1").
    version = torch.__version__.split("+")[0]
    return (
        f"Ascend NPU support needs torch_npu: pip install torch-npu=={version} "
        "(matching the installed torch), and the Ascend CANN toolkit must be installed with its "
        "set_env.sh sourced (e.g. `source /usr/local/Ascend/ascend-toolkit/set_env.sh`)."
    )


def import_torch_npu():
    """Import and return ``torch_npu`` (which adds ``torch.npu`` and registers HCCL).

    Raises ImportError with install instructions if it is missing or cannot load its CANN
    libraries (which surfaces as ImportError or OSError depending on the loader).
    """
    try:
        return importlib.import_module("torch_npu")
    except (ImportError, OSError) as exc:
        raise ImportError(f"{_npu_install_hint()} (underlying error: {exc})") from exc


def apply_transfer_to_npu() -> bool:
    """Import ``torch_npu.contrib.transfer_to_npu`` so code calling ``torch.cuda`` runs on Ascend.

    The Megatron adapter needs this because Megatron itself hard-codes ``torch.cuda``. Idempotent:
    Python's module cache guarantees the patch is executed at most once per process. Returns True.
    """
    import_torch_npu()
    importlib.import_module("torch_npu.contrib.transfer_to_npu")
    return True


class _CpuEvent:
    """Stand-in for a device event on cpu: work is synchronous, so it only records a timestamp."""

    def __init__(self, enable_timing: bool = False, **_: Any) -> None:
        self.enable_timing = enable_timing
        self._stamp: float | None = None

    def record(self, stream: Any = None) -> None:
        self._stamp = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: "_CpuEvent") -> float:
        """Milliseconds between ``self.record()`` and ``end_event.record()``, like CUDA events."""
        if self._stamp is None or end_event._stamp is None:
            raise RuntimeError("both events must be recorded before calling elapsed_time")
        return (end_event._stamp - self._stamp) * 1000.0


class _CpuStream:
    """Stand-in for a device stream on cpu, where every op already runs in program order."""

    def __init__(self, **_: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: _CpuEvent | None = None) -> _CpuEvent:
        event = event if event is not None else _CpuEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def grouped_mm(device: torch.device):
    """torch's grouped matmul (``grouped_mm`` in torch >= 2.10, ``_grouped_mm`` before) where ``device`` runs it:
    CUDA (its grouped kernels) and CPU (one matmul per group); None elsewhere (Ascend NPU: callers loop
    over the groups with plain matmuls)."""
    if device.type not in (CUDA, "cpu"):
        return None
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@dataclass(frozen=True)
class Accelerator:
    """A resolved device kind plus its collective backend; methods forward to the torch module.

    On cpu every method degrades to a cheap no-op so callers need no ``if cpu`` branches.
    """

    device_type: str  # "cuda" | "npu" | "cpu"
    backend: str  # "nccl" | "hccl" | "gloo"

    def __post_init__(self) -> None:
        backend_for(self.device_type)  # validates device_type

    @property
    def module(self):
        """``torch.cuda``, ``torch.npu`` (importing torch_npu first), or None for cpu."""
        if self.device_type == "npu":
            import_torch_npu()
            return torch.npu  # looked up at call time: torch_npu attaches it on import
        if self.device_type == "cuda":
            return torch.cuda
        return None

    @property
    def is_cpu(self) -> bool:
        return self.device_type == "cpu"

    def device(self, index: int | None = None) -> torch.device:
        """``torch.device`` for ``index`` (default: the current device); cpu ignores the index."""
        if self.is_cpu:
            return torch.device("cpu")
        return torch.device(self.device_type, self.current_device() if index is None else index)

    def current_device(self) -> int:
        return 0 if self.is_cpu else self.module.current_device()

    def set_device(self, index: int) -> None:
        if not self.is_cpu:
            self.module.set_device(index)

    def device_count(self) -> int:
        """Visible devices. cpu reports 1 (the host) so ``local_rank % device_count()`` works."""
        return 1 if self.is_cpu else self.module.device_count()

    def synchronize(self) -> None:
        if not self.is_cpu:
            self.module.synchronize()

    def Stream(self, **kwargs: Any):  # noqa: N802 - mirrors torch.cuda.Stream
        return _CpuStream(**kwargs) if self.is_cpu else self.module.Stream(**kwargs)

    def Event(self, enable_timing: bool = False, **kwargs: Any):  # noqa: N802 - mirrors torch
        cls = _CpuEvent if self.is_cpu else self.module.Event
        return cls(enable_timing=enable_timing, **kwargs)

    def current_stream(self):
        return _CpuStream() if self.is_cpu else self.module.current_stream()

    def stream(self, s: Any):
        """Context manager making ``s`` the current stream (a nullcontext on cpu)."""
        return contextlib.nullcontext(s) if self.is_cpu else self.module.stream(s)

    def manual_seed(self, seed: int) -> None:
        """Seed the current device's RNG (the global CPU generator on cpu)."""
        if self.is_cpu:
            torch.manual_seed(seed)
        else:
            self.module.manual_seed(seed)

    def memory_allocated(self) -> int:
        """Bytes held by tensors on the current device; 0 on cpu (not tracked there)."""
        return 0 if self.is_cpu else int(self.module.memory_allocated())


def _npu_available() -> bool:
    try:
        import_torch_npu()
    except ImportError:
        return False
    return bool(torch.npu.is_available())


@functools.lru_cache(maxsize=None)
def _resolve(name: str) -> Accelerator:
    # Cached because auto-detection may import torch_npu and query drivers; exceptions are not
    # cached by lru_cache, so a failed request is re-checked next time.
    if name == "auto":
        name = "npu" if _npu_available() else "cuda" if torch.cuda.is_available() else "cpu"
    elif name == "npu":
        import_torch_npu()
        if not torch.npu.is_available():
            raise RuntimeError("device 'npu' was requested but torch.npu.is_available() is False; "
                               f"check the driver (npu-smi info) or set {ENV_VAR}=cpu")
    elif name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device 'cuda' was requested but torch.cuda.is_available() is False; "
                           f"set {ENV_VAR}=cpu to run on the CPU")
    return Accelerator(name, backend_for(name))


def get_accelerator(prefer: str | None = None) -> Accelerator:
    """Resolve the accelerator: ``prefer`` > ``$LOCMOE_DEVICE`` > auto (npu, cuda, cpu).

    Results are cached per requested name (so changing the env var between calls takes effect,
    while repeated auto-detection does not re-probe). Raises ValueError for an unknown name,
    ImportError for npu without torch_npu, RuntimeError for an unavailable cuda/npu.
    """
    raw = prefer if prefer is not None else os.environ.get(ENV_VAR, "")
    name = raw.strip().lower() or "auto"
    if name not in _ALLOWED:
        source = "prefer" if prefer is not None else ENV_VAR
        raise ValueError(f"invalid {source} value {raw!r}; allowed values: {', '.join(_ALLOWED)}")
    return _resolve(name)


def reset_accelerator_cache() -> None:
    """Forget resolved accelerators (for tests that fake devices or change the env var)."""
    _resolve.cache_clear()


def init_process_group_for(accelerator: Accelerator | None = None, **kwargs: Any) -> bool:
    """``torch.distributed.init_process_group`` with the accelerator's backend, unless initialized.

    ``backend`` in kwargs overrides the default (e.g. "cpu:gloo,cuda:nccl"). Returns True if this
    call created the group. On npu, torch_npu is imported first because that registers HCCL.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    accelerator = accelerator or get_accelerator()
    if accelerator.device_type == "npu":
        import_torch_npu()
    kwargs.setdefault("backend", accelerator.backend)
    dist.init_process_group(**kwargs)
    return True
