"""The forward-time guard against LoRA factors that DistributedDataParallel does not synchronise.

DDP synchronises the gradients of the Parameters that required grad when it was built. A LoRA layer can come to
train others: a trainable switch of the wrapped module (`lora.set_adapter(ddp.module, name)`: each adapter has its
own Parameter pair), an adapter loaded or layers injected after the wrap, factors unfrozen after it. Nothing
refuses those writes (the README's flow switches the inner module and then wraps it again, while the old DDP is
still alive), so the layer checks at its forward, when it runs inside a DDP forward with gradients enabled.

Which DDP runs this thread's forward: DDP announces itself only in a class attribute
(`DistributedDataParallel._active_ddp_module`, set for torch.compile's DDP optimizer), which every thread shares.
So the first time a layer sees a DDP there, the guard confirms on the Python stack that this thread is inside that
DDP's forward (for every layer of that first forward), and hooks the DDP: from its next forward on, its pre- and
post-forward hooks keep a per-thread stack of the DDPs whose forwards are running, and the class attribute no
longer counts for that DDP (another thread's forward, or a value left behind by two threads' forwards
interleaving). The first forwards of two DDPs interleaved on two threads can pass unchecked: the attribute names
one of them at a time. A forward that a BaseException ends (Ctrl-C) skips the post-forward hook (torch runs
always_call hooks for Exception only): its entry goes when a DDP forward next enters on that thread outside any
other, or when a layer runs with the attribute unset and the stack walk shows that forward is over.

What DDP synchronises: the Parameters its reducer took at construction, noted as DDP builds them
(`_build_params_for_reducer`, wrapped once at import: DDP keeps no list of them), those of
`delay_all_reduce_named_params`, and those marked `_ddp_ignored` (the user's own business). For a DDP built before
lora_ext's import (or a torch without that method): the Parameters in `ddp._module_parameters` that require grad
the first time the guard sees that DDP (when their number, in DDP's logging data, differs from the number of the
construction, every trainable LoRA layer in its forward is refused; a set changed after the wrap to another of the
same number is not seen there, r8: the ranks trained apart, 2.56e4 off). Not seen: forwards traced by
torch.compile (the guard does not run there).
"""
import functools
import sys
import threading
import weakref

import torch
from torch.nn.parallel import DistributedDataParallel

def _noting_reducer_params(build):
    """DDP's `_build_params_for_reducer`, noting on the DDP the ids of the Parameters it gives the reducer."""
    @functools.wraps(build)
    def built(self, *args, **kwargs):
        out = build(self, *args, **kwargs)
        try:
            self.__dict__["_lora_ext_reducer_params"] = (id(self), frozenset(id(p) for p in out[0]))
        except Exception:  # noqa: BLE001 - another torch's return: the guard falls back to the flags (above)
            pass
        return out
    built._lora_ext_notes = True
    return built


_BUILD = getattr(DistributedDataParallel, "_build_params_for_reducer", None)
if callable(_BUILD) and not getattr(_BUILD, "_lora_ext_notes", False):
    DistributedDataParallel._build_params_for_reducer = _noting_reducer_params(_BUILD)

_LOCAL = threading.local()  # .stack: the hooked DDPs whose forwards run on this thread, innermost last
_HOOKED: "weakref.WeakSet" = weakref.WeakSet()
_HOOK_LOCK = threading.Lock()


# layer -> weakref to the DDP that keeps its live Parameters (a serving switch or mark_only_lora_as_trainable through the
# DDP left them lent: they train whichever adapter is served, as DDP synchronises them), while that DDP lives
_KEEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def keep_parameters(layers, ddp) -> None:
    """`ddp` keeps the live Parameters of `layers` (lora_ext left them where they were for it); None: a change made
    without a DDP (a plain switch or mark_only_lora_as_trainable), after which no DDP keeps them."""
    ref = weakref.ref(ddp) if ddp is not None else None
    for layer in layers:
        if ref is None:
            _KEEPS.pop(layer, None)
        else:
            _KEEPS[layer] = ref


def keeps_parameters(layer) -> bool:
    """Whether a live DDP keeps `layer`'s live Parameters (keep_parameters) and synchronises them still, so that
    training them is DDP's way (a checkpoint's recompute or `ddp.module(x)` runs outside DDP's forward)."""
    ref = _KEEPS.get(layer)
    ddp = ref() if ref is not None else None
    if ddp is None:
        return False
    known, _ = synchronised(ddp)
    return known is None or any(id(p) in known for p in (layer.lora_A, layer.lora_B) if p.requires_grad)


def running() -> "DistributedDataParallel | None":
    """The DDP whose forward this thread is running (the innermost), or None."""
    stack = getattr(_LOCAL, "stack", None)
    active = DistributedDataParallel._active_ddp_module
    while stack and active is None and not _inside(stack[-1]):
        # an entry whose forward a BaseException ended (KeyboardInterrupt: torch runs always_call hooks for
        # Exception only); the attribute alone cannot say (two threads' forwards interleaved leave it None)
        stack.pop()
    if active is not None and not active.__dict__.get("_lora_ext_entered") and _inside(active):
        # the first forward of this DDP (maybe inside a hooked one): the rest of it walks the stack again, the
        # next one enters through the hook
        _hook(active)
        return active
    return stack[-1] if stack else None


def _inside(ddp) -> bool:
    """Whether this thread's Python stack is inside ddp's forward: for the layers of a DDP's first forward, before
    its hook, and for an entry that may be stale (see running()); never on the path of a hooked DDP's forwards."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in ("forward", "_run_ddp_forward") and frame.f_locals.get("self") is ddp:
            return True
        frame = frame.f_back
    return False


def _enter(ddp, args):
    ddp.__dict__["_lora_ext_entered"] = True
    stack = _LOCAL.__dict__.setdefault("stack", [])
    if DistributedDataParallel._active_ddp_module is None:  # no DDP forward around this one on this thread: any
        stack.clear()  # entries were left by forwards a BaseException ended
    stack.append(ddp)


def _leave(ddp, args, output):
    stack = getattr(_LOCAL, "stack", None)
    if stack and ddp in stack:  # (the forward that hooked it did not enter)
        del stack[len(stack) - 1 - stack[::-1].index(ddp)]


def _hook(ddp) -> None:
    with _HOOK_LOCK:
        if ddp in _HOOKED:
            return
        ddp.register_forward_pre_hook(_enter)
        ddp.register_forward_hook(_leave, always_call=True)
        _HOOKED.add(ddp)


def reducer_count(ddp):
    """How many Parameters ddp's reducer took at construction (those that required grad then), from DDP's
    logging data; None where this torch's DDP does not say."""
    try:
        built = ddp._get_ddp_logging_data().get("num_parameter_tensors")
    except Exception:  # noqa: BLE001 - private API: without it, the flags now stand for the flags then
        return None
    return built if isinstance(built, int) else None


def synchronised(ddp):
    """(ids of the Parameters ddp synchronises, or None when this torch's DDP does not say; (how many Parameters
    its reducer took at construction, how many require grad now) when they differ). Kept per DDP once the two
    agree (the flags then are taken for the flags at construction); computed again at each call until then."""
    noted = ddp.__dict__.get("_lora_ext_reducer_params")
    if noted is not None and noted[0] == id(ddp):  # (not a copy's: deepcopy, pickle, whose Parameters are others)
        delayed = getattr(ddp, "_delay_all_reduce_params", [])
        return noted[1] | frozenset(id(p) for p in delayed), None
    known = ddp.__dict__.get("_lora_ext_synchronised")
    if known is not None and known[0] != id(ddp):  # a copy's (deepcopy, pickle): its Parameters are others
        known = None
    if known is None:
        params = getattr(ddp, "_module_parameters", None)
        if params is None:  # a torch whose DDP keeps them elsewhere: nothing to check against
            return None, None
        trained = [p for p in params if p.requires_grad]
        built = reducer_count(ddp)
        if built is not None and built != len(trained):
            return frozenset(), (built, len(trained))
        delayed = getattr(ddp, "_delay_all_reduce_params", [])
        known = ddp.__dict__["_lora_ext_synchronised"] = (
            id(ddp), frozenset([id(p) for p in trained] + [id(p) for p in delayed]), None)
    return known[1:]


def check(layer, ddp) -> None:
    """Raises when `layer`'s forward would give gradients to trainable factors that `ddp` does not synchronise."""
    if not torch.is_grad_enabled() or not layer.has_lora or not layer._trainable():
        return  # (merged, trainable factors are trained through the merge: LoRALayer._trains_merged)
    known, changed = synchronised(ddp)
    if known is None:
        return
    if changed is not None:
        raise RuntimeError(
            f"{layer._describe()} (adapter {layer.active_adapter!r}) runs inside a DistributedDataParallel forward "
            f"whose Parameters that require grad changed since it was built ({changed[0]} then, {changed[1]} now, "
            f"e.g. factors unfrozen after the wrap): DDP synchronises those of its construction, so the ranks would "
            f"train apart. Set requires_grad (mark_only_lora_as_trainable) before wrapping, or wrap again")
    for p in (layer.lora_A, layer.lora_B):
        if p.requires_grad and id(p) not in known and not getattr(p, "_ddp_ignored", False):
            raise RuntimeError(
                f"{layer._describe()} (adapter {layer.active_adapter!r}) runs inside a DistributedDataParallel "
                f"forward with trainable factors that DDP does not synchronise (a trainable set_adapter of the "
                f"wrapped module, an adapter or layers added after the wrap, or factors unfrozen after it): the "
                f"ranks would train apart. Wrap the module again after such a change: ddp = "
                f"DistributedDataParallel(ddp.module, ...) (and an optimizer over the new adapter's parameters)")
