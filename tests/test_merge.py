"""merge_, swap_ and delta_weight: the kernels on every backend, and lora_ext layers' merge and switch on CUDA.

The kernels run on the CPU through the SIMT simulator (lora_ext._sim) and, on a GPU, through lora_ext._C
(the `backend` parameter "cuda", marked `gpu`, through the `cuda` fixture). Every case draws fresh random
inputs, computes a float64 reference here with torch, poisons output buffers with NaN, and checks that
everything the kernel must not touch is bit-for-bit unchanged. The tests at the end run lora_ext layers and
ops on CUDA tensors against float64 references (marked `gpu`: bench/gpu_check.sh runs them, and its dry run
rehearses them on the CPU with --sim-as-cuda).
"""
import pytest
import torch

import lora_ext
from lora_ext import ops
from helpers import (KERNEL_DTYPES, PATTERNS, SPLIT_REL, TOL, assert_close_rel, bits, delta64, dense_delta64,
                     fresh_generator, load_sim, rel_err, requires_sim, ulp)

_sim = load_sim()

BACKENDS = [pytest.param("sim", marks=requires_sim), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """"sim" (lora_ext._sim called directly), or the `cuda` fixture (lora_ext._C on CUDA tensors)."""
    return request.param if request.param == "sim" else request.getfixturevalue("cuda")


def _run(backend, name, out_buf, view, *args):
    """Runs kernel `name` on the view of out_buf on the backend; returns out_buf as it is afterwards."""
    if isinstance(backend, str):
        getattr(_sim, name)(view(out_buf), *args)
        return out_buf
    dev_buf = out_buf.to(backend.device)
    moved = [a.to(backend.device) if isinstance(a, torch.Tensor) else a for a in args]
    getattr(backend.kernels, name)(view(dev_buf), *moved)
    backend.synchronize()
    return dev_buf.cpu()


def _storage_shape(num_blocks, nb, k, transposed):
    return (k, num_blocks * nb) if transposed else (num_blocks * nb, k)


def _view(buf, layout, shape):
    """W's view of its buffer for each storage layout under test."""
    rows, cols = shape
    if layout == "contiguous":
        return buf
    if layout == "strided":  # a row-slice of a wider tensor, 16-byte aligned rows
        return buf[:, :cols]
    if layout == "misaligned":  # data pointer one element past a 16-byte boundary
        return buf[1:].view(rows, cols)
    if layout == "strided_misaligned":
        return buf[:, 1 : 1 + cols]
    raise AssertionError(layout)


def _buffer(layout, shape, dtype, g):
    rows, cols = shape
    if layout == "contiguous":
        size = (rows, cols)
    elif layout == "strided":
        size = (rows, cols + 8 + (-cols) % 8)
    elif layout == "misaligned":
        size = (rows * cols + 1,)
    else:
        size = (rows, cols + 3)
    return torch.randn(size, generator=g).to(dtype)


def _operands(num_blocks, ids, nb, k, r, dtype, g):
    n = len(ids)
    a = torch.randn(n * r, k, generator=g).to(dtype)
    b = torch.randn(n * nb, r, generator=g).to(dtype)
    return a, b


def _touched(buf, layout, shape, num_blocks, ids, nb, transposed):
    mask = torch.zeros(buf.shape, dtype=torch.bool)
    view = _view(mask, layout, shape)
    for e in ids:
        if transposed:
            view[:, e * nb : (e + 1) * nb] = True
        else:
            view[e * nb : (e + 1) * nb] = True
    return mask


def _check_merge(backend, dtype, ab_dtype, pattern, nb, k, r, layout="contiguous", scale=0.75, seed=None,
                 tag="", r_old=0, old_scale=1.25):
    """merge_ of a rank-r adapter, or (r_old > 0) swap_ from a rank-r_old adapter to it, against float64."""
    num_blocks, ids, transposed = PATTERNS[pattern] if isinstance(pattern, str) else pattern
    g = fresh_generator(str(dtype), str(ab_dtype), str(pattern), nb, k, r, layout, tag)
    shape = _storage_shape(num_blocks, nb, k, transposed)
    buf = _buffer(layout, shape, dtype, g)
    w = _view(buf, layout, shape)
    a, b = _operands(num_blocks, ids, nb, k, r, ab_dtype, g)
    updates = [(a, b, scale)]
    if r_old:
        a1, b1 = _operands(num_blocks, ids, nb, k, r_old, ab_dtype, g)
        updates.append((a1, b1, -old_scale))
        args = ("swap_", a1, b1, old_scale, a, b, scale)
    else:
        args = ("merge_", a, b, scale)
    before = buf.clone()
    w0 = w.clone()
    ref = w0.double() + sum(delta64(x, y, s, num_blocks, ids, nb, transposed) for x, y, s in updates)
    if seed is not None:
        _sim.set_schedule(seed)
    buf = _run(backend, args[0], buf, lambda t: _view(t, layout, shape), *args[1:], num_blocks, ids, transposed)
    w = _view(buf, layout, shape)

    touched = _touched(buf, layout, shape, num_blocks, ids, nb, transposed)
    assert torch.equal(bits(buf)[~touched], bits(before)[~touched]), "wrote outside the enabled blocks"
    if not ids:
        return
    assert not torch.isnan(w).any()
    wmask = _view(touched, layout, shape)
    out, want = w[wmask], ref[wmask]
    err = rel_err(out, want)
    assert err < TOL[dtype], f"relative error {err:.3g}"
    if dtype != torch.float32:
        # One rounding per element: within an ulp of the float64 result, plus what fp32 accumulation of
        # the products may add (it matters only where W and the delta nearly cancel).
        products = sum(delta64(x.abs(), y.abs(), abs(s), num_blocks, ids, nb, transposed)
                       for x, y, s in updates)
        size = w0.double().abs() + products
        bound = ulp(want, dtype) + (r + r_old + 2) * 2.0**-24 * size[wmask]
        if ab_dtype == torch.float32 and r + r_old >= 32:  # tensor cores on bf16 hi/lo pairs
            bound = bound + SPLIT_REL * products[wmask]
        excess = ((out.double() - want).abs() / bound).max().item()
        assert excess <= 1, f"an element is {excess:.3g}x the single-rounding bound from the float64 result"


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("r", [1, 8, 33])
def test_merge_patterns(backend, dtype, pattern, r):
    nb = 37 if PATTERNS[pattern][0] == 1 else 13
    _check_merge(backend, dtype, dtype, pattern, nb=nb, k=53, r=r)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["plain", "transposed", "merged_TFT", "merged_TFT_transposed"])
def test_merge_multi_tile_vector_path(backend, dtype, pattern):
    # sizes spanning several 64x128 tiles, with widths that allow 16-byte accesses, and r over two chunks
    nb = 72 if PATTERNS[pattern][0] == 1 else 24
    _check_merge(backend, dtype, dtype, pattern, nb=nb, k=136, r=40)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r", [8, 33])
@pytest.mark.parametrize("pattern", ["plain", "merged_TFT_transposed"])
def test_merge_fp32_operands_into_half_weight(backend, dtype, r, pattern):
    _check_merge(backend, dtype, torch.float32, pattern, nb=37 if pattern == "plain" else 11, k=45, r=r)


@requires_sim
@pytest.mark.parametrize("kind", ["merge_", "delta_weight_", "swap_"])
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
def test_fp32_factors_on_half_weight_take_split_tensor_cores(kind, transposed):
    """float32 factors into a float16 W at r >= 32 run on tensor cores (the layers' default dtypes) and stay
    within one rounding of the float64 result plus the split's 3 * 2^-16 per product; factors merely rounded
    to bf16 (one MMA per step, no lo parts) would be about 2^-8 per product: the check below tells them apart."""
    g = fresh_generator("split", kind, transposed)
    nb, k, r = (72, 136, 40) if kind != "swap_" else (72, 136, 20)
    shape = _storage_shape(1, nb, k, transposed)
    a, b = _operands(1, [0], nb, k, r, torch.float32, g)
    a2, b2 = _operands(1, [0], nb, k, r, torch.float32, g)
    w = torch.zeros(shape, dtype=torch.float16) if kind == "delta_weight_" else torch.randn(shape, generator=g).half()
    w0 = w.clone()
    if kind == "swap_":
        pairs = [(a, b, -0.5), (a2, b2, 0.75)]
        getattr(_sim, kind)(w, a, b, 0.5, a2, b2, 0.75, 1, [0], transposed)
    else:
        pairs = [(a, b, 0.75)]
        getattr(_sim, kind)(w, a, b, 0.75, 1, [0], transposed)
    assert _sim.last_variant() == "merge<W=Half, factors=Float, tensor_core=1, vector=1>"
    want = w0.double() + sum(delta64(x, y, s, 1, [0], nb, transposed) for x, y, s in pairs)
    products = sum(delta64(x.abs(), y.abs(), abs(s), 1, [0], nb, transposed) for x, y, s in pairs)
    bound = ulp(want, torch.float16) + (2 * r + 2) * 2.0**-24 * (w0.double().abs() + products)
    excess = ((w.double() - want).abs() / (bound + SPLIT_REL * products)).max().item()
    assert excess <= 1, f"an element is {excess:.3g}x the bound"
    # The bound is tight enough to fail a kernel that only rounds the factors to bf16.
    bf = lambda t: t.bfloat16().double()  # noqa: E731
    rounded = w0.double() + sum(delta64(bf(x), bf(y), s, 1, [0], nb, transposed) for x, y, s in pairs)
    rounded = rounded.half().double()
    assert ((rounded - want).abs() / (bound + SPLIT_REL * products)).max().item() > 1


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["strided", "misaligned", "strided_misaligned"])
@pytest.mark.parametrize("pattern", ["plain", "merged_TFT", "merged_TFT_transposed"])
@pytest.mark.parametrize("r", [8, 33])
def test_merge_layouts(backend, dtype, layout, pattern, r):
    nb = 37 if PATTERNS[pattern][0] == 1 else 16
    _check_merge(backend, dtype, dtype, pattern, nb=nb, k=64 if layout == "strided" else 53, r=r, layout=layout)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_merge_no_enabled_block_is_a_noop(backend, dtype):
    _check_merge(backend, dtype, dtype, (3, [], False), nb=13, k=53, r=4)
    _check_merge(backend, dtype, dtype, (3, [], True), nb=13, k=53, r=4)


@requires_sim
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("pattern,r", [("plain", 8), ("merged_TFT_transposed", 33), ("plain", 70)])
def test_merge_shuffled_schedule(dtype, seed, pattern, r):
    _check_merge("sim", dtype, dtype, pattern, nb=70 if pattern == "plain" else 20, k=140, r=r, seed=seed)


# With 16-byte accesses merge and swap blocks are persistent and prefetch their next tile's W through cp.async
# (kernels/merge.cuh); the simulator gives them 3 blocks, so each block walks 5-6 of these 16 tiles (partial
# ones at both edges), and its copies land only at its waits (a read before the wait sees NaN poison).
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("pattern,nb", [("plain", 200), ("merged_TFT_transposed", 24)])
@pytest.mark.parametrize("r,r_old", [(8, 0), (40, 0), (20, 30)])
@pytest.mark.parametrize("seed", [None, 3])
def test_persistent_blocks_walk_many_tiles(backend, dtype, pattern, nb, r, r_old, seed):
    if seed is not None and not isinstance(backend, str):
        pytest.skip("a shuffled schedule is the simulator's")
    _check_merge(backend, dtype, dtype, pattern, nb=nb, k=392 if pattern == "plain" else 200, r=r, r_old=r_old,
                 seed=seed, tag="persistent")
    if isinstance(backend, str):
        assert _sim.last_variant().endswith("vector=1>"), _sim.last_variant()


@pytest.mark.parametrize("backend_name", [pytest.param("sim", marks=requires_sim), "reference"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_merge_at_scale_zero_writes_nothing(backend_name, dtype):
    # W + 0 * delta would turn -0 into +0 and a NaN or inf factor value into NaN; the CPU's addmm_(alpha=0) writes
    # nothing, and so does the kernel (as swap_ with both scales 0)
    g = fresh_generator("scale zero", str(dtype))
    w = torch.randn(70, 136, generator=g).to(dtype)
    w[::3] = -0.0
    a, b = torch.randn(40, 136, generator=g).to(dtype), torch.randn(70, 40, generator=g).to(dtype)
    a[1, 5], b[2, 7] = float("nan"), float("inf")
    before = w.clone()
    if backend_name == "sim":
        _sim.merge_(w, a, b, 0.0, 1, [0], False)
        _sim.merge_(w, a, b, -0.0, 1, [0], False)
    else:
        ops.merge_(w, a, b, 0.0)
    assert torch.equal(bits(w), bits(before))


@requires_sim
def test_unmerge_restores_fp32_weight():
    g = fresh_generator("unmerge")
    w = torch.randn(70, 45, generator=g)
    a, b = _operands(1, [0], 70, 45, 8, torch.float32, g)
    w0 = w.clone()
    _sim.merge_(w, a, b, 0.5, 1, [0], False)
    assert not torch.equal(w, w0)
    _sim.merge_(w, a, b, -0.5, 1, [0], False)
    assert rel_err(w, w0.double()) < 1e-6


# swap_: one kernel reads both adapters; the ranks' boundary falls inside a staged chunk of 32 (5 + 8,
# 20 + 25), on one (32 + 7), and the total spans several chunks (40 + 33).
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("r_old,r_new", [(5, 8), (20, 25), (32, 7)])
def test_swap_patterns(backend, dtype, pattern, r_old, r_new):
    nb = 37 if PATTERNS[pattern][0] == 1 else 13
    _check_merge(backend, dtype, dtype, pattern, nb=nb, k=53, r=r_new, r_old=r_old, tag="swap")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "misaligned", "strided_misaligned"])
@pytest.mark.parametrize("pattern", ["plain", "merged_TFT_transposed"])
def test_swap_layouts_and_tiles(backend, dtype, layout, pattern):
    nb = 72 if pattern == "plain" else 24
    _check_merge(backend, dtype, dtype, pattern, nb=nb, k=136 if layout == "strided" else 133, r=33, r_old=40,
                 layout=layout, tag="swap")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r_old,r_new", [(16, 16), (5, 8), (40, 33)])
def test_swap_fp32_operands_into_half_weight(backend, dtype, r_old, r_new):
    _check_merge(backend, dtype, torch.float32, "merged_TFT", nb=11, k=45, r=r_new, r_old=r_old, tag="swap")


@requires_sim
@pytest.mark.parametrize("seed", [1, 2])
def test_swap_shuffled_schedule(seed):
    _check_merge("sim", torch.bfloat16, torch.bfloat16, "plain", nb=70, k=140, r=20, r_old=30, seed=seed,
                 tag="swap")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("scales", [(0.0, 1.25), (0.75, 0.0), (0.75, 300.0), (-200.0, 1.25)])
def test_swap_scales(backend, dtype, scales):
    # the kernel sums scale * (mult * x + y) with y the pair of the larger scale: zero and lopsided scales
    new, old = scales
    _check_merge(backend, dtype, dtype, "plain", nb=37, k=53, r=20, r_old=20, scale=new, old_scale=old,
                 tag="swap scales")


@requires_sim
def test_swap_with_both_scales_zero_writes_nothing():
    g = fresh_generator("swap zero")
    w = torch.randn(39, 20, generator=g).bfloat16()
    w0 = w.clone()
    _sim.swap_(w, torch.randn(6, 20).bfloat16(), torch.randn(26, 3).bfloat16(), 0.0, torch.randn(8, 20).bfloat16(),
               torch.randn(26, 4).bfloat16(), 0.0, 3, [0, 2], False)
    assert torch.equal(bits(w), bits(w0))


@requires_sim
def test_swap_back_restores_fp32_weight():
    g = fresh_generator("swap back")
    w = torch.randn(70, 45, generator=g)
    a1, b1 = _operands(1, [0], 70, 45, 8, torch.float32, g)
    a2, b2 = _operands(1, [0], 70, 45, 5, torch.float32, g)
    w0 = w.clone()
    _sim.swap_(w, a1, b1, 0.5, a2, b2, 2.0, 1, [0], False)
    assert rel_err(w, w0.double() + delta64(a2, b2, 2.0, 1, [0], 70, False)
                    - delta64(a1, b1, 0.5, 1, [0], 70, False)) < 1e-6
    _sim.swap_(w, a2, b2, 2.0, a1, b1, 0.5, 1, [0], False)
    assert rel_err(w, w0.double()) < 1e-6


SWAP_BAD_ARGS = {
    "new_A columns": (dict(new_A=torch.randn(8, 21)), "new_A must have 20 columns"),
    "old_B shape": (dict(old_B=torch.randn(26, 2)), "old_B must have shape"),
    "old_A device": (dict(old_A=torch.empty(6, 20, device="meta")), "old_A must be on W's device"),
    "pairs' dtypes": (dict(old_A=torch.randn(6, 20).half(), old_B=torch.randn(26, 3).half()),
                      "old_A must be float32 or W's dtype"),
    "mixed pair dtypes": (dict(W=torch.randn(39, 20).half(), old_A=torch.randn(6, 20).half(),
                               old_B=torch.randn(26, 3).half()), "old_A and new_A must share one dtype"),
    "old_scale": (dict(old_scale=float("inf")), "old_scale and new_scale must be finite"),
    "new_scale": (dict(new_scale=float("nan")), "old_scale and new_scale must be finite"),
}


@requires_sim
@pytest.mark.parametrize("case", list(SWAP_BAD_ARGS))
def test_swap_argument_errors(case):
    g = fresh_generator("swap args")
    args = dict(W=torch.randn(39, 20, generator=g), old_A=torch.randn(6, 20, generator=g),
                old_B=torch.randn(26, 3, generator=g), old_scale=0.5, new_A=torch.randn(8, 20, generator=g),
                new_B=torch.randn(26, 4, generator=g), new_scale=1.5, num_blocks=3, block_ids=[0, 2],
                transposed=False)
    over, message = SWAP_BAD_ARGS[case]
    args.update(over)
    w0 = args["W"].clone()
    with pytest.raises(ValueError, match=message):
        _sim.swap_(**args)
    assert torch.equal(args["W"], w0), "W changed although the call was rejected"


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["plain", "transposed", "merged_TFT", "merged_FT", "merged_TFT_transposed"])
@pytest.mark.parametrize("r", [1, 33])
@pytest.mark.parametrize("layout", ["contiguous", "strided_misaligned"])
def test_delta_weight(backend, dtype, pattern, r, layout):
    num_blocks, ids, transposed = PATTERNS[pattern]
    nb = 37 if num_blocks == 1 else 13
    k = 53
    g = fresh_generator("delta", str(dtype), pattern, r, layout)
    shape = _storage_shape(num_blocks, nb, k, transposed)
    buf = torch.full(_buffer(layout, shape, dtype, g).shape, float("nan"), dtype=dtype)
    out = _view(buf, layout, shape)
    a, b = _operands(num_blocks, ids, nb, k, r, dtype, g)
    ref = delta64(a, b, 0.6, num_blocks, ids, nb, transposed)
    buf = _run(backend, "delta_weight_", buf, lambda t: _view(t, layout, shape), a, b, 0.6, num_blocks, ids,
               transposed)
    out = _view(buf, layout, shape)

    inside = torch.zeros(buf.shape, dtype=torch.bool)
    _view(inside, layout, shape)[...] = True
    assert torch.isnan(buf[~inside]).all(), "wrote outside out"
    assert not torch.isnan(out).any(), "left elements of out unwritten"
    disabled = ~_view(_touched(buf, layout, shape, num_blocks, ids, nb, transposed), layout, shape)
    assert (out[disabled] == 0).all()
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.3g}"


@requires_sim
def test_delta_weight_with_no_enabled_block_writes_zeros():
    out = torch.full((39, 20), float("nan"))
    _sim.delta_weight_(out, torch.empty(0, 20), torch.empty(0, 4), 1.0, 3, [], False)
    assert (out == 0).all()


def _args(**over):
    g = fresh_generator("args")
    args = dict(
        W=torch.randn(39, 20, generator=g),
        A=torch.randn(8, 20, generator=g),
        B=torch.randn(26, 4, generator=g),
        scale=0.5,
        num_blocks=3,
        block_ids=[0, 2],
        transposed=False,
    )
    args.update(over)
    return args


BAD_ARGS = {
    "W 3-D": (dict(W=torch.randn(39, 20, 1)), "W must be 2-D"),
    "W integer": (dict(W=torch.randint(1, 9, (39, 20), dtype=torch.int32)), "W must be float32"),
    "W float64": (dict(W=torch.randn(39, 20, dtype=torch.float64)), "W must be float32"),
    "W column stride": (dict(W=torch.randn(20, 39).t()), "W must have column stride 1"),
    "W rows vs num_blocks": (dict(W=torch.randn(40, 20)), "not divisible by num_blocks"),
    "W on another device": (dict(W=torch.empty(39, 20, device="meta")), "W must be a CPU tensor"),
    "A on another device": (dict(A=torch.empty(8, 20, device="meta")), "A must be on W's device"),
    "A dtype": (dict(A=torch.randn(8, 20, dtype=torch.float64)), "A must be float32 or W's dtype"),
    "B dtype": (dict(B=torch.randn(26, 4).half()), "B must have A's dtype"),
    "A columns": (dict(A=torch.randn(8, 21)), "A must have 20 columns"),
    "A rows": (dict(A=torch.randn(7, 20)), "A must have n\\*r rows"),
    "B shape": (dict(B=torch.randn(26, 5)), "B must have shape"),
    "B rows": (dict(B=torch.randn(25, 4)), "B must have shape"),
    "A 1-D": (dict(A=torch.randn(160)), "A must be 2-D"),
    "num_blocks": (dict(num_blocks=0), "num_blocks must be in"),
    "block_ids range": (dict(block_ids=[0, 3]), "block_ids must lie in"),
    "block_ids order": (dict(block_ids=[2, 0]), "block_ids must be strictly increasing"),
}


@requires_sim
@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_merge_argument_errors(case):
    over, message = BAD_ARGS[case]
    args = _args(**over)
    w0 = args["W"].clone() if args["W"].device.type == "cpu" else None
    with pytest.raises((ValueError, RuntimeError), match=message):
        _sim.merge_(**args)
    if w0 is not None:
        assert torch.equal(args["W"], w0), "W changed although the call was rejected"


@requires_sim
def test_delta_weight_argument_errors_name_out():
    args = _args()
    out = args.pop("W")
    with pytest.raises(ValueError, match="out must be 2-D"):
        _sim.delta_weight_(out[None], **args)
    with pytest.raises(ValueError, match="out must have column stride 1"):
        _sim.delta_weight_(torch.randn(20, 39).t(), **args)


# ---------------------------------------------------------------------------------------------------
# lora_ext layers and ops on CUDA tensors (through lora_ext._C; rehearsed on the CPU through lora_ext._sim with
# --sim-as-cuda), against float64 references

LAYERS = {
    "linear": lambda: lora_ext.Linear(96, 80, r=8, lora_alpha=16),
    "linear_fan": lambda: lora_ext.Linear(96, 80, r=8, fan_in_fan_out=True),
    "merged": lambda: lora_ext.MergedLinear(96, 120, r=4, enable_lora=[True, False, True]),
    "merged_r64": lambda: lora_ext.MergedLinear(96, 192, r=64, enable_lora=[False, True, True]),
    "embedding": lambda: lora_ext.Embedding(77, 40, r=8),
    "conv2d": lambda: lora_ext.Conv2d(6, 8, 3, r=4),
}


def _weight_and_delta(m):
    """The layer's weight and its scaled float64 delta, the delta on the CPU."""
    w, d = _weight_and_delta_on_device(m)
    return w, d.cpu()


def _weight_and_delta_on_device(m):
    if isinstance(m, lora_ext.ConvLoRA):
        w = m.conv.weight
        return w, (m.lora_B.double() @ m.lora_A.double()).view(w.shape) * m.scaling
    if isinstance(m, lora_ext.MergedLinear):
        ids = [i for i, e in enumerate(m.enable_lora) if e]
        d = dense_delta64(m.lora_A, m.lora_B, len(m.enable_lora), ids, m.out_features) * m.scaling
        return m.weight, d.t() if m.fan_in_fan_out else d
    d = (m.lora_B.double() @ m.lora_A.double()) * m.scaling
    transposed = isinstance(m, lora_ext.Embedding) or m.fan_in_fan_out
    return m.weight, d.t() if transposed else d


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_cuda_merge_and_unmerge(cuda, kind, dtype):
    m = LAYERS[kind]().to(cuda.device)
    # the lossy kernels' numerics (updates as large as the weight: a lossless merge would refuse most of these,
    # tests/test_lossless.py covers it)
    m.lossless = False
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    w, _ = _weight_and_delta(m)
    with torch.no_grad():
        w.data = w.data.to(dtype)  # low-precision base, fp32 LoRA factors
    base = w.detach().double().cpu()
    _, delta = _weight_and_delta(m)
    version = w._version
    m.eval()
    w, _ = _weight_and_delta(m)
    assert w._version > version
    assert_close_rel(w.cpu(), base + delta, dtype)
    m.train()
    assert_close_rel(w.cpu(), base, dtype, factor=2)


@pytest.mark.gpu
def test_cuda_merge_rejects_bad_input_before_writing(cuda):
    w = torch.randn(64, 32, device=cuda.device)
    w0 = w.clone()
    with pytest.raises(ValueError, match="lora_B"):
        ops.merge_(w, torch.randn(4, 32, device=cuda.device), torch.randn(64, 5, device=cuda.device), 1.0)
    with pytest.raises(ValueError, match="device"):
        ops.merge_(w, torch.randn(4, 32, device=cuda.other), torch.randn(64, 4, device=cuda.device), 1.0)
    cuda.synchronize()
    assert torch.equal(w, w0)


@pytest.mark.gpu
@pytest.mark.hardware("CUDA streams")
def test_cuda_merge_on_current_stream(cuda):
    w = torch.randn(512, 256, device=cuda.device)
    A, B = torch.randn(8, 256, device=cuda.device), torch.randn(512, 8, device=cuda.device)
    ref = w.double() + 0.5 * B.double() @ A.double()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.merge_(w, A, B, 0.5)
    torch.cuda.current_stream().wait_stream(s)
    assert_close_rel(w, ref, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype,f_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
                                             (torch.float64, torch.float32)])
def test_cuda_merge_and_delta_take_any_float_factors(cuda, w_dtype, f_dtype):
    w = torch.randn(48, 40, device=cuda.device).to(w_dtype)
    A = torch.randn(6, 40, device=cuda.device).to(f_dtype)
    B = torch.randn(48, 6, device=cuda.device).to(f_dtype)
    ref = w.double() + 0.5 * B.double() @ A.double()
    ops.merge_(w, A, B, 0.5)
    assert_close_rel(w, ref, w_dtype, factor=2)
    d = ops.delta_weight(A, B, 0.5, out_features=48, dtype=w_dtype)
    assert_close_rel(d, 0.5 * B.double() @ A.double(), w_dtype, factor=2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["linear", "linear_fan", "merged", "merged_r64", "embedding", "conv2d"])
@pytest.mark.parametrize("home", ["cuda", "cpu"])
@pytest.mark.parametrize("serving", [True, False], ids=["serving", "trainable"])
def test_cuda_merged_switch(cuda, kind, dtype, home, serving):
    # one swap kernel pass each way (fp32-staged or WMMA by dtype and rank), adapters on the GPU or in host memory
    # (in a rehearsal both homes are the CPU). Serving factors (no grad) go back to their home when switched away;
    # trainable ones stay the Parameters they were served as, on the layer's device (an optimizer holds them:
    # the H200 run of 2026-12-04 showed the test expecting the home for both)
    home = cuda.device if home == "cuda" else torch.device("cpu")
    m = LAYERS[kind]().to(cuda.device).to(dtype)
    m.lossless = False  # the lossy swap kernel (the lossless ones: tests/test_lossless*.py)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    if serving:
        m.lora_A.requires_grad_(False)
        m.lora_B.requires_grad_(False)
    w, delta1 = _weight_and_delta(m)
    base = w.detach().double().cpu()
    a_shape, b_shape = m.factor_shapes(m.r + 3)
    A2 = (torch.randn(a_shape) * 0.5).to(home, dtype)
    B2 = (torch.randn(b_shape) * 0.5).to(home, dtype)
    m.add_adapter("other", A2, B2, 0.7)
    m.eval()
    m.set_adapter("other")
    w, delta2 = _weight_and_delta(m)
    assert m.lora_A.device.type == cuda.device.type and m.get_adapter("default")[0].device.type == cuda.device.type
    assert_close_rel(w.cpu(), base + delta2, dtype, factor=2)
    m.set_adapter("default")
    assert m.get_adapter("other")[0].device.type == (home.type if serving else cuda.device.type)
    assert_close_rel(w.cpu(), base + delta1, dtype, factor=2)
    m.train()
    assert_close_rel(w.cpu(), base, dtype, factor=4)


@pytest.mark.gpu
def test_cuda_switch_refuses_non_finite_values_before_writing(cuda):
    m = lora_ext.Linear(64, 48, r=4).to(cuda.device)
    with torch.no_grad():
        m.lora_B.normal_()
    A2, B2 = torch.randn(4, 64, device=cuda.device), torch.randn(48, 4, device=cuda.device)
    m.add_adapter("other", A2, B2, 1.0)
    m.eval()
    with torch.no_grad():
        m.get_adapter("other")[1][3, 1] = float("nan")
    w0 = m.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        m.set_adapter("other")
    cuda.synchronize()
    assert torch.equal(m.weight, w0) and m.active_adapter == "default"


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_swap_op_with_factors_of_two_dtypes(cuda, w_dtype):
    w = torch.randn(96, 80, device=cuda.device).to(w_dtype)
    A1, B1 = torch.randn(8, 80, device=cuda.device), torch.randn(96, 8, device=cuda.device)  # fp32
    A2 = torch.randn(24, 80, device=cuda.device).to(w_dtype)
    B2 = torch.randn(96, 24, device=cuda.device).to(w_dtype)
    ref = w.double() + 1.5 * B2.double() @ A2.double() - 0.5 * B1.double() @ A1.double()
    ops.swap_(w, A1, B1, 0.5, A2, B2, 1.5)
    assert_close_rel(w, ref, w_dtype, factor=2)
