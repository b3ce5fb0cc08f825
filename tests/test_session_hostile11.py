"""A hostile pass against the real loralib and peft (2026-12-02): each test failed before its fix.

- reset_parameters() on a merged layer: train() then took the old merged adapter out of the freshly drawn weight
  (off by 2-14 in the pass's layers), and state_dict() saved the same wrong base; loralib gives the fresh weight.
"""
import pytest
import torch
import torch.nn as nn

import lora_ext as lora
from helpers import randomize_

KINDS = {
    "Linear": (lambda: lora.Linear(6, 5, r=2, lora_alpha=4), lambda: nn.Linear(6, 5)),
    "MergedLinear": (lambda: lora.MergedLinear(6, 6, r=2, lora_alpha=4, enable_lora=[True, False, True]),
                     lambda: nn.Linear(6, 6)),
    "Embedding": (lambda: lora.Embedding(7, 5, r=2, lora_alpha=4), lambda: nn.Embedding(7, 5)),
    "Conv2d": (lambda: lora.Conv2d(2, 4, 3, r=2, lora_alpha=4), lambda: nn.Conv2d(2, 4, 3)),
}


def _weight(module):
    return module.conv.weight if hasattr(module, "conv") else module.weight


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_reset_parameters_of_a_merged_layer_leaves_the_fresh_weight(kind):
    make, plain = KINDS[kind]
    torch.set_default_dtype(torch.float64)
    try:
        layer = make()
        randomize_(layer)  # a trained adapter
        layer.eval()
        assert layer.merged
        torch.manual_seed(123)
        layer.reset_parameters()
        torch.manual_seed(123)
        fresh = plain()  # nn.Module's own draw of the weight, with the same seed
    finally:
        torch.set_default_dtype(torch.float32)
    assert not layer.merged
    assert not (layer.lora_A if kind == "Embedding" else layer.lora_B).any()  # fresh: loralib zeroes B (Embedding: A)
    key = "conv.weight" if hasattr(layer, "conv") else "weight"
    assert torch.equal(layer.state_dict()[key], fresh.weight.detach())
    layer.train()
    assert torch.equal(_weight(layer).detach(), fresh.weight.detach())
    layer.eval()
    assert torch.equal(_weight(layer).detach(), fresh.weight.detach())  # a zero update: merging changes nothing
