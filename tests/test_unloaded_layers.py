"""A layer lora_ext.unload took out of its model, still held by the user (`q = model.q_proj`), must not act on the
weight that is now the plain module's: a merged one took its adapter out of that weight when the next inject tied a
layer to it (3.0 off, with a misleading tie warning), and an unmerged one counted as a tie that kept the next layer
from merging. It refuses any use instead, saying it was unloaded."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_ext


def _model(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Linear(8, 6)), torch.randn(3, 8)
    if kind == "embedding":
        return nn.Sequential(nn.Embedding(10, 6)), torch.randint(0, 10, (3, 4))
    return nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(2, 3, 6, 6)


def _randomized(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _reference(layer, x, merge):
    """float64 output of the layer's base plus (merge) its adapter, from its factors by plain torch."""
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    if isinstance(layer, lora_ext.Embedding):
        W = layer.weight.detach().double()
        return F.embedding(x, W) + (layer.scaling * F.embedding(x, A.T) @ B.T if merge else 0)
    if isinstance(layer, lora_ext.Linear):
        W = layer.weight.detach().double() + (layer.scaling * B @ A if merge else 0)
        return F.linear(x.double(), W, layer.bias.detach().double())
    conv = layer.conv
    W = conv.weight.detach().double() + (layer.scaling * (B @ A).view(conv.weight.shape) if merge else 0)
    return F.conv2d(x.double(), W, conv.bias.detach().double())


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv"])
@pytest.mark.parametrize("merge", [True, False])
def test_a_held_unloaded_layer_leaves_the_plain_weight_alone_and_refuses_use(kind, merge):
    model, x = _model(kind)
    lora_ext.inject(model, ["0"], r=2)
    _randomized(model)
    held = model[0]
    shapes = held.factor_shapes(2)
    held.add_adapter("b", *[torch.randn(s) for s in shapes], 1.0)  # (an adapter to switch to, or delete)
    ref = _reference(held, x, merge)
    model.eval()
    lora_ext.unload(model, merge=merge)
    plain = model[0]
    assert not isinstance(plain, lora_ext.LoRALayer)
    assert (plain(x).double() - ref).abs().max().item() < 1e-5
    before = plain.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (before the fix: a tie warning, and the adapter taken out of the weight)
        lora_ext.inject(model, ["0"], r=2)  # a fresh adapter (lora_B zero): outputs unchanged
        model.eval()  # merges: the old layer is no tie
    assert model[0].merged
    assert torch.equal(model[0].weight if kind != "conv" else model[0].conv.weight, before)
    assert (model[0](x).double() - ref).abs().max().item() < 1e-5
    state = model[0].state_dict()
    assert all(p is not plain.weight and p is not getattr(plain, "bias", None) for p in held.parameters())
    for use in (lambda: held(x), lambda: held.train(held.merged), lambda: held.state_dict(),
                lambda: lora_ext.unload(nn.Sequential(held)), lambda: held.to(torch.float64),
                lambda: held.load_state_dict(state, strict=False),
                lambda: held.add_adapter("x", *[torch.zeros(s) for s in shapes], 1.0),
                lambda: lora_ext.mark_only_lora_as_trainable(nn.Sequential(held), bias="lora_only"),
                lambda: lora_ext.lora_state_dict(nn.Sequential(held), bias="lora_only"),
                lambda: lora_ext.merge_adapter(nn.Sequential(held)),
                # (before: a merged layer's switch or unmerge said its weight was "not a registered parameter (a
                # parametrization ...)", a ConvLoRA's raised AttributeError, an unmerged one's switched; reset raised
                # AttributeError)
                lambda: held.set_adapter("b"), lambda: lora_ext.set_adapter(nn.Sequential(held), "b"),
                lambda: held.delete_adapter("b"), lambda: held.merge(), lambda: held.unmerge(),
                lambda: lora_ext.unmerge_adapter(nn.Sequential(held)), lambda: held.reset_parameters(),
                # (R6: these wrote the dead layer's factors, or raised AttributeError)
                lambda: held.reset_lora_parameters(), lambda: held.set_adapter_dropout("b", 0.1),
                lambda: held.check_values("b"), lambda: lora_ext.reserve_rank(nn.Sequential(held), 4)):
        with pytest.raises(RuntimeError, match="taken out of its model by lora_ext.unload"):
            use()
    assert torch.equal(model[0].weight if kind != "conv" else model[0].conv.weight, before)
