"""Mixed batches under generate()'s beams (`batch_adapters(..., expand=k)`): generate() with num_beams=k (or
num_return_sequences=k when sampling) repeats each row k times in a run, and an encoder-decoder model's encoder
still sees the rows once. Against the real peft (its adapter_names with num_beams) and transformers: a Llama
(decoder only, with a head saved whole by one adapter) and a BART (encoder-decoder: the encoder's layers see n rows,
the decoder's n * k), and each row generated alone; a single layer against a float64 oracle written here; the
refusals."""
import pytest
import torch
import transformers
from transformers import BartConfig, BartForConditionalGeneration

import lora_ext as lora
from lora_ext import batched
from helpers import lora_layers_of, peft_with_adapters, rel_err
from tiny_models import VOCAB, llama

transformers.logging.set_verbosity_error()

NAMES = ["b", None, "a"]
K = 3  # num_beams


def bart(seed=0):
    """A tiny BART (init_std 0.3: with the default, every prompt generates the same token)."""
    torch.manual_seed(seed)
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                     forced_eos_token_id=None, init_std=0.3)
    return BartForConditionalGeneration(cfg).eval()


MODELS = {
    # name: (build, {adapter: LoraConfig kwargs})
    "llama": (llama, dict(
        # a head saved whole: its rows are split between the copies and the original (SavedBatch); every adapter
        # has a copy, as peft's adapter_names needs (it raises KeyError for an adapter without one)
        a=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
               modules_to_save=["lm_head"]),
        b=dict(r=8, lora_alpha=4, target_modules=["q_proj", "o_proj"], modules_to_save=["lm_head"]),
    )),
    "bart": (bart, dict(
        a=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"]),
        # k_proj/v_proj of the decoder's cross-attention read the encoder's output, repeated per beam
        b=dict(r=8, lora_alpha=4, target_modules=["k_proj", "v_proj", "out_proj", "fc2"]),
    )),
}
_BUILT = {}


def _setup(name, tmp_path_factory):
    """(build, the peft model holding a and b, {adapter: saved path})"""
    if name in _BUILT:
        return _BUILT[name]
    build, configs = MODELS[name]
    peft_model = peft_with_adapters(build(), configs)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.eval()
    root = tmp_path_factory.mktemp(name)
    peft_model.save_pretrained(str(root))
    _BUILT[name] = build, peft_model, {a: str(root / a) for a in configs}
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(MODELS))
def setup(request, tmp_path_factory):
    return _setup(request.param, tmp_path_factory)


def _ours(build, paths, names=("a", "b")):
    model = build()
    for name in names:
        lora.load_peft_adapter(model, paths[name], name, activate=False)
    return model.eval()


def _prompts(n=len(NAMES), seq=6):
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, VOCAB, (n, seq), generator=g)


GEN = dict(max_new_tokens=5, min_new_tokens=5, num_beams=K, num_return_sequences=2, do_sample=False, pad_token_id=1,
           no_repeat_ngram_size=1, output_scores=True, return_dict_in_generate=True)


def _generate(model, x, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=x, **{**GEN, **kwargs})


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "unmerged"])
def test_beam_search_matches_peft_and_each_row_alone(setup, merged):
    build, peft_model, paths = setup
    model = _ours(build, paths)
    if not merged:
        lora.unmerge_adapter(model)
    assert any(m.merged == merged for m in lora_layers_of(model))
    x = _prompts()
    with lora.batch_adapters(model, NAMES, expand=K):
        ours = _generate(model, x)
    ref = _generate(peft_model, x, adapter_names=[n or "__base__" for n in NAMES])
    assert torch.equal(ours.sequences, ref.sequences), f"lora_ext\n{ours.sequences}\npeft\n{ref.sequences}"
    assert rel_err(ours.sequences_scores, ref.sequences_scores) < 1e-5
    base = _generate(build(), x)
    for i, name in enumerate(NAMES):
        rows = slice(2 * i, 2 * i + 2)  # num_return_sequences=2 per prompt
        alone = build() if name is None else _ours(build, paths, [name])
        if name is not None:
            lora.set_adapter(alone, name)
        one = _generate(alone, x[i:i + 1])
        assert torch.equal(ours.sequences[rows], one.sequences), (i, name, ours.sequences[rows], one.sequences)
        assert rel_err(ours.sequences_scores[rows], one.sequences_scores) < 1e-5, (i, name)
        if name is not None:  # the adapter matters: a batch serving the base would fail here
            assert not torch.allclose(one.sequences_scores, base.sequences_scores[rows], rtol=1e-3), (i, name)


def test_sampling_with_several_sequences_per_prompt_serves_each_copy_its_rows_adapter(setup):
    """num_return_sequences=2 with do_sample: the rows repeated 2 times (peft's adapter_names expands for
    num_beams only); the forward of the repeated rows equals the rows' own, row by row."""
    build, _, paths = setup
    model = _ours(build, paths)
    x = _prompts()
    kwargs = {} if build is llama else dict(decoder_input_ids=torch.full((len(NAMES), 4), 2))
    with torch.no_grad(), lora.batch_adapters(model, NAMES):
        plain = model(x, **kwargs).logits
    twice = {k: v.repeat_interleave(2, 0) for k, v in kwargs.items()}
    with torch.no_grad(), lora.batch_adapters(model, NAMES, expand=2):
        doubled = model(x.repeat_interleave(2, 0), **twice).logits
        torch.manual_seed(0)
        sampled = model.generate(input_ids=x, max_new_tokens=3, do_sample=True, num_return_sequences=2,
                                 pad_token_id=1)
    assert sampled.shape[0] == 2 * len(NAMES)
    for i in range(len(NAMES)):
        for j in (2 * i, 2 * i + 1):
            assert rel_err(doubled[j], plain[i]) < 1e-6, (i, j)
    assert rel_err(plain[0], plain[1]) > 0.01  # the rows' adapters differ


def _layer_and_oracle():
    """A Linear(16, 12) holding adapters a (rank 2) and b (rank 4), merged with a, and the float64 oracle of
    each adapter's output."""
    g = torch.Generator().manual_seed(7)
    layer = lora.Linear(16, 12, r=2, lora_alpha=4)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(12, 16, generator=g))
    adapters = {"a": (torch.randn(2, 16, generator=g), torch.randn(12, 2, generator=g), 0.5),
                "b": (torch.randn(4, 16, generator=g), torch.randn(12, 4, generator=g), 1.5)}
    for name, (A, B, s) in adapters.items():
        layer.add_adapter(name, A, B, s)
    layer.set_adapter("a")
    W = layer.weight.detach().double().clone()  # the base, before eval() merges a
    bias = layer.bias.detach().double().clone()
    layer.eval()
    assert layer.merged

    def oracle(x, name):
        y = x.double() @ W.T + bias
        if name is not None:
            A, B, s = adapters[name]
            y += s * (x.double() @ A.double().T @ B.double().T)
        return y
    return layer, oracle


def test_a_single_layer_serves_both_sizes_in_one_block():
    layer, oracle = _layer_and_oracle()
    names = ["b", None, "a", "b"]
    x = torch.randn(4, 5, 16)
    xx = torch.randn(4 * K, 5, 16)  # each row repeated K times in a run: rows 0..K-1 are row 0's
    with torch.no_grad(), lora.batch_adapters(layer, names, expand=K):
        y = layer(x)
        yy = layer(xx)
        flat = layer(xx[:, 0])  # (n * K, d): the repeated rows, one token each
    for i, name in enumerate(names):
        assert rel_err(y[i], oracle(x[i], name)) < 1e-6, (i, name)
        for j in range(K * i, K * i + K):
            assert rel_err(yy[j], oracle(xx[j], name)) < 1e-6, (i, j, name)
            assert rel_err(flat[j], oracle(xx[j, 0], name)) < 1e-6, (i, j, name)


def test_rows_given_as_an_index_expand_too():
    layer, oracle = _layer_and_oracle()
    xx = torch.randn(3 * 2, 16)
    with torch.no_grad(), lora.batch_adapters(layer, ["a", "b"], rows=torch.tensor([1, -1, 0]), expand=2):
        yy = layer(xx)
    for j, name in enumerate(["b", "b", None, None, "a", "a"]):
        assert rel_err(yy[j], oracle(xx[j], name)) < 1e-6, (j, name)


@pytest.mark.parametrize("expand", [0, -2, True, 2.0, "2"])
def test_a_bad_expand_is_refused_before_anything_opens(expand):
    layer, _ = _layer_and_oracle()
    with pytest.raises(ValueError, match=r"expand \(generate\(\)'s num_beams\): expected a positive int"):
        with lora.batch_adapters(layer, ["a", "b"], expand=expand):
            pass
    assert not batched.ANY_OPEN
    with torch.no_grad(), lora.batch_adapters(layer, ["a"]):  # nothing was left pinned or open
        layer(torch.randn(1, 16))


def test_inputs_of_another_multiple_of_the_rows_are_refused_naming_the_sizes():
    layer, _ = _layer_and_oracle()
    with torch.no_grad(), lora.batch_adapters(layer, ["a", "b"], expand=2):
        with pytest.raises(ValueError, match=r"2 rows were given \(expand=2: 4 with each row repeated\).*\(6, 16\)"):
            layer(torch.randn(6, 16))
        with pytest.raises(ValueError, match=r"\(3, 5, 16\)"):  # tokens flattened are not rows with beams
            layer(torch.randn(3, 5, 16))
    # without expand, an input of a multiple of the rows says how generate()'s beams are served
    with torch.no_grad(), lora.batch_adapters(layer, ["a", "b"]):
        with pytest.raises(ValueError, match=r"num_beams=3 .*batch_adapters\(\.\.\., expand=3\)"):
            layer(torch.randn(6, 16))


def test_a_model_input_of_the_wrong_size_is_refused_with_the_hint(setup):
    build, _, paths = setup
    model = _ours(build, paths)
    x = _prompts()
    with torch.no_grad(), lora.batch_adapters(model, NAMES):
        with pytest.raises(ValueError, match=rf"3 rows were given.*\(9, .*num_beams={K} .*expand={K}\)"):
            model.generate(input_ids=x, max_new_tokens=2, num_beams=K, do_sample=False, pad_token_id=1)
    with torch.no_grad(), lora.batch_adapters(model, NAMES, expand=2):
        with pytest.raises(ValueError, match=r"expand=2: 6 with each row repeated"):
            model.generate(input_ids=x, max_new_tokens=2, num_beams=K, do_sample=False, pad_token_id=1)


# ---------------------------------------------------------------------------------------------------
# what expand cannot serve: refused before anything is written (found by a hostile pass)


def test_layers_inside_mixture_of_experts_experts_are_refused():
    # a router gives an expert a subset of the tokens: when the count equals the rows (or their repeats) they were
    # served as rows, silently wrong (SwitchTransformers: 0.11-0.52 relative off each row served alone)
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
    torch.manual_seed(0)
    cfg = SwitchTransformersConfig(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, expert_capacity=1000, num_layers=2,
                                   num_sparse_encoder_layers=1, num_decoder_layers=2, num_sparse_decoder_layers=1,
                                   num_heads=4, num_experts=2, relative_attention_num_buckets=8, pad_token_id=0,
                                   eos_token_id=1, decoder_start_token_id=0)
    model = SwitchTransformersForConditionalGeneration(cfg).eval()
    lora.inject(model, r".*decoder.*experts.*\.wi$", r=2)
    for expand in (1, 2):
        with pytest.raises(ValueError, match=r"layer 'decoder\.block\.\d\.layer\.\d\.mlp\.experts\.expert_0\.wi' is "
                                             r"inside a mixture of experts' experts"):
            with lora.batch_adapters(model, ["default", None], expand=expand):
                pass
    assert not batched.ANY_OPEN


def test_a_model_that_tiles_its_batch_is_refused_with_expand():
    # MusicGen's guidance stacks [rows; rows]: expand (repeats in a run) served the copies with the wrong adapters
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM
    torch.manual_seed(0)
    cfg = MusicgenDecoderConfig(vocab_size=VOCAB, num_codebooks=1, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=4, ffn_dim=64, max_position_embeddings=64, pad_token_id=VOCAB,
                                bos_token_id=VOCAB)
    model = MusicgenForCausalLM(cfg).eval()
    lora.inject(model, ["q_proj"], r=2)
    with pytest.raises(ValueError, match=r"expand=2: 'the model' is a MusicgenForCausalLM.*\[rows; rows\]"):
        with lora.batch_adapters(model, ["default", None], expand=2):
            pass
    with torch.no_grad(), lora.batch_adapters(model, ["default", None]):  # without expand: served as before
        model(torch.randint(0, VOCAB, (2, 3)))


def test_messages_under_expand_name_the_sizes_and_the_right_expand():
    layer, _ = _layer_and_oracle()
    with torch.no_grad(), lora.batch_adapters(layer, ["a", "b"], expand=2):
        with pytest.raises(ValueError, match=r"must be the 2 rows or their 4 repeats \(expand=2\); generate\(\) with "
                                             r"num_beams=3 .*expand=3\) serves \(a model that repeats the batch "
                                             r"otherwise, such as \[rows; rows\], cannot be served so\)$"):
            layer(torch.randn(6, 16))
        with pytest.raises(ValueError, match=r"\(1, 16\).*cannot carry per-row adapters\)$"):  # a broadcast input
            layer(torch.randn(1, 16))
    with pytest.raises(ValueError, match=r"layer \(the module given\) is already in an open batch"):
        with torch.no_grad(), lora.batch_adapters(torch.nn.Sequential(layer), ["a"]):
            with lora.batch_adapters(layer, ["b"]):
                pass
