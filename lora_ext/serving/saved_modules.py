"""peft's modules_to_save: modules an adapter replaces whole (a classification head: `score`, `classifier`), one
copy per adapter beside the model's own.

`ModulesToSave` takes the module's place in the model, with the names peft's ModulesToSaveWrapper uses
(`original_module`, and `modules_to_save.<adapter>` for each adapter's copy), so state_dict keys read as peft's.
Its forward runs the active adapter's copy, or the original module when the active adapter brought none. The
model-level set_adapter / delete_adapter and unload of lora_ext.serving keep the copies in step with the LoRA
layers, under the model's lock. A switch writes nothing: it only changes which module computes. So a CUDA graph
captured before a switch that changes the module replays the old one: capture again (as after a rank change).
In a mixed batch (batch_adapters) each row computes with its own adapter's module (`SavedBatch`).

Which modules: peft's rules, mirrored. A module is saved when its name ends with an entry of modules_to_save (a
plain string suffix, as peft's `key.endswith(entry)`); LoRA targets skip every module whose name has an entry as a
whole part, and everything inside it (peft's `(^|.*\\.)entry($|\\..*)`).
"""
import copy
import math
import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .. import batched, ops, sharded
from ..layers import CHECKPOINT_AFTER, LoRALayer, checkpoint_check, keep_called_if_pickled_before, nested_forward
from ..utils import plain_name

# modules that compute each token alone: a token layout's leading dimensions may be flattened for them
_TOKENWISE = (nn.Linear,)
# and those computing each token alone over its last dimension: a nested input is computed padded (nested_forward)
_PER_TOKEN = (nn.Linear, nn.LayerNorm, nn.RMSNorm)
# containers peft refuses to wrap (they have no forward of their own)
_CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


class ModulesToSave(nn.Module):
    """A module that adapters replace whole: `original_module` (the model's own, never written) and one copy per
    adapter in `modules_to_save`; forward runs the active adapter's copy, else the original. Attributes the
    wrapper lacks are read from the module that computes (the head's `.weight`, say), as peft's wrapper does."""

    _adapter_off = 0  # open lora.disable_adapter blocks (a class default: torch.compile guards on the attribute)
    _adapter_disabled = False  # whether there is one (what forward reads: see LoRALayer's)
    _parent_must_call = True  # (layers.keep_layers_called: a fast path read the active copy's weight for every row)

    def __setstate__(self, state):
        nn.Module.__setstate__(self, state)
        keep_called_if_pickled_before(self, state)  # (X2: a mixed batch over one pickled so, 2.18 off)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_adapter_off", None)  # a copy made inside lora.disable_adapter is not in the block
        state.pop("_adapter_disabled", None)
        state.pop("_disable_openers", None)
        state.pop("_open_batches", None)  # (nor one made inside lora.batch_adapters in the batch)
        return state

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None  # whose copy computes; None: the original module
        self.__dict__["_fast_paths_seen"] = True  # (see __setstate__)

    def served(self) -> nn.Module:
        """The module that computes now."""
        return self.module_for(self.__dict__["active_adapter"])

    def module_for(self, adapter: Optional[str]) -> nn.Module:
        """The module that computes while `adapter` is active (None: no adapter, the original)."""
        copies = self._modules["modules_to_save"]._modules
        return copies[adapter] if adapter is not None and adapter in copies else self._modules["original_module"]

    def forward(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) and args[0].is_nested \
                and isinstance(self._modules["original_module"], _PER_TOKEN):
            return nested_forward(self, args[0])  # (nn.TransformerEncoder's, under a padding mask: padded, per token)
        # mixed batches (lora_ext.batch_adapters) open in this context: each row computes with its adapter's module
        # (before a disable_adapter block of another model holding this module: see LoRALayer.forward)
        batches = batched.ACTIVE.get() if batched.ANY_OPEN else None
        served = batches.get(self) if batches is not None else None
        if served is not None and not served.batch.closed:
            batched.refuse_in_program(f"ModulesToSave({type(self._modules['original_module']).__name__})")
            return served.forward(self, args, kwargs)
        if torch.is_grad_enabled() and not ops.compiling():  # (a checkpoint's recomputation: r7)
            checkpoint_check(self)
        if self._adapter_disabled:  # lora.disable_adapter: the model's own module, as peft's
            return self._modules["original_module"](*args, **kwargs)
        return self.served()(*args, **kwargs)

    def _served_state(self) -> nn.Module:
        """The module that computes (the active adapter's copy or rows; the original inside lora.disable_adapter, or
        for an adapter without one), as far as a checkpoint's recomputation needs it unchanged
        (layers.checkpoint_check)."""
        return self._modules["original_module"] if self._adapter_disabled else self.served()

    def _recomputed_refusal(self, was: nn.Module, now: nn.Module) -> RuntimeError:
        def served(module):
            name = next((n for n, m in self._modules["modules_to_save"]._modules.items() if m is module), None)
            return "the original module" if name is None else f"adapter {name!r}'s module"
        return RuntimeError(
            f"{type(self).__name__}({type(self._modules['original_module']).__name__}), which {self.what()}: its "
            f"forward under torch.utils.checkpoint served {served(was)}, and as the backward computes that forward "
            f"again it serves {served(now)}, which would compute the gradients of other values; run the backward "
            f"before switching, or switch back before it. {CHECKPOINT_AFTER}")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_modules" not in self.__dict__ or "active_adapter" not in self.__dict__:
                raise
        # (inside lora.disable_adapter, the original's, as the forward and peft's wrapper give: a tied read of the
        # weight, `model.emb.weight`, read the active copy there, 2.29 off, r50)
        return getattr(self._modules["original_module"] if self._adapter_disabled else self.served(), name)

    @property
    def adapter_names(self) -> List[str]:
        """The adapters that hold a copy of this module."""
        return list(self._modules["modules_to_save"]._modules)

    def set_adapter(self, name: Optional[str], trains: Optional[bool] = None) -> None:
        """The copy of adapter `name` computes from now on; the original module when it has none. `trains`: whether
        the model's LoRA factors train (model-level switches pass it): the new adapter's copy trains as they do, as
        peft's set_adapter makes the adapter it switches to trainable. Without it, training moves with the switch:
        when the copy that computed trained (or, while the original computed, the last one did), the new
        adapter's copy is made trainable. The copy switched away from is frozen."""
        old, new, own = self.served(), self.module_for(name), self._modules["original_module"]
        if old is not new:
            trains = self._trains_after(old, own, trains)
            if self._moves_training(old) and any(p.requires_grad for p in old.parameters()):
                old.requires_grad_(False)
            if self._moves_training(new) and trains is not None:
                _train(new, trains)
            self.__dict__["_trains"] = trains
        self.__dict__["active_adapter"] = name if name in self._modules["modules_to_save"]._modules else None

    def _moves_training(self, module: nn.Module) -> bool:
        """Whether a switch sets `module`'s training (an adapter's copy; not the original). TrainableTokens: not
        a tied head's rows, whose Parameter the embedding's wrapper moves."""
        return module is not self._modules["original_module"]

    def _trains_after(self, old, own, trains):
        """Whether the next copy trains (None: nothing tells; it keeps its flags)."""
        if trains is not None:
            return trains
        if self._moves_training(old):
            return any(p.requires_grad for p in old.parameters())
        return self.__dict__.get("_trains")

    def trains_on_switch(self, name: Optional[str], trains: Optional[bool] = None) -> bool:
        """Whether a switch to `name` (set_adapter(name, trains)) changes which trainable parameters compute
        (DistributedDataParallel cannot follow that)."""
        old, new, own = self.served(), self.module_for(name), self._modules["original_module"]
        if old is new:
            return False
        if any(p.requires_grad for m in (old, new) for p in m.parameters()):
            return True
        return new is not own and bool(self._trains_after(old, own, trains))

    def add(self, name: str, new: nn.Module) -> None:
        """Adds (or replaces) adapter `name`'s copy (from make_copy). A replaced active copy serves at once, and
        trains when the copy it replaces did."""
        old = self._modules["modules_to_save"]._modules.get(name)
        if old is not None and self.__dict__["active_adapter"] == name:
            _train(new, any(p.requires_grad for p in old.parameters()))
        self._modules["modules_to_save"][name] = new

    def delete(self, name: str) -> None:
        if name in self._modules["modules_to_save"]._modules:
            del self._modules["modules_to_save"][name]
        if self.__dict__["active_adapter"] == name:
            self.__dict__["active_adapter"] = None

    def put_back(self) -> nn.Module:
        """The module unload puts back: the one that computes now (peft's unload and merge_and_unload both do)."""
        return self.served()

    def unloaded(self, merge: bool) -> nn.Module:
        """put_back(), made ready to go back (see TrainableTokens)."""
        return self.put_back()

    def merge_refusal(self, model: nn.Module, path: str) -> Optional[str]:
        """Why unload(merge=True) cannot put back what unloaded() gives (None: it can; see TrainableTokens)."""
        return None

    def what(self) -> str:
        """What adapters do to this module, in messages."""
        return "is saved whole (modules_to_save)"

    def extra_repr(self) -> str:
        return f"active_adapter={self.__dict__['active_adapter']!r}"


def _train(module: nn.Module, trains: bool) -> None:
    """The module's parameters trainable (those that can be: floating point) or frozen."""
    for p in module.parameters():
        p.requires_grad_(bool(trains) and (p.is_floating_point() or p.is_complex()))


class SavedBatch:
    """A module saved whole in an open mixed batch: the rows are split by the module their adapter computes with
    (its copy; the original for rows of the base model or of adapters without one), each part runs through its
    module, and the outputs go back to their rows (peft's mixed batches do the same). The module's first input
    must have the batch's rows as its first dimension."""

    def __init__(self, batch, path: str, wrapper: ModulesToSave):
        self.batch, self.path = batch, path
        batch.present  # (read as the batch opens: a device sync, outside any CUDA graph capture in the block)
        # the wrapper's modules as the batch opens (its original, then each copy), and each table entry's as an index
        # into them, a list (eager) and a tensor (traced): a compiled forward then reads no adapter name (a graph
        # reading the table's names guarded on them, a new one for each order of the adapters, and fullgraph=True
        # failed at dynamo's limit after 8, v2), and a copy deleted during the block (through another model holding
        # this one, which the block's hold does not stop) moves no row to another copy (2.70 off, r52): the batch
        # serves the modules it opened with, as its layers serve the slots they loaded
        self.modules = [wrapper._modules["original_module"], *wrapper._modules["modules_to_save"]._modules.values()]
        ids = [id(m) for m in self.modules]
        self.entries = [ids.index(id(wrapper.module_for(name))) for name in [*batch.table, None]]
        self.pick = torch.tensor(self.entries, dtype=torch.int64, device=batch.rows.device)

    def forward(self, wrapper: ModulesToSave, args, kwargs):
        batch = self.batch
        traced = ops.compiling()
        if any(isinstance(t, Tensor) and t.is_nested for t in (*args, *kwargs.values())):
            # (a module saved whole taking more than one nested input, or keywords: a whole encoder layer under
            # nn.TransformerEncoder's padding mask, X2; padded, its attention would see the padding)
            kind = type(wrapper._modules["original_module"]).__name__
            raise ValueError(f"batch_adapters: a module saved whole ({kind}) was given nested tensors "
                             f"(nn.TransformerEncoder under a padding mask); build the encoder with "
                             f"enable_nested_tensor=False, or serve it one adapter at a time")
        groups: Dict[int, List[int]] = {}  # module index -> the table entries it serves
        if traced:  # every module the wrapper held (which adapters the rows take is not read: see __init__)
            if len(self.modules) == 1:
                return self.modules[0](*args, **kwargs)
        else:
            for entry, module in enumerate(self.entries):  # batch.rows: len(table) for the base
                if entry in batch.present:  # (no row of it: not run, r50)
                    groups.setdefault(module, []).append(entry)
            if len(groups) == 1:  # one module serves every row (none of the batch's adapters has its own): no split
                return self.modules[next(iter(groups))](*args, **kwargs)
        x = args[0] if args else None
        lead = None  # the leading dimensions a token layout flattens
        if isinstance(x, Tensor) and x.dim() > 1 and x.shape[0] != batch.n and batch.layout == "tokens" \
                and math.prod(x.shape[:-1]) == batch.n and isinstance(wrapper.original_module, _TOKENWISE):
            lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
            args = (x, *args[1:])
        elif isinstance(x, Tensor) and x.dim() > 1 and x.shape[0] != batch.n and batch.layout == "tokens" \
                and x.numel() == batch.n and isinstance(wrapper.original_module, nn.Embedding) and not args[1:]:
            lead, x = x.shape, x.reshape(-1)  # a lookup's ids: each token alone
            args = (x,)
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] not in batch.sizes:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"batch_adapters: module {self.path!r} {wrapper.what()} and computes each row with its "
                             f"adapter's own: its first input's first dimension must be the batch's rows (or, for a "
                             f"Linear or an Embedding, its tokens flattened); {batch.rows_text()}, got {got}"
                             f"{batch.hint(x.shape[0]) if isinstance(x, Tensor) and x.dim() else ''}")
        if isinstance(wrapper.original_module, nn.Embedding) and batch.ambiguous(x.shape, not x.is_floating_point()):
            raise ValueError(f"batch_adapters: module {self.path!r} {wrapper.what()} and computes each row with its "
                             f"adapter's own, but got ids of shape {tuple(x.shape)}"
                             f"{batch.hint(x.shape[0], x.shape, True)}")
        rows = batch.rows_for(x.shape[0]).to(x.device)
        if traced:
            out = self._masked(wrapper, rows, args, kwargs)
            return out.reshape(*lead, *out.shape[1:]) if lead is not None else out
        parts = [(self.modules[module], torch.isin(rows, torch.tensor(entries, device=x.device)).nonzero().squeeze(1))
                 for module, entries in groups.items()]
        parts = [(module, idx) for module, idx in parts if idx.numel()]
        if len(parts) == 1:
            out = parts[0][0](*args, **kwargs)
            return out.reshape(*lead, *out.shape[1:]) if lead is not None else out
        self._check_shared(wrapper, args[1:], kwargs)
        out = None
        for module, idx in parts:
            y = module(x.index_select(0, idx), *args[1:], **kwargs)
            if not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != idx.numel():
                raise ValueError(f"batch_adapters: module {self.path!r} ({wrapper.what()}) returned "
                                 f"{type(y).__name__ if not isinstance(y, Tensor) else tuple(y.shape)} for "
                                 f"{idx.numel()} rows; mixed batches split its rows, so it must return a tensor of "
                                 f"rows")
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out.index_copy_(0, idx, y)
        return out.reshape(*lead, *out.shape[1:]) if lead is not None else out

    def _masked(self, wrapper: ModulesToSave, rows, args, kwargs) -> Tensor:
        """The traced form of the split (torch.compile): each of the wrapper's modules runs on every row (its own
        copy of the first input: a module writing it in place changed the next one's, 0.39 off, v2) and each row
        takes its own module's output, so that no shape depends on the rows' adapters (the split's nonzero stopped
        a fullgraph=True compile with a data-dependent guard, u5); the same values, every module's cost on every
        row. The module's other arguments are refused as for the split (_check_shared), and so are modules that
        would take statistics over every row, and gradients (the copies of adapters no row takes would get zeros,
        which an optimizer's weight decay then applies: r52)."""
        x, modules = args[0], self.modules
        trained = x.requires_grad or any(p.requires_grad for m in modules for p in m.parameters())
        if torch.is_grad_enabled() and trained:
            raise RuntimeError(f"batch_adapters: module {self.path!r} ({wrapper.what()}) runs with gradients enabled "
                               f"in a compiled mixed batch, which runs every copy it holds on every row: run the batch "
                               f"under torch.no_grad() or torch.inference_mode(), or eagerly")
        for module in modules:
            norm = next((m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.training
                         and (isinstance(m, nn.modules.batchnorm._BatchNorm) or m.track_running_stats)), None)
            if norm is not None:  # (the statistics of every row, not of its adapter's rows: 2.70 off, r50; an
                # InstanceNorm's running statistics, 0.12 off, v2)
                raise ValueError(f"batch_adapters: module {self.path!r} ({wrapper.what()}) holds a "
                                 f"{type(norm).__name__} in training mode, whose statistics a compiled mixed batch "
                                 f"would take over every row (it runs each module on every row); eval() it, or run "
                                 f"the batch eagerly")
        self._check_shared(wrapper, args[1:], kwargs)
        pick = self.pick.to(rows.device)[rows]
        out = None
        for j, module in enumerate(modules):
            y = module(x.clone(), *args[1:], **kwargs)
            if not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != x.shape[0]:
                raise ValueError(f"batch_adapters: module {self.path!r} ({wrapper.what()}) returned "
                                 f"{type(y).__name__ if not isinstance(y, Tensor) else tuple(y.shape)} for "
                                 f"{x.shape[0]} rows; mixed batches split its rows, so it must return a tensor of rows")
            out = y if out is None else torch.where((pick == j).view(-1, *([1] * (y.dim() - 1))), y, out)
        return out

    def _check_shared(self, wrapper: ModulesToSave, extra, kwargs) -> None:
        """Every part gets the module's other arguments whole. Refuses (before any part runs) an argument that may
        hold the rows or state the parts would share: a tensor of more than one row (an attention mask, a position
        per token), a cache (a decoder layer's keys and values would take every part's tokens), anything else
        that is not a plain value. peft's mixed batches refuse every module but Linear, Embedding and Conv."""
        for name, value in [*((f"argument {i + 1}", v) for i, v in enumerate(extra)), *kwargs.items()]:
            if not _shared_safely(value):
                got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"batch_adapters: module {self.path!r} {wrapper.what()} and is called with {name} = "
                                 f"{got}; a mixed batch runs the module once per adapter on that adapter's rows and "
                                 f"cannot tell whether {name} holds rows or state the runs would share (a cache "
                                 f"would take every run's tokens), so it is refused: serve the adapters that save "
                                 f"this module one batch at a time (peft's mixed batches refuse such modules too)")


def _shared_safely(value) -> bool:
    """A module argument every part of a split batch can take whole: a plain value, or a tensor of one row."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return True
    if isinstance(value, Tensor):
        return value.dim() == 0 or value.shape[0] == 1
    if isinstance(value, (tuple, list)):
        return all(_shared_safely(v) for v in value)
    return False


def wrappers(model: nn.Module) -> List[Tuple[str, ModulesToSave]]:
    """(name, wrapper) for every ModulesToSave of the model."""
    return [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, ModulesToSave)]


def check_entries(option: str, entries) -> List[str]:
    """modules_to_save as a list of names (None: none); ValueError naming `option` for anything else."""
    if entries is None:
        return []
    if isinstance(entries, str) or not isinstance(entries, (list, tuple)) \
            or not all(isinstance(e, str) and e for e in entries):
        raise ValueError(f"{option}: modules_to_save must be a list of module names, got {entries!r}")
    for e in entries:
        try:
            re.compile(rf"(^|.*\.){e}($|\..*)")
        except re.error as err:
            raise ValueError(f"{option}: modules_to_save entry {e!r} breaks peft's regex that keeps LoRA off the "
                             f"modules to save ({err})") from None
    return list(entries)


# what peft's task models save whole whatever the config's modules_to_save lists: PeftModelForSequenceClassification
# and ...ForTokenClassification add "classifier" and "score" to it as they load an adapter, ...ForQuestionAnswering
# "qa_outputs" (PeftModel.from_pretrained picks the class by the config's task_type)
TASK_ENTRIES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                "QUESTION_ANS": ("qa_outputs",)}


def config_entries(option: str, cfg: dict) -> List[str]:
    """The modules_to_save entries a peft adapter config `cfg` stands for: its own (checked, as check_entries), and
    those its task_type adds (TASK_ENTRIES)."""
    entries = check_entries(option, cfg.get("modules_to_save"))
    return entries + [e for e in TASK_ENTRIES.get(cfg.get("task_type"), ()) if e not in entries]


def saved_match(entries, name: str) -> bool:
    """Whether peft saves module `name` whole: its name ends with an entry (a plain string suffix)."""
    return any(name.endswith(e) for e in entries)


def keeps_lora_off(entries, name: str) -> bool:
    """Whether peft keeps LoRA off module `name`: an entry is a whole part of its name."""
    return any(re.match(rf"(^|.*\.){e}($|\..*)", name) for e in entries)


def _inside(name: str, prefixes) -> bool:
    return any(name.startswith(p) for p in prefixes)


def find(model: nn.Module, entries, option: str) -> List[Tuple[str, nn.Module]]:
    """[(name, module)] that peft saves whole for `entries`: plain modules, or wrappers already there (the
    insides of wrappers and of lora_ext layers are skipped). A match inside another, a lora_ext layer and a
    container are refused (ValueError naming `option` and the module)."""
    if not entries:
        return []
    skip = [n + "." for n, m in model.named_modules(remove_duplicate=False)
            if n and isinstance(m, (LoRALayer, ModulesToSave))]
    found = []
    for name, module in model.named_modules(remove_duplicate=False):  # a module under two names: saved at both
        if not name or _inside(name, skip) or not (saved_match(entries, name)
                                                   or saved_match(entries, plain_name(name))):  # (r12: wrappers)
            continue
        if isinstance(module, LoRALayer):
            raise ValueError(f"{option}: modules_to_save matches {name!r}, a lora_ext layer (an adapter's LoRA "
                             f"target); peft saves only plain modules whole")
        from .tokens import TrainableTokens
        if isinstance(module, TrainableTokens):
            raise ValueError(f"{option}: modules_to_save matches {name!r}, whose rows of tokens adapter(s) "
                             f"{module.adapter_names} replace (trainable_token_indices); peft does not save such a "
                             f"module whole")
        if isinstance(module, _CONTAINERS):
            raise ValueError(f"{option}: modules_to_save matches {name!r}, a {type(module).__name__}, which has no "
                             f"forward to replace")
        outer = next((n for n, _ in found if name.startswith(n + ".")), None)
        if outer is not None:
            raise ValueError(f"{option}: modules_to_save matches {name!r} inside {outer!r}, which it also matches; "
                             f"peft's result for nested modules to save is not well defined: lora_ext refuses it")
        found.append((name, module))
    return found


def module_at(model: nn.Module, name: str) -> Optional[nn.Module]:
    """The module at `name` in `model`, or None where there is none."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def original(module: nn.Module) -> nn.Module:
    return module._modules["original_module"] if isinstance(module, ModulesToSave) else module


def split_state(tensors: Dict[str, Tensor], names, prefix: str) -> Tuple[Dict[str, Dict[str, Tensor]], Dict]:
    """({module name: {key inside it: tensor}}, the other tensors) for keys `prefix + name + "." + key`."""
    states, rest = {}, {}
    heads = sorted(((prefix + n + ".", n) for n in names), key=lambda p: -len(p[0]))
    for key, t in tensors.items():
        head = next((h for h in heads if key.startswith(h[0])), None)
        if head is None:
            rest[key] = t
        else:
            states.setdefault(head[1], {})[key[len(head[0]):]] = t
    return states, rest


def make_copy(where: str, name: str, module: nn.Module, state: Dict[str, Tensor]) -> nn.Module:
    """An adapter's copy of module `name` (a plain module or a ModulesToSave): the model's module copied, with
    `state` (checked by check_state) loaded into it in the module's dtypes; a failure (a module deepcopy cannot
    copy, out of memory) raises ValueError naming `where` and the module. Nothing in the model changes."""
    try:
        new = copy.deepcopy(original(module))
        new.load_state_dict(state, strict=True)
    except Exception as e:
        raise ValueError(f"{where}: module {name!r} (saved whole: modules_to_save) cannot be copied for the adapter "
                         f"({type(e).__name__}: {' '.join(str(e).split())})") from e
    return new


def check_state(where: str, name: str, module: nn.Module, state: Optional[Dict[str, Tensor]], prefix: str):
    """{key: tensor} of a saved module's state, on the module's devices and in its dtypes, checked against
    `module` (its whole state_dict, same shapes, finite floating values); ValueError naming `where` and the key."""
    want = original(module).state_dict()
    state = state or {}
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    if extra:
        raise ValueError(f"{where}: unexpected key {prefix + name + '.' + extra[0]!r}: module {name!r} (saved whole: "
                         f"modules_to_save) has no {extra[0]!r} (it has {sorted(want)})")
    layers = [(n, m) for n, m in original(module).named_modules() if isinstance(m, LoRALayer) and m.has_lora]
    if missing and layers:
        n, m = layers[0]
        raise ValueError(f"{where}: module {name!r} is saved whole (modules_to_save), but {name + '.' + n!r} inside "
                         f"it is a lora_ext layer (holding {m.adapter_names}); lora_ext saves no module whole over "
                         f"LoRA layers (peft puts them into each copy): serve the two adapters from models of their "
                         f"own")
    if missing:
        raise ValueError(f"{where}: module {name!r} is saved whole (modules_to_save) but the file holds no "
                         f"{prefix + name + '.' + missing[0]!r}; lora_ext refuses the incomplete module (as peft does)")
    out = {}
    for k, current in want.items():
        t = state[k]
        label = f"{where}: {prefix + name + '.' + k!r}"
        if current.is_meta:
            raise ValueError(f"{label}: module {name!r} is on the meta device; load the model's weights first")
        if sharded.is_dtensor(current):
            raise ValueError(f"{label}: module {name!r} is sharded (a DTensor: FSDP2 or tensor parallel); its copy "
                             f"for the adapter would not be: load the adapter before sharding the model")
        if tuple(t.shape) != tuple(current.shape):
            raise ValueError(f"{label} has shape {tuple(t.shape)}, but the model's {name}.{k} has "
                             f"{tuple(current.shape)}")
        if t.is_floating_point() != current.is_floating_point() or t.is_complex() != current.is_complex():
            raise ValueError(f"{label} is {t.dtype}, but the model's {name}.{k} is {current.dtype}")
        given, t = t, t.to(current.device, current.dtype)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            if bool(torch.isfinite(given).all()):
                raise ValueError(f"{label} holds values (largest |value| {given.abs().max().item():.4g}) that "
                                 f"overflow the model's {name}.{k} dtype {current.dtype}")
            raise ValueError(f"{label} holds non-finite values (inf/NaN)")
        out[k] = t
    return out
