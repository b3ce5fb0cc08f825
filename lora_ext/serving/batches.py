"""Mixed batches across a model: `batch_adapters(model, names)` serves each batch row with its own adapter in one
forward, and `configure_slots(model, slots, max_rank)` sizes the slots that hold the adapters a batch needs.

The adapters stay where the registry keeps them (device or host memory: `load_peft_adapter(..., device="cpu")`
keeps inactive adapters in host memory). Each model has a pool of `slots` slot numbers, the same in every layer;
a batch gets a slot for each adapter it needs (the rows' adapters, and the adapter a merged layer holds),
reusing the slot an adapter already has, else a free one, else the least recently used one that no open batch
holds, and copies the adapter into it in every layer (only where it changed). A batch that needs more slots than
are free is refused before anything is written, with the numbers.

Everything a batch needs is checked when it is opened, before the first write: the names (each held by some
layer of the model; None is the base model), the rows, the ranks (at most the slots' max_rank), the layers
(Linear, MergedLinear, Embedding and Conv1d/2d/3d; not under FSDP2 or tensor parallel). The model's first input is checked
against the number of rows when the model is called. The open batch holds the model's adapters (like `hold`):
model-level switches, merges and loads on other threads wait until it closes.

Which batch is open is a context variable: each thread (and each asyncio task) sees only its own, so threads
serving different batches of one model run concurrently. A thread started inside the block does not see it.
"""
import contextlib
import contextvars
import functools
import inspect
import threading
import time
import weakref
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from .. import batched, sharded
from ..layers import LoRALayer, meta_refusal
from ..named_adapters import as_integer, check_rank, deferred_interrupt
from ..utils import unwrap
from . import injection, saved_modules
from .adapters import _layers_or_raise, hold, lora_layers, model_lock

DEFAULT_SLOTS = 8
WAIT_SECONDS = 30.0  # how long a batch waits for slots held by other threads' open batches

# the batch open for each model in this context: {model: Batch}
_MODELS: contextvars.ContextVar[Optional[Dict]] = contextvars.ContextVar("lora_ext_batch_models", default=None)


class SlotPool:
    """A model's slots: which adapter each holds, which open batches hold it (pins), when it was last used, and
    each layer's slot stacks. On CUDA the index buffers are kept per (thread, device, merged adapter, rows):
    written in place for every batch, never reallocated, so a CUDA graph captured in a batch reads the next
    batch's (4 bytes per row, twice for a merged layer, for each batch size a thread uses: bucket the sizes, as
    graph capture needs anyway)."""

    def __init__(self, capacity: int, max_rank: int):
        self.capacity, self.max_rank = capacity, max_rank
        self.names: List[Optional[str]] = [None] * capacity
        self.pins = [0] * capacity
        self.last_use = [0] * capacity
        self.clock = 0
        self.lock = threading.Condition()  # notified when a batch releases its slots
        self.holders: Dict[int, int] = {}  # thread id -> open batches of this pool on that thread
        self.layers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # layer -> LayerSlots
        self.buffers: Dict[tuple, tuple] = {}
        self.owners: Dict[tuple, "Batch"] = {}  # buffer key -> the open batch using it

    def __getstate__(self):
        return {"capacity": self.capacity, "max_rank": self.max_rank}  # a copied model gets empty slots

    def __setstate__(self, state):
        self.__init__(state["capacity"], state["max_rank"])

    def busy(self) -> int:
        return sum(1 for p in self.pins if p)

    def drop_gone_threads(self) -> None:
        """Drops the index buffers of threads that have ended (M1: a server opening batches on a thread per request
        kept a pair per request thread and batch size for the model's life). Called before a buffer is made: a
        thread's own buffers stay while it lives (a graph it captured reads them)."""
        alive = {t.ident for t in threading.enumerate()}
        for key in [k for k in list(self.buffers) if k[0] not in alive and k not in self.owners]:
            self.buffers.pop(key, None)

    def assign(self, need: Sequence[str], merged: Sequence[str] = ()) -> Dict[str, int]:
        """A slot for each adapter in `need` (the caller holds self.lock), pinned until release(). When the
        slots are enough but other threads' open batches hold too many of them, waits up to WAIT_SECONDS for
        them to close; refuses at once when the model has too few slots, or when this thread holds the others.
        `merged`: the adapters of `need` that are there because layers hold them merged (named in a refusal)."""
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            slot_of = {n: self.names.index(n) for n in need if n in self.names}
            missing = [n for n in need if n not in slot_of]
            free = [s for s in range(self.capacity) if self.names[s] is None]
            evictable = sorted((s for s in range(self.capacity)
                                if self.names[s] is not None and not self.pins[s] and self.names[s] not in need),
                               key=lambda s: self.last_use[s])
            if len(missing) <= len(free) + len(evictable):
                break
            left = deadline - time.monotonic()
            if len(need) > self.capacity or threading.get_ident() in self.holders or left <= 0:
                raise ValueError(
                    f"batch_adapters: the batch needs {len(need)} distinct adapters ({len(missing)} of them not in "
                    f"a slot now) but the model has {self.capacity} slots, {self.busy()} of them held by other open "
                    f"batches{' (waited ' + str(WAIT_SECONDS) + ' s)' if left <= 0 else ''}: split the batch, or "
                    f"give the model more slots with lora.configure_slots(model, slots="
                    f"{max(len(need) + self.busy(), self.capacity + 1)})"
                    + (f"; {', '.join(map(repr, merged))} merged into layers' weights take(s) a slot too (the "
                       f"batch subtracts it from the rows of other adapters): lora.unmerge_adapter(model) frees it"
                       if merged else ""))
            self.lock.wait(left)
        spare = free + evictable
        for name in missing:
            s = spare.pop(0)
            self.names[s] = name
            slot_of[name] = s
        self.clock += 1
        for s in slot_of.values():
            self.pins[s] += 1
            self.last_use[s] = self.clock
        me = threading.get_ident()
        self.holders[me] = self.holders.get(me, 0) + 1
        return slot_of

    def release(self, slots, thread: Optional[int] = None, notify: bool = True) -> None:
        """Unpins what assign() pinned for a batch opened on `thread` (default: this one)."""
        with self.lock:
            for s in slots:
                self.pins[s] -= 1
            thread = threading.get_ident() if thread is None else thread
            self.holders[thread] -= 1
            if not self.holders[thread]:
                del self.holders[thread]
            if notify:
                self.lock.notify_all()

    def stacks(self, layer) -> batched.LayerSlots:
        """The layer's slot stacks (made, or made again after the weight moved, when no batch holds them)."""
        stacks = self.layers.get(layer)
        if stacks is None or not stacks.fits(layer):
            if stacks is not None and self.busy():
                raise ValueError(f"batch_adapters: the weight of {layer._describe()} moved to another device or "
                                 f"dtype while other batches are open; open this batch after they close")
            stacks = self.layers[layer] = batched.LayerSlots(layer, self.capacity, self.max_rank)
        return stacks


def _pool(model: nn.Module, found) -> SlotPool:
    pool = model.__dict__.get("_lora_ext_slot_pool")
    if pool is None:
        names = {n for _, m in found for n in m.adapter_names}
        pool = SlotPool(max(DEFAULT_SLOTS, len(names)), _max_rank(found))
        model.__dict__["_lora_ext_slot_pool"] = pool
    return pool


def _max_rank(found) -> int:
    return max((m.rank_of(m._adapter(n)[0]) for _, m in found for n in m.adapter_names), default=1)


def configure_slots(model: nn.Module, slots: int, max_rank: Optional[int] = None) -> None:
    """Gives the model `slots` adapter slots of rank up to `max_rank` (default: the largest rank the model holds
    now) for mixed batches. Slots cost slots * max_rank * (in + out features) elements of the weight's dtype per
    layer (a MergedLinear's enabled blocks each count; a convolution's, its factors' shapes at max_rank, and slots *
    its weight's elements for the slots' delta weights). Replaces the slots the model had: a CUDA graph captured
    in a batch before must be captured again. Refused while a batch of the model is open."""
    # (any integer, a numpy one or a one-element tensor, as reserve_rank takes: u6)
    slots = check_rank("configure_slots: slots", slots)
    max_rank = None if max_rank is None else check_rank("configure_slots: max_rank (or None)", max_rank)
    with model_lock(model).write():
        found = _layers_or_raise(model)
        old = model.__dict__.get("_lora_ext_slot_pool")
        if old is not None and old.busy():
            raise ValueError(f"configure_slots: {old.busy()} slots are held by open batches of this model; "
                             f"configure the slots when they are closed")
        model.__dict__["_lora_ext_slot_pool"] = SlotPool(slots, max_rank or _max_rank(found))


def slot_config(model: nn.Module) -> Optional[Dict[str, object]]:
    """The model's slots: {"slots", "max_rank", "adapters" (what each slot holds)}, or None before the first
    batch or configure_slots."""
    pool = model.__dict__.get("_lora_ext_slot_pool")
    if pool is None:
        return None
    return {"slots": pool.capacity, "max_rank": pool.max_rank, "adapters": list(pool.names)}


def _pooled(device: torch.device) -> bool:
    """Whether a batch's index buffers on `device` are kept in the pool per (thread, size) for the next batch: on
    CUDA, where a captured graph replays the next batch through them."""
    return device.type == "cuda"


class Batch:
    """An open mixed batch: the rows (`table[rows[i]]` is row i's adapter, -1 the base), each adapter's slot,
    and the index buffers of the layers' forwards."""

    def __init__(self, pool: SlotPool, table: List[Optional[str]], rows: Tensor, slot_of: Dict[str, int],
                 paths: Dict[nn.Module, str], expand: int = 1):
        self.pool, self.table, self.slot_of, self.paths = pool, table, slot_of, paths
        self.rows = torch.where(rows < 0, len(table), rows)  # -1 (the base) -> the maps' last entry, -1
        # each table entry's slot (-1: the base), for _map: a compiled forward reads tensors, not the table's names,
        # so one graph serves every table of the batch's size (it guarded on the names: a new graph per table)
        self.table_slots = torch.tensor([-1 if name is None else slot_of[name] for name in table], dtype=torch.int32)
        self.n = rows.numel()
        # generate()'s beams: an input of n * expand rows holds each row `expand` times in a run (the encoder of an
        # encoder-decoder model still sees the n rows)
        self.expand = expand
        self.sizes = (self.n,) if expand == 1 else (self.n, self.n * expand)
        self._rows_of = {self.n: self.rows}
        # (current_thread: a thread that Python did not start is then listed by threading.enumerate, for good:
        # SlotPool.drop_gone_threads never takes the buffers a graph it captured reads)
        self.thread = threading.current_thread().ident
        self.filled = set()
        self.private: Dict[tuple, tuple] = {}  # buffers of keys another open batch of this thread holds
        self.layout: Optional[str] = None  # "rows" or "tokens", from the model's input when it is called
        self.tokens_per_row: Optional[int] = None  # the model's input's tokens per row (the "rows" layout)
        self.input_rows = self.n  # the model's input's rows: n, or with beams the n * expand repeats it held
        self.flattens = frozenset()  # the layers that may take those tokens flattened, row after row (_FLATTENS_ROWS)
        self.outside_text: Optional[str] = None  # a module served outside the language model (_outside_text)
        self.generates = True  # whether rows may come repeated for beams (the model has a generate(), or is a layer)
        # Set when the block closes. A generator's block closed on another thread than the one it opened on
        # leaves its entries in the opening thread's context, where they must then count for nothing.
        self.closed = False
        self._alike: Dict[nn.Module, Optional[int]] = {}  # alike_slot's, per layer
        self.nested_input = False  # whether the model's input was a nested tensor (_check_input)

    @functools.cached_property
    def present(self) -> frozenset:
        """The table entries some row takes (len(table): the base): a module saved whole runs only those, eagerly
        (traced, each runs on every row: SavedBatch._masked). Read as the batch opens where it has such modules
        (a device sync on CUDA, outside any capture the block may hold: SavedBatch), else never."""
        return frozenset(torch.unique(self.rows).tolist()) if self.n else frozenset()

    def rows_for(self, size: int) -> Tensor:
        """Each row's table entry for an input of `size` rows (one of self.sizes): the rows, or each repeated
        `expand` times in a run."""
        rows = self._rows_of.get(size)
        if rows is None:
            rows = self._rows_of[size] = self.rows.repeat_interleave(self.expand)
        return rows

    def fit(self, lead, layer=None) -> Optional[tuple]:
        """(rows, tokens per row) of `layer`'s input of leading shape `lead` (batched.batch_shape), or None. With
        beams only the row layout: a flattened input of n * expand tokens is n rows of `expand` tokens, which
        repeating each row's entry `expand` times serves alike. A layer of self.flattens may take the model input's
        rows x tokens in one dimension, row after row."""
        layout = "rows" if self.expand > 1 else self.layout
        if self.nested_input and len(lead) == 1:
            # a nested input's tokens, flattened (its values()): rows of their own lengths, which one dimension cannot
            # show (Z1: read as one token per row where as many as the rows, a token served another row's adapter)
            return None
        if layout is None and len(lead) > 1:
            # the model's input was not seen (a keyword _check_input does not know, a submodule called in the
            # block): several leading dimensions are rows first, never tokens (GPT-2's broadcast position ids,
            # (1, T), would pass as T tokens when T is the row count, each position given another row's adapter)
            layout = "rows"
        if self.ambiguous(lead, batched.kind(layer) == "embedding"):
            return None
        for size in self.sizes:
            tokens = batched.batch_shape(lead, size, layout)
            if tokens is not None:
                return size, tokens
        if self.flattened(lead) and layer in self.flattens:
            # the rows' tokens flattened, row after row (OPT's MLP: (rows * tokens, d)); with beams, the repeats'
            return self.input_rows, self.tokens_per_row
        return None

    def ambiguous(self, lead, lookup: bool) -> bool:
        """Whether a lookup's 1-D ids (an Embedding's input of leading shape `lead`) may be a broadcast input
        (nanoGPT's positions, torch.arange(T), a decoder's of its own length) as well as one id per row: as many as
        the rows, each row of the model's input several tokens, or that input not seen (the flattened tokens
        layout, and rows of one token, say one per row). Read as one per row, position p was served row p's
        adapter in every row. (A float input of one vector per row, a pooled head's (n, d), is the common case
        there and stays served.)"""
        if not lookup or len(lead) != 1 or lead[0] not in self.sizes:
            return False
        if self.layout is None:
            return True
        # rows of several tokens each (a decoder's positions need not be as many as the input's tokens); rows of one
        # token (the model's input itself 1-D, a decoding step) take one id per row
        return self.layout == "rows" and self.tokens_per_row != 1

    def flattened(self, lead) -> bool:
        """Whether a layer input of leading shape `lead` holds the model input's rows x tokens (more than one token
        per row) in one dimension."""
        t = self.tokens_per_row
        return self.layout == "rows" and t is not None and t > 1 and tuple(lead) == (self.input_rows * t,)

    def rows_text(self) -> str:
        return f"{self.n} rows were given" + (f" (expand={self.expand}: {self.n * self.expand} with each row "
                                               f"repeated)" if self.expand > 1 else "")

    def hint(self, first: int, lead=None, lookup: bool = False) -> str:
        """For an input whose first dimension is another multiple of the rows (generate() with beams): how to say so.
        A layer's input of leading shape `lead` holding the rows' tokens in one dimension is told that instead."""
        if lead is not None and self.ambiguous(lead, lookup):
            why = ("as many as the rows" if self.layout is not None
                   else f"as many as the rows, and the model's input, which would tell, was not seen "
                        f"({batched.INPUT_READ})")
            return (f"; 1-D ids of {lead[0]} entries, {why}: a broadcast input (positions torch.arange(T)) cannot "
                    f"carry per-row adapters, and one id per row cannot be told from it; give the lookup 2-D ids "
                    f"(the positions expanded to (rows, T), or an id per row as (rows, 1))")
        if lead is not None and self.flattened(lead):
            return (f"; it holds the model input's {self.input_rows} rows x {self.tokens_per_row} tokens in one "
                    f"dimension, which is served only inside modules known to flatten them row after row ("
                    f"{', '.join(sorted(_FLATTENS_ROWS))}): their order cannot be told from the shape")
        if first > self.n and first % self.n == 0 and first // self.n != self.expand:
            k = first // self.n
            if not self.generates:  # (expand would serve a layout the model does not have: t4, 2.8 off)
                return (f"; {k} times the rows, and the module given to batch_adapters has no generate() (whose beams "
                        f"repeat each row, as expand={k} says): this layer's input holds something else in its first "
                        f"dimension (tokens or queries first, or the batch repeated): serve it one adapter at a time")
            return (f"; generate() with num_beams={k} (or num_return_sequences={k}) repeats each row {k} times in a "
                    f"run, which batch_adapters(..., expand={k}) serves (a model that repeats the batch otherwise, "
                    f"such as [rows; rows], cannot be served so)")
        if first < self.n:
            return " (a broadcast input, such as position ids of shape (1, T), cannot carry per-row adapters)"
        return ""

    def alike_slot(self, layer) -> Optional[int]:
        """The slot every row takes at `layer` (-1: the base) where the table's entries give them all the same there
        (no adapter of the table serves values there, or one adapter is every entry), else None. A stand-in of zeros
        serves none, but one given values since (load_state_dict, an optimizer) does (Z1: taken for the base, 0.42
        off): its factors are read, a device sync, once per batch and layer (not while a CUDA graph is captured:
        then not alike)."""
        if layer in self._alike:
            return self._alike[layer]
        names = [name for name in self.table if name is not None and layer.has_adapter(name)]
        if any(layer.is_placeholder(n) for n in names) and torch.cuda.is_available() \
                and torch.cuda.is_current_stream_capturing():
            return None
        serving = {n for n in names if not layer.is_stand_in(n)}
        effects = {self.slot_of[name] if name in serving else -1 for name in self.table}
        alike = self._alike[layer] = next(iter(effects)) if len(effects) == 1 else None
        return alike

    def where(self, layer) -> str:
        path = self.paths.get(layer, "?")
        return f"layer {path!r} ({type(layer).__name__})" if path else f"the {type(layer).__name__} layer"

    def _map(self, merged: Optional[str], subtract: bool) -> Tensor:
        """The slot of each table entry for the adding pass (-1: the base, or the merged adapter itself) or
        the subtracting one (the merged adapter's slot, -1 for its own rows)."""
        slots = self.table_slots
        if merged is None:  # (no subtracting pass without a merged adapter)
            return torch.cat((slots, slots.new_full((1,), -1)))
        own = self.slot_of[merged]
        values = torch.where(slots == own, -1, slots.new_full((), own) if subtract else slots).to(torch.int32)
        return torch.cat((values, values.new_full((1,), own if subtract else -1)))

    def _fill(self, key, buffers) -> None:
        merged = key[2]
        for buf, subtract in zip(buffers, (False, True)):
            if buf is None:
                continue
            values = self._map(merged, subtract)
            rows = self.rows_for(key[3])
            if rows.device.type == "cpu":
                values = values.index_select(0, rows)
                if buf.device.type == "cuda":
                    values = values.pin_memory()
                buf.copy_(values, non_blocking=True)
            else:
                torch.index_select(values.to(rows.device), 0, rows, out=buf)
        self.filled.add(key)

    def fill_existing(self) -> None:
        """Writes this batch's indices into the buffers earlier batches of this thread and size made (a
        CUDA graph captured then reads them on replay)."""
        for key, buffers in list(self.pool.buffers.items()):
            if (key[0] == self.thread and key[3] in self.sizes and (key[2] is None or key[2] in self.slot_of)
                    and self.pool.owners.setdefault(key, self) is self):
                self._fill(key, buffers)

    def close(self) -> None:
        self.closed = True
        for key in [k for k, owner in self.pool.owners.items() if owner is self]:
            del self.pool.owners[key]

    def _merged_slot(self, layer, merged: Optional[str]) -> int:
        """The slot of the adapter `layer`'s weight holds merged (-1: none), which the batch must have."""
        if merged is None:
            return -1
        if merged not in self.slot_of:
            raise ValueError(f"batch_adapters: {self.where(layer)} was merged with adapter {merged!r} after the "
                             f"batch was opened (or as it chose its adapters: a switch of the layer alone on another "
                             f"thread), which has no slot in it; open the batch again once the layer holds the adapter "
                             f"it will serve")
        return self.slot_of[merged]

    def alike_index(self, layer, device, merged: Optional[str], slot: int):
        """index()'s for an input served as one row taking `slot` (alike_slot): that slot added, the merged adapter, if
        any, taken out, unless it is that slot. Made at each call (a fill, which a CUDA graph captures)."""
        own = self._merged_slot(layer, merged)
        add = torch.full((1,), -1 if slot == own else slot, dtype=torch.int32, device=device)
        return add, (None if merged is None or slot == own else torch.full((1,), own, dtype=torch.int32, device=device))

    def index(self, layer, device, merged: Optional[str], size: Optional[int] = None):
        """(adding index, subtracting index or None) for a layer on `device` whose weight holds `merged`, for an
        input of `size` rows (one of self.sizes; default the batch's)."""
        self._merged_slot(layer, merged)
        size = self.n if size is None else size
        key = (self.thread, device, merged, size)
        if key in self.filled:
            return self.private.get(key) or self.pool.buffers[key]
        def make():  # (outside inference_mode: a later batch under no_grad writes the pooled ones)
            with torch.inference_mode(False):
                return (torch.empty(size, dtype=torch.int32, device=device),
                        torch.empty(size, dtype=torch.int32, device=device) if merged is not None else None)
        if not _pooled(device):  # no graph to replay: buffers of this batch's own (nothing kept per size)
            buffers = self.private[key] = make()
        elif self.pool.owners.setdefault(key, self) is self:
            buffers = self.pool.buffers.get(key)
            if buffers is None:
                self.pool.drop_gone_threads()
                buffers = self.pool.buffers[key] = make()
        else:  # another open batch of this thread (an asyncio task) uses the pooled buffers: own ones
            buffers = self.private[key] = make()
        self._fill(key, buffers)
        return buffers


def _rows(adapters, rows, held) -> tuple:
    """(table, rows as an int64 tensor, n, label: how a message names row i) from batch_adapters' arguments,
    checked."""
    if isinstance(adapters, (str, Tensor)) or not isinstance(adapters, Sequence):
        raise TypeError(f"batch_adapters: adapters must be a list of adapter names (None for the base model), "
                        f"got {type(adapters).__name__}")
    for i, name in enumerate(adapters):
        if name is not None and not isinstance(name, str):
            raise TypeError(f"batch_adapters: entry {i} must be an adapter name or None, got {name!r}")
    if rows is None:
        table = list(dict.fromkeys(adapters))
        position = {name: i for i, name in enumerate(table)}
        index = torch.tensor([position[name] for name in adapters], dtype=torch.int64)
        label = lambda i: f"row {i}"  # noqa: E731
    else:
        table = list(adapters)
        if isinstance(rows, Tensor):
            if rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"batch_adapters: rows must be a 1-D int32/int64 tensor or a list of ints, got "
                                 f"{rows.dtype} of shape {tuple(rows.shape)}")
            index = rows.long()
        else:
            index = torch.tensor([_row_entry(i) for i in rows], dtype=torch.int64)
        label = lambda i: f"rows entry {i}"  # noqa: E731
        host = index.cpu()  # one sync, before anything is written
        bad = ((host < -1) | (host >= len(table))).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"batch_adapters: {label(i)} is {int(host[i])}; entries index the {len(table)} "
                             f"adapters given (-1: the base model)")
    n = index.numel()
    if not n:
        raise ValueError("batch_adapters: the batch has no rows")
    for j, name in enumerate(table):
        if name is not None and name not in held:
            first = _first_row(index, table, name)
            who = label(first) if first is not None else f"adapters entry {j}"
            raise ValueError(f"batch_adapters: {who}: adapter {name!r} is not loaded in the model (it holds "
                             f"{sorted(held)})")
    return table, index, n, label


def _first_row(index, table, name) -> Optional[int]:
    """The first row whose adapter is `name` (any table entry of that name), or None."""
    entries = [j for j, t in enumerate(table) if t == name]
    hits = torch.isin(index, torch.tensor(entries, dtype=index.dtype, device=index.device)).nonzero()
    return int(hits[0]) if hits.numel() else None


def _targeted(m, need) -> List[str]:
    """The adapters of `need` that LoRA layer or saved module (modules_to_save's wrapper) m serves: those whose
    factors it holds, or that save it whole."""
    if isinstance(m, saved_modules.ModulesToSave):
        return [a for a in need if a in m.adapter_names]
    return [a for a in need if m.has_adapter(a) and not m.is_placeholder(a)]


def _what(m) -> str:
    return "module" if isinstance(m, saved_modules.ModulesToSave) else "layer"


def _how(m) -> str:
    return "saves it whole" if isinstance(m, saved_modules.ModulesToSave) else "targets it"


def _inside_experts(path: str) -> bool:
    return "experts" in path.split(".")[:-1]


def _check_layers(found, saved=(), need=()) -> None:
    """Refuses layers a mixed batch cannot serve (by kind, sharding, meta factors, or inside a mixture of experts'
    experts), and modules saved whole (modules_to_save) inside experts that the batch's adapters save."""
    inside = [(path, m) for path, m in found if _inside_experts(path)]  # (every batch: their adapters may be merged)
    inside += [(path, m) for path, m in saved if _inside_experts(path) and _targeted(m, need)]
    for path, m in inside:
        raise ValueError(f"batch_adapters: {_what(m)} {path!r} is inside a mixture of experts' experts: a router gives "
                         f"it a subset of the tokens, which cannot be told from the batch rows (when their counts "
                         f"agree they would be served as rows, silently wrong); serve it one adapter at a time")
    for path, m in found:
        if batched.kind(m) is None or getattr(getattr(m, "conv", None), "transposed", False):
            raise ValueError(f"batch_adapters: layer {path!r} is a {type(m).__name__}; mixed batches serve Linear, "
                             f"MergedLinear, Embedding and Conv1d/2d/3d layers")
        if m.__dict__.get("_tp") is not None or sharded.is_dtensor(m._weight_or_none()) or sharded.is_dtensor(m.lora_A):
            raise ValueError(f"batch_adapters: layer {path!r} is sharded (FSDP2 or tensor parallel); mixed batches "
                             f"serve unsharded layers")
        if m.lora_A.is_meta or m.lora_B.is_meta:  # (an accelerate offload: the slots would be stacked from nothing)
            raise ValueError(f"batch_adapters: layer {path!r}'s factors are on the meta device: "
                             f"{meta_refusal(m)}")


def _check_saved_read(model, saved, need) -> None:
    """Refuses modules saved whole that the batch's adapters save, where the parent computes with the module's weight
    without calling it (nn.MultiheadAttention's out_proj): the weight it reads is the active adapter's copy, served to
    every row (X2: 1.94 off; one adapter at a time is served, the wrapper handing over the active copy's weight)."""
    for path, m in saved:
        how = injection.read_without_call(model, path) if _targeted(m, need) else None
        if how is not None:
            raise ValueError(f"batch_adapters: module {path!r} is saved whole (modules_to_save) by adapter(s) "
                             f"{_targeted(m, need)}, and its parent computes with its weight without calling it"
                             f"{'' if how == 'always' else ' on ' + how}: every row would get the active adapter's "
                             f"copy; serve it one adapter at a time")


def _check_input(module, args, kwargs):
    """Forward pre-hook of a model with batches: its first input must have the batch's rows. It stays on the model
    after its batches close, so it reads the context only while one is open somewhere (see batched.ANY_OPEN)."""
    if not batched.ANY_OPEN:
        return
    batch = _open(_MODELS.get()).get(module)
    if batch is None:
        return
    x = next((kwargs[k] for k in batched.INPUT_KEYWORDS if isinstance(kwargs.get(k), Tensor)), None)
    if x is None and args and isinstance(args[0], Tensor):
        x = args[0]
    if batch.outside_text is not None:
        _check_media(module, batch, args, kwargs)
    if x is None:
        return
    if x.is_nested:  # (rows of their own lengths: each a row, served padded, layers.nested_forward; its shape raised
        # torch's "Internal error: NestedTensorImpl doesn't support sizes", W2)
        rows = x.size(0)
        if rows not in batch.sizes:
            raise ValueError(f"batch_adapters: {batch.rows_text()} for a nested input of {rows} rows: each of its "
                             f"tensors is a row")
        batch.layout, batch.tokens_per_row, batch.input_rows, batch.nested_input = "rows", None, rows, True
        return
    batch.nested_input = False
    lead = x.shape[:-1] if x.is_floating_point() else x.shape
    if batch.expand > 1:  # beams: the row layout, the model's input holding the rows or each repeated
        size = next((size for size in batch.sizes if batched.batch_shape(lead, size, "rows")), None)
        batch.layout = "rows" if size is not None else None
    else:
        size = batch.n
        batch.layout = batched.layout_of(lead, batch.n)  # the layers' inputs must follow it (no broadcast rows)
    batch.tokens_per_row = batched.batch_shape(lead, size, "rows") if batch.layout == "rows" else None
    batch.input_rows = size if size is not None else batch.n
    if batch.layout is None:
        how = (f"its first dimension must be the {batch.n} rows or their {batch.n * batch.expand} repeats "
               f"(expand={batch.expand})" if batch.expand > 1 else
               "the first dimension is the batch row; with tokens flattened, one entry per token")
        raise ValueError(f"batch_adapters: {batch.rows_text()} for an input of shape {tuple(x.shape)}: {how}"
                         f"{batch.hint(x.shape[0]) if x.dim() else ''}")


# the config's names for the token id that stands for an image, a video or an audio clip in input_ids
_IMAGE_TOKEN, _VIDEO_TOKEN = ("image_token_id", "image_token_index"), ("video_token_id", "video_token_index")
_AUDIO_TOKEN = ("audio_token_id", "audio_token_index")
# path components of a vision-language model's vision side (its towers, projectors, connectors, resamplers), where the
# language model is not a sibling of them (transformers 4's Llava: the tower beside a whole causal LM)
_VISION_WORDS = ("vision", "visual", "image", "video", "audio", "multi_modal", "mm_projector", "connector",
                 "resampler")


def _text_model(model) -> Optional[str]:
    """The path of the model's language model (transformers' get_decoder(), else the first module named
    `language_model` or `text_model`), or None."""
    get = getattr(model, "get_decoder", None)
    decoder = None
    if callable(get):
        try:
            decoder = get()
        except Exception:  # (a model whose get_decoder does not apply to it)
            decoder = None
    for path, m in model.named_modules():
        if (decoder is not None and m is decoder) or (decoder is None and path.rpartition(".")[2] in (
                "language_model", "text_model")):
            return path
    return None


def _outside_text(model, found, saved, need) -> Optional[str]:
    """The path of a module the batch's adapters serve (a LoRA layer, or a module saved whole) on a vision-language
    model's vision side, whose input holds one entry per image, not per row: outside its language model (_text_model)
    and output head, and beside the language model in its parent (a vision tower, a projector; not a classification
    head on top of the whole model) or named so (_VISION_WORDS). None where there is none, or no language model."""
    lm = _text_model(model)
    if not lm:
        return None
    parent = lm.rpartition(".")[0]
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None

    def vision_side(path):
        if path == lm or path.startswith(lm + "."):
            return False
        if parent and path.startswith(parent + "."):
            return True
        return any(word in part for part in path.split(".") for word in _VISION_WORDS)
    return next((path for path, m in [*found, *saved] if m is not head and vision_side(path) and _targeted(m, need)),
                None)


_SIGNATURES: Dict[type, List[str]] = {}


def _arguments(model, args, kwargs) -> Dict:
    """The model's forward arguments by name: the positional ones named by its signature, and the keywords."""
    names = _SIGNATURES.get(type(model))
    if names is None:
        try:
            params = inspect.signature(model.forward).parameters.values()
        except (TypeError, ValueError):
            params = ()
        names = _SIGNATURES[type(model)] = [p.name for p in params if p.kind in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return {**dict(zip(names, args)), **kwargs}


def _check_media(model, batch, args, kwargs) -> None:
    """A vision-language model's images (videos, audio clips) must be one per input row where the batch serves a
    module that computes per image (batch.outside_text): its input's entries are taken as the rows, so images not
    one per row (two in a row, none in another, as many as the rows) were served with other rows' adapters, silently
    (as peft's adapter_names serves them). One per row: as many items (the leading dimension of each `pixel_values*`
    argument) as rows, each row holding the item's token (the config's image_token_id, or video_token_id), in
    input_ids or, as transformers finds it, as that token's embedding in inputs_embeds. Checked where the config
    names the token (models without one take one image per row by design)."""
    config = getattr(model, "config", None)
    given = _arguments(model, args, kwargs)
    media = [(k, v) for k, v in given.items()  # (input_features: Qwen2-Audio's clips, one per audio token run, r45)
             if (k.startswith("pixel_values") or k == "input_features") and isinstance(v, Tensor)]
    if not media or config is None:
        return
    ids, embeds = given.get("input_ids"), given.get("inputs_embeds")
    for key, items in media:
        names = _VIDEO_TOKEN if "video" in key else _AUDIO_TOKEN if key == "input_features" else _IMAGE_TOKEN
        token = next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)
        if token is None:
            continue
        if isinstance(ids, Tensor) and ids.dim() == 2:
            held, rows = (ids == token).any(1), ids.shape[0]
        elif isinstance(embeds, Tensor) and embeds.dim() == 3 and callable(getattr(model, "get_input_embeddings",
                                                                                   None)):
            table = model.get_input_embeddings()
            stand = table(torch.tensor(token, device=embeds.device)).to(embeds.dtype)
            held, rows = (embeds == stand).all(-1).any(1), embeds.shape[0]
        else:
            raise ValueError(f"batch_adapters: {batch.outside_text!r} computes each item of {key} with the adapter "
                             f"of the row at its position, and the rows holding them cannot be told without "
                             f"input_ids (or inputs_embeds and the model's input embeddings); serve the adapters one "
                             f"at a time")
        if items.shape[0] == rows and bool(held.all()):
            continue
        raise ValueError(f"batch_adapters: {batch.outside_text!r} computes each of the {items.shape[0]} items of "
                         f"{key} with the adapter of the row at its position, but they are not one per row (of the "
                         f"{rows} rows, {int(held.sum())} hold token {token}, which stands for an item); give each "
                         f"row one item, or serve the adapters one at a time")


def _check_enabled(model, found, saved=()) -> None:
    """Refuses a batch of a model inside a disable_adapter block: its own, or one of another model holding its layers
    or its modules saved whole (`saved`, saved_modules.wrappers(model))."""
    if injection.DISABLED.get(model) or any(m._adapter_off for _, m in [*found, *saved]):
        raise ValueError("batch_adapters: the model's adapters are disabled (inside lora.disable_adapter), which "
                         "serves every row the base; open the batch after the block (None rows serve the base)")


# transformers modules whose layers take time-major inputs, (T, B, d): a row check by the first dimension cannot tell
# T from B when they are equal (rows would be mixed up silently, as with peft's adapter_names). Refused where they
# hold LoRA layers or modules saved whole: Mask2Former's and OneFormer's query decoders run (queries, B, d) through
# their FFNs (with num_queries == B, query q of every image got row q's adapter: 3.4 off, t4), OneFormer's text
# encoder and BridgeTower's vision tower (tokens, B, d) through their blocks; their backbones are batch-major
_TIME_MAJOR = {"XLNetModel", "FSMTModel", "LongformerSelfAttention", "LEDEncoderSelfAttention",
               "Mask2FormerMaskedAttentionDecoderLayer", "OneFormerTransformerDecoderLayer",
               "OneFormerTransformerDecoderQueryTransformer", "OneFormerTextTransformer", "BridgeTowerTransformer",
               # (u1) Bros's bbox embeddings run on (T, T, B, d), its relation extractors on (T, B, d) (4.3-15.5 off)
               "BrosBboxEmbeddings", "BrosRelationExtractor"}
# and the children of these that the module runs on such inputs beside batch-major ones: the query decoders' final
# norms on (queries, B, d) (saved whole: 1.62 off, r47), BridgeTower's ln_post on (layers, B, tokens, d) (4.16 off)
# (u1) Bros's entity head on (T, B, d) (0.98 off); MLCD's attention's out_proj on (tokens, B, d) (4.4-10.2 off; its
# q/k/v_proj take rows first); OmDet-Turbo's task features on (tokens, B, d) and class features on (classes, B, d)
# (0.13-14.4 off); VibeVoice's diffusion head on [speaking rows' conditions; their negatives]
_TIME_MAJOR_PARTS = {"Mask2FormerMaskedAttentionDecoder": ("layernorm",),
                     "OneFormerTransformerDecoder": ("decoder_norm",),
                     "MLCDAttention": ("out_proj",),
                     "BrosSpadeEEForTokenClassification": ("initial_token_classifier",),
                     "OmDetTurboDecoder": ("task_encoder", "task_project", "encoder_class_head", "decoder_class_head"),
                     "VibeVoiceModel": ("diffusion_head",)}


# transformers modules whose LoRA layers take the rows' tokens flattened row after row, (rows * tokens, d): served as
# the rows (Batch.fit). Only these: a layer's 1-D input of that size cannot show its order (a module flattening tokens
# first, or patches packed across rows, would be served the wrong rows)
_FLATTENS_ROWS = {"OPTDecoderLayer", "Qwen2MoeSparseMoeBlock"}


# transformers vision towers that take every image's patches packed into one dimension, (patches, d), whatever row
# holds the image: a mixed batch cannot tell the rows there (refused when the batch's adapters target their layers).
# By name, and any module whose forward takes the images' patch grids, `grid_thw`, or a vision or audio module's
# taking the packed sequences' bounds, `cu_seqlens`, and any module holding a list of such modules (its blocks: the
# whole tower or audio encoder, its patch embedding and projections too) (_packs, _inside: transformers 5.24 has 16
# towers taking grid_thw of the Qwen-VL family and its kin, which a list of names missed 11 of, c1; and packed audio
# encoders, Qwen3-ASR's, Qwen2.5-Omni's, c2)
_PACKED = {"Qwen2VisionTransformerPretrainedModel", "Qwen2_5_VisionTransformerPretrainedModel", "Qwen3VLVisionModel",
           "Qwen2_5OmniVisionEncoder", "Glm4vVisionModel"}


# transformers models whose generate() tiles the batch ([rows; rows]: MusicGen's classifier-free guidance) rather than
# repeating each row in a run, which is what expand assumes
_TILING = {"MusicgenForCausalLM", "MusicgenForConditionalGeneration", "MusicgenMelodyForCausalLM",
           "MusicgenMelodyForConditionalGeneration",
           # (u1) Dia's guidance and Janus's image generation ([rows; rows]: 0.46 and 3.15 off with expand=2),
           # VibeVoice's guidance, Qwen2.5-Omni's token2wav DiT (stacks its input twice inside its forward)
           "DiaForConditionalGeneration", "JanusForConditionalGeneration", "VibeVoiceForConditionalGeneration",
           "Qwen2_5OmniToken2WavDiTModel"}


# transformers' embeddings looked up with a (query, key) matrix of relative positions or buckets, with no row
# dimension: T5's (and its kin's), WavLM's, wav2vec2-BERT's and SeamlessM4T v2's, Granite Speech's, Phi-4-multimodal's
_RELATIVE_LOOKUPS = {"relative_attention_bias", "rel_attn_embed", "distance_embedding", "rel_pos_emb", "bias_values",
                     "pe_k"}  # (SpeechT5's relative positions, u1: 9.3e-4 off)


def _check_row_lookups(found, saved, need) -> None:
    """Refuses adapters of a relative position bias (_RELATIVE_LOOKUPS), a LoRA layer's or a copy saved whole
    (modules_to_save: `saved`, the model's wrappers): an Embedding looked up with a (query, key) matrix, with no row
    dimension, which a mixed batch would split as rows whenever the query length equals the batch's rows (silently
    wrong, as peft's adapter_names is there)."""
    for path, m in [*found, *saved]:
        if path.rpartition(".")[2] not in _RELATIVE_LOOKUPS or (
                not isinstance(m, saved_modules.ModulesToSave) and getattr(m, "_batch_kind", None) != "embedding"):
            continue
        targeted = _targeted(m, need)
        if targeted:
            raise ValueError(f"batch_adapters: {_what(m)} {path!r} (a relative position bias) is looked up with "
                             f"(query, key) position buckets, not by row, so a mixed batch cannot give each row "
                             f"its adapter there; adapter {targeted[0]!r} {_how(m)}: serve it one adapter at a time")


_PACKS: Dict[type, bool] = {}


def _packs(cls: type) -> bool:
    """Whether modules of class `cls` take every row's patches or frames packed into one dimension: named in _PACKED,
    a forward taking `grid_thw`, or a vision or audio module's forward taking `cu_seqlens` (by its class name: a text
    model serving packed tokens, rows=token_index, takes them too, and is served right; RADIO's attention takes an
    optional one for a packed input its ordinary one is not, r42)."""
    packs = _PACKS.get(cls)
    if packs is None:
        try:
            taken = inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):  # (a forward without a signature)
            taken = {}
        packs = "grid_thw" in taken or ("cu_seqlens" in taken and any(
            word in cls.__name__ for word in ("Vision", "Visual", "Audio", "Speech")))
        packs = _PACKS[cls] = packs or cls.__name__ in _PACKED
    return packs


def _inside(model, classes) -> Dict[nn.Module, str]:
    """{module: the class name of its outermost enclosing module (itself included) packing patches or frames (_packs:
    itself, or a list of its blocks), else of its innermost one named in `classes`}."""
    found = {}

    def walk(module, within, packed):
        name = type(module).__name__
        if not packed and (_packs(type(module)) or any(
                isinstance(child, nn.ModuleList) and any(_packs(type(block)) for block in child)
                for child in module.children())):
            within, packed = name, True
        elif not packed and name in classes:
            within = name
        if within is not None:
            found[module] = within
        for child in module.children():
            walk(child, within, packed)
    walk(model, None, False)
    return found


def _check_packed(found, saved, need, enclosing) -> None:
    """Refuses adapters of layers, and of modules saved whole (modules_to_save), inside a vision tower that packs
    every image's patches into one dimension (_PACKED; `enclosing` from _inside)."""
    for path, m in [*found, *saved]:
        tower = enclosing.get(m)
        targeted = _targeted(m, need) if tower is not None and tower not in _FLATTENS_ROWS else []
        if targeted:
            raise ValueError(f"batch_adapters: {_what(m)} {path!r} is inside a {tower}, which takes every image's "
                             f"patches (or every row's audio frames) packed into one dimension, whatever row holds "
                             f"them, so a mixed batch cannot give each row its adapter there; adapter "
                             f"{targeted[0]!r} {_how(m)}: serve it one adapter at a time")


def _served_inside(m) -> bool:
    return any(isinstance(sub, (LoRALayer, saved_modules.ModulesToSave)) for sub in m.modules())


# parts of a model run so only when it is the model given (BridgeTowerVisionModel runs its tower's forward, whose
# ln_post takes (layers, B, tokens, d): 4.16 off; BridgeTowerModel runs forward_post instead, rows first, r48)
_ROOT_PARTS = {"BridgeTowerVisionModel": ("visual.ln_post",)}


def _refuse_not_rows_first(part, child, owner, first):
    """Refuses a batch that serves a layer inside `child` (`part` of an `owner`), whose inputs put `first` first."""
    if _served_inside(child):
        raise ValueError(f"batch_adapters: {part!r} of the {owner} takes inputs whose first dimension is not the "
                         f"batch's rows ({first} first): a row of the batch cannot be told there; serve it one "
                         f"adapter at a time")


def _row_entry(i) -> int:
    """One entry of a `rows` list as an int: any integer (a numpy one too, r51), never a bool."""
    try:
        value = as_integer(i)
    except TypeError:
        raise TypeError(f"batch_adapters: rows must be a 1-D int tensor or a list of ints, got an entry {i!r}") \
            from None
    if not -1 <= value < 2 ** 63:  # (beyond int64, torch's "Overflow when unpacking long long" named nothing, h1)
        raise ValueError(f"batch_adapters: rows entry {value} indexes no adapter (entries index the adapters given, "
                         f"-1: the base model)")
    return value


def _check_batch_major(model, expand=1):
    root = unwrap(model)
    for part in _ROOT_PARTS.get(type(root).__name__, ()):
        try:
            child = root.get_submodule(part)
        except AttributeError:
            continue
        _refuse_not_rows_first(part, child, type(root).__name__, "layers")
    for path, m in model.named_modules():
        kind = type(m).__name__
        parts = [(f"{path}.{name}" if path else name, child) for name, child in m.named_children()
                 if name in _TIME_MAJOR_PARTS.get(kind, ())]
        if (kind in _TIME_MAJOR or _torch_time_major(m)) and _served_inside(m):
            raise ValueError(f"batch_adapters: {path or 'the model'!r} is a {kind}, whose layers take "
                             f"time-major inputs (tokens first, then rows"
                             f"{', batch_first=False' if _torch_time_major(m) else ''}): a row of the batch cannot be "
                             f"told from a token there; serve it one adapter at a time")
        for part, child in parts:
            _refuse_not_rows_first(part, child, kind, "tokens, queries or layers")
        if expand > 1 and kind in _TILING and _served_inside(m):  # (a tiling part the batch does not serve: r48)
            raise ValueError(f"batch_adapters: expand={expand}: {path or 'the model'!r} is a {type(m).__name__}, whose "
                             f"generate() stacks the batch twice for classifier-free guidance ([rows; rows]) rather "
                             f"than repeating each row in a run, as expand assumes; serve it one adapter at a time")


def _torch_time_major(m) -> bool:
    """torch's own transformer layers built with batch_first=False (their default): they run their linear layers on
    (tokens, rows, d), and with as many tokens as rows a batch served token t of every row with row t's adapter (U1:
    0.49-1.12 off)."""
    return isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and not m.self_attn.batch_first


def _early_refusals(model) -> None:
    """The refusals batch_adapters makes before it waits for the model's hold, each made again under it. Before the
    hold, a change of a model holding this one may run on another thread (a load into an outer model adding a saved
    module's copy): a walk that meets it resizing a container is left to the checks under the hold (r3: "dictionary
    changed size during iteration" failed 4 of 23.5k batch openings)."""
    try:
        found = _layers_or_raise(model)
    except RuntimeError as e:
        if not batched.resized(e):
            raise
        return
    _check_enabled(model, found)


@contextlib.contextmanager
def batch_adapters(model: nn.Module, adapters: Sequence[Optional[str]],
                   rows: Union[Sequence[int], Tensor, None] = None, expand: int = 1) -> Iterator[Batch]:
    """Serves each batch row with its own adapter inside the block: `adapters[i]` is row i's adapter name (None:
    the base model). With `rows` (ints or an int tensor, one per row), `adapters` lists the distinct adapters and
    `rows[i]` indexes it (-1: the base model), the form for long per-token lists (a serving engine's flattened
    layout, where each token is a row).

    `expand=k` for generate() with num_beams=k (or num_return_sequences=k when sampling), which repeats each row
    k times in a run: a layer whose input has n * k rows serves each of them with its row's adapter, one with n
    rows (an encoder-decoder model's encoder) the n rows, as peft's adapter_names does with num_beams.

    The batch row is the first dimension of each layer's input (a flattened (tokens, features) input takes one
    entry per token). Works for any module holding lora_ext layers (a single layer too), and for generate().
    Inference only: the model in eval mode, under torch.no_grad() or torch.inference_mode(). Merged layers serve
    each row relative to the adapter they hold (see lora_ext.batched). Everything is checked before anything is
    written, but for non-finite factor values, refused as their slot is loaded; see lora_ext/serving/batches.py for
    slots and paging."""
    if model in _open(_MODELS.get()):
        raise ValueError("batch_adapters: a batch of this model is already open in this context; close it first")
    expand = check_rank("batch_adapters: expand (generate()'s num_beams)", expand)  # (numpy ints too, r51)
    _early_refusals(model)
    with hold(model), _serving(model) as registered:
        # the layers and names as of now, under the hold (a load or a delete may have landed before it: checked
        # before the hold, a deleted adapter's rows were served as the base)
        found = _layers_or_raise(model)
        _check_batch_major(model, expand)
        saved = saved_modules.wrappers(model)  # (one walk of the model for them, under the hold)
        _check_enabled(model, found, saved)  # (again: a disable_adapter may have begun before the hold; not while it)
        table, index, n, label = _rows(adapters, rows, {n for _, m in found for n in m.adapter_names})
        merged = list(dict.fromkeys(m.active_adapter for _, m in found if m.merged))
        need = list(dict.fromkeys([t for t in table if t is not None] + merged))
        _check_layers(found, saved, need)
        _check_saved_read(model, saved, need)
        _check_row_lookups(found, saved, need)
        enclosing = _inside(model, _PACKED | _FLATTENS_ROWS)  # (one walk for both)
        _check_packed(found, saved, need, enclosing)
        pool = _pool(model, found)
        ranks = [(m.rank_of(m._adapter(name)[0]) if m.has_adapter(name) else 0, name, path, m)
                 for name in need for path, m in found]
        over = [entry for entry in ranks if entry[0] > pool.max_rank]
        if over:
            rank, name, path, m = over[0]
            row = _first_row(index, table, name)
            who = label(row) if row is not None else f"the merged adapter {name!r}"
            raise ValueError(
                f"batch_adapters: {who}: adapter {name!r} has rank {rank} at layer {path!r}"
                + (" (the rank reserve_rank holds every adapter of it at)" if m.reserved_rank else "")
                + f", more than the model's slots hold ({pool.max_rank}): lora.configure_slots(model, "
                f"slots={pool.capacity}, max_rank={max(r for r, *_ in ranks)}) (the largest rank of the batch's "
                f"adapters at any layer)")
        open_now = _open(batched.ACTIVE.get(), lambda v: v.batch)
        for path, m in [*found, *saved]:
            if m in open_now:
                raise ValueError(f"batch_adapters: {'layer' if m in dict(found).values() else 'module'} "
                                 f"{repr(path) if path else '(the module given)'} is "
                                 f"already in an open batch (of another model holding it) in this context; batches "
                                 f"may not share layers or modules saved whole")
        batch, tokens, slot_of, views, thread, counted = None, [], {}, {}, threading.get_ident(), False
        serving = False  # (the layers' and modules' counts of open batches taken: note_serving)
        wrapped = [w for _, w in saved]
        began, landed = False, None  # (the end's: see below)
        pinned = False  # (a batch of the base alone pins no slot, but assign counts this thread among the holders)
        blocked = False
        try:
            # Ctrl-C is held back while the slots are pinned and the block is set up: it lands before or after
            with deferred_interrupt():
                # counted before the slots are pinned and the layers count it, and after they no longer do (below):
                # a fork between the two finds the block (forks.py)
                model_lock(model).block(+1, thread)
                blocked = True
                with pool.lock:
                    views = {m: pool.stacks(m) for _, m in found}  # made again after a move, before this pins
                    slot_of = _assign_current(pool, views, need, [n for n in merged if n not in table])
                    pinned = True
                    # (made before the loads: each layer lists it as its slots load, under its lock, and a merge of
                    # the layer from then on is checked against them: batched.merge_refusal)
                    batch = Batch(pool, table, index.to(found[0][1].weight_2d().device) if index.device.type != "cpu"
                                  else index, slot_of, {m: path for path, m in found}, expand)
                    for path, m in found:
                        # under the layer's lock: a switch of the layer alone (layer.set_adapter on another thread,
                        # which takes no model lock) changes its merged snapshot before its active adapter, and a slot
                        # loaded between the two took the new adapter's values under the old one's name (m37: 3% of
                        # the forwards of blocks opened during such switches served one adapter's rows wrong, 28 off)
                        with m._lock:
                            for name in need:  # (a slot taken again checks the values first, as set_adapter does)
                                views[m].load(slot_of[name], m, name,
                                              f"batch_adapters: layer {path!r} adapter {name!r}")
                            batched.note_slots(m, views[m], batch)
                batch.flattens = frozenset(m for m in views if enclosing.get(m) in _FLATTENS_ROWS)
                batch.outside_text = _outside_text(model, found, saved, need)
                inner = unwrap(model)  # (a lone layer: its caller makes its input, beams' repeats too)
                batch.generates = callable(getattr(inner, "generate", None)) or isinstance(inner, LoRALayer)
                # (modules saved whole too: a disable_adapter block of another model holding one is refused, r38)
                registered.batch = batch
                batched.note_serving([*views, *wrapped], opened=True, entry=registered)
                serving = True
                batched.note_batch(opened=True)
                counted = True
                batch.fill_existing()
                layers = {m: batched.LayerBatch(batch, stacks) for m, stacks in views.items()}
                layers.update({w: saved_modules.SavedBatch(batch, path, w) for path, w in saved})
                tokens.append(batched.ACTIVE.set({**_open(batched.ACTIVE.get(), lambda v: v.batch), **layers}))
                tokens.append(_MODELS.set({**_open(_MODELS.get()), model: batch}))
                _install_check(model)
            yield batch
        finally:
            # Ctrl-C is held back here too: the count of open batches and the slots' pins must come back whole. An
            # exception landing before the end began (an asynchronous one, or Ctrl-C as the hold is taken) runs it
            # again, and is raised after it (the batch left installed would serve its rows in every later forward)
            while True:
                try:
                    with deferred_interrupt():
                        began = True
                        try:
                            # this batch's entries only (another block of this context may have closed or opened
                            # in between, as generators that yield inside their blocks do), rather than the values
                            # from before it opened
                            if tokens:
                                batched.ACTIVE.set({m: v for m, v in (batched.ACTIVE.get() or {}).items()
                                                    if v.batch is not batch} or None)
                                _MODELS.set({k: v for k, v in (_MODELS.get() or {}).items() if v is not batch} or None)
                            if batch is not None:
                                for stacks in views.values():
                                    stacks.used(slot_of.values())
                                if serving:
                                    batched.note_serving([*views, *wrapped], opened=False, entry=registered)
                                batched.forget_slots(views, batch)
                                batch.close()
                        finally:
                            if counted:
                                batched.note_batch(opened=False)
                            if pinned:
                                pool.release(slot_of.values(), thread)
                            if blocked:
                                model_lock(model).block(-1, thread)
                    break
                except BaseException as err:
                    if began or landed is not None:
                        raise
                    landed = err
            if landed is not None:
                raise landed


@contextlib.contextmanager
def _serving(model: nn.Module) -> Iterator[batched.Serving]:
    """The batch's registration among the open ones (batched.open_serving), from before it reads the model's layers
    to the end of its block."""
    opened, landed = [], None
    try:
        batched.open_serving(model, opened)  # (lists its entry in `opened` before it registers it)
        yield opened[0]
    finally:
        # (as the batch's end: an exception landing here, Ctrl-C, runs it again and is raised after; left
        # registered, the entry refused every change of the model's modules for good, r1)
        while True:
            try:
                with deferred_interrupt():
                    for entry in opened:
                        batched.close_serving(entry)
                break
            except BaseException as err:
                if landed is not None:
                    raise
                landed = err
        if landed is not None:
            raise landed


def _open(entries: Optional[Dict], batch_of=lambda v: v) -> Dict:
    """A context variable's {key: entry} without the entries of closed batches (see Batch.closed)."""
    return {k: v for k, v in (entries or {}).items() if not batch_of(v).closed}


def _assign_current(pool: SlotPool, views, need, merged=()) -> Dict[str, int]:
    """pool.assign(need), except that a slot another open batch serves is never rewritten: when one of the
    adapters changed since it went into its slot (a reload, add_adapter, a write in place) while another batch
    holds that slot, this batch waits for it (as for free slots), or is refused if this thread holds it."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        slot_of = pool.assign(need, merged)
        stale = [n for n in need if pool.pins[slot_of[n]] > 1
                 and any(not stacks.current(slot_of[n], m, n) for m, stacks in views.items())]
        if not stale:
            return slot_of
        pool.release(slot_of.values(), notify=False)
        left = deadline - time.monotonic()
        if threading.get_ident() in pool.holders or left <= 0:
            raise ValueError(f"batch_adapters: adapter {stale[0]!r} changed since another open batch put it in its "
                             f"slot, and that batch still serves it; open this batch after it closes")
        pool.lock.wait(left)


def _check_load(module, state_dict, prefix, *args) -> None:
    """Load pre-hook of a model with batches: a load_state_dict into it while a batch serves one of its layers is
    refused before any module loads (the layers' own refusal came after the modules before them had loaded)."""
    if not batched.ANY_OPEN:
        return
    for path, m in lora_layers(module):
        if m.__dict__.get("_open_batches"):
            raise RuntimeError(f"load_state_dict: a mixed batch (lora.batch_adapters) serves layer {path!r}, which "
                               f"the load would change under the batch's rows; nothing was loaded: load after the "
                               f"block closes")


def _install_check(model: nn.Module) -> None:
    if not model.__dict__.get("_lora_ext_batch_hook"):
        model.register_forward_pre_hook(_check_input, with_kwargs=True)
        model.register_load_state_dict_pre_hook(_check_load)
        model.__dict__["_lora_ext_batch_hook"] = True
