"""Lossy switches that come back: b -> a rounds exactly as a -> b did, negated (ops._swap_order), so a float32
weight served by switching adapters back and forth stays within one rounding of its base however many switches
it serves (summed in the pairs' given order, the two directions' roundings differed and every round trip added
the difference again: 3e-3 relative after 2,000 round trips of a 64 x 64 layer). On both backends: the
reference (torch ops) and the CUDA kernels' host code and kernels, the simulator standing in for _C."""
import zlib

import pytest
import torch

import lora_ext
from lora_ext import ops

from helpers import delta64

LAYOUTS = {  # num_blocks, block_ids, transposed
    "plain": (1, [0], False),
    "transposed": (1, [0], True),
    "merged_TFT": (3, [0, 2], False),
    "merged_TTT_transposed": (3, [0, 1, 2], True),
}


def _pair(gen, r, groups, nb, k, dtype):
    A = torch.randn(groups * r, k, generator=gen).to(dtype)
    B = (torch.randn(groups * nb, r, generator=gen) * 0.5).to(dtype)
    return A, B


def _weight(shape, dtype, gen):
    return torch.randn(*shape, generator=gen).to(dtype)


def _shape(layout, nb, k):
    num_blocks, _, transposed = LAYOUTS[layout]
    return (k, num_blocks * nb) if transposed else (num_blocks * nb, k)


def _delta64(A, B, scale, layout, nb):
    """scale * B A per enabled block, float64, in the weight's layout (helpers.delta64 by layout name)."""
    num_blocks, ids, transposed = LAYOUTS[layout]
    return delta64(A, B, scale, num_blocks, ids, nb, transposed)


CASES = [  # (weight dtype, factor dtype, r_a, r_b, scale_a, scale_b)
    (torch.float32, torch.float32, 8, 8, 2.0, 2.0),
    (torch.float32, torch.float32, 5, 12, 0.5, 3.0),
    (torch.float32, torch.float32, 16, 16, 4.0, 0.25),
    (torch.bfloat16, torch.bfloat16, 8, 8, 2.0, 2.0),
    (torch.bfloat16, torch.float32, 20, 13, 1.5, -0.75),
    (torch.float16, torch.float16, 33, 40, 2.0, 0.5),
]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c))
def test_switching_back_is_the_exact_negation(backend, layout, case):
    """a -> b written into a zero weight, and b -> a into another, are each other's negation bit for bit, and
    a -> b is the float64 update within its dtype's rounding."""
    dtype, fdtype, ra, rb, sa, sb = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr((layout, case)).encode()))
    num_blocks, ids, transposed = LAYOUTS[layout]
    nb, k = 24, 40
    a = _pair(gen, ra, len(ids), nb, k, fdtype)
    b = _pair(gen, rb, len(ids), nb, k, fdtype)
    kw = dict(num_blocks=num_blocks, block_ids=ids, transposed=transposed)
    there = torch.zeros(_shape(layout, nb, k), dtype=dtype)
    back = torch.zeros_like(there)
    ops.swap_(there, *a, sa, *b, sb, **kw)
    ops.swap_(back, *b, sb, *a, sa, **kw)
    assert torch.equal(back, -there), (
        f"b -> a differs from -(a -> b) in {(back != -there).sum().item()} elements")
    want = _delta64(*b, sb, layout, nb) - _delta64(*a, sa, layout, nb)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert (there.double() - want).abs().max() <= tol * want.abs().max()
    if num_blocks > len(ids):  # the disabled block: untouched
        view = there.t() if transposed else there
        off = [e for e in range(num_blocks) if e not in ids]
        for e in off:
            assert torch.equal(view[e * nb:(e + 1) * nb], torch.zeros_like(view[e * nb:(e + 1) * nb]))


@pytest.mark.parametrize("layout", ["plain", "merged_TFT", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_round_trips_do_not_drift(backend, layout, dtype):
    """A weight switched a -> b -> a 300 times holds what one round trip left (within one rounding of the base),
    not 300 times its error."""
    gen = torch.Generator().manual_seed(7)
    num_blocks, ids, transposed = LAYOUTS[layout]
    nb, k = 32, 48
    a = _pair(gen, 8, len(ids), nb, k, torch.float32)
    b = _pair(gen, 12, len(ids), nb, k, torch.float32)
    kw = dict(num_blocks=num_blocks, block_ids=ids, transposed=transposed)
    w = _weight(_shape(layout, nb, k), dtype, gen)
    ops.merge_(w, *a, 2.0, **kw)
    merged_a = w.clone()
    errors = []
    for trip in range(300):
        ops.swap_(w, *a, 2.0, *b, 0.5, **kw)
        ops.swap_(w, *b, 0.5, *a, 2.0, **kw)
        if trip in (0, 299):
            errors.append((w.double() - merged_a.double()).abs().max().item())
    one, many = errors
    scale = merged_a.double().abs().max().item()
    eps = torch.finfo(dtype).eps
    assert one <= 4 * eps * scale
    assert many <= max(one, 2 * eps * scale), f"after 1 round trip {one:.3g} off, after 300 {many:.3g}"


def test_the_same_adapter_in_and_out_writes_nothing(backend):
    gen = torch.Generator().manual_seed(3)
    w = _weight((24, 40), torch.float32, gen)
    A, B = _pair(gen, 8, 1, 24, 40, torch.float32)
    before = w.clone()
    ops.swap_(w, A, B, 2.0, A.clone(), B.clone(), 2.0)
    assert torch.equal(w, before)
    ops.swap_(w, A, B, 2.0, A, B, 3.0)  # another scale: another adapter
    assert (w.double() - before.double() - _delta64(A, B, 1.0, "plain", 24)).abs().max() < 1e-4


def test_refusals_name_the_arguments_as_given(backend):
    """The pairs reordered for the backend: a refusal still names the argument the caller passed wrongly."""
    gen = torch.Generator().manual_seed(5)
    w = _weight((24, 40), torch.float32, gen)
    A, B = _pair(gen, 8, 1, 24, 40, torch.float32)
    A2, B2 = _pair(gen, 8, 1, 24, 40, torch.float32)
    for bad_new in (True, False):
        # scale 1 < 2: the new pair goes first, in old's place
        args = [A, B, 2.0, A2[:, :39], B2, 1.0] if bad_new else [A[:, :39], B, 2.0, A2, B2, 1.0]
        before = w.clone()
        with pytest.raises((ValueError, RuntimeError), match="new_A" if bad_new else "old_A"):
            ops.swap_(w, *args)
        assert torch.equal(w, before)


@pytest.mark.parametrize("kind", ["linear", "merged", "embedding", "conv2d"])
def test_layers_switched_back_and_forth_give_their_base_back(kind):
    """float32 layers (lossy merges, the default) switched between two adapters 200 times while merged, then
    unmerged: the base within one round trip's rounding, and the forward of either adapter right."""
    torch.manual_seed(11)
    if kind == "linear":
        layer = lora_ext.Linear(48, 40, r=8, lora_alpha=16)
    elif kind == "merged":
        layer = lora_ext.MergedLinear(48, 72, r=4, lora_alpha=8, enable_lora=[True, False, True],
                                      fan_in_fan_out=True)
    elif kind == "embedding":
        layer = lora_ext.Embedding(50, 32, r=8, lora_alpha=16, padding_idx=0)
    else:
        layer = lora_ext.Conv2d(6, 8, kernel_size=3, r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    base = layer.weight.detach().clone()
    layer.add_adapter("b", torch.randn_like(layer.lora_A), torch.randn_like(layer.lora_B), 0.5)
    x = torch.randint(0, 50, (4, 7)) if kind == "embedding" else (
        torch.randn(2, 6, 9, 9) if kind == "conv2d" else torch.randn(5, 48))
    layer.eval()
    merged = layer.weight.detach().clone()
    with torch.no_grad():
        want = layer(x).double()
    errors = []
    for trip in range(200):
        layer.set_adapter("b")
        layer.set_adapter("default")
        if trip in (0, 199):
            errors.append((layer.weight.detach().double() - merged.double()).abs().max().item())
    with torch.no_grad():
        assert (layer(x).double() - want).abs().max() <= 1e-5 * want.abs().max()
    layer.train()
    got = (layer.weight.detach().double() - base.double()).abs().max().item()
    scale = max(base.double().abs().max().item(), merged.double().abs().max().item())
    eps = torch.finfo(torch.float32).eps
    one, many = errors
    assert one <= 4 * eps * scale
    assert many <= max(one, 2 * eps * scale), f"{kind}: after 1 round trip {one:.3g} off, after 200 {many:.3g}"
    assert got <= 8 * eps * scale, f"{kind}: base {got:.3g} off after 200 round trips"


def test_named_switches_order_by_name_without_reading_the_factors(monkeypatch):
    """set_adapter orders the two adapters by name (the same for the switch back), so that a switch of CUDA
    factors needs no device sync to order them; the weight still comes back within a rounding."""
    calls = []
    by_values = ops._swap_order_by_values
    monkeypatch.setattr(ops, "_swap_order_by_values", lambda *a: calls.append(1) or by_values(*a))
    torch.manual_seed(0)
    layer = lora_ext.Linear(64, 64, r=8, lora_alpha=16)  # scaling 2.0, as adapter "b": the values would decide
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.add_adapter("b", torch.randn_like(layer.lora_A), torch.randn_like(layer.lora_B), 2.0)
    layer.eval()
    merged = layer.weight.detach().clone()
    errors = []
    for trip in range(300):
        layer.set_adapter("b")
        size = layer.weight.detach().abs().max()  # (the round trip rounds at b's magnitude too)
        layer.set_adapter("default")
        if trip in (0, 299):
            errors.append((layer.weight.detach() - merged).abs().max().item())
    assert calls == []
    eps = torch.finfo(torch.float32).eps
    one, many = errors
    assert one <= 4 * eps * max(size, merged.abs().max())
    assert many <= one, f"after 1 round trip {one:.3g} off, after 300 {many:.3g}"


def test_an_identical_pair_is_not_remembered_as_one(backend):
    """Values written into a factor without a version bump (through .numpy()) after a swap found the pairs
    identical: the next swap of the same tensors writes the update (an order of 0 is never kept)."""
    gen = torch.Generator().manual_seed(9)
    w = _weight((24, 40), torch.float32, gen)
    A, B = _pair(gen, 8, 1, 24, 40, torch.float32)
    A2, B2 = A.clone(), B.clone()
    before = w.clone()
    ops.swap_(w, A, B, 2.0, A2, B2, 2.0)
    assert torch.equal(w, before)
    B2.numpy()[:] = torch.randn(24, 8, generator=gen).numpy()
    assert B2._version == 0
    ops.swap_(w, A, B, 2.0, A2, B2, 2.0)
    want = before.double() + _delta64(A2, B2, 2.0, "plain", 24) - _delta64(A, B, 2.0, "plain", 24)
    assert (w.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("bad", ["weight shape", "block ids"])
def test_an_identical_pair_is_still_checked(backend, bad):
    """The same adapter in and out writes nothing, but wrong arguments are refused as for any swap."""
    gen = torch.Generator().manual_seed(4)
    A, B = _pair(gen, 4, 2 if bad == "block ids" else 1, 24, 16, torch.float32)
    if bad == "weight shape":
        w, kw = torch.zeros(30, 16), {}
    else:
        w, kw = torch.zeros(72, 16), dict(num_blocks=3, block_ids=[0, 5])
    with pytest.raises(ValueError):
        ops.swap_(w, A, B, 2.0, A.clone(), B.clone(), 2.0, **kw)


def test_threads_switching_one_layer():
    """Four threads switching one merged layer among four adapters: no switch fails (two threads asking for the
    same adapter raised KeyError: the check ran before the lock), and the weight holds the active adapter."""
    import random
    import threading
    torch.manual_seed(0)
    layer = lora_ext.Linear(24, 16, r=4, lora_alpha=8, lossless=False).requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.normal_()
    base = layer.weight.detach().clone()
    values = {"default": (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())}
    for name in "bcd":
        values[name] = (torch.randn(4, 24), torch.randn(16, 4))
        layer.add_adapter(name, *(t.clone() for t in values[name]), layer.scaling)
    layer.eval()
    x = torch.randn(3, 24)
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(100):
                layer.set_adapter(rng.choice(list(values)))
                with torch.no_grad():
                    layer(x)
        except Exception as err:  # (collected: the test asserts there were none)
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    A, B = values[layer.active_adapter]
    want = base.double() + layer.scaling * B.double() @ A.double()
    assert (layer.weight.detach().double() - want).abs().max() <= 1e-5 * want.abs().max()
    layer.train()
    assert (layer.weight.detach().double() - base.double()).abs().max() <= 1e-5 * want.abs().max()
