"""The forward ops' kernels (linear: fused decode, split-K shrink + expand; embedding) against float64
references computed here: on the CPU through the SIMT simulator (lora_ext._sim), and on a GPU through
lora_ext._C directly, the ops and the layers, with gradients and a CUDA graph capture of an unmerged layer
(the tests marked `gpu`, through the `cuda` fixture: bench/gpu_check.sh runs them, and its dry run rehearses
them on the CPU with --sim-as-cuda, lora_ext._sim standing in for lora_ext._C).

Inputs are fresh random draws from the global RNG (conftest.py seeds it afresh per test). The LoRA factors
are drawn at unit scale, so the low-rank term dominates every enabled output and an error in it cannot hide
under the base GEMM; disabled blocks must equal the base GEMM plus bias.
"""
import pytest
import torch

import lora_ext
from lora_ext import ops
from helpers import (KERNEL_DTYPES, PATTERNS, TOL, CalledNames, assert_close_rel, embedding64, linear64,
                     linear_grads64, load_sim, rel_err, requires_sim)

_sim = load_sim()


def _layer(pattern, k, nb, r, dtype, bias=True, device="cpu"):
    num_blocks, ids, fan = PATTERNS[pattern]
    n_out = num_blocks * nb
    w = torch.randn((k, n_out) if fan else (n_out, k), device=device).to(dtype)
    b = torch.randn(n_out, device=device).to(dtype) if bias else None
    A = torch.randn(len(ids) * r, k, device=device).to(dtype)
    B = torch.randn(len(ids) * nb, r, device=device).to(dtype)
    return w, b, A, B, num_blocks, ids, fan


def _x(shape, dtype, layout="contiguous"):
    if layout == "contiguous":
        return torch.randn(shape).to(dtype)
    if layout == "transposed":  # non-contiguous 2-D: a transposed (k, rows) buffer
        return torch.randn(shape[::-1]).to(dtype).t()
    if layout == "strided":  # non-contiguous along the features: every other element
        return torch.randn(*shape[:-1], 2 * shape[-1]).to(dtype)[..., ::2]
    if layout == "misaligned":  # data pointer one element past a 16-byte boundary
        return torch.randn(torch.Size(shape).numel() + 1).to(dtype)[1:].view(shape)
    raise AssertionError(layout)


def _check_linear(dtype, pattern, lead, k, nb, r, layout="contiguous", bias=True, separate_lora_input=False,
                  scale=0.75, seed=None):
    w, b, A, B, num_blocks, ids, fan = _layer(pattern, k, nb, r, dtype, bias)
    x = _x((*lead, k), dtype, layout)
    x_lora = _x((*lead, k), dtype) if separate_lora_input else x
    ref = linear64(x, x_lora, w, b, A, B, scale, num_blocks, ids, fan)
    if seed is not None:
        _sim.set_schedule(seed)
    y = _sim.linear(x, x_lora, w, b, A, B, scale, num_blocks, ids, fan)
    assert y.shape == ref.shape and y.dtype == dtype
    err = rel_err(y, ref)
    assert err < TOL[dtype], f"relative error {err:.3g}"
    # Disabled blocks hold the base GEMM plus bias only.
    n_out = num_blocks * nb
    y2, ref2 = y.reshape(-1, n_out), ref.reshape(-1, n_out)
    for e in set(range(num_blocks)) - set(ids):
        cols = slice(e * nb, (e + 1) * nb)
        assert rel_err(y2[:, cols], ref2[:, cols]) < TOL[dtype]
    return y


# M = 1 and 5 take the fused decode kernel, 9 and 70 the split-K shrink and the expand.
@requires_sim
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("m", [1, 5, 9, 70])
def test_linear_patterns(dtype, pattern, m):
    nb = 37 if PATTERNS[pattern][0] == 1 else 13
    _check_linear(dtype, pattern, (m,), k=53, nb=nb, r=4)


@requires_sim
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("r", [1, 40])
@pytest.mark.parametrize("m", [1, 33])
def test_linear_ranks(dtype, r, m):
    # r = 40 spans two staged rank chunks of the expand
    _check_linear(dtype, "merged_TFT", (m,), k=45, nb=11, r=r)


@requires_sim
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["plain", "merged_TFT", "merged_TFT_transposed"])
@pytest.mark.parametrize("m", [2, 40])
def test_linear_vector_path_multi_tile(dtype, pattern, m):
    # K, nb multiples of 8: 16-byte accesses; nb over one column tile (256 bf16 / 128 fp32 columns)
    nb = 272 if PATTERNS[pattern][0] == 1 else 136
    _check_linear(dtype, pattern, (m,), k=96, nb=nb, r=8)


@requires_sim
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("k", [600, 1024])
def test_linear_split_k(dtype, k):
    # a 64-row tile with K >= 512: the shrink splits K over several CTAs and the expand sums the partials
    _check_linear(dtype, "merged_TFT", (24,), k=k, nb=16, r=8)


@requires_sim
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("k", [1096, 2048, 1037])
def test_linear_fused_long_k(dtype, m, k):
    # the fused kernel's x A^T takes four vectors per lane per iteration while whole groups of four fit in K
    # (K >= 776 for bf16, 388 for float32), then the rest one vector at a time: 1096 has both, 2048 only whole
    # groups for every lane, 1037 (odd) both on the element-wise variant
    _check_linear(dtype, "merged_TFT", (m,), k=k, nb=16, r=3)


@requires_sim
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(), (2, 3), (3, 1, 4)])
def test_linear_leading_dims(dtype, lead):
    _check_linear(dtype, "plain", lead if lead else (), k=24, nb=19, r=3)


@requires_sim
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["transposed", "strided", "misaligned"])
@pytest.mark.parametrize("m", [3, 20])
def test_linear_input_layouts(dtype, layout, m):
    _check_linear(dtype, "merged_TFT", (m,), k=64, nb=24, r=4, layout=layout)


@requires_sim
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 12])
def test_linear_without_bias_and_separate_lora_input(dtype, m):
    _check_linear(dtype, "merged_FT", (m,), k=31, nb=17, r=5, bias=False, separate_lora_input=True)


@requires_sim
def test_linear_rank_over_fused_limit():
    # r > 256: the decode shape falls back to shrink + expand
    _check_linear(torch.float32, "plain", (1,), k=40, nb=9, r=260)


@requires_sim
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("dtype,m", [(torch.bfloat16, 1), (torch.float32, 70), (torch.float16, 9)])
def test_linear_shuffled_schedule(dtype, m, seed):
    _check_linear(dtype, "merged_TFT", (m,), k=72, nb=24, r=40, seed=seed)


@requires_sim
def test_linear_no_enabled_block_is_plain_linear():
    x, w, b = torch.randn(5, 12), torch.randn(9, 12), torch.randn(9)
    y = _sim.linear(x, x, w, b, torch.empty(0, 12), torch.empty(0, 4), 1.0, 3, [], False)
    assert torch.allclose(y, torch.nn.functional.linear(x, w, b))


@requires_sim
def test_linear_empty_input():
    w, b, A, B, g, ids, fan = _layer("plain", 12, 9, 2, torch.float32)
    y = _sim.linear(torch.randn(0, 12), torch.randn(0, 12), w, b, A, B, 1.0, g, ids, fan)
    assert y.shape == (0, 9)


@requires_sim
def test_linear_float32_factors_are_read_as_stored():
    # no cast to the activations' dtype: the kernels take float32 factors (tests/test_forward_factors.py)
    w, b, A, B, g, ids, fan = _layer("plain", 16, 8, 2, torch.bfloat16)
    x = torch.randn(3, 16).to(torch.bfloat16)
    A32, B32 = A.float(), B.float()
    y = _sim.linear(x, x, w, b, A32, B32, 0.5, g, ids, fan)
    assert _sim.last_variant() == "forward<BFloat16, factors=Float, tensor_core=1, vector=1>"
    assert rel_err(y, linear64(x, x, w, b, A, B, 0.5, g, ids, fan)) < TOL[torch.bfloat16]


# ---------------------------------------------------------------------------------------------------
# embedding


@requires_sim
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("dim,r", [(24, 1), (37, 5), (272, 40)])
@pytest.mark.parametrize("ids_shape", [(1,), (3, 11), (45,)])
def test_embedding(dtype, dim, r, ids_shape):
    num = 50
    w = torch.randn(num, dim).to(dtype)
    A = torch.randn(r, num).to(dtype)
    B = torch.randn(dim, r).to(dtype)
    ids = torch.randint(0, num, ids_shape)
    y = _sim.embedding(ids, w, A, B, 0.6, None)
    assert y.shape == (*ids_shape, dim) and y.dtype == dtype
    assert rel_err(y, embedding64(ids, w, A, B, 0.6)) < TOL[dtype]


@requires_sim
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_embedding_padding_idx_and_int32_ids(dtype):
    num, dim, r = 20, 16, 3
    w, A, B = torch.randn(num, dim).to(dtype), torch.randn(r, num).to(dtype), torch.randn(dim, r).to(dtype)
    ids = torch.randint(0, num, (4, 6), dtype=torch.int32)
    ids[0, 0] = 2
    y = _sim.embedding(ids, w, A, B, 0.5, 2)
    # padding_idx shapes only the gradient: the forward of row 2 is its stored value plus the LoRA term
    assert rel_err(y, embedding64(ids.long(), w, A, B, 0.5)) < TOL[dtype]


@requires_sim
def test_embedding_rejects_out_of_range_ids():
    w, A, B = torch.randn(10, 8), torch.randn(2, 10), torch.randn(8, 2)
    with pytest.raises(RuntimeError, match="embedding id out of range"):
        _sim.embedding(torch.tensor([3, 10]), w, A, B, 1.0, None)
    with pytest.raises(ValueError, match="padding_idx must be within"):
        _sim.embedding(torch.tensor([3]), w, A, B, 1.0, 10)


# ---------------------------------------------------------------------------------------------------
# gradients: the custom ops' autograd formulas around the simulated forward


class _SimLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        out = _sim.linear(*inputs)
        ops._linear_setup(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return ops._linear_backward(ctx, grad)


class _SimEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        ids, weight, A, B, scale, padding_idx = inputs[:6]
        out = _sim.embedding(ids, weight, A, B, scale, padding_idx)
        ops._embedding_setup(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return ops._embedding_backward(ctx, grad)


@requires_sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", ["plain", "merged_TFT", "merged_TFT_transposed"])
@pytest.mark.parametrize("m", [1, 20])
def test_linear_gradients_match_reference(dtype, pattern, m):
    w, b, A, B, g, ids, fan = _layer(pattern, 24, 10, 3, dtype)
    x = torch.randn(2, m, 24).to(dtype)
    grad = torch.randn(2, m, w.shape[1] if fan else w.shape[0]).to(dtype)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
        xl, al, bl = leaves
        xd = xl * 1.0  # dropout stand-in: the LoRA path's input is a different tensor from x
        fn(xl, xd, w, b, al, bl).backward(grad)
        return [t.grad for t in leaves]

    ours = grads(lambda xl, xd, w_, b_, al, bl: _SimLinear.apply(xl, xd, w_, b_, al, bl, 0.5, g, ids, fan, None))
    want = grads(lambda xl, xd, w_, b_, al, bl: ops.linear(xl, xd, w_, b_, al, bl, 0.5, num_blocks=g,
                                                           block_ids=ids, fan_in_fan_out=fan))
    for name, o, e in zip(("dx", "dA", "dB"), ours, want):
        assert o is not None and torch.equal(o, e), f"{name} differs from the reference path's"


@requires_sim
def test_embedding_gradients_match_reference():
    num, dim, r = 30, 12, 4
    w, A, B = torch.randn(num, dim), torch.randn(r, num), torch.randn(dim, r)
    ids = torch.randint(0, num, (3, 7))
    grad = torch.randn(3, 7, dim)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (w, A, B)]
        fn(*leaves).backward(grad)
        return [t.grad for t in leaves]

    ours = grads(lambda w_, a, b: _SimEmbedding.apply(ids, w_, a, b, 0.8, 1, False, False, None))
    want = grads(lambda w_, a, b: ops.embedding(ids, w_, a, b, 0.8, padding_idx=1))
    for name, o, e in zip(("dW", "dA", "dB"), ours, want):
        assert torch.allclose(o, e, rtol=1e-5, atol=1e-6), f"{name} differs from the reference path's"


# ---------------------------------------------------------------------------------------------------
# argument checks (shared with the CUDA launcher)


def _args(**over):
    args = dict(x=torch.randn(4, 20), x_lora=None, weight=torch.randn(39, 20), bias=torch.randn(39),
                A=torch.randn(8, 20), B=torch.randn(26, 4), scale=0.5, num_blocks=3, block_ids=[0, 2],
                fan_in_fan_out=False)
    args.update(over)
    if args["x_lora"] is None:
        args["x_lora"] = args["x"]
    return args


BAD_ARGS = {
    "x on another device": (dict(x=torch.empty(4, 20, device="meta")), "x must be a CPU tensor"),
    "A on another device": (dict(A=torch.empty(8, 20, device="meta")), "A must be on x's device"),
    "x integer": (dict(x=torch.ones(4, 20, dtype=torch.int32)), "x must be float32"),
    "weight dtype": (dict(weight=torch.randn(39, 20).half()), "must have x's dtype"),
    "B dtype": (dict(B=torch.randn(26, 4).half()), "B must have A's dtype"),
    "x features": (dict(x=torch.randn(4, 21)), "x must have 20 features"),
    "x_lora shape": (dict(x_lora=torch.randn(5, 20)), "x_lora must have the shape of x"),
    "bias shape": (dict(bias=torch.randn(38)), "bias must have shape"),
    "num_blocks divides": (dict(num_blocks=2, block_ids=[0]), "must divide the output features"),
    "block_ids order": (dict(block_ids=[2, 0]), "block_ids must be strictly increasing"),
    "block_ids range": (dict(block_ids=[0, 3]), "block_ids must lie in"),
    "A columns": (dict(A=torch.randn(8, 19)), "A must have 20 columns"),
    "A rows": (dict(A=torch.randn(7, 20)), "A must have n\\*r rows"),
    "B shape": (dict(B=torch.randn(26, 5)), "B must have shape"),
    "weight 1-D": (dict(weight=torch.randn(39)), "weight must be 2-D"),
}


@requires_sim
@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_linear_argument_errors(case):
    over, message = BAD_ARGS[case]
    with pytest.raises(ValueError, match=message):
        _sim.linear(**_args(**over))


# ---------------------------------------------------------------------------------------------------
# on CUDA tensors: lora_ext._C.linear / embedding directly, through the ops and the layers, gradients, and a
# CUDA graph capture of an unmerged layer (with --sim-as-cuda: CPU tensors through lora_ext._sim, no graph)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 40), (300,)])
@pytest.mark.parametrize("k,nb,r", [(53, 37, 4), (256, 264, 16)])
def test_cuda_linear_kernels(cuda, dtype, pattern, lead, k, nb, r):
    _check_cuda_linear(cuda, dtype, pattern, lead, k, nb, r, float32_factors=False)


def _check_cuda_linear(cuda, dtype, pattern, lead, k, nb, r, float32_factors):
    w, b, A, B, g, ids, fan = _layer(pattern, k, nb, r, dtype, device=cuda.device)
    if float32_factors:
        A, B = torch.randn(A.shape, device=cuda.device), torch.randn(B.shape, device=cuda.device)
    x = torch.randn(*lead, k, device=cuda.device).to(dtype)
    y = cuda.kernels.linear(x, x, w, b, A, B, 0.75, g, ids, fan)
    cuda.synchronize()
    assert y.shape == (*lead, g * nb) and y.dtype == dtype
    assert_close_rel(y, linear64(x, x, w, b, A, B, 0.75, g, ids, fan), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", ["plain", "transposed", "merged_TFT"])
@pytest.mark.parametrize("lead", [(1,), (7,), (300,)])
@pytest.mark.parametrize("k,nb,r", [(53, 37, 4), (1096, 264, 16)])
def test_cuda_linear_kernels_float32_factors(cuda, dtype, pattern, lead, k, nb, r):
    # the layers' default: float32 factors on a 16-bit model, read by the kernels as stored (no cast)
    _check_cuda_linear(cuda, dtype, pattern, lead, k, nb, r, float32_factors=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_embedding_kernel_float32_factors(cuda, dtype):
    num, dim, r = 70, 264, 8
    w = torch.randn(num, dim, device=cuda.device).to(dtype)
    A, B = torch.randn(r, num, device=cuda.device), torch.randn(dim, r, device=cuda.device)
    ids = torch.randint(0, num, (4, 33), device=cuda.device)
    assert_close_rel(cuda.kernels.embedding(ids, w, A, B, 0.5, None), embedding64(ids, w, A, B, 0.5), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["transposed", "misaligned"])
def test_cuda_linear_input_layouts(cuda, dtype, layout):
    w, b, A, B, g, ids, fan = _layer("merged_TFT", 64, 24, 8, dtype, device=cuda.device)
    if layout == "transposed":
        x = torch.randn(64, 9, device=cuda.device).to(dtype).t()
    else:
        x = torch.randn(9 * 64 + 1, device=cuda.device).to(dtype)[1:].view(9, 64)
    y = cuda.kernels.linear(x, x, w, None, A, B, 0.5, g, ids, fan)
    assert_close_rel(y, linear64(x, x, w, None, A, B, 0.5, g, ids, fan), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("ids_shape", [(1,), (4, 33)])
def test_cuda_embedding_kernel(cuda, dtype, ids_shape):
    num, dim, r = 70, 264, 8
    w = torch.randn(num, dim, device=cuda.device).to(dtype)
    A, B = torch.randn(r, num, device=cuda.device).to(dtype), torch.randn(dim, r, device=cuda.device).to(dtype)
    ids = torch.randint(0, num, ids_shape, device=cuda.device)
    y = cuda.kernels.embedding(ids, w, A, B, 0.5, 3)
    ref = embedding64(ids, w, A, B, 0.5)
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("m", [1, 50])
def test_cuda_layers_forward_and_gradients(cuda, kind, dtype, m):
    layer = _randomize(LAYERS[kind]()).to(device=cuda.device, dtype=dtype)
    layout = layer.layout()
    x = torch.randn(2, m, 96, device=cuda.device).to(dtype)
    with torch.no_grad():  # the eager fast path straight into _C
        assert_close_rel(layer(x), linear64(x, x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                            layer.scaling, layout["num_blocks"], layout["block_ids"],
                                            layout["transposed"]), dtype)
    xg = x.clone().requires_grad_()
    grad = torch.randn(2, m, layer.out_features, device=cuda.device).to(dtype)
    out = layer(xg)  # the ops' eager autograd.Function over the kernels' forward
    assert type(out.grad_fn).__name__ == "_LinearEagerBackward"
    out.backward(grad)
    want = linear_grads64(layer, x, grad)  # float64, an explicit formula on the CPU
    assert_close_rel(xg.grad, want["x"], dtype)
    assert_close_rel(layer.lora_A.grad, want["lora_A"], dtype)
    assert_close_rel(layer.lora_B.grad, want["lora_B"], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_embedding_layer_gradients(cuda, dtype):
    layer = _randomize(lora_ext.Embedding(60, 40, r=8, padding_idx=2, merge_weights=False)).to(cuda.device, dtype)
    layer.weight.requires_grad_(True)
    ids = torch.randint(0, 60, (3, 9), device=cuda.device)
    ids[0, 0] = 2
    grad = torch.randn(3, 9, 40, device=cuda.device).to(dtype)
    out = layer(ids)
    assert type(out.grad_fn).__name__ == "_EmbeddingEagerBackward"
    out.backward(grad)
    # float64 on the CPU, an explicit formula: W[ids] + scaling * A^T[ids] B^T; the padding row of W and the
    # padding column of A get no gradient (nn.Embedding's and loralib's padding_idx)
    w, A, B = (p.detach().cpu().double().requires_grad_() for p in (layer.weight, layer.lora_A, layer.lora_B))
    flat = ids.reshape(-1).cpu()
    y = w[flat] + layer.scaling * (A.t()[flat] @ B.t())
    y.backward(grad.reshape(-1, 40).cpu().double())
    with torch.no_grad():
        w.grad[2] = 0
        A.grad[:, 2] = 0
    for p, q in ((layer.weight, w), (layer.lora_A, A), (layer.lora_B, B)):
        assert_close_rel(p.grad, q.grad, dtype)


@pytest.mark.gpu
@pytest.mark.hardware("CUDA graph capture and replay, on a side stream")
def test_cuda_graph_replay_of_unmerged_linear_equals_eager(cuda):
    layer = _randomize(lora_ext.MergedLinear(256, 3 * 256, r=8, enable_lora=[True, False, True],
                                             merge_weights=False)).to(cuda.device, torch.bfloat16).eval()
    static_x = torch.randn(4, 256, device=cuda.device, dtype=torch.bfloat16)
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


@pytest.mark.gpu
@pytest.mark.hardware("CUDA streams")
def test_cuda_linear_runs_on_the_current_stream(cuda):
    w, b, A, B, g, ids, fan = _layer("plain", 128, 128, 8, torch.float32, device=cuda.device)
    x = torch.randn(3, 128, device=cuda.device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs, written on the default stream
    with torch.cuda.stream(stream):
        y = cuda.kernels.linear(x, x, w, b, A, B, 0.5, g, ids, fan)
    stream.synchronize()
    assert_close_rel(y, linear64(x, x, w, b, A, B, 0.5, g, ids, fan), torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# the layers read their operands from the module's dicts (LoRALayer._operands): what nn.Module's lookups and an
# identity dropout's call did before must still happen when it matters


def _linear_layers():
    return [lora_ext.Linear(8, 6, r=2, lora_alpha=3), lora_ext.Linear(8, 6, r=2, lora_alpha=3, fan_in_fan_out=True),
            lora_ext.MergedLinear(8, 9, r=2, lora_alpha=3, enable_lora=[True, False, True])]


def _expected64(layer, x, lora_in=None, A=None):
    """The layer's output in float64 from its tensors: x @ W^T + b + s * (lora_in @ A^T) @ B^T (MergedLinear: B's
    rows scattered to the enabled blocks' rows)."""
    w = layer.weight.detach().double()
    w = w.t() if layer.fan_in_fan_out else w
    A = (layer.lora_A if A is None else A).detach().double()
    B = layer.lora_B.detach().double()
    lora_in = (x if lora_in is None else lora_in).double()
    update = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    if isinstance(layer, lora_ext.MergedLinear):
        ids, nb, r = layer._block_ids, w.shape[0] // len(layer.enable_lora), layer.r
        for j, e in enumerate(ids):
            update[:, e * nb:(e + 1) * nb] = lora_in @ A[j * r:(j + 1) * r].t() @ B[j * nb:(j + 1) * nb].t()
    else:
        update = lora_in @ A.t() @ B.t()
    return x.double() @ w.t() + layer.bias.detach().double() + layer.scaling * update


@pytest.mark.parametrize("which", range(3))
def test_hooks_on_the_identity_dropout_still_run(which):
    layer = _linear_layers()[which]
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 8)
    calls = []
    handle = layer.lora_dropout.register_forward_hook(lambda m, args, out: calls.append(1) or out * 0.5)
    try:
        torch.testing.assert_close(layer(x).double(), _expected64(layer, x, lora_in=0.5 * x), atol=1e-5, rtol=1e-5)
    finally:
        handle.remove()
    assert calls == [1]
    from torch.nn.modules.module import register_module_forward_hook
    handle = register_module_forward_hook(lambda m, args, out: out * 0.25 if isinstance(m, torch.nn.Identity)
                                          else None)
    try:
        torch.testing.assert_close(layer(x).double(), _expected64(layer, x, lora_in=0.25 * x), atol=1e-5, rtol=1e-5)
    finally:
        handle.remove()
    torch.testing.assert_close(layer(x).double(), _expected64(layer, x), atol=1e-5, rtol=1e-5)


class _Scaled(torch.nn.Module):
    def forward(self, t):
        return 3.0 * t


@pytest.mark.parametrize("which", range(3))
def test_a_dropout_module_replaced_after_construction_is_used(which):
    layer = _linear_layers()[which]
    torch.nn.init.normal_(layer.lora_B)
    layer.lora_dropout = _Scaled()
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x).double(), _expected64(layer, x, lora_in=3.0 * x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", range(3))
def test_a_parametrized_factor_is_read_through_its_parametrization(which):
    from torch.nn.utils import parametrize
    layer = _linear_layers()[which]
    torch.nn.init.normal_(layer.lora_B)
    A = layer.lora_A.detach().clone()
    parametrize.register_parametrization(layer, "lora_A", _Scaled())
    x = torch.randn(5, 8)
    out = layer(x)
    torch.testing.assert_close(out.double(), _expected64(layer, x, A=3.0 * A), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    grad = layer.parametrizations.lora_A.original.grad
    assert grad is not None and grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# torch.func transforms: their wrapped tensors have no storage the kernels could read (functionalize's crashed the
# process in the launcher, vmap's raised "Cannot access data pointer"); under a transform every op takes the
# reference path


def _func_cases(device):
    torch.manual_seed(5)
    layers = [lora_ext.Linear(8, 6, r=2, lora_alpha=3), lora_ext.Linear(8, 6, r=2, lora_alpha=3, fan_in_fan_out=True),
              lora_ext.MergedLinear(8, 9, r=2, lora_alpha=3, enable_lora=[True, False, True])]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B)
        layer.requires_grad_(False).to(device)
    return layers


def _check_func_transforms(device):
    for layer in _func_cases(device):
        x = torch.randn(5, 8, device=device)
        want = _expected64(layer.cpu(), x.cpu())
        layer.to(device)
        with torch.no_grad():
            got = {"functionalize": torch.func.functionalize(layer)(x), "vmap": torch.func.vmap(layer)(x),
                   "eager": layer(x)}
        for how, out in got.items():
            torch.testing.assert_close(out.cpu().double(), want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{how}: {m}")


@requires_sim
def test_func_transforms_of_the_layers_under_the_simulator():
    with ops.use_kernels(_sim, "cpu"):
        _check_func_transforms("cpu")


@pytest.mark.gpu
def test_cuda_func_transforms_of_the_layers(cuda):
    _check_func_transforms(cuda.device)


def _check_subclass_operands(device, kernels):
    """Operands that are wrapper subclasses (TwoTensor: two plain tensors behind a storage-less wrapper, as a
    DTensor is) go to the reference: the launchers read storage such a tensor does not have (a segfault before).
    All operands wrapped: the result matches float64. One operand wrapped (TwoTensor's mixed in-place semantics
    are its own): the kernels are not called, and the call returns."""
    from torch.testing._internal.two_tensor import TwoTensor
    torch.manual_seed(6)
    w, b = torch.randn(6, 8, device=device), torch.randn(6, device=device)
    A, B = torch.randn(2, 8, device=device), torch.randn(6, 2, device=device)
    x = torch.randn(5, 8, device=device)
    want = (x.double() @ w.double().t() + b.double() + 0.5 * (x.double() @ A.double().t() @ B.double().t())).cpu()
    merged = (w.double() + 0.5 * B.double() @ A.double()).cpu()

    def two(t):
        return TwoTensor(t, t.clone())
    calls = CalledNames(kernels)
    with torch.no_grad(), ops.use_kernels(calls, device.type if isinstance(device, torch.device) else device):
        out = ops.linear(*(two(t) for t in (x, x, w, b, A, B)), 0.5)
        torch.testing.assert_close(out.a.cpu().double(), want, atol=1e-5, rtol=1e-5)
        W = two(w.clone())
        ops.merge_(W, two(A), two(B), 0.5)
        torch.testing.assert_close(W.a.cpu().double(), merged, atol=1e-5, rtol=1e-5)
        for i in range(6):
            args = [x, x, w, b, A, B]
            args[i] = two(args[i])
            assert ops.linear(*args, 0.5).shape == (5, 6)
        for i in range(3):
            args = [w.clone(), A, B]
            args[i] = two(args[i])
            ops.merge_(*args, 0.5)
    assert calls.names == [], calls.names


@requires_sim
def test_tensor_subclass_operands_go_to_the_reference_under_the_simulator():
    _check_subclass_operands("cpu", _sim)


@pytest.mark.gpu
def test_cuda_tensor_subclass_operands_go_to_the_reference(cuda):
    _check_subclass_operands(cuda.device, cuda.kernels)


def _loss64(layer, x, g, A, B):
    """sum(layer(x) * g) in float64 from the layer's weight and bias and the factors A, B (differentiable in them):
    x W^T + b + s (x A^T) B^T (MergedLinear: B's rows to the enabled blocks), or for an Embedding
    W[x] + s A^T[x] B^T."""
    w = layer.weight.detach().double()
    A, B = A.double(), B.double()
    if isinstance(layer, lora_ext.Embedding):
        out = w[x] + layer.scaling * A.t()[x] @ B.t()
        return (out * g.double()).sum()
    w = w.t() if layer.fan_in_fan_out else w
    x = x.double()
    if isinstance(layer, lora_ext.MergedLinear):
        nb, r = w.shape[0] // len(layer.enable_lora), layer.r
        parts = []
        for e in range(len(layer.enable_lora)):
            if e in layer._block_ids:
                j = layer._block_ids.index(e)
                parts.append(x @ A[j * r:(j + 1) * r].t() @ B[j * nb:(j + 1) * nb].t())
            else:
                parts.append(x.new_zeros(x.shape[0], nb))
        update = torch.cat(parts, dim=1)
    else:
        update = x @ A.t() @ B.t()
    out = x @ w.t() + layer.bias.detach().double() + layer.scaling * update
    return (out * g.double()).sum()


@pytest.mark.parametrize("which", ["linear", "linear_t", "merged", "embedding"])
def test_func_grad_and_per_sample_grads_of_the_factors(which):
    """torch.func.grad and vmap(grad) (per-sample gradients, as DP-SGD takes them) through a layer: before, the
    custom ops' autograd raised ("an autograd.Function ... must override setup_context"); under a transform the ops
    run the reference's torch ops. Against float64 autograd of the layer's formula written out here."""
    from torch.func import functional_call, grad, vmap
    torch.manual_seed(7)
    if which == "embedding":
        layer = lora_ext.Embedding(10, 6, r=2, lora_alpha=3)
        x = torch.randint(0, 10, (4, 3))
        shape = (4, 3, 6)
    else:
        layer = {"linear": lambda: lora_ext.Linear(8, 6, r=2, lora_alpha=3),
                 "linear_t": lambda: lora_ext.Linear(8, 6, r=2, lora_alpha=3, fan_in_fan_out=True),
                 "merged": lambda: lora_ext.MergedLinear(8, 9, r=2, lora_alpha=3, enable_lora=[True, False, True]),
                 }[which]()
        x = torch.randn(4, 8)
        shape = (4, layer.out_features)
    torch.nn.init.normal_(layer.lora_B)
    torch.nn.init.normal_(layer.lora_A)
    g = torch.randn(shape)
    params = {"lora_A": layer.lora_A.detach(), "lora_B": layer.lora_B.detach()}

    def loss(p, xs, gs):
        return (functional_call(layer, p, (xs,)) * gs).sum()
    got = grad(loss)(params, x, g)
    A = params["lora_A"].double().requires_grad_()
    B = params["lora_B"].double().requires_grad_()
    want = torch.autograd.grad(_loss64(layer, x, g, A, B), (A, B))
    for name, w in zip(("lora_A", "lora_B"), want):
        torch.testing.assert_close(got[name].double(), w, atol=1e-4, rtol=1e-4)
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.unsqueeze(1), g.unsqueeze(1))
    for i in range(x.shape[0]):
        A = params["lora_A"].double().requires_grad_()
        B = params["lora_B"].double().requires_grad_()
        want = torch.autograd.grad(_loss64(layer, x[i:i + 1], g[i:i + 1], A, B), (A, B))
        for name, w in zip(("lora_A", "lora_B"), want):
            torch.testing.assert_close(per_sample[name][i].double(), w, atol=1e-4, rtol=1e-4)
