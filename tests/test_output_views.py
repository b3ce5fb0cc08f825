"""A layer's output takes in-place writes under autograd, as nn.Linear's and loralib's do.

The custom ops' outputs used to be views of their flat results (`out.view(*lead, n)`), and autograd refuses an
in-place write to a view made inside a custom Function: `layer(x).relu_()`, nn.ReLU(inplace=True) after a
lora.Linear, or `h = proj(x); h += residual` raised "Output 0 of GeneratedBackwardFor_lora_ext_linear_default is a
view and is being modified inplace" in training, where loralib's layers train. Under FSDP2 a module returning a
view also drops its pre-backward hook on such a write (FSDP2 warns of it at every forward).

Each case runs the layer, writes its output in place, and checks the output and every gradient against float64
formulas written here (the effective weight W + scaling * B A), on the reference backend and on the CUDA
kernels' host code (the simulator standing in for lora_ext._C)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import lora_ext as lora
from dist import run_ranks
from helpers import TOL, layer_forward64, randomize_, rel_err

SCALE = 0.75  # lora_alpha / r of every layer below


def _reference64(layer, p, x):
    return layer_forward64(layer, p, x, SCALE)


CASES = {
    "linear-2d": (lambda: lora.Linear(12, 10, r=4, lora_alpha=3), (5, 12)),
    "linear-1d": (lambda: lora.Linear(12, 10, r=4, lora_alpha=3), (12,)),
    "linear-3d": (lambda: lora.Linear(12, 10, r=4, lora_alpha=3), (2, 3, 12)),
    "linear-fifo-3d": (lambda: lora.Linear(12, 10, r=4, lora_alpha=3, fan_in_fan_out=True), (2, 3, 12)),
    "linear-nobias-3d": (lambda: lora.Linear(12, 10, r=4, lora_alpha=3, bias=False), (2, 3, 12)),
    "merged-2d": (lambda: lora.MergedLinear(12, 15, r=2, lora_alpha=1.5, enable_lora=[True, False, True]), (4, 12)),
    "merged-fifo-3d": (lambda: lora.MergedLinear(12, 15, r=2, lora_alpha=1.5, enable_lora=[True, False, True],
                                                 fan_in_fan_out=True), (2, 3, 12)),
    "embedding-1d": (lambda: lora.Embedding(20, 8, r=4, lora_alpha=3), (6,)),
    "embedding-2d": (lambda: lora.Embedding(20, 8, r=4, lora_alpha=3), (2, 5)),
    "conv2d": (lambda: lora.Conv2d(3, 4, 3, r=2, lora_alpha=1.5, padding=1), (2, 3, 5, 5)),
}


def _build(case):
    make, shape = CASES[case]
    layer = randomize_(make())
    if isinstance(layer, lora.Embedding):
        x = torch.randint(0, 20, shape)
    else:
        x = torch.randn(shape, requires_grad=True)
    return layer, x


def _check_in_place_training(layer, x, write, tol):
    """Runs layer(x), writes the output in place (`write`), back-propagates a random weighting, and compares the
    written output and every gradient with float64 autograd through the same formula."""
    y = layer(x)
    assert not y._is_view(), f"{type(layer).__name__} returned a view"
    y = write(y)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    p64 = {n: q.detach().double().requires_grad_() for n, q in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_() if x.is_floating_point() else x
    y64 = write(_reference64(layer, p64, x64))
    (y64 * g.double()).sum().backward()
    assert rel_err(y, y64) < tol
    trained = [(name, param) for name, param in layer.named_parameters() if param.requires_grad]
    assert {"lora_A", "lora_B"} <= {name for name, _ in trained}
    for name, param in trained:  # (the frozen weight has none: loralib's layers freeze it)
        assert param.grad is not None, name
        assert rel_err(param.grad, p64[name].grad) < tol, name
    if x.is_floating_point():
        assert rel_err(x.grad, x64.grad) < tol


WRITES = {
    "relu_": lambda y: y.relu_(),
    "residual +=": lambda y: y.add_(y.detach().flip(0)),
    "slice *=": lambda y: (y[..., :2].mul_(3), y)[1],
}


@pytest.mark.parametrize("write", sorted(WRITES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_output_takes_in_place_writes_in_training(case, write, backend):
    layer, x = _build(case)
    _check_in_place_training(layer, x, WRITES[write], TOL[torch.float32] * 10)


@pytest.mark.parametrize("case", ["linear-3d", "merged-fifo-3d", "embedding-2d"])
def test_ops_outputs_are_not_views(case, backend):
    """The custom ops, reached by the layers when gradients are recorded, and called directly. (Without autograd the
    eager path may return a view, as nn.Linear does for 3-D inputs: nothing refuses an in-place write then.)"""
    layer, x = _build(case)
    y = layer(x)
    assert not y._is_view()
    with torch.no_grad():
        z = layer(x)
        z.mul_(2)  # (a view or not, it takes the write)
    assert torch.equal(z, 2 * y.detach())
    lin = layer if not isinstance(layer, lora.Embedding) else None
    if lin is not None:
        w = lin.weight
        y = torch.ops.lora_ext.linear(x, x, w, lin.bias, lin.lora_A, lin.lora_B, SCALE, len(lin.enable_lora)
                                      if isinstance(lin, lora.MergedLinear) else 1, lin.block_ids, lin.fan_in_fan_out)
    else:
        y = torch.ops.lora_ext.embedding(x, layer.weight, layer.lora_A, layer.lora_B, SCALE, None, False, False)
    assert not y._is_view()
    y.mul_(2)  # would raise under autograd for a view of a custom Function
    y.sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0


def test_in_place_under_autocast(backend):
    """In-place writes after a lora.Linear under CPU autocast (bfloat16), against float64. (Linear writes: a relu's
    mask would differ between bfloat16 and float64 where outputs round across zero.)"""
    layer, x = _build("linear-3d")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == torch.bfloat16 and not y._is_view()
        y.mul_(2).add_(1)
    g = torch.randn_like(y, dtype=torch.float32)
    (y.float() * g).sum().backward()
    p64 = {n: q.detach().double().requires_grad_() for n, q in layer.named_parameters()}
    y64 = _reference64(layer, p64, x.detach().double()) * 2 + 1
    (y64 * g.double()).sum().backward()
    assert rel_err(y, y64) < TOL[torch.bfloat16]
    assert rel_err(layer.lora_A.grad, p64["lora_A"].grad) < TOL[torch.bfloat16] * 2
    assert rel_err(layer.lora_B.grad, p64["lora_B"].grad) < TOL[torch.bfloat16] * 2


@pytest.mark.parametrize("case", ["linear-3d", "embedding-2d"])
def test_in_place_compiled(case):
    """The same write inside a torch.compile'd function (aot_eager: the custom op in the graph)."""
    layer, x = _build(case)
    twin = _build(case)[0]
    twin.load_state_dict(layer.state_dict())
    fn = torch.compile(lambda m, t: m(t).mul_(2).relu_(), backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    y = fn(layer, x)
    y.sum().backward()
    p64 = {n: q.detach().double().requires_grad_() for n, q in twin.named_parameters()}
    y64 = (_reference64(twin, p64, x.detach().double() if x.is_floating_point() else x) * 2).relu()
    y64.sum().backward()
    assert rel_err(y, y64) < TOL[torch.float32] * 10
    assert rel_err(layer.lora_A.grad, p64["lora_A"].grad) < TOL[torch.float32] * 10


def _fsdp_in_place(rank, world):
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    layer, x = _build("linear-3d")
    x = x.detach()
    full = {n: q.detach().clone() for n, q in layer.named_parameters()}
    lora.mark_only_lora_as_trainable(layer)
    fully_shard(layer)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        y = layer(x)
    view_warnings = [str(w.message) for w in seen if "view" in str(w.message)]
    y.add_(1.0).relu_()
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y * g).sum().backward()
    grads = {n: q.grad.full_tensor() for n, q in layer.named_parameters() if q.grad is not None}
    return view_warnings, full, grads, y.detach()


def test_fsdp2_in_place_write_keeps_the_backward():
    """fully_shard(lora.Linear) on 2 gloo ranks: no "returned a view tensor" warning, and an in-place write of the
    output keeps FSDP2's pre-backward hook: the gradients are float64's (the ranks' data are the same, so the
    reduced gradient is the single-process one)."""
    for view_warnings, full, grads, y in run_ranks(_fsdp_in_place):
        assert view_warnings == []
        p64 = {n: q.double().requires_grad_() for n, q in full.items()}
        layer = lora.Linear(12, 10, r=4, lora_alpha=3)
        torch.manual_seed(0)
        x = _build("linear-3d")[1].detach().double()
        y64 = (_reference64(layer, p64, x) + 1).relu()
        g = torch.randn(y64.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
        (y64 * g.double()).sum().backward()
        assert rel_err(y, y64) < TOL[torch.float32] * 10
        assert sorted(grads) == ["lora_A", "lora_B"]
        for name in grads:
            assert rel_err(grads[name], p64[name].grad) < TOL[torch.float32] * 10, name


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["linear-3d", "merged-fifo-3d", "embedding-2d"])
def test_in_place_on_the_kernels(case, cuda):
    """On the CUDA kernels (the simulator in a rehearsal): the output is not a view and takes relu_ in training."""
    layer, x = _build(case)
    layer = layer.to(cuda.device)
    x = x.detach().to(cuda.device).requires_grad_(x.is_floating_point())
    y = layer(x)
    assert not y._is_view()
    y.relu_().sum().backward()
    cuda.synchronize()
    p64 = {n: q.detach().cpu().double().requires_grad_() for n, q in layer.named_parameters()}
    x64 = x.detach().cpu().double() if x.is_floating_point() else x.cpu()
    y64 = _reference64(layer, p64, x64).relu()
    y64.sum().backward()
    assert rel_err(y, y64) < TOL[torch.float32] * 10
    assert rel_err(layer.lora_B.grad, p64["lora_B"].grad) < TOL[torch.float32] * 10


# ---------------------------------------------------------------------------------------------------
# In-place writes to what the forward read: the ops save only the tensors the asked-for gradients read (as F.linear
# and nn.Embedding do), so writes that loralib's layers take are taken here too.


@pytest.mark.parametrize("merged", [False, True], ids=["Linear", "MergedLinear"])
def test_residual_written_in_place_with_lora_dropout(merged, backend):
    """`h += layer(h)` with lora_dropout: the LoRA path reads dropout(h), another tensor, and the frozen weight's
    gradient never reads h, so nothing saved is written (loralib's layers train here; the op used to save h and
    raise "modified by an inplace operation"). Against float64 with the same dropout mask."""
    if merged:
        layer = lora.MergedLinear(12, 12, r=2, lora_alpha=1.5, lora_dropout=0.25, enable_lora=[True, False, True])
    else:
        layer = lora.Linear(12, 12, r=4, lora_alpha=3, lora_dropout=0.25)
    randomize_(layer)
    lora.mark_only_lora_as_trainable(layer)
    h0 = torch.randn(2, 3, 12, requires_grad=True)
    g = torch.randn(2, 3, 12)
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    h = h0 * 1
    h += layer(h)
    (h * g).sum().backward()

    torch.manual_seed(seed)
    mask = F.dropout(torch.ones(2, 3, 12), 0.25)  # the layer's dropout of a float32 input of this shape
    p64 = {n: q.detach().double().requires_grad_() for n, q in layer.named_parameters()}
    x64 = h0.detach().double().requires_grad_()
    base = F.linear(x64, p64["weight"], p64["bias"])
    lora_term = layer_forward64(layer, p64, x64 * mask.double(), SCALE) - F.linear(x64 * mask.double(),
                                                                                   p64["weight"], p64["bias"])
    h64 = x64 + base + lora_term
    (h64 * g.double()).sum().backward()
    assert rel_err(h, h64) < TOL[torch.float32] * 10
    for name in ("lora_A", "lora_B"):
        assert rel_err(dict(layer.named_parameters())[name].grad, p64[name].grad) < TOL[torch.float32] * 10, name
    assert rel_err(h0.grad, x64.grad) < TOL[torch.float32] * 10


def test_embedding_with_max_norm_twice_before_the_backward(backend):
    """max_norm renormalises the looked-up rows of the weight in place at each lookup; two lookups before one
    backward are fine for nn.Embedding (the op used to save the weight and raise "modified by an inplace
    operation"). Against float64: nn.Embedding's lookups with max_norm for the base (loralib's renormalises lora_A
    too, a bug of its own), plus the LoRA term."""
    layer = lora.Embedding(20, 8, r=4, lora_alpha=3, max_norm=1.0)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(20, 8) * 3)
        layer.lora_A.copy_(torch.randn(4, 20) * 0.5)
        layer.lora_B.copy_(torch.randn(8, 4) * 0.5)
    base = torch.nn.Embedding(20, 8, max_norm=1.0).double()
    base.weight.data.copy_(layer.weight.double())
    A64, B64 = (layer.lora_A.detach().double().requires_grad_(), layer.lora_B.detach().double().requires_grad_())
    lora.mark_only_lora_as_trainable(layer)
    ids1, ids2 = torch.tensor([[1, 2, 3]]), torch.tensor([[3, 4, 5]])
    y1, y2 = layer(ids1), layer(ids2)  # the second renormalises row 3 again (a no-op now), and rows 4, 5
    (y1.square().sum() + y2.sum()).backward()
    t1, t2 = (base(ids) + SCALE * F.embedding(ids, A64.t()) @ B64.t() for ids in (ids1, ids2))
    (t1.square().sum() + t2.sum()).backward()
    assert rel_err(y1, t1) < TOL[torch.float32] * 10 and rel_err(y2, t2) < TOL[torch.float32] * 10
    assert rel_err(layer.weight, base.weight) < TOL[torch.float32] * 10  # renormalised alike
    assert rel_err(layer.lora_A.grad, A64.grad) < TOL[torch.float32] * 10
    assert rel_err(layer.lora_B.grad, B64.grad) < TOL[torch.float32] * 10
