"""Forty-eighth session: what this session's hostile rounds and its own reading gave, each with a test that fails on
the commit before its fix."""
import contextlib
import threading

import pytest
import torch

import lora_ext as lora
from helpers import hf_model
from lora_ext.serving.adapters import model_lock

transformers = pytest.importorskip("transformers")


def _static_generate(model, compile_config, tokens=5):
    ids = torch.tensor([[1, 2, 3, 4]])
    return model.generate(ids, max_new_tokens=tokens, do_sample=False, cache_implementation="static",
                          compile_config=compile_config)


def _compile_config(on_call):
    """transformers' CompileConfig whose backend runs the traced graph eagerly, calling on_call() before each run
    (a decode step), and compiles on a CPU too (as on a GPU by default)."""
    def backend(gm, example_inputs):
        def run(*args):
            on_call()
            return gm.forward(*args)
        return run
    config = transformers.CompileConfig(backend=backend, fullgraph=False, mode=None)
    config._compile_all_devices = True
    return config


def test_static_cache_generate_decode_steps_take_the_models_read():
    # S2: generate() compiles the model's __call__ itself for its decode steps (get_compiled_call): they took no read,
    # and a switch through the model meanwhile wrote in the middle of them (one read for six tokens, the prefill's)
    model = hf_model("llama").eval()
    lora.set_adapter(model, "b")
    lock = model_lock(model)
    held = []
    config = _compile_config(lambda: held.append(lock.holds_read()))
    expected = _static_generate(model, None)  # (eager: no compile on a CPU without _compile_all_devices)
    for _ in range(2):  # (the first generate compiles; the second takes the compiled call transformers kept)
        held.clear()
        assert torch.equal(_static_generate(model, config), expected)
        assert len(held) >= 4 and all(held), held
    # a model of the same class lora_ext never locked: its generate compiles as before, and takes no lock
    plain = transformers.LlamaForCausalLM(model.config)
    calls = []
    _static_generate(plain, _compile_config(lambda: calls.append(1)))
    assert calls and "_lora_ext_model_lock" not in plain.__dict__


def test_an_unpickled_model_decodes_under_its_lock_in_a_fresh_process(tmp_path):
    # T2: the model came with its lock, so no lock was made there and nothing wrapped its class's get_compiled_call:
    # the decode steps took no read and a switch tore them (3 of 3; spawned workers alike)
    import subprocess
    import sys
    model = hf_model("llama").eval()
    lora.set_adapter(model, "b")
    torch.save(model, tmp_path / "model.pt")
    script = f"""
import torch, transformers
import lora_ext as lora
from lora_ext.serving.adapters import model_lock
model = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
lock = model_lock(model)
held = []
def backend(gm, example_inputs):
    def run(*args):
        held.append(lock.holds_read())
        return gm.forward(*args)
    return run
config = transformers.CompileConfig(backend=backend, fullgraph=False, mode=None)
config._compile_all_devices = True
model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=4, do_sample=False, cache_implementation="static",
               compile_config=config)
print("HELD", held)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    held = eval(out.stdout.split("HELD", 1)[1])
    assert len(held) >= 3 and all(held), held


def test_a_deep_copy_of_a_model_that_generated_compiled_decodes_with_its_own_weights():
    # T2: transformers keeps the compiled call in the model's __dict__: the copy's generate ran the original's
    # (0.557 off the copy's eager logits, other tokens), under the copy's lock
    import copy
    model = hf_model("llama").eval()
    config = _compile_config(lambda: None)
    _static_generate(model, config)
    twin = copy.deepcopy(model)
    lora.set_adapter(twin, "b")  # (the original serves "default")
    want = twin.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=5, do_sample=False,
                         cache_implementation="static", output_logits=True, return_dict_in_generate=True)
    got = twin.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=5, do_sample=False,
                        cache_implementation="static", output_logits=True, return_dict_in_generate=True,
                        compile_config=config)
    assert torch.equal(got.sequences, want.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(got.logits, want.logits)) < 1e-5
    original = _static_generate(model, None)
    assert not torch.equal(original, want.sequences) or \
        (model(want.sequences).logits - twin(want.sequences).logits).abs().max().item() > 1e-3  # (the test can fail)


def test_compiled_decode_steps_take_the_read_of_the_part_lora_ext_was_given():
    # T2: lora_ext given model.model (inject, set_adapter): its hooks took its read in eager forwards of the whole
    # model, but the compiled decode steps took none, and a switch of model.model tore them
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=40, max_position_embeddings=16)).eval()
    lora.inject(model.model, ["q_proj", "v_proj"], r=2)
    for m in [m for m in model.modules() if isinstance(m, lora.LoRALayer)]:
        m.add_adapter("b", torch.randn(2, m.in_features), torch.randn(m.out_features, 2), 1.0)
    lora.set_adapter(model.model, "b")
    lock = model_lock(model.model)
    assert "_lora_ext_model_lock" not in model.__dict__
    held = []
    _static_generate(model, _compile_config(lambda: held.append(lock.holds_read())))
    assert len(held) >= 4 and all(held), held


def test_vibevoices_negative_branch_compiles_under_the_lock():
    # T2: VibeVoice compiles its classifier-free guidance's negative branch apart (_get_negative_compiled_call)
    if not hasattr(transformers, "VibeVoiceForConditionalGeneration"):
        pytest.skip("this transformers has no VibeVoice")
    cfg = transformers.VibeVoiceConfig(
        text_config=dict(model_type="qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=151700),
        audio_config=dict(model_type="vibevoice_acoustic_tokenizer", hidden_size=8, n_filters=4, depths=[1, 1],
                          downsampling_ratios=[2]),
        semantic_model_config=dict(model_type="vibevoice_acoustic_tokenizer_encoder", hidden_size=8, n_filters=4,
                                   depths=[1, 1], downsampling_ratios=[2]),
        diffusion_head_config=dict(num_head_layers=1, intermediate_size=16))
    model = transformers.VibeVoiceForConditionalGeneration(cfg).eval()
    lora.inject(model, ["q_proj", "v_proj"], r=2)
    lock = model_lock(model)
    held = []
    negative = model._get_negative_compiled_call(_compile_config(lambda: held.append(lock.holds_read())))
    with torch.no_grad():
        negative(input_ids=torch.tensor([[1, 2, 3]]))
    assert held == [True]


def test_a_switch_during_a_compiled_decode_step_waits_for_it():
    model = hf_model("llama").eval()
    lora.set_adapter(model, "b")
    switch, steps = [], []

    def on_call():
        steps.append(model.model.layers[0].self_attn.q_proj.active_adapter)
        if len(steps) == 2:  # inside the second decode step: a switch from another thread
            t = threading.Thread(target=lambda: lora.set_adapter(model, "default"), daemon=True)
            t.start()
            t.join(0.5)
            switch.append((t, t.is_alive()))
    _static_generate(model, _compile_config(on_call), tokens=6)
    t, waited = switch[0]
    t.join(10)
    assert waited, "the switch wrote in the middle of a compiled decode step"
    assert not t.is_alive() and model.model.layers[0].self_attn.q_proj.active_adapter == "default"
    assert steps[:2] == ["b", "b"] and steps[-1] == "default"  # it landed between two steps


def _encoder_with_adapters(batch_first=True):
    """torch's nn.TransformerEncoder (2 layers) with lora_ext in linear1/linear2 (adapters "default" and "b", random),
    float64, and for each adapter and the base a plain copy whose weights hold that adapter, merged by the test."""
    import copy
    torch.manual_seed(0)
    plain = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0,
                                                                         batch_first=batch_first), 2)
    plain = plain.double().eval()
    enc = copy.deepcopy(plain)
    lora.inject(enc, ["linear1", "linear2"], r=2)
    refs = {None: plain, "default": copy.deepcopy(plain), "b": copy.deepcopy(plain)}
    for path, m in enc.named_modules():
        if isinstance(m, lora.LoRALayer):
            with torch.no_grad():
                m.lora_B.normal_()
                m.add_adapter("b", torch.randn(2, m.in_features, dtype=torch.float64),
                              torch.randn(m.out_features, 2, dtype=torch.float64), 0.5)
                for name in ("default", "b"):
                    A, B, scaling = m.get_adapter(name)
                    refs[name].get_submodule(path).weight += scaling * B.double() @ A.double()
    return enc.eval(), refs


@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padding_mask"])
@pytest.mark.parametrize("how", ["unmerged", "merged", "mixed_batch"])
def test_torch_transformer_encoder_layers_run_their_lora_layers(how, padded):
    # U1: in eval under no grad, nn.TransformerEncoderLayer's fast path reads linear1/linear2's weights and never calls
    # them: lora_ext's layers there were skipped (unmerged: the base served, 3.8 off; a mixed batch's rows all served
    # what the weight held, 1.0-1.2 off); with a padding mask nn.TransformerEncoder hands the layers nested tensors
    enc, refs = _encoder_with_adapters()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    kwargs = {"src_key_padding_mask": torch.tensor([[False] * 5, [False] * 3 + [True] * 2,
                                                    [False] * 4 + [True]])} if padded else {}
    names = ["b", None, "default"] if how == "mixed_batch" else ["default"] * 3
    if how == "unmerged":
        lora.unmerge_adapter(enc)
    assert enc.layers[0].linear1.merged == (how != "unmerged")
    with torch.no_grad():
        expected = torch.cat([refs[n](x[i:i + 1], **{k: v[i:i + 1] for k, v in kwargs.items()})
                              for i, n in enumerate(names)])
        with lora.batch_adapters(enc, names) if how == "mixed_batch" else contextlib.nullcontext():
            out = enc(x, **kwargs)
    assert not out.is_nested and out.shape == expected.shape
    assert (out - expected).abs().max().item() < 1e-10
    # the base and the adapters differ there: the test can fail
    assert min((refs[n](x) - refs[None](x)).abs().max().item() for n in ("default", "b")) > 0.1


def test_a_mixed_batch_of_time_major_torch_transformer_layers_is_refused():
    # U1: batch_first=False (torch's default): the layers run on (tokens, rows, d); with as many tokens as rows a batch
    # served token t of every row with row t's adapter (0.49-1.12 off), silently
    enc, _ = _encoder_with_adapters(batch_first=False)
    x = torch.randn(3, 3, 16, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(ValueError, match="'layers.0' is a TransformerEncoderLayer.*time-major.*"
                                                          "batch_first=False"):
        with lora.batch_adapters(enc, ["b", None, "default"]):
            enc(x)
    # one adapter at a time is served (and unload takes lora_ext's hook away with the layers)
    with torch.no_grad():
        out = enc(x)
    lora.unload(enc, merge=True)
    assert all(not m._forward_pre_hooks for m in enc.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        assert (enc(x) - out).abs().max().item() < 1e-10


def test_an_adapter_targeting_only_a_module_another_saves_whole_is_refused_naming_it(tmp_path):
    # U1: the refusal said target_modules "matches no module of the model"
    peft = pytest.importorskip("peft")
    model = hf_model("llama")
    config = model.config
    for name, cfg in {"a": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
                      "c": dict(target_modules=["embed_tokens"])}.items():
        torch.manual_seed(1)
        pm = peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(r=2, **cfg))
        pm.save_pretrained(str(tmp_path / name))
    lora.load_peft_adapter(model, str(tmp_path / "a"), "a", activate=False)
    with pytest.raises(ValueError, match=r"matches only modules that other adapters save whole or replace token rows "
                                         r"of .*'model.embed_tokens' \(by adapter\(s\) \['a'\]\)"):
        lora.load_peft_adapter(model, str(tmp_path / "c"), "c", activate=False)
    assert "c" not in lora.adapter_names(model)


def _path_read_model(kind):
    """Tiny transformers models whose parent modules compute with a module's weight without calling it on one path
    (V1: float64, the adapter unmerged against it merged by hand, off by the numbers in each refusal's comment)."""
    T = transformers
    torch.manual_seed(0)
    if kind == "recurrent_gemma":  # a cached decode step: 0.54 off
        return T.RecurrentGemmaForCausalLM(T.RecurrentGemmaConfig(
            num_hidden_layers=2, vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, lru_width=32, attention_window_size=16, conv1d_width=4,
            block_types=["recurrent", "attention"])), ["conv_1d"], "cached decode steps"
    if kind == "reformer":  # a cached decode step: 0.55 off
        return T.ReformerModelWithLMHead(T.ReformerConfig(
            vocab_size=100, hidden_size=32, num_attention_heads=2, attention_head_size=16, feed_forward_size=64,
            attn_layers=["lsh", "local"], axial_pos_embds=False, max_position_embeddings=64, is_decoder=True,
            lsh_attn_chunk_length=8, local_attn_chunk_length=8, num_buckets=4)), ["query_key"], "cached decode steps"
    if kind == "clip":  # interpolate_pos_encoding=True: the adapter dropped whole, 0.96 off
        return T.CLIPVisionModel(T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=32, patch_size=8)), \
            ["position_embedding"], "interpolate_pos_encoding=True"
    if kind in ("bloom_tp", "bloom"):  # pretraining_tp > 1 with slow_but_exact: 0.36 off
        return T.BloomForCausalLM(T.BloomConfig(vocab_size=100, hidden_size=32, n_layer=1, n_head=4, pretraining_tp=2,
                                                slow_but_exact=kind == "bloom_tp")), ["dense"], "pretraining_tp"
    if kind == "sam":  # point prompts: self.point_embed[i].weight, never called: 0.31 off
        from transformers.models.sam.modeling_sam import SamPromptEncoder
        holder = torch.nn.Module()
        holder.prompt_encoder = SamPromptEncoder(T.SamConfig())
        return holder, ["point_embed.0"], r"the module 'prompt_encoder' \(SamPromptEncoder\)"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["recurrent_gemma", "reformer", "clip", "bloom_tp", "sam"])
def test_a_module_its_parent_reads_uncalled_on_one_path_is_refused_naming_the_path(kind, tmp_path):
    # V1: an adapter on these modules was served on one path and skipped on another (peft's too), silently
    model, targets, path = _path_read_model(kind)
    with pytest.raises(ValueError, match=f"{path}.*reads its weight without calling it" if kind == "sam" else
                       f"reads its weight without calling it.*{path}"):
        lora.inject(model, targets, r=2)
    assert not any(isinstance(m, lora.LoRALayer) for m in model.modules())


def test_bloom_without_its_sliced_path_takes_an_adapter_on_dense():
    model, targets, _ = _path_read_model("bloom")
    lora.inject(model, targets, r=2)
    assert isinstance(model.transformer.h[0].self_attention.dense, lora.LoRALayer)


def test_a_module_its_parent_skips_in_training_only_is_injected_with_a_warning():
    # V1: Gemma3n's AltUp computes with correction_coefs' clamped weight in training forwards and calls it in eval:
    # "all-linear" chooses it, and its adapter got no gradient (peft's neither), silently
    T = transformers
    torch.manual_seed(0)
    model = T.Gemma3nForCausalLM(T.Gemma3nTextConfig(
        vocab_size=100, vocab_size_per_layer_input=100, hidden_size=32, hidden_size_per_layer_input=8,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        laurel_rank=4, num_kv_shared_layers=0, activation_sparsity_pattern=[0.0, 0.0],
        layer_types=["sliding_attention", "full_attention"], sliding_window=8))
    with pytest.warns(UserWarning, match=r"correction_coefs'.*\(Gemma3nTextAltUp\) computes with its weight without "
                                         r"calling it in training forwards"):
        lora.inject(model, ["correction_coefs"], r=2)
    assert isinstance(model.model.layers[0].altup.correction_coefs, lora.LoRALayer)


def test_a_layer_pickled_before_the_fast_path_hook_gets_it_on_load(tmp_path):
    # W2: unpickling does not set children, so a model pickled before keep_layers_called loaded without the hook and
    # its encoder layers took the fast path (3.3 off unmerged, 3.65 off a mixed batch)
    enc, refs = _encoder_with_adapters()
    lora.unmerge_adapter(enc)
    for m in enc.modules():
        if isinstance(m, lora.LoRALayer):  # (what the older code pickled: no hook, no mark)
            m._forward_pre_hooks.clear()
            del m.__dict__["_fast_paths_seen"]
    torch.save(enc, tmp_path / "enc.pt")
    loaded = torch.load(tmp_path / "enc.pt", weights_only=False)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        assert (loaded(x) - refs["default"](x)).abs().max().item() < 1e-10
        with lora.batch_adapters(loaded, ["b", None, "default"]):
            out = loaded(x)
        expected = torch.cat([refs[n](x[i:i + 1]) for i, n in enumerate(["b", None, "default"])])
    assert (out - expected).abs().max().item() < 1e-10


class _EncoderNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0,
                                                                               batch_first=True), 1)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x, mask=None):
        return self.head(self.enc(x, src_key_padding_mask=mask))


def _encoder_net_with_saved(tmp_path, lora_on, saved):
    """A torch nn.TransformerEncoder (1 layer) and a head, float64, with peft adapters "default" and "b" (LoRA on
    `lora_on`, `saved` saved whole, random) loaded by lora_ext ("b" inactive), and peft's merged model per adapter
    and the base, as references: (model, refs)."""
    import copy
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _EncoderNet().double().eval()
    cfg = dict(r=2, lora_alpha=4, target_modules=[lora_on], modules_to_save=[saved], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    pm.add_adapter("b", peft.LoraConfig(**cfg))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p))
    pm.save_pretrained(str(tmp_path))
    refs = {None: base}
    for name in ("default", "b"):
        merged = copy.deepcopy(pm)
        merged.set_adapter(name)
        refs[name] = merged.merge_and_unload().eval()
    model = copy.deepcopy(base)
    lora.load_peft_adapter(model, str(tmp_path), "default")
    lora.load_peft_adapter(model, str(tmp_path / "b"), "b", activate=False)
    assert (refs["b"](torch.ones(1, 5, 16, dtype=torch.float64)) - refs["default"](
        torch.ones(1, 5, 16, dtype=torch.float64))).abs().max().item() > 0.01  # (the tests can fail)
    return model.eval(), refs


def _mixed_against_peft(model, refs, mask):
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    names = ["b", None, "default"]
    with torch.no_grad():
        expected = torch.cat([refs[n](x[i:i + 1], None if mask is None else mask[i:i + 1])
                              for i, n in enumerate(names)])
        with lora.batch_adapters(model, names):
            out = model(x, mask)
    return (out - expected).abs().max().item()


_MASK = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])


@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padding_mask"])
@pytest.mark.parametrize("lora_on,saved", [("head", "linear2"), ("linear1", "linear2"), ("linear1", "norm2")])
def test_a_module_saved_whole_inside_a_torch_encoder_layer_serves_each_row(tmp_path, padded, lora_on, saved):
    # W2: the fast path read the active adapter's copy of a module saved whole for every row of a mixed batch
    # (2.5-3.2 off); with a LoRA layer beside it (the fast path left) the copy got nested tensors and raised
    model, refs = _encoder_net_with_saved(tmp_path, lora_on, saved)
    assert _mixed_against_peft(model, refs, _MASK if padded else None) < 1e-10


def test_a_module_saved_whole_pickled_before_the_fast_path_hook_gets_it_on_load(tmp_path):
    # X2: the repair on load was LoRALayer's only: a module saved whole pickled so took the fast path (2.18 off)
    model, refs = _encoder_net_with_saved(tmp_path, "head", "linear2")
    wrapper = model.enc.layers[0].linear2
    wrapper._forward_pre_hooks.clear()  # (what the older code pickled: no hook, no mark)
    del wrapper.__dict__["_fast_paths_seen"]
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert _mixed_against_peft(loaded, refs, None) < 1e-10


def test_a_mixed_batch_refuses_what_a_torch_encoder_cannot_serve_per_row(tmp_path):
    # X2: out_proj saved whole: nn.MultiheadAttention reads its weight (the active adapter's copy) for every row,
    # 1.94 off, silently; a whole encoder layer saved under a padding mask got nested tensors: a torch internal error
    model, refs = _encoder_net_with_saved(tmp_path / "o", "linear1", "out_proj")
    with pytest.raises(ValueError, match=r"'enc.layers.0.self_attn.out_proj' is saved whole.*its parent computes with "
                                         r"its weight without calling it"):
        _mixed_against_peft(model, refs, None)
    model, refs = _encoder_net_with_saved(tmp_path / "l", "head", "layers.0")
    assert _mixed_against_peft(model, refs, None) < 1e-10
    with pytest.raises(ValueError, match=r"a module saved whole \(TransformerEncoderLayer\) was given nested tensors"):
        _mixed_against_peft(model, refs, _MASK)


def test_a_vq_codebook_is_refused_and_an_interpolation_no_method_calls_is_not():
    # W2: Chameleon's quantizer computes its nearest codes from the codebook's weight, uncalled (25.4 off unmerged);
    # Phi-4's vision embeddings define interpolate_pos_encoding and never call it (refused, wrongly)
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAEVectorQuantizer
    holder = torch.nn.Module()
    holder.quantize = ChameleonVQVAEVectorQuantizer(transformers.ChameleonVQVAEConfig(num_embeddings=32, embed_dim=8))
    with pytest.raises(ValueError, match="ChameleonVQVAEVectorQuantizer.*nearest-code search"):
        lora.inject(holder, ["embedding"], r=2)
    from transformers.models.phi4_multimodal.configuration_phi4_multimodal import Phi4MultimodalVisionConfig
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalVisionEmbeddings
    holder = torch.nn.Module()
    holder.embeddings = Phi4MultimodalVisionEmbeddings(Phi4MultimodalVisionConfig(hidden_size=16, image_size=28,
                                                                                  patch_size=14, num_channels=3))
    assert lora.inject(holder, ["position_embedding"], r=2) == ["embeddings.position_embedding"]
