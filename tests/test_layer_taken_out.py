"""A lora_ext layer holding an adapter replaced in its model by a module that does not hold it (transformers'
resize_token_embeddings puts a fresh nn.Linear in place of a LoRA head; `model.q_proj = nn.Linear(...)`) takes the
adapter out of the model: a warning names the layer, where it was and its adapters, and when it was merged, that a
weight copied from it holds the adapter for good. Wrappers that hold the layer and lora_ext's own unload say
nothing."""
import warnings

import pytest
import torch
import torch.nn as nn

import lora_ext as lora
import tiny_models


def _injected(targets=("lm_head", "q_proj")):
    model = tiny_models.llama()
    lora.inject(model, list(targets), r=2)
    for m in model.modules():
        if isinstance(m, lora.LoRALayer):
            with torch.no_grad():
                m.lora_B.normal_()
    return model


def test_resize_token_embeddings_replacing_a_lora_head_warns():
    model = _injected(("lm_head",))
    assert isinstance(model.lm_head, lora.Linear)
    with pytest.warns(UserWarning, match=r"Linear\(64, 100\), child 'lm_head' of a LlamaForCausalLM, holds adapter\(s\) "
                                         r"'default' and was replaced by a Linear, which holds none"):
        model.resize_token_embeddings(120)
    assert not isinstance(model.lm_head, lora.LoRALayer)  # transformers' doing; the warning is what lora_ext adds


def test_a_merged_layer_replaced_says_its_copied_weight_holds_the_adapter():
    model = _injected().eval()
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.merged
    with pytest.warns(UserWarning, match=r"child 'q_proj' of a LlamaAttention.*merged, so a weight copied from it "
                                         r"holds adapter 'default' for good"):
        attn.q_proj = nn.Linear(64, 64, bias=False)
    with pytest.warns(UserWarning, match=r"child 'q_proj' .* replaced by None"):
        model.model.layers[1].self_attn.q_proj = None


def test_wrappers_unload_and_other_layers_say_nothing():
    model = _injected()
    attn = model.model.layers[0].self_attn
    layer = attn.q_proj

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn.q_proj = Wrapper(layer)  # holds the layer
        attn.q_proj = layer
        attn.q_proj = lora.Linear(64, 64, r=2, bias=False)  # another lora_ext layer
        empty = lora.Linear(64, 64, r=0, bias=False)  # no adapter to lose
        model.model.layers[1].self_attn.k_proj = empty
        model.model.layers[1].self_attn.k_proj = nn.Linear(64, 32, bias=False)
        lora.unload(model)
    assert not any(isinstance(m, lora.LoRALayer) and m.has_lora for m in model.modules())
