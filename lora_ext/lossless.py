"""Lossless in-place merges: the record that gives the base weight back bit for bit, and its reference
arithmetic (the CPU backend; the CUDA kernels and the simulator implement the same rules, docs/LOSSLESS.md).

A merge writes W' = round(W + s B A) and, in the same pass, one code per weight element:

- the element's *ordinal* o(W) (its bit pattern read as a monotone integer: non-negative patterns as they are,
  negative ones as pattern ^ 0x7FFF..., so -0 is -1 and +0 is 0) modulo M, M = 3 for float16/bfloat16 weights
  (2-bit codes, four to a byte: 1/8 of the weight) and M = 65535 for float32 (16-bit codes: 1/2 of the weight);
- or the escape code M, when the element goes to the exception list: (canonical index, original bits).

Restoring from c = W' - d (in float64, d the update as the backend computed it) takes y = o(round(c)) and the
one ordinal x with x = code (mod M) in [y - M//2, y + M//2]. The merge pass keeps a code only if that gives W
back for every c within delta of its own, delta = (8r + 8) 2^-24 |s| |B[m]| |A[:, n]| + 2^-50 |c| (a bound on
how far another backend's fp32 update, summed in another order, can be from this one's); otherwise (non-finite
W or W', |s B A| much larger than |W|, zeros under a nonzero update) the element is an exception. So the
restore is exact on every backend, and a restore then a merge of the same adapter on the same backend gives the
very bits a fresh merge gives.

The record covers the enabled blocks only, in the canonical order index = (j * M_rows + m) * N + n: block j
(block_ids order) seen as an M_rows x N matrix (rows of W, or for transposed storage columns of W, as
ops.merge_'s `transposed` says), its rows padded to a multiple of 4 codes.
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import reference
from .readable import readable

try:
    from . import _cpu
except ImportError:
    _cpu = None

LOSSY_DTYPES = (torch.float16, torch.bfloat16)  # lossless by default (their merges round at 8-11 bits)
RECORD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
_MAG = {torch.int16: 0x7FFF, torch.int32: 0x7FFFFFFF}

# Exceptions allowed per merge: 1/4 of the recorded elements (at least 1024); a merge that needs more is
# refused and the weight given back as it was.
EXCEPTION_FRACTION = 4
MIN_EXCEPTIONS = 1024
_STAGING_BYTES = 1 << 20  # fp32 bytes of weight per row chunk


def modulus(dtype: torch.dtype) -> int:
    """M for a weight dtype; the escape code is M."""
    return 65535 if dtype == torch.float32 else 3


def gamma(rank: int) -> float:
    """The relative bound on the difference between two backends' fp32 updates of rank `rank`."""
    return (8 * rank + 8) * 2.0 ** -24


def exception_limit(elements: int) -> int:
    return max(MIN_EXCEPTIONS, elements // EXCEPTION_FRACTION)


# The exception list a kernel pass is first given room for: 1/256 of the elements (12 bytes an entry, 3/64 of a
# byte per element: under half the codes of a 16-bit weight). A list at the limit (1/4) would be 1.5 times a 16-bit
# weight's size, allocated on every merge for what is rare. A pass that needs more (up to the limit) is undone
# exactly and run again with the room it counted (ops._kernel_lossless).
FIRST_CAPACITY_FRACTION = 256


def first_capacity(elements: int, limit: int) -> int:
    return min(limit, max(MIN_EXCEPTIONS, elements // FIRST_CAPACITY_FRACTION))


def default_lossless(dtype: torch.dtype) -> bool:
    return dtype in LOSSY_DTYPES


@dataclass(eq=False)
class MergeRecord:
    """What a lossless merge threw away. codes: (n, M_rows, ceil(N/4)) uint8 for 16-bit weights, or
    (n, M_rows, ceil(N/4)*4) int16 (uint16 bits) for float32; exc_index: int64, sorted; exc_bits: int32 (the
    original bit pattern, zero-extended). dtype, shape and layout are what the record was made for."""
    codes: Tensor
    exc_index: Tensor
    exc_bits: Tensor
    dtype: torch.dtype
    shape: tuple
    num_blocks: int
    block_ids: tuple
    transposed: bool
    # the listed elements' bits as the merge left them (the weight's own integer view: int16 for 16-bit weights),
    # noted by the layer that holds the record (note_merged, read by with_writes); None: not noted
    merged_bits: Optional[Tensor] = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.exc_index, self.exc_bits))

    @property
    def exceptions(self) -> int:
        return self.exc_index.numel()

    def to(self, device) -> "MergeRecord":
        merged = getattr(self, "merged_bits", None)
        return MergeRecord(self.codes.to(device), self.exc_index.to(device), self.exc_bits.to(device), self.dtype,
                           self.shape, self.num_blocks, self.block_ids, self.transposed,
                           None if merged is None else merged.to(device))

    def check_for(self, weight: Tensor, num_blocks: int, block_ids: Sequence[int], transposed: bool,
                  where: str) -> None:
        """Refuses (before anything is written) a record made for another weight or layout."""
        want = (weight.dtype, tuple(weight.shape), num_blocks, tuple(block_ids), bool(transposed))
        got = (self.dtype, self.shape, self.num_blocks, self.block_ids, self.transposed)
        if want != got:
            raise ValueError(f"{where}: the record was made for a {self.dtype} weight of shape {self.shape} "
                             f"(num_blocks={self.num_blocks}, block_ids={list(self.block_ids)}, "
                             f"transposed={self.transposed}), not this {weight.dtype} weight of shape "
                             f"{tuple(weight.shape)} (num_blocks={num_blocks}, block_ids={list(block_ids)}, "
                             f"transposed={transposed})")
        if self.codes.device != weight.device:
            raise ValueError(f"{where}: the record is on {self.codes.device}, the weight on {weight.device}")


class ExceptionOverflow(ValueError):
    pass


def overflow_message(where: str, needed: int, limit: int, elements: int) -> str:
    return (f"{where}: a lossless merge would need {needed} exceptions (elements whose base value the 2-bit code "
            f"cannot give back: |scale * B @ A| far above |W|, zeros under a nonzero update, non-finite values) "
            f"of {elements} elements, over the limit of {limit} (1/{EXCEPTION_FRACTION}); nothing was changed. "
            f"Merge with lossless=False, or serve this adapter unmerged")


# -------------------------------------------------------------------------------------------------------------
# shared by every backend's wrapper


def region(weight: Tensor, num_blocks: int, block_ids: Sequence[int], transposed: bool):
    """(n, M_rows, N, nb) of the recorded region."""
    n = len(block_ids)
    blocked = weight.shape[1] if transposed else weight.shape[0]
    nb = blocked // num_blocks
    k = weight.shape[0] if transposed else weight.shape[1]
    return (n, k, nb, nb) if transposed else (n, nb, k, nb)


def empty_codes(weight: Tensor, n: int, rows: int, cols: int) -> Tensor:
    pad = -(-cols // 4)
    if weight.dtype == torch.float32:
        return torch.zeros(n, rows, pad * 4, dtype=torch.int16, device=weight.device)
    return torch.zeros(n, rows, pad, dtype=torch.uint8, device=weight.device)


def _block_factors(lora_A: Tensor, lora_B: Tensor, n: int):
    """The n blocks' factors in float64: A as (n, r, k), B as (n, nb, r) (sizes spelled out: a zero-size layer's k
    or nb of 0 would leave a -1 undetermined)."""
    a = lora_A.detach().double().reshape(n, lora_A.shape[0] // n, lora_A.shape[1])
    b = lora_B.detach().double().reshape(n, lora_B.shape[0] // n, lora_B.shape[1])
    return a, b


def norms(lora_A: Tensor, lora_B: Tensor, n: int, transposed: bool):
    """(lnorm (n, M_rows), rnorm (n, N)) float32: the 2-norms of the rows of each block's left operand and of the
    columns of its right one (B_j's rows and A_j's columns; transposed, A_j's columns and B_j's rows), rounded
    up, so |sum_i l_i r_i| <= lnorm * rnorm."""
    a, b = _block_factors(lora_A, lora_B, n)
    a_cols = a.norm(dim=1)  # (n, k)
    b_rows = b.norm(dim=2)  # (n, nb)
    up = 1 + 2.0 ** -20
    left, right = (a_cols, b_rows) if transposed else (b_rows, a_cols)
    return (left * up).float(), (right * up).float()


# -------------------------------------------------------------------------------------------------------------
# the reference arithmetic (CPU)


def _ord(bits: Tensor) -> Tensor:
    """Ordinals of signed bit patterns (int16/int32), as int64."""
    return torch.where(bits >= 0, bits, bits ^ _MAG[bits.dtype]).long()


def _bits(ords: Tensor, int_dtype) -> Tensor:
    o = ords.to(int_dtype)
    return torch.where(o >= 0, o, o ^ _MAG[int_dtype])


def _restore(c: Tensor, code: Tensor, dtype, m: int) -> Tensor:
    y = _ord(c.float().to(dtype).view(_INT[dtype]))
    t = torch.remainder(code - y, m)
    return y + torch.where(t > m // 2, t - m, t)


def _pack(code: Tensor, dtype, width: int) -> Tensor:
    rows, cols = code.shape
    if dtype == torch.float32:
        out = torch.zeros(rows, width, dtype=torch.int32)
        out[:, :cols] = code
        return out.to(torch.int16)
    p = torch.zeros(rows, width * 4, dtype=torch.uint8)
    p[:, :cols] = code
    p = p.view(rows, width, 4)
    return p[..., 0] | (p[..., 1] << 2) | (p[..., 2] << 4) | (p[..., 3] << 6)


_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def _unpack(packed: Tensor, dtype, cols: int) -> Tensor:
    if dtype == torch.float32:
        return packed[:, :cols].long() & 0xFFFF
    rows = packed.shape[0]
    return ((packed.unsqueeze(-1) >> _SHIFTS) & 3).view(rows, -1)[:, :cols].long()


class _Pair:
    """One adapter's operands on one block: left (M_rows, r), right (r, N), fp32, the float32 scale."""

    def __init__(self, lora_A, lora_B, scale, n, j, transposed):
        r = lora_A.shape[0] // n
        nb = lora_B.shape[0] // n
        a = lora_A[j * r:(j + 1) * r].float()
        b = lora_B[j * nb:(j + 1) * nb].float()
        self.left, self.right = (a.t(), b.t()) if transposed else (b, a)
        self.scale = torch.tensor(scale, dtype=torch.float32).item()
        self.rank = r

    def update(self, i, h):
        """The fp32 update s * (L @ R) of rows i:i+h."""
        return (self.left[i:i + h] @ self.right).mul_(self.scale)


def _merge_rows(w, d, dtype, m, delta_scale, ln, rn):
    """(W', codes, bad mask) for rows w (the base, in dtype) and their fp32 update d."""
    wp = (w.float() + d).to(dtype)
    c = wp.double() - d.double()
    delta = (ln.double()[:, None] * rn.double()[None, :]).mul_(delta_scale).add_(c.abs() * 2.0 ** -50)
    o = _ord(w.view(_INT[dtype]))
    code = torch.remainder(o, m)
    ok = torch.isfinite(w) & torch.isfinite(c)
    ok &= _restore(c - delta, code, dtype, m) == o
    ok &= _restore(c + delta, code, dtype, m) == o
    return wp, torch.where(ok, code, m), ~ok


def _restore_rows(wp, d, packed, dtype, m, base_index, exc_index, exc_bits):
    """The base rows from merged rows wp, their fp32 update d and their codes (escapes looked up by index;
    an escape not in the list holds its base already). A coded element whose merged value is not finite keeps it:
    no merge codes such an element (it lists it), so the value was written into the merged weight, and it stays,
    as a lossy unmerge keeps it (inf - d = inf). (A finite merged value under a non-finite d is restored as any
    other: that is another backend's merge, whose sum did not overflow where this one's did.) A coded element's base
    is finite (no merge codes another): a restore past the dtype's largest value is of a value written into the
    merged weight there, which is given its lossy unmerge T(c) (L1: a finite write at the top of float16's range came
    back inf or NaN, one code step past it)."""
    cols = wp.shape[1]
    code = _unpack(packed, dtype, cols)
    c = wp.double() - d.double()
    it = _INT[dtype]
    restored = _bits(_restore(c, code, dtype, m), it)
    restored = torch.where(restored.view(dtype).isfinite(), restored, c.float().to(dtype).view(it))
    bits = torch.where(wp.isfinite(), restored, wp.view(it))
    esc = code == m
    if bool(esc.any()):
        flat = esc.reshape(-1).nonzero().squeeze(1)
        idx = base_index + flat
        pos = torch.searchsorted(exc_index, idx).clamp_(max=max(exc_index.numel() - 1, 0))
        found = exc_index.numel() > 0 and (exc_index[pos] == idx)
        orig = wp.view(it).reshape(-1)[flat]
        if exc_index.numel():
            orig = torch.where(found, exc_bits[pos].to(it), orig)
        bits[esc] = orig  # row-major order, as flat: bits has wp's strides (a column-major weight too)
    return bits.view(dtype)


def _blocks(weight, num_blocks, block_ids, transposed):
    n, rows, cols, nb = region(weight, num_blocks, block_ids, transposed)
    for j, e in enumerate(block_ids):
        yield j, reference._block(weight, e, nb, transposed)


def _chunk(cols):
    return max(1, _STAGING_BYTES // (4 * max(1, cols)))


def merge_(weight, lora_A, lora_B, scale, num_blocks, block_ids, transposed, limit=None,
           where="merge_") -> MergeRecord:
    """Lossless weight[blocks] += scale * B_j @ A_j; returns the record. Refused (ExceptionOverflow, the weight
    given back bit for bit) when more than `limit` elements need exceptions."""
    return _pass(weight, None, None, (lora_A, lora_B, scale), num_blocks, block_ids, transposed, limit, where)


def unmerge_(weight, lora_A, lora_B, scale, record, num_blocks, block_ids, transposed) -> None:
    """Gives back, bit for bit, the base that merge_ with these arguments recorded in `record`."""
    _pass(weight, (lora_A, lora_B, scale), record, None, num_blocks, block_ids, transposed, None, "unmerge_")


def swap_(weight, old, record, new, num_blocks, block_ids, transposed, limit=None, where="swap_") -> MergeRecord:
    """Restores the base from (old adapter, record) and merges the new adapter, row chunk by row chunk: one pass.
    On an exception overflow the old adapter is merged back and ExceptionOverflow raised, its `record` the
    record of that merge (bit for bit the weight before when `record` was made on this backend; ops.swap_)."""
    try:
        return _pass(weight, old, record, new, num_blocks, block_ids, transposed, limit, where)
    except ExceptionOverflow as err:
        if getattr(err, "weight_written", False):
            raise
        try:
            err.record = merge_(weight, *old, num_blocks, block_ids, transposed, limit=math.inf, where=where)
        except BaseException as again:  # as ops._merge_back: its own pass taken back, W the base; or unknown
            if getattr(again, "weight_written", False):
                written_without_record(err, where, "the old adapter's merge, or part of it", again)
            else:
                err.weight_is_base = True
            err.__context__ = again
        raise


def _undo(weight, done, old, new, codes, exc_i, exc_b, n, num_blocks, block_ids, transposed):
    """Puts back the row chunks a pass wrote before it was interrupted: each is restored with the new adapter's
    codes (a merge or a switch) and merged again with the old adapter (an unmerge or a switch), which gives its
    bits as they were (the same arithmetic on the same backend). The last chunk may or may not have been
    written when the interruption came: it is put back only if it holds what was to be written."""
    dtype = weight.dtype
    m = modulus(dtype)
    _, rows, cols, _ = region(weight, num_blocks, block_ids, transposed)
    blocks = dict(_blocks(weight, num_blocks, block_ids, transposed))
    exc_index = torch.cat(exc_i) if exc_i else torch.zeros(0, dtype=torch.long)
    exc_bits = torch.cat(exc_b) if exc_b else torch.zeros(0, dtype=torch.int32)
    if old is not None:
        ln_all, rn_all = norms(old[0], old[1], n, transposed)
    for k, (j, i, h, written) in enumerate(done):
        w = blocks[j][i:i + h]
        if k == len(done) - 1 and not torch.equal(w.view(_INT[dtype]), written.view(_INT[dtype])):
            continue  # interrupted before this chunk's write
        base = w
        if new is not None:
            p_new = _Pair(*new, n, j, transposed)
            base = _restore_rows(w, p_new.update(i, h), codes[j, i:i + h], dtype, m, (j * rows + i) * cols,
                                 exc_index, exc_bits)
        if old is not None:
            p_old = _Pair(*old, n, j, transposed)
            base, _, _ = _merge_rows(base, p_old.update(i, h), dtype, m, gamma(p_old.rank) * abs(p_old.scale),
                                     ln_all[j, i:i + h], rn_all[j])
        w.copy_(base)


def _pass(weight, old, record, new, num_blocks, block_ids, transposed, limit, where):
    """One lossless merge (old None), unmerge (new None) or switch over the enabled blocks of a CPU weight: the
    C++ pass (lora_ext._cpu, lossless_cpu.py: the same bits, one fused loop per row chunk) where it is built,
    else the pure-torch reference below."""
    tensors = [weight] + [t for pair in (old, new) if pair is not None for t in pair[:2]]
    if record is not None:
        tensors += [record.codes, record.exc_index, record.exc_bits]
    if _cpu is not None and readable(*tensors):
        from . import lossless_cpu
        return lossless_cpu.run_pass(_cpu, weight, old, record, new, num_blocks, block_ids, transposed, limit,
                                     where)
    return _pass_reference(weight, old, record, new, num_blocks, block_ids, transposed, limit, where)


def _pass_reference(weight, old, record, new, num_blocks, block_ids, transposed, limit, where):
    """The pure-torch pass, row chunk by row chunk; an error or Ctrl-C part way puts the written chunks back."""
    dtype = weight.dtype
    m = modulus(dtype)
    n, rows, cols, _ = region(weight, num_blocks, block_ids, transposed)
    codes = empty_codes(weight, n, rows, cols) if new is not None else None
    width = codes.shape[2] if codes is not None else 0
    if new is not None:
        ln_all, rn_all = norms(new[0], new[1], n, transposed)
    exc_i, exc_b = [], []
    step = _chunk(cols)
    done = []  # the row chunks written: an error or Ctrl-C part way puts them back (see _undo)
    try:
        for j, blk in _blocks(weight, num_blocks, block_ids, transposed):
            p_old = _Pair(*old, n, j, transposed) if old is not None else None
            p_new = _Pair(*new, n, j, transposed) if new is not None else None
            if p_new is not None:
                delta_scale = gamma(p_new.rank) * abs(p_new.scale)
            for i in range(0, rows, step):
                h = min(step, rows - i)
                w = blk[i:i + h]
                base_index = (j * rows + i) * cols
                if p_old is not None:
                    base = _restore_rows(w, p_old.update(i, h), record.codes[j, i:i + h], dtype, m, base_index,
                                         record.exc_index, record.exc_bits)
                else:
                    base = w
                if p_new is None:
                    done.append((j, i, h, base))
                    w.copy_(base)
                    continue
                wp, code, bad = _merge_rows(base, p_new.update(i, h), dtype, m, delta_scale, ln_all[j, i:i + h],
                                            rn_all[j])
                codes[j, i:i + h] = _pack(code, dtype, width)
                if bool(bad.any()):
                    flat = bad.reshape(-1).nonzero().squeeze(1)
                    exc_i.append(flat + base_index)
                    exc_b.append(base.view(_INT[dtype]).reshape(-1)[flat].int() & (0xFFFF if dtype != torch.float32
                                                                                     else -1))
                done.append((j, i, h, wp))
                w.copy_(wp)
        if new is None:
            return None
        rec = MergeRecord(codes, torch.cat(exc_i) if exc_i else torch.zeros(0, dtype=torch.long),
                          torch.cat(exc_b) if exc_b else torch.zeros(0, dtype=torch.int32), dtype,
                          tuple(weight.shape), num_blocks, tuple(block_ids), bool(transposed))
    except BaseException as err:  # (the record too: until it exists, the written chunks go back)
        try:
            _undo(weight, done, old, new, codes, exc_i, exc_b, n, num_blocks, block_ids, transposed)
            put_back(err)
        except BaseException as again:
            written_without_record(err, where, "chunks of this pass", again)
        raise
    limit = exception_limit(n * rows * cols) if limit is None else limit
    if rec.exceptions > limit:
        message = overflow_message(where, rec.exceptions, limit, n * rows * cols)
        _give_back(lambda: unmerge_(weight, *new, rec, num_blocks, block_ids, transposed), where,
                   "the refused pass", message)
        raise ExceptionOverflow(message)
    return rec


def writes_now(weight) -> None:
    """Before a C++ pass or kernel writes `weight` (they do not move its version counter): the counter moved
    first, so that an exception landing between the write and the op's return (a signal's handler runs at the
    first statement after the pass) finds the weight counted as written (ops._writes_weight); the op's own errors
    after this say what they left (put back: weight_put_back)."""
    torch.autograd.graph.increment_version(weight)


def put_back(err: BaseException) -> None:
    """An op that wrote the weight failed (`err`) and gave it back as it was: `err.weight_put_back`, which
    ops._writes_weight reads (its version counter moved, its values did not)."""
    err.weight_put_back = True


def written_without_record(err: BaseException, where: str, holds: str, again: Optional[BaseException] = None) -> None:
    """An op that wrote the weight failed (`err`), and giving the weight back failed too (`again`; None: `err` is
    that failure): the weight holds `holds`, which no record describes. Says so in a note on `err` and sets
    `err.weight_written`, which a layer reads to refuse its forwards and merges until its weight is loaded again
    (LoRALayer._writing)."""
    why = (f"the weight could not be given back after this error ({again!r})" if again is not None
           else "this error came while the weight was being given back")
    err.add_note(f"lora_ext {where}: {why}; it holds {holds} without a lossless record")
    err.weight_written = True


def _give_back(fn, where: str, holds: str, refusal: Optional[str] = None) -> None:
    """fn() gives the weight back after a pass (a refused one: `refusal`, its message); an error in it is marked
    (written_without_record) and raised."""
    try:
        fn()
    except BaseException as again:
        written_without_record(again, where, holds)
        if refusal is not None:
            again.add_note(f"lora_ext {where}: (it was giving back a refused pass: {refusal})")
        raise


def describe(record: Optional[MergeRecord]) -> str:
    if record is None:
        return "no record"
    return f"{record.nbytes()} bytes, {record.exceptions} exceptions"


# -------------------------------------------------------------------------------------------------------------
# a weight written while merged


def _listed(weight: Tensor, record: MergeRecord, num_blocks: int, block_ids: Sequence[int], transposed: bool):
    """(block j, row m and column c in its region, and the flat index in the contiguous 2-D `weight`) of the listed
    elements."""
    index = record.exc_index
    n, rows, cols, nb = region(weight, num_blocks, block_ids, transposed)
    j, m, c = index // (rows * cols), index // cols % rows, index % cols
    if num_blocks == 1:  # the region is the whole weight, in its own order
        return j, m, c, index
    e = torch.tensor(list(block_ids), device=index.device)[j]
    row, col = (m, e * nb + c) if transposed else (e * nb + m, c)
    return j, m, c, row * weight.shape[1] + col


def _flat(record: MergeRecord, weight: Tensor, num_blocks, block_ids, transposed) -> Tensor:
    return record.exc_index if num_blocks == 1 else _listed(weight, record, num_blocks, block_ids, transposed)[3]


def note_merged(weight: Tensor, record: MergeRecord, *, num_blocks: int = 1, block_ids: Sequence[int] = (0,),
                transposed: bool = False) -> None:
    """Notes in the record the bits a merge left in its listed elements of the contiguous 2-D `weight` (with_writes
    compares them with what the weight holds when the record is read)."""
    if record.exceptions:
        flat = _flat(record, weight, num_blocks, block_ids, transposed)
        record.merged_bits = torch.take(weight, flat).view(_INT[weight.dtype])


def with_writes(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, record: MergeRecord, *,
                num_blocks: int = 1, block_ids: Sequence[int] = (0,), transposed: bool = False) -> MergeRecord:
    """The record to take (lora_A, lora_B, scale) out of the contiguous 2-D `weight` with, given what the weight
    holds now. A listed element written since the merge (its bits differ from the noted ones: an optimizer step,
    fused or not, an EMA or soup copy_, a write into .data) would get its base bits back and lose the write: it gets
    the lossy unmerge of its value now instead, T(value - update) in float64, as a lossy unmerge (and loralib) would
    give it. Coded elements need nothing: a written finite value restores within one code step of value - update,
    a non-finite one as it is (_restore_rows). The record as it is when nothing was noted, listed or written."""
    merged = getattr(record, "merged_bits", None)
    if merged is None or not record.exceptions:
        return record
    it = _INT[weight.dtype]
    now = torch.take(weight, _flat(record, weight, num_blocks, block_ids, transposed))
    if torch.equal(now.view(it), merged):
        return record
    written = now.view(it) != merged
    j, m, c, _ = _listed(weight, record, num_blocks, block_ids, transposed)
    n = len(block_ids)
    a, b = _block_factors(lora_A, lora_B, n)
    left, right = (a[j, :, m], b[j, c, :]) if transposed else (b[j, m, :], a[j, :, c])  # (E, r) each
    lossy = (now.double() - (left * right).sum(-1) * float(scale)).to(weight.dtype).view(it).to(torch.int32)
    if it == torch.int16:
        lossy = lossy & 0xFFFF  # (zero-extended, as the list holds bits)
    bits = torch.where(written, lossy, record.exc_bits)
    return MergeRecord(record.codes, record.exc_index, bits, record.dtype, record.shape, record.num_blocks,
                       record.block_ids, record.transposed, merged)
