"""The op surface on the reference backend, against float64 oracles."""

import pytest
import torch

from lora_ext import ops
from helpers import assert_close_rel, dense_delta64, embedding64, linear64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = [  # (num_blocks, block_ids)
    (1, [0]), (3, [0, 2]), (3, [1]), (3, [0, 1, 2]), (2, [1]),
]


def _factors(n, r, k, nb, dtype=torch.float32):
    return torch.randn(n * r, k, dtype=dtype), torch.randn(n * nb, r, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_blocks,block_ids", LAYOUTS)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("r", [1, 5])
def test_merge_matches_float64(dtype, num_blocks, block_ids, transposed, r):
    k, nb = 37, 11
    A, B = _factors(len(block_ids), r, k, nb)
    n_out = num_blocks * nb
    w = torch.randn((k, n_out) if transposed else (n_out, k)).to(dtype)
    w0 = w.clone()
    s = 0.7
    ops.merge_(w, A, B, s, num_blocks=num_blocks, block_ids=block_ids, transposed=transposed)
    delta = s * dense_delta64(A, B, num_blocks, block_ids, n_out)
    ref = w0.double() + (delta.t() if transposed else delta)
    assert_close_rel(w, ref, dtype)
    # disabled blocks are bit-identical
    logical, logical0 = (w.t(), w0.t()) if transposed else (w, w0)
    for e in set(range(num_blocks)) - set(block_ids):
        assert torch.equal(logical[e * nb:(e + 1) * nb], logical0[e * nb:(e + 1) * nb])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_merge_rounds_once(dtype):
    # fp32 accumulation and a single rounding: equal to round(float64 result) up to ties
    k, n, r = 64, 48, 16
    A, B = _factors(1, r, k, n)
    w = torch.randn(n, k).to(dtype)
    ref = (w.double() + 0.5 * B.double() @ A.double()).to(dtype)
    ops.merge_(w, A, B, 0.5)
    mismatch = (w != ref).float().mean().item()
    assert mismatch < 0.01, f"{mismatch:.3%} of elements are not the correctly rounded result"


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_then_unmerge_restores(dtype):
    A, B = _factors(1, 4, 33, 21)
    w = torch.randn(21, 33).to(dtype)
    w0 = w.clone()
    ops.merge_(w, A, B, 2.0)
    ops.unmerge_(w, A, B, 2.0)
    assert_close_rel(w, w0, dtype)


def test_merge_of_fp32_factors_into_bf16_weight():
    A, B = _factors(1, 8, 40, 24)
    w = torch.randn(24, 40, dtype=torch.bfloat16)
    ref = w.double() + 0.25 * B.double() @ A.double()
    ops.merge_(w, A, B, 0.25)
    assert w.dtype == torch.bfloat16
    assert_close_rel(w, ref, torch.bfloat16)


def test_merge_bumps_version_counter():
    A, B = _factors(1, 2, 8, 6)
    w = torch.randn(6, 8)
    v = w._version
    ops.merge_(w, A, B, 1.0)
    assert w._version > v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_blocks,block_ids", LAYOUTS)
@pytest.mark.parametrize("transposed", [False, True])
def test_delta_weight_matches_float64(dtype, num_blocks, block_ids, transposed):
    k, nb, r = 19, 7, 3
    A, B = _factors(len(block_ids), r, k, nb)
    d = ops.delta_weight(A, B, 1.5, out_features=num_blocks * nb, num_blocks=num_blocks,
                         block_ids=block_ids, transposed=transposed, dtype=dtype)
    ref = 1.5 * dense_delta64(A, B, num_blocks, block_ids, num_blocks * nb)
    assert d.dtype == dtype
    assert_close_rel(d, ref.t() if transposed else ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_blocks,block_ids", LAYOUTS)
@pytest.mark.parametrize("fan", [False, True])
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3)])
def test_linear_matches_float64(dtype, num_blocks, block_ids, fan, lead):
    k, nb, r = 29, 9, 4
    n_out = num_blocks * nb
    A, B = _factors(len(block_ids), r, k, nb)
    w = torch.randn((k, n_out) if fan else (n_out, k)).to(dtype)
    bias = torch.randn(n_out).to(dtype)
    x = torch.randn(*lead, k).to(dtype)
    y = ops.linear(x, x, w, bias, A, B, 0.5, num_blocks=num_blocks, block_ids=block_ids, fan_in_fan_out=fan)
    assert y.shape == (*lead, n_out) and y.dtype == dtype
    assert_close_rel(y, linear64(x, x, w, bias, A, B, 0.5, num_blocks, block_ids, fan), dtype)


def test_linear_non_contiguous_input():
    A, B = _factors(1, 3, 16, 12)
    w, x = torch.randn(12, 16), torch.randn(16, 7).t()  # (7, 16), non-contiguous
    y = ops.linear(x, x, w, None, A, B, 1.0)
    assert_close_rel(y, linear64(x, x, w, None, A, B, 1.0, 1, [0], False), torch.float32)


@pytest.mark.parametrize("num_blocks,block_ids", LAYOUTS)
@pytest.mark.parametrize("fan", [False, True])
def test_linear_gradcheck(num_blocks, block_ids, fan):
    k, nb, r = 6, 3, 2
    n_out = num_blocks * nb
    d = torch.float64
    A = torch.randn(len(block_ids) * r, k, dtype=d, requires_grad=True)
    B = torch.randn(len(block_ids) * nb, r, dtype=d, requires_grad=True)
    w = torch.randn((k, n_out) if fan else (n_out, k), dtype=d, requires_grad=True)
    bias = torch.randn(n_out, dtype=d, requires_grad=True)
    x = torch.randn(2, 3, k, dtype=d, requires_grad=True)
    xl = torch.randn(2, 3, k, dtype=d, requires_grad=True)
    fn = lambda x, xl, w, b, A, B: ops.linear(x, xl, w, b, A, B, 0.3, num_blocks=num_blocks,
                                                block_ids=block_ids, fan_in_fan_out=fan)
    assert torch.autograd.gradcheck(fn, (x, xl, w, bias, A, B))


def test_delta_weight_gradcheck():
    d = torch.float64
    A = torch.randn(4, 5, dtype=d, requires_grad=True)
    B = torch.randn(6, 2, dtype=d, requires_grad=True)
    for transposed in (False, True):
        fn = lambda A, B: ops.delta_weight(A, B, 0.7, out_features=9, num_blocks=3, block_ids=[0, 2],
                                           transposed=transposed, dtype=d)
        assert torch.autograd.gradcheck(fn, (A, B))


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_matches_float64(dtype):
    num, dim, r = 23, 10, 3
    w = torch.randn(num, dim).to(dtype)
    A, B = torch.randn(r, num), torch.randn(dim, r)
    ids = torch.randint(0, num, (4, 5))
    y = ops.embedding(ids, w, A, B, 0.5)
    ref = embedding64(ids, w, A, B, 0.5)
    assert_close_rel(y, ref, dtype)


def test_embedding_gradcheck():
    d = torch.float64
    num, dim, r = 7, 4, 2
    w = torch.randn(num, dim, dtype=d, requires_grad=True)
    A = torch.randn(r, num, dtype=d, requires_grad=True)
    B = torch.randn(dim, r, dtype=d, requires_grad=True)
    ids = torch.tensor([[0, 3, 3], [6, 1, 0]])
    fn = lambda w, A, B: ops.embedding(ids, w, A, B, 0.8)
    assert torch.autograd.gradcheck(fn, (w, A, B))


def test_embedding_padding_idx_gets_no_gradient():
    num, dim, r = 7, 4, 2
    w = torch.randn(num, dim, requires_grad=True)
    A = torch.randn(r, num, requires_grad=True)
    B = torch.randn(dim, r, requires_grad=True)
    ids = torch.tensor([0, 3, 3, 5])
    ops.embedding(ids, w, A, B, 0.8, padding_idx=3).square().sum().backward()
    assert torch.equal(w.grad[3], torch.zeros(dim)) and torch.equal(A.grad[:, 3], torch.zeros(r))
    assert w.grad[5].abs().sum() > 0 and A.grad[:, 5].abs().sum() > 0


# --- bad input: a clear error naming the argument, and nothing written -------------------------------

BAD_MERGES = [
    (dict(lora_A=torch.randn(3, 9)), "lora_A"),
    (dict(lora_B=torch.randn(5, 2)), "lora_B"),
    (dict(lora_A=torch.randn(2, 8, 1)), "lora_A"),
    (dict(scale=float("nan")), "scale"),
    (dict(num_blocks=3), "num_blocks"),
    (dict(num_blocks=2, block_ids=[2]), "block_ids"),
    (dict(num_blocks=2, block_ids=[1, 0]), "block_ids"),
    (dict(lora_A=torch.randn(2, 8, dtype=torch.float64).to(torch.int32)), "lora_A"),
    (dict(lora_A=torch.randn(2, 8, device="meta")), "device"),
]


@pytest.mark.parametrize("backend", ["reference", "kernel"])
@pytest.mark.parametrize("change,needle", BAD_MERGES)
def test_merge_rejects_bad_input_before_writing(change, needle, backend, request):
    if backend == "kernel":  # the CUDA branch (C++ checks first), through the simulator
        request.getfixturevalue("sim_as_cuda")
    args = dict(lora_A=torch.randn(2, 8), lora_B=torch.randn(4, 2), scale=1.0, num_blocks=1, block_ids=[0])
    args.update(change)
    w = torch.randn(4, 8)
    w0 = w.clone()
    with pytest.raises((ValueError, TypeError), match=needle):
        ops.merge_(w, args["lora_A"], args["lora_B"], args["scale"], num_blocks=args["num_blocks"],
                   block_ids=args["block_ids"])
    assert torch.equal(w, w0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_blocks,block_ids,transposed", [(1, [0], False), (3, [0, 2], True)])
def test_merge_through_the_kernel_branch(sim_as_cuda, dtype, num_blocks, block_ids, transposed):
    nb, k, r = 12, 20, 3
    w = torch.randn(num_blocks * nb, k).to(dtype)
    A, B = torch.randn(len(block_ids) * r, k), torch.randn(len(block_ids) * nb, r)
    delta = dense_delta64(A, B, num_blocks, block_ids, num_blocks * nb)
    w = w.t().contiguous() if transposed else w
    want = w.double() + 0.5 * (delta.t() if transposed else delta)
    version = w._version
    ops.merge_(w, A, B, 0.5, num_blocks=num_blocks, block_ids=block_ids, transposed=transposed)
    assert_close_rel(w, want, dtype)
    assert w._version > version


def test_kernel_branch_passes_on_what_only_the_launcher_checks(sim_as_cuda):
    w = torch.randn(4, 8)
    w0 = w.clone()
    # the fast path leaves the checks to the launcher; its refusal is worded in this API's names, nothing written
    with pytest.raises(ValueError, match=r"lora_A must have shape .*its 7 columns do not match the weight.s 8"):
        ops.merge_(w, torch.randn(2, 7), torch.randn(4, 2), 1.0)
    assert torch.equal(w, w0)
    # a column-major weight (column stride 4: the kernels take stride-1 rows) goes as its transpose
    w = torch.randn(8, 4).t()
    w0 = w.clone()
    a, b = torch.randn(2, 8), torch.randn(4, 2)
    ops.merge_(w, a, b, 1.0)
    assert w.stride() == (1, 4)
    assert (w.double() - (w0.double() + b.double() @ a.double())).abs().max().item() < 1e-5


def test_linear_rejects_bad_shapes():
    A, B = _factors(1, 2, 8, 4)
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="x must have 8 features"):
        ops.linear(torch.randn(3, 7), torch.randn(3, 7), w, None, A, B, 1.0)
    with pytest.raises(ValueError, match="bias"):
        ops.linear(torch.randn(3, 8), torch.randn(3, 8), w, torch.randn(5), A, B, 1.0)
    with pytest.raises(ValueError, match="x_lora"):
        ops.linear(torch.randn(3, 8), torch.randn(2, 8), w, None, A, B, 1.0)


def test_embedding_rejects_float_ids():
    with pytest.raises(ValueError, match="ids"):
        ops.embedding(torch.zeros(3), torch.randn(5, 4), torch.randn(2, 5), torch.randn(4, 2), 1.0)
