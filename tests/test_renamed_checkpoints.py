"""`lora-ext merge` into checkpoints whose keys transformers renames when it loads them (and transformers 5 saves
them under those names again): the Gemma 3 and Llava vision-language models (`language_model.model.*` on disk,
`model.language_model.*` in the model peft names), NomicBert (`encoder.layers.*.attn.out_proj` on disk,
`layers.*.self_attn.o_proj` in the model). Against the real peft's merge_and_unload: the output is read back by
transformers' from_pretrained and compared tensor by tensor; the output keeps the checkpoint's own key names.
A weight transformers makes by a conversion (NomicBert's q/k/v projections split from the stored `Wqkv`) is
refused with nothing written. Adapters made with transformers 4, which named the modules as the checkpoint does,
are renamed alike by the merge and by load_peft_adapter, as peft renames them when it loads them
(lora_ext/serving/checkpoint_names.py)."""
import json
import os

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, NomicBertConfig, NomicBertModel, SiglipVisionConfig)

from lora_ext.cli import main
from lora_ext.serving import checkpoint_names, merge_cli
from tiny_models import randomize_lora

transformers.logging.set_verbosity_error()


def gemma3_vlm():
    torch.manual_seed(0)
    text = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, vocab_size=300, sliding_window=4)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                       image_token_index=299, boi_token_index=297, eoi_token_index=298)
    return Gemma3ForConditionalGeneration(cfg).eval()


def llava():
    torch.manual_seed(0)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=28, patch_size=14)
    cfg = LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=299,
                      vision_feature_layer=-1)
    return LlavaForConditionalGeneration(cfg).eval()


def nomic_bert():
    torch.manual_seed(0)
    return NomicBertModel(NomicBertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=64)).eval()


CASES = {
    # name: (build, LoraConfig kwargs)
    "gemma3-vlm": (gemma3_vlm, dict(target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)")),
    # the vision tower's attention too, and the projector saved whole
    "gemma3-vlm-vision-saved": (gemma3_vlm, dict(target_modules=["q_proj", "out_proj", "fc1"],
                                                 modules_to_save=["multi_modal_projector"])),
    "gemma3-vlm-dora": (gemma3_vlm, dict(target_modules=["q_proj", "v_proj"], use_dora=True)),
    "llava": (llava, dict(target_modules=["q_proj", "v_proj", "linear_1", "linear_2", "lm_head"])),
    "nomic-bert": (nomic_bert, dict(target_modules=["o_proj", "up_proj", "down_proj"])),
}


def _checkpoint_keys(path):
    keys = set()
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as st:
                keys |= set(st.keys())
    return keys


def _setup(tmp_path, build, shard=None, **config):
    base = str(tmp_path / "base")
    build().save_pretrained(base, **({"max_shard_size": shard} if shard else {}))
    peft_model = get_peft_model(build(), LoraConfig(r=4, lora_alpha=8, **config))
    randomize_lora(peft_model, names=("lora_A", "lora_B", "lora_magnitude_vector"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.3)
    adapter = str(tmp_path / "adapter")
    peft_model.save_pretrained(adapter)
    return base, adapter


def _peft_merged(build, base, adapter):
    return PeftModel.from_pretrained(type(build()).from_pretrained(base), adapter).merge_and_unload().state_dict()


@pytest.mark.parametrize("case", list(CASES))
def test_merge_into_renamed_checkpoints_matches_peft(tmp_path, case):
    build, config = CASES[case]
    base, adapter = _setup(tmp_path, build, shard="100KB" if case == "llava" else None, **config)
    stored = _checkpoint_keys(base)
    names = {n for n, _ in build().named_parameters()}
    assert stored - names, "the checkpoint must hold keys the model renames (else this test tests nothing)"
    out = str(tmp_path / "merged")
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out, "--quiet"]) == 0
    assert _checkpoint_keys(out) == stored  # written under the checkpoint's own names
    cls = type(build())
    ours = cls.from_pretrained(out).state_dict()
    before = cls.from_pretrained(base).state_dict()
    ref = _peft_merged(build, base, adapter)
    assert set(ours) == set(ref)
    changed = {k for k in ours if not torch.equal(ours[k], before[k])}
    assert changed == {k for k in ref if not torch.equal(ref[k], before[k])}, "merged other tensors than peft"
    assert changed
    for k, t in ours.items():  # float32: peft's merge to rounding, the rest bit for bit
        if k in changed:
            assert (t - ref[k]).abs().max() <= 1e-6 * ref[k].abs().max() + 1e-12, k
        else:
            assert torch.equal(t, before[k]), k


def test_a_weight_transformers_converts_is_refused_with_nothing_written(tmp_path):
    # NomicBert stores q, k and v as one Wqkv, which transformers splits when it loads it
    base, adapter = _setup(tmp_path, nomic_bert, target_modules=["q_proj", "o_proj"])
    out = str(tmp_path / "merged")
    with pytest.raises(merge_cli.MergeError, match=r"module 'layers\.\d\.self_attn\.q_proj''s weight is not stored "
                                                   r"as it is.*'encoder\.layers\.\d\.attn\.Wqkv\.weight'.*conversion"):
        merge_cli.merge_checkpoint(base, adapter, out, progress=False)
    assert not os.path.exists(out) and not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_a_tied_embedding_under_a_renamed_key_is_still_refused(tmp_path):
    # Gemma 3's head is tied to language_model.model.embed_tokens on disk (model.language_model.embed_tokens)
    base, adapter = _setup(tmp_path, gemma3_vlm, target_modules=["embed_tokens"])
    with pytest.raises(merge_cli.MergeError, match=r"'model\.language_model\.embed_tokens' adapts the input "
                                                   r"embeddings.*tied"):
        merge_cli.merge_checkpoint(base, adapter, str(tmp_path / "merged"), progress=False)


def test_without_the_models_classes_renamed_keys_are_refused_by_name(tmp_path):
    # config.json without `architectures`: no rules to rename by, so the module's weight is not found (loud)
    base, adapter = _setup(tmp_path, gemma3_vlm, target_modules=["q_proj"])
    with open(os.path.join(base, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("architectures")
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(merge_cli.MergeError, match=r"has no weight 'model\.language_model\.layers\.0\.self_attn"):
        merge_cli.merge_checkpoint(base, adapter, str(tmp_path / "merged"), progress=False)


def test_model_names_maps_only_what_transformers_renames():
    keys = ["language_model.model.layers.0.self_attn.q_proj.weight", "vision_tower.encoder.layers.0.mlp.fc1.bias",
            "language_model.model.norm.weight", "not.a.weight.of.the.model"]
    with torch.device("meta"):
        meta = gemma3_vlm()
    names, converted, twice = checkpoint_names.model_names(meta, keys)
    assert names == {"language_model.model.layers.0.self_attn.q_proj.weight":
                     "model.language_model.layers.0.self_attn.q_proj.weight",
                     "vision_tower.encoder.layers.0.mlp.fc1.bias":
                     "model.vision_tower.encoder.layers.0.mlp.fc1.bias",
                     "language_model.model.norm.weight": "model.language_model.norm.weight"}
    assert converted == {} and twice == {}
    assert checkpoint_names.model_names(None, keys) == ({}, {}, {})
    # a key under the model's name and another renamed to it: neither is the weight for sure
    both = ["language_model.model.norm.weight", "model.language_model.norm.weight"]
    assert checkpoint_names.model_names(meta, both) == ({}, {}, {"model.language_model.norm.weight": both})


def _as_transformers4(adapter, old, new, keep=False):
    """The adapter as transformers 4 named its modules (the checkpoint's names): keys under `new` renamed to `old`
    (keep: both kept, the module then held twice)."""
    path = os.path.join(adapter, "adapter_model.safetensors")
    sd = load_file(path)
    renamed = {k.replace(new, old): v.clone() for k, v in sd.items()}
    save_file({**(sd if keep else {}), **renamed}, path)
    assert set(renamed) != set(sd)


def test_an_adapter_named_as_transformers_4_named_the_modules_merges_as_peft_loads_it(tmp_path):
    # Gemma 3 adapters made before transformers renamed its modules say language_model.model.*; peft renames them
    # when it loads them (its transformers-conversion step); the merge must too
    base, adapter = _setup(tmp_path, gemma3_vlm, target_modules=["q_proj", "v_proj"], use_dora=True)
    out5 = str(tmp_path / "merged5")
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out5, "--quiet"]) == 0
    _as_transformers4(adapter, "base_model.model.language_model.model.", "base_model.model.model.language_model.")
    out4 = str(tmp_path / "merged4")
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out4, "--quiet"]) == 0
    merged4, merged5 = load_file(os.path.join(out4, "model.safetensors")), load_file(os.path.join(out5, "model.safetensors"))
    assert set(merged4) == set(merged5) and all(torch.equal(merged4[k], merged5[k]) for k in merged5)
    ours = Gemma3ForConditionalGeneration.from_pretrained(out4).state_dict()
    ref = _peft_merged(gemma3_vlm, base, adapter)  # peft loading the transformers-4 names
    before = Gemma3ForConditionalGeneration.from_pretrained(base).state_dict()
    assert any(not torch.equal(ref[k], before[k]) for k in ref)
    for k, t in ours.items():
        assert (t - ref[k]).abs().max() <= 1e-6 * ref[k].abs().max() + 1e-12, k


def test_an_adapter_holding_a_module_under_both_names_is_refused(tmp_path):
    base, adapter = _setup(tmp_path, gemma3_vlm, target_modules=["q_proj"])
    _as_transformers4(adapter, "base_model.model.language_model.model.", "base_model.model.model.language_model.",
                      keep=True)
    out = str(tmp_path / "merged")
    with pytest.raises(merge_cli.MergeError, match=r"modules 'model\.language_model\.layers\.0\.self_attn\.q_proj' and "
                                                   r"'language_model\.model\.layers\.0\.self_attn\.q_proj' are the same"):
        merge_cli.merge_checkpoint(base, adapter, out, progress=False)
    assert not os.path.exists(out)


def test_load_peft_adapter_renames_transformers_4_names_as_peft_does(tmp_path):
    import lora_ext
    from tiny_models import snapshot, unchanged
    base, adapter = _setup(tmp_path, gemma3_vlm, target_modules=["q_proj", "v_proj", "fc1"])
    _as_transformers4(adapter, "base_model.model.language_model.model.", "base_model.model.model.language_model.")
    ids = torch.randint(0, 290, (2, 7))
    peft_model = PeftModel.from_pretrained(Gemma3ForConditionalGeneration.from_pretrained(base), adapter).eval()
    model = Gemma3ForConditionalGeneration.from_pretrained(base).eval()
    with torch.no_grad():
        ref, plain = peft_model(input_ids=ids).logits, model(input_ids=ids).logits
    loaded = lora_ext.load_peft_adapter(model, adapter, "x")
    assert "model.language_model.layers.0.self_attn.q_proj" in loaded
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    assert (ours - ref).norm() <= 1e-6 * ref.norm()
    assert (plain - ref).norm() > 1e-3 * ref.norm()  # the language model's adapter matters
    # the module under both names: refused, the model unchanged
    other = Gemma3ForConditionalGeneration.from_pretrained(base).eval()
    snap = snapshot(other)
    _as_transformers4(adapter, "base_model.model.model.language_model.", "base_model.model.language_model.model.",
                      keep=True)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: modules .* are the same module of the model"):
        lora_ext.load_peft_adapter(other, adapter, "y")
    assert unchanged(other, snap) and not any(isinstance(m, lora_ext.LoRALayer) for m in other.modules())


def test_a_weight_stored_under_both_names_is_refused(tmp_path):
    # transformers loads both keys into the one weight; merging into either could leave the one it keeps unmerged
    # (it was: exit 0, layer 0's q_proj served unmerged, 4.4 off peft's merge)
    base, adapter = _setup(tmp_path, llava, target_modules=["q_proj"])
    path = os.path.join(base, "model.safetensors")
    sd = load_file(path)
    old, new = "language_model.model.layers.0.self_attn.q_proj.weight", "model.language_model.layers.0.self_attn.q_proj.weight"
    sd[new] = sd[old] * 2
    save_file(sd, path, metadata={"format": "pt"})
    out = str(tmp_path / "merged")
    with pytest.raises(merge_cli.MergeError, match=rf"'{new[:-7]}'.s weight is stored more than once .*'{old}', '{new}'"):
        merge_cli.merge_checkpoint(base, adapter, out, progress=False)
    assert not os.path.exists(out)


def exaone():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.ExaoneConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, tie_word_embeddings=False))


@pytest.mark.skipif(not hasattr(transformers, "ExaoneConfig"), reason="this transformers has no EXAONE (model_type "
                                                                      "'exaone'; 5.17 has not, 5.24 has)")
def test_a_checkpoint_naming_a_remote_code_class_is_built_by_the_auto_class(tmp_path):
    # EXAONE's published config.json names ExaoneForCausalLM (remote code); transformers builds it from model_type
    # "exaone" (AutoModelForCausalLM: a Llama), renaming transformer.h.* to model.layers.*; the merge did not rename
    # (no model to read the rules from) and refused every module
    base, adapter = _setup(tmp_path, exaone, target_modules=["q_proj", "o_proj", "down_proj"])
    cfg_path = os.path.join(base, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["ExaoneForCausalLM"]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    assert any(k.startswith("transformer.h.") for k in _checkpoint_keys(base))
    out = str(tmp_path / "merged")
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out, "--quiet"]) == 0
    auto = transformers.AutoModelForCausalLM
    ours = auto.from_pretrained(out).state_dict()
    ref = PeftModel.from_pretrained(auto.from_pretrained(base), adapter).merge_and_unload().state_dict()
    before = auto.from_pretrained(base).state_dict()
    assert any(not torch.equal(ours[k], before[k]) for k in ours)
    for k, t in ours.items():
        assert (t - ref[k]).abs().max() <= 1e-6 * ref[k].abs().max() + 1e-12, k


def test_a_saved_whole_head_tied_to_the_embeddings_is_refused_naming_the_tie(tmp_path):
    # Gemma 3 ties lm_head to the embeddings: the checkpoint has no lm_head tensor (the message said only that)
    base, adapter = _setup(tmp_path, gemma3_vlm, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(merge_cli.MergeError, match=r"module 'lm_head' is saved whole .* has no tensor under 'lm_head\.'; "
                                                   r"the model ties its weight to .*embed_tokens"):
        merge_cli.merge_checkpoint(base, adapter, str(tmp_path / "merged"), progress=False)


def test_many_keys_a_converter_fuses_are_converted_not_ambiguous():
    # Mixtral's checkpoint stores each expert's w1/w3; transformers fuses them into one gate_up_proj. That is what a
    # converter does: the fused weight is "made by a conversion", not "stored more than once"
    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=2, vocab_size=100)
    with torch.device("meta"):
        meta = transformers.MixtralForCausalLM(cfg)
    keys = [f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight" for e in (0, 1) for w in ("w1", "w3")]
    keys.append("model.layers.0.block_sparse_moe.gate.weight")
    names, converted, twice = checkpoint_names.model_names(meta, keys)
    assert twice == {}
    fused = [k for k in converted if "gate_up" in k]
    assert len(fused) == 1 and sorted(converted[fused[0]]) == sorted(keys[:4])
    assert names == {"model.layers.0.block_sparse_moe.gate.weight": "model.layers.0.mlp.gate.weight"}
