"""Mixed batches: every row of a batch served by its own adapter, in one forward (lora.batch_adapters).

Each lora_ext layer keeps the adapters a batch needs in fixed slots, stacked per layer (`LayerSlots`): slot s
holds an adapter's A^T (k, R) and B^T (R, d), zero-padded to the slots' rank R, and its scaling in a float32
tensor (float64 slots hold B^T scaled, and 1). A forward computes the layer's output from its weight (the base,
or the merged adapter) and adds each row's update with lora_ext.ops.batched_linear_ / batched_embedding_, one
gather pass per stage over all rows whatever their adapters (CUDA kernels, the C++ CPU loops, or batched
matmuls). A MergedLinear's slots hold its groups side by side (rank n*R, B^T block by block in its output
columns), an Embedding's A^T is its lookup table, a convolution's slots hold ConvLoRA's A^T (in * k1..., r * k0)
and B^T (r * k0, out // groups * k0), and their product B A, from which lora_ext.ops.batched_conv makes each
row's weight.

A merged layer serves mixed batches relative to the adapter its weight holds: rows of that adapter take the
merged output as it is, every other row adds its own update and subtracts the merged one (a second pass with
the negated scales). Rows whose adapter a layer lacks (a peft adapter that does not target it) get that
layer's base, as in peft.

The slot index of each row lives in device buffers that are written in place for each batch (one per thread,
device, merged adapter and batch length), and the slots are never reallocated while the pool lasts, so a CUDA
graph captured inside batch_adapters replays with the slots and indices of the batch open at replay time.

Which adapter goes to which slot, paging and the model-level checks are lora_ext.serving.batches'; this module
is the per-layer part: a layer's slots, and its forward in a batch.
"""
import contextvars
import math
import threading
import weakref
from typing import Dict, List, Optional

import torch
from torch import Tensor

from . import ops
from .reference import autocast_dtype, autocast_eligible, compute_dtype
from .named_adapters import _data_ptr, _is, _stamp, _token, _unchanged

# The batches open in this context: {layer: LayerBatch}; None when none is (a thread starts with none).
ACTIVE: contextvars.ContextVar[Optional[Dict]] = contextvars.ContextVar("lora_ext_batches", default=None)

# True while a mixed batch is open anywhere (any thread, any context); a layer's forward reads ACTIVE only then.
# A plain module global so that torch.compile guards on its value: a forward traced with no batch open is traced
# again when one opens. torch 2.11's dynamo cannot trace ContextVar.get (2.14's can): a graph break there, an error
# under fullgraph=True, so a compiled forward must not reach it while no batch is open.
ANY_OPEN = False
_open_count = 0
_open_count_lock = threading.RLock()  # (reentrant, as _SERVING_LOCK)


# the model's input a batch reads its layout from (serving/batches.py's _check_input): the first of these keyword
# arguments it is given, else its first positional one; and the words refusals say it with
INPUT_KEYWORDS = ("input_ids", "inputs_embeds", "idx", "x")  # (idx: nanoGPT's)
INPUT_READ = (f"it is read as {', '.join(INPUT_KEYWORDS)} or the first positional argument of the model the batch "
              f"was opened on")


# guards the per-module counts of open batches (below): threads opening and closing batches of one model at once.
# Reentrant: the cyclic garbage collector, running inside it, may close a generator suspended in another batch's block,
# whose end then runs on this thread (r43 found the disable blocks' plain lock hanging so)
_SERVING_LOCK = threading.RLock()


_SERVING_COND = threading.Condition(_SERVING_LOCK)  # (notified as a batch or a change of modules ends)


class Serving:
    """A mixed batch open on `model` (serving/batches.py: from before it reads the model's layers until its block
    ends), on the thread that opened it; `modules`, `batch`: what note_serving counted it on, and the batch."""
    __slots__ = ("model", "thread", "_ids", "modules", "batch", "__weakref__")

    def __init__(self, model, thread: int):
        self.model, self.thread, self.modules, self.batch, self._ids = model, thread, (), None, None

    @property
    def ids(self) -> frozenset:
        """The ids of the model's modules, taken when a change first asks (not at every open: a walk of the model;
        while the batch is open no change of its modules is let through, so they stay the modules it opened with)."""
        if self._ids is None:
            self._ids = frozenset(id(m) for m in self.model.modules())
        return self._ids


class Reshaping:
    """A change that adds, replaces or removes modules or adapters of `model` (a load, unload, inject, delete), made
    by `thread` under the model lock `lock` (ModelLock.write)."""
    __slots__ = ("model", "lock", "thread", "what")

    def __init__(self, model, lock, thread: int, what: str):
        self.model, self.lock, self.thread, self.what = model, lock, thread, what


_OPEN: Dict[Serving, None] = {}  # the batches open in the process, any thread, any context (under _SERVING_LOCK)
_RESHAPING: Dict[Reshaping, None] = {}  # the changes of modules under way (under _SERVING_LOCK)


def _clashing(m) -> bool:
    """Whether a change of a model holding module `m` may change what a batch of another model holding it serves:
    any module but torch's own modules without parameters or buffers and with only such children (an activation,
    a dropout, a Sequential of them, which two models may share: r1, a shared ReLU refused an inject into the other
    model's own Linear). Another class's module may hold modules in plain attributes, which a change rewrites (r3)."""
    if not type(m).__module__.startswith("torch.nn.modules.") or type(m) is torch.nn.Module \
            or any(_holds_modules(v) for k, v in m.__dict__.items() if k != "_modules"):
        return True  # (a bare nn.Module given a forward, or modules in plain attributes: r4, 29.81 off)
    return (any(t is not None for t in m._parameters.values()) or any(t is not None for t in m._buffers.values())
            or any(c is not None and _clashing(c) for c in m._modules.values()))


def _holds_modules(value, depth: int = 0) -> bool:
    """Whether an attribute's value is a module or holds one in the containers a change rewrites, as deep as it
    looks (serving.injection's module index: lists, deques, dicts, tuples, sets..., three deep; one level only let a
    `[[lin]]` through, 3.97 off, r5)."""
    from .serving.injection import _CONTAINERS, _MAPPINGS, _Holders  # (serving imports this module)
    if isinstance(value, torch.nn.Module):
        return True
    if depth >= _Holders._DEPTH or not isinstance(value, _CONTAINERS):
        return False
    return any(_holds_modules(v, depth + 1) for v in (value.values() if isinstance(value, _MAPPINGS) else value))


def _shared_module(model, ids):
    """(path in `model`, module) of the first module of `model` whose id is in `ids` (a batch's Serving.ids) that
    a change may clash on (_clashing), or None."""
    return next(((path, m) for path, m in model.named_modules() if id(m) in ids and _clashing(m)), None)


def resized(error: RuntimeError) -> bool:
    """Whether `error` is Python's refusal to go on iterating a dict, set or OrderedDict that changed meanwhile: a
    walk of a model (named_modules) while a change on another thread adds or removes a module."""
    return "changed size during iteration" in str(error) or "mutated during iteration" in str(error)


def open_serving(model, opened: list) -> None:
    """Registers a mixed batch of `model`, appending its Serving to `opened` first (close_serving takes it off): a
    change of the modules of a model that shares one with it (an outer model holding it, a part of it, a model
    sharing a part) is refused while it is open (begin_reshaping), and one under way on another thread is waited for
    here (else the batch would read the layers half way through it, or the change begin after the batch read them:
    its new layers, which the batch did not open over, served the new adapter to every row, 10.3 off, h1). One
    under way on this thread (the batch opened from inside it) is refused."""
    me = threading.get_ident()
    entry = Serving(model, me)
    with _SERVING_COND:
        while True:
            for change in [c for c in list(_RESHAPING) if c.lock._writer != c.thread]:
                _RESHAPING.pop(change, None)  # (left by a change that ended without its end: an exception there)
            try:
                clash = next(((c, found) for c in list(_RESHAPING) for found in [_shared_module(c.model, entry.ids)]
                              if found), None)
            except RuntimeError as e:  # (the walks met a change under way resizing a container: wait for it, r3)
                if not resized(e):
                    raise
                clash = e
            if clash is None:
                break
            if not isinstance(clash, RuntimeError) and clash[0].thread == me:
                raise RuntimeError(f"batch_adapters: opened on this thread from inside {clash[0].what}, whose model "
                                   f"shares module {clash[1][0] or '(the model)'!r} with the batch's: the batch would "
                                   f"wait for the change, which waits for it; open the batch after it")
            _SERVING_COND.wait(_WAIT)  # (Ctrl-C lands here, before anything is registered)
            entry._ids = None  # (taken part way through the change waited for: the modules it adds missing, r3)
        opened.append(entry)
        _OPEN[entry] = None


_WAIT = 0.05  # seconds between looks at the changes a batch waits for (they notify as they end)


def close_serving(entry: Serving) -> None:
    with _SERVING_COND:
        _OPEN.pop(entry, None)
        _SERVING_COND.notify_all()


def begin_reshaping(model, lock, what: str) -> Reshaping:
    """Registers a change of `model`'s modules (end_reshaping takes it off), or refuses it (RuntimeError naming
    `what` and the module) while an open mixed batch of any thread serves a model that shares a module with it: the
    batch would go on with the modules it opened over while the change adds or removes others (a load through an
    outer model, through a part of the batch's model, or through another model sharing a part of it made layers
    the batch served with the new adapter for every row: 4.50 off, r53; 10.3 off, h1). A batch of this model itself
    holds its lock: the change waits for the block (or is refused from inside it) before it comes here. A batch
    whose thread ended is still open where its block is (a suspended generator's): never dropped here (r1)."""
    with _SERVING_LOCK:
        ids = set()
        for entry in list(_OPEN):  # (a copy: the collector may close a generator's batch in the loop, r1)
            ids |= entry.ids
        found = _shared_module(model, ids) if ids else None
        if found is not None:
            path, m = found
            from .layers import LoRALayer
            kind = "layer" if isinstance(m, LoRALayer) else "module"
            raise RuntimeError(f"{what}: {kind} {path or '(the model)'!r} is served by an open mixed batch "
                               f"(lora.batch_adapters of a model holding it), which would go on with the modules it "
                               f"opened over while the change adds or removes others; change the adapters after the "
                               f"block closes")
        change = Reshaping(model, lock, threading.get_ident(), what)
        _RESHAPING[change] = None
    return change


def end_reshaping(change: Reshaping) -> None:
    with _SERVING_COND:
        _RESHAPING.pop(change, None)
        _SERVING_COND.notify_all()


def note_serving(modules, opened: bool, entry: Optional[Serving] = None) -> None:
    """Counts an open batch on each of `modules` (`_open_batches`: its layers and modules saved whole), or takes it
    back (opened=False); `entry`, the batch's registration (open_serving), keeps them for after_fork. Under one
    lock: unlocked, the count's read and write from threads opening and closing batches of one model at once lost
    updates (6 threads x 4000 batches left a layer counting 2 open batches after every one had closed, refusing its
    loads from then on)."""
    with _SERVING_LOCK:
        for m in modules:
            n = m.__dict__.get("_open_batches", 0) + (1 if opened else -1)
            if n > 0:
                m.__dict__["_open_batches"] = n
                _SERVED.add(m)
            else:
                m.__dict__.pop("_open_batches", None)
        if entry is not None:
            entry.modules = tuple(modules) if opened else ()


_SERVED: "weakref.WeakSet" = weakref.WeakSet()  # modules note_serving counted a batch on (after_fork)


def after_fork() -> None:
    """In a forked child: the batches of the parent's other threads are not here, so the batches open are those
    this thread opened (in any of its contexts: an asyncio task's, a generator's), each module counts those that
    serve it (r54: the counts the others left refused the child's loads, for good; h1: one of another context of
    this thread, left out, took the count below zero as it closed), and a layer lists only their slots."""
    global _SERVING_LOCK, _SERVING_COND
    _SERVING_LOCK = threading.RLock()  # (its holder may be a thread of the parent: r42, 1 child of 23 hung on it)
    _SERVING_COND = threading.Condition(_SERVING_LOCK)
    me = threading.get_ident()
    for entry in [e for e in _OPEN if e.thread != me]:
        del _OPEN[entry]
    for change in [c for c in _RESHAPING if c.thread != me]:
        del _RESHAPING[change]
    counts, batches = {}, {e.batch for e in _OPEN if e.modules}
    for entry in _OPEN:
        for m in entry.modules:
            counts[m] = counts.get(m, 0) + 1
    for m in list(_SERVED):
        if counts.get(m):
            m.__dict__["_open_batches"] = counts[m]
        else:
            m.__dict__.pop("_open_batches", None)
        slots = m.__dict__.get("_open_slots")
        if slots:
            m.__dict__["_open_slots"] = [e for e in slots if e[1] in batches]


def note_slots(layer, stacks, batch) -> None:
    """Lists `batch` (with the layer's slots, `stacks`) among the batches serving `layer` (`_open_slots`, read by
    merge_refusal), as it loads the layer's slots, under the layer's lock: a merge of the layer after that lock is
    checked against them (listed once the whole batch had loaded, a merged switch of a layer in between was let
    through, r41)."""
    with _SERVING_LOCK:  # (a new list each time: merge_refusal reads one without the lock)
        layer.__dict__["_open_slots"] = [*layer.__dict__.get("_open_slots", ()), (stacks, batch)]


def forget_slots(layers, batch) -> None:
    """Takes `batch` off the batches serving `layers` (note_slots; where it was not listed, nothing)."""
    with _SERVING_LOCK:
        for m in layers:
            entries = m.__dict__.get("_open_slots")
            if entries:
                m.__dict__["_open_slots"] = [e for e in entries if e[1] is not batch]


def merge_refusal(layer, name: str, A: Tensor, B: Tensor, s: float) -> Optional[str]:
    """Why `layer` may not merge adapter `name` as (A, B, s) now (a merge or a merged switch; the caller holds the
    layer's lock), or None: an open mixed batch (of any thread) serving the layer holds `name` in a slot with other
    values. Its rows of other adapters take the slot's values out of the weight: after the merge they would take the
    wrong update out. An eager forward would refuse then, but a compiled one does not check (h37: 13x and 28x off)."""
    for stacks, batch in layer.__dict__.get("_open_slots", ()):
        if batch.closed:
            continue
        slot = batch.slot_of.get(name)
        if slot is None:  # (its forward would refuse, after the write)
            return (f"{layer._describe()}: merging adapter {name!r} while a mixed batch (lora.batch_adapters) "
                    f"serves this layer without a slot for it (the batch's other rows take a merged adapter out of "
                    f"the weight with its slot's values); merge after the block closes")
        if not stacks.holds(slot, layer, A, B, s):
            return (f"{layer._describe()}: merging adapter {name!r} while a mixed batch (lora.batch_adapters) "
                    f"serves this layer, which holds other values of it in its slot (replaced, written or trained "
                    f"since the batch opened): the batch's other rows would take the wrong update out of the weight; "
                    f"merge after the block closes")
    return None


def note_batch(opened: bool) -> None:
    """Counts the batches open in the process (lora_ext.serving.batches calls it once each way per batch)."""
    global ANY_OPEN, _open_count
    with _open_count_lock:
        _open_count += 1 if opened else -1
        ANY_OPEN = _open_count > 0


def refuse_in_program(what: str) -> None:
    """A mixed batch's forward of `what` inside torch.jit.trace or torch.export: the program would record this
    batch's adapter of each row (and the slots it reads, which later batches rewrite) as its own; refused.
    (torch.compile is not a program that outlives the block: it guards on the batch's table and compiles anew.)"""
    if torch.jit.is_tracing() or ops.exporting():
        raise RuntimeError(f"{what}: {'torch.jit.trace' if torch.jit.is_tracing() else 'torch.export'} inside a "
                           f"lora.batch_adapters block would record this batch's adapter of each row as constants; "
                           f"trace or export outside the block (a traced program serves the active adapter)")


def kind(layer) -> Optional[str]:
    """"linear" (Linear, MergedLinear), "embedding", "conv" (Conv1d/2d/3d), or None for layers mixed batches do not
    serve."""
    return getattr(layer, "_batch_kind", None)


def rank_groups(layer) -> int:
    """The rank groups of the layer's slots (a MergedLinear's enabled blocks, else 1)."""
    return len(layer.block_ids)


def _identity(A: Tensor, B: Tensor):
    """What identifies a factor pair's values in a slot's key: their stamp (version counters and storage), or for
    inference tensors, which have no version counter, the tensors' tokens and storage (in-place writes under
    inference_mode are then seen only after layer.check_values, as writes through .data)."""
    stamp = _stamp(A, B)
    if stamp is not None:
        return stamp
    return ("inference", _token(A), _data_ptr(A), _token(B), _data_ptr(B))


def _holds(identity, A: Tensor, B: Tensor) -> bool:
    if identity[0] == "inference":
        return (_is(identity[1], A) and _is(identity[3], B)
                and identity[2] == _data_ptr(A) and identity[4] == _data_ptr(B))
    return _unchanged(identity, A, B)


class LayerSlots:
    """One layer's slot stacks: a (S, k, n*R), b (S, n*R, d) in the layer weight's dtype and device, the
    scalings (S,) float32 and their negation. `keys[s]` says what slot s holds (adapter name, the factors'
    stamp and the scaling), so a slot is rewritten only when its adapter changed."""

    def __init__(self, layer, capacity: int, max_rank: int):
        weight = layer.weight_2d()
        a_shape, b_shape = layer.factor_shapes(1)
        self.k = a_shape[1]
        self.d = layer.out_features if kind(layer) == "linear" else b_shape[0]  # (an Embedding's embedding_dim, a
        # conv's out_channels // groups * kernel_size[0]: ConvLoRA's layout)
        self.groups = rank_groups(layer)
        self.max_rank = max_rank
        rank = max_rank * layer._rank_rows()  # (a MergedLinear's groups side by side; a conv's r * kernel_size[0])
        self.dtype, self.device = weight.dtype, weight.device
        with torch.inference_mode(False):  # (made inside inference_mode, later batches under no_grad could not write)
            self.a = torch.zeros(capacity, self.k, rank, dtype=self.dtype, device=self.device)
            self.b = torch.zeros(capacity, rank, self.d, dtype=self.dtype, device=self.device)
            self.scales = torch.zeros(capacity, dtype=torch.float32, device=self.device)
            self.neg_scales = torch.zeros(capacity, dtype=torch.float32, device=self.device)
            # a conv's slots also keep their B A (d, k), written with them: a batch's forward gathers each row's
            # delta weight from them (computing it per row from the factors, of rank r * kernel_size[0], cost 6x the
            # convolution itself for a ViT patch embedding). In the weight's dtype (rounded once from float32) where
            # that has float32's range; float16's B A may not fit it where s B A does (a small scaling, or factors
            # fitted by powers of two: c2, rows of inf), so float16's are float32
            self.deltas = (torch.zeros(capacity, self.d, self.k, device=self.device,
                                       dtype=torch.float32 if self.dtype == torch.float16 else self.dtype)
                           if kind(layer) == "conv" else None)
        self.keys = [None] * capacity
        # CUDA: for each slot, the uses by closed batches not yet seen complete (one stream's each), waited for
        # before the slot is rewritten, and its last write, until that is seen complete (see _ready)
        self.events: List[List] = [[] for _ in range(capacity)]
        self.written = [None] * capacity
        self.source_dtypes: List[tuple] = [()] * capacity  # the dtypes of the factors each slot was written from

    def fits(self, layer) -> bool:
        weight = layer.weight_2d()
        return weight.dtype == self.dtype and weight.device == self.device

    @staticmethod
    def source(layer, name: str):
        """(A, B, scaling) that the slot of adapter `name` must hold: for the adapter a merged layer's weight holds,
        the snapshot of what was merged (the batch subtracts exactly that from the weight for the other rows; the
        live factors may have been written since), else the registry's."""
        if layer.merged and name == layer.active_adapter and layer._merged_A is not None:
            return layer._merged_A, layer._merged_B, layer._merged_scaling
        return layer._adapter(name)

    def current(self, slot: int, layer, name: str) -> bool:
        """Whether `slot` holds the layer's adapter `name` as it is now: the same tensors, unwritten since (their
        version counters and storage, as the finite-value stamps; inference tensors, which have no counter: the
        same tensors), the same scaling, and no check_values(name) since (writes the counters miss)."""
        key = self.keys[slot]
        if key is None or key[0] != name:
            return False
        if not layer.has_adapter(name):
            return key[1] == "absent"
        A, B, s = self.source(layer, name)
        return key[1] != "absent" and key[2] == s and key[3] == layer.value_epoch(name) and _holds(key[1], A, B)

    def serves_merged(self, slot: int, layer, name: str) -> bool:
        """Whether `slot` holds what the merged layer's weight holds of adapter `name`, which the batch's other
        rows take out of it: the slot is current, or it holds the same values under another snapshot (a switch
        inside the block merged `name` again, from unchanged values: its key then follows the new snapshot, so the
        values are compared once). False when the weight holds other values (merged again after add_adapter)."""
        if self.current(slot, layer, name):
            return True
        key = self.keys[slot]
        if key is None or key[0] != name or key[1] == "absent" or not layer.has_adapter(name):
            return False
        A, B, s = self.source(layer, name)
        if key[2] != s:
            return False
        same = self.holds(slot, layer, A, B, s)
        if same:
            self.keys[slot] = (name, _identity(A, B), s, layer.value_epoch(name))
        return same

    def holds(self, slot: int, layer, A: Tensor, B: Tensor, s: float) -> bool:
        """Whether `slot` holds the values of adapter (A, B, s): compared as the slot would hold them, bit for bit;
        else each factor up to a power of two (the slot's fitted by one, r41), element by element within the rounding
        the new factor's dtype may have made of the values the slot was written from (a float16 live copy of float32
        factors) and the subnormals' spacing, and the scalings with the powers of two taken out."""
        if layer.rank_of(A) > self.max_rank:  # (a replacement of a higher rank: not what the slot holds)
            return False
        at, bt, s2 = self._slot_values(layer, A, B, s)
        at, bt = at.to(self.device), bt.to(self.device)
        s2 = float(torch.tensor(s2, dtype=torch.float32))
        a, b, s1 = self.a[slot], self.b[slot], float(self.scales[slot])
        if torch.equal(a, at) and torch.equal(b, bt) and s1 == s2:
            return True
        if not self.source_dtypes[slot]:
            return False
        ks = []
        for slotted, new, source, now in ((a, at, self.source_dtypes[slot][0], A.dtype),
                                          (b, bt, self.source_dtypes[slot][1], B.dtype)):
            # the rounding the new factor's dtype may have made of the slot's source values (a float16 live copy of
            # float32 factors): none where it holds them (a wider dtype, or the same), else its own; and the
            # subnormals' spacing of that dtype and the slots' (r42: the coarsest dtype's rounding let a 1% change of
            # bfloat16 factors in a float32 slot through)
            f, f_source, f_slot = torch.finfo(now), torch.finfo(source), torch.finfo(self.dtype)
            u = f.eps if f.eps > f_source.eps else 0.0
            sub = max(f.smallest_normal * f.eps, f_slot.smallest_normal * f_slot.eps)
            ks.append(_power_apart(slotted, new, u, sub))
        ka, kb = ks
        if ka is None or kb is None:
            return False
        return abs(s1 - s2 * 2.0 ** -(ka + kb)) <= 4 * torch.finfo(torch.float32).eps * abs(s1)

    def load(self, slot: int, layer, name: str, label: Optional[str] = None) -> None:
        """Writes adapter `name` of the layer into `slot` (zeros and scaling 0 when the layer lacks it); values
        that are not finite are refused first (layer.check_values' rule; `label` names them), except for the merge
        snapshot of a merged layer, which its merge checked."""
        if self.current(slot, layer, name):
            self._ready(slot)
            return
        if layer.has_adapter(name) and not (layer.merged and name == layer.active_adapter
                                            and layer._merged_A is not None):
            layer._check_values(name, label)
        self.keys[slot] = None
        if not layer.has_adapter(name):
            at = torch.zeros(self.k, self.a.shape[2], dtype=self.dtype)
            bt = torch.zeros(self.b.shape[1], self.d, dtype=self.dtype)
            key, s = (name, "absent"), 0.0
            self.source_dtypes[slot] = ()
        else:
            A, B, s = self.source(layer, name)
            key = (name, _identity(A, B), s, layer.value_epoch(name))
            at, bt, s = self._slot_values(layer, A, B, s)
            self.source_dtypes[slot] = (A.dtype, B.dtype)
        self._write(slot, at, bt, float(s))
        self.keys[slot] = key

    def _slot_values(self, layer, A: Tensor, B: Tensor, s: float):
        """(A^T, B^T, scaling) as slot s of this stack holds adapter (A, B, s): padded and fitted (_padded), and in
        float64 slots the scaling folded into B^T (the float32 scales would round it, 1e-8 relative)."""
        at, bt, s = self._padded(layer, A.detach(), B.detach(), s)  # (s: scaled where a factor was)
        if self.dtype == torch.float64:
            bt, s = bt * s, 1.0
        return at, bt, s

    def _padded(self, layer, A: Tensor, B: Tensor, s: float):
        """(A^T (k, n*R), B^T (n*R, d), scaling) of the adapter, zero-padded, in the slots' dtype, where A lies.
        A factor whose values overflow that dtype (float32 factors of a float16 layer: a large B under a small
        scaling, which the layer's own forward serves) goes in scaled by a power of two, and the scaling the other
        way: exact, where a plain cast would serve inf."""
        A, B, s = _fitted(A, B, s, self.dtype)
        rank = self.max_rank
        at = torch.zeros(self.k, self.a.shape[2], dtype=self.dtype, device=A.device)
        bt = torch.zeros(self.a.shape[2], self.d, dtype=self.dtype, device=A.device)
        if not hasattr(layer, "enable_lora"):  # Linear, Embedding, a conv (its r * kernel_size[0] rows)
            at[:, :A.shape[0]] = A.t()
            bt[:A.shape[0]] = B.t()
            return at, bt, s
        r = layer.rank_of(A)
        nb = layer.out_features // len(layer.enable_lora)
        for g, e in enumerate(layer.block_ids):
            at[:, g * rank:g * rank + r] = A[g * r:(g + 1) * r].t()
            bt[g * rank:g * rank + r, e * nb:(e + 1) * nb] = B[g * nb:(g + 1) * nb].t()
        return at, bt, s

    def _write(self, slot: int, at: Tensor, bt: Tensor, s: float) -> None:
        if self.device.type != "cuda":
            self.a[slot].copy_(at)
            self.b[slot].copy_(bt)
            self.scales[slot] = s
            self.neg_scales[slot] = -s
            self._write_delta(slot)
            return
        # CUDA: wait for the batches that read this slot; a copy from host memory goes through pinned memory on a
        # side stream, which the current stream then waits for
        current = torch.cuda.current_stream(self.device)
        stream = _side_stream(self.device) if at.device.type == "cpu" else current
        if at.device.type == "cpu":
            at, bt = at.pin_memory(), bt.pin_memory()
            stream.wait_stream(current)
        scales = torch.tensor([s, -s], dtype=torch.float32).pin_memory()
        capturing = torch.cuda.is_current_stream_capturing()
        with torch.cuda.stream(stream):
            # the batches that read this slot, and its last write (both maybe queued on other threads' streams)
            for event in self.events[slot] + [self.written[slot]]:
                if event is not None:
                    stream.wait_event(event)
            self.events[slot] = []
            self.a[slot].copy_(at, non_blocking=True)
            self.b[slot].copy_(bt, non_blocking=True)
            self.scales[slot:slot + 1].copy_(scales[:1], non_blocking=True)
            self.neg_scales[slot:slot + 1].copy_(scales[1:], non_blocking=True)
            self._write_delta(slot)
            written = None
            if not capturing:  # (inside a capture the graph orders the write; a captured event cannot be queried)
                written = torch.cuda.Event()
                written.record(stream)
        self.written[slot] = written
        if stream is not current:
            current.wait_stream(stream)

    def _write_delta(self, slot: int) -> None:
        """A conv's slot: its B A from the factors just written, computed in float32 (float64 for float64 slots)."""
        if self.deltas is not None:
            cd = compute_dtype(self.dtype)
            with torch.autocast(self.deltas.device.type, enabled=False):  # (r13: opened under autocast, bf16)
                self.deltas[slot].copy_(torch.mm(self.b[slot].t().to(cd), self.a[slot].t().to(cd)))

    def _ready(self, slot: int) -> None:
        """A batch found `slot` already holding its adapter: on CUDA its stream waits for that write, which
        another thread may have queued on its own stream and which may not have run yet. Once the write is seen
        complete it is forgotten, so that batches of loaded adapters queue no waits."""
        written = self.written[slot]
        if written is None or torch.cuda.is_current_stream_capturing():
            # (a capture can neither query nor wait on an outside event: a batch opened inside one relies on the
            # slots' writes having been ordered before it, as README's CUDA graph section says)
            return
        if written.query():
            self.written[slot] = None
        else:
            torch.cuda.current_stream(self.device).wait_event(written)

    def used(self, slots) -> None:
        """After a batch: marks its slots as read by the work queued on the current stream."""
        if self.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            done = {}  # id(event): complete; each event queried once per call (a batch's slots share their events)

            def pending(e):
                if id(e) not in done:
                    done[id(e)] = e.query()
                return not done[id(e)]

            for s in slots:
                # every stream's last use is kept until it is seen complete (the last closer may not be the slowest)
                self.events[s] = [e for e in self.events[s] if pending(e)] + [event]


def _power_apart(x: Tensor, y: Tensor, u: float, sub: float) -> Optional[int]:
    """k such that x is y * 2^k element by element to within relative rounding `u` and the subnormals' spacing `sub`
    (of either side, at its scale), or None. Linear in the elements (LayerSlots.holds)."""
    mx = float(x.abs().max()) if x.numel() else 0.0
    my = float(y.abs().max()) if y.numel() else 0.0
    if mx == 0.0 or my == 0.0:
        return 0 if mx == my else None
    k = round(math.log2(mx / my))
    xs, ys = x.double(), y.double() * 2.0 ** k
    close = (xs - ys).abs() <= u * torch.maximum(xs.abs(), ys.abs()) + sub * (1.0 + 2.0 ** k)
    return k if bool(close.all()) else None


def _fitted(A: Tensor, B: Tensor, s: float, dtype: torch.dtype):
    """(A * 2^a, B * 2^b, s * 2^-(a+b)): the factors scaled by powers of two (exact) where their largest values would
    overflow `dtype`, or lie so far below its range that their elements would lose bits to its subnormals (below
    max / 2^20: float16 subnormals start at 2^-14, so a float32 A of 1e-6 kept 5 bits), else as they are (no look at
    the values, no device sync, when `dtype` has the factors' range to within a factor of two: bfloat16 beside
    float32)."""
    top = torch.finfo(dtype).max
    if 2 * top >= max(torch.finfo(A.dtype).max, torch.finfo(B.dtype).max):
        return A, B, s
    amaxes = torch.stack([(t.abs().amax() if t.numel() else t.new_zeros(())).float() for t in (A, B)]).tolist()
    out = []
    for t, amax in zip((A, B), amaxes):
        if amax > top:  # (the factors are checked finite)
            e = math.ceil(math.log2(amax / top)) + 1
            t, s = t * 2.0 ** -e, s * 2.0 ** e
        elif 0 < amax < top * 2.0 ** -20:  # up to [0.5, 1), by at most 2^126 (a power of two float32 holds: 2^128
            e = min(-math.floor(math.log2(amax)) - 1, 126)  # was inf, then inf or NaN elements, below 2^-128)
            t, s = t * 2.0 ** e, s * 2.0 ** -e
        out.append(t)
    return out[0], out[1], s


_SIDE_STREAMS: Dict[torch.device, "torch.cuda.Stream"] = {}


def _side_stream(device):
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return stream


def batch_shape(shape, n: int, layout: Optional[str] = None):
    """tokens per batch row for a layer input of leading shape `shape` in a batch of n rows: the first
    dimension is the row (any further leading dimensions are its tokens: layout "rows"), or the flattened
    tokens are the rows (a serving engine's layout: "tokens"); None when it does not fit. Without a layout
    (the model's input did not say) either, rows first."""
    total = 1
    for s in shape:
        total *= s
    if layout != "tokens" and len(shape) and shape[0] == n and n:
        return total // n
    if layout != "rows" and total == n:
        return 1
    return None


def layout_of(shape, n: int) -> Optional[str]:
    """The layout a model input of leading shape `shape` gives a batch of n rows (see batch_shape)."""
    if batch_shape(shape, n, "rows") is not None:
        return "rows"
    return "tokens" if batch_shape(shape, n, "tokens") is not None else None


def _narrowed_by_autocast(layer, x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would compute layer's matmul in, where it is less precise than the layer's weight's; else
    None."""
    dtype = autocast_dtype(x)
    weight = layer.weight_2d()
    if dtype is None or not autocast_eligible(weight) or weight.dtype == dtype:
        return None
    # (by precision, not width: bfloat16 autocast over a float16 weight, r15)
    return dtype if torch.finfo(dtype).eps > torch.finfo(weight.dtype).eps else None


class LayerBatch:
    """A layer's view of an open batch: its slots and the batch's index buffers."""

    def __init__(self, batch, slots: LayerSlots):
        self.batch = batch
        self.slots = slots
        self.checked = None  # the merged snapshot (layer._merged_A) last found in its slot: checked again on a new one

    def forward(self, layer, x: Tensor) -> Tensor:
        batch = self.batch
        where = batch.where(layer)
        if layer.training:
            raise ValueError(f"batch_adapters: {where} is in training mode; mixed batches serve inference "
                             f"(call model.eval(); peft's adapter_names refuses training mode too)")
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters(False))):
            what = "an input that requires" if x.requires_grad else "parameters that require"
            raise RuntimeError(f"batch_adapters: {where} runs with gradients enabled and {what} grad; mixed batches "
                               f"serve inference from copies of the adapters, which no gradient would reach: run "
                               f"the batch under torch.no_grad() or torch.inference_mode()")
        if not self.slots.fits(layer):
            raise ValueError(f"batch_adapters: the weight of {where} moved to {layer.weight_2d().device} / "
                             f"{layer.weight_2d().dtype} after the batch was opened; open it again")
        conv = kind(layer) == "conv"
        if conv and x.dim() != len(layer.conv.kernel_size) + 2:
            raise ValueError(f"batch_adapters: {where} got an unbatched input of shape {tuple(x.shape)} (channels "
                             f"first, no row dimension): a mixed batch needs the batch row first")
        lead = x.shape[:-1] if kind(layer) == "linear" else x.shape[:1] if conv else x.shape
        fit = batch.fit(lead, layer)
        alike = batch.alike_slot(layer) if fit is None and not conv else None
        if alike is not None:
            # every row gets the same here (no adapter of the batch targets the layer, or one adapter is every row's):
            # any input, a broadcast one (GPT-2's position ids, (1, T)) too, is served as one row (U1: every mixed
            # batch of a model that held an adapter with LoRA on GPT-2's wpe was refused, even where no row took it)
            fit = (None, lead.numel())
        if fit is None:
            if batch.expand > 1:
                how = (f"its first dimension must be the {batch.n} rows or their {batch.n * batch.expand} repeats "
                       f"(expand={batch.expand})")
            else:
                how = {"rows": "its first dimension must be the batch row, as in the model's input",
                       "tokens": "its tokens, flattened, must be the rows, as in the model's input"}.get(
                    batch.layout, f"its first dimension must be the batch row (or, for a 1-D leading shape, its "
                                  f"tokens the rows; the model's input, which decides, was not seen: {INPUT_READ})")
            hint = batch.hint(lead[0], lead, kind(layer) == "embedding") if len(lead) else ""
            if batch.nested_input and len(lead) == 1:
                how, hint = ("the model's input was a nested tensor, whose rows' tokens, flattened into one "
                             "dimension, cannot be told apart: give the layer the nested tensor or its padded rows"), ""
            raise ValueError(f"batch_adapters: {batch.rows_text()}, but {where} got an input of shape "
                             f"{tuple(x.shape)}: {how}{hint}")
        size, tokens = fit
        merged = layer.active_adapter if layer._serves_merged() else None  # (see LoRALayer._serves_merged)
        if merged is not None and layer._merge_behind():
            raise ValueError(f"batch_adapters: {where} trained adapter {merged!r} through its merge since it merged "
                             f"(its weight holds the values from before, which the batch's rows would be served "
                             f"relative to); call eval() or merge() on the model first (it merges the trained values; "
                             f"inside an open batch that merge is refused: close the block first)")
        if (merged is not None and merged in batch.slot_of and not ops.compiling()
                and (layer._merged_A is None or layer._merged_A is not self.checked)):
            self._check_merged(layer, merged, where)  # (not in a traced forward: see README, torch.compile)
        add, sub = (batch.index(layer, x.device, merged, size) if alike is None
                    else batch.alike_index(layer, x.device, merged, alike))
        if conv:  # (one row per batch entry: its (channels, ...) are its features)
            return ops.batched_conv(layer.conv, x, self.slots.deltas, self.slots.scales, add, sub)
        narrow = _narrowed_by_autocast(layer, x) if sub is not None and kind(layer) == "linear" else None
        if narrow is not None:
            # rows served relative to a merged adapter, under autocast to a less precise dtype than the weight's: the
            # merged output rounded to it, and the merged update taken out of that, left the other rows the
            # autocast dtype's rounding of |W + the merged update| (B1: 0.080 off float64 where the row alone was
            # 0.0074). In the weight's dtype, then cast as autocast would: as the README says, the weight dtype's
            device_type = "cuda" if x.is_cuda else "cpu"
            with torch.autocast(device_type, enabled=False):
                return self._forward_rows(layer, x.to(layer.weight_2d().dtype), add, sub, tokens).to(narrow)
        return self._forward_rows(layer, x, add, sub, tokens)

    def _forward_rows(self, layer, x: Tensor, add, sub, tokens) -> Tensor:
        """A Linear's or an Embedding's output for the batch's rows: the weight's, each row's adapter added, the
        merged one taken out (sub)."""
        out = layer._weight_forward(x)
        if not tokens or not out.numel():  # (no tokens, or no outputs: nothing to add)
            return out
        slots = self.slots
        a, b = slots.a, slots.b
        if out.dtype != a.dtype:  # autocast, or a weight of another dtype than the activations
            a, b = a.to(out.dtype), b.to(out.dtype)
        out2 = out.view(-1, out.shape[-1])
        if kind(layer) == "linear":
            x2 = x.reshape(-1, x.shape[-1])
            x2 = x2.to(out.dtype).contiguous()
            op = ops.batched_linear_
        else:
            x2 = x.reshape(-1).contiguous()
            op = ops.batched_embedding_
        op(out2, x2, a, b, slots.scales, add, tokens)
        if sub is not None:
            op(out2, x2, a, b, slots.neg_scales, sub, tokens)
        return out

    def _check_merged(self, layer, merged: str, where: str) -> None:
        """Refuses a merged layer whose weight holds other values of adapter `merged` than its slot (see
        LayerSlots.serves_merged); once per merged snapshot (a switch inside the block makes a new one)."""
        snapshot = layer._merged_A
        if not self.slots.serves_merged(self.batch.slot_of[merged], layer, merged):
            raise ValueError(f"batch_adapters: {where} holds adapter {merged!r} merged with other values than the "
                             f"batch took when it opened (merged again after add_adapter replaced it): the other "
                             f"rows would take the wrong update out of the weight; open the batch again")
        self.checked = snapshot
