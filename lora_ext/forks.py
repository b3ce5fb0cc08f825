"""os.fork while other threads use lora_ext (a fork-based worker pool, DataLoader workers that call the model, a
pre-fork server with a serving thread).

A forked child has only the thread that forked. A lock another thread held at the fork stays held in the child for
ever (every forward, merge or switch of that layer hung there), and what that thread was writing (a merge, a
switch, a model-level set_adapter half way through its layers) stays half written. So, around every os.fork:

- before it, the forking thread takes every LoRA layer's lock and every model lock's mutex (waiting up to
  WAIT_SECONDS in all for forwards and switches on other threads to finish), and gives them back after it, in the
  parent and in the child: nothing is half done in the child;
- in the child, a layer whose lock another thread still held (past the wait) gets a new lock and is broken (its
  forwards, merges, switches and state_dict refused, naming the fork, until load_state_dict brings its weight and
  factors), and a model whose lock was in another thread's model-level change refuses forwards until set_adapter
  (ModelLock.after_fork).

A fork from a thread that holds some of these itself (inside a forward) keeps them: they are its own in the child.
subprocess launches run no such hooks (the child execs at once)."""

import os
import sys
import threading
import time
import weakref

WAIT_SECONDS = 5.0  # how long a fork waits in all for other threads' forwards, merges and switches to finish

_layers = weakref.WeakSet()  # LoRA layers (their `_lock`)
_model_locks = weakref.WeakSet()  # serving.adapters.ModelLock objects
_taken = []  # the locks the forking thread took before the fork, given back after it


def track_layer(layer) -> None:
    _layers.add(layer)


def tracked_layers() -> list:
    """Every LoRA layer alive in this process."""
    return list(_layers)


def track_model_lock(lock) -> None:
    _model_locks.add(lock)


def model_locks() -> list:
    """Every model lock alive in this process."""
    return list(_model_locks)


def model_lock_count() -> int:
    """How many model locks are alive in this process (at most)."""
    return len(_model_locks)


def _locks():
    from . import ties  # (last: a thread holding it may wait for nothing else of these)
    return ([layer.__dict__.get("_lock") for layer in list(_layers)]
            + [lock.__dict__.get("_mutex") for lock in list(_model_locks)] + [ties._lock])


def _before() -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    for lock in _locks():
        if lock is not None and lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            _taken.append(lock)


def _give_back() -> set:
    taken = {id(lock) for lock in _taken}
    for lock in reversed(_taken):
        lock.release()
    _taken.clear()
    return taken


def _after_in_child() -> None:
    from . import batched, ddp_guard, ties
    taken = _give_back()
    # module-wide locks: this process has one thread; what they guard is a registry, whole between statements
    ties._lock = threading.RLock()
    ties._new_tokens()
    batched._open_count_lock = threading.RLock()
    batched.after_fork()  # (its lock too)
    ddp_guard._HOOK_LOCK = threading.Lock()
    adapters = sys.modules.get(__package__ + ".serving.adapters")
    if adapters is not None:  # (the disable blocks' counts: their lock, and the blocks of threads not here)
        adapters._after_fork()
    for layer in list(_layers):
        lock = layer.__dict__.get("_lock")
        if lock is None or id(lock) in taken:
            continue
        if lock.acquire(blocking=False):  # (free, or this thread's own)
            lock.release()
            continue
        layer._forked_while_held()  # (held by a thread of the parent, which this process does not have)
    for model_lock in list(_model_locks):
        model_lock.after_fork(id(model_lock.__dict__.get("_mutex")) in taken)
    if adapters is not None:  # (the block ends the parent had not run: after the locks are reset)
        adapters._restart_ends()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before, after_in_parent=_give_back, after_in_child=_after_in_child)
