"""A new user's read of the README (helper u37, 2026-12-06): `lora-ext merge` exited 0 over a wrong file when the
base's config.json named a model class whose layout the checkpoint contradicts. It fails before its fix."""
import json
import os

import transformers as T
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from lora_ext.cli import main
from tiny_models import randomize_lora

T.logging.set_verbosity_error()


def _merge(base, adapter, out):
    return main(["merge", "--base", base, "--adapter", adapter, "--out", out, "--quiet"])


def test_a_config_naming_a_class_the_checkpoint_contradicts_is_refused(tmp_path, capsys):
    """A GPT-2 checkpoint (Conv1D weights, stored in x out) whose config.json names GPTBigCodeForCausalLM (nn.Linear
    modules of the same names): the square attn.c_proj merged transposed, exit 0, 1.84 off peft's merge; the
    checkpoint's non-square c_attn (32, 96), which that class has as (96, 32), shows the contradiction."""
    torch.manual_seed(0)
    config = T.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100, n_positions=32)
    T.GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    model = randomize_lora(get_peft_model(T.GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                                          LoraConfig(r=4, lora_alpha=8, target_modules=["attn.c_proj"],
                                                     fan_in_fan_out=True)))
    model.save_pretrained(tmp_path / "adapter")
    reference = model.merge_and_unload().state_dict()
    # the control: its own config.json merges as peft does
    assert _merge(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "own")) == 0
    merged = load_file(tmp_path / "own" / "model.safetensors")
    key = "transformer.h.0.attn.c_proj.weight"
    assert (merged[key] - reference[key]).abs().max() <= 1e-6 * reference[key].abs().max()
    with open(tmp_path / "base" / "config.json") as f:
        data = json.load(f)
    data.update(model_type="gpt_bigcode", architectures=["GPTBigCodeForCausalLM"], multi_query=False)
    with open(tmp_path / "base" / "config.json", "w") as f:
        json.dump(data, f)
    capsys.readouterr()
    out = tmp_path / "out"
    assert _merge(str(tmp_path / "base"), str(tmp_path / "adapter"), str(out)) == 2
    err = capsys.readouterr().err
    assert not os.path.exists(out), "a refused merge wrote its output"
    for words in ("config.json", "GPTBigCodeForCausalLM", "transformer.h.0.attn.c_attn.weight", "(96, 32)", "(32, 96)"):
        assert words in err, (words, err)


def test_a_config_of_another_size_is_refused_before_writing(tmp_path, capsys):
    """A Llama checkpoint whose config.json says another intermediate size: the class's mlp weights disagree with the
    stored ones (transformers' from_pretrained refuses such a checkpoint too)."""
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2)
    model = T.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "base")
    randomize_lora(get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))).save_pretrained(
        tmp_path / "adapter")
    with open(tmp_path / "base" / "config.json") as f:
        data = json.load(f)
    data["intermediate_size"] = 48
    with open(tmp_path / "base" / "config.json", "w") as f:
        json.dump(data, f)
    out = tmp_path / "out"
    assert _merge(str(tmp_path / "base"), str(tmp_path / "adapter"), str(out)) == 2
    err = capsys.readouterr().err
    assert not os.path.exists(out)
    for words in ("LlamaForCausalLM", "mlp.", "(48, 32)", "(64, 32)", "does not describe"):
        assert words in err, (words, err)


def test_a_batch_opened_during_a_layer_switch_on_another_thread_serves_every_row_right(monkeypatch):
    """Helper m37: a mixed batch opened while another thread switched the merged layer alone (layer.set_adapter, which
    takes the layer's lock, not the model's) loaded a slot between the switch's new merged snapshot and its new active
    adapter: adapter 'a''s slot took 'b''s values, and every 'a' row of the block was served 'b' (28 off; 3% of the
    forwards of a switching thread's race). Here the batch opens at exactly that moment: after the switch's
    _set_merged, before it returns."""
    import threading

    import lora_ext as lora
    from lora_ext import layers

    torch.manual_seed(0)
    layer = lora.Linear(32, 32, r=4, lora_alpha=8).double()
    factors = {}
    for name in ("a", "b"):
        A, B = torch.randn(4, 32, dtype=torch.float64), torch.randn(32, 4, dtype=torch.float64)
        layer.add_adapter(name, A, B, 0.5)
        factors[name] = (A.clone(), B.clone())
    layer.set_adapter("a")
    layer.eval()  # merged: the weight holds 'a'
    base = layer.weight.detach().clone() - 0.5 * factors["a"][1] @ factors["a"][0]
    x = torch.randn(4, 32, dtype=torch.float64)
    names = ["a", "b", None, "a"]
    expected = torch.stack([x[i] @ base.T + layer.bias.detach()
                            + (0.5 * x[i] @ factors[n][0].T @ factors[n][1].T if n is not None else 0)
                            for i, n in enumerate(names)])
    opened, outputs, errors = threading.Event(), [], []

    def open_and_forward():
        try:
            with torch.no_grad(), lora.batch_adapters(layer, names):
                opened.set()
                outputs.append(layer(x))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            opened.set()

    original = layers.LoRALayer._set_merged
    batcher = threading.Thread(target=open_and_forward, daemon=True)

    def set_merged(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self is layer and args[0] is not None and not batcher.is_alive() and not outputs:
            batcher.start()
            opened.wait(0.5)  # (the fix: the batch waits for the switch, which holds the layer's lock)

    monkeypatch.setattr(layers.LoRALayer, "_set_merged", set_merged)
    layer.set_adapter("b")  # merged switch: 'a' out of the weight, 'b' in
    batcher.join(10)
    assert not batcher.is_alive(), "the batch hung"
    assert not errors, errors
    assert layer.active_adapter == "b" and layer.merged
    assert len(outputs) == 1
    assert (outputs[0] - expected).abs().max() <= 1e-12 * expected.abs().max(), (outputs[0] - expected).abs().amax(1)
