"""Named adapters across a whole model: every lora_ext layer holds the same names; set_adapter switches them
all, each layer in one pass over its weight when merged.

Model-level changes (set_adapter, merge_adapter, unmerge_adapter, delete_adapter, and loading an adapter
with activate=True) are atomic with respect to forwards of the model on other threads: the model gets a
reader-writer lock, taken for reading by a forward pre-hook on the model (released by a forward hook that
runs even when the forward raises) and for writing by those changes, which wait for the forwards in flight
and hold new ones back until every layer has changed. Forwards run concurrently with each other; changes
serialise. Under torch.compile the hooks do nothing (a compiled graph takes no Python locks)."""
import contextlib
import threading
from typing import Iterator, List, Tuple

import torch
import torch.nn as nn

from ..layers import LoRALayer
from .injection import check_mergeable


class ModelLock:
    """Many readers (forwards) or one writer (a model-level change); waiting writers go first. Reads are
    re-entrant per thread (a forward inside a forward), and the writer's thread may read."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = None
        self._write_depth = 0
        self._waiting_writers = 0
        self._local = threading.local()
        self._held = threading.local()  # reads taken by this thread's forward hooks

    def __getstate__(self):
        return {}  # a copied or unpickled model starts with a free lock

    def __setstate__(self, state):
        self.__init__()

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def acquire_read(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if not self._depth() and self._writer != me:
                while self._writer is not None or self._waiting_writers:
                    self._cond.wait()
            self._readers += 1
        self._local.depth = self._depth() + 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()
        self._local.depth = self._depth() - 1

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._write_depth += 1
            else:
                if self._depth():
                    raise RuntimeError("a model-level adapter change from inside a forward of the same model "
                                       "would wait for itself; make it outside the forward")
                self._waiting_writers += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._waiting_writers -= 1
                self._writer, self._write_depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._write_depth -= 1
                if not self._write_depth:
                    self._writer = None
                    self._cond.notify_all()


def _read_before(module, args):
    if not torch.compiler.is_compiling():
        lock = module.__dict__["_lora_ext_model_lock"]
        lock.acquire_read()
        lock._held.n = getattr(lock._held, "n", 0) + 1


def _read_after(module, args, output):
    # only what this thread's pre-hook took (the hooks may have been added while a forward was running)
    if not torch.compiler.is_compiling():
        lock = module.__dict__["_lora_ext_model_lock"]
        if getattr(lock._held, "n", 0):
            lock._held.n -= 1
            lock.release_read()


def model_lock(model: nn.Module) -> ModelLock:
    """The model's lock, created (with its forward hooks, module-level functions: the model still pickles)
    on first use."""
    lock = model.__dict__.get("_lora_ext_model_lock")
    if lock is None:
        lock = ModelLock()
        model.__dict__["_lora_ext_model_lock"] = lock
        model.register_forward_pre_hook(_read_before)
        model.register_forward_hook(_read_after, always_call=True)
    return lock


def lora_layers(model: nn.Module) -> List[Tuple[str, LoRALayer]]:
    """(name, layer) for every lora_ext layer of the model that holds an adapter."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer) and m.has_lora]


def _layers_or_raise(model):
    found = lora_layers(model)
    if not found:
        raise ValueError("model holds no lora_ext layer with an adapter (inject first)")
    return found


def adapter_names(model: nn.Module) -> List[str]:
    """The adapter names every lora_ext layer of the model holds, active one first."""
    found = _layers_or_raise(model)
    names = found[0][1].adapter_names
    return [n for n in names if all(n in m.adapter_names for _, m in found)]


def active_adapter(model: nn.Module) -> str:
    actives = {m.active_adapter for _, m in _layers_or_raise(model)}
    if len(actives) != 1:
        raise RuntimeError(f"lora_ext layers disagree on the active adapter: {sorted(actives)}")
    return actives.pop()


def set_adapter(model: nn.Module, name: str) -> None:
    """Makes adapter `name` active in every lora_ext layer. All layers are checked (they hold it, its
    values are finite) before the first one changes."""
    found = _layers_or_raise(model)
    with model_lock(model).write():
        _set_adapter(found, name)


def _set_adapter(found, name):
    for layer_name, m in found:
        if name not in m.adapter_names:
            raise KeyError(f"set_adapter: layer {layer_name!r} holds no adapter {name!r} "
                           f"(it holds {m.adapter_names})")
        if name != m.active_adapter:
            m.check_values(name, label=f"adapter {name!r} at {layer_name!r}")
    for _, m in found:
        m.set_adapter(name)


def delete_adapter(model: nn.Module, name: str) -> None:
    found = _layers_or_raise(model)
    if not any(m.has_adapter(name) for _, m in found):
        raise KeyError(f"delete_adapter: no lora_ext layer holds an adapter {name!r} "
                       f"(the model holds {adapter_names(model)})")
    with model_lock(model).write():
        for layer_name, m in found:
            if name == m.active_adapter:
                raise ValueError(f"delete_adapter: {name!r} is active at {layer_name!r}; set another adapter first")
        for _, m in found:
            if m.has_adapter(name):
                m.delete_adapter(name)


def merge_adapter(model: nn.Module) -> None:
    """Merges the active adapter into the weights of every lora_ext layer, whatever the train/eval mode.
    Every layer is checked (mergeable, finite values within the weight's range) before the first changes."""
    found = _layers_or_raise(model)
    with model_lock(model).write():
        for name, m in found:
            check_mergeable(name, m)
            if not m.merged:
                m.check_values(m.active_adapter, label=f"adapter {m.active_adapter!r} at {name!r}")
        for _, m in found:
            m.merge()


def unmerge_adapter(model: nn.Module) -> None:
    """Restores the base weights of every lora_ext layer (forwards then add the adapter on the fly)."""
    found = _layers_or_raise(model)
    with model_lock(model).write():
        for _, m in found:
            m.unmerge()
