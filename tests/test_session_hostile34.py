"""Hostile finds of the forty-first session, each failing on the commit before its fix."""
import ast
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lora_ext as lora
from tiny_models import VOCAB, randomize_lora, snapshot, unchanged


def _tied_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


# (h4: embed_tokens injected first records the plain lm_head as its tie by name; lm_head injected after is a lora_ext
# layer holding the same weight, which the registry described again: "tied to ['lm_head', 'Linear(64, 100) at 0x..']")
@pytest.mark.parametrize("how", ["unload", "merge_adapter"])
def test_a_tied_weight_s_refusal_names_each_module_once(how):
    model = _tied_llama()
    lora.inject(model, ["embed_tokens", "lm_head"], r=2)
    randomize_lora(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = snapshot(model)
    with pytest.raises(ValueError, match="tied") as e:
        lora.unload(model, merge=True) if how == "unload" else lora.merge_adapter(model)
    message = str(e.value)
    listed = re.search(r"tied to (\[.*?\])", message).group(1)
    assert ast.literal_eval(listed) in (["lm_head"], ["model.embed_tokens"]), message
    assert "0x" not in message, message
    assert unchanged(model, before)
