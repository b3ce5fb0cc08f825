"""loralib's helpers: freeze all but LoRA, and the LoRA part of a state dict."""
import collections
import contextlib
import warnings

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.parallel import DataParallel, DistributedDataParallel

from . import sharded
from .layers import ADAPTER_METADATA, ConvLoRA, LoRALayer

BIAS_MODES = ("none", "all", "lora_only")


class BiasModeError(ValueError, NotImplementedError):
    """An unknown bias mode: a ValueError, and the NotImplementedError loralib raises (an `except` written for
    either catches it)."""


def _check_bias(bias):
    if bias not in BIAS_MODES:
        raise BiasModeError(f"bias must be one of {', '.join(map(repr, BIAS_MODES))}, got {bias!r}")


_WRAPPER_NAMES = ("_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def plain_name(name: str) -> str:
    """A module's or tensor's name as the model without torch's wrappers has it: activation checkpointing's
    (apply_activation_checkpointing: `_checkpoint_wrapped_module`) and FSDP1's (`_fsdp_wrapped_module`) path
    segments left out, as their state_dict hooks and torch.distributed's clean_tensor_name leave them out (F1: a
    lora_state_dict of a checkpoint-wrapped model kept them, and loralib's load of it with strict=False loaded
    nothing). The wrappers hand attribute reads on to the module they wrap, so get_submodule finds the plain name."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_NAMES) if "_wrapped_module" in name else name


def _lora_layers(model, remove_duplicate=True):
    """(name prefix, layer) of the model's LoRA layers, by their plain names (plain_name); remove_duplicate=False: a
    layer registered under two names (ALBERT's shared layers, `self.b = self.a`) under each, as model.state_dict()
    keys it."""
    for name, module in model.named_modules(remove_duplicate=remove_duplicate):
        if isinstance(module, LoRALayer):
            name = plain_name(name)
            yield (name + "." if name else ""), module


def _active_copies(model, remove_duplicate=True):
    """(name prefix, module) of the active adapter's copy of every module saved whole (peft's modules_to_save):
    trained and saved with the factors, as peft does. remove_duplicate as _lora_layers'."""
    from .serving.saved_modules import ModulesToSave
    for name, module in model.named_modules(remove_duplicate=remove_duplicate):
        if isinstance(module, ModulesToSave) and module.active_adapter is not None:
            name = plain_name(name)
            yield f"{name + '.' if name else ''}modules_to_save.{module.active_adapter}.", module.served()


def _layer_bias(module):
    """(key suffix, parameter) of a LoRA layer's own bias, or None."""
    module._check_unloaded()
    if isinstance(module, ConvLoRA):
        return ("conv.bias", module.conv.bias) if module.conv.bias is not None else None
    bias = getattr(module, "bias", None)
    return ("bias", bias) if isinstance(bias, nn.Parameter) else None


def note_bias(layer, mode: str) -> None:
    """Notes on a LoRA layer what mark_only_lora_as_trainable said of its bias (`mode`), or, at inject (mode "inject":
    inject leaves the bias as it was), a copy of its values: save_peft_adapter, whose file holds no biases, names
    the biases that train by mode or whose values changed since inject (an optimizer over every parameter that
    requires grad trains the bias inject leaves trainable, r7; frozen again before the save, r8), not those that
    only require grad (r6: lora-ext demo trains the factors alone), nor those copied, pickled or sharded since."""
    if mode != "inject":
        layer.__dict__["_bias_mode"] = mode
        return
    values = layer._bias_copy()
    if values is not None:  # (else noted at its first forward with gradients)
        layer.__dict__["_bias_at_inject"] = values


def trained_bias(layer) -> bool:
    """Whether `layer`'s own bias trains (note_bias): mark_only_lora_as_trainable's bias= made it trainable (and it
    requires grad still), or its values differ from those it had at inject (kept through dtype conversions:
    LoRALayer._apply), or, where inject noted none (a layer built by hand, or injected on the meta device: r9, r10),
    at its first eager forward with gradients (LoRALayer._note_bias_at_first_training_forward); where none were
    noted at all, while it requires grad beside a frozen weight."""
    own = _layer_bias(layer)
    if own is None:
        return False
    bias = own[1]
    if layer.__dict__.get("_bias_trained") or (bias.requires_grad
                                                and layer.__dict__.get("_bias_mode") in ("lora_only", "all")):
        return True
    before = layer.__dict__.get("_bias_at_inject")
    if before is None:  # no values noted (trained only under torch.compile, sharded, or never run with gradients):
        # named while it requires grad beside a frozen weight, which may name one that never trained (r10), never
        # leaves one out (r11: a bias trained through torch.compile went unnamed)
        weight = layer._weight_or_none()
        return bias.requires_grad and weight is not None and not weight.requires_grad
    if bias.is_meta:
        return False
    now = sharded.full(bias.detach()) if sharded.is_dtensor(bias) else bias.detach()
    held = [t for t in (before, layer.__dict__.get("_bias_converted")) if t is not None and t.shape == now.shape]
    return not any(torch.equal(t.to(device=now.device, dtype=now.dtype), now) for t in held)


def _is_bias(name):
    """Whether a parameter is a bias for bias='all': its own name says so (bias, nn.MultiheadAttention's
    in_proj_bias, bias_k and bias_v, as loralib's rule picks them), whatever its modules are named."""
    return "bias" in name.rsplit(".", 1)[-1]


def _fsdp1_lora_state_dict(model: nn.Module, bias: str) -> dict:
    """lora_state_dict of a model whose LoRA layers FSDP1 (FullyShardedDataParallel) flattened: the same keys, taken
    from FSDP1's full state dict (whole tensors on every rank, its wrapper names left out; every rank calls it), as the
    layers hold flat shard pieces between forwards (they gave 1-D pieces under FSDP1's names)."""
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
    if not FullyShardedDataParallel.fsdp_modules(model):
        flat = next(name for name, m in _lora_layers(model) if sharded.fsdp1_flattened(m))
        raise ValueError(f"lora_state_dict: FSDP1 (FullyShardedDataParallel) flattened layer {flat!r} into a flat "
                         f"parameter of a FullyShardedDataParallel module outside the module given, where its whole "
                         f"factors are gathered: pass the FullyShardedDataParallel model itself")
    with warnings.catch_warnings():  # (torch deprecates FSDP1's state_dict_type, FSDP1 itself with it)
        warnings.simplefilter("ignore", FutureWarning)
        with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                                      FullStateDictConfig(rank0_only=False)):
            state = model.state_dict()
    buffers = {plain_name(name) for name, _ in model.named_buffers()}  # (bias="all": parameters only)
    keep = set()
    for prefix, m in _lora_layers(model):  # (plain names, as FSDP1's state dict has them)
        if m.has_lora:
            keep.update((prefix + "lora_A", prefix + "lora_B"))
        if bias == "lora_only":  # (by key: with use_orig_params=False the bias is a view, not a Parameter)
            keep.add(prefix + ("conv.bias" if isinstance(m, ConvLoRA) else "bias"))
    copies = tuple(prefix for prefix, _ in _active_copies(model))
    return {k: t.detach() for k, t in state.items()
            if k in keep or (bias == "all" and _is_bias(k) and k not in buffers) or (copies and k.startswith(copies))}


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze everything but the LoRA layers' lora_A/lora_B (which are made trainable), and the active adapter's
    copies of modules saved whole (peft's modules_to_save), which peft trains too.

    bias: 'none' keeps every bias frozen, 'all' trains every parameter whose own name holds "bias" (bias,
    in_proj_bias, bias_k...), 'lora_only' trains the biases of LoRA layers only (of every LoRA layer, r=0 too, as
    loralib; lora_state_dict saves the same biases).
    """
    _check_bias(bias)
    # FSDP2: the flags go on the sharded Parameters, not on all-gathered copies (a forward leaves the root's, or
    # those of reshard_after_forward=False, gathered) that the next reshard drops: the factors trained nothing,
    # and an optimizer built over the gathered copies stepped tensors no forward reads (F1)
    sharded.reshard_fsdp(model)
    lora = {id(p) for _, m in _lora_layers(model) if m.has_lora for p in (m.lora_A, m.lora_B)}
    lora |= {id(p) for _, copy in _active_copies(model) for p in copy.parameters()}
    if bias == "lora_only":
        lora |= {id(own[1]) for _, m in _lora_layers(model) for own in [_layer_bias(m)] if own is not None}
    flags = [(name, p, id(p) in lora or (bias == "all" and _is_bias(name))) for name, p in model.named_parameters()]
    _check_ddp_flags(model, {id(p): trained for _, p, trained in flags}, bias)
    for _, p, trained in flags:
        p.requires_grad = trained
    for _, m in _lora_layers(model):  # the model frozen: unload gives the base weights back frozen (peft's unload)
        m.__dict__["_base_requires_grad"] = False
        note_bias(m, bias)  # (save_peft_adapter names the biases this trains, which its file leaves out)
    from .serving.saved_modules import ModulesToSave
    for module in model.modules():  # adapters train: a switch puts the next adapter's copy (or rows) in training
        if isinstance(module, ModulesToSave):
            module.__dict__["_trains"] = True
    from . import ddp_guard
    if not under_ddp(model):  # DDP holds the Parameters it was built with: those stay
        for _, m in _lora_layers(model):
            if m.has_lora:
                m.settle_parameters()  # each adapter trains its own Parameters (serving switches lend them)
    ddp_guard.keep_parameters([m for _, m in _lora_layers(model)], _ddp_of(model))  # (None: no DDP keeps them now)


def _check_ddp_flags(model: nn.Module, trained: dict, bias: str) -> None:
    """Refuses, before any flag changes, requires_grad flags under DistributedDataParallel that train another
    number of Parameters than DDP's reducer took at construction (it synchronises those only: factors unfrozen
    after the wrap would train apart). Back to the flags of the construction (after serving frozen) is fine."""
    from . import ddp_guard
    ddp = _ddp_of(model)
    params = getattr(ddp, "_module_parameters", None) if ddp is not None else None
    built = ddp_guard.reducer_count(ddp) if params is not None else None
    if built is None:
        return
    after = sum(1 for p in params if trained.get(id(p), p.requires_grad))
    if after != built:
        raise ValueError(f"mark_only_lora_as_trainable: the model is wrapped in DistributedDataParallel, which "
                         f"synchronises the {built} Parameters that required grad when it was built; this would "
                         f"train {after}. Mark the inner model and wrap it again: lora.mark_only_lora_as_trainable("
                         f"ddp.module, {bias!r}); ddp = DistributedDataParallel(ddp.module, ...)")


def _wrapped(model: nn.Module):
    """model, then each model inside it: DistributedDataParallel's and DataParallel's .module (r6: a save through
    DataParallel named every module 'module.<name>', a file neither peft nor lora_ext loads), torch.compile's
    ._orig_mod."""
    while isinstance(model, nn.Module):
        yield model
        # (torch.compile's wrapper registers the model as its child `_orig_mod`; a lookup in _modules spares the
        # AttributeError nn.Module.__getattr__ raises for every other module, most of model_lock's fast path)
        model = (model.module if isinstance(model, (DistributedDataParallel, DataParallel))
                 else model.__dict__.get("_modules", {}).get("_orig_mod"))


def _ddp_of(model: nn.Module):
    """The DistributedDataParallel that `model` is or that a torch.compile wrapper of it holds, else None."""
    return next((m for m in _wrapped(model) if isinstance(m, DistributedDataParallel)), None)


def under_ddp(model: nn.Module) -> bool:
    """Whether the model is a DistributedDataParallel, or a torch.compile wrapper of one."""
    return _ddp_of(model) is not None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel and torch.compile wrappers (as torch.distributed.checkpoint's
    get_model_state_dict sees it)."""
    *_, inner = _wrapped(model)
    return inner


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict:
    """The LoRA layers' lora_A/lora_B (and biases, by the same modes as mark_only_lora_as_trainable),
    keyed as in model.state_dict() of the model inside DistributedDataParallel and torch.compile wrappers (no
    "module." or "_orig_mod." prefix, as torch.distributed.checkpoint's get_model_state_dict): it loads into the
    plain model (load into a wrapped one through its .module). The active adapter's copies of modules saved whole
    (peft's modules_to_save) are part of it: their whole state, under their keys in the model."""
    _check_bias(bias)
    # one adapter throughout: each layer's lock alone gave a snapshot of adapter b at one layer and a at the others
    # in 60-187 of 300 reads during model-level switches on other threads, which a plain model then loaded without a
    # word (w2). Read again while a model-level write began or ran meanwhile; after a few tries, under the lock's
    # read that waits for a write under way but not for the writes waiting (ModelLock.reading: under hold, a forward
    # waiting on a worker that reads the state deadlocked, a new hold queueing behind a writer that waits for the
    # forward, r54). The optimistic reads take no lock, so a model that never had one gets none (and no lock hooks);
    # the sharded read below does take one, which installs its hooks on a model that had none: harmless (the model
    # holds lora_ext layers, and any model-level switch of it installs them too; r3)
    inner = unwrap(model)
    from .serving.adapters import model_lock  # (serving imports this module)
    # (sharded factors are gathered, a collective: one read, as every rank must make as many, under that read (ranks
    # seeing other writes on their own threads would otherwise read again a different number of times and hang;
    # read once without it, 49 of 100 snapshots of an FSDP2 model during switches mixed two adapters, h1)
    if any(sharded.is_dtensor(m.lora_A) or sharded.fsdp1_flattened(m) for _, m in _lora_layers(inner) if m.has_lora):
        lock = model_lock(model)
        lock.refuse_forked(state=True)
        with lock.reading():
            return _lora_state_dict(inner, bias)
    for _ in range(_SNAPSHOT_TRIES):
        lock = inner.__dict__.get("_lora_ext_model_lock")
        if lock is not None:  # (a child forked part way through a switch: the counts below start again there, h1)
            lock.refuse_forked(state=True)
        before = None if lock is None else (lock.writes, lock._writer)
        out = _lora_state_dict(inner, bias)
        if inner.__dict__.get("_lora_ext_model_lock") is lock and (
                lock is None or (before[1] is None and lock.writes == before[0] and lock._writer is None)):
            return out
    with model_lock(model).reading():  # (the model has one: the tries saw its writes)
        return _lora_state_dict(inner, bias)


_SNAPSHOT_TRIES = 8


def _own(t: Tensor, live: Tensor) -> Tensor:
    """`t`, a copy where it shares the live factor's storage (a gathered DTensor is a new tensor already)."""
    return t.clone() if t.data_ptr() == sharded.local(live).data_ptr() else t


def _lora_state_dict(model: nn.Module, bias: str) -> dict:
    if any(sharded.fsdp1_flattened(m) for _, m in _lora_layers(model)):
        return _fsdp1_lora_state_dict(model, bias)
    out = collections.OrderedDict()
    # whose factors they are, as model.state_dict() says it (layers.ADAPTER_METADATA): a load into a layer serving
    # another adapter it holds is refused
    out._metadata = {}
    sharded.reshard_fsdp(model)  # (FSDP2: gathered under a MixedPrecisionPolicy, factors are param_dtype's copies)
    for prefix, m in _lora_layers(model, remove_duplicate=False):  # (a layer under two names: under both, as
        # model.state_dict() and loralib key it; P1: the second name was missing from a load with strict=False)
        # the factors and the name they are saved under read together, under the layer's lock (h38: a switch of the
        # layer alone on another thread gave one adapter's lora_A beside another's lora_B in 259 of 2000 reads)
        with m.__dict__.get("_lock") or contextlib.nullcontext():
            if m.has_lora:
                # copies: a serving switch writes the next adapter into the live factors in place, so a dict of
                # them changed under its metadata after it was returned (saved later, b's factors named a's: w2)
                # (FSDP2: gathered, every rank calls)
                out[prefix + "lora_A"] = _own(sharded.full(m.lora_A.detach()), m.lora_A)
                out[prefix + "lora_B"] = _own(sharded.full(m.lora_B.detach()), m.lora_B)
                out._metadata[prefix[:-1]] = {ADAPTER_METADATA: m.active_adapter}
        if bias == "lora_only":  # every LoRA layer's, as mark_only_lora_as_trainable trains them
            own = _layer_bias(m)
            if own is not None:
                out[prefix + own[0]] = sharded.full(own[1].detach())
    if bias == "all":
        for name, p in model.named_parameters(remove_duplicate=False):
            if _is_bias(name):
                out[plain_name(name)] = sharded.full(p.detach())
    for prefix, copy in _active_copies(model, remove_duplicate=False):
        out.update({prefix + k: sharded.full(t.detach()) for k, t in copy.state_dict().items()})
    return out
