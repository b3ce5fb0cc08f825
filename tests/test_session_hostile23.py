"""Bugs found by the thirtieth session's hostile testers, each shown failing on the code before its fix."""
import pytest
import torch
import torch.nn.functional as F

import lora_ext as lora

CONVS = {1: lora.Conv1d, 2: lora.Conv2d, 3: lora.Conv3d}


def _conv64(layer, x):
    """The layer's unmerged forward in float64 by plain torch: conv(x, W + scaling * (B A).view(W.shape)) + bias."""
    w = layer.conv.weight.double()
    w = w + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double()).view(w.shape)
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
    bias = layer.conv.bias
    return conv(x.double(), w, None if bias is None else bias.double())


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_an_unmerged_float16_conv_adds_an_update_past_float16_to_its_weight_once(dims):
    # W = -60000 and an update of +120000 (past float16's 65504) with W + update = 60000: the forward rounded the
    # update to float16 first (inf) and gave inf; now W + update is added in float32 and rounded once, as a merge
    layer = CONVS[dims](2, 2, 1, r=1, lora_alpha=1)
    layer.conv.half()
    with torch.no_grad():
        layer.conv.weight.fill_(-60000.0)
        layer.conv.bias.zero_()
        layer.lora_A.fill_(300.0)
        layer.lora_B.fill_(400.0)
    x = torch.full((1, 2) + (3,) * dims, 1e-3, dtype=torch.float16)
    layer.train()
    with torch.no_grad():
        y = layer(x)
    ref = _conv64(layer, x)
    assert torch.isfinite(y).all(), y
    assert ((y.double() - ref).abs() / ref.abs()).max() < 2e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_an_unmerged_16_bit_conv_rounds_its_weight_once(dtype):
    # W = 1, update 2**-e (1 + 2**-12) with e one past the dtype's last bit at 1: rounded alone the update is
    # 2**-e, and 1 + 2**-e is a tie that rounds to 1; rounded once, the sum is 1 + 2**-(e-1), the float64 answer
    e = 11 if dtype == torch.float16 else 8
    layer = lora.Conv2d(1, 1, 1, r=1, lora_alpha=1, bias=False)
    layer.conv.to(dtype)  # float32 factors on a 16-bit weight (the layers' default)
    with torch.no_grad():
        layer.conv.weight.fill_(1.0)
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(2.0 ** -e * (1 + 2.0 ** -12))
    assert layer.lora_B.item() == 2.0 ** -e * (1 + 2.0 ** -12)
    x = torch.ones(1, 1, 1, 1, dtype=dtype)
    with torch.no_grad():
        y = layer.train()(x)
    want = torch.tensor(1 + 2.0 ** -(e - 1), dtype=dtype)
    assert _conv64(layer, x).to(dtype).item() == want.item()
    assert y.item() == want.item(), (y.item(), want.item())


@pytest.mark.parametrize("name,dims", [("Conv1d", 1), ("Conv3d", 3)])
def test_conv1d_conv3d_factor_shapes_differ_from_loralib_as_documented(name, dims):
    # README, "What is different from loralib": A is (r*k, in*k^(d-1)); loralib's (r*k, in*k) does not load
    loralib = pytest.importorskip("loralib")
    ours, theirs = getattr(lora, name)(4, 6, 3, r=2), getattr(loralib, name)(4, 6, 3, r=2)
    assert tuple(ours.lora_A.shape) == (6, 4 * 3 ** (dims - 1)) and tuple(ours.lora_B.shape) == (18, 6)
    assert tuple(theirs.lora_A.shape) == (6, 12)
    assert (ours.lora_B @ ours.lora_A).numel() == ours.conv.weight.numel()
    with pytest.raises(RuntimeError, match="size mismatch for lora_A"):
        ours.load_state_dict(theirs.state_dict())


def _fp16_empty_shard_case(rank, world, kind):
    torch.manual_seed(0)
    out_features = 8 if kind == "fsdp" else 3  # fsdp: lora_A (2, 8) on 4 ranks; tp: 3 rows of W on 4 ranks
    net = torch.nn.Sequential(lora.Linear(8, out_features, r=2, lora_alpha=4))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)
    net.half()
    m = net[0]
    w64 = m.weight.double() + m.scaling * m.lora_B.double() @ m.lora_A.double()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)).half()
    ref = x.double() @ w64.t() + m.bias.double()
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard
        fully_shard(net[0])
        fully_shard(net)
        rows = slice(None)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        from lora_ext.parallel import ColwiseLoRA
        parallelize_module(net, init_device_mesh("cpu", (world,)), {"0": ColwiseLoRA()})
        rows = slice(rank, rank + 1)  # torch's uneven split of 3 rows: one each on ranks 0-2, none on rank 3
    empty = (m.lora_A if kind == "fsdp" else m.weight).to_local().numel() == 0
    net.eval()
    with torch.no_grad():
        y = net(x)
    y = y.to_local() if hasattr(y, "to_local") else y
    err = ((y.double() - ref[:, rows]).abs().max() / ref.abs().max()).item() if y.numel() else 0.0
    return empty, m.merged, err


@pytest.mark.parametrize("kind", ["fsdp", "tp"])
def test_float16_merges_with_an_empty_shard_on_some_rank(kind):
    """float16 merges check the weight's range first (max |W| and |A|, |B| over the mesh): DTensor's amax raised on a
    rank whose shard is empty (FSDP2's rank-2 lora_A on 4 ranks; 3 rows of W on 4 tensor-parallel ranks), naming no
    layer, while the other ranks waited in the collective until the process group's timeout."""
    from dist import run_ranks
    got = run_ranks(_fp16_empty_shard_case, kind, world=4, timeout=180)
    assert any(empty for empty, _, _ in got), got
    for rank, (_, merged, err) in enumerate(got):
        assert merged and err < 2e-3, (rank, merged, err)


def _served_error(model, x, plan):
    """max |model(x) - float64 reference| / max |reference| for `plan`: per layer (W, A, B, scaling, bias)."""
    h = x.double()
    for W, A, B, s, b in plan:
        h = h @ (W + s * B @ A).t() + b
    with torch.no_grad():
        out = model(x).double()
    return ((out - h).abs().max() / h.abs().max()).item()


def _two_layers():
    """Two Linear(8, 8, r=2) layers in a Sequential, seeded, with random factors of both."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(lora.Linear(8, 8, r=2, lora_alpha=4), lora.Linear(8, 8, r=2, lora_alpha=4))
    with torch.no_grad():
        for layer in m:
            layer.lora_A.normal_(0, 0.3)
            layer.lora_B.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("merged", [False, True])
def test_layers_sharing_a_live_factor_switch_each_their_own(merged):
    """`m[1].lora_A = m[0].lora_A`, frozen factors, each layer holding its own adapter 'b': the serving switch wrote
    b's A into the shared storage for both layers (0.8 off), and the second layer then kept the first one's b as its
    'default' (2.1 off after switching back, for good). Now a layer whose live factor another layer holds takes
    Parameters of its own."""
    m = _two_layers()
    m[1].lora_A = m[0].lora_A
    d = lambda t: t.detach().double().clone()  # noqa: E731
    plans = {"default": [(d(L.weight), d(m[0].lora_A), d(L.lora_B), L.scaling, d(L.bias)) for L in m], "b": []}
    for L in m:
        A, B = torch.randn(2, 8) * 0.3, torch.randn(8, 2) * 0.3
        L.add_adapter("b", A, B, 1.0)
        plans["b"].append((d(L.weight), A.double(), B.double(), 1.0, d(L.bias)))
        L.lora_A.requires_grad_(False)
        L.lora_B.requires_grad_(False)
    m.train(not merged)
    x = torch.randn(3, 8)
    for name in ("default", "b", "default", "b", "default"):
        lora.set_adapter(m, name)
        assert lora.active_adapter(m) == name
        assert _served_error(m, x, plans[name]) < 1e-6, name
    m.train()
    assert _served_error(m, x, plans["default"]) < 1e-6


def test_a_serving_switch_of_a_layer_leaves_its_copy_copy_serving_its_adapter():
    """README: a copy.copy shares the live factors; switch adapters in one of the two only. Switching the original
    (frozen factors) rewrote the live factors in place under the copy, which went on saying 'default' while serving
    b's factors (0.99 off)."""
    import copy
    torch.manual_seed(0)
    layer = lora.Linear(8, 8, r=2, lora_alpha=4)
    with torch.no_grad():
        layer.lora_A.normal_(0, 0.3)
        layer.lora_B.normal_(0, 0.3)
    d = lambda t: t.detach().double().clone()  # noqa: E731
    default = (d(layer.weight), d(layer.lora_A), d(layer.lora_B), layer.scaling, d(layer.bias))
    A, B = torch.randn(2, 8) * 0.3, torch.randn(8, 2) * 0.3
    layer.add_adapter("b", A, B, 1.0)
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    x = torch.randn(3, 8)
    c = copy.copy(layer)
    live = c.lora_A.data_ptr()
    layer.set_adapter("b")
    assert _served_error(layer, x, [(default[0], A.double(), B.double(), 1.0, default[4])]) < 1e-6
    assert c.active_adapter == "default" and c.lora_A.data_ptr() == live
    assert _served_error(c, x, [default]) < 1e-6


def test_an_unshared_serving_switch_still_writes_the_live_factors_in_place():
    # (the CUDA-graph promise: a same-shape serving switch keeps the live storage)
    layer = lora.Linear(8, 8, r=2)
    layer.add_adapter("b", torch.randn(2, 8), torch.randn(8, 2), 1.0)
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    ptrs = (layer.lora_A.data_ptr(), layer.lora_B.data_ptr())
    layer.set_adapter("b")
    assert (layer.lora_A.data_ptr(), layer.lora_B.data_ptr()) == ptrs


def _layer_kinds():
    return {
        "linear": (lambda: lora.Linear(16, 12, r=4, lora_alpha=8), lambda: torch.randn(5, 16)),
        "embedding": (lambda: lora.Embedding(10, 6, r=3, lora_alpha=6), lambda: torch.randint(0, 10, (2, 4))),
        "merged": (lambda: lora.MergedLinear(8, 6, r=2, lora_alpha=4, enable_lora=[True, False, True]),
                   lambda: torch.randn(5, 8)),
        "conv": (lambda: lora.Conv2d(3, 4, 3, r=2, lora_alpha=4), lambda: torch.randn(2, 3, 5, 5)),
    }


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                    (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("kind", ["linear", "embedding", "merged", "conv"])
def test_a_merged_layer_with_factors_of_two_dtypes_trains_through_its_merge_exactly(kind, dtypes):
    """lora_A bfloat16, lora_B float32 (or other pairs): a merged forward that computes from the live factors
    (autograd recording, after a backward, a substituted factor) cast the merged snapshot's B0 to A's dtype, so
    its part no longer cancelled the merge (0.11 off of 32 for a Linear); now each stack takes the wider dtype."""
    make, inputs = _layer_kinds()[kind]
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        layer.lora_A.normal_()  # (an Embedding's A starts at zero, as loralib's)
        layer.lora_B.normal_()
    layer.lora_A = torch.nn.Parameter(layer.lora_A.detach().to(dtypes[0]))
    layer.lora_B = torch.nn.Parameter(layer.lora_B.detach().to(dtypes[1]))
    x = inputs()
    with torch.no_grad():
        want = layer.train()(x).double()  # unmerged: the low-rank term from the live factors in float32
    layer.eval()
    assert layer.merged
    y = layer(x)  # autograd records: from the merged weight and the live factors
    assert (y.double() - want).abs().max().item() < 1e-4 * want.abs().max().item(), kind
    y.sum().backward()
    with torch.no_grad():  # after a backward through the merge: still from the live factors
        assert (layer(x).double() - want).abs().max().item() < 1e-4 * want.abs().max().item()


def test_a_merged_layer_given_a_narrower_factor_serves_it():
    torch.manual_seed(0)
    layer = lora.Linear(16, 12, r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.requires_grad_(False)
    x = torch.randn(5, 16)
    layer.eval()
    layer.lora_A = torch.nn.Parameter(layer.lora_A.detach().bfloat16(), requires_grad=False)
    with torch.no_grad():
        merged = layer(x).double()
        want = layer.train()(x).double()
    assert (merged - want).abs().max().item() < 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("kind", ["linear", "embedding", "merged"])
def test_a_layer_built_under_inference_mode_forwards_with_gradients_enabled(kind):
    """loralib's layer (and nn.Linear) built under torch.inference_mode() forwards outside it with gradients on:
    torch takes inference tensors as constants. lora_ext's autograd Function tried to save them for a backward and
    raised. (A Conv2d raises in torch's own conv as in nn.Conv2d.)"""
    make, inputs = _layer_kinds()[kind]
    torch.manual_seed(0)
    with torch.inference_mode():
        layer = make()
        layer.lora_B.normal_()
    x = inputs()
    y = layer(x)
    with torch.no_grad():
        want = layer(x)
    assert torch.equal(y, want)


def test_load_peft_adapter_into_an_r0_layer_refuses_naming_the_module(tmp_path):
    import copy

    from peft import LoraConfig, get_peft_model

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.b(self.a(x))
    torch.manual_seed(0)
    base = M()
    get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b"])).save_pretrained(
        str(tmp_path))
    m = copy.deepcopy(base)
    z = lora.Linear(4, 4, r=0)
    z.load_state_dict(base.a.state_dict())
    m.a = z
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="module 'a'.*built with r=0"):
        lora.load_peft_adapter(m, str(tmp_path))
    assert type(m.b) is torch.nn.Linear and all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_a_merged_layer_given_a_meta_factor_refuses_naming_the_devices():
    layer = lora.Linear(6, 4, r=2, lora_alpha=4).eval()
    layer.lora_A = torch.nn.Parameter(torch.empty(2, 6, device="meta"))
    with torch.no_grad(), pytest.raises(ValueError, match="lora_A on meta"):
        layer(torch.randn(3, 6))


@pytest.mark.parametrize("how", ["tie", "copy.copy", "same adapter"])
def test_settling_a_layers_parameters_leaves_a_layer_sharing_them_serving(how):
    """A serving switch lends a layer's live Parameters to the adapter it switched to; mark_only_lora_as_trainable
    (or set_adapter of the active adapter) gives them back to their adapter, writing its values into them in place:
    where another layer held them too (tied, or a copy.copy), it silently served those values (55-70 off)."""
    import copy
    torch.manual_seed(0)
    x = torch.randn(5, 16)

    def make():
        layer = lora.Linear(16, 12, r=4, lora_alpha=8, merge_weights=False)
        with torch.no_grad():
            layer.lora_B.normal_()
            layer.lora_A.normal_()
        layer.add_adapter("b", torch.randn(4, 16), torch.randn(12, 4), 2.0)
        layer.lora_A.requires_grad_(False)
        layer.lora_B.requires_grad_(False)
        return layer.eval()
    l1 = make()
    l1.set_adapter("b")
    l2 = copy.copy(l1) if how == "copy.copy" else make()
    if how != "copy.copy":
        l2.lora_A = l1.lora_A
        l2.lora_B = l1.lora_B
    with torch.no_grad():
        want = l2(x).clone()
    if how == "same adapter":
        l1.lora_A.requires_grad_(True)
        l1.set_adapter("b")
    else:
        lora.mark_only_lora_as_trainable(torch.nn.Sequential(l1))
    with torch.no_grad():
        assert torch.equal(l2(x), want)


def _two_tied(tie="lora_B", trainable=True):
    m = _two_layers()
    for layer in m:
        layer.add_adapter("b", torch.randn(2, 8) * 0.3, torch.randn(8, 2) * 0.3, 1.0)
    if trainable:
        lora.mark_only_lora_as_trainable(m)
    else:
        for p in m.parameters():
            p.requires_grad_(False)
    setattr(m[1], tie, getattr(m[0], tie))
    return m


def _refs(m, x):
    """float64 outputs of each layer under each adapter it holds, by plain torch, from the values now."""
    want = {}
    for i, layer in enumerate(m):
        W, b = layer.weight.detach().double(), layer.bias.detach().double()
        for n in layer.adapter_names:
            A, B, s = (layer.lora_A, layer.lora_B, layer.scaling) if n == layer.active_adapter else layer.get_adapter(n)
            want[i, n] = x.double() @ (W + s * B.detach().double() @ A.detach().double()).t() + b
    return want


def test_a_serving_switch_does_not_write_a_factor_another_layer_keeps_as_a_stored_adapter():
    """m[1].lora_B = m[0].lora_B; m[0]'s trainable switch keeps its default pair (the tied lora_B) aside; a later
    serving switch of m[1] wrote b's lora_B into it in place: m[0]'s default came back 2.12 off."""
    m = _two_tied()
    x = torch.randn(3, 8)
    want = _refs(m, x)
    m[0].set_adapter("b")
    for p in m.parameters():
        p.requires_grad_(False)
    m[1].set_adapter("b")
    m[0].set_adapter("default")
    for i, layer in enumerate(m):
        with torch.no_grad():
            assert (layer(x).double() - want[i, layer.active_adapter]).abs().max() < 1e-5, i


def test_reloading_an_inactive_adapters_own_pair_does_not_write_a_factor_another_layer_serves():
    """m[0].lora_A = m[1].lora_A; m[1]'s trainable switch keeps its default pair aside; add_adapter reloading m[1]'s
    inactive default wrote the new values into the tied lora_A, which m[0] serves (11.9 off, no warning)."""
    torch.manual_seed(0)
    m = _two_tied(tie="lora_A")
    m[0].lora_A = m[1].lora_A
    x = torch.randn(3, 8)
    want = _refs(m, x)
    m[1].set_adapter("b")
    m[1].add_adapter("default", torch.randn(2, 8), torch.randn(8, 2), 1.0)
    with torch.no_grad():
        assert (m[0](x).double() - want[0, "default"]).abs().max() < 1e-5


def test_an_exported_program_over_tied_factors_serves_one_adapter_whole_after_a_switch():
    """m[1].lora_A = m[0].lora_A, torch.export, then lora.set_adapter(model, 'b'): the first layer took Parameters of
    its own, then the second (alone with the tied one) wrote its b lora_A in place, which the program reads for
    layer 0: the program served layer 1's b lora_A with layer 0's default lora_B (1.4-2.7 off every adapter).
    A Parameter once tied is never written in place again: the program serves default whole (export again)."""
    m = _two_tied(tie="lora_A", trainable=False)
    x = torch.randn(3, 8)
    d = lambda t: t.detach().double().clone()  # noqa: E731
    plans = {n: [(d(L.weight), *(d(t) for t in (L.get_adapter(n)[:2] if n != L.active_adapter
                                                  else (L.lora_A, L.lora_B))),
                  L.get_adapter(n)[2] if n != L.active_adapter else L.scaling, d(L.bias)) for L in m]
             for n in ("default", "b")}
    prog = torch.export.export(m, (x,)).module()
    for step in ("b", "default", "b"):
        lora.set_adapter(m, step)
        with torch.no_grad():
            assert _served_error(m, x, plans[step]) < 1e-6, step
            assert _served_error(prog, x, plans["default"]) < 1e-6, step


def test_reserve_rank_over_tied_factors_refuses_before_writing():
    """reserve_rank padded the shared lora_A through the first layer, skipped the second's live pad (its A had the
    rank already) and left it with a (4, 8) A beside an (8, 2) B: every later forward raised."""
    m = _two_tied(tie="lora_A", trainable=False)
    shapes = [(tuple(L.lora_A.shape), tuple(L.lora_B.shape)) for L in m]
    with pytest.raises(ValueError, match="shared with another lora_ext layer"):
        lora.reserve_rank(m, 4)
    assert [(tuple(L.lora_A.shape), tuple(L.lora_B.shape)) for L in m] == shapes
    with torch.no_grad():
        m(torch.randn(3, 8))


def test_a_never_tied_layer_keeps_its_in_place_serving_switches_after_tied_layers_died():
    """The shared mark was kept by id: a dead tied Parameter's id given to a new layer's factor took that layer's
    in-place serving switches away (new storage: a program exported before the switch served the old adapter,
    40-76 off). The mark lives on the Parameter now."""
    import gc

    def fresh(seed):
        g = torch.Generator().manual_seed(seed)
        layer = lora.Linear(16, 16, r=4, lora_alpha=8)
        layer.lora_A.requires_grad_(False)
        layer.lora_B.requires_grad_(False)
        layer.add_adapter("b", torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g), 2.0)
        return layer
    moved = 0
    for k in range(30):
        l1, l2 = fresh(0), fresh(1)
        l2.lora_A = l1.lora_A
        l1.set_adapter("b")  # (seen shared: l1 takes Parameters of its own)
        del l1, l2
        gc.collect()
        layer = fresh(100 + k)
        ptrs = (layer.lora_A.data_ptr(), layer.lora_B.data_ptr())
        layer.set_adapter("b")
        moved += (layer.lora_A.data_ptr(), layer.lora_B.data_ptr()) != ptrs
        del layer
        gc.collect()
    assert moved == 0, f"{moved} of 30 never-tied layers lost their in-place serving switch"


def test_mixed_batch_slots_keep_the_bits_of_float32_factors_below_float16s_range():
    """Slots hold the factors in the weight's dtype, scaled by a power of two where they would overflow it; a float32
    A of 1e-6 (float16 subnormals) went in as it was, with 5 bits left: 16x the single-adapter forward's error. Now
    it is scaled up too, and the batch is as exact as for factors of ordinary size (the same 11 bits)."""
    def errors(a_size, scaling):
        torch.manual_seed(0)
        lin = torch.nn.Linear(64, 64).half()
        W, b = lin.weight.detach().clone(), lin.bias.detach().clone()
        m = torch.nn.Sequential(lin)
        lora.inject(m, ["0"], r=4, lora_alpha=4)
        A, B = torch.randn(4, 64) * a_size, torch.randn(64, 4)
        m[0].add_adapter("x", A, B, scaling)
        m[0].add_adapter("y", A.clone(), B.clone(), scaling)
        m.eval()
        lora.unmerge_adapter(m)
        lora.set_adapter(m, "y")
        x = torch.randn(2, 5, 64).half()
        ref = x.double() @ W.double().t() + b.double() + scaling * (x.double() @ A.double().t() @ B.double().t())
        with torch.no_grad():
            with lora.batch_adapters(m, ["x", "x"]):
                batched = m(x)
        return (batched.double() - ref).abs().max().item()
    ordinary, tiny = errors(1e-2, 1.0), errors(1e-6, 1e4)  # the same update, A 2^13 smaller
    assert tiny <= 1.5 * ordinary, (tiny, ordinary)


@pytest.mark.parametrize("a_size", [1e-39, 1e-44])
def test_mixed_batch_slots_take_float32_factors_below_2_to_the_minus_128(a_size):
    """The scale-up of tiny factors multiplied by 2^128 or more, which float32 makes inf: a finite A of 1e-39 (the
    layer's own forward serves it) gave its rows NaN in a batch. The scale is capped at 2^126."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8).half()
    W, b = lin.weight.detach().double(), lin.bias.detach().double()
    m = torch.nn.Sequential(lin)
    lora.inject(m, ["0"], r=2, lora_alpha=2)
    A, B = torch.full((2, 16), a_size), torch.randn(8, 2)
    m[0].add_adapter("tiny", A, B, 1.0)
    m[0].add_adapter("ok", torch.randn(2, 16) * 0.01, torch.randn(8, 2) * 0.01, 1.0)
    m.eval()
    lora.unmerge_adapter(m)
    x = torch.randn(2, 3, 16).half()
    ref = x.double() @ W.t() + b + x.double() @ A.double().t() @ B.double().t()
    with torch.no_grad(), lora.batch_adapters(m, ["tiny", "ok"]):
        y = m(x)
    assert torch.isfinite(y).all()
    assert (y[0].double() - ref[0]).abs().max() < 2e-3
