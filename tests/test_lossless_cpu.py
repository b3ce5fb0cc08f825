"""The C++ CPU lossless pass (csrc/cpu/lossless_cpu.cpp via lora_ext.lossless_cpu.run_pass) against the
pure-torch reference lossless._pass: the same weight bits, codes, exception list and refusals.

The module is lora_ext._cpu, which setup.py always builds (beside lora_ext._sim)."""
import math
import zlib

import pytest
import torch

from lora_ext import lossless, lossless_cpu

INF = math.inf
REF = lossless._pass_reference  # the pure-torch pass (lossless._pass dispatches to the C++ one)


@pytest.fixture(scope="module")
def mod():
    from lora_ext import _cpu
    return _cpu


def _bits(t):
    return t.view(torch.uint8) if t.numel() else t


def _same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _assert_same_record(r1, r2):
    assert _same(r1.codes, r2.codes)
    assert _same(r1.exc_index, r2.exc_index)
    assert _same(r1.exc_bits, r2.exc_bits)
    assert (r1.dtype, r1.shape, r1.num_blocks, r1.block_ids, r1.transposed) == \
        (r2.dtype, r2.shape, r2.num_blocks, r2.block_ids, r2.transposed)


def _weight(shape, dtype, special, gen):
    w = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    if special:
        f = w.view(-1)
        tiny = torch.finfo(dtype).tiny
        f[::7] = 0.0
        f[1::11] = -0.0
        f[2::13] = float("nan")
        f[3::17] = float("inf")
        f[4::19] = -float("inf")
        f[5::23] = tiny / 4  # subnormal
        f[6::29] = -tiny / 2
        f[8::31] = torch.finfo(dtype).max
        bits = f.view(torch.int16 if dtype != torch.float32 else torch.int32)
        bits[9::37] = 0x7E01 if dtype == torch.float16 else (0x7FA1 if dtype == torch.bfloat16 else 0x7FA00001)
    return w


def _factors(weight, num_blocks, block_ids, transposed, r, fdt, gen, scale=0.1):
    n = len(block_ids)
    k = weight.shape[0] if transposed else weight.shape[1]
    nb = (weight.shape[1] if transposed else weight.shape[0]) // num_blocks
    a = (torch.randn(n * r, k, generator=gen) * scale).to(fdt)
    b = (torch.randn(n * nb, r, generator=gen) * scale).to(fdt)
    return a, b


LAYOUTS = [  # (shape, num_blocks, block_ids, transposed)
    ((67, 45), 1, [0], False),
    ((45, 67), 1, [0], True),
    ((66, 45), 3, [0, 2], False),
    ((45, 66), 3, [0, 2], True),
]


def _round_trip(mod, W, layout, fdt, special, limit, gen, r=3):
    shape, nbk, bids, tr = layout
    A1, B1 = _factors(W, nbk, bids, tr, r, fdt, gen)
    A2, B2 = _factors(W, nbk, bids, tr, r + 2, fdt, gen)
    w1, w2 = W.clone(), W.clone()
    # merge
    r1 = REF(w1, None, None, (A1, B1, 1.7), nbk, bids, tr, limit, "merge_")
    r2 = lossless_cpu.run_pass(mod, w2, None, None, (A1, B1, 1.7), nbk, bids, tr, limit, "merge_")
    assert _same(w1, w2)
    _assert_same_record(r1, r2)
    # swap
    s1 = REF(w1, (A1, B1, 1.7), r1, (A2, B2, -0.6), nbk, bids, tr, limit, "swap_")
    s2 = lossless_cpu.run_pass(mod, w2, (A1, B1, 1.7), r2, (A2, B2, -0.6), nbk, bids, tr, limit, "swap_")
    assert _same(w1, w2)
    _assert_same_record(s1, s2)
    # unmerge
    assert REF(w1, (A2, B2, -0.6), s1, None, nbk, bids, tr, None, "unmerge_") is None
    assert lossless_cpu.run_pass(mod, w2, (A2, B2, -0.6), s2, None, nbk, bids, tr, None, "unmerge_") is None
    assert _same(w1, w2)
    assert _same(w2, W)
    return r1, s1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("same_factors", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["plain", "transposed", "blocks", "blocks-transposed"])
@pytest.mark.parametrize("special", [False, True], ids=["normal", "special"])
def test_bit_identical(mod, dtype, same_factors, layout, special):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, same_factors, layout, special)).encode()))
    W = _weight(layout[0], dtype, special, gen)
    fdt = dtype if same_factors else torch.float32
    r1, _ = _round_trip(mod, W, layout, fdt, special, INF if special else None, gen)
    if special:
        assert r1.exceptions > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_several_chunks(mod, dtype, transposed):
    # 1031 columns: 254-row chunks, so the 300 (or 520) rows take two or three chunks, each split over threads
    gen = torch.Generator().manual_seed(7)
    shape = (1031, 520) if transposed else (300, 1031)
    W = _weight(shape, dtype, True, gen)
    _round_trip(mod, W, (shape, 1, [0], transposed), torch.float32, True, INF, gen, r=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_updates_and_nonfinite_factors(mod, dtype):
    gen = torch.Generator().manual_seed(3)
    W = _weight((40, 33), dtype, False, gen)
    A, B = _factors(W, 1, [0], False, 4, torch.float32, gen, scale=3.0)  # |s B A| >> |W|
    A[1, 5] = float("inf")
    B[7, 2] = float("nan")
    w1, w2 = W.clone(), W.clone()
    r1 = REF(w1, None, None, (A, B, 2.0), 1, [0], False, INF, "merge_")
    r2 = lossless_cpu.run_pass(mod, w2, None, None, (A, B, 2.0), 1, [0], False, INF, "merge_")
    assert _same(w1, w2)
    _assert_same_record(r1, r2)
    REF(w1, (A, B, 2.0), r1, None, 1, [0], False, None, "unmerge_")
    lossless_cpu.run_pass(mod, w2, (A, B, 2.0), r2, None, 1, [0], False, None, "unmerge_")
    assert _same(w1, w2) and _same(w2, W)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_overflow_refused(mod, dtype, transposed):
    gen = torch.Generator().manual_seed(11)
    shape = (48, 40)
    W = torch.zeros(shape, dtype=dtype)
    A, B = _factors(W, 1, [0], transposed, 4, torch.float32, gen)
    msgs = []
    for impl in ("ref", "cpu"):
        w = W.clone()
        with pytest.raises(lossless.ExceptionOverflow) as err:
            if impl == "ref":
                REF(w, None, None, (A, B, 1.0), 1, [0], transposed, None, "merge_")
            else:
                lossless_cpu.run_pass(mod, w, None, None, (A, B, 1.0), 1, [0], transposed, None, "merge_")
        assert _same(w, W)  # nothing changed (+0 bits included)
        msgs.append(str(err.value))
    assert msgs[0] == msgs[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_overflow_gives_the_base(mod, dtype):
    # a swap to an adapter whose update dwarfs W is refused; the pass leaves the base (lossless.swap_ then merges
    # the old adapter back), as the reference does
    gen = torch.Generator().manual_seed(5)
    shape = (64, 48)
    W = _weight(shape, dtype, False, gen)
    A1, B1 = _factors(W, 1, [0], False, 4, torch.float32, gen, scale=0.05)
    A2, B2 = _factors(W, 1, [0], False, 4, torch.float32, gen, scale=30.0)
    out, msgs = [], []
    for impl in ("ref", "cpu"):
        w = W.clone()
        rec = REF(w, None, None, (A1, B1, 1.0), 1, [0], False, None, "merge_")
        with pytest.raises(lossless.ExceptionOverflow) as err:
            if impl == "ref":
                REF(w, (A1, B1, 1.0), rec, (A2, B2, 1.0), 1, [0], False, None, "swap_")
            else:
                lossless_cpu.run_pass(mod, w, (A1, B1, 1.0), rec, (A2, B2, 1.0), 1, [0], False, None, "swap_")
        out.append(w)
        msgs.append(str(err.value))
    assert _same(out[0], out[1]) and _same(out[1], W)
    assert msgs[0] == msgs[1]


def test_record_from_the_reference_is_read(mod):
    # a record written by one backend is read by the other
    gen = torch.Generator().manual_seed(9)
    W = _weight((50, 70), torch.bfloat16, True, gen)
    A, B = _factors(W, 1, [0], False, 4, torch.float32, gen)
    w = W.clone()
    rec = REF(w, None, None, (A, B, 1.3), 1, [0], False, INF, "merge_")
    lossless_cpu.run_pass(mod, w, (A, B, 1.3), rec, None, 1, [0], False, None, "unmerge_")
    assert _same(w, W)
    rec = lossless_cpu.run_pass(mod, w, None, None, (A, B, 1.3), 1, [0], False, INF, "merge_")
    REF(w, (A, B, 1.3), rec, None, 1, [0], False, None, "unmerge_")
    assert _same(w, W)


def test_fallback_for_what_it_does_not_take(mod):
    # a weight whose columns are not unit-stride goes to the reference, with the same results
    gen = torch.Generator().manual_seed(2)
    W = _weight((40, 30), torch.float32, False, gen)
    A, B = _factors(W, 1, [0], False, 2, torch.float32, gen)
    w1 = W.clone()
    w2 = W.t().contiguous().t()
    assert w2.stride(1) != 1
    r1 = REF(w1, None, None, (A, B, 1.0), 1, [0], False, None, "merge_")
    r2 = lossless_cpu.run_pass(mod, w2, None, None, (A, B, 1.0), 1, [0], False, None, "merge_")
    assert torch.equal(w1.view(torch.int32), w2.contiguous().view(torch.int32))
    _assert_same_record(r1, r2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_the_row_loop_runs_on_torchs_threads_with_the_same_bits(mod, threads, dtype):
    # lora_ext._cpu is built without -fopenmp, where at::parallel_for runs serially: the row loop takes torch's
    # OpenMP team itself (csrc/cpu/team.h), for every dtype. The bits do not depend on how the rows are split.
    gen = torch.Generator().manual_seed(11)
    W = _weight((96, 80), dtype, True, gen)
    A, B = _factors(W, 1, [0], False, 4, torch.float32, gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w_ref, w = W.clone(), W.clone()
        r_ref = REF(w_ref, None, None, (A, B, 1.1), 1, [0], False, INF, "merge_")
        r = lossless_cpu.run_pass(mod, w, None, None, (A, B, 1.1), 1, [0], False, INF, "merge_")
        assert mod.last_parallel_parts() == threads
    finally:
        torch.set_num_threads(before)
    assert _same(w, w_ref)
    _assert_same_record(r, r_ref)
