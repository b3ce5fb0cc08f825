"""Named adapters across a whole model: every lora_ext layer holds the same names (a layer an adapter does not
target holds a stand-in of zeros for it, NamedAdapters.is_placeholder); set_adapter switches them all, each layer in
one pass over its weight when merged.

Model-level changes (set_adapter, merge_adapter, unmerge_adapter, delete_adapter, and loading an adapter
with activate=True) are atomic with respect to forwards of the model on other threads: the model gets a
reader-writer lock, taken for reading by a forward pre-hook on the model (released by a forward hook that
runs even when the forward raises) and for writing by those changes, which wait for the forwards in flight
and hold new ones back until every layer has changed. Forwards run concurrently with each other; changes
serialise. Under torch.compile the hooks do nothing (a compiled graph takes no Python locks)."""
import atexit
import collections
import contextlib
import contextvars
import functools
import inspect
import itertools
import queue
import random
import sys
import threading
import time
import traceback
import types
import warnings
import weakref
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .. import batched, ddp_guard, forks, ops, sharded
from ..layers import LoRALayer
from ..named_adapters import at_layer, check_one_name, check_rank, deferred_interrupt, each_or_none
from ..utils import _ddp_of, _wrapped, under_ddp, unwrap
from .injection import check_mergeable, refuse_fsdp1
from .saved_modules import ModulesToSave, wrappers
from .tokens import TrainableTokens
from . import weighted


_SERIALS = itertools.count()  # the order of the model locks (ModelLock._serial)
HOLD_QUEUE_SECONDS = 1.0  # how long a new hold() waits behind waiting writers while another hold is open


class ModelLock:
    """Many readers (forwards) or one writer (a model-level change); waiting writers go first, in the order they
    came, and the readers that waited for a write go before the next one (a thread switching in a loop cannot
    starve the others: it queues behind them). Reads are re-entrant per thread (a forward inside a forward), and
    the writer's thread may read.

    A forward stopped by a BaseException that is not an Exception (KeyboardInterrupt, SystemExit) skips
    torch's forward hooks, so its read is never released: a writer that waits finds such reads (threads that
    are no longer inside a forward of the model, read off their stacks) and drops them."""

    def __init__(self):
        # blocks take the mutex itself, whose __enter__/__exit__ are C: a Ctrl-C cannot land between taking it and
        # the block, or leave the block with it held, as it can in Condition's Python-level __enter__/__exit__
        # (every other thread then waits for ever)
        self._mutex = threading.RLock()
        self._cond = threading.Condition(self._mutex)
        self._reads = {}  # thread id -> reads it holds
        self._hook_reads = {}  # thread id -> the module calls whose pre-hook took a read (_read_before), innermost last
        self._holds = {}  # thread id -> reads held by hold(): never taken for left behind
        self._hold_boxes = {}  # id(box) -> the box of each hold() (open while box[0]; see _older_hold_open)
        self._taken = 0  # holds and state reads taken so far: a box's place in their order (box[2])
        self._queued_at = {}  # a waiting writer's thread -> _taken when it queued
        self._readings = {}  # thread id -> reads held by reading() (lora_state_dict's): never taken for left behind
        self._writer = None
        self._write_depth = 0
        self.writes = 0  # writes begun (read without the mutex: lora_state_dict's optimistic snapshot)
        # the threads waiting, by kind (waiting writers first come first served): each enters its own inside the
        # try that takes it out, and a waiter that finds one whose thread is no longer waiting drops it (_drop_gone:
        # an exception Python raised between two statements of the bookkeeping, an asynchronous one, left it)
        self._queue = collections.deque()  # waiting writers' threads
        self._waiting = collections.deque()  # waiting readers' threads
        self._admit = 0  # readers let in ahead of the waiting writers: those that waited when a write ended
        self._changer = None  # the thread making a model-level change (changing()), and how deep
        self._change_depth = 0
        self._changers = collections.deque()  # threads waiting to make one, first come first served
        self._look_at = 0.0  # when a waiter next looks for waiters (and reads) left behind (_wait)
        self._torn = None  # a forked child's: why forwards are refused until set_adapter (after_fork)
        self._blocks = {}  # thread id -> disable_adapter / batch_adapters blocks of the model it has open (block())
        self._stuck = None  # a forked child's: why forwards are refused for good (after_fork)
        self._stuck_changing = False  # and whether for a change half made (not for another thread's open block)
        # the change that adds, replaces or removes modules or adapters, while it writes (write())
        self._reshaping = None
        self._root = None  # a weak reference to the model whose lock this is (_chain_lock; _marked)
        # the thread writing the layers of this lock's model (a change through it, or through a model holding it:
        # _layer_writes), and how deep; and this lock's place in the order such writes take several in
        self._layers_writer = None
        self._layers_depth = 0
        self._layers_queue = collections.deque()  # threads waiting to write them, first come first served
        self._serial = next(_SERIALS)
        forks.track_model_lock(self)

    def block(self, delta: int, thread: Optional[int] = None) -> None:
        """A disable_adapter or batch_adapters block of the model opened (+1) or closed (-1) on `thread` (this one)."""
        thread = threading.get_ident() if thread is None else thread
        with self._mutex:
            n = self._blocks.get(thread, 0) + delta
            if n > 0:
                self._blocks[thread] = n
            else:
                self._blocks.pop(thread, None)

    def after_fork(self, taken: bool) -> None:
        """In a child forked while other threads used the model (forks.py; taken: the fork took the mutex, else
        another thread held it past the fork's wait): the state of this thread only is kept (its reads, holds, or the
        change it makes); the other threads are not in this process. Where one of them was writing a model-level
        change (set_adapter half way through the layers), forwards and holds are refused until set_adapter."""
        me = threading.get_ident()
        writer, changer = self._writer, self._changer
        reads, holds, readings = self._reads.get(me), self._holds.get(me), self._readings.get(me)
        hook_reads = self._hook_reads.get(me)
        write_depth, change_depth = self._write_depth, self._change_depth
        layers_writer, layers_depth = self._layers_writer, self._layers_depth
        torn, stuck, blocks, reshaping = self._torn, self._stuck, self._blocks.get(me), self._reshaping
        if any(thread != me for thread in self._blocks):
            stuck = ("this process was forked (os.fork) while another thread of its parent was inside a "
                     "lora.disable_adapter or lora.batch_adapters block of the model, which never ends here (the "
                     "layers would serve the base, or keep the batch's slots): this copy of the model cannot serve; "
                     "load or build the model again in this process, or fork outside such blocks")
        stuck_changing = self._stuck_changing
        if writer is not None and writer != me and reshaping is not None:
            # (set_adapter there would put each layer on one adapter, over modules and adapters half replaced: t1, a
            # load with 2 of 6 modules injected served 0.57 off after it, an unload or a hotswap 0.47 and 0.11 off)
            stuck = (f"this process was forked (os.fork) while another thread of its parent was inside {reshaping} "
                     f"on the model, which adds, replaces or removes modules or adapters layer by layer: this copy of "
                     f"the model holds part of that change and cannot serve; load or build the model again in this "
                     f"process, or fork when no other thread changes the model")
            stuck_changing = True
        elif (writer is not None and writer != me) or (layers_writer is not None and layers_writer != me) or not taken:
            torn = ("this process was forked (os.fork) while another thread of its parent was changing the model "
                    "(a model-level set_adapter, merge or load under way): its layers may serve different adapters "
                    "here; call lora.set_adapter(model, name) in this process first, or fork when no other thread "
                    "changes the model")
        self.__init__()
        self._torn, self._stuck, self._stuck_changing = torn, stuck, stuck_changing
        if blocks:
            self._blocks[me] = blocks
        if reads:
            self._reads[me] = reads
        if hook_reads:
            self._hook_reads[me] = hook_reads
        if holds:
            self._holds[me] = holds
        if readings:
            self._readings[me] = readings
        if writer == me:
            self._writer, self._write_depth = me, write_depth
        if changer == me:
            self._changer, self._change_depth = me, change_depth
        if layers_writer == me:
            self._layers_writer, self._layers_depth = me, layers_depth

    def __getstate__(self):
        return {}  # a deep-copied or unpickled model (its own layers) starts with a free lock

    def __setstate__(self, state):
        self.__init__()
        _lock_loaded_classes()  # (a model unpickled with its lock: its class's generate compiles, T2, and entries)

    def _in_forward(self, frame, outer: int = 0) -> bool:
        """Whether the stack holds a forward of a module with this lock (the model, or a shallow copy of it,
        which shares its layers and so its lock); with outer=1, one more than the innermost (a forward inside a
        forward)."""
        found = 0
        while frame is not None:
            code = frame.f_code
            # (a module's call, or one that takes its reads around it: a compiled call, an entry method; by identity,
            # not a dict lookup: a code object is hashed by its constants, and dynamo's hold dicts, unhashable)
            local = "self" if code.co_name == "_call_impl" or code is _ENTRY_CODE else \
                "module" if code is _COMPILED_CALL_CODE else None
            if local is not None:
                owner = getattr(frame.f_locals.get(local), "__dict__", {})
                if owner.get("_lora_ext_model_lock") is self \
                        or any(mark is self for mark in owner.get("_lora_ext_part_of", ())):  # (_parts)
                    found += 1
                    if found > outer:
                        return True
            frame = frame.f_back
        return False

    def _drop_left_reads(self) -> None:
        frames = sys._current_frames()
        for ident in list(self._reads):
            if self._holds.get(ident) or self._readings.get(ident):
                continue
            frame = frames.get(ident)
            if frame is None or not self._in_forward(frame):
                del self._reads[ident]
                self._hook_reads.pop(ident, None)  # (the calls their hooks left: none runs now)

    def _wait(self, timeout: float) -> None:
        """Waits on the condition (the mutex held) for a notify or `timeout`; then, every _POLL seconds whatever woke
        it (forwards notify as they end: under load a wait never times out), drops the waiters left behind, and while
        a writer waits the reads left behind. (Any waiter's look, not the writer's alone: readers queued behind the
        writer poll twice as often, took every look's turn, and a read left behind kept the writer out for good.)"""
        self._cond.wait(timeout=timeout)
        now = time.monotonic()
        if now >= self._look_at:
            self._look_at = now + _POLL
            if self._queue:
                self._drop_left_reads()
            self._drop_gone()

    def _drop_gone(self) -> None:
        """Drops the waiters whose threads are not waiting (not inside the function that waits): left by an
        exception that landed in the bookkeeping, between entering the thread and the try that takes it out. A
        waiter calls it every _POLL seconds (_wait; the mutex held): a left waiter, or a notify an exception cut
        short, delays the others by a poll at most."""
        frames = sys._current_frames()
        for waiting, code in ((self._waiting, _READ_CODE), (self._queue, _WRITE_CODE), (self._changers, _CHANGE_CODE),
                              (self._layers_queue, _LAYER_WRITES_CODE)):
            for ident in [i for i in list(waiting) if not _inside(frames.get(i), code)
                          and not (code is _READ_CODE and _inside(frames.get(i), _READING_CODE))]:
                _discard(waiting, ident)
        self._admit = min(self._admit, len(self._waiting))

    def refuse_forked(self, state: bool = False) -> None:
        """Refuses (RuntimeError) a read of a model this forked child holds part way through another thread's change
        (after_fork), until set_adapter puts it right (or for good). state=True: a read of the adapters' values
        (lora_state_dict), which another thread's open disable or batch block does not change: refused only where
        a change was half made."""
        if self._stuck is not None and (self._stuck_changing or not state):
            raise RuntimeError(self._stuck)
        if self._torn is not None and self._writer != threading.get_ident():
            raise RuntimeError(self._torn)

    def acquire_read(self, hold: bool = False, box: Optional[list] = None) -> None:
        """A read: a forward's (from its pre-hook) or, with hold=True, a hold()'s (counted in _holds too, and marked
        in `box`, a _box(), which give_back takes off by)."""
        self.refuse_forked()
        me = threading.get_ident()
        with self._mutex:
            if (me in self._reads and self._queue and not self._holds.get(me) and not self._readings.get(me)
                    and self._writer != me and not self._in_forward(sys._getframe(), outer=0 if hold else 1)):
                # not inside a forward or a hold of this thread: the read was left by a forward a KeyboardInterrupt
                # stopped (its hook never ran). This read is a new one, and queues (else the thread, forwarding in
                # a loop, would pass every waiting writer as a re-entrant read)
                del self._reads[me]
                self._hook_reads.pop(me, None)  # (its calls' frames: A2)
            if me not in self._reads and self._writer != me:
                # waiting writers go first, except for forwards while a hold() is open (they may be the hold's, run
                # on other threads: a streamer's worker; the writer waits for the hold anyway) and for the readers
                # that waited through a write (self._admit). A new hold queues too (holds on several threads in turn
                # would starve the writers), for up to HOLD_QUEUE_SECONDS while another hold is open: it may be one
                # that the open hold waits for (a hold on its worker thread), which must not wait for ever.
                # Past that time, a new forward or hold also passes while another thread that holds a forward's or
                # hold's read waits in a threading primitive (a join, a future, an event, a queue): it may wait for
                # this read (C1: a forward that runs the model on a worker thread and joins it deadlocked against
                # a switch queued meanwhile, which waited for the outer forward's read; R1: also where the outer
                # read itself had got ahead of the switch). Threads computing are never passed so: forwards in
                # turn on several threads, however long, do not keep the switch out.
                deadline = time.monotonic() + HOLD_QUEUE_SECONDS
                try:
                    self._waiting.append(me)
                    while self._queued_behind(me, hold, deadline):
                        self._wait(0.05 if self._holds or self._reads else _POLL)
                finally:
                    _discard(self._waiting, me)
                if self._admit:
                    self._admit -= 1
                    if not self._admit:
                        self._cond.notify_all()
            if hold:  # (the hold counted with the read: a writer's _drop_left_reads in between took a hold's read for
                box = self._box() if box is None else box  # one left behind, outside any forward, and dropped it)
                self._take(me, self._holds, box)
                self._hold_boxes[id(box)] = box  # (a landing before it: this hold is never older, as if new)
            else:
                self._reads[me] = self._reads.get(me, 0) + 1

    def _queued_behind(self, me: int, hold: bool, deadline: float) -> bool:
        """Whether a new read (a hold's with hold=True) waits on (acquire_read's rules; the mutex held)."""
        if self._writer is not None:
            return True
        if not self._queue or self._admit:
            return False
        past = time.monotonic() >= deadline
        if self._holds and (not hold or past or self._older_hold_open()):
            return False
        return not (past and self._reader_blocked(me))

    def _older_hold_open(self) -> bool:
        """Whether a hold taken before the first waiting writer queued is still open (the mutex held): the writer waits
        for that one anyway, so a new hold let in beside it costs the writer nothing unless it outlasts it. (G2: with a
        streaming request's hold open and a hot-swap queued behind it, each new hold on other threads, each short
        batch of theirs, waited HOLD_QUEUE_SECONDS: 99 batches where 1,422 ran without the swap.) Holds taken after the
        writer queued do not count: let in beside each other, holds overlapping in turn on several threads would keep
        the writer out for good."""
        mark = self._queued_at.get(self._queue[0])
        if mark is None:
            return False
        for key, box in list(self._hold_boxes.items()):
            if not box[0]:  # (ended: a landing in give_back kept it here)
                del self._hold_boxes[key]
            elif box[2] < mark:
                return True
        return False

    def _reader_blocked(self, me: int) -> bool:
        """Whether a thread other than `me` that holds a forward's or a hold's read (not only state reads) waits in
        a threading primitive (its innermost frame in threading.py, outside this lock's own waits). (The mutex
        held.)"""
        frames = sys._current_frames()
        for ident, n in self._reads.items():
            frame = frames.get(ident)
            if (ident != me and n > self._readings.get(ident, 0) and frame is not None
                    and frame.f_code.co_filename == threading.__file__
                    and not any(_inside(frame, code) for code in (_READ_CODE, _WRITE_CODE, _CHANGE_CODE,
                                                                   _READING_CODE, _LAYER_WRITES_CODE))):
                return True
        return False

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """A read of the adapters' state (lora_state_dict's): it waits for a write under way, and for a waiting
        writer unless a read other than these is held (a forward or a hold the writer waits for, which may wait for
        this read: queued behind the writer as a new hold is, a worker reading the state for such a forward
        deadlocked, r54, and r1 under FSDP2; reads of the state alone, on a few threads in a loop, kept a switch out
        for good, r3). A waiting writer never takes it for a read left behind (_drop_left_reads)."""
        me, landed, box = threading.get_ident(), None, self._box()
        try:
            # (the wait and the count in one hold of the mutex: counted after it was let go, a writer came in between,
            # and the state read ran inside its write: 3 of 60 FSDP2 snapshots mixed two adapters, hostile33)
            with self._mutex:
                if self._writer != me and me not in self._reads:
                    # (waits as a reader does: let in ahead of the next writer when a write it waited for ends,
                    # _admit; else a thread switching in a loop re-queued before it woke, and kept it out for good)
                    try:
                        self._waiting.append(me)
                        while self._writer is not None or (
                                self._queue and not self._admit
                                and all(n <= self._readings.get(t, 0) for t, n in self._reads.items())):
                            self._wait(_POLL)
                    finally:
                        _discard(self._waiting, me)
                    if self._admit:
                        self._admit -= 1
                        if not self._admit:
                            self._cond.notify_all()
                else:
                    while self._writer != me and self._writer is not None:
                        self._wait(_POLL)
                self._take(me, self._readings, box)
            yield
        finally:
            # (what it counted taken off: idempotent, so run again once when an exception lands in it, then raised; a
            # read left taken kept every writer waiting for good, r3)
            while True:
                try:
                    self.give_back(self._readings, box)
                    break
                except BaseException as err:
                    if landed is not None:
                        raise
                    landed = err
            if landed is not None:
                raise landed

    def holds_read(self) -> bool:
        return threading.get_ident() in self._reads

    def release_read(self) -> None:
        me = threading.get_ident()
        with self._mutex:
            # (one write of the count: popped first, a landing before the write back lost an open hold's read with
            # it, and a switch ran inside the hold, R2)
            n = self._reads.get(me, 0)
            if n > 1:
                self._reads[me] = n - 1
            else:
                self._reads.pop(me, None)
            self._cond.notify_all()

    @staticmethod
    def _box() -> list:
        """What a hold or state read counted, for give_back: [counted, thread, its place in the order taken]."""
        return [False, threading.get_ident(), None]

    def _take(self, me: int, kind: dict, box: list) -> None:
        """One more read, and one more of `kind` (_holds or _readings), for thread `me`, marked in `box`: one statement
        (an exception landing between statements would leave a count without the mark to take it off by, or a mark
        over no count). The mutex held."""
        self._reads[me], kind[me], box[:], self._taken = (self._reads.get(me, 0) + 1, kind.get(me, 0) + 1,
                                                          (True, me, self._taken), self._taken + 1)

    def give_back(self, kind: dict, box: list) -> None:
        """Takes off the read and the `kind` count that _take marked in `box`, once (run again, it takes nothing off):
        this one's, not the thread's counts put back as they were before it (A1: two holds of one thread that ended
        out of order, asyncio tasks' or streaming generators', gave the other's read back with the first, so a
        switch ran inside the open hold, then left it counted for good, and every switch after waited)."""
        with self._mutex:
            me = box[1]
            if box[0]:
                reads, n = self._reads.get(me, 0) - 1, kind.get(me, 0) - 1
                self._reads[me], kind[me], box[0] = reads, n, False  # (one statement, as _take's)
            for counts in (self._reads, kind):  # (zeros: none left, the thread holds none)
                if counts.get(me, 1) <= 0:
                    del counts[me]
            self._hold_boxes.pop(id(box), None)
            self._cond.notify_all()

    def _inside(self, me) -> bool:
        """Whether thread `me` (this one) is inside a forward or hold() of this model, which a change would wait for."""
        return me in self._reads and self._writer != me and bool(self._holds.get(me)
                                                                 or self._in_forward(sys._getframe()))

    def _refuse_from_inside(self, me) -> None:
        """A change from inside a forward or hold() of this model on this thread would wait for itself."""
        if self._inside(me):
            raise RuntimeError("a model-level adapter change from inside a forward of the same model (or a hold() or "
                               "lora.batch_adapters block of it, or of a model inside it given to lora_ext, which "
                               "another asyncio task or suspended generator on this thread may hold) would wait for "
                               "itself; make it outside")

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """One model-level change at a time, first come first served, from its first check to its last write
        (re-entrant per thread): a load plans its layers (which modules are new, which adapters they hold) and then
        writes them, and another change between the two (a load injecting the same module, a delete, a switch
        half way through a layer a hotswap reads) would make the plan wrong. Forwards are not held up: only the
        writes (write(), which takes this too) wait for them."""
        me, landed, depth = threading.get_ident(), None, None
        try:  # (opened before the mutex: an exception landing as its block ended, a signal handler's run as the
            # mutex was let go, left the change held for good, A1; depth None: nothing taken)
            with self._mutex:
                if self._changer == me:
                    depth = self._change_depth = self._change_depth + 1
                else:
                    self._refuse_from_inside(me)
                    try:
                        self._changers.append(me)
                        while self._changer is not None or self._changers[0] != me:
                            self._wait(_POLL)
                    finally:
                        _discard(self._changers, me)
                        self._cond.notify_all()
                    self._changer, self._change_depth, depth = me, 1, 1
            yield
        finally:
            # (an exception landing in the release, an asynchronous one, releases again and is raised after: a
            # change left held would keep every other thread's changes waiting for ever; the release is one
            # statement, done once whatever lands)
            while True:
                try:
                    with self._mutex:
                        if depth is not None and self._changer == me and self._change_depth == depth:
                            self._changer, self._change_depth = (None, 0) if depth == 1 else (me, depth - 1)
                        self._cond.notify_all()
                    break
                except BaseException as err:
                    if landed is not None:
                        raise
                    landed = err
            if landed is not None:
                raise landed

    @contextlib.contextmanager
    def write(self, reshaping: Optional[str] = None, model: Optional[nn.Module] = None) -> Iterator[None]:
        """The model-level change's writes: forwards wait for them, and they for forwards. `reshaping`: the name of a
        change that adds, replaces or removes modules or adapters (a load, unload, delete), which a child forked
        half way through it cannot put right (after_fork), and which is refused while an open mixed batch serves
        a module of `model` (given with it)."""
        with self.changing(), self._write():
            outer, change = self._reshaping, None
            try:
                if reshaping is not None and outer is None:
                    if model is not None:  # (refused while an open batch serves a module of it)
                        change = batched.begin_reshaping(model, self, reshaping)
                    self._reshaping = reshaping
                with self._layer_writes():
                    yield
                if reshaping is not None and outer is None and model is not None:
                    # (modules added, replaced or taken out: the parts are found again, _parts)
                    unwrap(model).__dict__.pop("_lora_ext_parts_locked", None)
                    model_lock(model)
            finally:
                self._reshaping = outer
                if change is not None:
                    batched.end_reshaping(change)

    def _layer_locks(self) -> List["ModelLock"]:
        """This lock and those of the models inside its model that have their own (given to lora_ext themselves), in
        the one order every thread takes them in (_layer_writes). Found at each change, by a walk of the model (about
        270 us for a 32-layer Llama, 3% of a switch on a CPU), unless this lock is the only one alive. (Kept between
        changes until a module was registered, the list missed a model put inside by `Sequential.insert`,
        `ModuleList.insert` or `_modules[name] = ...`, which register none: L3, 10 to 27 of 300 mixed.)"""
        root = _owner(self)
        if root is None or forks.model_lock_count() <= 1:
            return [self]
        # and those of the models holding it (its marks): a first switch through the inner model, whose lock was made
        # while a switch through the outer one wrote (after it had listed the locks inside), interleaved with it (J1:
        # 11 to 25 of 200 left the inner layers on two adapters)
        locks = [self, *(m for m in (root.__dict__.get("_lora_ext_part_of", ()) if root is not None else ())
                         if m is not self)]
        for m in root.modules() if root is not None else ():
            lock = m.__dict__.get("_lora_ext_model_lock")
            if lock is not None and all(lock is not each for each in locks):
                locks.append(lock)
        locks.sort(key=lambda lock: lock._serial)
        return locks

    @contextlib.contextmanager
    def _layer_writes(self) -> Iterator[None]:
        """The layer writes of a change (inside its write): of this lock's model, and of each model inside it given to
        lora_ext itself, one change at a time. A change through the outer model and one through the inner, each under
        its own lock, interleaved their writes of the inner model's layers, which then held two adapters after both
        had ended (E2: 57 mixed results of 788; under a hold of the inner, 872 of 1,115 looks). Taken once the
        change's own write is (its forwards ended), and held only while the change writes, which waits for no
        forward or hold meanwhile: a change waiting here waits for writes under way only. (Taking the inner models'
        whole writes instead, which wait for their forwards and holds, deadlocked three ways, F3, and retried,
        starved, G7.)"""
        me, landed = threading.get_ident(), None
        entries = [[lock, False] for lock in self._layer_locks()]  # [lock, taken by this call]
        try:
            for entry in entries:
                lock = entry[0]
                with lock._mutex:
                    if lock._layers_writer != me:
                        # (first come first served: a thread switching the outer model in a loop took the inner
                        # model's writes back before a switch through the inner woke, 10,069 times to 1 in 8 s)
                        try:
                            lock._layers_queue.append(me)
                            while lock._layers_writer is not None or lock._layers_queue[0] != me:
                                lock._wait(_POLL)
                        finally:
                            _discard(lock._layers_queue, me)
                            lock._cond.notify_all()
                    # (taken and marked in one statement: an exception landing between the two would leave it held)
                    lock._layers_writer, lock._layers_depth, entry[1] = me, lock._layers_depth + 1, True
            yield
        finally:
            while True:  # (as changing's release: each given back once, whatever lands)
                try:
                    for entry in reversed(entries):
                        lock = entry[0]
                        with lock._mutex:
                            if entry[1]:
                                depth = lock._layers_depth - 1
                                lock._layers_writer, lock._layers_depth, entry[1] = (me if depth else None), depth, \
                                    False
                            lock._cond.notify_all()
                    break
                except BaseException as err:
                    if landed is not None:
                        raise
                    landed = err
            if landed is not None:
                raise landed

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        me, landed, depth = threading.get_ident(), None, None
        try:  # (opened before the mutex, as changing()'s)
            with self._mutex:
                if self._writer == me:
                    depth = self._write_depth = self._write_depth + 1
                else:
                    if me in self._reads:
                        self._refuse_from_inside(me)
                        del self._reads[me]  # left by a forward of this thread that was interrupted
                        self._hook_reads.pop(me, None)
                    try:
                        self._queued_at[me] = self._taken
                        self._queue.append(me)
                        while self._writer is not None or self._reads or self._admit or self._queue[0] != me:
                            self._wait(_POLL)
                            # (readers let in that stopped waiting meanwhile: a reader leaves the wait and takes its
                            # admission in one step under the condition's lock, so this never skips one)
                            self._admit = min(self._admit, len(self._waiting))
                    finally:
                        _discard(self._queue, me)
                        self._queued_at.pop(me, None)
                        self._cond.notify_all()
                    self.writes += 1  # (before the writer is set: a write begun, for the optimistic state reads)
                    self._writer, self._write_depth, depth = me, 1, 1
            yield
        finally:
            while True:  # (as changing's release)
                try:
                    with self._mutex:
                        if depth is not None and self._writer == me and self._write_depth == depth:
                            if depth == 1:
                                self._admit = len(self._waiting)  # they go before the next writer
                            self._writer, self._write_depth = (None, 0) if depth == 1 else (me, depth - 1)
                        self._cond.notify_all()
                    break
                except BaseException as err:
                    if landed is not None:
                        raise
                    landed = err
            if landed is not None:
                raise landed


_POLL = 0.1  # seconds between a waiter's looks for waiters left behind (ModelLock._drop_gone)
# guards the layers' and saved modules' counts of open disable_adapter blocks (`_adapter_off`) and their first block's
# state (`_pre_disable`): blocks of two models sharing a layer take only their own model's lock, and the count's read
# and write lost updates (r41: two threads x 3000 blocks left a layer counting 3 blocks, or -4, after all had ended: the
# base served for good, or the adapter inside blocks). Reentrant: the cyclic garbage collector, running inside it (the
# entry's unmerges and the end's merges allocate), may close a generator suspended in another block, whose end then
# runs on this thread (r43: a plain lock hung there)
_DISABLE_COUNTS = threading.RLock()
# the layers and saved modules counting open blocks; each counts its blocks by the thread that opened them too
# (`_disable_openers`), so a process forked while other threads were inside blocks takes theirs away (_after_fork)
_IN_BLOCKS = weakref.WeakSet()


def _count_block(m: nn.Module, opener: int, delta: int) -> bool:
    """Module m's count of open disable_adapter blocks, and of those `opener` opened, by delta (+1 or -1), under
    _DISABLE_COUNTS; at 0 the class defaults again (a forward compiled before guards on them). False (nothing
    counted) for the end of a block that a fork took away (_after_fork: a generator's block, opened on another thread
    of the parent, closed in the child; its count went below 0, the layer disabled for good, r44)."""
    openers = m.__dict__.setdefault("_disable_openers", {})
    if delta < 0 and openers.get(opener, 0) + delta < 0:
        if not openers:
            m.__dict__.pop("_disable_openers", None)
        return False
    openers[opener] = openers.get(opener, 0) + delta
    if not openers[opener]:
        del openers[opener]
    m._adapter_off += delta
    if m._adapter_off:
        m.__dict__["_adapter_disabled"] = True
        _IN_BLOCKS.add(m)
    else:
        for key in ("_adapter_off", "_adapter_disabled", "_disable_openers"):
            m.__dict__.pop(key, None)
        _IN_BLOCKS.discard(m)
    return True


def _after_fork() -> None:
    """In a child forked while other threads were inside disable_adapter blocks (forks.py): those blocks never end
    here, so each module's count loses them. A layer they alone disabled serves its adapter again, unmerged (its
    `merged` says so; eval() merges it). The models the blocks were opened on refuse to serve (ModelLock.after_fork);
    another model sharing the layer served the base for good, silently."""
    global _DISABLE_COUNTS, _MAKING, _COMPILED_LOCK
    _DISABLE_COUNTS = threading.RLock()  # (a thread of the parent may have held it: r42, 2 children of 2 hung)
    _MAKING = threading.RLock()  # (held by a thread of the parent making or hooking a lock: S1, 3 children of 3 hung)
    _COMPILED_LOCK = threading.RLock()  # (_note_compiled_wrapper's, as briefly)
    # the block ends the parent's worker had not begun: this process's worker runs them (L3: a child forked while one
    # waited served the base for good)
    _ENDS_PENDING[:] = [entry for entry in _ENDS_PENDING if not entry[3]]  # (run by _restart_ends)
    me = threading.get_ident()
    for m in list(_IN_BLOCKS):
        for thread, n in list(m.__dict__.get("_disable_openers", {}).items()):
            if thread != me:
                _count_block(m, thread, -n)
        if not m._adapter_off:
            m.__dict__.pop("_pre_disable", None)
_READ_CODE = ModelLock.acquire_read.__code__
_READING_CODE = ModelLock.reading.__wrapped__.__code__
_WRITE_CODE = ModelLock._write.__wrapped__.__code__
_CHANGE_CODE = ModelLock.changing.__wrapped__.__code__
_LAYER_WRITES_CODE = ModelLock._layer_writes.__wrapped__.__code__
_WAITING_CODES = (_READ_CODE, _READING_CODE, _WRITE_CODE, _CHANGE_CODE, _LAYER_WRITES_CODE)


def _inside(frame, code) -> bool:
    """Whether the stack from `frame` runs `code`."""
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _discard(waiting, ident) -> None:
    """Takes thread `ident` out of `waiting` (a waiter takes itself out in its finally; one left behind is dropped)."""
    try:
        waiting.remove(ident)
    except ValueError:
        pass


@contextlib.contextmanager
def hold(model: nn.Module) -> Iterator[None]:
    """Holds the model's current adapter for a block of forwards (a whole `generate()`, say): model-level
    changes on other threads wait until the block ends. Changes from this thread inside it are refused. A part of a
    model (_parts: `model.language_model`) holds the model it is a part of too (Z1: a switch through the model
    landed inside a hold of the part, which kept the part's own lock only)."""
    lock = model_lock(model)
    locks = [m for m in unwrap(model).__dict__.get("_lora_ext_part_of", ()) if m is not lock] + [lock]
    with contextlib.ExitStack() as stack:  # (the models' first, as their forwards take them)
        for each in locks:
            stack.enter_context(_hold(each))
        yield


@contextlib.contextmanager
def _hold(lock: ModelLock) -> Iterator[None]:
    landed = None
    box = lock._box()
    try:
        lock.acquire_read(hold=True, box=box)  # (counts the hold too)
        yield
    finally:
        # (what it counted taken off, in one hold of the mutex, run again once when an exception lands in it, as
        # reading()'s: a landing left the hold counted for good and every switch waited, R2)
        while True:
            try:
                lock.give_back(lock._holds, box)
                break
            except BaseException as err:
                if landed is not None:
                    raise
                landed = err
        if landed is not None:
            raise landed


_CALL_INNER = next(c for c in nn.Module._call_impl.__code__.co_consts
                   if isinstance(c, types.CodeType) and c.co_name == "inner")


def _module_call():
    """The module call whose hook calls this: torch's _call_impl frame (its `inner` runs the pre-hooks and the forward
    hooks, _call_impl itself the always-called ones after an exception). The frame object, not its id: an entry left
    by a call whose hooks an exception cut short keeps its frame alive, so no later call's frame takes its address
    (by id, a later call at the same depth matched it and gave back a read it never took: a hold's, A1's sweep)."""
    frame = sys._getframe(2)
    return frame.f_back if frame.f_code is _CALL_INNER else frame


def _read_before(module, args):
    if not ops.compiling():
        # (a shallow copy's: see model_lock)
        _take_hook_read(module.__dict__.get("_lora_ext_model_lock") or model_lock(module), _module_call())


def _part_read_before(module, args):
    """The pre-hook of a part of models (_parts): the reads of their locks, the outermost model's first."""
    locks = module.__dict__.get("_lora_ext_part_of")
    if locks and not ops.compiling():
        call = _module_call()
        for lock in locks:
            _take_hook_read(lock, call)


def _take_hook_read(lock, call):
    me = threading.get_ident()
    calls = lock._hook_reads.get(me)
    if calls is None or me not in lock._reads:  # (none held: what the list holds was left by a forward a
        calls = lock._hook_reads[me] = []      # KeyboardInterrupt stopped, which skips the hooks)
    elif calls and not _running(calls[-1]):
        # (each entry was running when the next was added, so all run while the innermost does: the common case, a
        # call inside the model's forward, a part's, walks the stack up to it only; a whole walk per nested call was
        # most of a part hook's cost, 30 us under a deep stack)
        _drop_ended(lock, calls)
    lock.acquire_read()
    calls.append(call)


_READ_BEFORE_CODE = _take_hook_read.__code__


def _running(call) -> bool:
    """Whether the frame `call` is on this thread's stack."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame is call:
            return True
        frame = frame.f_back
    return False


def _drop_ended(lock, calls) -> None:
    """Drops the entries of calls no longer on this thread's stack, each with its read: left by forwards a
    KeyboardInterrupt stopped (torch runs the always-called hooks on an Exception only), whose frames, kept by the
    entries, held their callers' frames and tensors alive (R3: 200 MB after 50 such forwards, until a switch)."""
    on_stack, frame = set(), sys._getframe(1)
    while frame is not None:
        on_stack.add(id(frame))
        frame = frame.f_back
    ended = [c for c in calls if id(c) not in on_stack]
    if ended:
        calls[:] = [c for c in calls if id(c) in on_stack]
        for _ in ended:
            if lock.holds_read():
                lock.release_read()


def _read_after(module, args, output):
    # only the read this call's pre-hook took: not one whose pre-hook never ran, because the hooks were added while
    # it ran, or because a pre-hook ahead of lora's raised (C1: it gave back the read of a hold() or of the forward
    # around it, and a switch then ran inside the hold, serving another adapter to its next forward, 0.82 off)
    if not ops.compiling():
        _give_hook_read(module.__dict__.get("_lora_ext_model_lock") or model_lock(module), _module_call())


def _part_read_after(module, args, output):
    locks = module.__dict__.get("_lora_ext_part_of")
    if locks and not ops.compiling():
        call = _module_call()
        for lock in reversed(locks):
            _give_hook_read(lock, call)


def _give_hook_read(lock, call):
    me = threading.get_ident()
    calls = lock._hook_reads.get(me) or ()
    at = next((i for i in range(len(calls) - 1, -1, -1) if calls[i] is call), None)
    if at is not None:
        # (the entries after this call's: calls inside it whose hooks an exception cut short, each with its read)
        n = len(calls) - at
        del calls[at:]
        if not calls:
            lock._hook_reads.pop(me, None)
        for _ in range(n):
            if lock.holds_read():
                lock.release_read()


@torch.compiler.disable  # (called inside a compiled forward, lora.hold(model) say: run eagerly, S2; traced, dynamo
# failed on its reads of the wrappers' __dict__ with an internal error)
def model_lock(model: nn.Module) -> ModelLock:
    """The model's lock, created (with its forward hooks, module-level functions: the model still pickles)
    on first use. One lock for a model and its DistributedDataParallel and torch.compile wrappers (the model's own,
    the one inside them): changes through a wrapper and through the model are ordered, and a wrapper given to a
    lora_ext function gets the hooks too, so its forwards take the lock (a compiled wrapper's hooks run eagerly,
    around the compiled forward). So does every torch.compile wrapper of the model made since lora_ext was imported,
    given to lora_ext or not (_compiled_wrappers)."""
    return _chain_lock(list(_wrapped(model)))


def _chain_lock(chain) -> ModelLock:
    """model_lock of `chain`: a model and the models inside it, outermost first (_wrapped)."""
    compiled = _compiled_wrappers(chain)
    lock = chain[-1].__dict__.get("_lora_ext_model_lock")
    parts = chain[-1].__dict__.get("_lora_ext_parts_locked")  # (_parts, as last found)
    if lock is not None and parts is not None and all(m.__dict__.get("_lora_ext_model_lock") is lock for m in chain) \
            and all(w.__dict__.get("_lora_ext_model_lock") is lock for w in compiled) \
            and not any(_compiled_in_place(m) for m in chain) \
            and not any(_compiled_in_place(m) for m in parts if m.__dict__.get("_lora_ext_part_of")):
        if lock._root is None or lock._root() is None:  # (unpickled, or its model gone: see _marked)
            lock._root = weakref.ref(chain[-1])
        return lock
    # Made once, under a process-wide lock: two threads making a model's first calls (a state read and a switch) each
    # made a lock of their own, and the read ran under one while the switch wrote under the other (hostile33: 3 of 60
    # FSDP2 snapshots mixed two adapters, under load)
    with _MAKING:
        # (a shallow copy of the model made before its lock, copy.copy, shares its hooks but not its __dict__: it
        # takes the lock of the hooks it shares, R2: it made a lock of its own, and a switch through the model
        # during a forward through the copy mixed two adapters, 10 of 10)
        lock = chain[-1].__dict__.get("_lora_ext_model_lock") or _lock_of_hooks(chain[-1])
        made = lock is None
        if made:
            lock = ModelLock()
        # (no read of the lock until the forwards running are counted, below)
        lock._mutex.acquire()
        try:
            gained = False  # a wrapper hooked now (a torch.compile wrapper's first lora_ext call)
            # the model inside first: it holds the lock the wrappers share (its compiled wrappers last)
            for m in [*reversed(chain), *compiled]:
                hooked = m.__dict__.get("_lora_ext_model_lock") is not None or _lock_of_hooks(m) is not None
                gained |= not hooked
                in_place = _compiled_in_place(m)
                if in_place is not None:  # (model.compile(): its hooks run inside the compiled call)
                    m.__dict__["_compiled_call_impl"] = _LockedCall(m, in_place)
                    gained = True
                m.__dict__["_lora_ext_model_lock"] = lock  # (before the hooks, which read it)
                _lock_class(type(m))
                # (not nn.DataParallel's: its forward runs the replicas on worker threads, which take their reads
                # through the inner model's hooks they copy; a read held around them made a switch queued meanwhile
                # deadlock, r7)
                if not hooked and not isinstance(m, nn.DataParallel):
                    m.register_forward_pre_hook(_read_before)
                    m.register_forward_hook(_read_after, always_call=True)
                    hooks = m._forward_pre_hooks
                    if len(_HOOKS_LOCK) >= _HOOKS_PRUNE[0]:
                        for key in [k for k, (h, _) in _HOOKS_LOCK.items() if h() is None]:
                            del _HOOKS_LOCK[key]
                        _HOOKS_PRUNE[0] = max(256, 2 * len(_HOOKS_LOCK))
                    _HOOKS_LOCK[id(hooks)] = (weakref.ref(hooks), lock)
            if lock._root is None or lock._root() is None:  # (not a shallow copy's, which shares the lock: B3)
                lock._root = weakref.ref(chain[-1])
            parts = _parts(chain[-1])
            # (the modules inside with locks of their own, given to lora_ext: their forwards, called directly, take
            # this model's read before their own, as this model's forward does, else two threads could wait for each
            # other, B3: a wrapper inside a wrapper, forwarded directly, took its lock, then the outer one's in a part)
            parts += [m for m in chain[-1].modules() if m is not chain[-1] and "_lora_ext_model_lock" in m.__dict__
                      and m.__dict__["_lora_ext_model_lock"] is not lock and all(m is not p for p in parts)]
            # and this model takes the reads of the models outside it that its parts take (given to lora_ext before
            # it): before its own, for the same reason
            outer = [mark for p in parts for mark in p.__dict__.get("_lora_ext_part_of", ()) if _holds(mark, chain[-1])]
            # and of the models given to lora_ext before it that hold it, parts or not (F3: given after the model
            # holding it, a model without parts took its own read only: a switch through the outer model wrote its
            # layers inside its holds, its forwards, its open batches)
            outer += [mark for mark in forks.model_locks() if mark is not lock and _holds(mark, chain[-1])
                      and all(mark is not each for each in outer)]
            if outer:
                parts.append(chain[-1])
            for m in parts:
                marks = m.__dict__.get("_lora_ext_part_of", ())
                if m is chain[-1]:
                    new = marks
                    for mark in outer:
                        if all(mark is not each for each in new):
                            new = _marked(m, new, mark, mark._root())
                elif all(mark is not lock for mark in marks) and m.__dict__.get("_lora_ext_model_lock") is not lock:
                    new = _marked(m, marks, lock, chain[-1])
                else:
                    new = marks
                if new is not marks:
                    _mark_part(m, new)
                    gained = True
                # (its torch.compile wrappers, which run its hooks inside the compiled code, where they do nothing:
                # `model.encoder = torch.compile(model.encoder)`, which generate() runs; D2: torn 3 of 3)
                for w in _compiled_wrappers([m]) if new else ():
                    if w.__dict__.get("_lora_ext_part_of") is not new:
                        _mark_part(w, new)
                        gained = True
                in_place = _compiled_in_place(m)
                if in_place is not None and any(mark is lock for mark in m.__dict__.get("_lora_ext_part_of", ())):
                    m.__dict__["_compiled_call_impl"] = _LockedCall(m, in_place, part=True)
            # (pickled with it: one loaded from before, without it, has its parts found at its next lora_ext call; so
            # does one a load or inject changed, write())
            chain[-1].__dict__["_lora_ext_parts_locked"] = tuple(m for m in parts if m is not chain[-1])
            if made or gained:
                # forwards already running (a model built by hand, its first model-level call; a wrapper's, whose
                # compiled forward runs no lora_ext code, at the wrapper's first call) took no read: each counts as
                # one, dropped once it ends (ModelLock._drop_left_reads), so the change that made the lock waits for
                # them (C1: a first set_adapter during a forward served a mix of two adapters, 29 of 30; G6: a first
                # hotswap through a compiled wrapper tore a forward already running through it, 4 of 10 trials).
                # A thread holding a read already (through the hooks of the model inside) keeps its count, and one
                # taking a read (in a read hook, or waiting for one: inside a forward too) takes its own: counted here,
                # a read it waits for behind a writer kept that writer waiting for it, for good (S1: 3 of 3 runs hung)
                me = threading.get_ident()
                for ident, frame in sys._current_frames().items():
                    if ident != me and ident not in lock._reads and ident not in lock._waiting \
                            and not _inside(frame, _READ_CODE) and not _inside(frame, _READ_BEFORE_CODE) \
                            and lock._in_forward(frame):
                        lock._reads[ident] = 1
        finally:
            lock._mutex.release()
    return lock


def _mark_part(m: nn.Module, marks: tuple) -> None:
    """Makes `m` a part of the models whose locks are `marks` (_marked's order): its forwards take their reads."""
    m.__dict__["_lora_ext_part_of"] = marks
    _lock_class(type(m))
    if not any(h is _part_read_before for h in m._forward_pre_hooks.values()):
        # (first: the models' reads before the part's own lock's, if it has one, as the models' forwards take them;
        # taken in the other order, two threads could wait for each other)
        m.register_forward_pre_hook(_part_read_before, prepend=True)
        m.register_forward_hook(_part_read_after, always_call=True)


def _parts(model: nn.Module) -> List[nn.Module]:
    """The modules inside `model` that transformers' generate() may run outside the model's forward, with modules inside
    them: the children of each transformers model that generates (GenerationMixin: the model, or one inside it), those
    inside it, and their encoders (get_encoder()).
    generate() runs an encoder-decoder's encoder pass itself (T5, BART, Whisper, FSMT), a part's whole generate()
    (BLIP-2's language model, CSM's depth decoder, Bark, the Omni models) and modules of the model directly (Kosmos-2's
    image_to_text_projection, CLVP's conditioning encoder): their forwards took no read of the model's lock, and a
    switch meanwhile tore them (X2, Y1, 3 of 3: one adapter in a layer's q_proj, another in its v_proj). model_lock
    gives each of them hooks that take the model's read (_part_read_before: re-entrant inside the model's forward),
    so a switch lands between two such passes, never inside one. A part keeps its own lock, if it has or gets one
    (lora_ext given the part: a switch through it does not wait for the whole model's forwards, as before).
    Models inside the model whose classes have entry methods (_entry_method: a CLIP inside a wrapper), and modules
    with them that hold an adapter, are parts too: users call those methods, which take the reads of a part's marks
    (_locking_entry)."""
    mixin = getattr(sys.modules.get("transformers.generation.utils"), "GenerationMixin", None)
    pretrained = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    found = {}
    for name, g in model.named_modules():
        if g is not model and g._modules and _has_entry(type(g)) and not isinstance(g, (LoRALayer, ModulesToSave)) \
                and ((isinstance(pretrained, type) and isinstance(g, pretrained))
                     or any(isinstance(m, LoRALayer) for m in g.modules())):
            # (a model with entry methods, which users call, or a module with them that holds an adapter: a CLIP
            # inside a wrapper, `wrapper.clip.get_text_features` took no read, C2; its entries take the reads of its
            # marks, and so does its forward. Not a codec's quantizers without adapters: E2, 35 parts in Mimi, whose
            # hooks cost 8% of its forward)
            found.setdefault(id(g), g)
        if not isinstance(mixin, type) or not isinstance(g, mixin):
            continue  # (a model that does not generate runs no part outside its forward)
        here = [m for m in g.children() if not isinstance(m, (nn.ModuleList, nn.ModuleDict))]
        if g is not model:
            here.append(g)
        get_encoder = getattr(g, "get_encoder", None)
        if callable(get_encoder):
            try:
                encoder = get_encoder()
            except Exception:  # (a model whose get_encoder does not apply to it)
                encoder = None
            if isinstance(encoder, nn.Module) and encoder is not g:
                here.append(encoder)
        for m in here:
            # (not a module without children, nor a layer or module saved whole: no adapter inside it, and an
            # inject replaces it; a layer's forward takes its own lock, and a saved module's serves one copy. Those
            # without an adapter yet are taken too: one injected into a part later, lora.inject(model.encoder, ...),
            # is not seen by the model, A2)
            if m is not model and m._modules and not isinstance(m, (LoRALayer, ModulesToSave)):
                found.setdefault(id(m), m)
    return list(found.values())


def _owner(mark) -> Optional[nn.Module]:
    """The model whose lock is `mark` (its `_root`), or None: not known (unpickled, not yet used) or gone."""
    return mark._root() if mark._root is not None else None


def _holds(mark, model) -> bool:
    """Whether the model whose lock is `mark` holds `model` (and is not it)."""
    owner = _owner(mark)
    return owner is not None and owner is not model and any(m is model for m in owner.modules())


def _marked(part, marks, lock, root) -> tuple:
    """The locks `part` takes the reads of (its `_lora_ext_part_of`) once it is a part of `root`, whose lock is `lock`:
    those of the models that still hold it, `lock` among them, the outermost model's first (each model's forward
    takes them in that order). A part of a model and of a wrapper holding it takes both (A2: it kept the first lock it
    was given, and a switch through the other tore its passes); one moved or deep-copied from a model given to
    lora_ext into this one drops that model's (Z1: this model's switches tore its passes), and so does one shared
    with a model that neither holds this one nor is held by it (taken in both models' orders, two threads could wait
    for each other: that model's switches do not wait for its passes, README). A lock whose model is not known
    (unpickled, not yet used) is kept."""
    inside = {id(m) for m in root.modules()}
    kept = []
    for mark in marks:
        owner = _owner(mark)
        if mark._root is None or (owner is not root and _holds(mark, part)
                                  and (id(owner) in inside or _holds(mark, root))):
            kept.append((mark, owner))
    at = len(kept)
    for i, (mark, owner) in enumerate(kept):
        if owner is not None and id(owner) in inside:
            at = i  # (root holds that mark's model: its lock goes first)
            break
    kept.insert(at, (lock, root))
    return tuple(mark for mark, _ in kept)


_MAKING = threading.RLock()  # model_lock's, while it makes a model's lock or hooks a wrapper (re-entrant: see
# _COMPILED_LOCK)

# The torch.compile wrappers of each module (weak references), noted as they are made. A compiled wrapper's forward
# runs the model's forward hooks inside the compiled code, where lora_ext's lock hooks do nothing (they cannot wait
# in a graph): a wrapper no lora_ext function was given took no read, and a switch through the model tore its
# forwards (G6: 1,675 of 4,213 while hotswapping). model_lock hooks every wrapper noted here, whose own hooks run
# eagerly around the compiled forward.
_COMPILED = weakref.WeakKeyDictionary()
# (re-entrant: a garbage collection starting under it, at any allocation, may end a lora_ext block of an abandoned
# generator, whose end takes a model's lock, which reads _COMPILED: with a plain Lock that thread hung, and every
# model-level call and torch.compile after it, S2)
_COMPILED_LOCK = threading.RLock()


def _note_compiled_wrapper(parent, name, module):
    """A global module-registration hook (every submodule assignment calls it): notes `parent` when it is a
    torch.compile wrapper registering the module it compiles (OptimizedModule's `_orig_mod`), or a
    DistributedDataParallel registering its module (so that torch.compile(DDP(model)) is found from the model). A
    wrapper of a model that has a lock already is hooked at once (model_lock): a switch waiting for the lock when
    the wrapper was made would not look for it again (S2: it tore the wrapper's first forward). Returns None (the
    module is registered as it is)."""
    if module is None or (name != "_orig_mod" and name != "module"):
        return None
    if name == "module":
        if not isinstance(parent, DistributedDataParallel):
            return None
    else:
        frames = sys.modules.get("torch._dynamo.eval_frame")
        wrapper = getattr(frames, "OptimizedModule", None)
        if wrapper is None or not isinstance(parent, wrapper):
            return None
    try:
        with _COMPILED_LOCK:
            refs = [r for r in _COMPILED.get(module, ()) if r() is not None]
            refs.append(weakref.ref(parent))
            _COMPILED[module] = refs
    except TypeError:  # (a module that cannot be referenced weakly, or hashed: not noted)
        return None
    if name == "_orig_mod":
        inside = list(_wrapped(module))
        marks = inside[-1].__dict__.get("_lora_ext_part_of")
        if marks:  # (a wrapper of a part: it takes the part's reads, D2; before its own lock's, if it has one)
            with _MAKING:
                _mark_part(parent, marks)
        if inside[-1].__dict__.get("_lora_ext_model_lock") is not None:
            try:  # (the wrapper does not hold `module` yet: torch registers it after this hook)
                _chain_lock([parent, *inside])
            except Exception:  # (hooked at the next lora_ext call instead: the compile goes on)
                pass
    return None


nn.modules.module.register_module_module_registration_hook(_note_compiled_wrapper)


def _compiled_in_place(module):
    """The compiled call of a module compiled in place (`module.compile()`, torch's `_compiled_call_impl`) that takes
    no lock yet, else None."""
    call = module.__dict__.get("_compiled_call_impl")
    return None if call is None or isinstance(call, _LockedCall) else call


class _LockedCall:
    """A module compiled in place (`model.compile()`) runs its hooks, lora_ext's lock hooks among them, inside the
    compiled call, where they do nothing: the forward took no read, and a switch tore it (as through a torch.compile
    wrapper no lora_ext function was given). model_lock puts this around the compiled call: the read is taken
    eagerly, around it (_locked_compiled_call). Pickles and deep copies drop it with the compiled call (torch's
    Module.__getstate__)."""
    __slots__ = ("module", "call", "part")

    def __init__(self, module, call, part: bool = False):
        self.module, self.call, self.part = module, call, part  # part: the locks of the models it is a part of

    def __call__(self, *args, **kwargs):
        return _locked_compiled_call(self.module, self.call, args, kwargs, self.part)


def _locked_compiled_call(module, call, args, kwargs, part=False):
    if ops.compiling():  # (traced inside an outer compiled region: no lock there)
        return call(*args, **kwargs)
    if not part:
        locks = (module.__dict__.get("_lora_ext_model_lock") or model_lock(module),)
    else:  # (the locks of the models it is a part of)
        locks = module.__dict__.get("_lora_ext_part_of", ())
    return _under_reads(locks, call, args, kwargs)


def _under_reads(locks, call, args, kwargs):
    """call(*args, **kwargs) under a read of each lock in `locks`, taken in their order (outermost model first): a
    call that runs a module's modules outside their hooks (a compiled call, an entry method). Its caller's frame counts
    as a forward of the module's locks (_COMPILED_CALL_CODE, _ENTRY_CODE: ModelLock._in_forward): a read it holds is
    not one left behind, and a change from inside it is refused."""
    taken = 0
    try:
        for lock in locks:
            lock.acquire_read()
            taken += 1
        return call(*args, **kwargs)
    finally:
        for lock in reversed(locks[:taken]):
            lock.release_read()


# transformers' methods that compile the model's __call__ for generate()'s decode steps, and the attribute of the model
# that each keeps the compiled call in (VibeVoice compiles its classifier-free guidance's negative branch apart)
_GENERATE_COMPILES = {"get_compiled_call": "_compiled_call", "_get_negative_compiled_call": "_negative_compiled_call"}


def _lock_class(cls) -> None:
    """Wraps, once, the methods of each class of `cls`'s MRO through which a model runs its modules where their forward
    hooks take no read of its lock: a class, not the model's __dict__ (a wrapper there would be shared by a copy.copy
    of the model, whose calls would then run the original's). Models of the class without a lock run them as before.

    - transformers' generate() compiles the model's `__call__` itself for its decode steps (with a static cache:
      `get_compiled_call`, on a GPU by default, _GENERATE_COMPILES): a function, not a module, so nothing notes it,
      and the model's forward hooks, lora_ext's lock hooks among them, run inside the compiled code, where they do
      nothing: the decode steps took no read, and a switch meanwhile wrote in the middle of them (S2: one read for six
      tokens, the prefill's). For a model that has a lock, or holds models that have one, the compiled call comes back
      under their _LockedCalls (the reads taken eagerly, around each decode step), as for a model compiled in place.
    - The entry methods (_entry_method: `get_text_features`, a codec's `decode`) run the model's modules from outside
      its forward, called by users (CLIP's text embeddings) or by generate() (CSM's, MusicGen's and Bark's codec
      decode): the modules they run took no read, or one per part, and a switch from another thread tore them (CLIP's
      get_text_features: q_proj of one adapter, v_proj of the other, 1 of 1; Z1: CSM's codec decode, 3 of 3). For a
      model that has a lock, or a part of models that have one (_parts), each call takes their reads around it (the
      outermost model's first, its own last), as its forward does."""
    if cls in _CLASSES_LOCKED:
        return
    with _MAKING:
        for klass in cls.__mro__:  # (each class once: a class's own methods only are wrapped)
            if klass in _CLASSES_LOCKED:
                continue
            for name, attr in _GENERATE_COMPILES.items():
                original = klass.__dict__.get(name)
                if isinstance(original, types.FunctionType) and not getattr(original, "_lora_ext_locks", False):
                    setattr(klass, name, _locking_compiled_call(original, attr))
            if not _own_class(klass):
                continue
            # (a mixin's too, not a module class itself: C2, `class VAE(EncodeMixin, nn.Module)`)
            for name, original in list(klass.__dict__.items()):
                if _entry_method(name, original):
                    setattr(klass, name, _locking_entry(original))
            _CLASSES_LOCKED.add(klass)
        _CLASSES_LOCKED.add(cls)


_CLASSES_LOCKED = set()  # the classes _lock_class went through (with those of their MROs)


def _own_class(klass) -> bool:
    """Whether `klass` may hold entry methods: not torch's classes (nn.Module, nn.Sequential), nor Python's."""
    module = getattr(klass, "__module__", None) or ""
    return klass is not object and module != "builtins" and module != "torch" and not module.startswith("torch.")


def _has_entry(cls) -> bool:
    """Whether a class of `cls`'s MRO defines an entry method (_entry_method), cached per class."""
    found = _HAS_ENTRY.get(cls)
    if found is None:
        found = any(_own_class(k) and any(_entry_method(n, f) or getattr(f, "_lora_ext_entry", False)
                                          for n, f in list(k.__dict__.items())) for k in cls.__mro__)
        try:
            _HAS_ENTRY[cls] = found
        except TypeError:
            pass
    return found


_HAS_ENTRY = weakref.WeakKeyDictionary()  # class -> _has_entry's answer


def _entry_method(name: str, original) -> bool:
    """Whether `original`, defined as `name` by a module class, is an entry method that _lock_class wraps: a plain
    function (not a generator's, whose body runs after the call returns, nor a static or class method) named
    `get_<x>_features` (transformers' get_text_features, get_image_features, get_audio_features, get_video_features),
    `get_image_embeddings` or `get_prompt_embeddings` (SAM's), `encode` or `decode` (codecs, VQ models, autoencoders:
    transformers' EncodecModel, MimiModel), or transformers' `codec_decode` (Bark's, which runs its codec's modules
    itself: C2, torn 3 of 3), `decode_image_tokens` (Emu3's), `chunked_decode` (Qwen3-Omni's code-to-wave)."""
    if not isinstance(original, types.FunctionType) or getattr(original, "_lora_ext_locks", False) \
            or original.__code__.co_flags & (inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR):
        return False
    return name in _ENTRY_NAMES or (name.startswith("get_") and name.endswith("_features"))


# the entry methods' names other than get_<x>_features: a list, not a pattern (E2: a user's `encode_prompt` that
# switched its own model's adapter first was refused as a change inside its own read, under a pattern `encode_<x>`)
_ENTRY_NAMES = frozenset({"encode", "decode", "get_image_embeddings", "get_prompt_embeddings", "codec_decode",
                          "decode_image_tokens", "chunked_decode"})


def _locking_entry(original):
    @functools.wraps(original)
    def entry(self, *args, **kwargs):
        state = getattr(self, "__dict__", None)
        if state is None or ops.compiling():  # (traced inside a compiled region: no lock there)
            return original(self, *args, **kwargs)
        locks = state.get("_lora_ext_part_of", ())
        own = state.get("_lora_ext_model_lock")
        if own is None and _lock_of_hooks(self) is not None:
            # (a shallow copy made before the lock, which shares the model's hooks: its lock, as its forward takes;
            # C2: an entry of the copy before its first forward took none, torn 3 of 3)
            own = model_lock(self)
        if own is not None:
            locks = (*locks, own)
        if not locks:
            return original(self, *args, **kwargs)
        return _under_reads(locks, original, (self, *args), kwargs)
    entry._lora_ext_locks = entry._lora_ext_entry = True
    return entry


# the calls that take a module's reads around it (ModelLock._in_forward: the module is their local `module`, `self`)
_COMPILED_CALL_CODE = _locked_compiled_call.__code__
_ENTRY_CODE = _locking_entry(_module_call).__code__


def _lock_loaded_classes() -> None:
    """_lock_class of every module class loaded (not torch's own): a model unpickled (or deep-copied) with its lock,
    in a process where no lock was made, generates or calls its entry methods before any lora_ext call (T2: its decode
    steps took no read, and a switch tore them, 3 of 3; in spawned workers too; C2: a user's autoencoder's decode, torn
    3 of 3, and for good: the lock's fast path never wrapped it). About 8 ms for 7,800 classes (every transformers model
    loaded), once per unpickled lock; each class's methods are looked at once."""
    todo, seen = [nn.Module], set()
    while todo:
        klass = todo.pop()
        if klass not in seen:
            seen.add(klass)
            if _own_class(klass):
                _lock_class(klass)
            todo.extend(klass.__subclasses__())


def _locked_inside(model) -> List[Tuple[nn.Module, bool]]:
    """(module, whether its lock is the one it is a part of) for the locks a compiled call of `model` takes, outermost
    first: the lock of the model it is a part of (_parts, BLIP-2's language model), then its own, else those of the
    outermost modules inside it that have one (lora_ext was given a part of the model, `model.model`: its hooks take
    its read in eager forwards of the whole, not in compiled ones, T2)."""
    found = [(model, True)] if "_lora_ext_part_of" in model.__dict__ else []
    if "_lora_ext_model_lock" in model.__dict__:
        return [*found, (model, False)]
    inside = []
    for name, m in model.named_modules():
        if "_lora_ext_model_lock" in m.__dict__ and not any(name.startswith(p) for p in inside):
            found.append((m, False))
            inside.append(name + ".")
    return found


def _locking_compiled_call(original, attr):
    @functools.wraps(original)
    def get_compiled_call(self, *args, **kwargs):
        call = original(self, *args, **kwargs)
        if isinstance(call, _LockedCall) or getattr(call, "__self__", None) is self:
            return call  # (its own __call__, not compiled: the hooks run)
        locked = _locked_inside(self)  # (a walk of the model's modules where it has no lock of its own)
        if not locked:
            return call
        target = getattr(call, "_torchdynamo_orig_callable", None)
        if getattr(target, "__self__", self) is not self and self.__dict__.get(attr) is call:
            # transformers keeps the compiled call in the model's __dict__: a copy (copy.deepcopy, copy.copy) of a model
            # that generated compiled holds the original's, and decoded with the original's weights under the copy's
            # lock (T2: 0.557 off, other tokens); compiled again, for this model
            del self.__dict__[attr]
            call = original(self, *args, **kwargs)
        for m, part in reversed(locked):
            call = _LockedCall(m, call, part)
        return call
    get_compiled_call._lora_ext_locks = True
    return get_compiled_call


def _compiled_wrappers(chain) -> List[nn.Module]:
    """The live torch.compile wrappers noted (_note_compiled_wrapper) of the modules in `chain` and, through the
    DistributedDataParallel and compiled wrappers noted of those, of theirs; not those in `chain`."""
    if not _COMPILED:
        return []
    seen, found = list(chain), []
    with _COMPILED_LOCK:
        i = 0
        while i < len(seen):
            m, i = seen[i], i + 1
            try:
                refs = _COMPILED.get(m, ())
            except TypeError:
                continue
            for r in refs:
                w = r()
                if w is not None and all(w is not c for c in seen):
                    seen.append(w)
                    if not isinstance(w, DistributedDataParallel):  # (its forward runs the hooks of the model inside)
                        found.append(w)
    return found
_HOOKS_LOCK = {}  # id(a module's _forward_pre_hooks that model_lock hooked) -> (weakref to that dict, the lock)
_HOOKS_PRUNE = [256]  # its size at which the entries of dicts gone are dropped


def _lock_of_hooks(module) -> Optional[ModelLock]:
    """The lock whose hooks `module`'s forward pre-hooks dict holds (model_lock put them there, maybe through another
    object sharing the dict: a shallow copy), or None."""
    hooks = module.__dict__.get("_forward_pre_hooks")
    entry = _HOOKS_LOCK.get(id(hooks))
    return entry[1] if entry is not None and entry[0]() is hooks else None


def lora_layers(model: nn.Module) -> List[Tuple[str, LoRALayer]]:
    """(name, layer) for every lora_ext layer of the model that holds an adapter."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer) and m.has_lora]


def _layers_or_raise(model):
    found = lora_layers(model)
    if not found:
        raise ValueError("model holds no lora_ext layer with an adapter (inject first)")
    for layer_name, m in found:  # (R6: a layer lora_ext.unload took out, still in the model under another name:
        # refused before any layer is written; model-level calls refused part way, or raised AttributeError, before)
        m._check_unloaded(where=layer_name)
    return found


def adapter_names(model: nn.Module) -> List[str]:
    """The adapters the model holds (each in the layers it targets, or in a module saved whole), the active one
    first, as peft lists its adapters: set_adapter takes any of them. (Layers that disagree, a model-level change
    half done on another thread, are read again once it is done: _settled.)"""
    def read():
        found = _layers_or_raise(model)
        names = [n for _, m in found for n in m.adapter_names if not m.is_placeholder(n)]
        names += [n for _, w in wrappers(model) for n in w.adapter_names]
        return names, [m.active_adapter for _, m in found]

    names, active = _settled(model, read, lambda got: got[1])
    return list(dict.fromkeys([*(n for n in active if n in names), *names]))


def _settled(model, read, actives):
    """read(), and read() again under the model's lock (hold: after a model-level change on another thread is done)
    when the layers' active adapters (actives(what read() gave)) disagree. Not under the lock at first: a forward
    may wait on a thread asking (a status thread, a worker), and a read queues behind a waiting change."""
    got = read()
    if len(set(actives(got))) > 1:
        with hold(model):
            got = read()
    return got


def active_adapter(model: nn.Module) -> str:
    """The adapter every lora_ext layer of the model serves (a set_adapter half done on another thread is waited for,
    not reported as layers that disagree: _settled)."""
    actives = _settled(model, lambda: {m.active_adapter for _, m in _layers_or_raise(model)}, lambda got: got)
    if len(actives) != 1:
        raise RuntimeError(f"lora_ext layers disagree on the active adapter: {sorted(actives)}")
    return actives.pop()


# the DistributedDataParallel a lora_ext function was given, while it works on the model inside it (peft_io's loads)
THROUGH_DDP = contextvars.ContextVar("lora_ext_through_ddp", default=None)


def set_adapter(model: nn.Module, name: str) -> None:
    """Makes adapter `name` active in every lora_ext layer. A layer the adapter does not target (an adapter of other
    target modules) gets a stand-in of zeros (is_placeholder) and serves its base, as peft's set_adapter leaves
    such layers. All layers are checked (values finite) before the first one changes; an adapter no layer holds
    raises KeyError."""
    check_one_name(name, "set_adapter")
    with model_lock(model).write():  # the layers listed inside: a concurrent load may inject more
        found = _layers_or_raise(model)
        saved = wrappers(model)
        reshard_fsdp(model)  # (first: a refusal below is told to the other ranks over the sharded weights' mesh)
        if not any(m.has_adapter(name) and not m.is_placeholder(name) for _, m in found) \
                and not any(name in w.adapter_names for _, w in saved):
            held = sorted({n for _, m in found for n in m.adapter_names if not m.is_placeholder(n)})
            sharded.refuse_alike(_mesh_weight(found), KeyError(
                f"set_adapter: no lora_ext layer holds an adapter {name!r} (they hold {held})"), f"set_adapter({name!r})")
        refuse_fsdp1(model, f"set_adapter({name!r})")
        # (copies of a wrapper that never saw one train follow it; an adapter a load marked to train trains)
        trains = any(m.trains_after_switch(name) for _, m in found)
        _check_ddp_switch(model, found, name, trains)
        lacking = [m for _, m in found if not m.has_adapter(name)]
        try:
            with deferred_interrupt():
                for m in lacking:
                    # looked at again under the layer's lock: a switch of the layer alone on another thread to this
                    # adapter (which takes no model lock) lacks it in neither place only while it holds the lock, and a
                    # stand-in added over it wrote zeros into its live factors (h38: the adapter lost for good)
                    with m._lock:
                        if not m.has_adapter(name):
                            m.add_placeholder(name)
            ddp = _ddp_of(model)
            if ddp is None:  # (a load through a DDP activates on the model inside it)
                ddp = THROUGH_DDP.get()
            _set_adapter(found, name, settle=ddp is None, saved=saved, trains=trains)
            ddp_guard.keep_parameters([m for _, m in found], ddp)  # (None: no DDP keeps them now)
            model_lock(model)._torn = None  # (a forked child's model torn by a change in its parent: whole again)
        except BaseException:  # the stand-ins go with the switch (a refusal, Ctrl-C)
            with deferred_interrupt():
                for m in lacking:
                    if m.is_placeholder(name) and m.active_adapter != name:
                        m.delete_adapter(name)
            raise


def reserve_rank(model: nn.Module, rank: int) -> None:
    """Holds every adapter of every lora_ext layer of the model at rank `rank` from now on, padded with zeros (the
    updates B @ A stay as they were): the adapters held now, the stand-ins of zeros a switch gives the layers an
    adapter does not target, and every adapter added or loaded later (a higher rank is refused, naming the layer).
    So every serving switch (factors that do not require grad) between any two adapters writes into the same
    storage, as peft's prepare_model_for_compiled_hotswap pads to a target rank: a CUDA graph captured after this
    call serves whatever adapter set_adapter or hotswap_adapter makes active, and a torch.compile'd model sees one
    shape and traces once, whatever the adapters' scalings (traced forwards read the scale tensor). Layers a later load
    or inject adds are reserved too. Call it before capturing or compiling: the live factors get new storage now.
    Every layer is checked first (the rank is at least each held adapter's, no trainable factors, whose optimizer
    would keep the old shapes, no sharded factors, no DistributedDataParallel wrapper, whose buckets hold the
    factors' shapes): a refusal changes nothing. Like a
    switch, it waits for forwards and open mixed batches of the model (on other threads) to finish."""
    rank = check_rank("reserve_rank: rank", rank)
    if under_ddp(model):
        raise ValueError("reserve_rank: the model is wrapped in DistributedDataParallel, which holds the factors' "
                         "shapes; reserve the rank on the inner model before wrapping it")
    with model_lock(model).write():
        found = _layers_or_raise(model)
        refuse_fsdp1(model, "reserve_rank")
        reshard_fsdp(model)  # (all-gathered factors are plain tensors: the sharded ones are refused below)
        for name, m in found:
            try:
                with m._lock:
                    m._check_reserve(rank, frozen=True)
            except ValueError as e:
                raise ValueError(f"reserve_rank: layer {name!r}: {e}") from None
        plans = []
        for name, m in found:  # the padded factors of every layer first: a lack of memory changes nothing
            try:
                plans.append(m._plan_reserve(rank))
            except RuntimeError as e:
                raise RuntimeError(f"reserve_rank: layer {name!r}: {e}") from None
        with deferred_interrupt():
            for (_, m), plan in zip(found, plans):
                m._apply_reserve(plan)


def reserved_rank(model: nn.Module) -> Optional[int]:
    """The rank reserve_rank fixed for the model's layers (the largest, where layers were reserved one by one), or
    None."""
    ranks = [m.reserved_rank for _, m in lora_layers(model) if m.reserved_rank is not None]
    return max(ranks, default=None)


reshard_fsdp = sharded.reshard_fsdp  # (model-level writes reshard first)


def _check_ddp_switch(model, found, name, trains, what="set_adapter", saved=True):
    """DistributedDataParallel holds the Parameters it was built with and synchronises only their gradients. A
    switch of trainable factors registers the new adapter's own Parameter pair (of its rank): refused under DDP,
    before anything changes, with what to rebuild (`what`: the call; saved=False: the layers alone, for a load's
    activation, whose modules saved whole are not there yet). A switch back to the Parameters DDP was built with
    (after a switch of ddp.module) trains in step and goes through (h7: refused as giving other Parameters).
    Serving switches (factors that do not require grad) are not DDP's business and go through."""
    ddp = _ddp_of(model)
    if ddp is None:
        return
    known, changed = ddp_guard.synchronised(ddp)
    for layer_name, m in found:
        if name != m.active_adapter and m.trains_after_switch(name):
            A, B = m._adapter(name)[:2] if m.has_adapter(name) else (m.lora_A, m.lora_B)  # (a stand-in: the live rank)
            if known and changed is None and m.has_adapter(name) and {id(A), id(B)} <= known:
                continue  # (back to the Parameters DDP was built with, after a switch of ddp.module: it trains in step)
            raise ValueError(
                f"{what}: the model is wrapped in DistributedDataParallel, which synchronises the gradients of "
                f"the Parameters it was built with; switching the trainable factors of {layer_name!r} from "
                f"{m.active_adapter!r} (rank {m.r}) to {name!r} (rank {m.rank_of(A)}) gives the layer other "
                f"Parameters, whose gradients it would not synchronise. Switch the inner model and wrap it again: "
                f"lora.set_adapter(ddp.module, {name!r}); ddp = DistributedDataParallel(ddp.module, ...) (and an "
                f"optimizer over the new adapter's parameters)")
    for path, w in wrappers(model) if saved else ():
        if w.trains_on_switch(name, trains):
            raise ValueError(
                f"{what}: the model is wrapped in DistributedDataParallel, and module {path!r} "
                f"({'rows of tokens: trainable_token_indices' if isinstance(w, TrainableTokens) else 'saved whole: modules_to_save'}"
                f") would compute with other trainable parameters for {name!r}, whose gradients DDP "
                f"would not synchronise. Switch the inner model and wrap it again: lora.set_adapter(ddp.module, "
                f"{name!r}); ddp = DistributedDataParallel(ddp.module, ...)")


def _set_adapter(found, name, settle=True, saved=(), trains=None):
    """Switches the layers `found` and the modules to save `saved` (peft's modules_to_save) to adapter `name`;
    `trains`: whether the layers' factors train (the copies a switch puts in train as they do)."""
    before = [m.active_adapter for _, m in found]
    saved_before = [w.active_adapter for _, w in saved]
    try:
        with deferred_interrupt() as held:  # a Ctrl-C lands after the last layer, inside this try
            _switch_all(found, name, settle)
            for _, w in saved:
                w.set_adapter(name, trains)
            held.deliver()
    except BaseException:  # KeyboardInterrupt included: every layer back on its adapter, never a mix
        with deferred_interrupt():  # (a second Ctrl-C waits for the way back)
            for (_, m), old in zip(found, before):
                if m.active_adapter != old:
                    m.set_adapter(old)
            for (_, w), old in zip(saved, saved_before):
                w.set_adapter(old)
        raise


def _mesh_weight(found):
    """The first DTensor weight of the layers `found` (FSDP2, tensor parallel), over whose mesh a rank's own refusal
    is told to the others (sharded.refuse_alike); None without one."""
    for _, m in found:
        w = m._weight_or_none()
        if w is not None and sharded.is_dtensor(w):
            return w
    return None


def _switch_all(found, name, settle=True):
    try:  # (every layer checked before any is written; a refusal told to the other ranks of a sharded model, F2)
        for layer_name, m in found:
            if name not in m.adapter_names:
                raise KeyError(f"set_adapter: layer {layer_name!r} holds no adapter {name!r} "
                               f"(it holds {m.adapter_names})")
            if name != m.active_adapter:
                m._check_plain_factors(f"set_adapter({name!r}) at {layer_name!r}")
                m._check_values(name, label=f"adapter {name!r} at {layer_name!r}")
    except Exception as err:
        sharded.refuse_alike(_mesh_weight(found), err, f"set_adapter({name!r})")  # (raises err)
    for layer_name, m in found:
        if settle or name != m.active_adapter:  # set_adapter of the active name may settle its Parameters
            with at_layer(layer_name):
                m.set_adapter(name)


def delete_adapter(model: nn.Module, name: str) -> None:
    landed = None
    # (Ctrl-C and a timeout's SIGALRM held back from before the layers' locks are taken to after they are given back:
    # a handler raising inside _all_locks left a lock taken and never given back, or gave one back twice, r39)
    with model_lock(model).write("delete_adapter", model), deferred_interrupt(), contextlib.ExitStack() as locks:
        found = _layers_or_raise(model)
        # every layer's lock, from the check to the last delete: a switch of one layer alone on another thread to the
        # adapter (layer.set_adapter, which takes no model lock) refused its delete after the layers before it had
        # dropped the adapter, which the model then served with stand-ins of zeros there (h38: 92 off)
        _all_locks(locks, [m for _, m in found])
        if not any(m.has_adapter(name) for _, m in found):
            raise KeyError(f"delete_adapter: no lora_ext layer holds an adapter {name!r} "
                           f"(the model holds {adapter_names(model)})")
        for layer_name, m in found:
            if name == m.active_adapter:
                raise ValueError(f"delete_adapter: {name!r} is active at {layer_name!r}; set another adapter first")
        with deferred_interrupt():  # a Ctrl-C lands when every layer has dropped it
            # an exception landing part way (an asynchronous one) deletes the rest, then is raised: half deleted,
            # the adapter would be served with stand-ins of zeros where it was dropped
            while True:
                try:
                    for _, m in found:
                        if m.has_adapter(name):
                            m.delete_adapter(name)
                    for _, w in wrappers(model):  # its copies of modules to save (a second delete does nothing)
                        w.delete(name)
                    break
                except BaseException as err:
                    if landed is not None:
                        raise
                    landed = err
        if landed is not None:
            raise landed


def _waits_for_itself(lock, closing: bool = False) -> bool:
    """Whether a change under `lock` on this thread now would wait for itself: the thread is inside a forward or hold
    of its model (refused as a change), or writes layers this change's writes take, or waits for a lock, or (closing:
    a generator suspended in the block closed) holds a read of this model or of one inside or holding it, or another
    thread holding a read of it waits in a join. Where the garbage collector closes a generator suspended in a block
    of the model (a disable_adapter block's end, which is a change): J1, the end refused inside a forward of a model
    inside it left the model disabled for good; run inside a switch through a model holding it, it waited for the
    inner model's change, which waited for that switch's writes, for good."""
    # First (and with no call of sys._current_frames before it): whether it waits for a lock (a collection inside the
    # wait's bookkeeping: the end's change, re-entering the mutex, queued inside the wait and mutated the queue the wait
    # was reading, J1) or runs inside one of lora_ext's calls of sys._current_frames (a collection there: a second call
    # waits for the lock the first holds, with the interpreter's lock held, and the process froze, L3), or inside
    # the worker that hands ends on (which must not wait)
    codes = (*_WAITING_CODES, _chain_lock.__code__, ModelLock._drop_left_reads.__code__,
             ModelLock._drop_gone.__code__, ModelLock._reader_blocked.__code__, _run_ends.__code__)
    frame = sys._getframe(1)
    while frame is not None:
        if any(frame.f_code is code for code in codes):  # (by identity: see _in_forward)
            return True
        frame = frame.f_back
    me = threading.get_ident()
    # (or it makes a change of a model inside this one or holding it, or writes layers this change's writes take: a
    # change through a model holding this one, whose writes hold this model's layer writes, while another thread's
    # change of this model waits for them, J1; a disable block's entry on the inner model, whose write held back a read
    # of it that a forward of this model waited for, which this model's change waited for, L3. Not any other model's
    # change: the end of an unrelated model's block inside another's end runs here, hostile29)
    if lock._inside(me) or any(me == other._layers_writer or (other is not lock and me in (other._writer,
                                                                                          other._changer))
                               for other in lock._layer_locks()):
        return True
    if not closing:  # (a block's end reached as its `with` ends: it waits for the other threads, N2)
        return False
    # closing: a generator suspended in the block closed (GeneratorExit: by the collector, anywhere, or by hand); where
    # the thread holds a read of this model or of one inside it or holding it (a collection as a hold of the outer
    # model gave its read back: the end waited for a change that waited for that read, L3), it runs later too
    if any(me in other._reads for other in lock._layer_locks()):
        return True
    # or a thread holding a read waits in a join or a future: maybe for this one, a forward's worker (L3: the end waited
    # for the forward that joined it, for good; not for an ordinary block's end, which another thread's hold waiting in
    # an Event made run later, the model serving the base after its `with`, N2: 3 of 3). (Not waiting for the mutex:
    # the collector may run this anywhere)
    if lock._mutex.acquire(blocking=False):
        try:
            return lock._reader_blocked(me)
        finally:
            lock._mutex.release()
    return False


# The ends of blocks that would wait for their own thread (_end_later), handed to one worker thread, started at a
# block's entry (_start_ends_worker), which starts a thread for each: not at the end, which the garbage collector may
# run where starting a thread hangs the process (L3: inside sys._current_frames(), 4 of 5 runs froze with the GIL
# held). A SimpleQueue's put is reentrant (made for destructors). Each entry: [lock, end, model, started]; listed in
# _ENDS_PENDING until run, so a child forked meanwhile runs those its parent had not begun (_after_fork).
_ENDS = [queue.SimpleQueue()]
_ENDS_PENDING = []
_ENDS_WORKER = [None]


def _start_ends_worker() -> None:
    worker = _ENDS_WORKER[0]
    if worker is None or not worker.is_alive():
        with _DISABLE_COUNTS:
            worker = _ENDS_WORKER[0]
            if worker is None or not worker.is_alive():
                worker = threading.Thread(target=_run_ends, args=(_ENDS[0],), name="lora_ext block ends",
                                          daemon=True)
                worker.start()
                _ENDS_WORKER[0] = worker


def _join_ends(seconds: float = 10.0) -> None:
    """At the interpreter's exit: waits (up to `seconds`) for the block ends still to run (a daemon thread writing at
    exit aborted the process: "terminate called without an active exception", hostile29's subprocess)."""
    deadline = time.monotonic() + seconds
    while _ENDS_PENDING and time.monotonic() < deadline:
        time.sleep(0.01)


atexit.register(_join_ends)


def _restart_ends() -> None:
    """In a forked child, once its model locks are reset (forks.py): a worker, as in the parent (an end the collector
    queues here could not start one), given the ends the parent had not begun."""
    started = _ENDS_WORKER[0] is not None
    _ENDS[0], _ENDS_WORKER[0] = queue.SimpleQueue(), None
    for entry in _ENDS_PENDING:
        _ENDS[0].put(entry)
    if _ENDS_PENDING or started:
        _start_ends_worker()


def _run_ends(ends) -> None:
    """The worker: each end on a thread of its own (started here, not where the collector runs), so that ends of
    different models do not wait for each other (L3: one waiting for a forward of the outer model that waited for a
    read of the inner one, which waited for the inner model's end queued behind it)."""
    while True:
        entry = ends.get()
        try:
            threading.Thread(target=_run_end, args=(entry,), name="lora_ext block end", daemon=True).start()
        except BaseException:  # (no thread to be had: run here)
            _run_end(entry)


def _run_end(entry) -> None:
    lock, end, model = entry[:3]
    try:
        with lock.write():
            if not entry[3]:
                entry[3] = True
                end()
    except BaseException as err:  # (reported, as a thread's: a merge refused at the end)
        print(f"lora_ext: the end of a block of {type(model).__name__} run later failed:", file=sys.stderr)
        traceback.print_exception(err, file=sys.stderr)
    finally:
        _discard(_ENDS_PENDING, entry)


def _end_later(lock, end, model) -> None:
    """Has the worker run a block's `end` under the model's write (_waits_for_itself): once the forwards and changes
    that this thread is inside have ended. Until it has, the model serves the base, on every thread (L3: a forward
    right after the hold the block's generator was closed in, 300 of 300; new reads held back for it, of every thread
    or of the thread that ended the block, deadlocked under the collector, L3's c6: 2 of 5 and 6 of 6 runs). A warning says so, after the end is queued (raised as an error, `-W error`, the end still
    runs: L3)."""
    entry = [lock, end, model, False]
    _ENDS_PENDING.append(entry)  # (an append: atomic, as the collector may run this anywhere)
    _ENDS[0].put(entry)
    warnings.warn(f"a lora_ext block of {type(model).__name__} ended inside a forward or change that its end (a "
                  f"change) would wait for (a generator holding the block closed there, by the garbage collector or "
                  f"by hand): it ends on a thread of its own once they have, and the model serves the base until "
                  f"then", RuntimeWarning, stacklevel=4)  # (the block's `with`, past contextlib's __exit__)


def _release(locks) -> None:
    for lock in reversed(locks):
        lock.release()


def _all_locks(stack: contextlib.ExitStack, layers):
    """Every layer's lock, held in `stack` (given back in one callback). Taken whole or not at all: a lock not free
    within a moment gives back those taken and the whole is tried again, so that a thread holding one of them and
    waiting for another (a delete of another model holding the same layers in another order, a fork's pre-hook taking
    every lock: r38, a deadlock) gets them first. The caller holds Ctrl-C back (deferred_interrupt)."""
    delay = 0.001
    while True:
        taken = []
        try:
            for m in layers:
                # (taken and noted in one statement: an exception landing between the two would leave it held for good)
                if not (m._lock.acquire(timeout=0.05) and taken.append(m._lock) is None):
                    break
            else:  # (one statement: an exception landing before it leaves them to the except below, not to both)
                return stack.callback(_release, taken)
        except BaseException:
            _release(taken)
            raise
        _release(taken)
        time.sleep(random.uniform(0, delay))  # (apart: two threads backing off alike would meet again)
        delay = min(delay * 2, 0.05)


def merge_adapter(model: nn.Module) -> None:
    """Merges the active adapter into the weights of every lora_ext layer, whatever the train/eval mode.
    Every layer is checked (mergeable, finite values within the weight's range) before the first changes."""
    with model_lock(model).write():
        found = _layers_or_raise(model)
        refuse_fsdp1(model, "merge_adapter")
        reshard_fsdp(model)
        refusal = None
        try:
            for name, m in found:
                check_mergeable(name, m, model)
                m._check_sound()  # (a broken layer: refused before the others merge and unmerge again)
        except Exception as err:
            refusal = err
        # (FSDP2: before the value checks gather the factors, the ranks agree, and on this rank's own refusal: R5, a
        # rank refusing alone, or merge_adapter beside another rank's switch, left the ranks waiting until the timeout)
        live = [t for _, m in found if m.has_lora for t in (m.lora_A, m.lora_B)]
        sharded.agree(_mesh_weight(found), "merge_adapter", "merge_adapter", live, (), refusal)
        for name, m in found:
            if not m.merged or m._merge_behind():
                m._check_values(m.active_adapter, label=f"adapter {m.active_adapter!r} at {name!r}")
        # a refusal while writing (a lossless merge's exceptions), or Ctrl-C: all merged or none (a layer that
        # trained through its merge merges its trained factors: LoRALayer._merge_trained)
        each_or_none([m for _, m in found if not m.merged or m._merge_behind()], lambda m: m.merge(),
                     lambda m: m.unmerge(),
                     paths={m: path for path, m in found})


def unmerge_adapter(model: nn.Module) -> None:
    """Restores the base weights of every lora_ext layer (forwards then add the adapter on the fly)."""
    with model_lock(model).write():
        found = _layers_or_raise(model)
        refuse_fsdp1(model, "unmerge_adapter")  # (before any layer changes: some may be FSDP1's, others not)
        reshard_fsdp(model)
        with deferred_interrupt():  # a Ctrl-C lands when every layer is unmerged
            for _, m in found:
                m.unmerge()


def add_weighted_adapter(model: nn.Module, adapters: List[str], weights: List[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None,
                         svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                         svd_driver: Optional[str] = None, density: Optional[float] = None,
                         majority_sign_method: Optional[str] = None) -> None:
    """Adds adapter `adapter_name`, made from the model's `adapters` weighted by `weights`, as peft's
    add_weighted_adapter: "svd" (peft's default: the weighted update refactored by its SVD, truncated to `svd_rank`
    when given; without it the exact update, where peft truncates to its configs' largest r), "cat" (exact: the
    ranks stacked), "linear" (the factors summed, equal ranks; exact for one adapter), and peft's pruning
    combinations: "ties", "dare_linear", "dare_ties", "magnitude_prune" (on the factors, equal ranks) and their
    "_svd" forms (on the updates, then refactored), which need `density` (the fraction of values kept, in (0, 1]);
    ties and dare_ties elect signs by `majority_sign_method` ("total", the default, or "frequency"). dare draws its
    masks from torch's default generator (torch.manual_seed makes it repeatable). `svd_clamp` clamps the new
    factors to that quantile of their values; `svd_driver` picks a cuSOLVER method (CUDA factors);
    `svd_full_matrices` changes nothing in the result (the factors are truncated either way). Scaling 1; not made
    active. Every layer is planned (and checked) before the first one changes; see lora_ext/serving/weighted.py."""
    with model_lock(model).write("add_weighted_adapter", model):
        found = _layers_or_raise(model)
        refuse_fsdp1(model, "add_weighted_adapter")  # (it reads the factors: FSDP1's shard pieces)
        weighted.apply(weighted.plan(model, found, adapters, weights, adapter_name, combination_type, svd_rank,
                                     density, majority_sign_method, svd_clamp, svd_full_matrices, svd_driver),
                       adapter_name, adapters[0])


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """Serves the base model inside the block, as peft's `with model.disable_adapter():` (a reference model's
    logits, say): every lora_ext layer computes from its base weight alone and every module saved whole
    (modules_to_save) with the model's own module. Merged layers are unmerged on entry (with a lossless merge,
    the default for float16/bfloat16, bit for bit the base); merges wait (eval() does not merge inside the block,
    merge() is refused). When the last block over a layer ends, the layer is merged as it was before the first
    began, or, when train()/eval() changed its mode inside, as that mode asks (eval(): merged). Model-wide, as
    peft's: forwards on other threads see the base too, never a mix (the model's lock). Blocks nest and may end in
    any order. Refused before anything changes: with a mixed batch open on the model, and for tensor-parallel or
    FSDP2-sharded layers; inside it, load_peft_adapter, inject, unload and batch_adapters are refused. A copy made
    inside (deepcopy, pickle) is not in the block. CUDA graphs captured outside the block replay the adapter; a
    program made inside it (export, jit.trace, a CUDA graph) of a merged model serves the adapter after it (the end
    merges into the weight the program reads)."""
    from .injection import DISABLED
    began, landed, entered, held = False, None, False, None  # (the end's: see below)

    def end():  # the block's end, under its hold and the lock (below)
        DISABLED[model] -= 1
        if not DISABLED[model]:
            del DISABLED[model]
        # under one lock with the merges below: another model's block sharing a layer, entering between the
        # decision that this is the layer's last block and its merge, made that merge raise (r42)
        with _DISABLE_COUNTS:
            last = {}  # {layer: its first block's state} for the layers whose last block this is
            for _, m in [*found, *saved]:
                if _count_block(m, opener, -1) and not m._adapter_off:
                    if isinstance(m, LoRALayer):
                        last[m] = m.__dict__.pop("_pre_disable", (False, m.training))
            model_lock(model).block(-1, opener)
            again = []
            for _, m in found:
                if m not in last:
                    continue
                was_merged, was_training = last[m]
                merge = was_merged if m.training == was_training else (m.merge_weights and not m.training)
                if merge and not m.merged and m.has_lora:
                    refusal = m.merge_refusal() if m.training != was_training else None
                    if refusal is not None:  # (eval() inside: as eval() outside, the layer stays unmerged)
                        warnings.warn(f"disable_adapter: eval() inside the block leaves adapter "
                                      f"{m.active_adapter!r} unmerged at its end: {refusal}", stacklevel=4)
                        continue
                    again.append(m)
            try:
                each_or_none(again, lambda m: m.merge(), lambda m: m.unmerge(),
                             paths={m: p for p, m in found})
            except Exception as e:  # (an adapter set inside the block that cannot merge): all unmerged
                e.args = (f"disable_adapter: at the block's end the layers could not all be merged again, so "
                          f"none is (they serve their adapter unmerged): {e}",) + tuple(e.args[1:])
                raise

    _start_ends_worker()  # (for an end that must run later: _end_later)
    try:
        with model_lock(model).write():
            # Ctrl-C is held back over the whole entry and lands inside the block's try, so the block's end undoes it
            held = deferred_interrupt().__enter__()
            try:
                found = _layers_or_raise(model)
                for path, m in [*found, *wrappers(model)]:  # (a module saved whole, too: shared by another model)
                    if m.__dict__.get("_open_batches"):
                        raise ValueError(f"disable_adapter: a mixed batch (lora.batch_adapters) serves "
                                         f"{'layer' if isinstance(m, LoRALayer) else 'module'} {path!r}; disable the "
                                         f"adapters after it closes")
                    if isinstance(m, LoRALayer) and (m.__dict__.get("_tp") is not None
                                                     or sharded.is_dtensor(m._weight_or_none())):
                        raise ValueError(f"disable_adapter: layer {path!r} is sharded (tensor parallel or FSDP2), "
                                         f"whose forward adds the adapter in its own way; serve the base before "
                                         f"sharding")
                saved = wrappers(model)
                with _DISABLE_COUNTS:  # (to the counts below: another model's block sharing a layer)
                    # the first block over a layer: what to come back to
                    pre = {m: (m.merged, m.training) for _, m in found if not m._adapter_off}
                    # an unmerge refused: the others merged back, nothing disabled
                    each_or_none([m for _, m in found if m.merged and m.has_lora], lambda m: m.unmerge(),
                                 lambda m: m.merge(), paths={m: path for path, m in found})
                    for m, state in pre.items():
                        m.__dict__["_pre_disable"] = state
                    # counted before the layers say so, and after they no longer do (below): a fork between the two
                    # finds the block (forks.py)
                    opener = threading.get_ident()
                    model_lock(model).block(+1, opener)
                    for _, m in [*found, *saved]:
                        _count_block(m, opener, +1)
                # (one statement: the end runs once the model is disabled, also when the lock's release raises after
                # the entry, as it does an asynchronous exception that landed in it once the release is done)
                DISABLED[model], entered = DISABLED.get(model, 0) + 1, True
                # a merge on another thread between the unmerges above and the layers' disabling (layer.merge(),
                # eval(), which take the layer's lock, not the model's) served the adapter inside the block (h38: 2% of
                # blocks, 9.7 off); disabled now, a layer merges no more: unmerged again under its lock
                for _, m in found:
                    with m._lock:
                        if m.merged and m.has_lora:
                            m.unmerge()
            except BaseException:
                held.deliver()
                raise
        held.deliver()  # (a Ctrl-C during the entry: raised here, the end below runs)
        yield
    finally:
        try:
            # Ctrl-C is held back from before the lock is waited for (a forward on another thread may hold it): an
            # exit that never ran would leave the model disabled. An exception landing before the end began (an
            # asynchronous one, or Ctrl-C as the hold is taken) runs it again, and is raised after it
            while True:
                try:
                    if entered:  # (inside the try: a landing on it is caught too)
                        lock = model_lock(model)
                        if _waits_for_itself(lock, isinstance(sys.exc_info()[1], GeneratorExit)):
                            began = True
                            _end_later(lock, end, model)
                        else:
                            with deferred_interrupt(), lock.write():
                                began = True
                                end()
                    break
                except BaseException as err:
                    if began or landed is not None:
                        raise
                    landed = err
            if landed is not None:
                raise landed
        finally:
            if held is not None:  # (delivered already, but where the lock's release raised after the entry)
                held.deliver()
