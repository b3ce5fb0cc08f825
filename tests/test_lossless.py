"""Lossless merges (docs/LOSSLESS.md) on the CPU reference: merge, unmerge and switch give the base weight back
bit for bit, for every dtype, layout and layer kind; a switched weight is bit-identical to a fresh merge."""
import copy
import pickle
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import lora_ext as lora
from lora_ext import lossless, ops

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def bits(t):
    return t.detach().contiguous().view(_INT[t.dtype]).clone()


def assert_same_bits(a, b, what):
    diff = (bits(a) != bits(b))
    assert not diff.any(), f"{what}: {int(diff.sum())} of {diff.numel()} elements differ in their bits"


def layout_case(kind, out_f, in_f):
    """(weight shape, layout kwargs, A shape, B shape) for a layout kind."""
    if kind == "plain":
        return (out_f, in_f), {}, (in_f,), out_f
    if kind == "transposed":
        return (in_f, out_f), {"transposed": True}, (in_f,), out_f
    # MergedLinear: 3 blocks of out_f rows, blocks 0 and 2 enabled
    return (3 * out_f, in_f), {"num_blocks": 3, "block_ids": [0, 2]}, (in_f,), 2 * out_f


def make(kind, out_f, in_f, r, dtype, fdtype, w_scale, ad_scale, seed):
    g = torch.Generator().manual_seed(seed)
    shape, layout, (k,), b_rows = layout_case(kind, out_f, in_f)
    n = len(layout.get("block_ids", [0]))
    W = (torch.randn(shape, generator=g, dtype=torch.float64) * w_scale).to(dtype)

    def adapter():
        A = (torch.randn(n * r, k, generator=g, dtype=torch.float64) * ad_scale).to(fdtype)
        B = (torch.randn(b_rows, r, generator=g, dtype=torch.float64) * ad_scale).to(fdtype)
        return A, B, 2.0

    return W, layout, adapter


def delta64(A, B, s, shape, layout):
    """The float64 update in W's storage layout, written independently of lora_ext."""
    out = torch.zeros(shape, dtype=torch.float64)
    G = layout.get("num_blocks", 1)
    ids = layout.get("block_ids", [0])
    tr = layout.get("transposed", False)
    n = len(ids)
    r = A.shape[0] // n
    nb = (shape[1] if tr else shape[0]) // G
    for j, e in enumerate(ids):
        d = s * (B.double()[j * nb:(j + 1) * nb] @ A.double()[j * r:(j + 1) * r])
        if tr:
            out[:, e * nb:(e + 1) * nb] = d.t()
        else:
            out[e * nb:(e + 1) * nb] = d
    return out


def check_merged_values(Wm, W0, A, B, s, layout):
    """Each merged element is W + s B A rounded (within one unit in the last place of the merged value, the
    fp32 sum and the rounding), and elements outside the enabled blocks are unchanged bit for bit."""
    d = delta64(A, B, s, tuple(W0.shape), layout)
    # the enabled blocks (where a merge writes, if only -0 + 0 = +0)
    touched = delta64(torch.ones_like(A, dtype=torch.float64), torch.ones_like(B, dtype=torch.float64), 1.0,
                      tuple(W0.shape), layout) != 0
    want = W0.double() + d
    finite = torch.isfinite(want) & torch.isfinite(Wm.double())
    ulp = torch.finfo(W0.dtype).eps * want.abs().clamp_min(torch.finfo(W0.dtype).tiny)
    # the fp32 sum over the rank errs by at most (r + 2) units of fp32 in sum |s b_i a_i|
    r = A.shape[0] // len(layout.get("block_ids", [0]))
    sum_abs = delta64(A.abs(), B.abs(), abs(s), tuple(W0.shape), layout)
    err = (Wm.double() - want).abs()
    bound = 2 * ulp + (r + 2) * 2.0 ** -24 * sum_abs
    assert (err[finite] <= bound[finite]).all(), "merged values off"
    assert_same_bits(Wm[~touched], W0[~touched], "outside the update")


# -------------------------------------------------------------------------------------------------------------
# ops level, property-based


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["plain", "transposed", "blocks"]), dtype=st.sampled_from(DTYPES),
       same_dtype_factors=st.booleans(), out_f=st.integers(1, 37), in_f=st.integers(1, 41), r=st.integers(1, 9),
       log_scale=st.integers(-12, 3), specials=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_merge_unmerge_swap_give_the_base_back_bit_for_bit(kind, dtype, same_dtype_factors, out_f, in_f, r,
                                                           log_scale, specials, seed):
    fdtype = dtype if same_dtype_factors else torch.float32
    # log_scale sweeps the update from 1e-12 of |W| up to a thousand times |W|
    W0, layout, adapter = make(kind, out_f, in_f, r, dtype, fdtype, 0.02, 10.0 ** (log_scale / 2) * 0.1, seed)
    if specials:
        flat = W0.view(-1)
        g = torch.Generator().manual_seed(seed)
        picks = torch.randperm(flat.numel(), generator=g)[:8]
        vals = [0.0, -0.0, torch.finfo(dtype).tiny / 4, -torch.finfo(dtype).tiny / 8, 1e-3, -1e-3, 3.0, -0.0]
        for p, v in zip(picks.tolist(), vals):
            flat[p] = v
    (A1, B1, s1), (A2, B2, s2) = adapter(), adapter()
    W = W0.clone()
    try:
        rec = ops.merge_(W, A1, B1, s1, lossless=True, **layout)
    except lossless.ExceptionOverflow:
        assert_same_bits(W, W0, "a refused merge")
        return
    check_merged_values(W, W0, A1, B1, s1, layout)
    n, rows, cols, _ = lossless.region(W0, layout.get("num_blocks", 1), layout.get("block_ids", [0]),
                                       layout.get("transposed", False))
    assert rec.exceptions <= lossless.exception_limit(n * rows * cols)
    fresh = W0.clone()
    try:
        ops.merge_(fresh, A2, B2, s2, lossless=True, **layout)
        fresh_refused = False
    except lossless.ExceptionOverflow:
        fresh_refused = True  # then the swap (the same base, the same new adapter) is refused too
    try:
        rec2 = ops.swap_(W, A1, B1, s1, A2, B2, s2, record=rec, **layout)
        assert not fresh_refused, "a swap merged what a fresh merge refuses"
    except lossless.ExceptionOverflow as err:
        assert fresh_refused, "a swap refused what a fresh merge takes"
        assert_same_bits(W, W0.clone().copy_(W), "a refused swap")  # (shape check)
        fresh1 = W0.clone()
        ops.merge_(fresh1, A1, B1, s1, lossless=True, **layout)
        assert_same_bits(W, fresh1, "a refused swap leaves the old merge")
        rec2, A2, B2, s2 = err.record, A1, B1, s1
    else:
        assert_same_bits(W, fresh, "swap vs a fresh merge")
    ops.unmerge_(W, A2, B2, s2, record=rec2, **layout)
    assert_same_bits(W, W0, "unmerge after swap")


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_weight_under_a_nonzero_update_overflows_and_changes_nothing(dtype):
    W0 = torch.zeros(64, 80, dtype=dtype)
    A, B = torch.randn(4, 80), torch.randn(64, 4)
    W = W0.clone()
    with pytest.raises(lossless.ExceptionOverflow, match=r"5120 exceptions .* over the limit of 1280"):
        ops.merge_(W, A, B, 1.0, lossless=True)
    assert_same_bits(W, W0, "refused merge")
    # a swap that would overflow puts the old merge back
    W1 = (torch.randn(64, 80) * 0.02).to(dtype)
    A1, B1 = torch.randn(4, 80) * 0.01, torch.randn(64, 4) * 0.01
    W = W1.clone()
    rec = ops.merge_(W, A1, B1, 1.0, lossless=True)
    merged = W.clone()
    with pytest.raises(lossless.ExceptionOverflow):
        ops.swap_(W, A1, B1, 1.0, A * 1e4, B, 1.0, record=rec)
    assert_same_bits(W, merged, "refused swap")
    ops.unmerge_(W, A1, B1, 1.0, record=rec)
    assert_same_bits(W, W1, "base after a refused swap")


def test_record_made_for_another_weight_is_refused_before_writing():
    W = torch.randn(16, 8).bfloat16()
    A, B = torch.randn(2, 8) * 0.01, torch.randn(16, 2) * 0.01
    rec = ops.merge_(W, A, B, 1.0, lossless=True)
    other = torch.randn(8, 16).bfloat16()
    before = other.clone()
    with pytest.raises(ValueError, match="record was made for a torch.bfloat16 weight of shape"):
        ops.unmerge_(other, B.t().contiguous(), A.t().contiguous(), 1.0, record=rec)
    assert_same_bits(other, before, "refused unmerge")
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        ops.merge_(torch.zeros(4, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64),
                   torch.zeros(4, 1, dtype=torch.float64), 1.0, lossless=True)


def test_record_size_is_an_eighth_of_a_16_bit_weight():
    W = (torch.randn(256, 512) * 0.02).bfloat16()
    A, B = torch.randn(16, 512) * 0.01, torch.randn(256, 16) * 0.01
    rec = ops.merge_(W, A, B, 2.0, lossless=True)
    assert rec.codes.numel() * rec.codes.element_size() == W.numel() // 4 * 1  # 2 bits per element
    assert rec.codes.numel() == W.numel() // 4


# -------------------------------------------------------------------------------------------------------------
# layers


def _layers(dtype):
    torch.manual_seed(0)
    return {
        "Linear": lora.Linear(24, 20, r=4, lora_alpha=8, lossless=True),
        "Linear fan_in_fan_out": lora.Linear(24, 20, r=4, lora_alpha=8, fan_in_fan_out=True, lossless=True),
        "MergedLinear": lora.MergedLinear(24, 30, r=2, lora_alpha=4, enable_lora=[True, False, True],
                                          lossless=True),
        "Embedding": lora.Embedding(30, 12, r=3, lora_alpha=6, lossless=True),
        "Conv1d": lora.Conv1d(4, 6, kernel_size=3, r=2, lora_alpha=4, lossless=True),
        "Conv2d": lora.Conv2d(3, 4, kernel_size=3, r=2, lora_alpha=4, lossless=True),
        "Conv3d": lora.Conv3d(2, 3, kernel_size=2, r=2, lora_alpha=4, lossless=True),
    }


def _adapters(layer, count, seed):
    g = torch.Generator().manual_seed(seed)
    (ra, ca), (rb, cb) = layer.factor_shapes(layer.r)
    return [(torch.randn(ra, ca, generator=g) * 0.3, torch.randn(rb, cb, generator=g) * 0.3, 0.5 + i)
            for i in range(count)]


def _weight(layer):
    return layer.weight_2d()


def _fresh(layer, W0, adapter):
    """A copy of the layer holding the base W0, with `adapter` merged once."""
    other = copy.deepcopy(layer)
    other.train()
    with torch.no_grad():
        _weight(other).copy_(W0)
    other.add_adapter("fresh", *adapter)
    other.set_adapter("fresh")
    other.eval()
    return _weight(other)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(_layers(torch.float32)))
def test_every_layer_kind_switches_and_unmerges_exactly(name, dtype):
    layer = _layers(dtype)[name].to(dtype)
    layer.requires_grad_(False)
    W0 = bits(_weight(layer)).view(dtype).clone()
    ads = _adapters(layer, 3, 1)
    for i, ad in enumerate(ads):
        layer.add_adapter(f"a{i}", *ad)
    layer.set_adapter("a0")
    layer.eval()
    assert layer.merged and layer._merged_record is not None
    for name_ in ["a1", "a2", "a0", "a2", "a1"]:
        layer.set_adapter(name_)
    assert_same_bits(_weight(layer), _fresh(layer, W0, ads[1]), "switched vs fresh merge")
    # state_dict while merged holds the exact base; pickle, deepcopy and .to() carry the record
    sd = layer.state_dict()
    assert_same_bits(layer._as_2d(sd[layer._weight_key]), W0, "state_dict while merged")
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        copied.train()
        assert_same_bits(_weight(copied), W0, "a copy's base")
    layer.float()
    layer.to(dtype)
    assert layer.merged
    assert_same_bits(_weight(layer), _fresh(layer, W0, ads[1]), "after .float() and back")
    # loading into a merged layer: the base loaded, the adapter merged again
    layer.load_state_dict(sd)
    layer.train()
    assert_same_bits(_weight(layer), W0, "train() after everything")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_default_is_lossless_for_16_bit_weights_and_lossy_for_float32(dtype):
    lin = lora.Linear(16, 8, r=2).to(dtype)
    lin.eval()
    assert lin._merged_record is not None
    lin32 = lora.Linear(16, 8, r=2)
    lin32.eval()
    assert lin32._merged_record is None
    off = lora.Linear(16, 8, r=2, lossless=False).to(dtype)
    off.eval()
    assert off._merged_record is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ten_thousand_switches_over_eight_adapters(dtype):
    torch.manual_seed(1)
    lin = lora.Linear(32, 24, r=4, lora_alpha=8).to(dtype)
    lin.requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 32) * 0.02)
    W0 = lin.weight.detach().clone()
    ads = _adapters(lin, 8, 2)
    ads = [(A / 30, B / 30, s) for A, B, s in ads]  # A, B ~ N(0, 0.01) as in the issue
    for i, ad in enumerate(ads):
        lin.add_adapter(f"a{i}", *ad)
    lin.set_adapter("a0")
    lin.eval()
    rng = random.Random(3)
    for step in range(1, 10_001):
        lin.set_adapter(f"a{rng.randrange(8)}")
        if step in (10, 100, 1000, 5000, 10_000):
            i = int(lin.active_adapter[1:])
            assert_same_bits(lin.weight, _fresh(lin, W0, ads[i]), f"after {step} switches")
    lin.train()
    assert_same_bits(lin.weight, W0, "the base after 10,000 switches")


def test_lossless_true_on_float64_is_refused_with_the_layer_named():
    # (eval() leaves it unmerged with a warning, as its other refusals, so that a model's eval() never stops half
    # way; merge() refuses)
    lin = lora.Linear(8, 4, r=2, lossless=True).double()
    with pytest.raises(ValueError, match=r"Linear\(8, 4\).*lossless=True takes float16, bfloat16 or float32"):
        lin.merge()
    with pytest.warns(UserWarning, match="lossless=True takes float16, bfloat16 or float32"):
        lin.eval()
    assert not lin.merged and not lin.training


# -------------------------------------------------------------------------------------------------------------
# inject, load_peft_adapter, unload


def _tiny_model(dtype):
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8)).to(dtype)
    return model


@pytest.mark.parametrize("flag", [None, True, False])
def test_inject_and_unload_follow_the_lossless_switch(flag):
    model = _tiny_model(torch.bfloat16)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora.inject(model, ["0", "2"], r=4, lora_alpha=8, lossless=flag)
    for m in model.modules():
        if isinstance(m, lora.LoRALayer):
            torch.nn.init.normal_(m.lora_B, std=0.3)
    model.eval()
    records = [m._merged_record for m in model.modules() if isinstance(m, lora.LoRALayer)]
    assert all((r is not None) == (flag is not False) for r in records)
    lora.unload(model, merge=False)
    if flag is not False:
        for n, p in model.named_parameters():
            assert_same_bits(p, base[n], n)
    with pytest.raises(ValueError, match="lossless must be None, True or False"):
        lora.inject(_tiny_model(torch.float32), ["0"], lossless="yes")


def test_load_peft_adapter_sets_lossless_and_switches_exactly(tmp_path):
    peft = pytest.importorskip("peft")
    model = _tiny_model(torch.float32)
    paths = []
    for i in range(2):
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False)
        pm = peft.get_peft_model(copy.deepcopy(model), cfg)
        pm.save_pretrained(tmp_path / f"a{i}")
        paths.append(tmp_path / f"a{i}")
    served = model.to(torch.float16)
    base = {n: p.detach().clone() for n, p in served.named_parameters()}
    lora.load_peft_adapter(served, paths[0], "a0", lossless=True)
    lora.load_peft_adapter(served, paths[1], "a1", activate=False)
    served.eval()
    for name in ["a1", "a0", "a1"] * 5:
        lora.set_adapter(served, name)
    lora.set_adapter(served, "a0")
    served.train()
    for n, p in served.named_parameters():
        if n in base:
            assert_same_bits(p, base[n], n)


def test_a_refused_lossless_merge_names_the_layer_and_changes_nothing():
    lin = lora.Linear(40, 32, r=2, lora_alpha=2).to(torch.bfloat16)
    lin.requires_grad_(False)
    lin.weight.zero_()  # every element is an exception under a nonzero update
    lin.lora_B.normal_()
    before = lin.weight.clone()
    # eval() leaves it unmerged with a warning (a model's eval() does not stop there); merge() refuses
    with pytest.warns(UserWarning, match=r"eval\(\) leaves adapter 'default' unmerged: Linear\(40, 32\) adapter "
                                         r"'default': merge_: a lossless merge would need 1280 exceptions"):
        lin.eval()
    assert not lin.merged and lin._merged_record is None
    with pytest.raises(lossless.ExceptionOverflow, match=r"Linear\(40, 32\) adapter 'default': merge_: a lossless "
                                                         r"merge would need 1280 exceptions"):
        lin.merge()
    assert not lin.merged and lin._merged_record is None
    assert_same_bits(lin.weight, before, "refused merge")
    out = lin(torch.randn(3, 40).bfloat16())  # unmerged: forwards add the adapter on the fly
    assert torch.isfinite(out).all()
    # a switch to such an adapter, merged, is refused and keeps the old one merged
    lin2 = lora.Linear(40, 32, r=2, lora_alpha=2).to(torch.bfloat16)
    lin2.requires_grad_(False)
    lin2.lora_B.normal_(std=0.01)
    lin2.add_adapter("huge", lin2.lora_A * 1e4, torch.randn(32, 2), 1.0)
    lin2.eval()
    merged = lin2.weight.clone()
    with pytest.raises(lossless.ExceptionOverflow, match=r"switching from adapter 'default'"):
        lin2.set_adapter("huge")
    assert lin2.active_adapter == "default" and lin2.merged
    assert_same_bits(lin2.weight, merged, "refused switch")


# -------------------------------------------------------------------------------------------------------------
# on the kernels (a GPU, or the simulator standing in with --sim-as-cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["Linear", "Linear fan_in_fan_out", "MergedLinear", "Embedding", "Conv2d"])
def test_cuda_every_layer_kind_switches_and_unmerges_exactly(cuda, name, dtype):
    layer = _layers(dtype)[name].to(cuda.device, dtype)
    layer.requires_grad_(False)
    W0 = _weight(layer).detach().clone()
    ads = [(A.to(cuda.device), B.to(cuda.device), s) for A, B, s in _adapters(layer, 3, 5)]
    for i, ad in enumerate(ads):
        layer.add_adapter(f"a{i}", *ad)
    layer.set_adapter("a0")
    layer.eval()
    assert layer._merged_record is not None and layer._merged_record.codes.device == W0.device
    for name_ in ["a1", "a2", "a0", "a2"] * 5:
        layer.set_adapter(name_)
    assert_same_bits(_weight(layer).cpu(), _fresh(layer, W0, ads[2]).cpu(), "switched vs fresh merge")
    assert_same_bits(layer.state_dict()[layer._weight_key].cpu(), layer._as_2d(W0).cpu().view_as(
        layer.state_dict()[layer._weight_key].cpu()), "state_dict while merged")
    layer.train()
    cuda.synchronize()
    assert_same_bits(_weight(layer).cpu(), W0.cpu(), "base after 20 switches")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["plain", "transposed", "blocks"])
def test_cuda_records_cross_backends(cuda, kind, dtype):
    """A record the kernels write is read exactly by the CPU reference, and the reverse."""
    W0, layout, adapter = make(kind, 45, 70, 5, dtype, torch.float32, 0.02, 0.05, 7)
    A, B, s = adapter()
    num_blocks, ids, tr = layout.get("num_blocks", 1), layout.get("block_ids", [0]), layout.get("transposed", False)
    # kernels -> CPU
    W = W0.to(cuda.device)
    rec = ops.merge_(W, A.to(cuda.device), B.to(cuda.device), s, lossless=True, **layout)
    cuda.synchronize()
    W_cpu = W.cpu()
    lossless.unmerge_(W_cpu, A, B, s, rec.to("cpu"), num_blocks, ids, tr)
    assert_same_bits(W_cpu, W0, "kernel record read by the CPU")
    # CPU -> kernels
    W_cpu = W0.clone()
    rec = lossless.merge_(W_cpu, A, B, s, num_blocks, ids, tr)
    W = W_cpu.to(cuda.device)
    ops.unmerge_(W, A.to(cuda.device), B.to(cuda.device), s, record=rec.to(cuda.device), **layout)
    cuda.synchronize()
    assert_same_bits(W.cpu(), W0, "CPU record read by the kernels")


@pytest.mark.gpu
def test_cuda_random_walk_of_switches(cuda):
    switches = 200 if cuda.rehearsal else 10_000
    torch.manual_seed(2)
    lin = lora.Linear(40, 24, r=4, lora_alpha=8).to(cuda.device, torch.bfloat16)
    lin.requires_grad_(False)
    W0 = lin.weight.detach().clone()
    ads = [(A.to(cuda.device) / 30, B.to(cuda.device) / 30, s) for A, B, s in _adapters(lin, 8, 3)]
    for i, ad in enumerate(ads):
        lin.add_adapter(f"a{i}", *ad)
    lin.set_adapter("a0")
    lin.eval()
    rng = random.Random(5)
    for step in range(1, switches + 1):
        lin.set_adapter(f"a{rng.randrange(8)}")
    i = int(lin.active_adapter[1:])
    assert_same_bits(lin.weight.cpu(), _fresh(lin, W0, ads[i]).cpu(), f"after {switches} switches")
    lin.train()
    assert_same_bits(lin.weight.cpu(), W0.cpu(), "the base")
