"""Scaled word embeddings (transformers' Gemma and BART families: the lookup times an embed_scale): lora_ext's
Embedding(embed_scale=...) against a float64 oracle, inject/unload on a real Gemma 3 against the real peft (which
scales its adapter's part alike) and against the model itself, BART's numeric scale, and the refusals of
subclasses whose forward is not the lookup times the scale, made before anything is replaced."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers.models.bart.modeling_bart import BartScaledWordEmbedding
from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding
from transformers.models.t5gemma2.modeling_t5gemma2 import T5Gemma2TextScaledWordEmbedding

import lora_ext
from helpers import assert_close_rel, embedding64, rel_err, same_bits
from tiny_models import VOCAB, gemma3

TARGETS = ["embed_tokens", "q_proj", "down_proj"]


def _random_factors(layer, std=0.05):
    with torch.no_grad():
        layer.lora_A.normal_(0, std)
        layer.lora_B.normal_(0, std)


def _ids(n=24, vocab=VOCAB):
    return torch.randint(0, vocab, (2, n // 2))


# ---------------------------------------------------------------------------------------------------
# the layer


@pytest.mark.parametrize("scale", [torch.tensor(8.0), torch.tensor(5.7), 2.5], ids=["tensor8", "tensor5.7", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_scales_base_and_adapter_merged_or_not(scale, dtype):
    layer = lora_ext.Embedding(40, 16, r=4, lora_alpha=8, padding_idx=0, embed_scale=scale)
    _random_factors(layer, std=0.3)
    with torch.no_grad():
        layer.weight.normal_()
    layer = layer.to(dtype)
    ids = _ids(30, 40)
    w, A, B = layer.weight.detach(), layer.lora_A.detach(), layer.lora_B.detach()
    # the scale as the layer's output dtype holds it (Gemma's forward casts its buffer to the weight's dtype)
    s = scale.to(dtype).double() if isinstance(scale, torch.Tensor) else scale
    ref = embedding64(ids, w, A, B, layer.scaling) * s
    layer.train()
    out = layer(ids)
    assert out.dtype == dtype
    assert_close_rel(out, ref, dtype)
    layer.eval()
    assert layer.merged
    assert_close_rel(layer(ids), ref, dtype, factor=2)
    layer.train()
    assert same_bits(layer.weight.detach(), w)  # (bfloat16: lossless by default)


def test_scale_tensor_is_a_non_persistent_buffer_that_follows_to():
    layer = lora_ext.Embedding(10, 4, r=2, embed_scale=torch.tensor(3.0))
    assert "embed_scale" not in layer.state_dict() and "embed_scale" not in lora_ext.lora_state_dict(layer)
    assert layer.embed_scale.dtype == torch.float32
    layer = layer.to(torch.bfloat16)  # as Gemma's own buffer does under model.to(bfloat16)
    assert layer.embed_scale.dtype == torch.bfloat16
    assert "embed_scale=tensor(3)" in repr(layer)
    assert "embed_scale" not in repr(lora_ext.Embedding(10, 4, r=2))
    plain = lora_ext.Embedding(10, 4, r=2)
    ids = torch.tensor([1, 2])
    assert torch.equal(plain(ids), F.embedding(ids, plain.weight) + plain.scaling * (
        plain.lora_A.t()[ids] @ plain.lora_B.t()))  # no scale: loralib's layer, unchanged (B A is zero here)


@pytest.mark.parametrize("bad", [True, float("inf"), float("nan"), "8", torch.tensor([1.0, 2.0]),
                                 torch.tensor(3)], ids=["bool", "inf", "nan", "str", "two", "int"])
def test_bad_embed_scale_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="embed_scale"):
        lora_ext.Embedding(10, 4, r=2, embed_scale=bad)


# ---------------------------------------------------------------------------------------------------
# inject / unload on a real Gemma 3, against peft and the model itself


def _copy_peft_factors(peft_model, model):
    """peft's adapter "default" into the lora_ext layers of `model` (same module names)."""
    params = dict(peft_model.named_parameters())
    for name, m in model.named_modules():
        if isinstance(m, lora_ext.LoRALayer):
            pre = "base_model.model." + name
            if isinstance(m, lora_ext.Embedding):
                A, B = params[pre + ".lora_embedding_A.default"], params[pre + ".lora_embedding_B.default"]
            else:
                A, B = params[pre + ".lora_A.default.weight"], params[pre + ".lora_B.default.weight"]
            with torch.no_grad():
                m.lora_A.copy_(A)
                m.lora_B.copy_(B)


def _peft_gemma(model):
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.05)
    return peft_model.eval()


def test_zero_adapter_is_the_model_bit_for_bit():
    model = gemma3()
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    assert lora_ext.inject(model, TARGETS, r=4) == ["model.embed_tokens"] + [
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")]
    layer = model.model.embed_tokens
    assert isinstance(layer, lora_ext.Embedding) and layer.embed_scale.item() == 8.0
    with torch.no_grad():
        assert torch.equal(model.train()(ids).logits, want)
        assert torch.equal(model.eval()(ids).logits, want)


def test_gemma3_matches_peft_and_a_float64_oracle_merged_or_not():
    model = gemma3()
    peft_model = _peft_gemma(model)
    ids = _ids()
    with torch.no_grad():
        want = peft_model(ids).logits
        base = model(ids).logits
    assert rel_err(want, base) > 1e-3  # the adapters change the output
    lora_ext.inject(model, TARGETS, r=4, lora_alpha=8)
    _copy_peft_factors(peft_model, model)
    emb = model.model.embed_tokens
    emb64 = embedding64(ids, emb.weight, emb.lora_A, emb.lora_B, emb.scaling) * 8.0
    with torch.no_grad():
        for mode in ("train", "eval"):
            getattr(model, mode)()
            assert emb.merged == (mode == "eval")
            assert_close_rel(emb(ids), emb64, torch.float32)
            assert_close_rel(model(ids).logits, want, torch.float32, factor=10)


@pytest.mark.parametrize("merge", [True, False])
def test_unload_puts_gemmas_scaled_embedding_back(merge):
    model = gemma3()
    original = model.model.embed_tokens
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
    lora_ext.inject(model, TARGETS, r=4, lora_alpha=8, lossless=True)  # (merge=False: the exact base back)
    _copy_peft_factors(_peft_gemma(model), model)  # (any random factors)
    model.eval()
    with torch.no_grad():
        merged = model(ids).logits
    assert lora_ext.unload(model, merge=merge) == ["model.embed_tokens"] + [
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")]
    emb = model.model.embed_tokens
    assert type(emb) is Gemma3TextScaledWordEmbedding
    assert emb.scalar_embed_scale == original.scalar_embed_scale == 8.0
    assert emb.embed_scale.dtype == torch.float32 and emb.embed_scale.item() == 8.0
    assert "embed_scale" in emb._non_persistent_buffers_set and "model.embed_tokens.embed_scale" not in (
        model.state_dict())
    assert emb.padding_idx == original.padding_idx == 0
    with torch.no_grad():
        out = model(ids).logits
    assert torch.allclose(out, merged if merge else base, rtol=1e-5, atol=1e-5)
    if not merge:
        assert torch.equal(out, base)


def test_bfloat16_gemma_keeps_its_exact_scale_for_unload():
    model = gemma3().to(torch.bfloat16)
    model.model.embed_tokens.scalar_embed_scale = 5.7  # (as sqrt(hidden_size) of a real Gemma: inexact in bf16)
    with torch.no_grad():
        model.model.embed_tokens.embed_scale.fill_(5.7)
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
    lora_ext.inject(model, ["embed_tokens"], r=4)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    lora_ext.unload(model, merge=True)
    emb = model.model.embed_tokens
    assert emb.scalar_embed_scale == 5.7 and emb.embed_scale.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


def test_peft_files_both_ways(tmp_path):
    model = gemma3()
    peft_model = _peft_gemma(model)
    peft_model.save_pretrained(str(tmp_path / "from_peft"))
    ids = _ids()
    with torch.no_grad():
        want = peft_model(ids).logits
    lora_ext.load_peft_adapter(model, str(tmp_path / "from_peft"))
    with torch.no_grad():
        assert_close_rel(model.eval()(ids).logits, want, torch.float32, factor=10)
    lora_ext.save_peft_adapter(model, str(tmp_path / "from_lora_ext"))
    again = PeftModel.from_pretrained(gemma3(), str(tmp_path / "from_lora_ext")).eval()
    with torch.no_grad():
        assert_close_rel(again(ids).logits, want, torch.float32, factor=10)


def test_tied_gemma_embedding_adds_its_adapter_on_the_fly():
    model = gemma3(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lora_ext.inject(model, ["embed_tokens"], r=4)
    emb = model.model.embed_tokens
    _random_factors(emb)
    w = emb.weight.detach().clone()
    ids = _ids()
    model.eval()  # (a weight tied to a plain module: never merged, inject turns merge_weights off)
    assert not emb.merged and torch.equal(emb.weight, w)
    with pytest.raises(ValueError, match="tied"):
        lora_ext.merge_adapter(model)
    with torch.no_grad():
        assert_close_rel(emb(ids), embedding64(ids, w, emb.lora_A, emb.lora_B, emb.scaling) * 8.0, torch.float32)


# ---------------------------------------------------------------------------------------------------
# BART's numeric scale


class _Holder(nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.emb = emb

    def forward(self, ids):
        return self.emb(ids)


def test_bart_numeric_scale():
    torch.manual_seed(0)
    model = _Holder(BartScaledWordEmbedding(30, 8, 1, embed_scale=2.75))
    ids = _ids(20, 30)
    with torch.no_grad():
        base = model(ids)
    lora_ext.inject(model, ["emb"], r=3, lora_alpha=6)
    layer = model.emb
    assert layer.embed_scale == 2.75 and "embed_scale" not in layer._buffers
    with torch.no_grad():
        assert torch.equal(model(ids), base)
    _random_factors(layer, std=0.3)
    ref = embedding64(ids, layer.weight, layer.lora_A, layer.lora_B, layer.scaling) * 2.75
    assert_close_rel(model(ids), ref, torch.float32)
    lora_ext.unload(model, merge=True)
    assert type(model.emb) is BartScaledWordEmbedding and model.emb.embed_scale == 2.75
    assert model.emb.padding_idx == 1
    assert_close_rel(model(ids), ref, torch.float32)


# ---------------------------------------------------------------------------------------------------
# what is refused, before anything is replaced


class _DoubleScaled(nn.Embedding):  # an embed_scale, but a forward that is not the lookup times it
    def __init__(self, num, dim, padding_idx=None, embed_scale=1.0):
        super().__init__(num, dim, padding_idx)
        self.embed_scale = embed_scale

    def forward(self, ids):
        return super().forward(ids) * (2 * self.embed_scale)


class _MyScaled(_DoubleScaled):  # the lookup times its scale, outside transformers
    def forward(self, ids):
        return super(_DoubleScaled, self).forward(ids) * self.embed_scale


class _NoRebuild(_MyScaled):  # right forward, but a constructor unload could not call with embed_scale
    def __init__(self, num, dim):
        super().__init__(num, dim, embed_scale=3.0)


def _refused(module, match="a subclass of Embedding with a forward of its own"):
    model = _Holder(module)
    weight = module.weight.detach().clone()
    with pytest.raises(ValueError, match=match):
        lora_ext.inject(model, ["emb"], r=2)
    assert model.emb is module and (module.weight.is_meta or same_bits(module.weight.detach(), weight))


def test_a_forward_that_is_not_the_scaled_lookup_is_refused():
    _refused(_DoubleScaled(20, 4, embed_scale=3.0))
    accepted = _Holder(_MyScaled(20, 4, embed_scale=3.0))
    lora_ext.inject(accepted, ["emb"], r=2)
    assert accepted.emb.embed_scale == 3.0


def test_a_class_unload_could_not_rebuild_is_refused():
    _refused(_NoRebuild(20, 4))


def test_what_a_lookup_cannot_show_is_refused_unless_transformers_own():
    zeros = _MyScaled(20, 4, embed_scale=3.0)
    with torch.no_grad():
        zeros.weight.zero_()  # every row zero: any scale looks right
    _refused(zeros)
    with torch.device("meta"):
        on_meta = _MyScaled(20, 4, embed_scale=3.0)
        gemma_on_meta = Gemma3TextScaledWordEmbedding(20, 4, 0, embed_scale=3.0)
    _refused(on_meta)
    gemma_on_meta.embed_scale = torch.tensor(3.0)  # (the buffer real, as accelerate's init_empty_weights leaves it)
    model = _Holder(gemma_on_meta)
    lora_ext.inject(model, ["emb"], r=2)
    assert model.emb.embed_scale.item() == 3.0 and model.emb.weight.is_meta


def test_a_scale_on_meta_a_trainable_scale_or_max_norm_is_refused():
    with torch.device("meta"):
        gemma = Gemma3TextScaledWordEmbedding(20, 4, 0, embed_scale=3.0)
    _refused(gemma, match="whose embed_scale is a meta tensor")  # (its buffer on meta too: a value nothing could
    # read; R4: the refusal said it was for a forward of its own)
    trainable = Gemma3TextScaledWordEmbedding(20, 4, 0, embed_scale=3.0)
    trainable.embed_scale = nn.Parameter(torch.tensor(3.0))  # the layer's copy would not train
    _refused(trainable)
    normed = _MyScaled(20, 4, embed_scale=3.0)
    normed.max_norm = 1.0  # a lookup would renormalise rows in place: not probed
    _refused(normed)


def test_the_check_runs_no_hooks_and_writes_nothing():
    module = Gemma3TextScaledWordEmbedding(20, 4, 0, embed_scale=3.0)
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    version = module.weight._version
    model = _Holder(module)
    with pytest.raises(ValueError, match="hooks of its own"):  # (a layer in its place would not run the hook)
        lora_ext.inject(model, ["emb"], r=2)
    assert calls == [] and module.weight._version == version and model.emb is module


# ---------------------------------------------------------------------------------------------------
# a hostile pass (each failed before its fix: accepted or unloaded into other outputs)


def test_t5gemma2s_end_of_image_embedding_is_refused_on_any_device():
    # transformers' own *ScaledWordEmbedding, but its forward also puts eoi_embedding (a Parameter) at
    # eoi_token_index: a lookup of 16 ids never met that row of a 262144-row table, and on meta the name sufficed
    emb = T5Gemma2TextScaledWordEmbedding(300, 2, 0, embed_scale=8.0, eoi_token_index=299)
    _refused(emb)
    with torch.device("meta"):
        on_meta = T5Gemma2TextScaledWordEmbedding(300, 2, 0, embed_scale=8.0)
    on_meta.embed_scale = torch.tensor(8.0)
    _refused(on_meta)


class _TrainDropout(_MyScaled):  # the scaled lookup in eval mode only
    def forward(self, ids):
        return F.dropout(super().forward(ids), 0.5, self.training)


def test_a_forward_that_differs_in_the_other_mode_is_refused():
    emb = _TrainDropout(30, 8, embed_scale=3.0).eval()  # (from_pretrained's mode)
    _refused(emb)
    assert not emb.training  # the probe put the mode back


@pytest.mark.parametrize("scale", [8.0, torch.tensor(3.0)], ids=["number", "tensor"])
def test_unload_refuses_a_scale_no_plain_module_holds(scale):
    model = _Holder(lora_ext.Embedding(50, 8, r=2, embed_scale=scale))
    with pytest.raises(ValueError, match="'emb' is an Embedding with embed_scale"):
        lora_ext.unload(model)
    assert isinstance(model.emb, lora_ext.Embedding)


def test_unload_builds_the_class_with_the_scale_the_layer_has_now():
    model = _Holder(BartScaledWordEmbedding(30, 8, 1, embed_scale=2.75))
    lora_ext.inject(model, ["emb"], r=2)
    model.emb.embed_scale = 4.0
    ids = _ids(20, 30)
    with torch.no_grad():
        want = model(ids)
    lora_ext.unload(model, merge=False)
    assert type(model.emb) is BartScaledWordEmbedding and model.emb.embed_scale == 4.0
    with torch.no_grad():
        assert torch.equal(model(ids), want)
    gemma = _Holder(Gemma3TextScaledWordEmbedding(30, 8, 0, embed_scale=8.0))
    lora_ext.inject(gemma, ["emb"], r=2)
    gemma.emb.embed_scale.fill_(5.0)
    lora_ext.unload(gemma, merge=False)
    # transformers' _init_weights sets the buffer from scalar_embed_scale again: both must say 5
    assert gemma.emb.scalar_embed_scale == 5.0 and gemma.emb.embed_scale.item() == 5.0


def test_unload_after_the_scale_was_taken_away_builds_a_real_one():
    gemma = _Holder(Gemma3TextScaledWordEmbedding(30, 8, 0, embed_scale=8.0))
    lora_ext.inject(gemma, ["emb"], r=2)
    gemma.emb.embed_scale = None  # no scale from here on (a buffer set to None)
    ids = _ids(20, 30)
    with torch.no_grad():
        want = gemma(ids)
    lora_ext.unload(gemma, merge=False)
    assert not gemma.emb.embed_scale.is_meta and gemma.emb.scalar_embed_scale == 1.0
    with torch.no_grad():
        assert torch.equal(gemma(ids), want)
