"""A hostile pass against the real loralib and peft (2026-12-02): each test failed before its fix.

- reset_parameters() on a merged layer: train() then took the old merged adapter out of the freshly drawn weight
  (off by 2-14 in the pass's layers), and state_dict() saved the same wrong base; loralib gives the fresh weight.
- set_adapter with a list of names (peft's several active adapters) raised TypeError("unhashable type: 'list'");
  now a TypeError that says a layer serves one adapter and what to use instead.
- A scaling that requires grad (loralib trains it) was refused as "must be a finite number" (it is), and an
  nn.Parameter assigned to `scaling` raised KeyError("attribute 'scaling' already exists"); both now say that
  lora_ext's ops give the scaling no gradient.
- MergedLinear.zero_pad (loralib's) was missing.
"""
import pytest
import torch
import torch.nn as nn

import loralib

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


def test_set_adapter_with_several_names_says_one_adapter_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(lora.Linear(4, 4, r=2), lora.Linear(4, 4, r=2))
    for layer in model:
        layer.add_adapter("b", torch.randn(2, 4), torch.randn(4, 2), 0.5)
    for call in (lambda: lora.set_adapter(model, ["default", "b"]), lambda: model[0].set_adapter(["b"]),
                 lambda: lora.set_adapter(model, ("b",))):
        with pytest.raises(TypeError, match=r"takes one adapter's name \(a str\).*serves one active adapter"):
            call()
        assert [layer.active_adapter for layer in model] == ["default", "default"]


@pytest.mark.parametrize("param", [False, True])
def test_a_scaling_that_requires_grad_is_refused_saying_why(param):
    layer = lora.Linear(4, 3, r=2, lora_alpha=4)
    value = nn.Parameter(torch.tensor(0.5)) if param else torch.tensor(0.5, requires_grad=True)
    with pytest.raises(ValueError, match=r"scaling must be a number, got a (Tensor|Parameter) that requires grad \(0.5\).*no gradient"):
        layer.scaling = value
    assert layer.scaling == 2.0
    assert "scaling" not in dict(layer.named_parameters())
    layer.scaling = nn.Parameter(torch.tensor(0.25), requires_grad=False)  # a constant, as a tensor: taken
    assert layer.scaling == 0.25 and type(layer.scaling) is float


@pytest.mark.parametrize("enable", [[True, False, True], [False, True], [True]])
def test_merged_linear_zero_pad_as_loralib(enable):
    ours = lora.MergedLinear(4, 6, r=2, enable_lora=enable)
    theirs = loralib.MergedLinear(4, 6, r=2, enable_lora=enable)
    x = torch.randn(6 // len(enable) * sum(enable), 3)
    got = ours.zero_pad(x)
    assert torch.equal(got, theirs.zero_pad(x))
    rows = [i for i in range(6) if enable[i // (6 // len(enable))]]
    assert torch.equal(got[rows], x) and not got[[i for i in range(6) if i not in rows]].any()
    with pytest.raises(ValueError, match="zero_pad: x has 1 rows"):
        ours.zero_pad(x[:1])
