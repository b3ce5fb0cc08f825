"""Hostile use of the layers, named adapters, lossless merges and the loralib helpers: silent failures found by
acting as a user who does unusual but legal things (each test says what it did before its fix).

Oracles: float64 arithmetic on the original base weight (taken before anything ran), the original weight's bits,
and real loralib where lora_ext promises its behaviour.
"""
import loralib
import pytest
import torch
import torch.nn as nn

import lora_ext as lora

_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def rel(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.detach().contiguous().view(_INT[a.dtype]),
                                              b.detach().contiguous().view(_INT[b.dtype]))


def add_random_adapter(layer, name, r, scaling, g, std=0.5):
    (ra, ca), (rb, cb) = layer.factor_shapes(r)
    layer.add_adapter(name, torch.randn(ra, ca, generator=g) * std, torch.randn(rb, cb, generator=g) * std, scaling)


# -- lossless merges into a weight that is not row-major contiguous -----------------------------------------


def _linear64(x, w0, fan, bias, A, B, s):
    w = w0.double().t() if fan else w0.double()
    return x.double() @ (w + s * B.double() @ A.double()).t() + bias.double()


@pytest.mark.parametrize("dtype,lossless_flag", [(torch.bfloat16, None), (torch.float16, None),
                                                 (torch.float32, True)])
@pytest.mark.parametrize("fan", [False, True])
def test_lossless_cycles_on_a_column_major_weight_give_the_base_back(dtype, lossless_flag, fan):
    """A weight loaded with load_state_dict(assign=True) from a transposed tensor is column-major. Its lossless
    merge went through (the reference pass), but the unmerge of any element held as an exception failed inside
    the restore (RuntimeError: view size is not compatible...), leaving the layer merged and its base out of
    reach; every later train(), switch or state_dict() failed the same way."""
    g = torch.Generator().manual_seed(11)
    layer = lora.Linear(24, 20, r=4, lora_alpha=8, fan_in_fan_out=fan, lossless=lossless_flag)
    layer.requires_grad_(False)
    add_random_adapter(layer, "b", 2, 3.0, g)
    add_random_adapter(layer, "c", 5, 0.7, g)
    with torch.no_grad():
        layer.lora_B.normal_(generator=g)
    layer = layer.to(dtype)
    state = layer.state_dict()
    w = state["weight"]
    with torch.no_grad():
        w.view(-1)[:: 7] = 0  # zeros under a nonzero update: exceptions in every merge
    state["weight"] = w.t().contiguous().t()
    layer.load_state_dict(state, assign=True)
    assert not layer.weight.is_contiguous()
    w0 = layer.weight.detach().clone()
    x = torch.randn(6, 24, generator=g).to(dtype)
    for step, name in enumerate(["default", "b", "c", "b", "default", "c", "c", "default"]):
        layer.set_adapter(name)
        (layer.eval if step % 3 else layer.train)()
        A, B, s = layer.get_adapter(name)
        assert rel(layer(x), _linear64(x, w0, fan, layer.bias, A, B, s)) < 1e-2, (step, name)
        assert same_bits(layer.state_dict()["weight"], w0), f"state_dict's base after step {step}"
    layer.train()
    assert same_bits(layer.weight, w0), "the base after the cycles"


# -- Embedding with max_norm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_with_max_norm_merged_serves_what_unmerged_serves(dtype):
    """max_norm renormalises the rows a lookup reads, in place. Merged (eval()), the lookup renormalised rows of
    W + s B A: outputs 61% (relative) from the unmerged ones, and after train() the base rows were off by up
    to 1.75, with merged=True and lossless records saying all was well. Now eval() leaves such a layer unmerged
    and an explicit merge is refused, naming max_norm, before anything is written."""
    g = torch.Generator().manual_seed(3)
    e = lora.Embedding(10, 6, r=2, lora_alpha=2, max_norm=1.0)
    with torch.no_grad():
        e.lora_A.normal_(generator=g)
        e.weight.mul_(3.0)  # rows above max_norm
    e = e.to(dtype)
    ids = torch.tensor([[1, 2, 3], [3, 7, 1]])
    e_ref = e.weight.detach().double().clone()
    norms = e_ref.norm(dim=1, keepdim=True)
    renormed = torch.where(norms > 1.0, e_ref / (norms + 1e-7), e_ref)
    touched = torch.zeros(10, 1, dtype=torch.bool)
    touched[ids.unique()] = True
    base64 = torch.where(touched, renormed, e_ref)
    want = base64[ids] + e.scaling * (e.lora_A.double().t()[ids] @ e.lora_B.double().t())
    w_before = e.weight.detach().clone()
    e.eval()
    assert not e.merged
    out = e(ids)
    assert rel(out, want) < (1e-5 if dtype == torch.float32 else 1e-2)
    w_after = e.weight.detach().clone()
    with pytest.raises(ValueError, match=r"Embedding\(10, 6\).*max_norm=1.0"):
        e.merge()
    assert not e.merged and torch.equal(e.weight, w_after)
    e.train()
    assert torch.equal(e.weight, w_after)
    assert rel(e.weight[~touched.squeeze(1)], w_before[~touched.squeeze(1)]) == 0


def test_model_level_merge_refuses_an_embedding_with_max_norm_before_any_write():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = lora.Linear(6, 6, r=2)
            self.e = lora.Embedding(10, 6, r=2, max_norm=1.0)
    net = Net()
    w = {k: v.clone() for k, v in net.state_dict(keep_vars=False).items()}
    with pytest.raises(ValueError, match=r"'e'.*max_norm"):
        lora.merge_adapter(net)
    assert not net.a.merged and not net.e.merged
    assert all(torch.equal(v, w[k]) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match=r"'e'.*max_norm"):
        lora.unload(net, merge=True)
    assert isinstance(net.a, lora.Linear) and isinstance(net.e, lora.Embedding)


# -- mark_only_lora_as_trainable / lora_state_dict against loralib ------------------------------------------


class _BiasNet(nn.Module):
    def __init__(self, lib):
        super().__init__()
        self.emb = lib.Embedding(10, 8, r=2)
        self.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True)
        self.q = lib.Linear(8, 8, r=2)
        self.q0 = lib.Linear(8, 8, r=0)  # a LoRA layer without an adapter
        self.norm = nn.LayerNorm(8)
        self.rel_bias = nn.Embedding(4, 2)  # a module named *bias*: its weight is no bias
        self.lora_head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.lora_head(self.norm(self.q0(self.q(h))))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_train_and_save_what_loralib_trains(bias):
    """bias='all' froze nn.MultiheadAttention's in_proj_bias, bias_k and bias_v (loralib trains and saves them:
    a migrated model trained other parameters, silently); bias='lora_only' trained the bias of a LoRA layer with
    r=0 (as loralib does) but lora_state_dict did not save it, so the trained bias was lost on reload."""
    torch.manual_seed(0)
    theirs = _BiasNet(loralib)
    loralib.mark_only_lora_as_trainable(theirs, bias=bias)
    torch.manual_seed(0)
    ours = _BiasNet(lora)
    lora.mark_only_lora_as_trainable(ours, bias=bias)
    # loralib's substring rules also pick lora_head.* ('lora_' in the name) and rel_bias.weight ('bias' in a module
    # name): its bugs, not what lora_ext promises
    loralib_trained = {n for n, p in theirs.named_parameters() if p.requires_grad} - {
        "lora_head.weight", "lora_head.bias", "rel_bias.weight"}
    trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trained == loralib_trained | ({"lora_head.bias"} if bias == "all" else set())
    # a training step, then the LoRA state dict into a fresh model: the same outputs
    ids = torch.randint(0, 10, (5, 3))
    with torch.no_grad():
        ours.q.lora_B.normal_()
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    ours(ids).square().sum().backward()
    opt.step()
    saved = lora.lora_state_dict(ours, bias=bias)
    assert set(saved) == trained
    torch.manual_seed(0)
    fresh = _BiasNet(lora)
    fresh.load_state_dict(saved, strict=False)
    with torch.no_grad():
        assert rel(fresh(ids), ours(ids)) == 0


# -- .to() of a merged model -----------------------------------------------------------------------------------


def test_dtype_and_channels_last_conversion_of_a_merged_model_completes():
    """model.to(torch.float16, memory_format=torch.channels_last) with a merged ConvLoRA raised ValueError (the
    merge again needs the weight contiguous) after that layer was converted, so the modules after it were never
    converted: a model of mixed dtypes. The conv stays merged through the conversion (a channels_last weight is
    written through a contiguous copy); the base comes back bit for bit (its lossless record)."""
    g = torch.Generator().manual_seed(4)
    conv = lora.Conv2d(3, 4, 3, r=2, lora_alpha=4, padding=1)
    lin = lora.Linear(4 * 36, 5, r=2, lora_alpha=4)
    for m in (conv, lin):
        with torch.no_grad():
            m.lora_B.normal_(0, 0.1, generator=g)
    model = nn.Sequential(conv, nn.Flatten(), lin).to(torch.bfloat16).requires_grad_(False)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 6, 6, generator=g)

    def ref(sd):
        y = torch.nn.functional.conv2d(x.double(), sd["0.conv.weight"].double() + conv.scaling * (
            sd["0.lora_B"].double() @ sd["0.lora_A"].double()).view(4, 3, 3, 3), sd["0.conv.bias"].double(),
            padding=1).flatten(1)
        w = sd["2.weight"].double() + lin.scaling * sd["2.lora_B"].double() @ sd["2.lora_A"].double()
        return y @ w.t() + sd["2.bias"].double()

    model.eval()
    assert conv.merged and lin.merged
    model.to(torch.float16, memory_format=torch.channels_last)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert conv.merged and lin.merged
    assert conv.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert rel(model(x.half()), ref(w0)) < 1e-2
    model.train()
    for k, v in model.state_dict().items():
        assert same_bits(v, w0[k].half()), k


# -- optimizers across serving switches -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_each_adapters_optimizer_keeps_training_it_across_serving_switches(seed):
    """The optimizer rule (one optimizer per adapter, built while it is active and trainable) with serving in
    between (factors frozen, switches written into the live storage). Before the fix: train b with opt_b, freeze,
    switch to default and back (or the reverse), unfreeze, switch to b: opt_b held Parameters that were no longer
    b's, and opt_b.step() trained nothing, silently (or the default adapter's Parameters, lent to another adapter
    by a serving switch, were registered as that adapter's at the next trainable switch). Every adapter's values
    are checked against a shadow copy after each step, so lending never loses or mixes values either."""
    import random
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    layer = lora.Linear(8, 6, r=2, lora_alpha=2)
    add_random_adapter(layer, "b", 2, 1.0, g)
    add_random_adapter(layer, "c", 3, 0.5, g)  # another rank: serving switches to it give new storage
    names = ["default", "b", "c"]
    shadow = {n: tuple(t.detach().clone() for t in layer.get_adapter(n)[:2]) for n in names}
    opts = {}
    x = torch.randn(5, 8, generator=g)
    w0 = layer.weight.detach().clone()
    for step in range(60):
        name = rnd.choice(names)
        if rnd.random() < 0.5:  # serve, merged or not
            layer.requires_grad_(False)
            layer.train(rnd.random() < 0.5)
            layer.set_adapter(name)
            A, B, s = layer.get_adapter(name)
            with torch.no_grad():
                assert rel(layer(x), _linear64(x, w0, False, layer.bias, A, B, s)) < 1e-5
        else:  # train: unfreeze, switch, step the adapter's own optimizer
            lora.mark_only_lora_as_trainable(layer)
            layer.train()
            layer.set_adapter(name)
            if name not in opts:
                opts[name] = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
            held = opts[name].param_groups[0]["params"]
            assert held[0] is layer.lora_A and held[1] is layer.lora_B, f"step {step}: opt_{name} holds others"
            before = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
            opts[name].zero_grad()
            layer(x).square().mean().backward()
            opts[name].step()
            assert not (torch.equal(layer.lora_A, before[0]) and torch.equal(layer.lora_B, before[1])), (
                f"step {step}: opt_{name} trained nothing")
            shadow[name] = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
        for n in names:
            A, B, _ = layer.get_adapter(n)
            assert torch.equal(A, shadow[n][0]) and torch.equal(B, shadow[n][1]), f"step {step}: adapter {n}"


@pytest.mark.parametrize("convert", [False, True])
def test_resuming_training_after_serving_uses_the_adapters_own_optimizer(convert):
    """The shortest repro of the silent no-training: train b with opt_b, switch to default, freeze, serve b
    (written into the live Parameters, default's), unfreeze (mark_only_lora_as_trainable) and train b: opt_b.step()
    left b's live factors unchanged. With a .to(float64) in between, b's own pair (left in float32, as inactive
    adapters are) is not registered: the live factors stay float64 with b's values (README: move the model
    before training several adapters)."""
    g = torch.Generator().manual_seed(7)
    layer = lora.Linear(8, 6, r=2)
    add_random_adapter(layer, "b", 2, 1.0, g)
    lora.mark_only_lora_as_trainable(layer)
    layer.set_adapter("b")
    opt_b = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    x = torch.randn(4, 8, generator=g)
    layer(x).square().sum().backward()
    opt_b.step()
    layer.set_adapter("default")
    layer.requires_grad_(False)
    layer.set_adapter("b")
    if convert:
        layer.double()
        x = x.double()
    values = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
    lora.mark_only_lora_as_trainable(layer)
    assert torch.equal(layer.lora_A, values[0]) and torch.equal(layer.lora_B, values[1])
    assert layer.lora_A.dtype == (torch.float64 if convert else torch.float32) and layer.lora_A.requires_grad
    opt_b.zero_grad()
    layer(x).square().sum().backward()
    opt_b.step()
    if convert:
        assert torch.equal(layer.lora_A, values[0])  # opt_b's pair is float32: not the live one
    else:
        assert not torch.equal(layer.lora_A, values[0]), "opt_b trained nothing"
        assert opt_b.param_groups[0]["params"][0] is layer.lora_A


# -- add_adapter arguments ----------------------------------------------------------------------------------------


def test_add_adapter_refuses_factors_it_cannot_hold_naming_them():
    """A complex adapter was accepted (its check cast it to float with a warning) and its imaginary part dropped
    silently at the switch; meta factors failed inside the value check (NotImplementedError: Cannot copy out of
    meta tensor) without naming the argument."""
    layer = lora.Linear(8, 6, r=2)
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"'c': lora_A must be a floating-point tensor, got torch.complex64"):
        layer.add_adapter("c", torch.ones(2, 8, dtype=torch.complex64) * (1 + 1j), torch.ones(6, 2), 1.0)
    with pytest.raises(ValueError, match=r"'i': lora_B must be a floating-point tensor, got torch.int64"):
        layer.add_adapter("i", torch.ones(2, 8), torch.ones(6, 2, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match=r"'m': lora_A is on the meta device"):
        layer.add_adapter("m", torch.empty(2, 8, device="meta"), torch.empty(6, 2, device="meta"), 1.0)
    assert layer.adapter_names == ["default"] and torch.equal(layer.weight, w0)


# -- inject ----------------------------------------------------------------------------------------------------------


def test_inject_never_targets_the_insides_of_lora_ext_layers():
    """inject(model, ["conv"]) on a model holding a lora_ext Conv2d replaced that layer's own nn.Conv2d (its child
    `conv`) by another Conv2d LoRA layer, returned its name as injected, and left a model whose forward failed
    (AttributeError: no attribute 'weight'). load_peft_adapter's target selection already skipped such modules."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = lora.Conv2d(3, 4, 3, r=2)
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(self.c(x))
    net = Net()
    inner = net.c.conv
    assert lora.inject(net, ["conv"], r=2) == ["conv"]
    assert net.c.conv is inner and isinstance(net.conv, lora.Conv2d)
    x = torch.randn(2, 3, 5, 5)
    assert net(x).shape == (2, 4, 3, 3)
    with pytest.raises(ValueError, match="matches no module"):
        lora.inject(net, r"c\.conv", r=2)
    assert net.c.conv is inner


def _ddp_serve_then_train(rank, world):
    from torch.nn.parallel import DistributedDataParallel
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(lora.Linear(8, 6, r=2))
    add_random_adapter(net[0], "b", 2, 1.0, g)
    with torch.no_grad():
        net[0].lora_B.normal_(generator=g)
    lora.mark_only_lora_as_trainable(net)
    ddp = DistributedDataParallel(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    net.requires_grad_(False)  # serve b for a while: written into the live Parameters, which DDP holds
    lora.set_adapter(ddp, "b")
    with torch.no_grad():
        ddp(torch.randn(3, 8))
    lora.mark_only_lora_as_trainable(ddp)  # train b again: the Parameters DDP holds must stay
    lora.set_adapter(ddp, "b")
    before = net[0].lora_B.detach().clone()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 + rank))  # each rank its own data
    for _ in range(2):
        opt.zero_grad()
        ddp(x).square().mean().backward()
        opt.step()
    held = {id(p) for p in opt.param_groups[0]["params"]}  # the Parameters DDP was built with
    out = {"held": id(net[0].lora_A) in held and id(net[0].lora_B) in held,
           "trained": not torch.equal(net[0].lora_B, before),
           "A": net[0].lora_A.detach().clone(), "B": net[0].lora_B.detach().clone()}
    del ddp, opt  # DDP's reducer gone before the process group
    return out


def test_serving_then_training_under_ddp_keeps_the_parameters_ddp_synchronises():
    """Each adapter getting its own Parameters back (mark_only_lora_as_trainable, set_adapter) must not happen
    under DistributedDataParallel, which synchronises the Parameters it was built with: the ranks would train
    unsynchronised copies (2 gloo ranks, different data: the factors must agree after the steps)."""
    from dist import run_ranks
    results = run_ranks(_ddp_serve_then_train)
    assert all(r["held"] and r["trained"] for r in results), results
    assert torch.equal(results[0]["A"], results[1]["A"]) and torch.equal(results[0]["B"], results[1]["B"])


def test_load_state_dict_assign_while_parameters_are_lent_keeps_every_adapter():
    """A serving switch lends b's own Parameters to `default`; load_state_dict(assign=True) then puts new tensors
    in their place. The layer must forget the loan: before, the next trainable switch wrote b's values into the
    assigned tensors (default's loaded factors lost, silently)."""
    g = torch.Generator().manual_seed(3)
    layer = lora.Linear(8, 6, r=2)
    add_random_adapter(layer, "b", 2, 1.0, g)
    lora.mark_only_lora_as_trainable(layer)
    layer.set_adapter("b")  # b's own Parameters, trainable
    b_values = tuple(t.detach().clone() for t in layer.get_adapter("b")[:2])
    layer.requires_grad_(False)
    layer.set_adapter("default")  # a serving switch: b's Parameters now serve default
    loaded = {k: v.clone() for k, v in layer.state_dict().items()}
    loaded["lora_A"], loaded["lora_B"] = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    layer.load_state_dict(loaded, assign=True)
    lora.mark_only_lora_as_trainable(layer)
    layer.set_adapter("b")
    assert torch.equal(layer.lora_A, b_values[0]) and torch.equal(layer.lora_B, b_values[1])
    A, B, _ = layer.get_adapter("default")
    assert torch.equal(A, loaded["lora_A"]) and torch.equal(B, loaded["lora_B"])


def _large_rows_embedding(seed):
    """An Embedding whose rows (and adapter) are N(0, 4): rows past max_norm=1, which a lookup would renormalise."""
    torch.manual_seed(seed)
    layer = lora.Embedding(10, 4, r=2, lora_alpha=4)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 2)
    return layer


def test_max_norm_set_on_a_merged_embedding_is_refused_before_the_lookup_renormalises():
    # a merged Embedding given max_norm afterwards: nn.Embedding's lookup would renormalise the merged rows in place
    # (1.27 off the unmerged output, and the base's rows 1.89 off after train()); refused, the weight untouched
    layer = _large_rows_embedding(0)
    base = layer.weight.detach().clone()
    layer.eval()
    merged = layer.weight.detach().clone()
    layer.max_norm = 1.0
    with pytest.raises(ValueError, match="max_norm was set while adapter 'default' is merged"):
        layer(torch.tensor([1, 2, 3]))
    assert torch.equal(layer.weight, merged)
    layer.train()
    torch.testing.assert_close(layer.weight.detach(), base, rtol=0, atol=1e-6)
    ids = torch.tensor([1, 2, 3])
    rows = base.double()[ids]
    norms = rows.norm(dim=1, keepdim=True)
    rows = torch.where(norms > 1.0, rows / (norms + 1e-7), rows)  # (torch's renorm: the base's rows, as loralib's)
    ref = rows + layer.scaling * layer.lora_A.double().t()[ids] @ layer.lora_B.double().t()
    with torch.no_grad():
        out = layer(ids)  # served unmerged
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_max_norm_set_on_a_merged_embedding_is_refused_in_a_mixed_batch_too():
    # mixed batches call the weight-alone forward straight: it renormalised the merged rows in place (11.9 off)
    layer = _large_rows_embedding(1)
    layer.add_adapter("b", torch.randn(2, 10), torch.randn(4, 2), 1.0)
    layer.requires_grad_(False)
    layer.eval()
    merged = layer.weight.detach().clone()
    layer.max_norm = 1.0
    with torch.no_grad(), pytest.raises(ValueError, match="max_norm was set while adapter 'default' is merged"):
        with lora.batch_adapters(layer, ["default", "b"]):
            layer(torch.tensor([1, 2]))
    assert torch.equal(layer.weight, merged)
