"""Hostile tests of lossless in-place merges (docs/LOSSLESS.md, README "Lossless merges").

Oracles: the original weight bits (taken before anything ran), float64 arithmetic, and "a pristine copy of the
layer with the adapter merged once" (the promise itself: after any sequence the merged weight is bit-identical to
merging the active adapter once into the original base). Nothing expected is computed from the state under test.
"""
import copy
import pickle
import random
import threading
import warnings

import pytest
import torch
import torch.nn as nn

import lora_ext as lora
from lora_ext import lossless, ops

_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
        torch.float64: torch.int64}


def bits(t):
    return t.detach().contiguous().view(_INT[t.dtype]).clone()


def assert_same_bits(a, b, what):
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    diff = bits(a) != bits(b)
    assert not diff.any(), f"{what}: {int(diff.sum())} of {diff.numel()} elements differ in their bits"


KINDS = {
    "Linear": lambda: lora.Linear(24, 20, r=4, lora_alpha=8),
    "Linear_fifo": lambda: lora.Linear(24, 20, r=4, lora_alpha=8, fan_in_fan_out=True),
    "MergedLinear": lambda: lora.MergedLinear(24, 30, r=2, lora_alpha=4, enable_lora=[True, False, True]),
    "MergedLinear_fifo": lambda: lora.MergedLinear(24, 30, r=2, lora_alpha=4, enable_lora=[True, False, True],
                                                   fan_in_fan_out=True),
    "Embedding_pad": lambda: lora.Embedding(30, 12, r=3, lora_alpha=6, padding_idx=0),
    "Conv1d": lambda: lora.Conv1d(4, 6, kernel_size=3, r=2, lora_alpha=4),
    "Conv2d": lambda: lora.Conv2d(3, 4, kernel_size=3, r=2, lora_alpha=4),
    "Conv3d": lambda: lora.Conv3d(2, 3, kernel_size=2, r=2, lora_alpha=4),
}
LOW = [torch.bfloat16, torch.float16]


def build(kind, dtype, seed=0, lossless_flag=None):
    torch.manual_seed(seed)
    layer = KINDS[kind]()
    layer.lossless = lossless_flag
    layer = layer.to(dtype)
    layer.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    return layer


def rand_adapter(layer, r, g, scale_ad=0.3, s=None):
    (ra, ca), (rb, cb) = layer.factor_shapes(r)
    A = torch.randn(ra, ca, generator=g) * scale_ad
    B = torch.randn(rb, cb, generator=g) * scale_ad
    return A, B, (s if s is not None else float(random.Random(r).choice([0.5, 1.0, 2.0])))


def fresh_merged(pristine, A, B, s):
    """The promise's oracle: a pristine (never merged) copy of the layer, the adapter merged once."""
    c = copy.deepcopy(pristine)
    c.add_adapter(c.active_adapter, A, B, s)
    c.merge()
    assert c.merged
    return c.weight_2d().detach().clone()


def check_close_f64(Wm, W0, A, B, s, layer):
    """Sanity of the oracle itself: merged = W0 + s * dense(B A) within a few units of the dtype (float64)."""
    d = ops.delta_weight(A.double(), B.double(), s, out_features=layer.layout().get("num_blocks", 1) *
                         (B.shape[0] // len(layer.block_ids)), dtype=torch.float64, **layer.layout())
    want = W0.double() + d.view(W0.shape)
    err = (Wm.double() - want).abs()
    tol = 4 * torch.finfo(W0.dtype).eps * (want.abs() + d.abs().view(W0.shape) + 1e-30) + 1e-6
    assert bool((err <= tol).all()), f"merged value off by {float(err.max())}"


# ---------------------------------------------------------------------------------------------------------------
# 1. random sequences of every operation, every layer kind


def _snapshot(layer):
    return (layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.scaling)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("seed", [0, 1])
def test_random_sequences_keep_the_promise(kind, dtype, seed):
    rng = random.Random(seed * 1000 + len(kind))
    g = torch.Generator().manual_seed(seed)
    layer = build(kind, dtype, seed)
    W0 = layer.weight_2d().detach().clone()
    pristine = copy.deepcopy(layer)
    names = ["a0", "a1", "a2"]
    for i, n in enumerate(names):
        layer.add_adapter(n, *rand_adapter(layer, [1, 2, 5][i], g))
    merged_as = None  # what the weight must hold (A, B, s) when merged
    log = []
    for step in range(28):
        op = rng.choice(["eval", "train", "merge", "unmerge", "switch", "switch", "switch", "add_active", "scaling",
                         "inplace", "state_dict", "load", "float_back", "deepcopy", "pickle", "model_switch"])
        log.append(op)
        if op == "eval":
            if not layer.merged:
                merged_as = _snapshot(layer)
            layer.eval()
        elif op == "merge":
            if not layer.merged:
                merged_as = _snapshot(layer)
            layer.merge()
        elif op in ("train", "unmerge"):
            (layer.train if op == "train" else layer.unmerge)()
            merged_as = None
        elif op in ("switch", "model_switch"):
            target = rng.choice([n for n in layer.adapter_names if n != layer.active_adapter])
            A, B, s = layer.get_adapter(target)
            want = (A.clone(), B.clone(), s)
            if op == "switch":
                layer.set_adapter(target)
            else:
                lora.set_adapter(nn.Sequential(layer), target)
            if layer.merged:
                merged_as = want
        elif op == "add_active":  # the active adapter replaced, with another rank, while (maybe) merged
            ad = rand_adapter(layer, rng.choice([1, 3, 6]), g)
            layer.add_adapter(layer.active_adapter, *ad)
            if layer.merged:
                merged_as = ad
        elif op == "scaling":  # takes effect at the next merge; the merged one is what unmerge takes out
            layer.scaling = rng.choice([0.25, 0.5, 3.0, -1.0])
        elif op == "inplace":
            with torch.no_grad():
                layer.lora_A.mul_(1.5)
                layer.lora_B.add_(0.01)
        elif op == "state_dict":
            sd = layer.state_dict()
            assert_same_bits(layer._as_2d(sd[layer._weight_key]), W0, f"state_dict base after {log}")
        elif op == "load":
            sd = layer.state_dict()
            sd["lora_B"] = sd["lora_B"] * 0.5
            layer.load_state_dict(sd)
            if layer.merged:
                merged_as = _snapshot(layer)
        elif op == "float_back":
            layer.float()
            layer.to(dtype)
        elif op == "deepcopy":
            layer = copy.deepcopy(layer)
        elif op == "pickle":
            layer = pickle.loads(pickle.dumps(layer))
        # the invariant after every step
        if layer.merged:
            want = fresh_merged(pristine, *merged_as)
            assert_same_bits(layer.weight_2d(), want, f"merged weight vs one fresh merge after {log}")
        else:
            assert_same_bits(layer.weight_2d(), W0, f"unmerged weight vs base after {log}")
    layer.train()
    assert_same_bits(layer.weight_2d(), W0, f"base after {log}")


@pytest.mark.parametrize("kind", list(KINDS))
def test_fresh_merge_oracle_is_itself_a_correct_merge(kind):
    layer = build(kind, torch.bfloat16)
    W0 = layer.weight_2d().detach().clone()
    A, B, s = rand_adapter(layer, 3, torch.Generator().manual_seed(3))
    Wm = fresh_merged(layer, A, B, s)
    check_close_f64(Wm, W0, A.to(torch.bfloat16), B.to(torch.bfloat16), s, layer)


# ---------------------------------------------------------------------------------------------------------------
# 2. special weight values, huge adapters mid-sequence


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("kind", ["Linear", "Linear_fifo", "MergedLinear", "Embedding_pad", "Conv2d"])
def test_zeros_subnormals_negative_zero_inf_nan_come_back(kind, dtype, nonfinite=False):
    layer = build(kind, dtype)
    w = layer.weight_2d()
    tiny = torch.finfo(dtype).tiny
    vals = [0.0, -0.0, tiny / 4, -tiny / 8, tiny, -0.0, torch.finfo(dtype).max / 4]
    if dtype == torch.bfloat16 or nonfinite:
        vals += [float("inf"), -float("inf"), float("nan")]
    specials = torch.tensor(vals, dtype=dtype)
    with torch.no_grad():
        flat = w.view(-1)
        idx = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(1))[:specials.numel() * 4]
        flat[idx] = specials.repeat(4)
    W0 = w.detach().clone()
    g = torch.Generator().manual_seed(2)
    layer.add_adapter("b", *rand_adapter(layer, 3, g))
    layer.eval()
    for n in ["b", "default", "b"]:
        layer.set_adapter(n)
    assert_same_bits(layer._as_2d(layer.state_dict()[layer._weight_key]), W0, "state_dict")
    layer.train()
    assert_same_bits(layer.weight_2d(), W0, "base with specials")


def test_float16_weight_with_inf_or_nan_merges_like_bfloat16():
    """docs/LOSSLESS.md: non-finite weights are exceptions. A float16 layer whose weight holds one inf or NaN is
    refused by the float16 range check ("a weight of up to nan") at every merge, while bfloat16 merges it."""
    test_zeros_subnormals_negative_zero_inf_nan_come_back("Linear", torch.float16, nonfinite=True)


def _overflow_layer(dtype=torch.bfloat16):
    layer = lora.Linear(48, 40, r=2, lora_alpha=2).to(dtype)
    layer.requires_grad_(False)
    layer.lora_B.normal_(std=0.01)
    g = torch.Generator().manual_seed(0)
    layer.add_adapter("small", torch.randn(2, 48, generator=g) * 0.05, torch.randn(40, 2, generator=g) * 0.05, 1.0)
    # |s B A| ~ 1e2..1e4 on |W| ~ 0.1: exceptions everywhere, yet within float16's range (the range check passes)
    layer.add_adapter("huge", torch.randn(2, 48, generator=g).clamp(-3, 3) * 30,
                      torch.randn(40, 2, generator=g).clamp(-3, 3) * 30, 1.0)
    return layer


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_exception_overflow_mid_sequence_names_the_layer_and_keeps_the_old_merge(dtype):
    layer = _overflow_layer(dtype)
    W0 = layer.weight.detach().clone()
    pristine = copy.deepcopy(layer)
    layer.eval()
    layer.set_adapter("small")
    before = layer.weight.detach().clone()
    with pytest.raises(lossless.ExceptionOverflow, match=r"Linear\(48, 40\).*'small'"):
        layer.set_adapter("huge")
    assert layer.active_adapter == "small" and layer.merged
    assert_same_bits(layer.weight, before, "after the refused switch")
    # model-level: refused too, everything back
    with pytest.raises(lossless.ExceptionOverflow, match=r"Linear\(48, 40\)"):
        lora.set_adapter(nn.Sequential(layer), "huge")
    assert_same_bits(layer.weight, before, "after the refused model-level switch")
    # the huge adapter as the active one (add_adapter while merged): refused, unchanged
    A, B, s = layer.get_adapter("huge")
    with pytest.raises(lossless.ExceptionOverflow, match=r"Linear\(48, 40\)"):
        layer.add_adapter("small", A, B, s)
    assert_same_bits(layer.weight, before, "after the refused add_adapter")
    sm = pristine  # the oracle: never merged
    layer.set_adapter("default")
    layer.set_adapter("small")
    A, B, s = layer.get_adapter("small")
    assert_same_bits(layer.weight, fresh_merged(sm, A, B, s), "merged after the refusals")
    layer.train()
    assert_same_bits(layer.weight, W0, "base after the refusals")


def test_refused_merge_via_train_eval_names_layer_and_changes_nothing_then_unmerged_forward_is_right():
    layer = _overflow_layer()
    layer.set_adapter("huge")
    W0 = layer.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"eval\(\) leaves adapter 'huge' unmerged: Linear\(48, 40\) adapter 'huge'"):
        layer.eval()
    assert not layer.training
    assert not layer.merged
    assert_same_bits(layer.weight, W0, "refused eval")


# ---------------------------------------------------------------------------------------------------------------
# 3. .to() and friends


def _merged_linear16():
    layer = lora.Linear(24, 20, r=4, lora_alpha=8).half()
    layer.requires_grad_(False)
    layer.lora_B.normal_(std=0.3)
    W0 = layer.weight.detach().clone()
    layer.eval()
    assert layer.merged and layer._merged_record is not None
    return layer, W0


def _out64(x, W, layer):
    """float64 forward of W (storage layout) plus bias: the exact output of a merged Linear, up to rounding."""
    return x.double() @ W.double().t() + layer.bias.double()


def test_a_failed_move_to_another_device_leaves_the_layer_merged_and_usable():
    """.to("cuda") on a machine without CUDA raises inside nn.Module._apply. The layer had already unmerged its
    weight and dropped its snapshot, yet says it is merged: forwards lose the adapter and train() crashes."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine where .to('cuda') fails")
    layer, W0 = _merged_linear16()
    merged = layer.weight.detach().clone()
    with pytest.raises((RuntimeError, AssertionError)):
        layer.to("cuda")
    x = torch.randn(3, 24).half()
    out = layer(x)
    want = _out64(x, merged, layer)
    assert (out.double() - want).abs().max() < 1e-2, "forward lost the adapter after a failed .to()"
    layer.train()  # BUG: TypeError: bad operand type for unary -: 'NoneType'
    assert_same_bits(layer.weight, W0, "base after a failed .to()")


def test_dtype_change_of_a_merged_layer_whose_base_weight_requires_grad():
    """_apply unmerges outside torch.no_grad(): a trainable base weight makes .float() raise (unnamed layer)."""
    layer, W0 = _merged_linear16()
    layer.weight.requires_grad_(True)
    layer.float()  # BUG: RuntimeError unmerge_: ... needs torch.no_grad()
    layer.half()
    layer.train()
    assert_same_bits(layer.weight, W0, "base after .float().half()")


@pytest.mark.parametrize("flag", [None, True])
def test_double_then_back_to_half_keeps_the_base(flag):
    """.double() merges again lossy (float64 has no record) and a later .half() converts the merged weight with
    no record: the next unmerge rounds twice and the base is gone."""
    layer, W0 = _merged_linear16()
    layer.lossless = flag
    try:
        layer.double()
    except ValueError as err:  # a refusal is acceptable (lossless=True on float64 must refuse) if it names the layer
        assert flag is True and "Linear(24, 20)" in str(err)
        assert layer.weight.dtype == torch.float16 and layer.merged
        layer.train()
        assert_same_bits(layer.weight, W0, "base after a refused .double()")
        return
    layer.half()
    layer.train()
    assert_same_bits(layer.weight, W0, "base after .double().half()")


def test_lossless_true_layer_moved_to_float64_refuses_like_a_merge_does():
    """A lossless=True layer merged in float64 is refused with the layer named; _apply merged float64 lossy. As
    eval() does, the conversion leaves the layer unmerged with a warning (raising stopped a model's .double() part
    way, its modules before this one converted)."""
    layer, W0 = _merged_linear16()
    layer.lossless = True
    with pytest.warns(UserWarning, match=r"Linear\(24, 20\).*lossless=True"):
        layer.double()
    assert not layer.merged and layer.weight.dtype == torch.float64
    assert_same_bits(layer.weight, W0.double(), "the base, converted")


def test_eval_of_a_float64_lossless_true_layer_refuses_naming_the_layer_and_changes_nothing():
    layer = lora.Linear(24, 20, r=4, lora_alpha=8, lossless=True).double()
    layer.requires_grad_(False)
    layer.lora_B.normal_(std=0.3)
    W0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"Linear\(24, 20\).*lossless=True"):
        layer.merge()
    with pytest.warns(UserWarning, match=r"Linear\(24, 20\).*lossless=True"):
        layer.eval()  # (left unmerged with a warning, as eval()'s other refusals: a model's eval() never stops half way)
    assert not layer.merged
    assert_same_bits(layer.weight, W0, "refused float64 merge")


def test_dtype_change_whose_new_merge_overflows_names_the_layer_and_keeps_the_layer_consistent():
    """float16 -> bfloat16: tiny weights (float16 subnormals) under a small update need no exception in float16
    but exceptions nearly everywhere in bfloat16. The re-merge in _apply is refused with "merge_: ..." (no layer
    named) and the layer is left merged=True holding the bare base: forwards lose the adapter."""
    layer = lora.Linear(48, 40, r=1, lora_alpha=1).half()
    layer.requires_grad_(False)
    with torch.no_grad():
        layer.weight.copy_((torch.rand(40, 48, generator=torch.Generator().manual_seed(0)) * 9e-6 + 1e-6).half())
        layer.lora_A.fill_(1e-2)
        layer.lora_B.fill_(1e-2)
        layer.bias.zero_()  # outputs of the size of the update: bfloat16's rounding of a bias would hide it
    W0 = layer.weight.detach().clone()
    layer.eval()
    assert layer._merged_record is not None and layer._merged_record.exceptions == 0
    x = torch.randn(3, 48)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.bfloat16()  # (a refused re-merge warns, as eval() does: a model's .to() does not stop part way)
    if caught:
        assert any("Linear(48, 40)" in str(w.message) for w in caught), f"refusal does not name the layer: {caught}"
        assert not layer.merged and layer._merged_record is None, "a refused re-merge must leave it unmerged"
    else:
        assert layer.merged and layer._merged_record is not None
    y = layer(x.bfloat16()).double()
    want = x.double() @ (W0.double() + 1e-4).t() + layer.bias.double()
    without = x.double() @ W0.double().t() + layer.bias.double()
    assert (y - want).abs().max() < (y - without).abs().max(), "forward lost the adapter"
    layer.train()
    assert_same_bits(layer.weight, W0.to(torch.bfloat16), "base after the refused conversion")


def test_float_then_bfloat16_round_trip_of_float16_layer_every_kind():
    for kind in KINDS:
        layer = build(kind, torch.float16)
        W0 = layer.weight_2d().detach().clone()
        layer.eval()
        layer.float()
        assert layer.merged and layer._merged_record is not None
        layer.half()
        layer.train()
        assert_same_bits(layer.weight_2d(), W0, f"{kind}: base after .float().half()")


# ---------------------------------------------------------------------------------------------------------------
# 4. interrupted switches


def _model(dtype=torch.bfloat16, n=3, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(*[lora.Linear(24, 24, r=2, lora_alpha=4) for _ in range(n)]).to(dtype)
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for m in model:
        m.lora_B.normal_(std=0.3)
        for i in range(2):
            m.add_adapter(f"a{i}", torch.randn(2 + i, 24, generator=g) * 0.3, torch.randn(24, 2 + i, generator=g) * 0.3,
                          1.0 + i)
    return model


def _check_model_on(model, pristine, name, base, what):
    for i, (m, p) in enumerate(zip(model, pristine)):
        assert m.active_adapter == name, f"{what}: layer {i} on {m.active_adapter}"
        A, B, s = p.get_adapter(name)
        if m.merged:
            assert_same_bits(m.weight, fresh_merged(p, A, B, s), f"{what}: layer {i} merged")
    model.train()
    for i, m in enumerate(model):
        assert_same_bits(m.weight, base[i], f"{what}: layer {i} base")


def test_keyboard_interrupt_before_the_second_layer_switches_rolls_back_bit_for_bit(monkeypatch):
    model = _model()
    base = [m.weight.detach().clone() for m in model]
    pristine = copy.deepcopy(model)
    model.eval()
    real, calls = ops.swap_, []

    def swap(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ops, "swap_", swap)
    with pytest.raises(KeyboardInterrupt):
        lora.set_adapter(model, "a1")
    monkeypatch.setattr(ops, "swap_", real)
    _check_model_on(model, pristine, "default", base, "interrupted before layer 2")


def test_keyboard_interrupt_inside_a_layers_pass_rolls_back_bit_for_bit(monkeypatch):
    """A Ctrl-C during a long CPU switch lands between two row chunks of one layer's pass: that layer's weight is
    half switched while the layer still holds the old adapter and record."""
    model = _model()
    base = [m.weight.detach().clone() for m in model]
    pristine = copy.deepcopy(model)
    model.eval()
    # the pure-torch pass (the C++ one, lora_ext._cpu, is one call: Python cannot interrupt it part way)
    monkeypatch.setattr(lossless, "_cpu", None)
    monkeypatch.setattr(lossless, "_STAGING_BYTES", 4 * 24 * 6)  # 6-row chunks: 4 chunks per 24-row weight
    real, calls = lossless._merge_rows, []

    def merge_rows(*a, **k):
        calls.append(1)
        if len(calls) == 6:  # second layer, second chunk
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(lossless, "_merge_rows", merge_rows)
    with pytest.raises(KeyboardInterrupt):
        lora.set_adapter(model, "a1")
    monkeypatch.setattr(lossless, "_merge_rows", real)
    _check_model_on(model, pristine, "default", base, "interrupted inside layer 2's pass")


def test_keyboard_interrupt_after_a_layers_pass_wrote_the_weight(monkeypatch):
    """A Ctrl-C (a real SIGINT) that arrives after the pass wrote the weight but before the layer took the new
    record is held back until the layer's bookkeeping is done; the model-level switch then puts every layer
    back."""
    import os
    import signal
    model = _model()
    base = [m.weight.detach().clone() for m in model]
    pristine = copy.deepcopy(model)
    model.eval()
    real, calls = torch.autograd.graph.increment_version, []

    def inc(t):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(t)

    monkeypatch.setattr(torch.autograd.graph, "increment_version", inc)
    # Python's own Ctrl-C handler, whatever the runner installed (a background job ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            lora.set_adapter(model, "a1")
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(torch.autograd.graph, "increment_version", real)
    _check_model_on(model, pristine, "default", base, "interrupted after layer 2's pass")


# ---------------------------------------------------------------------------------------------------------------
# 5. threads


def test_threads_racing_set_adapter_and_forwards_see_one_adapter_exactly():
    model = _model(torch.bfloat16, n=2, seed=4)
    x = torch.randn(5, 24).bfloat16()
    names = ["default", "a0", "a1"]
    expected = {}
    for n in names:
        c = copy.deepcopy(model)
        lora.set_adapter(c, n)
        c.eval()
        expected[n] = c(x).detach().clone()
    assert not torch.equal(expected["a0"], expected["a1"])
    base = [m.weight.detach().clone() for m in model]
    pristine = copy.deepcopy(model)
    model.eval()
    # A model built by hand (not by inject or load_peft_adapter) gets its lock at its first model-level switch:
    # forwards already in flight then were not counted. Create it before the forwards start (README).
    from lora_ext.serving.adapters import model_lock
    model_lock(model)
    errors, outs = [], []
    stop = threading.Event()

    def forward():
        try:
            while not stop.is_set():
                outs.append(model(x).detach().clone())
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    def switch():
        try:
            rng = random.Random(0)
            for _ in range(40):
                lora.set_adapter(model, rng.choice(names))
        except BaseException as e:  # pragma: no cover
            errors.append(e)
        finally:
            stop.set()

    threads = [threading.Thread(target=forward) for _ in range(2)] + [threading.Thread(target=switch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert outs
    bad = [i for i, o in enumerate(outs) if not any(torch.equal(o, e) for e in expected.values())]
    assert not bad, f"{len(bad)} of {len(outs)} forwards match no adapter's exact output"
    _check_model_on(model, pristine, lora.active_adapter(model), base, "after the race")


# ---------------------------------------------------------------------------------------------------------------
# 6. kernels (simulator) and the CPU reference mixed


@pytest.mark.parametrize("kind", ["Linear", "Linear_fifo", "MergedLinear", "Embedding_pad", "Conv2d"])
@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=str)
def test_records_cross_between_the_simulated_kernels_and_the_cpu_reference(kind, dtype):
    from lora_ext import _sim
    layer = build(kind, dtype, lossless_flag=True)
    W0 = layer.weight_2d().detach().clone()
    pristine = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(5)
    layer.add_adapter("b", *rand_adapter(layer, 3, g))
    layer.add_adapter("c", *rand_adapter(layer, 1, g))
    with ops.use_kernels(_sim, "cpu"):
        layer.eval()  # record written by the kernels
    layer.set_adapter("b")  # read by the reference
    with ops.use_kernels(_sim, "cpu"):
        layer.set_adapter("c")
        sd = layer.state_dict()
    assert_same_bits(layer._as_2d(sd[layer._weight_key]), W0, "state_dict of a kernels record")
    layer.set_adapter("b")
    A, B, s = layer.get_adapter("b")
    want = fresh_merged(pristine, A, B, s)
    assert_same_bits(layer.weight_2d(), want, "merged (reference) after kernel switches")
    with ops.use_kernels(_sim, "cpu"):
        layer.train()
    assert_same_bits(layer.weight_2d(), W0, "base after mixed backends")


def test_simulated_kernel_swap_overflow_puts_the_old_merge_back():
    from lora_ext import _sim
    layer = _overflow_layer(torch.float16)
    with torch.no_grad():
        layer.weight.copy_((torch.randn(40, 48, generator=torch.Generator().manual_seed(1)) * 0.02).half())
    W0 = layer.weight.detach().clone()
    with ops.use_kernels(_sim, "cpu"):
        layer.eval()
        merged = layer.weight.detach().clone()
        with pytest.raises(lossless.ExceptionOverflow, match=r"Linear\(48, 40\)"):
            layer.set_adapter("huge")
        assert_same_bits(layer.weight, merged, "kernels: refused switch")
        layer.train()
    assert_same_bits(layer.weight, W0, "kernels: base after refused switch")


# ---------------------------------------------------------------------------------------------------------------
# 7. float32 lossless=True, merge_weights=False, delete_adapter, r=0, compile


@pytest.mark.parametrize("kind", list(KINDS))
def test_float32_lossless_true_switches_exactly(kind):
    layer = build(kind, torch.float32, lossless_flag=True)
    W0 = layer.weight_2d().detach().clone()
    pristine = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(7)
    layer.add_adapter("b", *rand_adapter(layer, 5, g))
    layer.eval()
    assert layer._merged_record is not None
    for n in ["b", "default", "b"] * 3:
        layer.set_adapter(n)
    A, B, s = layer.get_adapter("b")
    assert_same_bits(layer.weight_2d(), fresh_merged(pristine, A, B, s), "float32 switched")
    layer.train()
    assert_same_bits(layer.weight_2d(), W0, "float32 base")


def test_merge_weights_false_explicit_merge_switch_unmerge():
    layer = lora.Linear(24, 20, r=4, lora_alpha=8, merge_weights=False).bfloat16()
    layer.requires_grad_(False)
    layer.lora_B.normal_(std=0.3)
    W0 = layer.weight.detach().clone()
    pristine = copy.deepcopy(layer)
    layer.add_adapter("b", *rand_adapter(layer, 2, torch.Generator().manual_seed(1)))
    layer.eval()
    assert not layer.merged
    assert_same_bits(layer.weight, W0, "merge_weights=False eval")
    layer.merge()
    layer.set_adapter("b")
    A, B, s = layer.get_adapter("b")
    assert_same_bits(layer.weight, fresh_merged(pristine, A, B, s), "explicit merge then switch")
    layer.train()  # merge_weights=False: train() does not unmerge
    layer.unmerge()
    assert_same_bits(layer.weight, W0, "explicit unmerge")


def test_delete_active_adapter_while_merged_is_refused_and_changes_nothing():
    model = _model(n=2)
    model.eval()
    before = [m.weight.detach().clone() for m in model]
    with pytest.raises(ValueError, match="active"):
        lora.delete_adapter(model, "default")
    with pytest.raises(ValueError, match="active"):
        model[0].delete_adapter("default")
    for m, b in zip(model, before):
        assert_same_bits(m.weight, b, "after refused delete")


@pytest.mark.parametrize("kind", list(KINDS))
def test_r0_layers_survive_everything(kind):
    torch.manual_seed(0)
    ctor = KINDS[kind]
    layer = ctor()
    # rebuild with r=0: same constructor arguments otherwise
    if kind.startswith("Conv"):
        layer = type(layer)(layer.conv.in_channels, layer.conv.out_channels, layer.conv.kernel_size[0], r=0,
                            lossless=True)
    elif kind.startswith("Embedding"):
        layer = lora.Embedding(30, 12, r=0, padding_idx=0, lossless=True)
    elif kind.startswith("MergedLinear"):
        layer = lora.MergedLinear(24, 30, r=0, enable_lora=[True, False, True], lossless=True)
    else:
        layer = lora.Linear(24, 20, r=0, lossless=True, fan_in_fan_out=kind.endswith("fifo"))
    layer = layer.bfloat16()
    weight = (lambda m: m.conv.weight) if kind.startswith("Conv") else (lambda m: m.weight)
    W0 = weight(layer).detach().clone()
    layer.eval()
    layer.float().bfloat16()
    copy.deepcopy(layer)
    pickle.loads(pickle.dumps(layer))
    sd = layer.state_dict()
    layer.load_state_dict(sd)
    layer.train()
    assert_same_bits(weight(layer), W0, "r=0 weight")


def test_torch_compile_forward_across_lossless_switches():
    layer = lora.Linear(24, 20, r=2, lora_alpha=4).bfloat16()
    layer.requires_grad_(False)
    layer.lora_B.normal_(std=0.3)
    pristine = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(2)
    layer.add_adapter("b", *rand_adapter(layer, 2, g))
    layer.add_adapter("c", *rand_adapter(layer, 4, g))  # rank change
    layer.eval()
    x = torch.randn(4, 24).bfloat16()
    f = torch.compile(layer, backend="eager")
    for n in ["b", "c", "default", "b"]:
        layer.set_adapter(n)
        A, B, s = layer.get_adapter(n)
        W = fresh_merged(pristine, A, B, s)
        want = x.double() @ W.double().t() + layer.bias.double()
        got = f(x).double()
        assert (got - want).abs().max() < 0.05, n
        assert torch.equal(f(x), torch.nn.functional.linear(x, W, layer.bias)), n


# ---------------------------------------------------------------------------------------------------------------
# 8. inject / unload / peft


def test_inject_switch_unload_merge_false_gives_base(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)).to(torch.float16)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora.inject(model, ["0", "2"], r=4, lora_alpha=8)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, lora.LoRALayer):
            torch.nn.init.normal_(m.lora_B, std=0.3)
            m.add_adapter("b", *rand_adapter(m, 3, g))
    model.eval()
    lora.save_peft_adapter(model, tmp_path / "b", "b")
    for n in ["b", "default", "b"]:
        lora.set_adapter(model, n)
    lora.load_peft_adapter(model, tmp_path / "b", "b2", activate=True)  # a switch while merged
    lora.load_peft_adapter(model, tmp_path / "b", "b2", activate=True)  # the active one replaced while merged
    lora.set_adapter(model, "default")
    model.half()
    lora.unload(model, merge=False)
    for n, p in model.named_parameters():
        assert_same_bits(p, base[n], n)


def test_unload_of_an_injected_embedding():
    """unload() of a model with an injected nn.Embedding: _plain reads layer.bias, which an Embedding lacks
    (AttributeError), after the layer was already unmerged; layers before it are already replaced."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 8)).to(torch.bfloat16)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora.inject(model, ["0", "1"], r=4, lora_alpha=8)
    for m in model.modules():
        if isinstance(m, lora.LoRALayer):
            torch.nn.init.normal_(m.lora_B, std=0.3)
            torch.nn.init.normal_(m.lora_A, std=0.3)
    model.eval()
    lora.unload(model, merge=False)
    assert type(model[0]) is nn.Embedding
    for n, p in model.named_parameters():
        assert_same_bits(p, base[n], n)


def test_meta_then_to_empty_of_a_merged_layer():
    """Since 84ffb25 a device move keeps the merge and moves the record: .to("meta") leaves merged=True with a
    meta record, and to_empty(device="cpu") then fails copying the record out of meta (NotImplementedError)."""
    layer, W0 = _merged_linear16()
    layer.to("meta")
    layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.weight.copy_(W0)
    layer.train()  # whatever the layer holds now, the weight the user wrote must stay
    assert_same_bits(layer.weight, W0, "weight written after to_empty")


def test_meta_then_load_state_dict_assign_into_a_merged_layer():
    """.to("meta") then load_state_dict(assign=True) of a real checkpoint (the meta-init loading pattern)."""
    layer, W0 = _merged_linear16()
    sd = {k: v.clone() for k, v in layer.state_dict().items()}  # the base and the adapter
    layer.to("meta")
    layer.load_state_dict(sd, assign=True)
    assert layer.weight.device.type == "cpu"
    x = torch.randn(3, 24).half()
    want = x.double() @ (W0.double() + 2.0 * (sd["lora_B"].double() @ sd["lora_A"].double())).t() + sd["bias"].double()
    assert (layer(x).double() - want).abs().max() < 2e-2
    layer.train()
    assert_same_bits(layer.weight, W0, "base after meta + assign load")


def test_half_of_a_float16_layer_with_float32_factors_keeps_the_base():
    """Since 84ffb25, _apply takes the "move" path when the weight's dtype does not change, but fn still converts
    the snapshot (_merged_A/_merged_B, buffers) from float32 to float16: the record was written for the float32
    factors, so the next unmerge subtracts another update and the base is lost. Mixed precision (float16 base,
    float32 factors) is a documented configuration; model.half() on it is routine."""
    layer = lora.Linear(24, 20, r=4, lora_alpha=8)
    layer.requires_grad_(False)
    layer.weight.data = layer.weight.data.half()  # float16 base, float32 factors
    layer.lora_B.normal_(std=0.3)
    W0 = layer.weight.detach().clone()
    layer.eval()
    assert layer._merged_record is not None and layer._merged_A.dtype == torch.float32
    layer.half()
    layer.train()
    assert_same_bits(layer.weight, W0, "base after .half() of a float16 layer with float32 factors")


@pytest.mark.parametrize("flag", [None, False])
def test_conv2d_channels_last_of_a_merged_layer(flag):
    """ConvLoRA._as_2d views the conv weight as 2-D: after model.to(memory_format=torch.channels_last) the view
    fails. Lossless (flag None): the .to() itself raises half way (record.to(self._weight_2d().device)); either way
    the merged layer can no longer be unmerged (train() raises), so the base is stuck merged."""
    layer = lora.Conv2d(3, 4, kernel_size=3, r=2, lora_alpha=4, lossless=flag).bfloat16()
    layer.requires_grad_(False)
    layer.lora_B.normal_(std=0.3)
    W0 = layer.conv.weight.detach().clone()
    layer.eval()
    layer.to(memory_format=torch.channels_last)
    layer.train()
    if flag is None:
        assert_same_bits(layer.conv.weight, W0, "base after channels_last")
    else:  # lossy: within rounding
        assert (layer.conv.weight.double() - W0.double()).abs().max() < 0.05


@pytest.mark.parametrize("backend", ["reference", "sim"])
@pytest.mark.parametrize("cols,refused", [(32, False), (33, True)])
def test_exception_limit_boundary(backend, cols, refused):
    """A zero weight under a nonzero update: every element is an exception. 32 x 32 = 1024 = the limit (kept),
    32 x 33 = 1056 > 1024 (refused, the weight unchanged bit for bit; -0 kept apart from +0)."""
    from lora_ext import _sim
    W0 = torch.zeros(32, cols, dtype=torch.bfloat16)
    W0.view(-1)[::3] = -0.0
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, cols, generator=g), torch.randn(32, 2, generator=g)
    W = W0.clone()
    ctx = ops.use_kernels(_sim, "cpu") if backend == "sim" else torch.no_grad()
    with ctx:
        if refused:
            with pytest.raises(lossless.ExceptionOverflow, match="1056 exceptions"):
                ops.merge_(W, A, B, 1.0, lossless=True)
            assert_same_bits(W, W0, "refused at the boundary")
            return
        rec = ops.merge_(W, A, B, 1.0, lossless=True)
    assert rec.exceptions == 1024
    d = (B.double() @ A.double())
    assert ((W.double() - d).abs() <= 2 ** -7 * d.abs() + 1e-30).all()
    ops.unmerge_(W, A, B, 1.0, record=rec)
    assert_same_bits(W, W0, "unmerged at the boundary")
