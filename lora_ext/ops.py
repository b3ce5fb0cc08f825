"""The lora_ext op surface: one function per operation.

Every public op reads the same way:

1. its checks that cost nothing (scales, flags);
2. the fast path (`_fast_path`): an eager call on tensors the kernels take, with no autograd graph to
   record, goes straight to the kernels. Their C++ launchers check every argument before anything is
   launched; the Python checks run only when a launcher refuses, to word the refusal in this API's names
   (`_launch`). The Python checks cost several microseconds per call, and the custom-op dispatcher about
   50 us: more than a decode-size forward or a 4096 x 4096 merge takes on a GPU;
3. otherwise the Python checks, then the torch.library custom op (under torch.compile, or when autograd
   records the call) or the op's implementation directly.

Each op has one implementation (`_merge_impl`, `_swap_impl`, `_delta_impl`, `_linear_impl`,
`_embedding_impl`) that chooses the backend per call: `_kernels` (lora_ext._C for CUDA tensors when the
extension is built) for the tensors it takes, the pure-torch `reference` for everything else. The custom
ops (with their fake implementations and autograd formulas) call the same implementation. `_kernels` is the
one name a stand-in replaces: tests route CPU tensors to the SIMT simulator (lora_ext._sim, the same
launchers and C++ checks) with `use_kernels(_sim, "cpu")`.

Layout shared by every op (see reference.py): lora_A is (n*r, K), lora_B is (n*Nb, r) for the n enabled
blocks `block_ids` out of `num_blocks` output blocks of Nb features each; plain layers use num_blocks=1,
block_ids=[0].
"""
import contextlib
import functools
import math
import numbers
import weakref
from types import ModuleType
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch
from torch import Tensor

from . import lossless, reference, sharded
from .tracing import _eager_only, compiling, exporting as exporting  # (the op surface: ops.compiling() ...)
from .lossless import writes_now as _writes_now
from .lossless import MergeRecord
from .readable import plain, readable, transformed

try:
    from . import _C
except ImportError:
    _C = None
try:
    from . import _cpu
except ImportError:
    _cpu = None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Kernels:
    """A kernel backend: a module with lora_ext._C's functions, and the device type of the tensors it takes."""

    def __init__(self, module: Optional[ModuleType], device_type: str):
        self.module = module
        self.device_type = device_type
        # (Tensor.is_cuda / is_cpu: a quarter of the host time of t.device.type, on every forward)
        self._flag = {"cuda": "is_cuda", "cpu": "is_cpu"}.get(device_type)

    def takes(self, t, *others) -> bool:
        """Whether an op on tensor t (with the tensors `others` beside it) goes to these kernels: float64 and other
        devices go to the reference, and so does whatever the kernels may not read (lora_ext.readable: tensor
        subclasses, negative-bit views, tensors under a torch.func transform or forward-mode AD)."""
        if self.module is None or not isinstance(t, Tensor):
            return False
        here = getattr(t, self._flag) if self._flag is not None else t.device.type == self.device_type
        return here and t.dtype in KERNEL_DTYPES and readable(t, *others)


_kernels = Kernels(_C, "cuda")


def cuda_kernels_available() -> bool:
    """True when lora_ext was built with its CUDA kernels."""
    return _C is not None


@contextlib.contextmanager
def use_kernels(module: Optional[ModuleType], device_type: str) -> Iterator[Kernels]:
    """Routes tensors of `device_type` to `module`'s kernels while the context is open (for instance the
    simulator, lora_ext._sim, for CPU tensors). Not thread-safe: for tests and rehearsals."""
    global _kernels
    saved, _kernels = _kernels, Kernels(module, device_type)
    try:
        yield _kernels
    finally:
        _kernels = saved


def _needs_grad(*tensors):
    """Whether autograd records a call over `tensors`. An inference tensor (a layer built under
    torch.inference_mode) counts as a constant, as torch's own ops take it outside inference mode: saving it for a
    backward raises, and it gets no gradient. (Traced code asks no tensor that: dynamo cannot trace is_inference,
    and torch.compile of inference tensors is torch's own business.)"""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if isinstance(t, Tensor) and t.requires_grad and (compiling() or not t.is_inference()):
            return True
    return False


def traced() -> bool:
    """Whether a tracer records this call: torch.compile / torch.export (dynamo), or torch.jit.trace. Traced calls
    go through the custom ops, which the traces record as one call each: the kernels' pybind launchers are
    invisible to torch.jit.trace (it would record their output as a constant), and the reference's torch ops would
    bake a float scale in."""
    return compiling() or torch._C._is_tracing()  # (torch.jit.is_tracing, without its wrapper)


def _fast_path(t, differentiable=(), also=()):
    """The one fast-path predicate: an eager call (no tracer records it) whose tensor t the kernels take (with the
    tensors in `differentiable` and `also` beside it) and whose differentiable inputs need no gradient."""
    # (traced first: dynamo cannot trace the transform query in lora_ext.readable)
    return not traced() and _kernels.takes(t, *differentiable, *also) and not _needs_grad(*differentiable)


def _functorch() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, functionalize) or forward-mode AD runs this eager call:
    the custom ops' autograd is not functorch-aware ("an autograd.Function ... must override setup_context") and
    has no forward-mode formula, so the ops run the reference's torch ops, which those see through."""
    return not compiling() and transformed()


# (their answers come from tracing.compiling(): never compiled as frames of their own either, R5)
_eager_only(_needs_grad, traced, _functorch)


def _launch(impl: Callable, args: tuple, check: Callable):
    """impl(*args) without the Python checks; when the launcher refuses, `check(*args)` words the refusal
    in this API's names (it raises when it sees the problem; else the launcher's own message stands). A refusal
    wrote nothing (`weight_put_back`: see _writes_weight)."""
    try:
        return impl(*args)
    except (ValueError, TypeError) as err:
        err.weight_put_back = True
        try:
            check(*args)
        except BaseException as worded:
            worded.weight_put_back = True
            raise
        raise


def _kernel_factors(dtype, *factors):
    """The CUDA merge kernels read the factors in float32 or in the weight's dtype, all the same one."""
    if not all(isinstance(f, Tensor) and f.dtype in FLOAT_DTYPES for f in factors):
        raise TypeError("the factors must be float tensors")  # _launch's checks name the argument
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


_F32_MAX = float(torch.finfo(torch.float32).max)


def _past_float32(label: str, value: float) -> ValueError:
    return ValueError(f"{label} must be within float32's range (|{label.rsplit(' ', 1)[-1]}| <= 3.4e38: the kernels "
                      f"and backends compute with it as a float32, where it would be inf), got {value!r}")


def finite_real(label: str, value) -> float:
    """value as a float; ValueError naming `label` unless it is a finite real number within float32's range (bools
    refused; numpy scalars and one-element float tensors that need no grad taken)."""
    if type(value) is float and math.isfinite(value) and abs(value) <= _F32_MAX:  # (the common case, first: it runs
        return value                                                             # on every forward)
    if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
        if value.requires_grad:
            raise ValueError(f"{label} must be a number, got a {type(value).__name__} that requires grad: "
                             f"lora_ext's ops take it as a constant and give it no gradient, so a learned {label} "
                             f"would never learn; pass a number (or a tensor that needs no grad)")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{label} must be a finite number, got {value!r}")
    if abs(float(value)) > _F32_MAX:
        raise _past_float32(label, value)
    return float(value)


def _check_scale(scale):
    # While tracing, after a recompile for a new value, dynamo may make the scale a symbolic float, which
    # math.isfinite cannot take; layers check their scaling when it is set, and eager calls check here.
    if not compiling():
        finite_real("scale", scale)


def _scales(scale, scale_tensor, ref, where):
    """(scale, scale_tensor) for linear's, embedding's and conv's ops, beside tensor `ref` (the op's device and
    dtype). A tensor `scale` is read only when the op runs: the float is then None, and the op's backends read the
    tensor (a traced graph has no float of it to guard on or bake in). Its value is checked where that costs no
    device sync (eager, on the CPU; the layers' own tensors hold checked values). A float scale is checked and
    comes with the optional tensor copy the CUDA kernels read."""
    if not isinstance(scale, Tensor):  # (first: the eager path's host time)
        _check_scale(scale)
        return float(scale), scale_tensor
    device, dtype = (ref.device, ref.dtype) if isinstance(ref, Tensor) else (None, None)
    if scale_tensor is not None:
        raise ValueError("scale is a tensor: pass scale_tensor=None (a tensor scale is itself what the ops read)")
    _check_scale_tensor(scale, device, where, name="scale", dtype=dtype)
    if scale.device.type == "cpu" and not traced():
        finite_real("scale", scale.item())
    return None, scale.reshape(1)  # (a view: the ops read the caller's tensor)


def _host_scale(scale, scale_tensor):
    """The float the reference backend multiplies by: the scale, or when the scale is only a tensor, its value
    (read now: a host sync for a device tensor)."""
    return scale if scale is not None else scale_tensor.item()


def _saved_scale(ctx, scale, scale_tensor):
    """What the backward multiplies by: the float, or a copy of the scale tensor as it is now. A copy, so that a
    switch between this forward and its backward (which writes the layer's scale tensor in place) neither changes
    this forward's gradients nor trips autograd's in-place check. (Traced, the graph moves this copy into the
    backward: `_traced_scale` takes the one that counts, in the forward.)"""
    ctx.scale = scale if scale is not None else scale_tensor.detach().clone()


@torch.library.custom_op("lora_ext::scale_copy", mutates_args=())
def _scale_copy(scale_tensor: Tensor) -> Tensor:
    return scale_tensor.clone()


@_scale_copy.register_fake
def _(scale_tensor):
    return torch.empty_like(scale_tensor)


def _traced_scale(scale, scale_tensor, *tensors):
    """The scale tensor a traced op with autograd reads: a copy taken in the forward graph, which its backward
    saves. The graph's partitioners would move a copy used only by the backward into the backward, or recompute a
    plain clone there, from the layer's tensor as a later switch has rewritten it; an opaque op that the forward
    consumes is neither moved nor recomputed. (torch.jit.trace runs the ops' autograd eagerly: the copy that
    _saved_scale takes then. A copy recorded in its trace would be folded into a constant.)"""
    if scale is None and compiling() and _needs_grad(*tensors):
        return _scale_copy(scale_tensor)
    return scale_tensor


def _block_list(block_ids) -> list:
    """block_ids as a list, before any path reads it (the kernels' fast path leaves the other checks to the
    launcher, which takes a bool as the int it is). A bool is an int to Python: an enable_lora mask given by
    mistake, [False, True], was read as blocks 0 and 1 (u4)."""
    ids = list(block_ids)
    if any(isinstance(e, bool) for e in ids):
        raise ValueError(f"block_ids must be block indices, got {ids} (an enable_lora mask? give the indices of "
                         f"its True entries)")
    return ids


def _check_blocks(num_blocks, block_ids, out_features):
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
    if out_features % num_blocks:
        raise ValueError(
            f"num_blocks ({num_blocks}) must divide the output features ({out_features})")
    ids = _block_list(block_ids)
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
            f"got {tuple(lora_A.shape)}" + (f" (its {lora_A.shape[1]} columns do not match the weight's {in_features}: "
                                            f"a factor of another layer or transposed, or a weight resized after its "
                                            f"adapter was added, as by resize_token_embeddings, which must come before "
                                            f"injecting or loading adapters)"
                                            if lora_A.dim() == 2 and lora_A.shape[1] != in_features else ""))
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


def _rows_apart(w: Tensor) -> bool:
    """Whether the merge kernels take W's layout: column stride 1, rows at least a row apart (merge_host.h)."""
    return (w.size(1) <= 1 or w.stride(1) == 1) and (w.size(0) <= 1 or w.stride(0) >= w.size(1))


def _kernel_layout(weight: Tensor, transposed: bool):
    """(w, transposed, copied): the 2-D weight in a layout the merge kernels take. A column-major weight (a
    transposed view, or a checkpoint assigned as one) goes as its row-major transpose with the layout flag flipped:
    the same elements, each with the same sum. Another layout (every other column) goes as a contiguous copy, which
    the caller writes back (copied True). (K1: both were refused on CUDA, where the CPU merged them.)"""
    if _rows_apart(weight):
        return weight, transposed, False
    if _rows_apart(weight.t()):
        return weight.t(), not transposed, False
    return weight.contiguous(), transposed, True


def _merge_impl(weight, lora_A, lora_B, scale, num_blocks, block_ids, transposed):
    if _kernels.takes(weight, lora_A, lora_B):
        factors = _kernel_factors(weight.dtype, lora_A, lora_B)
        w, layout, copied = _kernel_layout(weight, transposed)
        _writes_now(weight)  # (the statement before the launch)
        _kernels.module.merge_(w, *factors, scale, num_blocks, block_ids, layout)
        if copied:
            weight.copy_(w)
    else:
        reference.merge_(weight, lora_A, lora_B, scale, num_blocks, block_ids, transposed, once=True)


@torch.library.custom_op("lora_ext::merge_", mutates_args=("weight",))
def _merge_op(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, num_blocks: int,
              block_ids: list[int], transposed: bool) -> None:
    _merge_impl(weight, lora_A, lora_B, scale, num_blocks, block_ids, transposed)


@_merge_op.register_fake
def _(weight, lora_A, lora_B, scale, num_blocks, block_ids, transposed):
    return None


def _check_merge_args(weight, lora_A, lora_B, scale, num_blocks, block_ids, transposed):
    """merge_'s argument checks; returns the block ids."""
    _check_tensor("weight", weight)
    out_features, in_features = _layer_shape(weight, transposed)
    ids = _check_factors(lora_A, lora_B, out_features, in_features, num_blocks, block_ids)
    _check_same_device(weight=weight, lora_A=lora_A, lora_B=lora_B)
    return ids


def inference_writes(*tensors):
    """A context for in-place writes into `tensors`: inside inference mode when one of them is an inference tensor
    (made under torch.inference_mode(): a model built, loaded or converted there) and inference mode is off, the
    only place torch lets one be written. Outside, torch raises after its kernel wrote (a view of) it, which would
    leave a tensor written under bookkeeping that says it was not (loralib's `.data` writes go through)."""
    if compiling():  # (the custom op's write, traced; dynamo refuses the checks below)
        return _NO_CONTEXT
    for t in tensors:
        if isinstance(t, Tensor) and t.is_inference():
            break
    else:
        return _NO_CONTEXT
    return _NO_CONTEXT if torch.is_inference_mode_enabled() else torch.inference_mode()


_NO_CONTEXT = contextlib.nullcontext()  # (reentrant: one for every call)


def overlap_refusal(weight) -> Optional[str]:
    """Why `weight` cannot be written in place element by element, or None: elements that share memory (a stride of
    0 over more than one element: an expand()ed tensor, which load_state_dict(assign=True) or a Parameter made from
    one puts in place). A merge would add one element's update into the others over the same memory (the lossless
    paths wrote it without a word; torch's own in-place add refuses)."""
    if not isinstance(weight, Tensor) or compiling():
        return None
    local = sharded.local(weight)
    if local.is_meta:
        return None
    try:
        overlap = torch._debug_has_internal_overlap(local)  # 0: none; 1: a stride of 0; 2: torch cannot tell
    except RuntimeError:  # (a tensor torch.func wraps, vmap's: no batching rule for it; its values are fresh)
        return None
    if overlap == 0 or (overlap == 2 and _strides_apart(local)):
        return None
    return (f"its weight's elements share memory (strides {tuple(local.stride())} for shape {tuple(local.shape)}: an "
            f"expand()ed, unfold()ed or as_strided tensor), and a merge writes every element in place; give the "
            f"weight memory of its own (weight.data = weight.detach().clone()), or serve the adapter unmerged")


def _strides_apart(t: Tensor) -> bool:
    """Whether no two elements of `t` lie at one address, shown from its strides: taken from the smallest, each
    dimension's stride passes the span of the ones before it (a slice of a larger tensor, a transposed view). Layouts
    that interleave without sharing (strides 2 and 3 over 2 x 2) fail the test and count as sharing."""
    span = 0
    for size, stride in sorted(((n, abs(st)) for n, st in zip(t.shape, t.stride()) if n > 1), key=lambda d: d[1]):
        if stride <= span:
            return False
        span += stride * (size - 1)
    return True


def _writes_weight(op):
    """An op that writes `weight` in place (merge_, unmerge_, swap_): an inference tensor inside inference mode
    (inference_writes); refused before anything is written when elements of the weight share memory."""
    @functools.wraps(op)
    def written(weight, *args, **kwargs):
        refusal = overlap_refusal(weight)
        if refusal is not None:
            raise ValueError(f"{op.__name__}: {refusal}")
        version = sharded.version(weight)
        try:
            with inference_writes(weight):
                return op(weight, *args, **kwargs)
        except BaseException as err:
            # the op's error says what the weight holds: as it was when its version counter did not move (nothing
            # written) or the op put it back, else as `weight_written`, `record` or `weight_is_base` say (a refusal,
            # ExceptionOverflow, puts back or says weight_written). Not said: an exception Python raised between
            # two statements of the op after its write (asynchronous): the layer then counts it written
            # (LoRALayer._writing's _WriteMark.wrote)
            if (version is None or sharded.version(weight) == version or isinstance(err, lossless.ExceptionOverflow)
                    or any(getattr(err, k, False) for k in ("weight_put_back", "weight_written", "weight_is_base"))
                    or hasattr(err, "record")):
                err.weight_settled = True
            raise
    return written


@_writes_weight
def merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, *, num_blocks: int = 1,
           block_ids: Sequence[int] = (0,), transposed: bool = False,
           lossless: bool = False) -> Optional[MergeRecord]:
    """Adds scale * B @ A into the 2-D `weight` in place (one rounding per element).

    transposed: weight is stored (in_features, out_features) (fan_in_fan_out, Embedding).
    num_blocks/block_ids: MergedLinear's output blocks; only the enabled ones are written.
    lossless: also return the record (lossless.MergeRecord, written in the same pass) with which unmerge_ and
    swap_ give the weight back bit for bit (docs/LOSSLESS.md); refused with lossless.ExceptionOverflow, the
    weight unchanged, when too many elements would need exceptions. Another error (out of memory, Ctrl-C) also
    leaves the weight unchanged, unless a note on it says otherwise.
    """
    _check_scale(scale)
    args = (weight, lora_A, lora_B, float(scale), num_blocks, _block_list(block_ids), bool(transposed))
    if lossless:
        _check_merge_args(*args)
        return _lossless_pass(weight, None, None, args[1:4], *args[4:], "merge_")
    if args[5] and _fast_path(weight, (weight, lora_A, lora_B)):
        _launch(_merge_impl, args, _check_merge_args)
    else:
        if not _check_merge_args(*args):
            return None  # no enabled block
        if traced():
            _merge_op(*args)
            return None
        if _needs_grad(weight, lora_A, lora_B):  # autograd records the reference's in-place add, on every device
            # (the kernels wrote the weight with no gradient to the factors: A.grad None on CUDA, 71.8 on the CPU, u4)
            reference.merge_(*args, once=True)
        else:
            _merge_impl(*args)
    torch.autograd.graph.increment_version(weight)
    return None


@_writes_weight
def unmerge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, *,
             record: Optional[MergeRecord] = None, **layout) -> None:
    """Subtracts what merge_ with the same arguments added (the same arithmetic with -scale); with the
    `record` a lossless merge_ returned, gives back the weight merge_ started from, bit for bit."""
    if record is None:
        merge_(weight, lora_A, lora_B, -scale, **layout)
        return
    _check_scale(scale)
    args = (weight, lora_A, lora_B, float(scale), layout.get("num_blocks", 1),
            _block_list(layout.get("block_ids", (0,))), bool(layout.get("transposed", False)))
    _check_merge_args(*args)
    _lossless_pass(weight, args[1:4], record, None, *args[4:], "unmerge_")


def _lossless_pass(weight, old, record, new, num_blocks, block_ids, transposed, where):
    """A lossless merge (old None), unmerge (new None) or switch: checks, then the backend; the new record."""
    if weight.dtype not in lossless.RECORD_DTYPES:
        raise ValueError(f"{where}: lossless merges take float16, bfloat16 or float32 weights, got {weight.dtype}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{where}: an in-place lossless merge into a weight that requires grad needs "
                           f"torch.no_grad()")
    if record is not None:
        record.check_for(weight, num_blocks, block_ids, transposed, where)
    n, rows, cols, _ = lossless.region(weight, num_blocks, block_ids, transposed)
    limit = lossless.exception_limit(n * rows * cols)
    # (the lossless kernels take row-major weights only: another layout goes to the reference's pass, whose record is
    # the same format; R1: a column-major weight was refused there, and the refusal left its layer refusing forwards)
    if _kernels.takes(weight, *(t for pair in (old, new) if pair is not None for t in pair[:2])) and _rows_apart(weight):
        rec = _kernel_lossless(weight, old, record, new, num_blocks, block_ids, transposed, limit, where)
    elif new is None:
        lossless.unmerge_(weight, *old, record, num_blocks, block_ids, transposed)
        rec = None
    elif old is None:
        rec = lossless.merge_(weight, *new, num_blocks, block_ids, transposed, limit, where)
    else:
        rec = lossless.swap_(weight, old, record, new, num_blocks, block_ids, transposed, limit, where)
    torch.autograd.graph.increment_version(weight)
    return rec


def _kernel_lossless(weight, old, record, new, num_blocks, block_ids, transposed, limit, where, capacity=None):
    """The kernels' lossless merge, unmerge or swap (one launch over W); the exception list sorted after.

    The list is first given room for lossless.first_capacity entries, not the limit: a pass that counts more
    exceptions than it had room for kept the base (and an escape) in the elements past the room, so the unmerge
    pass with what it did record gives the base back bit for bit; the merge then runs again from the base with
    room for exactly what it counted (a swap from the base is bit for bit a merge of the new adapter). Past the
    limit the op is refused instead, the weight as it was. An error before the record exists takes the pass
    back (_take_back)."""
    mod = _kernels.module
    pairs = [p for p in (old, new) if p is not None]
    factors = _kernel_factors(weight.dtype, *(t for p in pairs for t in p[:2]))
    layout = (num_blocks, block_ids, transposed)
    f_old = (factors[0], factors[1], old[2]) if old is not None else None
    f_new = (factors[-2], factors[-1], new[2]) if new is not None else None
    if f_new is None:
        _writes_now(weight)
        _unwritten_refusal(mod.unmerge_lossless_, weight, *f_old, *layout, record.codes, record.exc_index,
                           record.exc_bits)
        return None
    n, rows, cols, _ = lossless.region(weight, *layout)
    cap = lossless.first_capacity(n * rows * cols, limit) if capacity is None else capacity
    ln, rn = lossless.norms(f_new[0], f_new[1], n, transposed)
    codes = lossless.empty_codes(weight, n, rows, cols)
    exc_index = torch.empty(cap, dtype=torch.int64, device=weight.device)
    exc_bits = torch.empty(cap, dtype=torch.int32, device=weight.device)
    counter = torch.zeros(1, dtype=torch.int64, device=weight.device)
    g = lossless.gamma(f_new[0].shape[0] // max(n, 1))
    _writes_now(weight)
    if f_old is None:
        _unwritten_refusal(mod.merge_lossless_, weight, *f_new, *layout, ln, rn, g, codes, exc_index, exc_bits,
                           counter)
    else:
        _unwritten_refusal(mod.swap_lossless_, weight, *f_old, record.codes, record.exc_index, record.exc_bits,
                           *f_new, *layout, ln, rn, g, codes, exc_index, exc_bits, counter)
    try:  # the pass wrote W: an error from here on (out of memory in the sort, Ctrl-C) takes it back first
        count = int(counter.item())
        order = torch.argsort(exc_index[:min(count, cap)])
        rec = MergeRecord(codes, exc_index[order], exc_bits[order], weight.dtype, tuple(weight.shape), num_blocks,
                          tuple(block_ids), bool(transposed))
    except BaseException as err:
        if _take_back(err, weight, f_new, layout, codes, exc_index, exc_bits, counter, where):
            lossless.put_back(err)  # (W the base: a merge's weight as it was; a swap's says more below)
            if f_old is not None:
                _merge_back(err, weight, old, layout, max(limit, record.exceptions), where)
        raise
    if count <= cap:
        return rec
    # the elements past the room kept their base and an escape with no entry: unmerge leaves them alone
    lossless._give_back(functools.partial(mod.unmerge_lossless_, weight, *f_new, *layout, rec.codes, rec.exc_index,
                                          rec.exc_bits), where, "the first pass, past its room")
    del rec, codes, exc_index, exc_bits, order  # (before the next pass allocates its own)
    # The weight is the base now (a swap's old adapter taken out too).
    try:
        if count <= limit:
            return _kernel_lossless(weight, None, None, new, *layout, limit, where, capacity=count)
        raise lossless.ExceptionOverflow(lossless.overflow_message(where, count, limit, n * rows * cols))
    except BaseException as err:  # refused, or the rerun failed (out of memory, Ctrl-C): a merge leaves the base
        if not getattr(err, "weight_written", False):  # (else W is not the base: as it is)
            lossless.put_back(err)
            if f_old is not None:
                _merge_back(err, weight, old, layout, max(limit, record.exceptions), where)
        raise


def _unwritten_refusal(launcher, *args):
    """launcher(*args), a lossless kernel's; its ValueError or TypeError (an argument check, made before anything is
    launched) says the weight was not written (`weight_put_back`, as _launch's): else the layer took the refusal
    for a write that failed part way, and refused every forward until a load."""
    try:
        launcher(*args)
    except (ValueError, TypeError) as err:
        err.weight_put_back = True
        raise


def _take_back(err, weight, f_new, layout, codes, exc_index, exc_bits, counter, where) -> bool:
    """A pass that wrote W and whose record could not be built (`err`): W given back as it was before the pass (the
    base, for a swap), with the pass's codes and its exception list sorted on the host, in place (no device memory:
    out of memory may be why `err` came). False, with a note on `err` and `err.weight_written` True, when that fails
    too: W then holds the new merge without a record."""
    from .named_adapters import deferred_interrupt  # (named_adapters imports this module)
    try:
        with deferred_interrupt():
            kept = min(int(counter.item()), exc_index.numel())
            index, bits = exc_index[:kept], exc_bits[:kept]
            on_host, order = index.cpu().sort()
            index.copy_(on_host)
            bits.copy_(bits.cpu()[order])
            _kernels.module.unmerge_lossless_(weight, *f_new, *layout, codes, index, bits)
        return True
    except BaseException as again:
        lossless.written_without_record(err, where, "the new adapter's merge", again)
        return False


def _merge_back(err, weight, old, layout, limit, where):
    """A swap that failed after its pass was undone (the weight holds the base): the old adapter merged back, as
    a lossless merge on this backend, and `err.record` set to its record. Bit for bit the weight before the swap
    when the old merge was made on this backend too (another backend's rounds some elements by an ulp: the
    weight and err.record then agree with each other, not with the old record). If that merge fails as well,
    `err.weight_is_base` is True: the weight holds the base, no adapter merged; unless that merge wrote the weight
    and could not take its pass back: the weight then holds the old merge, or part of it, without a new record, as
    a note on `err` says, and `err.weight_written` is set (the old record gives that back only when the old merge
    was made on this backend and the pass was whole: a layer does not count on it)."""
    from .named_adapters import deferred_interrupt  # (named_adapters imports this module)
    try:
        with deferred_interrupt():
            err.record = _kernel_lossless(weight, None, None, old, *layout, limit, where)
    except BaseException as again:
        if getattr(again, "weight_written", False):
            err.add_note(f"lora_ext {where}: the old adapter was merged back, but its record could not be made "
                         f"({again!r})")
            err.weight_written = True
        else:
            err.weight_is_base = True
        err.__context__ = again


# ---------------------------------------------------------------------------------------------------
# swap_: replace one merged adapter by another in a single pass over the weight
#
# W += s2 * B2 @ A2 - s1 * B1 @ A1 is one update of rank r1 + r2. On CUDA one kernel reads both factor pairs
# (no stacked copy, nothing else launched); the reference stacks them along the rank and merges once. Each
# weight element is read and written once, with one rounding, as for a merge.


def _check_finite_scaling(label, scaling):
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling):
        raise ValueError(f"{label} must be a finite number, got {scaling!r}")
    if abs(scaling) > _F32_MAX:
        raise _past_float32(label, scaling)


def check_finite(name: str, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 weight_dtype: Optional[torch.dtype] = None) -> None:
    """Raises ValueError naming `name` unless the scaling and every factor value are finite, and
    scaling * lora_B stays finite in the compute precision. With weight_dtype, also unless the update
    scaling * B @ A is bounded within that dtype's range (|update| <= |scaling| * r * max|A| * max|B|, a bound
    that can refuse an update whose true values would fit). What the weight itself holds is the layers'
    check at write time (layers.LoRALayer._weight_room)."""
    _check_finite_scaling(f"{name}: scaling", scaling)
    _check_values([(name, lora_A, lora_B, scaling)], weight_dtype)


def _comparable(t: Tensor) -> Tensor:
    """`t`, or a float32 copy where torch has no min/max for its dtype (float8 types)."""
    return t.float() if t.is_floating_point() and t.element_size() == 1 else t


def _check_values(adapters, weight_dtype=None):
    """check_finite's value checks for several (name, lora_A, lora_B, scaling), with one device sync per
    device: NaN propagates through min and max, and inf shows in one of them."""
    tensors = [t for _, a, b, _ in adapters for t in (a, b) if t.numel()]
    by_device = {}
    for t in tensors:
        by_device.setdefault(sharded.local(t).device, []).append(t)
    extremes = {}
    for group in by_device.values():
        # (each extreme made float64 before it is stacked: CPU autocast's stack fails on float16 tensors under
        # bfloat16 autocast and the reverse, "Unexpected floating ScalarType", c2)
        values = torch.stack([torch.stack([v.double() for v in torch.aminmax(_comparable(sharded.full(t)))])
                              for t in group]).tolist()
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
            if weight_dtype is not None and lora_A.numel():
                a_lo, a_hi = extremes[id(lora_A)]
                bound = abs(scaling) * lora_B.shape[1] * max(-a_lo, a_hi) * max(-lo, hi)
                if bound > torch.finfo(weight_dtype).max:  # (a bound; the update itself, where it may be less:
                    # an SVD's factors put the singular values in B and entries near 1 in A's weak rows, s3)
                    bound = abs(scaling) * _update_max(lora_A, lora_B)
                if bound > torch.finfo(weight_dtype).max:
                    raise ValueError(f"{name}: the update scaling * B @ A reaches {bound:.3g}, beyond "
                                     f"{weight_dtype}'s range ({torch.finfo(weight_dtype).max:.3g})")


@torch.no_grad()
def _update_max(lora_A: Tensor, lora_B: Tensor, elements: int = 1 << 22) -> float:
    """max |B @ A| in float64 (B's rows in blocks, each with its block of A's rows where A holds several: a
    MergedLinear's), in pieces of at most `elements` (32 MiB; at least one row and column)."""
    A, B = sharded.full(lora_A).detach(), sharded.full(lora_B).detach()
    r = B.shape[1]
    blocks = A.shape[0] // r if r else 1
    per = B.shape[0] // blocks if blocks else B.shape[0]
    cols = max(1, min(A.shape[1], elements))
    rows = max(1, elements // cols)
    top = torch.zeros((), dtype=torch.float64, device=A.device)
    for i in range(max(blocks, 1)):
        for c in range(0, A.shape[1], cols):
            a = A[i * r:(i + 1) * r, c:c + cols].double()
            for start in range(i * per, (i + 1) * per, rows):
                top = torch.maximum(top, (B[start:min(start + rows, (i + 1) * per)].double() @ a).abs().amax())
    return float(top)


def _swap_impl(weight, old_A, old_B, old_scale, new_A, new_B, new_scale, num_blocks, block_ids, transposed):
    small, large = sorted((abs(old_scale), abs(new_scale)))
    if 0 < small < large * torch.finfo(torch.float32).tiny and _kernels.takes(weight, old_A, old_B, new_A, new_B):
        # the kernel folds the smaller scale into a float32 multiplier of the other (merge_host.h apply_swap):
        # below float32's normal range it lost its adapter's term (K1: scales 1e38 apart, 7.86 off): two merges
        _merge_impl(weight, old_A, old_B, -old_scale, num_blocks, block_ids, transposed)
        _merge_impl(weight, new_A, new_B, new_scale, num_blocks, block_ids, transposed)
        return
    if _kernels.takes(weight, old_A, old_B, new_A, new_B):
        a1, b1, a2, b2 = _kernel_factors(weight.dtype, old_A, old_B, new_A, new_B)
        w, layout, copied = _kernel_layout(weight, transposed)
        _writes_now(weight)  # (the statement before the launch)
        _kernels.module.swap_(w, a1, b1, old_scale, a2, b2, new_scale, num_blocks, block_ids, layout)
        if copied:
            weight.copy_(w)
    else:
        reference.swap_(weight, old_A, old_B, old_scale, new_A, new_B, new_scale, num_blocks, block_ids,
                        transposed)


def _check_swap_args(weight, old_A, old_B, old_scale, new_A, new_B, new_scale, num_blocks, block_ids,
                     transposed):
    """swap_'s argument checks (scales apart); returns the block ids."""
    _check_tensor("weight", weight)
    out_features, in_features = _layer_shape(weight, transposed)
    ids = _check_factors(new_A, new_B, out_features, in_features, num_blocks, block_ids, "new_A", "new_B")
    _check_factors(old_A, old_B, out_features, in_features, num_blocks, block_ids, "old_A", "old_B")
    _check_same_device(weight=weight, old_A=old_A, old_B=old_B, new_A=new_A, new_B=new_B)
    return ids


@_writes_weight
def swap_(weight: Tensor, old_A: Tensor, old_B: Tensor, old_scale: float, new_A: Tensor, new_B: Tensor,
          new_scale: float, *, num_blocks: int = 1, block_ids: Sequence[int] = (0,), transposed: bool = False,
          check_values: bool = True, record: Optional[MergeRecord] = None,
          pair_order: Optional[int] = None) -> Optional[MergeRecord]:
    """weight += new_scale * delta(new_A, new_B) - old_scale * delta(old_A, old_B), in place, in one pass.

    record: the lossless record of the old adapter's merge (merge_(..., lossless=True)); the switch then gives
    the base back exactly and merges the new adapter from it, returning the new record: the weight is
    bit-identical to merging the new adapter once into the base. On lossless.ExceptionOverflow (or another
    error the kernels' pass met after undoing its first try: out of memory, Ctrl-C) the old adapter is merged
    back and the error's `record` attribute is its record: the weight is bit for bit what it was when the old
    merge was made on the same backend (CPU or kernels; the other rounds some elements by an ulp, the weight
    then agreeing with the new record). `weight_is_base` True on the error: that merge failed too, and the
    weight holds the base.

    Layout arguments as for ops.merge_; the two adapters may differ in rank. Non-finite scales, and with
    check_values non-finite factor values (or a scaled lora_B that overflows), raise before anything is
    written. check_values=False is for callers that know the values are finite: the check costs a device
    sync, more than the pass itself for a 4096 x 4096 weight on a GPU.

    A lossy swap back (b -> a after a -> b) rounds as the exact negation of the swap there, so that switching back
    and forth does not drift (_swap_order): the pairs are ordered by their values, which reads the factors (a
    device sync for CUDA factors, once per four tensor objects). pair_order is for callers that know the two
    adapters by name: 1 when the new adapter comes first in a fixed order of the two (the same for the switch
    back), -1 when the old one does; a wrong order costs that antisymmetry, never the update's value.
    """
    for what, scale in (("new", new_scale), ("old", old_scale)):
        _check_finite_scaling(f"swap_: the {what} adapter's scaling", scale)
    args = (weight, old_A, old_B, float(old_scale), new_A, new_B, float(new_scale), num_blocks,
            _block_list(block_ids), bool(transposed))
    # the value checks below read the factors before any launcher sees them
    fast = (bool(args[8]) and all(isinstance(t, Tensor) for t in (old_A, old_B, new_A, new_B))
            and _fast_path(weight, (weight, old_A, old_B, new_A, new_B)))
    if record is not None:
        fast = False
    if not fast and not _check_swap_args(*args):
        return record  # no enabled block
    if check_values:
        _check_values([("swap_: the new adapter", new_A, new_B, new_scale),
                       ("swap_: the old adapter", old_A, old_B, old_scale)])
    if record is not None:
        return _lossless_pass(weight, args[1:4], record, args[4:7], *args[7:], "swap_")
    order = pair_order if pair_order in (1, -1) else _swap_order(old_A, old_B, args[3], new_A, new_B, args[6])
    if order == 0:
        if fast:  # (the launcher's checks, which the fast path leaves to it, are not reached)
            _check_swap_args(*args)
        return None  # the same adapter in and out: an update of exactly zero, nothing written
    given = args  # (refusals name the arguments as given)
    if order > 0:  # the pairs in their canonical order, each with the other's sign: the same update
        args = (weight, new_A, new_B, -args[6], old_A, old_B, -args[3], *args[7:])
    # No custom op: a switch is a serving-time operation, outside any traced graph or autograd record.
    if fast:
        _launch(_swap_impl, args, lambda *_: _check_swap_args(*given))
    elif _needs_grad(weight, old_A, old_B, new_A, new_B):  # (as merge_: autograd records it on every device)
        reference.swap_(*args)
    else:
        _swap_impl(*args)
    torch.autograd.graph.increment_version(weight)
    return None


def _swap_order(old_A: Tensor, old_B: Tensor, old_scale: float, new_A: Tensor, new_B: Tensor,
                new_scale: float) -> int:
    """A lossy swap's pair order, so that switching back rounds exactly as switching there did, negated.

    Every backend sums the two pairs' products in an order fixed by their positions (old, new), and floating-point
    rounding is symmetric under negation but not under reordering: were a -> b summed (b, a) and b -> a summed
    (a, b), the two updates would differ by a rounding error that every round trip adds again, the same each time,
    so a float32 weight served by switching drifts from its base in a straight line (3e-3 relative after 2,000
    round trips of a 64 x 64 layer, measured). So the pairs go to the backend in an order fixed by their values:
    0 when they are the same adapter (rank, scale and factor values), 1 when the new pair goes first (in the old
    pair's place, each pair with the other's sign: the same update), -1 when it stays second. The new pair then
    goes first in a -> b exactly when the old one did in b -> a, and the update of b -> a is that of a -> b with
    every term negated: bit for bit its negation (the kernels' multiplier mult = m_x / m_y is unchanged by the
    negation, its scale negated). The comparison reads the factors: rank, scale, then the first element where the
    factors differ, which for CUDA factors costs a device sync. The order is kept for the four tensor objects
    compared while they live and their version counters stand (weak references: switching back and forth
    between the same tensors compares them once); by object, not by address, since an address reused by other
    values would keep an order that no longer mirrors its reverse's, and that round trip would drift."""
    keys = ((old_A.shape[0], float(old_scale)), (new_A.shape[0], float(new_scale)))
    if keys[0] != keys[1]:
        return 1 if keys[1] < keys[0] else -1
    tensors = (old_A, old_B, new_A, new_B)
    if any(t.is_inference() for t in tensors):  # (no version counter: in-place writes unseen, so not kept)
        return _swap_order_by_values(*tensors)
    key = tuple((id(t), t._version, t.data_ptr()) for t in tensors)
    kept = _swap_orders.get(key)
    if kept is not None and all(ref() is t for ref, t in zip(kept[1], tensors)):
        return kept[0]
    order = _swap_order_by_values(*tensors)
    if order == 0:  # (not kept: values written without a version bump, through .numpy(), would make it skip a write)
        return order
    try:
        refs = tuple(weakref.ref(t) for t in tensors)
    except TypeError:  # (a tensor that takes no weak reference: not kept)
        return order
    if len(_swap_orders) >= 256:
        _swap_orders.clear()
    _swap_orders[key] = (order, refs)
    return order


_swap_orders: Dict[tuple, tuple] = {}  # _swap_order's, by the four tensors' ids and versions: (order, weak refs)


def _swap_order_by_values(old_A: Tensor, old_B: Tensor, new_A: Tensor, new_B: Tensor) -> int:
    """_swap_order for pairs of one rank and scale: by the first element where the factors differ."""
    for x, y in ((old_A, new_A), (old_B, new_B)):
        if x.shape != y.shape:  # (one factor's shape follows the other's here: never for valid pairs)
            return 1 if tuple(y.shape) < tuple(x.shape) else -1
        dtype = torch.promote_types(x.dtype, y.dtype)
        x, y = x.detach().to(dtype).reshape(-1), y.detach().to(dtype).reshape(-1)
        differ = x != y
        if not bool(differ.any()):
            continue
        i = int(differ.to(torch.uint8).argmax())  # the first element where they differ
        return 1 if bool(y[i] < x[i]) else -1
    return 0


def _eager_function(*tensors) -> bool:
    """Whether a call of a differentiable op takes its eager Function (below) rather than its custom op: not traced,
    and every tensor a plain Tensor or Parameter. A tensor subclass's __torch_dispatch__ takes the custom op whole
    and runs it on its inner tensors (TwoTensor), or refuses it by name (DTensor: no sharding rule); the Function
    would run the reference's torch ops on the wrapper, whose in-place writes into a plain result the wrapper
    does not see (a silently wrong delta_weight)."""
    return not traced() and plain(*tensors)


def _eager_autograd(op: str, body: Callable, setup: Callable, backward: Callable) -> type:
    """Custom op `op`'s autograd (its setup_context and backward) as a plain torch.autograd.Function over the op's
    body, for the eager calls that need gradients: the same forward, saved tensors and backward, without the custom
    op's round trip through the dispatcher and torch.library's Python wrappers (default filling, dynamo's disable
    wrapper, the redispatch), about 150 us of host time per call on the CPU: more than a whole small layer's
    forward on a GPU (bench/NOTES-host-time.md). Traced calls (torch.compile, torch.export, torch.jit.trace) keep
    the custom op, which the traces record as one call; torch.func transforms take the reference's torch ops
    (`_functorch`), and tensor subclasses the custom op (`_eager_function`): none reaches this class. The callers
    pass every argument. (The setup runs inside forward, the old style: a Function with a setup_context
    staticmethod has each call's arguments bound to the forward's signature with inspect, another 50 us.)"""

    def forward(ctx, *args):
        out = body(*args)
        setup(ctx, args, out)
        return out

    return type(f"_{op.title().replace('_', '')}Eager", (torch.autograd.Function,), {
        "__doc__": f"The eager autograd of lora_ext::{op} (see ops._eager_autograd).",
        "forward": staticmethod(forward), "backward": staticmethod(backward)})


# ---------------------------------------------------------------------------------------------------
# delta_weight: the dense scale * delta-W (MergedLinear: zero outside the enabled blocks)


def _delta_shape(lora_A, lora_B, num_blocks, block_ids, transposed):
    nb = lora_B.shape[0] // len(block_ids)
    rows, cols = num_blocks * nb, lora_A.shape[1]
    return (cols, rows) if transposed else (rows, cols)


def _delta_impl(lora_A, lora_B, scale, num_blocks, block_ids, transposed, dtype):
    if not (_kernels.takes(lora_A, lora_B) and dtype in KERNEL_DTYPES):
        return reference.delta_weight(lora_A, lora_B, scale, num_blocks, block_ids, transposed, dtype)
    out = lora_A.new_empty(_delta_shape(lora_A, lora_B, num_blocks, block_ids, transposed), dtype=dtype)
    _kernels.module.delta_weight_(out, *_kernel_factors(dtype, lora_A, lora_B), scale, num_blocks, block_ids,
                                  transposed)
    return out


def _delta_body(lora_A: Tensor, lora_B: Tensor, scale: float, num_blocks: int, block_ids: list[int],
                transposed: bool, dtype: torch.dtype) -> Tensor:
    return _delta_impl(lora_A, lora_B, scale, num_blocks, block_ids, transposed, dtype)


_delta_weight_op = torch.library.custom_op("lora_ext::delta_weight", _delta_body, mutates_args=())


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
_DeltaEager = _eager_autograd("delta_weight", _delta_body, _delta_setup, _delta_backward)


def delta_weight(lora_A: Tensor, lora_B: Tensor, scale: float, *, out_features: int, num_blocks: int = 1,
                 block_ids: Sequence[int] = (0,), transposed: bool = False,
                 dtype: Optional[torch.dtype] = None) -> Tensor:
    """scale * B @ A as a dense weight in storage layout (transposed: (in, out)), zero-padded for
    MergedLinear's disabled blocks; differentiable with respect to lora_A and lora_B."""
    _check_scale(scale)
    in_features = lora_A.shape[1] if isinstance(lora_A, Tensor) and lora_A.dim() == 2 else None
    ids = _check_factors(lora_A, lora_B, out_features, in_features, num_blocks, block_ids)
    if not ids:
        raise ValueError("delta_weight needs at least one enabled block in block_ids")
    _check_same_device(lora_A=lora_A, lora_B=lora_B)
    args = (lora_A, lora_B, float(scale), num_blocks, ids, bool(transposed), dtype or lora_A.dtype)
    if _fast_path(lora_A, (lora_A, lora_B)):
        return _delta_impl(*args)  # checked above: this op's checks cost little beside a dense output
    if _functorch():
        return reference.delta_weight(*args)
    if _eager_function(lora_A, lora_B):
        return _DeltaEager.apply(*args)
    return _delta_weight_op(*args)


# ---------------------------------------------------------------------------------------------------
# linear: F.linear(x, W, bias) + scale * (x_lora A^T) B^T, into the enabled column blocks


def _linear_impl(x, x_lora, weight, bias, lora_A, lora_B, scale, num_blocks, block_ids, fan_in_fan_out,
                 scale_tensor=None):
    """scale None: scale_tensor is the scale (see _scales)."""
    if _kernels.takes(x, x_lora, weight, bias, lora_A, lora_B, scale_tensor):
        return _kernels.module.linear(x, x_lora, weight, bias, lora_A, lora_B, 0.0 if scale is None else scale,
                                      num_blocks, block_ids, fan_in_fan_out, scale_tensor)
    return reference.linear(x, x_lora, weight, bias, lora_A, lora_B, _host_scale(scale, scale_tensor), num_blocks,
                            block_ids, fan_in_fan_out)


def _own(out: Tensor) -> Tensor:
    """What a custom op returns: out, or where it is a view, a tensor of its own over the same memory (as torch's
    matmul returns). A custom op's output that is a view refuses in-place writes under autograd ("a view ...
    created inside a custom Function": `layer(x).relu_()`, `h += residual`), which nn.Linear's and loralib's outputs
    take, and FSDP2 warns of modules returning views. The reference returns views of its flat results (so does
    F.embedding inside an op); the kernels' host code allocates outputs in their own shapes. (Only the ops: the
    eager paths without autograd keep their views, as torch's own layers return some, and save the call.)"""
    return torch.ops.aten._unsafe_view(out, out.shape) if out._is_view() else out


def _linear_body(x: Tensor, x_lora: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                 lora_B: Tensor, scale: Optional[float], num_blocks: int, block_ids: list[int],
                 fan_in_fan_out: bool, scale_tensor: Optional[Tensor] = None) -> Tensor:
    return _own(_linear_impl(x, x_lora, weight, bias, lora_A, lora_B, scale, num_blocks, block_ids, fan_in_fan_out,
                             scale_tensor))


_linear_op = torch.library.custom_op("lora_ext::linear", _linear_body, mutates_args=())


@_linear_op.register_fake
def _(x, x_lora, weight, bias, lora_A, lora_B, scale, num_blocks, block_ids, fan_in_fan_out, scale_tensor=None):
    out_features = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    return x.new_empty((*x.shape[:-1], out_features))


def _linear_setup(ctx, inputs, output):
    # (scale_tensor may be left out: the op's schema defaults it, as calls made before it existed do)
    x, x_lora, weight, bias, lora_A, lora_B, scale, num_blocks, block_ids, fan_in_fan_out, scale_tensor = \
        (*inputs, None)[:11]
    # Only what the gradients asked for read (as F.linear saves): x for the weight's, x_lora for the factors',
    # the weight for x's. A tensor saved but not needed would refuse an in-place write between forward and backward
    # that loralib's layers take: `h += layer(h)` with lora_dropout (x_lora is then another tensor than x, and a
    # frozen weight's gradient never reads x).
    dx, dxl, dw, _, dA, dB = ctx.needs_input_grad[:6]
    ctx.save_for_backward(x if dw else None, x_lora if dA or dB else None, weight if dx else None, lora_A, lora_B)
    _saved_scale(ctx, scale, scale_tensor)
    ctx.args = (block_ids, fan_in_fan_out, x.shape, x_lora.dtype, weight.dtype)


def _linear_backward(ctx, grad):
    x, x_lora, weight, lora_A, lora_B = ctx.saved_tensors
    block_ids, fan_in_fan_out, x_shape, x_lora_dtype, weight_dtype = ctx.args
    needs = ctx.needs_input_grad[:6]
    grads = reference.linear_backward(grad, x, x_lora, weight, lora_A, lora_B, ctx.scale, block_ids,
                                      fan_in_fan_out, needs, x_shape, x_lora_dtype, weight_dtype)
    return (*grads, None, None, None, None, None)


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)
_LinearEager = _eager_autograd("linear", _linear_body, _linear_setup, _linear_backward)


# ---------------------------------------------------------------------------------------------------
# autocast: lora_ext.linear follows autocast as F.linear does (its floating inputs in autocast's dtype, the op
# with autocast off). The rule is registered for the custom op (torch.compile and autograd reach the op through
# the dispatcher) and applied by ops.linear itself on the paths that call the implementation directly.
# embedding and delta_weight need none: an embedding lookup is not autocast (loralib's result stays in the
# weight's dtype), and a convolution casts its own inputs.


_autocast_dtype = reference.autocast_dtype
autocast_eligible = reference.autocast_eligible
autocast_fresh = reference.autocast_fresh  # (the layers' merged forwards call it here)


def _autocast_cast(dtype, tensors):
    """The tensors among `tensors` (x first) that autocast casts in dtype (floating ones, float64 excepted: torch's
    rule, so that a float64 layer computes in float64 under autocast, as F.linear does; and none where x is float64,
    whose op computes in float64 as outside autocast: float32 factors rounded to 16 bits first were 7e-2 off), each
    tensor cast once: x given again as x_lora (no dropout) stays one tensor (one cast and one cast's backward)."""
    if isinstance(tensors[0], Tensor) and tensors[0].dtype == torch.float64:
        return tuple(tensors)
    done = {}
    out = []
    for t in tensors:
        if autocast_eligible(t):
            if id(t) not in done:
                done[id(t)] = t.to(dtype)
            t = done[id(t)]
        out.append(t)
    return tuple(out)


_autocast_lib = torch.library.Library("lora_ext", "FRAGMENT")


def _register_autocast(op_name: str, device_type: str) -> None:
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    overload = getattr(torch.ops.lora_ext, op_name).default

    def rule(_keyset, *args):
        # the op's six operand tensors, not its float32 scale tensor (the last argument)
        cast = _autocast_cast(torch.get_autocast_dtype(device_type), args[:6])
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return overload(*cast, *args[6:])

    _autocast_lib.impl(op_name, rule, key, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    _register_autocast("linear", _device_type)


def _check_scale_tensor(scale_tensor, device, where, name="scale_tensor", dtype=None):
    """A scale tensor: one element, float32 (float64 also where `dtype`, the op's, is float64: the reference
    backend reads it), on `device`, not requiring grad (the ops give it no gradient)."""
    if scale_tensor is None:
        return
    dtypes = (torch.float32, torch.float64) if dtype == torch.float64 else (torch.float32,)
    if not (isinstance(scale_tensor, Tensor) and scale_tensor.dtype in dtypes and scale_tensor.numel() == 1
            and scale_tensor.device == device and not scale_tensor.requires_grad):
        got = (f"{scale_tensor.dtype} of {scale_tensor.numel()} element(s) on {scale_tensor.device}"
               + (" that requires grad" if scale_tensor.requires_grad else "")
               if isinstance(scale_tensor, Tensor) else type(scale_tensor).__name__)
        what = "a float or" if name == "scale" else "None or"
        kinds = " or float64" if len(dtypes) == 2 else ""
        raise ValueError(f"{name} must be {what} a float32{kinds} tensor of one element on {where}'s device "
                         f"({device}) that does not require grad, got {got}")


def _check_linear_args(x, x_lora, weight, bias, lora_A, lora_B, scale, num_blocks, block_ids, fan_in_fan_out,
                       scale_tensor=None):
    """linear's argument checks (scale apart); returns the block ids."""
    _check_tensor("weight", weight)
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
    if scale_tensor is not None:
        _check_scale_tensor(scale_tensor, x.device, "x", dtype=x.dtype)
    return ids


def linear(x: Tensor, x_lora: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
           scale, *, num_blocks: int = 1, block_ids: Sequence[int] = (0,),
           fan_in_fan_out: bool = False, scale_tensor: Optional[Tensor] = None) -> Tensor:
    """A LoRA linear layer's output. x_lora is the input of the low-rank path (x after lora_dropout;
    pass x itself when there is no dropout).

    scale: a float, or a one-element float32 tensor (float64 also for a float64 op) on x's device, read only when
    the op runs (the layers pass theirs when traced: the graph then follows a switch of adapter, whatever its
    scaling, with no guard on the value and no retrace; a float32 tensor gives a float64 op its float32 value).
    scale_tensor: with a float scale, optionally that scale again as a float32 tensor; the CUDA kernels read it
    when they run, so a captured CUDA graph follows later in-place changes of it. The other paths use the float:
    the caller keeps the two equal."""
    scale, scale_tensor = _scales(scale, scale_tensor, x, "x")
    cast = _autocast_dtype(x)
    if cast is not None and not compiling():
        # as the registered autocast rule (below) does for the custom op, on every path: the floating inputs in
        # autocast's dtype, the op itself with autocast off
        tensors = _autocast_cast(cast, (x, x_lora, weight, bias, lora_A, lora_B))
        with torch.autocast(x.device.type, enabled=False):
            return linear(*tensors, scale_tensor if scale is None else scale, num_blocks=num_blocks,
                          block_ids=block_ids, fan_in_fan_out=fan_in_fan_out,
                          scale_tensor=None if scale is None else scale_tensor)
    args = (x, x_lora, weight, bias, lora_A, lora_B, scale, num_blocks, _block_list(block_ids), bool(fan_in_fan_out),
            scale_tensor)
    if _fast_path(x, args[:6], also=(scale_tensor,)):
        return _launch(_kernels.module.linear, (*args[:6], 0.0 if scale is None else scale, *args[7:]),
                       _check_linear_args)
    if scale is not None:  # past the fast path a float scale serves alone, as it always did (the tensor beside it is
        args = (*args[:10], None)  # for the kernels' captured graphs); a tensor goes on where it is the scale
    if not _check_linear_args(*args):
        return torch.nn.functional.linear(x, weight.t() if fan_in_fan_out else weight, bias)
    if traced() or _needs_grad(*args[:6]):
        if _functorch():
            return reference.linear(*args[:6], _host_scale(scale, scale_tensor), *args[7:10])
        if _eager_function(*args[:6], args[10]):
            return _LinearEager.apply(*args)
        return _linear_op(*args[:10], _traced_scale(scale, scale_tensor, *args[:6]))
    return _linear_impl(*args)


# ---------------------------------------------------------------------------------------------------
# embedding: weight[ids] + scale * A^T[ids] B^T


def _embedding_impl(ids, weight, lora_A, lora_B, scale, padding_idx, scale_grad_by_freq, sparse,
                    scale_tensor=None):
    """scale_grad_by_freq and sparse shape only the gradient, so the kernel does not take them. scale None:
    scale_tensor is the scale (see _scales)."""
    if _kernels.takes(weight, ids, lora_A, lora_B, scale_tensor):
        return _kernels.module.embedding(ids, weight, lora_A, lora_B, 0.0 if scale is None else scale, padding_idx,
                                         scale_tensor)
    return reference.embedding(ids, weight, lora_A, lora_B, _host_scale(scale, scale_tensor), padding_idx,
                               scale_grad_by_freq, sparse)


def _embedding_body(ids: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: Optional[float],
                    padding_idx: Optional[int], scale_grad_by_freq: bool, sparse: bool,
                    scale_tensor: Optional[Tensor] = None) -> Tensor:
    return _own(_embedding_impl(ids, weight, lora_A, lora_B, scale, padding_idx, scale_grad_by_freq, sparse,
                                scale_tensor))


_embedding_op = torch.library.custom_op("lora_ext::embedding", _embedding_body, mutates_args=())


@_embedding_op.register_fake
def _(ids, weight, lora_A, lora_B, scale, padding_idx, scale_grad_by_freq, sparse, scale_tensor=None):
    return weight.new_empty((*ids.shape, weight.shape[1]))


def _embedding_setup(ctx, inputs, output):
    ids, weight, lora_A, lora_B, scale, padding_idx, scale_grad_by_freq, sparse, scale_tensor = (*inputs, None)[:9]
    # the weight's row count, not the weight: max_norm renormalises its rows in place at every lookup, so a second
    # forward before the backward would trip autograd's check on a saved weight (nn.Embedding's does not)
    ctx.save_for_backward(ids, lora_A, lora_B)
    _saved_scale(ctx, scale, scale_tensor)
    ctx.args = (weight.shape[0], padding_idx, scale_grad_by_freq, sparse)


def _embedding_backward(ctx, grad):
    ids, lora_A, lora_B = ctx.saved_tensors
    needs = ctx.needs_input_grad[1:4]
    dw, dA, dB = reference.embedding_backward(grad, ids, lora_A, lora_B, ctx.scale, *ctx.args, needs)
    return None, dw, dA, dB, None, None, None, None, None


_embedding_op.register_autograd(_embedding_backward, setup_context=_embedding_setup)
_EmbeddingEager = _eager_autograd("embedding", _embedding_body, _embedding_setup, _embedding_backward)


def _check_embedding_args(ids, weight, lora_A, lora_B, scale, padding_idx, scale_grad_by_freq, sparse,
                          scale_tensor=None):
    _check_tensor("weight", weight)
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be an int32 or int64 tensor, got {getattr(ids, 'dtype', type(ids))}")
    num, dim = weight.shape
    # Embedding storage is the transposed layout: lora_A is (r, num_embeddings), lora_B (dim, r).
    _check_factors(lora_A, lora_B, dim, num, 1, [0])
    _check_same_device(ids=ids, weight=weight, lora_A=lora_A, lora_B=lora_B)
    if scale_tensor is not None:
        _check_scale_tensor(scale_tensor, weight.device, "weight", dtype=weight.dtype)


def embedding(ids: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale, *,
              padding_idx: Optional[int] = None, max_norm: Optional[float] = None, norm_type: float = 2.0,
              scale_grad_by_freq: bool = False, sparse: bool = False,
              scale_tensor: Optional[Tensor] = None) -> Tensor:
    """A LoRA embedding's output. max_norm renormalises rows of `weight` in place (as nn.Embedding
    does); lora_A is never renormalised. scale and scale_tensor: as for linear, on weight's device."""
    scale, scale_tensor = _scales(scale, scale_tensor, weight, "weight")
    if (isinstance(padding_idx, int) and not isinstance(padding_idx, bool) and isinstance(weight, Tensor)
            and weight.dim() == 2 and -weight.shape[0] <= padding_idx < 0):
        # counted from the end, as F.embedding counts it (the backward took -1 for "no padding": the padding row's
        # gradient summed 32.6 where torch gives 0, u4)
        padding_idx += weight.shape[0]
    args = (ids, weight, lora_A, lora_B, scale, padding_idx, bool(scale_grad_by_freq), bool(sparse), scale_tensor)
    # max_norm writes the weight before the lookup: checked first, whatever the path.
    fast = max_norm is None and _fast_path(weight, (weight, lora_A, lora_B), also=(ids, scale_tensor))
    if fast:
        return _launch(_embedding_impl, args, _check_embedding_args)
    if scale is not None:  # past the fast path a float scale serves alone (as in linear)
        args = (*args[:8], None)
    _check_embedding_args(*args)
    if max_norm is not None:
        with torch.no_grad():
            torch.embedding_renorm_(weight, ids.contiguous(), max_norm, norm_type)
    if traced() or _needs_grad(weight, lora_A, lora_B):
        if _functorch():
            return reference.embedding(*args[:4], _host_scale(scale, scale_tensor), *args[5:8])
        if _eager_function(*args[:4], args[8]):
            return _EmbeddingEager.apply(*args)
        return _embedding_op(*args[:8], _traced_scale(scale, scale_tensor, weight, lora_A, lora_B))
    return _embedding_impl(*args)


# ---------------------------------------------------------------------------------------------------
# mixed batches: out[m] += scales[i] * (x[m] @ a_slots[i]) @ b_slots[i], i = index[m // tokens_per_index], for
# rows whose group has a slot (i >= 0); the adapters live in slots stacked per layer (lora_ext.batched). In
# place on `out` (the base layer's output), inference only.


def _batched_impl(kind, out, x, a_slots, b_slots, scales, index, tokens_per_index):
    if _kernels.takes(out, x, a_slots, b_slots, scales, index, tokens_per_index):
        return getattr(_kernels.module, f"batched_{kind}_")(out, x, a_slots, b_slots, scales, index,
                                                           tokens_per_index)
    cpu = _cpu_batched(out, x, kind)
    if cpu is not None:
        return cpu(out, x, a_slots, b_slots, scales, index, tokens_per_index)
    return getattr(reference, f"batched_{kind}_")(out, x, a_slots, b_slots, scales, index, tokens_per_index)


def _cpu_batched(out, x, kind):
    """The C++ CPU loops (lora_ext._cpu) for CPU tensors they take, else None."""
    if (_cpu is None or not isinstance(out, Tensor) or out.device.type != "cpu" or out.dtype not in KERNEL_DTYPES
            or not readable(out, x)):
        return None
    return getattr(_cpu, f"batched_{kind}_", None)


@torch.library.custom_op("lora_ext::batched_linear_", mutates_args=("out",))
def _batched_linear_op(out: Tensor, x: Tensor, a_slots: Tensor, b_slots: Tensor, scales: Tensor, index: Tensor,
                       tokens_per_index: int) -> None:
    _batched_impl("linear", out, x, a_slots, b_slots, scales, index, tokens_per_index)


@torch.library.custom_op("lora_ext::batched_embedding_", mutates_args=("out",))
def _batched_embedding_op(out: Tensor, ids: Tensor, a_slots: Tensor, b_slots: Tensor, scales: Tensor,
                          index: Tensor, tokens_per_index: int) -> None:
    _batched_impl("embedding", out, ids, a_slots, b_slots, scales, index, tokens_per_index)


@_batched_linear_op.register_fake
def _(out, x, a_slots, b_slots, scales, index, tokens_per_index):
    return None


@_batched_embedding_op.register_fake
def _(out, ids, a_slots, b_slots, scales, index, tokens_per_index):
    return None


def _check_batched_args(kind, out, x, a_slots, b_slots, scales, index, tokens_per_index):
    x_name = "ids" if kind == "embedding" else "x"
    for name, t, dim in (("out", out, 2), ("a_slots", a_slots, 3), ("b_slots", b_slots, 3)):
        _check_tensor(name, t, dim)
        if t.dtype != out.dtype:
            raise ValueError(f"{name} must have out's dtype {out.dtype}, got {t.dtype}")
    if kind == "embedding":
        if not isinstance(x, Tensor) or x.dim() != 1 or x.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids must be a 1-D int32 or int64 tensor, got "
                             f"{getattr(x, 'dtype', type(x))} of shape {tuple(getattr(x, 'shape', ()))}")
    else:
        _check_tensor("x", x)
        if x.dtype != out.dtype:
            raise ValueError(f"x must have out's dtype {out.dtype}, got {x.dtype}")
        if x.shape[1] != a_slots.shape[1]:
            raise ValueError(f"x has {x.shape[1]} features, a_slots holds factors of {a_slots.shape[1]}")
    slots, _, rank = a_slots.shape
    if tuple(b_slots.shape) != (slots, rank, out.shape[1]):
        raise ValueError(f"b_slots must have shape {(slots, rank, out.shape[1])} (slots, rank, out features) for "
                         f"a_slots {tuple(a_slots.shape)} and out {tuple(out.shape)}, got {tuple(b_slots.shape)}")
    if x.shape[0] != out.shape[0]:
        raise ValueError(f"{x_name} has {x.shape[0]} rows and out {out.shape[0]}")
    if not isinstance(scales, Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != (slots,):
        raise ValueError(f"scales must be a float32 tensor of shape ({slots},), got "
                         f"{getattr(scales, 'dtype', type(scales))} {tuple(getattr(scales, 'shape', ()))}")
    if isinstance(tokens_per_index, bool) or not isinstance(tokens_per_index, int) or tokens_per_index < 1:
        raise ValueError(f"tokens_per_index must be a positive int, got {tokens_per_index!r}")
    if (not isinstance(index, Tensor) or index.dtype != torch.int32 or index.dim() != 1
            or index.numel() * tokens_per_index != out.shape[0]):
        raise ValueError(f"index must be a 1-D int32 tensor of {out.shape[0]} // {tokens_per_index} entries (one per "
                         f"group of tokens_per_index rows), got {getattr(index, 'dtype', type(index))} of shape "
                         f"{tuple(getattr(index, 'shape', ()))}")
    for name, t in (("out", out), ("a_slots", a_slots), ("b_slots", b_slots), (x_name, x)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    _check_same_device(out=out, **{x_name: x}, a_slots=a_slots, b_slots=b_slots, scales=scales, index=index)


def _batched(kind, out, x, a_slots, b_slots, scales, index, tokens_per_index):
    args = (out, x, a_slots, b_slots, scales, index, tokens_per_index)
    if _needs_grad(out, x, a_slots, b_slots):
        raise RuntimeError(f"lora_ext.ops.batched_{kind}_ serves inference and records no gradient: call it under "
                           f"torch.no_grad() or torch.inference_mode(), on tensors that do not require grad")
    if (_fast_path(out, also=(x, a_slots, b_slots, scales, index, tokens_per_index))
            or (not traced() and _cpu_batched(out, x, kind) is not None)):
        # the CUDA launchers and the C++ CPU loops check every argument themselves
        return _launch(functools.partial(_batched_impl, kind), args, functools.partial(_check_batched_args, kind))
    _check_batched_args(kind, *args)
    if traced():
        op = _batched_linear_op if kind == "linear" else _batched_embedding_op
        return op(*args)
    return _batched_impl(kind, *args)


def batched_linear_(out: Tensor, x: Tensor, a_slots: Tensor, b_slots: Tensor, scales: Tensor, index: Tensor,
                    tokens_per_index: int = 1) -> None:
    """Mixed-batch LoRA update, in place: out[m] += scales[i] * (x[m] @ a_slots[i]) @ b_slots[i] with
    i = index[m // tokens_per_index], for every row whose i >= 0; rows with i = -1 are left as they are.

    out (M, d) and x (M, k) of one dtype; a_slots (S, k, R): each slot holds an adapter's A^T, b_slots (S, R, d)
    its B^T, zero-padded to the common rank R; scales (S,) float32; index (M // tokens_per_index,) int32. The
    shrink accumulates in float32 (float64 for float64), and each element of out is rounded once. Inference
    only (no autograd)."""
    _batched("linear", out, x, a_slots, b_slots, scales, index, tokens_per_index)


def batched_embedding_(out: Tensor, ids: Tensor, a_slots: Tensor, b_slots: Tensor, scales: Tensor, index: Tensor,
                       tokens_per_index: int = 1) -> None:
    """batched_linear_ for an Embedding: ids (M,) int64/int32, a_slots (S, num_embeddings, R) (an adapter's A^T
    per slot); row m gets scales[i] * a_slots[i, ids[m]] @ b_slots[i]."""
    _batched("embedding", out, ids, a_slots, b_slots, scales, index, tokens_per_index)


def batched_conv(conv_module: torch.nn.Module, x: Tensor, deltas: Tensor, scales: Tensor, index: Tensor,
                 sub: Optional[Tensor] = None) -> Tensor:
    """A convolution's output for a mixed batch (a ConvLoRA's conv, an nn.Conv1d/2d/3d, with its weight W and bias):
    row n is conv(x[n]) (the conv's stride, padding, padding_mode, dilation and groups) plus conv(x[n], scales[i] *
    deltas[i] viewed as W) with i = index[n] >= 0, minus the same with j = sub[n] >= 0 (a merged adapter taken out);
    rows with neither (-1) are the plain convolution of the batch, bit for bit.

    x (N, C_in, ...) batched (the row first); deltas (S, d, k), floating: each slot's B A in ConvLoRA's layout (d * k
    = the weight's elements; a mixed batch's LayerSlots keep them, written with the slot); scales (S,) float32;
    index and sub (N,) int32. In float32 (float64 for float64), rounded once; pure torch on every device (with the
    index on the host, rows grouped by their slots, each group convolved once with W + its update; elsewhere no host
    sync). Inference only (no autograd)."""
    _check_batched_conv_args(conv_module, x, deltas, scales, index, sub)
    return reference.batched_conv(conv_module, x, deltas, scales, index, sub)


def _check_batched_conv_args(conv, x, deltas, scales, index, sub):
    weight = getattr(conv, "weight", None)
    if (not isinstance(conv, torch.nn.modules.conv._ConvNd) or getattr(conv, "transposed", False)
            or not isinstance(weight, Tensor)):
        raise ValueError(f"conv_module must be an nn.Conv1d, Conv2d or Conv3d, got {type(conv).__name__}")
    spatial = weight.dim() - 2
    if not isinstance(x, Tensor) or x.dim() != spatial + 2 or x.shape[1] != conv.in_channels:
        raise ValueError(f"x must be a batched {spatial + 2}-D tensor (rows, {conv.in_channels} channels, {spatial} "
                         f"spatial dimensions) for the conv's {tuple(weight.shape)} weight, got "
                         f"{tuple(getattr(x, 'shape', ()))}")
    _check_tensor("deltas", deltas, 3)
    if deltas.shape[1] * deltas.shape[2] != weight.numel():
        raise ValueError(f"deltas must be (slots, d, k) with d * k = {weight.numel()}, the conv weight's elements, "
                         f"got {tuple(deltas.shape)}")
    if not deltas.is_contiguous():
        raise ValueError("deltas must be contiguous")
    slots = deltas.shape[0]
    if not isinstance(scales, Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != (slots,):
        raise ValueError(f"scales must be a float32 tensor of shape ({slots},), got "
                         f"{getattr(scales, 'dtype', type(scales))} {tuple(getattr(scales, 'shape', ()))}")
    for name, t in (("index", index), ("sub", sub)):
        if t is None and name == "sub":
            continue
        if not isinstance(t, Tensor) or t.dtype != torch.int32 or tuple(t.shape) != (x.shape[0],):
            raise ValueError(f"{name} must be a 1-D int32 tensor of {x.shape[0]} entries (one per row), got "
                             f"{getattr(t, 'dtype', type(t))} of shape {tuple(getattr(t, 'shape', ()))}")
        if not compiling() and t.device.type == "cpu" and t.numel() \
                and (int(t.min()) < -1 or int(t.max()) >= slots):
            raise ValueError(f"{name} entries must be slots in [0, {slots}) or -1, got {int(t.min())} to "
                             f"{int(t.max())}")
    _check_same_device(x=x, deltas=deltas, scales=scales, index=index, sub=sub, weight=weight)
    if _needs_grad(x, deltas):
        raise RuntimeError("lora_ext.ops.batched_conv serves inference and records no gradient: call it under "
                           "torch.no_grad() or torch.inference_mode(), on tensors that do not require grad")


# ---------------------------------------------------------------------------------------------------
# convolution: the conv's weight plus its LoRA delta (the low-rank factors do not factor the conv itself)


def conv(conv_module: torch.nn.Module, x: Tensor, x_lora: Tensor, lora_A: Tensor, lora_B: Tensor, scale,
         scale_tensor: Optional[Tensor] = None) -> Tensor:
    """A ConvLoRA layer's output: conv(x, W + scale * (B A).view(W.shape)); with dropout on the LoRA
    path, conv(x, W) + conv(x_lora, scale * (B A).view(W.shape)). scale_tensor: as for linear (the delta is
    then computed unscaled and multiplied by it, so a captured CUDA graph follows it)."""
    w = conv_module.weight
    if x_lora.shape != x.shape:
        raise ValueError(f"x_lora must have the shape of x {tuple(x.shape)}, got {tuple(x_lora.shape)}")
    scale, scale_tensor = _scales(scale, scale_tensor, w, "the conv weight")
    if scale is not None:  # (a tensor scale was checked by _scales; this is the float's companion)
        _check_scale_tensor(scale_tensor, w.device, "the conv weight", dtype=w.dtype)
    # without dropout, W + delta is added in float32 (at least) and rounded once, as a merge writes it: a delta
    # past the weight's dtype that W cancels stays finite, and the forward is the merged layer's
    wide = reference.compute_dtype(w.dtype) if x_lora is x else w.dtype
    if scale_tensor is None:
        delta = delta_weight(lora_A, lora_B, scale, out_features=lora_B.shape[0], dtype=wide)
    else:
        # B A in float32 (at least), times the scale tensor, rounded once. The product saves the scale for the
        # backward: a copy of it as it is now, where a switch before the backward would write the layer's tensor
        # in place (not in a torch.jit trace, which would fold a copy of the tensor into a constant)
        unscaled = delta_weight(lora_A, lora_B, 1.0, out_features=lora_B.shape[0],
                                dtype=reference.compute_dtype(w.dtype))
        if compiling():
            scale_tensor = _traced_scale(None, scale_tensor, lora_A, lora_B)
        elif not torch.jit.is_tracing() and _needs_grad(lora_A, lora_B):
            scale_tensor = scale_tensor.clone()
        delta = unscaled * scale_tensor
    if x_lora is x:
        return conv_module._conv_forward(x, (w.to(delta.dtype) + delta.view(w.shape)).to(w.dtype), conv_module.bias)
    delta = delta.to(w.dtype).view(w.shape)
    return (conv_module._conv_forward(x, reference.autocast_fresh(w), conv_module.bias)
            + conv_module._conv_forward(x_lora, delta, None))
