"""loralib-compatible LoRA layers.

The layers own the parameters and the merge state; every bit of LoRA arithmetic goes through lora_ext.ops.
Differences from loralib 0.1.2 (its bugs, fixed):
- train()/eval() return the module;
- what was merged is remembered (a copy of A and B, r * (in + out) elements), so unmerging after
  lora_A/lora_B changed restores the true base weight;
- state_dict() always holds the base (unmerged) weight, and loading into a merged layer re-merges, so no
  checkpoint is ever merged twice;
- merges are in place on the parameter itself, so autograd sees them (version counter);
- MergedLinear with no enabled group, Conv1d/Conv3d with kernel_size > 1 and tuple kernel sizes work;
- lora_dropout is an nn.Module (layers pickle and deepcopy) and ConvLoRA applies it;
- low-precision base weights work with fp32 LoRA parameters.

Serving additions: a layer holds named adapters (named_adapters.NamedAdapters: the registry, its value
stamps, set_adapter), and a per-layer lock makes merge, unmerge and switch atomic with respect to forward
calls of the same layer on other threads.
"""
import collections
import contextlib
import copy
import functools
import itertools
import math
import numbers
import os
import sys
import threading
import warnings
import weakref
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch import Tensor
from torch.nn.modules import module as _nn_module
from torch.multiprocessing.reductions import StorageWeakRef

from . import batched, ddp_guard, forks, lossless, ops, reference, sharded, ties, tracing
from .named_adapters import (MERGED, NamedAdapters, _EPOCHS, _stamp, _unchanged, deferred_interrupt,
                             switch_started)
from .streams import StreamOrder


def _remerge_after_load(module, incompatible_keys):
    with module._lock:
        loading = module.__dict__.pop("_loading_broken", None)
        if loading is not None:
            # a broken layer (see _writing) whose weight this load was to bring: sound again only if it did (the
            # Parameter replaced, assign=True, or written; ConvLoRA's conv writes it after the layer's
            # _load_from_state_dict, before this hook)
            param, version, factors = loading
            weight = module._weight_or_none()
            # (an inference tensor has no version counter: the load reached this hook, so torch wrote it)
            if weight is not None and (weight is not param or version is None or weight._version != version) \
                    and (factors or not module.__dict__.get("_broken_factors")):
                module.__dict__.update(_broken=None, _broken_factors=False)
        before = module.__dict__.pop("_weight_before_load", None)
        if module._remerge_pending:
            weight = module._weight_or_none()
            if before is not None and weight is not None and weight is not before and not weight.is_meta \
                    and not sharded.is_dtensor(weight):
                # load_state_dict(assign=True): the weight is the caller's tensor now (its state dict's, another
                # model's). Tied by the load to a module loaded before this one (a tied model's state): unmerged, as
                # eval() leaves a tied weight, the tie kept. Else the merge writes a copy of its own, not the caller's
                # memory (a module the same load gives that tensor after this hook, later in the model's order, then
                # holds the caller's tensor, and this layer its copy: the tie is not seen)
                tied = ties.names(module)
                if tied:
                    module._remerge_pending = False
                    warnings.warn(f"{module._describe()}: load_state_dict(assign=True) ties its weight to "
                                  f"{', '.join(tied)}; adapter {module.active_adapter!r} is left unmerged (merging "
                                  f"would change their outputs too)", stacklevel=3)
                    return
                module._weight_owner()._parameters["weight"] = nn.Parameter(weight.detach().clone(),
                                                                            requires_grad=weight.requires_grad)
            with deferred_interrupt():  # (as in train())
                module._remerge_pending = False
                # not over a merge made since the load let the lock go (a model's merge_adapter on another thread:
                # the adapter twice in the weight, h38), nor inside a disable_adapter block begun since (the base)
                if not module.merged and not module._adapter_off:
                    try:
                        module._merge()
                        module.merged = True
                    except lossless.ExceptionOverflow as err:
                        if getattr(err, "weight_written", False):
                            raise
                        # as eval(): the adapter served right unmerged. Raised here, inside torch's load, it stopped
                        # the load at this layer (the modules after it never loaded, still merged with the old
                        # factors) under a message saying nothing changed (t3)
                        warnings.warn(f"{module._describe()}: load_state_dict leaves adapter "
                                      f"{module.active_adapter!r} unmerged: {err}", stacklevel=_user_stacklevel())


def _base_into_state(module, state, prefix, local_metadata):
    """Every layer's first state_dict post-hook: LoRALayer._base_into_state."""
    module._base_into_state(state, prefix, local_metadata)


def _first_post_hook(module) -> None:
    """_base_into_state first among the module's state_dict post-hooks (registered by __init__; a layer pickled
    before it was, or whose hooks were rearranged, gets it back in front)."""
    hooks = module._state_dict_hooks
    if next(iter(hooks.values()), None) is _base_into_state:
        return
    for key in [k for k, h in hooks.items() if h is _base_into_state]:
        del hooks[key]
    handle = module.register_state_dict_post_hook(_base_into_state)
    hooks.move_to_end(handle.id, last=False)  # (in place: the user's hooks stay, each under its handle's key)


_OPERANDS = ("weight", "bias", "lora_A", "lora_B")


def _same_storage(a: Tensor, b: Tensor) -> bool:
    a, b = sharded.local(a), sharded.local(b)
    if a.is_meta or b.is_meta:
        return a is b
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


_MERGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # the weights merges write

_INTERNAL = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)


def _user_stacklevel(also: Tuple[str, ...] = ()) -> int:
    """warnings.warn's stacklevel, for a warning its caller gives, that names the first frame outside torch and
    lora_ext (a setattr reaches the layers through torch's hooks, by paths of several depths), and outside the
    packages named in `also`."""
    packages = tuple(os.sep + name + os.sep for name in also)
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(_INTERNAL)
                                 or any(part in frame.f_code.co_filename for part in packages)):
        frame, level = frame.f_back, level + 1
    return level


def instance_forward(module: nn.Module) -> bool:
    """Whether a `forward` set on the instance replaces its class's (accelerate's add_hook_to_module sets one; its
    remove_hook_from_module sets the class's own back, bound to the module, which is not counted)."""
    forward = module.__dict__.get("forward")
    return forward is not None and not (getattr(forward, "__self__", None) is module
                                        and getattr(forward, "__func__", None) is type(module).forward)


# A module's hooks by kind, which a layer put in its place does not run (torch's global hooks apply to it as they
# did): torch's dicts of them (the first holds every hook of the kind; the others, keyed by the same handle ids, say
# how some are called) and the backward kind's flag; they move together (injection.carry_hooks)
HOOKS = (("forward pre-hooks", ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")),
         ("forward hooks", ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
         ("backward hooks", ("_backward_hooks",)), ("backward pre-hooks", ("_backward_pre_hooks",)),
         ("state_dict hooks", ("_state_dict_hooks",)), ("state_dict pre-hooks", ("_state_dict_pre_hooks",)),
         ("load_state_dict pre-hooks", ("_load_state_dict_pre_hooks",)),
         ("load_state_dict post-hooks", ("_load_state_dict_post_hooks",)))
CALL_HOOKS = ("forward pre-hooks", "forward hooks", "backward hooks", "backward pre-hooks")  # (run by a call)


def users_hooks(module: nn.Module) -> Dict[str, list]:
    """{kind: handle ids} of the hooks of `module`'s users (users_hook), by kind (see HOOKS)."""
    found = {}
    for kind, (attr, *_) in HOOKS:
        hooks = module.__dict__.get(attr) or {}
        ids = [i for i, hook in hooks.items() if users_hook(hook)]  # (items: a layer's _PreHooks hides none)
        if ids:
            found[kind] = ids
    return found


def users_hook(hook) -> bool:
    """Whether a module hook is its users' (not torch's own, as FSDP2's, nor lora_ext's: a layer's remerge after a
    load, the model lock's)."""
    owner = getattr(hook, "__module__", None) or ""
    return not (owner == "torch" or owner.startswith(("torch.", "lora_ext.")))


def _hook_parts(hook) -> list:
    """The hooks an accelerate `_hf_hook` is made of (a SequentialHook's, or itself; none for None)."""
    return [h for h in getattr(hook, "hooks", (hook,)) if h is not None]


def offloaded(module: nn.Module) -> bool:
    """Whether an accelerate hook on this module (or on a ConvLoRA's conv, which holds its weight) offloads its
    tensors (an AlignDevicesHook with offload=True: cpu_offload, disk_offload, dispatch_model's "cpu"/"disk"
    modules): they lie on the meta device and their values in the hook's weights_map, which it puts back for each
    forward (a write into them would not reach it)."""
    modules = (module, module._modules.get("conv")) if isinstance(module, ConvLoRA) else (module,)
    return any(getattr(h, "offload", False) for m in modules if m is not None
               for h in _hook_parts(getattr(m, "_hf_hook", None)))


def meta_refusal(module: nn.Module) -> str:
    """Why the weight or factors of this module (a lora_ext layer, or the plain module a load would replace), on the
    meta device, hold nothing to write or read."""
    if offloaded(module):
        return ("accelerate offloads them (its hook keeps their values and puts them back for each forward, where "
                "lora_ext's writes cannot reach); load, merge and switch before offloading, or after "
                "accelerate.hooks.remove_hook_from_submodules(model)")
    return ("no values yet (a model built on the meta device: load them first), or an accelerate hook on a module "
            "above offloads them (preload_module_classes: load, merge and switch before offloading)")


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors of one shape and dtype hold the same elements bit for bit (NaN payloads, -0.0)."""
    if a.is_floating_point() and a.element_size() in (2, 4, 8):
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.contiguous().view(view), b.contiguous().view(view)
    return torch.equal(a, b)


def _distances(new: Tensor, old: Tensor, base: Tensor, chunk: int = 1 << 22) -> Tuple[float, float, float, float]:
    """||new - old||, ||new - base||, ||old - base||, ||old|| in float64, a chunk of elements at a time (no
    weight-sized float64 copies), with one device sync. (Non-finite elements count as equal where both are the same
    non-finite value.)"""
    flat = [t.detach().reshape(-1) for t in (new, old, base)]
    sums = torch.zeros(4, dtype=torch.float64, device=new.device)
    for i in range(0, flat[0].numel(), chunk):
        a, b, c = (t[i:i + chunk].to(torch.float64) for t in flat)
        sums += torch.stack([_diff(a, b).square().sum(), _diff(a, c).square().sum(), _diff(b, c).square().sum(),
                             b.nan_to_num(0.0, 0.0, 0.0).square().sum()])
    return tuple(sums.sqrt().tolist())


def _rounded(new: Tensor, old: Tensor, rows: int = 64):
    """Which rounding of `old`'s values `new` shows, or False: "cast", `old` cast to new's narrower dtype, or through
    bfloat16 or float16 and back, is `new` bit for bit (a cast's copy, not merely values such a dtype holds: a
    bfloat16 checkpoint of a new base holds those too); or "levels", in every row (or group of columns), few distinct
    values (a quantizer's levels: at most half the row) each the level nearest `old`'s value (a quantized new base of
    its own is not; levels held in half precision are allowed their rounding). Tried on `rows` rows spread over the
    weight before the whole."""
    new, old = new.detach(), old.detach()
    casts = [new.dtype] if new.element_size() < old.element_size() else []
    casts += [d for d in (torch.bfloat16, torch.float16) if torch.finfo(d).bits < torch.finfo(new.dtype).bits]
    for narrow in casts:
        # (the first rows first: a weight that is no such copy is told from them, without a pass over the whole)
        if _cast_of(old[:rows], new[:rows], narrow) and _cast_of(old, new, narrow):
            return "cast"
    flat = new.reshape(new.shape[0], -1) if new.dim() else new.reshape(1, 1)
    cols = flat.shape[1]
    if cols < 16 or new.dtype != old.dtype or not new.is_floating_point():
        return False
    olds = old.reshape(flat.shape)
    if not (bool(flat.isfinite().all()) and bool(olds.isfinite().all())):
        return False
    # (a 2-D weight also by its columns: a fan_in_fan_out layer stores the quantizer's output channels as columns)
    levels = _levels_by_rows(flat, olds, rows) or (new.dim() == 2 and flat.shape[0] >= 16 and _levels_by_rows(
        flat.t().contiguous(), olds.t().contiguous(), rows))
    return "levels" if levels else False


def _levels_by_rows(flat: Tensor, olds: Tensor, rows: int) -> bool:
    """_rounded's quantizer test of a 2-D `flat` against `olds`, by rows: a row quantized whole, or in groups of g
    columns (GPTQ's, AWQ's: each group its own levels): each grouping tried on a few rows spread over the weight first
    (a new base fails there, without sorting them all), then on all rows (a new revision changing some rows only)."""
    cols = flat.shape[1]
    pick = torch.linspace(0, flat.shape[0] - 1, min(rows, flat.shape[0]), device=flat.device).long()
    return any(all(_nearest_levels(n.double().reshape(-1, g), o.double().reshape(-1, g))
                   for n, o in ((flat[pick[:4]], olds[pick[:4]]), (flat[pick], olds[pick]), (flat, olds)))
               for g in [cols] + [g for g in (32, 64, 128) if cols % g == 0 and cols > g])


def _cast_of(old: Tensor, new: Tensor, narrow: torch.dtype) -> bool:
    """Whether `new` is `old` cast to `narrow` and back to new's dtype (NaN where old's cast is NaN)."""
    back = old.to(narrow).to(new.dtype)
    return bool(((back == new) | (back.isnan() & new.isnan())).all())


def _nearest_levels(new: Tensor, old: Tensor) -> bool:
    """Whether every group (row) of `new` holds at most half as many distinct values as elements (a quantizer's
    levels), each element the level nearest the `old` element's value: old lies between the midpoints to the
    neighbouring levels (the outermost levels take what lies beyond them: clipping). A new base of its own, quantized,
    moves elements further than that. float64, finite."""
    levels, _ = new.sort(dim=1)
    if bool(((levels.diff(dim=1) != 0).sum(dim=1) + 1 > new.shape[1] // 2).any()):
        return False
    inf = torch.full((new.shape[0], 1), float("inf"), dtype=new.dtype, device=new.device)
    padded = torch.cat([-inf, levels, inf], dim=1)
    below = padded.gather(1, torch.searchsorted(levels, new, right=False))  # the largest level under the element
    above = padded.gather(1, torch.searchsorted(levels, new, right=True) + 1)  # the smallest level over it
    # (levels kept in half precision, as float16 / bfloat16 scales make them: each off by up to 2^-8 of itself)
    slack = torch.maximum(1e-6 * (levels[:, -1:] - levels[:, :1]).abs(),
                          2.0 ** -8 * torch.maximum(levels[:, -1:].abs(), levels[:, :1].abs()))
    return bool(((old >= (below + new) / 2 - slack) & (old <= (above + new) / 2 + slack)).all())


def _diff(a: Tensor, b: Tensor) -> Tensor:
    """a - b, 0 where both hold the same value (inf - inf, NaN), inf where only one is not finite."""
    d = a - b
    same = (a == b) | (a.isnan() & b.isnan())
    return torch.where(same, torch.zeros_like(d), d.nan_to_num(float("inf"), float("inf"), float("inf")))


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` would run more than its class's forward: any hook (nn.Module._call_impl's own
    test), or a `forward` set on the instance (accelerate's add_hook_to_module wraps it there)."""
    m = _nn_module
    return bool("forward" in module.__dict__ or module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks or m._global_forward_hooks
                or m._global_forward_pre_hooks or m._global_backward_hooks or m._global_backward_pre_hooks)


def _in_functional_call() -> bool:
    """Whether torch's functional_call (torch.func's or torch.nn.utils.stateless') is on the stack: the Parameters it
    swapped in are stand-ins for the call. (Read only when a layer finds another lora_A than its scale tensor's.)"""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name in ("functional_call", "_functional_call") and "torch" in code.co_filename:
            return True
        frame = frame.f_back
    return False


def _freezing() -> bool:
    """Whether inductor freezes what it compiles (torch._inductor.config.freezing): it then inlines a one-element
    tensor as the number it held when compiled, while the factors, which only lora_ext's ops read, stay live. A
    compiled forward then takes the scaling as a float, which dynamo guards on (a retrace per scaling). (The flag
    does not concern torch.export or torch.jit.trace.)"""
    if not ops.compiling() or ops.exporting():
        return False
    inductor = sys.modules.get("torch._inductor.config")
    return bool(inductor is not None and inductor.freezing)


_SAMPLED = 8  # a merge's sample (_MergedSample): the 8 x 8 positions where the update is likely largest


@functools.lru_cache(maxsize=64)
def _on_device(values: Tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


class _PreHooks(collections.OrderedDict):
    """A layer's load_state_dict pre-hooks (module._load_state_dict_pre_hooks, the same dict throughout, which
    torch's registration adds to and the hooks' handles remove from). LoRALayer._load_from_state_dict runs them
    before its checks; inside run(), torch's own loop over them (in nn.Module._load_from_state_dict) finds none on
    that thread, so none runs twice, and other threads' loads see them all."""
    _running = threading.local()

    def values(self):
        if id(self) in getattr(_PreHooks._running, "ids", ()):
            return ()
        return super().values()

    @contextlib.contextmanager
    def run(self):
        ids = _PreHooks._running.__dict__.setdefault("ids", set())
        ids.add(id(self))
        try:
            yield
        finally:
            ids.discard(id(self))


class _MergedSample:
    """What a merge wrote, at a few positions of the weight (LoRALayer._see_new_memory compares new memory under the
    weight Parameter with it once the old memory is gone): the 8 x 8 positions of the update matrix D = B A on the
    rows of largest |B| row and the columns of largest |A| column, where the update is likely largest, and the
    merged values there. The update there (s D, float64) is computed when asked, from the merged snapshot's
    factors, which it holds (the layer holds them too while merged). Seven small ops per merge, no sync."""
    __slots__ = ("index", "values", "rows", "cols", "factors")

    def __init__(self, w: Tensor, A: Tensor, B: Tensor, scale: float, layout: Dict[str, Any]):
        with torch.no_grad():
            A, B = A.detach(), B.detach()
            rows, cols = B.shape[0], A.shape[1]
            i = (B * B).sum(dim=1).topk(min(_SAMPLED, rows)).indices.to(w.device)
            j = (A * A).sum(dim=0).topk(min(_SAMPLED, cols)).indices.to(w.device)
            ids = layout.get("block_ids")
            out = i
            if ids is not None:  # MergedLinear: B's rows by enabled group
                per = rows // len(ids)
                out = _on_device(tuple(ids), w.device)[i // per] * per + i % per
            if w.dim() != 2:  # a conv: D is its weight, flattened (_as_2d)
                self.index = torch.unravel_index(i[:, None] * cols + j[None, :], tuple(w.shape))
            elif layout.get("transposed"):
                self.index = (j[None, :], out[:, None])
            else:
                self.index = (out[:, None], j[None, :])
            self.values = w.detach()[self.index]  # (rows i, columns j)
            self.rows, self.cols, self.factors = i, j, (A, B, scale, len(ids) if ids is not None else 1)

    def update(self) -> Tensor:
        """s D at the sampled positions, float64, on the factors' device: (rows i, columns j)."""
        A, B, scale, groups = self.factors
        i, j = self.rows.to(B.device), self.cols.to(A.device)
        if groups == 1:
            return scale * (B[i] @ A[:, j]).double()
        per, rank = B.shape[0] // groups, A.shape[0] // groups  # (MergedLinear: A's ranks by enabled group)
        return scale * (B[i].unsqueeze(1) @ A.reshape(groups, rank, A.shape[1])[i // per][:, :, j]).squeeze(1).double()

    def at(self, w: Tensor) -> Tensor:
        """`w`'s values at the sampled positions."""
        return w.detach()[tuple(t.to(w.device) for t in self.index)]

    def retaken(self, w: Tensor) -> "_MergedSample":
        """This sample's positions and factors, with `w`'s values (a weight kept as holding the merge: a cast or
        rounded copy, or one on another device): one gather."""
        new = _MergedSample.__new__(_MergedSample)
        new.index = tuple(t.to(w.device) for t in self.index)
        new.rows, new.cols, new.factors = self.rows, self.cols, self.factors
        with torch.no_grad():
            new.values = w.detach()[new.index]
        return new

    def held(self, w: Tensor):
        """Whether `w` (the noted shape, floating point) holds the merged values: "exact" (bit for bit at the sample),
        "near" (their cast to w's dtype bit for bit, or within a quarter of the update of them where the update is
        largest: a rounded or quantized copy, an optimizer step's) or False (a base: the update away from them,
        or another weight)."""
        with torch.no_grad():
            new = self.at(w)
            merged = self.values.to(new.device)
            if new.dtype == merged.dtype:
                if _same_bits(new, merged):
                    return "exact"
            elif _same_bits(new, merged.to(new.dtype)):
                return "near"
            update = float(self.update().norm())
            if update == 0:  # factors of zeros (a fresh B): the merge wrote nothing, so any reading is the same
                A, B = self.factors[:2]
                return False if bool(A.any()) and bool(B.any()) else "near"
            off = float((new.double() - merged.double()).norm())
            return "near" if off <= update / 4 else False


def _mark_trained(layer, grad) -> None:
    """A backward reached a merged layer's factors through its merge (LoRALayer._trains_merged): the mark of its
    snapshot now (a merge between the forward and the backward made a new one), a one-element list that shallow
    copies of the layer share (nn.DataParallel's replicas mark the layer they were made from)."""
    layer.__dict__.setdefault("_trained_merged", [False])[0] = True


# layers marked by a compiled forward at each run (_mark_in_graph), by a key in the layer's __dict__ (an int, which
# dynamo guards by value: a graph traced for one layer is not run for another; copies and pickles get their own,
# __getstate__; nn.DataParallel's replicas share it and mark the layer they were made from, as _mark_trained does)
_MARK_KEYS = itertools.count(1)
_MARK_LAYERS: Dict[int, Any] = {}


@torch.library.custom_op("lora_ext::mark_trained", mutates_args=())
def _mark_trained_op(t: Tensor, key: int) -> Tensor:
    """A compiled merged forward with gradients through the live factors marks its layer trained (_trains_merged) at
    each run: an op, so that a graph cached for an earlier snapshot marks the new one too (marked while tracing
    only, after train() and eval() a compiled training step's no_grad forwards served the merge from before the
    steps: 0.9 off, and eval() did not merge them). No graph break: fullgraph=True trains through a merge. Gives
    `t` back (a copy: an op's output is not its input)."""
    ref = _MARK_LAYERS.get(key)
    layer = ref() if ref is not None else None
    if layer is not None:
        layer.__dict__.setdefault("_trained_merged", [False])[0] = True
    return t.clone()


@_mark_trained_op.register_fake
def _(t, key):
    return torch.empty_like(t)


_mark_trained_op.register_autograd(lambda ctx, grad: (grad, None), setup_context=lambda ctx, inputs, output: None)


def _mark_key(layer) -> int:
    """`layer`'s key for lora_ext::mark_trained, made when missing. Eager only (each snapshot makes it:
    _put_snapshot): traced, the global count and registry would be guarded, and a layer freed while another
    compiles failed the guards (dynamo's KeyError); the traced code reads the int alone."""
    key = layer.__dict__.get("_mark_key")
    if key is None:
        key = layer.__dict__["_mark_key"] = next(_MARK_KEYS)
        _MARK_LAYERS[key] = weakref.ref(layer, lambda _, key=key: _MARK_LAYERS.pop(key, None))
    return key


_mark_key_eagerly = torch.compiler.disable(_mark_key)  # (a layer merged before it had one: unpickled, say)


def _mark_in_graph(layer, t: Tensor) -> Tensor:
    """t through lora_ext::mark_trained for `layer` (see it)."""
    key = layer.__dict__.get("_mark_key")
    if key is None:
        key = _mark_key_eagerly(layer)
    return torch.ops.lora_ext.mark_trained(t, key)


class _Written:
    """What a layer's last write left (_note_written): the weight's storage (a weak reference, and the StorageImpl it
    names, which cannot be another while the reference lives), version counter and region; and, for a plain weight,
    the Parameter object's id and, while merged, a sample of what the merge wrote (_MergedSample), so that new memory
    under that Parameter (`weight.data = W`, `set_`, `swap_tensors`) is seen and can be compared with what the
    merge wrote after the old memory is gone (LoRALayer._see_new_memory). A copy or pickle of it is True (a layer's
    copy notes its own weight): a StorageWeakRef copied would release a reference it never took."""
    __slots__ = ("ref", "cdata", "version", "region", "param", "sample", "params")

    def __init__(self, storage, w, param: Optional[int] = None, sample: Optional[_MergedSample] = None,
                 params: Optional[dict] = None):
        self.ref = StorageWeakRef(storage)
        self.cdata = storage._cdata
        self.version = w._version
        self.region = (w.storage_offset(), tuple(w.shape), tuple(w.stride()), w.dtype)
        self.param, self.sample = param, sample
        self.params = params if params is not None else {}  # the owner's _parameters (where the weight is looked up)

    def moved(self) -> bool:
        """Whether the noted Parameter, still registered, holds other memory now (LoRALayer._new_memory)."""
        w = self.params.get("weight")
        try:  # (param: None for a DTensor, which never matches)
            return id(w) == self.param and w.untyped_storage()._cdata != self.cdata
        except RuntimeError:
            return False

    def old(self) -> Optional[Tensor]:
        """The tensor noted, when its memory is still alive (held elsewhere), else None."""
        try:
            storage = torch.UntypedStorage._new_with_weak_ptr(self.ref.cdata)
            if storage is None:
                return None
            offset, shape, stride, dtype = self.region
            return torch.empty(0, dtype=dtype, device=storage.device).set_(storage, offset, shape, stride)
        except Exception:  # (a storage resized under the region since: not the tensor noted)
            return None

    def sample_held(self, w: Tensor):
        """_MergedSample.held for new memory `w` of the noted shape; False without a sample (nothing merged to
        hold) or for another shape or a non-floating weight; "exact" for a weight without elements."""
        if tuple(w.shape) != self.region[1] or not w.dtype.is_floating_point:
            return False
        if w.numel() == 0:
            return "exact"
        return False if self.sample is None else self.sample.held(w)

    def __reduce__(self):
        return (bool, (True,))

    def __copy__(self):
        return True

    def __deepcopy__(self, memo):
        return True

    def holds(self, t) -> bool:
        """Whether tensor `t` (no wrapper subclass) is the one noted."""
        return (not self.ref.expired() and t.untyped_storage()._cdata == self.cdata
                and (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) == self.region)


_given_bases = [False]  # whether a merged layer's state_dict marked a base (LoRALayer._serves_merged)


class EnableLoraError(ValueError, AssertionError):
    """MergedLinear's enable_lora refused: a ValueError, and the AssertionError loralib's assert raises."""


def _whole(*tensors) -> list:
    """The arguments, each DTensor gathered whole (factors FSDP2 sharded beside a weight it left alone:
    ignored_params); anything else as it is."""
    return [sharded.full(t) if sharded.is_dtensor(t) else t for t in tensors]


class _WriteMark:
    """LoRALayer._writing's mark: `written[0]` is whether the weight holds what the layer's bookkeeping does not say
    yet; set True, it also marks the layer's open switch as begun (named_adapters.switch_started). `watch(weight)`
    before the write closes the gap between the op's return and `written[0] = True`: an error raised from outside
    the op (an exception Python raises between two statements) once the weight's version counter moved means it was
    written; one the op raised says what the op left (ops._writes_weight: `weight_settled`)."""
    __slots__ = ("value", "layer", "watched")

    def __init__(self, layer):
        self.value, self.layer, self.watched = False, layer, None

    def __getitem__(self, index):
        return self.value

    def __setitem__(self, index, value):
        self.value = value
        if value:
            switch_started(self.layer)
        else:
            self.watched = None

    def watch(self, weight: Tensor) -> None:
        version = sharded.version(weight)  # (None: an inference tensor, no counter: the marks alone)
        self.watched = None if version is None else (weight, version)

    def wrote(self, err: BaseException) -> bool:
        """Whether the weight was written and its bookkeeping does not say so yet, as `err` is raised."""
        if self.value:
            return True
        watched = self.watched
        if watched is None or getattr(err, "weight_settled", False):
            return False
        return sharded.version(watched[0]) != watched[1]


def _hook_closure(hook) -> Dict[str, Any]:
    """The variables a saved-tensor hook function closes over, by name (torch.utils.checkpoint's hooks keep their
    checkpoint frame there); {} where there are none to read."""
    import inspect
    fn = inspect.unwrap(hook)  # (the recomputation's pack hook is wrapped by torch._dynamo.disable)
    names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
    found = {}
    for name, cell in zip(names, getattr(fn, "__closure__", None) or ()):
        try:
            found[name] = cell.cell_contents
        except ValueError:  # (an empty cell)
            pass
    return found


def _checkpoint_phase():
    """Where torch.utils.checkpoint's non-reentrant checkpoint is (its saved-tensor hooks are the innermost):
    ("forward", frame) in the checkpointed forward, ("recompute", frame, gid) in its recomputation in the backward,
    ("forward", None) in a forward whose frame is not found (another torch), else None. (A reentrant checkpoint's first
    forward runs without gradients, where nothing can be checked: README, Training setups.)"""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if not hooks:
        return None
    kind = getattr(hooks[0], "__qualname__", "")
    if "_checkpoint_hook" in kind:
        return "forward", _hook_closure(hooks[0]).get("frame")
    if "_recomputation_hook" in kind:
        seen = _hook_closure(hooks[0])
        ref, gid = seen.get("target_frame_ref"), seen.get("gid")
        frame = ref() if callable(ref) else None
        return ("recompute", frame, gid) if frame is not None else None
    return None


def _changed_refusal(layer, state, now, again: str, after: str) -> RuntimeError:
    """The refusal of a backward of a forward that served `state` (_served_state) when the layer serves `now`:
    `again` says what computes with the layer's values again, `after` what to do after the refusal."""
    (was, was_scaling, was_merged, _, was_off), (name, scaling, merged, _, off) = state, now
    if off != was_off:
        what = f"{'inside' if off else 'out of'} a lora.disable_adapter block"
    elif name != was or merged != was_merged:
        what = f"{'switched to' if name != was else 'changed to'} {name!r}{' merged' if merged else ' unmerged'}"
    else:  # (add_adapter over it, or over it while another adapter was active, then switched back: v1)
        what = f"given new {'values' if scaling == was_scaling else 'scaling'} (add_adapter)"
    served = "the base (inside lora.disable_adapter)" if was_off else f"adapter {was!r}"
    return RuntimeError(
        f"{layer._describe()}: its forward served {served}{' merged' if was_merged and not was_off else ''}, and "
        f"before this backward it was {what}: {again}, which would compute the gradients of other values; run the "
        f"backward first (an eval() or set_adapter after it), or switch back before it. {after}")


_CHECKPOINT_AGAIN = "torch.utils.checkpoint computes the forward again in the backward"
CHECKPOINT_AFTER = ("Zero the gradients (optimizer.zero_grad()) before the next step: the modules the backward had "
                     "finished hold theirs in .grad")


def checkpoint_check(owner) -> bool:
    """Under torch.utils.checkpoint (non-reentrant), with gradients on: in the checkpointed forward, notes in the
    checkpoint's frame what `owner` (a LoRA layer, a module saved whole) serves (`owner._served_state()`; True: the
    caller may check it again in the backward); in the recomputation the backward makes, refuses
    (`owner._recomputed_refusal(was, now)`) before any gradient of the checkpointed region is computed, if it serves
    something else now than at the forward it recomputes: the recomputation would serve the other state, and a
    switch's would put the other adapter's gradients on the first one's Parameters (100.2 off, h5), or a trainable
    module after a frozen adapter get the gradients of the other adapter's outputs (5.5 off, r6). Each owner's calls
    are counted apart (a recomputation calls each as the forward did, in order, and stops early where no more is
    needed)."""
    phase = _checkpoint_phase()
    if phase is None:
        return False
    if phase[0] == "forward":
        frame = phase[1]
        if frame is not None:
            frame.__dict__.setdefault("_lora_ext_served", {}).setdefault(id(owner), []).append(owner._served_state())
        return True
    _, frame, gid = phase
    noted = frame.__dict__.get("_lora_ext_served", {}).get(id(owner))
    if noted is None:  # (its forward ran before lora_ext's import, or under another hook)
        return False
    counts = frame.__dict__.setdefault("_lora_ext_recomputed", {})
    i = counts[gid, id(owner)] = counts.get((gid, id(owner)), -1) + 1
    if i < len(noted):
        now = owner._served_state()
        if now != noted[i]:
            raise owner._recomputed_refusal(noted[i], now)
    return False


def _same_adapter_in_backward(layer, state, why: str):
    """A hook on a layer's output in a forward whose backward computes with the layer's values again (`why`: "fsdp2",
    "checkpoint" or "tp"): the backward refuses when the layer merged, unmerged or switched its adapter, or entered or
    left a disable_adapter block, since that forward. FSDP2 gathers the weight and factors again for the backward
    (the forward's copies are freed), so such a write between the two gave the gradients of other values, silently
    (a validation eval() between forward and backward: 0.81 off; a switch: 22.6 off, s6); torch.utils.checkpoint's
    recomputation is checked as it runs (checkpoint_check), and here again where the output needs a gradient.
    Elsewhere one process's saved tensors keep their values or torch's version counter refuses. A switch away and
    back (a reference adapter's forward between the two) computes the same values, and is allowed. (A tensor hook,
    not an autograd Function: its output would be a view, which an in-place write of the output may not change.)"""
    def check(grad):
        now = layer._served_state()
        if now != state:  # (disable_adapter refuses FSDP2's layers: its flag changes in a checkpoint only)
            if why == "tp":
                raise _changed_refusal(layer, state, now, "under tensor parallel a switch writes the new adapter into "
                                       "the live factors, which this backward reads", CHECKPOINT_AFTER)
            if why != "fsdp2":
                raise _changed_refusal(layer, state, now, _CHECKPOINT_AGAIN, CHECKPOINT_AFTER)
            reset = sharded.reset_after_refused_backward(layer)
            raise _changed_refusal(
                layer, state, now, "FSDP2 gathers the weight and factors again for the backward",
                "FSDP2's iteration state was reset (reset_iter_state()) and its unreduced gradients dropped: zero the "
                "gradients (optimizer.zero_grad()) before the next step, since the modules the backward had finished "
                "hold theirs in .grad" if reset
                else "FSDP2's iteration state could not be reset (reset_iter_state(), torch's recovery after an "
                     "exception in a backward): the next backward may not reduce its gradients; shard the model "
                     "again (or restart from a checkpoint) before training on")
    return check


class LoRALayer(NamedAdapters):
    """State shared by every LoRA layer; it comes first in the layers' bases so that its train(),
    state_dict() and loading override nn.Module's. Subclasses say where their weight is and how the delta
    lies in it (_weight_2d and _layout); this class keeps the merge state: whether the weight holds the
    active adapter, and the snapshot of what it holds (`_merged_A`, `_merged_B`, `_merged_scaling`)."""

    _weight_key = "weight"
    _parent_must_call = True  # a parent's fast path that reads the weight uncalled is left (keep_layers_called)
    _broken: Optional[str] = None  # why the weight is unknown (see _writing); set in the instance's __dict__
    # open lora.disable_adapter blocks over this layer, and whether there is one (what forwards read: torch.compile
    # guards on the attribute, and on a count's value it compiled a graph for each depth of nested blocks, r41)
    _adapter_off: int = 0
    _adapter_disabled: bool = False
    # merges, unmerges and merged switches so far (_set_merged), as a string: a compiled forward under inductor's
    # freezing, which holds the weight as a constant, guards on it (_serves_merged; dynamo may make an int symbolic)
    _weight_writes: str = "0"
    # the live factors' in-place writes (NamedAdapters._note_factor_write), as a string, for freezing's guard (_scales)
    _factor_writes: str = "0"

    def __init__(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool,
                 lossless: Optional[bool] = None):
        # (a numpy integer too, as loralib takes it; held as a Python int)
        if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r < 0:
            raise ValueError(f"r must be a non-negative integer, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.r = int(r)
        # a numpy scalar or other Real held as a Python float (a Python int or float, and anything else, as given)
        numpy_like = isinstance(lora_alpha, numbers.Real) and not isinstance(lora_alpha, (int, float))
        self.lora_alpha = float(lora_alpha) if numpy_like else lora_alpha
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights
        self.lossless = lossless
        self._merged_record = None  # the lossless record of the merge the weight holds (None: lossy or unmerged)
        self._remerge_pending = False
        self.register_buffer("_merged_A", None, persistent=False)  # the snapshot follows .to()
        self.register_buffer("_merged_B", None, persistent=False)
        self._non_persistent_buffers_set.difference_update(("_merged_A", "_merged_B"))  # (see _put_snapshot)
        self._merged_scaling = None
        self._init_adapters()
        self._lock = threading.RLock()
        forks.track_layer(self)
        self._streams = StreamOrder()
        self.__dict__["_fast_paths_seen"] = True  # (keep_layers_called: layers pickled before it get its hook)
        self.register_load_state_dict_post_hook(_remerge_after_load)
        self.register_state_dict_post_hook(_base_into_state)
        self.__dict__["_load_state_dict_pre_hooks"] = _PreHooks(self._load_state_dict_pre_hooks)

    def __getstate__(self):
        if self.__dict__.get("merged"):
            self._see_new_memory()  # (a copy of a layer saying merged over a base would serve it without its adapter)
        state = dict(self.__dict__)
        state.pop("_lock", None)  # locks and streams do not pickle or deepcopy; each copy gets its own
        state.pop("_streams", None)
        state.pop("_finite_stamps", None)
        state.pop("_adapter_off", None)  # a copy made inside lora.disable_adapter is not in the block
        state.pop("_adapter_disabled", None)
        state.pop("_pre_disable", None)
        state.pop("_disable_openers", None)
        state.pop("_open_batches", None)  # a copy made inside lora.batch_adapters is not in the batch
        state.pop("_open_slots", None)
        state.pop("_scale_owner", None)  # (the copy's __setstate__ says which pair its scale tensor is)
        state.pop("_mark_key", None)  # (a copy marks itself: _mark_in_graph)
        if state.get("_written") is not None:  # (a storage's weak reference neither pickles nor copies: the copy
            state["_written"] = True           # notes its own weight, __setstate__)
        return state

    def __deepcopy__(self, memo):
        """copy.deepcopy's own procedure for an object with __getstate__/__setstate__, spelled out: torch's
        parametrize gives a parametrized module's class a __deepcopy__ copying its __dict__ whole (this layer's
        lock, which does not copy) unless the class has one, and a __getstate__ that refuses. The state is copied
        under the layer's lock: a switch on another thread (which holds it) would otherwise give the copy one
        adapter's weight with the other's bookkeeping."""
        replica = self.__class__.__new__(self.__class__)
        memo[id(self)] = replica
        getstate = next(c.__dict__["__getstate__"] for c in type(self).__mro__  # (a subclass's own is honoured)
                        if "__getstate__" in c.__dict__
                        and getattr(c.__dict__["__getstate__"], "__module__", None) != parametrize.__name__)
        lock = self.__dict__.get("_lock")
        with lock if lock is not None else contextlib.nullcontext():
            state = copy.deepcopy(getstate(self), memo)
        replica.__setstate__(state)
        # plain modules sharing the weight: the copy is tied to their copies, from the memo, or made now (a head
        # before its embedding: the model's copy then takes that one). Not carried in the state: pickling a layer
        # would pickle its givers whole. (A giver outside what is copied gets a copy nothing holds: no tie.)
        copies = []
        for giver in ties.givers(self):
            try:
                copies.append(memo[id(giver)] if id(giver) in memo else copy.deepcopy(giver, memo))
            except Exception:  # (a module that does not copy: the copy is not tied to it)
                pass
        ties.add_givers(replica, copies)
        del copies
        return replica

    def __setstate__(self, state):
        state.setdefault("lossless", None)  # layers pickled before lossless merges
        state.setdefault("_merged_record", None)
        state.pop("_lora_ext_token", None)  # (the original's: this copy gets its own, ties._token)
        state.pop("_sharded_clear", None)  # (a look at the original's factors: named_adapters._activate_sharded)
        for key in ("_generations", "_value_epochs"):  # (numbers of this process's count, never one it gave yet: the
            # original's came from another process's, and a new one here could equal one, r14: 9.6 off. In place:
            # copy.copy shares the original's dicts with its tensors, and a check_values through the copy must reach
            # the original's mixed-batch slots, r15: 8.83 off)
            if isinstance(state.get(key), dict):
                for name in list(state[key]):
                    state[key][name] = next(_EPOCHS)
        for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            # (copy.copy hands over the original's own dicts: a copy's merge, switch or new buffer was the original's)
            if isinstance(state.get(key), (dict, set)):
                state[key] = type(state[key])(state[key])
        nn.Module.__setstate__(self, state)
        for p in self.parameters():  # (FSDP1's mark, pickled with a Parameter taken from an FSDP1 model: not flat here)
            p.__dict__.pop("_fsdp_flattened", None)
        self._snapshot_buffers_last()  # (layers pickled before they were kept last)
        self._restore_adapters(state)
        self._adopt_scale_tensor()
        self._lock = threading.RLock()
        keep_called_if_pickled_before(self, state)  # (W2: a model pickled so skipped its adapter on load, 3.3 off)
        forks.track_layer(self)
        self._streams = StreamOrder()
        if self.__dict__.get("_buffers", {}).get("_merged_A") is not None:
            _mark_key(self)  # (a copy's own, made now: made while traced, fullgraph refused the disabled helper)
        if self.__dict__.get("_written") is not None or self.__dict__.get("_buffers", {}).get("_merged_A") is not None:
            try:
                self._note_written()
            except (AttributeError, KeyError):  # (a state without its weight)
                self.__dict__["_written"] = None
        self._note_factors()  # (a copy.copy keeps the live factor Parameters: a switch must not write them)
        self._forget_meta_merge()
        try:  # a deepcopy or unpickle of tied layers: the copies are tied
            ties.note(self._weight_param(), self)
        except (AttributeError, KeyError):  # a state without its weight (nothing to merge into either)
            pass
        ties.restored(self)  # (and to the plain modules unpickled or copied before it that hold its weight)
        self._untie_merged_copy()

    def _untie_merged_copy(self) -> None:
        """A copy made while merged that shares its weight Parameter with a live merged layer (copy.copy, or a
        deepcopy whose memo keeps the Parameters): two layers would each take out or switch the one merge in that
        weight, the other's bookkeeping still saying merged (its forward then served the weight alone over the
        base, or another adapter). The adapter is taken out of the shared weight, with a warning, and both add it
        on the fly, as for any tie (merges of a weight two layers compute with are refused)."""
        if not self.__dict__.get("merged"):
            return
        try:
            weight = self._weight_or_none()
        except (AttributeError, KeyError):
            return
        peers = [other for other in ties.others(self, weight) if other.merged] if weight is not None else []
        if not peers:
            return
        for other in peers:
            other.unmerge()
        self._forget_merge()  # (what it described was the merge just taken out)
        warnings.warn(f"{self._describe()}: a copy made while merged shares its weight with "
                      f"{', '.join(other._describe() for other in peers)}; the adapter was taken out of the shared "
                      f"weight, and both add it on the fly (a weight two layers compute with is not merged into)",
                      stacklevel=_user_stacklevel())

    def register_buffer(self, name: str, tensor, persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        self._snapshot_buffers_last()

    def _snapshot_buffers_last(self) -> None:
        """Keeps the merge snapshot's buffers (None while unmerged) after the layer's other buffers (MergedLinear's
        lora_ind, Embedding's embed_scale): torch.export's non-strict trace numbers the buffers it finds past None
        entries wrongly (an IndexError exporting an unmerged layer)."""
        buffers = self.__dict__.get("_buffers")
        if buffers and "_merged_B" in buffers and next(reversed(buffers)) != "_merged_B":
            for key in ("_merged_A", "_merged_B"):
                if key in buffers:
                    buffers[key] = buffers.pop(key)

    def register_parameter(self, name: str, param) -> None:
        lock = self.__dict__.get("_lock") if name == "weight" else None  # (none yet while nn.Linear.__init__ runs)
        if lock is not None and param is not None:
            ties.given(self, name, param)  # (a merged giver's unmerge, before this layer's lock is held: see there)
        with lock if lock is not None else contextlib.nullcontext():
            params = self.__dict__.get("_parameters", {})
            old = params.get(name)
            cleared = old is None and name in params  # (`layer.weight = None` earlier)
            super().register_parameter(name, param)  # (torch's refusals first: the merge is forgotten after them)
            if name == "weight":
                ties.note(param, self)  # `l2.weight = l1.weight` lands here: merges then see the tie
                self._weight_replaced(old, param, cleared)
                return
        if name == "lora_A" and param is not None and "_scaling" in self.__dict__:
            self._sync_scale_tensor()  # `layer.lora_A = Parameter(...)`: the new pair's own scale tensor
        noted = self.__dict__.get("_merged_from")
        if noted and name in ("lora_A", "lora_B") and sharded.is_dtensor(param):
            # FSDP2's fully_shard of a merged layer puts the merged factors' shards in place (and its own unsharded
            # Parameters at each forward): they are what is merged, not factors given (_factors_substituted)
            self.__dict__["_merged_from"] = (param, noted[1]) if name == "lora_A" else (noted[0], param)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "_hf_hook":  # accelerate's add_hook_to_module, after the hook's init_hook ran
            self._offload_hook_attached(value)

    def _offload_hook_attached(self, hook) -> None:
        """accelerate attached `hook` to this layer. One that offloads (an AlignDevicesHook with offload=True:
        cpu_offload, disk_offload, dispatch_model with modules on "cpu" or "disk") has just moved the layer's
        tensors to the meta device and keeps their values in its weights_map, which it puts back for every forward.
        accelerate's functions (a map they wrap, not a plain dict) build it from model.state_dict(), which gives a
        merged layer's base, as does a plain dict made of state_dict() (its weight is the base that marks): the copy
        of the weight is the base, and a layer still saying merged would serve it without its adapter. Any other
        plain dict is the one the hook builds from the module's own tensors when given none: its copy holds the
        merge, which is taken out of that copy in place (lora_ext could not write it later, and the layer could not
        train or switch). Either way the layer forgets its merge, with a warning, and adds the adapter on the fly,
        as for a new weight that is not the merged one (_weight_replaced). A plain dict without a real copy of the
        weight keeps the merge. (A ConvLoRA's weight is its conv's: the hook on the ConvLoRA comes first, with the
        map its conv's hook then takes.) Not seen: a hook on a module above the layer that places its submodules
        (preload_module_classes)."""
        maps = [h.weights_map for h in _hook_parts(hook)
                if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None]
        if not maps or not self.merged or self.__dict__.get("_buffers", {}).get("_merged_A") is None:
            return
        copy = maps[-1].get(self._weight_key) if isinstance(maps[-1], dict) else None
        merged_copy = isinstance(maps[-1], dict) and not getattr(copy, "_lora_ext_unmerged", False)
        if merged_copy and (not isinstance(copy, Tensor) or copy.is_meta):
            return
        with self._lock, deferred_interrupt():
            if merged_copy:
                with torch.no_grad():
                    self._unmerge_from(copy)
            self._forget_merge()
            for h in _hook_parts(hook):  # the record's buffers are gone: the hook's detach_hook would
                for key in ("_merged_A", "_merged_B"):  # put them back to their devices (and fail on None)
                    getattr(h, "original_devices", {}).pop(key, None)
        held = ("the adapter was taken out of the hook's copy of the weight" if merged_copy else
                "its offloaded copy of the weight is the base (accelerate takes model.state_dict(), which gives a "
                "merged layer's base)")
        warnings.warn(f"{self._describe()}: accelerate offloaded it while adapter {self.active_adapter!r} was merged; "
                      f"{held}, so the adapter is added on the fly from now on. lora_ext cannot write an offloaded "
                      f"layer's weights (merges and switches are refused there): merge, switch and unmerge before "
                      f"offloading, or after accelerate.hooks.remove_hook_from_submodules(model)",
                      stacklevel=_user_stacklevel(also=("accelerate",)))

    def _meta_refusal(self) -> str:
        """meta_refusal for this layer (NamedAdapters' switches refuse with it)."""
        return meta_refusal(self)

    def _weight_replaced(self, old: Optional[Tensor], new: Optional[Tensor], cleared: bool = False) -> None:
        """A weight set in place of the one a merge wrote (the caller holds the lock, the new weight in place):
        `layer.weight = nn.Parameter(W)`, transformers' tie_weights() over a merged LoRA head, a ConvLoRA's
        `layer.conv.weight = ...` or `layer.conv = ...` (_conv_weight_set, _conv_set). A weight that holds the
        merged values still keeps the merge (_holds_merged_values: the same memory, a copy bit for bit, a cast or
        rounded copy such as a quantized one; a copy in another dtype drops the lossless record, which is of the old
        dtype, so unmerges round then); so does a weight on or from the meta device (an offload's placeholder and the
        values it puts back: nothing to compare). Any other weight is taken as a base, as checkpoints hold bases
        (state_dict() gives one, load_state_dict() takes one): the layer forgets its merge, with a warning, and adds
        the adapter on the fly until the next eval() or merge(). Not seen: a DTensor on either side (FSDP2 and
        tensor parallelism swap in the same values, sharded or gathered; a new sharded base keeps the merge, but not
        a sharded weight another module holds: a tie, ties.held_elsewhere), a
        weight set back where none was registered (removing a parametrization, weight_norm or pruning; after `del
        layer.weight`), and writes straight into `_parameters` (accelerate's set_module_tensor_to_device).
        `cleared`: the weight was set to None since the merge: the new weight holds it when it lies in the memory
        the merge wrote (the same weight put back), else it is a base."""
        if (old is None and not cleared) or new is None or new is old \
                or self.__dict__.get("_buffers", {}).get("_merged_A") is None:
            return  # (None: the weight that comes next is looked at, against the memory the merge wrote)
        if sharded.is_dtensor(old) or sharded.is_dtensor(new):
            if sharded.is_dtensor(new) and old is not None and not sharded.is_dtensor(old):
                self._note_written()  # (sharding: fully_shard or tensor parallel puts the merged weight's shards here)
                return
            # a sharded weight another module holds (a tie made after fully_shard, which FSDP2 takes as this
            # module's at its next lazy reset): that module's, which does not hold this layer's merge
            if not (sharded.is_dtensor(old) and sharded.is_dtensor(new) and ties.held_elsewhere(self, new)):
                return
            with deferred_interrupt():
                self._forget_merge()
        elif not cleared and (new.is_meta or old.is_meta):
            return
        elif self._keeps_merge(old, new, cleared):
            return
        which = ("the new weight, set after the weight was None, is not the memory the merge wrote (a copy cannot be "
                 "compared with a weight that is gone)" if cleared else
                 "the new weight, which does not hold the merged values,")
        warnings.warn(f"{self._describe()}: its weight was replaced while adapter {self.active_adapter!r} was merged "
                      f"into the old one; {which} is taken as the base (as load_state_dict takes one) and the adapter "
                      f"is added on the fly until the next eval() or merge()", stacklevel=_user_stacklevel())

    def _keeps_merge(self, old: Optional[Tensor], new: Tensor, cleared: bool) -> bool:
        """_weight_replaced for plain tensors: keeps the merge (noting the new weight: True) or forgets it."""
        with deferred_interrupt():
            # (cleared: the weight that was there, put back, lies in the memory the merge wrote)
            held = bool(self._in_written(new)) if cleared else self._holds_merged_values(new, old)
            if held:
                if old is not None and new.dtype != old.dtype:
                    self._keep_record(None)
                self._note_written()
                return True
            self._forget_merge()
            return False

    def _holds_merged_values(self, new: Tensor, old: Tensor):
        """Whether weight `new` holds the merged values of `old`, the weight the merge wrote: "exact" (the same memory,
        or a copy bit for bit), "near" (a copy in another dtype, rounded or quantized: within half |old| of the
        merged weight, and clearly nearer it than the base or showing a rounding of it (_rounded)), or False.
        One comparison over the weight (a copy on old's device when new is elsewhere), and for a copy that is not
        exact, one unmerge of a copy."""
        if new.shape != old.shape:
            return False
        try:
            with torch.no_grad():
                new = new.detach()
                if new.device != old.device:
                    new = new.to(old.device)
                elif new.dtype == old.dtype and new.data_ptr() == old.data_ptr() and new.stride() == old.stride():
                    return "exact"
                if new.dtype == old.dtype and _same_bits(new, old.detach()):
                    return "exact"
                if not (new.is_floating_point() and old.is_floating_point()):
                    return False
                base = old.detach().clone(memory_format=torch.contiguous_format)
                self._unmerge_from(base)
                to_merged, to_base, update, size = _distances(new, old, base)
                # the merged weight: clearly nearer it than the base (a recomputation, a rounding or quantization of
                # it: an offset X from it that is noise to the update U), or a cast's copy of it bit for bit, or on a
                # quantizer's levels nearest its values and nearer it than the base (a base on a quantizer's grid,
                # the update under half a step, is on levels nearest the merged values too, but nearer the base).
                # Merely nearer is no evidence: a new base of its own (another checkpoint's) changed by C lies nearer
                # when C.U > |U|^2 / 2, about half the time for |C| over sqrt(n) |U| (a small layer), and a model soup
                # half way lies as near. Clearly: nearer by half the update (to_base^2 - to_merged^2 = 2 X.U + |U|^2
                # >= |U|^2 / 2), with |X| <= sqrt(n) |U| / 8, n the dimensions a change like the update spans (a
                # sibling adapter sharing lora_A: out x r), where X.U is about |X| |U| / sqrt(n) wide
                clear = (to_base ** 2 - to_merged ** 2 >= update ** 2 / 2
                         and 8 * to_merged <= update * math.sqrt(self._update_dims(new)))
                rounded = not clear and _rounded(new, old)  # "cast", "levels" or False
                return "near" if to_merged < size / 2 and (
                    clear or rounded == "cast" or (rounded == "levels" and to_merged <= to_base)) else False
        except Exception:  # (a wrapper subclass without storage of its own, one that cannot compare: another weight)
            return False

    def _update_dims(self, weight: Tensor) -> int:
        """The dimensions a change like this layer's update spans: rank x the weight's shorter side (the factors' rank:
        a sibling adapter sharing one factor changes the weight within those), at most its elements."""
        rows = weight.shape[0] if weight.dim() else 1
        cols = weight.numel() // max(rows, 1)
        a = self.__dict__.get("_parameters", {}).get("lora_A")
        rank = a.shape[0] if isinstance(a, Tensor) and a.dim() else weight.numel()
        return max(1, min(weight.numel(), rank * min(rows, cols)))

    def _conv_weight_set(self, conv: nn.Module, new: Tensor) -> None:
        """ConvLoRA: torch is about to set `conv.weight = new` (lora_ext.ties' registration hook). It is set here,
        under the layer's lock with the check, so that no forward, eval() or switch on another thread sees the new
        weight with the old weight's merge state."""
        lock = self.__dict__.get("_lock")
        with lock if lock is not None else contextlib.nullcontext():
            params = conv._parameters
            old = params.get("weight")
            cleared = old is None and "weight" in params  # (`conv.weight = None`: torch calls no hook then)
            params["weight"] = new
            if lock is not None:
                self._weight_replaced(old, new, cleared)

    def _weight_taken(self, module: nn.Module, name: str, plain: bool = True) -> None:
        """Another module takes this layer's weight Parameter as its `name` (`head.weight = layer.weight`,
        transformers' tie_weights() after a merge; ties._on_parameter, before it is in place). A weight two modules
        compute with is never merged into: a merged layer gives it its base back, with a warning, and adds the adapter
        on the fly from then on; a plain module is remembered for good as a tie (`_tied_with`, as injection marks the
        ties it finds: ties.names), so eval() and merge() leave the weight alone. lora_ext's own unload
        (taking_out_layers) hands the merged weight over on purpose."""
        if getattr(_taking_out, "depth", 0):
            return
        if plain and not isinstance(module, LoRALayer):  # (lora_ext layers find each other in the ties registry)
            tied, tie = list(self.__dict__.get("_tied_with") or ()), f"a {type(module).__name__}'s {name!r}"
            self._tied_with = tied if tie in tied else [*tied, tie]  # (tie_weights() again: the same tie)
        if not self.merged:  # (unlocked: a layer given this weight on another thread may hold its own lock; ties.given)
            return
        with self._lock, deferred_interrupt():
            if not (self.merged and self.__dict__.get("_buffers", {}).get("_merged_A") is not None):
                return
            self._unmerge()
            self.merged = False
        warnings.warn(f"{self._describe()}: its weight, which held adapter {self.active_adapter!r} merged, was given "
                      f"to a {type(module).__name__} as {name!r} (tie_weights() after a merge?); a weight that two "
                      f"modules compute with is never merged into, so the adapter is taken out of it and added on "
                      f"the fly from now on", stacklevel=_user_stacklevel())

    def _conv_set(self, conv: nn.Module) -> None:
        """ConvLoRA: torch is about to set `layer.conv = conv` (lora_ext.ties' registration hook): as _conv_weight_set,
        the old conv's weight against the new one's."""
        lock = self.__dict__.get("_lock")
        with lock if lock is not None else contextlib.nullcontext():
            old = self._modules.get("conv")
            self._modules["conv"] = conv
            if lock is not None:
                # (a module without a weight in between, `layer.conv = nn.Identity()`, as `layer.weight = None`)
                old_weight = old._parameters.get("weight") if old is not None else None
                self._weight_replaced(old_weight, conv._parameters.get("weight"), cleared=old_weight is None)

    def _describe(self) -> str:
        """The layer as its constructor reads (in messages): Linear(in, out), Embedding(num, dim),
        Conv2d(in, out, kernel_size=k)."""
        name = type(self).__name__
        if hasattr(self, "in_features"):
            return f"{name}({self.in_features}, {self.out_features})"
        conv = self.__dict__.get("_modules", {}).get("conv")
        if conv is not None:
            return f"{name}({conv.in_channels}, {conv.out_channels}, kernel_size={tuple(conv.kernel_size)})"
        if hasattr(self, "num_embeddings"):  # (not from the weight: a parametrization would compute it, and spectral
            return f"{name}({self.num_embeddings}, {self.embedding_dim})"  # norm step its power iteration)
        return super()._describe()

    def _guard(self):
        # Under torch.compile there is no other thread to exclude within the traced graph.
        return contextlib.nullcontext() if ops.compiling() else self._lock

    def forward(self, x: Tensor) -> Tensor:
        if x.is_nested:
            return nested_forward(self, x)
        # mixed batches (lora_ext.batch_adapters) open in this context (ANY_OPEN first: see its comment)
        batches = batched.ACTIVE.get() if batched.ANY_OPEN else None
        with self._guard():
            if self._broken is not None:  # (under the lock; an attribute, not __dict__.get: dynamo guards on it)
                self._check_sound()
            if torch.is_grad_enabled() and not self._adapter_disabled and self.has_lora and self._trainable() \
                    and self._lent():  # (in this order: a serving forward reads neither of _lent's attributes, nor
                # does dynamo guard on them). Under DDP the Parameters DDP was built with train, lent or not (README)
                if ops.compiling() or (ddp_guard.running() is None
                                                      and not ddp_guard.keeps_parameters(self)):
                    self._refuse_lent_training()
            if not ops.compiling():
                ddp = ddp_guard.running()  # the DDP whose forward runs this one on this thread, if any
                if ddp is not None:
                    ddp_guard.check(self, ddp)
                if x.is_cuda:
                    self._streams.read(x.device)
            # a mixed batch of this context before a disable_adapter block: the two exclude each other on a model,
            # but a block of another model sharing the layer, entered on another thread as this batch opened, would
            # serve this batch's rows the base (r37: 16.4 off); each serves its own thread's forwards
            served = batches.get(self) if batches is not None else None
            if served is not None and not served.batch.closed:  # (a block closed on another thread leaves its entry)
                batched.refuse_in_program(self._describe())
                return served.forward(self, x)
            checkpointed = torch.is_grad_enabled() and not ops.compiling() and checkpoint_check(self)
            if not ops.compiling() and torch.is_grad_enabled() \
                    and "_bias_at_inject" not in self.__dict__ and not torch.jit.is_tracing():
                # (in this order: dynamo guards on none of it; not in a jit trace, whose check run then recorded
                # another graph without the copy and refused the trace, G1: noted at an eager forward)
                self._note_bias_at_first_training_forward()
            if self._adapter_disabled:  # lora.disable_adapter: the base (unmerged on entry; merges wait)
                return self._checked_in_backward(self._weight_forward(x), checkpointed)
            if self.__dict__.get("_tp") is not None or sharded.is_dtensor(self._weight_or_none()):
                from . import parallel  # tensor parallel (under FSDP2 a forward sees gathered plain tensors)
                if self.__dict__.get("_tp") is None:
                    parallel.check_stock_style(self)
                return self._checked_in_backward(parallel.forward(self, x), checkpointed, tp=True)
            return self._checked_in_backward(self._forward(x), checkpointed)

    def _checked_in_backward(self, out: Tensor, checkpointed: bool = False, tp: bool = False) -> Tensor:
        """`out`, the forward's output, with a hook that refuses its backward if what the layer serves changed since
        (_same_adapter_in_backward), where the backward computes with the layer's values again: under FSDP2 (which
        gathers the weight and factors again), in torch.utils.checkpoint's non-reentrant forward (`checkpointed`:
        which checkpoint_check also checks as it recomputes), and under tensor parallel (`tp`: a switch writes the
        live sharded factors the backward reads, which torch refused naming no layer, h7). Elsewhere the saved
        tensors keep their values, and a switch before the backward is exact."""
        if torch.is_grad_enabled() and not ops.compiling() and out.requires_grad:
            why = ("fsdp2" if sharded.fsdp2_owner(self) else "checkpoint" if checkpointed else "tp" if tp
                   else None)
            if why is not None:
                out.register_hook(_same_adapter_in_backward(self, self._served_state(), why))
        return out

    def _recomputed_refusal(self, was: tuple, now: tuple) -> RuntimeError:
        return _changed_refusal(self, was, now, _CHECKPOINT_AGAIN, CHECKPOINT_AFTER)

    def _served_state(self) -> tuple:
        """What a forward computed with, as far as a backward that computes it again needs it unchanged
        (_same_adapter_in_backward): the active adapter, its scaling, whether it was merged, how many times
        add_adapter gave that name values (replaced, or deleted and added again, while another adapter was active
        too: v1; not check_values, which writes nothing: r46), and whether adapters were off (lora.disable_adapter)."""
        return (self.active_adapter, self.scaling, bool(self.merged),
                self.__dict__.get("_generations", {}).get(self.active_adapter, 0), bool(self._adapter_disabled))

    def reset_parameters(self) -> None:
        """The weight drawn afresh and the active adapter's factors initialised as loralib's (a zero update). A
        merged layer forgets its merge: the fresh weight holds no adapter, so nothing is taken out of it later."""
        self._check_unloaded()
        merged = self.__dict__.get("_buffers", {}).get("_merged_A") is not None  # (False, and no lock yet, while
        # nn.Linear.__init__ calls it); the weight and `merged` change together, as in train()
        with self._lock if merged else contextlib.nullcontext(), deferred_interrupt():
            self._reset_base()
            if merged:
                self._forget_merge()
            self.reset_lora_parameters()

    def _reset_base(self) -> None:
        super().reset_parameters()

    # -- where the delta lies ---------------------------------------------------------------------------

    def _weight_2d(self) -> Tensor:
        return self.weight

    def _as_2d(self, weight: Tensor) -> Tensor:
        return weight

    def _layout(self) -> Dict[str, Any]:
        return {}

    # -- merge state ------------------------------------------------------------------------------------

    def _set_merged(self, lora_A: Optional[Tensor], lora_B: Optional[Tensor], scaling: Optional[float],
                    record: Optional[lossless.MergeRecord] = None, weight: Optional[Tensor] = None):
        """Records what is merged now (`weight`: the tensor the write went to, _pinned_weight). The factors are
        buffers (they follow .to()); they are set in _buffers directly because nn.Module.__setattr__ costs tens of
        microseconds here, more than a switch's kernel."""
        self._streams.retire(self._merged_A, self._merged_B)
        self._put_snapshot(lora_A, lora_B)
        self._merged_scaling = scaling
        self._keep_record(record)
        self._note_written(weight=weight)
        self.__dict__["_weight_writes"] = str(int(self._weight_writes) + 1)

    def _put_snapshot(self, lora_A: Optional[Tensor], lora_B: Optional[Tensor]) -> None:
        """The merged snapshot's buffers (None: nothing merged). Non-persistent while they hold tensors; while None,
        out of torch's set of non-persistent names, which state_dict and load_state_dict skip either way for None,
        but accelerate's offload_buffers=True moves every name in it (and fails on None)."""
        self._buffers["_merged_A"], self._buffers["_merged_B"] = lora_A, lora_B
        if lora_A is not None and not ops.compiling():
            _mark_key(self)  # (made eagerly, before a compiled forward reads it)
        params = self._parameters  # (the factor objects merged: see _factors_substituted)
        self.__dict__["_merged_from"] = None if lora_A is None else (params.get("lora_A"), params.get("lora_B"))
        # (a new snapshot holds the live factors: see _trains_merged. A layer that trained through its merge goes on
        # training so: the live factors' identities and versions are noted, and a write into them since, an optimizer
        # step after an eval() or a switch that came between the backward and the step, is served at once)
        old = self.__dict__.get("_trained_merged")
        training = lora_A is not None and bool(old) and (old[0] or len(old) > 1)
        self.__dict__["_trained_merged"] = [False, *self._factor_versions()] if training else [False]
        names = self.__dict__.get("_non_persistent_buffers_set")
        if names is not None:
            (names.difference_update if lora_A is None else names.update)(("_merged_A", "_merged_B"))

    def _forget_meta_merge(self) -> None:
        """A merged layer whose weight is on the meta device (unpickled with map_location="meta", the skeleton of a
        load): it holds nothing merged (as after .to("meta")), and to_empty() fills it with new memory."""
        if self.__dict__.get("_buffers", {}).get("_merged_A") is None:
            return
        try:
            meta = self._weight_param().is_meta
        except (AttributeError, KeyError):  # (a state without its weight)
            return
        if meta:
            self._forget_merge()

    def _forget_merge(self) -> None:
        """The weight holds no adapter (it is the base, or drawn afresh): unmerged, with nothing to take out."""
        self._set_merged(None, None, None)
        self._finite_stamps.pop(MERGED, None)
        self.merged = False

    def __prepare_scriptable__(self):
        """torch.jit.script calls this on every module it scripts: refused, naming the layer (P1: a Conv2d, which
        loralib's scripts, failed on a property with "Expected a single top-level function"). A LoRA layer's forward
        holds locks and Python-level state that TorchScript cannot compile."""
        raise RuntimeError(f"{self._describe()}: a lora_ext layer cannot be compiled by torch.jit.script (its forward "
                           f"takes locks and reads Python-level state); use torch.jit.trace, torch.export or "
                           f"torch.compile, or lora_ext.unload(model) (it merges) to script the plain model")

    def _check_unloaded(self, where: Optional[str] = None) -> None:
        """Refuses moves and loads of a layer unload took out (layers.unloaded), which would not say why otherwise (a
        load is how a layer left unsound comes back: not this one). `where`: the module's path in a model, put before
        the message."""
        why = self.__dict__.get("_unloaded")
        if why is not None:
            raise RuntimeError(why if where is None else f"module {where!r}: {why}")

    def _check_sound(self) -> None:
        """Refuses to go on with a weight that a failed write left unknown (see _writing)."""
        broken = self.__dict__.get("_broken")
        if broken is not None:
            raise RuntimeError(broken)

    @contextlib.contextmanager
    def _writing(self, what: str):
        """Around a write of the weight (`what`: merge, unmerge, switch), giving a mark (_WriteMark) the caller sets
        True (`written[0] = True`) once the op has written the weight, inside the block around the write (an error at
        its exit, such as torch.no_grad()'s, then finds the weight written), and False once its bookkeeping says so;
        True also tells a switch around it that it has begun writing (named_adapters.switch_started). An error that says the
        weight holds what no record describes (`weight_written`: the op failed, then so did putting the weight
        back), or one raised between the write and its bookkeeping (out of memory, say), leaves the layer broken
        (_mark_broken). Without this it would serve, merge again or save a weight it cannot describe."""
        self._check_sound()
        written = _WriteMark(self)
        try:
            yield written
        except BaseException as err:
            if getattr(err, "weight_written", False):
                self._mark_broken(f"{self._describe()}: a failed {what} left its weight unknown (an error, then another "
                                  f"while putting the weight back: {err!r})", err)
            elif written.wrote(err):
                self._mark_broken(f"{self._describe()}: {'an' if what[0] in 'aeiou' else 'a'} {what} wrote its weight, "
                                  f"then failed before its bookkeeping said so ({err!r}): its weight is unknown", err)
            raise

    def _mark_broken(self, why: str, err: BaseException, load: str = "load_state_dict with the base weight") -> None:
        """The layer's weight (or live factors) hold what its bookkeeping cannot describe (`why`): unmerged in its
        bookkeeping, and refusing forwards, merges, switches and state_dict, naming `why`, until load_state_dict
        brings the weight again (`load`: what the load must hold)."""
        msg = (f"{why}; the layer refuses forwards, merges, switches and state_dict until its weight is loaded again "
               f"({load})")
        self.__dict__["_broken"] = msg
        self._streams.retire(self._merged_A, self._merged_B)
        self._put_snapshot(None, None)
        self._merged_scaling = None
        self.__dict__["_merged_record"] = None
        self._finite_stamps.pop(MERGED, None)
        self.merged = False
        err.add_note(f"lora_ext: {msg}")

    def _forked_while_held(self) -> None:
        """This process is a child forked while another thread of its parent held the layer's lock past the fork's
        wait (forks.py): a merge, unmerge or switch it was making may be half done here. A new lock; broken as a
        failed switch leaves the layer (the load must bring the weight and the factors)."""
        self.__dict__["_lock"] = threading.RLock()
        why = (f"{self._describe()}: this process was forked (os.fork) while another thread of its parent held the "
               f"layer (a forward, merge or switch of it under way for over {forks.WAIT_SECONDS:g} s): what that "
               f"thread was writing may be half done here; fork when no other thread uses the model, or start "
               f"workers with the 'spawn' method")
        self._broken_by(why, RuntimeError(why), "load_state_dict with the base weight and the factors to serve")

    def _broken_by(self, why: str, err: BaseException, load: str) -> None:
        """_mark_broken where the live factors are unknown too: a stored adapter whose tensors are the live
        Parameters (its own pair, registered as they were put in place) keeps a copy of its values, so that the load,
        which writes the live Parameters, does not write it too."""
        live = {id(self._parameters.get(k)) for k in ("lora_A", "lora_B")}
        for n, (A, B, s) in list(self._adapters.items()):
            if id(A) in live or id(B) in live:
                self._adapters[n] = (A.detach().clone(), B.detach().clone(), s)
        self.__dict__.update(_owner=None, _active_own=None, _broken_factors=True)
        self._mark_broken(why, err, load)

    def _switch_failed(self, name: str, err: BaseException) -> None:
        """A switch to (or reload of) adapter `name` failed after its merged write or while it wrote the live factors
        or put them in place (out of memory, say): what the layer serves is no longer what its bookkeeping says
        (_mark_broken), and the live factors are unknown too: a load must bring them as well (_broken_by)."""
        self._broken_by(f"{self._describe()}: switching to (or reloading) adapter {name!r} failed part way, after "
                        f"it began writing the weight or the live factors ({err!r})", err,
                        "load_state_dict with the base weight and the factors to serve")

    def _pinned_weight(self) -> Tensor:
        """The weight a write goes to: for a plain weight, an alias of its memory now (`detach()`: the same storage
        and version counter), so that memory put under the Parameter by another thread while the write runs
        (`weight.data = W`) is neither written nor noted as written: the next look judges it (_see_new_memory).
        A DTensor (FSDP2, tensor parallel) as it is."""
        param = self._weight_param()
        return param if sharded.is_dtensor(param) else param.detach()

    def _note_written(self, sample: Optional[_MergedSample] = None, weight: Optional[Tensor] = None) -> None:
        """Records the weight's storage and version counter as this layer's last write left them, so that a load
        that wrote the live weight in place before load_state_dict reached the layer is seen (_written_in_place);
        for a plain weight, also the Parameter and, while merged, a sample of the merged values (_see_new_memory;
        `sample`: the one to keep, of the same merge)."""
        param = self._weight_param()
        w = sharded.local(param if weight is None else weight)
        try:
            storage = w.untyped_storage()
            plain = not sharded.is_dtensor(param)  # (a DTensor's local shard: FSDP2 and tensor parallelism move shards)
            A, B = (self.__dict__.get("_buffers", {}).get(k) for k in ("_merged_A", "_merged_B"))
            if sample is None and plain and A is not None and w.numel() and not w.is_meta:
                sample = _MergedSample(w, A, B, self._merged_scaling, self._layout())
            self.__dict__["_written"] = _Written(storage, w, id(param) if plain else None, sample,
                                                 self._weight_owner()._parameters)
        except RuntimeError:  # a wrapper subclass has no storage of its own: unknown (_written_in_place: False)
            self.__dict__["_written"] = None

    def _new_memory(self) -> bool:
        """Whether the weight Parameter the last write noted holds other memory now: `weight.data = W`,
        `weight.set_(W)`, `torch.utils.swap_tensors(weight, P)` outside module.to(), or another Parameter at the
        noted one's address (written straight into `_parameters`). By storage only (a forward asks: one storage
        look); a plain weight only."""
        written = self.__dict__.get("_written")
        return type(written) is _Written and written.moved()

    def _see_new_memory(self) -> None:
        """A merged layer whose weight Parameter now holds other memory (_new_memory), seen at its next forward,
        write (train()/eval(), merge(), unmerge(), a switch, module.to(), a load) or state_dict() or copy. Memory
        that holds the merged values keeps the merge: compared whole with the old memory where that is still held
        elsewhere and still holds what the merge wrote at its sample (as a new Parameter is: _holds_merged_values),
        else with the sample the merge kept (_MergedSample.held: bit for bit, a cast, or within a quarter of the
        update where it is largest: a clone, a move, vector_to_parameters of parameters_to_vector, a rounded copy;
        in another dtype, a lossless record is dropped with a warning where it is next read). Any other memory is
        taken as the base: the layer forgets its merge, with a warning, and adds the adapter on the fly until the
        next eval() or merge(), so that train() takes nothing out of it. Not judged (the values put back are): a
        placeholder (meta, or another shape: ZeRO-3's empty one, FSDP1's flat piece), unallocated memory, a
        DTensor. Inside a CUDA graph capture it refuses, naming the layer (the comparison syncs)."""
        if not self.merged or not self._new_memory():
            return
        with self._lock, deferred_interrupt():
            if not self.merged or not self._new_memory():  # (another thread saw it first)
                return
            written, w = self._written, self._weight_param()
            if w.is_cuda and torch.cuda.is_current_stream_capturing():  # (the comparison below syncs)
                raise RuntimeError(f"{self._describe()}: its weight Parameter holds new memory since its merge, "
                                   f"seen in a forward while a CUDA graph is being captured, where it cannot be "
                                   f"compared with the merge (that needs a sync); run the layer once (or call "
                                   f"eval()) before capturing")
            if w.is_meta or sharded.is_dtensor(w) or tuple(w.shape) != written.region[1] \
                    or (w.numel() and not w.data_ptr()):
                # not judged: a placeholder (meta; empty, or a flat piece: ZeRO-3's, FSDP1's between forwards; a base
                # of this layer has its weight's shape), or memory not allocated (a wrapper tensor put under `.data`,
                # which torch's own forward refuses: indexing it here would crash the process)
                return
            old = written.old()
            if old is not None and written.sample is not None \
                    and not _same_bits(written.sample.at(old), written.sample.values):
                old = None  # (written since: no longer what the merge wrote, bit for bit at the sample)
            held = self._holds_merged_values(w, old) if old is not None else written.sample_held(w)
            if held:  # (in another dtype, a lossless record is dropped with its own warning where it is read)
                sample = written.sample
                if sample is not None and not (held == "exact" and w.dtype == written.region[3]
                                               and w.device == sample.values.device):
                    sample = sample.retaken(w)
                self._note_written(sample)
                return
            self._forget_merge()
        warnings.warn(f"{self._describe()}: its weight Parameter holds new memory (`weight.data = W`, `weight.set_`, "
                      f"torch.utils.swap_tensors or vector_to_parameters) while adapter {self.active_adapter!r} was "
                      f"merged into the old one; the new memory, which does not hold the merged values, is taken as "
                      f"the base and the adapter is added on the fly until the next eval() or merge()",
                      stacklevel=_user_stacklevel())

    def _in_written(self, t: Tensor) -> Optional[bool]:
        """Whether `t` is the weight this layer's last write left (_note_written): the same storage object, still
        alive, and the same region of it. Not by address: a freed weight's address may be handed to any new tensor
        (a weight set to None, then a new base), a storage's memory may be released or moved while the storage lives
        (resize_(0), share_memory_()), and views of one buffer share its address. None when `t` has no storage of
        its own."""
        written = self.__dict__.get("_written")
        try:
            return isinstance(written, _Written) and written.holds(sharded.local(t))
        except RuntimeError:
            return None

    def _written_in_place(self, state_dict, prefix, aliases: bool = False) -> bool:
        """Whether `state_dict` hands this layer its own live weight, written in place since the layer's last write
        (torch.distributed.checkpoint's set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True) copies
        rank 0's values into the live parameters, then loads them into themselves). aliases=True: also another
        tensor over the live weight's memory (get_model_state_dict's, which dcp.load writes into). False when
        unknown."""
        loaded = state_dict.get(prefix + self._weight_key)
        given_at = getattr(loaded, "_lora_ext_given_at", None)
        if aliases and given_at is not None and sharded.is_dtensor(loaded):
            # a base a merged layer's state_dict() gave, written in place since (dcp.load into it): every rank alike
            return sharded.any_rank(loaded, sharded.version(loaded) != given_at)
        if loaded is not self._weight_or_none() and not (
                aliases and isinstance(loaded, Tensor) and loaded.numel() and self._weight_or_none() is not None
                and _same_storage(loaded, self._weight_param())):
            return False
        weight = self._weight_param()
        w, record = sharded.local(weight), self.__dict__.get("_written")
        mine = bool(self._in_written(w)) and record.version != w._version
        if loaded is not weight:
            other = sharded.version(loaded)
            # a version counter of its own (a tensor made over the memory, not a view of it): written since it was made
            if other is not None and other != w._version:
                mine = other > 0
        if sharded.is_dtensor(weight):
            # every rank takes one path (the other one all-reduces): FSDP2 copies some ranks' shards into new padded
            # memory after a .to() or an assign load (reset_sharded_param, after the layer noted its write), where the
            # record then says no; the loader wrote every rank's shard alike
            return sharded.any_rank(weight, mine)
        return mine

    def _lossless_now(self) -> bool:
        """Whether the next merge writes a lossless record: `lossless` if set, else on for float16/bfloat16
        weights (their merges round at 8-11 bits; a float32 merge loses ~1e-7 relative per switch, and its
        record would cost half the weight again)."""
        if self.lossless is None:
            return lossless.default_lossless(self._weight_2d().dtype)
        refusal = self._lossless_refusal()
        if refusal is not None:
            raise ValueError(refusal)
        return bool(self.lossless)

    def _lossless_refusal(self) -> Optional[str]:
        """Why lossless=True cannot record this weight (its dtype), or None."""
        dtype = self._weight_2d().dtype
        if self.lossless and dtype not in lossless.RECORD_DTYPES:
            return (f"{self._describe()}: lossless=True takes float16, bfloat16 or float32 weights, this one is "
                    f"{dtype} (set lossless=False or None)")
        return None

    def merge_refusal(self) -> Optional[str]:
        """Why the active adapter cannot be merged into this layer's weight, or None: a weight that is not a
        registered parameter (a parametrization computes it); FSDP1's flat parameter; a factor a forward pre-hook
        computes (prune, weight_norm); Embedding: max_norm."""
        self._check_unloaded()
        refusal = sharded.fsdp1_refusal(self, "a merge")
        if refusal is not None:
            return refusal
        w = self._weight_or_none()
        if w is None:
            return self._computed_weight("serve it unmerged, or remove the parametrization first "
                                         "(torch.nn.utils.parametrize.remove_parametrizations(module, 'weight'))")
        if w.is_meta or (self.has_lora and (self.lora_A.is_meta or self.lora_B.is_meta)):
            return f"{self._describe()}: its weight or factors are on the meta device: {self._meta_refusal()}"
        refusal = ops.overlap_refusal(w)
        if refusal is not None:
            return f"{self._describe()}: {refusal}"
        if w.dtype not in _MERGE_DTYPES:
            return (f"{self._describe()}: its weight is {w.dtype}; merges write float16, bfloat16, float32 and float64 "
                    f"weights (serve it unmerged: forwards add the adapter on the fly)")
        # (FSDP2 holding the parameters gathered: the placement the merge writes through once resharded)
        refusal = sharded.mesh_refusal(sharded.as_sharded(w, self._weight_owner(), "weight"), self._describe(),
                                       self.lora_B.shape[0] if w.dim() > 2 and self.has_lora else None)
        if refusal is not None:
            return refusal
        hooked, hows = self._hook_computed_factors()
        if hooked:  # (a plain attribute of the last forward)
            return (f"{self._describe()}'s {' and '.join(hooked)} {'is' if len(hooked) == 1 else 'are'} computed by "
                    f"{' and '.join(h for h, _ in hows)} in a forward pre-hook: a merge would read the value of the "
                    f"last forward (an optimizer step since is not in it); serve it unmerged (forwards add the "
                    f"adapter on the fly), or make it a Parameter again ({', '.join(r for _, r in hows)})")
        refusal = self._batch_merge_refusal()
        if refusal is not None:
            return refusal
        return self._lossless_refusal()  # (a refusal here: eval() warns and leaves the layer unmerged, all or none)

    def _batch_merge_refusal(self, name: Optional[str] = None, factors=None) -> Optional[str]:
        """Why a merge is refused while mixed batches serve this layer (batched.merge_refusal), or None: of the
        active adapter's live factors (eval(), merge(), a merge of trained values), or of adapter `name`'s
        (lora_A, lora_B, scaling) `factors` (a merged switch to it)."""
        if not (self.has_lora and self.__dict__.get("_open_slots")):
            return None
        if name is None:
            name, factors = self.active_adapter, (self.lora_A, self.lora_B, self.scaling)
        return batched.merge_refusal(self, name, *factors)

    def _computed_weight(self, remedy: str) -> str:
        """What merges meet in a layer whose weight is not a registered parameter (merge_refusal, _weight_param), with
        the caller's `remedy` for a computed one."""
        if "weight" in self._weight_owner().__dict__.get("_buffers", {}):
            # (removing a parametrization registers a weight that does not require grad, as lora_ext's, as a buffer)
            return (f"{self._describe()}: its weight is a buffer, not a registered parameter (removing a "
                    f"parametrization such as weight_norm registers a frozen weight so); merges write the weight "
                    f"parameter: register it again, `w = layer.weight; del layer.weight; layer.weight = "
                    f"nn.Parameter(w, requires_grad=False)`")
        return (f"{self._describe()}: its weight is not a registered parameter (a parametrization, weight_norm or "
                f"pruning computes it); merges write the weight in place and cannot write through that: {remedy}")

    def _weight_room(self, added, taken_out=None, check: bool = True, added_name: Optional[str] = None
                     ) -> Optional[float]:
        """The weight's range, checked before a write that adds adapter `added` (A, B, s) and takes out `taken_out`
        (a switch; an unmerge takes out alone): max|W| (its finite elements: what is inf or NaN stays so) plus the
        bounds |s| r max|A| max|B|, and where those reach past the dtype's range the sum itself, W + s B A element
        by element in float64 (a W-sized copy; r12: a negative weight under a positive update was refused). Returns
        a bound on max|W| after the write, which the caller keeps once it wrote (_keep_weight_bound); check=False
        (an unmerge, which gives the base back) only computes it. A float16 weight, the one dtype narrow enough for
        realistic updates to leave, is looked at at every write (value stamps do not see writes through .data); the
        others where the bound kept since lora_ext's last write is stale (another write since) or too large (L1: a
        bfloat16 or float32 weight near its dtype's max merged to inf without a word, and a float32 unmerge of that
        left inf in the base for good). One device sync. (Not for tensor subclasses other than DTensor, whose values
        cannot be read here, nor for sharded bfloat16 and float32 weights: as before, unchecked.) added_name: the
        added adapter's name where it is not the active one (a switch: refusals name it)."""
        w = self._weight_2d()
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass
        if not w.is_floating_point() or not w.numel() or (is_traceable_wrapper_subclass(w)
                                                           and not sharded.is_dtensor(w)):
            return None  # (r13: a plain subclass of nn.Parameter, vLLM's, is checked)
        fp16 = w.dtype == torch.float16
        if (fp16 and not check) or (not fp16 and sharded.is_dtensor(w)):
            # (a sharded weight's max is a collective: bfloat16 and float32 ones stay unchecked, as before, so that
            # ranks that disagree meet the switch's own agreement first, not this one's reduction)
            return None
        adapters = [a for a in (added, taken_out) if a is not None]
        kept = self.__dict__.get("_weight_bound")
        weight = self._weight_param()
        known = None if fp16 or kept is None or not _unchanged(kept[0], weight, weight) else kept[1]
        factors = [t for A, B, _ in adapters for t in (A, B)]
        looked = ([] if known is not None else [sharded.abs_max(w, finite=True)])
        maxes = torch.stack(looked + [sharded.abs_max(t) for t in factors]).tolist() if looked or factors else []
        top = torch.finfo(w.dtype).max
        w_max = known if known is not None else maxes.pop(0)
        if check:  # the product B @ A itself, before the scaling: in the factors' compute dtype (r13: 1e20 factors
            # under a scaling of 1e-10 fit the range, and B @ A was inf: inf merged, NaN unmerged)
            names = ([added_name or self.active_adapter] if added is not None else []) + [self.active_adapter]
            for (A, B, _), a, b, name in zip(adapters, maxes[0::2], maxes[1::2], names):
                room = torch.finfo(reference.compute_dtype(B.dtype)).max
                if B.shape[1] * a * b > room and ops._update_max(A, B) > room:
                    raise ValueError(f"{self._describe()} adapter {name!r}: the factors' product "
                                     f"B @ A (before the scaling) is past {reference.compute_dtype(B.dtype)}'s range, "
                                     f"where the merge computes it; scale the factors (B by the scaling) first. "
                                     f"Nothing was written")
        update = sum(abs(s) * B.shape[1] * a * b for (A, B, s), a, b in zip(adapters, maxes[0::2], maxes[1::2]))
        if not w_max + update <= top and known is not None:  # (the bound kept grew: W itself again)
            w_max = float(sharded.abs_max(w, finite=True))
        if not w_max + update <= top:  # (a bound: each update's own max, s3)
            update = sum(abs(s) * ops._update_max(A, B) for A, B, s in adapters)
        if check and not w_max + update <= top:
            summed = self._summed_max(added, taken_out)
            # (what rounds to the largest value fits, where the sum is made wider than the weight and rounded once:
            # below it plus half its ulp, r13: a float16 switch at the top was refused; a float32 weight's own sum
            # rounds its B @ A first, and half an ulp past took it to inf, r14)
            wide = w.dtype in (torch.float16, torch.bfloat16)
            below = torch.nextafter(torch.tensor(top, dtype=w.dtype), torch.tensor(0.0, dtype=w.dtype)).item()
            if summed is not None and (summed < top + (top - below) / 2 if wide else summed <= top):
                return min(summed, top)
            reach = (f"the weight plus the update reaches {summed:.9g}" if summed is not None else
                     f"the update scaling * B @ A can reach {update:.6g} on a weight of up to {w_max:.6g}")
            who = (f"switching from adapter {self.active_adapter!r}"
                   + (f" to {added_name!r}" if added_name not in (None, self.active_adapter) else "")
                   if taken_out is not None else f"adapter {added_name or self.active_adapter!r}")
            raise ValueError(f"{self._describe()}, {who}: {reach}, beyond {w.dtype}'s range ({top:.9g}); nothing "
                             f"was written")
        return w_max + update

    def _summed_max(self, added, taken_out) -> Optional[float]:
        """max over W's finite elements of |W + s B A (- the adapter taken out)|, in float64 (a copy of W); None
        for a sharded weight (its parts lie on other ranks)."""
        w = self._weight_2d()
        if sharded.is_dtensor(w):
            return None
        # (one copy, 8 bytes an element, a copy of a float64 weight too, r14; a non-finite element stays so: 0 here)
        w64 = w.detach().to(torch.float64, copy=True)
        w64.nan_to_num_(0.0, 0.0, 0.0)
        with torch.no_grad():
            for pair, sign in ((taken_out, -1.0), (added, 1.0)):
                if pair is not None:
                    A, B = _whole(*pair[:2])
                    ops.merge_(w64, A.detach().double(), B.detach().double(), sign * pair[2], **self._layout())
        return float(w64.abs_().max())

    def _keep_weight_bound(self, bound: Optional[float]) -> None:
        """After lora_ext's write into the weight: _weight_room's bound on it, kept until the weight is written
        otherwise (its version counter or storage changes)."""
        weight = self._weight_param()
        stamp = None if bound is None else _stamp(weight, weight)
        if stamp is None:
            self.__dict__.pop("_weight_bound", None)
        else:
            self.__dict__["_weight_bound"] = (stamp, bound)

    def _check_untied(self):
        """Refuses a merge into a weight other modules compute with (lora_ext.ties), before anything is written."""
        tied = ties.names(self)
        if tied:
            raise ValueError(f"{self._describe()}: its weight is shared with {', '.join(tied)}; merging adapter "
                             f"{self.active_adapter!r} into it would change their outputs too (the layer adds its "
                             f"adapter on the fly when unmerged; untie the weights to merge)")

    def _merge(self, untied: bool = False):
        """Merges the active adapter (untied=True: the caller, holding the lock, has just asked ties.names)."""
        try:  # (R5: a refusal this rank alone makes is told to the others at the merge's first agreement)
            refusal = self.merge_refusal()
            if refusal is not None:  # before anything is written
                raise ValueError(refusal)
            # FSDP2: write the shards, not an all-gathered copy; ties are looked at before (a tie made between
            # gathered Parameters) and after (gathered, each module holds a copy of its own of a sharded weight)
            if not untied:
                self._check_untied()
            if sharded.reshard_if_gathered(self) and not untied:
                self._check_untied()
        except Exception as err:
            self._agree_first("merge", err)
            raise
        self._agree_first("merge")
        self._check_values(self.active_adapter)  # before writing: non-finite or overflowing updates refused
        bound = self._weight_room((self.lora_A, self.lora_B, self.scaling))
        exact = self._lossless_now()
        self._streams.write(self._weight_2d().device)
        known = self._known_finite(self.active_adapter)
        snapshot = (self.lora_A.detach().clone(), self.lora_B.detach().clone(), self.scaling)
        with deferred_interrupt(), self._writing("merge") as written:
            target = self._pinned_weight()
            written.watch(target)
            try:
                with torch.no_grad():
                    record = self._merge_into(target, *snapshot, exact)
                    written[0] = True  # (inside: see _writing)
            except lossless.ExceptionOverflow as err:  # nothing was written (unless it says weight_written)
                # (the same error, renamed: its marks and notes go on to _writing and the caller)
                err.args = (f"{self._describe()} adapter {self.active_adapter!r}: {err}",)
                raise
            self._set_merged(*snapshot, record, weight=target)
            self._stamp_finite(MERGED, known)
            self.merged = True  # (in the bookkeeping: the callers' own assignment would come after the mark's end)
            written[0] = False
        self._keep_weight_bound(bound)

    def _weight_param(self) -> Tensor:
        """The weight parameter, which merges write in place (ConvLoRA: its conv's). A KeyError naming the layer
        when the weight is not a registered parameter (a parametrization, weight_norm or pruning put a computed
        tensor in its place: a merge into that would write a temporary)."""
        weight = self._weight_or_none()
        if weight is None:
            raise KeyError(self._computed_weight("remove it first (e.g. torch.nn.utils.parametrize."
                                                 "remove_parametrizations(layer, 'weight'))"))
        return weight

    def _weight_owner(self) -> nn.Module:
        return self

    def _weight_or_none(self) -> Optional[Tensor]:
        """The weight parameter, or None where it is not a registered parameter (forwards read it as an
        attribute then, and where a layer let go of its base module: layers.let_go)."""
        owner = self._weight_owner()
        return None if owner is None else owner._parameters.get("weight")

    def _scales(self, x: Tensor) -> Tuple[Union[float, Tensor], Optional[Tensor]]:
        """(scale, scale_tensor) for the unmerged forward's op. Traced (torch.compile, torch.export,
        torch.jit.trace): the layer's scale tensor as the scale, read when the program runs. A switch writes that
        tensor as it writes the factors (see NamedAdapters._sync_scale_tensor), so one trace serves every adapter
        whatever its scaling: nothing guards on the float or bakes it in (peft's compiled hotswap turns scalings
        into tensors alike), and an exported or jit-traced program serves one adapter whole. The float instead for
        DTensor factors, where float64 and other dtypes meet (the tensor is float64 only for float64 factors, and
        the ops take a float64 tensor only for float64 operands), and under inductor's freezing (_freezing).
        Eager: the float, and beside it the float32 tensor the CUDA kernels read (CUDA graphs)."""
        compiling = ops.compiling()
        if not compiling:
            # eager, or torch.jit.trace: the Parameter's identity is checked here, not under dynamo (torch.compile
            # would guard on it; torch.export traces stand-ins for the Parameters). The eager path is kept short:
            # host time per forward matters (bench/NOTES-forward.md).
            if self._scale_owner_changed():
                if not torch.jit.is_tracing() and (not isinstance(self._parameters["lora_A"], nn.Parameter)
                                                   or _in_functional_call()):
                    # stand-ins for this call only (torch.func.functional_call, a transform's wrappers): the float,
                    # the layer's scale tensor left with its Parameters (a program made later holds it)
                    if x.is_cuda and torch.cuda.is_current_stream_capturing():
                        raise RuntimeError(f"{self._describe()}: a CUDA graph captured over functional_call's "
                                           f"stand-ins for the factors would keep this scaling through later "
                                           f"switches; capture the layer's own forward")
                    return self.__dict__["_scaling"], None
                self._refuse_in_program(torch.jit.is_tracing(), "its lora_A Parameter was replaced behind the layer's "
                                        "back (assigned into _parameters directly, as accelerate's loading does)",
                                        "run an eager forward first: it gives the new Parameters their scale tensor")
                self._sync_scale_tensor()
            if not torch._C._is_tracing():  # eager: the float, and the float32 tensor the CUDA kernels read
                t = self.__dict__.get("_scaling_t")
                if t is not None and (t.dtype is not torch.float32 or t.device != x.device):
                    t = None
                return self.__dict__["_scaling"], t
        program = not compiling or ops.exporting()  # (jit or export: holds the objects it reads)
        # (read here, past the eager path: nn.Module's attribute lookups cost host time)
        operands = tuple(o for o in (self._weight_or_none(), self.lora_A, self.lora_B) if o is not None)
        t = self._scale_tensor_for(x)
        if t is None or any(sharded.is_dtensor(o) for o in (x, *operands)):
            return self.scaling, None
        floating = [o.dtype for o in (x, *operands) if o.is_floating_point()]
        if not all((d == torch.float64) == (t.dtype == torch.float64) for d in floating):
            # float64 factors on a float32 layer (or the reverse): no op takes the tensor
            self._refuse_in_program(program, "float64 and other dtypes meet in its forward (" +
                                    ", ".join(str(d) for d in floating) + "), so no scale tensor serves the op",
                                    "hold the factors in the dtype of the layer and its input")
            return self.scaling, None
        if _freezing():
            if self._factor_writes == "":  # (never: the comparison makes dynamo guard on the count, so that an in-place
                raise AssertionError       # switch, whose factors freezing folded into constants, compiles anew)
            return self.scaling, None
        return t, None

    def _refuse_in_program(self, program: bool, why: str, remedy: str) -> None:
        """Refuses to trace (torch.export, torch.jit.trace) or capture (a CUDA graph) a forward whose scale tensor
        the program could not hold: it would bake the scaling in and, after an in-place switch, serve the new
        factors at the old scaling. Eager forwards outside a capture go on."""
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if program or capturing:
            raise RuntimeError(f"{self._describe()}: {why}: a {'traced' if program else 'captured'} program of it "
                               f"would pair later adapters' factors with this scaling; {remedy}")

    def _operands(self, x: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor], Tensor, Tensor]:
        """(x after lora_dropout, weight, bias, lora_A, lora_B) for an unmerged forward, read from the module's
        own dicts. nn.Module's attribute lookup costs about 0.5 us of host time per name and calling the identity
        dropout about 1 us: together as much host time as a small GPU forward takes (bench/NOTES-forward.md).
        A name that is not a registered parameter (torch.nn.utils.parametrize, weight_norm) is read as an
        attribute; an identity dropout with hooks, or whose instance `forward` was replaced (accelerate's
        add_hook_to_module), is called."""
        params = self._parameters
        drop = self._modules.get("lora_dropout")
        if drop is None:
            x_lora = self.lora_dropout(x)  # a plain callable (loralib's `lambda x: x`)
        elif type(drop) is nn.Identity and not _hooked(drop):
            x_lora = x
        else:
            x_lora = drop(x)
        return (x_lora, *(params[n] if n in params else getattr(self, n) for n in _OPERANDS))

    def _merge_into(self, weight: Tensor, A: Tensor, B: Tensor, s: float, exact: bool):
        """(A, B, s) merged into `weight` (the weight parameter, or a tensor of its shape): the record of a
        lossless merge (a list of them for a sharded weight: one per part of the local shard), else None."""
        if sharded.is_dtensor(weight):
            return sharded.merge_(weight, A, B, s, lossless=exact, where=self._describe(), **self._layout())
        A, B = _whole(A, B)
        with self._writable_2d(weight) as w:
            return ops.merge_(w, A, B, s, lossless=exact, **self._layout())

    def _swap_into(self, weight: Tensor, A: Tensor, B: Tensor, s: float, order: Optional[int] = None):
        """What is merged in `weight` replaced by (A, B, s) in one pass; the new record (as _merge_into's). `order`:
        ops.swap_'s pair_order (the adapters' fixed order, by name: _swap_merged)."""
        old = (self._merged_A, self._merged_B, self._merged_scaling)
        if sharded.is_dtensor(weight):
            return sharded.swap_(weight, *old, A, B, s, record=self._merged_record, where=self._describe(),
                                 **self._layout())
        old, (A, B) = _whole(*old), _whole(A, B)
        with self._writable_2d(weight) as w:
            return ops.swap_(w, *old, A, B, s, check_values=False, record=self._record_now(w), pair_order=order,
                             **self._layout())

    def _unmerge_from(self, weight: Tensor):
        """What is merged taken out of `weight` (the weight parameter, or a copy of it)."""
        args = (self._merged_A, self._merged_B, self._merged_scaling)
        if sharded.is_dtensor(weight):
            sharded.unmerge_(weight, *args, record=self._merged_record, where=self._describe(), **self._layout())
            return
        args = _whole(*args)
        with self._writable_2d(weight) as w:
            ops.unmerge_(w, *args, record=self._record_now(w), **self._layout())

    def _writable_2d(self, weight: Tensor):
        """A context giving `weight` as the 2-D matrix the ops write in place (ConvLoRA: through a contiguous copy
        when it is not)."""
        return contextlib.nullcontext(self._as_2d(weight))

    def _record_now(self, weight_2d: Tensor):
        """The merge record for taking the merged adapter out of `weight_2d` as it is now: listed elements written
        since the merge (an optimizer step, an EMA copy_, a write into .data) are taken out as a lossy unmerge
        would, keeping the write (lossless.with_writes); the others come back bit for bit."""
        record = self._merged_record
        if record is None or isinstance(record, list):  # (a sharded weight's list, one per part: not checked)
            return record
        if record.dtype != weight_2d.dtype:
            # converted outside the layer's _apply (`p.data = p.data.float()` over a model's parameters, a ConvLoRA's
            # own conv.float()): the record describes a weight that is gone
            self._keep_record(None)
            warnings.warn(f"{self._describe()}: its weight is {weight_2d.dtype} now, converted outside lora_ext "
                          f"(through .data, or a module inside the layer) since adapter {self.active_adapter!r} was "
                          f"merged losslessly into its {record.dtype} weight: that record no longer applies, and the "
                          f"adapter is taken out as a lossy unmerge does (convert the layer itself, model.to(dtype), "
                          f"to keep it)", stacklevel=_user_stacklevel())
            return None
        return lossless.with_writes(weight_2d, self._merged_A, self._merged_B, self._merged_scaling, record,
                                    **self._layout())

    def _keep_record(self, record) -> None:
        """Holds `record` as the record of the merge the weight holds now, noting its listed elements' bits. It
        never raises: the weight is written already, and the layer's bookkeeping must say so (a note that cannot be
        made, out of memory, leaves the record unnoted: writes while merged are then not looked for)."""
        self.__dict__["_merged_record"] = record
        if record is not None and not isinstance(record, list) and record.exceptions:
            weight = self._weight_param()
            if not sharded.is_dtensor(weight):  # (tensor parallel: a record of the local part's own layout)
                try:
                    with torch.no_grad():
                        lossless.note_merged(self._as_2d(weight), record, **self._layout())
                except Exception:
                    record.merged_bits = None

    def _unmerge(self):
        refusal = sharded.fsdp1_refusal(self, "an unmerge", remedy="or unmerge before wrapping the model")
        if refusal is not None:  # (merged before FSDP1 wrapped the model) before anything is written
            raise ValueError(refusal)
        sharded.reshard_if_gathered(self)
        # the memory written, pinned before it is looked at: memory another thread puts under the Parameter later is
        # neither written nor noted, and the next look judges it
        target = self._pinned_weight()
        self._see_new_memory()
        if self._merged_A is None:  # (taken as the base: nothing to take out)
            return
        bound = self._weight_room(None, (self._merged_A, self._merged_B, self._merged_scaling), check=False)
        self._streams.write(self._weight_2d().device)
        with deferred_interrupt(), self._writing("unmerge") as written:
            written.watch(target)
            try:
                with torch.no_grad():
                    self._unmerge_from(target)
                    written[0] = True  # (inside: see _writing)
            except BaseException as err:  # still merged; a sharded weight's parts merged again (sharded.unmerge_parts)
                if hasattr(err, "record") and not written[0]:
                    self._keep_record(err.record)
                raise
            self._set_merged(None, None, None)
            self._finite_stamps.pop(MERGED, None)
            self.merged = False  # (in the bookkeeping: see _merge)
            written[0] = False
        self._keep_weight_bound(bound)

    def _swap_merged(self, lora_A: Tensor, lora_B: Tensor, scaling: float, name: Optional[str] = None,
                     label: Optional[str] = None):
        """When merged, replaces the merged adapter by (lora_A, lora_B, scaling) in one pass over the weight
        (the caller holds the lock and has checked the new factors). A lossless merge stays lossless: the
        weight is then bit-identical to merging the new adapter once into the base. `name`: the new adapter's,
        when it is another than the active one (merged): the two go to ops.swap_ in the order of their names,
        the same for the switch back (a lossy switch back then rounds as its exact negation: no drift), without
        reading the factors to order them. label: the new adapter's name for refusals, where `name` is not given."""
        # (the memory written, pinned before it is looked at: see _unmerge)
        target = self._pinned_weight() if self.merged and self._merged_A is not None else None
        self._see_new_memory()
        if not (self.merged and self._merged_A is not None):
            return
        if not self._known_finite(MERGED):
            ops.check_finite("the merged adapter", self._merged_A, self._merged_B, self._merged_scaling)
        bound = self._weight_room((lora_A, lora_B, scaling), (self._merged_A, self._merged_B, self._merged_scaling),
                                  added_name=name or label)
        self._streams.write(self._weight_2d().device)
        snapshot = (lora_A.clone(), lora_B.clone(), scaling)
        with deferred_interrupt(), self._writing("switch") as written:
            written.watch(target)
            try:
                with torch.no_grad():
                    order = None if name is None or name == self.active_adapter else (
                        1 if name < self.active_adapter else -1)
                    record = self._swap_into(target, *snapshot, order=order)
                    written[0] = True  # (inside: see _writing)
            except BaseException as err:
                # the old adapter merged back, with the record the error carries (ops.swap_) ...
                if hasattr(err, "record") and not written[0]:
                    self._keep_record(err.record)
                if getattr(err, "weight_is_base", False):  # ... or, that failing too, the base: unmerged now
                    self._forget_merge()
                if isinstance(err, lossless.ExceptionOverflow):
                    err.args = (f"{self._describe()}, switching from adapter {self.active_adapter!r}: {err}",)
                raise
            self._set_merged(*snapshot, record, weight=target)
            self._stamp_finite(MERGED)
            written[0] = False
        self._keep_weight_bound(bound)

    def _apply(self, fn, recurse=True):
        """module.to(...) and the like (_apply_merged). A change of the live factors' or the weight's dtype forgets
        which adapters are known finite: each is checked again at its next use as the new dtypes hold it (a float32
        adapter of 1e5 is inf in float16; a switch after .half() served it)."""
        self._check_unloaded()
        before = self._value_dtypes()
        bias = self._bias_before_apply()
        module = self._apply_merged(fn, recurse)
        if self._value_dtypes() != before:
            self.__dict__.get("_finite_stamps", {}).clear()
        if bias is not None:
            self._bias_after_apply(*bias)
        self._note_factors(moved=True)  # (new storage: ties)
        return module

    def _bias_copy(self, clone: bool = True) -> Optional[Tensor]:
        """A copy of the layer's own bias's values, where there are values to note (not on the meta device, not a
        sharded DTensor, the conv of a convolution still there); else None. clone=False: the values themselves
        (a detached alias, which keeps the old storage through a conversion that gives the bias new storage)."""
        from .utils import _layer_bias
        own = _layer_bias(self) if self.__dict__.get("_modules", {}).get("conv", self) is not None else None
        if own is None or own[1].is_meta or sharded.is_dtensor(own[1]):
            return None
        values = own[1].detach()
        return values.clone() if clone else values

    def _note_bias_at_first_training_forward(self) -> None:
        """The bias's values before the first forward with gradients, where inject noted none (a layer built by
        hand, or injected on the meta device): save_peft_adapter names the bias if they change (utils.trained_bias;
        r10: named because it required grad, untrained, a loralib checkpoint converted to peft's format)."""
        self.__dict__["_bias_at_inject"] = self._bias_copy()

    def _bias_before_apply(self):
        """(the bias's dtype and its values) before a conversion, where inject noted its values; else None. No copy
        (r10: a copy at every .to(), device moves included): a conversion of the dtype or the device gives the bias
        new storage and leaves these values as they were; one that writes in place keeps the dtype, and
        _bias_after_apply looks no further."""
        if self.__dict__.get("_bias_at_inject") is None:
            return None
        values = self._bias_copy(clone=False)
        return None if values is None else (values.dtype, values)

    def _bias_after_apply(self, dtype, values) -> None:
        """After a conversion of the bias's dtype, its values at inject as the new dtype holds them (a round trip
        through bfloat16 changed them: a bias never trained was named as trained, r9), or that it had trained
        (utils.trained_bias)."""
        from .utils import _layer_bias
        own = _layer_bias(self)
        if own is None or own[1].dtype == dtype:
            return
        held = [t for t in (self.__dict__["_bias_at_inject"], self.__dict__.get("_bias_converted")) if t is not None]
        if not any(t.shape == values.shape and torch.equal(t.to(device=values.device, dtype=values.dtype), values)
                   for t in held):
            self.__dict__["_bias_trained"] = True
        else:
            converted = self._bias_copy()
            if converted is not None:
                self.__dict__["_bias_converted"] = converted

    def _value_dtypes(self) -> tuple:
        """The dtypes an adapter's finite-value check depends on: the live factors' and the weight's."""
        params = self.__dict__.get("_parameters", {})
        weight = self._weight_or_none()
        return tuple(getattr(t, "dtype", None) for t in (params.get("lora_A"), params.get("lora_B"), weight))

    def _apply_merged(self, fn, recurse=True):
        """module.to(...) and the like on a merged layer. A move keeps the merge, the snapshot of what is merged
        (in its own dtype) and the record (records are exact on every backend). A dtype change gives the base
        back (exactly when there is a record), converts it and merges the snapshot again, losslessly where the
        layer was lossless or its new dtype is by default (so .float() then .bfloat16() gives back the exact
        base). To meta, the layer is left unmerged: forwards add the adapter on the fly. A merge the new dtype
        refuses (lossless=True beyond the record dtypes, float16's range, a lossless record over its limit) leaves
        the layer unmerged too, with a warning. (A new memory format, channels_last, keeps the merge: the record is
        by logical position.)"""
        if self.__dict__.get("_buffers", {}).get("_merged_A") is not None:
            self._see_new_memory()  # (new memory set by hand since the last write: looked at before the move)
        if self.__dict__.get("_buffers", {}).get("_merged_A") is None:
            return super()._apply(fn, recurse)
        # (Ctrl-C held back to the end: the weight and `merged` change together, as in train())
        with self._lock, deferred_interrupt(), self._writing("move or dtype change") as written:
            # (the Parameter, not _weight_2d(): a conv's is a view, which holds the Parameter through the _apply below,
            # and torch's swap_tensors, module.to()'s for DTensors, refuses a tensor held elsewhere)
            w = self._weight_param()
            new_dtype = fn(torch.empty(0, dtype=w.dtype, device=w.device)).dtype
            record = self._merged_record
            snapshot = (self._merged_A, self._merged_B, self._merged_scaling)
            trained = self.__dict__.get("_trained_merged")  # (kept through a dtype change's merge of the snapshot)
            # (a factor Parameter put in place since the merge goes on being served on the fly: see below)
            substituted, merged_from = self._factors_substituted(), self.__dict__.get("_merged_from")
            if new_dtype == w.dtype:
                module = super()._apply(fn, recurse)
                if not substituted:  # (new Parameter objects under torch's overwrite-on-conversion flag)
                    self._note_merged_from()
                weight = self._weight_param()
                device = weight.device
                self._buffers["_merged_A"], self._buffers["_merged_B"] = (t.to(device) for t in snapshot[:2])
                if record is not None:
                    self.__dict__["_merged_record"] = record.to(device)
                if weight.is_meta or (getattr(fn, "__qualname__", "").startswith("Module.to_empty.")
                                      and not self._in_written(weight)):
                    # (to_empty: new memory holding nothing, which the caller fills with a base: unmerged; a
                    # ConvLoRA's to_empty(recurse=False) leaves its conv's weight as it was)
                    self._set_merged(None, None, None)
                    self.merged = False
                    if weight.is_meta:  # (torch.func's ensembling recipe: a meta copy of a merged model)
                        warnings.warn(
                            f"{self._describe()}: moved to the meta device while merged, it is unmerged (its weight "
                            f"holds nothing to merge into): a functional_call of it given a merged model's "
                            f"parameters (named_parameters(), torch.func.stack_module_state of eval() models) would "
                            f"add the adapter to weights that hold it already. Give it state_dict()s, or models "
                            f"in train() mode", stacklevel=_user_stacklevel())
                else:
                    self._note_written()  # (a move or a new memory format: new storage, as merged)
                return module
            written.watch(self._weight_param())
            with torch.no_grad():
                self._unmerge_from(self._weight_param())
                written[0] = True  # (inside: see _writing)
            self._set_merged(None, None, None)
            self.merged = False  # until the merge below: a refused one leaves the layer unmerged, consistently
            written[0] = False
            module = super()._apply(fn, recurse)
            weight = self._weight_param()
            if weight.is_meta:  # as above: left unmerged
                return module
            w = self._weight_2d()
            A, B, s = fn(snapshot[0]), fn(snapshot[1]), snapshot[2]
            # A merge the new dtype refuses leaves the layer unmerged with a warning, as eval() does: raising here
            # would stop a model's .to() / .half() part way, its modules before this one converted and the rest not
            refusal = self.merge_refusal()
            if refusal is None:
                try:
                    self._weight_room((A, B, s))
                except ValueError as err:
                    refusal = str(err)
            if refusal is None:
                exact = (self.lossless is not False and (record is not None or self._lossless_now())
                         and w.dtype in lossless.RECORD_DTYPES)
                try:
                    written.watch(self._weight_param())
                    with torch.no_grad():
                        record = self._merge_into(self._weight_param(), A, B, s, exact)
                        written[0] = True  # (inside: see _writing)
                except lossless.ExceptionOverflow as err:
                    if getattr(err, "weight_written", False):  # (_writing marks the layer broken)
                        raise
                    refusal = str(err)  # nothing was written
            if refusal is not None:
                warnings.warn(f"{self._describe()}: converted to {w.dtype}, adapter {self.active_adapter!r} is left "
                              f"unmerged (forwards add it on the fly): {refusal}", stacklevel=2)
                return module
            written[0] = True
            self._set_merged(A, B, s, record)
            self.__dict__["_trained_merged"] = trained  # (the snapshot merged again: the live factors still serve)
            if substituted:  # (the snapshot merged again, not the factor put in place since: still served on the fly)
                self.__dict__["_merged_from"] = merged_from
            self.merged = True
            written[0] = False
            return module

    def train(self, mode: bool = True):
        if not isinstance(mode, bool):  # (torch's refusal, before the merge rather than after it)
            raise ValueError(f"{self._describe()}: training mode is expected to be boolean, got {mode!r}")
        # (Ctrl-C held back to the end, so that it lands with `merged` saying what the weight holds)
        with self._lock, deferred_interrupt():
            self._see_new_memory()
            # under lora.disable_adapter the weight stays the base: eval()'s merge waits for the block's end
            if self.merge_weights and mode == self.merged and not (self._adapter_off and not mode):
                if self.has_lora:  # (a layer unloaded or left broken says so, before its weight is looked at)
                    self._check_sound()
                refusal = self.merge_refusal() if not mode and self.has_lora else None
                tied = ties.names(self) if not mode and self.has_lora and refusal is None else None
                if not mode and self.has_lora and refusal is None and not tied \
                        and sharded.reshard_if_gathered(self):  # (FSDP2: ties between the sharded Parameters too)
                    tied = ties.names(self)
                if (refusal is not None or tied) and not mode:
                    self._agree_first("merge", skip=True)  # (FSDP2: the other ranks' eval() skips it too, R5)
                if refusal is not None:
                    # as for a tied weight below: eval() of a model does not stop halfway at this layer
                    warnings.warn(f"eval() leaves adapter {self.active_adapter!r} unmerged: {refusal}", stacklevel=2)
                elif tied:
                    # eval() of a model must not stop halfway: a tied weight stays unmerged (merge() refuses)
                    warnings.warn(f"{self._describe()}: its weight is shared with {', '.join(tied)}; "
                                  f"eval() leaves adapter {self.active_adapter!r} unmerged (merging would change "
                                  f"their outputs too)", stacklevel=2)
                elif mode or not self.has_lora:
                    if self.has_lora:
                        self._unmerge()
                    self.merged = not mode
                else:
                    try:
                        self._merge(untied=True)
                        self.merged = True
                    except RuntimeError as err:  # (FSDP2: a rank that may not merge this layer skipped it, R5)
                        if not getattr(err, "refused_elsewhere", False):
                            raise
                        warnings.warn(f"eval() leaves adapter {self.active_adapter!r} unmerged: {err}", stacklevel=2)
                    except lossless.ExceptionOverflow as err:  # (refused before any write, or put back: else
                        if getattr(err, "weight_written", False):  # _writing marked the layer broken)
                            raise
                        # a lossless record over its limit says nothing against the adapter, which is served right on
                        # the fly: as a refusal above, eval() of a model does not stop halfway at this layer (its
                        # modules before it in eval mode, the rest training). (Values that are not finite or could
                        # leave the weight dtype's range still raise: served on the fly they would give inf or NaN.)
                        warnings.warn(f"eval() leaves adapter {self.active_adapter!r} unmerged: {err}", stacklevel=2)
            elif not mode and self._merge_behind():
                # (as above, eval() of a model does not stop halfway at this layer: what it cannot merge stays served
                # right, through the merge)
                refusal = sharded.fsdp1_refusal(self, "a merge")  # (merged before FSDP1 wrapped it, trained since)
                if refusal is None:  # (the trained values, while a mixed batch serves the layer: r41, 17.5 off compiled)
                    refusal = self._batch_merge_refusal()
                try:
                    if refusal is None:
                        self._merge_trained()
                except lossless.ExceptionOverflow as err:
                    if getattr(err, "weight_written", False):
                        raise
                    refusal = str(err)
                if refusal is not None:
                    warnings.warn(f"eval() leaves the trained values of adapter {self.active_adapter!r} served "
                                  f"through the merge (not merged): {refusal}", stacklevel=2)
            nn.Module.train(self, mode)
        return self

    def merge(self) -> None:
        """Merges the active adapter into the weight now, whatever the train/eval mode."""
        self._check_unloaded()
        with self._lock, deferred_interrupt():  # (as in train())
            # (under the lock: a disable_adapter block's entry, on another thread, disables the layer after its unmerge)
            if self._adapter_off and self.has_lora and not self.merged:
                raise ValueError(f"{self._describe()}: its adapters are disabled (lora.disable_adapter): the weight "
                                 f"serves the base until the block ends; merge after it")
            self._see_new_memory()
            if self.has_lora and not self.merged:
                self._merge()
            elif self._merge_behind():
                refusal = self._batch_merge_refusal()
                if refusal is not None:
                    raise ValueError(refusal)
                self._merge_trained()
            self.merged = True

    def _merge_behind(self) -> bool:
        """Whether the layer is merged with other values than its live factors, which it trained through the merge
        since (_trains_merged): merge() writes them (_merge_trained)."""
        return self.merged and self._trained()

    def _trained(self) -> bool:
        """Whether a backward went through a merged forward of this layer since its snapshot (_trains_merged), or,
        for a layer that trained through its merge before, its live factors were written since (_put_snapshot)."""
        mark = self.__dict__.get("_trained_merged")
        if not mark:
            return False
        return bool(mark[0]) or (len(mark) > 1 and self._factor_versions() != tuple(mark[1:]))

    def _note_factor_versions(self) -> None:
        """After a switch wrote the live factors, which hold what it merged: the Parameters merged are these
        (_factors_substituted), and a layer that trained through its merge notes their identities and versions
        again (_put_snapshot noted them before they were written)."""
        self._note_merged_from()
        mark = self.__dict__.get("_trained_merged")
        if self.merged and mark and len(mark) > 1 and not mark[0]:
            mark[1:] = self._factor_versions()

    def _note_merged_from(self) -> None:
        """The live factor Parameters are the ones merged (_factors_substituted): after a switch wrote them, or
        Parameters of their values were put in their place while they held what was merged."""
        if self.__dict__.get("_merged_from"):
            params = self._parameters
            self.__dict__["_merged_from"] = (params.get("lora_A"), params.get("lora_B"))

    def _factor_versions(self) -> tuple:
        """The live factors' identities and version counters (in-place writes, an optimizer's step, bump them): the
        objects the layer holds (not _live_factors, which reads a parametrization's output, a new tensor each time).
        Inference tensors have no version counter: lora_ext's own writes into them count (_inference_values_written),
        and nothing else can write them outside inference mode or train them."""
        params = self._parameters
        A, B = (params[n] if n in params else self.__dict__.get(n) for n in ("lora_A", "lora_B"))
        return tuple(v for t in (A, B) for v in (id(t), self._version_of(t)))

    def _version_of(self, t) -> object:
        if not isinstance(t, Tensor):
            return 0
        return ("inference", self.__dict__.get("_inference_epoch", 0)) if t.is_inference() else t._version

    def _merge_trained(self) -> None:
        """eval() or merge() of a merged layer that trained through its merge (_trains_merged): the live factors
        merged in place of the snapshot, in one pass (_swap_merged), so that forwards compute from the weight alone
        again (until a write into the live factors, which _put_snapshot noted: served at once). The caller holds the
        lock."""
        refusal = sharded.fsdp1_refusal(self, "a merge")  # (merged before FSDP1 wrapped it, trained since)
        if refusal is not None:
            raise ValueError(refusal)
        # FSDP2: write the shards, not an all-gathered copy (F1: after a forward that left them gathered, the next
        # reshard dropped this merge, and train() took the trained factors out of the old one: the base 0.71 off)
        sharded.reshard_if_gathered(self)
        self._agree_first("switch")
        self._check_values(self.active_adapter)
        self._swap_merged(*(sharded.full(t).detach() for t in (self.lora_A, self.lora_B)), self.scaling)

    def unmerge(self) -> None:
        """Restores the base weight now (forwards then add the adapter on the fly)."""
        self._check_unloaded()
        with self._lock, deferred_interrupt():  # (as in train())
            self._see_new_memory()
            if self.merged and self._merged_A is not None:
                self._unmerge()
            self.merged = False

    # -- checkpoints: always the base weight ------------------------------------------------------------

    def state_dict(self, *args, **kwargs):
        with self._lock:
            self._check_sound()  # (a weight no record describes would be saved as the base)
            self._see_new_memory()
            self._streams.read(self._weight_owner().weight.device)
            _first_post_hook(self)
            return nn.Module.state_dict(self, *args, **kwargs)  # (the base goes in by _base_into_state)

    def _base_into_state(self, state, prefix: str, local_metadata) -> None:
        """The base in place of a merged weight in `state`, and the adapter's name in the state's metadata: from the
        layer's first state_dict post-hook, so that the user's post-hooks see the state state_dict() returns (N1: they
        saw the merged weight; a hook that cast its copy had the layer drop its lossless record for good)."""
        with self._lock:
            # whose factors these are, in the state's metadata (no key of its own: loralib's keys stay as they are;
            # torch.save keeps it): a load into a layer serving another adapter it holds is refused (_load_whole)
            if isinstance(local_metadata, dict):
                local_metadata[ADAPTER_METADATA] = self.active_adapter
            if self.merged and self._merged_A is not None:
                key = prefix + self._weight_key
                if key not in state:  # a parametrization registered after the merge computes the weight now
                    raise KeyError(f"{self._describe()}: merged, then its weight was parametrized; a checkpoint "
                                   f"would save the adapter as part of the base: remove the parametrization (e.g. "
                                   f"torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')), then save")
                base = state[key].detach().clone(memory_format=torch.contiguous_format)
                with torch.no_grad():
                    self._unmerge_from(base)
                base._lora_ext_unmerged = True  # (see _serves_merged)
                base._lora_ext_given_at = sharded.version(base)  # (written in place since: a loader's)
                _given_bases[0] = True
                state[key] = base

    def _serves_merged(self) -> bool:
        """Whether the forward computes from the weight alone: merged, unless the weight it reads now is the base a
        merged layer's state_dict() gave (torch.func.functional_call(model, model.state_dict()) puts it in place of
        the merged weight: loralib's state_dict holds the merged weight there, and its forward computes with it).
        Eager forwards only (the mark is an attribute of that tensor object: see the README). Until a merged layer's
        state_dict marks a base in this process, the flag alone (host time of every merged forward)."""
        if not self.merged:
            return False
        if ops.compiling():
            if _freezing() and self._weight_writes == "":  # (never: the comparison makes dynamo guard on the count,
                raise AssertionError                       # so that a merged switch, which writes the weight a frozen
            return True                                  # graph holds as a constant, compiles anew)
        written = self.__dict__.get("_written")  # (_new_memory, spelled out: every merged forward asks)
        if type(written) is _Written and written.moved():  # (`weight.data = W` and the like since the last write)
            self._see_new_memory()
            if not self.merged:
                return False
        return not _given_bases[0] or not self._given_base()

    def _given_base(self) -> bool:
        """Whether the weight read now is a base this layer's state_dict() gave while merged (marked there), and not
        a tensor the layer merged into since (torch.utils.swap_tensors moves the mark with the tensor's __dict__)."""
        w = self._weight_or_none()
        if not getattr(w, "_lora_ext_unmerged", False):
            return False
        return not self._in_written(w)  # (None, no storage of its own: not the one written)

    def _trains_merged(self) -> bool:
        """Whether this merged forward computes from the live factors (_merged_training_factors): where autograd
        records it and they require grad (training with the model in eval mode, for frozen BatchNorm statistics or
        no dropout; training after merge(); a checkpointed forward recomputed after eval()), and in every forward
        after a backward reached them through such a forward (_trained_merged, set by a hook on the stacked factors;
        under torch.compile at the forward itself), until the merged snapshot changes (_put_snapshot: the next
        merge, unmerge or switch), so that a forward under torch.no_grad() between training steps serves what was
        trained, not the merge from before. A forward with gradients on that no backward follows (a validation
        forward without no_grad) leaves the next ones computing from the weight alone. (loralib's merged layers
        compute from the weight alone in all of these: the factors get no gradient, and an optimizer skips them.)
        torch.export and torch.jit.trace of a merged layer trace the weight alone (a program made to serve), unless
        it trained through its merge already."""
        if self._trained():
            return True
        if self.__dict__.get("_buffers", {}).get("_merged_A") is None:
            return False
        substituted = self._factors_substituted()
        if not substituted and not torch.is_grad_enabled():
            return False
        if torch.jit.is_tracing() or ops.exporting():  # (a program of a merged model serves: from the weight
            return False                                # alone, as before, unless trained above)
        if substituted:
            return True
        if not any(t.requires_grad for t in self._live_factors()):
            return False
        if ops.compiling():  # (no hook in a traced graph, where it breaks it: marked by the forward)
            mark = self.__dict__.get("_trained_merged")  # (not setdefault: torch 2.11's dynamo cannot trace it, and
            if mark is not None:                        # fullgraph=True refused the forward)
                mark[0] = True
            else:
                self.__dict__["_trained_merged"] = [True]
        return True

    def _factors_substituted(self) -> bool:
        """Whether this forward reads other lora_A/lora_B tensors than the Parameters that were merged: given in
        their place for the call by torch.func.functional_call (an adapter's factors swapped in, vmap over several
        adapters' factors: BatchedTensors), or Parameters put in their place since the merge. Such a forward computes
        from the live factors too (_merged_training_factors), with or without gradients: the weight alone would
        serve the merged adapter whatever the call gave. The Parameters a merge noted are compared by identity, one
        dict look per factor. A sharded factor (FSDP2, whose forward puts unsharded Parameters in place of the
        sharded ones, tensor parallelism) is not compared, nor one merged while a parametrization computed it (not in
        _parameters: the merge read its value then); one that a parametrization, pruning or weight_norm computes
        since the merge counts as given."""
        noted = self.__dict__.get("_merged_from")
        if not noted:
            return False
        params = self._parameters
        if params.get("lora_A") is noted[0] and params.get("lora_B") is noted[1]:  # (every forward: kept short)
            return False
        for name, merged in zip(("lora_A", "lora_B"), noted):
            live = params.get(name)
            if merged is None or live is merged or sharded.is_dtensor(merged):
                continue
            return True  # (None: a parametrization or a pruning/weight_norm hook computes it since the merge)
        return False

    def _live_factors(self) -> Tuple[Tensor, Tensor]:
        """(lora_A, lora_B) as a forward reads them, from the module's own dicts (as _operands reads them)."""
        params = self._parameters
        return tuple(params[n] if n in params else getattr(self, n) for n in ("lora_A", "lora_B"))

    def _merged_training_factors(self) -> Tuple[Tensor, Tensor]:
        """(A', B') for the unmerged op over the merged weight W + s0 B0 A0 (scale 1, no dropout, as merged): A' the
        live A and the merged snapshot's A0 stacked along the rank (by group for a MergedLinear), B' = [s B, -s0 B0],
        so that the op computes W x + s B A x, the live adapter's output, and gives the live factors (and x and the
        weight) their gradients, whatever was merged: optimizer steps on the factors since the merge take effect
        at once. The weight is not written (nothing to take back, no lock held across the forward)."""
        A, B = self._live_factors()
        # (FSDP2: the snapshot of a sharded layer is sharded, the live factors gathered inside its forward). Each
        # stack in the wider of its two dtypes: the snapshot's part must cancel what the merge wrote (B0 rounded to
        # a narrower live A's dtype left 0.11 of the merged update in the output)
        A0, B0 = (sharded.full(t) for t in (self._merged_A, self._merged_B))
        dA, dB = torch.promote_types(A.dtype, A0.dtype), torch.promote_types(B.dtype, B0.dtype)
        A, A0 = A.to(dA), A0.to(device=A.device, dtype=dA)
        B, B0 = B.to(dB), B0.to(device=B.device, dtype=dB)
        groups = len(self._block_ids) if isinstance(self, MergedLinear) else 1
        # (the stacking in the factors' dtype: torch.cat under autocast to another 16-bit dtype raised torch's
        # "Unexpected floating ScalarType in at::autocast::prioritize", naming no layer; the op casts them itself)
        device = A.device.type
        try:
            autocast = torch.is_autocast_enabled(device)
        except RuntimeError:  # (a meta factor: the op refuses it below, naming the layer)
            autocast = False
        with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
            A = torch.cat([A.reshape(groups, A.shape[0] // groups, A.shape[-1]),
                           A0.reshape(groups, A0.shape[0] // groups, A0.shape[-1])], 1)
            B = torch.cat([B * self.scaling, B0 * -self._merged_scaling], 1)
        if not ops.compiling():  # a backward through either: trained (see _trains_merged). Also when
            # marked already: a merge between this forward and its backward starts a new snapshot, unmarked
            self.__dict__.setdefault("_trained_merged", [False])  # (a layer pickled before the mark existed)
            for t in (A, B):
                if t.requires_grad:
                    t.register_hook(functools.partial(_mark_trained, self))
        elif not ops.exporting():  # (no hook in a traced graph: marked at each run, through either factor that
            if A.requires_grad:    # trains: LoRA-FA freezes A)
                A = _mark_in_graph(self, A)
            elif B.requires_grad:
                B = _mark_in_graph(self, B)
        return A.reshape(A.shape[0] * A.shape[1], A.shape[2]), B

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._check_unloaded()
        if self.__dict__.get("_open_batches"):
            raise RuntimeError(f"{self._describe()}: load_state_dict while a mixed batch (lora.batch_adapters) "
                               f"serves this layer would change it under the batch's rows; load after the block "
                               f"closes")
        # the layer's own pre-hooks first (torch runs them inside nn.Module._load_from_state_dict, below, where they
        # would come after the checks here): a hook that renames or reshapes a key is seen as it leaves them. They
        # run outside the lock (a hook may wait for a forward on another thread), and torch's loop below then finds
        # none on this thread (_PreHooks): the dict stays the one the hooks' handles remove them from.
        hooks = self._load_state_dict_pre_hooks
        if not isinstance(hooks, _PreHooks):  # (a layer pickled before: its hooks run in torch's loop, after the checks)
            self._map_keys(state_dict, prefix)
            self._load_whole(state_dict, prefix, *args, **kwargs)
            return
        for hook in list(hooks.values()):
            hook(state_dict, prefix, *args, **kwargs)
        self._map_keys(state_dict, prefix)
        with hooks.run():
            self._load_whole(state_dict, prefix, *args, **kwargs)

    def _map_keys(self, state_dict, prefix) -> None:
        """Keys of other checkpoint layouts mapped to the layer's own, after its pre-hooks (ConvLoRA)."""

    def _foreign_state(self, state_dict, prefix: str, local_metadata) -> Optional[str]:
        """Why a state's lora_A / lora_B must not load into this layer, or None: the state's metadata says they are
        an adapter this layer holds but does not serve (ADAPTER_METADATA), whose values they would overwrite."""
        whose = local_metadata.get(ADAPTER_METADATA) if isinstance(local_metadata, dict) else None
        if not isinstance(whose, str) or whose == self.active_adapter or not self.has_adapter(whose) \
                or not any(prefix + k in state_dict for k in ("lora_A", "lora_B")):
            return None
        return (f"{self._describe()} (at {prefix[:-1]!r}): the state's lora_A / lora_B are adapter {whose!r}'s "
                f"(state_dict() holds the active adapter's factors under loralib's keys), but this layer serves "
                f"adapter {self.active_adapter!r}, which they would overwrite; set_adapter(model, {whose!r}) first, "
                f"or save and load adapters by name (save_peft_adapter / load_peft_adapter)")

    def _load_whole(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        args = (local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        foreign = self._foreign_state(state_dict, prefix, local_metadata)
        if foreign is not None:
            raise RuntimeError(foreign)
        whose = local_metadata.get(ADAPTER_METADATA) if isinstance(local_metadata, dict) else None
        if isinstance(whose, str) and whose != self.active_adapter and not self.has_adapter(whose) \
                and any(prefix + k in state_dict for k in ("lora_A", "lora_B")):
            # (as loralib, into the live factors; but a stale state of a deleted adapter went into another without
            # a word: h4. One message for every layer: Python shows it once)
            warnings.warn(f"load_state_dict: lora_A / lora_B saved as adapter {whose!r}'s load into adapter "
                          f"{self.active_adapter!r} of layers that hold no {whose!r} (state_dict() and lora_state_dict "
                          f"hold the active adapter's factors); load adapters by name with load_peft_adapter to keep "
                          f"them apart", UserWarning, stacklevel=2)
        if self._refuse_misfit_load(state_dict, prefix, *args):
            return
        with self._lock:
            # (again, under the lock the copy below takes: a switch of the layer alone on another thread between the
            # check above and the copy made the load write one adapter's factors over another's, r43)
            foreign = self._foreign_state(state_dict, prefix, local_metadata)
            if foreign is not None:
                raise RuntimeError(foreign)
            self._streams.write(self._weight_owner().weight.device)
            self._see_new_memory()  # (the unmerge below would take the adapter out of a base set by hand)
            if self.merged and self._merged_A is not None:
                incoming = [state_dict.get(prefix + k) for k in ("lora_A", "lora_B")]
                if any(isinstance(t, Tensor) for t in incoming):  # refused before the base is touched
                    A, B = (t if isinstance(t, Tensor) else p for t, p in zip(incoming, (self.lora_A, self.lora_B)))
                    ops.check_finite(f"loading {self._describe()} adapter {self.active_adapter!r}", A, B,
                                     self.scaling, weight_dtype=self._weight_2d().dtype)
                # Loading brings a base weight and/or new factors: hold the base now, merge again after.
                with deferred_interrupt():  # (the weight and `merged` change together, as in train())
                    if self._written_in_place(state_dict, prefix):
                        # the loader wrote the live weight already: it holds the loaded base, nothing to take out
                        self._set_merged(None, None, None)
                        self._finite_stamps.pop(MERGED, None)
                    else:
                        self._unmerge()
                    self.merged = False  # until the post-load hook merges again: forwards in between stay right
                    self._remerge_pending = True
                    self.__dict__["_weight_before_load"] = self._weight_or_none()  # (assign=True: see below)
            loaded = state_dict.get(prefix + self._weight_key)
            weight = self._weight_or_none()
            if self.__dict__.get("_broken") is not None and isinstance(loaded, Tensor) and weight is not None \
                    and not _same_storage(loaded, weight):  # (its own unknown weight brings nothing)
                # judged after the load (_remerge_after_load): a copy that fails (a size mismatch, a meta tensor)
                # is only reported at the end, by load_state_dict
                factors = all(isinstance(state_dict.get(prefix + k), Tensor) for k in ("lora_A", "lora_B"))
                self.__dict__["_loading_broken"] = (weight, None if weight.is_inference() else weight._version,
                                                    factors)
            live = (self._parameters.get("lora_A"), self._parameters.get("lora_B"))
            nn.Module._load_from_state_dict(self, state_dict, prefix, *args)
            if any(prefix + k in state_dict for k in ("lora_A", "lora_B")):
                self._note_factor_write()  # (r13: an in-place load of the live factors, for freezing's guard)
            if any(self._parameters.get(k) is not p for k, p in zip(("lora_A", "lora_B"), live)):
                # assign=True: the loaded tensors are the active adapter's own Parameters now, lent to no one, with
                # a scale tensor of their own (on their device: after a meta-device build too)
                self.__dict__.update(_owner=None, _active_own=None)
                self._sync_scale_tensor()

    def _refuse_misfit_load(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                            error_msgs) -> bool:
        """Whether a value the load brings for a tensor of this layer (its own, its conv's, a parametrization's
        original) does not fit: another shape (torch's size mismatch), not a tensor, or a meta tensor to copy from.
        Each fails the load_state_dict; torch copies every tensor that fits before it raises (a new base under the
        old adapter, the trained factors merged on the way). Then none of the layer is loaded: torch's message for
        each misfit, one naming the layer, its missing and unexpected keys as torch reports them, and its children's
        keys handed their own tensors, so that their loads write nothing either. A tensor the layer shares with
        another module (a tied head) is loaded through that module's key, as torch loads it, and so are the keys of
        a child with load pre-hooks of its own (a conv's), which torch runs when it loads that child, after this."""
        assign = local_metadata.get("assign_to_params_buffers", False)
        misfits, keys = [], {}
        for sub, module in self.named_modules(remove_duplicate=False):
            if sub and module._load_state_dict_pre_hooks:
                continue
            persistent = [(k, t) for k, t in module._buffers.items() if k not in module._non_persistent_buffers_set]
            for name, t in (*module._parameters.items(), *persistent):
                key = prefix + (sub + "." if sub else "") + name
                if t is None:
                    continue
                keys[key] = t
                if key not in state_dict or nn.parameter.is_lazy(t):
                    continue
                new = state_dict[key]
                if not torch.overrides.is_tensor_like(new):
                    misfits.append(f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like '
                                   f"object from checkpoint but received {type(new)}")
                    continue
                shape = new.shape[1:] if t.dim() == 0 and new.shape == (1,) else new.shape  # (torch's 0.3 rule)
                if shape != t.shape:
                    misfits.append(f"size mismatch for {key}: copying a param with shape {new.shape} from "
                                   f"checkpoint, the shape in current model is {t.shape}.")
                elif new.is_meta and not t.is_meta and not assign:
                    misfits.append(f'While copying the parameter named "{key}": cannot copy out of a meta tensor')
        if not misfits:
            return False
        error_msgs.extend(misfits)
        error_msgs.append(f"{self._describe()} at {prefix!r}: none of its keys was loaded, as one of them does not "
                          f"fit (lora_ext loads a layer whole or not at all; its merge and adapter are as before)")
        own = {prefix + k for k, t in (*self._parameters.items(), *self._buffers.items())
               if t is not None and k not in self._non_persistent_buffers_set}
        if strict:  # (as nn.Module._load_from_state_dict reports them for the layer's own tensors)
            missing_keys.extend(k for k in own if k in keys and k not in state_dict)
            for key in state_dict:
                if key.startswith(prefix) and key != prefix + "_extra_state":
                    name = key[len(prefix):].split(".", 1)
                    if name[0] not in self._modules if len(name) > 1 else key not in own:
                        unexpected_keys.append(key)
        for key, t in keys.items():  # (the children's loads, torch's, come after this one)
            if key not in own and key in state_dict:
                state_dict[key] = t
        return True


# (their answers come from tracing.compiling(): never compiled as frames of their own, R5: _guard, compiled alone
# under a compiled caller's eager part, gave no lock)
tracing._eager_only(_freezing, LoRALayer._guard)


def _refill_buffer(layer: nn.Module, name: str, value: Optional[Tensor]) -> None:
    """reset_parameters() puts a non-persistent buffer's value back (`value`, None: none kept): after a build on meta
    and to_empty(), the buffer holds garbage that no state dict load restores (G3)."""
    buffer = layer.__dict__.get("_buffers", {}).get(name)
    if value is not None and buffer is not None and not buffer.is_meta:
        with torch.no_grad():
            buffer.copy_(value)


class Embedding(LoRALayer, nn.Embedding):
    """loralib's Embedding. embed_scale (not in loralib) multiplies the output, adapter included, as the scaled
    word embeddings of transformers models do (Gemma's, BART's; peft scales its adapter's output alike): None (no
    scale), a number (output * embed_scale, as BART's), or a one-element tensor, kept as a non-persistent buffer
    that follows .to() (output * embed_scale.to(the output's dtype), as Gemma's). Merges are unaffected: the
    merged weight is W + scaling * (B A)^T, scaled at every lookup as the base is."""
    _batch_kind = "embedding"  # what lora_ext.batched serves it as

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1,
                 merge_weights: bool = True, lossless: Optional[bool] = None,
                 embed_scale: Union[None, float, Tensor] = None, **kwargs):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        # max_norm: eval() leaves the layer unmerged (merge_refusal says why; explicit merges are refused)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=0.0,
                           merge_weights=merge_weights and self.max_norm is None, lossless=lossless)
        if r > 0:
            self._create_factors(self.weight)
        if kwargs.get("_weight") is None:
            self.reset_parameters()
        else:  # a table given (nn.Embedding's _weight, from_pretrained): kept, as nn.Embedding keeps it (loralib
            self.reset_lora_parameters()  # drew it afresh, in the caller's tensor)
        if isinstance(embed_scale, Tensor):
            if embed_scale.numel() != 1 or not embed_scale.is_floating_point():
                raise ValueError(f"embed_scale must be a number or a floating-point tensor of one element, got "
                                 f"a {embed_scale.dtype} tensor of shape {tuple(embed_scale.shape)}")
            if embed_scale.is_meta:  # (G3: to_empty() then filled the buffer with garbage, 3.9e24 off, silently)
                raise ValueError("embed_scale is a meta tensor (made under torch.device('meta')?), whose value is "
                                 "lost: a non-persistent buffer, no state dict restores it; pass a number, or a "
                                 "tensor on a real device (torch.tensor(s, device='cpu'))")
            self.register_buffer("embed_scale", embed_scale.detach().clone(), persistent=False)
            # (what reset_parameters() puts back: to_empty() after a build on meta leaves buffers uninitialised)
            self._embed_scale_init = embed_scale.detach().to("cpu", copy=True)
        else:
            self.embed_scale = None if embed_scale is None else ops.finite_real("embed_scale", embed_scale)

    def _reset_base(self) -> None:
        super()._reset_base()
        _refill_buffer(self, "embed_scale", self.__dict__.get("_embed_scale_init"))

    def output_scale(self) -> Union[None, float, Tensor]:
        """What the output is multiplied by: the embed_scale buffer, the number, or None (also for a layer
        pickled before embed_scale existed)."""
        scale = self._buffers.get("embed_scale")
        return scale if scale is not None else self.__dict__.get("embed_scale")

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        scale = self.output_scale()
        if scale is None:
            return out
        return out * (scale.to(out.dtype) if isinstance(scale, Tensor) else scale)

    def extra_repr(self) -> str:
        scale = self.output_scale()
        if isinstance(scale, Tensor):
            scale = "a tensor" if scale.is_meta else f"tensor({scale.item():g})"
        return super().extra_repr() + ("" if scale is None else f", embed_scale={scale}")

    def reset_lora_parameters(self):
        self._check_unloaded()
        if hasattr(self, "lora_A"):
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def factor_shapes(self, r):
        return (r, self.num_embeddings), (self.embedding_dim, r)

    def _layout(self):
        return {"transposed": True}

    def merge_refusal(self) -> Optional[str]:
        """Why the adapter cannot be merged into this weight (None: it can). max_norm renormalises, in place, the
        rows a lookup reads: merged, those would be rows of W + s B A, not of the base W as unmerged (other
        outputs), and unmerging would not give the base back."""
        if self.max_norm is None:
            return super().merge_refusal()
        return (f"{self._describe()} has max_norm={self.max_norm}, which renormalises in place the rows a lookup "
                f"reads: merged, it would renormalise the rows of W + scaling * B @ A instead of the base's (other "
                f"outputs than unmerged) and unmerging would not give the base back; serve this layer unmerged")

    def _merge_into(self, weight, A, B, s, exact):
        refusal = self.merge_refusal()
        if refusal is not None:  # before anything is written
            raise ValueError(refusal)
        return super()._merge_into(weight, A, B, s, exact)

    def _check_max_norm_unmerged(self) -> None:
        if self.max_norm is not None and self.merged:  # (set since the merge: see merge_refusal)
            raise ValueError(f"{self.merge_refusal()}; max_norm was set while adapter {self.active_adapter!r} is "
                             f"merged: unmerge first (train() or unmerge()), then set it")

    def _forward(self, x):
        self._check_max_norm_unmerged()
        if self.r > 0 and not self._serves_merged():
            scale, scale_tensor = self._scales(x)
            return ops.embedding(x, self.weight, self.lora_A, self.lora_B, scale, scale_tensor=scale_tensor,
                                 padding_idx=self.padding_idx, max_norm=self.max_norm,
                                 norm_type=self.norm_type, scale_grad_by_freq=self.scale_grad_by_freq,
                                 sparse=self.sparse)
        if self.r > 0 and self._trains_merged():  # (see LoRALayer._merged_training_factors)
            return ops.embedding(x, self.weight, *self._merged_training_factors(), 1.0, padding_idx=self.padding_idx,
                                 max_norm=self.max_norm, norm_type=self.norm_type,
                                 scale_grad_by_freq=self.scale_grad_by_freq, sparse=self.sparse)
        return self._weight_forward(x)

    def _weight_forward(self, x):
        """The layer's output from its weight alone (the base, or the merged adapter with it)."""
        self._check_max_norm_unmerged()  # (mixed batches come here straight)
        return nn.Embedding.forward(self, x)


class Linear(LoRALayer, nn.Linear):
    _batch_kind = "linear"

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True,
                 lossless: Optional[bool] = None, **kwargs):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights, lossless=lossless)
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0:
            self._create_factors(self.weight)
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1).contiguous()

    def factor_shapes(self, r):
        return (r, self.in_features), (self.out_features, r)

    def _layout(self):
        return {"transposed": self.fan_in_fan_out}

    def _forward(self, x):
        if self.r > 0 and not self._serves_merged():
            scale, scale_tensor = self._scales(x)
            return ops.linear(x, *self._operands(x), scale, fan_in_fan_out=self.fan_in_fan_out,
                              scale_tensor=scale_tensor)
        if self.r > 0 and self._trains_merged():  # (see LoRALayer._merged_training_factors)
            return ops.linear(x, x, self.weight, self.bias, *self._merged_training_factors(), 1.0,
                              fan_in_fan_out=self.fan_in_fan_out)
        return self._weight_forward(x)

    def _weight_forward(self, x):
        """The layer's output from its weight alone (the base, or the merged adapter with it)."""
        weight = ops.autocast_fresh(self.weight)  # (not autocast's cached cast of it: see there)
        return F.linear(x, weight.t() if self.fan_in_fan_out else weight, self.bias)


class MergedLinear(LoRALayer, nn.Linear):
    _batch_kind = "linear"

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,), fan_in_fan_out: bool = False,
                 merge_weights: bool = True, lossless: Optional[bool] = None,
                 **kwargs):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights, lossless=lossless)
        given = list(enable_lora)
        # (loralib indexes its mask with the list: an int list [1, 0, 1] names blocks 1 and 0 there, while bool() of
        # each reads blocks 0 and 2; a loralib checkpoint trained so loaded and updated other rows, w1)
        odd = [e for e in given if not (isinstance(e, bool) or (getattr(getattr(e, "dtype", None), "kind", None) == "b"
                                                                and getattr(e, "ndim", 0) == 0)
                                        or (isinstance(e, torch.Tensor) and e.dtype == torch.bool and e.dim() == 0))]
        if odd:
            raise EnableLoraError(f"enable_lora must be a list of bools (one per output block), got {given!r}: loralib "
                                  f"reads a list of ints as block indices, so its meaning would be ambiguous")
        enable_lora = [bool(e) for e in given]
        if not enable_lora or out_features % len(enable_lora):
            raise EnableLoraError(
                f"enable_lora must be a non-empty list whose length divides out_features ({out_features}), "
                f"got length {len(enable_lora)}")
        self.enable_lora = enable_lora
        self.fan_in_fan_out = fan_in_fan_out
        self._block_ids = [i for i, e in enumerate(enable_lora) if e]
        if r > 0 and any(enable_lora):
            self._create_factors(self.weight)
            self.register_buffer("lora_ind", self._rows_mask(), persistent=False)  # (before the snapshot's: see there)
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1).contiguous()

    def _rows_mask(self) -> Tensor:
        """loralib's lora_ind: which of the out_features rows the enabled blocks' are."""
        mask = torch.zeros(len(self.enable_lora), self.out_features // len(self.enable_lora), dtype=torch.bool)
        mask[self._block_ids] = True
        return mask.view(-1)

    def _reset_base(self) -> None:
        super()._reset_base()
        _refill_buffer(self, "lora_ind", self._rows_mask() if hasattr(self, "_block_ids") else None)

    def _rank_rows(self):
        return len(self._block_ids)

    def _rank_used(self, lora_A, lora_B):
        n, r = len(self._block_ids), self.rank_of(lora_A)
        return lora_A.reshape(n, r, -1).ne(0).any(2).any(0) | lora_B.ne(0).any(0)

    def _take_ranks(self, lora_A, lora_B, r):
        n = len(self._block_ids)
        return lora_A.reshape(n, self.rank_of(lora_A), -1)[:, :r].reshape(n * r, -1), lora_B[:, :r]

    def _place_ranks(self, A, B, lora_A, lora_B, r, rank):
        """A holds each enabled block's ranks in turn (its rows block by block): the block's first ranks."""
        n = len(self._block_ids)
        A.view(n, rank, -1)[:, :r] = lora_A.reshape(n, r, -1)
        B[:, :r] = lora_B

    def factor_shapes(self, r):
        n = len(self._block_ids)
        return (r * n, self.in_features), (self.out_features // len(self.enable_lora) * n, r)

    def _layout(self):
        return {"num_blocks": len(self.enable_lora), "block_ids": self._block_ids,
                "transposed": self.fan_in_fan_out}

    def zero_pad(self, x: Tensor) -> Tensor:
        """x's rows (dim 0: the enabled blocks' output rows, in order) at their places among out_features rows,
        zeros in the disabled blocks' (loralib's zero_pad)."""
        rows = self._rows_mask().nonzero().squeeze(1)  # (not the buffer: to_empty() leaves it uninitialised)
        if x.shape[0] != rows.numel():
            raise ValueError(f"{self._describe()}.zero_pad: x has {x.shape[0]} rows, the enabled blocks "
                             f"{self.enable_lora} have {rows.numel()}")
        return x.new_zeros((self.out_features, *x.shape[1:])).index_copy_(0, rows.to(x.device), x)

    def merge_AB(self) -> Tensor:
        """The unscaled dense delta-W in the weight's storage layout (loralib's merge_AB)."""
        return ops.delta_weight(self.lora_A, self.lora_B, 1.0, out_features=self.out_features,
                                dtype=self.weight.dtype, **self._layout())

    def _forward(self, x):
        if self.has_lora and not self._serves_merged():
            scale, scale_tensor = self._scales(x)
            return ops.linear(x, *self._operands(x), scale, num_blocks=len(self.enable_lora),
                              block_ids=self._block_ids, scale_tensor=scale_tensor,
                              fan_in_fan_out=self.fan_in_fan_out)
        if self.has_lora and self._trains_merged():  # (see LoRALayer._merged_training_factors)
            return ops.linear(x, x, self.weight, self.bias, *self._merged_training_factors(), 1.0,
                              num_blocks=len(self.enable_lora), block_ids=self._block_ids,
                              fan_in_fan_out=self.fan_in_fan_out)
        return self._weight_forward(x)

    _weight_forward = Linear._weight_forward


def _check_kernel_size(kernel_size, dims):
    ks = (kernel_size,) * dims if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(ks) != dims or not all(isinstance(k, int) and k > 0 for k in ks):
        raise ValueError(f"kernel_size must be a positive int or a tuple of {dims} positive ints, "
                         f"got {kernel_size!r}")


class ConvLoRA(LoRALayer, nn.Module):
    """LoRA around a torch convolution. delta-W = B @ A viewed as the conv weight, with
    A: (r * k0, in_channels * k1 * ... ) and B: (out_channels // groups * k0, r * k0), k = kernel size;
    for Conv2d with an int kernel this is loralib's layout exactly."""

    _weight_key = "conv.weight"
    _batch_kind = "conv"

    def __init__(self, conv_module: type, in_channels: int, out_channels: int,
                 kernel_size: Union[int, Tuple[int, ...]], r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, merge_weights: bool = True, lossless: Optional[bool] = None,
                 **kwargs):
        nn.Module.__init__(self)
        if isinstance(conv_module, type) and issubclass(conv_module, nn.modules.conv._ConvTransposeNd):
            # (its forward failed with an AttributeError naming nothing, w1; loralib's returns None)
            raise ValueError(f"ConvLoRA: {conv_module.__name__} is a transposed convolution, whose weight's layout "
                             f"(in, out / groups, ...) the update does not follow; wrap Conv1d/2d/3d")
        self.conv = conv_module(in_channels, out_channels, kernel_size, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights, lossless=lossless)
        ties.note(self.conv.weight, self)  # the conv's own register_parameter is torch's
        # torch expands int arguments such as dilation to one per spatial dimension
        _check_kernel_size(kernel_size, len(self.conv.dilation))
        if r > 0:
            self._create_factors(self.conv.weight)
        self.reset_parameters()

    def _reset_base(self):
        self.conv.reset_parameters()

    def _rank_rows(self):
        return self.conv.kernel_size[0]

    def factor_shapes(self, r):
        c, k0 = self.conv, self.conv.kernel_size[0]
        rest = math.prod(c.kernel_size[1:])
        return (r * k0, c.in_channels * rest), (c.out_channels // c.groups * k0, r * k0)

    def _as_2d(self, weight):
        """The (out/groups * k0, in * rest) matrix B @ A adds to: a view of a contiguous weight, else a copy."""
        return weight.reshape(self.lora_B.shape[0], self.lora_A.shape[1])

    def _writable_2d(self, weight):
        return contextlib.nullcontext(self._as_2d(weight)) if weight.is_contiguous() else _staged_2d(self, weight)

    def _offload_hook_attached(self, hook) -> None:
        hooks = [h for h in _hook_parts(hook) if getattr(h, "offload", False)]
        if hooks and not any(getattr(h, "place_submodules", False) for h in hooks):
            warnings.warn(f"{self._describe()}: accelerate offloads it apart from its conv; a hook puts a module's "
                          f"tensors back when that module is called, and a ConvLoRA reads its conv's weight without "
                          f"calling the conv, so its forwards would find that weight on the meta device: offload with "
                          f"preload_module_classes=[{type(self).__name__!r}]",
                          stacklevel=_user_stacklevel(also=("accelerate",)))
        super()._offload_hook_attached(hook)

    def _weight_owner(self):
        return self.conv

    def _weight_2d(self):
        w = self.conv.weight
        return w if sharded.is_dtensor(w) else self._as_2d(w)

    def _map_keys(self, state_dict, prefix) -> None:
        # Accept a plain nn.Conv*'s checkpoint (weight, bias) as well as our own (conv.weight, conv.bias).
        for name in ("weight", "bias"):
            if prefix + name in state_dict and prefix + "conv." + name not in state_dict:
                state_dict[prefix + "conv." + name] = state_dict.pop(prefix + name)

    def _forward(self, x):
        if self.r > 0 and not self._serves_merged():
            # traced, and eager on CUDA, the scale is read at run time (see _scales; CUDA graphs); eager elsewhere
            # it is folded into the delta
            scale, scale_tensor = self._scales(x)
            return ops.conv(self.conv, x, self.lora_dropout(x), self.lora_A, self.lora_B, scale,
                            scale_tensor if x.is_cuda else None)
        if self.r > 0 and self._trains_merged():  # (see LoRALayer._merged_training_factors)
            return ops.conv(self.conv, x, x, *self._merged_training_factors(), 1.0)
        return self._weight_forward(x)

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        if conv is None:  # (unloaded: let_go)
            self._check_sound()
        if conv._forward_pre_hooks or conv._forward_hooks or conv._backward_hooks or conv._backward_pre_hooks:
            # (merged, the conv is called and runs them; unmerged, it computes with the adapter's weight)
            if any(kind in CALL_HOOKS for kind in users_hooks(conv)):
                raise ValueError(f"{self._describe()}: its conv has forward or backward hooks of its own, which the "
                                 f"layer would run merged only (unmerged it computes the convolution with the adapter "
                                 f"in its weight, without calling the conv); register them on the layer instead")
        return super().forward(x)

    def _weight_forward(self, x):
        """The layer's output from its weight alone (the base, or the merged adapter with it): lora.disable_adapter
        serves this (it raised an AttributeError for convolutions)."""
        conv = self.conv
        weight = ops.autocast_fresh(conv.weight)  # (not autocast's cached cast of it: see there)
        return conv(x) if weight is conv.weight else conv._conv_forward(x, weight, conv.bias)


# The conv's own attributes, read through (transformers' ViT and CLIP read `patch_embedding.weight.dtype`, Whisper
# `conv1.stride`): the layer stands where the conv stood. Read-only properties: the conv holds them.
def _conv_attribute(name):
    return property(lambda self: getattr(self.conv, name), doc=f"The wrapped convolution's `{name}` (read-only).")


for _name in ("weight", "bias", "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
              "padding_mode", "output_padding", "transposed"):
    setattr(ConvLoRA, _name, _conv_attribute(_name))
del _name


@contextlib.contextmanager
def _staged_2d(layer: ConvLoRA, weight: Tensor):
    """A channels_last conv weight (a vision model converted once for speed) as the 2-D matrix the ops write: a
    contiguous copy, which then goes back into the weight, whatever the op left in it (a refusal writes nothing);
    not when the op did not write it (its version counter did not move): the weight's own counter then says
    nothing was written (LoRALayer._writing)."""
    staged = weight.contiguous()
    version = sharded.version(staged)
    try:
        yield layer._as_2d(staged)
    finally:
        if version is None or sharded.version(staged) != version:
            weight.copy_(staged)


class Conv1d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv1d, *args, **kwargs)


class Conv2d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv2d, *args, **kwargs)


class Conv3d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv3d, *args, **kwargs)


# -- a layer taken out of its model by something other than lora_ext ------------------------------------------------

_taking_out = threading.local()


@contextlib.contextmanager
def taking_out_layers():
    """Around lora_ext's own replacement of layers by plain modules (unload): _on_child stays quiet."""
    depth = getattr(_taking_out, "depth", 0)
    _taking_out.depth = depth + 1
    try:
        yield
    finally:
        _taking_out.depth = depth


# the key, in a state dict's metadata for a layer's prefix, of the adapter whose factors the state holds
ADAPTER_METADATA = "lora_ext_adapter"


def _check_adapters_load(module: nn.Module, state_dict, prefix: str, *args) -> None:
    """Load pre-hook of a model lora_ext injected or loaded adapters into: a state whose factors are an adapter a
    layer holds but does not serve (LoRALayer._foreign_state) is refused before any module loads (the layer's own
    refusal came after the modules before it had loaded: embeddings, a tied head, whole layers)."""
    metadata = getattr(state_dict, "_metadata", None)
    if not metadata:
        return
    for path, layer in module.named_modules(prefix=prefix[:-1] if prefix else ""):
        if isinstance(layer, LoRALayer) and layer.has_lora:
            foreign = layer._foreign_state(state_dict, path + "." if path else "", metadata.get(path, {}))
            if foreign is not None:
                raise RuntimeError(f"{foreign} (nothing was loaded)")


def guard_loads(model: nn.Module) -> None:
    """Installs _check_adapters_load on `model` (once)."""
    if not model.__dict__.get("_lora_ext_load_guard"):
        model.register_load_state_dict_pre_hook(_check_adapters_load)
        model.__dict__["_lora_ext_load_guard"] = True


def trained_dropout(layer: "LoRALayer", name: str) -> Optional[float]:
    """The lora_dropout probability `layer` trains adapter `name` with, as peft's config holds it; None for a dropout
    module of the user's. An Embedding applies none (as peft's and loralib's): its value is the config's the adapter
    came with (set_trained_dropout), None without one (its 0.0 is no adapter's config)."""
    if isinstance(layer, Embedding):
        return layer.__dict__.get("_config_dropouts", {}).get(name)
    return layer.adapter_dropout(name)


def set_trained_dropout(layer: "LoRALayer", name: str, p: float) -> None:
    """trained_dropout's counterpart: adapter `name` trains with lora_dropout `p` (a config's). An Embedding applies
    none (peft's does not either) but keeps `p`, which a save writes and a combination that starts with it takes, as
    peft's config copies it."""
    if isinstance(layer, Embedding):
        layer.__dict__.setdefault("_config_dropouts", {})[name] = float(p)
    else:
        layer.set_adapter_dropout(name, p)


def let_go(layer: "LoRALayer") -> None:
    """A layer lora_ext took out of its model for good, never seen by the user (a load taken back), lets go of its
    base module's weight: kept alive (an error's traceback holds the load's frames), it would count as a layer
    sharing that weight (ties.others), and the next layer put there would refuse to merge."""
    if isinstance(layer, ConvLoRA):
        layer._modules["conv"] = None
    else:
        layer._parameters["weight"] = None


def unloaded(layer: "LoRALayer") -> None:
    """A layer lora_ext.unload took out of its model: the plain module put in its place owns the weight now (merged:
    with the adapter in it). A user may still hold the layer (`q = model.q_proj`): it lets go of the weight (let_go:
    it would count as a layer sharing it, and a merged one would take its adapter out of the plain model's weight at
    the next inject's tie) and refuses any use from then on, saying why (_check_sound)."""
    with layer._lock:
        merged = " (with the adapter merged into it)" if layer.merged else ""
        why = (f"{layer._describe()} was taken out of its model by lora_ext.unload: the plain module put in its place "
               f"holds its weight{merged} and bias, which this layer no longer computes with or writes; use the "
               f"model's module (inject or load again for an adapter)")
        let_go(layer)
        if "bias" in layer._parameters:  # (the plain module's too: an optimizer over the layer would train it)
            layer._parameters["bias"] = None
        layer.__dict__.update(_broken=why, _unloaded=why)


def _calls_its_layers(module, args) -> None:
    """A forward pre-hook that does nothing: its presence is what counts (keep_layers_called)."""
    return None


def keep_layers_called(parent, layer: nn.Module) -> None:
    """torch's nn.TransformerEncoderLayer has a fast path (eval, no grad: torch._transformer_encoder_layer_fwd) that
    reads linear1's and linear2's weights and never calls them: a lora_ext layer there was skipped, its adapter
    unmerged or a mixed batch's rows served what the weight holds (U1: 3.8 off unmerged, 1.0-1.2 off the rows of a
    mixed batch; peft's layers are skipped alike). The fast path is not taken while any module inside has a forward
    hook: the layer gets one that does nothing (lora_ext's: unload does not carry it to the module put back); so does
    a module saved whole (ModulesToSave, W2: the fast path read the active adapter's copy for every row of a mixed
    batch, 2.5-3.2 off). `parent`: the module or its class."""
    if (parent is nn.TransformerEncoderLayer or isinstance(parent, nn.TransformerEncoderLayer)) \
            and getattr(layer, "_parent_must_call", False) \
            and not any(h is _calls_its_layers for h in layer._forward_pre_hooks.values()):
        layer.register_forward_pre_hook(_calls_its_layers)


def keep_called_if_pickled_before(module: nn.Module, state: dict) -> None:
    """A module unpickled from a state without the `_fast_paths_seen` mark was pickled before keep_layers_called:
    a parent's fast path that reads its weight (nn.TransformerEncoderLayer's) is not known at unpickling, so it takes
    the hook wherever it is (a no-op call per forward)."""
    if "_fast_paths_seen" not in state:
        module.__dict__["_fast_paths_seen"] = True
        keep_layers_called(nn.TransformerEncoderLayer, module)


def nested_forward(module: nn.Module, x: Tensor) -> Tensor:
    """torch's nn.TransformerEncoder runs its layers on nested tensors (a padding mask, in eval under no grad): the
    rows, padded with zeros, go through the module's forward (a lora_ext layer's, a module saved whole's: a mixed
    batch's rows stay its rows; each token is computed on its own) and each row's own tokens come back nested, as they
    came."""
    sizes = [t.shape for t in x.unbind()]
    y = module.forward(torch.nested.to_padded_tensor(x, 0.0))
    return torch.nested.as_nested_tensor([y[i][tuple(slice(0, n) for n in size[:-1])] for i, size in enumerate(sizes)],
                                         layout=x.layout)


def _on_child(parent: nn.Module, name: str, new: Optional[nn.Module]) -> None:
    """torch calls this before any module is set as a child. A lora_ext layer holding an adapter replaced by a module
    that is not a lora_ext layer and does not hold it (transformers' resize_token_embeddings puts a fresh nn.Linear in
    place of a LoRA head; a user's `model.q_proj = nn.Linear(...)`) takes its adapters out of the model with nothing
    said: this warns, naming the layer, its adapters and, when merged, that a weight copied from it holds the adapter
    for good. Wrappers that hold the layer (FSDP, checkpoint wrappers, torch.compile's) and lora_ext's unload pass."""
    keep_layers_called(parent, new)
    old = parent.__dict__.get("_modules", {}).get(name)
    if not isinstance(old, LoRALayer) or isinstance(new, LoRALayer) or not old.has_lora \
            or getattr(_taking_out, "depth", 0):
        return None
    if new is not None and any(m is old for m in new.modules()):
        return None
    merged = old.merged and old.__dict__.get("_buffers", {}).get("_merged_A") is not None
    warnings.warn(f"{old._describe()}, child {name!r} of a {type(parent).__name__}, holds adapter(s) "
                  f"{', '.join(map(repr, old.adapter_names))} and was replaced by "
                  f"{'None' if new is None else 'a ' + type(new).__name__}, which holds none: the model serves no "
                  f"adapter there from now on"
                  + (f"; the layer was merged, so a weight copied from it holds adapter {old.active_adapter!r} for "
                     f"good" if merged else "")
                  + " (transformers' resize_token_embeddings replaces an untied head so: resize before injecting or "
                    "loading adapters; lora_ext.unload takes adapters out on purpose)", stacklevel=_user_stacklevel())
    return None


_nn_module.register_module_module_registration_hook(_on_child)
