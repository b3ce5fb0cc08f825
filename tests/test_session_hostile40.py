"""Forty-ninth session: what this session's hostile rounds and its own reading gave, each with a test that fails on
the commit before its fix."""
import pickle
import threading

import pytest
import torch

import lora_ext as lora
from lora_ext.serving.adapters import model_lock

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _second_adapter(model):
    """Adds adapter "b" (random factors) to every lora_ext layer of the model."""
    for m in model.modules():
        if isinstance(m, lora.LoRALayer):
            m.add_adapter("b", torch.randn(m.r, m.in_features), torch.randn(m.out_features, m.r), 1.0)


def _switch_inside(model, attn, q="q_proj", v="v_proj", at=1):
    """Hooks `attn`'s q and v layers: at the at-th call of q, a switch of the model to "b" from another thread,
    given 0.5 s. Returns (seen, switch): each call's (which layer, its active adapter), and [(thread, still
    waiting after 0.5 s)]."""
    seen, switch = [], []

    def on_q(m, args):
        seen.append(("q", m.active_adapter))
        if not switch and sum(1 for s in seen if s[0] == "q") == at:
            t = threading.Thread(target=lambda: lora.set_adapter(model, "b"), daemon=True)
            t.start()
            t.join(0.5)
            switch.append((t, t.is_alive()))
    getattr(attn, q).register_forward_pre_hook(on_q)
    getattr(attn, v).register_forward_pre_hook(lambda m, args: seen.append(("v", m.active_adapter)))
    return seen, switch


def _torn(seen):
    """The passes (q then v of one attention) that served two adapters."""
    return [(q[1], v[1]) for q, v in zip(seen[0::2], seen[1::2]) if q[1] != v[1]]


def test_an_encoder_decoders_encoder_pass_in_generate_takes_the_models_read():
    # generate() runs the encoder itself (before the decode steps), outside the model's forward: the pass took no
    # read, and a switch from another thread wrote in the middle of it (q with one adapter, v with the other)
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=2,
                                decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    lora.inject(model, ["q", "v"], r=2)
    _second_adapter(model)
    seen, switch = _switch_inside(model, model.encoder.block[1].layer[0].SelfAttention, "q", "v")
    model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    t, waited = switch[0]
    t.join(10)
    assert waited, "the switch wrote in the middle of the encoder pass"
    assert seen[:2] == [("q", "default"), ("v", "default")] and not _torn(seen)
    assert not t.is_alive() and lora.active_adapter(model) == "b"


def _blip2():
    torch.manual_seed(0)
    cfg = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                            encoder_hidden_size=32, vocab_size=100),
        text_config=dict(model_type="opt", hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=100, word_embed_proj_dim=32, max_position_embeddings=64),
        num_query_tokens=2, image_token_index=99)
    model = transformers.Blip2ForConditionalGeneration(cfg).eval()
    lora.inject(model, ["q_proj", "v_proj"], r=2)
    _second_adapter(model)
    return model


@pytest.mark.parametrize("compiled", [False, True])
def test_a_parts_generate_takes_the_whole_models_read(compiled):
    # BLIP-2's generate() runs language_model.generate(): its forwards took no read of the model's lock, eager or
    # compiled (static cache), and a switch through the model tore a decode step (X2, 3 of 3)
    model = _blip2()
    lock = model_lock(model)
    held = []
    attn = model.language_model.model.decoder.layers[1].self_attn
    attn.k_proj.register_forward_pre_hook(lambda m, args: held.append(lock.holds_read()))
    seen, switch = _switch_inside(model, attn, at=3)
    kw = {}
    if compiled:
        config = transformers.CompileConfig(backend=lambda gm, example: gm.forward, fullgraph=False, mode=None)
        config._compile_all_devices = True
        kw = dict(cache_implementation="static", compile_config=config)
    model.generate(input_ids=torch.tensor([[99, 99, 5, 6, 7]]), pixel_values=torch.randn(1, 3, 16, 16),
                   max_new_tokens=5, do_sample=False, **kw)
    t, waited = switch[0]
    t.join(10)
    assert held and all(held), held
    assert waited and not _torn(seen), seen
    assert seen[-1] == ("v", "b") and not t.is_alive()  # (it landed between two steps)


def test_a_part_shares_the_models_lock():
    # a switch through a part (model.language_model) did not wait for the model's forwards; it takes the same lock
    model = _blip2()
    assert model_lock(model.language_model) is model_lock(model)
    assert model_lock(model.vision_model) is model_lock(model)
    with lora.hold(model.language_model):
        with pytest.raises(RuntimeError, match="would wait for itself"):
            lora.set_adapter(model, "b")


def test_a_models_parts_pickled_without_hooks_get_them_at_the_next_call():
    # a model pickled with its lock before parts were hooked (no mark, no hooks on its parts) gets them at its next
    # lora_ext call, once
    model = _blip2()
    model_lock(model)
    for part in [model.vision_model, model.qformer, model.language_model, model.language_model.model,
                 model.language_model.model.decoder]:
        part._forward_pre_hooks.clear()
        part._forward_hooks.clear()
        part._forward_hooks_always_called.clear()
        del part.__dict__["_lora_ext_model_lock"]
    del model.__dict__["_lora_ext_parts_locked"]  # (the model keeps its lock and hooks)
    loaded = pickle.loads(pickle.dumps(model))
    lora.set_adapter(loaded, "b")
    assert model_lock(loaded.language_model) is model_lock(loaded)
    assert len(loaded.language_model._forward_pre_hooks) == 1
    lock = model_lock(loaded)
    held = []
    loaded.language_model.model.decoder.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, args: held.append(lock.holds_read()))
    loaded.generate(input_ids=torch.tensor([[99, 99, 5]]), pixel_values=torch.randn(1, 3, 16, 16), max_new_tokens=2,
                    do_sample=False)
    assert held == [True, True]
