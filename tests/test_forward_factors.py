"""float32 LoRA factors with fp16/bf16 activations (the layers' default: float32 factors on a 16-bit model) in the
forward kernels, through the SIMT simulator (lora_ext._sim): the kernels read the factors as they are stored
(Tab = float32, kernels/forward.cuh), with no cast per call. Every forward kernel is reached: the fused decode
kernel (M <= 8), the split-K shrink + expand (larger M), the embedding kernel; MergedLinear blocks and
fan_in_fan_out; 16-byte and element-wise variants. The simulator fills the outputs the ops allocate with NaN,
so an element no kernel writes fails the comparison (rel_err refuses NaN).

Numerics against float64 references of the float32 factors. Where the kernels compute in float32 (the fused
kernel's x A^T, every expand, the embedding's gather) the factors' float32 values must reach the result
unrounded; the WMMA shrink rounds A to the activations' dtype while staging it (the rounding the old cast made,
kept for the tensor cores): both are shown exactly, on values a 16-bit cast would change.
"""
import pytest
import torch

from helpers import PATTERNS, TOL, embedding64, linear64, load_sim, rel_err, requires_sim

_sim = load_sim()

HALF = [torch.float16, torch.bfloat16]
_NAME = {torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16"}


def _variant(dtype, factors, vector):
    tc = 0 if dtype == torch.float32 else 1
    return f"forward<{_NAME[dtype]}, factors={_NAME[factors]}, tensor_core={tc}, vector={vector}>"


def _linear(dtype, pattern, m, k, nb, r, factors=torch.float32, bias=True, scale=0.75):
    num_blocks, ids, fan = PATTERNS[pattern]
    n_out = num_blocks * nb
    w = torch.randn((k, n_out) if fan else (n_out, k)).to(dtype)
    b = torch.randn(n_out).to(dtype) if bias else None
    A = torch.randn(len(ids) * r, k, dtype=factors)
    B = torch.randn(len(ids) * nb, r, dtype=factors)
    x = torch.randn(m, k).to(dtype)
    y = _sim.linear(x, x, w, b, A, B, scale, num_blocks, ids, fan)
    assert y.shape == (m, n_out) and y.dtype == dtype
    ref = linear64(x, x, w, b, A, B, scale, num_blocks, ids, fan)
    err = rel_err(y, ref)
    assert err < TOL[dtype], f"relative error {err:.3g}"
    for e in range(num_blocks):  # each block on its own: a disabled one is the base GEMM plus bias
        cols = slice(e * nb, (e + 1) * nb)
        assert rel_err(y[:, cols], ref[:, cols]) < TOL[dtype], f"block {e}"
    return y


# M = 1, 5, 8: the fused decode kernel; 9 and 70: the shrink (WMMA) and the expand.
@requires_sim
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("m", [1, 5, 8, 9, 70])
def test_fp32_factors_linear_patterns(dtype, pattern, m):
    nb = 37 if PATTERNS[pattern][0] == 1 else 13
    _linear(dtype, pattern, m, k=53, nb=nb, r=4)  # K odd: element-wise
    assert _sim.last_variant() == _variant(dtype, torch.float32, 0)


@requires_sim
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("pattern", ["plain", "transposed", "merged_TFT", "merged_TFT_transposed"])
@pytest.mark.parametrize("m", [2, 8, 40])
def test_fp32_factors_linear_vector_path(dtype, pattern, m):
    # K, nb multiples of 8: 16-byte accesses (two per vector of float32 A); nb over one column tile; K = 1096
    # gives the fused kernel whole groups of four vectors per lane and a remainder
    nb = 272 if PATTERNS[pattern][0] == 1 else 136
    _linear(dtype, pattern, m, k=1096 if m <= 8 else 96, nb=nb, r=8)
    assert _sim.last_variant() == _variant(dtype, torch.float32, 1)


@requires_sim
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("k", [600, 1024])
def test_fp32_factors_split_k(dtype, k):
    # a 64-row tile with K >= 512: the shrink splits K over several CTAs and the expand sums the partials
    _linear(dtype, "merged_TFT", 24, k=k, nb=16, r=8)
    assert _sim.last_variant() == _variant(dtype, torch.float32, 1)


@requires_sim
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("m,r", [(3, 40), (33, 40), (1, 260)])
def test_fp32_factors_ranks(dtype, m, r):
    # r = 40: two staged rank chunks in the expand; r = 260 at M = 1: over the fused limit, shrink + expand
    _linear(dtype, "merged_TFT" if r < 256 else "plain", m, k=45, nb=11 if r < 256 else 9, r=r, bias=False)


@requires_sim
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("dim,r", [(24, 1), (37, 5), (272, 40)])
@pytest.mark.parametrize("ids_shape", [(1,), (3, 11), (45,)])
def test_fp32_factors_embedding(dtype, dim, r, ids_shape):
    num = 50
    w = torch.randn(num, dim).to(dtype)
    A, B = torch.randn(r, num), torch.randn(dim, r)
    ids = torch.randint(0, num, ids_shape)
    y = _sim.embedding(ids, w, A, B, 0.6, None)
    assert y.shape == (*ids_shape, dim) and y.dtype == dtype
    assert rel_err(y, embedding64(ids, w, A, B, 0.6)) < TOL[dtype]
    assert _sim.last_variant() == _variant(dtype, torch.float32, int(dim % 8 == 0))


# ---------------------------------------------------------------------------------------------------
# no cast: the variant names the factors' type, and float32 values a 16-bit cast would round reach the result


_EPS = 2.0 ** -12  # 1 + 2**-12 rounds to 1 in fp16 (10 mantissa bits) and bf16 (7); 2**-12 is a normal fp16


@requires_sim
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("m", [1, 8, 20])
@pytest.mark.parametrize("k", [16, 13])
def test_fp32_b_reaches_every_linear_path_unrounded(dtype, m, k):
    # t = x A^T = (1, 1) for every row (values exact in any dtype), B's rows (1 + 2**-12, -1): the low-rank term
    # is 2**-12 exactly in float32; B cast to 16 bits (the old path) makes it 0. W = 0 and no bias.
    nb = 24
    x = torch.zeros(m, k, dtype=dtype)
    x[:, 0] = 1
    A = torch.zeros(2, k)
    A[:, 0] = 1
    B = torch.tensor([[1 + _EPS, -1.0]]).repeat(nb, 1)
    y = _sim.linear(x, x, torch.zeros(nb, k, dtype=dtype), None, A, B, 1.0, 1, [0], False)
    assert torch.equal(y, torch.full((m, nb), _EPS, dtype=dtype)), y
    assert _sim.last_variant() == _variant(dtype, torch.float32, int(k % 8 == 0))


@requires_sim
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("m", [1, 8, 9, 20])
def test_fp32_a_is_exact_in_the_fused_kernel_and_rounded_by_the_wmma_shrink(dtype, m):
    # A's rows (1 + 2**-12) and -1 against x = 1 in column 0, B's rows (1, 1): the fused kernel (M <= 8) computes
    # t in float32 from A as stored, so the term is 2**-12; the WMMA shrink (M > 8) rounds A to 16 bits as it
    # stages it, as the cast it replaced did, so the term is 0 (the design, kernels/forward.cuh)
    k, nb = 16, 24
    x = torch.zeros(m, k, dtype=dtype)
    x[:, 0] = 1
    A = torch.zeros(2, k)
    A[0, 0], A[1, 0] = 1 + _EPS, -1.0
    B = torch.ones(nb, 2)
    y = _sim.linear(x, x, torch.zeros(nb, k, dtype=dtype), None, A, B, 1.0, 1, [0], False)
    want = _EPS if m <= 8 else 0.0
    assert torch.equal(y, torch.full((m, nb), want, dtype=dtype)), y


@requires_sim
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_fp32_factors_reach_the_embedding_kernel_unrounded(dtype):
    # A's column of each id (1 + 2**-12, -1), B's rows (1, 1): 2**-12 exactly; also B's rows (1 + 2**-12, -1) with
    # A's column (1, 1)
    num, dim = 6, 16
    ids = torch.tensor([[0, 5, 3], [5, 5, 1]])
    A = torch.stack([torch.full((num,), 1 + _EPS), torch.full((num,), -1.0)])
    y = _sim.embedding(ids, torch.zeros(num, dim, dtype=dtype), A, torch.ones(dim, 2), 1.0, None)
    assert torch.equal(y, torch.full((2, 3, dim), _EPS, dtype=dtype)), y
    B = torch.tensor([[1 + _EPS, -1.0]]).repeat(dim, 1)
    y = _sim.embedding(ids, torch.zeros(num, dim, dtype=dtype), torch.ones(2, num), B, 1.0, None)
    assert torch.equal(y, torch.full((2, 3, dim), _EPS, dtype=dtype)), y
    assert _sim.last_variant() == _variant(dtype, torch.float32, 1)


@requires_sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_factors_of_the_activations_dtype_keep_their_variant(dtype):
    _linear(dtype, "merged_TFT", 3, k=64, nb=24, r=4, factors=dtype)
    assert _sim.last_variant() == _variant(dtype, dtype, 1)
    _linear(dtype, "merged_TFT", 20, k=64, nb=24, r=4, factors=dtype)
    assert _sim.last_variant() == _variant(dtype, dtype, 1)


@requires_sim
@pytest.mark.parametrize("dtype,factors", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16),
                                           (torch.float32, torch.float16), (torch.float32, torch.bfloat16)],
                         ids=str)
@pytest.mark.parametrize("m", [3, 20])
def test_16_bit_factors_of_another_dtype_are_read_as_float32(dtype, factors, m):
    # neither float32 nor the activations' dtype: one exact cast to float32, then the float32-factor kernels
    _linear(dtype, "merged_TFT", m, k=64, nb=24, r=4, factors=factors)
    assert _sim.last_variant() == _variant(dtype, torch.float32, 1)


# ---------------------------------------------------------------------------------------------------
# the layers: float32 factors on a 16-bit model, through lora_ext.ops with the simulator standing in for _C


def _mixed(layer, dtype):
    """layer with its weight and bias in dtype and its LoRA factors float32, randomised (unit-scale factors)."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5)
            if not name.startswith("lora_"):
                p.data = p.data.to(dtype)
    return layer


@requires_sim
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", ["linear", "linear_fan", "merged", "embedding"])
@pytest.mark.parametrize("m", [1, 50])
def test_layers_with_float32_factors_on_a_16_bit_model(dtype, kind, m):
    import lora_ext
    from lora_ext import ops
    make = {
        "linear": lambda: lora_ext.Linear(96, 80, r=8, lora_alpha=16, merge_weights=False),
        "linear_fan": lambda: lora_ext.Linear(96, 80, r=8, fan_in_fan_out=True, merge_weights=False),
        "merged": lambda: lora_ext.MergedLinear(96, 120, r=4, enable_lora=[True, False, True], merge_weights=False),
        "embedding": lambda: lora_ext.Embedding(60, 40, r=8, merge_weights=False),
    }[kind]
    layer = _mixed(make(), dtype).eval()
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == dtype
    x = torch.randint(0, 60, (2, m)) if kind == "embedding" else torch.randn(2, m, 96).to(dtype)
    with torch.no_grad(), ops.use_kernels(_sim, "cpu"):
        y = layer(x)
        assert _sim.last_variant().startswith(f"forward<{_NAME[dtype]}, factors=Float,"), _sim.last_variant()
    assert y.dtype == dtype
    if kind == "embedding":  # float64 oracles (tests/helpers.py), from the layer's own values
        want = embedding64(x, layer.weight, layer.lora_A, layer.lora_B, layer.scaling)
    else:
        layout = layer.layout()
        want = linear64(x, x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling,
                        layout["num_blocks"], layout["block_ids"], layout["transposed"])
    assert rel_err(y, want) < TOL[dtype]


@requires_sim
def test_the_sanitizer_suite_reaches_the_float32_factor_variants():
    """bench/sanitize_cases.py (compute-sanitizer's suite in gpu_check.sh) runs the float32-factor variants too,
    16-byte and element-wise, for fp16 and bf16; its cases pass through the simulator."""
    import importlib.util
    import pathlib
    from lora_ext import ops
    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / "sanitize_cases.py"
    spec = importlib.util.spec_from_file_location("sanitize_cases", path)
    sc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sc)
    seen = set()
    with ops.use_kernels(_sim, "cpu"):
        for name, fn in sc.cases("cpu"):
            if "float32 factors" in name:
                fn()
                seen.add(_sim.last_variant())
    for dtype in HALF:
        for vector in (0, 1):
            assert _variant(dtype, torch.float32, vector) in seen, (dtype, vector, seen)


# ---------------------------------------------------------------------------------------------------
# float32 A outside float16's range in the WMMA shrink: each rank is staged times a power of two (rank_shift,
# kernels/forward.cuh) so that no rank overflows float16 or sinks into its subnormals; the update is the float32
# factors' own. bfloat16 (float32's exponent range) takes the same cases as a control.

_RANK_SCALES = [2.0 ** 20, 2.0 ** -20, 1.0, 2.0 ** -30, 2.0 ** 40, 2.0 ** -60, 2.0 ** 17, 2.0 ** -16]


def _out_of_range_factors(ranks, k, scales):
    """A with rank i scaled by scales[i % len], B's column i by its inverse: the update B A is unit-scale."""
    s = torch.tensor([scales[i % len(scales)] for i in range(ranks)], dtype=torch.float64)
    A = (torch.randn(ranks, k, dtype=torch.float64) * s[:, None]).float()
    return A, s


@requires_sim
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("pattern", ["plain", "merged_TFT_transposed"])
@pytest.mark.parametrize("m,k,r", [(9, 53, 4), (40, 96, 8), (24, 1024, 8), (70, 40, 40)])
def test_fp32_a_outside_float16_range_in_the_wmma_shrink(dtype, pattern, m, k, r):
    # element-wise and 16-byte staging, split K (each split its own shifts), two column tiles of t (R = 80)
    num_blocks, ids, fan = PATTERNS[pattern]
    nb = 24
    n_out = num_blocks * nb
    A, s = _out_of_range_factors(len(ids) * r, k, _RANK_SCALES)
    B = (torch.randn(len(ids) * nb, r, dtype=torch.float64) / s.reshape(len(ids), r).repeat_interleave(nb, 0)).float()
    assert torch.isfinite(B).all() and (A.abs().amax() > 65504) and (A[1].abs().amax() < 2.0 ** -14)
    w = torch.zeros((k, n_out) if fan else (n_out, k), dtype=dtype)  # W = 0: the output is the update alone
    x = torch.randn(m, k).to(dtype)
    y = _sim.linear(x, x, w, None, A, B, 0.5, num_blocks, ids, fan)
    assert _sim.last_variant() == _variant(dtype, torch.float32, int(k % 8 == 0))
    ref = linear64(x, x, w, None, A, B, 0.5, num_blocks, ids, fan)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) < TOL[dtype], rel_err(y, ref)
    # each rank alone: one whose A sits far outside float16's range still gives its own term
    for i in [i for i in (0, 1, 3, 5) if i < len(A)]:
        Ai = torch.zeros_like(A)
        Ai[i] = A[i]
        y = _sim.linear(x, x, w, None, Ai, B, 0.5, num_blocks, ids, fan)
        assert rel_err(y, linear64(x, x, w, None, Ai, B, 0.5, num_blocks, ids, fan)) < TOL[dtype], i


@requires_sim
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_shifted_ranks_round_as_a_cast_of_a_normal_value(dtype):
    # A's rows 2**-20 (1 + 2**-12) and -2**-20, x = 1 in column 0, B's rows 2**20: in range, the term rounds away
    # (1 + 2**-12 has more bits than float16's 11 or bfloat16's 8), as for unit-scale rows; A's rows
    # 2**-20 (1 + 2**-7) and -2**-20 keep their 2**-7 (a float16 cast of 2**-20 (1 + 2**-7), a subnormal, loses it)
    m, k, nb = 20, 16, 24
    x = torch.zeros(m, k, dtype=dtype)
    x[:, 0] = 1
    B = torch.full((nb, 2), 2.0 ** 20)
    for eps, want in ((_EPS, 0.0), (2.0 ** -7, 2.0 ** -7)):
        A = torch.zeros(2, k)
        A[0, 0], A[1, 0] = 2.0 ** -20 * (1 + eps), -(2.0 ** -20)
        y = _sim.linear(x, x, torch.zeros(nb, k, dtype=dtype), None, A, B, 1.0, 1, [0], False)
        assert torch.equal(y, torch.full((m, nb), want, dtype=dtype)), (eps, y[0, :4])


@requires_sim
@pytest.mark.parametrize("kind", ["linear", "merged"])
def test_a_float16_layer_with_float32_factors_past_float16_range(kind):
    # the same update with A 2**18 larger and B 2**18 smaller (A past 65504): the layer's unmerged forward
    # through the kernels (50 rows: the WMMA shrink) equals the float64 oracle, as its merged forward does
    import lora_ext
    from lora_ext import ops
    layer = {"linear": lambda: lora_ext.Linear(96, 80, r=8, merge_weights=False),
             "merged": lambda: lora_ext.MergedLinear(96, 120, r=4, enable_lora=[True, False, True],
                                                     merge_weights=False)}[kind]()
    layer = _mixed(layer, torch.float16).eval()
    with torch.no_grad():
        layer.lora_A.mul_(2.0 ** 18)
        layer.lora_B.mul_(2.0 ** -18)
    assert layer.lora_A.abs().amax() > 65504
    x = torch.randn(2, 50, 96).to(torch.float16)
    with torch.no_grad(), ops.use_kernels(_sim, "cpu"):
        y = layer(x)
    layout = layer.layout()
    want = linear64(x, x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling,
                    layout["num_blocks"], layout["block_ids"], layout["transposed"])
    assert rel_err(y, want) < TOL[torch.float16]


@requires_sim
@pytest.mark.parametrize("arow,xrow", [
    ([float("inf"), -1e5], [1.0, 1.0]),          # inf with a finite element past 65504: inf, not inf - inf
    ([float("inf"), 1e5], [1.0, -1.0]),
    ([6e4, 3 * 2.0 ** -24], [0.0, 1024.0]),      # a rank that fits float16 as it is keeps its subnormal's bits
    ([float("nan"), 1e5], [1.0, 1.0]),
])
def test_the_wmma_shrink_matches_the_fused_kernel_on_extreme_ranks(arow, xrow):
    # float16 activations, float32 A of one rank: M = 9 (the WMMA shrink) gives what M = 8 (the fused kernel,
    # float32 A as stored) and plain torch's float32 give, inf and NaN included
    k = 16
    A = torch.zeros(1, k)
    A[0, :len(arow)] = torch.tensor(arow)
    B = torch.ones(8, 1)
    out = {}
    for m in (8, 9):
        x = torch.zeros(m, k, dtype=torch.float16)
        x[:, :len(xrow)] = torch.tensor(xrow, dtype=torch.float16)
        out[m] = _sim.linear(x, x, torch.zeros(8, k, dtype=torch.float16), None, A, B, 1.0, 1, [0], False)[0, 0]
    want = ((x[:1].float() @ A.t()) @ B.t())[0, 0].half()
    for m in (8, 9):
        assert torch.equal(out[m], want) or (out[m].isnan() and want.isnan()), (m, out[m].item(), want.item())
