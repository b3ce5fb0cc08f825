"""module.to() by torch.utils.swap_tensors: what it does to DTensor Parameters (FSDP2, tensor parallelism) always,
and to every Parameter under torch.__future__.set_swap_module_params_on_conversion(True).

swap_tensors refuses a tensor that has weak references or is held by another tensor. lora_ext's registries held
weak references to the weight (ties) and to the factors (finite-value stamps, mixed-batch slot keys), and a merged
conv held a view of its weight through its own _apply: `.double()` of any layer after a forward, and of an FSDP2
model after a forward or eval(), raised "Couldn't swap Linear.weight". Each case here converts a layer in some
state and compares its forward with a float64 formula (W + scaling * B A) of the values it held."""
import copy
import gc
import weakref

import pytest
import torch

import lora_ext as lora
from dist import run_ranks
from helpers import TOL, layer_forward64, randomize_, rel_err
from lora_ext import ties


@pytest.fixture
def swap_on():
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


MAKERS = {
    "linear": (lambda: lora.Linear(8, 6, r=2, lora_alpha=3), lambda: torch.randn(4, 8)),
    "linear-fifo": (lambda: lora.Linear(8, 6, r=2, lora_alpha=3, fan_in_fan_out=True), lambda: torch.randn(4, 8)),
    "merged": (lambda: lora.MergedLinear(8, 12, r=2, lora_alpha=3, enable_lora=[True, False, True]),
               lambda: torch.randn(4, 8)),
    "embedding": (lambda: lora.Embedding(10, 4, r=2, lora_alpha=3), lambda: torch.randint(0, 10, (2, 3))),
    "conv2d": (lambda: lora.Conv2d(3, 4, 3, r=2, lora_alpha=3), lambda: torch.randn(2, 3, 5, 5)),
}


def _make(kind):
    make, make_x = MAKERS[kind]
    return randomize_(make()), make_x()


def _values(layer):
    """The float64 values the layer serves: its parameters (base weight unmerged) and the active scaling."""
    p = {n: t.detach().double().clone() for n, t in layer.named_parameters()}
    if layer.merged:  # the weight holds W + s B A: the base is what state_dict gives
        p.update({n: t.double() for n, t in layer.state_dict().items() if n in ("weight", "conv.weight")})
    return p, layer.scaling


def _forward(layer, x):
    dtype = next(layer.parameters()).dtype
    y = layer(x.to(dtype) if x.is_floating_point() else x)
    if y.requires_grad:
        y.float().square().sum().backward()
    return y


def _check(layer, x, p, scale, tol):
    with torch.no_grad():
        y = layer(x.to(layer.lora_A.dtype) if x.is_floating_point() else x)
    ref = layer_forward64(layer, p, x.double() if x.is_floating_point() else x, scale)
    assert rel_err(y, ref) < tol


STATES = {
    "fresh": lambda layer, x: None,
    "trained": lambda layer, x: _forward(layer, x),
    "merged": lambda layer, x: (layer.eval(), _forward(layer, x)),
    "switched": lambda layer, x: (layer.add_adapter("b", torch.randn_like(layer.lora_A), torch.randn_like(layer.lora_B),
                                                    0.5), layer.set_adapter("b"), _forward(layer, x)),
    "merged-switched": lambda layer, x: (layer.eval(), layer.add_adapter("b", torch.randn_like(layer.lora_A),
                                                                         torch.randn_like(layer.lora_B), 0.5),
                                         layer.set_adapter("b"), _forward(layer, x)),
}


@pytest.mark.parametrize("state", sorted(STATES))
@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_to_dtype_and_back_by_swap(kind, state, swap_on):
    layer, x = _make(kind)
    STATES[state](layer, x)
    merged, active = layer.merged, layer.active_adapter
    p, scale = _values(layer)
    ids = {n: id(t) for n, t in layer.named_parameters()}
    layer.double()
    assert {n: id(t) for n, t in layer.named_parameters()} == ids  # swapped in place: the same objects
    assert all(t.dtype == torch.float64 for t in layer.parameters())
    assert (layer.merged, layer.active_adapter) == (merged, active)
    _check(layer, x, p, scale, 1e-6)
    _forward(layer, x)  # trains (or serves) after the swap
    layer.float()
    assert all(t.dtype == torch.float32 for t in layer.parameters())
    _check(layer, x, p, scale, TOL[torch.float32] * 10)
    if merged:
        layer.train()  # unmerges: the base comes back
        assert not layer.merged
        base = "conv.weight" if kind == "conv2d" else "weight"
        assert rel_err(dict(layer.named_parameters())[base], p[base]) < TOL[torch.float32]
        _check(layer, x, p, scale, TOL[torch.float32] * 10)


def test_no_weak_references_on_parameters():
    """What swap_tensors checks: after forwards, backwards, merges, switches and a mixed batch, no weak reference to
    any Parameter of the layer is left (the registries key by id and by storage)."""
    layer, x = _make("linear")
    layer.add_adapter("b", torch.randn_like(layer.lora_A), torch.randn_like(layer.lora_B), 0.5)
    _forward(layer, x)
    layer.eval()
    layer.set_adapter("b")
    with torch.no_grad():
        layer(x)
        with lora.batch_adapters(layer, ["default", "b", None, "b"]):
            layer(x)
    layer.train()
    layer.set_adapter("default")
    for name, t in layer.named_parameters():
        assert weakref.getweakrefs(t) == [], name


def test_tied_layers_still_refuse_to_merge_after_a_swap(swap_on):
    """Two layers sharing one weight: the registry keeps the tie across a swap (the Parameter keeps its identity),
    so merge() still refuses, naming the other layer."""
    l1, x = _make("linear")
    l2 = lora.Linear(8, 6, r=2, lora_alpha=3)
    l2.weight = l1.weight
    net = torch.nn.Sequential(l1, l2)
    net.double()
    assert l1.weight is l2.weight and l1.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="shared with"):
        l1.merge()
    assert not l1.merged


def test_lora_weight_tied_to_a_plain_module_converts(swap_on):
    """A plain module holding a lora layer's weight and converted before it (a tied head ahead of the embedding):
    it swaps the shared Parameter first, which the registry's weak reference used to refuse."""
    emb = lora.Embedding(10, 4, r=2, lora_alpha=3)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    net = torch.nn.ModuleDict({"head": head, "emb": emb})
    with torch.no_grad():
        emb.lora_B.normal_()
    ids = torch.randint(0, 10, (2, 3))
    emb(ids)
    p, scale = _values(emb)
    net.double()
    assert head.weight is emb.weight and emb.weight.dtype == torch.float64
    _check(emb, ids, p, scale, 1e-6)


def test_a_stamp_dies_with_its_tensor():
    """A finite-value stamp names its tensors by a token kept on them, never by id(): a later Parameter that takes
    a stamped tensor's id (CPython reuses the address), over the same memory (kept alive by a .data alias) and at
    the same version, does not pass for it, so NaN written through the alias is refused at the merge."""
    layer = lora.Linear(6, 5, r=2, lora_alpha=2)
    layer.add_adapter("b", torch.randn(2, 6), torch.randn(5, 2), 1.0)
    layer.set_adapter("b")  # trainable: the live lora_A is a fresh Parameter, stamped finite
    stamped = layer.lora_A
    old_id, alias = id(stamped), stamped.data  # (each .data has a version counter of its own)
    stamped.data.fill_(float("nan"))  # through .data: no version counter that matters sees it
    layer.lora_A = torch.nn.Parameter(torch.randn(2, 6))
    del stamped
    gc.collect()
    keep = []
    for _ in range(5000):
        P = torch.nn.Parameter(alias)
        if id(P) == old_id:
            break
        keep.append(P)
    else:
        pytest.skip("CPython did not reuse the freed Parameter's address in 5000 tries")
    assert P._version == 0 and P.data_ptr() == alias.data_ptr()
    layer.lora_A = P
    base = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="lora_A holds non-finite values"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, base)


def test_a_shallow_copy_of_a_stamped_parameter_is_checked_again():
    """copy.copy of the live lora_A copies its __dict__ (the stamp's number) and shares its memory; its version
    counter, new, can be brought to the stamped one. It is another object, so its values are checked again: NaN
    written into it is refused at the merge."""
    layer = lora.Linear(8, 8, r=2, lora_alpha=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.eval()
    layer.train()  # stamped
    version = layer.lora_A._version
    twin = copy.copy(layer.lora_A)
    layer.lora_A = twin
    with torch.no_grad():
        twin[0, 0] = float("nan")
        while twin._version < version:
            twin.mul_(1)
    assert twin._version == version
    with pytest.raises(ValueError, match="lora_A holds non-finite values"):
        layer.merge()
    assert not layer.merged and torch.isfinite(layer.weight).all()


def test_mixed_batch_slots_refill_after_a_shallow_copy_is_written():
    """The same for mixed-batch slots: a shallow copy of lora_A put in its place and written to the stamped version
    is taken again by the next batch (rows against float64)."""
    layer = lora.Linear(8, 6, r=2, lora_alpha=2, merge_weights=False)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    layer.add_adapter("b", torch.randn(2, 8), torch.randn(6, 2), 0.5)
    layer.eval()
    x = torch.randn(2, 8)
    with torch.no_grad(), lora.batch_adapters(layer, ["default", "b"]):
        layer(x)  # slots filled, keyed by the live factors' stamp
    version = layer.lora_A._version
    twin = copy.copy(layer.lora_A)
    layer.lora_A = twin
    with torch.no_grad():
        twin.mul_(3.0)
        while twin._version < version:
            twin.mul_(1)
    assert twin._version == version
    with torch.no_grad(), lora.batch_adapters(layer, ["default", "b"]):
        y = layer(x)
    p = {n: t.detach().double() for n, t in layer.named_parameters()}
    assert rel_err(y[0], layer_forward64(layer, p, x[0].double(), layer.scaling)) < TOL[torch.float32] * 10


def test_the_tie_registry_stays_small():
    """Weights replaced again and again: entries no layer holds now are dropped as the registry grows, and a tie
    made afterwards is still seen."""
    layer = lora.Linear(8, 6, r=2)
    for _ in range(5000):
        layer.weight = torch.nn.Parameter(torch.randn(6, 8))
    assert len(ties._holders) < 2 * 1024 + 64
    other = lora.Linear(8, 6, r=2)
    other.weight = layer.weight
    assert ties.others(layer, layer.weight) == [other]


def _fsdp_swap(rank, world):
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    out = {}
    for kind in ("linear", "embedding", "merged"):
        layer, x = _make(kind)
        p = {n: t.detach().double().clone() for n, t in layer.named_parameters()}
        scale = layer.scaling
        lora.mark_only_lora_as_trainable(layer)
        fully_shard(layer)
        layer.eval()  # merges (FSDP2: into each rank's shard)
        x64 = x.double() if x.is_floating_point() else x
        layer.double()  # (FSDP2 converts only before its first forward: its buffers keep their dtype after)
        with torch.no_grad():
            y_merged = layer(x64)
        layer.train()  # unmerges in float64
        with torch.no_grad():
            y_back = layer(x64)
        out[kind] = (layer_forward64(layer, p, x64, scale), y_merged, y_back, layer.lora_A.dtype)
    return out


def test_fsdp2_to_after_a_merge():
    """fully_shard'ed layers (DTensor Parameters, which module.to() always swaps) merged by eval(), then .double()
    (FSDP2 converts before its first forward), then train(): each output the float64 formula's, on 2 gloo ranks."""
    for out in run_ranks(_fsdp_swap):
        for kind, (ref, y_merged, y_back, dtype) in out.items():
            assert y_merged.dtype == torch.float64 and dtype == torch.float64, kind
            assert rel_err(y_merged, ref) < 1e-6, kind
            assert rel_err(y_back, ref) < 1e-6, kind


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_meta_build_then_to_empty_by_swap(kind, swap_on):
    """The meta-device build (FSDP2's recipe): layers made on meta, materialised by to_empty (a swap here, as for
    DTensors), then initialised; they train and serve the float64 formula of their values."""
    with torch.device("meta"):
        layer = MAKERS[kind][0]()
    ids = {n: id(t) for n, t in layer.named_parameters()}
    layer.to_empty(device="cpu")
    assert {n: id(t) for n, t in layer.named_parameters()} == ids
    assert all(t.device.type == "cpu" for t in layer.parameters())
    layer.reset_parameters()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = MAKERS[kind][1]()
    _forward(layer, x)
    p, scale = _values(layer)
    _check(layer, x, p, scale, TOL[torch.float32] * 10)
