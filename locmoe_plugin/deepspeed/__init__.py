"""DeepSpeed adapter: a ``deepspeed.moe.layer.MoE`` whose gate is the LocMoE router and whose token
exchange is the core (hierarchical) dispatcher. Requires deepspeed (``pip install 'locmoe-plugin[deepspeed]'``)."""

from .gate import LocMoEGate
from .layer import LocMoE, locmoe_settings_from_ds_config

__all__ = ["LocMoE", "LocMoEGate", "locmoe_settings_from_ds_config"]
