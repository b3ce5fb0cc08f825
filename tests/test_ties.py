"""Weights shared by several modules (lora_ext/ties.py): a merge into a weight another module computes with
would change that module's output too, so it is refused (merge()) or skipped with a warning (eval())."""
import copy
import pickle
import warnings

import pytest
import torch

import lora_ext as lora
import tiny_models


def _reference(layer, x):
    """The unmerged layer's output in float64, from its parameters: x W^T + b + s x A^T B^T."""
    w, a, b = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B))
    x = x.double()
    return x @ w.t() + layer.bias.detach().double() + layer.scaling * (x @ a.t()) @ b.t()


def _tied_pair(kind):
    torch.manual_seed(0)
    l1, l2 = (kind(16, 12, r=4, lora_alpha=8) for _ in range(2))
    for layer in (l1, l2):
        torch.nn.init.normal_(layer.lora_B)
    l2.weight = l1.weight
    return l1, l2


@pytest.mark.parametrize("kind", [lora.Linear,
                                  lambda i, o, **kw: lora.MergedLinear(i, o, enable_lora=[True, False, True],
                                                                       **kw)])
def test_merge_into_a_weight_another_layer_holds_is_refused(kind):
    l1, l2 = _tied_pair(kind)
    before = l1.weight.detach().clone()
    for layer, other in ((l1, l2), (l2, l1)):
        with pytest.raises(ValueError, match=rf"shared with {type(other).__name__}.* at 0x{id(other):x}"):
            layer.merge()
        assert not layer.merged
        assert torch.equal(l1.weight, before)  # refused before anything was written


def test_eval_leaves_tied_layers_unmerged_with_a_warning_and_both_outputs_right():
    l1, l2 = _tied_pair(lora.Linear)
    x = torch.randn(5, 16)
    expected = [_reference(layer, x) for layer in (l1, l2)]
    assert not torch.allclose(expected[0], expected[1])  # two different adapters over one weight
    before = l1.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.nn.Sequential(l1, l2).eval()
    assert sum("eval() leaves adapter 'default' unmerged" in str(w.message) for w in caught) == 2
    assert not l1.merged and not l2.merged and not l1.training and not l2.training
    assert torch.equal(l1.weight, before)
    for layer, want in zip((l1, l2), expected):
        torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_of_tied_layers_stay_tied(how):
    l1, l2 = _tied_pair(lora.Linear)
    model = torch.nn.Sequential(l1, l2)
    copied = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert copied[0].weight is copied[1].weight
    before = copied[0].weight.detach().clone()
    with pytest.raises(ValueError, match="shared with"):
        copied[0].merge()
    assert torch.equal(copied[0].weight, before)


def test_untied_layers_merge_again():
    l1, l2 = _tied_pair(lora.Linear)
    x = torch.randn(5, 16)
    l2.weight = torch.nn.Parameter(l1.weight.detach().clone())  # untied: each its own weight
    want = _reference(l1, x)
    l1.merge()
    assert l1.merged
    torch.testing.assert_close(l1(x).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l2(x).double(), _reference(l2, x), rtol=1e-5, atol=1e-5)


def test_a_layer_that_dropped_the_shared_weight_no_longer_blocks_merges():
    l1, l2 = _tied_pair(lora.Linear)
    l2.weight = torch.nn.Parameter(torch.randn(12, 16))
    l1.merge()  # l2 was noted for the old weight; it no longer holds it
    assert l1.merged


def test_injected_embedding_tied_to_the_lm_head_refuses_merge():
    model = tiny_models.gpt2()
    lora.inject(model, r=4, target_modules=["wte"])
    wte = model.transformer.wte
    assert model.lm_head.weight is wte.weight
    tiny_models.randomize_lora(model)
    ids = tiny_models.tokens()
    logits = model(ids).logits.detach()
    before = wte.weight.detach().clone()
    with pytest.raises(ValueError, match="shared with lm_head"):
        wte.merge()  # the layer's own merge(): it wrote into lm_head's weight before
    assert not wte.merged and torch.equal(wte.weight, before)
    torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0)


def test_model_level_merge_refuses_tied_layers_before_writing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(lora.Linear(16, 16, r=4), lora.Linear(16, 16, r=4), lora.Linear(16, 16, r=4))
    tiny_models.randomize_lora(model)
    model[2].weight = model[1].weight  # layer 0 is untied and comes first: it must not be merged either
    before = [layer.weight.detach().clone() for layer in model]
    with pytest.raises(ValueError, match=r"the weight of '1' is tied to"):
        lora.merge_adapter(model)
    assert not any(layer.merged for layer in model)
    assert all(torch.equal(layer.weight, w) for layer, w in zip(model, before))
    with pytest.raises(ValueError, match=r"the weight of '1' is tied to"):
        lora.unload(model, merge=True)
    assert all(isinstance(layer, lora.Linear) for layer in model)
