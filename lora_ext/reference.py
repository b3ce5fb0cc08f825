"""Pure-torch implementation of every lora_ext op.

This is the backend for every tensor that is not on a CUDA device, and it holds the backward formulas that
all backends share. Arguments arrive validated (see ops.py). Conventions:

- A is (n*r, K) and B is (n*Nb, r), n = len(block_ids): group j uses rows j*r:(j+1)*r of A and rows
  j*Nb:(j+1)*Nb of B, and touches output block block_ids[j] of num_blocks blocks of Nb rows (columns
  when `transposed`, i.e. fan_in_fan_out and Embedding storage).
- Low-precision weights are updated in fp32 with one rounding per element, in row chunks, so no
  weight-sized temporary is ever allocated.
"""
import contextlib
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .readable import transformed
from .tracing import compiling

# Size of the fp32 staging buffer used to merge fp16/bf16 weights a few rows at a time.
_STAGING_BYTES = 1 << 20


def _without_autocast(fn):
    """fn with autocast off: its matmuls compute in the precision the op states (a float32 product, rounded once),
    not in autocast's 16 bits (u4: a float32 merge under CPU bfloat16 autocast was 1.35e-2 off, and an unmerge there
    did not give the base back; a bfloat16 table's lookups rounded the low-rank term twice). linear has its own
    rule (ops: the inputs cast as F.linear's, then autocast off)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        on = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        if not on:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for d in on:
                stack.enter_context(torch.autocast(d, enabled=False))
            return fn(*args, **kwargs)
    return run


def autocast_dtype(t) -> Optional[torch.dtype]:
    """The dtype autocast gives matmuls on t's device now, or None where autocast is off."""
    if not isinstance(t, torch.Tensor):
        return None
    device_type = "cuda" if t.is_cuda else "cpu" if t.is_cpu else None  # (not t.device.type: see ops' Kernels)
    if device_type is None or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_eligible(t) -> bool:
    """Whether autocast casts tensor t (torch's rule: a floating tensor, float64 excepted)."""
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def autocast_fresh(weight: torch.Tensor) -> torch.Tensor:
    """A layer's weight for a torch op under autocast: cast here (as autocast would) where autocast would take the
    cast from its cache, a leaf that requires grad. Autocast keeps that cast for the whole block and never looks at
    the tensor's version: a merged forward after a switch, a merge or a disable_adapter wrote the weight inside the
    block served the cast made before it (the old adapter's, 15.9 off, h3; a mixed batch's rows of a convolution
    11.2 off, r2), on any thread. Else `weight`."""
    if weight.requires_grad and weight.is_leaf and autocast_eligible(weight):
        dtype = autocast_dtype(weight)
        if dtype is not None and dtype != weight.dtype:
            return weight.to(dtype)
    return weight


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as(t, dtype):
    """t in dtype: t itself where it is already (Tensor.to's own check costs a dispatch: host time on every
    training step's backward)."""
    return t if t.dtype == dtype else t.to(dtype)


def _groups(lora_A, lora_B, block_ids):
    n = len(block_ids)
    r = lora_A.shape[0] // n
    nb = lora_B.shape[0] // n
    for j, e in enumerate(block_ids):
        yield e, nb, lora_A[j * r:(j + 1) * r], lora_B[j * nb:(j + 1) * nb]


def _block(t, e, nb, transposed):
    return t[:, e * nb:(e + 1) * nb] if transposed else t[e * nb:(e + 1) * nb]


_ONCE = {}  # (shapes, strides, dtype, device type, threads) -> whether addmm_ adds W + (left @ right) rounded once there


def _addmm_rounds_once(w, left, right) -> bool:
    """Whether w.addmm_(left, right) is w + (left @ right) with one rounding for these shapes, strides and thread
    count. It is on torch's BLAS path, which can add the product into w in steps: shapes with a dimension under 16
    (a Linear(8, 8)) add the rank terms one by one; MKL's float32 GEMM adds blocks of 192 terms of the inner
    dimension (a merge of rank over 192, a swap of two adapters of rank 128) and, with 3 threads or more, splits it
    between threads for some shapes (16 x 17); float64's adds the terms one by one at every size here. A merge and
    its unmerge (a swap and the swap back) then no longer cancel within a rounding, and a weight merged and unmerged
    or switched back and forth drifts an ulp per round trip in some elements.
    A weight with a dimension under 16 never asks (the product is added once, which costs nothing at that size).
    Others are found out once per layout and thread count (not on meta or inside a torch.func transform): by
    _steps_into_w, and for strided or float64 weights also on random values (their own reductions)."""
    if min(w.shape) < 16:
        return False
    if w.is_meta or transformed():
        return True
    key = (tuple(w.shape), w.stride(), tuple(left.shape), left.stride(), tuple(right.shape), right.stride(), w.dtype,
           w.device.type, torch.get_num_threads())
    once = _ONCE.get(key)
    if once is None:
        once = not _steps_into_w(w, left, right)
        if once and not (w.is_contiguous() and w.dtype == torch.float32):
            g = torch.Generator(device=w.device).manual_seed(0)

            def like(t):
                return _same_layout(t).copy_(torch.randn(t.shape, generator=g, dtype=t.dtype, device=t.device))

            pw, pl, pr = like(w), like(left), like(right)
            once = bool(torch.equal(like(w).copy_(pw).addmm_(pl, pr), pw + pl @ pr))
        _ONCE[key] = once
    return once


def _steps_into_w(w, left, right) -> bool:
    """Whether w.addmm_(left, right) adds the product into w in more than one step (layouts as given), shown on
    values where any step rounds away what one rounding keeps: w = 1 everywhere and K equal terms summing to just
    over half a unit of 1, every proper part of them (K - 1 terms at most) to at most half a unit. The terms are
    multiples of one power of two, so every partial sum of them is exact: added once, each element is 1 + one unit;
    added in steps (each under half a unit), it stays 1. (Exact for inner dimensions K up to 2^((mantissa - 2) / 2):
    2,048 in float32; a larger K is still caught where its steps take fewer than all but a few terms.)"""
    k = left.shape[1]
    bits = 1 - round(math.log2(torch.finfo(w.dtype).eps))  # significand bits: 24 for float32, 53 for float64
    half = 2 ** min(2 * max(k, 2).bit_length(), bits - 2)  # half a unit of 1, in terms' units (a power of two >= K^2)
    c = -(-(half + 1) // k)  # each term, in those units: K terms pass half a unit
    unit = 2.0 ** -(bits - 1)  # a unit of 1
    term = c * (unit / 2) / half
    got = _same_layout(w).fill_(1.0).addmm_(_same_layout(left).fill_(1.0), _same_layout(right).fill_(term))
    return not bool((got == 1.0 + unit).all())


def _same_layout(t):
    """An uninitialised tensor of t's shape, strides, dtype and device (the probes' stand-ins)."""
    return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)


@_without_autocast
def merge_(weight, lora_A, lora_B, scale, num_blocks, block_ids, transposed, once=False):
    """weight[block] += scale * (B_j @ A_j) (transposed: += scale * (B_j @ A_j)^T), in place. once (merges, unmerges
    and swaps, eager): a float32/float64 weight takes the product added with one rounding (_addmm_rounds_once)."""
    if not block_ids:
        return
    cd = compute_dtype(weight.dtype)
    lora_A, lora_B = lora_A.to(cd), lora_B.to(cd)
    for e, nb, a, b in _groups(lora_A, lora_B, block_ids):
        w = _block(weight, e, nb, transposed)
        left, right = (a.t(), b.t()) if transposed else (b, a)
        if weight.dtype == cd:
            if once and not _addmm_rounds_once(w, left, right):
                w.add_(left @ right, alpha=scale)
            else:
                w.addmm_(left, right, alpha=scale)
            continue
        step = max(1, _STAGING_BYTES // (4 * max(1, w.shape[1])))
        for i in range(0, w.shape[0], step):
            rows = w[i:i + step]
            acc = rows.to(cd)
            acc.addmm_(left[i:i + step], right, alpha=scale)
            rows.copy_(acc)


@_without_autocast
def swap_(weight, old_A, old_B, old_scale, new_A, new_B, new_scale, num_blocks, block_ids, transposed):
    """weight += new_scale * delta(new) - old_scale * delta(old) as one merge of rank r1 + r2: the factors
    stacked along the rank group by group, A_cat = [A2; A1] and B_cat = [s2*B2 | -s1*B1], in the compute
    precision."""
    n = len(block_ids)
    # (the weight's compute dtype too: a float64 weight's swap of float32 factors stacked them in float32, 3.4e-7
    # off where an unmerge and a merge were 1.8e-15, u4)
    cd = torch.promote_types(torch.promote_types(compute_dtype(old_A.dtype), compute_dtype(new_A.dtype)),
                             compute_dtype(weight.dtype))
    k, r1, r2 = old_A.shape[1], old_A.shape[0] // n, new_A.shape[0] // n
    nb = old_B.shape[0] // n
    a_cat = torch.cat((new_A.to(cd).reshape(n, r2, k), old_A.to(cd).reshape(n, r1, k)), dim=1).reshape(-1, k)
    # (each factor made cd first: a 16-bit factor's product would round in its dtype; out of place, so that autograd
    # records it where the factors need grad: torch.mul(..., out=) refused them, r49)
    b_cat = torch.cat((_as(new_B, cd).reshape(n, nb, r2) * new_scale, _as(old_B, cd).reshape(n, nb, r1) * -old_scale),
                      dim=2)
    merge_(weight, a_cat, b_cat.reshape(n * nb, r1 + r2), 1.0, num_blocks, block_ids, transposed, once=True)


@_without_autocast
def delta_weight(lora_A, lora_B, scale, num_blocks, block_ids, transposed, dtype):
    """The dense scale * delta-W in the weight's storage layout, zero outside the enabled blocks."""
    n = len(block_ids)
    nb = lora_B.shape[0] // n
    k = lora_A.shape[1]
    rows, cols = (k, num_blocks * nb) if transposed else (num_blocks * nb, k)
    cd = compute_dtype(dtype)
    if transformed():  # out of place: under vmap the factors may be batched where a fresh buffer is not
        parts = [lora_A.new_zeros(nb, k, dtype=cd)] * num_blocks
        for e, _, a, b in _groups(lora_A.to(cd), lora_B.to(cd), block_ids):
            parts[e] = scale * (b @ a)
        out = torch.cat(parts)
        return (out.t() if transposed else out).to(dtype)
    out = torch.zeros(rows, cols, dtype=cd, device=lora_A.device)
    merge_(out, lora_A, lora_B, scale, num_blocks, block_ids, transposed)
    return out.to(dtype)


def delta_weight_backward(grad, lora_A, lora_B, scale, num_blocks, block_ids, transposed):
    """Gradients of delta_weight with respect to lora_A and lora_B."""
    cd = compute_dtype(grad.dtype)
    g = grad.to(cd)
    g = g.t() if transposed else g
    dA, dB = [], []
    for e, nb, a, b in _groups(lora_A.to(cd), lora_B.to(cd), block_ids):
        gj = g[e * nb:(e + 1) * nb]
        dB.append(scale * (gj @ a.t()))
        dA.append(scale * (b.t() @ gj))
    return torch.cat(dA).to(lora_A.dtype), torch.cat(dB).to(lora_B.dtype)


def linear(x, x_lora, weight, bias, lora_A, lora_B, scale, num_blocks, block_ids, fan_in_fan_out):
    """F.linear(x, W, bias) + scale * (x_lora A^T) B^T, the update landing only in the enabled blocks.

    The low-rank term (and the bias) is written first and the base GEMM accumulates onto it (beta=1):
    the output is written once and the large GEMM reads it while it is compute-bound, so the LoRA
    path costs little more than its own small products. The low-rank term is computed in float32 at least
    (compute_dtype), as the CUDA kernels' FMA paths and the mixed batches compute it, and rounded once to the
    output's dtype: in a float16/bfloat16 model, x A^T rounded to 16 bits lost to large factors whose update is
    small (9 ulps of the output, 20 times peft's error, which computes in the factors' float32).
    """
    w = weight.t() if fan_in_fan_out else weight
    if not block_ids:
        return F.linear(x, w, bias)
    n_out, k = w.shape
    dtype = x.dtype
    cd = compute_dtype(dtype)
    x2 = _rows(x)  # (not reshape(-1, k): k may be 0)
    t = _as(_rows(x_lora), cd) @ _as(lora_A, cd).t()
    r = lora_A.shape[0] // len(block_ids)
    b_all = _as(lora_B, cd)
    bias_cd = None if bias is None else _as(bias, cd)
    if num_blocks == 1:
        base = bias_cd if bias is not None else t.new_zeros(())
        out = torch.addmm(base, t, b_all.t(), beta=1 if bias is not None else 0, alpha=scale)
    elif transformed():  # out of place: under vmap the factors or bias may be batched where a fresh buffer is not
        nb = n_out // num_blocks
        cols = [t.new_zeros(x2.shape[0], nb) if bias is None else bias_cd[e * nb:(e + 1) * nb].expand(x2.shape[0], nb)
                for e in range(num_blocks)]
        for j, (e, nb, _, b) in enumerate(_groups(lora_A, b_all, block_ids)):
            cols[e] = torch.addmm(cols[e], t[:, j * r:(j + 1) * r], b.t(), alpha=scale)
        out = torch.cat(cols, dim=1)
    else:
        out = t.new_empty(x2.shape[0], n_out)
        nb = n_out // num_blocks
        for e in range(num_blocks):
            cols = out[:, e * nb:(e + 1) * nb]
            if bias is None:
                cols.zero_()
            else:
                cols.copy_(bias_cd[e * nb:(e + 1) * nb].expand_as(cols))
        for j, (e, nb, _, b) in enumerate(_groups(lora_A, b_all, block_ids)):
            out[:, e * nb:(e + 1) * nb].addmm_(t[:, j * r:(j + 1) * r], b.t(), alpha=scale)
    out = _as(out, dtype)
    out = torch.addmm(out, x2, w.t()) if transformed() else out.addmm_(x2, w.t())
    return out if x.dim() == 2 else out.view(*x.shape[:-1], n_out)  # (a matrix as it is: no view to own)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as a matrix of its last dimension's rows (reshape(-1, n) cannot take 0 elements: n may be 0); a matrix
    as it is (no call: host time)."""
    return t if t.dim() == 2 else t.reshape(t.shape[:-1].numel(), t.shape[-1])


def _shaped(t: torch.Tensor, shape) -> torch.Tensor:
    """The matrix t (rows of shape's last dimension) in `shape`: t itself where shape is a matrix's."""
    return t if len(shape) == 2 else t.view(shape)


def linear_backward(grad, x, x_lora, weight, lora_A, lora_B, scale, block_ids, fan_in_fan_out, needs, x_shape,
                    x_lora_dtype, weight_dtype):
    """Gradients of `linear` for (x, x_lora, weight, bias, lora_A, lora_B); None where not needed. x, x_lora and
    weight may be None where no gradient asked for reads them (x: the weight's; x_lora: the factors'; weight:
    x's); x_shape (x_lora's too), x_lora_dtype and weight_dtype say what they were. Where x_lora is x (no dropout)
    the two input gradients stay apart, autograd adding them: returning their sum as x's and None as x_lora's
    crashed compiled autograd (torch._dynamo.compiled_autograd adds the two edges' gradients, None among them)."""
    g2 = _rows(grad)
    dx = dxl = dw = db = dA = dB = None
    if needs[0]:
        w = weight.t() if fan_in_fan_out else weight
        dx = _shaped(g2 @ _as(w, g2.dtype), x_shape)
    if needs[2]:
        dwl = g2.t() @ _rows(x).to(g2.dtype)
        dw = (dwl.t() if fan_in_fan_out else dwl).to(weight_dtype)
    if needs[3]:
        db = g2.sum(0)
    if block_ids and (needs[1] or needs[4] or needs[5]):
        cd = compute_dtype(grad.dtype)
        a_all = _as(lora_A, cd)
        xl = t = None
        if needs[4] or needs[5]:
            xl = _as(_rows(x_lora), cd)
            t = xl @ a_all.t()
        if len(block_ids) == 1 and lora_B.shape[0] == g2.shape[1]:
            # one group over the whole output (Linear, a MergedLinear of one block): no slices or concatenations,
            # the host time of a training step's small layers
            gj = _as(g2, cd)
            dt = scale * (gj @ _as(lora_B, cd))
            dBs = [scale * (gj.t() @ t)] if needs[5] else []
        else:
            r = lora_A.shape[0] // len(block_ids)
            dts, dBs = [], []
            for j, (e, nb, _, b) in enumerate(_groups(a_all, lora_B.to(cd), block_ids)):
                gj = g2[:, e * nb:(e + 1) * nb].to(cd)
                dts.append(scale * (gj @ b))
                if needs[5]:
                    dBs.append(scale * (gj.t() @ t[:, j * r:(j + 1) * r]))
            dt = torch.cat(dts, dim=1)
        if needs[1]:
            dxl = _shaped(_as(dt @ a_all, x_lora_dtype), x_shape)
        if needs[4]:
            dA = _as(dt.t() @ xl, lora_A.dtype)
        if needs[5]:
            dB = _as(dBs[0] if len(dBs) == 1 else torch.cat(dBs), lora_B.dtype)
    return dx, dxl, dw, db, dA, dB


@_without_autocast
def embedding(ids, weight, lora_A, lora_B, scale, padding_idx, scale_grad_by_freq, sparse):
    """weight[ids] + scale * A^T[ids] B^T (A is (r, num_embeddings), B is (embedding_dim, r))."""
    out = F.embedding(ids, weight, padding_idx, None, 2.0, scale_grad_by_freq, sparse)
    # (padding_idx and scale_grad_by_freq shape only lora_A's gradient: autograd through here, under torch.func,
    # then matches embedding_backward's, as loralib's does)
    # (the low-rank term in float32 at least, rounded once onto the rows: see linear)
    cd = compute_dtype(out.dtype)
    t = _as(F.embedding(ids.reshape(-1), lora_A.t(), padding_idx, None, 2.0, scale_grad_by_freq), cd)
    if transformed():  # out of place: under vmap the factors may be batched where the base lookup is not
        return (_as(out, cd) + scale * (t @ _as(lora_B, cd).t()).view(out.shape)).to(out.dtype)
    rows = out.view(ids.numel(), out.shape[-1])
    if out.dtype == cd:
        rows.addmm_(t, lora_B.to(cd).t(), alpha=scale)
    else:
        rows.add_(scale * (t @ _as(lora_B, cd).t()))
    return out


def embedding_backward(grad, ids, lora_A, lora_B, scale, num, padding_idx, scale_grad_by_freq, sparse, needs):
    """Gradients of `embedding` for (weight, lora_A, lora_B); None where not needed. num: the weight's rows (the
    only thing read of it)."""
    pad = -1 if padding_idx is None else padding_idx
    dw = dA = dB = None
    if needs[0]:
        dw = torch.ops.aten.embedding_backward(grad, ids, num, pad, scale_grad_by_freq, sparse)
    if needs[1] or needs[2]:
        cd = compute_dtype(grad.dtype)
        g2 = _as(_rows(grad), cd)
        flat = ids.reshape(-1)
        if needs[2]:
            # (the lookup's own padding_idx and frequency scaling: its values are the same, and a gradient of this
            # gradient, create_graph=True, reaches lora_A as the forward's does)
            t = _as(F.embedding(flat, lora_A.t(), padding_idx, scale_grad_by_freq=scale_grad_by_freq), cd)
            dB = _as(scale * (g2.t() @ t), lora_B.dtype)
        if needs[1]:
            dt = scale * (g2 @ _as(lora_B, cd))
            dA = torch.ops.aten.embedding_backward(dt, flat, num, pad, scale_grad_by_freq, False)
            dA = _as(dA.t(), lora_A.dtype)
    return dw, dA, dB


# ---------------------------------------------------------------------------------------------------
# mixed batches (lora_ext.batched): every group of rows with its own adapter slot


def _live_groups(index):
    """The groups (entries of index) that have a slot, and their slots as int64."""
    groups = (index >= 0).nonzero().view(-1)
    return groups, index.index_select(0, groups).long()


def _expand_(out, t, b_slots, scales, groups, slots, tokens_per_index):
    """out[rows of groups] = round(out + scales[slot] * t @ b_slots[slot]), accumulated in float32 (float64
    for float64), one rounding per element."""
    cd = compute_dtype(out.dtype)
    n, d = groups.numel(), out.shape[1]
    t = t * scales.index_select(0, slots).to(cd).view(n, 1, 1)
    delta = torch.bmm(t, b_slots.index_select(0, slots).to(cd))  # (n, tokens, d)
    out3 = out.view(-1, tokens_per_index, d)
    out3.index_copy_(0, groups, (out3.index_select(0, groups).to(cd) + delta).to(out.dtype))


def batched_linear_(out, x, a_slots, b_slots, scales, index, tokens_per_index):
    """out[m] += scales[i] * (x[m] @ a_slots[i]) @ b_slots[i] for each row m with i = index[m //
    tokens_per_index] >= 0; rows with index -1 are not touched. Batched matmuls over the rows' gathered slots
    (no loop over adapters)."""
    groups, slots = _live_groups(index)
    if not groups.numel():
        return
    cd = compute_dtype(out.dtype)
    x3 = x.view(-1, tokens_per_index, x.shape[1]).index_select(0, groups).to(cd)
    t = torch.bmm(x3, a_slots.index_select(0, slots).to(cd))  # (n, tokens, R)
    _expand_(out, t, b_slots, scales, groups, slots, tokens_per_index)


def batched_embedding_(out, ids, a_slots, b_slots, scales, index, tokens_per_index):
    """batched_linear_ for an Embedding: the shrink is the gather a_slots[i, ids[m]]."""
    groups, slots = _live_groups(index)
    if not groups.numel():
        return
    ids2 = ids.view(-1, tokens_per_index).index_select(0, groups)  # (n, tokens)
    t = a_slots[slots.view(-1, 1), ids2].to(compute_dtype(out.dtype))  # (n, tokens, R)
    _expand_(out, t, b_slots, scales, groups, slots, tokens_per_index)


# the delta weights one chunk of a batched conv stacks (one per row), in elements: 2^25 (128 MiB in float32)
CONV_CHUNK_ELEMENTS = 1 << 25


def batched_conv(conv, x, deltas, scales, index, sub=None, grouped=None):
    """The output of convolution `conv` (its weight W and bias, as it is) for a mixed batch x: row n with i = index[n]
    >= 0 adds conv(x[n], scales[i] * deltas[i].view(W.shape)) (deltas[i]: slot i's B A in ConvLoRA's layout) and
    with j = sub[n] >= 0 takes conv(x[n], scales[j] * deltas[j]...) away; rows with neither (-1) are the plain
    convolution of the batch, bit for bit. In float32 (float64 for float64), rounded once.

    With the index on the host (and not under torch.compile), the rows are grouped by their (i, j) and each group
    convolved once with W + its update, in float32: a batch without rows of the plain convolution costs about one
    convolution (it is computed only when such rows exist, for them). Elsewhere (CUDA: no host sync, so a CUDA graph
    captured over it serves the rows of the index at replay) the plain convolution and then the updates
    (_add_updates)."""
    w, bias = conv.weight, conv.bias
    if index.device.type != "cpu" or compiling():
        out = conv._conv_forward(x, autocast_fresh(w), bias)
        _add_updates(conv, out, x, deltas, scales, index, grouped)
        if sub is not None:
            _add_updates(conv, out, x, deltas, -scales, sub, grouped)
        return out
    adds = index.tolist()
    subs = sub.tolist() if sub is not None else [-1] * len(adds)
    groups = {}
    for n, pair in enumerate(zip(adds, subs)):
        if pair != (-1, -1):
            groups.setdefault(pair, []).append(n)
    if sum(map(len, groups.values())) < len(adds):  # (rows of the plain convolution: the batch's, bit for bit)
        out = conv._conv_forward(x, autocast_fresh(w), bias)
    else:  # (an empty batch's convolution: the output's shape and dtype, autocast's too, and torch's refusals; with
        # a bias, which an empty batch's convolution checks the dtypes against, c2)
        probe = conv._conv_forward(x[:0], autocast_fresh(w), bias if bias is not None else w.new_zeros(w.shape[0]))
        out = probe.new_empty((x.shape[0], *probe.shape[1:]))
    cd = compute_dtype(out.dtype)
    base, bias_cd = w.to(cd), None if bias is None else bias.to(cd)  # (once: each group adds to a new tensor)
    for (i, j), rows in groups.items():
        weight = base
        if i >= 0:
            weight = torch.add(weight, deltas[i].to(cd).view(w.shape), alpha=float(scales[i]))
        if j >= 0:
            weight = torch.add(weight, deltas[j].to(cd).view(w.shape), alpha=-float(scales[j]))
        take = torch.tensor(rows, device=x.device)
        y = conv._conv_forward(x.index_select(0, take).to(cd), weight, bias_cd)
        out.index_copy_(0, take, y.to(out.dtype))
    return out


def _add_updates(conv, out, x, deltas, scales, index, grouped=None):
    """out[n] = round(out[n] + conv(x[n], scales[i] * deltas[i].view(W.shape))) with i = index[n] >= 0; rows with
    index -1 are left as they are, bit for bit. In float32 (float64 for float64), one rounding per element, in
    chunks of rows whose delta weights hold at most CONV_CHUNK_ELEMENTS elements. `grouped` (default: on CUDA)
    convolves a chunk's rows at once as one grouped convolution (groups * rows, one launch), else row by row (the
    CPU's grouped convolution ran 1.5x the plain one on a Whisper conv, row by row 1.04x). No host sync."""
    cd = compute_dtype(out.dtype)
    shape = conv.weight.shape
    rows = x.shape[0]
    grouped = out.device.type == "cuda" if grouped is None else grouped
    live = index >= 0
    slots = index.clamp(min=0).long()
    scale = torch.where(live, scales.index_select(0, slots), 0.0).to(cd)
    padding = conv.padding
    if conv.padding_mode != "zeros":  # (as torch's conv: the padding first, then an unpadded convolution)
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    fn = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
    chunk = max(1, CONV_CHUNK_ELEMENTS // max(1, math.prod(shape)))
    keep = (-1,) + (1,) * (out.dim() - 1)
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        s, xs = slots[part], x[part].to(cd)
        n = s.numel()
        if grouped:
            delta = deltas.index_select(0, s).to(cd).view(n * shape[0], *shape[1:])
            xs = xs.reshape(1, n * xs.shape[1], *xs.shape[2:])
            y = fn(xs, delta, None, conv.stride, padding, conv.dilation, conv.groups * n).view(n, *out.shape[1:])
        else:
            y = torch.cat([fn(xs[j:j + 1], deltas.index_select(0, s[j:j + 1]).to(cd).view(shape), None, conv.stride,
                              padding, conv.dilation, conv.groups) for j in range(n)])
        o = out[part]  # (scaled here: the output has fewer elements than the rows' delta weights, 4x for a ViT's)
        o.copy_(torch.where(live[part].view(keep), torch.addcmul(o.to(cd), y, scale[part].view(keep)).to(out.dtype),
                            o))
