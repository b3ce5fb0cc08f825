"""A hostile pass across transformers architectures against the real peft (2026-12-01): each test failed before its
fix.

- load_peft_adapter(activate=False) of an adapter that needs new layers: they came up serving it while the rest of
  the model served the active adapter (a silent mix); now they serve the active one as zeros (the base, as peft).
  set_adapter to an adapter some layers lack (other target modules) serves those layers' base, as peft does, where
  it raised KeyError.
- Modules whose parent reads their weight without calling them (Mamba's dt_proj, WavLM's attention projections):
  the adapter did nothing unmerged and everything after eval() merged it; now refused, as MultiheadAttention's out_proj
  was. Parents that read a weight on one path and call the module on another (Bloom, DeBERTa) stay accepted.
- ConvLoRA read through to its conv's attributes (ViT, CLIP read `.weight.dtype`, Whisper `.stride`): a load that
  succeeded crashed at the first forward.
- save_peft_adapter refused modules_to_save ["classifier", "pre_classifier"] (DistilBERT) that it had loaded.
"""
import copy
import os

import pytest
import torch
import torch.nn as nn
import transformers as T
from peft import LoraConfig, PeftModel, get_peft_model

import lora_ext
from lora_ext.serving import injection
from helpers import rel_err
from tiny_models import snapshot, unchanged

T.logging.set_verbosity_error()


def _peft_adapter(base, path, seed, **config):
    """A peft adapter of `base` (deep-copied) with random factors (and copies), saved at `path`."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**{"r": 4, "lora_alpha": 8, **config}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(path)
    return path


def _qwen2():
    torch.manual_seed(0)
    return T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()


def _ids(batch=4, seq=6):
    return torch.randint(1, 97, (batch, seq), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def differing(tmp_path_factory):
    """A Qwen2 base and adapters a (q_proj), b (v_proj, layer 1 only), c (q_proj and v_proj)."""
    base, d = _qwen2(), tmp_path_factory.mktemp("differing")
    paths = {"a": _peft_adapter(base, str(d / "a"), 1, target_modules=["q_proj"]),
             "b": _peft_adapter(base, str(d / "b"), 2, target_modules=["v_proj"], layers_to_transform=[1]),
             "c": _peft_adapter(base, str(d / "c"), 3, target_modules=["q_proj", "v_proj"])}
    return base, paths


def _peft_out(base, paths, active, x, names=None):
    model = PeftModel.from_pretrained(copy.deepcopy(base), paths[active], adapter_name=active)
    for n, p in paths.items():
        if n != active:
            model.load_adapter(p, adapter_name=n)
    model.set_adapter(active)
    with torch.no_grad():
        return model.eval()(input_ids=x, **({"adapter_names": names} if names else {})).logits


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_inactive_load_of_an_adapter_needing_new_layers_keeps_serving_the_active_one(differing, merged):
    base, paths = differing
    x = _ids()
    model = copy.deepcopy(base)
    lora_ext.load_peft_adapter(model, paths["a"], "a")
    if merged:
        model.eval()
    want = _peft_out(base, paths, "a", x)
    lora_ext.load_peft_adapter(model, paths["b"], "b", activate=False)  # injects layer 1's v_proj
    lora_ext.load_peft_adapter(model, paths["c"], "c", activate=False)  # injects layer 0's v_proj
    assert lora_ext.active_adapter(model) == "a"
    with torch.no_grad():
        assert rel_err(model(input_ids=x).logits, want) < 1e-6
        model.eval()
        assert rel_err(model(input_ids=x).logits, want) < 1e-6
        # each row with its own adapter, as peft's adapter_names (a layer an adapter leaves alone: its base)
        names = ["b", "a", None, "c"]
        with lora_ext.batch_adapters(model, names):
            out = model(input_ids=x).logits
    ref = _peft_out(base, paths, "a", x, [n or "__base__" for n in names])
    assert rel_err(out, ref) < 1e-5


def test_stand_ins_are_not_saved_and_a_reload_keeps_them(differing, tmp_path):
    base, paths = differing
    x = _ids()
    model = copy.deepcopy(base)
    lora_ext.load_peft_adapter(model, paths["a"], "a")
    lora_ext.load_peft_adapter(model, paths["b"], "b", activate=False)
    stand_in = model.model.layers[1].self_attn.v_proj
    assert stand_in.is_placeholder("a") and not stand_in.is_placeholder("b")
    saved = lora_ext.save_peft_adapter(model, str(tmp_path / "a"), "a")
    assert saved == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]  # not the stand-in
    torch.testing.assert_close(_peft_out(base, {"a": str(tmp_path / "a")}, "a", x), _peft_out(base, paths, "a", x))
    lora_ext.load_peft_adapter(model, paths["a"], "a")  # activate=True: the stand-in already holds "a"
    with torch.no_grad():
        assert rel_err(model(input_ids=x).logits, _peft_out(base, paths, "a", x)) < 1e-6
    lora_ext.load_peft_adapter(model, paths["c"], "a", activate=True)  # a real "a" replaces the stand-in
    assert not model.model.layers[1].self_attn.v_proj.is_placeholder("a")
    with torch.no_grad():
        assert rel_err(model(input_ids=x).logits, _peft_out(base, paths, "c", x)) < 1e-6


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_switching_between_adapters_of_different_targets_matches_peft(differing, merged, tmp_path):
    """peft's set_adapter serves the layers an adapter does not target at their base; lora_ext's refused (KeyError)
    unless every layer held the adapter. Now those layers get a stand-in of zeros."""
    base, paths = differing
    x = _ids()
    model = copy.deepcopy(base)
    lora_ext.load_peft_adapter(model, paths["a"], "a")
    lora_ext.load_peft_adapter(model, paths["b"], "b")  # activate=True: layer 0's q_proj, layer 1's q_proj: stand-ins
    if merged:
        model.eval()
    with torch.no_grad():
        assert rel_err(model(input_ids=x).logits, _peft_out(base, {"a": paths["a"], "b": paths["b"]}, "b", x)) < 1e-6
        lora_ext.load_peft_adapter(model, paths["c"], "c", activate=False)
        for name in ("a", "c", "b", "a"):
            lora_ext.set_adapter(model, name)
            assert lora_ext.active_adapter(model) == name
            assert rel_err(model(input_ids=x).logits, _peft_out(base, paths, name, x)) < 1e-6, name
    q0 = model.model.layers[0].self_attn.q_proj
    assert q0.is_placeholder("b") and not q0.is_placeholder("a")
    lora_ext.save_peft_adapter(model, str(tmp_path / "b"), "b")  # b's own layer only
    torch.testing.assert_close(_peft_out(base, {"b": str(tmp_path / "b")}, "b", x), _peft_out(base, paths, "b", x))
    lora_ext.delete_adapter(model, "b")
    assert not q0.has_adapter("b")
    with pytest.raises(KeyError, match="no lora_ext layer holds an adapter 'b'"):
        lora_ext.set_adapter(model, "b")


def _mamba():
    torch.manual_seed(0)
    return T.MambaForCausalLM(T.MambaConfig(vocab_size=97, hidden_size=16, state_size=4, num_hidden_layers=2,
                                            expand=2, conv_kernel=3, time_step_rank=4)).eval()


def _wavlm():
    torch.manual_seed(0)
    return T.WavLMModel(T.WavLMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=48, conv_dim=(16, 16), conv_stride=(5, 2),
                                      conv_kernel=(10, 3), num_conv_pos_embeddings=8,
                                      num_conv_pos_embedding_groups=4, num_buckets=16, max_bucket_distance=32)).eval()


@pytest.mark.parametrize("build,targets,parent", [
    (_mamba, ["dt_proj"], "MambaMixer"),
    (_wavlm, ["q_proj", "v_proj"], "WavLMAttention"),
], ids=["mamba-dt_proj", "wavlm-attention"])
def test_modules_read_without_a_call_are_refused(tmp_path, build, targets, parent):
    base = build()
    path = _peft_adapter(base, str(tmp_path / "a"), 1, target_modules=targets)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=rf"its parent '[^']+' \({parent}\) reads its weight without calling it"):
        lora_ext.load_peft_adapter(model, path)
    assert unchanged(model, snap) and not any(isinstance(m, lora_ext.LoRALayer) for m in model.modules())
    with pytest.raises(ValueError, match="reads its weight without calling it"):
        lora_ext.inject(model, targets)


def test_parents_that_call_the_module_on_another_path_are_accepted():
    """Bloom's attention reads dense.weight only with pretraining_tp > 1 (and calls dense otherwise), DeBERTa's
    reads in_proj.weight for a query it is given: lora_ext serves the called path, as peft does."""
    from transformers.models.bloom.modeling_bloom import BloomAttention
    from transformers.models.deberta.modeling_deberta import DisentangledSelfAttention
    from transformers.models.mamba.modeling_mamba import MambaMixer
    assert "dense" not in injection.read_not_called(BloomAttention)
    assert "in_proj" not in injection.read_not_called(DisentangledSelfAttention)
    assert {"dt_proj", "conv1d"} <= injection.read_not_called(MambaMixer)
    assert "in_proj" not in injection.read_not_called(MambaMixer) and "x_proj" not in injection.read_not_called(
        MambaMixer)


class _ReadsChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.other = nn.Linear(4, 4)

    def forward(self, x):
        x = self.other(x.to(self.other.weight.dtype))  # a dtype read of a module it calls: fine
        return torch.nn.functional.linear(x, self.proj.weight, self.proj.bias)


def test_a_users_module_reading_a_weight_is_refused_and_its_called_module_is_not():
    model = _ReadsChild()
    with pytest.raises(ValueError, match=r"'proj': the model \(_ReadsChild\) reads its weight"):
        lora_ext.inject(model, ["proj"])
    lora_ext.inject(model, ["other"])
    assert isinstance(model.other, lora_ext.Linear)


def _vit():
    torch.manual_seed(0)
    return T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                   intermediate_size=48, image_size=16, patch_size=4,
                                                   num_labels=3)).eval()


def _clip():
    torch.manual_seed(0)
    return T.CLIPVisionModel(T.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                num_attention_heads=4, image_size=16, patch_size=4)).eval()


def _whisper():
    torch.manual_seed(0)
    return T.WhisperModel(T.WhisperConfig(vocab_size=97, d_model=32, encoder_layers=1, decoder_layers=1,
                                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                          decoder_ffn_dim=48, num_mel_bins=8, max_source_positions=16,
                                          max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                          decoder_start_token_id=1)).eval()


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("build,targets,inputs", [
    (_vit, ["projection"], lambda: {"pixel_values": torch.randn(2, 3, 16, 16)}),
    (_clip, ["patch_embedding"], lambda: {"pixel_values": torch.randn(2, 3, 16, 16)}),
    (_whisper, ["conv1", "conv2"], lambda: {"input_features": torch.randn(2, 8, 32),
                                            "decoder_input_ids": torch.tensor([[1, 2], [1, 3]])}),
], ids=["vit", "clip", "whisper"])
def test_convolutions_read_through_to_their_conv(tmp_path, build, targets, inputs):
    base = build()
    path = _peft_adapter(base, str(tmp_path / "a"), 1, target_modules=targets)
    x = inputs()
    with torch.no_grad():
        want = _output(PeftModel.from_pretrained(copy.deepcopy(base), path).merge_and_unload()(**x))
        model = copy.deepcopy(base)
        lora_ext.load_peft_adapter(model, path)
        conv = model.get_submodule([n for n, m in model.named_modules() if isinstance(m, lora_ext.ConvLoRA)][0])
        assert conv.weight is conv.conv.weight and conv.stride == conv.conv.stride
        assert rel_err(_output(model.train()(**x)), want) < 1e-5  # unmerged
        assert rel_err(_output(model.eval()(**x)), want) < 1e-5  # merged
        assert rel_err(_output(base(**x)), want) > 1e-3
    with pytest.raises(KeyError, match="already exists"):  # the conv holds the weight: a new Parameter is refused
        conv.weight = nn.Parameter(torch.zeros_like(conv.conv.weight))


def test_distilbert_head_and_pre_classifier_save_round_trip(tmp_path):
    torch.manual_seed(0)
    base = T.DistilBertForSequenceClassification(T.DistilBertConfig(vocab_size=97, dim=32, n_layers=1, n_heads=4,
                                                                    hidden_dim=48, num_labels=3)).eval()
    path = _peft_adapter(base, str(tmp_path / "a"), 1, target_modules=["q_lin", "v_lin"],
                         modules_to_save=["classifier", "pre_classifier"])
    model = copy.deepcopy(base)
    lora_ext.load_peft_adapter(model, path)
    out = str(tmp_path / "resaved")
    lora_ext.save_peft_adapter(model, out)
    x = _ids(2)
    with torch.no_grad():
        want = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()(input_ids=x).logits
        got = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()(input_ids=x).logits
        assert rel_err(model(input_ids=x).logits, want) < 1e-6 and rel_err(got, want) < 1e-6
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))


def test_time_major_models_are_refused_in_mixed_batches(tmp_path):
    """XLNet runs its FFN on (T, B, d): with T equal to the batch, row i's adapter went to token i of every row
    (peft's adapter_names does the same). Refused by name, before anything is written."""
    torch.manual_seed(0)
    base = T.XLNetModel(T.XLNetConfig(vocab_size=97, d_model=32, n_layer=1, n_head=4, d_inner=48,
                                      dropout=0.0)).eval()
    model = copy.deepcopy(base)
    lora_ext.load_peft_adapter(model, _peft_adapter(base, str(tmp_path / "a"), 1, target_modules=["layer_1"]), "a")
    x = _ids(4, 4)
    with torch.no_grad():
        want = model(input_ids=x).last_hidden_state
        with pytest.raises(ValueError, match="XLNetModel, whose layers take time-major inputs"):
            with lora_ext.batch_adapters(model, ["a", None, "a", None]):
                pass
        assert torch.equal(model(input_ids=x).last_hidden_state, want)


# -------------------------------------------------------- a second hostile pass, over the changes above, each fixed


def test_a_stand_in_given_values_is_saved_as_the_layer_serves_it(differing, tmp_path):
    """Values written into a live stand-in (in place; load_state_dict of another model's factors, which now must
    have the stand-in's rank 1): the layer serves them, so save_peft_adapter must write them too (it skipped the layer
    by its stand-in mark: 0.137 off)."""
    base, paths = differing
    x = _ids()
    model = copy.deepcopy(base)
    lora_ext.load_peft_adapter(model, paths["a"], "a")
    lora_ext.load_peft_adapter(model, paths["b"], "b")  # q_proj: stand-ins of "b"
    source = copy.deepcopy(base)
    lora_ext.load_peft_adapter(source, paths["c"], "c")  # rank 4 at q_proj and v_proj
    with pytest.raises(RuntimeError, match="size mismatch"):  # a stand-in is rank 1: refused loudly
        model.load_state_dict(lora_ext.lora_state_dict(source), strict=False)
    q0 = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q0.lora_A.normal_(0, 0.3)
        q0.lora_B.normal_(0, 0.3)
    assert q0.is_placeholder("b")  # (the mark stays; the values are the layer's now)
    lora_ext.save_peft_adapter(model, str(tmp_path / "b"), "b")
    with torch.no_grad():
        served = model(input_ids=x).logits
    assert rel_err(_peft_out(base, {"b": str(tmp_path / "b")}, "b", x), served) < 1e-6


def _fsdp_inject_case(rank, world, path):
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    fully_shard(model[2])
    fully_shard(model)
    snap = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    try:
        lora_ext.load_peft_adapter(model, path)
        message = None
    except ValueError as e:
        message = str(e)
    same = all(torch.equal(v.full_tensor(), snap[k]) for k, v in model.state_dict().items())
    return message, same, any(isinstance(m, lora_ext.LoRALayer) for m in model.modules())


def test_injecting_into_a_sharded_weight_is_refused_before_anything_changes(tmp_path):
    """A load that injected a layer into a fully_shard model succeeded; every forward then raised a tensor-parallel
    message."""
    from dist import run_ranks
    torch.manual_seed(0)
    path = _peft_adapter(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), str(tmp_path / "a"), 1,
                         target_modules=["2"])
    for message, same, injected in run_ranks(_fsdp_inject_case, path):
        assert message is not None and "has a sharded weight (a DTensor" in message and "first, then" in message
        assert same and not injected


def test_the_state_space_mixers_kernel_path_reads_are_refused():
    """Mamba's CUDA kernel path (mamba_ssm) reads x_proj/out_proj's weights where the torch path calls them: the
    adapter would be served on a CPU and not on a GPU (peft refuses out_proj for Mamba models too)."""
    model = _mamba()
    for target in (["x_proj"], ["out_proj"]):
        with pytest.raises(ValueError, match="MambaMixer\\) reads its weight without calling it"):
            lora_ext.inject(copy.deepcopy(model), target)
    lora_ext.inject(model, ["in_proj"])  # called on every path
    assert isinstance(model.backbone.layers[0].mixer.in_proj, lora_ext.Linear)


def test_stand_ins_fit_small_slots_and_every_adapter_is_listed(tmp_path):
    """Stand-ins took the live adapter's rank (16): a batch of the rank-4 adapter was refused for slots of rank 4
    ("rank 16 at q_proj"); and adapter_names listed only the adapters every layer held (not "a" before a switch)."""
    base = _qwen2()
    a = _peft_adapter(base, str(tmp_path / "a"), 1, target_modules=["q_proj"], r=16)
    b = _peft_adapter(base, str(tmp_path / "b"), 2, target_modules=["v_proj"])
    model = copy.deepcopy(base)
    lora_ext.load_peft_adapter(model, a, "a")
    assert lora_ext.adapter_names(model) == ["a"]
    lora_ext.load_peft_adapter(model, b, "b")
    assert lora_ext.adapter_names(model) == ["b", "a"]
    q0 = model.model.layers[0].self_attn.q_proj
    assert q0.is_placeholder("b") and q0.r == 1
    model.eval()
    lora_ext.configure_slots(model, slots=4, max_rank=4)
    x = _ids(2)
    with torch.no_grad(), lora_ext.batch_adapters(model, ["b", None]):
        out = model(input_ids=x).logits
    ref = _peft_out(base, {"a": a, "b": b}, "b", x, ["b", "__base__"])
    assert rel_err(out, ref) < 1e-5


class _CallsForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] > 99:  # a fast path reading the weight, beside the call below
            return torch.nn.functional.linear(x, self.proj.weight)
        return self.proj.forward(x)


def test_a_module_called_through_its_forward_method_is_accepted():
    model = _CallsForward()
    lora_ext.inject(model, ["proj"])
    assert isinstance(model.proj, lora_ext.Linear)
