"""Cases shared by the kernel tests, on the simulator and on CUDA."""
import torch

KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (num_blocks, enabled block ids, transposed): plain Linear/Conv; transposed storage (fan_in_fan_out,
# Embedding); MergedLinear's enable_lora patterns
PATTERNS = {
    "plain": (1, [0], False),
    "transposed": (1, [0], True),
    "merged_TFT": (3, [0, 2], False),
    "merged_FT": (2, [1], False),
    "merged_TTT": (3, [0, 1, 2], False),
    "merged_TFT_transposed": (3, [0, 2], True),
}
