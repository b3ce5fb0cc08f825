"""The C++ CPU backend of the lossless merge / unmerge / swap pass (csrc/cpu/lossless_cpu.cpp): what
lossless._pass computes, bit for bit (weight bits, codes, exception list, the refusal and its rollback), in one
fused pass per row chunk. `run_pass(module, ...)` takes the compiled module (lora_ext._cpu, which setup.py builds
with -ffp-contract=off, required for bit-identity).
"""
import functools
import math

import torch

from . import lossless

@functools.lru_cache(maxsize=None)
def nan_modes():
    """How torch's float32 -> bfloat16 / float16 conversion writes NaNs on this machine (it depends on the
    vector path torch dispatches to): (the bf16 pattern of every NaN, fp16 keeps the payload); None when torch's
    behaviour is neither of the two the C++ pass implements."""
    pats = torch.tensor([0x7FC00000, 0x7FFFFFFF, 0x7FA00001, -0x400000, -1] * 16, dtype=torch.int32)
    x = pats.view(torch.float32)
    bf = {int(v) & 0xFFFF for v in x.to(torch.bfloat16).view(torch.int16)}
    if len(bf) != 1:
        return None
    got = [int(v) & 0xFFFF for v in x[:5].contiguous().to(torch.float16).view(torch.int16)]
    payload = [0x7E00, 0x7FFF, 0x7F00, 0xFE00, 0xFFFF]
    plain = [0x7E00, 0x7E00, 0x7E00, 0xFE00, 0xFE00]
    if got not in (payload, plain):
        return None
    return bf.pop(), got == payload


def supported(weight) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in lossless.RECORD_DTYPES and weight.dim() == 2
            and weight.numel() > 0 and (weight.shape[1] <= 1 or weight.stride(1) == 1) and nan_modes() is not None)


def _f32(scale) -> float:
    return torch.tensor(scale, dtype=torch.float32).item()


def run_pass(module, weight, old, record, new, num_blocks, block_ids, transposed, limit, where):
    """lossless._pass(weight, old, record, new, ...) with the compiled module: the new MergeRecord (None for an
    unmerge); on an exception overflow the weight is given back as the reference gives it back and
    lossless.ExceptionOverflow raised with the reference's message. What the module does not take (no enabled
    block, a weight off the CPU or with strided columns) goes to the reference pass."""
    block_ids = list(block_ids)
    if not block_ids or not supported(weight):
        return lossless._pass_reference(weight, old, record, new, num_blocks, block_ids, transposed, limit,
                                         where)
    with torch.no_grad():
        return _run(module, weight, old, record, new, num_blocks, block_ids, transposed, limit, where)


def _take_back(err, module, weight, old, new, made, num_blocks, block_ids, transposed, layout, cap, where):
    """A pass that wrote W and whose record was not made (`err`): the new adapter taken out with what the pass made
    (W the base), and a swap's old adapter merged back, its record in `err.record` (bit for bit the weight before
    when the old merge was made on this backend); that failing too, `err.weight_is_base` (as ops.swap_ says). If the
    unmerge fails, `err.weight_written` and a note (lossless.written_without_record)."""
    from .named_adapters import deferred_interrupt  # (named_adapters imports lossless, which imports this module)
    with deferred_interrupt():
        try:
            _unmerge_pass(module, weight, new, made, layout, cap)
        except BaseException as again:
            lossless.written_without_record(err, where, "the new adapter's merge", again)
            return
        lossless.put_back(err)  # (W the base: a merge's weight as it was; a swap's says more below)
        if old is not None:
            try:
                err.record = _run(module, weight, None, None, old, num_blocks, block_ids, transposed, math.inf,
                                  where)
            except BaseException as again:  # (its own pass taken back: W the base)
                err.weight_is_base = True
                err.__context__ = again


def _unmerge_pass(module, weight, adapter, made, layout, cap):
    """The C++ pass that takes `adapter` back out of W with what its merge pass made (codes, exception list):
    the base, bit for bit (escapes past the cap hold their base already)."""
    nan_bf16, f16_payload = nan_modes()
    module.lossless_pass_(weight, adapter[0], adapter[1], _f32(adapter[2]), *made, None, None, 0.0, None, None, 0.0,
                          *layout, cap, nan_bf16, f16_payload)


def _run(module, weight, old, record, new, num_blocks, block_ids, transposed, limit, where):
    nan_bf16, f16_payload = nan_modes()
    n, rows, cols, _ = lossless.region(weight, num_blocks, block_ids, transposed)
    step = lossless._chunk(cols)
    elements = n * rows * cols
    lim = lossless.exception_limit(elements) if limit is None else limit
    cap = int(min(lim, 1 << 62)) if not math.isinf(lim) else 1 << 62
    layout = (num_blocks, block_ids, bool(transposed), step)
    if old is not None:
        o_args = (old[0], old[1], _f32(old[2]), record.codes.contiguous(), record.exc_index.contiguous(),
                  record.exc_bits.contiguous())
    else:
        o_args = (None, None, 0.0, None, None, None)
    if new is not None:
        ln, rn = lossless.norms(new[0], new[1], n, bool(transposed))
        s_new = _f32(new[2])
        ds = lossless.gamma(new[0].shape[0] // n) * abs(s_new)
        n_args = (new[0], new[1], s_new, ln.contiguous(), rn.contiguous(), ds)
    else:
        n_args = (None, None, 0.0, None, None, 0.0)
    lossless.writes_now(weight)
    codes, exc_index, exc_bits, total = module.lossless_pass_(weight, *o_args, *n_args, *layout, cap, nan_bf16,
                                                              f16_payload)
    if new is None:
        return None
    try:  # W is written: an error from here on (Ctrl-C held back by the pass lands here) takes the pass back first
        rec = lossless.MergeRecord(codes, exc_index, exc_bits, weight.dtype, tuple(weight.shape), num_blocks,
                                   tuple(block_ids), bool(transposed))
    except BaseException as err:
        _take_back(err, module, weight, old, new, (codes, exc_index, exc_bits), num_blocks, block_ids, transposed,
                   layout, cap, where)
        raise
    if total > lim:  # the reference's rollback: unmerge with the record
        message = lossless.overflow_message(where, total, lim, elements)
        lossless._give_back(lambda: _unmerge_pass(module, weight, new, (codes, exc_index, exc_bits), layout, cap),
                            where, "the refused pass", message)
        raise lossless.ExceptionOverflow(message)
    return rec
