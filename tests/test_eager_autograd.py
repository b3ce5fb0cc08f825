"""Eager training calls: the ops' autograd as plain autograd.Functions (ops._eager_autograd), not the custom ops'
dispatcher round trip; gradients against float64 oracles, with x as its own LoRA input (no dropout) and with another,
on the reference backend and through the kernel branch (simulator); compiled autograd over an eager forward."""
import pytest
import torch

import lora_ext
from lora_ext import ops
from helpers import assert_close_rel, linear_grads64, randomize_

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYERS = {  # blocks: one; [T,F,T]; [F,T]; [T,T]
    "linear": lambda: lora_ext.Linear(24, 18, r=3, lora_alpha=5),
    "linear_fan": lambda: lora_ext.Linear(24, 18, r=3, lora_alpha=5, fan_in_fan_out=True),
    "merged_TFT": lambda: lora_ext.MergedLinear(24, 18, r=2, lora_alpha=3, enable_lora=[True, False, True]),
    "merged_FT": lambda: lora_ext.MergedLinear(24, 18, r=2, enable_lora=[False, True]),
    "merged_TT": lambda: lora_ext.MergedLinear(24, 18, r=2, enable_lora=[True, True]),
}


@pytest.fixture(params=["reference", "kernels"])
def backend(request):
    """The forward on the reference backend, or through the kernel branch (the simulator standing in for _C)."""
    if request.param == "kernels":
        request.getfixturevalue("sim_as_cuda")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_gradients_where_x_is_its_own_lora_input(backend, kind, dtype):
    """No dropout: x_lora is x, its two gradients summed into x.grad by autograd."""
    make = LAYERS[kind]
    layer = randomize_(make()).to(dtype)
    lora_ext.mark_only_lora_as_trainable(layer)
    layer.train()
    x = torch.randn(2, 5, 24).to(dtype).requires_grad_()
    grad = torch.randn(2, 5, 18).to(dtype)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_LinearEagerBackward"  # the Function, not the custom op
    out.backward(grad)
    want = linear_grads64(layer, x, grad)
    for name, got in (("x", x.grad), ("lora_A", layer.lora_A.grad), ("lora_B", layer.lora_B.grad)):
        assert got.dtype == dtype, name
        assert_close_rel(got, want[name], dtype)
    assert layer.weight.grad is None and layer.bias.grad is None


@pytest.mark.parametrize("kind", ["linear", "merged_TFT"])
def test_gradients_under_autocast_where_x_is_its_own_lora_input(backend, kind):
    """Autocast casts x once for both inputs (it stays its own LoRA input): float32 gradients of bfloat16 math."""
    make = LAYERS[kind]
    layer = randomize_(make())
    lora_ext.mark_only_lora_as_trainable(layer)
    x = torch.randn(6, 24, requires_grad=True)
    grad = torch.randn(6, 18)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.backward(grad.bfloat16())
    want = linear_grads64(layer, x, grad)
    for name, got in (("x", x.grad), ("lora_A", layer.lora_A.grad), ("lora_B", layer.lora_B.grad)):
        assert got.dtype == torch.float32, name
        assert_close_rel(got, want[name], torch.bfloat16, factor=2)  # (operands and grad rounded to bf16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["linear", "merged_TFT"])
def test_gradients_with_another_lora_input(backend, kind, dtype):
    """x_lora another tensor (dropout): each input gets its own gradient; the weight trains too."""
    make = LAYERS[kind]
    layer = randomize_(make()).to(dtype)
    layer.weight.requires_grad_(True)  # (frozen at construction, as loralib's)
    layer.bias.requires_grad_(False)
    layout = layer.layout()
    x = torch.randn(7, 24).to(dtype).requires_grad_()
    xl = torch.randn(7, 24).to(dtype).requires_grad_()
    grad = torch.randn(7, 18).to(dtype)
    out = ops.linear(x, xl, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling,
                     num_blocks=layout["num_blocks"], block_ids=layout["block_ids"],
                     fan_in_fan_out=layout["transposed"])
    out.backward(grad)
    want = linear_grads64(layer, x, grad, x_lora=xl)
    for name, got in (("x", x.grad), ("x_lora", xl.grad), ("lora_A", layer.lora_A.grad),
                      ("lora_B", layer.lora_B.grad), ("weight", layer.weight.grad)):
        assert_close_rel(got, want[name], dtype)


@pytest.mark.parametrize("num_blocks,ids", [(1, [0]), (3, [0, 2])])
def test_double_backward_where_x_is_its_own_lora_input(num_blocks, ids):
    """x as its own LoRA input: gradcheck and gradgradcheck in float64."""
    d = torch.float64
    k, nb, r = 5, 3, 2
    w = torch.randn(num_blocks * nb, k, dtype=d, requires_grad=True)
    A = torch.randn(len(ids) * r, k, dtype=d, requires_grad=True)
    B = torch.randn(len(ids) * nb, r, dtype=d, requires_grad=True)
    x = torch.randn(4, k, dtype=d, requires_grad=True)
    fn = lambda x, w, A, B: ops.linear(x, x, w, None, A, B, 0.7, num_blocks=num_blocks, block_ids=ids)
    assert torch.autograd.gradcheck(fn, (x, w, A, B))
    assert torch.autograd.gradgradcheck(fn, (x, w, A, B))


def test_each_op_takes_its_function_in_eager_training():
    """Embedding and delta_weight (MergedLinear.merge_AB, ConvLoRA) likewise; no grad, no Function."""
    emb = randomize_(lora_ext.Embedding(10, 6, r=2))
    assert type(emb(torch.tensor([1, 2])).grad_fn).__name__ == "_EmbeddingEagerBackward"
    conv = randomize_(lora_ext.Conv2d(3, 4, 3, r=2))
    out = conv(torch.randn(1, 3, 5, 5))
    names = set()
    stack = [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and type(fn).__name__ not in names:
            names.add(type(fn).__name__)
            stack.extend(f for f, _ in fn.next_functions)
    assert "_DeltaWeightEagerBackward" in names
    with torch.no_grad():
        assert emb(torch.tensor([1])).grad_fn is None


def test_traced_calls_keep_the_custom_op():
    """torch.jit.trace records the custom op (one call in the trace), never the eager Function."""
    layer = randomize_(lora_ext.Linear(8, 6, r=2))
    x = torch.randn(3, 8, requires_grad=True)
    with torch.jit.optimized_execution(False):
        traced = torch.jit.trace(layer, (x,), check_trace=False)
    graph = str(traced.graph)
    assert "lora_ext::linear" in graph
    assert "Eager" not in graph


def test_tensor_subclasses_keep_the_custom_op():
    """A wrapper subclass operand (TwoTensor) takes the custom op, which its __torch_dispatch__ runs on its inner
    tensors: right values and gradients (the eager Function would run the reference's ops on the wrapper)."""
    from torch.testing._internal.two_tensor import TwoTensor
    layer = randomize_(lora_ext.Linear(8, 6, r=2))
    A = layer.lora_A.detach()
    A2 = TwoTensor(A.clone(), A.clone()).requires_grad_()
    d = ops.delta_weight(A2, layer.lora_B, 0.5, out_features=6)
    assert isinstance(d, TwoTensor) and "Eager" not in type(d.grad_fn).__name__
    want = 0.5 * layer.lora_B.detach().double() @ A.double()
    assert_close_rel(d.a, want, torch.float32)
    assert_close_rel(d.b, want, torch.float32)
    d.sum().backward()
    ones = torch.ones(6, 8, dtype=torch.float64)
    want_A = 0.5 * layer.lora_B.detach().double().t() @ ones
    assert_close_rel(A2.grad.a, want_A, torch.float32)
    x = torch.randn(3, 8)
    x2 = TwoTensor(x.clone(), x.clone()).requires_grad_()
    out = ops.linear(x2, x2, layer.weight, layer.bias, layer.lora_A, layer.lora_B, 0.5)
    assert isinstance(out, TwoTensor) and "Eager" not in type(out.grad_fn).__name__
    want = (x.double() @ (layer.weight.detach().double() + 0.5 * layer.lora_B.detach().double()
                          @ A.double()).t() + layer.bias.detach().double())
    assert_close_rel(out.a, want, torch.float32)


@pytest.mark.parametrize("kind", ["linear", "merged_TFT"])
def test_compiled_autograd_over_an_eager_forward(kind):
    """Compiled autograd traces the eager Function's backward and adds the gradients of x's two edges (x and
    x_lora: no dropout); a backward returning None for one of them crashed it (torch.add(g, None))."""
    make = LAYERS[kind]
    layer = randomize_(make())
    lora_ext.mark_only_lora_as_trainable(layer)
    h = torch.randn(4, 24, requires_grad=True)
    x = h * 1.0  # a hidden state that needs a gradient
    grad = torch.randn(4, 18)
    out = layer(x)
    torch._dynamo.reset()
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager")):
        out.backward(grad)
    torch._dynamo.reset()
    want = linear_grads64(layer, h, grad)
    for name, got in (("x", h.grad), ("lora_A", layer.lora_A.grad), ("lora_B", layer.lora_B.grad)):
        assert_close_rel(got, want[name], torch.float32)
