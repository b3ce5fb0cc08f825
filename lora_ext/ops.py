"""The lora_ext op surface: one function per operation.

Each operation is a torch.library custom op with its fake (meta) implementation and its autograd formula
beside it. Its implementation picks the backend per call from the tensors' device (_backend_for): the CUDA
kernels of lora_ext._C for CUDA tensors when the extension is built, the pure-torch reference everywhere
else. Eager calls that need no autograd run that implementation directly, skipping the dispatcher.
The public functions validate their arguments first, so a bad call raises before anything is written; on
CUDA, merge_ and swap_ leave that to the launchers' C++ checks (which run before any launch) and run the
Python checks only to word a refusal in this API's names.

Layout shared by every op (see reference.py): lora_A is (n*r, K), lora_B is (n*Nb, r) for the n enabled
blocks `block_ids` out of `num_blocks` output blocks of Nb features each; plain layers use num_blocks=1,
block_ids=[0].
"""
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import reference

try:
    from . import _C
except ImportError:
    _C = None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def cuda_kernels_available():
    """True when lora_ext was built with its CUDA kernels."""
    return _C is not None


def _backend_for(t):
    """The backend module for tensor t: the CUDA kernels for CUDA tensors of the dtypes they take."""
    return _C if t.is_cuda and _C is not None and t.dtype is not torch.float64 else reference


def _kernel_factors(dtype, *factors):
    """The CUDA merge kernels read the factors in float32 or in the weight's dtype, all the same one."""
    first = factors[0].dtype
    if first in (torch.float32, dtype) and all(f.dtype == first for f in factors):
        return factors
    return tuple(f.float() for f in factors)


# ---------------------------------------------------------------------------------------------------
# argument checks


def _check_tensor(name, t, dim=2):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def _check_scale(scale):
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")


def _check_blocks(num_blocks, block_ids, out_features):
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
    if out_features % num_blocks:
        raise ValueError(
            f"num_blocks ({num_blocks}) must divide the output features ({out_features})")
    ids = list(block_ids)
    if ids != sorted(set(ids)) or any(not isinstance(e, int) or not 0 <= e < num_blocks for e in ids):
        raise ValueError(
            f"block_ids must be increasing, distinct block indices in [0, {num_blocks}), got {ids}")
    return ids


def _check_factors(lora_A, lora_B, out_features, in_features, num_blocks, block_ids, a_name="lora_A",
                   b_name="lora_B"):
    """Checks lora_A/lora_B against a layer of out_features x in_features; returns the block ids."""
    ids = _check_blocks(num_blocks, block_ids, out_features)
    if not ids:
        return ids
    _check_tensor(a_name, lora_A)
    _check_tensor(b_name, lora_B)
    n, nb = len(ids), out_features // num_blocks
    if lora_A.shape[1] != in_features or lora_A.shape[0] == 0 or lora_A.shape[0] % n:
        raise ValueError(
            f"{a_name} must have shape ({n}*r, {in_features}) for {n} enabled block(s), "
            f"got {tuple(lora_A.shape)}")
    r = lora_A.shape[0] // n
    if tuple(lora_B.shape) != (n * nb, r):
        raise ValueError(
            f"{b_name} must have shape ({n * nb}, {r}) to match {a_name} {tuple(lora_A.shape)} and "
            f"{n} enabled block(s) of {nb} features, got {tuple(lora_B.shape)}")
    return ids


def _layer_shape(weight, transposed):
    out_features, in_features = weight.shape
    return (in_features, out_features) if transposed else (out_features, in_features)


# ---------------------------------------------------------------------------------------------------
# merge_: weight += scale * delta-W, in place


def _merge(weight, lora_A, lora_B, scale, num_blocks, block_ids, transposed):
    """merge_ on the backend for weight's device (checked arguments)."""
    if _backend_for(weight) is _C:
        _C.merge_(weight, *_kernel_factors(weight.dtype, lora_A, lora_B), scale, num_blocks, block_ids, transposed)
    else:
        reference.merge_(weight, lora_A, lora_B, scale, num_blocks, block_ids, transposed)


@torch.library.custom_op("lora_ext::merge_", mutates_args=("weight",))
def _merge_op(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, num_blocks: int,
              block_ids: list[int], transposed: bool) -> None:
    _merge(weight, lora_A, lora_B, scale, num_blocks, block_ids, transposed)


@_merge_op.register_fake
def _(weight, lora_A, lora_B, scale, num_blocks, block_ids, transposed):
    return None


def _straight_to_kernels(weight, *factors):
    """Whether an eager call goes straight to the CUDA launcher. Its C++ checks cover every argument before
    anything is launched, so the Python checks run only when it refuses (for messages in this API's names):
    they cost several microseconds per call, host time that a 4096 x 4096 merge or switch on a GPU (~16 us)
    does not have."""
    return (isinstance(weight, Tensor) and _backend_for(weight) is _C
            and all(isinstance(t, Tensor) and t.dtype in FLOAT_DTYPES for t in factors)
            and not torch.compiler.is_compiling())


def _check_merge_args(weight, lora_A, lora_B, num_blocks, block_ids, transposed):
    """merge_'s argument checks (scale apart); returns the block ids."""
    _check_tensor("weight", weight)
    out_features, in_features = _layer_shape(weight, transposed)
    ids = _check_factors(lora_A, lora_B, out_features, in_features, num_blocks, block_ids)
    _check_same_device(weight=weight, lora_A=lora_A, lora_B=lora_B)
    return ids


def merge_(weight, lora_A, lora_B, scale, *, num_blocks=1, block_ids=(0,), transposed=False):
    """Adds scale * B @ A into the 2-D `weight` in place (one rounding per element).

    transposed: weight is stored (in_features, out_features) (fan_in_fan_out, Embedding).
    num_blocks/block_ids: MergedLinear's output blocks; only the enabled ones are written.

    In eager mode the backend is called directly: the custom-op dispatcher costs about 50 us per call in
    Python, more than a 4096 x 4096 merge takes on a GPU. Under torch.compile the custom op is used.
    """
    _check_scale(scale)
    if block_ids and _straight_to_kernels(weight, lora_A, lora_B):
        try:
            _C.merge_(weight, *_kernel_factors(weight.dtype, lora_A, lora_B), float(scale), num_blocks,
                      list(block_ids), bool(transposed))
        except (ValueError, TypeError):
            _check_merge_args(weight, lora_A, lora_B, num_blocks, block_ids, transposed)
            raise
        torch.autograd.graph.increment_version(weight)
        return
    ids = _check_merge_args(weight, lora_A, lora_B, num_blocks, block_ids, transposed)
    if not ids:
        return
    args = (weight, lora_A, lora_B, float(scale), num_blocks, ids, bool(transposed))
    if torch.compiler.is_compiling():
        _merge_op(*args)
        return
    _merge(*args)
    torch.autograd.graph.increment_version(weight)


def unmerge_(weight, lora_A, lora_B, scale, **layout):
    """Subtracts what merge_ with the same arguments added (the same arithmetic with -scale)."""
    merge_(weight, lora_A, lora_B, -scale, **layout)


# ---------------------------------------------------------------------------------------------------
# swap_: replace one merged adapter by another in a single pass over the weight
#
# W += s2 * B2 @ A2 - s1 * B1 @ A1 is one update of rank r1 + r2. On CUDA one kernel reads both factor pairs
# (no stacked copy, nothing else launched); the reference stacks them along the rank and merges once. Each
# weight element is read and written once, with one rounding, as for a merge.


def _check_finite_scaling(label, scaling):
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling):
        raise ValueError(f"{label} must be a finite number, got {scaling!r}")


def check_finite(name, lora_A, lora_B, scaling):
    """Raises ValueError naming `name` unless the scaling and every factor value are finite, and
    scaling * lora_B stays finite in the compute precision."""
    _check_finite_scaling(f"{name}: scaling", scaling)
    _check_values([(name, lora_A, lora_B, scaling)])


def _check_values(adapters):
    """check_finite's value checks for several (name, lora_A, lora_B, scaling), with one device sync per
    device: NaN propagates through min and max, and inf shows in one of them."""
    tensors = [t for _, a, b, _ in adapters for t in (a, b) if t.numel()]
    by_device = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    extremes = {}
    for group in by_device.values():
        values = torch.stack([torch.stack(torch.aminmax(t)).double() for t in group]).tolist()
        extremes.update((id(t), v) for t, v in zip(group, values))
    for name, lora_A, lora_B, scaling in adapters:
        for what, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not t.numel():
                continue
            lo, hi = extremes[id(t)]
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"{name}: {what} holds non-finite values (inf or NaN)")
        if lora_B.numel():
            lo, hi = extremes[id(lora_B)]
            cd = reference.compute_dtype(lora_B.dtype)
            if abs(scaling) * max(-lo, hi) > torch.finfo(cd).max:
                raise ValueError(f"{name}: scaling {scaling!r} times lora_B (up to {max(-lo, hi):.3g}) "
                                 f"overflows {cd}")


def swap_(weight, old_A, old_B, old_scale, new_A, new_B, new_scale, *, num_blocks=1, block_ids=(0,),
          transposed=False, check_values=True):
    """weight += new_scale * delta(new_A, new_B) - old_scale * delta(old_A, old_B), in place, in one pass.

    Layout arguments as for ops.merge_; the two adapters may differ in rank. Non-finite scales, and with
    check_values non-finite factor values (or a scaled lora_B that overflows), raise before anything is
    written. check_values=False is for callers that know the values are finite: the check costs a device
    sync, more than the pass itself for a 4096 x 4096 weight on a GPU.
    """
    for what, scale in (("new", new_scale), ("old", old_scale)):
        _check_finite_scaling(f"swap_: the {what} adapter's scaling", scale)
    factors = (old_A, old_B, new_A, new_B)
    unchecked = bool(block_ids) and _straight_to_kernels(weight, *factors)
    if not unchecked and not _check_swap_args(weight, *factors, num_blocks, block_ids, transposed):
        return  # no enabled block
    if check_values:
        _check_values([("swap_: the new adapter", new_A, new_B, new_scale),
                       ("swap_: the old adapter", old_A, old_B, old_scale)])
    layout = (num_blocks, list(block_ids), bool(transposed))
    if _backend_for(weight) is _C:
        a1, b1, a2, b2 = _kernel_factors(weight.dtype, *factors)
        try:
            _C.swap_(weight, a1, b1, float(old_scale), a2, b2, float(new_scale), *layout)
        except (ValueError, TypeError):
            if unchecked:
                _check_swap_args(weight, *factors, num_blocks, block_ids, transposed)  # in this API's names
            raise
    else:
        reference.swap_(weight, old_A, old_B, float(old_scale), new_A, new_B, float(new_scale), *layout)
    torch.autograd.graph.increment_version(weight)


def _check_swap_args(weight, old_A, old_B, new_A, new_B, num_blocks, block_ids, transposed):
    """swap_'s argument checks (scales apart); returns the block ids."""
    _check_tensor("weight", weight)
    out_features, in_features = _layer_shape(weight, transposed)
    ids = _check_factors(new_A, new_B, out_features, in_features, num_blocks, block_ids, "new_A", "new_B")
    _check_factors(old_A, old_B, out_features, in_features, num_blocks, block_ids, "old_A", "old_B")
    _check_same_device(weight=weight, old_A=old_A, old_B=old_B, new_A=new_A, new_B=new_B)
    return ids


# ---------------------------------------------------------------------------------------------------
# delta_weight: the dense scale * delta-W (MergedLinear: zero outside the enabled blocks)


@torch.library.custom_op("lora_ext::delta_weight", mutates_args=())
def _delta_weight_op(lora_A: Tensor, lora_B: Tensor, scale: float, num_blocks: int, block_ids: list[int],
                     transposed: bool, dtype: torch.dtype) -> Tensor:
    if not (lora_A.is_cuda and _C is not None and dtype in (torch.float32, torch.float16, torch.bfloat16)):
        return reference.delta_weight(lora_A, lora_B, scale, num_blocks, block_ids, transposed, dtype)
    out = lora_A.new_empty(_delta_shape(lora_A, lora_B, num_blocks, block_ids, transposed), dtype=dtype)
    _C.delta_weight_(out, *_kernel_factors(dtype, lora_A, lora_B), scale, num_blocks, block_ids, transposed)
    return out


def _delta_shape(lora_A, lora_B, num_blocks, block_ids, transposed):
    nb = lora_B.shape[0] // len(block_ids)
    rows, cols = num_blocks * nb, lora_A.shape[1]
    return (cols, rows) if transposed else (rows, cols)


@_delta_weight_op.register_fake
def _(lora_A, lora_B, scale, num_blocks, block_ids, transposed, dtype):
    shape = _delta_shape(lora_A, lora_B, num_blocks, block_ids, transposed)
    return lora_A.new_empty(shape, dtype=dtype)


def _delta_setup(ctx, inputs, output):
    lora_A, lora_B, scale, num_blocks, block_ids, transposed, _ = inputs
    ctx.save_for_backward(lora_A, lora_B)
    ctx.args = (scale, num_blocks, block_ids, transposed)


def _delta_backward(ctx, grad):
    lora_A, lora_B = ctx.saved_tensors
    dA, dB = reference.delta_weight_backward(grad, lora_A, lora_B, *ctx.args)
    return dA, dB, None, None, None, None, None


_delta_weight_op.register_autograd(_delta_backward, setup_context=_delta_setup)


def delta_weight(lora_A, lora_B, scale, *, out_features, num_blocks=1, block_ids=(0,), transposed=False,
                 dtype=None):
    """scale * B @ A as a dense weight in storage layout (transposed: (in, out)), zero-padded for
    MergedLinear's disabled blocks; differentiable with respect to lora_A and lora_B."""
    _check_scale(scale)
    in_features = lora_A.shape[1] if isinstance(lora_A, Tensor) and lora_A.dim() == 2 else None
    ids = _check_factors(lora_A, lora_B, out_features, in_features, num_blocks, block_ids)
    if not ids:
        raise ValueError("delta_weight needs at least one enabled block in block_ids")
    _check_same_device(lora_A=lora_A, lora_B=lora_B)
    dtype = dtype or lora_A.dtype
    return _delta_weight_op(lora_A, lora_B, float(scale), num_blocks, ids, bool(transposed), dtype)


# ---------------------------------------------------------------------------------------------------
# linear: F.linear(x, W, bias) + scale * (x_lora A^T) B^T, into the enabled column blocks


@torch.library.custom_op("lora_ext::linear", mutates_args=())
def _linear_op(x: Tensor, x_lora: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
               lora_B: Tensor, scale: float, num_blocks: int, block_ids: list[int],
               fan_in_fan_out: bool) -> Tensor:
    return _backend_for(x).linear(x, x_lora, weight, bias, lora_A, lora_B, scale, num_blocks, block_ids,
                                  fan_in_fan_out)


@_linear_op.register_fake
def _(x, x_lora, weight, bias, lora_A, lora_B, scale, num_blocks, block_ids, fan_in_fan_out):
    out_features = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    return x.new_empty((*x.shape[:-1], out_features))


def _linear_setup(ctx, inputs, output):
    x, x_lora, weight, bias, lora_A, lora_B, scale, num_blocks, block_ids, fan_in_fan_out = inputs
    ctx.save_for_backward(x, x_lora, weight, lora_A, lora_B)
    ctx.args = (scale, block_ids, fan_in_fan_out)


def _linear_backward(ctx, grad):
    x, x_lora, weight, lora_A, lora_B = ctx.saved_tensors
    scale, block_ids, fan_in_fan_out = ctx.args
    needs = ctx.needs_input_grad[:6]
    grads = reference.linear_backward(grad, x, x_lora, weight, lora_A, lora_B, scale, block_ids,
                                      fan_in_fan_out, needs)
    return (*grads, None, None, None, None)


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x, x_lora, weight, bias, lora_A, lora_B, scale, *, num_blocks=1, block_ids=(0,),
           fan_in_fan_out=False):
    """A LoRA linear layer's output. x_lora is the input of the low-rank path (x after lora_dropout;
    pass x itself when there is no dropout).

    Inference on CUDA tensors (no gradient needed, not compiling) calls the kernels directly: the custom-op
    dispatcher costs about 50 us per call in Python, more than a decode-size forward takes on a GPU, and
    the C++ launcher checks the arguments itself. Everything else goes through the custom op.
    """
    if (_C is not None and x.is_cuda and x.dtype is not torch.float64 and not torch.compiler.is_compiling()
            and not _needs_grad(x, x_lora, weight, bias, lora_A, lora_B)):
        return _C.linear(x, x_lora, weight, bias, lora_A, lora_B, float(scale), num_blocks, block_ids,
                         bool(fan_in_fan_out))
    _check_tensor("weight", weight)
    _check_scale(scale)
    out_features, in_features = _layer_shape(weight, fan_in_fan_out)
    for name, t in (("x", x), ("x_lora", x_lora)):
        if not isinstance(t, Tensor) or t.dim() < 1 or t.shape[-1] != in_features:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must have {in_features} features in its last dimension, got {got}")
    if x_lora.shape != x.shape:
        raise ValueError(f"x_lora must have the shape of x {tuple(x.shape)}, got {tuple(x_lora.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    ids = _check_factors(lora_A, lora_B, out_features, in_features, num_blocks, block_ids)
    _check_same_device(x=x, x_lora=x_lora, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    if not ids:
        return torch.nn.functional.linear(x, weight.t() if fan_in_fan_out else weight, bias)
    args = (x, x_lora, weight, bias, lora_A, lora_B, float(scale), num_blocks, ids, bool(fan_in_fan_out))
    if torch.compiler.is_compiling() or _needs_grad(x, x_lora, weight, bias, lora_A, lora_B):
        return _linear_op(*args)
    return _backend_for(x).linear(*args)


# ---------------------------------------------------------------------------------------------------
# embedding: weight[ids] + scale * A^T[ids] B^T


def _embedding(ids, weight, lora_A, lora_B, scale, padding_idx, scale_grad_by_freq, sparse):
    """embedding on the backend for weight's device (checked arguments). scale_grad_by_freq and sparse
    shape only the gradient, so the kernel does not take them."""
    if _backend_for(weight) is _C:
        return _C.embedding(ids, weight, lora_A, lora_B, scale, padding_idx)
    return reference.embedding(ids, weight, lora_A, lora_B, scale, padding_idx, scale_grad_by_freq, sparse)


@torch.library.custom_op("lora_ext::embedding", mutates_args=())
def _embedding_op(ids: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                  padding_idx: Optional[int], scale_grad_by_freq: bool, sparse: bool) -> Tensor:
    return _embedding(ids, weight, lora_A, lora_B, scale, padding_idx, scale_grad_by_freq, sparse)


@_embedding_op.register_fake
def _(ids, weight, lora_A, lora_B, scale, padding_idx, scale_grad_by_freq, sparse):
    return weight.new_empty((*ids.shape, weight.shape[1]))


def _embedding_setup(ctx, inputs, output):
    ids, weight, lora_A, lora_B, scale, padding_idx, scale_grad_by_freq, sparse = inputs
    ctx.save_for_backward(ids, weight, lora_A, lora_B)
    ctx.args = (scale, padding_idx, scale_grad_by_freq, sparse)


def _embedding_backward(ctx, grad):
    ids, weight, lora_A, lora_B = ctx.saved_tensors
    needs = ctx.needs_input_grad[1:4]
    dw, dA, dB = reference.embedding_backward(grad, ids, weight, lora_A, lora_B, *ctx.args, needs)
    return None, dw, dA, dB, None, None, None, None


_embedding_op.register_autograd(_embedding_backward, setup_context=_embedding_setup)


def embedding(ids, weight, lora_A, lora_B, scale, *, padding_idx=None, max_norm=None, norm_type=2.0,
              scale_grad_by_freq=False, sparse=False):
    """A LoRA embedding's output. max_norm renormalises rows of `weight` in place (as nn.Embedding
    does); lora_A is never renormalised."""
    _check_tensor("weight", weight)
    _check_scale(scale)
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be an int32 or int64 tensor, got {getattr(ids, 'dtype', type(ids))}")
    num, dim = weight.shape
    # Embedding storage is the transposed layout: lora_A is (r, num_embeddings), lora_B (dim, r).
    _check_factors(lora_A, lora_B, dim, num, 1, [0])
    _check_same_device(ids=ids, weight=weight, lora_A=lora_A, lora_B=lora_B)
    if max_norm is not None:
        with torch.no_grad():
            torch.embedding_renorm_(weight, ids.contiguous(), max_norm, norm_type)
    args = (ids, weight, lora_A, lora_B, float(scale), padding_idx, bool(scale_grad_by_freq), bool(sparse))
    if torch.compiler.is_compiling() or _needs_grad(weight, lora_A, lora_B):
        return _embedding_op(*args)
    return _embedding(*args)


# ---------------------------------------------------------------------------------------------------
# convolution: the conv's weight plus its LoRA delta (the low-rank factors do not factor the conv itself)


def conv(conv_module, x, x_lora, lora_A, lora_B, scale):
    """A ConvLoRA layer's output: conv(x, W + scale * (B A).view(W.shape)); with dropout on the LoRA
    path, conv(x, W) + conv(x_lora, scale * (B A).view(W.shape))."""
    w = conv_module.weight
    if x_lora.shape != x.shape:
        raise ValueError(f"x_lora must have the shape of x {tuple(x.shape)}, got {tuple(x_lora.shape)}")
    delta = delta_weight(lora_A, lora_B, scale, out_features=lora_B.shape[0], dtype=w.dtype).view(w.shape)
    if x_lora is x:
        return conv_module._conv_forward(x, w + delta, conv_module.bias)
    return conv_module._conv_forward(x, w, conv_module.bias) + conv_module._conv_forward(x_lora, delta, None)
