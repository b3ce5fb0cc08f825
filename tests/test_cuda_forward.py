"""The forward kernels on CUDA tensors: lora_ext._C.linear / embedding directly, through the ops and the
layers, gradients, and a CUDA graph capture of an unmerged layer. Skipped without a GPU
(bench/gpu_check.sh runs them); the simulator covers the same kernels in CI (test_sim_forward.py)."""
import pytest
import torch

from kernel_cases import KERNEL_DTYPES, PATTERNS

import lora_ext
from lora_ext import ops
from conftest import assert_close_rel, dense_delta64

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and ops.cuda_kernels_available()),
                                reason="needs a CUDA device and lora_ext built with its CUDA kernels")



def _linear64(x, x_lora, w, bias, A, B, scale, num_blocks, ids, fan):
    wl = (w.t() if fan else w).double().cpu()
    n_out, k = wl.shape
    y = x.double().cpu().reshape(-1, k) @ wl.t() + (0 if bias is None else bias.double().cpu())
    delta = dense_delta64(A.cpu(), B.cpu(), num_blocks, ids, n_out)
    y = y + scale * x_lora.double().cpu().reshape(-1, k) @ delta.t()
    return y.reshape(*x.shape[:-1], n_out)


def _layer(pattern, k, nb, r, dtype):
    num_blocks, ids, fan = PATTERNS[pattern]
    n_out = num_blocks * nb
    w = torch.randn((k, n_out) if fan else (n_out, k), device="cuda").to(dtype)
    return (w, torch.randn(n_out, device="cuda").to(dtype), torch.randn(len(ids) * r, k, device="cuda").to(dtype),
            torch.randn(len(ids) * nb, r, device="cuda").to(dtype), num_blocks, ids, fan)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 40), (300,)])
@pytest.mark.parametrize("k,nb,r", [(53, 37, 4), (256, 264, 16)])
def test_cuda_linear_kernels(dtype, pattern, lead, k, nb, r):
    w, b, A, B, g, ids, fan = _layer(pattern, k, nb, r, dtype)
    x = torch.randn(*lead, k, device="cuda").to(dtype)
    y = lora_ext._C.linear(x, x, w, b, A, B, 0.75, g, ids, fan)
    torch.cuda.synchronize()
    assert y.shape == (*lead, g * nb) and y.dtype == dtype
    assert_close_rel(y, _linear64(x, x, w, b, A, B, 0.75, g, ids, fan), dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["transposed", "misaligned"])
def test_cuda_linear_input_layouts(dtype, layout):
    w, b, A, B, g, ids, fan = _layer("merged_TFT", 64, 24, 8, dtype)
    if layout == "transposed":
        x = torch.randn(64, 9, device="cuda").to(dtype).t()
    else:
        x = torch.randn(9 * 64 + 1, device="cuda").to(dtype)[1:].view(9, 64)
    y = lora_ext._C.linear(x, x, w, None, A, B, 0.5, g, ids, fan)
    assert_close_rel(y, _linear64(x, x, w, None, A, B, 0.5, g, ids, fan), dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("ids_shape", [(1,), (4, 33)])
def test_cuda_embedding_kernel(dtype, ids_shape):
    num, dim, r = 70, 264, 8
    w = torch.randn(num, dim, device="cuda").to(dtype)
    A, B = torch.randn(r, num, device="cuda").to(dtype), torch.randn(dim, r, device="cuda").to(dtype)
    ids = torch.randint(0, num, ids_shape, device="cuda")
    y = lora_ext._C.embedding(ids, w, A, B, 0.5, 3)
    ref = w.double()[ids] + 0.5 * A.double().t()[ids] @ B.double().t()
    assert_close_rel(y, ref, dtype)


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


LAYERS = {
    "linear": lambda: lora_ext.Linear(96, 80, r=8, lora_alpha=16, merge_weights=False),
    "linear_fan": lambda: lora_ext.Linear(96, 80, r=8, fan_in_fan_out=True, merge_weights=False),
    "merged": lambda: lora_ext.MergedLinear(96, 120, r=4, enable_lora=[True, False, True], merge_weights=False),
}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("m", [1, 50])
def test_cuda_layers_forward_and_gradients(kind, dtype, m):
    layer = _randomize(LAYERS[kind]()).to(device="cuda", dtype=dtype)
    cpu = _randomize(LAYERS[kind]()).double()
    cpu.load_state_dict({k: v.double().cpu() for k, v in layer.state_dict().items()})
    x = torch.randn(2, m, 96, device="cuda").to(dtype)
    with torch.no_grad():  # the eager fast path straight into _C
        assert_close_rel(layer(x), cpu(x.double().cpu()), dtype)
    xg = x.clone().requires_grad_()
    xr = x.double().cpu().requires_grad_()
    grad = torch.randn(2, m, layer.out_features, device="cuda").to(dtype)
    layer(xg).backward(grad)  # the custom op with its autograd formula
    cpu(xr).backward(grad.double().cpu())
    assert_close_rel(xg.grad, xr.grad, dtype)
    assert_close_rel(layer.lora_A.grad, cpu.lora_A.grad, dtype)
    assert_close_rel(layer.lora_B.grad, cpu.lora_B.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_embedding_layer_gradients(dtype):
    layer = _randomize(lora_ext.Embedding(60, 40, r=8, padding_idx=2, merge_weights=False)).to("cuda", dtype)
    layer.weight.requires_grad_(True)
    cpu = lora_ext.Embedding(60, 40, r=8, padding_idx=2, merge_weights=False).double()
    cpu.load_state_dict({k: v.double().cpu() for k, v in layer.state_dict().items()})
    cpu.weight.requires_grad_(True)
    ids = torch.randint(0, 60, (3, 9), device="cuda")
    ids[0, 0] = 2
    grad = torch.randn(3, 9, 40, device="cuda").to(dtype)
    layer(ids).backward(grad)
    cpu(ids.cpu()).backward(grad.double().cpu())
    for p, q in ((layer.weight, cpu.weight), (layer.lora_A, cpu.lora_A), (layer.lora_B, cpu.lora_B)):
        assert_close_rel(p.grad, q.grad, dtype)


def test_cuda_graph_replay_of_unmerged_linear_equals_eager():
    layer = _randomize(lora_ext.MergedLinear(256, 3 * 256, r=8, enable_lora=[True, False, True],
                                             merge_weights=False)).to("cuda", torch.bfloat16).eval()
    static_x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        for _ in range(3):
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            assert torch.equal(static_y, layer(static_x))


def test_cuda_linear_runs_on_the_current_stream():
    w, b, A, B, g, ids, fan = _layer("plain", 128, 128, 8, torch.float32)
    x = torch.randn(3, 128, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = lora_ext._C.linear(x, x, w, b, A, B, 0.5, g, ids, fan)
    stream.synchronize()
    assert_close_rel(y, _linear64(x, x, w, b, A, B, 0.5, g, ids, fan), torch.float32)
