"""lora_ext: a drop-in, faster loralib. `import lora_ext as lora`."""
from . import ops
from .layers import Conv1d, Conv2d, Conv3d, ConvLoRA, Embedding, Linear, LoRALayer, MergedLinear
from .utils import lora_state_dict, mark_only_lora_as_trainable

__version__ = "0.1.0"

__all__ = [
    "LoRALayer", "Linear", "Embedding", "MergedLinear", "ConvLoRA", "Conv1d", "Conv2d", "Conv3d",
    "mark_only_lora_as_trainable", "lora_state_dict", "ops",
]
