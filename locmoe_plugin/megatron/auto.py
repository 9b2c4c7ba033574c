"""``import locmoe_plugin.megatron.auto`` enables LocMoE for Megatron-LM (the one-line edit of
``pretrain_gpt.py``; see ``patches/``): the ``--locmoe*`` flags are registered and, with ``--locmoe``,
GPT layer specs build LocMoE layers."""

from .enable import enable

enable()
