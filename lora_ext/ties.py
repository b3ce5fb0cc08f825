"""Weights shared by several LoRA layers (`l2.weight = l1.weight`, transformers' tie_weights()).

A merge writes the adapter into the weight. When another lora_ext layer computes with the same weight
Parameter, that layer's output changes too: merging both adds both updates to both layers, and merging one
gives the other a base it never had. So a layer whose weight another live layer holds never merges: merge()
refuses (naming both layers) and eval() leaves it unmerged with a warning; forwards add the adapter on the fly,
which is right for every holder. Injection marks weights tied to plain modules (GPT-2's lm_head) itself
(`_tied_with`, injection.install); this registry finds the ties between lora_ext layers, however they were made.

The registry maps a weight Parameter (by id) to the layers that took it: a layer's register_parameter
("weight") and every merge attempt note it. It holds no reference to the weight, not even a weak one: torch's
swap_tensors (module.to() of DTensor Parameters, FSDP2's and tensor parallelism's, or under
torch.__future__.set_swap_module_params_on_conversion) refuses a tensor with weak references. An id outlives its
Parameter, so an entry is only a list of candidates: a layer counts when its weight is the same object now (or its
bytes overlap), and entries none of whose layers holds a weight of that id are dropped as the registry grows.
Layers that ever took one weight stay each other's peers: a tied weight that is replaced in both modules'
_parameters without register_parameter (FSDP2's fully_shard puts one DTensor Parameter there) is still seen as
shared when both hold the new one. Weights that are two Parameter objects over the same memory
(load_state_dict(assign=True) of a tied model's saved state dict: torch.save keeps the one storage, assign wraps
each key in a Parameter of its own) are seen too: layers are also indexed by their weight's storage, and two
weights tie when their bytes overlap (views of one flat buffer that do not overlap do not tie)."""

import functools
import gc
import itertools
import os
import threading
import warnings
import weakref
from typing import List

import torch.nn as nn
from torch.nn.modules import module as _torch_module
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

_lock = threading.RLock()
_holders = {}  # id(weight) -> WeakSet of the layers that took a weight of that id (candidates: see above)
_prune_at = 1024  # the registry's size at which entries that no layer holds now are dropped
_peers = weakref.WeakKeyDictionary()  # layer -> WeakSet of the layers that took a weight it took
_by_storage = {}  # (device, storage address) -> WeakSet of the layers whose weight lay there when noted
_storage_prune_at = 1024  # its size at which the layers whose weight lies elsewhere now are dropped
_convs = weakref.WeakKeyDictionary()  # a ConvLoRA's inner conv -> WeakSet of the ConvLoRA layers holding it
_plain = {}  # id(weight) -> WeakSet of the plain modules (_TIE_TARGETS) that took a weight of that id (candidates)
_plain_storage = {}  # (device, storage address) -> WeakSet of the plain modules whose weight lay there when noted
_plain_prune_at = 1024
_givers = weakref.WeakKeyDictionary()  # layer -> WeakSet of the plain modules whose weight it was given (_plain_tie)
_replaced = weakref.WeakSet()  # plain modules lora_ext's injection replaced by a layer (never givers: replaced)
_unseen = True  # whether plain modules made before lora_ext's import may live that no hook saw: _look


def _span(weight):
    """(device, storage address, first byte, end byte) of a plain tensor's elements; None for DTensors, meta and
    empty tensors (nothing shared to write into)."""
    try:
        if type(weight).__name__ == "DTensor" or weight.is_meta or not weight.numel():
            return None
        address = weight.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, AttributeError, ValueError):  # (ValueError: a lazy module's)
        return None
    size = weight.element_size()
    first = weight.storage_offset() * size
    last = first + (sum((n - 1) * abs(st) for n, st in zip(weight.shape, weight.stride())) + 1) * size
    return (str(weight.device), address, first, last) if address else None


def _overlap(a, b) -> bool:
    return a is not None and b is not None and a[:2] == b[:2] and a[2] < b[3] and b[2] < a[3]


def note(weight, layer) -> None:
    """Records that `layer` computes with the Parameter `weight`."""
    if weight is None:
        return
    key = id(weight)
    with _lock:
        holders = _holders.get(key)
        if holders is None:
            if len(_holders) >= _prune_at:
                _prune()
            holders = _holders[key] = weakref.WeakSet()
        conv = layer.__dict__.get("_modules", {}).get("conv") if _is_conv_layer(layer) else None
        if conv is not None:  # a later `layer.conv.weight = ...` is seen too (also for unpickled layers)
            try:
                _convs.setdefault(conv, weakref.WeakSet()).add(layer)
            except TypeError:
                pass
        span = _span(weight)
        if span is not None:
            if len(_by_storage) >= _storage_prune_at:
                _prune_storage()
            _by_storage.setdefault(span[:2], weakref.WeakSet()).add(layer)
        for other in list(holders):
            if other is not layer and _weight_of(other) is weight:  # (not a layer that held an earlier id's weight)
                _peers.setdefault(layer, weakref.WeakSet()).add(other)
                _peers.setdefault(other, weakref.WeakSet()).add(layer)
        holders.add(layer)


def _weight_of(layer):
    """layer's weight Parameter; None where it has none registered (a parametrization computes it) or is half built
    or half torn down."""
    try:
        return layer._weight_or_none()
    except AttributeError:
        return None


def _moved_out(registry, weight_of) -> None:
    """Drops from a storage registry (_by_storage, _plain_storage) the modules whose weight lies elsewhere now (or
    that are gone), and the addresses left with none: a live layer whose weight was assigned again and again (a
    load_state_dict(assign=True) per reload) stayed under every address it ever lay at (M1: about 50 entries per
    1,000 reloads, every one scanned at each note past 4,096). Lookups only take modules whose weight is there now.
    Under _lock."""
    for key, members in list(registry.items()):
        for module in list(members):
            weights = weight_of(module)  # (a list: a parametrized plain module's sources, _weight_sources)
            weights = weights if isinstance(weights, list) else [weights]
            if not any(s is not None and s[:2] == key for s in (_span(w) for w in weights if w is not None)):
                members.discard(module)
        if not len(members):
            del registry[key]


def _prune_storage() -> None:
    """_by_storage pruned (_moved_out); the next pruning waits until it has doubled. Under _lock."""
    global _storage_prune_at
    _moved_out(_by_storage, _weight_of)
    _storage_prune_at = max(1024, 2 * len(_by_storage))


def _prune() -> None:
    """Drops the entries that no live layer holds a weight of now (their weights are gone or replaced); the next
    pruning waits until the registry has doubled. Under _lock."""
    global _prune_at
    for key in [k for k, layers in _holders.items() if not any(id(_weight_of(x)) == k for x in list(layers))]:
        del _holders[key]
    _prune_at = max(1024, 2 * len(_holders))


def others(layer, weight) -> List:
    """The live lora_ext layers other than `layer` whose weight is the Parameter `weight` now."""
    with _lock:
        layers = list(_holders.get(id(weight), ()))
        layers += [peer for peer in _peers.get(layer, ()) if peer not in layers]
        span = _span(weight)
        if span is not None:
            layers += [same for same in _by_storage.get(span[:2], ()) if same not in layers]
    return [other for other in layers if other is not layer
            and (_weight_of(other) is weight or _overlap(span, _span(_weight_of(other))))]


# Factor Parameters (lora_A / lora_B) held by more than one lora_ext layer: `l2.lora_A = l1.lora_A`, or a copy.copy
# of a layer (which keeps the Parameter objects), live or kept as an adapter's own pair (an adapter that trained keeps
# its Parameters while another is served). lora_ext writes factor Parameters in place (a serving switch into the live
# pair, an adapter's values into its own pair), which would write every holder's; so a layer about to write one that
# another layer holds gives itself new Parameters instead (factors_held_elsewhere), and that Parameter is never
# written in place again (a program torch.export made over both layers keeps serving its values whole for both, not
# one layer's adapter in the other's place; a CUDA graph must be captured again). Holders by id, as the weights (see
# above): an entry is a list of candidates. And by storage, as the weights: two Parameter objects over the same bytes
# (load_state_dict(assign=True) of a tied model's saved state dict, or of another model's state_dict()) are shared
# too; views of one flat buffer that do not overlap are not.
_factor_holders = {}  # id(factor Parameter) -> WeakSet of the modules that took a Parameter of that id as a factor
_factor_storage = {}  # (device, storage address) -> WeakSet of the layers noted holding a factor there (candidates)
_factor_prune_at = 1024
_factor_generation = 0  # counts the notes that put a layer at a storage it was not noted at (see _CLEAR_ATTR)
_CLEAR_ATTR = "_lora_ext_unshared"  # on a factor Parameter: (data_ptr, generation, layer token) of a look that found no
# other layer on its bytes; the same look again finds the same while no note came since (a layer's factors in a flat
# buffer with every other layer's, FSDP1's, would otherwise be compared with all of theirs at every switch; and a
# serving switch asks at every switch)
_NOTED_ATTR = "_lora_ext_noted"  # on a factor Parameter: the tokens (_token) of the layers it was noted with where it
# lies (by object, not by id: a new Parameter given a dead one's id is noted again; cleared by a move: note_factor)
SHARED_ATTR = "_lora_ext_shared"  # on a factor Parameter seen held by two layers: never written in place again (on
# the object, not by id: a dead tied Parameter's id given to a new one would take its in-place switches away)
FACTORS = ("lora_A", "lora_B")


def _storage_key(t):
    """(device, storage address) of a plain tensor; None for DTensors (FSDP2's and tensor parallelism's factors are
    shared by object only), meta tensors and empty storage."""
    if t is None or type(t).__name__ == "DTensor":
        return None
    try:
        address = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, AttributeError, ValueError):
        return None
    return (t.device, address) if address else None


def _new_tokens() -> None:
    """Layer tokens from a random start, drawn at import and again in a forked child (forks.py): a Parameter pickled
    in one process carries its tokens into another, where numbers counted from 1 met them."""
    global _tokens
    _tokens = itertools.count(int.from_bytes(os.urandom(6), "little") << 16)


_new_tokens()


def _token(layer) -> int:
    """A number of `layer`'s own, never another's (ids are reused once an object is gone); a copy or an unpickled
    layer gets one of its own (layers.LoRALayer.__setstate__ drops the copied one)."""
    token = layer.__dict__.get("_lora_ext_token")
    if token is None:
        token = layer.__dict__["_lora_ext_token"] = next(_tokens)
    return token


def note_factor(param, layer, moved: bool = False) -> None:
    """`layer` holds `param` as lora_A or lora_B (registered, put in place by a switch, kept by a copy, handed out
    by get_adapter). moved: `param` may lie in other memory than when it was noted (a `.data` swap, a .to()): noted
    by storage again; otherwise a Parameter noted with `layer` before is not looked at again (a serving switch
    writes the live pair in place)."""
    global _factor_prune_at, _factor_generation
    token = _token(layer)
    noted = param.__dict__.get(_NOTED_ATTR, ())
    if token in noted and not moved:
        return
    held = _factor_holders.get(id(param))
    where = _storage_key(param)
    near = _factor_storage.get(where) if where is not None else None
    param.__dict__[_NOTED_ATTR] = (*noted, token) if token not in noted else noted
    if held is not None and layer in held and (where is None or (near is not None and layer in near)):
        return
    with _lock:
        _factor_holders.setdefault(id(param), weakref.WeakSet()).add(layer)
        if where is not None:
            _factor_storage.setdefault(where, weakref.WeakSet()).add(layer)
        _factor_generation += 1
        if len(_factor_holders) + len(_factor_storage) > _factor_prune_at:
            for key in [k for k, held in _factor_holders.items() if not any(_holds_factor(x, k) for x in list(held))]:
                del _factor_holders[key]
            for key in [k for k, near in _factor_storage.items()
                        if not any(_factor_tensors_at(x, k) for x in list(near))]:
                del _factor_storage[key]
            _factor_prune_at = max(1024, 2 * (len(_factor_holders) + len(_factor_storage)))


def _live_factor_tensors(layer) -> List:
    """The factor tensors lora_ext `layer` computes with or keeps for its active adapter: live, and the active
    adapter's own pair (None where there is none)."""
    d = layer.__dict__
    return [d.get("_parameters", {}).get(f) for f in FACTORS] + list(d.get("_active_own") or ())


def _factor_tensors(layer) -> List:
    """The factor tensors lora_ext `layer` holds: live, its active adapter's own pair, every adapter's stored pair."""
    # (a tuple of the values first, one step under the GIL: a switch of that layer on another thread, which this read
    # does not lock, changes the dict; iterated, it raised "dictionary keys changed during iteration", h38)
    return _live_factor_tensors(layer) + [t for held in tuple(layer.__dict__.get("_adapters", {}).values())
                                          for t in held[:2]]


def _factor_tensors_at(layer, where) -> List:
    return [t for t in _factor_tensors(layer) if t is not None and _storage_key(t) == where]


def _holds_factor(layer, key) -> bool:
    """Whether lora_ext `layer` holds a Parameter of id `key` as a live factor or in an adapter's stored pair."""
    return any(id(t) == key for t in _factor_tensors(layer))


def factors_held_elsewhere(layer, params) -> bool:
    """Whether lora_ext must not write `params` (factor Parameters `layer` holds) in place: another lora_ext layer
    holds one of them or bytes of one (live or stored), or did once. (Every serving switch asks: a factor only
    `layer` was noted with costs a few dict reads and membership tests.) A program torch.export made holds the live
    Parameters too, and is not a layer: it follows a switch because the switch writes them in place."""
    found = False
    for p in params:
        if p is None:
            continue
        if getattr(p, SHARED_ATTR, False):
            found = True
            continue
        key = id(p)
        held = _factor_holders.get(key)
        if held is not None and not (len(held) == 1 and layer in held):
            with _lock:
                candidates = list(held)
            if any(x is not layer and "_adapters" in x.__dict__ and _holds_factor(x, key) for x in candidates):
                setattr(p, SHARED_ATTR, True)  # (a deepcopy of it keeps the mark: never written in place either)
                found = True
                continue
        if type(p).__name__ == "DTensor":  # (shared by object only: above)
            continue
        try:
            look = (p.data_ptr(), _factor_generation, _token(layer))
        except RuntimeError:  # (no storage)
            continue
        if p.__dict__.get(_CLEAR_ATTR) == look:
            continue
        if _bytes_held_elsewhere(layer, p):
            setattr(p, SHARED_ATTR, True)
            found = True
        else:
            p.__dict__[_CLEAR_ATTR] = look
    return found


def factor_generation() -> int:
    """A number that changes whenever a factor is noted at a place it was not noted at before (note_factor)."""
    return _factor_generation


def sharded_sharers(layer, params, layers) -> List:
    """The lora_ext layers among `layers` (other than `layer`) whose live factors (or the active adapter's own pair)
    are one of `params` (DTensor factor Parameters `layer` holds live) or lie over their local shards' bytes (tensor
    parallelism's Replicate keeps the tensor it was given as the local shard: two layers tied before
    parallelize_module hold two DTensors over one memory; load_state_dict(assign=True) of a sharded model's state
    dict, DTensors over that model's shards). A scan: fully_shard and the parallel styles put DTensors in place
    without register_parameter, so the registry above never noted them."""
    local = [getattr(p, "_local_tensor", p) for p in params]
    spans = [_span(t) for t in local]
    addresses = {s[1] for s in spans if s is not None}
    found = []
    for x in layers:
        if x is layer:
            continue
        for t in _live_factor_tensors(x):
            if t is None:
                continue
            if any(t is p for p in params):
                found.append(x)
                break
            t = getattr(t, "_local_tensor", t)
            try:
                address = t.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError, AttributeError, ValueError):
                continue
            if address in addresses and any(_overlap(_span(t), s) for s in spans):
                found.append(x)
                break
    return found


def _bytes_held_elsewhere(layer, p) -> bool:
    """Whether another lora_ext layer noted at p's storage holds a factor tensor overlapping p's bytes now (layers
    that hold nothing there any more are dropped from the storage's entry)."""
    where = _storage_key(p)
    near = _factor_storage.get(where) if where is not None else None
    if near is None or (len(near) == 1 and layer in near):
        return False
    with _lock:
        candidates = [x for x in near if x is not layer and "_adapters" in x.__dict__]
    span = _span(p)
    for x in candidates:
        there = _factor_tensors_at(x, where)
        if any(_overlap(span, _span(t)) for t in there):
            return True
        if not there:  # (it let go of that storage: a later look need not ask it again)
            with _lock:
                near.discard(x)
    return False


def names(layer, model=None) -> List[str]:
    """What `layer`'s weight is tied to: injection's plain modules, then other lora_ext layers (described, or by
    their name in `model` where it holds them: a plain module injection recorded and later replaced by a lora_ext
    layer is named once, h4)."""
    tied = list(layer.__dict__.get("_tied_with") or ())
    weight = layer._weight_or_none()
    if weight is None:  # computed by a parametrization: nothing registered to share (merge_refusal says so)
        return tied
    note(weight, layer)
    found = [(g, f"a {type(g).__name__}'s 'weight'") for g in givers(layer)]
    found += [(other, other._describe()) for other in others(layer, weight)]
    named = {}
    if model is not None and found:
        wanted = {id(m) for m, _ in found}
        named = {id(m): n for n, m in model.named_modules(remove_duplicate=False) if id(m) in wanted}
    for module, described in found:
        name = named.get(id(module), f"{described} at 0x{id(module):x}")
        if name not in tied:
            tied.append(name)
    return tied


def _is_conv_layer(module) -> bool:
    return getattr(type(module), "_weight_key", None) == "conv.weight"  # layers.ConvLoRA (no import cycle)


def _on_module(module, name, submodule):
    """A ConvLoRA's conv set (`c2.conv = c1.conv`, injection's adoption): the layer takes its conv's weight (and, merged,
    looks at it: layers.LoRALayer._conv_set, which sets it under the layer's lock). Another ConvLoRA that held the
    conv is not told: it is most often the one the conv was taken out of (`net[i] = net[i].conv` after a merge, the
    conv keeping its adapter). And a lora_ext layer put in the place of a plain module whose weight it took
    (`new.weight = old.weight; parent.fc = new`) is not tied to that module, which a loop's variable may keep alive
    but nothing computes with (_plain_tie)."""
    if submodule is not None and hasattr(submodule, "_weight_taken"):
        old = module._modules.get(name)
        if old is not None and old is not submodule:
            with _lock:
                givers = _givers.get(submodule)
                if givers is not None:
                    givers.discard(old)
    if name == "conv" and submodule is not None and _is_conv_layer(module):
        with _lock:
            try:
                _convs.setdefault(submodule, weakref.WeakSet()).add(module)
            except TypeError:  # a conv class without hashing: its weight is noted at each merge only
                pass
        module._conv_set(submodule)
        note(submodule._parameters.get("weight"), module)


# the plain modules a tie puts a merged lora_ext layer's weight in (transformers' tie_weights(): an output head)
_TIE_TARGETS = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d, NonDynamicallyQuantizableLinear)  # (the last: nn.MultiheadAttention's out_proj)


def _is_plain(module) -> bool:
    """Whether `module` is a plain layer a tie can put a weight in: of a _TIE_TARGETS class or a subclass of one
    (transformers' scaled word embeddings, FSDP2's classes of the modules it shards itself), not a lora_ext layer."""
    return isinstance(module, _TIE_TARGETS) and not hasattr(type(module), "_weight_taken") \
        and type(module).__hash__ is not None  # (a class with __eq__ and no __hash__ is never a tie: not noted)


def _on_parameter(module, name, param):
    """torch's register_parameter of any module, before the new Parameter is in place: a conv's weight set
    (`c2.conv.weight = c1.conv.weight`; layers.LoRALayer._conv_weight_set sets it under the layer's lock and a merged
    layer looks at it), and a weight a lora_ext layer holds given to a lora_ext layer or a plain layer (_TIE_TARGETS): a tie, which a
    merged layer takes its adapter out of (layers.LoRALayer._weight_taken)."""
    if param is None:  # (torch calls no hook for None)
        return
    if name in FACTORS:
        note_factor(param, module)
    layers = []
    if name == "weight" and _convs:
        try:
            layers = [layer for layer in _convs.get(module, ()) if layer._modules.get("conv") is module]
        except TypeError:
            pass
    # first: a ConvLoRA taking the weight below then compares it with its own as it will compute with it (the giver's
    # base)
    given(module, name, param, plain=not layers)  # (a ConvLoRA's conv: its layer is a peer)
    for layer in layers:
        layer._conv_weight_set(module, param)
        note(param, layer)
    if name == "weight":
        _plain_tie(module, param, layers)


def given(module, name, param, plain=True) -> None:
    """`module` takes `param` as its `name`: each merged lora_ext layer whose weight it is takes its adapter out first
    (layers.LoRALayer._weight_taken) when `module` is a lora_ext layer or a plain layer (_is_plain: torch.export and
    other program builders register a model's own parameters on modules of theirs, which compute nothing the model
    serves). A lora_ext layer calls it before it takes its own lock to register a weight (and the
    registration hook again under it, finding the giver unmerged): two layers given each other's weights on two
    threads would otherwise each hold its own lock and wait for the other's."""
    taken = _holders.get(id(param))  # (a dict lookup: this hook runs for every parameter any module registers)
    if not (hasattr(module, "_weight_taken") or _is_plain(module)):
        return
    if taken:
        for layer in list(taken):
            if layer is not module and _weight_of(layer) is param and layer._modules.get("conv") is not module:
                layer._weight_taken(module, name, plain=plain)
    if name == "weight" and _by_storage:
        # another Parameter over a merged layer's bytes (nn.Embedding.from_pretrained(layer.weight), _weight=,
        # nn.Parameter(layer.weight)): the new module would compute with the merged weight as its own (G3: 11.8 off
        # the base, no warning, until the layer's next train()); a tie as the same Parameter is
        span = _span(param)
        if span is not None:
            with _lock:
                over = [layer for layer in _by_storage.get(span[:2], ())
                        if layer is not module and layer.merged and _weight_of(layer) is not param
                        and layer._modules.get("conv") is not module and _overlap(span, _span(_weight_of(layer)))]
            for layer in over:
                layer._weight_taken(module, name, plain=plain)


def _plain_tie(module, param, layers) -> None:
    """The other way round: a lora_ext layer (`module`, or the ConvLoRA `layers` whose conv `module` is) given the
    weight of a plain module (`head.weight = plain_embedding.weight`; tie_weights() with only lm_head adapted) is tied
    to it while that module lives and holds the weight, or a weight over the same bytes (names), so that eval() never
    merges into the plain module's weight. (While it lives: a layer made to replace a plain module takes that module's
    weight, and the module is gone once replaced; lora_ext's injection marks the modules it replaces: replaced.)
    Plain modules are seen from their weight's registration on, so only those made after lora_ext's import (injection
    marks the ties a model has when adapted: injection.install; inject notes a model's plain modules: known_plain; an
    unpickled or deep-copied: _setstate; made before lora_ext's import: _look; FSDP2's: _fsdp_plain). A
    load_state_dict(assign=True) of a tied model's saved state gives each module a Parameter of its own over the one
    storage, in either order: a plain module given a weight over the bytes of a layer's weight is that layer's giver
    too. A deepcopy of a model keeps the tie (givers; LoRALayer.__deepcopy__), and so does a pickled copy (restored,
    _setstate)."""
    takers = [module] if hasattr(module, "_weight_taken") else layers
    if not takers and not _is_plain(module):  # (this hook runs for every weight any module registers)
        return
    span = _span(param)
    with _lock:
        if takers:
            _look()
        candidates = _plain_candidates(param, span)
        if _is_plain(module) and not layers:
            _note_plain(module, param, span)
            _tie_takers(module, param, span, same=False)  # (an assign load's head before its embedding; the same
            #                                                Parameter: given, _weight_taken)
    for giver in candidates:
        if giver is not module and _holds(giver, param, span) and not _own_conv(giver) and giver not in _replaced:
            for taker in takers:
                with _lock:
                    _givers.setdefault(taker, weakref.WeakSet()).add(giver)


def _plain_candidates(param, span=None) -> List:
    """The plain modules that may hold `param` (or, given its span: _span, bytes of it): noted with a Parameter of
    its id or over its storage, or given it by FSDP2 (_fsdp_plain). Under _lock."""
    found = list(_plain.get(id(param), ()))
    found += [m for m in _fsdp_plain(param) if m not in found]
    if span is not None:
        found += [m for m in _plain_storage.get(span[:2], ()) if m not in found]
    return found


def _fsdp_plain(param) -> List:
    """The plain modules (_TIE_TARGETS) FSDP2 gave the sharded Parameter `param`: fully_shard sets a plain module's
    Parameters straight into its _parameters, past the registration hook, so a tie made after it is found here."""
    from . import sharded  # (not at the top: sharded is imported by layers, which imports this module first)
    if not sharded.is_dtensor(param):
        return []
    found = []
    for _, p in sharded._fsdp_params():
        if p.sharded_param is param:
            infos = [p._module_info, *getattr(p, "_shared_module_infos", ())]
            found += [i.module for i in infos if _is_plain(i.module) and i.module not in found]
    return found


def held_elsewhere(layer, param) -> bool:
    """Whether a module other than `layer` (a lora_ext layer or a plain one: _TIE_TARGETS) holds the Parameter
    `param` as its weight now (layers.LoRALayer._weight_replaced: a sharded weight given to a merged layer)."""
    with _lock:
        _look()
        plain = _plain_candidates(param)
    return bool(others(layer, param)) or any(m is not layer and m._parameters.get("weight") is param
                                             and not _own_conv(m) for m in plain)


def _holds(module, weight, span="unknown") -> bool:
    """Whether the plain `module` computes its weight from `weight`, or from a Parameter over bytes of it (span:
    _span(weight)): its own weight, or what a parametrization computes it from (_weight_sources)."""
    if weight is None:
        return False
    span = _span(weight) if span == "unknown" else span
    return any(own is weight or _overlap(span, _span(own)) for own in _weight_sources(module))


def _weight_sources(module) -> List:
    """The Parameters `module` computes its weight from: its 'weight'; else, parametrized (torch.nn.utils.parametrize:
    `parametrizations.weight.original`, spectral_norm's and weight_norm's), those of the parametrization, and the
    module's own others but its bias (the old weight_norm's weight_v, over the weight's bytes)."""
    params = module._parameters
    own = params.get("weight")
    if own is not None:
        return [own]
    found = [p for name, p in params.items() if p is not None and name != "bias"]
    parametrizations = module.__dict__.get("_modules", {}).get("parametrizations")
    parametrization = getattr(parametrizations, "_modules", {}).get("weight")
    if parametrization is not None:
        found += [p for p in parametrization._parameters.values() if p is not None]
    return found


def givers(layer) -> List:
    """The live plain modules whose weight `layer` was given and that hold it still (_plain_tie): a deepcopy of the
    layer is tied to their copies (LoRALayer.__deepcopy__)."""
    weight = _weight_of(layer)
    with _lock:
        _look()
        found = list(_givers.get(layer, ()))
    span = _span(weight) if weight is not None else None
    return [g for g in found if _holds(g, weight, span)]


def add_givers(layer, modules) -> None:
    """`layer` was given the weight of each plain module in `modules` (a copy's: LoRALayer.__deepcopy__)."""
    with _lock:
        for module in modules:
            try:
                _givers.setdefault(layer, weakref.WeakSet()).add(module)
            except TypeError:
                pass


def known_plain(model) -> None:
    """Notes the plain modules of `model` (_TIE_TARGETS) as _on_parameter notes those made after lora_ext's import:
    a model built before it (a notebook's earlier cell), injected, then tied (tie_weights() with lm_head adapted)."""
    with _lock:
        for module in model.modules():
            weight = module._parameters.get("weight") if _is_plain(module) else None
            if weight is not None and not _own_conv(module):
                _note_plain(module, weight)


def _note_plain(module, weight, span="unknown") -> None:
    """Notes that the plain `module` holds `weight` (by id and by storage; span: _span(weight)). Under _lock."""
    _prune_plain()
    _plain.setdefault(id(weight), weakref.WeakSet()).add(module)
    span = _span(weight) if span == "unknown" else span
    if span is not None:
        _plain_storage.setdefault(span[:2], weakref.WeakSet()).add(module)


def _prune_plain() -> None:
    """Drops the _plain entries whose modules hold a weight of that id no more, and the storages whose modules hold
    no weight there now (_moved_out), once the registry reaches its pruning size (then doubled, as _prune). Under
    _lock."""
    global _plain_prune_at
    if len(_plain) + len(_plain_storage) >= _plain_prune_at:
        # (a parametrized module holds its weight's sources, not a weight: R1, dropped, its tie to a layer given
        # `parametrizations.weight.original` was missed, and the layer's merge wrote the module's weight, 0.99 off)
        for key in [k for k, v in _plain.items() if not any(id(w) == k for m in v for w in _weight_sources(m))]:
            del _plain[key]
        _moved_out(_plain_storage, _weight_sources)
        _plain_prune_at = max(1024, 2 * (len(_plain) + len(_plain_storage)))


def _tie_takers(module, weight, span, same) -> None:
    """The plain `module` holds `weight` (span: _span(weight)): the lora_ext layers holding it are given `module` as
    a giver: same, those holding that Parameter (an unpickled or copied module: a pickle keeps one Parameter in
    both); else those holding another Parameter over its bytes (an assign load: the registration hook; not looked
    for at unpickling, where views of one flat buffer would make each module look at every layer). Under _lock."""
    if same:
        layers = [layer for layer in _holders.get(id(weight), ()) if _weight_of(layer) is weight]
    else:
        layers = [layer for layer in (_by_storage.get(span[:2], ()) if span is not None else ())
                  if _weight_of(layer) is not weight and _overlap(span, _span(_weight_of(layer)))]
    for layer in layers:
        if layer._modules.get("conv") is not module:
            _givers.setdefault(layer, weakref.WeakSet()).add(module)


def _look() -> None:
    """Once, at the first query for ties after lora_ext's import (_unseen): finds the plain modules made before it
    (_live_targets), notes them and ties each to the lora_ext layers holding its weight. (Modules unpickled or
    deep-copied later note themselves: _setstate.) Under _lock."""
    global _unseen
    if not _unseen:
        return
    _unseen = False
    for obj in _live_targets():
        _restored_plain(obj)


def _restored_plain(module) -> None:
    """A plain module (_TIE_TARGETS) that no registration hook saw take its weight: noted as the hook notes one,
    and tied to the lora_ext layers holding its weight (a pickle or copy of a tied model holds one Parameter in
    both modules; layers built after it find it noted: restored). Passes over a module still being built."""
    params = module.__dict__.get("_parameters")  # (None: a module another thread is still building)
    weight = params.get("weight") if isinstance(params, dict) else None
    if weight is None:
        return
    span = _span(weight)
    with _lock:
        if module in _plain.get(id(weight), ()) or module in _replaced or _own_conv(module):
            return
        _note_plain(module, weight, span)
        _tie_takers(module, weight, span, same=True)


def restored(layer) -> None:
    """`layer` was unpickled or copied (LoRALayer.__setstate__): tied to the plain modules noted as holding its
    weight now (unpickled or copied before it: _setstate; a plain module that comes after it ties itself)."""
    weight = _weight_of(layer)
    if weight is None:
        return
    span = _span(weight)
    with _lock:
        for giver in _plain_candidates(weight):  # (by the Parameter: as _tie_takers at unpickling)
            if giver is not layer._modules.get("conv") and giver not in _replaced and not _own_conv(giver) \
                    and _holds(giver, weight, span):
                _givers.setdefault(layer, weakref.WeakSet()).add(giver)


def _live_targets() -> List:
    """The live plain modules (_is_plain), found as the objects referring to those classes (an
    instance of a Python class refers to its class): one traversal in C whose list holds only those referrers. A
    list of every object (gc.get_objects()) would hold, while Python code runs and other threads with it, the
    tuples and strings another thread is still building, whose resize then fails there (SystemError). 4x faster
    than filtering gc.get_objects() too (37 ms against 160 ms at 0.9 million objects)."""
    classes, todo = set(), list(_TIE_TARGETS)
    while todo:  # (the classes and their subclasses: an instance refers to its own class)
        cls = todo.pop()
        if cls not in classes:
            classes.add(cls)
            todo += cls.__subclasses__()
    # objects gc.freeze() moved to the permanent generation are not traversed: a module made, then frozen (a
    # pre-fork server's heap), before lora_ext's import is missed, and a layer given its weight merged into an
    # embedding still reading it (1.66 off, r53). Unfreezing them for the traversal and freezing again froze every
    # object alive then, whose cycles then leaked (r54): said instead
    frozen = gc.get_freeze_count()
    if frozen:
        warnings.warn(f"lora_ext: {frozen} objects are frozen (gc.freeze()) as lora_ext looks for the modules made "
                      f"before its import, which it cannot look through: such a module among them whose weight a "
                      f"lora_ext layer is given is not seen as sharing it, and a merge would change that module's "
                      f"outputs too; import lora_ext before making the model, or before gc.freeze()", stacklevel=2)
    return [obj for obj in gc.get_referrers(*classes) if type(obj) in classes and _is_plain(obj)]


def replaced(module) -> None:
    """Marks a plain module that lora_ext's injection replaces by a layer taking its weight: such a module computes
    nothing beside that layer (kept alive only by a reference such as a traceback's), so a layer given its weight is
    not tied to it (_plain_tie). (A module unload puts back is a new one, which may well be tied later.)"""
    try:
        with _lock:
            _replaced.add(module)
    except TypeError:  # (a module class without hashing)
        pass


def _own_conv(module) -> bool:
    """Whether `module` is a ConvLoRA's conv (that layer is a lora_ext layer: the registry ties it)."""
    try:
        return any(layer._modules.get("conv") is module for layer in _convs.get(module, ()))
    except TypeError:
        return False


_torch_setstate = nn.Module.__setstate__


@functools.wraps(_torch_setstate)
def _setstate(self, state):
    """torch's nn.Module.__setstate__ (an unpickled or deep-copied module), then: a plain module (_TIE_TARGETS),
    which no registration hook saw take its weight, notes itself once built (_restored_plain)."""
    _torch_setstate(self, state)
    if _is_plain(self):
        _restored_plain(self)


nn.Module.__setstate__ = _setstate
_torch_module.register_module_module_registration_hook(_on_module)
_torch_module.register_module_parameter_registration_hook(_on_parameter)
