"""Rows of tokens (trainable_token_indices) for a module that shares the input embedding's weight but is not the
input embedding: T5's encoder.embed_tokens beside `shared`. peft serves them in that module alone; lora_ext gave
them to every module sharing the weight (shared, decoder.embed_tokens, lm_head): logits 2.2 off a float64
reference, silently. The merges, which would write them into the shared weight, are refused."""
import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model

import lora_ext as lora
from lora_ext.cli import main
from lora_ext.serving.tokens import TrainableTokens

ROWS = [1, 2, 33]
IDS, DEC = torch.tensor([[1, 5, 9, 33, 7, 2]]), torch.tensor([[0, 1, 2, 33, 4]])


def _t5():
    torch.manual_seed(0)
    return tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=101, d_model=32, d_ff=48, num_layers=2, num_heads=4,
                                                     d_kv=8, dropout_rate=0.0)).eval()


@pytest.fixture(scope="module", params=["encoder", "decoder"])
def saved(request, tmp_path_factory):
    """(stack, adapter folder, rows' values): a peft adapter whose rows are for `stack`.embed_tokens."""
    root = tmp_path_factory.mktemp("t5tokens")
    stack = request.param
    pm = get_peft_model(_t5(), LoraConfig(r=4, target_modules=["q"],
                                          trainable_token_indices={f"{stack}.embed_tokens": ROWS}))
    values = torch.randn(len(ROWS), 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pm.base_model.model.get_submodule(f"{stack}.embed_tokens").token_adapter \
            .trainable_tokens_delta["default"].copy_(values)
    pm.save_pretrained(str(root / "adapter"))
    _t5().save_pretrained(str(root / "base"))
    return stack, root, values


def _reference(stack, values):
    """float64 logits by plain torch: only `stack`'s lookup sees the new rows (the LoRA factors of q are zero)."""
    ref = _t5().double()
    with torch.no_grad():
        emb = torch.nn.Embedding(101, 32).double()
        emb.weight.copy_(ref.shared.weight)
        emb.weight[ROWS] = values.double()
        getattr(ref, stack).embed_tokens = emb
        return ref(input_ids=IDS, decoder_input_ids=DEC).logits


def test_the_rows_are_served_by_the_named_module_alone(saved):
    stack, root, values = saved
    model = _t5()
    lora.load_peft_adapter(model, str(root / "adapter"))
    wrapped = {n for n in ("shared", "encoder.embed_tokens", "decoder.embed_tokens", "lm_head")
               if isinstance(model.get_submodule(n), TrainableTokens)}
    assert wrapped == {f"{stack}.embed_tokens"}
    with torch.no_grad():
        got = model(input_ids=IDS, decoder_input_ids=DEC).logits.double()
    ref = _reference(stack, values)
    assert (got - ref).abs().max().item() < 1e-5 * ref.abs().max().item()


def test_merges_into_the_shared_weight_are_refused(saved, capsys):
    stack, root, _ = saved
    model = _t5()
    lora.load_peft_adapter(model, str(root / "adapter"))
    before = model.shared.weight.detach().clone()
    with pytest.raises(ValueError, match="tied"):
        lora.unload(model, merge=True)
    assert torch.equal(model.shared.weight, before)
    out = root / f"merged-{stack}"
    rc = main(["merge", "--base", str(root / "base"), "--adapter", str(root / "adapter"), "--out", str(out),
               "--quiet"])
    assert rc != 0 and "tied" in capsys.readouterr().err and not out.exists()


class _Tied(torch.nn.Module):
    """A model of the user's, no config: its head shares the embedding's weight."""

    def __init__(self, failing=None):
        super().__init__()
        self.wte = torch.nn.Embedding(20, 8)
        self.fc = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 20, bias=False)
        self.head.weight = self.wte.weight
        self.failing = failing

    def forward(self, input_ids):
        return self.head(torch.tanh(self.fc(self.wte(input_ids))))

    def get_input_embeddings(self):
        if self.failing is not None:
            raise self.failing("no embeddings here")
        return self.wte


@pytest.mark.parametrize("failing", [None, ValueError], ids=["plain", "get_input_embeddings-raises"])
def test_a_model_without_a_config_serves_the_rows_in_the_embedding_alone(tmp_path, failing):
    """peft ties rows to a head only where the model's config ties the word embeddings: here it serves them in the
    embedding alone; lora_ext served them in the head too (17 off peft's logits), and a model whose
    get_input_embeddings raised could not load the file."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["fc"], trainable_token_indices={"wte": [1, 2, 7]}, init_lora_weights=False)
    pm = get_peft_model(_Tied().eval(), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "trainable_tokens_delta" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 3)
    ids = torch.tensor([[1, 3, 7, 2, 5]])
    with torch.no_grad():
        want = pm(input_ids=ids).double()
    pm.save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    model = _Tied(failing).eval()
    lora.load_peft_adapter(model, str(tmp_path))
    assert isinstance(model.wte, TrainableTokens) and not isinstance(model.head, TrainableTokens)
    with torch.no_grad():
        assert (model(ids).double() - want).abs().max().item() < 1e-5


def _bart():
    torch.manual_seed(0)
    return tf.BartForConditionalGeneration(tf.BartConfig(
        vocab_size=300, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)).eval()


@pytest.mark.parametrize("build", [_bart, _t5], ids=["bart", "t5"])
def test_embed_tokens_of_both_stacks_each_serve_their_own_rows_as_peft(build, tmp_path):
    """{"embed_tokens": [...]} chooses the encoder's and the decoder's lookups, which share the (not input) weight:
    peft serves each its own rows; lora_ext refused the file. Merges stay refused."""
    pm = get_peft_model(build(), LoraConfig(r=2, target_modules=["q_proj" if build is _bart else "q"],
                                            trainable_token_indices={"embed_tokens": [5, 7, 11]}))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(tmp_path / "adapter"))
    ids = torch.tensor([[5, 7, 11, 12, 3, 5]])
    with torch.no_grad():
        want = pm.eval()(input_ids=ids, decoder_input_ids=ids).logits
    model = build()
    lora.load_peft_adapter(model, str(tmp_path / "adapter"))
    with torch.no_grad():
        got = model(input_ids=ids, decoder_input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tied"):
        lora.unload(model, merge=True)
