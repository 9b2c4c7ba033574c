"""Token ids for LocMoE hash routing inside megatron-core's ``GPTModel``.

Hash routing (``{"routing": "hash"}``) needs each token's id, which Megatron's router contract
(``forward(hidden, padding_mask)``) does not pass. :func:`attach_token_ids` adds that, explicitly and
removably: a forward pre-hook on the ``GPTModel`` keeps its ``input_ids`` in this module, in the order the
routers see tokens, until the model's forward returns; the router reads them with
:func:`current_token_ids`. Limits: the routers must run inside ``GPTModel.forward`` (no activation
recomputation of the router - refused at the router's construction -, no CUDA graph replay of it, and the
``input_ids`` must reach every pipeline stage, which Megatron-LM's ``get_batch`` gives to the first and last
stages only); MTP layers hash the input token at the same position.
"""

from __future__ import annotations

import torch

_token_ids: torch.Tensor | None = None  # [s, b] int, set by attach_token_ids' hooks during GPTModel.forward


class TokenIdsHandle:
    """What :func:`attach_token_ids` returns: ``remove()`` takes both hooks off and clears the ids."""

    def __init__(self, *handles) -> None:
        self._handles = handles

    def remove(self) -> None:
        global _token_ids
        for h in self._handles:
            h.remove()
        _token_ids = None


def attach_token_ids(gpt_model) -> TokenIdsHandle:
    """Let LocMoE hash routers in ``gpt_model`` see the token ids (see the module doc).

    A forward pre-hook stores ``input_ids [b, s]`` as ``[s, b]`` (Megatron's token order), cut to this
    tensor-parallel rank's sequence shard under sequence parallelism (as the embedding scatters the
    hidden states); a forward hook clears them when the forward returns or raises. Call once after
    building the model, on the ``GPTModel`` itself (not a DDP / Float16Module wrapper); with virtual
    pipeline stages, on every model chunk.
    """
    tp = gpt_model.tp_group
    shard = gpt_model.config.sequence_parallel and tp.size() > 1

    def keep(module, args, kwargs):
        global _token_ids
        ids = kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)
        if ids is not None:
            ids = ids.t()
            if shard:
                ids = ids.chunk(tp.size(), dim=0)[tp.rank()]
        _token_ids = ids

    def clear(module, args, kwargs, output):
        global _token_ids
        _token_ids = None

    return TokenIdsHandle(
        gpt_model.register_forward_pre_hook(keep, with_kwargs=True),
        gpt_model.register_forward_hook(clear, with_kwargs=True, always_call=True),
    )


def current_token_ids() -> torch.Tensor:
    """The ``[s, b]`` token ids of the ``GPTModel`` forward in progress; a clear error without them."""
    if _token_ids is None:
        raise RuntimeError(
            "LocMoE routing='hash' needs the token ids, and none are set: call "
            "locmoe_plugin.megatron.attach_token_ids(gpt_model) once after building the model, run the "
            "router inside GPTModel.forward (not in activation recomputation), and pass input_ids to "
            "every pipeline stage"
        )
    return _token_ids
