"""peft's trainable tokens (trainable_token_indices: an adapter's own rows for a few tokens of the embedding) against
the real peft on Llama and Gemma 3 (scaled embedding), tied and untied heads: loads, switches, mixed batches,
disable_adapter, saves, unload, training and `lora-ext merge` give what peft gives; the model's own embedding is
never written while serving; whatever lora_ext cannot honour is refused before anything changes."""
import copy
import json
import os
import pickle

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import lora_ext as lora
from lora_ext.cli import main
from lora_ext.serving.tokens import TokenRows, TrainableTokens
from helpers import save_random_peft
from tiny_models import VOCAB, gemma3, llama, snapshot, unchanged

KEY = "base_model.model."
DELTA = ".token_adapter.trainable_tokens_delta"


def _build(kind, tie=False, seed=0):
    if kind == "gemma3":
        return gemma3(seed=seed, tie=tie)
    m = llama(seed=seed)
    if tie:
        m.config.tie_word_embeddings = True
        m.lm_head.weight = m.model.embed_tokens.weight
    return m


def _adapter(tmp_path, name, kind="llama", tie=False, seed=1, **config):
    """A peft adapter with random factors and rows, saved under tmp_path/name; returns its path."""
    options = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    pm = get_peft_model(_build(kind, tie), LoraConfig(**{**options, **config}))
    return save_random_peft(pm, tmp_path / name, seed, 0.5, ("trainable_tokens_delta", "lora_"))


def _peft(paths, kind="llama", tie=False):
    names = list(paths)
    pm = PeftModel.from_pretrained(_build(kind, tie), paths[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(paths[n], adapter_name=n)
    return pm.eval()


def _ours(paths, kind="llama", tie=False):
    model = _build(kind, tie)
    for i, (n, p) in enumerate(paths.items()):
        lora.load_peft_adapter(model, p, n, activate=i == 0)
    return model.eval()


def _logits(model, x, **kwargs):
    with torch.no_grad():
        return model(x, **kwargs).logits


def _ids():
    # the listed tokens (1, 5, 7, 9) among others, twice over
    return torch.tensor([[1, 2, 5, 7, 9, 3, 5, 1], [8, 7, 7, 0, 4, 9, 1, 6]])


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_serves_the_rows_as_peft(tmp_path, kind, tie):
    path = _adapter(tmp_path, "a", kind, tie, trainable_token_indices=[1, 5, 7])
    x = _ids()
    ref = _logits(_peft({"a": path}, kind, tie), x)
    model = _build(kind, tie)
    covered = lora.load_peft_adapter(model, path, "a")
    emb = model.model.embed_tokens
    assert isinstance(emb, TrainableTokens) and "model.embed_tokens" in covered
    assert isinstance(model.lm_head, TrainableTokens) == tie  # a tied head serves the rows too
    for merged in (True, False):
        (model.eval() if merged else model.train())
        model.model.layers[0].self_attn.q_proj.lora_dropout.p = 0.0
        out = _logits(model, x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    plain = _logits(_build(kind, tie).eval(), x)
    assert (out - plain).abs().max() > 1e-2
    # the model's own embedding is not written
    assert torch.equal(emb.original_module.weight, _build(kind, tie).model.embed_tokens.weight)


def test_dict_form_with_a_head_of_its_own(tmp_path):
    # untied: the embedding's and the head's rows, each listed and saved on its own
    spec = {"embed_tokens": [1, 5], "lm_head": [7, 9, 5]}
    path = _adapter(tmp_path, "a", trainable_token_indices=spec)
    keys = set(load_file(os.path.join(path, "adapter_model.safetensors")))
    assert {KEY + "model.embed_tokens" + DELTA, KEY + "lm_head" + DELTA} <= keys
    x = _ids()
    ref = _logits(_peft({"a": path}), x)
    model = _ours({"a": path})
    assert isinstance(model.lm_head, TrainableTokens) and not model.lm_head.modules_to_save["a"].tied
    torch.testing.assert_close(_logits(model, x), ref, rtol=1e-5, atol=1e-5)
    lora.save_peft_adapter(model, str(tmp_path / "back"), "a")
    with open(tmp_path / "back" / "adapter_config.json") as f:
        assert json.load(f)["trainable_token_indices"] == {"model.embed_tokens": [1, 5], "lm_head": [7, 9, 5]}
    torch.testing.assert_close(_logits(_peft({"a": str(tmp_path / "back")}), x), ref, rtol=1e-5, atol=1e-5)


def test_a_tied_head_listed_with_the_same_tokens_shares_the_rows(tmp_path):
    spec = {"embed_tokens": [1, 5, 7], "lm_head": [1, 5, 7]}
    path = _adapter(tmp_path, "a", tie=True, trainable_token_indices=spec)
    keys = set(load_file(os.path.join(path, "adapter_model.safetensors")))
    assert KEY + "lm_head" + DELTA not in keys  # peft saves the tied rows once
    x = _ids()
    model = _ours({"a": path}, tie=True)
    rows = model.lm_head.modules_to_save["a"]
    assert rows.tied and rows.trainable_tokens_delta is model.model.embed_tokens.modules_to_save["a"].trainable_tokens_delta
    torch.testing.assert_close(_logits(model, x), _logits(_peft({"a": path}, tie=True), x), rtol=1e-5, atol=1e-4)


def test_round_trip_and_switching_as_peft(tmp_path):
    # (b first: peft cannot load an adapter without rows once another's rows are there, a KeyError)
    paths = {"b": _adapter(tmp_path, "b", seed=2),  # no tokens: the embedding's own rows
             "a": _adapter(tmp_path, "a", seed=1, trainable_token_indices=[1, 5, 7]),
             "c": _adapter(tmp_path, "c", seed=3, trainable_token_indices=[5, 9])}
    x = _ids()
    pm, model = _peft(paths), _ours(paths)
    for name in ("b", "c", "a", "c", "b"):
        pm.set_adapter(name)
        lora.set_adapter(model, name)
        torch.testing.assert_close(_logits(model, x), _logits(pm, x), rtol=1e-5, atol=1e-5)
    # saved by lora_ext: peft serves it alike; the list form names the input embedding
    lora.save_peft_adapter(model, str(tmp_path / "c2"), "c")
    with open(tmp_path / "c2" / "adapter_config.json") as f:
        assert json.load(f)["trainable_token_indices"] == [5, 9]
    pm.set_adapter("c")
    torch.testing.assert_close(_logits(_peft({"c": str(tmp_path / "c2")}), x), _logits(pm, x), rtol=1e-5, atol=1e-5)
    lora.save_peft_adapter(model, str(tmp_path / "b2"), "b")
    with open(tmp_path / "b2" / "adapter_config.json") as f:
        assert json.load(f)["trainable_token_indices"] is None
    # an adapter loaded without rows after the rows were there (peft: a KeyError) serves the embedding's own rows
    lora.load_peft_adapter(model, paths["b"], "b2", activate=True)
    pm.set_adapter("b")
    torch.testing.assert_close(_logits(model, x), _logits(pm, x), rtol=1e-5, atol=1e-5)
    # deleting an adapter takes its rows with it
    lora.delete_adapter(model, "c")
    assert model.model.embed_tokens.adapter_names == ["a"]


def test_mixed_batch_serves_each_rows_tokens_as_peft(tmp_path):
    paths = {"b": _adapter(tmp_path, "b", seed=2),
             "a": _adapter(tmp_path, "a", seed=1, trainable_token_indices=[1, 5, 7]),
             "c": _adapter(tmp_path, "c", seed=3, trainable_token_indices=[5, 9])}
    x = torch.cat([_ids(), _ids().flip(1)])
    pm, model = _peft(paths), _ours(paths)
    # (peft's mixed batches raise KeyError for a row of an adapter without rows: a and c only there)
    rows = ["c", "a", "a", "c"]
    ref = _logits(pm, x, adapter_names=rows)
    with lora.batch_adapters(model, rows):
        torch.testing.assert_close(_logits(model, x), ref, rtol=1e-5, atol=1e-5)
    rows = ["c", None, "a", "b"]
    with lora.batch_adapters(model, rows):
        out = _logits(model, x)
    for i, name in enumerate(rows):  # each row as its adapter (or the base model) alone
        lora.set_adapter(model, name or "b")
        alone = _logits(model if name else _build("llama").eval(), x[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_disable_adapter_serves_the_embeddings_own_rows(tmp_path):
    path = _adapter(tmp_path, "a", tie=True, trainable_token_indices=[1, 5, 7])
    model = _ours({"a": path}, tie=True)
    x = _ids()
    served = _logits(model, x)
    plain = _logits(_build("llama", True).eval(), x)
    assert (served - plain).abs().max() > 1e-2
    with lora.disable_adapter(model):  # (float32 layers unmerged: the base to rounding)
        torch.testing.assert_close(_logits(model, x), plain, rtol=1e-6, atol=1e-6)
        assert model.model.embed_tokens(x).equal(model.model.embed_tokens.original_module(x))
    torch.testing.assert_close(_logits(model, x), served, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("merge", [True, False])
def test_unload_writes_the_rows_as_merge_and_unload(tmp_path, merge):
    path = _adapter(tmp_path, "a", tie=True, trainable_token_indices=[1, 5, 7])
    x = _ids()
    pm = _peft({"a": path}, tie=True)
    ref = _logits(pm.merge_and_unload() if merge else pm.unload(), x)
    model = _ours({"a": path}, tie=True)
    lora.unload(model, merge=merge)
    assert type(model.model.embed_tokens) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(_logits(model, x), ref, rtol=1e-5, atol=1e-4)
    base = _build("llama", True).model.embed_tokens.weight
    changed = (model.model.embed_tokens.weight != base).any(1).nonzero().flatten().tolist()
    assert changed == ([1, 5, 7] if merge else [])


def test_rows_of_a_head_tied_to_an_embedding_given_none_are_served_but_not_merged(tmp_path, capsys):
    # only the head is given rows, over the weight it shares with the input embedding (given none): served as peft
    # serves it, but written into the weight the rows would reach the embedding's lookup too (peft's
    # merge_and_unload writes them, 9.7 off its own served logits): unload(merge=True) and `lora-ext merge` refuse
    path = _adapter(tmp_path, "a", tie=True, trainable_token_indices={"lm_head": [5, 9]})
    x = _ids()
    pm = _peft({"a": path}, tie=True)
    served = _logits(pm, x)
    assert (_logits(pm.merge_and_unload(), x) - served).abs().max() > 1  # (what a merge would serve)
    model = _ours({"a": path}, tie=True)
    assert isinstance(model.lm_head, TrainableTokens) and not isinstance(model.model.embed_tokens, TrainableTokens)
    torch.testing.assert_close(_logits(model, x), served, rtol=1e-5, atol=1e-4)
    before = snapshot(model)
    with pytest.raises(ValueError, match="unload: module 'lm_head' has adapter 'a''s rows of tokens, but its weight "
                                         "is tied to 'model.embed_tokens', which is served none of them"):
        lora.unload(model, merge=True)
    assert unchanged(model, before) and isinstance(model.lm_head, TrainableTokens)
    torch.testing.assert_close(_logits(model, x), served, rtol=1e-5, atol=1e-4)
    lora.unload(model, merge=False)  # (the rows dropped, the weight as it was)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, _build("llama", True).lm_head.weight)
    base, out = str(tmp_path / "base"), str(tmp_path / "merged")
    _build("llama", True).save_pretrained(base)
    assert main(["merge", "--base", base, "--adapter", path, "--out", out, "--quiet"]) != 0
    assert "gives module 'lm_head' rows of tokens, but its weight is tied to 'model.embed_tokens'" in \
        capsys.readouterr().err
    assert not os.path.exists(out)


def test_rows_of_an_embedding_and_its_tied_head_merge(tmp_path):
    # the embedding's rows reach the head tied to it, served and merged alike (the same rows listed for both too)
    spec = {"embed_tokens": [1, 5, 7], "lm_head": [1, 5, 7]}
    path = _adapter(tmp_path, "a", tie=True, trainable_token_indices=spec)
    x = _ids()
    ref = _logits(_peft({"a": path}, tie=True).merge_and_unload(), x)
    model = _ours({"a": path}, tie=True)
    lora.unload(model, merge=True)
    torch.testing.assert_close(_logits(model, x), ref, rtol=1e-5, atol=1e-4)


def test_training_moves_the_rows_gradients_as_peft(tmp_path):
    path = _adapter(tmp_path, "a", trainable_token_indices=[1, 5, 7])
    x = _ids()
    pm = PeftModel.from_pretrained(_build("llama"), path, is_trainable=True).train()
    model = _build("llama")
    lora.load_peft_adapter(model, path, "a")
    lora.mark_only_lora_as_trainable(model)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.modules_to_save.a.trainable_tokens_delta" in trainable
    assert "model.embed_tokens.original_module.weight" not in trainable
    for m in (pm, model):
        m(x).logits.square().sum().backward()
    ours = model.model.embed_tokens.modules_to_save["a"].trainable_tokens_delta.grad
    theirs = dict(pm.named_parameters())[KEY + "model.embed_tokens.token_adapter.trainable_tokens_delta.default"].grad
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert model.model.embed_tokens.original_module.weight.grad is None


def test_copies_compile_and_move(tmp_path):
    path = _adapter(tmp_path, "a", kind="gemma3", tie=True, trainable_token_indices=[1, 5, 7])
    model = _ours({"a": path}, kind="gemma3", tie=True)
    x = _ids()
    served = _logits(model, x)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(_logits(twin, x), served)
        assert twin.lm_head.modules_to_save["a"].__dict__["_module"] is twin.lm_head.original_module
    compiled = torch.compile(model, backend="eager")
    assert torch.equal(_logits(compiled, x), served)
    model.double()  # the rows follow the dtype, and so does Gemma's scale buffer
    rows = model.model.embed_tokens.modules_to_save["a"]
    assert rows.trainable_tokens_delta.dtype == torch.float64
    torch.testing.assert_close(_logits(model, x).float(), served, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# refusals: nothing changed


def _damaged(path, key_change=None, config_change=None):
    if key_change is not None:
        file = os.path.join(path, "adapter_model.safetensors")
        tensors = load_file(file)
        key_change(tensors)
        save_file(tensors, file)
    if config_change is not None:
        file = os.path.join(path, "adapter_config.json")
        with open(file) as f:
            cfg = json.load(f)
        config_change(cfg)
        with open(file, "w") as f:
            json.dump(cfg, f)
    return path


ROWS = KEY + "model.embed_tokens" + DELTA


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


@pytest.mark.parametrize("keys,config,match", [
    (None, _set("trainable_token_indices", [1, 5, VOCAB]), f"lists token {VOCAB}, but it has {VOCAB} rows"),
    (None, _set("trainable_token_indices", [1, 5, 5]), "lists token 5 more than once"),
    (None, _set("trainable_token_indices", [1, -5, 7]), "non-empty list of non-negative token indices"),
    (None, _set("trainable_token_indices", {"nope": [1, 5, 7]}), "names module 'nope', which the model does not have"),
    (None, _set("trainable_token_indices", "embed_tokens"), "must be a list of token indices or a non-empty dict"),
    (lambda t: t.pop(ROWS), None, "holds no .*trainable_tokens_delta"),
    (lambda t: t.__setitem__(ROWS, torch.zeros(3, 7)), None, r"shape \(3, 7\); module 'model.embed_tokens' needs "
                                                            r"\(3, 64\)"),
    (lambda t: t.__setitem__(ROWS, torch.full((3, 64), float("nan"))), None, "non-finite values"),
    (None, _set("target_modules", ["q_proj", "embed_tokens"]), "both a LoRA target .* and given rows of tokens"),
    (None, _set("modules_to_save", ["embed_tokens"]), "saved whole .* and given rows of tokens"),
], ids=["out-of-range", "duplicate", "negative", "no-module", "string", "missing", "shape", "nan", "lora-target",
        "saved-whole"])
def test_a_bad_adapter_is_refused_before_anything_changes(tmp_path, keys, config, match):
    path = _damaged(_adapter(tmp_path, "a", trainable_token_indices=[1, 5, 7]), keys, config)
    model = _build("llama")
    lora.load_peft_adapter(model, _adapter(tmp_path, "b", seed=2), "b")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lora.load_peft_adapter(model, path, "a")
    assert unchanged(model, snap) and lora.adapter_names(model) == ["b"]
    assert not any(isinstance(m, TrainableTokens) for m in model.modules())


def test_rows_on_a_lora_target_of_another_adapter_are_refused(tmp_path):
    model = _build("llama")
    lora.load_peft_adapter(model, _adapter(tmp_path, "b", seed=2, target_modules=["q_proj", "embed_tokens"]), "b")
    with pytest.raises(ValueError, match="is a lora_ext layer"):
        lora.load_peft_adapter(model, _adapter(tmp_path, "a", trainable_token_indices=[1, 5]), "a")


def test_weighting_an_adapter_with_rows_is_refused(tmp_path):
    paths = {"a": _adapter(tmp_path, "a", seed=1, trainable_token_indices=[1, 5, 7]), "b": _adapter(tmp_path, "b")}
    model = _ours(paths)
    with pytest.raises(ValueError, match="replaces rows of tokens of module 'model.embed_tokens'"):
        lora.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "w", combination_type="cat")


def test_rows_are_torch_tensors_of_the_weights_dtype(tmp_path):
    path = _adapter(tmp_path, "a", trainable_token_indices=[1, 5, 7])
    model = _build("llama").to(torch.bfloat16)
    lora.load_peft_adapter(model, path, "a")
    rows = model.model.embed_tokens.modules_to_save["a"]
    assert isinstance(rows, TokenRows) and rows.trainable_tokens_delta.dtype == torch.bfloat16
    want = load_file(os.path.join(path, "adapter_model.safetensors"))[ROWS].to(torch.bfloat16)
    got = model.model.embed_tokens(torch.tensor([[7, 5, 1, 2]]))[0, :3]
    assert torch.equal(got, want.flip(0))


# ---------------------------------------------------------------------------------------------------
# lora-ext merge


@pytest.mark.parametrize("kind,tie,spec", [
    ("llama", False, [1, 5, 7]),
    ("llama", True, [1, 5, 7]),
    ("gemma3", True, [2, 9]),
    ("llama", False, {"embed_tokens": [1, 5], "lm_head": [7, 9, 5]}),
], ids=["llama", "llama-tied", "gemma3-tied", "dict"])
def test_lora_ext_merge_writes_the_rows_as_merge_and_unload(tmp_path, capsys, kind, tie, spec):
    from transformers import AutoModelForCausalLM
    base = str(tmp_path / "base")
    _build(kind, tie).save_pretrained(base)
    path = _adapter(tmp_path, "a", kind, tie, trainable_token_indices=spec)
    x = _ids()
    ref = _logits(_peft({"a": path}, kind, tie).merge_and_unload(), x)
    out = str(tmp_path / "merged")
    assert main(["merge", "--base", base, "--adapter", path, "--out", out, "--quiet"]) == 0
    assert "rows of tokens" in capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(merged, x), ref, rtol=1e-5, atol=1e-4)
    written = load_file(os.path.join(out, "model.safetensors"))["model.embed_tokens.weight"]
    before = load_file(os.path.join(base, "model.safetensors"))["model.embed_tokens.weight"]
    rows = spec if isinstance(spec, list) else spec["embed_tokens"]
    assert (written != before).any(1).nonzero().flatten().tolist() == sorted(rows)


@pytest.mark.parametrize("change,match", [
    (lambda t: t.pop(ROWS), "holds no .*trainable_tokens_delta"),
    (lambda t: t.__setitem__(ROWS, torch.zeros(3, 5)), r"shape \(3, 5\); module 'model.embed_tokens' needs"),
    (lambda t: t.__setitem__(KEY + "lm_head" + DELTA, torch.zeros(3, 64)), "unexpected key .*lm_head"),
], ids=["missing", "shape", "unlisted"])
def test_lora_ext_merge_refuses_bad_rows(tmp_path, capsys, change, match):
    base = str(tmp_path / "base")
    _build("llama").save_pretrained(base)
    path = _damaged(_adapter(tmp_path, "a", trainable_token_indices=[1, 5, 7]), change)
    out = str(tmp_path / "merged")
    assert main(["merge", "--base", base, "--adapter", path, "--out", out, "--quiet"]) != 0
    import re
    assert re.search(match, capsys.readouterr().err) and not os.path.exists(out)


# ---------------------------------------------------------------------------------------------------
# found by the hostile pass


def _bart():
    from transformers import BartConfig, BartForConditionalGeneration
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                     scale_embedding=True, pad_token_id=0, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return BartForConditionalGeneration(cfg).eval()


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def _seq2seq_adapter(tmp_path, build, spec, targets):
    pm = get_peft_model(build(), LoraConfig(r=2, target_modules=targets, trainable_token_indices=spec))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "trainable_tokens_delta" in n or "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    path = str(tmp_path / "s2s")
    pm.save_pretrained(path)
    return path


def test_bart_scales_the_rows_in_its_encoder_and_decoder_embeddings(tmp_path):
    # model.shared and the encoder's and decoder's embed_tokens are three scaled embeddings of one weight: the tied
    # ones served the rows unscaled (0.29 off peft)
    path = _seq2seq_adapter(tmp_path, _bart, [1, 5, 7], ["q_proj", "v_proj"])
    ids, dec = _ids(), _ids().flip(1)
    ref = PeftModel.from_pretrained(_bart(), path).eval()
    want = _logits(ref, ids, decoder_input_ids=dec)
    model = _bart()
    lora.load_peft_adapter(model, path, "a")
    assert isinstance(model.model.encoder.embed_tokens, TrainableTokens)
    torch.testing.assert_close(_logits(model, ids, decoder_input_ids=dec), want, rtol=1e-5, atol=1e-4)
    base = str(tmp_path / "base")
    _bart().save_pretrained(base)
    assert main(["merge", "--base", base, "--adapter", path, "--out", str(tmp_path / "m"), "--quiet"]) == 0
    from transformers import BartForConditionalGeneration
    merged = BartForConditionalGeneration.from_pretrained(str(tmp_path / "m")).eval()
    torch.testing.assert_close(_logits(merged, ids, decoder_input_ids=dec),
                               _logits(ref.merge_and_unload(), ids, decoder_input_ids=dec), rtol=1e-5, atol=1e-4)


def test_two_modules_of_one_weight_with_other_rows_serve_their_own_and_do_not_merge(tmp_path):
    # T5's {"embed_tokens": ...} chooses the encoder's and the decoder's, which share `shared.weight`: peft saves two
    # sets of rows for one weight and serves each lookup its own (its merge keeps the last); shared and lm_head took
    # the encoder's (3.07 off), then the load was refused; each serves its own now (tests/test_tokens_tied_t5.py
    # compares with peft), and the merges are refused
    path = _seq2seq_adapter(tmp_path, _t5, {"embed_tokens": [1, 5, 7]}, ["q", "v"])
    model = _t5()
    lora.load_peft_adapter(model, path, "a")
    assert isinstance(model.encoder.embed_tokens, TrainableTokens) and not isinstance(model.shared, TrainableTokens)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="tied"):
        lora.unload(model, merge=True)
    assert unchanged(model, snap)
    base = str(tmp_path / "base")
    _t5().save_pretrained(base)
    assert main(["merge", "--base", base, "--adapter", path, "--out", str(tmp_path / "m"), "--quiet"]) != 0


def test_rows_of_a_weight_tied_three_ways_merge_through_the_cli(tmp_path):
    # T5 tied: shared, both embed_tokens and lm_head are one weight; rows for shared and lm_head reach the decoder's
    # embed_tokens too (served as shared's tied rows): the CLI's tied-head refusal took it for a module given none
    from transformers import T5ForConditionalGeneration

    def t5_tied():
        m = _t5()
        m.config.tie_word_embeddings = True
        m.lm_head.weight = m.shared.weight
        return m
    path = _seq2seq_adapter(tmp_path, t5_tied, {"shared": [1, 5], "lm_head": [1, 5]}, ["q"])
    ids, dec = _ids(), _ids().flip(1)
    served = _logits(PeftModel.from_pretrained(t5_tied(), path).eval(), ids, decoder_input_ids=dec)
    base, out = str(tmp_path / "base"), str(tmp_path / "m")
    t5_tied().save_pretrained(base)
    assert main(["merge", "--base", base, "--adapter", path, "--out", out, "--quiet"]) == 0
    merged = T5ForConditionalGeneration.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(merged, ids, decoder_input_ids=dec), served, rtol=1e-5, atol=1e-4)
    model = t5_tied()
    lora.load_peft_adapter(model, path, "a")
    lora.unload(model, merge=True)
    torch.testing.assert_close(_logits(model, ids, decoder_input_ids=dec), served, rtol=1e-5, atol=1e-4)


def test_a_tied_head_saved_whole_by_another_adapter_is_refused(tmp_path):
    # (the head served the old rows: 18.3 off peft; peft raises here)
    model = _build("llama", tie=True)
    lora.load_peft_adapter(model, _adapter(tmp_path, "b", tie=True, modules_to_save=["lm_head"]), "b")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="'lm_head', which shares the weight .* saved whole by adapter"):
        lora.load_peft_adapter(model, _adapter(tmp_path, "a", tie=True, trainable_token_indices=[1, 5, 7]), "a")
    assert unchanged(model, snap)


def test_training_follows_switches_on_a_tied_model(tmp_path):
    # the head's wrapper saw the embedding's (shared) rows frozen first and froze the new ones
    paths = {"a": _adapter(tmp_path, "a", tie=True, trainable_token_indices=[1, 5]),
             "c": _adapter(tmp_path, "c", tie=True, seed=3, trainable_token_indices=[7])}
    model = _ours(paths, tie=True)
    lora.mark_only_lora_as_trainable(model)
    rows = {n: model.model.embed_tokens.modules_to_save[n].trainable_tokens_delta for n in paths}
    assert rows["a"].requires_grad and not rows["c"].requires_grad
    for name, other in (("c", "a"), ("a", "c")):
        lora.set_adapter(model, name)
        assert rows[name].requires_grad and not rows[other].requires_grad, name


def test_a_first_load_without_activate_serves_its_rows_as_its_layers(tmp_path):
    # the layers of the model's first adapter come up serving it; its rows stayed off (0.38 off peft)
    path = _adapter(tmp_path, "a", trainable_token_indices=[1, 5, 7])
    model = _build("llama")
    lora.load_peft_adapter(model, path, "a", activate=False)
    assert model.model.embed_tokens.active_adapter == "a"
    torch.testing.assert_close(_logits(model.eval(), _ids()), _logits(_peft({"a": path}), _ids()), rtol=1e-5,
                               atol=1e-5)


def test_load_state_dict_changes_the_rows_served(tmp_path):
    # the lookup sorted the indices once, into buffers a state dict does not hold: it kept serving the old ones
    model = _ours({"a": _adapter(tmp_path, "a", trainable_token_indices=[1, 5, 7])})
    other = _ours({"a": _adapter(tmp_path, "a2", seed=4, trainable_token_indices=[9, 3, 8])})
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(_logits(model, _ids()), _logits(other, _ids()), rtol=0, atol=0)


def test_the_padding_tokens_row_gets_no_gradient(tmp_path):
    # as F.embedding's padding_idx in peft's lookup (5.9e-4 here before)
    path = _adapter(tmp_path, "a", trainable_token_indices=[0, 5, 7])  # llama's padding_idx is 0
    model = _build("llama")
    lora.load_peft_adapter(model, path, "a")
    lora.mark_only_lora_as_trainable(model)
    model.train()
    model(torch.tensor([[0, 5, 7, 0, 2]])).logits.square().sum().backward()
    grad = model.model.embed_tokens.modules_to_save["a"].trainable_tokens_delta.grad
    assert grad[0].abs().max() == 0 and grad[1].abs().max() > 0 and grad[2].abs().max() > 0


@pytest.mark.parametrize("spec,name,match", [
    ({"embed_tokens": [9, 8, 4], "model.embed_tokens": [1, 5, 7]}, "a", "chooses module 'model.embed_tokens' twice"),
    ([1, 5, 7], "keys", "'keys' is an attribute of torch's ModuleDict"),
], ids=["named-twice", "moduledict-attribute"])
def test_more_refusals_before_anything_changes(tmp_path, spec, name, match):
    model = _build("llama")
    lora.load_peft_adapter(model, _adapter(tmp_path, "b", seed=2), "b")
    snap = snapshot(model)
    path = _adapter(tmp_path, "a", trainable_token_indices=[1, 5, 7])
    _damaged(path, config_change=_set("trainable_token_indices", spec))
    with pytest.raises(ValueError, match=match):
        lora.load_peft_adapter(model, path, name)
    assert unchanged(model, snap) and lora.adapter_names(model) == ["b"]


def test_lora_on_a_module_with_rows_is_refused_by_name(tmp_path):
    model = _build("llama")
    lora.load_peft_adapter(model, _adapter(tmp_path, "a", trainable_token_indices=[1, 5]), "a")
    with pytest.raises(ValueError, match="factors of module 'model.embed_tokens', which adapter.*'a'.* give rows"):
        lora.load_peft_adapter(model, _adapter(tmp_path, "b", target_modules=["q_proj", "embed_tokens"]), "b")


def test_merge_of_a_tied_head_listed_with_the_embeddings_tokens(tmp_path):
    # the head's weight is not in a tied checkpoint: its name came from the checkpoint's keys ("no weight")
    spec = {"embed_tokens": [1, 5, 7], "lm_head": [1, 5, 7]}
    path = _adapter(tmp_path, "a", tie=True, trainable_token_indices=spec)
    base = str(tmp_path / "base")
    _build("llama", tie=True).save_pretrained(base)
    assert main(["merge", "--base", base, "--adapter", path, "--out", str(tmp_path / "m"), "--quiet"]) == 0
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    torch.testing.assert_close(_logits(merged, _ids()), _logits(_peft({"a": path}, tie=True).merge_and_unload(),
                                                                 _ids()), rtol=1e-5, atol=1e-4)


def test_a_packed_token_batch_splits_the_lookup_by_token(tmp_path):
    # batch_adapters(rows=) over one packed sequence (1, T): refused for the embedding before ("saved whole")
    paths = {"a": _adapter(tmp_path, "a", trainable_token_indices=[1, 5, 7]), "b": _adapter(tmp_path, "b", seed=2)}
    model = _ours(paths)
    ids = _ids()[:1]
    per_token = torch.tensor([0, 0, 1, 1, 0, -1, 1, 0])
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(out))
    with lora.batch_adapters(model, ["a", "b"], rows=per_token):
        _logits(model, ids)  # (the model's call sets the batch's token layout)
    hook.remove()
    out, wrapper = seen[0], model.model.embed_tokens
    assert out.shape == (1, 8, 64)
    for t, which in enumerate(per_token.tolist()):
        want = wrapper.module_for("ab"[which] if which >= 0 else None)(ids[:, t:t + 1])
        assert torch.equal(out[:, t:t + 1], want), t
    assert not torch.equal(out[:, 2:3], wrapper.module_for("a")(ids[:, 2:3]))  # (token 5: b's row is the base's)


def test_an_empty_dict_is_no_tokens(tmp_path):
    path = _adapter(tmp_path, "a")
    _damaged(path, config_change=_set("trainable_token_indices", {}))  # (peft loads it as no tokens)
    model = _build("llama")
    lora.load_peft_adapter(model, path, "a")
    assert not any(isinstance(m, TrainableTokens) for m in model.modules())


# ---------------------------------------------------------------------------------------------------
# found by the cross-feature pass


def test_a_ctrl_c_during_a_load_lands_after_the_whole_adapter(tmp_path, python_sigint, monkeypatch):
    # the load's writes had no way back: a Ctrl-C between two layers left half an adapter (12.2 off peft once
    # switched to); now it is held back to the end of the load
    import signal
    from lora_ext.serving import tokens as tokens_module
    path = _adapter(tmp_path, "a", trainable_token_indices=[1, 5, 7])
    model = _build("llama")
    lora.load_peft_adapter(model, _adapter(tmp_path, "b", seed=2), "b")
    real = tokens_module.install

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(tokens_module, "install", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lora.load_peft_adapter(model, path, "a", activate=False)
    monkeypatch.setattr(tokens_module, "install", real)
    assert model.model.embed_tokens.adapter_names == ["a"]
    lora.set_adapter(model, "a")
    torch.testing.assert_close(_logits(model, _ids()), _logits(_peft({"a": path}), _ids()), rtol=1e-5, atol=1e-5)


def test_rows_train_after_a_switch_when_their_wrapper_never_saw_rows_train(tmp_path):
    # marked while b (no rows) was active: the wrapper served its original and did not know that adapters train,
    # so a's rows stayed frozen after set_adapter(a) (1.68 off peft after 3 steps)
    paths = {"b": _adapter(tmp_path, "b", seed=2), "a": _adapter(tmp_path, "a", trainable_token_indices=[1, 5])}
    model = _ours(paths)
    lora.mark_only_lora_as_trainable(model)
    lora.set_adapter(model, "a")
    rows = model.model.embed_tokens.modules_to_save["a"].trainable_tokens_delta
    assert rows.requires_grad
    lora.set_adapter(model, "b")
    assert not rows.requires_grad
    # frozen factors: rows that never trained stay frozen
    for p in model.parameters():
        p.requires_grad_(False)
    fresh = _ours(paths)
    for p in fresh.parameters():
        p.requires_grad_(False)
    lora.set_adapter(fresh, "a")
    assert not fresh.model.embed_tokens.modules_to_save["a"].trainable_tokens_delta.requires_grad


def test_a_copy_made_inside_a_batch_is_not_in_it(tmp_path):
    paths = {"a": _adapter(tmp_path, "a", trainable_token_indices=[1, 5]), "b": _adapter(tmp_path, "b", seed=2)}
    model = _ours(paths)
    with lora.batch_adapters(model, ["a", "b"]):
        twin = copy.deepcopy(model)
    with lora.disable_adapter(twin):  # (refused for good before: "a mixed batch serves layer ...")
        assert torch.equal(twin.model.embed_tokens(_ids()), twin.model.embed_tokens.original_module(_ids()))


def test_a_batch_whose_adapters_leave_a_module_alone_does_not_split_it(tmp_path):
    # GPT-2's position embedding with rows of one adapter: batches of the others were refused (its position ids are
    # a broadcast (1, T), which cannot be split by row, though every row used the original)
    from tiny_models import gpt2
    pm = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices={"wpe": [0, 3]}))
    pm.save_pretrained(str(tmp_path / "a"))
    pm = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "n"))
    model = gpt2()
    lora.load_peft_adapter(model, str(tmp_path / "a"), "a")
    lora.load_peft_adapter(model, str(tmp_path / "n"), "n", activate=False)
    x = _ids()
    with lora.batch_adapters(model, [None, "n"]):
        out = _logits(model, x)
    lora.set_adapter(model, "n")
    torch.testing.assert_close(out[1:], _logits(model, x[1:]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:1], _logits(gpt2(), x[:1]), rtol=1e-5, atol=1e-5)
    with lora.batch_adapters(model, ["a", "n"]):  # a's rows: the broadcast cannot be split by row
        with pytest.raises(ValueError, match="'transformer.wpe' has rows of tokens .* its first input's first"):
            _logits(model, x)


def test_inject_keeps_out_of_modules_with_rows(tmp_path):
    model = _ours({"a": _adapter(tmp_path, "a", trainable_token_indices=[1, 5])})
    with pytest.raises(ValueError, match="'model.embed_tokens' is saved whole .* or given rows of tokens"):
        lora.inject(model, ["embed_tokens"])
    with pytest.raises(ValueError, match="no module"):  # (its inside is not a target either)
        lora.inject(model, ["original_module"])


def test_a_hooked_embedding_is_refused_and_a_hook_registered_after_loading_applies_to_every_token(tmp_path):
    """The rows replaced the hooked module's output at their tokens only: a hook adding 1 reached the other tokens,
    and unload(merge=True), whose embedding runs the hook on every token, moved the logits by 0.56. Refused before
    anything changes; registered on the module at that name after loading, the hook applies to every token before
    and after unload."""
    path = _adapter(tmp_path, "a", trainable_token_indices=[1, 5, 7])
    model = _build("llama")
    embed = model.model.embed_tokens
    handle = embed.register_forward_hook(lambda mod, args, out: out + 1.0)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"module 'model.embed_tokens' \(trainable_token_indices\) has forward hooks"):
        lora.load_peft_adapter(model, path)
    assert model.model.embed_tokens is embed and unchanged(model, before)
    handle.remove()
    lora.load_peft_adapter(model, path)
    model.eval()
    model.model.embed_tokens.register_forward_hook(lambda mod, args, out: out + 1.0)
    x = _ids()
    with torch.no_grad():
        rows = model.model.embed_tokens(x)
        served = _logits(model, x)
    lora.unload(model, merge=True)
    assert model.model.embed_tokens is embed
    with torch.no_grad():
        W = embed.weight.detach()  # (the rows written into it)
        torch.testing.assert_close(rows, W[x] + 1.0)
        torch.testing.assert_close(_logits(model, x), served, rtol=1e-5, atol=1e-5)


def test_a_tied_head_and_embedding_given_other_tokens_each_serve_their_own_as_peft(tmp_path, capsys):
    """peft ties nothing where the tied modules' tokens differ: each serves its own rows. lora_ext refused the
    file; it serves them now, and refuses the merges that would write both sets into the one weight."""
    path = _adapter(tmp_path, "a", tie=True, trainable_token_indices={"embed_tokens": [1, 5], "lm_head": [7, 9]})
    x = _ids()
    ref = _logits(_peft({"a": path}, tie=True), x)
    model = _ours({"a": path}, tie=True)
    torch.testing.assert_close(_logits(model, x), ref, rtol=1e-5, atol=1e-5)
    lora.save_peft_adapter(model, str(tmp_path / "back"), "a")
    torch.testing.assert_close(_logits(_peft({"a": str(tmp_path / "back")}, tie=True), x), ref, rtol=1e-5, atol=1e-5)
    before = snapshot(model)
    with pytest.raises(ValueError, match="served other rows"):
        lora.unload(model, merge=True)
    assert unchanged(model, before)
    _build("llama", tie=True).save_pretrained(str(tmp_path / "base"))
    rc = main(["merge", "--base", str(tmp_path / "base"), "--adapter", path, "--out", str(tmp_path / "merged"),
               "--quiet"])
    assert rc == 2 and "can hold only one set" in capsys.readouterr().err
