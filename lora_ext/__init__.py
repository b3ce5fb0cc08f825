"""lora_ext: a drop-in, faster loralib. `import lora_ext as lora`."""
from . import ops, parallel  # noqa: F401 (parallel: refuses torch's stock TP styles on lora_ext layers)
from .layers import Conv1d, Conv2d, Conv3d, ConvLoRA, Embedding, Linear, LoRALayer, MergedLinear
from .utils import lora_state_dict, mark_only_lora_as_trainable
from .serving import (active_adapter, adapter_names, add_weighted_adapter, batch_adapters, configure_slots,
                      delete_adapter, disable_adapter, hold, hotswap_adapter, inject, load_peft_adapter, merge_adapter,
                      reserve_rank, reserved_rank, save_peft_adapter, set_adapter, slot_config, unload,
                      unmerge_adapter)
from .serving.saved_modules import ModulesToSave

__version__ = "0.1.0"

__all__ = [
    "LoRALayer", "Linear", "Embedding", "MergedLinear", "ConvLoRA", "Conv1d", "Conv2d", "Conv3d",
    "mark_only_lora_as_trainable", "lora_state_dict", "ops",
    "inject", "unload", "load_peft_adapter", "save_peft_adapter", "set_adapter", "active_adapter", "adapter_names", "add_weighted_adapter", "disable_adapter",
    "delete_adapter", "merge_adapter", "unmerge_adapter", "hold", "batch_adapters", "configure_slots", "slot_config",
    "reserve_rank", "reserved_rank", "hotswap_adapter",
    "ModulesToSave",
]
