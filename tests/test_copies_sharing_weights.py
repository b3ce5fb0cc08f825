"""A copy of a merged layer that shares its weight Parameter with the original (copy.copy; copy.deepcopy with a memo
that keeps the Parameters): the adapter is taken out of the shared weight, with a warning, and both layers add it
on the fly. Before, each layer's bookkeeping said merged over the one weight: the copy's train() unmerged it while
the original went on serving the weight alone (the adapter dropped, 40 off on a 24 x 16 layer), and a switch of
the copy served the other adapter under the original's name."""
import copy

import pytest
import torch

import lora_ext


def _merged(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer = lora_ext.Linear(24, 16, r=4, lora_alpha=8)
    elif kind == "embedding":
        layer = lora_ext.Embedding(30, 16, r=4, lora_alpha=8)
    else:
        layer = lora_ext.MergedLinear(24, 48, r=2, lora_alpha=4, enable_lora=[True, False, True])
    with torch.no_grad():
        layer.lora_B.normal_()
    base = layer.weight.detach().clone()
    layer.eval()
    return layer, base


def _x(kind):
    return torch.randint(0, 30, (3, 5)) if kind == "embedding" else torch.randn(5, 24)


def _want(kind, layer, base, x):
    """float64 by hand: the base plus the layer's adapter."""
    s, A, B = layer.scaling, layer.lora_A.double(), layer.lora_B.double()
    if kind == "embedding":
        return torch.nn.functional.embedding(x, base.double() + s * (B @ A).t())
    if kind == "linear":
        delta = B @ A
    else:
        delta = torch.zeros(48, 24, dtype=torch.float64)
        for j, e in enumerate((0, 2)):
            delta[e * 16:(e + 1) * 16] = B[j * 16:(j + 1) * 16] @ A[j * 2:(j + 1) * 2]
    return x.double() @ (base.double() + s * delta).t() + layer.bias.double()


COPIES = {
    "copy.copy": copy.copy,
    "deepcopy keeping Parameters": lambda m: copy.deepcopy(m, {id(p): p for p in m.parameters()}),
}


@pytest.mark.parametrize("kind", ["linear", "embedding", "merged"])
@pytest.mark.parametrize("how", list(COPIES))
def test_a_copy_sharing_the_merged_weight_takes_the_adapter_out(kind, how):
    layer, base = _merged(kind)
    x = _x(kind)
    want = _want(kind, layer, base, x)
    with pytest.warns(UserWarning, match="a copy made while merged shares its weight"):
        twin = COPIES[how](layer)
    assert twin.weight is layer.weight
    assert not layer.merged and not twin.merged
    assert (layer.weight.detach().double() - base.double()).abs().max() <= 1e-6 * base.abs().max()
    twin.train()  # (it used to take the merge out under the original)
    with torch.no_grad():
        for m in (layer, twin):
            assert (m(x).double() - want).abs().max() <= 1e-5 * want.abs().max()
    layer.eval()  # a weight two layers compute with: left unmerged (warns), never merged into
    assert not layer.merged
    with torch.no_grad():
        assert (layer(x).double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_copy_not_sharing_the_weight_keeps_both_merges():
    layer, base = _merged("linear")
    twin = copy.deepcopy(layer)
    assert layer.merged and twin.merged and twin.weight is not layer.weight
    twin.train()
    assert layer.merged
    x = _x("linear")
    with torch.no_grad():
        want = _want("linear", layer, base, x)
        assert (layer(x).double() - want).abs().max() <= 1e-5 * want.abs().max()
        assert (twin(x).double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_copy_copy_gets_dicts_of_its_own():
    layer, _ = _merged("linear")
    layer.train()
    twin = copy.copy(layer)
    assert twin._parameters is not layer._parameters and twin._buffers is not layer._buffers
    twin.register_buffer("extra", torch.zeros(1))
    assert "extra" not in layer._buffers
