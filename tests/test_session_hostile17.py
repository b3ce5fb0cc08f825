"""Seventeenth session: each test failed on the code before its fix (ea5cefa)."""
import pytest
import torch
import torch.nn as nn

import lora_ext as lora
from helpers import rel_err, same_bits, save_random_peft


def _opt():
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                    dropout=0.0)).eval()


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "unmerged"])
def test_a_mixed_batch_serves_opt_under_beam_search(tmp_path, merged):
    """OPT's MLP takes (rows * tokens, d); under generate()'s beams the rows are the n * k repeats. Refused before
    (with a hint naming num_beams=k * tokens); served now: each row's beams equal the row generated alone."""
    from peft import LoraConfig, get_peft_model
    a = save_random_peft(get_peft_model(_opt(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "fc1", "fc2"])),
                         tmp_path / "a", seed=1, std=0.2)
    b = save_random_peft(get_peft_model(_opt(), LoraConfig(r=2, lora_alpha=8, target_modules=["v_proj", "fc1"])),
                         tmp_path / "b", seed=2, std=0.2)
    model = _opt()
    lora.load_peft_adapter(model, a, "a")
    lora.load_peft_adapter(model, b, "b", activate=False)
    if not merged:
        lora.unmerge_adapter(model)
    rows = ["b", None, "a"]
    ids = torch.randint(3, 100, (3, 5), generator=torch.Generator().manual_seed(4))
    gen = dict(max_new_tokens=4, min_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False,
               pad_token_id=1, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        alone = {}
        for name in ("a", "b"):
            lora.set_adapter(model, name)
            alone[name] = model.generate(ids, **gen)
        with lora.disable_adapter(model):
            alone[None] = model.generate(ids, **gen)
        lora.set_adapter(model, "a")
        if not merged:
            lora.unmerge_adapter(model)
        with lora.batch_adapters(model, rows, expand=3):
            mixed = model.generate(ids, **gen)
    for i, name in enumerate(rows):
        got = slice(2 * i, 2 * i + 2)
        assert torch.equal(mixed.sequences[got], alone[name].sequences[got]), (i, name)
        assert rel_err(mixed.sequences_scores[got], alone[name].sequences_scores[got]) < 1e-5, (i, name)
    # the adapters matter: a batch serving one of them to every row would fail above
    assert not torch.allclose(alone["a"].sequences_scores, alone["b"].sequences_scores, rtol=1e-3)


def test_a_layer_given_the_rows_tokens_flattened_outside_a_known_module_is_told_so():
    """A module flattening rows x tokens that is not known to keep rows first is refused; the message said
    "generate() with num_beams=<tokens>", which is not what happened."""

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.fc = lora.Linear(8, 8, r=2)

        def forward(self, ids):
            return self.fc(self.embed(ids).reshape(-1, 8))

    model = Flat().eval()
    model.fc.add_adapter("b", torch.randn(2, 8), torch.randn(8, 2), 1.0)
    with torch.no_grad(), lora.batch_adapters(model, ["default", "b"]):
        with pytest.raises(ValueError, match=r"got an input of shape \(6, 8\).*holds the model input's 2 rows x 3 "
                                             r"tokens in one dimension") as e:
            model(torch.randint(0, 20, (2, 3)))
    assert "num_beams" not in str(e.value)


# a rank-changing reload that is taken back: the active adapter's live Parameters come back as the same objects, and
# no warning says Parameters were dropped (they were given back); a reload that stands still warns once

def _trainable_llama(tmp_path):
    from test_session_hostile16 import _peft_files
    from tiny_models import llama
    paths = _peft_files(tmp_path, a=(["q_proj"], 4, {}), b=(["q_proj", "o_proj"], 4, {}),
                        a8=(["q_proj"], 8, {}), b8=(["q_proj", "o_proj"], 8, {}))
    model = llama().train()
    lora.load_peft_adapter(model, paths["a"], "a", is_trainable=True)
    lora.load_peft_adapter(model, paths["b"], "b", activate=False, is_trainable=True)
    return model, paths


def _refusing_activation(monkeypatch):
    from lora_ext.serving import adapters as serving_adapters
    from test_session_hostile16 import _failing_at
    _failing_at(monkeypatch, serving_adapters, "_set_adapter", 1, (RuntimeError, "activation refused (injected)"))


def test_the_active_adapter_keeps_its_live_parameters_when_a_rank_changing_reload_is_taken_back(tmp_path,
                                                                                                  monkeypatch):
    import warnings
    model, paths = _trainable_llama(tmp_path)
    layer = model.model.layers[0].self_attn.q_proj
    A, B = layer.lora_A, layer.lora_B
    values = A.detach().clone(), B.detach().clone()
    opt = torch.optim.SGD([A, B], lr=0.1)
    _refusing_activation(monkeypatch)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError, match="activation refused"):
        warnings.simplefilter("always")
        lora.load_peft_adapter(model, paths["a8"], "a", activate=True, is_trainable=True)
    monkeypatch.undo()
    assert not [w for w in caught if "Parameter" in str(w.message)], [str(w.message) for w in caught]
    assert layer.lora_A is A and layer.lora_B is B and layer.r == 4  # the objects the optimizer holds
    assert same_bits(A.detach(), values[0]) and same_bits(B.detach(), values[1])
    assert dict(layer.named_parameters())["lora_A"] is A
    # the optimizer trains the layer on: a step moves the live factors the forward reads
    loss = model(torch.randint(0, 50, (2, 5))).logits.square().mean()
    loss.backward()
    opt.step()
    assert not torch.equal(layer.lora_A.detach(), values[0])


def test_a_rank_changing_reload_taken_back_gives_no_warning_of_dropped_parameters(tmp_path, monkeypatch):
    import warnings
    model, paths = _trainable_llama(tmp_path)
    _refusing_activation(monkeypatch)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError, match="activation refused"):
        warnings.simplefilter("always")
        lora.load_peft_adapter(model, paths["b8"], "b", activate=True, is_trainable=True)
    monkeypatch.undo()
    assert not [w for w in caught if "Parameter" in str(w.message)], [str(w.message) for w in caught]
    # a reload that stands warns, once per layer, after it stands
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora.load_peft_adapter(model, paths["b8"], "b", activate=False, is_trainable=True)
        lora.load_peft_adapter(model, paths["a8"], "a", activate=True, is_trainable=True)
    said = [str(w.message) for w in caught if "Parameter" in str(w.message)]
    layers = model.model.layers
    assert len(layers) == 2
    # (b's own Parameters: in the layers the load injected, o_proj; q_proj holds copies of the file's inactive b)
    assert len([m for m in said if "adapter 'b' factors of another rank" in m]) == 2, said
    assert len([m for m in said if "active, trainable adapter 'a' new" in m]) == 2, said  # q_proj
    assert all(w.filename == __file__ for w in caught if "Parameter" in str(w.message)), [w.filename for w in caught]
