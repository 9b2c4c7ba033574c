"""Shims that let megatron-core's GPT model and MoELayer run forward and backward on CPU (gloo).

For the CPU demo and the tests only: the training path on GPUs / NPUs never imports this module.
Megatron places weights with ``torch.cuda.current_device()``, creates CUDA streams in its alltoall
dispatcher, keeps its dropout RNG states with ``torch.cuda`` RNG calls, and moves split sizes to the host
only if they are CUDA tensors; these shims make each of those work on CPU (RNG states map to the CPU
generator). ``install()`` is idempotent and refuses to run when an accelerator is present.
"""

from __future__ import annotations

import contextlib

import torch

_installed = False


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
    """``torch`` as one Megatron module sees it, with ``device="cuda"`` tensor factories on the CPU."""

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name in ("zeros", "ones", "empty", "full", "tensor"):
            def factory(*args, _f=value, **kwargs):
                if str(kwargs.get("device", "")).startswith("cuda"):
                    kwargs["device"] = "cpu"
                return _f(*args, **kwargs)

            return factory
        return value


def install() -> None:
    global _installed
    if _installed:
        return
    from ..device import get_accelerator

    if not get_accelerator().is_cpu:
        raise RuntimeError("the CPU shims must not be installed on a machine with an accelerator")
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.Stream = _Stream
    torch.cuda.Event = lambda *a, **k: _Event()
    torch.cuda.current_stream = lambda *a, **k: _Stream()
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    def to_cpu(tensor, as_numpy=False, record_stream=False):
        if tensor is None or not torch.is_tensor(tensor):
            return tensor
        out = tensor.cpu()
        return out.numpy() if as_numpy else out

    moe_utils.maybe_move_tensor_to_cpu = to_cpu
    # the pipeline schedules (token counter), the optimizers (loss scale, overflow flags), gradient
    # clipping (norms) and the DDP gradient buffers create small tensors with a literal device="cuda"
    import importlib

    for name in ("megatron.core.pipeline_parallel.schedules", "megatron.core.optimizer.optimizer",
                 "megatron.core.optimizer.clip_grads", "megatron.core.optimizer.grad_scaler",
                 "megatron.core.distributed.param_and_grad_buffer", "megatron.core.utils"):
        importlib.import_module(name).torch = _CpuTorch()
    # gradient clipping asserts CUDA gradients; the same scaling for CPU ones
    from megatron.core.optimizer import optimizer as moptimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0:
            for p in ([parameters] if torch.is_tensor(parameters) else parameters):
                if getattr(p, attr, None) is not None:
                    getattr(p, attr).detach().mul_(coeff)

    moptimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    from megatron.core.transformer.moe import token_dispatcher

    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        token_dispatcher.maybe_move_tensor_to_cpu = to_cpu
    _installed = True
