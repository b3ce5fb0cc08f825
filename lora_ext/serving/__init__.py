"""Serving: LoRA in existing models (inject/unload), peft adapter files, named adapters and in-place
switching, streaming checkpoint merges (`lora-ext merge`) and the `lora-ext demo`."""
from .adapters import (active_adapter, adapter_names, add_weighted_adapter, delete_adapter, disable_adapter, hold,
                       lora_layers, merge_adapter, reserve_rank, reserved_rank, set_adapter, unmerge_adapter)
from .batches import batch_adapters, configure_slots, slot_config
from .injection import inject, unload
from .peft_io import hotswap_adapter, load_peft_adapter, save_peft_adapter

__all__ = ["inject", "unload", "load_peft_adapter", "save_peft_adapter", "set_adapter", "active_adapter",
           "adapter_names", "add_weighted_adapter", "delete_adapter", "disable_adapter", "hold", "lora_layers", "merge_adapter", "unmerge_adapter",
           "batch_adapters", "configure_slots", "slot_config", "reserve_rank", "reserved_rank", "hotswap_adapter"]
