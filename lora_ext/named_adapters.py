"""Named adapters of one LoRA layer: the registry, its finite-value stamps, and activation.

A layer holds one active adapter, whose factors are the live parameters `lora_A`/`lora_B` (so state dicts keep
loralib's keys), and any number of inactive ones, kept where they were given (on the device or in host memory).
`NamedAdapters` is a mixin of `layers.LoRALayer`: it owns which adapters exist and which is active; the layer
owns the merge state and is asked to replace a merged adapter (`_swap_merged`) when the active one changes
while merged.

Adapter values are checked for non-finite values when they come in and again only after they changed: a check
costs a device sync, more than a switch's pass over a 4096 x 4096 weight on a GPU. What was found finite is
stamped with the tensors' version counters and storage (in-place writes and new storage void the stamp). Added
adapters are copied, and the live factors get storage of their own when they become active, so no tensor
outside the layer shares storage with them under another version counter. Writes through `.data` bypass
version counters, as they bypass autograd's checks: after such writes, call `check_values`.
"""
import contextlib
import contextvars
import os
import itertools
import math
import operator
import _signal
import signal
import threading
import unicodedata
import uuid
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from . import forks, ops, sharded, ties

Adapter = Tuple[Tensor, Tensor, float]  # (lora_A, lora_B, scaling)

MERGED = object()  # the stamp key of the merged snapshot (the factors the weight holds now)

# the warnings add_adapter gives while a change that may still be taken back runs (held_warnings), or None
_HELD_WARNINGS: contextvars.ContextVar = contextvars.ContextVar("lora_ext_held_warnings", default=None)


# the numbers of adapters' generations and value epochs (add_adapter, check_values), never reused in a process
_EPOCHS = itertools.count(1)


@contextlib.contextmanager
def held_warnings():
    """Holds back, in this context, the warnings add_adapter gives about Parameters it replaces: yields their list
    of (message, category), for the caller to give once its change stands (a load that is taken back gives those
    Parameters back, and the warnings would then be wrong)."""
    held: list = []
    token = _HELD_WARNINGS.set(held)
    try:
        yield held
    finally:
        _HELD_WARNINGS.reset(token)


def _warn(message: str, category=UserWarning, stacklevel: int = 1) -> None:
    held = _HELD_WARNINGS.get()
    if held is None:
        warnings.warn(message, category, stacklevel=stacklevel + 1)
    else:
        held.append((message, category))


def _stamp(lora_A, lora_B):
    """What identifies the values of a factor pair until one is written in place or given other storage: each
    tensor's token (`_token`: its id and a number on it), version counter and data pointer. A stamp keeps nothing
    alive and puts no weak reference on the tensors (torch's swap_tensors, which module.to() uses for DTensors and
    under set_swap_module_params_on_conversion, refuses those). Spelled out for two tensors: it runs on every switch.
    None for inference tensors (made under torch.inference_mode), which have no version counter: their
    values are checked again at each use."""
    if lora_A.is_inference() or lora_B.is_inference():
        return None
    if sharded.is_dtensor(lora_A) or sharded.is_dtensor(lora_B):
        return None  # checked at every use: a check is a collective, and every rank must make the same ones
    return (_token(lora_A), lora_A._version, _data_ptr(lora_A),
            _token(lora_B), lora_B._version, _data_ptr(lora_B))


def _fill_scales(scales, value: float) -> None:
    """Scale tensors given `value` in place (one made or converted under inference_mode inside it: inference_writes)."""
    for t in scales:
        with ops.inference_writes(t):
            t.fill_(value)


class _SwitchWrite:
    """A layer's switch to (or reload of) adapter `name`, from before its first write to the end of its bookkeeping
    (NamedAdapters._switch_write; a class: a switch is a hot path, and a generator's context costs a few
    microseconds more). An error once something was written (`started`: set by switch_started, which the weight's
    write marks and _after_switch_write call) leaves the layer broken (LoRALayer._switch_failed): what it serves is
    then no longer what its bookkeeping says. Also an exception Python raises between two statements, which no
    hold keeps out (an asynchronous exception, PyThreadState_SetAsyncExc, as thread-timeout tools raise; a signal
    handler of its own on SIGUSR1): before, one landing between the write and the bookkeeping left a layer saying
    its old adapter while it served the new one, and filed the new values under the old name."""
    __slots__ = ("layer", "name", "started", "outer")

    def __init__(self, layer, name):
        self.layer, self.name, self.started = layer, name, False

    def __enter__(self):
        self.outer = self.layer.__dict__.get("_open_switch")
        self.layer.__dict__["_open_switch"] = self
        return self

    def __exit__(self, kind, err, tb):
        if self.outer is None:
            self.layer.__dict__.pop("_open_switch", None)
        else:
            self.layer.__dict__["_open_switch"] = self.outer
        if err is not None and self.started:
            failed = getattr(self.layer, "_switch_failed", None)  # (LoRALayer)
            if failed is not None:
                failed(self.name, err)
        return False


def switch_started(layer) -> None:
    """The switches open on `layer` (_SwitchWrite) have begun writing: an error from now on leaves it broken."""
    guard = layer.__dict__.get("_open_switch")
    while guard is not None:
        guard.started = True
        guard = guard.outer


def _data_ptr(t):
    return sharded.local(t).data_ptr()  # a DTensor's storage is its local shard


TOKEN = "_lora_ext_id"
_tokens = itertools.count(uuid.uuid4().int >> 66)  # (a random start: tokens also travel in pickles)


def _token(t):
    """What names the tensor object t: its id with a number kept in its __dict__. Neither alone would do: an id is
    reused once t is gone, and copy.copy(t) copies the __dict__ (the copy, alive beside t, has another id). A weak
    reference would, but torch's swap_tensors refuses tensors that have one. swap_tensors also exchanges
    __dict__s: a swapped tensor loses its number, and its stamps their validity (its values are checked again)."""
    number = t.__dict__.get(TOKEN)
    if number is None:
        number = t.__dict__[TOKEN] = next(_tokens)
    return id(t), number


def _is(token, t) -> bool:
    """Whether `token` (from _token) names t."""
    return token[0] == id(t) and token[1] == t.__dict__.get(TOKEN)


def _unchanged(stamp, lora_A, lora_B):
    """Whether (lora_A, lora_B) are the stamped pair, unwritten since."""
    return (stamp is not None and _is(stamp[0], lora_A) and _is(stamp[3], lora_B)
            and stamp[1] == lora_A._version and stamp[4] == lora_B._version
            and stamp[2] == _data_ptr(lora_A) and stamp[5] == _data_ptr(lora_B))


def check_one_name(name, where: str) -> None:
    """Refuses a name that is not one adapter's (peft's set_adapter takes a list of adapters active together;
    a lora_ext layer serves one)."""
    if not isinstance(name, str):
        raise TypeError(f"{where}: takes one adapter's name (a str), not {name!r}: a lora_ext layer serves one "
                        f"active adapter; combine several into one with add_weighted_adapter, or serve each row "
                        f"its own with batch_adapters")


# The signals besides SIGINT whose Python handlers a hold holds back too: those a handler commonly raises from or
# acts on the model from (a timeout's SIGALRM, a preemption's SIGTERM handler that saves a checkpoint). Only where a
# Python handler is installed: under SIG_DFL the process ends and under SIG_IGN nothing runs. Not SIGUSR1, SIGUSR2
# or SIGQUIT: tools chain native handlers over Python's on those (faulthandler.register(..., chain=True) dumps
# tracebacks), which swapping the handler would unhook (signal.signal installs CPython's own again).
_ALSO_HELD = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGALRM", "SIGVTALRM", "SIGHUP") if hasattr(signal, n))


class deferred_interrupt:
    """Holds back Ctrl-C (SIGINT), and the other signals of _ALSO_HELD that have a Python handler, while a weight and
    its bookkeeping are written, and delivers them right after: a KeyboardInterrupt, a timeout's exception or a
    handler that saves the model then lands between whole merges or switches, never inside one (the model-level
    switch puts every layer back when it raises). Only the main thread receives signals; elsewhere this does nothing.
    Inside another one (a switch holds one around its merge pass, which holds its own) it does nothing: the
    outermost delivers at its end. A class over _signal, signal's C module: signal.signal's enum conversions cost
    ten times the call itself, and a merge cycle enters two of these (bench/NOTES-merge.md, host time)."""

    __slots__ = ("_caught", "_previous")
    _open = None  # the one open (only the main thread gets that far)

    def __enter__(self):
        self._caught = None
        if deferred_interrupt._open is not None or threading.current_thread() is not threading.main_thread():
            return self
        caught = []

        def hold(sig, frame):
            caught.append((sig, frame))
        previous = []  # (each noted before it is swapped: a handler raising in between finds it to put back)
        try:
            for sig in (signal.SIGINT, *_ALSO_HELD):
                handler = _signal.getsignal(sig)
                # (a handler Python cannot set again, None for one installed from C, is left alone)
                if callable(handler) or (sig == signal.SIGINT and handler in (signal.SIG_DFL, signal.SIG_IGN)):
                    previous.append((sig, handler))
                    _signal.signal(sig, hold)
            # (inside the try: an exception landing here, an asynchronous one, still puts the handlers back; the
            # `with` runs no __exit__ for an __enter__ that raised, and Ctrl-C would be held for good)
            self._previous = previous
            self._caught = caught
            deferred_interrupt._open = self
            return self
        except ValueError:  # not the main interpreter
            deferred_interrupt._open = self._caught = None  # (it was not open: this one got past the check)
            _restore(previous)
            return self
        except BaseException as err:
            # a signal not swapped yet whose handler raised: the ones swapped put back, the caught ones run, then it
            deferred_interrupt._open = self._caught = None
            _deliver_all(caught, dict(previous), _restore_catching(previous) or err)
            raise

    def deliver(self, *exc) -> None:
        """Ends the hold now (the handlers back) and delivers the signals caught meanwhile, here, in the order they
        came: the model-level operations call it inside their try, so that a KeyboardInterrupt (or a handler's
        exception) rolls the whole operation back and a handler that returns (or that itself switches adapters)
        runs after the operation, never between two layers. When a handler raises, the handlers of the other
        caught signals still run, and the first exception is raised after them. Nothing when this one is nested in
        another (that one delivers) or already delivered. It is the hold's __exit__ too (returning None: an
        exception in the block goes on)."""
        # (all inside the try: an exception landing on any line, an asynchronous one, still puts the handlers back,
        # where a hold left behind would keep Ctrl-C and SIGTERM held for good)
        try:
            caught = self._caught
            if caught is None:
                return
            pending = _restore_catching(self._previous)
            deferred_interrupt._open = self._caught = None  # (one statement: nothing lands between the two)
        except BaseException as err:
            caught = self._caught
            if caught is None:  # (nothing was held, or the hold was over already)
                raise
            pending = _restore_catching(self._previous) or err
            deferred_interrupt._open = self._caught = None
        _deliver_all(caught, dict(self._previous), pending)

    __exit__ = deliver


_FORKED_FROM_MAIN = [True]


def _hold_before_fork():
    _FORKED_FROM_MAIN[0] = threading.current_thread() is threading.main_thread()


def _hold_after_fork_in_child():
    """A child forked by another thread while the main thread held signals back (a DataLoader or multiprocessing
    worker started during a merge, a switch or a save) has no holder to deliver them: its SIGINT and the other held
    handlers stayed swapped for good (Ctrl-C and its SIGTERM handler ignored, R7), and every hold in it did nothing.
    The handlers are put back there, and the parent's caught signals dropped. (A fork from the main thread inside a
    hold carries that hold on: the child delivers at the block's end, as the parent does.)"""
    held = deferred_interrupt._open
    if held is not None and not _FORKED_FROM_MAIN[0]:
        deferred_interrupt._open = None
        with contextlib.suppress(BaseException):
            _restore_catching(held._previous)
        held._caught = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_hold_before_fork, after_in_child=_hold_after_fork_in_child)


def _restore(previous) -> None:
    """Puts every handler back (see _restore_catching), then raises what a signal landing meanwhile raised."""
    pending = _restore_catching(previous)
    if pending is not None:
        raise pending


def _restore_catching(previous) -> Optional[BaseException]:
    """Puts every handler back, each even when one put back before it raises meanwhile (a signal landing between
    two: that handler's exception is returned, for the caller to raise once the caught signals have run). A
    handler that cannot be set again (TypeError, ValueError: not the main interpreter) is skipped."""
    pending = None
    for sig, handler in previous:
        for _ in range(8):  # (set again after a landing signal's exception: signal() is idempotent)
            try:
                _signal.signal(sig, handler)
                break
            except (TypeError, ValueError):
                break
            except BaseException as e:
                pending = pending or e
    return pending


def _deliver_all(caught, previous, pending: Optional[BaseException]) -> None:
    """Runs the handler of each caught signal, in the order they came, every one even when one raises (Python
    would run the rest at its next check); then raises `pending` (a signal that landed as the handlers were put
    back) or the first exception a handler raised."""
    for sig, frame in caught:
        handler = previous[sig]
        try:
            if callable(handler):
                handler(sig, frame)
            elif sig == signal.SIGINT and handler == signal.SIG_DFL:
                raise KeyboardInterrupt
        except BaseException as e:
            pending = pending or e
    if pending is not None:
        raise pending


# The attribute of a lora_A Parameter that holds the scale tensors going with its values, by layer (_pair_scales).
SCALE_ATTR = "_lora_ext_scale"

MAX_NAME = 255  # a file name's limit on common file systems: peft saves an adapter under its name


@contextlib.contextmanager
def at_layer(path):
    """A refusal (ValueError: a lossless merge's exception overflow, ...) raised by one layer of a model's pass says
    which layer by its path in the model (`path`; a layer's own message names it by its constructor only)."""
    try:
        yield
    except ValueError as err:
        if path is not None and err.args and isinstance(err.args[0], str) and repr(path) not in err.args[0]:
            err.args = (f"layer {path!r}: {err.args[0]}", *err.args[1:])
        raise


def each_or_none(layers, do, undo, paths=None) -> None:
    """do(m) for every layer in turn, all or none: when one raises (a refusal, or a Ctrl-C held back during the pass
    and delivered at its end), undo(m) for those done (Ctrl-C held back) and the error raised, naming the layer by
    its path where `paths` (layer -> path in the model) has it (at_layer). A layer is noted before do(m), so that
    one an exception left part way (an asynchronous one, landing after its write) is undone too: undo(m) must leave
    a layer do(m) did not change as it is. Every undo runs even when one fails (noted on the error)."""
    done = []
    try:
        with deferred_interrupt() as held:
            for m in layers:
                done.append(m)
                with at_layer((paths or {}).get(m)):
                    do(m)
            held.deliver()
    except BaseException as err:
        failed = []
        with deferred_interrupt():
            for m in done:
                try:
                    undo(m)
                except Exception as again:
                    failed.append(f"{(paths or {}).get(m) or m._describe()} ({type(again).__name__}: {again})")
        if failed:
            err.add_note(f"lora_ext: undoing the layers done before the failure failed too, at {'; '.join(failed)}")
        raise


def as_integer(value) -> int:
    """`value` as a Python int: any integer (a numpy integer, a one-element integer tensor); TypeError for a bool (a
    bool tensor too: operator.index takes one) and anything else."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and (value.is_floating_point()
                                                                         or value.dtype == torch.bool)):
        raise TypeError(f"not an integer: {value!r}")
    return operator.index(value)


def check_rank(what: str, rank) -> int:
    """rank as a Python int: any integer (as_integer) of at least 1."""
    try:
        value = as_integer(rank)
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"{what}: expected a positive int, got {rank!r}")
    return value


def check_adapter_name(name) -> None:
    """Adapter names are non-empty strings without "." (peft's rule: names become parts of module paths),
    path separators or control characters, not only white space, of at most MAX_NAME bytes in UTF-8."""
    if (not isinstance(name, str) or not name.strip() or any(c in name for c in "./\\")
            or any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in name)
            or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 60 else repr(name[:60]) + "..."
        raise ValueError(f"adapter names must be non-empty strings of at most {MAX_NAME} UTF-8 bytes without "
                         f"'.', '/', '\\' or control characters, got {shown}")


def _refuse_lost_ranks(name: str, given, cast, layer, scaling) -> None:
    """Refuses factors whose cast to the live factors' dtype loses a part of their update that matters: float32 factors
    far below float16's range (A of 1e-9 with a scaling of 1e9), which a switch would serve as zeros or as subnormals
    of a few bits, while a mixed batch (which scales its slots) served them. The loss of the values below the dtype's
    normal range (ordinary rounding is not counted) is bounded per rank (row i of A with column i of B; each factor
    whole for a MergedLinear's groups) and refused when it passes 1/32 of the largest rank's term and half a unit of
    the weight's largest value (a loss no forward would show is kept)."""
    gA, gB = given
    if any(sharded.is_dtensor(t) or t.is_meta or not t.numel() for t in (*given, *cast)):
        return
    tiny = torch.finfo(cast[0].dtype).tiny, torch.finfo(cast[1].dtype).tiny
    wide = [t.detach().float() if t.element_size() < 4 else t.detach() for t in given]  # (float8: no comparisons)
    if all(bool((t.abs() >= low).logical_or(t == 0).all()) for t, low in zip(wide, tiny)):
        return  # (nothing below the normal range: the common case, one pass over each factor)
    a, b, ca, cb = (t.detach().double() for t in (gA, gB, *cast))
    dA, dB = ((g - c).abs() * (g.abs() < low) for g, c, low in ((a, ca, tiny[0]), (b, cb, tiny[1])))
    if a.shape[0] == b.shape[1]:  # B @ A: rank i is row i of A with column i of B
        mB = b.abs().amax(0)
        terms = a.abs().amax(1) * mB
        lost = dA.amax(1) * mB + ca.abs().amax(1) * dB.amax(0)
    else:
        terms = a.abs().amax() * b.abs().amax()
        lost = dA.amax() * b.abs().amax() + ca.abs().amax() * dB.amax()
    loss, size = float(lost.sum()) * abs(scaling), float(terms.max()) * abs(scaling)
    if loss <= size / 32:
        return
    weight = layer._weight_2d()
    if not sharded.is_dtensor(weight) and not weight.is_meta and weight.numel():
        if loss <= float(weight.detach().abs().max()) * torch.finfo(weight.dtype).eps / 2:
            return
    raise ValueError(f"{name}: cast to {layer._describe()}'s factor dtype {cast[0].dtype}, the factors would lose up to "
                     f"{loss:.3g} of an update whose largest rank term is {size:.3g} (values below the dtype's "
                     f"range become zeros or subnormals of a few bits); move part of the scale into the factors "
                     f"(scaling * B A is what counts), or give the layer's factors a wider dtype")


class NamedAdapters:
    """The named-adapter surface of a LoRA layer: adapter_names, has_adapter, get_adapter, add_adapter,
    delete_adapter, set_adapter, check_values; the active adapter's `scaling` (with its tensor for the
    kernels); and the layer's geometry for callers that build factors or call lora_ext.ops (factor_shapes,
    rank_of, block_ids, layout(), weight_2d()). The host class (layers.LoRALayer) provides `_lock`,
    `_streams`, `lora_A`/`lora_B`, `r`, `factor_shapes`, `_rank_rows`, `_weight_2d`, `_layout` and
    `_swap_merged`."""

    def _init_adapters(self) -> None:
        self.active_adapter = "default"
        self._adapters: Dict[str, Adapter] = {}  # inactive adapters, kept where they were given
        self._active_home = None  # where the active adapter goes back to when another becomes active
        self._finite_stamps = {}
        # Parameter identity across serving switches, which write other adapters into the live Parameters: the
        # inactive adapter whose own Parameters the live ones are (None: the active adapter's), and the active
        # adapter's own Parameter pair while it is served from someone else's (see _activate)
        self._owner = None
        self._active_own = None

    def _restore_adapters(self, state) -> None:
        """Defaults for pickles of older layers; stamps never survive a copy (its tensors are new)."""
        for key, value in (("active_adapter", "default"), ("_adapters", {}), ("_active_home", None),
                           ("_owner", None), ("_active_own", None)):
            self.__dict__.setdefault(key, value)
        self._finite_stamps = {}
        if "scaling" in self.__dict__:  # older layers kept the scaling as a plain attribute
            self.scaling = self.__dict__.pop("scaling")

    # -- the active adapter's scaling ---------------------------------------------------------------------
    #
    # A float, and the same value in a one-element tensor beside the factors (`_scaling_t`; float32, float64 for
    # float64 factors) that the CUDA forward kernels read when they run, and that traced forwards (torch.compile,
    # torch.export, torch.jit.trace) take as the scale: a captured CUDA graph or a traced program of an unmerged
    # forward then follows a switch to an adapter with another scaling. Setting `scaling` updates both.
    #
    # The tensor belongs to the live lora_A Parameter object (its attribute SCALE_ATTR, per layer: _pair_scales):
    # whatever writes an adapter's values into a Parameter pair writes that adapter's scaling into the pair's
    # tensors (the setter for the live pair, _take_values for the others), and live Parameters that are new
    # objects (a trainable switch, load_state_dict(assign=True), a .to() that makes new Parameters) get their own
    # tensor. So a program that holds a pair and its tensor (torch.export, torch.jit.trace) always serves one
    # adapter whole: the one whose values the pair holds, never those values at another adapter's scaling.

    @property
    def scaling(self) -> float:
        try:
            return self.__dict__["_scaling"]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no scaling (it was built with r=0)") from None

    @scaling.setter
    def scaling(self, value: float) -> None:
        value = ops.finite_real("scaling", value)
        self.__dict__["_scaling"] = value
        # the active adapter's values were checked with the old scaling: check again before the next write
        self.__dict__.get("_finite_stamps", {}).pop(self.__dict__.get("active_adapter"), None)
        self._sync_scale_tensor()

    def __setattr__(self, name, value):
        if name == "scaling" and isinstance(value, nn.Parameter):  # (nn.Module would register it, past the setter)
            NamedAdapters.scaling.fset(self, value)
            return
        super().__setattr__(name, value)

    def _pair_scales(self, param: Tensor) -> List[Tensor]:
        """This layer's scale tensors that go with Parameter `param`'s values: each holds the scaling of the adapter
        whose values `param` holds. Kept on the Parameter (SCALE_ATTR: a dict by layer, so layers sharing one
        Parameter keep their own), a list because a .to() round trip (float32 -> float64 -> float32, CUDA -> CPU)
        adds tensors that programs made before may hold."""
        key = self.__dict__.get("_scale_key")
        if key is None:
            key = self.__dict__["_scale_key"] = uuid.uuid4().hex
        table = param.__dict__.get(SCALE_ATTR)
        if not isinstance(table, dict):
            table = {}
            setattr(param, SCALE_ATTR, table)
        return table.setdefault(key, [])

    def _fill_pair_scales(self, param: Tensor, scaling: float) -> None:
        """The values of adapter (scaling) were written into `param`: its scale tensors hold that scaling."""
        _fill_scales(self._pair_scales(param), scaling)
        self._note_factor_write()

    def _note_factor_write(self) -> None:
        """New values in the live factors or their scale tensor (a switch in place, a load): a count, as a string,
        which a forward compiled under inductor's freezing guards on (layers.LoRALayer._scales: freezing folds what
        aten ops compute from the factors into constants, a convolution's delta or autocast's casts of them; X1: a
        compiled forward served the adapter switched away from, 101 off)."""
        self.__dict__["_factor_writes"] = str(int(self.__dict__.get("_factor_writes", "0")) + 1)

    def _sync_scale_tensor(self) -> None:
        """`_scaling_t` made the live lora_A's scale tensor (see above) on its device, in the dtype the factors take
        (a new one where it has none), and every scale tensor of the live pair given the scaling, in place."""
        live = self._parameters.get("lora_A")
        if live is None:
            live = getattr(self, "lora_A", None)  # (a parametrization's output, or a plain attribute)
        if live is None or "_scaling" not in self.__dict__:
            return
        dtype = torch.float64 if live.dtype == torch.float64 else torch.float32
        owned = self._pair_scales(live)
        t = next((o for o in owned if o.device == live.device and o.dtype == dtype and o.shape == (1,)), None)
        if t is None:
            with torch.inference_mode(False):  # (a normal tensor: made by a forward under inference_mode, it could be
                # written only there, and a switch or .to() outside would raise after writing the factors)
                t = torch.full((1,), self.scaling, dtype=dtype, device=live.device)
            owned.append(t)
        _fill_scales(owned, self.scaling)
        self._note_factor_write()
        self.__dict__.update(_scaling_t=t, _scale_owner=live)

    def _scale_owner_changed(self) -> bool:
        """Whether the registered lora_A is not the Parameter the scale tensor was synced for: it was replaced
        behind the layer's back (assigned into _parameters directly, as accelerate's loading does, or left by
        remove_parametrizations)."""
        live = self._parameters.get("lora_A")
        return live is not None and live is not self.__dict__.get("_scale_owner")

    def _adopt_scale_tensor(self) -> None:
        """After a deep copy or an unpickle: a key of the copy's own (layers that share a Parameter keep their own
        tensors, a copy and its original too), the copied pair's tensors moved under it, and the copied scale tensor
        given back to the live pair (nn.Parameter's deepcopy drops the Parameter's attributes)."""
        old = self.__dict__.pop("_scale_key", None)
        t = self.__dict__.get("_scaling_t")
        live = self._parameters.get("lora_A")
        if live is None:
            return
        table = live.__dict__.get(SCALE_ATTR)
        moved = table.pop(old, []) if isinstance(table, dict) and old is not None else []
        owned = self._pair_scales(live)
        owned.extend(o for o in moved if not any(o is k for k in owned))
        if isinstance(t, Tensor):
            if not any(o is t for o in owned):
                owned.append(t)
            self.__dict__["_scale_owner"] = live

    def _apply(self, fn, recurse=True):
        """After module.to(...) and the like: the scale tensor goes where lora_A is (new Parameters, or a new device
        or dtype: a new one)."""
        module = super()._apply(fn, recurse)
        if self.has_lora:
            self._sync_scale_tensor()
        return module

    def _scale_tensor_for(self, x: Tensor) -> Optional[Tensor]:
        """The scale tensor the forward kernels read, when it lies on x's device."""
        t = self.__dict__.get("_scaling_t")
        return t if t is not None and t.device == x.device else None

    # -- geometry ---------------------------------------------------------------------------------------

    @property
    def has_lora(self) -> bool:
        return self._parameters.get("lora_A") is not None or getattr(self, "lora_A", None) is not None

    def factor_shapes(self, r: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """(lora_A shape, lora_B shape) of a rank-r adapter for this layer."""
        raise NotImplementedError

    def _rank_rows(self) -> int:
        return 1

    def rank_of(self, lora_A: Tensor) -> int:
        """The adapter rank r of factors with lora_A's shape (lora_A has r * (rows per rank) rows)."""
        return lora_A.shape[0] // self._rank_rows()

    def layout(self) -> Dict[str, Any]:
        """This layer's layout arguments for lora_ext.ops (num_blocks, block_ids, transposed)."""
        return {"num_blocks": 1, "block_ids": [0], "transposed": False, **self._layout()}

    def weight_2d(self) -> Tensor:
        """The weight as the 2-D matrix the ops write (a view; a convolution's weight is reshaped, a copy when it
        is not contiguous: channels_last)."""
        return self._weight_2d()

    def _describe(self) -> str:
        return f"{type(self).__name__}{tuple(self._weight_2d().shape)}"

    @property
    def block_ids(self) -> List[int]:
        """The enabled output blocks ([0] for a layer that is not a MergedLinear)."""
        return list(self.layout()["block_ids"])

    def _create_factors(self, weight: Tensor) -> None:
        """Creates lora_A/lora_B of rank self.r beside `weight` (same dtype and device) and freezes it."""
        a_shape, b_shape = self.factor_shapes(self.r)
        self.lora_A = nn.Parameter(weight.new_zeros(a_shape))
        self.lora_B = nn.Parameter(weight.new_zeros(b_shape))
        self.scaling = self.lora_alpha / self.r
        weight.requires_grad = False

    def reset_lora_parameters(self) -> None:
        self._check_unloaded()
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    # -- the registry -----------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> List[str]:
        return [self.active_adapter, *self._adapters]

    def has_adapter(self, name: str) -> bool:
        return name == self.active_adapter or name in self._adapters

    def is_placeholder(self, name: str) -> bool:
        """Whether adapter `name` is a stand-in of zeros in a layer the adapter does not target, so that the layer
        serves the base for it, as peft's layers do for an adapter that does not target them: made by the model-level
        set_adapter for the layers that lack the adapter, and by load_peft_adapter(activate=False) for the model's
        active adapter in the layers it injects. Saves skip it; a load of `name` replaces it."""
        return name in self.__dict__.get("_placeholders", ())

    def is_stand_in(self, name: str) -> bool:
        """Whether the layer serves adapter `name` as a stand-in of zeros: is_placeholder, and its factors still all
        zeros (values written into one since, by load_state_dict or an optimizer, make it the layer's own adapter,
        which saves and combinations take as the layer serves it). Reads the factors (a device sync)."""
        if not self.is_placeholder(name):
            return False
        A, B, _ = self._adapter(name)
        return not any(bool(sharded.local(t).detach().any()) for t in (A, B))  # (a shard: no collective)

    def add_placeholder(self, name: str) -> None:
        """Adapter `name` as zeros of rank 1 (see is_placeholder; a mixed batch's slots need no more rank for it), or
        of the reserved rank (reserve_rank), or of the live factors' full shapes where they are sharded (a rank
        change there is refused); scaling 1."""
        A, B = self.lora_A, self.lora_B
        shapes = (A.shape, B.shape) if sharded.is_dtensor(A) else self.factor_shapes(self.reserved_rank or 1)
        self.add_adapter(name, torch.zeros(shapes[0], dtype=A.dtype, device=A.device),
                         torch.zeros(shapes[1], dtype=B.dtype, device=B.device), 1.0)
        self.__dict__.setdefault("_placeholders", set()).add(name)

    def get_adapter(self, name: str) -> Adapter:
        """(lora_A, lora_B, scaling) of a named adapter; the active one's are the live parameters. The tensors
        themselves, not copies: add_adapter of the same name writes its new values into the active adapter's live
        factors and into an inactive adapter's own Parameters (clone what you keep)."""
        held = self._adapter(name)
        if name != self.active_adapter:  # (handed out: a layer given them as factors must find this one holding them)
            for t in held[:2]:
                ties.note_factor(t, self)
        return held

    def _not_held(self, name: str) -> KeyError:
        """The KeyError for an adapter this layer does not hold."""
        msg = f"adapter {name!r} is not in this layer (it holds {self.adapter_names})"
        if self.active_adapter in self._adapters:  # (the store holds the adapter this layer serves: another's)
            msg = (f"adapter {name!r} is not in this layer: it shares its store of adapters with a copy of it "
                   f"(copy.copy) that switched adapters (the store holds the copy's {sorted(self._adapters)}); "
                   f"switch adapters in one of the two only")
        return KeyError(msg)

    def _adapter(self, name: str) -> Adapter:
        """get_adapter without noting the tensors handed out (lora_ext's own reads)."""
        if name == self.active_adapter:
            return self.lora_A, self.lora_B, self.scaling
        if name not in self._adapters:
            raise self._not_held(name)
        return self._adapters[name]

    # -- a reserved rank: every switch in the same storage ------------------------------------------------

    @property
    def reserved_rank(self) -> Optional[int]:
        """The rank every adapter of this layer is held at (reserve_rank), or None."""
        return self.__dict__.get("_reserved_rank")

    def pad_factors(self, lora_A: Tensor, lora_B: Tensor, rank: int) -> Tuple[Tensor, Tensor]:
        """The factors of a rank-r adapter (r <= rank) as a rank-`rank` adapter of the same update B @ A: new tensors
        (same dtype and device) with zeros in the added ranks, or the factors themselves when r == rank."""
        r = self.rank_of(lora_A)
        if r == rank:
            return lora_A, lora_B
        if r > rank:
            raise ValueError(f"{self._describe()}: a rank-{r} adapter cannot be held at rank {rank}")
        a_shape, b_shape = self.factor_shapes(rank)
        A, B = lora_A.new_zeros(a_shape), lora_B.new_zeros(b_shape)
        with torch.no_grad():
            self._place_ranks(A, B, lora_A, lora_B, r, rank)
        return A, B

    def _place_ranks(self, A: Tensor, B: Tensor, lora_A: Tensor, lora_B: Tensor, r: int, rank: int) -> None:
        """Writes a rank-r pair into the first ranks of zeros of rank `rank` (the ranks are the leading rows of A
        and columns of B; MergedLinear's A holds them block by block)."""
        A[:lora_A.shape[0]] = lora_A
        B[:, :lora_B.shape[1]] = lora_B

    def _rank_used(self, lora_A: Tensor, lora_B: Tensor) -> Tensor:
        """Per rank, whether A's rows or B's columns of it hold a nonzero value (bool, one per rank)."""
        r = self.rank_of(lora_A)
        return lora_A.reshape(r, -1).ne(0).any(1) | lora_B.reshape(lora_B.shape[0], r, -1).ne(0).any(2).any(0)

    def _take_ranks(self, lora_A: Tensor, lora_B: Tensor, r: int) -> Tuple[Tensor, Tensor]:
        """The first r ranks of a pair (views where the layout allows)."""
        per = lora_A.shape[0] // self.rank_of(lora_A)
        return lora_A[:r * per], lora_B[:, :lora_B.shape[1] // self.rank_of(lora_A) * r]

    def reserve_rank(self, rank: int) -> None:
        """See _reserve; refuses trainable factors (an optimizer built over them would hold the old shapes: freeze
        them, reserve, then train again with an optimizer built after)."""
        rank = check_rank("rank", rank)
        with self._lock:
            sharded.reshard_if_gathered(self)  # (all-gathered factors are plain tensors: the sharded ones are refused)
            self._check_reserve(rank, frozen=True)
        self._reserve(rank)

    def _check_reserve(self, rank: int, *, frozen: bool = False) -> Dict[str, int]:
        """A reserve's refusals (ValueError, before anything changes): a layer built with r=0, sharded (DTensor)
        factors, an adapter held at a rank above `rank` and, with `frozen`, factors that require grad (reserve_rank's
        own: loads and inject reserve the layers they create before anything trains them). The ranks held, by
        adapter. Under the layer's lock."""
        if not self.has_lora:
            raise ValueError(f"{self._describe()} was built with r=0 and holds no adapter")
        self._check_plain_factors("reserve_rank")  # (it pads the live factors)
        if sharded.is_dtensor(self.lora_A) or sharded.is_dtensor(self.lora_B):
            raise ValueError(f"{self._describe()}: the live factors are DTensors (FSDP2 or tensor parallelism), "
                             f"whose shapes a reserve would change; reserve the rank before sharding")
        held = {n: self.rank_of(self._adapter(n)[0]) for n in self.adapter_names}
        over = {n: r for n, r in held.items() if r > rank}
        if over:
            n, r = max(over.items(), key=lambda kv: kv[1])
            raise ValueError(f"rank {rank} is below the rank {r} of adapter {n!r} in {self._describe()}"
                             + (f" (held at the rank {self.reserved_rank} reserved before: a reserve only grows)"
                                if self.reserved_rank is not None else ""))
        if ties.factors_held_elsewhere(self, (self._parameters.get("lora_A"), self._parameters.get("lora_B"))):
            raise ValueError(f"{self._describe()}: its live factors are (or were) shared with another lora_ext layer "
                             f"(`l2.lora_A = l1.lora_A`, a copy.copy); a reserve pads them in place, which would "
                             f"change that layer's shapes too: give each layer Parameters of its own first")
        if frozen and self._trainable():
            raise ValueError(f"{self._describe()}: its factors require grad, and reserve_rank gives them another shape "
                             f"(an optimizer built over them would hold the old shapes); freeze them "
                             f"(requires_grad_(False)), reserve, then mark_only_lora_as_trainable and build the "
                             f"optimizer")
        aside = [n for n in self.adapter_names if n != self.active_adapter
                 and any(isinstance(t, Tensor) and t.requires_grad for t in self._adapter(n)[:2])]
        if frozen and aside:  # (a trained adapter set aside by a switch keeps its own Parameters: padded in place,
            # an optimizer over them crashed at its next step, u6)
            raise ValueError(f"{self._describe()}: adapter {aside[0]!r}, set aside by a switch, holds factors that "
                             f"require grad (its own Parameters, which an optimizer may hold), and reserve_rank gives "
                             f"them another shape; freeze them (`for t in layer.get_adapter({aside[0]!r})[:2]: "
                             f"t.requires_grad_(False)` in each layer, or set_adapter to it and freeze the model's "
                             f"factors), then reserve")
        return held

    def _reserve(self, rank: int) -> None:
        """Holds every adapter of this layer at rank `rank` from now on (peft's prepare_model_for_compiled_hotswap
        pads to a target rank alike): the adapters held now, later ones (added, loaded, stand-ins of zeros) and the
        live factors, padded with zeros, which leaves every update B @ A as it was. Every switch between frozen
        factors then writes into the live storage, so a CUDA graph captured after this call serves whatever adapter
        is switched to, and torch.compile sees one shape. The live factors get new storage now (once: capture after
        it). Each adapter's own rank is remembered (own_factors: saves and combinations take the adapter at it). A
        rank below the layer's (the largest adapter's, or one reserved before) is refused, as are sharded (DTensor)
        factors, an open mixed batch and a rank there is no memory for; nothing changes then. (Loads and inject
        reserve the layers they create through this, before anything trains them.)"""
        self._apply_reserve(self._plan_reserve(rank))

    def _plan_reserve(self, rank: int):
        """Every check of a reserve, and the padded factors it writes (allocated here: a lack of memory is refused
        before anything changes); None when the layer holds that rank already."""
        with self._lock:
            held = self._check_reserve(rank)
            if self.__dict__.get("_open_batches"):
                raise RuntimeError(f"{self._describe()}: reserve_rank while a mixed batch (lora.batch_adapters) "
                                   f"serves this layer; reserve after the block closes")
            if all(r == rank for r in held.values()) and self.reserved_rank == rank:
                return None
            try:
                stored = {n: self.pad_factors(A.detach(), B.detach(), rank) for n, (A, B, _) in self._adapters.items()}
                live = self.pad_factors(self.lora_A.detach(), self.lora_B.detach(), rank)
            except RuntimeError as e:  # (torch.OutOfMemoryError too)
                if "alloc" not in str(e).lower() and not isinstance(e, torch.OutOfMemoryError):
                    raise
                raise RuntimeError(f"{self._describe()} has no memory for its adapters at rank {rank} "
                                   f"({len(held)} adapter(s)); nothing changed: reserve a lower rank") from None
            return rank, held, stored, live

    def _apply_reserve(self, plan) -> None:
        """Writes a reserve planned by _plan_reserve (nothing here allocates beyond the plan or can be refused)."""
        if plan is None:
            return
        rank, held, stored, (live_pad_A, live_pad_B) = plan
        with self._lock, deferred_interrupt():
            own = self.__dict__.setdefault("_own_ranks", {})
            for n, r in held.items():
                own.setdefault(n, r)  # (the rank an adapter had when it was first padded)
            for n, padded in stored.items():
                A, B, s = self._adapters[n]
                known = self._known_finite(n)
                if isinstance(A, nn.Parameter):  # an adapter's own pair (trained before): the same objects
                    with torch.inference_mode(False):
                        A.data, B.data = padded
                else:
                    self._adapters[n] = (*padded, s)
                self._stamp_finite(n, known)
            live_A, live_B = self.lora_A, self.lora_B
            if self.rank_of(live_A) != rank:
                known = self._known_finite(self.active_adapter)
                self._streams.retire(live_A.data, live_B.data)
                with torch.inference_mode(False):
                    live_A.data, live_B.data = live_pad_A, live_pad_B
                self.__dict__.update(r=rank, lora_alpha=self.scaling * rank)
                self._stamp_finite(self.active_adapter, known)
            # (an adapter's own pair kept aside while another's Parameters serve it takes the padded values when
            # it comes back: _take_values gives it new storage where the shapes differ)
            self.__dict__["_reserved_rank"] = rank
            self._note_factors(*(t for n in stored for t in self._adapters[n][:2] if isinstance(t, nn.Parameter)),
                               moved=True)

    def own_factors(self, name: str, factors: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        """Adapter `name`'s factors at its own rank: in a reserved layer without the padding (the rank it had when
        it was padded, or more where values were written into the padding since); elsewhere as held. factors:
        the adapter's (lora_A, lora_B) to take them from (save_peft_adapter's: sharded ones gathered whole)."""
        A, B = factors if factors is not None else self._adapter(name)[:2]
        A, B = A.detach(), B.detach()
        if self.reserved_rank is None:
            return A, B
        used = self._rank_used(A, B).nonzero()
        r = max(self.__dict__.get("_own_ranks", {}).get(name, 1), int(used[-1]) + 1 if used.numel() else 1)
        return self._take_ranks(A, B, r) if r < self.rank_of(A) else (A, B)

    def check_adapter(self, lora_A: Tensor, lora_B: Tensor, scaling: float, name: str = "adapter",
                      values: bool = True) -> None:
        """Raises ValueError unless the factors fit this layer and (values=True) all values are finite."""
        if not self.has_lora:
            raise ValueError(f"{name}: this layer was built with r=0 (or, a MergedLinear, with no group in "
                             f"enable_lora) and holds no adapter")
        for what, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"{name}: {what} must be a 2-D tensor, got {getattr(t, 'shape', type(t))}")
            if not t.is_floating_point():  # a complex factor would lose its imaginary part in the switch
                raise ValueError(f"{name}: {what} must be a floating-point tensor, got {t.dtype}")
        r = self.rank_of(lora_A)
        want = self.factor_shapes(max(r, 1))
        if r < 1 or (tuple(lora_A.shape), tuple(lora_B.shape)) != want:
            raise ValueError(f"{name}: factors of shape {tuple(lora_A.shape)} and {tuple(lora_B.shape)} do not fit "
                             f"this layer; a rank-{max(r, 1)} adapter needs {want[0]} and {want[1]}")
        if self.reserved_rank is not None and r > self.reserved_rank:
            raise ValueError(f"{name}: rank {r} is over the rank {self.reserved_rank} that reserve_rank fixed for "
                             f"{self._describe()} (every adapter is held at that rank, padded with zeros, so that "
                             f"switches keep the storage a captured CUDA graph reads); reserve a rank of at least {r} "
                             f"first (captures must then be redone)")
        if values:
            for what, t in (("lora_A", lora_A), ("lora_B", lora_B)):
                if t.is_meta:
                    raise ValueError(f"{name}: {what} is on the meta device: it holds no values to add")
            self._check_as_live(name, lora_A, lora_B, scaling)

    def add_adapter(self, name: str, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        """Adds (or replaces) a named adapter, copying its factors. Replacing the active one changes the
        layer at once (in one pass over the weight when merged); any other adapter is kept where it was
        given (device or host memory) until set_adapter makes it active. An adapter's own Parameters (the live
        ones of the active adapter, those an inactive adapter trained with) keep their identity when the shapes
        stay (and, inactive, the dtype): the new values are written into them, so an optimizer built before trains
        the new values; otherwise (a rank change of the active, trainable adapter; a rank or dtype change of an
        inactive one's own pair) the adapter gets new Parameters, with a warning."""
        try:
            self._check_unloaded()
            check_adapter_name(name)
            self.check_adapter(lora_A, lora_B, scaling, name=repr(name))
        except Exception as err:  # (the active adapter's replacement writes through collectives on a sharded
            # weight: a refusal this rank alone makes is told to the others, whose write refuses then, F2)
            weight = self._weight_or_none() if name == self.active_adapter else None
            if weight is not None and sharded.is_dtensor(weight):
                sharded.refuse_alike(weight, err, f"{self._describe()}: add_adapter({name!r})")
            raise
        own = self.rank_of(lora_A)
        if self.reserved_rank is not None:  # held at the reserved rank, zeros in the ranks it lacks
            lora_A, lora_B = self.pad_factors(lora_A.detach(), lora_B.detach(), self.reserved_rank)
        with self._lock:
            if self.__dict__.get("_open_batches") and name == self.active_adapter and self.merged:
                # (other replacements leave an open batch its slots' copies; this one rewrites the weight it reads)
                raise RuntimeError(f"{self._describe()}: add_adapter would replace adapter {name!r}, which the weight "
                                   f"holds merged, while a mixed batch (lora.batch_adapters) serves this layer: the "
                                   f"weight would change under the batch's rows; replace it after the block closes")
            # (counted for every name, active or not, before the write: a backward under FSDP2 refuses after it, as
            # after a switch, layers._served_state; an inactive adapter replaced, then switched back to, was
            # let through and its gradients were the new factors' (46.5 off, v1))
            # (numbers of one process-wide count, never reused: a name deleted and added again gets a new one, so
            # delete_adapter drops the name's entries; M1: kept, they grew by one a name ever held)
            self.__dict__.setdefault("_generations", {})[name] = next(_EPOCHS)
            self.__dict__.setdefault("_value_epochs", {})[name] = next(_EPOCHS)
            if name == self.active_adapter:
                live, rank = self._parameters.get("lora_A"), self.r
                with deferred_interrupt(), self._switch_write(name):
                    self._activate(name, lora_A, lora_B, float(scaling))  # which makes the live factors' own copy
                if self._trainable() and self._parameters.get("lora_A") is not live:
                    why = (f"its rank changed from {rank} to {self.r}" if self.r != rank else
                           "the live Parameters were another adapter's own (see settle_parameters)")
                    _warn(f"{self._describe()}: add_adapter gave the active, trainable adapter {name!r} new "
                          f"lora_A/lora_B Parameter objects ({why}); an optimizer built over the old ones no "
                          f"longer trains it: build it again", stacklevel=2)
            else:
                stored = self._adapters.get(name)
                own_pair = stored is not None and all(isinstance(t, nn.Parameter) for t in stored[:2])
                with deferred_interrupt():  # (Ctrl-C lands before or after both factors)
                    if own_pair and all(t.shape == n.shape and t.dtype == n.dtype
                                        for t, n in zip(stored[:2], (lora_A, lora_B))):
                        # the adapter's own Parameters (it trained before): its new values (and scaling, for the
                        # pair's scale tensors) written into them, as peft's load writes them, so an optimizer built
                        # over them trains it on after the next switch
                        self._streams.write(stored[0].device)
                        pair = self._take_values(stored[:2], lora_A, lora_B, float(scaling))
                        self._adapters[name] = (*pair, float(scaling))
                    else:
                        self._adapters[name] = (lora_A.detach().clone(), lora_B.detach().clone(), float(scaling))
                    self._stamp_finite(name)
                if own_pair and self._adapters[name][0] is not stored[0]:
                    why = ("factors of another rank than" if stored[0].shape != lora_A.shape
                           or stored[1].shape != lora_B.shape else "factors of another dtype than"
                           if stored[0].dtype != lora_A.dtype or stored[1].dtype != lora_B.dtype
                           else "new Parameters in place of")
                    _warn(f"{self._describe()}: add_adapter gave adapter {name!r} {why} its own Parameters (it "
                          f"trained with them{'' if why[0] == 'f' else '; another lora_ext layer holds them too'}), "
                          f"which it drops; an optimizer built over them no longer trains it: build it again",
                          stacklevel=2)
            self.__dict__.get("_placeholders", set()).discard(name)  # a real adapter from now on
            if self.reserved_rank is not None:
                self.__dict__.setdefault("_own_ranks", {})[name] = own

    def put_own_pair(self, name: str, pair: Tuple[Tensor, Tensor]) -> None:
        """Gives inactive adapter `name` back its own Parameters `pair` (an optimizer holds them), with the values they
        hold: a load that gave it factors of another rank (add_adapter dropped the pair) is being taken back."""
        if name == self.active_adapter:
            raise ValueError(f"{self._describe()}: put_own_pair of the active adapter {name!r}")
        with self._lock:
            self._adapters[name] = (*pair, self._adapters[name][2])
            self._stamp_finite(name)

    def put_live_pair(self, name: str, pair: Tuple[Tensor, Tensor]) -> None:
        """Gives active adapter `name` back the live Parameters `pair` (an optimizer holds them) it had before a load
        gave it factors of another rank (add_adapter registered new ones), with the values live now: that load is being
        taken back, and the values it had are live again."""
        if name != self.active_adapter:
            raise ValueError(f"{self._describe()}: put_live_pair of adapter {name!r}, which is not the active one")
        with self._lock, deferred_interrupt():
            live_A, live_B = self.lora_A, self.lora_B
            if any(p is t for held in self._adapters.values() for p in pair for t in held[:2]):
                raise ValueError(f"{self._describe()}: put_live_pair: the pair is another adapter's own")
            if any(p.shape != t.shape or p.dtype != t.dtype or p.device != t.device
                   for p, t in zip(pair, (live_A, live_B))):
                raise ValueError(f"{self._describe()}: put_live_pair: the pair's shapes, dtype or device are not the "
                                 f"live factors' ({tuple(live_A.shape)}, {tuple(live_B.shape)}, {live_A.dtype})")
            self._streams.write(live_A.device)
            pair = self._take_values(pair, live_A, live_B, self.scaling)
            for p, live in zip(pair, (live_A, live_B)):
                p.requires_grad_(live.requires_grad)
            self._put_values_pair(pair)
            self._finite_stamps[name] = _stamp(self.lora_A, self.lora_B)

    def delete_adapter(self, name: str) -> None:
        self._check_unloaded()
        if name == self.active_adapter:
            raise ValueError(f"adapter {name!r} is active; set another adapter active before deleting it")
        with self._lock:
            if name not in self._adapters:
                raise self._not_held(name)
            del self._adapters[name]
            self.__dict__.get("_dropouts", {}).pop(name, None)
            self.__dict__.get("_config_dropouts", {}).pop(name, None)
            self._finite_stamps.pop(name, None)
            self.__dict__.get("_placeholders", set()).discard(name)
            self.__dict__.get("_marked_trains", set()).discard(name)
            self.__dict__.get("_own_ranks", {}).pop(name, None)
            self.__dict__.get("_kept_grads", {}).pop(name, None)  # (sharded.swap_grads)
            self.__dict__.get("_generations", {}).pop(name, None)  # (numbers never reused: see add_adapter)
            self.__dict__.get("_value_epochs", {}).pop(name, None)
            if self._owner == name:  # the live Parameters are the active adapter's from now on
                self._owner = None

    def _agree_first(self, op: str, err: Optional[BaseException] = None, skip: bool = False,
                     adapter: Optional[Tuple[Tensor, Tensor, float]] = None, call: Optional[str] = None) -> None:
        """FSDP2: the ranks agree on the op (a switch, a merge) before its value checks or writes gather the live
        factors (sharded.agree: every sharded write begins with one agreement, so that ranks at other writes, or a
        rank that refused alone, are told there instead of pairing gathers with other collectives). `err`: this
        rank's refusal (raised, on the others as one on another rank; raised alone without FSDP2); skip=True: this
        rank skips the write (eval()'s warned refusal), the others skip it too. `adapter`: (lora_A, lora_B, scaling)
        the write puts in (the live ones by default); `call`: the call named in errors (the op by default)."""
        if self.has_lora and sharded.is_dtensor(self.lora_A):
            if skip:
                sharded.tell_refused(self.lora_A)  # (a failed group: eval() already warns of this rank's refusal)
                return
            lora_A, lora_B, scaling = adapter if adapter is not None else (self.lora_A, self.lora_B, self.scaling)
            sharded.agree(self.lora_A, op, f"{self._describe()}: {call or op}", (lora_A, lora_B), (scaling,), err=err)
        elif err is not None:
            raise err

    def set_adapter(self, name: str) -> None:
        """Makes a named adapter the active one; the previous one is kept under its name (moved back to
        where it was given). Merged: one pass over the weight, W += s2 B2 A2 - s1 B1 A1."""
        self._check_unloaded()
        if name == self.active_adapter:
            self.settle_parameters()
            return
        check_one_name(name, "set_adapter")
        if not self.has_adapter(name):  # (active: another thread switched to it since the check above; see below)
            # (FSDP2: an adapter only some ranks hold: the others are told at their switch's first agreement, R6)
            self._agree_first("switch", self._not_held(name), call=f"set_adapter({name!r})")
        self._check_plain_factors(f"set_adapter({name!r})")  # (before `old` below reads or writes any factor)
        with self._lock:
            if self.__dict__.get("_broken_factors"):  # (LoRALayer._switch_failed: the live factors are unknown, and
                # would be kept as the old adapter's values; a layer whose weight alone is unknown switches unmerged)
                self._check_sound()
            if name == self.active_adapter:  # another thread switched to it between the checks above and the lock
                self.settle_parameters()
                return
            if name not in self._adapters:  # (or deleted it)
                raise self._not_held(name)
            sharded.reshard_if_gathered(self)  # FSDP2: the live factors as the shards, not an all-gathered copy
            lora_A, lora_B, scaling = self._adapters[name]  # shapes checked by add_adapter
            refusal = None
            try:
                self._check_values(name)
            except Exception as err:
                refusal = err
            # (FSDP2: before the gathers below, the ranks agree on the switch and on this rank's own check of the
            # adapter's copy here, which another rank's may pass; F2: a rank that refused alone left the others
            # waiting in the gathers until the process group's timeout)
            self._agree_first("switch", refusal, adapter=(lora_A, lora_B, scaling), call=f"set_adapter({name!r})")
            refusal = self._batch_merge_refusal(name, (lora_A, lora_B, scaling)) if self.merged else None
            if refusal is not None:  # (a merged switch inside a mixed batch's block)
                raise ValueError(refusal)
            home = lora_A.device
            old_name, old_known = self.active_adapter, self._known_finite(self.active_adapter)
            old_home = self._active_home or self.lora_A.device
            if sharded.is_dtensor(self.lora_A):  # FSDP2 holds the live Parameters: the old values, gathered
                old = (sharded.full(self.lora_A).detach().clone(), sharded.full(self.lora_B).detach().clone(),
                       self.scaling)
            elif self._active_own is not None:  # its own Parameters, idle while it was served: its values back
                old = (*self._take_values(self._active_own, self.lora_A, self.lora_B, self.scaling), self.scaling)
            elif self._trainable() and self._owner is None:
                # the Parameter objects themselves, where they are: an optimizer's state stays with them
                old = (self.lora_A, self.lora_B, self.scaling)
            else:  # copies: a serving switch writes the new factors into the live storage
                old = (self.lora_A.detach().to(old_home, copy=True), self.lora_B.detach().to(old_home, copy=True),
                       self.scaling)
            with deferred_interrupt():  # Ctrl-C lands before or after the whole switch
                with self._switch_write(name):  # (an error once it wrote, up to the bookkeeping: the layer broken)
                    self._activate(name, lora_A, lora_B, scaling)
                    # the bookkeeping straight after the write (plain dict and attribute updates), before anything
                    # that can raise (a CUDA error surfacing at record_stream): the layer says what it serves
                    del self._adapters[name]
                    self._adapters[old_name] = old
                    # plain attributes straight into __dict__: nn.Module.__setattr__ costs more than a switch's kernel
                    self.__dict__.update(active_adapter=name, _active_home=home)
                    self._stamp_finite(old_name, old_known)
                    self._switch_dropout(old_name, name)  # (the old adapter's probability filed under its name)
                    self.__dict__.get("_marked_trains", set()).discard(name)  # (live now: the live flags say)
                self._streams.retire(lora_A, lora_B)

    # -- each adapter's lora_dropout -------------------------------------------------------------------------
    #
    # The layer has one lora_dropout module, the active adapter's. A peft adapter's own lora_dropout is recorded for
    # it (set_adapter_dropout), and a switch sets the module to the new adapter's probability (the old one's is kept
    # under its name), as peft's per-adapter dropout modules train. An adapter with no record trains with the module
    # as it is, a stand-in of zeros with none; a module of the user's (not exactly nn.Dropout / nn.Identity, or
    # hooked) is left alone.

    def _dropout_now(self) -> Optional[float]:
        """The active adapter's dropout probability; None for a module of the user's: another class (a subclass
        too) or one with hooks, which a switch would lose by putting another module in its place."""
        drop = self._modules.get("lora_dropout")
        if drop is None or drop._forward_hooks or drop._forward_pre_hooks or drop._backward_hooks:
            return None
        if type(drop) is nn.Dropout:
            return float(drop.p)
        return 0.0 if type(drop) is nn.Identity else None

    def adapter_dropout(self, name: str) -> Optional[float]:
        """The lora_dropout probability adapter `name` trains with (None: the layer's module is not a plain
        dropout, or the adapter has no record and is not active)."""
        self._check_holds(name)
        if name == self.active_adapter:
            return self._dropout_now()
        return self.__dict__.get("_dropouts", {}).get(name, self._dropout_now())

    def set_adapter_dropout(self, name: str, p: float) -> None:
        """Adapter `name` trains with lora_dropout probability `p` (a peft adapter's): at once if it is active, else
        from its next activation."""
        self._check_unloaded()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {p!r}")
        self._check_holds(name)
        with self._lock:
            if name == self.active_adapter:
                self._use_dropout(float(p))
            else:
                self.__dict__.setdefault("_dropouts", {})[name] = float(p)

    def _check_holds(self, name: str) -> None:
        if name not in self.adapter_names:
            raise self._not_held(name)

    def _switch_dropout(self, old_name: str, name: str) -> None:
        """After a switch from `old_name` to `name`: the module at `name`'s probability, the old one's kept. A
        stand-in of zeros (is_placeholder) computes nothing and draws no dropout mask, as peft's untargeted layers."""
        dropouts = self.__dict__.setdefault("_dropouts", {})
        p = 0.0 if self.is_placeholder(name) else dropouts.pop(name, None)
        now = self._dropout_now()
        if now is not None and not self.is_placeholder(old_name):
            dropouts[old_name] = now
        if p is not None:
            self._use_dropout(p)

    def _use_dropout(self, p: float) -> None:
        drop = self._modules.get("lora_dropout")
        if self._dropout_now() in (None, p):
            return
        if p > 0.0 and type(drop) is nn.Dropout:
            drop.p = p
        else:
            self._modules["lora_dropout"] = (nn.Dropout(p) if p > 0.0 else nn.Identity()).train(drop.training)

    def _check_plain_factors(self, what: str) -> None:
        """Refuses a switch while torch.nn.utils.parametrize computes lora_A or lora_B: the layer's attribute is
        then the parametrization's output, a new tensor at each read, so writing a switch into it would be lost
        (and the Parameter under it is not the factor). FSDP1's flat parameter first (with use_orig_params=False the
        factors are plain tensors set as attributes, which the checks below would take for a hook's)."""
        refusal = sharded.fsdp1_refusal(self, "a switch")
        if refusal is not None:
            raise ValueError(f"{what}: {refusal}")
        names = [n for n in ("lora_A", "lora_B") if torch.nn.utils.parametrize.is_parametrized(self, n)]
        if names:
            raise ValueError(f"{what}: {self._describe()} has a parametrization on {' and '.join(names)} "
                             f"(torch.nn.utils.parametrize), so a switch cannot write the live factors; remove it "
                             f"(parametrize.remove_parametrizations) before switching adapters")
        names, hows = self._hook_computed_factors()
        if names:
            raise ValueError(f"{what}: {self._describe()}'s {' and '.join(names)} "
                             f"{'is' if len(names) == 1 else 'are'} not a Parameter but computed by "
                             f"{' and '.join(h for h, _ in hows)}, so a switch cannot write the live factors; make "
                             f"it a Parameter again ({', '.join(r for _, r in hows)}) before switching adapters")
        # a weight or live factors on the meta device (an accelerate offload keeps their values in its hook, a model
        # built on meta has none yet): a write into them does nothing, and the forward would serve the old adapter
        names = [n for n in ("lora_A", "lora_B") if self.has_lora and getattr(self, n).is_meta]
        weight = self._weight_or_none()
        if self.merged and weight is not None and weight.is_meta:
            names.insert(0, "weight")
        if names:
            raise ValueError(f"{what}: {self._describe()}'s {' and '.join(names)} {'is' if len(names) == 1 else 'are'} "
                             f"on the meta device, so a switch would write nothing: {self._meta_refusal()}")

    def _hook_computed_factors(self) -> Tuple[list, list]:
        """(the factors a forward pre-hook computes, [(the tool, how to remove it)] sorted): torch.nn.utils.prune and
        the hook-based torch.nn.utils.weight_norm replace the Parameter by a plain attribute their forward pre-hook
        computes from other Parameters (lora_B_orig; lora_B_g and lora_B_v)."""
        names = [n for n in ("lora_A", "lora_B") if n not in self._parameters and n in self.__dict__]
        return names, sorted({self._computing_hook(n) for n in names})

    def _computing_hook(self, name: str) -> Tuple[str, str]:
        """(what computes factor `name` in a forward pre-hook, how to remove it): torch.nn.utils.prune, weight_norm or
        spectral_norm, told by the hook's class."""
        for hook in self._forward_pre_hooks.values():
            if getattr(hook, "_tensor_name", None) == name:  # a pruning method (or a container of them)
                return "torch.nn.utils.prune", f"torch.nn.utils.prune.remove(layer, {name!r})"
            if getattr(hook, "name", None) == name:
                kind = type(hook).__name__
                if kind == "WeightNorm":
                    return "torch.nn.utils.weight_norm", f"torch.nn.utils.remove_weight_norm(layer, {name!r})"
                if kind == "SpectralNorm":
                    return "torch.nn.utils.spectral_norm", f"torch.nn.utils.remove_spectral_norm(layer, {name!r})"
        return "a forward pre-hook", "remove the hook and register the factor as a Parameter"

    def _activate(self, name: str, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        """Makes (lora_A, lora_B, scaling) the live factors of adapter `name`; the caller holds the lock and
        has checked them (shapes and values).

        Serving switches (live factors that do not require grad, new factors of the same shapes) copy into
        the live storage, so a captured CUDA graph of a forward reads the new adapter on its next replay.
        Trainable factors: each adapter has its own Parameter pair, and a switch registers the new adapter's
        pair as lora_A/lora_B (an adapter that was trained before gets its own Parameter objects back), so an
        optimizer's state never follows one adapter into another, and a rank change never reaches it.
        Otherwise (a rank change while serving) the live factors get new storage: captures of this layer
        must be redone.

        A serving switch lends the live Parameter objects to the new adapter: the layer remembers whose own they
        are (`_owner`) and keeps the new adapter's own pair aside (`_active_own`), so that the next trainable
        switch, or settle_parameters (mark_only_lora_as_trainable), gives each adapter its own Parameters back
        with its values: an optimizer built for an adapter keeps training it after serving in between."""
        self._check_plain_factors(f"switching to adapter {name!r}")
        sharded.reshard_if_gathered(self)  # FSDP2: write the shards, not an all-gathered copy
        # the live factors must stay usable for training afterwards; inference tensors (a layer built or converted
        # under torch.inference_mode()) are written only inside inference mode, and never train
        with torch.inference_mode(self.lora_A.is_inference() or self.lora_B.is_inference()):
            self._activate_as_normal_tensors(name, lora_A, lora_B, scaling)
        note = getattr(self, "_note_factor_versions", None)  # (LoRALayer: the live factors hold what was merged)
        if note is not None:
            with self._after_switch_write(name):  # (after the write: a failure leaves the layer broken)
                note()

    def _put_values_pair(self, pair) -> None:
        """Puts `pair`, Parameters holding the live factors' values, in their place as lora_A/lora_B. Where the live
        Parameters were the ones merged (LoRALayer._factors_substituted), so is the pair; a Parameter put in their
        place since the merge is not, and is still served on the fly."""
        substituted = getattr(self, "_factors_substituted", None)  # (LoRALayer)
        merged_live = substituted is not None and not substituted()
        self._parameters["lora_A"], self._parameters["lora_B"] = pair
        for p in pair:
            ties.note_factor(p, self)
        if merged_live:
            self._note_merged_from()

    def _switch_write(self, name: str) -> _SwitchWrite:
        """Around a switch to (or reload of) adapter `name` and its bookkeeping: an error once it began writing
        leaves the layer broken (_SwitchWrite)."""
        return _SwitchWrite(self, name)

    def _after_switch_write(self, name: str):
        """Around what a switch to adapter `name` does after its merged write (the live factors written or put in
        place): the switch has begun writing (switch_started), and an error from there on leaves the layer broken.
        Outside a _switch_write (none calls it so), one of its own."""
        if self.__dict__.get("_open_switch") is None:
            guard = _SwitchWrite(self, name)
            guard.started = True
            return guard
        switch_started(self)
        return contextlib.nullcontext()

    def _activate_as_normal_tensors(self, name: str, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        live_A, live_B = self.lora_A, self.lora_B
        if sharded.is_dtensor(live_A):
            self._activate_sharded(name, lora_A, lora_B, scaling)
            return
        # an adapter trained before: its own Parameters (registered when trainable, else kept for when it is)
        has_own = (name in self._adapters and isinstance(lora_A, nn.Parameter) and isinstance(lora_B, nn.Parameter)
                   and lora_A.device == live_A.device and lora_A.dtype == live_A.dtype
                   and lora_B.device == live_B.device and lora_B.dtype == live_B.dtype)
        stored = (lora_A, lora_B) if has_own else None
        marked = self._marked_switch(name)
        own = has_own and (self._trainable() or marked)
        owner, home = self._owner, name == self._owner  # home: the live Parameters are this adapter's own
        if owner is None and name == self.active_adapter and live_A.shape == lora_A.shape \
                and live_B.shape == lora_B.shape:
            # add_adapter replacing the active adapter's values (a reload): its own live Parameters, written in place,
            # as peft's load writes them (an optimizer built over them keeps training the adapter)
            home = True
        serving = not own and not marked and (home or not self._trainable()) and live_A.shape == lora_A.shape \
            and live_B.shape == lora_B.shape  # a serving switch (or the live Parameters' own adapter)
        # live factors another layer holds too (`l2.lora_A = l1.lora_A`, a copy.copy): written in place they would
        # switch that layer as well; this layer takes Parameters of its own (its factors are untied from then on)
        shared = ties.factors_held_elsewhere(self, (live_A, live_B))
        if shared:
            serving, home, owner = False, False, None
        if not own and not (serving and not self.merged):
            # copies on the live parameters' device and dtype: storage no other tensor holds (a caller of
            # get_adapter may hold the stored tensors). An unmerged serving switch copies the stored values straight
            # into the live storage below instead (copy_ converts device and dtype): two copies fewer.
            lora_A = lora_A.detach().to(live_A.device, live_A.dtype, copy=True)
            lora_B = lora_B.detach().to(live_B.device, live_B.dtype, copy=True)
        self._swap_merged(lora_A.detach(), lora_B.detach(), scaling, name=name)
        with self._after_switch_write(name):  # (the weight holds the new adapter once merged)
            self._streams.write(live_A.device)
            if serving:
                with torch.no_grad():
                    live_A.copy_(lora_A)
                    live_B.copy_(lora_B)
                self._inference_values_written(live_A, live_B)
            elif own or shared or marked or (self._trainable() and not home):
                if owner is not None and owner in self._adapters:
                    # the live Parameters go back to their adapter (an optimizer built for it holds them)
                    oA, oB, o_scaling = self._adapters[owner]
                    self._adapters[owner] = (*self._take_values((live_A, live_B), oA, oB, o_scaling), o_scaling)
                    self._finite_stamps.pop(owner, None)
                owner = None
                if not own:
                    lora_A = nn.Parameter(lora_A, requires_grad=marked or live_A.requires_grad)
                    lora_B = nn.Parameter(lora_B, requires_grad=marked or live_B.requires_grad)
                else:  # the live factors' trainability, whatever the stored pair's was (or the mark's)
                    lora_A.requires_grad_(marked or live_A.requires_grad)
                    lora_B.requires_grad_(marked or live_B.requires_grad)
                self._parameters["lora_A"], self._parameters["lora_B"] = lora_A, lora_B
            else:
                self._streams.retire(self.lora_A.data, self.lora_B.data)
                self.lora_A.data = lora_A
                self.lora_B.data = lora_B
            if home:
                owner = None
            elif owner is None and name != self.active_adapter and self._parameters["lora_A"] is live_A:
                owner = self.active_adapter  # its own Parameters now serve `name`
            # the adapter's own Parameter pair, idle while its values are served from another's Parameters
            self.__dict__.update(_owner=owner, _active_own=stored if self._parameters["lora_A"] is live_A else None)
            r = self.rank_of(lora_A)
            self.__dict__.update(r=r, lora_alpha=scaling * r)
            self.scaling = scaling
            self._finite_stamps[name] = _stamp(self.lora_A, self.lora_B)
        if not serving:  # (new Parameters, or new storage under the live ones; a serving switch wrote them in place)
            self._note_factors(moved=True)

    def _activate_sharded(self, name: str, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        """FSDP2 holds the live factors (sharded DTensor Parameters it all-gathers in every forward): a switch
        writes the new adapter's values into their local shards, so it needs the live shapes (other ranks are
        refused before anything changes). An optimizer built over them keeps its state across the switch:
        build one per adapter you train."""
        live_A, live_B = self.lora_A, self.lora_B
        marked = self._marked_switch(name)  # (the live shards train from now on, as its own pair does unsharded)
        # in the live factors' dtype, as an unsharded switch makes them: a merged switch adds what the layer holds
        device = sharded.local(live_A).device
        lora_A = sharded.full(lora_A).detach().to(device, live_A.dtype)
        lora_B = sharded.full(lora_B).detach().to(device, live_B.dtype)
        if lora_A.shape != live_A.shape or lora_B.shape != live_B.shape:
            raise ValueError(f"{self._describe()}: the live factors are DTensors (FSDP2's fully_shard, or "
                             f"lora_ext.parallel's styles) of shapes {tuple(live_A.shape)} and "
                             f"{tuple(live_B.shape)}, which a switch writes in place; adapter {name!r} has "
                             f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)} (rank {self.rank_of(lora_A)}, live "
                             f"rank {self.r}). Hold every adapter at one rank before sharding (lora.reserve_rank(model, "
                             f"r), r at least {max(self.r, self.rank_of(lora_A))}), or switch before sharding")
        where = f"{self._describe()} adapter {name!r}"
        # live factors another layer holds too (tied before fully_shard or parallelize_module, or DTensors over the same
        # shards): written in place they would switch that layer as well (which kept its adapter's name), and a
        # sharded switch cannot give this layer DTensor Parameters of its own
        look = (id(live_A), id(live_B), sharded.local(live_A).data_ptr(), sharded.local(live_B).data_ptr(),
                ties.factor_generation())  # (a scan of every layer: a look found clear is kept until one of these changes)
        sharers = [] if self.__dict__.get("_sharded_clear") == look else \
            ties.sharded_sharers(self, (live_A, live_B), forks.tracked_layers())
        if not sharers:
            self.__dict__["_sharded_clear"] = look
        # every rank writes the same values, both factors agreed on before the first write (the merged one too), and
        # every rank refuses shared factors alike (a rank that sees a share another does not: the ranks disagree)
        sharded.consensus(live_A, "copy", where, (lora_A, lora_B), (scaling, float(bool(sharers))))
        if sharers:
            held = ", ".join(sorted({x._describe() for x in sharers}))
            raise ValueError(f"{where}: the live factors are DTensors another layer holds too ({held}): a switch "
                             f"writes them in place, which would switch that layer as well. Untie the factors before "
                             f"sharding (give each layer its own lora_A and lora_B), or switch before sharding; "
                             f"refused on every rank, nothing was written")
        self._swap_merged(lora_A, lora_B, scaling, label=name)
        with self._after_switch_write(name):  # (the weight holds the new adapter once merged)
            sharded.copy_into(live_A, lora_A, check=False)
            sharded.copy_into(live_B, lora_B, check=False)
            self.scaling = scaling
            self._finite_stamps[name] = _stamp(self.lora_A, self.lora_B)
            if name != self.active_adapter:  # (each adapter's gradients its own; frozen too: r12)
                sharded.swap_grads(self, self.active_adapter, name)
            if marked:
                live_A.requires_grad_(True)
                live_B.requires_grad_(True)

    def settle_parameters(self) -> None:
        """When the factors are trainable but the live Parameters are another adapter's own (lent to the active
        adapter by a serving switch): the active adapter gets its own Parameter pair back (or a new one) with
        the live values, and the lent pair goes back to its adapter, so that an optimizer built for either holds
        the right one. mark_only_lora_as_trainable and set_adapter call it; nothing to do otherwise."""
        if (self.__dict__.get("_owner") is None and self.__dict__.get("_active_own") is None) \
                or not self._trainable() or sharded.is_dtensor(self.lora_A):
            return
        with self._lock, deferred_interrupt():
            live_A, live_B = self.lora_A, self.lora_B
            known = self._known_finite(self.active_adapter)
            own = self._active_own
            if own is not None and all(p.device == t.device and p.dtype == t.dtype
                                       for p, t in zip(own, (live_A, live_B))):  # not after a .to(): a new pair
                pair = self._take_values(own, live_A, live_B, self.scaling)
                for p, live in zip(pair, (live_A, live_B)):
                    p.requires_grad_(live.requires_grad)
            else:
                pair = tuple(nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad) for t in (live_A, live_B))
            if self._owner in self._adapters:
                oA, oB, o_scaling = self._adapters[self._owner]
                self._adapters[self._owner] = (*self._take_values((live_A, live_B), oA, oB, o_scaling), o_scaling)
                self._finite_stamps.pop(self._owner, None)
            self._put_values_pair(pair)
            self._sync_scale_tensor()
            self.__dict__.update(_owner=None, _active_own=None)
            self._stamp_finite(self.active_adapter, known)

    def _lent(self) -> bool:
        """Whether the live Parameters are not the active adapter's own (a serving switch lent them; settle_parameters
        gives them back)."""
        return self.__dict__.get("_owner") is not None or self.__dict__.get("_active_own") is not None

    def _refuse_lent_training(self) -> None:
        """A forward that would train lent Parameters (factors made trainable by hand, `requires_grad_(True)`, after a
        serving switch): the gradients would go to Parameters that an optimizer built for the active adapter does not
        hold (or that another adapter's optimizer holds), and its steps would be lost without a word."""
        owner, active = self.__dict__.get("_owner"), self.active_adapter
        whose = (f"adapter {owner!r}'s own Parameters, lent to it by a serving switch" if owner is not None
                 else "Parameters a serving switch lent to it (its own are kept aside)")
        raise RuntimeError(
            f"{self._describe()}: its factors were made trainable while adapter {active!r} is served through {whose}: "
            f"an optimizer built for {active!r} does not hold them, and its steps would be lost. Call "
            f"lora.mark_only_lora_as_trainable(model) (or set_adapter({active!r})) after making factors trainable and "
            f"before building optimizers: each adapter gets its own Parameters back, with their values")

    def _take_values(self, pair, lora_A, lora_B, scaling: float):
        """`pair` (a Parameter pair) given the values of (lora_A, lora_B), in place where the shapes allow, and the
        pair's scale tensors (if any) their adapter's `scaling` (see `_pair_scales`). A pair another layer holds too
        (ties.factors_held_elsewhere) is not written: a new pair takes the values (returned)."""
        if ties.factors_held_elsewhere(self, pair):
            pair = tuple(nn.Parameter(torch.empty(0, device=p.device, dtype=p.dtype), requires_grad=p.requires_grad)
                         for p in pair)
        with torch.no_grad(), ops.inference_writes(*pair):
            for p, t in zip(pair, (lora_A, lora_B)):
                if p.shape == t.shape:
                    p.copy_(t)
                else:
                    self._streams.retire(p.data)
                    p.data = t.detach().to(p.device, p.dtype, copy=True)
            self._fill_pair_scales(pair[0], scaling)
        self._inference_values_written(*pair)
        self._note_factors(*pair, moved=True)
        return pair

    def _note_factors(self, *pair, moved: bool = False) -> None:
        """Notes (ties.note_factor) the factors this layer holds now where they lie: the live pair, and `pair` (an
        adapter's own pair kept aside). Every write that gives them new Parameters or new storage (moved=True)
        notes them, so that a layer handed the same bytes later (an assign load of this layer's state dict) finds
        this one."""
        for t in (*(self._parameters.get(n) for n in ties.FACTORS), *pair):
            if t is not None:
                ties.note_factor(t, self, moved)

    def _inference_values_written(self, *tensors) -> None:
        """lora_ext wrote values in place into `tensors`: where one is an inference tensor, whose writes no version
        counter shows, every cache of this layer's adapter values keyed by them (mixed batches' slots: value_epoch)
        takes them again."""
        for t in tensors:
            if t.is_inference():
                self.__dict__["_inference_epoch"] = self.__dict__.get("_inference_epoch", 0) + 1
                return

    def _trainable(self) -> bool:
        return self.lora_A.requires_grad or self.lora_B.requires_grad

    def marked_to_train(self, name: str) -> bool:
        """Whether inactive adapter `name` is marked to train once a switch makes it active (mark_trainable)."""
        return name in self.__dict__.get("_marked_trains", ())

    def _marked_switch(self, name: str) -> bool:
        """Whether a switch to `name` makes it train by its mark alone: marked (mark_trainable) while frozen live factors
        served another adapter; it trains from the switch on."""
        return not self._trainable() and self.marked_to_train(name)

    def trains_after_switch(self, name: str) -> bool:
        """Whether the live factors train once adapter `name` is active: they train on (a switch keeps the live
        factors' trainability), or the adapter is marked to train (mark_trainable)."""
        return self._trainable() or (name != self.active_adapter and self.marked_to_train(name))

    def mark_trainable(self, name: str, trains: bool = True) -> None:
        """Marks inactive adapter `name` to train (trains=True) once a switch makes it active, or takes the mark back,
        without touching the live factors, which serve the active adapter (load_peft_adapter(is_trainable=True,
        activate=False): peft trains the adapter it loads only; unfreezing the live factors trained the active adapter
        until the switch, G6). The switch to it gives it trainable Parameters of its own (its own pair, where it
        trained before) and drops the mark: from then on the live factors' flags say whether it trains."""
        with self._lock:
            if name == self.active_adapter:
                raise ValueError(f"{self._describe()}: mark_trainable({name!r}) of the active adapter: set "
                                 f"requires_grad on lora_A/lora_B")
            self._adapter(name)  # (one it holds)
            marked = self.__dict__.setdefault("_marked_trains", set())
            if trains:
                marked.add(name)
            else:
                marked.discard(name)

    # -- finite-value stamps ----------------------------------------------------------------------------

    def _finite_tensors(self, key) -> Sequence[Tensor]:
        if key is MERGED:
            return (self._merged_A, self._merged_B)
        if key == self.active_adapter:
            return (self.lora_A, self.lora_B)
        return self._adapters[key][:2]

    def _known_finite(self, key) -> bool:
        return _unchanged(self._finite_stamps.get(key), *self._finite_tensors(key))

    def _stamp_finite(self, key, known: bool = True) -> None:
        if known:
            self._finite_stamps[key] = _stamp(*self._finite_tensors(key))
        else:
            self._finite_stamps.pop(key, None)

    def check_values(self, name: str, label: str = None) -> None:
        """Checks adapter `name` (and its scaling) again and raises ValueError unless it is finite: the call to make
        after writing its factors through `.data` (or in place under torch.inference_mode), which version counters
        do not see. It also tells the layer's other caches of the values (mixed batches' slots) to take them again.
        The ops themselves check an adapter when it comes in and after in-place writes (_check_values)."""
        self._check_unloaded()
        with self._lock:
            self._finite_stamps.pop(name, None)
            self.__dict__.setdefault("_value_epochs", {})[name] = next(_EPOCHS)
            self._check_values(name, label)

    def value_epoch(self, name: str) -> int:
        """A number that grows at each check_values(name) on this layer and each add_adapter of `name` (from one
        process-wide count), plus lora_ext's own in-place writes into its inference tensors
        (_inference_values_written): a cache of adapter `name`'s values keyed by version counters also keys on this,
        so that writes the counters miss reach it."""
        return self.__dict__.get("_value_epochs", {}).get(name, 0) + self.__dict__.get("_inference_epoch", 0)

    def _check_values(self, name: str, label: str = None) -> None:
        """check_values without forgetting: nothing to do while the factors are unwritten since the last check."""
        with self._lock:
            if self._known_finite(name):
                return
            A, B, scaling = self._adapter(name)
            self._check_as_live(label or f"{self._describe()} adapter {name!r}", A, B, scaling)
            self._stamp_finite(name)

    def _check_as_live(self, label: str, A: Tensor, B: Tensor, scaling) -> None:
        """Raises ValueError unless factors A, B (and scaling) are finite as given and as the live factors will hold
        them (cast to their dtype, which can overflow or lose the ranks below its range: _refuse_lost_ranks); the
        value check of check_adapter and check_values."""
        meta = [n for n, t in (("lora_A", A), ("lora_B", B)) if t.is_meta]
        if meta:  # (G1: torch's "Cannot copy out of meta tensor" from the value check, naming nothing)
            raise ValueError(f"{label}: its {' and '.join(meta)} {'is' if len(meta) == 1 else 'are'} on the meta "
                             f"device, with no values (a model built on meta, or loaded with map_location='meta', "
                             f"whose state dict holds the active adapter only); add the adapter again "
                             f"(add_adapter, load_peft_adapter) first")
        weight_dtype = self._weight_2d().dtype
        ops.check_finite(label, A, B, scaling, weight_dtype=weight_dtype)
        if A.dtype == self.lora_A.dtype and B.dtype == self.lora_B.dtype:
            return
        given = (A, B)
        A, B = A.detach().to(self.lora_A.dtype), B.detach().to(self.lora_B.dtype)
        ops.check_finite(label + (f" (stored in {given[0].dtype}; cast to the live factors' {self.lora_A.dtype}, "
                                  f"past its range)"), A, B, scaling, weight_dtype=weight_dtype)
        _refuse_lost_ranks(label, given, (A, B), self, scaling)
