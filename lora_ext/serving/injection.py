"""Put lora_ext layers into an existing model in place, and take them out again.

A replaced module's parameters move into the new layer as they are (the same Parameter objects, so no copy
of the base weights): nn.Linear -> Linear, transformers' Conv1D -> Linear(fan_in_fan_out=True),
nn.Embedding -> Embedding (a scaled word embedding, as Gemma's or BART's, -> Embedding with its embed_scale),
nn.Conv1d/2d/3d -> Conv1d/2d/3d (around the very same conv module), and a fused
projection named in `fused` -> MergedLinear(enable_lora=...). The new layers are built on the meta device
and only the LoRA factors are allocated.
"""
import ast
import collections
import contextlib
import contextvars
import functools
import inspect
import itertools
import math
import numbers
import re
import sys
import textwrap
import types
import warnings
import weakref
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.module import _WrappedHook

from .. import layers, ops, sharded, ties
from ..layers import LoRALayer
from ..lossless import RECORD_DTYPES
from ..named_adapters import deferred_interrupt, each_or_none
from ..utils import note_bias, plain_name
from .saved_modules import ModulesToSave, keeps_lora_off, wrappers

_CONVS = {nn.Conv1d: layers.Conv1d, nn.Conv2d: layers.Conv2d, nn.Conv3d: layers.Conv3d}


def _hf_conv1d():
    """transformers' Conv1D class when transformers is loaded (a model holding one has loaded it)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


def is_conv1d(module):
    cls = _hf_conv1d()
    return cls is not None and isinstance(module, cls)


def name_matches(spec, name):
    """peft's rule: a string is a regex that must match the whole name; a collection matches a name equal
    to one of its entries or ending in '.' + an entry."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + t) for t in spec)


def check_layers(option, target_modules, layers_to_transform, layers_pattern):
    """Refuses what peft's LoraConfig refuses of layers_to_transform / layers_pattern: other than an int or a list of
    ints, and a regex or a list of them; either with target_modules a regex (a string); a pattern without layers.
    None for either: unset. `option` names them in messages."""
    lt = layers_to_transform
    if isinstance(target_modules, str) and (lt is not None or layers_pattern is not None):
        raise ValueError(f"{option}: layers_to_transform and layers_pattern take a list of target_modules, not the "
                         f"regular expression {target_modules!r} (peft refuses it too)")
    if layers_pattern and lt is None:
        raise ValueError(f"{option}: layers_pattern {layers_pattern!r} without layers_to_transform (peft refuses it "
                         f"too)")
    if not (lt is None or (isinstance(lt, int) and not isinstance(lt, bool)) or (
            isinstance(lt, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in lt))):
        raise ValueError(f"{option}: layers_to_transform must be a layer index or a list of them, got {lt!r}")
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    if patterns is not None:
        if not (isinstance(patterns, (list, tuple)) and all(isinstance(p, str) for p in patterns)):
            raise ValueError(f"{option}: layers_pattern must be a regular expression or a list of them, got "
                             f"{layers_pattern!r}")
        for p in patterns:  # (compiled as in_layers uses it: a pattern naming a group idx breaks that regex)
            _compile(f"{option}: layers_pattern", _layer_regex(p))


def in_layers(name, layers_to_transform, layers_pattern=None):
    """peft's layers_to_transform: whether module `name` lies in one of the layers (an index or a list of them;
    None or [] for every layer). The index is the first number segment after `layers_pattern` ('layers', 'h' or
    a list of such regexes), or with no pattern the first number that a name part follows ('model.layers.3.mlp':
    3; an expert index deeper in the name is not it); a name without one is in no layer."""
    lt = layers_to_transform
    if not filters_layers(lt):
        return True
    if not layers_pattern:  # (None, "" or []: peft's default rule)
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(_layer_regex(pattern), name)
            if match is not None:
                break
    index = match.group("idx") if match is not None else None
    if index is None:  # (also a pattern whose alternation matched without the number: "layers|h")
        return False
    return int(index) == lt if isinstance(lt, int) else int(index) in lt


def filters_layers(layers_to_transform) -> bool:
    """Whether peft's layers_to_transform restricts anything: set, and not an empty list."""
    lt = layers_to_transform
    return not (lt is None or (isinstance(lt, (list, tuple)) and not lt))


def _layer_regex(pattern):
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


def target_matches(spec, name, layers_to_transform=None, layers_pattern=None):
    """name_matches(spec, name), and for a list of names, peft's layer filter on the names matched as a suffix
    (peft takes a name listed whole, as 'all-linear' lists them, in every layer)."""
    if not name_matches(spec, name):
        return False
    return isinstance(spec, str) or name in spec or in_layers(name, layers_to_transform, layers_pattern)


def _compile(option, pattern):
    try:
        return re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        raise ValueError(f"{option}: invalid regular expression {pattern!r} ({e})") from e


def check_name_spec(option, spec, allow_none=True):
    """Raises ValueError naming `option` unless `spec` is a valid regex (a string), a list of names, or None."""
    if spec is None and allow_none:
        return
    if isinstance(spec, str):
        _compile(option, spec)
    elif not (isinstance(spec, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in spec)):
        raise ValueError(f"{option}: expected a regular expression (a string) or a list of module names, "
                         f"got {spec!r}")


def check_patterns(option, patterns, rank):
    """Raises ValueError naming `option` unless `patterns` is a rank_pattern (rank=True: positive integers) or
    alpha_pattern (finite numbers) mapping of valid regexes."""
    if patterns is None:
        return
    if not isinstance(patterns, Mapping):
        raise ValueError(f"{option}: expected a mapping of module-name regexes to values, got {patterns!r}")
    for key, value in patterns.items():
        if not isinstance(key, str):
            raise ValueError(f"{option}: keys must be strings (regexes of module names), got {key!r}")
        _compile(f"{option} key {key!r}", rf"(.*\.)?({key})$")
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if rank and not (number and isinstance(value, numbers.Integral) and value >= 1):
            raise ValueError(f"{option}: {key!r} must map to a positive integer rank, got {value!r}")
        if not rank and not (number and math.isfinite(value)):
            raise ValueError(f"{option}: {key!r} must map to a finite number, got {value!r}")


ALL_LINEAR = "all-linear"
_SEQ_CLS_HEADS = ("score", "classifier")  # peft's names of sequence-classification heads


def is_supported(module):
    """A module lora_ext injects into (or already a lora_ext layer)."""
    return (isinstance(module, (LoRALayer, nn.Linear, nn.Embedding)) or is_conv1d(module)
            or type(module) in _CONVS)


def unsupported_message(option, name, module):
    return (f"{option}: module {name!r} is a {type(module).__name__}, not a Linear/Conv1D/Embedding/Conv layer "
            f"(nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d); name those layers instead")


def _all_linear(model, task_type=None):
    """peft's 'all-linear': every nn.Linear / Conv1D (or lora_ext linear layer) but the output head."""
    names = {n for n, m in model.named_modules()
             if n and (isinstance(m, (nn.Linear, layers.Linear, layers.MergedLinear)) or is_conv1d(m))}
    head = None
    pretrained = getattr(sys.modules.get("transformers"), "PreTrainedModel", None)
    if pretrained is not None and isinstance(model, pretrained):
        head = model.get_output_embeddings()
        if head is None and str(task_type) in ("SEQ_CLS", "TaskType.SEQ_CLS"):
            head = next((getattr(model, h) for h in _SEQ_CLS_HEADS if getattr(model, h, None) is not None), None)
    if head is not None:
        names -= {n for n, m in model.named_modules() if m is head}
    return names


def resolve_targets(model, target_modules, task_type=None):
    """target_modules as name_matches takes it: peft's 'all-linear' (any case) becomes the names it chooses."""
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        return _all_linear(model, task_type)
    return target_modules


def select_targets(model, target_modules, exclude_modules=None, option="target_modules", task_type=None,
                   layers_to_transform=None, layers_pattern=None, modules_to_save=None):
    """[(name, module)] that peft chooses for target_modules / exclude_modules ('all-linear' included),
    layers_to_transform / layers_pattern and modules_to_save (whose modules, and all inside them, LoRA leaves
    alone), skipping the insides of lora_ext layers and of modules saved whole; raises ValueError, naming
    `option`, when none is chosen or a chosen module is not a layer lora_ext adapts."""
    check_name_spec(f"{option}: target_modules", target_modules, allow_none=False)
    check_name_spec(f"{option}: exclude_modules", exclude_modules)
    check_layers(option, target_modules, layers_to_transform, layers_pattern)
    spec = resolve_targets(model, target_modules, task_type)
    inner = [n + "." for n, m in model.named_modules() if n and isinstance(m, (LoRALayer, ModulesToSave))]
    chosen, excluded, unmatched, saved = [], [], [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inner):
            continue
        # (a module under wrappers, activation checkpointing's or FSDP1's, matches by its name with or without them:
        # an adapter saved from such a model names it without, as peft and state_dict() do, r12)
        names = (name,) if plain_name(name) == name else (name, plain_name(name))
        if isinstance(module, ModulesToSave) or any((exclude_modules and name_matches(exclude_modules, n))
                                                    or (modules_to_save and keeps_lora_off(modules_to_save, n))
                                                    for n in names):
            excluded.append(name)
            if isinstance(module, ModulesToSave) and any(target_matches(spec, n, layers_to_transform, layers_pattern)
                                                         for n in names):
                saved.append(f"{name!r} (by adapter(s) {list(module.adapter_names)!r})")
        elif any(target_matches(spec, n, layers_to_transform, layers_pattern) for n in names):
            chosen.append((name, module))
        else:
            unmatched.append(name)
    if not chosen:
        if saved:  # (U1: it said "matches no module", where it matched one another adapter saves whole)
            raise ValueError(f"{option}: target_modules {target_modules!r} matches only modules that other adapters "
                             f"save whole or replace token rows of (modules_to_save, trainable_token_indices): "
                             f"{', '.join(saved)}; lora_ext puts no LoRA on such a module (peft refuses such a "
                             f"target): serve the adapters from models of their own")
        if excluded and not unmatched:
            raise ValueError(f"{option}: exclude_modules {exclude_modules!r} excludes every module")
        raise ValueError(f"{option}: target_modules {target_modules!r} matches no module of the model"
                         + (f" (after exclude_modules {exclude_modules!r})" if excluded else "")
                         + (f" in layers_to_transform {layers_to_transform!r}" if filters_layers(layers_to_transform)
                            else ""))
    for name, module in chosen:
        if not is_supported(module):
            raise ValueError(unsupported_message(f"{option}: target_modules", name, module))
    return chosen


def pattern_matches(key, name) -> bool:
    """Whether a rank_pattern/alpha_pattern key matches the module name, as peft's get_pattern_key matches it (the
    key as a regex matching the end of the name at a '.' boundary)."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def pattern_value(patterns, name, default):
    """The value of the first key of a rank_pattern/alpha_pattern-style dict matching the module name
    (pattern_matches; `name` may be a tuple of a module's names: any of them), else default."""
    names = name if isinstance(name, tuple) else (name,)
    for key, value in (patterns or {}).items():
        if any(pattern_matches(key, n) for n in names):
            return value
    return default


def scaling_for(r, lora_alpha, use_rslora=False):
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _check_options(r, lora_alpha, lora_dropout) -> int:
    """r as a Python int (a numpy integer too, as loralib takes), after checking the three."""
    if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if not isinstance(lora_alpha, numbers.Real) or isinstance(lora_alpha, bool) \
            or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
    if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    return int(r)


def check_lossless(lossless):
    if lossless not in (None, True, False):
        raise ValueError(f"lossless must be None, True or False, got {lossless!r}")


def _lora_dtype(weight):
    # Half-precision models get fp32 factors (merges still round once into the weight's dtype).
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def overridden_base(module):
    """The plain class (nn.Linear, nn.Embedding, ...) a lora_ext layer would replace `module` as, when `module`
    is a subclass of it with a forward of its own (OPT's positional embedding, Gemma's scaled embedding, a scaled
    Linear): the layer put in its place would not run that forward. None otherwise."""
    for base in (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, _hf_conv1d()):
        if base is not None and isinstance(module, base) and type(module).forward is not base.forward:
            return base
    return None


def _scaled_source(cls, tensor: bool) -> Optional[bool]:
    """Whether cls.forward reads, its docstring aside, `return super().forward(ids) * self.embed_scale` (a number)
    or `... * self.embed_scale.to(self.weight.dtype)` (a tensor), as transformers' scaled word embeddings do; None
    when its source cannot be read."""
    try:
        fn = ast.parse(textwrap.dedent(inspect.getsource(cls.forward))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    if not isinstance(fn, ast.FunctionDef) or fn.decorator_list:
        return False
    a = fn.args
    if len(a.args) != 2 or a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs or a.defaults:
        return False
    body = fn.body[1:] if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(
        getattr(fn.body[0], "value", None), ast.Constant) else fn.body
    if len(body) != 1 or not isinstance(body[0], ast.Return) or body[0].value is None:
        return False
    me, ids = a.args[0].arg, a.args[1].arg
    scale = f"{me}.embed_scale.to({me}.weight.dtype)" if tensor else f"{me}.embed_scale"
    want = ast.parse(f"super().forward({ids}) * {scale}", mode="eval").body
    return ast.dump(body[0].value) == ast.dump(want)


def _scaled_lookup(module, cls, scale) -> Optional[bool]:
    """Whether cls.forward (no hooks) on up to 16 ids spread over the table equals F.embedding times `scale` bit for
    bit, in the module's train and eval modes both; None when a lookup cannot show it (no real weight, or every
    probed element zero)."""
    weight = module._parameters.get("weight")
    if weight is None or weight.is_meta or not module.num_embeddings or sharded.is_dtensor(weight):
        return None
    ids = torch.linspace(0, module.num_embeddings - 1, min(16, module.num_embeddings), device=weight.device).long()
    training = module.training
    try:
        with torch.no_grad():
            base = F.embedding(ids, weight)
            want = base * (scale.to(weight.dtype) if isinstance(scale, torch.Tensor) else scale)
            for mode in (training, not training):
                module.training = mode
                got = cls.forward(module, ids)
                if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or got.shape != want.shape:
                    return False
                if not bool(((got == want) | (got.isnan() & want.isnan())).all()):
                    return False
    except Exception:
        return False
    finally:
        module.training = training
    return True if bool((base != 0).any()) else None


def scaled_embedding(module):
    """(embed_scale for lora_ext's Embedding, the number its class is built with) when `module` is an nn.Embedding
    subclass whose forward is the lookup times its `embed_scale`, as transformers' scaled word embeddings are
    (Gemma's: `* embed_scale.to(weight.dtype)`, a one-element buffer; BART's: `* embed_scale`, a number); None for
    any other module. Checked, not assumed:
    - its state is a table and its scale only: the weight its one parameter, embed_scale its one buffer if any, no
      submodules, and a constructor of exactly (num_embeddings, embedding_dim, padding_idx, embed_scale) (the first
      three by position), which unload calls to put one back (T5Gemma2's, which also holds an end-of-image embedding, is refused);
    - a lookup: its class's forward (no hooks), in train and eval mode, on up to 16 ids spread over the table, must
      equal F.embedding times the scale bit for bit with some element not zero; where a lookup cannot show it (a
      meta weight, zero rows), the forward's source must read as transformers' does."""
    cls = type(module)
    if not isinstance(module, nn.Embedding) or cls.forward is nn.Embedding.forward or module.max_norm is not None:
        return None  # (a lookup with max_norm would renormalise the probed rows in place)
    scale = getattr(module, "embed_scale", None)
    exact = None
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or not scale.is_floating_point() or scale.is_meta or scale.requires_grad:
            return None  # (a trainable scale: the layer's copy would not train)
        exact = getattr(module, "scalar_embed_scale", None)  # (Gemma's: the exact value, whatever the dtype)
    try:
        number = ops.finite_real("embed_scale", exact if isinstance(exact, numbers.Real) and not isinstance(exact, bool)
                                 else scale)
    except ValueError:  # (no scale, or not a finite number)
        return None
    if set(module._parameters) != {"weight"} or set(module._buffers) - {"embed_scale"} or module._modules:
        return None
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        if len(params) != 4 or params[3].name != "embed_scale" or any(
                p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
            return None
        with torch.device("meta"):
            cls(module.num_embeddings, module.embedding_dim, module.padding_idx, embed_scale=number)
    except Exception:  # (a class that does not build so: unload could not put it back)
        return None
    looked = _scaled_lookup(module, cls, scale)
    if looked is None:
        looked = _scaled_source(cls, isinstance(scale, torch.Tensor))
    return (scale, number) if looked else None


def read_without_call(model, name) -> Optional[str]:
    """_reader's path (below), or None."""
    return _reader(model, name)[0]


def read_without_call_text(model, name) -> Optional[Tuple[str, str]]:
    """(who reads module `name`'s weight without calling it, and on which path, in words; " on that path", or "" where
    it always does) from _reader, or None."""
    path, reader = _reader(model, name)
    if path is None:
        return None
    who = f"{'its parent' if reader == name.rpartition('.')[0] else 'the module'} {reader!r}" if reader else \
        "the model"  # (X2: it named '')
    return (f"{who} ({type(model.get_submodule(reader)).__name__}) reads its weight without calling it"
            f"{'' if path == 'always' else f' on one path, {path}'}", "" if path == "always" else " on that path")


def _reader(model, name) -> tuple:
    """Where the module that holds module `name` computes with its weight or bias (other than their dtype, device or
    shape) without calling it, else None: "always" where no method calls it (nn.MultiheadAttention's out_proj, WavLM's
    attention projections, SAM's point embeddings, read as `self.point_embed[i].weight`), else the path that reads it
    (_PATH_READS, _PATH_READ_METHODS: a cached decode step, interpolate_pos_encoding, a CUDA kernel path). An adapter
    there changes nothing unmerged on that path and everything merged (peft's too). Told from the source of the
    parent's classes (read_not_called, reads_by_method); a class whose source cannot be read counts as calling its
    modules. Returns (the path or None, the reader's name)."""
    parent, _, child = name.rpartition(".")
    holder = model.get_submodule(parent)
    if child in read_not_called(type(holder)):
        return "always", parent
    if isinstance(holder, (nn.ModuleList, nn.ModuleDict, nn.Sequential)) and parent:  # (self.x[i].weight)
        outer, _, held = parent.rpartition(".")
        if held in read_not_called(type(model.get_submodule(outer)), items=True):
            return "always", outer
    path = _PATH_READS.get(type(holder).__name__, {}).get(child)
    if isinstance(path, tuple):  # (a path the parent takes only as it is configured)
        path = path[0] if path[1](holder) else None
    if path is None:  # (a method the class calls: Phi-4's interpolate_pos_encoding is never called, W2)
        path = next((why for method, why in _PATH_READ_METHODS.items()
                     if method in reads_by_method(type(holder)).get(child, ()) and method in _uses(type(holder))[1]),
                    None)
    if path is None and _DEEP_READS:  # (a class above the parent: _DEEP_READS)
        parts = name.split(".")
        for i in range(len(parts) - 1):
            above = ".".join(parts[:i])
            entry = _DEEP_READS.get(type(model.get_submodule(above)).__name__, {}).get(".".join(parts[i:]))
            if entry is not None and entry[1](model.get_submodule(above)):
                return entry[0], above
    return path, parent


# transformers modules whose parent computes with their weight on one path and calls them on another (peft's adapters
# are skipped there alike; V1, float64 against the adapter merged by hand): an adapter there would be served on one path
# and not on the other, unmerged. {the parent's class: {the module: the path, or (the path, whether the parent takes
# it)}}. The state-space mixers' CUDA kernel path (mamba_ssm) reads them where the torch path calls them: served on a CPU
# and not on a GPU (peft refuses out_proj too)
_KERNEL = "its CUDA kernel path (mamba_ssm, on a GPU)"
_DECODE = "its cached decode steps (generate() after the prefill)"
_BLOOM_TP = ("its pretraining_tp slices (pretraining_tp > 1 with slow_but_exact=True)",
             lambda m: getattr(m, "pretraining_tp", 1) > 1 and getattr(m, "slow_but_exact", False))
_NEAREST = "its nearest-code search (the distances to the codebook's weight)"
_ORDERED = ("its ordered embeddings (use_ordered_embeddings: logits from the head's weight)",
            lambda m: getattr(getattr(m, "config", None), "use_ordered_embeddings", False))
_PATH_READS = {
    "MambaMixer": dict.fromkeys(("x_proj", "dt_proj", "out_proj"), _KERNEL),
    "FalconMambaMixer": dict.fromkeys(("x_proj", "dt_proj", "out_proj"), _KERNEL),
    "JambaMambaMixer": {"dt_proj": _KERNEL}, "Mamba2Mixer": {"out_proj": _KERNEL}, "BambaMixer": {"out_proj": _KERNEL},
    "FalconH1Mixer": {"out_proj": _KERNEL}, "NemotronHMamba2Mixer": {"out_proj": _KERNEL},
    "Zamba2MambaMixer": {"out_proj": _KERNEL}, "GraniteMoeHybridMambaLayer": {"out_proj": _KERNEL},
    "RecurrentGemmaRecurrentBlock": {"conv_1d": _DECODE},  # (0.54 off on every decode step)
    "LSHSelfAttention": {"query_key": _DECODE, "value": _DECODE},  # (Reformer: 0.55, 0.94 off)
    "DiffusionGemmaDecoderModel": {"embed_tokens": "its self-conditioning (the logits' softmax times the embedding's "
                                                   "weight, every denoising step after the first)"},
    "BloomAttention": {"dense": _BLOOM_TP}, "BloomMLP": {"dense_4h_to_h": _BLOOM_TP},  # (0.36, 0.54 off)
    # (W2) the VQ-VAE quantizers' nearest-code search (distances to the codebook's weight), then the lookup calls it:
    # 25.4 off unmerged; the Gemma 4 assistants' ordered embeddings (logits from the head's weight, uncalled)
    "ChameleonVQVAEVectorQuantizer": {"embedding": _NEAREST}, "JanusVQVAEVectorQuantizer": {"embedding": _NEAREST},
    "DacVectorQuantize": {"codebook": _NEAREST},
    "Gemma4AssistantForCausalLM": {"lm_head": _ORDERED}, "Gemma4UnifiedAssistantForCausalLM": {"lm_head": _ORDERED},
}
# and modules whose weight a class above their parent reads (a path inside it, relative to it): DeBERTa's masked-LM
# head with legacy=False computes the logits from the word embeddings' weight, handed to it uncalled (V1: merged and
# unmerged 0.78 / 0.90 apart; peft's adapter is skipped there too)
_DEBERTA_HEAD = {"deberta.embeddings.word_embeddings": (
    "its masked-LM head's logits (legacy=False: computed from the word embeddings' weight)",
    lambda model: not getattr(model, "legacy", True))}
_DEEP_READS = {"DebertaForMaskedLM": _DEBERTA_HEAD, "DebertaV2ForMaskedLM": _DEBERTA_HEAD}
# methods of any parent class whose read of a module's weight is such a path: CLIP's and its kin's vision embeddings
# (about 20 classes: the adapter dropped whole, 0.96 off) and SAM2's and its kin's prompt encoders (box corners)
_PATH_READ_METHODS = {"interpolate_pos_encoding": "interpolate_pos_encoding=True for images of another size",
                      "_embed_boxes": "its box prompts"}
# and modules whose parent skips them in training forwards only, where the adapter would not train (a warning):
# Gemma3n's AltUp computes with correction_coefs' clamped weight in training, calls it in eval ("all-linear" chooses
# it; peft's lora_B gets no gradient there either)
_TRAINING_READS = {"Gemma3nTextAltUp": {"correction_coefs"}}


_HARMLESS = {"dtype", "device", "shape", "size", "ndim", "dim", "numel", "is_cuda", "requires_grad", "is_meta"}
_INITIALISER = re.compile(r"(^|_)(init|reset|tie)")


@functools.lru_cache(maxsize=None)
def _uses(cls) -> tuple:
    """What the methods of `cls` (its own and its bases', nn.Module's aside; initialisers aside) do with its modules:
    ({x: methods reading `self.x.weight`/`.bias` for their values}, {x called: `self.x(...)`}, {x whose items'
    weights are read: `self.x[i].weight`}, {x whose items are called: `self.x[i](...)`})."""
    reads, calls, item_reads, item_calls = {}, set(), set(), set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError, IndentationError):
            continue
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or _INITIALISER.search(fn.name):
                continue
            parents = {id(c): n for n in ast.walk(fn) for c in ast.iter_child_nodes(n)}
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and _self_attribute(node.func):
                    calls.add(node.func.attr)  # self.x(...)
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                      and node.func.attr in ("forward", "__call__") and _self_attribute(node.func.value)):
                    calls.add(node.func.value.attr)  # self.x.forward(...)
                elif isinstance(node, ast.Call) and _self_item(node.func):
                    item_calls.add(node.func.value.attr)  # self.x[i](...)
                if (isinstance(node, ast.Attribute) and node.attr in ("weight", "bias")
                        and getattr(parents.get(id(node)), "attr", None) not in _HARMLESS):
                    if _self_attribute(node.value):
                        reads.setdefault(node.value.attr, set()).add(fn.name)
                    elif _self_item(node.value):
                        item_reads.add(node.value.value.attr)
    return ({x: frozenset(m) for x, m in reads.items()}, frozenset(calls), frozenset(item_reads),
            frozenset(item_calls))


def read_not_called(cls, items: bool = False) -> frozenset:
    """Names x of `self.x` whose `.weight` or `.bias` the methods of `cls` (its own and its bases', nn.Module's
    aside; initialisers aside) read for their values, where no method calls `self.x(...)`; items=True: of the
    containers x whose items' weights are read, `self.x[i].weight`, where no method calls `self.x[i](...)` (SAM's
    point embeddings: V1, the adapter did nothing unmerged, 0.31 off)."""
    reads, calls, item_reads, item_calls = _uses(cls)
    return item_reads - item_calls if items else frozenset(reads) - calls


def reads_by_method(cls) -> dict:
    """{x: the methods of `cls` that read `self.x.weight` (or `.bias`) for their values}."""
    return _uses(cls)[0]


def _self_attribute(node):
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"


def _self_item(node):
    return isinstance(node, ast.Subscript) and _self_attribute(node.value)


def check_carry(label, src, dst) -> None:
    """Refuses (ValueError naming `label`) hooks of `src` that unload could not carry to `dst`, the existing module
    put in its place (a ConvLoRA's conv, a saved module's copy), before anything changes: dst has hooks of that kind
    itself, which the moved ones would run beside in an order neither was registered in, or whose handles would
    stop removing them."""
    if dst is None:
        return
    both = [kind for kind in layers.users_hooks(src) if len(dst.__dict__.get(dict(layers.HOOKS)[kind][0]) or {})]
    if both:
        raise ValueError(f"unload: {label} and the {type(dst).__name__} put back in its place both have "
                         f"{', '.join(both)}; remove those of {label}, unload, then register them on the module put "
                         f"back")


def carry_hooks(src, dst) -> None:
    """Moves the hooks of `src`'s users to `dst`, the module unload puts in its place (checked by check_carry): torch's
    dicts themselves, so the handles the user holds still remove them; torch's and lora_ext's own hooks stay with
    src. A hook torch calls with its module (a load_state_dict pre-hook) is called with dst."""
    theirs = layers.users_hooks(src)
    for kind, attrs in layers.HOOKS:
        ids = theirs.get(kind)
        if not ids:
            continue
        for attr in attrs:
            moved = src.__dict__[attr]
            stays = type(moved)()
            for i in [i for i in moved.keys() if i not in ids]:
                stays[i] = moved.pop(i)
            for i, hook in list(moved.items()):
                if isinstance(hook, _WrappedHook) and hook.with_module:
                    moved[i] = _WrappedHook(hook.hook, dst)
            dst.__dict__[attr], src.__dict__[attr] = moved, stays
        if kind == "backward hooks":
            dst.__dict__["_is_full_backward_hook"] = src.__dict__.get("_is_full_backward_hook")


def check_replaceable(model, name, module, label=None):
    """Refuses a module that a lora_ext layer in its place (or an adapter of it) would not stand for (see the two
    functions above). label: what the message starts with (default: "target_modules: module 'name'")."""
    label = label or f"target_modules: module {name!r}"
    weight = getattr(module, "weight", None)
    if not isinstance(module, LoRALayer) and (sharded.is_dtensor(weight) or sharded.fsdp_managed(module)):
        # (FSDP2 holds the weight all-gathered, a plain tensor, after some forwards: the module is sharded still)
        raise ValueError(f"{label} has a sharded weight (a DTensor: fully_shard or tensor parallel was applied); "
                         f"a lora_ext layer must be in place before sharding: inject (or load the adapter) first, then "
                         f"shard (lora_ext.parallel's styles for tensor parallel)")
    if not isinstance(module, LoRALayer) and sharded.fsdp1_refusal(module, "", ("weight", "bias")) is not None:
        raise ValueError(f"{label} is held by FSDP1 (FullyShardedDataParallel) in a flat parameter, which the factors a "
                         f"lora_ext layer adds would not be part of; inject (or load the adapter) before wrapping the "
                         f"model, or use FSDP2 (torch.distributed.fsdp.fully_shard)")
    if not isinstance(module, LoRALayer) and layers.offloaded(module):
        raise ValueError(f"{label} is offloaded by accelerate (a hook keeps its weight's values and puts them back for "
                         f"each forward): a lora_ext layer in its place would lose the hook and read a weight on the "
                         f"meta device; inject or load adapters before offloading, or after "
                         f"accelerate.hooks.remove_hook_from_submodules(model)")
    hooks = [] if isinstance(module, LoRALayer) else [kind for kind, (attr, *_) in layers.HOOKS if getattr(module, attr, None)]
    if not isinstance(module, LoRALayer) and nn.utils.parametrize.is_parametrized(module):
        raise ValueError(f"{label} has parametrizations ({', '.join(module.parametrizations.keys())}: a weight computed "
                         f"from others, weight_norm say), which a lora_ext layer in its place would neither compute nor "
                         f"merge into; remove them first (torch.nn.utils.parametrize.remove_parametrizations), or "
                         f"register them after inject")
    if not isinstance(module, LoRALayer) and layers.instance_forward(module):
        hooks.append("a forward set on the instance" + (" by accelerate's add_hook_to_module"
                                                        if hasattr(module, "_hf_hook") else ""))
    if hooks:
        raise ValueError(f"{label} has hooks of its own ({', '.join(hooks)}), which a lora_ext layer in its place would "
                         f"not run: the model's outputs, state_dict or loads would change (peft keeps the original "
                         f"module, hooks included, as base_layer); remove them, inject, then register them on the "
                         f"lora_ext layer")
    base = None if isinstance(module, LoRALayer) or scaled_embedding(module) is not None else overridden_base(module)
    scale = getattr(module, "embed_scale", None) if base is nn.Embedding else None
    if isinstance(scale, torch.Tensor) and scale.is_meta:  # (R4: refused below as a forward of its own, misleading)
        raise ValueError(f"{label} is a {type(module).__name__} whose embed_scale is a meta tensor (built under "
                         f"torch.device('meta') or init_empty_weights(include_buffers=True)): its value is lost, and "
                         f"no state dict restores it (a non-persistent buffer); build the model with its buffers on a "
                         f"real device (init_empty_weights(include_buffers=False), accelerate's default), then inject")
    if base is not None:
        raise ValueError(f"{label} is a {type(module).__name__}, a subclass of {base.__name__} with a forward of its "
                         f"own, which a lora_ext layer in its place would not run (peft keeps it); lora_ext adapts "
                         f"{base.__name__} itself only, and a scaled word embedding whose forward is the lookup "
                         f"times its embed_scale")
    read = read_without_call_text(model, name)
    if read is not None:
        raise ValueError(f"{label}: {read[0]}: an adapter there would change nothing{read[1]} unmerged (as in peft) "
                         f"and the outputs once merged")
    parent = name.rpartition(".")[0]
    holder = type(model.get_submodule(parent)).__name__
    if name.rpartition(".")[2] in _TRAINING_READS.get(holder, ()):
        warnings.warn(f"{label}: its parent {parent!r} ({holder}) computes with its weight without calling it in "
                      f"training forwards (it calls it in eval): an adapter there is served in eval, but skipped in "
                      f"training, where it gets no gradient (as in peft)", stacklevel=3)


def replacement(module, name, r, lora_alpha, lora_dropout, merge_weights, enable_lora, lossless=None):
    """A lora_ext layer around `module`'s own parameters (built on meta, then given them)."""
    common = dict(r=r, lora_alpha=lora_alpha, merge_weights=merge_weights, lossless=lossless, device="meta")
    if enable_lora is not None:
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise ValueError(f"fused: module {name!r} is a {type(module).__name__}, not a linear projection")
        fifo = is_conv1d(module)
        in_f, out_f = module.weight.shape if fifo else module.weight.shape[::-1]
        layer = layers.MergedLinear(in_f, out_f, lora_dropout=lora_dropout, enable_lora=enable_lora,
                                    fan_in_fan_out=fifo, bias=module.bias is not None, **common)
    elif is_conv1d(module):
        in_f, out_f = module.weight.shape
        layer = layers.Linear(in_f, out_f, lora_dropout=lora_dropout, fan_in_fan_out=True,
                              bias=module.bias is not None, **common)
    elif isinstance(module, nn.Linear):
        layer = layers.Linear(module.in_features, module.out_features, lora_dropout=lora_dropout,
                              bias=module.bias is not None, **common)
    elif isinstance(module, nn.Embedding):
        # loralib's Embedding has no LoRA dropout: lora_dropout does not apply to embeddings
        scaled = scaled_embedding(module) if type(module) is not nn.Embedding else None
        layer = layers.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                                 max_norm=module.max_norm, norm_type=module.norm_type,
                                 scale_grad_by_freq=module.scale_grad_by_freq, sparse=module.sparse,
                                 embed_scale=scaled[0] if scaled else None, **common)
        if scaled:
            layer._embed_scale_init = scaled[1]  # what unload builds the class again with
    elif type(module) in _CONVS:
        c = module
        layer = _CONVS[type(c)](c.in_channels, c.out_channels, c.kernel_size, lora_dropout=lora_dropout,
                                stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups,
                                bias=c.bias is not None, padding_mode=c.padding_mode, **common)
    else:
        raise ValueError(unsupported_message("target_modules", name, module))
    return layer


def _adopt(layer, module):
    """Gives the meta-built layer the module's parameters and real LoRA factors."""
    ties.replaced(module)  # (the layer replaces it: not a module sharing the weight with the layer)
    if isinstance(layer, layers.ConvLoRA):
        layer.conv = module
        weight = module.weight
    else:
        weight = module.weight
        layer.weight = weight
        if getattr(module, "bias", None) is not None:
            layer.bias = module.bias
    for key in ("lora_A", "lora_B"):
        meta = getattr(layer, key)
        setattr(layer, key, nn.Parameter(torch.empty(meta.shape, device=weight.device, dtype=_lora_dtype(weight))))
    if isinstance(layer, layers.MergedLinear):
        layer.lora_ind = layer.lora_ind.to(weight.device)
    layer.reset_lora_parameters()
    layer._base_requires_grad = weight.requires_grad
    layer._injected_from = type(module)
    weight.requires_grad_(False)
    return layer


_MODULE_STATE = frozenset(nn.Module().__dict__) - {"_modules"}  # what every module holds (hooks, ...), bar its children


# containers the module index looks into: written in place (a read-only mapping refuses, and is warned about),
# tuples (built again), sets (nowhere to write: warned about)
_MAPPINGS = (dict, types.MappingProxyType)
_WRITTEN = (list, collections.deque, *_MAPPINGS)
_CONTAINERS = (*_WRITTEN, tuple, set, frozenset)


class _Holders:
    """Every place a model holds each of its modules, by id: each name a module is registered under (an alias is a
    second name, in the same parent or another) and each entry of a plain list, dict or tuple among a module's
    attributes (Mask2Former's, MaskFormer's and OneFormer's prediction blocks run their Linear layers from
    `self.layers`), nested up to _DEPTH containers deep, tuples too (rebuilt, being immutable: a tuple inside a
    tuple, v1). A long container (a token table) is looked into only when it may hold a module (_may_hold_modules,
    at C speed: tokenizer merges of 2M tuples walked made inject 1.3 s slower, r51). A tuple subclass of its own
    holding a module is noted as unreplaceable (`stuck`). Entries: (owner, holder, key, registered, via) with
    holder[key] the module, or, with `via` a path of tuple indices, holder[key][via[0]][via[1]]...; owner: the module
    whose attribute it is; registered: holder is the owner's `_modules`."""

    _DEPTH = 3
    _LONG = 4096  # entries past which a container's types are read first (at C speed: a 3M-int table 5x inject's time)

    def __init__(self, model: nn.Module):
        self.at: Dict[int, list] = {}
        self.stuck: Dict[int, list] = {}  # id(module) -> (owner, container type) it cannot be replaced in
        for m in model.modules():
            for key, value in vars(m).items():
                if key not in _MODULE_STATE:
                    self._walk(m, vars(m), key, (), value, 0, set(), key == "_modules")

    def _walk(self, owner, holder, key, via, value, depth, seen, registry, stuck=None):
        if isinstance(value, nn.Module):
            if stuck is not None:
                self.stuck.setdefault(id(value), []).append((owner, stuck))
            else:
                self.at.setdefault(id(value), []).append((owner, holder, key, registry and depth == 1 and not via,
                                                          via))
            return
        if depth >= self._DEPTH or id(value) in seen or not isinstance(value, _CONTAINERS):
            return
        if len(value) > self._LONG and not _may_hold_modules(value, self._DEPTH - depth):
            return
        if isinstance(value, _WRITTEN):  # (written in place: what holds it need not be; a read-only mapping's write
            # fails, and is warned about)
            seen.add(id(value))  # (a tuple is not: one held twice is rebuilt in each holder; a cycle needs a list)
            for k, v in (value.items() if isinstance(value, _MAPPINGS) else enumerate(value)):
                self._walk(owner, value, k, (), v, depth + 1, seen, registry)
            return
        if isinstance(value, (set, frozenset)):  # (no place to write a module into: warned about)
            for v in value:
                self._walk(owner, None, None, (), v, depth + 1, seen, registry, type(value).__name__)
            return
        if stuck is None and not (type(value) is tuple or hasattr(value, "_make")):
            stuck = type(value).__name__  # (a tuple subclass of its own cannot be built again as it is, r49)
        for i, v in enumerate(value):  # (a plain tuple or a namedtuple: built again around the new module)
            self._walk(owner, holder, key, (*via, i), v, depth + 1, seen, registry, stuck)

    def replace(self, old: nn.Module, new: nn.Module, names: bool = True) -> None:
        """`new` wherever the model held `old` (the name replaced is set by the caller), but in old's own children (a
        back-reference to the module they belong to, which a wrapper keeps running as it is: pointed at the wrapper,
        the base served the saved copy's values, r49); names=False: not at its other registered names (each gets a
        wrapper of its own there, as peft wraps each name it saves whole)."""
        held = self.at.pop(id(old), [])
        inside = {id(m) for m in old.modules()}
        moved = [e for e in held if (names or not e[3]) and id(e[0]) not in inside]
        kept = [e for e in held if e not in moved]
        if kept:
            self.at[id(old)] = kept
        stuck = [(owner, kind) for owner, kind in self.stuck.get(id(old), ()) if id(owner) not in inside]
        failed, made = [], {}
        for owner, holder, key, registered, via in moved:
            try:
                holder[key] = _replaced(holder[key], via, old, new, made)
            except Exception:  # (a container that refuses writes, a frozen mapping: left as it is, said below)
                if registered:  # (the model's own registry must take it)
                    raise
                failed.append((owner, holder, key, via))
        for owner, holder, key, via in failed:  # (a read-only view of a dict written above shows the new one, r52)
            try:
                value = holder[key]
                for i in via:
                    value = value[i]
            except Exception:
                value = old
            if value is old:
                stuck.append((owner, type(holder).__name__))
        for owner, kind in stuck:  # (silently, a forward through it served the base: 3.46 off, r51)
            warnings.warn(f"lora_ext: a {type(owner).__name__} holds {type(old).__name__} in a {kind} that cannot be "
                          f"written, where it stays: a forward reaching it through that {kind} runs the plain module, "
                          f"without the adapter while the layer is unmerged and with the merged adapter's weight for "
                          f"every row (a mixed batch's too) once merged, as peft's would", stacklevel=4)
        self.at.setdefault(id(new), []).extend(moved)


def _replaced(value, via, old, new, made):
    """`value` with `new` for `old` at the tuple path `via` (each tuple on the way built again, a namedtuple as one,
    with `new` for every `old` in it; `value` as it is where it no longer holds `old` there). `made`: id(tuple) ->
    (tuple, its rebuilt form) of this replacement, so that a tuple two attributes share stays shared (r52)."""
    if not via:
        return new if value is old else value
    if not isinstance(value, tuple) or via[0] >= len(value):
        return value
    if id(value) in made:
        return made[id(value)][1]
    parts = [new if v is old else v for v in value]
    parts[via[0]] = _replaced(value[via[0]], via[1:], old, new, made)
    if all(a is b for a, b in zip(parts, value)):
        return value
    if type(value) is tuple:
        rebuilt = tuple(parts)
    else:
        rebuilt = type(value)._make(parts)
        if getattr(value, "__dict__", None):  # (a namedtuple subclass's own attributes, r52)
            rebuilt.__dict__.update(value.__dict__)
    made[id(value)] = (value, rebuilt)
    return rebuilt


def _may_hold_modules(value, levels: int) -> bool:
    """Whether a long container holds a module within `levels` containers, read level by level without a Python call
    per entry (a token table of tuples of strings holds none: walked entry by entry, tokenizer merges of 2M tuples
    made inject 1.3 s slower, r51; a list mixing tuples and None 5.8 s, r52)."""
    def flatten(items, seqs, maps):
        if not maps and not seqs:
            return iter(())
        if not maps:  # (at C speed when every entry is one of them)
            return itertools.chain.from_iterable(v for v in items if type(v) in seqs)
        return itertools.chain.from_iterable(v.values() if type(v) in maps else v for v in items
                                             if type(v) in maps or type(v) in seqs)

    def entries(path):
        items = value.values() if isinstance(value, _MAPPINGS) else value
        for seqs, maps in path:
            items = flatten(items, seqs, maps)
        return items

    path = []
    for _ in range(levels):
        kinds = set(map(type, entries(path)))
        if any(issubclass(t, nn.Module) for t in kinds):
            return True
        inner = [t for t in kinds if issubclass(t, _CONTAINERS)]
        if not inner:
            return False
        maps = frozenset(t for t in inner if issubclass(t, _MAPPINGS))
        path.append((frozenset(inner) - maps, maps))
    return False


_HOLDERS: "contextvars.ContextVar[Optional[tuple]]" = contextvars.ContextVar("lora_ext_holders", default=None)


@contextlib.contextmanager
def holders_of(model: nn.Module) -> Iterator[None]:
    """One index of where `model` holds its modules (_Holders) for the replacements of one change (inject, a load,
    unload), made at its first replacement: a walk of the whole model for each would cost a load of hundreds of
    modules seconds."""
    token = _HOLDERS.set((model, None))
    try:
        yield
    finally:
        _HOLDERS.reset(token)


def _set_submodule(model, name, module, names: bool = True):
    """Puts `module` at `name`, and wherever else the model holds the module it replaces: its other names (aliases)
    and plain lists, dicts and tuples in modules' attributes. Else a forward through those ran the old module: the
    LoRA layer never called, an unmerged adapter did nothing and a merged one served every row of a mixed batch
    (query masks 280 off, t4; an alias 4.09 off, r48). names=False: not at the module's other registered names (a
    wrapper of a module saved whole: peft gives each name its own)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent._modules.get(child)
    if old is None or old is module:
        setattr(parent, child, module)
        return
    current = _HOLDERS.get()
    if current is not None and current[0] is model:
        holders = current[1]
        if holders is None:
            holders = _Holders(model)
            _HOLDERS.set((model, holders))
    else:
        holders = _Holders(model)
    setattr(parent, child, module)
    holders.replace(old, module, names)


# models inside lora.disable_adapter blocks: {model: open blocks} (weak: a copy of the model is not in a block)
DISABLED: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


def check_enabled(model: nn.Module, what: str, why: str = "the layers it would add or take out would not follow "
                                                            "the block") -> None:
    """Refuses `what` inside lora.disable_adapter(model): layers it would add (or plain modules it would put back)
    would serve their adapter, or the block's end would merge into modules no longer in the model."""
    if DISABLED.get(model):
        raise ValueError(f"{what}: the model's adapters are disabled (inside lora.disable_adapter); {why}: do it after "
                         f"the block")


def one_change(fn):
    """fn(model, ...) as one model-level change (ModelLock.changing), from its first check to its last write: two
    loads planning the same new module on two threads, or a delete between a hotswap's checks and its writes, would
    otherwise each act on a plan the other made wrong."""
    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        if not isinstance(model, nn.Module):
            return fn(model, *args, **kwargs)  # (its own refusal)
        from .adapters import model_lock  # (adapters imports this module)
        with model_lock(model).changing():
            return fn(model, *args, **kwargs)
    return run


@one_change
def inject(model: nn.Module, target_modules: Union[str, Sequence[str]], r: int = 8, lora_alpha: float = 8,
           lora_dropout: float = 0.0, merge_weights: bool = True,
           fused: Optional[Mapping[str, Sequence[bool]]] = None,
           exclude_modules: Union[str, Sequence[str], None] = None, rank_pattern: Optional[Mapping[str, int]] = None,
           alpha_pattern: Optional[Mapping[str, float]] = None, use_rslora: bool = False,
           lossless: Optional[bool] = None, layers_to_transform: Union[int, Sequence[int], None] = None,
           layers_pattern: Union[str, Sequence[str], None] = None) -> List[str]:
    """Replaces the matching modules of `model` by lora_ext layers, in place; returns their names.

    target_modules: a regex matching whole module names, or a list of names / name suffixes (peft's rule), or
      "all-linear": every nn.Linear / Conv1D but a transformers model's output head, as peft chooses them.
    fused: {name or suffix: enable_lora}, e.g. {"c_attn": [True, False, True]} for GPT-2's fused qkv: those
      modules become MergedLinear (they need not be listed in target_modules).
    rank_pattern / alpha_pattern: per-module r / lora_alpha overrides, keyed by name regexes (peft's rule);
    use_rslora: scaling lora_alpha / sqrt(r) instead of lora_alpha / r.
    layers_to_transform / layers_pattern: peft's, for a list of target_modules: only the modules in these layers
      (an index or a list; the index follows layers_pattern, e.g. 'layers', or else the first name part).
    lossless: the layers' lossless merges (docs/LOSSLESS.md): None (the default) for float16/bfloat16
      weights and not for float32, True or False for every weight.
    Every check is made before the first module is replaced.
    """
    check_enabled(model, "inject")
    if target_modules is None and not fused:
        raise ValueError("target_modules: give a regex or a list of module names (or fused)")
    check_name_spec("target_modules", target_modules)
    check_name_spec("exclude_modules", exclude_modules)
    check_patterns("rank_pattern", rank_pattern, rank=True)
    check_patterns("alpha_pattern", alpha_pattern, rank=False)
    check_layers("inject", target_modules, layers_to_transform, layers_pattern)
    r = _check_options(r, lora_alpha, lora_dropout)
    check_lossless(lossless)
    fused = dict(fused or {})
    plan = []
    from .adapters import model_lock, reserved_rank  # (adapters imports this module)
    reserved = reserved_rank(model)
    inner = [n + "." for n, m in model.named_modules() if n and isinstance(m, (LoRALayer, ModulesToSave))]
    spec = resolve_targets(model, target_modules)
    if isinstance(spec, set):  # 'all-linear': the modules not adapted yet
        spec = {n for n in spec if not isinstance(model.get_submodule(n), LoRALayer)}
    excluded = []
    for name, module in model.named_modules():
        # the insides of lora_ext layers (a ConvLoRA's conv) are never targets, as in select_targets
        if not name or any(name.startswith(p) for p in inner):
            continue
        # (by its name with or without wrappers' segments, as select_targets: R1, a checkpoint-wrapped model's
        # rank_pattern, alpha_pattern and exclude_modules given by plain names were left out without a word)
        names = (name,) if plain_name(name) == name else (name, plain_name(name))
        if any(name_matches(exclude_modules, n) for n in names):
            if any(target_matches(spec, n, layers_to_transform, layers_pattern) for n in names):
                excluded.append(name)
            continue
        # (fused entries: the same layer filter as target_modules' names)
        enable = next((v for k, v in fused.items()
                       if any(target_matches([k], n, layers_to_transform, layers_pattern) for n in names)), None)
        if enable is None and not any(target_matches(spec, n, layers_to_transform, layers_pattern) for n in names):
            continue
        if isinstance(module, LoRALayer):
            raise ValueError(f"target_modules: module {name!r} is already a lora_ext layer")
        if isinstance(module, ModulesToSave):  # (and nothing inside one: peft keeps LoRA off them)
            raise ValueError(f"target_modules: module {name!r} is saved whole (modules_to_save) or given rows of "
                             f"tokens by adapter(s) {module.adapter_names}; peft puts no LoRA on such a module")
        check_replaceable(model, name, module, f"{'fused' if enable is not None else 'target_modules'}: module {name!r}")
        weight = getattr(module, "weight", None)
        if lossless and isinstance(weight, torch.Tensor) and weight.dtype not in RECORD_DTYPES:
            raise ValueError(f"lossless=True: module {name!r} has a {weight.dtype} weight; lossless merges take "
                             f"float16, bfloat16 or float32 weights (set lossless=False or None)")
        rr = pattern_value(rank_pattern, names, r)
        alpha = pattern_value(alpha_pattern, names, lora_alpha)
        rr = _check_options(rr, alpha, lora_dropout)
        alpha = alpha if isinstance(alpha, (int, float)) else float(alpha)  # (a numpy number)
        if reserved is not None and rr > reserved:
            raise ValueError(f"r: module {name!r} would get rank {rr}, over the rank {reserved} that reserve_rank fixed "
                             f"for the model's layers (every adapter is held at that rank); reserve a rank of at least "
                             f"{rr} first")
        plan.append((name, module, replacement(module, name, rr, alpha, lora_dropout, merge_weights, enable, lossless),
                     scaling_for(rr, alpha, use_rslora)))
    if not plan:
        raise ValueError(f"target_modules: {target_modules!r} matches no module of the model"
                         + (f" in layers_to_transform {layers_to_transform!r}"
                            if filters_layers(layers_to_transform) else "")
                         + (f" that exclude_modules leaves: it excludes {excluded[:5]}" if excluded else ""))
    # (the lock exists before the first switch: forwards in flight hold it)
    with model_lock(model).write("inject", model), holders_of(model):
        check_enabled(model, "inject")  # (again: a disable_adapter may have begun since the first check)
        ties.known_plain(model)  # (a model built before lora_ext's import: its plain modules, for later ties)
        owners = parameter_owners(model)
        for name, module, layer, scaling in plan:
            install(model, name, module, layer, scaling, owners)
            if reserved is not None:  # a reserved model's layers all hold that rank (lora.reserve_rank)
                layer._reserve(reserved)
    return [name for name, *_ in plan]


def parameter_owners(model):
    """{id(parameter): names of the modules holding it directly}: tied weights have several."""
    owners = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    return owners


def install(model, name, module, layer, scaling, owners, adapter_name="default", factors=None):
    """Puts the meta-built `layer` (from replacement()) in place of `module`, around its parameters, with
    freshly initialised factors or the given (lora_A, lora_B) as adapter `adapter_name`.

    A weight tied to another module (GPT-2's wte and lm_head) is never merged into: that would change the
    other module too. The layer then always adds its adapter on the fly."""
    owners_of_weight = owners.get(id(module.weight), [])
    layers.guard_loads(model)  # (a state of another adapter than a layer serves: refused before anything loads)
    _adopt(layer, module)
    layer.active_adapter = adapter_name
    if factors is None:
        layer.scaling = scaling
        layer.lora_alpha = scaling * layer.r
    else:
        layer.add_adapter(adapter_name, *factors, scaling)
    # The mode only: the layer starts unmerged and merges at the next eval(), as loralib's layers do.
    nn.Module.train(layer, module.training)
    note_bias(layer, "inject")  # (its bias as inject leaves it: save_peft_adapter names it if it trains)
    _set_submodule(model, name, layer)
    # tied: the names of other modules holding the weight; a name that now leads to the layer itself is the layer
    # reached through another name of a parent (m.decoder = m.model), not a tie
    tied = [n for n in owners_of_weight if n != name and not _leads_to(model, n, layer)]
    if tied:
        layer.merge_weights = False
        # (names in the model inject was given; '' is that model itself, r6)
        layer._tied_with = [n or "the model inject was given (its own parameter)" for n in tied]
    return layer


def _leads_to(model, name, module) -> bool:
    try:
        return model.get_submodule(name) is module
    except AttributeError:
        return False


def refuse_fsdp1(model: nn.Module, what: str, hint: str = "") -> None:
    """Refuses `what` (a model-level call) before anything changes when FSDP1 (FullyShardedDataParallel) flattened
    a lora_ext layer of `model` (sharded.fsdp1_refusal), naming the first one by its path."""
    for name, m in model.named_modules():
        refusal = sharded.fsdp1_refusal(m, what) if isinstance(m, LoRALayer) else None
        if refusal is not None:
            raise ValueError(f"{what}: layer {name!r}: {refusal}{hint}")


def check_mergeable(name, layer, model=None):
    refusal = layer.merge_refusal() if layer.has_lora else None
    if refusal is not None:
        hint = " (unload with merge=False)" if layer._weight_or_none() is not None else ""  # (see unload)
        raise ValueError(f"merge: {name!r}: {refusal}{hint}")
    tied = ties.names(layer, model)  # plain modules (install's _tied_with) and other lora_ext layers
    if tied:
        raise ValueError(f"merge: the weight of {name!r} is tied to {tied}; merging the adapter into it would "
                         f"change those modules too (unload with merge=False, or untie the weights)")


def _scaled_origin(layer) -> bool:
    """Whether `layer` was injected in place of a scaled word embedding (scaled_embedding), whose class unload
    builds again."""
    origin = getattr(layer, "_injected_from", None)
    return (isinstance(layer, layers.Embedding) and isinstance(origin, type) and issubclass(origin, nn.Embedding)
            and origin is not nn.Embedding and layer.__dict__.get("_embed_scale_init") is not None)


def _scale_number(layer) -> float:
    """The number a scaled embedding's class is built with for `layer`'s scale as it is now: the one it was
    injected with while its buffer still holds that (Gemma's exact sqrt(hidden_size), beside a bfloat16 buffer),
    else the buffer's or the number's value (1.0 for none)."""
    scale, first = layer.output_scale(), layer._embed_scale_init
    if isinstance(scale, torch.Tensor):
        return first if bool(scale == torch.tensor(first, dtype=scale.dtype, device=scale.device)) else float(scale)
    return 1.0 if scale is None else float(scale)


def _plain(layer):
    """The plain module a LoRA layer stands for, around the layer's own parameters."""
    if isinstance(layer, layers.ConvLoRA):
        return layer.conv
    origin = getattr(layer, "_injected_from", None)
    weight, bias = layer.weight, getattr(layer, "bias", None)
    with torch.device("meta"):
        if _scaled_origin(layer):
            # a scaled word embedding (scaled_embedding): its class again, with the layer's scale as it is now
            plain = origin(layer.num_embeddings, layer.embedding_dim, layer.padding_idx,
                           embed_scale=_scale_number(layer))
            plain.max_norm, plain.norm_type = layer.max_norm, layer.norm_type
            plain.scale_grad_by_freq, plain.sparse = layer.scale_grad_by_freq, layer.sparse
        elif isinstance(layer, layers.Embedding):
            plain = nn.Embedding(layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx,
                                 max_norm=layer.max_norm, norm_type=layer.norm_type,
                                 scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse)
        elif origin is not None and origin is _hf_conv1d():
            plain = origin(layer.out_features, layer.in_features)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None)
    if not isinstance(layer, layers.Embedding) and layer.fan_in_fan_out \
            and not (origin is not None and origin is _hf_conv1d()):
        weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
    plain.weight = weight
    if bias is not None:
        plain.bias = bias
    if isinstance(getattr(plain, "embed_scale", None), torch.Tensor):  # (the class's own buffer, built on meta)
        scale = layer._buffers.get("embed_scale")  # the layer's, moved and cast with it; or none set since: 1
        plain.embed_scale = scale if scale is not None else torch.tensor(_scale_number(layer), device=weight.device)
    return plain


def unload(model: nn.Module, merge: bool = True) -> List[str]:
    """Puts plain modules back in place of every lora_ext layer (the inverse of inject); with merge=True
    their weights keep the active adapter merged in, with merge=False they are the base weights. Modules saved
    whole (peft's modules_to_save) go back as the module that computes now, the active adapter's copy (or the
    model's own where it has none), whatever `merge` says: peft's unload and merge_and_unload both do so. Modules
    with rows of tokens (trainable_token_indices) go back as the model's own, with merge=True the active adapter's
    rows written into its weight (peft's merge_and_unload). With
    merge=True, a transformers config that says tie_word_embeddings is set to False when the input and output
    embeddings no longer share a weight (peft's merge_and_unload does the same). Returns the names of the layers
    and modules taken out. Hooks registered on a layer or a saved module's wrapper (forward, backward, state_dict,
    load_state_dict) move to the module put back, their handles still removing them; refused before anything
    changes where that module (a ConvLoRA's conv, a saved copy) has hooks of the same kind, or where an instance
    forward (accelerate's add_hook_to_module) is set on a layer."""
    if isinstance(model, (LoRALayer, ModulesToSave)):
        raise ValueError(f"unload: the model itself is a {type(model).__name__}; call unload on a model holding it")
    from .adapters import model_lock  # (adapters imports this module)
    # (the layers as they are once changes queued before this one are done)
    with model_lock(model).write("unload", model), holders_of(model):
        return _unload(model, merge)


def _unload(model: nn.Module, merge: bool) -> List[str]:
    check_enabled(model, "unload")
    refuse_fsdp1(model, "unload")  # (the plain modules put back would hold FSDP1's shard pieces)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer)]
    # every name of each layer (a layer reachable under two names, `m.b = m.a`: the plain module at both)
    aliases = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, LoRALayer):
            aliases.setdefault(id(m), []).append(name)
    for name, layer in found:  # (a weight a failed write left unknown would become the plain module's)
        layer._check_sound()
        if isinstance(layer, layers.Embedding) and layer.output_scale() is not None and not _scaled_origin(layer):
            raise ValueError(f"unload: layer {name!r} is an Embedding with embed_scale, which no plain torch module "
                             f"holds (a plain nn.Embedding would drop the scale); only a layer injected in place of a "
                             f"scaled word embedding unloads, as that class")
        if layers.offloaded(layer):
            raise ValueError(f"unload: layer {name!r} is offloaded by accelerate (its hook holds the weight's values "
                             f"and puts them back for each forward): the plain module put in its place would keep the "
                             f"weight on the meta device, its values lost with the hook; remove the hooks first "
                             f"(accelerate.hooks.remove_hook_from_submodules(model)), then unload (and offload again)")
        if layer._weight_or_none() is None:
            raise ValueError(f"unload: layer {name!r}: its weight is computed by a parametrization (weight_norm, "
                             f"pruning), which the plain module would not carry; remove it first "
                             f"(torch.nn.utils.parametrize.remove_parametrizations on the module holding the weight)")
        if layers.instance_forward(layer):
            raise ValueError(f"unload: layer {name!r} has a forward set on the instance (accelerate's "
                             f"add_hook_to_module puts one there), which the plain module put in its place would not "
                             f"run; remove it first (accelerate.hooks.remove_hook_from_submodules(model)), then unload")
        check_carry(f"layer {name!r}", layer, layer.conv if isinstance(layer, layers.ConvLoRA) else None)
    for name, wrapper in wrappers(model):
        if layers.instance_forward(wrapper):
            raise ValueError(f"unload: module {name!r} has a forward set on the instance, which the module put in its "
                             f"place would not run; remove it first, then unload")
        check_carry(f"module {name!r}", wrapper, wrapper.put_back())
    if merge:
        for name, layer in found:
            check_mergeable(name, layer, model)
        for name, wrapper in wrappers(model):
            refusal = wrapper.merge_refusal(model, name)
            if refusal is not None:
                raise ValueError(f"unload: {refusal}")
    sharded_layers = [name for name, m in found if m.__dict__.get("_tp") is not None
                      or sharded.is_dtensor(m._weight_or_none()) or sharded.is_dtensor(m.lora_A)]
    if sharded_layers:
        warnings.warn(f"unload: the layers {sharded_layers[:3]}{' ...' if len(sharded_layers) > 3 else ''} are "
                      f"sharded (tensor parallel or FSDP2): the plain modules put back hold their DTensor weights "
                      f"without the sharded forward, so the model serves no forward afterwards; its state dict "
                      f"(torch.distributed.checkpoint.state_dict.get_model_state_dict) gives the unloaded weights, "
                      f"to save or to load into an unsharded model", stacklevel=3)
    names = []
    # (under the model's lock: atomically for forwards on other threads) every layer merged (or unmerged) before the
    # first is taken out, so a refusal (a lossless record's overflow, out of memory) leaves every layer as it was
    # (merge: a layer that trained through its merge merges its trained factors, LoRALayer._merge_trained)
    change = [layer for _, layer in found if layer.merged != merge or (merge and layer._merge_behind())]
    each_or_none(change, (lambda m: m.merge()) if merge else (lambda m: m.unmerge()),
                 (lambda m: m.unmerge()) if merge else (lambda m: m.merge()), paths={m: path for path, m in found})
    with deferred_interrupt(), layers.taking_out_layers():
        for name, layer in found:
            with layer._lock:
                plain = _plain(layer)
                plain.train(layer.training)
                base = plain.weight
                # (the flag from before inject, or False once the model was frozen since; a weight unfrozen after
                # that, which inject had frozen, keeps its flag)
                if not base.is_inference():  # (an inference tensor never requires grad)
                    base.requires_grad_(base.requires_grad or getattr(layer, "_base_requires_grad", True))
                carry_hooks(layer, plain)  # (hooks its users registered on the layer: on the plain module now)
            for alias in aliases[id(layer)]:
                _set_submodule(model, alias, plain)
                names.append(alias)
            layers.unloaded(layer)  # (a user's reference to the layer no longer reaches the plain module's weight)
        for name, wrapper in wrappers(model):
            plain = wrapper.unloaded(merge)
            carry_hooks(wrapper, plain)
            _set_submodule(model, name, plain)
            names.append(name)
        if merge:
            _untie_config(model)
    return names


def _untie_config(model):
    """A transformers config's tie_word_embeddings set to False when the embeddings no longer share a weight (a
    copy of a module saved whole took one's place), so that a reload does not tie them again."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    try:
        ends = [getattr(model, f)() for f in ("get_input_embeddings", "get_output_embeddings")]
    except (AttributeError, NotImplementedError):
        return
    weights = [getattr(m, "weight", None) for m in ends]
    if all(isinstance(w, torch.Tensor) for w in weights) and weights[0].data_ptr() != weights[1].data_ptr():
        config.tie_word_embeddings = False
