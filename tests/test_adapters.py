"""Named adapters and the in-place switch: one pass (one merge_ call of rank r1 + r2), exact against float64,
refused before any write on non-finite values, atomic with respect to forwards on other threads."""
import copy
import io
import threading
import time

import pytest
import torch

import lora_ext
from lora_ext import ops as ops_mod
from lora_ext import reference
from helpers import dense_delta64, rel_err
from tiny_models import gpt2, randomize_lora, tokens


def _layers():
    return [
        ("linear", lambda: lora_ext.Linear(48, 40, r=4, lora_alpha=8), lambda: torch.randn(5, 48)),
        ("fan_in_fan_out", lambda: lora_ext.Linear(48, 40, r=4, lora_alpha=8, fan_in_fan_out=True),
         lambda: torch.randn(5, 48)),
        ("merged", lambda: lora_ext.MergedLinear(48, 36, r=2, lora_alpha=3, enable_lora=[True, False, True]),
         lambda: torch.randn(5, 48)),
        ("embedding", lambda: lora_ext.Embedding(30, 16, r=3, lora_alpha=5), lambda: torch.randint(0, 30, (4, 6))),
        ("conv2d", lambda: lora_ext.Conv2d(3, 6, 3, r=2, lora_alpha=4, padding=1), lambda: torch.randn(2, 3, 6, 6)),
    ]


def _random_layer(make):
    layer = make()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    return layer


def _logical_delta64(layer, A, B):
    """float64 delta-W of factors (A, B) in the layer's weight storage layout."""
    if isinstance(layer, lora_ext.MergedLinear):
        d = dense_delta64(A, B, len(layer.enable_lora), layer.block_ids, layer.out_features)
    else:
        d = B.double() @ A.double()
    if isinstance(layer, lora_ext.Embedding) or getattr(layer, "fan_in_fan_out", False):
        d = d.t()
    return d.reshape(layer.weight_2d().shape)


@pytest.mark.parametrize("name,make,inputs", _layers(), ids=[c[0] for c in _layers()])
def test_merged_swap_is_one_pass_and_exact(monkeypatch, name, make, inputs):
    layer = _random_layer(make)
    x = inputs()
    w0 = layer.weight_2d().detach().double().clone()
    r1 = layer.r
    r2 = r1 + 1  # a different rank
    shape_a, shape_b = layer.factor_shapes(r2)
    A2, B2 = torch.randn(shape_a), torch.randn(shape_b)
    layer.add_adapter("second", A2, B2, 0.7)
    y1 = layer(x)
    layer.set_adapter("second")
    y2 = layer(x)
    layer.set_adapter("default")
    layer.eval()  # merge the default adapter
    A1, B1, s1 = (t.detach().clone() if torch.is_tensor(t) else t for t in layer.get_adapter("default"))
    calls = []
    real = reference.merge_
    monkeypatch.setattr(reference, "merge_", lambda w, a, b, s, *lay, **kw: calls.append((a.shape, b.shape, s))
                        or real(w, a, b, s, *lay, **kw))
    layer.set_adapter("second")
    n = layer.factor_shapes(1)[0][0]  # lora_A's rows per unit of rank
    assert len(calls) == 1 and calls[0][0][0] == n * (r1 + r2) and calls[0][2] == 1.0
    d1, d2 = s1 * _logical_delta64(layer, A1, B1), 0.7 * _logical_delta64(layer, A2, B2)
    # float32 passes (merge, swap, swap back, unmerge), each rounding at the size of W plus both updates: the
    # bound grows with the updates' norm relative to W's (randn factors make them larger than W here)
    size = float((w0.norm() + d1.norm() + d2.norm()) / w0.norm())
    ref = w0 + d2
    assert rel_err(layer.weight_2d(), ref) < 1e-6 * size
    assert rel_err(layer(x), y2) < 1e-5
    layer.set_adapter("default")
    assert rel_err(layer.weight_2d(), w0 + d1) < 1e-6 * size
    assert rel_err(layer(x), y1) < 1e-5
    layer.train()
    assert rel_err(layer.weight_2d(), w0) < 1e-6 * size
    assert set(layer.state_dict()) == set(make().state_dict())  # loralib's keys, no new persistent state


@pytest.mark.parametrize("bad", ["nan_B", "inf_A", "inf_scale", "overflowing_scale", "nan_added"])
def test_non_finite_adapters_are_refused_before_anything_is_written(bad):
    layer = _random_layer(lambda: lora_ext.Linear(32, 24, r=4, lora_alpha=8))
    layer.eval()
    A2, B2 = torch.randn(3, 32), torch.randn(24, 3)
    layer.add_adapter("second", A2, B2, 0.5)
    stored_A, stored_B, _ = layer.get_adapter("second")
    if bad == "nan_B":
        stored_B[1, 2] = float("nan")  # changed in place after it was added: caught at switch time
    elif bad == "inf_A":
        stored_A[0, 0] = float("inf")
    weight, state = layer.weight.detach().clone(), copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match="non-finite|finite|overflows"):
        if bad == "inf_scale":
            layer.add_adapter("third", A2, B2, float("inf"))
        elif bad == "overflowing_scale":
            layer.add_adapter("third", A2, B2 * 1e36, 1e3)  # finite factors, but scaling * B is inf in fp32
        elif bad == "nan_added":
            layer.add_adapter("third", A2, torch.full_like(B2, float("nan")), 1.0)
        else:
            layer.set_adapter("second")
    assert torch.equal(layer.weight, weight) and layer.active_adapter == "default"
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())


def test_added_factors_are_copied():
    layer = _random_layer(lambda: lora_ext.Linear(32, 24, r=4, lora_alpha=8))
    A2, B2 = torch.randn(3, 32), torch.randn(24, 3)
    layer.add_adapter("second", A2, B2, 0.5)
    want = B2.clone()
    B2.fill_(float("nan"))  # the caller's tensor, not the layer's
    layer.eval()
    held_A, _, _ = layer.get_adapter("second")
    layer.set_adapter("second")
    held_A.fill_(float("inf"))  # a stored tensor a caller still holds: the live factors have their own
    assert torch.equal(layer.lora_B, want) and torch.isfinite(layer.lora_A).all()
    layer.set_adapter("default")
    layer.set_adapter("second")
    assert torch.isfinite(layer.weight).all()


def _count_value_checks(monkeypatch):
    calls = []
    real = ops_mod._check_values
    monkeypatch.setattr(ops_mod, "_check_values", lambda adapters, *rest: calls.append(len(adapters)) or real(adapters, *rest))
    return calls


def test_switching_back_and_forth_checks_values_once(monkeypatch):
    # a value check is a device sync: a merged switch between known adapters must not need one
    layer = _random_layer(lambda: lora_ext.Linear(32, 24, r=4, lora_alpha=8))
    layer.add_adapter("b", torch.randn(3, 32), torch.randn(24, 3), 0.5)
    calls = _count_value_checks(monkeypatch)
    layer.eval()
    for name in ["b", "default"] * 4:
        layer.set_adapter(name)
    # "b" was checked when it was added; the default adapter when eval() merged it (before writing), which
    # stamps both its factors and the merged copy: nothing after that
    assert len(calls) == 1
    calls.clear()
    model = torch.nn.Sequential(layer)
    for name in ["b", "default"] * 3:
        lora_ext.set_adapter(model, name)  # the model-level switch checks every layer first: no check either
    assert calls == []


@pytest.mark.parametrize("how", ["live_parameter", "training", "new_data"])
def test_values_written_after_a_check_are_checked_again(how):
    layer = _random_layer(lambda: lora_ext.Linear(32, 24, r=4, lora_alpha=8))
    layer.add_adapter("b", torch.randn(3, 32), torch.randn(24, 3), 0.5)
    layer.eval()
    for name in ["b", "default", "b"]:
        layer.set_adapter(name)  # "b" is live and known finite
    if how == "live_parameter":
        with torch.no_grad():
            layer.lora_A[0, 0] = float("nan")
    elif how == "training":
        layer.train()  # unmerged from here on
        (layer(torch.randn(2, 32)).sum() * float("inf")).backward()
        torch.optim.SGD([layer.lora_A, layer.lora_B], lr=1.0).step()
    else:
        layer.lora_B.data = torch.full_like(layer.lora_B, float("nan"))
    layer.set_adapter("default")  # merged: the merged copy of "b" is what leaves the weight
    weight = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.set_adapter("b")  # the changed "b" is checked before it goes back in
    assert layer.active_adapter == "default" and torch.equal(layer.weight, weight)
    assert torch.isfinite(weight).all()


def test_model_level_switch_checks_every_layer_first():
    model, x = gpt2(), tokens()
    lora_ext.inject(model, ["c_attn", "c_proj"], r=2)
    randomize_lora(model)
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, lora_ext.LoRALayer)]
    for m in layers[:-2]:
        a, b = m.factor_shapes(2)
        m.add_adapter("other", torch.randn(a), torch.randn(b), 1.0)
    a, b = layers[-2].factor_shapes(2)
    layers[-2].add_adapter("other", torch.randn(a), torch.randn(b), 1.0)
    layers[-2].get_adapter("other")[0][0, 0] = float("nan")  # written in place after the check: seen at the switch
    before = model(x).logits
    with pytest.raises(ValueError, match="other"):
        lora_ext.set_adapter(model, "other")
    assert torch.equal(model(x).logits, before) and lora_ext.active_adapter(model) == "default"
    assert not layers[-1].has_adapter("other")  # (the stand-in made for the last layer went with the refusal)
    with pytest.raises(KeyError, match="'nope'"):  # no layer holds it
        lora_ext.set_adapter(model, "nope")


def test_inactive_adapters_survive_pickle_and_deepcopy():
    layer = _random_layer(lambda: lora_ext.Linear(16, 8, r=2))
    layer.add_adapter("b", torch.randn(2, 16), torch.randn(8, 2), 2.0)
    layer.eval()
    x = torch.randn(3, 16)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for other in (copy.deepcopy(layer), torch.load(buf, weights_only=False)):
        other.set_adapter("b")
        layer.set_adapter("b")
        assert rel_err(other(x), layer(x)) < 1e-6  # layer has switched back and forth once more: rounding only
        layer.set_adapter("default")


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("locked", [True, pytest.param(False, marks=pytest.mark.xfail(
    strict=True, reason="without the layer's lock forwards see half-written weights"))])
def test_switch_is_atomic_with_respect_to_forwards_on_other_threads(locked):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the two threads share the cores
    try:
        _race(locked)
    finally:
        torch.set_num_threads(threads)


def _race(locked):
    # lossless: 150 lossy float32 merges, unmerges and switches of these adapters (updates ~35x |W|) drift the base
    # by themselves, on one thread, to 6-9e-6 of an output (20 seeds), at the 1e-5 below: the test failed once
    # under load for that. Lossless, the drift is 0 and what is left is a merged forward's rounding (<= 4.6e-7).
    layer = _random_layer(lambda: lora_ext.Linear(768, 768, r=8, lora_alpha=16, lossless=True))
    w0 = layer.weight.detach().clone()
    if not locked:
        layer._lock = _NoLock()
    layer.add_adapter("b", torch.randn(8, 768), torch.randn(768, 8) * 0.3, 1.5)
    x = torch.randn(4, 768)
    valid = {}
    for name in ("b", "default"):
        layer.set_adapter(name)
        valid[name] = layer(x).detach()
    seen, bad, stop = {n: 0 for n in valid}, [], threading.Event()

    def forwards():
        while not stop.is_set():
            try:
                y = layer(x).detach()
            except Exception as e:  # (without the lock a forward can also meet half-written bookkeeping and raise:
                bad.append(repr(e))  # that thread died, no output was bad, and the strict xfail passed, flakily)
                continue
            errs = {n: rel_err(y, v) for n, v in valid.items()}
            best = min(errs, key=errs.get)
            if errs[best] < 1e-5:
                seen[best] += 1
            else:
                bad.append(errs)

    t = threading.Thread(target=forwards)
    t.start()
    try:
        # 150 rounds at full speed, then (rarely) on until the forwards saw both adapters: the layer's lock is not
        # fair, and a faster switch left a loaded CI machine's forward thread no turn in one of the states
        i, deadline = 0, time.monotonic() + 30
        while i < 150 or (not (seen["b"] and seen["default"]) and time.monotonic() < deadline):
            layer.eval() if i % 2 == 0 else layer.train()  # merge / unmerge
            layer.set_adapter("b" if i % 3 else "default")  # switch, merged or not
            if i >= 150:
                time.sleep(0.002)  # (a forward's turn)
            i += 1
    finally:
        stop.set()
        t.join()
    assert not bad, f"{len(bad)} forwards saw a half-written weight, e.g. {bad[0]}"
    assert seen["b"] and seen["default"]
    layer.train()
    assert torch.equal(layer.weight.detach().view(torch.int32), w0.view(torch.int32))  # the base, bit for bit


def test_bench_has_the_switch_and_inject_cases():
    from lora_ext import bench

    rows = bench.serving_rows(64, torch.float32, "cpu", repeats=3, r=4)
    impls = {(row["case"].split(",")[0].split()[0], row["impl"]) for row in rows}
    assert {("adapter", "one merge pass"), ("adapter", "lora_ext ops.swap_"), ("adapter", "lora_ext set_adapter"),
            ("adapter", "peft unmerge+merge"),
            ("inject", "lora_ext inject"), ("inject", "peft get_peft_model")} <= impls
    assert all(row["ms"] > 0 for row in rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_swap_op_matches_float64(dtype):
    w = torch.randn(39, 20).to(dtype)
    A1, B1, A2, B2 = (torch.randn(shape).to(dtype) for shape in [(6, 20), (26, 3), (8, 20), (26, 4)])
    want = w.double() + 1.5 * dense_delta64(A2, B2, 3, [0, 2], 39) - 0.5 * dense_delta64(A1, B1, 3, [0, 2], 39)
    ops_mod.swap_(w, A1, B1, 0.5, A2, B2, 1.5, num_blocks=3, block_ids=[0, 2])
    assert rel_err(w, want) < {torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]


@pytest.mark.parametrize("over,message", [
    (dict(new_B=torch.randn(26, 5)), "new_B must have shape"),
    (dict(old_A=torch.randn(6, 21)), "old_A must have shape"),
    (dict(old_scale=float("nan")), "old adapter's scaling must be a finite number"),
    (dict(old_A=torch.full((6, 20), float("inf"))), "the old adapter: lora_A holds non-finite"),
    (dict(new_B=torch.full((26, 4), 1e30), new_scale=1e10), "the new adapter: scaling .* overflows"),
])
def test_swap_op_refuses_bad_arguments_before_writing(over, message):
    args = dict(weight=torch.randn(39, 20), old_A=torch.randn(6, 20), old_B=torch.randn(26, 3), old_scale=0.5,
                new_A=torch.randn(8, 20), new_B=torch.randn(26, 4), new_scale=1.5)
    args.update(over)
    w0 = args["weight"].clone()
    with pytest.raises(ValueError, match=message):
        ops_mod.swap_(**args, num_blocks=3, block_ids=[0, 2])
    assert torch.equal(args["weight"], w0)


def test_swap_op_without_value_check_makes_no_check(monkeypatch):
    calls = _count_value_checks(monkeypatch)
    w = torch.randn(24, 32)
    ops_mod.swap_(w, torch.randn(3, 32), torch.randn(24, 3), 0.5, torch.randn(2, 32), torch.randn(24, 2), 1.0,
                  check_values=False)
    assert calls == []
    ops_mod.swap_(w, torch.randn(3, 32), torch.randn(24, 3), 0.5, torch.randn(2, 32), torch.randn(24, 2), 1.0)
    assert calls == [2]


@pytest.mark.parametrize("check_values", [True, False])
def test_swap_op_kernel_branch(sim_as_cuda, check_values):
    w = torch.randn(39, 20).bfloat16()
    A1, B1 = torch.randn(6, 20), torch.randn(26, 3)  # fp32 and bf16 pairs: both go to the kernel in fp32
    A2, B2 = torch.randn(8, 20).bfloat16(), torch.randn(26, 4).bfloat16()
    want = w.double() + 1.5 * dense_delta64(A2, B2, 3, [0, 2], 39) - 0.5 * dense_delta64(A1, B1, 3, [0, 2], 39)
    ops_mod.swap_(w, A1, B1, 0.5, A2, B2, 1.5, num_blocks=3, block_ids=(0, 2), check_values=check_values)
    assert rel_err(w, want) < 1e-2
    w0 = w.clone()
    with pytest.raises(ValueError, match="new_B must have shape"):
        ops_mod.swap_(w, A1, B1, 0.5, A2, torch.randn(26, 5), 1.5, num_blocks=3, block_ids=(0, 2),
                      check_values=check_values)
    assert torch.equal(w, w0)


def test_merged_switch_through_the_kernel_branch(sim_as_cuda):
    layer = _random_layer(lambda: lora_ext.MergedLinear(48, 36, r=2, lora_alpha=3, enable_lora=[True, False, True]))
    w0 = layer.weight.detach().double().clone()
    A2, B2 = torch.randn(6, 48), torch.randn(24, 3)
    layer.add_adapter("b", A2, B2, 0.7)
    layer.eval()
    A1, B1, s1 = (t.detach().clone() if torch.is_tensor(t) else t for t in layer.get_adapter("default"))
    for _ in range(2):
        layer.set_adapter("b")
        assert rel_err(layer.weight, w0 + 0.7 * dense_delta64(A2, B2, 3, [0, 2], 36)) < 1e-5
        layer.set_adapter("default")
        assert rel_err(layer.weight, w0 + s1 * dense_delta64(A1, B1, 3, [0, 2], 36)) < 1e-5


@pytest.mark.parametrize("kind,make,inputs", _layers(), ids=[k for k, _, _ in _layers()])
@pytest.mark.parametrize("merged", [False, True])
def test_serving_switch_keeps_the_live_storage(kind, make, inputs, merged):
    """Factors that do not require grad, adapters of one shape: a switch writes into the live storage (a
    captured forward reads the new adapter), and every stored adapter keeps its own values exactly."""
    layer = _random_layer(make)
    layer.requires_grad_(False)
    x = inputs()
    A1, B1, s1 = (t.clone() if torch.is_tensor(t) else t for t in layer.get_adapter("default"))
    A2, B2 = torch.randn_like(A1), torch.randn_like(B1)
    layer.add_adapter("second", A2, B2, s1)
    layer.train(not merged)
    y1 = layer(x)
    ptrs = (layer.lora_A.data_ptr(), layer.lora_B.data_ptr())
    layer.set_adapter("second")
    assert (layer.lora_A.data_ptr(), layer.lora_B.data_ptr()) == ptrs
    assert torch.equal(layer.lora_A, A2) and torch.equal(layer.lora_B, B2)
    stored = layer.get_adapter("default")
    assert torch.equal(stored[0], A1) and torch.equal(stored[1], B1)
    layer.set_adapter("default")
    assert (layer.lora_A.data_ptr(), layer.lora_B.data_ptr()) == ptrs
    assert torch.equal(layer.lora_A, A1) and torch.equal(layer.lora_B, B1)
    stored = layer.get_adapter("second")
    assert torch.equal(stored[0], A2) and torch.equal(stored[1], B2)
    assert rel_err(layer(x), y1) < 1e-5


@pytest.mark.parametrize("trainable,rank", [(True, 4), (False, 6)], ids=["trainable", "rank-change"])
def test_other_switches_give_the_live_factors_new_storage(trainable, rank):
    layer = _random_layer(lambda: lora_ext.Linear(48, 40, r=4, lora_alpha=8))
    layer.requires_grad_(False)
    layer.lora_A.requires_grad_(trainable)
    layer.lora_B.requires_grad_(trainable)
    A1, B1, _ = (t.clone() if torch.is_tensor(t) else t for t in layer.get_adapter("default"))
    A2, B2 = torch.randn(rank, 48), torch.randn(40, rank)
    layer.add_adapter("second", A2, B2, 1.5)
    ptrs = (layer.lora_A.data_ptr(), layer.lora_B.data_ptr())
    layer.set_adapter("second")
    assert layer.lora_A.data_ptr() != ptrs[0] and layer.lora_B.data_ptr() != ptrs[1]
    assert torch.equal(layer.lora_A, A2) and torch.equal(layer.lora_B, B2) and layer.r == rank
    stored = layer.get_adapter("default")
    assert torch.equal(stored[0], A1) and torch.equal(stored[1], B1)
