"""eval() of a model meets a layer whose lossless merge is refused (its record would be over its exception limit).
As with the other merge refusals (a tied weight, a parametrized one), eval() warns and leaves that layer unmerged,
serving its adapter on the fly, and goes on with the rest of the model: before, it raised there, the modules before
the layer in eval mode and the rest still training. merge() still refuses; non-finite factors and updates that could
leave the weight dtype's range still make eval() raise (tests/test_reliability.py), since served on the fly they
would give inf or NaN."""
import pytest
import torch
import torch.nn as nn

import lora_ext as lora
from helpers import layer_forward64, rel_err, same_bits


def model(dtype, second):
    torch.manual_seed(0)
    net = nn.Sequential(lora.Linear(64, 64, r=2, lora_alpha=2), nn.Dropout(0.5), second).to(dtype)
    with torch.no_grad():
        net[0].lora_B.normal_()
    return net


def reference(net, x):
    """float64 forward of the model in eval mode, each layer from its base weight and live adapter."""
    y = x.double()
    for m in (net[0], net[2]):
        p = {k: v.detach().double() for k, v in m.state_dict().items()}
        y = layer_forward64(m, p, y, m.scaling)
    return y


def check(net, dtype, x, match):
    base = net[2].weight.detach().clone()
    with pytest.warns(UserWarning, match=match):
        net.eval()
    assert not any(m.training for m in net.modules()), "eval() stopped part way"
    assert net[0].merged and not net[2].merged
    assert same_bits(net[2].weight.detach(), base)  # nothing written
    with torch.no_grad():
        err = rel_err(net(x), reference(net, x))
    assert err < (1e-2 if dtype != torch.float32 else 1e-5), err
    net.train()  # nothing to take out of the refused layer; the first gives its base back
    assert same_bits(net[2].weight.detach(), base)


def test_a_lossless_overflow_leaves_that_layer_unmerged():
    second = lora.Linear(64, 64, r=2, lora_alpha=2, lossless=True)
    net = model(torch.bfloat16, second)
    with torch.no_grad():
        second.lora_A.normal_(std=30.0)
        second.lora_B.normal_(std=30.0)  # |s B A| far above |W| nearly everywhere: over the exception limit
    check(net, torch.bfloat16, torch.randn(3, 64, dtype=torch.bfloat16),
          r"eval\(\) leaves adapter 'default' unmerged: .*lossless merge would need")


def test_merge_still_refuses_and_non_finite_factors_still_raise():
    second = lora.Linear(64, 64, r=2, lora_alpha=2, lossless=True)
    model(torch.bfloat16, second)  # (the layer in bfloat16)
    with torch.no_grad():
        second.lora_A.normal_(std=30.0)
        second.lora_B.normal_(std=30.0)
    with pytest.raises(lora.lossless.ExceptionOverflow):
        second.merge()
    assert not second.merged
    other = lora.Linear(64, 64, r=2, lora_alpha=2)
    with torch.no_grad():
        other.lora_B.normal_()
        other.lora_A[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        other.eval()
    assert not other.merged
