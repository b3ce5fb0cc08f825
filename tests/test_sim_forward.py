"""The forward CUDA kernels (linear: fused decode, split-K shrink + expand; embedding), run on the CPU
through the SIMT simulator (lora_ext._sim), against float64 references computed here.

Inputs are fresh random draws from the global RNG (conftest.py seeds it afresh per test). The LoRA factors
are drawn at unit scale, so the low-rank term dominates every enabled output and an error in it cannot hide
under the base GEMM; disabled blocks must equal the base GEMM plus bias.
"""
import importlib.util

import pytest
import torch

from kernel_cases import KERNEL_DTYPES, PATTERNS

from lora_ext import ops

if importlib.util.find_spec("lora_ext._sim") is None:
    pytestmark = pytest.mark.skip(
        reason="lora_ext._sim is not built; build it with `pip install --no-build-isolation -e .`"
    )
    _sim = None
else:
    from lora_ext import _sim

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}




def _rel_err(out, ref):
    assert not torch.isnan(out).any(), "output holds NaN"
    return ((out.double() - ref).norm() / ref.norm()).item()


def _linear64(x, x_lora, w, bias, A, B, scale, num_blocks, ids, fan):
    """F.linear(x, W, bias) + scale * (x_lora A_j^T) B_j^T in block ids[j], all in float64."""
    wl = (w.t() if fan else w).double()
    n_out, k = wl.shape
    nb, n = n_out // num_blocks, len(ids)
    r = A.shape[0] // n
    y = x.double().reshape(-1, k) @ wl.t()
    if bias is not None:
        y = y + bias.double()
    t = x_lora.double().reshape(-1, k) @ A.double().t()
    for j, e in enumerate(ids):
        y[:, e * nb:(e + 1) * nb] += scale * t[:, j * r:(j + 1) * r] @ B[j * nb:(j + 1) * nb].double().t()
    return y.reshape(*x.shape[:-1], n_out)


def _layer(pattern, k, nb, r, dtype, bias=True):
    num_blocks, ids, fan = PATTERNS[pattern]
    n_out = num_blocks * nb
    w = torch.randn((k, n_out) if fan else (n_out, k)).to(dtype)
    b = torch.randn(n_out).to(dtype) if bias else None
    A = torch.randn(len(ids) * r, k).to(dtype)
    B = torch.randn(len(ids) * nb, r).to(dtype)
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
    ref = _linear64(x, x_lora, w, b, A, B, scale, num_blocks, ids, fan)
    if seed is not None:
        _sim.set_schedule(seed)
    y = _sim.linear(x, x_lora, w, b, A, B, scale, num_blocks, ids, fan)
    assert y.shape == ref.shape and y.dtype == dtype
    err = _rel_err(y, ref)
    assert err < TOL[dtype], f"relative error {err:.3g}"
    # Disabled blocks hold the base GEMM plus bias only.
    n_out = num_blocks * nb
    y2, ref2 = y.reshape(-1, n_out), ref.reshape(-1, n_out)
    for e in set(range(num_blocks)) - set(ids):
        cols = slice(e * nb, (e + 1) * nb)
        assert _rel_err(y2[:, cols], ref2[:, cols]) < TOL[dtype]
    return y


# M = 1 and 5 take the fused decode kernel, 9 and 70 the split-K shrink and the expand.
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("m", [1, 5, 9, 70])
def test_linear_patterns(dtype, pattern, m):
    nb = 37 if PATTERNS[pattern][0] == 1 else 13
    _check_linear(dtype, pattern, (m,), k=53, nb=nb, r=4)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("r", [1, 40])
@pytest.mark.parametrize("m", [1, 33])
def test_linear_ranks(dtype, r, m):
    # r = 40 spans two staged rank chunks of the expand
    _check_linear(dtype, "merged_TFT", (m,), k=45, nb=11, r=r)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["plain", "merged_TFT", "merged_TFT_transposed"])
@pytest.mark.parametrize("m", [2, 40])
def test_linear_vector_path_multi_tile(dtype, pattern, m):
    # K, nb multiples of 8: 16-byte accesses; nb over one column tile (256 bf16 / 128 fp32 columns)
    nb = 272 if PATTERNS[pattern][0] == 1 else 136
    _check_linear(dtype, pattern, (m,), k=96, nb=nb, r=8)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("k", [600, 1024])
def test_linear_split_k(dtype, k):
    # a 64-row tile with K >= 512: the shrink splits K over several CTAs and the expand sums the partials
    _check_linear(dtype, "merged_TFT", (24,), k=k, nb=16, r=8)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(), (2, 3), (3, 1, 4)])
def test_linear_leading_dims(dtype, lead):
    _check_linear(dtype, "plain", lead if lead else (), k=24, nb=19, r=3)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["transposed", "strided", "misaligned"])
@pytest.mark.parametrize("m", [3, 20])
def test_linear_input_layouts(dtype, layout, m):
    _check_linear(dtype, "merged_TFT", (m,), k=64, nb=24, r=4, layout=layout)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 12])
def test_linear_without_bias_and_separate_lora_input(dtype, m):
    _check_linear(dtype, "merged_FT", (m,), k=31, nb=17, r=5, bias=False, separate_lora_input=True)


def test_linear_rank_over_fused_limit():
    # r > 256: the decode shape falls back to shrink + expand
    _check_linear(torch.float32, "plain", (1,), k=40, nb=9, r=260)


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("dtype,m", [(torch.bfloat16, 1), (torch.float32, 70), (torch.float16, 9)])
def test_linear_shuffled_schedule(dtype, m, seed):
    _check_linear(dtype, "merged_TFT", (m,), k=72, nb=24, r=40, seed=seed)


def test_linear_no_enabled_block_is_plain_linear():
    x, w, b = torch.randn(5, 12), torch.randn(9, 12), torch.randn(9)
    y = _sim.linear(x, x, w, b, torch.empty(0, 12), torch.empty(0, 4), 1.0, 3, [], False)
    assert torch.allclose(y, torch.nn.functional.linear(x, w, b))


def test_linear_empty_input():
    w, b, A, B, g, ids, fan = _layer("plain", 12, 9, 2, torch.float32)
    y = _sim.linear(torch.randn(0, 12), torch.randn(0, 12), w, b, A, B, 1.0, g, ids, fan)
    assert y.shape == (0, 9)


def test_linear_factors_of_another_dtype_are_cast():
    w, b, A, B, g, ids, fan = _layer("plain", 16, 8, 2, torch.bfloat16)
    x = torch.randn(3, 16).to(torch.bfloat16)
    A32, B32 = A.float(), B.float()
    y = _sim.linear(x, x, w, b, A32, B32, 0.5, g, ids, fan)
    assert _rel_err(y, _linear64(x, x, w, b, A, B, 0.5, g, ids, fan)) < TOL[torch.bfloat16]


# ---------------------------------------------------------------------------------------------------
# embedding


def _embedding64(ids, w, A, B, scale):
    return w.double()[ids] + scale * A.double().t()[ids] @ B.double().t()


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
    assert _rel_err(y, _embedding64(ids, w, A, B, 0.6)) < TOL[dtype]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_embedding_padding_idx_and_int32_ids(dtype):
    num, dim, r = 20, 16, 3
    w, A, B = torch.randn(num, dim).to(dtype), torch.randn(r, num).to(dtype), torch.randn(dim, r).to(dtype)
    ids = torch.randint(0, num, (4, 6), dtype=torch.int32)
    ids[0, 0] = 2
    y = _sim.embedding(ids, w, A, B, 0.5, 2)
    # padding_idx shapes only the gradient: the forward of row 2 is its stored value plus the LoRA term
    assert _rel_err(y, _embedding64(ids.long(), w, A, B, 0.5)) < TOL[dtype]


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

    ours = grads(lambda xl, xd, w_, b_, al, bl: _SimLinear.apply(xl, xd, w_, b_, al, bl, 0.5, g, ids, fan))
    want = grads(lambda xl, xd, w_, b_, al, bl: ops.linear(xl, xd, w_, b_, al, bl, 0.5, num_blocks=g,
                                                           block_ids=ids, fan_in_fan_out=fan))
    for name, o, e in zip(("dx", "dA", "dB"), ours, want):
        assert o is not None and torch.equal(o, e), f"{name} differs from the reference path's"


def test_embedding_gradients_match_reference():
    num, dim, r = 30, 12, 4
    w, A, B = torch.randn(num, dim), torch.randn(r, num), torch.randn(dim, r)
    ids = torch.randint(0, num, (3, 7))
    grad = torch.randn(3, 7, dim)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (w, A, B)]
        fn(*leaves).backward(grad)
        return [t.grad for t in leaves]

    ours = grads(lambda w_, a, b: _SimEmbedding.apply(ids, w_, a, b, 0.8, 1, False, False))
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


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_linear_argument_errors(case):
    over, message = BAD_ARGS[case]
    with pytest.raises(ValueError, match=message):
        _sim.linear(**_args(**over))
