"""Gates: hidden states ``x [s, d]`` -> gate logits ``[s, n]``, and the token-expert affinity.

* GrAP (LocMoE): parameter-free grouped average pooling. Expert i's logit is the mean of the i-th
  contiguous group of d/n features: ``g[t, i] = mean(x[t, i*d/n:(i+1)*d/n])``. This equals
  ``x . w_i`` with the fixed weights ``w_i = (n/d) * 1[group i]``, which have disjoint supports and are
  therefore orthogonal. Cost O(d) per token instead of O(d n). Routing is learned only through the
  hidden states that feed it.
* Dense: a learned linear gate ``x W^T`` with ``W [n, d]`` (what Megatron's TopKRouter and DeepSpeed's
  TopKGate use), kept for comparison and for loading their checkpoints.

Affinity (LocMoE+): ``cos(x_t, w_i)``. For GrAP it is ``sqrt(d/n) * g[t, i] / ||x_t||``. A zero-norm
token (or a zero gate row) has affinity 0, never NaN.

All gate outputs are fp32 whatever the input dtype (router numerics, as Megatron's
``moe_router_dtype=fp32``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .config import LocMoEConfig

_TINY = 1e-12  # norm floor: a zero vector gets affinity 0 instead of 0/0


def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 input (reductions take it without a copy of x)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def row_norm(x: torch.Tensor) -> torch.Tensor:
    """``[s, 1]`` L2 norms in the accumulation dtype, floored so a zero row divides to 0 (of tokens: the
    denominator of every gate's ``affinity``, which takes it precomputed as ``norm``)."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=_acc(x)).clamp_min(_TINY)


def grap_weight(hidden_size: int, num_experts: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[n, d]`` GrAP weights ``w_i = (n/d) * 1[i*d/n <= j < (i+1)*d/n]`` (for tests and analysis;
    the gate itself never materialises them)."""
    group = hidden_size // num_experts
    w = torch.zeros(num_experts, hidden_size, dtype=dtype)
    for i in range(num_experts):
        w[i, i * group : (i + 1) * group] = 1.0 / group
    return w


def cosine_affinity(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``cos(x_t, w_i)`` for ``x [s, d]`` and ``weight [n, d]`` -> ``[s, n]`` (fp32, or fp64 for fp64
    input); 0 for zero norms."""
    x, w = x.to(_acc(x)), weight.to(_acc(x))
    return (x @ w.t()) / row_norm(x) / row_norm(w).t()


class GrAPGate(nn.Module):
    """Parameter-free grouped average pooling gate (LocMoE)."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        if hidden_size % num_experts:
            raise ValueError(
                f"hidden_size {hidden_size} is not divisible by num_experts {num_experts}: GrAP needs d % n == 0"
            )
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self._scale = math.sqrt(hidden_size / num_experts)  # 1 / ||w_i|| * (n/d) folded: see affinity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d]`` (any float dtype) -> logits ``[s, n]`` fp32 (group means), the leading dimensions
        flattened into ``s`` by the same reshape that groups the features."""
        return torch.mean(x.reshape(-1, self.num_experts, self.hidden_size // self.num_experts), dim=-1,
                          dtype=_acc(x))

    def affinity(self, x: torch.Tensor, logits: torch.Tensor | None = None,
                 norm: torch.Tensor | None = None) -> torch.Tensor:
        """``[s, n]`` fp32 cosine between each token and each GrAP weight vector. ``norm``: the tokens'
        :func:`row_norm` when the caller has it (a second affinity of the same tokens reads it again)."""
        if logits is None:
            logits = self.forward(x)
        return logits * self._scale / (row_norm(x) if norm is None else norm)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, parameter-free"


class DenseGate(nn.Module):
    """Learned linear gate ``logits = x W^T``, ``W [n, d]``, no bias (as Megatron's TopKRouter)."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        init_method: Callable[[torch.Tensor], object] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        with torch.no_grad():
            (init_method or (lambda w: nn.init.normal_(w, std=0.02)))(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.float(), self.weight.float())

    def affinity(self, x: torch.Tensor, logits: torch.Tensor | None = None,
                 norm: torch.Tensor | None = None) -> torch.Tensor:
        """``[s, n]`` fp32 cosine between each token and each gate row; ``norm`` as for :class:`GrAPGate`."""
        if logits is None:
            logits = self.forward(x)
        return logits / (row_norm(x) if norm is None else norm) / row_norm(self.weight.float()).t()

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}"


def build_gate(
    config: LocMoEConfig,
    init_method: Callable[[torch.Tensor], object] | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    if config.gate == "grap":
        return GrAPGate(config.hidden_size, config.num_experts)
    return DenseGate(config.hidden_size, config.num_experts, init_method=init_method, device=device)
