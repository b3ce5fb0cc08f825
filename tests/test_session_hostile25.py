"""Bugs found by the thirty-second session's hostile testers, each shown failing on the code before its fix."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_ext as lora


def _served_then_unfrozen_by_hand():
    """A Linear(8, 8, r=2) that trained 'default' and 'b' with one optimizer each, was frozen and switched back to
    'default' (a serving switch: 'b''s Parameters lent to 'default'), then unfrozen by hand."""
    torch.manual_seed(0)
    layer = lora.Linear(8, 8, r=2, lora_alpha=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.add_adapter("b", torch.randn(2, 8), torch.randn(8, 2), 1.0)
    opts = {"default": torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)}
    layer.set_adapter("b")
    opts["b"] = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    layer.set_adapter("default")
    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(True)
    return layer, opts


def test_training_lent_parameters_after_unfreezing_by_hand_is_refused():
    # d33: the gradients went to 'b''s own Parameters, which opts['default'] does not hold: three steps changed
    # nothing (0.0, with mark_only_lora_as_trainable 0.785) and 'b' kept a stale gradient
    layer, opts = _served_then_unfrozen_by_hand()
    x = torch.randn(16, 8)
    with pytest.raises(RuntimeError, match=r"Linear\(8, 8\): its factors were made trainable while adapter 'default' "
                                           r"is served through adapter 'b''s own Parameters.*mark_only_lora_as_train"):
        layer(x)
    with torch.no_grad():  # serving forwards are not training: not refused
        served = layer(x)
    expect = (x.double() @ layer.weight.double().T + layer.bias.double()
              + (x.double() @ layer.lora_A.double().T @ layer.lora_B.double().T) * 1.0)
    assert torch.allclose(served.double(), expect, atol=1e-5)


@pytest.mark.parametrize("settle", ["mark_only", "set_adapter"])
def test_training_after_the_named_remedy_trains_the_adapters_own_parameters(settle):
    layer, opts = _served_then_unfrozen_by_hand()
    b_before = [t.detach().clone() for t in layer.get_adapter("b")[:2]]
    if settle == "mark_only":
        lora.mark_only_lora_as_trainable(layer)
    else:
        layer.set_adapter("default")
    x = torch.randn(16, 8)
    before = layer(x).detach()
    for _ in range(3):
        opts["default"].zero_grad()
        F.mse_loss(layer(x), torch.zeros(16, 8)).backward()
        opts["default"].step()
    assert (layer(x).detach() - before).abs().max() > 1e-2  # the steps reached the served adapter
    assert all(p.grad is not None for p in (layer.lora_A, layer.lora_B))
    layer.set_adapter("b")
    assert all(p.grad is None for p in opts["b"].param_groups[0]["params"])  # no gradient of 'default' left on b
    for got, want in zip(layer.get_adapter("b")[:2], b_before):
        assert torch.equal(got, want)
