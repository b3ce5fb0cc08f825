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


def _t5():
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=2, decoder_start_token_id=0)).eval()


def _encoder_pass_waits(switch_through, t5):
    """generate() on t5 with a switch of `switch_through` to "b" from another thread inside the encoder pass: whether
    the switch waited for the pass, and no pass was torn."""
    seen, switch = _switch_inside(switch_through, t5.encoder.block[1].layer[0].SelfAttention, "q", "v")
    t5.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    t, waited = switch[0]
    t.join(10)
    return waited and seen[:2] == [("q", "default"), ("v", "default")] and not _torn(seen) and not t.is_alive()


def test_an_encoder_decoders_encoder_pass_in_generate_takes_the_models_read():
    # generate() runs the encoder itself (before the decode steps), outside the model's forward: the pass took no
    # read, and a switch from another thread wrote in the middle of it (q with one adapter, v with the other)
    model = _t5()
    lora.inject(model, ["q", "v"], r=2)
    _second_adapter(model)
    assert _encoder_pass_waits(model, model), "the switch wrote in the middle of the encoder pass"
    assert lora.active_adapter(model) == "b"


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


def test_a_part_keeps_its_own_lock():
    # Y1: a part given the model's lock (an earlier form of this fix) refused a DPO-style reference pass inside the
    # forward of a wrapper given to lora_ext (`lora.disable_adapter(self.lm)`: "a change from inside a forward"); the
    # part takes the wrapper's read in its hooks and keeps a lock of its own
    torch.manual_seed(0)

    class Policy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1)).double().eval()

        def forward(self, ids):
            with lora.disable_adapter(self.lm):
                reference = self.lm(ids).logits
            return self.lm(ids).logits, reference

    policy = Policy()
    lora.inject(policy, ["q_proj", "v_proj"], r=2)
    for m in policy.modules():
        if isinstance(m, lora.LoRALayer):
            torch.nn.init.normal_(m.lora_B)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        logits, reference = policy(ids)
        with lora.disable_adapter(policy):
            base = policy.lm(ids).logits
    assert torch.allclose(reference, base, atol=1e-12, rtol=0) and (logits - base).abs().max() > 1e-2
    assert model_lock(policy.lm) is not model_lock(policy)
    assert policy.lm.__dict__["_lora_ext_part_of"] == (model_lock(policy),)


def test_a_part_given_to_lora_ext_first_takes_the_whole_models_read_too():
    # Y1: lora_ext given model.language_model first (its own lock), the whole model after: a switch through the model
    # tore the language model's decode steps (3 of 3), which took the part's lock only
    model = _blip2()
    lora.set_adapter(model.language_model, "default")
    lock = model_lock(model)
    held = []
    attn = model.language_model.model.decoder.layers[1].self_attn
    attn.k_proj.register_forward_pre_hook(lambda m, args: held.append(lock.holds_read()))
    seen, switch = _switch_inside(model, attn, at=3)
    model.generate(input_ids=torch.tensor([[99, 99, 5, 6, 7]]), pixel_values=torch.randn(1, 3, 16, 16),
                   max_new_tokens=4, do_sample=False)
    t, waited = switch[0]
    t.join(10)
    assert held and all(held) and waited and not _torn(seen), (held, seen)


def test_modules_generate_runs_outside_the_forward_take_the_read():
    # Y1: FSMT's encoder (a plain module, which generate() runs through get_encoder()) and Kosmos-2's
    # image_to_text_projection (a child of the model that generate() calls itself) took no read: torn, 3 of 3
    torch.manual_seed(0)
    fsmt = transformers.FSMTForConditionalGeneration(transformers.FSMTConfig(
        langs=["en", "de"], src_vocab_size=40, tgt_vocab_size=40, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48,
        max_position_embeddings=32, decoder_start_token_id=2, pad_token_id=1, eos_token_id=2,
        bos_token_id=0)).eval()
    lora.inject(fsmt, ["q_proj", "v_proj"], r=2)
    _second_adapter(fsmt)
    # (FSMT's attention calls v_proj before q_proj: the switch starts at the first layer of the pass)
    seen, switch = _switch_inside(fsmt, fsmt.model.encoder.layers[0].self_attn, q="v_proj", v="q_proj")
    fsmt.generate(input_ids=torch.tensor([[5, 6, 7, 2]]), max_new_tokens=2, do_sample=False)
    t, waited = switch[0]
    t.join(10)
    assert waited and seen[:2] == [("q", "default"), ("v", "default")] and not _torn(seen)
    assert lora.active_adapter(fsmt) == "b"


def test_a_models_parts_pickled_without_hooks_get_them_at_the_next_call():
    # a model pickled with its lock before parts were hooked (no mark, no hooks on its parts) gets them at its next
    # lora_ext call
    model = _blip2()
    model_lock(model)
    for part in model.__dict__.pop("_lora_ext_parts_locked"):
        for hooks in (part._forward_pre_hooks, part._forward_hooks):
            for key in [k for k, h in hooks.items() if h.__name__.startswith("_part_read")]:
                del hooks[key]
        del part.__dict__["_lora_ext_part_of"]
    assert "_lora_ext_part_of" not in model.language_model.__dict__
    loaded = pickle.loads(pickle.dumps(model))
    lora.set_adapter(loaded, "b")
    lock = model_lock(loaded)
    assert loaded.language_model.__dict__["_lora_ext_part_of"] == (lock,)
    held = []
    loaded.language_model.model.decoder.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, args: held.append(lock.holds_read()))
    loaded.generate(input_ids=torch.tensor([[99, 99, 5]]), pixel_values=torch.randn(1, 3, 16, 16), max_new_tokens=2,
                    do_sample=False)
    assert held == [True, True]


def test_a_mixed_batch_over_a_broadcast_lookup_no_row_adapts_is_served():
    # U1: an adapter with LoRA on GPT-2's wpe (position ids broadcast, (1, T)) made every mixed batch refuse ("got
    # (1, 7)"), even one where no row's adapter targets wpe: every row gets the base there
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50,
                                                                 n_positions=16)).double()
    lora.inject(model, ["c_attn", "wpe"], r=2)
    for m in model.modules():
        if isinstance(m, lora.LoRALayer):
            m.lora_B.data.normal_()
            if m is not model.transformer.wpe:  # ("a": c_attn only)
                m.add_adapter("a", torch.randn(2, m.in_features, dtype=torch.float64),
                              torch.randn(m.out_features, 2, dtype=torch.float64), 1.0)
    model.eval()
    x = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        lora.set_adapter(model, "a")
        alone = model(x).logits
        with lora.disable_adapter(model):
            base = model(x).logits
        lora.set_adapter(model, "default")
        with lora.batch_adapters(model, ["a", None, "a"]):
            mixed = model(x).logits
    assert (alone - base).abs().max() > 1e-2  # (the test can fail)
    assert torch.allclose(mixed[0], alone[0], atol=1e-10, rtol=0) and torch.allclose(mixed[2], alone[2], atol=1e-10,
                                                                                      rtol=0)
    assert torch.allclose(mixed[1], base[1], atol=1e-10, rtol=0)
    with torch.no_grad(), pytest.raises(ValueError, match="wpe"):  # (a row of "default", which targets wpe: refused)
        with lora.batch_adapters(model, ["a", "default", None]):
            model(x)
    # every row the same adapter, which targets wpe: the merged one, and another one ("w", all layers)
    for m in model.modules():
        if isinstance(m, lora.LoRALayer):
            a_shape, b_shape = m.factor_shapes(2)
            m.add_adapter("w", torch.randn(a_shape, dtype=torch.float64), torch.randn(b_shape, dtype=torch.float64), 0.5)
    with torch.no_grad():
        refs = {}
        for name in ("default", "w"):
            lora.set_adapter(model, name)
            refs[name] = model(x).logits
        lora.set_adapter(model, "default")
        assert model.transformer.wpe.merged
        for name in ("default", "w"):
            with lora.batch_adapters(model, [name] * 3):
                assert torch.allclose(model(x).logits, refs[name], atol=1e-10, rtol=0), name
    assert (refs["w"] - refs["default"]).abs().max() > 1e-2


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_a_nested_input_to_a_mixed_batch_is_served_row_by_row(layout):
    # W2: a lone layer given a nested tensor inside batch_adapters raised torch's "Internal error: NestedTensorImpl
    # doesn't support sizes" (the batch read the input's shape): each of its tensors is a row
    torch.manual_seed(0)
    layer = lora.Linear(8, 6, r=2).double().eval()
    a, b = torch.randn(2, 8, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    layer.add_adapter("b", a, b, 0.7)
    rows = [torch.randn(3, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)]
    w, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    with torch.no_grad(), lora.batch_adapters(layer, ["b", None]):
        y = layer(torch.nested.nested_tensor(rows, layout=layout))
    assert y.is_nested
    got = y.unbind()
    assert torch.allclose(got[1], rows[1] @ w.T + bias, atol=1e-12, rtol=0)
    assert torch.allclose(got[0], rows[0] @ w.T + bias + 0.7 * rows[0] @ a.T @ b.T, atol=1e-12, rtol=0)
    with torch.no_grad(), pytest.raises(ValueError, match="nested input of 2 rows"):
        with lora.batch_adapters(layer, ["b", None, "b"]):
            layer(torch.nested.nested_tensor(rows, layout=layout))


def test_a_save_refused_for_a_layer_read_uncalled_names_the_path(tmp_path):
    # the save's refusal of a layer whose parent reads its weight uncalled said only "reads its weight without calling
    # it", also where the parent does so on one path (Mamba's CUDA kernel path); it names the path, as inject does
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=97, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2, conv_kernel=3,
        time_step_rank=4)).eval()
    mixer = model.backbone.layers[0].mixer
    placed = lora.Linear(mixer.x_proj.in_features, mixer.x_proj.out_features, r=2, bias=False)
    placed.weight.data.copy_(mixer.x_proj.weight)
    mixer.x_proj = placed  # (by hand: inject refuses it)
    with pytest.raises(ValueError, match=r"save: layer 'backbone\.layers\.0\.mixer\.x_proj': its parent "
                                         r"'backbone\.layers\.0\.mixer' \(MambaMixer\) reads its weight without "
                                         r"calling it on one path, its CUDA kernel path \(mamba_ssm, on a GPU\): peft "
                                         r"would serve the model without the adapter on that path"):
        lora.save_peft_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    attention = torch.nn.Module()
    attention.att = torch.nn.MultiheadAttention(8, 2)
    attention.att.out_proj = lora.Linear(8, 8, r=2)
    with pytest.raises(ValueError, match=r"'att' \(MultiheadAttention\) reads its weight without calling it: peft "
                                         r"would serve the model without the adapter$"):
        lora.save_peft_adapter(attention, tmp_path / "b")


@pytest.mark.parametrize("kind", ["DebertaV2", "Deberta"])
def test_debertas_masked_lm_head_reading_the_word_embeddings_is_refused(kind):
    # V1: DeBERTa's masked-LM head (legacy=False) computes the logits from word_embeddings' weight, handed to it
    # uncalled by the model (a class above the embeddings' parent): merged and unmerged served 0.78 / 0.90 apart
    config = getattr(transformers, f"{kind}Config")
    cls = getattr(transformers, f"{kind}ForMaskedLM")
    for legacy in (False, True):
        model = cls(config(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=48, legacy=legacy)).eval()
        if legacy:  # (the legacy head has a decoder of its own: the embeddings are only looked up)
            lora.inject(model, ["word_embeddings"], r=2)
            assert isinstance(model.deberta.embeddings.word_embeddings, lora.Embedding)
            continue
        with pytest.raises(ValueError, match=rf"'deberta\.embeddings\.word_embeddings': the model \({kind}ForMaskedLM\) "
                                             r"reads its weight without calling it on one path, its masked-LM head"):
            lora.inject(model, ["word_embeddings"], r=2)
        assert not any(isinstance(m, lora.LoRALayer) for m in model.modules())
        lora.inject(model, ["query_proj" if kind == "DebertaV2" else "in_proj"], r=2)  # (other targets: taken)


def test_a_child_generate_calls_itself_takes_the_read():
    # Y1: Kosmos-2's generate() runs image_to_text_projection (a child of the model, not a transformers model, with an
    # attention of its own) itself, outside the model's forward: torn, 3 of 3
    torch.manual_seed(0)
    model = transformers.Kosmos2ForConditionalGeneration(transformers.Kosmos2Config(
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        text_config=dict(embed_dim=32, ffn_dim=48, layers=1, attention_heads=2, vocab_size=100,
                         max_position_embeddings=64),
        latent_query_num=2)).eval()
    lora.inject(model, ["q_proj", "v_proj"], r=2)
    _second_adapter(model)
    inner = model.model if hasattr(model, "model") else model
    seen, switch = _switch_inside(model, inner.image_to_text_projection.x_attn)
    model.generate(pixel_values=torch.randn(1, 3, 16, 16), input_ids=torch.tensor([[0, 5, 5, 7, 8]]),
                   image_embeds_position_mask=torch.tensor([[0, 1, 1, 0, 0]]).bool(), max_new_tokens=2,
                   do_sample=False)
    t, waited = switch[0]
    t.join(10)
    assert waited and seen[:2] == [("q", "default"), ("v", "default")] and not _torn(seen)


def test_a_nested_hook_read_drops_only_calls_that_ended():
    # a part's hook inside the model's forward looks for the innermost call it holds on the stack (not a whole stack
    # walk per nested call); calls a KeyboardInterrupt stopped are still dropped, with their reads
    from lora_ext.serving import adapters

    class Root(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.part = torch.nn.Sequential(lora.Linear(4, 4, r=2))

        def forward(self, x):
            return self.part(x)

    root = Root()
    lock = model_lock(root)
    root.part.__dict__["_lora_ext_part_of"] = (lock,)
    root.part.register_forward_pre_hook(adapters._part_read_before, prepend=True)
    root.part.register_forward_hook(adapters._part_read_after, always_call=True)
    stop, seen = [True], []

    def interrupt(module, args):
        seen.append(len(lock._hook_reads.get(threading.get_ident(), ())))
        if stop[0]:
            raise KeyboardInterrupt
    root.part[0].register_forward_pre_hook(interrupt)
    x = torch.randn(2, 4)
    for _ in range(3):
        with pytest.raises(KeyboardInterrupt):
            root(x)
    stop[0] = False
    root(x)
    me = threading.get_ident()
    assert seen == [2, 2, 2, 2]  # (the root's call and the part's, each time: those left behind dropped)
    assert not lock._hook_reads.get(me) and not lock._reads.get(me)


def test_a_stand_in_given_values_is_not_served_as_the_base_in_a_broadcast_lookup():
    # Z1: set_adapter's stand-in of zeros at wpe, given values since (as load_state_dict or an optimizer would):
    # the batch took it for the base there (0.42 off); its rows get different things: refused (the values are read)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50,
                                                                 n_positions=16)).double().eval()
    lora.inject(model, ["c_attn", "wpe"], r=2)
    wpe = model.transformer.wpe
    for m in model.modules():
        if isinstance(m, lora.LoRALayer) and m is not wpe:
            m.add_adapter("a", torch.randn(*m.lora_A.shape, dtype=torch.float64),
                          torch.randn(*m.lora_B.shape, dtype=torch.float64), 1.0)
    lora.set_adapter(model, "a")
    assert wpe.is_stand_in("a")
    with torch.no_grad():
        wpe.lora_A.normal_()
        wpe.lora_B.normal_()
    assert wpe.is_placeholder("a") and not wpe.is_stand_in("a")
    lora.set_adapter(model, "default")
    with torch.no_grad(), pytest.raises(ValueError, match="'transformer.wpe' .* got an input of shape \\(1, 7\\)"):
        with lora.batch_adapters(model, ["a", None, "a"]):
            model(torch.randint(0, 50, (3, 7)))


def test_a_nested_inputs_flattened_tokens_are_refused():
    # Z1: a model that runs its layer on a jagged input's values() (rows of 2, 0 and 1 tokens: 3, as many as the rows)
    # had each token read as one row: token 1, row 0's, got row 1's adapter (1.31 off)
    torch.manual_seed(0)

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.l1(x.values())

    model = Flat().double().eval()
    lora.inject(model, ["l1"], r=2)
    _second_adapter(model)
    x = torch.nested.nested_tensor([torch.randn(2, 8, dtype=torch.float64), torch.randn(0, 8, dtype=torch.float64),
                                    torch.randn(1, 8, dtype=torch.float64)], layout=torch.jagged)
    with torch.no_grad(), pytest.raises(ValueError, match="nested tensor, whose rows' tokens, flattened"):
        with lora.batch_adapters(model, ["b", None, "default"]):
            model(x)


@pytest.mark.parametrize("how", ["deepcopy", "shared"])
def test_a_part_moved_from_another_model_takes_this_models_read(how):
    # Z1: model A's encoder (marked a part of A's lock), deep-copied or shared into model B: B's lock left it A's
    # mark, and a switch of B tore B's encoder pass in generate() (3 of 3)
    import copy
    a = _t5()
    lora.inject(a, ["q", "v"], r=2)
    _second_adapter(a)
    model_lock(a)
    b = _t5()
    b.encoder, b.decoder = (copy.deepcopy(a.encoder), copy.deepcopy(a.decoder)) if how == "deepcopy" else \
        (a.encoder, a.decoder)
    b.shared = b.encoder.embed_tokens
    lora.set_adapter(b, "default")
    assert any(mark is model_lock(b) for mark in b.encoder.__dict__["_lora_ext_part_of"])
    assert all(mark is not model_lock(a) for mark in b.encoder.__dict__["_lora_ext_part_of"])
    assert _encoder_pass_waits(b, b)


@pytest.mark.parametrize("part_first", [False, True])
def test_a_hold_of_a_part_holds_the_model_it_is_a_part_of(part_first):
    # Z1: `lora.hold(model.language_model)` kept the part's own lock only: a switch through the whole model landed
    # inside the hold, and the part's next forward served another adapter
    model = _blip2()
    if part_first:
        lora.set_adapter(model.language_model, "default")
    lora.set_adapter(model, "default")
    q = model.language_model.model.decoder.layers[0].self_attn.q_proj
    seen = []
    with lora.hold(model.language_model), torch.no_grad():
        model.language_model(input_ids=torch.tensor([[1, 2, 3]]))
        seen.append(q.active_adapter)
        t = threading.Thread(target=lambda: lora.set_adapter(model, "b"), daemon=True)
        t.start()
        t.join(0.5)
        seen.append(t.is_alive())
        model.language_model(input_ids=torch.tensor([[1, 2, 3]]))
        seen.append(q.active_adapter)
        with pytest.raises(RuntimeError, match="would wait for itself"):
            lora.set_adapter(model, "default")
    t.join(10)
    assert seen == ["default", True, "default"] and not t.is_alive() and q.active_adapter == "b"


def test_an_adapter_injected_into_a_part_after_the_models_lock_is_covered():
    # A2: the model's lock made with LoRA in the decoder only, then lora.inject(model.encoder, ...): the encoder (no
    # adapter when the model's parts were found) took no read of the model's lock, and a switch tore its pass (3 of 3)
    model = _t5()
    lora.inject(model, r"decoder\..*\.(q|v)", r=2)
    model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=1, do_sample=False)
    lora.inject(model.encoder, r".*\.(q|v)", r=2)
    _second_adapter(model)
    assert _encoder_pass_waits(model, model)


@pytest.mark.parametrize("inner_first", [False, True])
def test_a_part_of_a_model_inside_a_wrapper_takes_both_reads(inner_first):
    # A2: a wrapper holding a T5, both given to lora_ext: T5's encoder kept one lock (the first it was given), and a
    # switch through the other tore its pass in t5.generate() (3 of 3, either order)
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.t5 = _t5()

    w = Wrapper()
    lora.inject(w, ["q", "v"], r=2)
    _second_adapter(w)
    first, second = (w.t5, w) if inner_first else (w, w.t5)
    lora.set_adapter(first, "default")
    lora.set_adapter(second, "default")
    assert w.t5.encoder.__dict__["_lora_ext_part_of"] == (model_lock(w), model_lock(w.t5))  # (the outer first)
    assert _encoder_pass_waits(w, w.t5)
    lora.set_adapter(w, "default")
    assert _encoder_pass_waits(w.t5, w.t5)


def test_a_switch_after_an_interrupted_forward_drops_its_calls_frames():
    # A2: a KeyboardInterrupt inside T5's encoder pass, then a switch from the same thread: the read left behind was
    # dropped, but the hook's list of calls kept the interrupted calls' frames (and what they reference)
    import gc
    import weakref
    model = _t5()
    lora.inject(model, ["q", "v"], r=2)
    _second_adapter(model)
    lock = model_lock(model)
    kept, fired = [], []

    def boom(module, args):
        if not fired:
            fired.append(True)
            raise KeyboardInterrupt
    hooks = [model.encoder.block[0].register_forward_hook(lambda m, a, o: kept.append(weakref.ref(o[0]))),
             model.encoder.block[1].register_forward_pre_hook(boom)]
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        model.generate(input_ids=torch.randint(3, 60, (2, 16)), max_new_tokens=2, do_sample=False)
    for h in hooks:
        h.remove()
    assert lock._hook_reads.get(threading.get_ident())  # (left by the interrupted calls)
    lora.set_adapter(model, "b")
    gc.collect()
    assert not lock._hook_reads.get(threading.get_ident()) and kept[0]() is None


class _Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


@pytest.mark.parametrize("outer_first", [False, True])
def test_a_wrapper_inside_a_wrapper_forwarded_directly_takes_the_outer_read_first(outer_first):
    # B3: W2 holds W1 holds a T5, all given to lora_ext; a forward of W1 called directly took W1's read, then (in the
    # T5's part hook) W2's, while a forward of W2 took them in the other order: with a switch through each queued,
    # the four threads waited for each other for good (4 of 8 free-running trials)
    t5 = _t5()
    w1 = _Wrapper(t5)
    w2 = _Wrapper(w1)
    lora.inject(w2, ["q", "v"], r=2)
    _second_adapter(w2)
    for m in ((w2, w1, t5) if outer_first else (t5, w1, w2)):
        lora.set_adapter(m, "default")
    l2, l1, l0 = model_lock(w2), model_lock(w1), model_lock(t5)
    assert w1.__dict__["_lora_ext_part_of"] == (l2,) and t5.__dict__["_lora_ext_part_of"] == (l2, l1)
    assert t5.encoder.__dict__["_lora_ext_part_of"] == (l2, l1, l0)
    assert next(iter(w1._forward_pre_hooks.values())).__name__ == "_part_read_before"  # (before its own lock's)
    x, d = torch.tensor([[5, 6, 7]]), torch.tensor([[0, 3]])

    def forwards(model):
        with torch.no_grad():
            for _ in range(20):
                model(input_ids=x, decoder_input_ids=d)

    def switches(model):
        for i in range(20):
            lora.set_adapter(model, "b" if i % 2 == 0 else "default")
    threads = [threading.Thread(target=forwards, args=(w1,), daemon=True),
               threading.Thread(target=forwards, args=(w2,), daemon=True),
               threading.Thread(target=switches, args=(w2,), daemon=True),
               threading.Thread(target=switches, args=(w1,), daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "the threads waited for each other"


def test_a_shallow_copy_does_not_take_over_the_models_lock_in_the_parts_marks():
    # B3: copy.copy(t5) made before its lock, then set_adapter through both: the copy's call made it the lock's
    # model, and a wrapper given to lora_ext after dropped the T5's lock from the encoder's marks (the copy neither
    # holds the wrapper nor is held by it): a switch through t5 tore its own encoder pass (3 of 3)
    import copy
    t5 = _t5()
    twin = copy.copy(t5)
    lora.inject(t5, ["q", "v"], r=2)
    _second_adapter(t5)
    lora.set_adapter(t5, "default")
    lora.set_adapter(twin, "default")
    w = _Wrapper(t5)
    lora.set_adapter(w, "default")
    assert t5.encoder.__dict__["_lora_ext_part_of"] == (model_lock(w), model_lock(t5))
    assert _encoder_pass_waits(t5, t5)
