"""Hostile checks of the merge kernels' float32-factors-on-16-bit-W tensor-core path (bf16 hi/lo split), the
persistent prefetching merge/swap blocks, the 8x4 transposed staging, and the forward kernels' per-operand
alignment flags, through the SIMT simulator (lora_ext._sim). Every case draws fresh random inputs and is checked
against a float64 reference computed here (never against lora_ext), with the per-element bound of
tests/test_merge.py: one rounding of W's dtype, (r + 2) * 2^-24 of sum |W| + |products| for fp32 accumulation,
and 3 * 2^-16 of sum |products| on the split path."""
import threading

import pytest
import torch

import lora_ext
from helpers import (SPLIT_REL, TOL, bits, delta64, embedding64, fresh_generator, linear64, load_sim, rel_err,
                     requires_sim, ulp)

_sim = load_sim()
pytestmark = requires_sim

HALF = [torch.float16, torch.bfloat16]


def _bound(want, w0, products, dtype, rank, split):
    """The per-element bound of tests/test_merge.py for a result of float64 value `want`."""
    bound = ulp(want, dtype) + (rank + 2) * 2.0**-24 * (w0.double().abs() + products)
    return bound + SPLIT_REL * products if split else bound


def _split_expected(w_dtype, ab_dtype, rank):
    return w_dtype != torch.float32 and ab_dtype == torch.float32 and rank >= 32


def _w_view(buf, layout, rows, cols):
    if layout == "contiguous":
        return buf
    if layout == "strided":  # row-slice of a wider tensor; ldw = cols + 3: not a multiple of 8 -> element-wise
        return buf[:, :cols]
    if layout == "misaligned":
        return buf[1:].view(rows, cols)
    raise AssertionError(layout)


def _w_buffer(layout, rows, cols, dtype, g, fill=None):
    size = {"contiguous": (rows, cols), "strided": (rows, cols + 3), "misaligned": (rows * cols + 1,)}[layout]
    t = torch.randn(size, generator=g) if fill is None else fill(size, g)
    return t.to(dtype)


def _check(dtype, ab_dtype, num_blocks, ids, nb, k, r, transposed=False, r_old=0, scale=0.75, old_scale=1.25,
           layout="contiguous", seed=None, factor=None, vector=None):
    """merge_ (r_old == 0) or swap_ (old rank r_old -> new rank r) on a fresh W, against float64; checks that
    nothing outside the enabled blocks changes. factor(shape, g): how factor values are drawn. Returns W."""
    g = fresh_generator()
    factor = factor or (lambda shape, g: torch.randn(shape, generator=g))
    n = len(ids)
    rows, cols = (k, num_blocks * nb) if transposed else (num_blocks * nb, k)
    buf = _w_buffer(layout, rows, cols, dtype, g)
    w = _w_view(buf, layout, rows, cols)
    a = factor((n * r, k), g).to(ab_dtype)
    b = factor((n * nb, r), g).to(ab_dtype)
    pairs = [(a, b, scale)]
    if r_old:
        a1 = factor((n * r_old, k), g).to(ab_dtype)
        b1 = factor((n * nb, r_old), g).to(ab_dtype)
        pairs.append((a1, b1, -old_scale))
    before = buf.clone()
    w0 = w.clone()
    want = w0.double() + sum(delta64(x, y, s, num_blocks, ids, nb, transposed) for x, y, s in pairs)
    products = sum(delta64(x.abs(), y.abs(), abs(s), num_blocks, ids, nb, transposed) for x, y, s in pairs)
    if seed is not None:
        _sim.set_schedule(seed)
    if r_old:
        _sim.swap_(w, a1, b1, old_scale, a, b, scale, num_blocks, ids, transposed)
    else:
        _sim.merge_(w, a, b, scale, num_blocks, ids, transposed)
    variant = _sim.last_variant()
    split = _split_expected(dtype, ab_dtype, r + r_old)
    if dtype != torch.float32:
        assert f"tensor_core={int(r + r_old >= 32)}" in variant, variant
    if vector is not None:
        assert variant.endswith(f"vector={int(vector)}>"), variant
    # untouched outside the enabled blocks (and outside W's view of its buffer)
    touched = torch.zeros(buf.shape, dtype=torch.bool)
    tv = _w_view(touched, layout, rows, cols)
    for e in ids:
        if transposed:
            tv[:, e * nb:(e + 1) * nb] = True
        else:
            tv[e * nb:(e + 1) * nb] = True
    assert torch.equal(bits(buf)[~touched], bits(before)[~touched]), "wrote outside the enabled blocks"
    mask = _w_view(touched, layout, rows, cols)
    assert not torch.isnan(w).any(), "NaN in W"
    bound = _bound(want, w0, products, dtype, r + r_old, split)
    excess = ((w.double() - want).abs() / bound)[mask]
    if excess.numel():
        assert excess.max().item() <= 1, f"an element is {excess.max().item():.3g}x the bound ({variant})"
    return w


# ---------------------------------------------------------------------------------------------------
# persistent blocks (3 resident in the simulator): tile counts below, equal to, above and multiples of 3,
# partial tiles at the right and bottom edges, split and fp32 paths, merge and swap straddling rank 32


_TILES = {  # (tiles down, tiles across) -> (nb, k) for one block, not transposed; partial edges everywhere
    1: (37, 72), 2: (37, 200), 3: (150, 72), 4: (100, 136), 6: (130, 208), 7: (450, 64),
}


@pytest.mark.parametrize("tiles", list(_TILES))
@pytest.mark.parametrize("ranks", [(32, 0), (16, 15), (16, 16), (1, 31), (31, 1), (40, 33)],
                         ids=lambda t: f"r{t[0]}+{t[1]}")
def test_persistent_walk_over_tile_counts(tiles, ranks):
    r, r_old = ranks
    nb, k = _TILES[tiles]
    dtype = HALF[(tiles + r) % 2]
    _check(dtype, torch.float32, 1, [0], nb, k, r, r_old=r_old, vector=True)


@pytest.mark.parametrize("tiles", [1, 3, 4, 7])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_persistent_walk_transposed_split(tiles, dtype):
    # transposed W (k, nb): tiles run along k (64 rows) and nb (128 columns); the 8x4 staging walks both
    nb, k = _TILES[tiles][1], _TILES[tiles][0]
    _check(dtype, torch.float32, 1, [0], nb, k, 40, transposed=True, vector=True)


@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
@pytest.mark.parametrize("nb,vector", [(8, True), (3, False)])
def test_many_sparse_blocks(transposed, nb, vector):
    # 256 blocks, 5 of them enabled at the edges and in between; nb = 3 makes a transposed W element-wise
    ids = [0, 1, 100, 254, 255]
    _check(torch.bfloat16, torch.float32, 256, ids, nb, 24, 32, transposed=transposed,
           vector=vector or not transposed)


@pytest.mark.parametrize("shape", [(1, 1), (1, 256), (200, 1), (9, 8)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "misaligned"])
def test_one_row_one_column_and_odd_layouts(shape, layout):
    nb, k = shape
    # 16-byte accesses: an aligned pointer and a row stride of whole vectors (a 1-row W's stride is its width)
    vector = layout != "misaligned" and k % 8 == 0 and (layout == "contiguous" or nb == 1)
    _check(torch.float16, torch.float32, 1, [0], nb, k, 32, r_old=0 if nb != 9 else 8, layout=layout, vector=vector)


@pytest.mark.parametrize("seed", [1, 7])
def test_shuffled_schedule_is_bitwise_the_default(seed):
    # each element is one fixed sum: the thread order (and the cp.async landing at the waits) cannot change it
    g = fresh_generator()
    w = torch.randn(300, 264, generator=g).bfloat16()
    a, b = torch.randn(33, 264, generator=g), torch.randn(300, 33, generator=g)
    a2, b2 = torch.randn(7, 264, generator=g), torch.randn(300, 7, generator=g)
    ref = w.clone()
    _sim.swap_(ref, a2, b2, 0.3, a, b, 0.9, 1, [0], False)
    _sim.set_schedule(seed)
    _sim.swap_(w, a2, b2, 0.3, a, b, 0.9, 1, [0], False)
    assert torch.equal(bits(w), bits(ref))


def test_python_threads_merging_different_weights_concurrently():
    g = fresh_generator()
    cases = []
    for i in range(6):
        dtype = HALF[i % 2]
        nb, k, r = 130 + 9 * i, 136 + 8 * i, (32, 8, 40)[i % 3]
        cases.append((torch.randn(nb, k, generator=g).to(dtype), torch.randn(r, k, generator=g),
                      torch.randn(nb, r, generator=g)))
    alone = []
    for w, a, b in cases:
        w = w.clone()
        _sim.merge_(w, a, b, 0.5, 1, [0], False)
        alone.append(w)
    shared = [w.clone() for w, _, _ in cases]
    errors = []

    def work(i):
        try:
            _sim.merge_(shared[i], cases[i][1], cases[i][2], 0.5, 1, [0], False)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for got, want in zip(shared, alone):
        assert torch.equal(bits(got), bits(want))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("r", [32, 64])
def test_merge_then_unmerge_restores(dtype, r):
    g = fresh_generator()
    nb, k = 150, 200
    w = torch.randn(nb, k, generator=g).to(dtype)
    a, b = torch.randn(r, k, generator=g) * 0.3, torch.randn(nb, r, generator=g) * 0.3
    w0 = w.clone()
    _sim.merge_(w, a, b, 0.8, 1, [0], False)
    assert "tensor_core=1" in _sim.last_variant()
    _sim.merge_(w, a, b, -0.8, 1, [0], False)
    products = 0.8 * (b.double().abs() @ a.double().abs())
    size = w0.double().abs() + products
    # two roundings (each at most half a spacing at |W| + |delta|) plus each pass's accumulation and split error
    bound = ulp(size, dtype) + 2 * ((r + 2) * 2.0**-24 * size + SPLIT_REL * products)
    assert ((w.double() - w0.double()).abs() / bound).max().item() <= 1


# ---------------------------------------------------------------------------------------------------
# scales and value ranges


@pytest.mark.parametrize("scale", [1e-30, 1e4, -3e3])  # (scale 0 launches nothing: the test below)
def test_scales_on_split_path(scale):
    small = abs(scale) > 1  # keep the result in float16 range
    fill = (lambda s, g: torch.randn(s, generator=g) * 1e-3) if small else None
    _check(torch.float16, torch.float32, 3, [0, 2], 40, 72, 32, scale=scale, factor=fill)


def test_scale_zero_leaves_w_equal():
    g = fresh_generator()
    w = torch.randn(100, 136, generator=g).bfloat16()
    w0 = w.clone()
    w[::7] = -0.0
    w0 = w.clone()
    _sim.merge_(w, torch.randn(32, 136, generator=g), torch.randn(100, 32, generator=g), 0.0, 1, [0], False)
    assert torch.equal(bits(w), bits(w0))  # a -0.0 stays -0.0: nothing is written
    assert _sim.last_variant() == ""


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", ["merge", "swap"])
def test_factors_spanning_wide_exponent_ranges(dtype, kind):
    # factor magnitudes from 1e-30 to 1e30 (A) and 1e-3 to 1e3 (B): products differ by 60 orders of magnitude
    hi = 30 if dtype == torch.bfloat16 else 1

    def fill(shape, g):
        exps = torch.rand(shape, generator=g, dtype=torch.float64) * (hi + 30) - 30
        if shape[1] < 50:  # B (rows, r)
            exps = torch.rand(shape, generator=g, dtype=torch.float64) * 6 - 3
        sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
        return (sign * torch.pow(10.0, exps)).float()

    r, r_old = (32, 0) if kind == "merge" else (17, 15)
    _check(dtype, torch.float32, 1, [0], 70, 136, r, r_old=r_old, factor=fill)


# ---------------------------------------------------------------------------------------------------
# the hi/lo split at float32's extremes. Found by this file: a float32 factor above bf16's largest finite value
# (rounded) split into inf - inf and made W NaN (now: the largest finite bf16 as hi, the rest as lo); and below
# 2^-118 a value's lo part falls among bf16's subnormals (spaced 2^-133): kernels/merge.cuh documents that term,
# 2^-134 (|x| + |y|) per product, and the check below holds the kernel to it (and shows it is needed: the
# relative bound alone fails there).


def test_split_of_tiny_factors_stays_within_the_documented_absolute_term():
    tiny = lambda s, g: torch.randn(s, generator=g) * 2.0**-130  # noqa: E731 (fp32 subnormals)
    big = lambda s, g: torch.randn(s, generator=g) * 2.0**125  # noqa: E731
    g = fresh_generator()
    a, b = tiny((32, 128), g), big((64, 32), g)
    for r in (31, 32):  # the fp32 path; the split path
        w = torch.zeros(64, 128, dtype=torch.float16)
        _sim.merge_(w, a[:r].contiguous(), b[:, :r].contiguous(), 1.0, 1, [0], False)
        want = b[:, :r].double() @ a[:r].double()
        products = b[:, :r].double().abs() @ a[:r].double().abs()
        rel_only = _bound(want, torch.zeros(64, 128), products, torch.float16, r, r >= 32)
        absolute = 2.0**-134 * (b[:, :r].double().abs().sum(1, keepdim=True) + a[:r].double().abs().sum(0))
        excess = ((w.double() - want).abs() / (rel_only + (absolute if r >= 32 else 0))).max().item()
        assert excess <= 1, f"r={r}: {excess:.3g}x the bound"
        if r >= 32:
            assert ((w.double() - want).abs() / rel_only).max().item() > 1, "the absolute term is needed here"


@pytest.mark.parametrize("scale", [1.0, 0.0])
@pytest.mark.parametrize("bits", [0x7F7F8000, 0x7F7FFFFF, 0xFF7F9000 - 2**32])
def test_split_of_largest_float32_factors_is_finite(scale, bits):
    v = torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()
    for r in (31, 32):
        a = torch.full((r, 8), v)
        b = torch.full((8, r), 2.0**-130)
        w = torch.zeros(8, 8, dtype=torch.bfloat16)
        _sim.merge_(w, a, b, scale, 1, [0], False)
        want = scale * (b.double() @ a.double())
        assert not torch.isnan(w).any(), f"r={r}"
        if scale == 0:
            assert (w == 0).all()
        else:
            assert rel_err(w, want) < TOL[torch.bfloat16]


# ---------------------------------------------------------------------------------------------------
# the forward kernels: a misaligned x_lora (apart from an aligned x) or embedding table is read element by
# element inside the 16-byte variant


def _misaligned(t, off):
    flat = torch.empty(t.numel() + off, dtype=t.dtype)[off:]
    return flat.view(t.shape).copy_(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 17, 130])
@pytest.mark.parametrize("factors", ["same", "float32"])
def test_linear_misaligned_separate_x_lora(dtype, m, factors):
    g = fresh_generator()
    k, nb, r, G, ids, fan = (136, 16, 33, 2, [1], True) if m != 17 else (64, 24, 4, 3, [0, 2], False)
    n_out = G * nb
    w = torch.randn((k, n_out) if fan else (n_out, k), generator=g).to(dtype)
    bias = torch.randn(n_out, generator=g).to(dtype)
    A = torch.randn(len(ids) * r, k, generator=g).to(dtype)
    B = torch.randn(len(ids) * nb, r, generator=g).to(dtype)
    if factors == "float32":
        A, B = A.float(), B.float()
    x = torch.randn(m, k, generator=g).to(dtype)
    x_lora = _misaligned(torch.randn(m, k, generator=g).to(dtype), 3)
    y = _sim.linear(x, x_lora, w, bias, A, B, 0.75, G, ids, fan)
    assert _sim.last_variant().endswith("vector=1>"), _sim.last_variant()
    assert rel_err(y, linear64(x, x_lora, w, bias, A, B, 0.75, G, ids, fan)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("off", [1, 2])
def test_embedding_misaligned_table_float32_factors(dtype, off):
    g = fresh_generator()
    num, dim, r = 300, 136, 40
    w = _misaligned(torch.randn(num, dim, generator=g).to(dtype), off)
    A, B = torch.randn(r, num, generator=g), torch.randn(dim, r, generator=g)
    ids = torch.randint(0, num, (4, 33), generator=g)
    y = _sim.embedding(ids, w, A, B, 0.5, None)
    assert _sim.last_variant().endswith("vector=1>"), _sim.last_variant()
    assert rel_err(y, embedding64(ids, w, A, B, 0.5)) < TOL[dtype]


# ---------------------------------------------------------------------------------------------------
# layers through the kernel branch (sim_as_cuda): bfloat16 weights, float32 factors, r = 32 / 64, lossy merges


def _layer_weight_delta(m):
    if isinstance(m, lora_ext.MergedLinear):
        ids = [i for i, e in enumerate(m.enable_lora) if e]
        G = len(m.enable_lora)
        d = delta64(m.lora_A.detach(), m.lora_B.detach(), m.scaling, G, ids, m.out_features // G, False)
        return m.weight, d.t() if m.fan_in_fan_out else d
    d = m.scaling * (m.lora_B.detach().double() @ m.lora_A.detach().double())
    transposed = isinstance(m, lora_ext.Embedding) or m.fan_in_fan_out
    return m.weight, d.t() if transposed else d


_LAYERS = {
    "linear_r32": lambda: lora_ext.Linear(136, 72, r=32, lora_alpha=16, lossless=False),
    "linear_fan_r64": lambda: lora_ext.Linear(72, 136, r=64, fan_in_fan_out=True, lossless=False),
    "merged_r32": lambda: lora_ext.MergedLinear(96, 192, r=32, enable_lora=[True, False, True], lossless=False),
    "embedding_r32": lambda: lora_ext.Embedding(130, 72, r=32, lossless=False),
}


@pytest.mark.parametrize("kind", list(_LAYERS))
def test_layer_cycles_and_switches_bf16_weight_fp32_factors(sim_as_cuda, kind):
    g = fresh_generator()
    m = _LAYERS[kind]()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    w, _ = _layer_weight_delta(m)
    w.data = w.data.to(torch.bfloat16)
    w, d1 = _layer_weight_delta(m)
    assert m.lora_A.dtype == torch.float32
    base = w.detach().double().clone()
    a_shape, b_shape = m.factor_shapes(m.r + 3)
    A2 = torch.randn(a_shape, generator=g) * 0.5
    B2 = torch.randn(b_shape, generator=g) * 0.5
    m.add_adapter("other", A2, B2, 0.7)
    for _ in range(2):
        m.eval()
        assert "tensor_core=1" in _sim.last_variant(), _sim.last_variant()
        assert rel_err(m.weight, base + d1) < TOL[torch.bfloat16]
        m.set_adapter("other")
        _, d2 = _layer_weight_delta(m)
        assert rel_err(m.weight, base + d2) < TOL[torch.bfloat16]
        m.set_adapter("default")
        assert rel_err(m.weight, base + d1) < TOL[torch.bfloat16]
        m.train()
        assert rel_err(m.weight, base) < 2 * TOL[torch.bfloat16]
