"""A rank's expert MLPs as grouped GEMMs: one GEMM per projection for all local experts.

Rows arrive sorted by local expert (``counts[e]`` rows for expert ``e``, ``n`` in all); each expert's
weights are in ``torch.nn.Linear``'s ``[out, in]`` layout, stacked over the ``E`` local experts::

    rows [n, H] --grouped GEMM with fc1 [E, F1, H]--> [n, F1]     (F1 = F, or 2 F for a gated unit)
                --activation (and the combine weight)-->  [n, F]
                --grouped GEMM with fc2 [E, H, F]-->     [n, H]

Each projection is one kernel whatever ``E``, and its backward two (input and weight gradients), where
a loop over experts issues about a dozen kernels and autograd nodes per expert per step: on one node,
where a MoE layer is bound by the host's launches, that loop is the largest host cost of the layer
(docs/one_node.md).

Backend (:func:`locmoe_plugin.device.grouped_mm`): torch's ``grouped_mm`` where the device has it (CUDA
and CPU, torch >= 2.8) and the rows' strides are 16-byte aligned, as it requires; otherwise (Ascend NPU,
odd sizes, no rows at all) a loop over experts of the same matmuls. Group offsets are made on the
device from a device count tensor, or copied from pinned host memory without waiting: no host sync.

Numerics: each expert's rows see the same matmuls as a per-expert ``F.linear``; on CPU the grouped form
equals the loop bit for bit (tested), on the GPU its kernels may sum in another order (allclose).
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .config import ConfigError
from .device import grouped_mm

Activation = Callable[[torch.Tensor], torch.Tensor]
#: the grouped-experts setting of both adapters: "auto" where the experts allow it, "on" (refuse others), "off"
GROUPED_EXPERTS_MODES = ("auto", "on", "off")


def check_grouped_experts_mode(mode: str, setting: str = "grouped experts") -> str:
    """``mode`` if it is one of :data:`GROUPED_EXPERTS_MODES`, else a :class:`ConfigError` naming ``setting`` and
    the modes."""
    if mode not in GROUPED_EXPERTS_MODES:
        raise ConfigError(f"{setting} {mode!r}: expected one of {', '.join(GROUPED_EXPERTS_MODES)}")
    return mode


def expert_mlp(rows: torch.Tensor, tokens_per_expert: torch.Tensor | Sequence[int], fc1: torch.Tensor,
               fc2: torch.Tensor, activation: Activation, probs: torch.Tensor | None = None) -> torch.Tensor:
    """``rows [n, H]`` sorted by local expert, ``tokens_per_expert [E]`` (host ints or an int tensor on any
    device), ``fc1 [E, F1, H]``, ``fc2 [E, H, F]``, ``activation``: ``[m, F1] -> [m, F]`` elementwise per row,
    ``probs [n]`` (optional) each row's combine weight, applied after the activation in its dtype and the
    product cast back to the rows' dtype (as megatron-core's expert MLP) -> ``[n, H]``."""
    e = fc1.shape[0]
    if fc2.shape[0] != e or rows.shape[-1] != fc1.shape[-1]:
        raise ValueError(f"expert_mlp: rows {tuple(rows.shape)}, fc1 {tuple(fc1.shape)} and fc2 {tuple(fc2.shape)} "
                         f"do not fit: expected rows [n, H], fc1 [E, F1, H], fc2 [E, H, F]")
    mm = grouped_mm(rows.device)
    if mm is None or rows.shape[0] == 0 or not _aligned(rows, fc1, fc2):
        return _loop(rows, tokens_per_expert, fc1, fc2, activation, probs)
    offs = group_offsets(tokens_per_expert, rows.device)
    h = activation(mm(rows, fc1.transpose(1, 2), offs=offs))
    if probs is not None:
        h = (h * probs.unsqueeze(-1)).to(rows.dtype)
    return mm(h, fc2.transpose(1, 2), offs=offs)


def group_offsets(tokens_per_expert: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    """``[E]`` int32 on ``device``: the end row of each expert's group (the cumulative counts), made without a
    host sync: on the device from a device tensor; from host counts through pinned memory, copied
    without waiting (a copy from pageable memory would wait for the device's queue)."""
    if isinstance(tokens_per_expert, torch.Tensor) and tokens_per_expert.device.type != "cpu":
        return tokens_per_expert.to(device).cumsum(0).to(torch.int32)
    counts = tokens_per_expert.tolist() if isinstance(tokens_per_expert, torch.Tensor) else list(tokens_per_expert)
    offs = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32)
    if device.type == "cpu":
        return offs
    return offs.pin_memory().to(device, non_blocking=True)


def _aligned(*tensors: torch.Tensor) -> bool:
    """grouped_mm's layout rule: every row (the last dimension) a multiple of 16 bytes."""
    return all(t.shape[-1] * t.element_size() % 16 == 0 for t in tensors) and all(
        t.shape[-2] * t.element_size() % 16 == 0 for t in tensors[1:])


def _loop(rows, tokens_per_expert, fc1, fc2, activation, probs) -> torch.Tensor:
    """The same math as one ``F.linear`` pair per expert (reads device counts to the host)."""
    counts = tokens_per_expert.tolist() if isinstance(tokens_per_expert, torch.Tensor) else list(tokens_per_expert)
    if rows.shape[0] == 0:
        counts = [0] * fc1.shape[0]
    outs = []
    for w1, w2, x, p in zip(fc1, fc2, torch.split(rows, counts),
                            torch.split(probs, counts) if probs is not None else itertools.repeat(None)):
        h = activation(F.linear(x, w1))
        if p is not None:
            h = (h * p.unsqueeze(-1)).to(rows.dtype)
        outs.append(F.linear(h, w2))
    return torch.cat(outs) if outs else rows.new_zeros(0, fc2.shape[1])


#: elementwise activation modules a two-layer expert may have between its projections
ELEMENTWISE_ACTIVATIONS = (torch.nn.GELU, torch.nn.SiLU, torch.nn.ReLU, torch.nn.Tanh, torch.nn.Sigmoid)
TWO_LAYER_FORM = ("nn.Sequential(nn.Linear(H, F, bias=False), an elementwise activation module "
                  f"({', '.join(a.__name__ for a in ELEMENTWISE_ACTIVATIONS)}), nn.Linear(F, H, bias=False))")


def two_layer_parts(expert: torch.nn.Module):
    """``(fc1 Linear, activation module, fc2 Linear)`` of an expert of :data:`TWO_LAYER_FORM`, else None."""
    if not isinstance(expert, torch.nn.Sequential) or len(expert) != 3:
        return None
    fc1, act, fc2 = expert
    if not (isinstance(fc1, torch.nn.Linear) and isinstance(fc2, torch.nn.Linear)
            and type(act) in ELEMENTWISE_ACTIVATIONS and fc1.bias is None and fc2.bias is None
            and fc1.out_features == fc2.in_features):
        return None
    return fc1, act, fc2
