"""Run megatron-core's ``MoELayer`` / ``GPTModel`` forward and backward on a CPU-only machine (gloo).

Megatron places weights on CUDA's current device, creates CUDA streams and events in its ``alltoall``
dispatcher and its 1F1B all-to-all overlap schedule (which also marks NVTX ranges and records tensors on
streams), keeps its dropout RNG states with CUDA RNG calls, moves split sizes to the host only when
they are CUDA tensors, references ``moe_utils.te_general_gemm`` without TransformerEngine, and creates
the pipeline schedules' token counter on the CUDA device by name.
Each shim makes one of those work on the CPU (RNG states map to the CPU generator).

Use in tests and CPU demos only, never in a training run on GPUs / NPUs (refused where an accelerator is
present)::

    from locmoe_plugin.testing import megatron_cpu_shims

    with megatron_cpu_shims():
        ...  # build and run megatron-core modules on the CPU

The context manager restores every replaced attribute on exit (nesting is fine: the outermost exit
restores). :func:`install` applies the same shims for the rest of the process (demo entry points and
spawned test workers, which exit afterwards); inside an installed process the context manager changes
nothing.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable, Iterator

import torch

from ..device import CUDA, device_module

_MISSING = object()
_permanent = False
_depth = 0
_saved: list[tuple[Any, str, Any]] = []


class _Event:
    def record(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def wait(self, *a, **k):
        pass

    def query(self):
        return True


class _Stream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, event=None):
        return event or _Event()

    def synchronize(self):
        pass


class _CpuTorch:
    """``torch`` as one Megatron module sees it, with its tensor factories' CUDA device moved to the CPU."""

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name in ("zeros", "ones", "empty", "full", "tensor"):
            def factory(*args, _f=value, **kwargs):
                if str(kwargs.get("device", "")).startswith(CUDA):
                    kwargs["device"] = "cpu"
                return _f(*args, **kwargs)

            return factory
        return value


def _to_cpu(tensor, as_numpy=False, record_stream=False):
    """``moe_utils.maybe_move_tensor_to_cpu`` for CPU tensors too (split sizes must reach
    ``all_to_all_single`` as lists, not tensors)."""
    if tensor is None or not torch.is_tensor(tensor):
        return tensor
    out = tensor.cpu()
    return out.numpy() if as_numpy else out


#: modules that create small tensors on the CUDA device by name: the pipeline schedules (token
#: counter), the optimizers (loss scale, overflow flags), gradient clipping (norms), the DDP gradient buffers
_CUDA_FACTORY_MODULES = ("pipeline_parallel.schedules", "optimizer.optimizer", "optimizer.clip_grads",
                         "optimizer.grad_scaler", "distributed.param_and_grad_buffer", "utils")


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's gradient clipping asserts CUDA gradients; the same scaling for CPU ones."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for p in ([parameters] if torch.is_tensor(parameters) else parameters):
            if getattr(p, attr, None) is not None:
                getattr(p, attr).detach().mul_(coeff)


def _replacements() -> list[tuple[Any, str, Any]]:
    """``(owner, attribute, new value)`` for every shim (imports megatron-core)."""
    mods = {name: importlib.import_module(f"megatron.core.{name}") for name in (
        "tensor_parallel.random", "transformer.moe.moe_utils", "transformer.moe.token_dispatcher",
        *_CUDA_FACTORY_MODULES)}
    mrandom, moe_utils = mods["tensor_parallel.random"], mods["transformer.moe.moe_utils"]
    cuda = device_module(CUDA)
    out: list[tuple[Any, str, Any]] = [
        (cuda, "current_device", lambda: torch.device("cpu")),
        (cuda, "Stream", _Stream),
        (cuda, "Event", lambda *a, **k: _Event()),
        (cuda, "current_stream", lambda *a, **k: _Stream()),
        (cuda, "stream", lambda s=None: contextlib.nullcontext()),
        (cuda, "synchronize", lambda *a, **k: None),
        # the 1F1B schedule's nodes mark NVTX ranges and tie freed inputs to their streams
        (cuda.nvtx, "range_push", lambda *a, **k: None),
        (cuda.nvtx, "range_pop", lambda *a, **k: None),
        (torch.Tensor, "record_stream", lambda self, stream: None),
        (cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state()),
        (cuda, "manual_seed", lambda seed: torch.manual_seed(seed)),
        (mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state()),
        (mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
        (moe_utils, "maybe_move_tensor_to_cpu", _to_cpu),
        *((mods[name], "torch", _CpuTorch()) for name in _CUDA_FACTORY_MODULES),
        (mods["optimizer.optimizer"], "clip_grad_by_total_norm_fp32", _clip_grad_by_total_norm_fp32),
    ]
    if not hasattr(moe_utils, "te_general_gemm"):  # referenced but undefined without TransformerEngine
        out.append((moe_utils, "te_general_gemm", None))
    if hasattr(mods["transformer.moe.token_dispatcher"], "maybe_move_tensor_to_cpu"):
        out.append((mods["transformer.moe.token_dispatcher"], "maybe_move_tensor_to_cpu", _to_cpu))
    return out


def _check_cpu_only() -> None:
    from ..device import get_accelerator

    if not get_accelerator().is_cpu:
        raise RuntimeError(
            "the megatron-core CPU shims replace CUDA calls and must not run where an accelerator is "
            "present; run the test on the accelerator without them, or set LOCMOE_DEVICE=cpu"
        )


def _apply(record: Callable[[Any, str, Any], None] | None) -> None:
    for owner, name, value in _replacements():
        if record is not None:
            record(owner, name, getattr(owner, name, _MISSING))
        setattr(owner, name, value)


def install() -> None:
    """Apply the shims for the rest of the process (idempotent). Needs megatron-core."""
    global _permanent
    if _permanent:
        return
    _check_cpu_only()
    if _depth == 0:
        _apply(None)
    _saved.clear()  # a surrounding context must not undo a permanent install
    _permanent = True


def installed() -> bool:
    """Whether the shims are in effect (installed, or inside :func:`megatron_cpu_shims`)."""
    return _permanent or _depth > 0


@contextlib.contextmanager
def megatron_cpu_shims() -> Iterator[None]:
    """The shims for the duration of a ``with`` block (see the module doc); restores the originals."""
    global _depth
    if _permanent:
        yield
        return
    _check_cpu_only()
    if _depth == 0:
        _apply(lambda owner, name, old: _saved.append((owner, name, old)))
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for owner, name, old in reversed(_saved):
                if old is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, old)
            _saved.clear()
