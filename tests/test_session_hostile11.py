"""A hostile pass against the real loralib and peft (2026-12-02): each test failed before its fix.

- reset_parameters() on a merged layer: train() then took the old merged adapter out of the freshly drawn weight
  (off by 2-14 in the pass's layers), and state_dict() saved the same wrong base; loralib gives the fresh weight.
- set_adapter with a list of names (peft's several active adapters) raised TypeError("unhashable type: 'list'");
  now a TypeError that says a layer serves one adapter and what to use instead.
- A scaling that requires grad (loralib trains it) was refused as "must be a finite number" (it is), and an
  nn.Parameter assigned to `scaling` raised KeyError("attribute 'scaling' already exists"); both now say that
  lora_ext's ops give the scaling no gradient.
- MergedLinear.zero_pad (loralib's) was missing.
- A mixed batch through a module saved whole (modules_to_save) ran the module once per adapter with its other
  arguments whole: a decoder layer's cache then took every run's tokens, and later runs attended to earlier runs'
  rows (rows 0.5-1.6 off, no error). Arguments that may hold rows or shared state are now refused before any run.
"""
import pytest
import torch
import torch.nn as nn
import transformers as T
from peft import LoraConfig, get_peft_model

import loralib

import lora_ext as lora
import lora_ext
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


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 5)

    def forward(self, x, shift):
        return self.lin(x) + shift


class _TwoArgNet(nn.Module):
    """A head saved whole that takes a second argument."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(6, 8)
        self.head = _Head()

    def forward(self, x, shift):
        return self.head(torch.relu(self.proj(x)), shift)


def _saved_adapters(tmp_path, build, **config):
    paths = {}
    for seed, name in enumerate("ab"):
        model = get_peft_model(build(), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **config))
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n or "modules_to_save" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        paths[name] = str(tmp_path / name)
        model.save_pretrained(paths[name])
    model = build().eval()
    lora_ext.load_peft_adapter(model, paths["a"], adapter_name="a")
    lora_ext.load_peft_adapter(model, paths["b"], adapter_name="b", activate=False)
    return model


def test_a_saved_module_splits_rows_with_a_shared_argument_and_refuses_one_of_rows(tmp_path):
    model = _saved_adapters(tmp_path, _TwoArgNet, target_modules=["proj"], modules_to_save=["head"])
    rows = ["a", "b", None]
    x, shift = torch.randn(3, 6), torch.randn(1, 5)
    with torch.no_grad(), lora_ext.batch_adapters(model, rows):
        out = model(x, shift)
    with torch.no_grad():
        for i, name in enumerate(rows):  # each row as its adapter (or the base model, built afresh) serves it alone
            if name is not None:
                lora_ext.set_adapter(model, name)
            single = (model if name else _TwoArgNet())(x[i:i + 1], shift)
            torch.testing.assert_close(out[i:i + 1], single, rtol=1e-6, atol=1e-6)
    lora_ext.set_adapter(model, "a")
    with torch.no_grad(), lora_ext.batch_adapters(model, rows):
        with pytest.raises(ValueError, match=r"module 'head' is saved whole.* is called with argument 1 = a tensor "
                                             r"of shape \(3, 5\)"):
            model(x, torch.randn(3, 5))


def _llama():
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=60)
    return T.LlamaForCausalLM(config)


def test_a_decoder_layer_saved_whole_in_a_mixed_batch(tmp_path):
    """Without a cache or a mask of rows, the layer's runs share only one-row tensors (the rotary table): each row
    is its adapter's. With a cache (every generate()) or a padding mask: refused (peft refuses every such module;
    lora_ext served the rows wrong, or raised a broadcast error from inside attention)."""
    model = _saved_adapters(tmp_path, _llama, target_modules=["q_proj"], layers_to_transform=[0],
                            modules_to_save=["layers.1"])
    rows = ["a", "b", None]
    ids = torch.randint(1, 60, (3, 7))
    with torch.no_grad():
        with lora_ext.batch_adapters(model, rows):
            out = model(input_ids=ids, use_cache=False).logits
        for i, name in enumerate(rows):
            if name is not None:
                lora_ext.set_adapter(model, name)
            single = (model if name else _llama().eval())(input_ids=ids[i:i + 1], use_cache=False).logits
            torch.testing.assert_close(out[i:i + 1], single, rtol=1e-5, atol=1e-5)
        lora_ext.set_adapter(model, "a")
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        for kwargs in (dict(use_cache=True), dict(use_cache=False, attention_mask=mask)):
            with lora_ext.batch_adapters(model, rows):
                with pytest.raises(ValueError, match=r"module 'model.layers.1' is saved whole.* is called with"):
                    model(input_ids=ids, **kwargs)
