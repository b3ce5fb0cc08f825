"""The batched (multi-adapter, "gather") forward kernels, batched_linear_ and batched_embedding_
(csrc/kernels/batched.cuh): through the SIMT simulator (lora_ext._sim) directly, and on a GPU through the `cuda`
fixture (the tests marked `gpu`; `--sim-as-cuda` rehearses them on the CPU with small sizes), against float64
references computed here from the inputs.

Adapters sit in S slots of a common rank R (a_slots (S, k, R) holds A^T, b_slots (S, R, d) holds B^T, lower ranks
zero-padded); index gives the slot of each group of tokens_per_index rows, -1 for none. Rows of slot -1 must be
left bit for bit: they are filled with values of their own ("poison": a finite value any write would change, since
NaN + anything is NaN again) and compared by their bits. Inputs are fresh random draws (conftest.py seeds per test).
"""
import subprocess
import sys

import pytest
import torch

from helpers import KERNEL_DTYPES, TOL, load_sim, rel_err, requires_sim

_sim = load_sim()

SEGMENT_MIN_TOKENS = 8  # kernels/batched.cuh kSegmentMinTokens: from here on the segment variant
_NAMES = {torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16"}
_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits(t):
    return t.view(_INT[t.dtype])


def _variant(dtype, tokens_per_index, vector):
    segment = int(tokens_per_index >= SEGMENT_MIN_TOKENS)
    return f"batched<{_NAMES[dtype]}, segment={segment}, vector={int(vector)}>"


def _slots(S, rows, d, R, dtype, device, pad_ranks=True):
    """a_slots (S, rows, R), b_slots (S, R, d), scales (S,): slot s has a rank in [1, R], zero-padded to R."""
    a = torch.randn(S, rows, R, device=device)
    b = torch.randn(S, R, d, device=device)
    if pad_ranks:
        for s, r in enumerate(torch.randint(1, R + 1, (S,)).tolist()):
            a[s, :, r:] = 0
            b[s, r:, :] = 0
    scales = torch.rand(S, device=device) + 0.25
    return a.to(dtype), b.to(dtype), scales


def _index(groups, S, device, none_fraction=0.25):
    """int32 slots of `groups` groups: about none_fraction of them -1, the others drawn over all S slots."""
    index = torch.randint(0, S, (groups,), dtype=torch.int32)
    index[torch.rand(groups) < none_fraction] = -1
    return index.to(device)


def _out(M, d, dtype, device):
    return torch.randn(M, d, device=device).to(dtype)


def _slot_of_rows(index, tokens_per_index):
    return index.cpu().long().repeat_interleave(tokens_per_index)


def _reference(out, t_of, b_slots, scales, index, tokens_per_index):
    """float64 out + scales[i] * t_i B_i^T over the rows of each slot i (t_of(rows, i): their (n, R) t in float64)."""
    ref = out.detach().cpu().double().clone()
    slot = _slot_of_rows(index, tokens_per_index)
    for i in slot.unique().tolist():
        if i < 0:
            continue
        rows = (slot == i).nonzero().squeeze(1)
        t = t_of(rows, i)
        ref[rows] += scales[i].double().cpu() * (t @ b_slots[i].double().cpu())
    return ref


def _linear_ref(out, x, a_slots, b_slots, scales, index, tokens_per_index):
    xd, ad = x.cpu().double(), a_slots.cpu().double()
    return _reference(out, lambda rows, i: xd[rows] @ ad[i], b_slots, scales, index, tokens_per_index)


def _embedding_ref(out, ids, a_slots, b_slots, scales, index, tokens_per_index):
    idc, ad = ids.cpu(), a_slots.cpu().double()
    return _reference(out, lambda rows, i: ad[i][idc[rows]], b_slots, scales, index, tokens_per_index)


def _check(out, out0, ref, index, tokens_per_index, dtype, tol_factor=1.0):
    """out against ref on the rows with a slot (relative error), and the rows of slot -1 bit for bit."""
    none = _slot_of_rows(index, tokens_per_index) < 0
    out_c, out0_c = out.cpu(), out0.cpu()
    assert torch.equal(_bits(out_c[none]), _bits(out0_c[none])), "a row of slot -1 was written"
    if (~none).any():
        err = rel_err(out_c[~none], ref[~none])
        assert err < TOL[dtype] * tol_factor, f"relative error {err:.3g} ({dtype})"


def _linear_case(kernels, device, dtype, M, k, d, R, S, tokens_per_index, none_fraction=0.25):
    x = torch.randn(M, k, device=device).to(dtype)
    a, b, scales = _slots(S, k, d, R, dtype, device)
    index = _index(M // tokens_per_index, S, device, none_fraction)
    out = _out(M, d, dtype, device)
    out0 = out.clone()
    ref = _linear_ref(out0, x, a, b, scales, index, tokens_per_index)
    kernels.batched_linear_(out, x, a, b, scales, index, tokens_per_index)
    return out, out0, ref, index


def _embedding_case(kernels, device, dtype, M, num, d, R, S, tokens_per_index, none_fraction=0.25):
    ids = torch.randint(0, num, (M,), device=device)
    a, b, scales = _slots(S, num, d, R, dtype, device)
    index = _index(M // tokens_per_index, S, device, none_fraction)
    out = _out(M, d, dtype, device)
    out0 = out.clone()
    ref = _embedding_ref(out0, ids, a, b, scales, index, tokens_per_index)
    kernels.batched_embedding_(out, ids, a, b, scales, index, tokens_per_index)
    return out, out0, ref, index


# (k, d, R): odd sizes (element-wise accesses, R a multiple of nothing), 16-byte-aligned rows, and a rank over the
# expand's 64-rank chunk and the segment shrink's 32-rank tile
SHAPES = {"odd": (67, 130, 5), "aligned": (64, 128, 16), "wide_rank": (40, 72, 80)}
# tokens_per_index -> groups: decode (1, 3), segment (8; 40: a 32-row tile and an 8-row one per group)
TOKENS = {1: 24, 3: 8, 8: 5, 40: 3}


def _vector(dtype, *sizes):
    vec = 16 // torch.tensor([], dtype=dtype).element_size()
    return all(s % vec == 0 for s in sizes)


@requires_sim
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("tokens_per_index", list(TOKENS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_batched_linear(dtype, tokens_per_index, shape):
    k, d, R = SHAPES[shape]
    M = tokens_per_index * TOKENS[tokens_per_index]
    out, out0, ref, index = _linear_case(_sim, "cpu", dtype, M, k, d, R, 33, tokens_per_index)
    assert _sim.last_variant() == _variant(dtype, tokens_per_index, _vector(dtype, k, d))
    _check(out, out0, ref, index, tokens_per_index, dtype)


@requires_sim
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("tokens_per_index", [1, 4, 16])
@pytest.mark.parametrize("d,R", [(130, 5), (128, 16), (72, 80)])
def test_batched_embedding(dtype, tokens_per_index, d, R):
    M = tokens_per_index * (12 if tokens_per_index < 16 else 3)
    out, out0, ref, index = _embedding_case(_sim, "cpu", dtype, M, 37, d, R, 33, tokens_per_index)
    assert _sim.last_variant() == _variant(dtype, tokens_per_index, _vector(dtype, d))
    _check(out, out0, ref, index, tokens_per_index, dtype)


@requires_sim
@pytest.mark.parametrize("tokens_per_index", [1, 8])
def test_batched_embedding_int32_ids(tokens_per_index):
    M, num = 2 * tokens_per_index, 9
    ids = torch.randint(0, num, (M,), dtype=torch.int32)
    a, b, scales = _slots(3, num, 24, 4, torch.bfloat16, "cpu")
    index = torch.tensor([2, 0], dtype=torch.int32)
    out = _out(M, 24, torch.bfloat16, "cpu")
    out0 = out.clone()
    _sim.batched_embedding_(out, ids, a, b, scales, index, tokens_per_index)
    _check(out, out0, _embedding_ref(out0, ids.long(), a, b, scales, index, tokens_per_index), index,
           tokens_per_index, torch.bfloat16)


@requires_sim
@pytest.mark.parametrize("R", [1, 33, 256])
@pytest.mark.parametrize("tokens_per_index", [1, 8])
def test_batched_linear_ranks(R, tokens_per_index):
    M = 16
    out, out0, ref, index = _linear_case(_sim, "cpu", torch.float32, M, 48, 40, R, 3, tokens_per_index)
    _check(out, out0, ref, index, tokens_per_index, torch.float32)


@requires_sim
@pytest.mark.parametrize("tokens_per_index", [2, 8])
@pytest.mark.parametrize("seed", [1, 2])
def test_batched_shuffled_schedule(tokens_per_index, seed):
    _sim.set_schedule(seed)
    out, out0, ref, index = _linear_case(_sim, "cpu", torch.bfloat16, 16, 72, 136, 40, 5, tokens_per_index)
    _check(out, out0, ref, index, tokens_per_index, torch.bfloat16)
    out, out0, ref, index = _embedding_case(_sim, "cpu", torch.float16, 16, 9, 136, 40, 5, tokens_per_index)
    _check(out, out0, ref, index, tokens_per_index, torch.float16)


@requires_sim
@pytest.mark.parametrize("tokens_per_index", [1, 8])
def test_batched_every_row_without_adapter_is_untouched(tokens_per_index):
    out, out0, ref, index = _linear_case(_sim, "cpu", torch.float16, 16, 32, 64, 8, 4, tokens_per_index,
                                         none_fraction=1.0)
    assert (index == -1).all() and torch.equal(_bits(out), _bits(out0))
    out, out0, ref, index = _embedding_case(_sim, "cpu", torch.float16, 16, 5, 64, 8, 4, tokens_per_index,
                                            none_fraction=1.0)
    assert torch.equal(_bits(out), _bits(out0))


@requires_sim
def test_batched_every_slot_in_one_call():
    """All of S = 33 slots used, each by a run of rows, and scales read per slot."""
    S, tpi = 33, 2
    x = torch.randn(S * tpi, 24)
    a, b, scales = _slots(S, 24, 40, 6, torch.float32, "cpu")
    index = torch.randperm(S).to(torch.int32)
    out = _out(S * tpi, 40, torch.float32, "cpu")
    out0 = out.clone()
    _sim.batched_linear_(out, x, a, b, scales, index, tpi)
    _check(out, out0, _linear_ref(out0, x, a, b, scales, index, tpi), index, tpi, torch.float32)


@requires_sim
def test_batched_empty_calls_launch_nothing():
    a, b, scales = _slots(2, 8, 16, 4, torch.float32, "cpu")
    _sim.batched_linear_(torch.empty(0, 16), torch.empty(0, 8), a, b, scales, torch.empty(0, dtype=torch.int32), 4)
    assert _sim.last_variant() == ""
    a0, b0, _ = _slots(2, 8, 0, 4, torch.float32, "cpu")
    _sim.batched_linear_(torch.empty(3, 0), torch.randn(3, 8), a0, b0, scales, torch.zeros(3, dtype=torch.int32), 1)
    assert _sim.last_variant() == ""
    _sim.batched_embedding_(torch.empty(0, 16), torch.empty(0, dtype=torch.long), a, b, scales,
                            torch.empty(0, dtype=torch.int32), 1)
    assert _sim.last_variant() == ""


@requires_sim
@pytest.mark.parametrize("tokens_per_index", [1, 8])
def test_batched_linear_with_no_features_adds_nothing(tokens_per_index):
    a, b, scales = _slots(2, 0, 16, 4, torch.float32, "cpu")
    out = _out(8, 16, torch.float32, "cpu")
    out0 = out.clone()
    _sim.batched_linear_(out, torch.empty(8, 0), a, b, scales, torch.zeros(8 // tokens_per_index, dtype=torch.int32),
                         tokens_per_index)
    assert torch.equal(out, out0)


# ---------------------------------------------------------------------------------------------------
# device-side checks: a slot outside [-1, S), an id outside [0, num_embeddings) (the simulator raises them)


@requires_sim
@pytest.mark.parametrize("tokens_per_index", [1, 8])
@pytest.mark.parametrize("bad", [4, -2])
def test_batched_slot_out_of_range_fails_the_kernel(tokens_per_index, bad):
    a, b, scales = _slots(4, 12, 16, 3, torch.float32, "cpu")
    index = torch.tensor([0, bad], dtype=torch.int32)
    M = 2 * tokens_per_index
    with pytest.raises(RuntimeError, match=rf"adapter slot out of range: index\[1\] = {bad}, not in \[-1, S=4\)"):
        _sim.batched_linear_(_out(M, 16, torch.float32, "cpu"), torch.randn(M, 12), a, b, scales, index,
                             tokens_per_index)
    with pytest.raises(RuntimeError, match=rf"adapter slot out of range: index\[1\] = {bad}, not in \[-1, S=4\)"):
        _sim.batched_embedding_(_out(M, 16, torch.float32, "cpu"), torch.zeros(M, dtype=torch.long), a, b, scales,
                                index, tokens_per_index)


@requires_sim
@pytest.mark.parametrize("tokens_per_index", [1, 8])
@pytest.mark.parametrize("bad", [12, -1])
def test_batched_embedding_id_out_of_range_fails_the_kernel(tokens_per_index, bad):
    a, b, scales = _slots(3, 12, 16, 4, torch.float32, "cpu")
    M = 2 * tokens_per_index
    ids = torch.randint(0, 12, (M,))
    ids[M - 1] = bad
    index = torch.tensor([2, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=rf"embedding id out of range: ids\[{M - 1}\] = {bad}, "
                                           r"not in \[0, num_embeddings=12\)"):
        _sim.batched_embedding_(_out(M, 16, torch.float32, "cpu"), ids, a, b, scales, index, tokens_per_index)
    # a row of slot -1 reads no id: its id is not checked
    out = _out(M, 16, torch.float32, "cpu")
    out0 = out.clone()
    index[1] = -1
    _sim.batched_embedding_(out, ids, a, b, scales, index, tokens_per_index)
    _check(out, out0, _embedding_ref(out0, ids.clamp(0, 11), a, b, scales, index, tokens_per_index), index,
           tokens_per_index, torch.float32)


# ---------------------------------------------------------------------------------------------------
# host refusals (shared with the CUDA launcher), with messages naming the argument


def _linear_args(**over):
    args = dict(out=torch.randn(8, 20), x=torch.randn(8, 12), a_slots=torch.randn(3, 12, 4),
                b_slots=torch.randn(3, 4, 20), scales=torch.rand(3), index=torch.zeros(4, dtype=torch.int32),
                tokens_per_index=2)
    args.update(over)
    return args


def _embedding_args(**over):
    args = dict(out=torch.randn(8, 20), ids=torch.zeros(8, dtype=torch.long), a_slots=torch.randn(3, 10, 4),
                b_slots=torch.randn(3, 4, 20), scales=torch.rand(3), index=torch.zeros(4, dtype=torch.int32),
                tokens_per_index=2)
    args.update(over)
    return args


# The refusals both ops share. Each case is a function of n, a_slots' second size (k = 12 for batched_linear_,
# num_embeddings = 10 for batched_embedding_), giving the arguments to replace and the message expected.
_META = "meta"
SHARED_BAD_ARGS = {
    "out on another device": lambda n: (dict(out=torch.empty(8, 20, device=_META)), "out must be a CPU tensor"),
    "a_slots on another device": lambda n: (dict(a_slots=torch.empty(3, n, 4, device=_META)),
                                            "a_slots must be on out's device"),
    "b_slots on another device": lambda n: (dict(b_slots=torch.empty(3, 4, 20, device=_META)),
                                            "b_slots must be on out's device"),
    "scales on another device": lambda n: (dict(scales=torch.empty(3, device=_META)), "scales must be on out's"),
    "index on another device": lambda n: (dict(index=torch.empty(4, dtype=torch.int32, device=_META)),
                                          "index must be on out's device"),
    "out integer": lambda n: (dict(out=torch.ones(8, 20, dtype=torch.int32)),
                              "out must be float32, float16 or bfloat16"),
    "out float64": lambda n: (dict(out=torch.randn(8, 20, dtype=torch.float64)),
                              "out must be float32, float16 or bfloat16"),
    "a_slots dtype": lambda n: (dict(a_slots=torch.randn(3, n, 4).half()), "a_slots must have out's dtype"),
    "b_slots dtype": lambda n: (dict(b_slots=torch.randn(3, 4, 20).half()), "b_slots must have out's dtype"),
    "scales float16": lambda n: (dict(scales=torch.rand(3).half()), "scales must be float32"),
    "scales float64": lambda n: (dict(scales=torch.rand(3).double()), "scales must be float32"),
    "index int64": lambda n: (dict(index=torch.zeros(4, dtype=torch.long)), "index must be int32"),
    "out 1-D": lambda n: (dict(out=torch.randn(160)), "out must be 2-D"),
    "a_slots 2-D": lambda n: (dict(a_slots=torch.randn(n, 4)), "a_slots must be 3-D"),
    "b_slots 2-D": lambda n: (dict(b_slots=torch.randn(4, 20)), "b_slots must be 3-D"),
    "scales 2-D": lambda n: (dict(scales=torch.rand(3, 1)), "scales must be 1-D"),
    "index 2-D": lambda n: (dict(index=torch.zeros(4, 1, dtype=torch.int32)), "index must be 1-D"),
    "out not contiguous": lambda n: (dict(out=torch.randn(20, 8).t()), "out must be contiguous"),
    "a_slots not contiguous": lambda n: (dict(a_slots=torch.randn(3, 4, n).transpose(1, 2)),
                                         "a_slots must be contiguous"),
    "b_slots not contiguous": lambda n: (dict(b_slots=torch.randn(3, 20, 4).transpose(1, 2)),
                                         "b_slots must be contiguous"),
    "scales not contiguous": lambda n: (dict(scales=torch.rand(6)[::2]), "scales must be contiguous"),
    "index not contiguous": lambda n: (dict(index=torch.zeros(8, dtype=torch.int32)[::2]),
                                       "index must be contiguous"),
    "no slots": lambda n: (dict(a_slots=torch.randn(0, n, 4), b_slots=torch.randn(0, 4, 20), scales=torch.rand(0)),
                           "a_slots must hold at least one slot"),
    "rank 0": lambda n: (dict(a_slots=torch.randn(3, n, 0), b_slots=torch.randn(3, 0, 20)),
                         r"rank \(its last dimension\) must be in \[1, 256\]"),
    "rank over 256": lambda n: (dict(a_slots=torch.randn(3, n, 257), b_slots=torch.randn(3, 257, 20)),
                                r"rank \(its last dimension\) must be in \[1, 256\]"),
    "b_slots slots": lambda n: (dict(b_slots=torch.randn(2, 4, 20)),
                                r"b_slots must have shape \(S, R, d\) = \(3, 4, 20\)"),
    "b_slots rank": lambda n: (dict(b_slots=torch.randn(3, 5, 20)),
                               r"b_slots must have shape \(S, R, d\) = \(3, 4, 20\)"),
    "b_slots features": lambda n: (dict(b_slots=torch.randn(3, 4, 21)),
                                   r"b_slots must have shape \(S, R, d\) = \(3, 4, 20\)"),
    "scales length": lambda n: (dict(scales=torch.rand(4)), r"scales must have one value per slot \(3\)"),
    "tokens_per_index zero": lambda n: (dict(tokens_per_index=0), "tokens_per_index must be >= 1"),
    "tokens_per_index negative": lambda n: (dict(tokens_per_index=-2), "tokens_per_index must be >= 1"),
    "tokens_per_index divides": lambda n: (dict(tokens_per_index=3),
                                           r"tokens_per_index \(3\) must divide out's rows \(8\)"),
    "index length": lambda n: (dict(index=torch.zeros(5, dtype=torch.int32)),
                               "index must have M / tokens_per_index = 4 entries"),
}

LINEAR_BAD_ARGS = {
    "x on another device": (dict(x=torch.empty(8, 12, device=_META)), "x must be on out's device"),
    "x dtype": (dict(x=torch.randn(8, 12).half()), "x must have out's dtype"),
    "x 3-D": (dict(x=torch.randn(8, 12, 1)), "x must be 2-D"),
    "x not contiguous": (dict(x=torch.randn(12, 8).t()), "x must be contiguous"),
    "x rows": (dict(x=torch.randn(6, 12)), "x must have out's 8 rows"),
    "x features": (dict(x=torch.randn(8, 13)), "x must have a_slots' k = 12 features"),
}

EMBEDDING_BAD_ARGS = {
    "ids on another device": (dict(ids=torch.zeros(8, dtype=torch.long, device=_META)), "ids must be on out's"),
    "ids int16": (dict(ids=torch.zeros(8, dtype=torch.int16)), "ids must be int64 or int32"),
    "ids float": (dict(ids=torch.zeros(8)), "ids must be int64 or int32"),
    "ids 2-D": (dict(ids=torch.zeros(4, 2, dtype=torch.long)), "ids must be 1-D"),
    "ids not contiguous": (dict(ids=torch.zeros(16, dtype=torch.long)[::2]), "ids must be contiguous"),
    "ids length": (dict(ids=torch.zeros(7, dtype=torch.long)), r"ids must have one id per row of out \(8\)"),
    "no embeddings": (dict(a_slots=torch.randn(3, 0, 4)), "a_slots must have at least one embedding row"),
}


@requires_sim
@pytest.mark.parametrize("case", list(SHARED_BAD_ARGS) + list(LINEAR_BAD_ARGS))
def test_batched_linear_argument_errors(case):
    over, message = SHARED_BAD_ARGS[case](12) if case in SHARED_BAD_ARGS else LINEAR_BAD_ARGS[case]
    with pytest.raises(ValueError, match=message):
        _sim.batched_linear_(**_linear_args(**over))
    assert _sim.last_variant() == ""


@requires_sim
@pytest.mark.parametrize("case", list(SHARED_BAD_ARGS) + list(EMBEDDING_BAD_ARGS))
def test_batched_embedding_argument_errors(case):
    over, message = SHARED_BAD_ARGS[case](10) if case in SHARED_BAD_ARGS else EMBEDDING_BAD_ARGS[case]
    with pytest.raises(ValueError, match=message):
        _sim.batched_embedding_(**_embedding_args(**over))
    assert _sim.last_variant() == ""


@requires_sim
def test_batched_valid_argument_sets_pass():
    """The defaults the refusal cases start from are accepted (so each refusal is the one named)."""
    _sim.batched_linear_(**_linear_args())
    _sim.batched_embedding_(**_embedding_args())


# ---------------------------------------------------------------------------------------------------
# on CUDA tensors (lora_ext._C; with --sim-as-cuda: CPU tensors through lora_ext._sim, small sizes)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("tokens_per_index", [1, 4, 16, 128])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "odd"])
def test_cuda_batched_linear(cuda, dtype, tokens_per_index, aligned):
    if cuda.rehearsal:
        k, d, R, S, M = *((64, 128, 16) if aligned else (67, 130, 5)), 5, 3 * tokens_per_index
    else:
        k, d, R, S, M = *((4096, 4096, 16) if aligned else (1031, 2050, 13)), 33, max(256, 16 * tokens_per_index)
    out, out0, ref, index = _linear_case(cuda.kernels, cuda.device, dtype, M, k, d, R, S, tokens_per_index)
    cuda.synchronize()
    _check(out, out0, ref, index, tokens_per_index, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("tokens_per_index", [1, 16])
def test_cuda_batched_embedding(cuda, dtype, tokens_per_index):
    num, d, R, S, groups = (50, 72, 8, 4, 3) if cuda.rehearsal else (32000, 4096, 64, 33, 64)
    out, out0, ref, index = _embedding_case(cuda.kernels, cuda.device, dtype, tokens_per_index * groups, num, d, R,
                                            S, tokens_per_index)
    cuda.synchronize()
    _check(out, out0, ref, index, tokens_per_index, dtype)


@pytest.mark.gpu
def test_cuda_batched_refuses_another_device(cuda):
    args = _linear_args(**{name: t.to(cuda.device) for name, t in _linear_args().items() if name != "tokens_per_index"})
    args["x"] = args["x"].to(cuda.other)
    with pytest.raises(ValueError, match="x must be on out's device"):
        cuda.kernels.batched_linear_(**args)


@pytest.mark.gpu
@pytest.mark.hardware("CUDA graph capture and replay")
def test_cuda_graph_replay_reads_new_index_and_scales(cuda):
    """index and scales are read by the kernels: a captured call replays with the values they hold then."""
    dtype, M, k, d, R, S, tpi = torch.bfloat16, 64, 256, 512, 16, 8, 1
    x = torch.randn(M, k, device=cuda.device).to(dtype)
    a, b, scales = _slots(S, k, d, R, dtype, cuda.device)
    index = _index(M, S, cuda.device)
    base = _out(M, d, dtype, cuda.device)
    out = base.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda.kernels.batched_linear_(out, x, a, b, scales, index, tpi)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda.kernels.batched_linear_(out, x, a, b, scales, index, tpi)
    for _ in range(3):
        index.copy_(_index(M, S, cuda.device))
        scales.copy_(torch.rand(S, device=cuda.device))
        out.copy_(base)
        graph.replay()
        cuda.synchronize()
        _check(out, base, _linear_ref(base, x, a, b, scales, index, tpi), index, tpi, dtype)


@pytest.mark.gpu
@pytest.mark.hardware("a device-side assert (the CUDA context is then unusable, hence a subprocess)")
def test_cuda_batched_slot_out_of_range_is_a_device_assert():
    code = ("import torch, lora_ext\n"
            "from lora_ext import _C\n"
            "out, x = torch.randn(4, 32, device='cuda'), torch.randn(4, 16, device='cuda')\n"
            "a, b = torch.randn(2, 16, 4, device='cuda'), torch.randn(2, 4, 32, device='cuda')\n"
            "s, index = torch.rand(2, device='cuda'), torch.tensor([0, 1, 2, -1], device='cuda', dtype=torch.int32)\n"
            "_C.batched_linear_(out, x, a, b, s, index, 1)\n"
            "torch.cuda.synchronize()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "device-side assert" in run.stderr or "Assertion" in run.stderr, run.stderr[-2000:]
