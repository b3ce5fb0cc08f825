"""`lora-ext merge`, a hostile pass across architectures (helper, 2026-12-01): five ways it exited 0 over a checkpoint
that was not peft's merge, each failing before its fix.

- A square GPT-2 Conv1D (attn.c_proj) merged untransposed when the model's classes could not be built (a lone file,
  a config.json without `architectures`): peft saved fan_in_fan_out=false from the last layer it made (lm_head).
  Factors that fit only the other layout are now refused, never merged on a guess.
- An adapter of another model size whose factors fit transposed (a Linear is never stored transposed).
- A directory with an index and a model.safetensors: the shards merged, model.safetensors (which transformers reads
  first) copied unmerged.
- target_modules "all-linear" skipped the target check: factors of the output head or of exclude_modules merged.
- --dtype left config.json's dtype as it was: from_pretrained loaded the output in the old dtype.
"""
import json
import os
import shutil

import pytest
import torch
import transformers as T
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from lora_ext.cli import main
from helpers import rel_err
from tiny_models import randomize_lora

T.logging.set_verbosity_error()


def _merge(base, adapter, out, *extra):
    return main(["merge", "--base", base, "--adapter", adapter, "--out", out, "--quiet", *extra])


def _refused(capsys, base, adapter, out, *words):
    assert _merge(base, adapter, out) == 2
    err = capsys.readouterr().err
    assert not os.path.exists(out), "a refused merge wrote its output"
    for w in words:
        assert w in err, (w, err)


@pytest.fixture
def gpt2_c_proj(tmp_path):
    """GPT-2 (untied) with an adapter of c_proj (Conv1D, square in attention) and lm_head (Linear): peft's config
    says fan_in_fan_out=false."""
    torch.manual_seed(0)
    T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                   tie_word_embeddings=False)).save_pretrained(tmp_path / "base")
    peft_model = randomize_lora(get_peft_model(T.GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                                               LoraConfig(r=4, lora_alpha=8, target_modules=["c_proj", "lm_head"])))
    peft_model.save_pretrained(tmp_path / "adapter")
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["fan_in_fan_out"] is False
    return tmp_path, peft_model.merge_and_unload().state_dict()


def test_conv1d_layout_from_the_model_or_refused(gpt2_c_proj, capsys):
    d, ref = gpt2_c_proj
    assert _merge(str(d / "base"), str(d / "adapter"), str(d / "out")) == 0  # config.json: the classes tell
    merged = load_file(d / "out" / "model.safetensors")
    assert all((merged[k] - ref[k]).abs().max() <= 1e-6 * ref[k].abs().max() for k in merged)
    os.makedirs(d / "lone")
    shutil.copy(d / "base" / "model.safetensors", d / "lone" / "model.safetensors")
    _refused(capsys, str(d / "lone" / "model.safetensors"), str(d / "adapter"), str(d / "lone_out.safetensors"),
             "c_proj", "fan_in_fan_out", "architectures")
    shutil.copytree(d / "base", d / "noarch")
    with open(d / "noarch" / "config.json") as f:
        config = json.load(f)
    config.pop("architectures")
    with open(d / "noarch" / "config.json", "w") as f:
        json.dump(config, f)
    _refused(capsys, str(d / "noarch"), str(d / "adapter"), str(d / "noarch_out"), "c_proj", "architectures")


def _llama(hidden, inter):
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, hidden_size=hidden, intermediate_size=inter,
                                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=False))


def test_an_adapter_of_another_model_size_that_fits_transposed_is_refused(tmp_path, capsys):
    _llama(32, 64).save_pretrained(tmp_path / "base")
    randomize_lora(get_peft_model(_llama(64, 32), LoraConfig(r=4, target_modules=["down_proj"]))).save_pretrained(
        tmp_path / "adapter")
    _refused(capsys, str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"),
             "down_proj", "only transposed", "as a Linear")


@pytest.mark.parametrize("extra", ["model.safetensors", "consolidated.safetensors", "pytorch_model.bin"])
def test_a_base_directory_with_other_weights_is_refused(tmp_path, capsys, extra):
    model = _llama(32, 64)
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "base" / "model.safetensors.index.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "base" / extra)
    randomize_lora(get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))).save_pretrained(
        tmp_path / "adapter")
    _refused(capsys, str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"), extra,
             "copied unmerged")
    os.remove(tmp_path / "base" / extra)
    open(tmp_path / "base" / "training_args.bin", "wb").close()  # a side file, not weights: copied as it is
    assert _merge(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")) == 0
    assert os.path.isfile(tmp_path / "out" / "training_args.bin")


@pytest.fixture
def all_linear(tmp_path):
    model = _llama(32, 64)
    model.save_pretrained(tmp_path / "base")
    full = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    randomize_lora(get_peft_model(model, LoraConfig(r=4, target_modules=full))).save_pretrained(tmp_path / "full")
    return tmp_path


def _all_linear_adapter(d, name, drop=(), **config):
    shutil.copytree(d / "full", d / name)
    file = d / name / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(file).items() if not any(p in k for p in drop)}, file)
    with open(d / name / "adapter_config.json") as f:
        cfg = json.load(f)
    cfg.update(target_modules="all-linear", **config)
    with open(d / name / "adapter_config.json", "w") as f:
        json.dump(cfg, f)
    return str(d / name)


def test_all_linear_factors_peft_ignores_are_refused(all_linear, capsys):
    d = all_linear
    head = _all_linear_adapter(d, "head")  # lm_head factors: peft's all-linear leaves the output head alone
    _refused(capsys, str(d / "base"), head, str(d / "out1"), "'lm_head'", "do not select")
    excluded = _all_linear_adapter(d, "excluded", drop=("lm_head",), exclude_modules=["o_proj"])
    _refused(capsys, str(d / "base"), excluded, str(d / "out2"), "self_attn.o_proj", "do not select")
    good = _all_linear_adapter(d, "good", drop=("lm_head",))
    assert _merge(str(d / "base"), good, str(d / "out3")) == 0
    x = torch.arange(12)[None]
    with torch.no_grad():
        want = PeftModel.from_pretrained(T.LlamaForCausalLM.from_pretrained(d / "base"), good).merge_and_unload()(x)
        got = T.LlamaForCausalLM.from_pretrained(d / "out3")(x)
    assert rel_err(got.logits, want.logits) < 1e-5


def test_all_linear_without_the_models_classes_still_honours_exclude_modules(all_linear, capsys):
    d = all_linear
    os.makedirs(d / "lone")
    shutil.copy(d / "base" / "model.safetensors", d / "lone" / "model.safetensors")
    excluded = _all_linear_adapter(d, "excluded", drop=("lm_head",), exclude_modules=["o_proj"])
    _refused(capsys, str(d / "lone" / "model.safetensors"), excluded, str(d / "out.safetensors"), "o_proj")


@pytest.mark.parametrize("to", ["float32", "float16"])
def test_dtype_conversion_rewrites_the_configs_dtype(tmp_path, capsys, to):
    model = _llama(32, 64).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    randomize_lora(get_peft_model(_llama(32, 64), LoraConfig(r=4, target_modules=["q_proj"]))).save_pretrained(
        tmp_path / "adapter")
    with open(tmp_path / "base" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    assert _merge(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"), "--dtype", to) == 0
    assert f"config.json's dtype set to {to}" in capsys.readouterr().err
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["dtype"] == to
    assert T.LlamaForCausalLM.from_pretrained(tmp_path / "out").dtype == getattr(torch, to)
    assert _merge(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "same")) == 0  # no --dtype
    with open(tmp_path / "same" / "config.json", "rb") as f, open(tmp_path / "base" / "config.json", "rb") as g:
        assert f.read() == g.read()


def test_tied_pair_is_the_models_own_not_any_weight_of_vocab_rows(tmp_path, capsys):
    """Falcon ties its embeddings, and vocab_size = 4 x hidden gives its MLP's dense_h_to_4h vocab_size rows: it was
    refused as "the output head". The meta-built model names the pair; its input embeddings stay refused."""
    torch.manual_seed(0)
    base = T.FalconForCausalLM(T.FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=4))
    base.save_pretrained(tmp_path / "base")
    peft_model = randomize_lora(get_peft_model(T.FalconForCausalLM.from_pretrained(tmp_path / "base"),
                                               LoraConfig(r=4, target_modules=["dense_h_to_4h"])))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert _merge(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")) == 0
    x = torch.arange(10)[None]
    with torch.no_grad():
        want = peft_model.merge_and_unload()(x).logits
        got = T.FalconForCausalLM.from_pretrained(tmp_path / "out")(x).logits
    assert rel_err(got, want) < 1e-5
    randomize_lora(get_peft_model(T.FalconForCausalLM.from_pretrained(tmp_path / "base"),
                                  LoraConfig(r=4, target_modules=["word_embeddings"]))).save_pretrained(tmp_path / "emb")
    _refused(capsys, str(tmp_path / "base"), str(tmp_path / "emb"), str(tmp_path / "out2"), "word_embeddings",
             "tie_word_embeddings")


@pytest.fixture
def gptj(tmp_path):
    """GPT-J (untied, a biased lm_head) with an adapter of q_proj, wte and lm_head: peft saves the head's base bias
    (`lm_head.base_layer.bias`) beside its factors."""
    torch.manual_seed(0)
    T.GPTJForCausalLM(T.GPTJConfig(vocab_size=100, n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=64,
                                   tie_word_embeddings=False)).save_pretrained(tmp_path / "base")
    peft_model = randomize_lora(get_peft_model(T.GPTJForCausalLM.from_pretrained(tmp_path / "base"),
                                               LoraConfig(r=4, target_modules=["q_proj", "wte", "lm_head"])))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert "base_model.model.lm_head.base_layer.bias" in load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    x = torch.arange(10)[None]
    with torch.no_grad():
        want = peft_model.merge_and_unload()(x).logits
    return tmp_path, x, want


def test_a_saved_head_bias_is_checked_not_refused(gptj, capsys):
    d, x, want = gptj
    assert _merge(str(d / "base"), str(d / "adapter"), str(d / "out")) == 0
    with torch.no_grad():
        assert rel_err(T.GPTJForCausalLM.from_pretrained(d / "out")(x).logits, want) < 1e-5
    import lora_ext
    model = T.GPTJForCausalLM.from_pretrained(d / "base").eval()
    lora_ext.load_peft_adapter(model, str(d / "adapter"))
    with torch.no_grad():
        assert rel_err(model(x).logits, want) < 1e-5
    file = d / "adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.lm_head.base_layer.bias"] += 1  # not this base's head
    save_file(tensors, file)
    _refused(capsys, str(d / "base"), str(d / "adapter"), str(d / "out2"), "lm_head.base_layer.bias", "differs")
    with pytest.raises(ValueError, match="carries a base bias"):
        lora_ext.load_peft_adapter(T.GPTJForCausalLM.from_pretrained(d / "base"), str(d / "adapter"))


def test_a_config_refusal_is_not_called_an_unreadable_weights_file(all_linear, capsys):
    """peft 0.21 writes target_parameters for MoE experts: refused naming the option (it read "cannot read its weights
    file")."""
    d = all_linear
    adapter = _all_linear_adapter(d, "experts", drop=("lm_head",), target_parameters=["mlp.experts.gate_up_proj"])
    _refused(capsys, str(d / "base"), adapter, str(d / "out"), "target_parameters")
    assert "cannot read its weights file" not in capsys.readouterr().err


def _gpt2_lone(tmp_path, targets):
    """A GPT-2 (untied) checkpoint, a peft adapter of `targets` (a regex), and a copy of the checkpoint's file alone
    (no config.json beside it: no model classes to tell a Conv1D's layout)."""
    torch.manual_seed(0)
    T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                   tie_word_embeddings=False)).save_pretrained(tmp_path / "base")
    randomize_lora(get_peft_model(T.GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                                  LoraConfig(r=4, target_modules=targets))).save_pretrained(tmp_path / "adapter")
    os.makedirs(tmp_path / "lone")
    shutil.copy(tmp_path / "base" / "model.safetensors", tmp_path / "lone" / "model.safetensors")
    return str(tmp_path / "lone" / "model.safetensors"), str(tmp_path / "adapter")


def test_a_square_conv1d_alone_with_the_head_is_refused_without_the_models_classes(tmp_path, capsys):
    """Only GPT-2's square attention c_proj and lm_head: no non-square Conv1D gives the layout away, and peft's
    fan_in_fan_out=false is the head's. Merged untransposed before (2.27 off peft); refused now."""
    lone, adapter = _gpt2_lone(tmp_path, r".*attn\.c_proj|lm_head")
    _refused(capsys, lone, adapter, str(tmp_path / "out.safetensors"), "attn.c_proj", "square", "Conv1D")
    assert _merge(str(tmp_path / "base"), adapter, str(tmp_path / "out")) == 0  # with the classes: merged


def test_a_non_square_conv1d_fitting_only_transposed_is_refused_without_the_models_classes(tmp_path, capsys):
    lone, adapter = _gpt2_lone(tmp_path, r".*mlp\.c_fc|lm_head")
    _refused(capsys, lone, adapter, str(tmp_path / "out.safetensors"), "mlp.c_fc", "only transposed",
             "fan_in_fan_out is false")


# ------------------------------------------------------------------ a third hostile pass (helper), each fixed


def test_a_tie_made_by_a_sub_config_is_refused(tmp_path, capsys):
    """A VisionEncoderDecoderModel whose GPT-2 decoder ties its head (the decoder's config; the top-level one says
    false): the merge exited 0 and the head, loaded tied to the merged wte, served 139x off the adapter."""
    torch.manual_seed(0)
    enc = T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=16,
                      patch_size=8)
    dec = T.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=64, add_cross_attention=True,
                       is_decoder=True, tie_word_embeddings=True)
    model = T.VisionEncoderDecoderModel(T.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec))
    model.save_pretrained(tmp_path / "base")
    randomize_lora(get_peft_model(model, LoraConfig(r=4, target_modules=["wte", "c_attn"]))).save_pretrained(
        tmp_path / "adapter")
    _refused(capsys, str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"),
             "decoder.transformer.wte", "ties to decoder.lm_head")


def test_subfolders_are_copied_and_their_weights_refused(tmp_path, capsys):
    model = _llama(32, 64)
    model.save_pretrained(tmp_path / "base")
    randomize_lora(get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))).save_pretrained(
        tmp_path / "adapter")
    os.makedirs(tmp_path / "base" / "tokenizer")
    (tmp_path / "base" / "tokenizer" / "tokenizer.json").write_text("{}")
    os.makedirs(tmp_path / "base" / ".git" / "lfs")  # hidden folders are not the model's
    (tmp_path / "base" / ".git" / "lfs" / "blob").write_text("x")
    os.makedirs(tmp_path / "base" / "original")
    shutil.copy(tmp_path / "base" / "model.safetensors", tmp_path / "base" / "original" / "model.safetensors")
    _refused(capsys, str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"),
             os.path.join("original", "model.safetensors"), "copied unmerged")
    shutil.rmtree(tmp_path / "base" / "original")
    assert _merge(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")) == 0
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").read_text() == "{}"
    assert not (tmp_path / "out" / ".git").exists()


class _LinearThenConv1D(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.proj = torch.nn.Linear(8, 8)
        self.c_fc = Conv1D(8, 8)

    def forward(self, x):
        return self.c_fc(torch.tanh(self.proj(x)))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_a_square_linear_under_fan_in_fan_out_true_is_refused_without_the_models_classes(tmp_path, capsys, dora):
    """A square nn.Linear made before a Conv1D: peft saves fan_in_fan_out=true (the Conv1D's). With no model classes
    the merge took the flag for the Linear too and merged it transposed (exit 0, 1.09 off peft; DoRA 1.30)."""
    torch.manual_seed(0)
    model = _LinearThenConv1D()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "base.safetensors")
    peft_model = randomize_lora(get_peft_model(model, LoraConfig(r=2, target_modules=["proj", "c_fc"], use_dora=dora)))
    peft_model.save_pretrained(tmp_path / "adapter")
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["fan_in_fan_out"] is True
    _refused(capsys, str(tmp_path / "base.safetensors"), str(tmp_path / "adapter"), str(tmp_path / "out.safetensors"),
             "'proj' is square and not named as transformers' Conv1D", "fan_in_fan_out is true")
