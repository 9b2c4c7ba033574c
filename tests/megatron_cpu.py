"""Test-only shims that let megatron-core's MoELayer run forward and backward on CPU (gloo).

Never imported by the package. Megatron places weights with ``torch.cuda.current_device()``, creates
CUDA streams in its alltoall dispatcher, and moves split sizes to the host only if they are CUDA
tensors; these shims make each of those work on CPU. ``install()`` is idempotent.
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


def install() -> None:
    global _installed
    if _installed:
        return
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.Stream = _Stream
    torch.cuda.Event = lambda *a, **k: _Event()
    torch.cuda.current_stream = lambda *a, **k: _Stream()
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    def to_cpu(tensor, as_numpy=False, record_stream=False):
        if tensor is None or not torch.is_tensor(tensor):
            return tensor
        out = tensor.cpu()
        return out.numpy() if as_numpy else out

    moe_utils.maybe_move_tensor_to_cpu = to_cpu
    from megatron.core.transformer.moe import token_dispatcher

    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        token_dispatcher.maybe_move_tensor_to_cpu = to_cpu
    _installed = True
