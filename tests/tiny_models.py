"""Small transformers models built from configs in code (no downloads) and helpers for the serving tests."""
import torch

import transformers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

transformers.logging.set_verbosity_error()

VOCAB = 100


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=False, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def gemma3(seed=0, tie=False):
    """Gemma 3: its embed_tokens is a Gemma3TextScaledWordEmbedding (the lookup times sqrt(hidden_size), a
    buffer); 8 here, with hidden_size 64."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, tie_word_embeddings=tie,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0, sliding_window=4)
    return Gemma3ForCausalLM(cfg).eval()


def tokens(batch=2, seq=12):
    return torch.randint(0, VOCAB, (batch, seq))


def randomize_lora(model, names=("lora_",)):
    """Random values for every LoRA factor (peft's or lora_ext's), so that merges are not of zeros."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in names):
                p.normal_(0, 0.5)
    return model


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model, snap):
    now = model.state_dict()
    return set(now) == set(snap) and all(torch.equal(now[k], snap[k]) for k in snap)
