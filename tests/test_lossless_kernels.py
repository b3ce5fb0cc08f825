"""The lossless merge/unmerge/swap kernels (csrc/kernels/lossless.cuh) through the SIMT simulator (lora_ext._sim,
routed by ops.use_kernels), against the CPU reference arithmetic (lora_ext/lossless.py, docs/LOSSLESS.md):
records restore bit for bit on their own backend and across backends, a switch is bit-identical to a fresh
merge, nothing outside the enabled blocks moves, and an exception overflow leaves the weight as it was. Small
shapes: the simulator is slow."""
import pytest
import torch

from helpers import RecordingKernels, load_sim, requires_sim
from lora_ext import lossless, ops

_sim = load_sim()

_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}

# name -> (num_blocks, block_ids, transposed)
LAYOUTS = {
    "plain": (1, [0], False),
    "transposed": (1, [0], True),
    "merged": (3, [0, 2], False),
    "merged_t": (3, [0, 2], True),
}


def _bits(t):
    return t.view(_INT[t.dtype])


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _layout(name):
    g, ids, t = LAYOUTS[name]
    return dict(num_blocks=g, block_ids=ids, transposed=t)


def _weight(dtype, layout, nb=23, k=37, specials=True, misaligned=False, seed=0):
    """W0 (a copy of what it started as), W (to merge into) for `layout`: nb features per block, k the other
    side (nb, k odd: not multiples of 4 or 8; rows not a multiple of 64)."""
    g, ids, t = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    shape = (k, g * nb) if t else (g * nb, k)
    w = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
    if specials:
        flat = w.view(-1)
        tiny = {torch.float16: 3e-7, torch.bfloat16: 1e-39, torch.float32: 1e-40}[dtype]
        sp = max(1, flat.numel() // 1000)  # each special is an exception: stay under the limit (1024)
        flat[::7 * sp] = 0.0
        flat[3::11 * sp] = -0.0
        flat[5::13 * sp] = tiny  # subnormals
        flat[6::17 * sp] = -tiny
        flat[1] = float("nan")
        flat[2] = float("inf")
        flat[4] = float("-inf")
    if misaligned:  # a row-slice of a wider tensor: row stride k+1, no 16-byte accesses
        big = torch.zeros(shape[0], shape[1] + 1, dtype=dtype)
        big[:, :shape[1]] = w
        w = big[:, :shape[1]]
    return w.clone(), w


def _adapter(dtype, layout, fdtype, nb=23, k=37, r=4, seed=1, mag=0.1):
    g, ids, t = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    n = len(ids)
    a = (torch.randn(n * r, k, generator=gen) * mag).to(fdtype)
    b = (torch.randn(n * nb, r, generator=gen) * mag).to(fdtype)
    return a, b


def _region_mask(w, layout, nb=23):
    g, ids, t = LAYOUTS[layout]
    mask = torch.zeros(w.shape, dtype=torch.bool)
    for e in ids:
        if t:
            mask[:, e * nb:(e + 1) * nb] = True
        else:
            mask[e * nb:(e + 1) * nb] = True
    return mask


def _codes(rec, dtype, cols):
    """(n, rows, cols) int64 codes, unpacked."""
    n, rows = rec.codes.shape[:2]
    return torch.stack([lossless._unpack(rec.codes[j], dtype, cols) for j in range(n)]) if n else None


def _cols(w, layout, nb=23):
    return lossless.region(w, *LAYOUTS[layout])[2]


def _sim_merge(w, a, b, s, layout):
    with ops.use_kernels(_sim, "cpu"):
        return ops.merge_(w, a, b, s, lossless=True, **_layout(layout))


def _sim_unmerge(w, a, b, s, rec, layout):
    with ops.use_kernels(_sim, "cpu"):
        ops.unmerge_(w, a, b, s, record=rec, **_layout(layout))


DTYPES = [torch.float16, torch.bfloat16, torch.float32]
_NAMES = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float"}


# (nb, k): odd sizes (no 16-byte accesses; N not a multiple of 4 or 8; rows not a multiple of 64), or sizes
# whose rows and blocks allow 16-byte accesses (two column tiles, two row tiles)
SIZES = {"odd": (23, 37), "aligned": (72, 136)}


@requires_sim
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("same_factors", [False, True], ids=["f32_factors", "w_dtype_factors"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("size", list(SIZES))
def test_merge_unmerge_round_trips_across_backends(dtype, same_factors, layout, size):
    fdtype = dtype if same_factors else torch.float32
    nb, k = SIZES[size]
    misaligned = layout == "merged" and size == "aligned"  # a misaligned row stride: element-wise accesses
    w0, w = _weight(dtype, layout, nb=nb, k=k, misaligned=misaligned)
    a, b = _adapter(dtype, layout, fdtype, nb=nb, k=k)
    s = 0.7
    rec = _sim_merge(w, a, b, s, layout)
    assert _sim.last_variant().startswith(f"lossless<W={_NAMES[dtype]}, factors={_NAMES[fdtype]}")
    vector = size == "aligned" and not misaligned
    assert _sim.last_variant().endswith(f"vector={int(vector)}>")
    mask = _region_mask(w, layout, nb)
    assert torch.equal(_bits(w)[~mask], _bits(w0)[~mask])  # outside the enabled blocks: untouched
    assert not torch.equal(_bits(w)[mask], _bits(w0)[mask])
    assert rec.exceptions <= lossless.exception_limit(rec.codes.shape[0] * rec.codes.shape[1] * _cols(w, layout))
    merged = w.clone()

    # the simulator's record restores on the simulator ...
    _sim_unmerge(w, a, b, s, rec, layout)
    assert _same(w, w0)
    # ... and on the CPU reference (another fp32 sum)
    w_cpu = merged.clone()
    ops.unmerge_(w_cpu, a, b, s, record=rec, **_layout(layout))
    assert _same(w_cpu, w0)

    # the reference's record restores on the simulator
    w_ref = w0.clone()
    rec_ref = ops.merge_(w_ref, a, b, s, lossless=True, **_layout(layout))
    _sim_unmerge(w_ref, a, b, s, rec_ref, layout)
    assert _same(w_ref, w0)

    # the codes of elements neither backend escaped are the same (o(W) mod M)
    m = lossless.modulus(dtype)
    cols = _cols(w, layout)
    c_sim, c_ref = _codes(rec, dtype, cols), _codes(rec_ref, dtype, cols)
    kept = (c_sim != m) & (c_ref != m)
    assert kept.float().mean() > 0.4
    assert torch.equal(c_sim[kept], c_ref[kept])
    # the padding codes are 0
    width = rec.codes.shape[2]
    if dtype == torch.float32 and width > cols:
        assert not rec.codes[..., cols:].any()


@requires_sim
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["plain", "merged_t"])
def test_swap_is_a_fresh_merge(dtype, layout):
    w0, w = _weight(dtype, layout)
    a1, b1 = _adapter(dtype, layout, torch.float32, seed=1)
    a2, b2 = _adapter(dtype, layout, torch.float32, seed=2, r=6)
    with ops.use_kernels(_sim, "cpu"):
        rec1 = ops.merge_(w, a1, b1, 0.5, lossless=True, **_layout(layout))
        rec2 = ops.swap_(w, a1, b1, 0.5, a2, b2, -1.25, record=rec1, **_layout(layout))
        fresh = w0.clone()
        rec_f = ops.merge_(fresh, a2, b2, -1.25, lossless=True, **_layout(layout))
    assert _same(w, fresh)
    assert torch.equal(rec2.codes, rec_f.codes)
    assert torch.equal(rec2.exc_index, rec_f.exc_index) and torch.equal(rec2.exc_bits, rec_f.exc_bits)
    mask = _region_mask(w, layout)
    assert torch.equal(_bits(w)[~mask], _bits(w0)[~mask])
    _sim_unmerge(w, a2, b2, -1.25, rec2, layout)
    assert _same(w, w0)


@requires_sim
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_swap_with_same_dtype_factors_across_backends(dtype):
    layout = "merged"
    w0, w = _weight(dtype, layout)
    a1, b1 = _adapter(dtype, layout, dtype, seed=3)
    a2, b2 = _adapter(dtype, layout, dtype, seed=4)
    rec1 = ops.merge_(w, a1, b1, 2.0, lossless=True, **_layout(layout))  # the CPU reference's record
    with ops.use_kernels(_sim, "cpu"):
        rec2 = ops.swap_(w, a1, b1, 2.0, a2, b2, 0.3, record=rec1, **_layout(layout))
    w_cpu = w.clone()
    ops.unmerge_(w_cpu, a2, b2, 0.3, record=rec2, **_layout(layout))
    assert _same(w_cpu, w0)


@requires_sim
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_overflow_is_refused_and_leaves_the_weight(dtype):
    layout = "plain"
    w = torch.zeros(40, 37, dtype=dtype)  # every element an exception: 1480 > 1024
    a, b = _adapter(dtype, layout, torch.float32, nb=40)
    with pytest.raises(lossless.ExceptionOverflow):
        _sim_merge(w, a, b, 1.0, layout)
    assert _same(w, torch.zeros(40, 37, dtype=dtype))


@requires_sim
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_swap_overflow_puts_the_old_merge_back(dtype):
    layout = "plain"
    w0, w = _weight(dtype, layout, nb=40, specials=False)
    a1, b1 = _adapter(dtype, layout, torch.float32, nb=40, seed=5)
    a2, b2 = _adapter(dtype, layout, torch.float32, nb=40, seed=6, mag=1.0)
    rec1 = _sim_merge(w, a1, b1, 0.5, layout)
    merged = w.clone()
    with ops.use_kernels(_sim, "cpu"), pytest.raises(lossless.ExceptionOverflow) as err:
        ops.swap_(w, a1, b1, 0.5, a2, b2, 300.0, record=rec1, **_layout(layout))
    assert _same(w, merged)
    assert torch.equal(err.value.record.codes, rec1.codes)
    _sim_unmerge(w, a1, b1, 0.5, err.value.record, layout)
    assert _same(w, w0)


def _with_zeros(dtype, rows, cols, zeros, seed=0):
    """A weight of small random values with `zeros` exact zeros (each an exception under a nonzero update)."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=gen) * 0.05 + 0.2).to(dtype)
    w.view(-1)[torch.randperm(rows * cols, generator=gen)[:zeros]] = 0.0
    return w


@requires_sim
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_more_exceptions_than_the_first_room_are_rerun_exactly(dtype):
    """A kernel pass first gets room for lossless.first_capacity exceptions (1024 here), not the limit (1480):
    a merge or swap that needs more (1200 zeros under a nonzero update) is undone and run again with the room it
    counted. The result is bit for bit the reference's (the CPU backend) and a fresh merge's, and unmerges to W."""
    rows, cols, zeros = 40, 148, 1200
    elements = rows * cols
    assert lossless.first_capacity(elements, lossless.exception_limit(elements)) == 1024 < zeros
    assert zeros <= lossless.exception_limit(elements) == 1480
    w0 = _with_zeros(dtype, rows, cols, zeros)
    a1, b1 = _adapter(dtype, "plain", torch.float32, nb=rows, k=cols, seed=7)
    a2, b2 = _adapter(dtype, "plain", torch.float32, nb=rows, k=cols, seed=8, r=6)
    w, w_ref = w0.clone(), w0.clone()
    seen = RecordingKernels()  # lora_ext._sim, counting the passes
    with ops.use_kernels(seen, "cpu"):
        rec = ops.merge_(w, a1, b1, 0.5, lossless=True)
    assert seen.calls == ["merge_lossless_", "unmerge_lossless_", "merge_lossless_"]  # out of room: undone, rerun
    rec_ref = ops.merge_(w_ref, a1, b1, 0.5, lossless=True)
    assert rec.exceptions >= zeros and rec.exceptions == rec_ref.exceptions
    assert _same(w, w_ref)
    assert torch.equal(rec.exc_index, rec_ref.exc_index) and torch.equal(rec.exc_bits, rec_ref.exc_bits)
    with ops.use_kernels(_sim, "cpu"):  # the same past the room in a swap (from a record with room to spare)
        small = ops.merge_(w0.clone(), a2, b2, 1e-3, lossless=True)
        w_s = w0.clone()
        rec_s = ops.merge_(w_s, a2, b2, 1e-3, lossless=True)
        assert torch.equal(rec_s.exc_index, small.exc_index)
        rec2 = ops.swap_(w, a1, b1, 0.5, a2, b2, -1.25, record=rec)
        fresh = w0.clone()
        rec_f = ops.merge_(fresh, a2, b2, -1.25, lossless=True)
    assert rec2.exceptions > 1024 and _same(w, fresh)
    assert torch.equal(rec2.codes, rec_f.codes) and torch.equal(rec2.exc_index, rec_f.exc_index)
    _sim_unmerge(w, a2, b2, -1.25, rec2, "plain")
    assert _same(w, w0)


@requires_sim
def test_a_merge_allocates_the_codes_and_a_small_exception_list():
    """What a kernel merge allocates (the peak memory the GPU benchmark saw: 65 MiB for a 4096 x 4096 bfloat16
    weight, 50 of them an exception list at the limit): the codes (1/8 of the weight) and room for 1/256 of the
    elements, 12 bytes each, besides what is the size of the factors or of the list written."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.zeros, torch.ops.aten.empty_like,
                                       torch.ops.aten.zeros_like, torch.ops.aten.clone, torch.ops.aten._to_copy):
                self.nbytes += out.numel() * out.element_size()
            return out

    rows, cols = 512, 1024  # 1/2 Mi elements: codes 128 KiB, room for 2048 exceptions (24 KiB)
    w = (torch.randn(rows, cols) * 0.05).to(torch.bfloat16)
    a, b = torch.randn(4, cols) * 0.01, torch.randn(rows, 4) * 0.01
    with Allocations() as seen:
        rec = _sim_merge(w, a, b, 1.0, "plain")
    codes = rows * cols // 4
    assert rec.codes.numel() == codes
    # besides: the norms (float64 copies of the factors, the row and column norms) and the sorted list
    others = 16 * (a.numel() + b.numel()) + 32 * (rows + cols) + 3 * 12 * rec.exceptions + 8
    assert codes < seen.nbytes <= codes + 12 * 2048 + others, seen.nbytes


@requires_sim
def test_direct_calls_count_past_capacity_and_keep_the_base():
    """The kernel's contract: every exception counted, those past the capacity not written (base kept)."""
    w = torch.zeros(8, 13, dtype=torch.float16)
    g = torch.Generator().manual_seed(0)  # (unseeded, an element was now and then no exception: 103 of 104 counted)
    a = torch.randn(2, 13, generator=g)
    b = torch.randn(8, 2, generator=g)
    ln, rn = lossless.norms(a, b, 1, False)
    codes = lossless.empty_codes(w, 1, 8, 13)
    idx = torch.empty(5, dtype=torch.int64)
    bits = torch.empty(5, dtype=torch.int32)
    counter = torch.zeros(1, dtype=torch.int64)
    _sim.merge_lossless_(w, a, b, 1.0, 1, [0], False, ln, rn, lossless.gamma(2), codes, idx, bits, counter)
    assert counter.item() == 8 * 13
    changed = (w != 0).view(-1).nonzero().squeeze(1)
    assert sorted(changed.tolist()) == sorted(idx.tolist())  # the 5 listed elements were merged, no other
    assert torch.equal(bits, torch.zeros(5, dtype=torch.int32))
    assert (lossless._unpack(codes[0], torch.float16, 13) == 3).all()


@requires_sim
def test_argument_checks_name_the_argument():
    w = torch.zeros(8, 13, dtype=torch.float16)
    a, b = torch.randn(2, 13), torch.randn(8, 2)
    ln, rn = lossless.norms(a, b, 1, False)
    codes = lossless.empty_codes(w, 1, 8, 13)
    idx, bits = torch.empty(4, dtype=torch.int64), torch.empty(4, dtype=torch.int32)
    counter = torch.zeros(1, dtype=torch.int64)
    good = dict(lnorm=ln, rnorm=rn, codes=codes, exc_index=idx, exc_bits=bits, counter=counter)

    def call(**kw):
        g = {**good, **kw}
        _sim.merge_lossless_(w, a, b, 1.0, 1, [0], False, g["lnorm"], g["rnorm"], 1e-6, g["codes"], g["exc_index"],
                             g["exc_bits"], g["counter"])

    for name, bad in [("codes", codes.to(torch.int16)), ("codes", codes[:, :, :-1]), ("lnorm", ln.double()),
                      ("rnorm", rn[:, :-1]), ("exc_bits", bits[:3]), ("exc_index", idx.int()),
                      ("counter", torch.zeros(2, dtype=torch.int64))]:
        with pytest.raises(ValueError, match=name):
            call(**{name: bad})
    with pytest.raises(ValueError, match="old_codes"):
        _sim.swap_lossless_(w, a, b, 1.0, codes[:, :4], idx, bits, a, b, 1.0, 1, [0], False, ln, rn, 1e-6, codes,
                            idx, bits, counter)
    with pytest.raises(ValueError, match="scale"):
        _sim.unmerge_lossless_(w, a, b, float("inf"), 1, [0], False, codes, idx, bits)
    assert torch.equal(w, torch.zeros(8, 13, dtype=torch.float16))
