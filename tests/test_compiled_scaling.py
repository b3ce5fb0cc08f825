"""torch.compile and torch.export read a layer's scaling from its scale tensor when the graph runs.

A switch of adapter writes the live factors and the scale tensor in place (same shapes, or a reserve_rank), so one
trace serves every adapter whatever its scaling: no guard on the float, no retrace per scaling (dynamo gives up
after 8 and runs the frame eagerly), and an exported program follows a switch as a whole instead of pairing the new
factors with the scaling it baked in. Every expected value is a float64 oracle computed here from the factors the
test made; the trace counts come from dynamo's own counter."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import lora_ext
from helpers import assert_close_rel

# distinct scalings, more of them than dynamo's recompile limit (8)
SCALINGS = [0.5 + 0.37 * i for i in range(12)]


def _make(kind, dtype=torch.float32):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    if kind == "linear":
        layer, x = lora_ext.Linear(16, 8, r=4, lora_alpha=8), torch.randn(3, 5, 16, generator=g)
    elif kind == "fan_in_fan_out":
        layer, x = lora_ext.Linear(16, 8, r=4, lora_alpha=8, fan_in_fan_out=True), torch.randn(3, 16, generator=g)
    elif kind == "merged":
        layer = lora_ext.MergedLinear(16, 12, r=2, lora_alpha=4, enable_lora=[True, False, True])
        x = torch.randn(3, 16, generator=g)
    elif kind == "embedding":
        layer, x = lora_ext.Embedding(20, 8, r=4, lora_alpha=8), torch.randint(0, 20, (2, 5), generator=g)
    elif kind == "conv2d":
        layer, x = lora_ext.Conv2d(3, 4, 3, r=2, lora_alpha=4), torch.randn(2, 3, 6, 6, generator=g)
    else:
        layer, x = lora_ext.Conv1d(3, 4, 3, r=2, lora_alpha=4, padding=1), torch.randn(2, 3, 7, generator=g)
    layer = layer.to(dtype)
    if x.is_floating_point():
        x = x.to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layer, x, g


def _add_adapters(layer, g, scalings, grad=False):
    """Adapters with fresh factors, one per scaling; returns {name: (A, B, s)} as made here (clones)."""
    A, B, _ = layer.get_adapter(layer.active_adapter)
    made = {}
    for i, s in enumerate(scalings):
        a = torch.randn(A.shape, generator=g, dtype=A.dtype)
        b = torch.randn(B.shape, generator=g, dtype=B.dtype)
        layer.add_adapter(f"a{i}", a.clone(), b.clone(), s)
        made[f"a{i}"] = (a, b, s)
    if not grad:
        layer.requires_grad_(False)
    return made


def _oracle(kind, layer, x, A, B, s):
    """The layer's unmerged output with adapter (A, B, s), in float64 on the CPU, from its base weights."""
    A, B = A.double(), B.double()
    if kind == "embedding":
        return layer.weight.double().cpu()[x] + s * A.t()[x] @ B.t()
    if kind in ("conv2d", "conv1d"):
        conv = layer.conv
        w = conv.weight.double().cpu()
        fn = F.conv2d if kind == "conv2d" else F.conv1d
        return fn(x.double(), w + s * (B @ A).view(w.shape), conv.bias.double().cpu(), conv.stride, conv.padding)
    w = layer.weight.double().cpu()
    if kind == "fan_in_fan_out":
        w = w.t()
    if kind == "merged":  # enable_lora [True, False, True]: blocks 0 and 2 of 3 (dense_delta64 detaches)
        r, nb = A.shape[0] // 2, layer.out_features // 3
        zero = torch.zeros(nb, A.shape[1], dtype=A.dtype)
        delta = torch.cat([B[:nb] @ A[:r], zero, B[nb:] @ A[r:]])
    else:
        delta = B @ A
    return x.double() @ (w + s * delta).t() + layer.bias.double().cpu()


KINDS = ["linear", "fan_in_fan_out", "merged", "embedding", "conv2d", "conv1d"]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    return torch.device("cpu") if request.param == "cpu" else request.getfixturevalue("cuda").device


@pytest.mark.parametrize("kind", KINDS)
def test_one_trace_serves_every_scaling(kind, device):
    """12 adapters of 12 scalings, each served twice through one compiled graph: every output its own adapter's,
    and dynamo traced once (the float scaling cost a trace per value, then eager past the limit of 8). On CUDA the
    kernels read the scale tensor."""
    torch._dynamo.reset()
    layer, x, g = _make(kind)
    made = _add_adapters(layer, g, SCALINGS)
    layer, x = layer.to(device), x.to(device)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):
            for name, (A, B, s) in made.items():
                layer.set_adapter(name)
                assert_close_rel(compiled(x), _oracle(kind, layer, x.cpu(), A, B, s), torch.float32)
    assert counter.frame_count == 1


def test_one_inductor_trace_serves_every_scaling_of_a_reserved_model():
    """The serving recipe (peft's compiled hotswap): adapters of other ranks and scalings, reserve_rank, one
    inductor compile; every switch served by the one graph with the live storage unchanged."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    model = torch.nn.Sequential(lora_ext.Linear(16, 12, r=2, lora_alpha=3), torch.nn.ReLU(),
                                lora_ext.Linear(12, 8, r=2, lora_alpha=5))
    made = {}
    for i, (r, alpha) in enumerate([(2, 7.0), (4, 3.0), (8, 20.0), (4, 1.0)]):
        name = f"a{i}"
        made[name] = []
        for m in (model[0], model[2]):
            a = torch.randn(r, m.in_features, generator=g)
            b = torch.randn(m.out_features, r, generator=g)
            m.add_adapter(name, a.clone(), b.clone(), alpha / r)
            made[name].append((a, b, alpha / r))
    model.requires_grad_(False)
    lora_ext.reserve_rank(model, 8)
    ptrs = [(m.lora_A.data_ptr(), m.lora_B.data_ptr()) for m in (model[0], model[2])]
    x = torch.randn(4, 16, generator=g)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for name in [*made, *made]:
            for m in (model[0], model[2]):
                m.set_adapter(name)
            (a0, b0, s0), (a1, b1, s1) = made[name]
            h = torch.relu(x.double() @ (model[0].weight.double() + s0 * (b0 @ a0).double()).t()
                           + model[0].bias.double())
            want = h @ (model[2].weight.double() + s1 * (b1 @ a1).double()).t() + model[2].bias.double()
            assert_close_rel(compiled(x), want, torch.float32)
            assert [(m.lora_A.data_ptr(), m.lora_B.data_ptr()) for m in (model[0], model[2])] == ptrs
    assert counter.frame_count == 1


# every kind through aot_eager; inductor (seconds per compile on the CPU) for the Linear
@pytest.mark.parametrize("kind, backend", [(k, "aot_eager") for k in ("linear", "merged", "embedding", "conv2d")]
                         + [("linear", "inductor")])
def test_compiled_gradients_follow_each_adapters_scaling(kind, backend):
    """Trainable adapters of three scalings: the compiled forward and backward give each its own gradients (against
    float64 autograd of the oracle)."""
    torch._dynamo.reset()
    layer, x, g = _make(kind)
    made = _add_adapters(layer, g, [0.7, 2.5, 4.0], grad=True)
    compiled = torch.compile(layer, backend=backend)
    for name, (A, B, s) in made.items():
        layer.set_adapter(name)
        out = compiled(x)
        weight = torch.randn(out.shape, generator=g)
        (out * weight).sum().backward()
        A64 = A.double().requires_grad_()
        B64 = B.double().requires_grad_()
        (_oracle(kind, layer, x, A64, B64, s) * weight.double()).sum().backward()
        assert_close_rel(layer.lora_A.grad, A64.grad, torch.float32)
        assert_close_rel(layer.lora_B.grad, B64.grad, torch.float32)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_a_switch_between_forward_and_backward_keeps_the_forwards_scaling(kind, backend):
    """Frozen adapters, an input that requires grad: a forward under a0, a switch to a1 (which writes the live
    factors and the scale tensor in place), then the backward. A conv's forward saved its delta: the input's
    gradient is a0's, so the graph saved the scaling of its forward too (a partitioner that recomputed a copy of the
    layer's tensor in the backward would give a1's, or trip autograd's in-place check). A linear's backward needs
    the factors themselves, which the switch rewrote: autograd refuses, as in eager, rather than mix adapters."""
    torch._dynamo.reset()
    layer, x, g = _make(kind)
    made = _add_adapters(layer, g, [0.7, 4.0])
    x = x.clone().requires_grad_()
    compiled = layer if backend == "eager" else torch.compile(layer, backend=backend)
    layer.set_adapter("a0")
    out = compiled(x)
    layer.set_adapter("a1")
    weight = torch.randn(out.shape, generator=g)
    if kind == "linear":
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (out * weight).sum().backward()
        return
    (out * weight).sum().backward()
    x64 = x.detach().double().requires_grad_()
    A, B, s = made["a0"]
    (_oracle(kind, layer, x64, A, B, s) * weight.double()).sum().backward()
    assert_close_rel(x.grad, x64.grad, torch.float32)


def test_an_exported_program_follows_a_switch_as_a_whole():
    """torch.export keeps the layer's parameters and its scale tensor by reference: after an in-place switch to an
    adapter with other factors and another scaling it serves that adapter, and after a switch back the first. (With
    the scaling baked in as a float it served the new factors at the old scaling: neither adapter.)"""
    layer, x, g = _make("linear")
    made = _add_adapters(layer, g, [1.5, 6.0])
    layer.set_adapter("a0")
    ptr = layer.lora_A.data_ptr()
    exported = torch.export.export(layer, (x,)).module()
    for name in ("a1", "a0", "a1"):
        layer.set_adapter(name)
        assert layer.lora_A.data_ptr() == ptr  # the switch wrote in place
        assert_close_rel(exported(x), _oracle("linear", layer, x, *made[name]), torch.float32)


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv2d"])
def test_float64_layers_read_a_float64_scale_tensor(kind):
    """A float64 layer's scale tensor is float64 (float32 would put 1/3 1e-8 off, which float64 results show): one
    trace across scalings, float64 outputs, and an exported program follows a switch whole."""
    torch._dynamo.reset()
    layer, x, g = _make(kind, torch.float64)
    made = _add_adapters(layer, g, [1 / 3, 2 / 7, 3 / 11])
    assert layer._scaling_t.dtype == torch.float64
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    layer.set_adapter("a0")
    exported = torch.export.export(layer, (x,)).module()
    with torch.no_grad():
        for name, (A, B, s) in made.items():
            layer.set_adapter(name)
            want = _oracle(kind, layer, x, A, B, s)
            assert_close_rel(compiled(x), want, torch.float64)
            assert_close_rel(exported(x), want, torch.float64)
    assert counter.frame_count == 1


def test_autocast_leaves_the_scale_tensor_in_float32():
    """Under bfloat16 autocast the compiled op gets the scale tensor in float32 (autocast's rule casts only the
    operands): 1.0039 is 1.0 in bfloat16, 0.4% of the update, which the eager result beside it does not lose."""
    torch._dynamo.reset()
    layer = lora_ext.Linear(16, 8, r=4)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    a, b = torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g) * 4
    layer.add_adapter("s", a, b, 1.0039)
    layer.set_adapter("s")
    layer.requires_grad_(False)
    with torch.no_grad():
        layer.weight.zero_()  # the output is the update alone
        layer.bias.zero_()
    x = torch.randn(6, 16, generator=g)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = layer(x)
        got = compiled(x)
    assert got.dtype == eager.dtype == torch.bfloat16
    assert torch.allclose(got.float(), eager.float(), rtol=1e-3, atol=0)
    rounded = layer(x).float() / 1.0039  # what a bfloat16 scale (1.0) would give
    assert not torch.allclose(got.float(), rounded, rtol=1e-3, atol=0)


def test_inductor_freezing_keeps_the_float_scaling():
    """Inductor's freezing inlines a one-element tensor as the number it held at compile time while the factors stay
    live: with the tensor the graph would serve new factors at the old scaling. Under freezing the layer takes the
    float, which dynamo guards on (a retrace per scaling, each output right)."""
    import torch._inductor.config as inductor_config
    torch._dynamo.reset()
    layer, x, g = _make("linear")
    made = _add_adapters(layer, g, [1.5, 6.0, 1.5])
    with inductor_config.patch(freezing=True), torch.no_grad():
        layer.set_adapter("a0")
        compiled = torch.compile(layer, backend="inductor")
        for name in ("a0", "a1", "a2", "a0"):
            layer.set_adapter(name)
            assert_close_rel(compiled(x), _oracle("linear", layer, x, *made[name]), torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# the op surface: a tensor scale


@pytest.mark.parametrize("grad", [False, True])
def test_ops_take_a_tensor_scale(grad):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    x = torch.randn(5, 16, generator=g)
    w, b = torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    A, B = torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g)
    if grad:
        A.requires_grad_()
        B.requires_grad_()
    s = 2.0 / 3.0
    st = torch.tensor([s])
    y = lora_ext.ops.linear(x, x, w, b, A, B, st)
    want = x.double() @ (w.double() + torch.tensor(s, dtype=torch.float32).double() * (B @ A).double()).t() + b
    assert_close_rel(y, want, torch.float32)
    ids = torch.randint(0, 16, (3, 4), generator=g)
    e = lora_ext.ops.embedding(ids, w.t().contiguous(), A, B, st)
    assert_close_rel(e, w.t().double()[ids] + s * A.double().t()[ids] @ B.double().t(), torch.float32)
    if grad:
        (y.sum() + e.sum()).backward()
        assert A.grad is not None and torch.isfinite(A.grad).all()


def test_ops_refuse_a_bad_tensor_scale():
    x, w = torch.randn(5, 16), torch.randn(8, 16)
    A, B = torch.randn(4, 16), torch.randn(8, 4)
    cases = [(torch.tensor([1.0], dtype=torch.float64), "float32 tensor of one element"),
             (torch.tensor([1.0, 2.0]), "float32 tensor of one element"),
             (torch.tensor([1.0], requires_grad=True), "that requires grad")]
    for st, msg in cases:
        with pytest.raises(ValueError, match=msg) as err:
            lora_ext.ops.linear(x, x, w, None, A, B, st)
        assert str(err.value).startswith("scale must be a float or")
    with pytest.raises(ValueError, match="pass scale_tensor=None"):
        lora_ext.ops.linear(x, x, w, None, A, B, torch.tensor([1.0]), scale_tensor=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="scale must be a float or"):
        lora_ext.ops.embedding(torch.tensor([1]), torch.randn(16, 8), A, B, torch.tensor([1.0], dtype=torch.half))


@pytest.mark.parametrize("kind", ["linear", "merged", "embedding", "conv2d"])
def test_a_jit_traced_layer_follows_a_switch_as_a_whole(kind):
    """torch.jit.trace records the layer's op with its scale tensor (by reference, as the parameters): after an
    in-place switch to other factors and another scaling it serves that adapter. (It used to fail on the layers'
    tensor-parallel refusal, met through dir(); with the float recorded it would serve new factors at the old
    scaling.)"""
    layer, x, g = _make(kind)
    made = _add_adapters(layer, g, [1.5, 6.0])
    layer.set_adapter("a0")
    with pytest.warns((FutureWarning, DeprecationWarning)):  # torch.jit.trace is deprecated
        traced = torch.jit.trace(layer, (x,), check_trace=False)
    for name in ("a1", "a0", "a1"):
        layer.set_adapter(name)
        assert_close_rel(traced(x), _oracle(kind, layer, x, *made[name]), torch.float32)


def test_introspection_lists_a_layer_without_meeting_the_tensor_parallel_refusal():
    import inspect
    layer = lora_ext.Linear(8, 4, r=2)
    names = dict(inspect.getmembers(layer))
    assert "_distribute_module_applied" not in names and "scaling" in names and "lora_A" in names
    # read from anywhere but torch's distribute_module (torch.jit.script reads every property), the layer has no
    # such attribute; distribute_module itself is still refused (test_tensor_parallel's stock-style case)
    assert getattr(layer, "_distribute_module_applied", False) is False


def test_an_exported_program_keeps_serving_the_trainable_adapter_it_holds_whole():
    """Trainable adapters: a switch registers the new adapter's own Parameters (its optimizer holds them) and a new
    scale tensor beside them. A program exported before holds the previous objects: it serves that adapter, factors
    and scaling alike (it served the new adapter's scaling with the old factors when the switch filled the one
    scale tensor in place)."""
    layer, x, g = _make("linear")
    made = _add_adapters(layer, g, [1.5, 6.0], grad=True)
    layer.set_adapter("a0")
    with torch.no_grad():
        exported = torch.export.export(layer, (x,)).module()
        for name in ("a1", "a0", "a1"):
            layer.set_adapter(name)
            assert layer.lora_A.requires_grad
            assert_close_rel(layer(x), _oracle("linear", layer, x, *made[name]), torch.float32)
            assert_close_rel(exported(x), _oracle("linear", layer, x, *made["a0"]), torch.float32)


def _programs(layer, x):
    """An exported and a jit-traced program of the layer as it is now."""
    with pytest.warns((FutureWarning, DeprecationWarning)):  # torch.jit.trace is deprecated
        traced = torch.jit.trace(layer, (x,), check_trace=False)
    return {"export": torch.export.export(layer, (x,)).module(), "jit": traced}


def _check_programs(programs, layer, x, made, names, held=None):
    """Switches the (linear) layer to each of `names`; after each, every program serves adapter `held` (the one it
    holds), or with held None the adapter switched to."""
    with torch.no_grad():
        for name in names:
            layer.set_adapter(name)
            assert_close_rel(layer(x), _oracle("linear", layer, x, *made[name]), torch.float32)
            for program in programs.values():
                assert_close_rel(program(x), _oracle("linear", layer, x, *made[held or name]), torch.float32)


def test_programs_held_over_an_assign_load_serve_their_adapter_whole():
    """load_state_dict(assign=True) gives the layer new Parameter objects, and a scale tensor of their own: programs
    made before hold the previous pair and its tensor, and keep serving that adapter whole after switches (they
    served its factors at the new adapter's scaling when the layer kept one tensor)."""
    layer, x, g = _make("linear")
    made = _add_adapters(layer, g, [0.5, 3.0])
    layer.set_adapter("a0")
    programs = _programs(layer, x)
    layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
    _check_programs(programs, layer, x, made, ("a1", "a0", "a1"), held="a0")
    _check_programs(_programs(layer, x), layer, x, made, ("a0", "a1"))  # made after the load: they follow


def test_a_layer_built_on_meta_and_loaded_with_assign_has_its_scale_tensor_beside_its_factors():
    """The low-memory loading path: build on the meta device, load_state_dict(assign=True). The scale tensor is on
    the factors' device (it stayed on meta, so traced forwards took the float and an exported program served new
    factors at the old scaling after a switch)."""
    src, x, g = _make("linear")
    with torch.device("meta"):
        layer = lora_ext.Linear(16, 8, r=4, lora_alpha=8)
    # (copies, as a load from a file gives: over src's own tensors the layer would share src's factors, which its
    # switches then leave alone, taking new Parameters that a program made before does not hold)
    layer.load_state_dict({k: v.clone() for k, v in src.state_dict().items()}, assign=True)
    assert layer._scaling_t.device == layer.lora_A.device == torch.device("cpu")
    made = _add_adapters(layer, g, [0.5, 3.0])
    _check_programs(_programs(layer, x), layer, x, made, ("a1", "a0"))


def test_inductor_freezing_does_not_concern_export_or_jit():
    """The freezing flag makes compiled forwards take the float; exported and jit-traced programs still read the
    scale tensor and follow a switch whole."""
    import torch._inductor.config as inductor_config
    layer, x, g = _make("linear")
    made = _add_adapters(layer, g, [0.5, 3.0])
    layer.set_adapter("a0")
    with inductor_config.patch(freezing=True):
        programs = _programs(layer, x)
    _check_programs(programs, layer, x, made, ("a1", "a0"))


def test_programs_serve_one_adapter_whole_when_training_takes_the_parameters_back():
    """A serving switch lends the default adapter's Parameters to a1; a program exported then holds them. Making the
    factors trainable gives each adapter its own Parameters back (mark_only_lora_as_trainable, or a trainable
    switch): the lent pair gets the default adapter's values and its scale tensor the default's scaling, so the
    program serves the default adapter whole (it served the default's factors at a1's scaling)."""
    for how in ("mark_only_lora_as_trainable", "trainable switch"):
        layer, x, g = _make("linear")
        A, B, s = (t.clone() if isinstance(t, torch.Tensor) else t for t in layer.get_adapter("default"))
        _add_adapters(layer, g, [0.5, 3.0, 7.0])
        layer.set_adapter("a1")
        programs = _programs(layer, x)
        if how == "mark_only_lora_as_trainable":
            lora_ext.mark_only_lora_as_trainable(layer)
        else:
            layer.requires_grad_(True)
            layer.set_adapter("a2")
        with torch.no_grad():
            for program in programs.values():
                assert_close_rel(program(x), _oracle("linear", layer, x, A, B, s), torch.float32)


def test_jit_trace_inside_a_mixed_batch_is_refused():
    layer, x, g = _make("linear")
    _add_adapters(layer, g, [0.5, 3.0])
    layer.eval()
    with torch.no_grad(), lora_ext.batch_adapters(layer, ["a0", "a1", "a0"]):
        with pytest.raises(RuntimeError, match="torch.jit.trace inside a lora.batch_adapters block"):
            torch.jit.trace(layer, (x,), check_trace=False)


def test_a_tensor_scale_is_checked_and_may_have_any_one_element_shape():
    x, w = torch.randn(5, 16), torch.randn(8, 16)
    A, B = torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            lora_ext.ops.linear(x, x, w, None, A, B, torch.tensor([bad]))
    for shape in ((), (1, 1, 1)):
        y = lora_ext.ops.linear(x, x, w, None, A, B, torch.full(shape, 0.75))
        want = x.double() @ (w.double() + 0.75 * (B @ A).double()).t()
        assert_close_rel(y, want, torch.float32)
        y.sum().backward()
        assert A.grad.shape == A.shape and torch.isfinite(A.grad).all()
        A.grad = B.grad = None
    x64, w64 = x.double(), w.double()
    A64, B64 = A.detach().double(), B.detach().double()
    s = torch.tensor([1 / 3], dtype=torch.float64)  # a float64 op takes a float64 tensor: exactly 1/3
    y = lora_ext.ops.linear(x64, x64, w64, None, A64, B64, s)
    assert_close_rel(y, x64 @ (w64 + (1 / 3) * B64 @ A64).t(), torch.float64)
    with pytest.raises(ValueError, match="float32 tensor of one element"):  # a float32 op does not
        lora_ext.ops.linear(x, x, w, None, A.detach(), B.detach(), s)


def test_hold_around_a_compiled_forward_keeps_switches_on_other_threads_out():
    """Compiled forwards take no lock; lora.hold(model) taken around the compiled call (outside it) makes model-level
    switches on another thread wait: every output is one adapter's, whole."""
    import threading
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    model = torch.nn.Sequential(lora_ext.Linear(32, 32, r=4), torch.nn.ReLU(), lora_ext.Linear(32, 16, r=4))
    for i, s in enumerate([0.5, 4.0]):
        for m in (model[0], model[2]):
            m.add_adapter(f"a{i}", torch.randn(4, m.in_features, generator=g), torch.randn(m.out_features, 4, generator=g), s)
    model.requires_grad_(False)
    x = torch.randn(8, 32, generator=g)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    want = {}
    with torch.no_grad():
        for name in ("a0", "a1"):
            lora_ext.set_adapter(model, name)
            want[name] = model(x)
            compiled(x)  # traced before the race
    stop, torn, served = threading.Event(), [], []

    def switcher():
        while not stop.is_set():
            for name in ("a0", "a1"):
                lora_ext.set_adapter(model, name)

    thread = threading.Thread(target=switcher)
    thread.start()
    try:
        with torch.no_grad():
            for _ in range(300):
                with lora_ext.hold(model):
                    y = compiled(x)
                match = [n for n, w in want.items() if torch.allclose(y, w, rtol=1e-5, atol=1e-5)]
                (served if match else torn).append(match)
    finally:
        stop.set()
        thread.join()
    assert not torn and len(served) == 300


def test_programs_of_a_deep_copy_and_after_a_dtype_round_trip_follow_switches_whole():
    """nn.Parameter's deepcopy drops the Parameter's attributes: the copy's scale tensor is given back to its live
    pair, so a program of the copy follows the copy's switches (it served the new factors at the old scaling: 68x
    off). A float32 -> float64 -> float32 round trip keeps the Parameter objects: the float32 tensor a program made
    before holds is filled again by later switches."""
    import copy
    layer, x, g = _make("linear")
    made = _add_adapters(layer, g, [0.5, 3.0])
    layer.set_adapter("a0")
    clone = copy.deepcopy(layer)
    _check_programs(_programs(clone, x), clone, x, made, ("a1", "a0"))
    _check_programs({"layer": layer}, layer, x, made, ("a1", "a0"))  # the original is its own
    programs = _programs(layer, x)
    layer.double()
    layer.float()
    _check_programs(programs, layer, x, made, ("a1", "a0", "a1"))


def test_layers_sharing_a_factor_parameter_keep_their_own_scalings():
    """Two layers whose lora_A / lora_B are one Parameter pair, with scalings 2 and 1: each serves its own scaling,
    eager, compiled and on the CUDA kernels' code (the simulator): the scale tensors a Parameter carries are per
    layer."""
    from lora_ext import ops
    sim = pytest.importorskip("lora_ext._sim")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    l1, l2 = lora_ext.Linear(16, 8, r=4, lora_alpha=8), lora_ext.Linear(16, 8, r=4, lora_alpha=4)
    with torch.no_grad():
        l1.lora_B.normal_(generator=g)
    l2.lora_A, l2.lora_B = l1.lora_A, l1.lora_B
    l2.scaling = 1.0
    for m in (l1, l2):
        m.requires_grad_(False)
    x = torch.randn(3, 16, generator=g)
    A, B = l1.lora_A.detach().clone(), l1.lora_B.detach().clone()
    torch._dynamo.reset()
    with torch.no_grad():
        for layer, s in ((l1, 2.0), (l2, 1.0)):
            want = x.double() @ (layer.weight.double() + s * (B @ A).double()).t() + layer.bias.double()
            assert_close_rel(layer(x), want, torch.float32)
            assert_close_rel(torch.compile(layer, backend="aot_eager")(x), want, torch.float32)
            with ops.use_kernels(sim, "cpu"):
                assert_close_rel(layer(x), want, torch.float32)


def test_float64_factors_on_a_float32_layer_compile_with_the_float_and_refuse_programs():
    """float64 factors on a float32 base get a float64 scale tensor, which no float32 op takes: torch.compile takes the
    float there (guarded; it raised that the scale must be float32, a scale the user never passed), and torch.export
    and torch.jit.trace refuse, naming the dtypes (a program would bake the float in and serve a later adapter's
    factors at this scaling: 0.84 off)."""
    layer, x, g = _make("linear")
    made = _add_adapters(layer, g, [0.5, 3.0])
    layer.set_adapter("a1")
    with torch.no_grad():
        layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.double(), layer.lora_B.data.double()
    layer.scaling = 3.0  # (a new scale tensor for the float64 factors)
    assert layer._scaling_t.dtype == torch.float64
    torch._dynamo.reset()
    with torch.no_grad():
        want = _oracle("linear", layer, x, *made["a1"])
        assert_close_rel(layer(x), want, torch.float32)
        assert_close_rel(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), want, torch.float32)
        with pytest.raises(RuntimeError, match="float64 and other dtypes meet"):
            torch.export.export(layer, (x,))
        with pytest.raises(RuntimeError, match="float64 and other dtypes meet"), pytest.warns((FutureWarning, DeprecationWarning)):
            torch.jit.trace(layer, (x,), check_trace=False)


def test_a_switch_is_refused_while_a_parametrization_computes_the_factors():
    """With torch.nn.utils.parametrize on lora_A the layer's attribute is the parametrization's output: a switch
    wrote a1's factors into a temporary, then failed with KeyError 'lora_A', leaving a0 active with a1's factors.
    Refused before anything changes, naming the parametrization."""
    import torch.nn.utils.parametrize as parametrize

    class Same(torch.nn.Module):
        def forward(self, t):
            return t

    layer, x, g = _make("linear")
    made = _add_adapters(layer, g, [0.5, 3.0])
    layer.set_adapter("a0")
    parametrize.register_parametrization(layer, "lora_A", Same())
    with torch.no_grad():
        before = layer(x)
        for call in (lambda: layer.set_adapter("a1"), lambda: layer.add_adapter("a0", *made["a1"])):
            with pytest.raises(ValueError, match="parametrization on lora_A"):
                call()
            assert layer.active_adapter == "a0" and layer.scaling == 0.5
            assert torch.equal(layer(x), before)



def test_a_deep_copy_tied_back_to_its_original_keeps_its_own_scaling():
    """A deep copy has a layer key of its own: tying its factors back to the original's Parameters keeps the two
    scalings apart (the copy kept the original's key and the two shared one tensor: 0.66 off compiled and on the
    CUDA kernels' code)."""
    import copy
    from lora_ext import ops
    sim = pytest.importorskip("lora_ext._sim")
    layer, x, g = _make("linear")
    layer.requires_grad_(False)
    clone = copy.deepcopy(layer)
    clone.lora_A, clone.lora_B = layer.lora_A, layer.lora_B
    layer.scaling, clone.scaling = 2.0, 0.5
    A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    torch._dynamo.reset()
    with torch.no_grad():
        for m, s in ((layer, 2.0), (clone, 0.5)):
            want = _oracle("linear", m, x, A, B, s)
            assert_close_rel(torch.compile(m, backend="aot_eager")(x), want, torch.float32)
            with ops.use_kernels(sim, "cpu"):
                assert_close_rel(m(x), want, torch.float32)


def test_factors_replaced_behind_the_layers_back_get_their_scale_tensor_before_a_program_holds_them():
    """`layer.lora_A = Parameter(...)` syncs at once; a Parameter put into _parameters directly (accelerate's
    set_module_tensor_to_device) is synced by the next eager forward, and torch.jit.trace before that is refused.
    Programs made after follow switches whole (they served a1's factors at a0's scaling: 0.84 off)."""
    for how in ("setattr", "direct"):
        layer, x, g = _make("linear")
        made = _add_adapters(layer, g, [0.5, 3.0])
        layer.set_adapter("a0")
        for name in ("lora_A", "lora_B"):
            p = torch.nn.Parameter(getattr(layer, name).detach().clone(), requires_grad=False)
            if how == "setattr":
                setattr(layer, name, p)
            else:
                layer._parameters[name] = p
        if how == "direct":
            with pytest.raises(RuntimeError, match="replaced behind the layer's back"), pytest.warns((FutureWarning, DeprecationWarning)):
                torch.jit.trace(layer, (x,), check_trace=False)
            with torch.no_grad():
                layer(x)  # an eager forward syncs
        _check_programs(_programs(layer, x), layer, x, made, ("a1", "a0"))


@pytest.mark.parametrize("how", ["load_peft_adapter", "hotswap_adapter"])
def test_loads_into_a_parametrized_model_are_refused_before_anything_changes(how, tmp_path):
    """A parametrization on one layer's lora_B: loading into the active adapter (or hotswapping it) is refused
    before the first layer changes (the other layer took the new factors and scaling before the refusal: a model
    2.34 off its old self and 1.13 off the new adapter)."""
    import torch.nn.utils.parametrize as parametrize

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = lora_ext.Linear(16, 16, r=4, lora_alpha=8)
            self.v = lora_ext.Linear(16, 16, r=4, lora_alpha=8)

        def forward(self, x):
            return self.v(torch.relu(self.q(x)))

    class Same(torch.nn.Module):
        def forward(self, t):
            return t

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    src, model = Two(), Two()
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        for m in (src.q, src.v):
            m.scaling = 4.0
    lora_ext.save_peft_adapter(src, str(tmp_path / "new"))
    model.requires_grad_(False)
    parametrize.register_parametrization(model.v, "lora_B", Same())
    x = torch.randn(3, 16, generator=g)
    with torch.no_grad():
        before = model(x)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match="parametrization on lora_B"):
            getattr(lora_ext, how)(model, str(tmp_path / "new"), "default")
        assert torch.equal(model(x), before)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
        assert model.q.scaling == model.v.scaling == 2.0
