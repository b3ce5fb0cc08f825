"""Bugs found by the thirty-first session's hostile testers, each shown failing on the code before its fix."""
import io

import pytest
import torch
import torch.nn as nn

import lora_ext as lora


def _frozen_pair(seed=0, tie=True):
    """Two Linear(16, 16, r=2) layers with a random default adapter and an adapter 'a' each, frozen (serving); with
    tie, layer 1's lora_A is layer 0's Parameter."""
    torch.manual_seed(seed)
    m = nn.Sequential(lora.Linear(16, 16, r=2, lora_alpha=4), lora.Linear(16, 16, r=2, lora_alpha=4))
    with torch.no_grad():
        for layer in m:
            layer.lora_B.normal_(0, 0.3)
    if tie:
        m[1].lora_A = m[0].lora_A
    g = torch.Generator().manual_seed(seed + 1)
    for layer in m:
        layer.add_adapter("a", torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g), 2.0)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _factors64(m):
    """{adapter: [(W, b, A, B, scaling) per layer]} in float64, read before anything is switched."""
    out = {}
    for name in ("default", "a"):
        out[name] = []
        for layer in m:
            A, B, s = (layer.lora_A, layer.lora_B, layer.scaling) if name == "default" else layer.get_adapter(name)[:3]
            out[name].append((layer.weight.double().clone(), layer.bias.double().clone(), A.double().clone(),
                              B.double().clone(), float(s)))
    return out


def _ref(x, factors, names):
    h = x.double()
    for i, name in enumerate(names):
        W, b, A, B, s = factors[name][i]
        h = h @ W.T + b + s * (h @ A.T) @ B.T
    return h


def _err(m, x, factors, names):
    with torch.no_grad():
        y = m(x)
    ref = _ref(x, factors, names)
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def test_a_tied_model_loaded_with_assign_keeps_each_layers_adapter_through_switches():
    # torch.save keeps one storage for the two keys of a tied factor; load_state_dict(assign=True) wraps each key in a
    # Parameter of its own over that storage. A serving switch of layer 0 wrote adapter 'a' into the bytes layer 1
    # serves 'default' from (218 off), and a model-level round trip left the stored adapters wrong for good (806 off)
    buf = io.BytesIO()
    torch.save(_frozen_pair().state_dict(), buf)
    buf.seek(0)
    m = _frozen_pair()
    factors = _factors64(m)
    m.load_state_dict(torch.load(buf), assign=True)
    assert m[0].lora_A is not m[1].lora_A and m[0].lora_A.data_ptr() == m[1].lora_A.data_ptr()
    x = torch.randn(4, 16)
    m[0].set_adapter("a")
    assert _err(m, x, factors, ["a", "default"]) < 1e-6
    m[0].set_adapter("default")
    lora.set_adapter(m, "a")
    assert _err(m, x, factors, ["a", "a"]) < 1e-6
    lora.set_adapter(m, "default")
    assert _err(m, x, factors, ["default", "default"]) < 1e-6
    lora.set_adapter(m, "a")
    assert _err(m, x, factors, ["a", "a"]) < 1e-6


@pytest.mark.parametrize("before", ["none", "to", "rank_switch"])
def test_a_model_assign_loaded_from_another_models_state_dict_switches_without_writing_the_other(before):
    # m2.load_state_dict(m1.state_dict(), assign=True) hands m2 Parameters over m1's factor bytes: m2's serving switch
    # wrote into them and m1 served 'a' while it said 'default' (24 off). Also after m1's factors got new storage from
    # a .to() or a switch between ranks (a .data swap), which no Parameter registration shows
    m1, m2 = _frozen_pair(tie=False), _frozen_pair(tie=False)
    if before == "to":
        m1.double().float()
    elif before == "rank_switch":
        for layer in m1:
            layer.add_adapter("r3", torch.randn(3, 16), torch.randn(16, 3), 1.0)
            layer.add_adapter("r2", layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.scaling)
            layer.set_adapter("r3")
            layer.set_adapter("r2")
        for layer in m2:
            layer.add_adapter("r2", layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.scaling)
            layer.set_adapter("r2")
    factors = _factors64(m1)
    m2.load_state_dict(m1.state_dict(), assign=True)
    assert m2[0].lora_A.data_ptr() == m1[0].lora_A.data_ptr()
    x = torch.randn(4, 16)
    lora.set_adapter(m2, "a")
    assert _err(m1, x, factors, ["default", "default"]) < 1e-6
    assert _err(m2, x, factors, ["a", "a"]) < 1e-6
    # and the other way round: m1's switch leaves m2's stored default as it was
    lora.set_adapter(m1, "a")
    lora.set_adapter(m2, "default")
    assert _err(m2, x, factors, ["default", "default"]) < 1e-6
    assert _err(m1, x, factors, ["a", "a"]) < 1e-6


def test_factor_views_of_one_buffer_that_do_not_overlap_still_switch_in_place():
    # the storage check compares bytes: two layers' factors in one flat buffer, side by side, are not shared, and a
    # serving switch keeps writing each in place (a captured CUDA graph keeps serving)
    m = _frozen_pair(tie=False)
    flat = torch.cat([t.detach().reshape(-1) for layer in m for t in (layer.lora_A, layer.lora_B)])
    offset = 0
    for layer in m:
        for name in ("lora_A", "lora_B"):
            t = getattr(layer, name)
            setattr(layer, name, nn.Parameter(flat[offset:offset + t.numel()].view(t.shape), requires_grad=False))
            offset += t.numel()
    factors = _factors64(m)
    ptrs = [(layer.lora_A.data_ptr(), layer.lora_B.data_ptr()) for layer in m]
    x = torch.randn(4, 16)
    lora.set_adapter(m, "a")
    assert [(layer.lora_A.data_ptr(), layer.lora_B.data_ptr()) for layer in m] == ptrs
    assert _err(m, x, factors, ["a", "a"]) < 1e-6
    lora.set_adapter(m, "default")
    assert _err(m, x, factors, ["default", "default"]) < 1e-6


def test_active_adapter_waits_for_a_model_level_switch_on_another_thread():
    # active_adapter / adapter_names read the layers without the model's lock: while another thread switched the
    # model, 78,450 of 106,221 calls raised "lora_ext layers disagree on the active adapter"
    import threading
    import time

    m = nn.Sequential(*[lora.Linear(8, 8, r=2) for _ in range(8)])
    for layer in m:
        layer.add_adapter("a", torch.randn(2, 8), torch.randn(8, 2), 1.0)
    stop = time.monotonic() + 1.0
    errors, seen = [], set()

    def switch():
        while time.monotonic() < stop:
            for name in ("a", "default"):
                lora.set_adapter(m, name)

    t = threading.Thread(target=switch)
    t.start()
    calls = 0
    while time.monotonic() < stop or calls < 200:
        calls += 1
        try:
            seen.add(lora.active_adapter(m))
            assert lora.adapter_names(m)[0] in ("a", "default")
        except RuntimeError as e:
            errors.append(str(e))
    t.join()
    assert not errors, (len(errors), calls, errors[:1])
    assert seen <= {"a", "default"} and seen


def test_an_adapter_whose_update_a_float16_layer_would_lose_is_refused_before_it_is_kept():
    # float32 factors of 2^-30 with a scaling of 2^30 into a float16 layer: set_adapter rounded A to zero and served
    # the base (8.4 off), silently; after a switch back the stored copy was the zeros too. Factors in float16's
    # subnormals lost 42% of the update (review r32)
    torch.manual_seed(0)
    layer = lora.Linear(32, 32, r=2, lora_alpha=2, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"'t': cast to Linear\(32, 32\)'s factor dtype torch.float16, the factors "
                                         r"would lose"):
        layer.add_adapter("t", torch.randn(2, 32) * 2.0 ** -30, torch.randn(32, 2), 2.0 ** 30)
    with pytest.raises(ValueError, match=r"would lose"):
        layer.add_adapter("t", torch.randn(2, 32) * 4e-8, torch.randn(32, 2) * 0.05, 1e5)
    with pytest.raises(ValueError, match=r"would lose"):
        layer.add_adapter("t", torch.randn(2, 32), torch.randn(32, 2) * 1e-9, 1e9)
    assert layer.adapter_names == ["default"]
    # kept: a rank whose loss no forward shows (B of 1e-9 beside a rank of 0.05: 1e-10 against the weight's units
    # of 1e-4), B in float16's subnormals at an ordinary scale (a briefly trained adapter), zeros (a fresh B), and
    # a bfloat16 layer's ordinary rounding
    A, B = torch.randn(2, 32) * 0.05, torch.randn(32, 2) * 0.05
    B[:, 1] = 1e-9
    layer.add_adapter("ok1", A, B, 2.0)
    layer.add_adapter("ok2", torch.randn(2, 32) * 0.1, torch.randn(32, 2) * 1e-6, 2.0)
    layer.add_adapter("ok3", torch.randn(2, 32), torch.zeros(32, 2), 1.0)
    # float8 factors (peft serves them), which have no comparisons on the CPU: the check raised NotImplementedError
    layer.add_adapter("ok4", torch.randn(2, 32).to(torch.float8_e4m3fn), torch.randn(32, 2).to(torch.float8_e5m2), 1.0)
    bf = lora.Linear(256, 256, r=64, lora_alpha=128, dtype=torch.bfloat16)
    bf.add_adapter("ok", torch.randn(64, 256) * 0.05, torch.randn(256, 64) * 0.01, 2.0)
    layer.set_adapter("ok2")
    assert torch.equal(layer.lora_A, layer.get_adapter("ok2")[0].half()) or layer.lora_A.dtype == torch.float16


def _llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def _peft_adapter(path, name, **config):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_llama(), peft.LoraConfig(**config), adapter_name=name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.save_pretrained(str(path))
    return path / name if name != "default" else path


def test_a_batch_short_of_slots_names_the_merged_adapter_that_takes_one(tmp_path):
    # two adapters in the rows and 2 slots, with a third merged: refused as "needs 3 distinct adapters" when the
    # rows list 2, without a word about the merged one (nor unmerge_adapter, which serves the batch)
    dirs = {n: _peft_adapter(tmp_path, n, r=4, target_modules=["q_proj"]) for n in "abc"}
    m = _llama()
    for n in "abc":
        lora.load_peft_adapter(m, str(dirs[n]), n, activate=n == "a")
    lora.configure_slots(m, slots=2, max_rank=4)
    m.eval()
    x = torch.randint(0, 100, (2, 5))
    with pytest.raises(ValueError, match=r"'a' merged into layers' weights take\(s\) a slot too.*unmerge_adapter"):
        with torch.no_grad(), lora.batch_adapters(m, ["b", "c"]):
            m(x)
    lora.unmerge_adapter(m)
    with torch.no_grad(), lora.batch_adapters(m, ["b", "c"]):
        m(x)


def test_a_lora_target_inside_another_adapters_module_saved_whole_is_refused_for_that_reason(tmp_path):
    # adapter a saves layers.0.self_attn whole, adapter b targets k_proj inside it: both load orders were refused
    # with a false reason ("target_modules ... do not select"; "the file holds no ...lora_A")
    a = _peft_adapter(tmp_path, "a", r=4, target_modules=["q_proj"], modules_to_save=["layers.0.self_attn"])
    b = _peft_adapter(tmp_path, "b", r=2, target_modules=["k_proj"])
    m = _llama()
    lora.load_peft_adapter(m, str(a), "a")
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj', which lies inside "
                                         r"'model.layers.0.self_attn', a module adapter\(s\) \['a'\] save whole"):
        lora.load_peft_adapter(m, str(b), "b", activate=False)
    m = _llama()
    lora.load_peft_adapter(m, str(b), "b")
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj' inside it is a lora_ext layer"):
        lora.load_peft_adapter(m, str(a), "a", activate=False)


def test_a_module_saved_whole_with_values_past_float16_says_they_overflow(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    d = _peft_adapter(tmp_path, "default", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    f = d / "adapter_model.safetensors"
    state = safetensors.load_file(str(f))
    key = next(k for k in state if "lm_head" in k)
    state[key][0, 0] = 1e5
    safetensors.save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"largest \|value\| 1e\+05\) that overflow the model's lm_head.weight dtype "
                                         r"torch.float16"):
        lora.load_peft_adapter(_llama().half(), str(d), "a")


def _merge_refused(capsys, base, adapter, out, *words):
    from lora_ext.cli import main

    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert not (out).exists(), "a refused merge wrote its output"
    for w in words:
        assert w in err, (w, err)


def test_lora_ext_merge_refuses_conv_factors_of_another_kernel_with_the_same_size(tmp_path, capsys):
    # a ViT patch projection (Conv2d 3 -> 64, 4x4) with lora_A reshaped to (4, 12, 2, 2) (the same numel as peft's
    # (4, 3, 4, 4)): merged scrambled with exit code 0 (peft refuses the file); also lora_B as (64, 1, 1, 4)
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    m = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96, image_size=16, patch_size=4,
        num_labels=3))
    m.save_pretrained(str(tmp_path / "base"))
    pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["projection"]))
    pm.save_pretrained(str(tmp_path / "ad"))
    f = tmp_path / "ad" / "adapter_model.safetensors"
    good = safetensors.load_file(str(f))
    prefix = "base_model.model.vit.embeddings.patch_embeddings.projection."
    for key, shape, word in ((prefix + "lora_A.weight", (4, 12, 2, 2), "(4, 12, 2, 2)"),
                             (prefix + "lora_B.weight", (16, 4, 2, 2), "(16, 4, 2, 2)")):
        bad = dict(good)
        bad[key] = good[key].reshape(shape).contiguous()
        safetensors.save_file(bad, str(f), metadata={"format": "pt"})
        _merge_refused(capsys, tmp_path / "base", tmp_path / "ad", tmp_path / "out",
                       "'vit.embeddings.patch_embeddings.projection'", word, "(64, 3, 4, 4)")


def test_lora_ext_merge_names_the_module_of_a_lora_B_of_another_rank(tmp_path, capsys):
    # lora_B of rank 8 beside a rank-4 lora_A: refused by ops.merge_ while the shards were written, naming no module
    safetensors = pytest.importorskip("safetensors.torch")
    d = _peft_adapter(tmp_path / "ad", "default", r=4, target_modules=["q_proj", "v_proj"])
    _llama().save_pretrained(str(tmp_path / "base"))
    f = d / "adapter_model.safetensors"
    state = safetensors.load_file(str(f))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    state[key] = torch.randn(state[key].shape[0], 8)
    safetensors.save_file(state, str(f), metadata={"format": "pt"})
    _merge_refused(capsys, tmp_path / "base", d, tmp_path / "out", "'model.layers.1.self_attn.v_proj'",
                   "rank 4 and 8", "r=4")
    state[key] = torch.randn(state[key].shape[0], 4, 1)
    safetensors.save_file(state, str(f), metadata={"format": "pt"})
    _merge_refused(capsys, tmp_path / "base", d, tmp_path / "out", "'model.layers.1.self_attn.v_proj'",
                   "a linear layer's are matrices")


def test_a_stored_adapter_handed_to_another_layer_is_not_written_by_that_layers_switch():
    # get_adapter's stored tensors of m1's inactive 'a' given to m2 as its live factors: m2's serving switch wrote
    # 'c' into them, and m1 served 'c' as 'a' (0.88 off; review r32)
    torch.manual_seed(0)
    fac = {n: (torch.randn(4, 16) * .1, torch.randn(16, 4) * .1) for n in "abc"}
    models = []
    for _ in range(2):
        m = nn.Sequential(lora.Linear(16, 16, r=4, lora_alpha=8))
        for n, (A, B) in fac.items():
            m[0].add_adapter(n, A, B, 2.0)
        for p in m.parameters():
            p.requires_grad_(False)
        lora.set_adapter(m, "b")
        models.append(m)
    m1, m2 = models
    W, b = m1[0].weight.double().clone(), m1[0].bias.double().clone()
    A, B, _ = m1[0].get_adapter("a")
    m2[0].lora_A = nn.Parameter(A, requires_grad=False)
    m2[0].lora_B = nn.Parameter(B, requires_grad=False)
    lora.set_adapter(m2, "c")
    lora.set_adapter(m1, "a")
    x = torch.randn(3, 16)
    A0, B0 = (t.double() for t in fac["a"])
    ref = x.double() @ W.T + b + 2.0 * (x.double() @ A0.T @ B0.T)
    with torch.no_grad():
        y = m1(x).double()
    assert (y - ref).abs().max() < 1e-5


def test_active_adapter_from_a_worker_a_forward_waits_for_does_not_hang_behind_a_queued_switch():
    # active_adapter under the model's lock (the first fix) queued behind a set_adapter waiting for the forward,
    # which waited for the worker asking: a deadlock (review r32). Layers that agree are read without the lock
    import threading
    import time

    m = nn.Sequential(lora.Linear(16, 16, r=4), lora.Linear(16, 16, r=4))
    for layer in m:
        layer.add_adapter("b", torch.randn(4, 16) * .1, torch.randn(16, 4) * .1, 2.0)
    lora.set_adapter(m, "default")  # (the model's lock and its forward hooks: a forward holds a read)
    res = []

    def hook(mod, args, out):
        if threading.current_thread() is threading.main_thread() and not res:
            time.sleep(0.3)  # a set_adapter queues on another thread meanwhile
            t = threading.Thread(target=lambda: res.append(lora.active_adapter(m)), daemon=True)
            t.start()
            t.join(10)
            res.append(t.is_alive())

    m[0].register_forward_hook(hook)
    switch = threading.Timer(0.1, lambda: lora.set_adapter(m, "b"))
    switch.start()
    with torch.no_grad():
        m(torch.randn(2, 16))
    switch.join()
    assert res == ["default", False]
    assert lora.active_adapter(m) == "b"


def test_factor_views_of_one_flat_buffer_do_not_make_a_switch_compare_every_layer(monkeypatch):
    # every layer's factors in one flat buffer (FSDP1's layout): each switch compared the layer with every other
    # layer's tensors, a model switch quadratic in the layers (64 layers: 16x a switch; review r32). A look that
    # found nothing is not repeated while no layer was noted since
    from lora_ext import ties

    m = nn.Sequential(*[lora.Linear(8, 8, r=2) for _ in range(12)])
    for layer in m:
        layer.add_adapter("a", torch.randn(2, 8), torch.randn(8, 2), 1.0)
    for p in m.parameters():
        p.requires_grad_(False)
    flat = torch.zeros(sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in m))
    offset = 0
    with torch.no_grad():
        for layer in m:
            for name in ("lora_A", "lora_B"):
                t = getattr(layer, name)
                view = flat[offset:offset + t.numel()].view(t.shape)
                view.copy_(t)
                t.data = view
                offset += t.numel()
    m.float()  # (a .to(): the layers note where their factors lie)
    lora.set_adapter(m, "a")
    lora.set_adapter(m, "default")
    calls = []
    real = ties._factor_tensors_at
    monkeypatch.setattr(ties, "_factor_tensors_at", lambda x, where: calls.append(x) or real(x, where))
    ptrs = [layer.lora_A.data_ptr() for layer in m]
    for name in ("a", "default") * 3:
        lora.set_adapter(m, name)
    assert calls == []
    assert [layer.lora_A.data_ptr() for layer in m] == ptrs


def test_lora_ext_merge_says_a_grouped_conv_is_grouped(tmp_path, capsys):
    # peft's adapter of Conv2d(4, 8, 3, groups=2): refused as "of rank 4 and 2, but the config says r=4" (review r32)
    peft = pytest.importorskip("peft")
    safetensors = pytest.importorskip("safetensors.torch")

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.cg = nn.Conv2d(4, 8, 3, groups=2)

    torch.manual_seed(0)
    base = M()
    safetensors.save_file({k: v.clone() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["cg"],
                                                       init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "ad"))
    _merge_refused(capsys, tmp_path / "base.safetensors", tmp_path / "ad", tmp_path / "out.safetensors",
                   "'cg' is a grouped convolution", "groups=2")


def _in_fork(child) -> int:
    """Runs child() in a forked process (a 10 s alarm); its exit code: what child() returned, 99 on an exception,
    or -signal."""
    import os
    import signal

    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            signal.alarm(10)
            torch.set_num_threads(1)
            code = child()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _fork_model():
    torch.manual_seed(0)
    m = nn.Sequential(lora.Linear(16, 16, r=2), lora.Linear(16, 16, r=2))
    for layer in m:
        with torch.no_grad():
            layer.lora_B.normal_()
        layer.add_adapter("a", torch.randn(2, 16), torch.randn(16, 2), 1.0)
    return m


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork only")
def test_a_child_forked_while_another_thread_forwards_serves():
    # the child inherited a layer's lock held by the serving thread, which it does not have: every forward of the
    # layer hung for ever (review p32). The fork now waits for the forward to finish
    import threading

    m = _fork_model()
    m.eval()  # (merged: forwards hold the layer's lock)
    x = torch.randn(2, 16)
    with torch.no_grad():
        want = m(x)
    stop, xs = threading.Event(), torch.randn(64, 16)  # (no random draws on the thread: see below)

    def serve():
        while not stop.is_set():
            with torch.no_grad():
                m(xs)

    t = threading.Thread(target=serve)
    t.start()
    try:
        codes = []
        for _ in range(5):
            def child():
                with torch.no_grad():
                    return 0 if torch.equal(m(x), want) else 1
            codes.append(_in_fork(child))
    finally:
        stop.set()
        t.join()
    assert codes == [0] * 5


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork only")
def test_a_child_forked_while_a_layer_is_held_past_the_wait_refuses_it_naming_the_fork(monkeypatch):
    # a merge or switch under way on another thread at the fork may be half written in the child: the layer is
    # broken there (a new lock: it neither hangs nor serves what it cannot describe), and a load mends it

    from lora_ext import forks

    monkeypatch.setattr(forks, "WAIT_SECONDS", 0.2)
    m = _fork_model()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 16)
    with torch.no_grad():
        want = m(x)

    def hold_layer(inside, release):
        with m[1]._lock:
            inside.set()
            release.wait(30)

    assert _refused_in_child(m, x, want, hold_layer, "forked (os.fork) while another thread of its parent held the "
                             "layer", lambda: m.load_state_dict(state)) == 0


def _refused_in_child(m, x, want, holder, words, mend) -> int:
    """Forks while holder(inside, release) runs on another thread (after it set `inside`); the child's exit code: 0
    when its forward is refused with `words` and, after mend(), serves `want` (want None: is refused again)."""
    import threading

    inside, release = threading.Event(), threading.Event()
    t = threading.Thread(target=holder, args=(inside, release))
    t.start()
    inside.wait(10)

    def child():
        try:
            with torch.no_grad():
                m(x)
            return 1
        except RuntimeError as e:
            if words not in str(e):
                return 2
        mend()
        try:
            with torch.no_grad():
                y = m(x)
        except RuntimeError as e:
            return 0 if want is None and words in str(e) else 4
        return 0 if want is not None and torch.equal(y, want) else 3

    try:
        return _in_fork(child)
    finally:
        release.set()
        t.join()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork only")
def test_a_child_forked_during_a_model_level_change_refuses_forwards_until_set_adapter():
    # a set_adapter half way through the layers on another thread: the child's layers serve different adapters
    # (silently, once the hang is gone); refused until set_adapter in the child

    from lora_ext.serving.adapters import model_lock

    m = _fork_model()
    x = torch.randn(2, 16)
    lora.set_adapter(m, "a")
    with torch.no_grad():
        want = m(x)
    lora.set_adapter(m, "default")

    def change(inside, release):
        with model_lock(m).write():
            m[0].set_adapter("a")  # half way: layer 0 switched, layer 1 not yet
            inside.set()
            release.wait(30)
            m[1].set_adapter("a")

    assert _refused_in_child(m, x, want, change, "another thread of its parent was changing the model",
                             lambda: lora.set_adapter(m, "a")) == 0
    with torch.no_grad():
        assert torch.equal(m(x), want)


def test_a_factor_parameter_given_a_dead_ones_id_is_noted_where_it_lies():
    # note_factor skipped a Parameter whose id a layer had noted before (a freed factor's id, reused at once by
    # CPython): layer 1 given layer 0's A bytes in a Parameter with its freed B's id was never noted at that storage,
    # and layer 0's serving switch wrote adapter 'a' into what layer 1 served (a flaky assign-load test showed it)
    hits = 0
    for _ in range(200):
        m = _frozen_pair(tie=False)
        old_id = id(m[1].lora_B)
        m[1].lora_B = nn.Parameter(m[1].lora_B.detach().clone(), requires_grad=False)  # frees layer 1's old B
        p = nn.Parameter(m[0].lora_A.detach(), requires_grad=False)
        if id(p) != old_id:
            continue
        hits += 1
        m[1].lora_A = p
        factors = _factors64(m)
        m[0].set_adapter("a")
        assert _err(m, torch.randn(4, 16), factors, ["a", "default"]) < 1e-6
        if hits == 3:
            break
    assert hits, "CPython gave no freed id again in 200 tries: the case was not reached"


def test_factor_notes_pickled_into_another_process_do_not_hide_a_tie():
    # the layers' tokens on a factor Parameter (ties._NOTED_ATTR) are pickled with it; counted from 1 in every
    # process, a model loaded whole in a new process had its layers' tokens already on the shared factor: nothing
    # noted it, and one layer's serving switch wrote into the other's (5.85 off; review r32b)
    import os
    import subprocess
    import sys
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "m.pt")
    save = (
        "import sys, torch, torch.nn as nn, lora_ext as lora\n"
        "torch.manual_seed(0)\n"
        "l1, l2 = lora.Linear(8, 8, r=2, lora_alpha=2), lora.Linear(8, 8, r=2, lora_alpha=2)\n"
        "l2.lora_A = l1.lora_A\n"
        "for l in (l1, l2):\n"
        "    torch.nn.init.normal_(l.lora_B)\n"
        "    l.lora_A.requires_grad_(False); l.lora_B.requires_grad_(False)\n"
        "    l.add_adapter('other', torch.randn(2, 8), torch.randn(8, 2), 1.0)\n"
        "torch.save(nn.ModuleList([l1, l2]), sys.argv[1])\n")
    load = (
        "import sys, torch, lora_ext as lora\n"
        "l1, l2 = torch.load(sys.argv[1], weights_only=False)\n"
        "x = torch.randn(3, 8, dtype=torch.float64)\n"
        "A, B = l2.lora_A.detach().double().clone(), l2.lora_B.detach().double().clone()\n"
        "ref = x @ l2.weight.double().T + l2.bias.double() + l2.scaling * (x @ A.T @ B.T)\n"
        "l1.set_adapter('other')\n"
        "with torch.no_grad():\n"
        "    print(float((l2(x.float()).double() - ref).abs().max()))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(lora.__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    subprocess.run([sys.executable, "-c", save, path], check=True, env=env, timeout=120)
    out = subprocess.run([sys.executable, "-c", load, path], check=True, env=env, timeout=120, capture_output=True,
                         text=True).stdout
    assert float(out.split()[-1]) < 1e-5, out


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork only")
def test_a_child_forked_while_another_thread_builds_layers_does_not_hang():
    # ties._lock, taken whenever a module registers a weight, held by a thread building layers at the fork: the
    # child hung at its first nn.Linear (3 of 40 forks; review r32b). The fork takes it too; the child gets new ones.
    # On the meta device: torch's default CPU generator has a mutex of its own, which a fork leaves held when
    # another thread was drawing random numbers (kaiming_uniform_) at the time: the child of such a fork hangs in
    # its first random draw, with or without lora_ext (2 of 1,500 forks under load; CI failed once for it)
    import threading

    stop = threading.Event()

    def build():
        keep = []
        while not stop.is_set():
            keep.append(lora.Linear(4, 4, r=1, device="meta"))
            if len(keep) > 300:
                keep.clear()

    t = threading.Thread(target=build)
    t.start()
    try:
        codes = [_in_fork(lambda: (nn.Linear(4, 4, device="meta"), lora.Linear(4, 4, r=1, device="meta"), 0)[-1])
                 for _ in range(40)]
    finally:
        stop.set()
        t.join()
    assert codes == [0] * 40


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork only")
@pytest.mark.parametrize("block", ["disable_adapter", "batch_adapters"])
def test_a_child_forked_inside_another_threads_block_refuses_to_serve(block):
    # another thread inside lora.disable_adapter at the fork: the block never ends in the child, which served the
    # base for good while saying 'a' (3.75 off), also after set_adapter (7.74 off; review r32b). Inside a mixed
    # batch: loads and disable_adapter were refused for good. Now the child's model refuses forwards, naming the fork
    m = _fork_model()
    for layer in m:
        layer.lora_A.requires_grad_(False)
        layer.lora_B.requires_grad_(False)
    lora.set_adapter(m, "a")
    m.eval()
    x = torch.randn(2, 16)

    def inside(entered, release):
        with torch.no_grad(), (lora.disable_adapter(m) if block == "disable_adapter"
                               else lora.batch_adapters(m, ["a", None])):
            entered.set()
            release.wait(30)

    assert _refused_in_child(m, x, None, inside, "inside a lora.disable_adapter or lora.batch_adapters block",
                             lambda: lora.set_adapter(m, "a")) == 0


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork only")
def test_a_child_forked_while_another_thread_enters_or_leaves_disable_adapter_never_serves_the_base_as_a():
    # the layers counted a disable_adapter block before the model lock did (and after, on the way out): a fork in
    # between found no block, only another thread's change, and set_adapter in the child (what that refusal asks)
    # served the base while saying 'a' (23 of 40 forks, up to 0.8 off; review r32c)
    import threading

    d, n = 16, 100
    torch.manual_seed(0)
    m = nn.Sequential(*[lora.Linear(d, d, r=2, lora_alpha=4) for _ in range(n)])
    with torch.no_grad():
        for layer in m:
            layer.weight.copy_(torch.eye(d) + 0.02 * torch.randn(d, d))
            layer.bias.zero_()
    for layer in m:
        layer.add_adapter("a", torch.randn(2, d) * 0.1, torch.randn(d, 2) * 0.1, 2.0)
    for p in m.parameters():
        p.requires_grad_(False)
    lora.set_adapter(m, "a")
    x = torch.randn(3, d)
    with torch.no_grad():
        want = m(x)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            with lora.disable_adapter(m):
                pass

    def child():
        try:
            with torch.no_grad():
                y = m(x)
            return 0 if torch.allclose(y, want, rtol=0, atol=1e-5) else 1
        except RuntimeError as e:
            if "cannot serve" in str(e):
                return 0
            if "changing the model" not in str(e):
                return 2
        lora.set_adapter(m, "a")
        with torch.no_grad():
            return 0 if torch.allclose(m(x), want, rtol=0, atol=1e-5) else 3

    t = threading.Thread(target=loop)
    t.start()
    try:
        codes = [_in_fork(child) for _ in range(30)]
    finally:
        stop.set()
        t.join()
    assert codes == [0] * 30, codes


@pytest.mark.parametrize("shape, r, seed", [((8, 8), 2, 1), ((1024, 10), 2, 1), ((1, 1), 8, 5), ((3, 1), 2, 4)],
                         ids=str)
def test_a_float32_weight_of_a_small_dimension_does_not_drift_over_switches_and_merges(shape, r, seed):
    # torch's addmm_ adds the rank terms into W one by one for shapes with a small dimension (not its BLAS path):
    # a merge and its unmerge (a swap and the swap back) no longer cancelled within a rounding, and the merged
    # weight walked an ulp per round trip: 1.28e-5 of |W| after 100 switches, 1.28e-4 after 1000 (review r32c).
    # A probe of the layout on one random draw agreed by chance for blocks of a few elements (review r32d)
    k, d = shape
    torch.manual_seed(seed)
    layer = lora.Linear(k, d, r=r, lora_alpha=2 * r)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(0.05 * torch.randn(d, k, generator=g) + (torch.eye(d, k) if d == k else 0))
        layer.lora_B.normal_(0, 0.3, generator=g)
    layer.add_adapter("a", torch.randn(r, k, generator=g) * .5, torch.randn(d, r, generator=g) * .5, 2.0)
    for p in layer.parameters():
        p.requires_grad_(False)
    A, B, s = (t.double() if torch.is_tensor(t) else t for t in layer.get_adapter("a")[:3])
    w0 = layer.weight.double().clone()
    want = w0 + s * B @ A
    layer.eval()
    layer.set_adapter("a")
    layer.set_adapter("default")
    layer.set_adapter("a")
    first = layer.weight.detach().clone()  # where one round trip left it
    for _ in range(100):
        layer.set_adapter("default")
        layer.set_adapter("a")
    assert torch.equal(layer.weight, first)
    layer.train()
    layer.eval()
    once = layer.weight.detach().clone()  # where one unmerge and merge left it
    for _ in range(100):
        layer.train()
        layer.eval()
    assert torch.equal(layer.weight, once)
    assert ((layer.weight.double() - want).abs().max() / want.abs().max()) < 1e-6
    layer.train()
    layer.set_adapter("default")
    # (the base as a lossy float32 merge gives it back: within a rounding of the update, several times |W| here)
    assert ((layer.weight.double() - w0).abs().max() / (want - w0).abs().max()) < 1e-6


def test_a_small_merge_under_vmap_and_on_meta_still_works():
    # the layout probe of 87dabd1 drew random numbers: under torch.func.vmap (randomness 'error') and on the meta
    # device (no generator) ops.merge_ of a small weight raised torch's errors, naming nothing (review r32d)
    from lora_ext import ops

    torch.manual_seed(0)
    W, A, B = torch.randn(3, 8, 8), torch.randn(2, 8), torch.randn(8, 2)

    def merged(w):
        w = w.clone()
        ops.merge_(w, A, B, 2.0)
        return w

    out = torch.func.vmap(merged)(W)
    assert (out.double() - (W.double() + 2 * B.double() @ A.double())).abs().max() < 1e-5
    w = torch.empty(8, 8, device="meta")
    ops.merge_(w, torch.empty(2, 8, device="meta"), torch.empty(8, 2, device="meta"), 1.0)
    assert w.is_meta


@pytest.mark.parametrize("shape", [(16, 16), (64, 64), (256, 128)], ids=str)
def test_a_float64_weight_does_not_drift_over_merges(shape):
    # float64's addmm_ adds the rank terms one by one here as well (not only off float32's BLAS path for small
    # shapes): merge/unmerge round trips walked 2.5e-13 of |W| after 1000 (review r32e)
    from lora_ext import ops

    torch.manual_seed(0)
    w0 = torch.randn(*shape, dtype=torch.float64)
    A = torch.randn(8, shape[1], dtype=torch.float64) * 0.5
    B = torch.randn(shape[0], 8, dtype=torch.float64) * 0.5
    w = w0.clone()
    ops.merge_(w, A, B, 2.0)
    ops.unmerge_(w, A, B, 2.0)
    once = w.clone()
    for _ in range(50):
        ops.merge_(w, A, B, 2.0)
        ops.unmerge_(w, A, B, 2.0)
    assert torch.equal(w, once)
