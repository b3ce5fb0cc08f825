"""The eighteenth session's hostile rounds: each test fails on the code before its fix (checked in a clone)."""
import os
import warnings

import pytest
import torch
import torch.nn as nn

import lora_ext as lora
from helpers import rel_err


def _merged(shape, update, seed, **kw):
    """A merged lora_ext Linear of weight `shape` (out, in) whose update is `update` times |W|; its base and update
    (float64, computed here from the factors)."""
    torch.manual_seed(seed)
    out_f, in_f = shape
    layer = lora.Linear(in_f, out_f, r=4, lora_alpha=4, bias=False, **kw)
    with torch.no_grad():
        layer.weight.normal_(std=0.02)
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    delta = (b @ a) * layer.scaling
    if kw.get("fan_in_fan_out"):
        delta = delta.t()
    with torch.no_grad():
        layer.lora_B.mul_(update * layer.weight.double().norm().item() / delta.norm().item())
    delta = (layer.lora_B.detach().double() @ a) * layer.scaling
    base = layer.weight.detach().double().clone()
    layer.eval()
    assert layer.merged
    return layer, base, delta.t() if kw.get("fan_in_fan_out") else delta


def _served(layer, weight64, delta, fifo=False):
    """rel error of layer's forward against x (weight64 + delta)^T in float64."""
    x = torch.randn(8, weight64.shape[0] if fifo else weight64.shape[1])
    w = (weight64 + delta).t() if fifo else (weight64 + delta)
    with torch.no_grad():
        return rel_err(layer(x).double(), x.double() @ w.t())


@pytest.mark.parametrize("shape,change,update", [((16, 16), 0.3, 0.05), ((64, 64), 0.3, 0.01), ((2, 768), 0.4, 0.02)])
def test_a_new_base_nearer_the_merged_weight_by_chance_is_a_base(shape, change, update):
    # a new base of a small layer (a head), changed by several times the update, lies nearer the merged weight than
    # the old base for some changes: it was kept as "the merged weight" (served without its adapter, up to 6% off)
    for seed in range(12):
        layer, base, delta = _merged(shape, update, seed)
        torch.manual_seed(100 + seed)
        noise = torch.randn(shape, dtype=torch.float64)
        new = (base + noise * (change * base.norm() / noise.norm())).float()
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            layer.weight = nn.Parameter(new.clone())
        assert not layer.merged, seed
        assert any("taken as the base" in str(w.message) for w in ws), seed
        assert _served(layer, new.double(), delta) < 1e-6
        layer.train()
        assert rel_err(layer.weight.double(), new.double()) == 0, seed


def test_a_model_soup_of_the_base_and_the_merged_weight_is_a_base():
    # half way between the two: was kept as the merged weight where rounding put it nearer (12% off)
    for seed in range(8):
        layer, base, delta = _merged((64, 64), 0.05, seed)
        soup = ((base + layer.weight.detach().double()) / 2).float()
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            layer.weight = nn.Parameter(soup.clone())
        assert not layer.merged, seed
        assert _served(layer, soup.double(), delta) < 1e-6


@pytest.mark.parametrize("kind", ["Linear", "Linear-fifo", "MergedLinear-fifo"])
def test_a_copy_quantized_per_output_channel_keeps_the_merge(kind):
    # int4 per output channel (GPTQ's layout) of the merged weight, the update far under a step: a fan_in_fan_out
    # layer stores the output channels as columns, which were not tried (the adapter added a second time)
    for seed in range(4):
        torch.manual_seed(seed)
        kw = dict(r=4, lora_alpha=4, bias=False)
        fifo = kind != "Linear"
        if kind == "MergedLinear-fifo":
            layer = lora.MergedLinear(256, 128, enable_lora=[True, False], fan_in_fan_out=True, **kw)
        else:
            layer = lora.Linear(256, 128, fan_in_fan_out=fifo, **kw)
        with torch.no_grad():
            layer.weight.normal_()
            layer.lora_A.normal_()
            layer.lora_B.normal_(std=3e-3)  # (an update under the quantization's step, over its noise: see
        layer.eval()                            # hostile17's group-quantized copy)
        merged = layer.weight.detach().double()
        step = merged.abs().amax(dim=0 if fifo else 1, keepdim=True) / 7
        quantized = ((merged / step).round().clamp(-8, 7) * step).float()
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            layer.weight = nn.Parameter(quantized.clone())
        assert layer.merged, (kind, seed, [str(w.message) for w in ws])
        assert not ws
        x = torch.randn(4, 256)
        w = quantized.double().t() if fifo else quantized.double()
        with torch.no_grad():
            assert rel_err(layer(x).double(), x.double() @ w.t()) < 1e-6


# ---- merges and loads of peft files ----

@pytest.mark.parametrize("trained_on", ["causal", "inner"])
def test_patterns_match_the_names_the_adapter_was_trained_under(tmp_path, capsys, trained_on):
    """rank_pattern / alpha_pattern keys written against the class the adapter was trained on (a full name
    `model.layers.0...` of LlamaForCausalLM, an anchored `^layers\\.0...` of LlamaModel) were matched against the
    other class's renamed names: merged and loaded at lora_alpha / r (2.0, not 16.0), exit 0."""
    import copy
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from lora_ext.cli import main
    from helpers import save_random_peft
    from tiny_models import llama
    causal = llama()
    key = "model.layers.0.self_attn.q_proj" if trained_on == "causal" else r"^layers\.0\.self_attn\.q_proj"
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], alpha_pattern={key: 64},
                     rank_pattern={key.replace("q_proj", "v_proj"): 2})
    trained = copy.deepcopy(causal if trained_on == "causal" else causal.model)
    peft_model = get_peft_model(trained, cfg)
    path = save_random_peft(peft_model, tmp_path / "ad", seed=3, std=0.1)
    other = causal.model if trained_on == "causal" else causal  # the other class's checkpoint
    other.save_pretrained(str(tmp_path / "base"))
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", path, "--out", str(tmp_path / "out"),
                 "--quiet"]) == 0, capsys.readouterr().err
    ad = load_file(os.path.join(path, "adapter_model.safetensors"))
    out, base = load_file(str(tmp_path / "out" / "model.safetensors")), other.state_dict()
    outer = "model." if trained_on == "causal" else ""  # the adapter's own names' prefix past base_model.model.
    mine = "" if trained_on == "causal" else "model."  # the checkpoint's
    for layer in (0, 1):
        for proj, want in (("q_proj", 16.0 if layer == 0 else 2.0), ("v_proj", 4.0 if layer == 0 else 2.0)):
            name = f"layers.{layer}.self_attn.{proj}"
            a = ad[f"base_model.model.{outer}{name}.lora_A.weight"].double()
            b = ad[f"base_model.model.{outer}{name}.lora_B.weight"].double()
            assert a.shape[0] == (2 if (layer, proj) == (0, "v_proj") else 4)
            w = base[f"{mine}{name}.weight"].double() + want * (b @ a)
            assert rel_err(out[f"{mine}{name}.weight"].double(), w) < 1e-6, name
    # load_peft_adapter into the other class: the same scales
    model = copy.deepcopy(other)
    lora.load_peft_adapter(model, path)
    inner = model.model if trained_on == "inner" else model
    assert inner.layers[0].self_attn.q_proj.scaling == 16.0
    assert inner.layers[1].self_attn.q_proj.scaling == 2.0
    assert inner.layers[0].self_attn.v_proj.lora_A.shape[0] == 2
    assert inner.layers[0].self_attn.v_proj.scaling == 4.0


@pytest.mark.parametrize("kept", ["saved_module", "token_rows"])
def test_merge_refuses_a_file_of_no_factors_but_saved_modules_or_token_rows(tmp_path, capsys, kept):
    """A partial export holding only the module saved whole (modules_to_save) or the rows of tokens merged those and
    left every targeted module unmerged, exit 0 ("merged 0 weights")."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from lora_ext.cli import main
    from helpers import save_random_peft
    from tiny_models import llama
    base = llama()
    base.save_pretrained(str(tmp_path / "base"))
    extra = (dict(modules_to_save=["lm_head"]) if kept == "saved_module" else
             dict(trainable_token_indices={"embed_tokens": [1, 2]}))
    path = save_random_peft(get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                               **extra)), tmp_path / "ad", seed=1, std=0.1)
    full = load_file(os.path.join(path, "adapter_model.safetensors"))
    d = tmp_path / "partial"
    d.mkdir()
    (d / "adapter_config.json").write_text(open(os.path.join(path, "adapter_config.json")).read())
    rest = {k: v for k, v in full.items() if "lora_" not in k}
    assert rest
    save_file(rest, str(d / "adapter_model.safetensors"))
    rc = main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(d), "--out", str(tmp_path / "out"),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "holds no LoRA factors" in err and "'model.layers.0.self_attn.q_proj'" in err
    assert not (tmp_path / "out").exists()
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", path, "--out", str(tmp_path / "whole"),
                 "--quiet"]) == 0, capsys.readouterr().err


# ---- ties (the tie hook of the last session, attacked again) ----

def _conv(seed=0):
    torch.manual_seed(seed)
    c = lora.Conv2d(3, 4, kernel_size=3, r=2, lora_alpha=4)
    nn.init.normal_(c.lora_B)
    w, b = c.conv.weight.detach().double().clone(), c.conv.bias.detach().double().clone()
    d = (c.scaling * (c.lora_B @ c.lora_A)).detach().double().view(w.shape)
    return c, w, b, d


def test_a_plain_module_s_weight_given_to_a_layer_is_never_merged_into():
    """`head.weight = emb.weight` with only the head a lora_ext layer: eval() merged the head's adapter into the
    weight the plain embedding looks up (2.31 off); the conv alike (20.1 off)."""
    emb = nn.Embedding(20, 8)
    head = lora.Linear(8, 20, r=2, lora_alpha=4, bias=False)
    nn.init.normal_(head.lora_B)
    d = (head.scaling * head.lora_B @ head.lora_A).detach().double()
    e = emb.weight.detach().double().clone()
    head.weight = emb.weight
    with pytest.warns(UserWarning, match="shared with a Embedding's 'weight'"):
        head.eval()
    assert not head.merged
    ids, h = torch.arange(20), torch.randn(3, 8)
    with torch.no_grad():
        assert rel_err(emb(ids).double(), e) == 0
        assert rel_err(head(h).double(), h.double() @ (e + d).t()) < 1e-6
    plain = nn.Conv2d(3, 4, kernel_size=3)
    c, _, _, d = _conv()
    pw, pb = plain.weight.detach().double().clone(), plain.bias.detach().double().clone()
    c.conv.weight = plain.weight
    with pytest.warns(UserWarning, match="shared with a Conv2d's 'weight'"):
        c.eval()
    assert not c.merged
    assert torch.equal(plain.weight.detach().double(), pw) and torch.equal(plain.bias.detach().double(), pb)


@pytest.mark.parametrize("pickled", [False, True])
def test_tie_weights_with_only_lm_head_adapted_leaves_the_embedding_alone(pickled):
    # pickled (the nineteenth session): torch.save / torch.load of the whole tied model lost the tie, eval() merged
    # into the embedding's lookups
    import io
    from tiny_models import llama, tokens
    model = llama()
    lora.inject(model, ["lm_head", "q_proj"], r=4, lora_alpha=8)
    for _, layer in lora.serving.lora_layers(model):
        nn.init.normal_(layer.lora_B, std=0.5)
    model.train()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    if pickled:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        model = torch.load(buf, weights_only=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tokens()
    with torch.no_grad():
        want, lookup = model(ids).logits.double(), model.model.embed_tokens(ids).double()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        model.eval()
    shared = [str(w.message) for w in ws if "shared with" in str(w.message)]
    assert len(shared) == 1 and shared[0].startswith("Linear(64, 100)"), shared  # lm_head only, not the q_projs
    assert not model.lm_head.merged and model.model.layers[0].self_attn.q_proj.merged
    with torch.no_grad():
        assert rel_err(model.model.embed_tokens(ids).double(), lookup) == 0
        assert rel_err(model(ids).logits.double(), want) < 1e-5


def test_layers_put_in_plain_modules_places_are_not_tied_to_them():
    # the loop's variable keeps the last module replaced alive: it computes nothing, so no tie
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    for i in (0, 2):
        old = model[i]
        new = lora.Linear(8, 8, r=2)
        new.weight, new.bias = old.weight, old.bias
        model[i] = new
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.eval()
    assert model[0].merged and model[2].merged and old is not None


def test_a_conv_weight_tied_between_two_merged_layers():
    """`c2.conv.weight = c1.conv.weight` with both merged: c2 compared the weight before c1 took its adapter out of
    it, kept merged over c1's base (17.1 off), and c2.train() then took its adapter out of the shared weight."""
    import copy
    c1, w, b, d = _conv()
    c2 = copy.deepcopy(c1)
    c1.eval()
    c2.eval()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        c2.conv.weight = c1.conv.weight
    x = torch.randn(2, 3, 6, 6)
    want = nn.functional.conv2d(x.double(), w + d, b)
    for step in ("tied", "c2.train", "c1.train", "eval"):
        if step == "c2.train":
            c2.train()
        elif step == "c1.train":
            c1.train()
        elif step == "eval":
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                c1.eval()
                c2.eval()
        assert not c1.merged and not c2.merged, step
        with torch.no_grad():
            assert rel_err(c1(x).double(), want) < 1e-5, step
            assert rel_err(c2(x).double(), want) < 1e-5, step
        assert rel_err(c1.conv.weight.double(), w) < 1e-6, step


def test_tie_weights_again_names_the_tie_once():
    from tiny_models import gemma3
    model = gemma3(tie=True)
    lora.inject(model, ["embed_tokens"], r=4, lora_alpha=8)
    model.eval()
    emb = model.model.embed_tokens
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        model.tie_weights()
        once = list(emb.__dict__.get("_tied_with") or ())
        for _ in range(3):
            model.tie_weights()
    assert once and emb.__dict__.get("_tied_with") == once  # (each call appended the head again)


def test_two_layers_given_each_other_s_weights_on_two_threads_do_not_deadlock():
    """Each thread held its own layer's lock registering the weight while the tie hook waited for the other's."""
    import threading
    from torch.nn.modules import module as torch_module
    barrier = threading.Barrier(2, timeout=3)

    def line_up(module, name, param):  # both threads inside register_parameter before either goes on
        if name == "weight" and threading.current_thread().name in ("A", "B"):
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass

    hooks = torch_module._global_parameter_registration_hooks
    handle = torch_module.register_module_parameter_registration_hook(line_up)
    hooks.move_to_end(handle.id, last=False)  # (before lora_ext's own hook)
    try:
        l1, l2 = lora.Linear(8, 6, r=2, lora_alpha=4), lora.Linear(8, 6, r=2, lora_alpha=4)
        nn.init.normal_(l1.lora_B)
        nn.init.normal_(l2.lora_B)
        l1.eval()
        l2.eval()
        w1, w2 = l1.weight, l2.weight
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            threads = [threading.Thread(target=setattr, args=(l1, "weight", w2), name="A", daemon=True),
                       threading.Thread(target=setattr, args=(l2, "weight", w1), name="B", daemon=True)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
        assert not any(t.is_alive() for t in threads)
        assert not l1.merged and not l2.merged
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", ["transpose", "attention"])
def test_a_tie_to_a_transposed_conv_or_an_attention_projection_takes_the_adapter_out(kind):
    """A ConvTranspose2d decoder tied to a merged conv encoder's weight served it merged (13.5 off); so would
    nn.MultiheadAttention's out_proj (a Linear subclass) tied to a merged Linear."""
    torch.manual_seed(0)
    if kind == "transpose":
        enc = lora.Conv2d(3, 4, kernel_size=3, r=2, lora_alpha=4)
        nn.init.normal_(enc.lora_B)
        base = enc.conv.weight.detach().clone()
        enc.eval()
        dec = nn.ConvTranspose2d(4, 3, kernel_size=3)
        with pytest.warns(UserWarning, match="was given to a ConvTranspose2d"):
            dec.weight = enc.conv.weight
        assert rel_err(dec.weight.detach().double(), base.double()) < 1e-6 and not enc.merged
    else:
        layer = lora.Linear(8, 8, r=2, lora_alpha=4)
        nn.init.normal_(layer.lora_B)
        base = layer.weight.detach().clone()
        layer.eval()
        attention = nn.MultiheadAttention(8, 2)
        with pytest.warns(UserWarning, match="was given to a NonDynamicallyQuantizableLinear"):
            attention.out_proj.weight = layer.weight
        assert rel_err(attention.out_proj.weight.detach().double(), base.double()) < 1e-6 and not layer.merged


# ---- the second round (on this session's own changes) ----

def test_a_merged_conv_wrapped_again_keeps_its_adapter():
    """`net[i] = net[i].conv` after eval() (a merge-and-unload by hand), then a new ConvLoRA around that conv while
    the first layers live on: the first form of the conv-module tie took the old adapter out of the conv the model
    uses (1.31 off)."""
    torch.manual_seed(0)
    net = nn.Sequential(lora.Conv2d(3, 8, 3, r=2), nn.ReLU(), lora.Conv2d(8, 8, 3, r=2))
    first = [m for m in net.modules() if isinstance(m, lora.ConvLoRA)]
    for m in first:
        nn.init.normal_(m.lora_B, std=0.5)
    net.eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        want = net(x)
        for i in (0, 2):
            net[i] = net[i].conv
        for i in (0, 2):
            c = net[i]
            new = lora.Conv2d(c.in_channels, c.out_channels, 3, r=2)
            new.conv = c
            net[i] = new
        net.train()
        assert torch.equal(net(x), want) and len(first) == 2


@pytest.mark.parametrize("std", [0.02, 0.002])
def test_a_quantized_copy_with_half_precision_levels_keeps_the_merge(std):
    """int4 (groups of 128) of the merged weight with float16 scales (GPTQ's, AWQ's): its levels missed the quantizer
    test's slack, and the first form of the stricter rule took it as a new base (the adapter twice, 0.28 off); with
    a small update (its offset over sqrt(out x r) / 8 updates) only the quantizer test can tell."""
    torch.manual_seed(0)
    layer = lora.Linear(256, 256, r=8, lora_alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_(0, std)
    layer.eval()
    merged = layer.weight.detach().clone()
    groups = merged.reshape(-1, 128)
    scale = (groups.abs().amax(1, keepdim=True) / 7).half()
    q = (torch.round(groups / scale.float()).clamp(-8, 7).half() * scale).float().reshape(merged.shape)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        layer.weight = nn.Parameter(q)
    assert layer.merged and not ws
    x = torch.randn(8, 256, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(layer(x.float()).double(), x @ q.double().t() + layer.bias.double()) < 1e-6


def test_a_module_unload_puts_back_can_be_tied_later():
    """inject then unload put back a module the first form marked as never a giver: a head given its weight then
    merged into the embedding's lookups (0.23 off)."""
    torch.manual_seed(0)
    model = nn.Module()
    model.emb = nn.Embedding(32, 16)
    lora.inject(model, ["emb"], r=2, lora_alpha=4)
    lora.unload(model, merge=False)
    assert type(model.emb) is nn.Embedding
    lookup = model.emb.weight.detach().clone()
    head = lora.Linear(16, 32, r=2, lora_alpha=4, bias=False)
    nn.init.normal_(head.lora_B)
    head.weight = model.emb.weight
    model.head = head
    with pytest.warns(UserWarning, match="shared with a Embedding's 'weight'"):
        model.eval()
    assert not head.merged and torch.equal(model.emb.weight.detach(), lookup)


# ---- the third round ----

def _int4_grid(w, group=128):
    g = w.reshape(-1, group)
    scale = (g.abs().amax(1, keepdim=True) / 7).half()
    return (torch.round(g / scale.float()).clamp(-8, 7).half() * scale).float().reshape(w.shape)


@pytest.mark.parametrize("update", [0.003, 0.01])
def test_a_base_on_a_quantizer_s_grid_set_back_is_a_base(update):
    """A QLoRA-style base (dequantized int4 with float16 scales) set back after a merge: with the update under half a
    step it is the nearest-level quantization of the merged weight too, and was kept merged (adapter lost, 0.9%)."""
    torch.manual_seed(0)
    layer = lora.Linear(512, 256, r=8, lora_alpha=16, bias=False)
    with torch.no_grad():
        layer.weight.copy_(_int4_grid(layer.weight.detach()))
        layer.lora_B.normal_()
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    with torch.no_grad():
        layer.lora_B.mul_(update * layer.weight.double().norm().item() / (layer.scaling * (b @ a)).norm().item())
    base = layer.weight.detach().clone()
    delta = layer.scaling * layer.lora_B.detach().double() @ a
    layer.eval()
    with pytest.warns(UserWarning, match="taken as the base"):
        layer.weight = nn.Parameter(base.clone())
    assert not layer.merged
    x = torch.randn(8, 512, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(layer(x.float()).double(), x @ (base.double() + delta).t()) < 1e-6


def test_a_sibling_adapter_merged_into_a_small_head_is_a_base():
    """A second adapter of a 2 x 768 head sharing lora_A (A barely moves in training) with twice the B, merged into
    the base outside: its update lies in out x r dimensions, not 1,536, and 4 in 40 such bases were kept merged."""
    kept = []
    for seed in range(40):
        torch.manual_seed(seed)
        layer = lora.Linear(768, 2, r=8, lora_alpha=16, bias=False)
        with torch.no_grad():
            layer.lora_B.normal_()
            u = layer.scaling * layer.lora_B @ layer.lora_A
            layer.lora_B.mul_(0.05 * layer.weight.norm() / u.norm())
        a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        base = layer.weight.detach().double().clone()
        b2 = torch.randn(2, 8, dtype=torch.float64) * b.norm() / 8 ** 0.5 * 2
        sibling = (base + layer.scaling * b2 @ a).float()
        layer.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer.weight = nn.Parameter(sibling.clone())
        if layer.merged:
            kept.append(seed)
    assert not kept


def test_a_copy_of_a_model_keeps_a_tie_to_a_plain_module():
    """deepcopy (a DPO reference model, an EMA copy) of a model whose lora_ext head was given a plain embedding's
    weight: the copy merged into the shared weight (lookups 0.51 off). (A pickled copy does not keep it: carrying
    the giver in the layer's state pickled it whole with the layer, hooks and all.)"""
    import copy
    torch.manual_seed(0)
    for head_first in (False, True):  # (the head copied first: its giver's copy made then, the model's own later)
        model = nn.Module()
        if head_first:
            model.head = lora.Linear(8, 20, r=2, lora_alpha=4, bias=False)
        model.emb = nn.Embedding(20, 8)
        if not head_first:
            model.head = lora.Linear(8, 20, r=2, lora_alpha=4, bias=False)
        nn.init.normal_(model.head.lora_B)
        model.head.weight = model.emb.weight
        copied = copy.deepcopy(model)
        lookup = copied.emb.weight.detach().clone()
        assert copied.head.weight is copied.emb.weight
        with pytest.warns(UserWarning, match="shared with a Embedding's 'weight'"):
            copied.eval()
        assert not copied.head.merged and torch.equal(copied.emb.weight.detach(), lookup)


def test_a_model_built_before_the_import_keeps_its_ties_after_injection():
    """A model built in an earlier notebook cell than `import lora_ext` (its plain modules never seen), lm_head
    injected, then tie_weights(): eval() merged into embed_tokens (logits 4.6 off)."""
    from lora_ext import ties
    from tiny_models import llama, tokens
    model = llama()
    with ties._lock:  # as if built before lora_ext's import: none of its plain modules noted
        for module in model.modules():
            weight = module._parameters.get("weight")
            if weight is not None and id(weight) in ties._plain:
                ties._plain[id(weight)].discard(module)
    lora.inject(model, ["lm_head"], r=4, lora_alpha=8)
    nn.init.normal_(model.lm_head.lora_B, std=0.5)
    model.train()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    ids = tokens()
    with torch.no_grad():
        want, lookup = model(ids).logits.double(), model.model.embed_tokens(ids).double()
    with pytest.warns(UserWarning, match="shared with a Embedding's 'weight'"):
        model.eval()
    assert not model.lm_head.merged
    with torch.no_grad():
        assert rel_err(model.model.embed_tokens(ids).double(), lookup) == 0
        assert rel_err(model(ids).logits.double(), want) < 1e-5


# ---- the fourth round ----

@pytest.mark.parametrize("update", [0.002, 0.01])
def test_a_quantized_base_set_back_with_a_small_update_is_a_base(update):
    """A GPTQ-style copy (int4 per row) of the original base set back on a merged layer, the update under half a
    step: the half-precision slack let the levels pass for the merged weight's (adapter lost in 40 of 40). At 0.2% of
    the largest weight the update is about the quantization's noise (|Q| / sqrt(n)) and the reading a coin's toss
    weighted to the base (documented); at 1% it is a base every time."""
    kept = 0
    for seed in range(20):
        torch.manual_seed(seed)
        layer = lora.Linear(256, 64, r=4, lora_alpha=4, bias=False)
        with torch.no_grad():
            layer.weight.normal_(0, 0.02)
            layer.lora_B.normal_()
            u = layer.scaling * layer.lora_B @ layer.lora_A
            layer.lora_B.mul_(update * layer.weight.abs().max() / u.abs().max())
        base = layer.weight.detach().double().clone()
        delta = layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
        layer.eval()
        step = base.abs().amax(dim=1, keepdim=True) / 7
        q = ((base / step).round().clamp(-8, 7) * step).float()
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            layer.weight = nn.Parameter(q.clone())
        if layer.merged:
            kept += 1
            continue
        assert any("taken as the base" in str(w.message) for w in ws)
        x = torch.randn(8, 256, dtype=torch.float64)
        with torch.no_grad():
            assert rel_err(layer(x.float()).double(), x @ (q.double() + delta).t()) < 1e-6, seed
    assert kept <= (6 if update < 0.01 else 0), kept


@pytest.mark.parametrize("kind", ["narrow", "embedding"])
def test_a_bfloat16_round_trip_of_a_rank_one_layer_keeps_the_merge(kind):
    """`layer.weight = nn.Parameter(merged.bfloat16().float())` on a rank-1 narrow head or an embedding, the update
    about the bfloat16 rounding: the dimension count left it neither clearly near nor (rounding branch) allowed: a
    new base, the adapter twice."""
    for seed in range(4):
        torch.manual_seed(seed)
        layer = (lora.Linear(64, 4, r=1, lora_alpha=1, bias=False) if kind == "narrow"
                 else lora.Embedding(40, 8, r=1, lora_alpha=1))
        with torch.no_grad():
            layer.lora_A.normal_()  # (an Embedding's starts at zeros)
            layer.lora_B.normal_()
            u = (layer.lora_B @ layer.lora_A) * layer.scaling
            rounding = (layer.weight - layer.weight.bfloat16().float()).norm()
            layer.lora_B.mul_(rounding / u.norm())
        layer.eval()
        copy = layer.weight.detach().bfloat16().float()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            layer.weight = nn.Parameter(copy.clone())
        assert layer.merged, seed


def test_saving_a_layer_given_a_hooked_plain_module_s_weight(tmp_path):
    """The third round's first form carried the giver in the layer's pickled state: torch.save(head) pickled the
    embedding whole (a lambda hook: PicklingError; a large attribute: a 16 MB file)."""
    emb = nn.Embedding(20, 8)
    emb.register_forward_hook(lambda module, args, out: out)
    head = lora.Linear(8, 20, r=2, lora_alpha=4, bias=False)
    head.weight = emb.weight
    torch.save(head, str(tmp_path / "head.pt"))
    loaded = torch.load(str(tmp_path / "head.pt"), weights_only=False)
    assert torch.equal(loaded.weight, head.weight) and "_plain_givers" not in loaded.__dict__
