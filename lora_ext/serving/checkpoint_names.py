"""A checkpoint's keys as the model names them. transformers renames some keys when it loads a checkpoint (its
conversion mapping: a vision-language model's `language_model.model.*` is `model.language_model.*`, NomicBert's
`encoder.layers.*.attn.out_proj` is `layers.*.self_attn.o_proj`) and transformers 5 saves such models under the
checkpoint's names again; adapters made with transformers 4 name the modules as the checkpoint does. peft works in
the model's names and renames transformers 4 adapters when it loads them; `lora-ext merge` (which reads the
checkpoint) and `load_peft_adapter` use these to do the same. Some keys are converted rather than renamed (fused,
split, permuted: NomicBert's q/k/v from one `Wqkv`, fused MoE experts): no tensor of the checkpoint is the model's
weight then. Without the rules (older transformers) names are taken as they are."""
import contextlib
from typing import Dict, List, Sequence, Tuple

import torch.nn as nn


def _keys(model: nn.Module) -> Dict[str, bool]:
    """The model's parameter and buffer names (state_dict's keys, without running its hooks), as a dict:
    transformers' renaming reads one."""
    return {n: True for it in (model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
            for n, _ in it}


def model_names(model: nn.Module, keys: Sequence[str]
                ) -> Tuple[Dict[str, str], Dict[str, List[str]], Dict[str, List[str]]]:
    """({checkpoint key: the model's name for it}, {model name: [checkpoint keys]} twice) for the keys transformers
    renames (first) or converts (second) when it loads them into `model` (a transformers model, meta-built or real):
    its own rules, as from_pretrained applies them. Third: model names two or more keys load into (a key under the
    model's name and another renamed to it): which one the model ends up with is the loader's order, so neither is
    the weight for sure. Keys it leaves alone, or that name nothing of the model, are in none; ({}, {}, {}) without a
    model or without those rules."""
    if model is None:
        return {}, {}, {}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        if not renamings and not converters:
            return {}, {}, {}
        model_keys = _keys(model)
        prefix = getattr(model, "base_model_prefix", None) or None
        names, converted, seen = {}, {}, {}
        for key in keys:
            new, pattern = rename_source_key(key, renamings, converters, prefix, model_keys)
            if new not in model_keys and key in model_keys:  # the loader keeps such a key (its prefix aside)
                new, pattern = rename_source_key(key, [], [], prefix, model_keys)
            if new not in model_keys:
                continue
            if pattern is not None:  # (many keys into one weight is what a converter does: not ambiguous)
                converted.setdefault(new, []).append(key)
                continue
            if new != key:
                names[key] = new
            seen.setdefault(new, []).append(key)
    except Exception:  # rules this transformers does not have, or that fail on this model: names as they are
        return {}, {}, {}
    ambiguous = {new: found for new, found in seen.items() if len(found) > 1 or new in converted}
    for found in ambiguous.values():
        for key in found:
            names.pop(key, None)
    return names, converted, ambiguous


def rename_adapter(where: str, model: nn.Module, factors: dict, base_weights: dict, magnitudes: dict = None,
                   trained: dict = None):
    """(factors, base weights, magnitudes) of an adapter (peft_io.module_factors' dicts, keyed by module name) with
    the modules the model does not have under their names, but under the name transformers renames them to, renamed
    (an adapter made with transformers 4, or trained on another class of the model: LlamaModel's `layers.0...` for
    a LlamaForCausalLM's `model.layers.0...`; peft renames them alike when it loads it). ValueError naming `where`
    when the adapter holds one module under both names. `trained`, a dict, is given each renamed module's name as
    the adapter had it (new name -> old): the config's rank_pattern / alpha_pattern keys match those names."""
    magnitudes = {} if magnitudes is None else magnitudes
    if model is None:
        return factors, base_weights, magnitudes
    model_keys = _keys(model)
    stale = [n + ".weight" for n in factors if n + ".weight" not in model_keys]
    if not stale:
        return factors, base_weights, magnitudes
    names, _, _ = model_names(model, stale)
    renamed = {k[:-len(".weight")]: v[:-len(".weight")] for k, v in names.items() if v.endswith(".weight")}
    if not renamed:
        return factors, base_weights, magnitudes
    new = lambda n: renamed.get(n, n)  # noqa: E731
    for old, name in sorted(renamed.items()):
        twin = next((n for n in factors if n != old and new(n) == name), None)
        if twin is not None:
            raise ValueError(f"{where}: modules {twin!r} and {old!r} are the same module of the model ({name!r}: "
                             f"transformers renames one to the other); the adapter must hold it once")
    if trained is not None:
        trained.update({name: old for old, name in renamed.items() if old in factors})
    return ({new(n): v for n, v in factors.items()},
            {(new(k[0]), k[1]) if isinstance(k, tuple) else new(k): v for k, v in base_weights.items()},
            {new(n): v for n, v in magnitudes.items()})


def other_class_hint(model: nn.Module, modules: Sequence[str]) -> str:
    """A sentence for a refusal of an adapter's saved modules or rows of tokens when its LoRA factors' modules
    (`modules`, the names the file gives them) are another class's of the model (rename_adapter renames those, and
    not the rest): '' when none is renamed."""
    if model is None:
        return ""
    model_keys = _keys(model)
    names, _, _ = model_names(model, [n + ".weight" for n in modules if n + ".weight" not in model_keys])
    renamed = sorted((k[:-len(".weight")], v[:-len(".weight")]) for k, v in names.items() if v.endswith(".weight"))
    if not renamed:
        return ""
    old, new = renamed[0]
    return (f" (the adapter names its modules as another class of the model does: its {old!r} is this model's "
            f"{new!r}; lora_ext renames such an adapter's LoRA factors, as peft does, but not the modules it saves "
            f"whole nor its rows of tokens: use a model of the class it was trained on)")


@contextlib.contextmanager
def naming_another_class(model: nn.Module, modules: Sequence[str]):
    """Inside: a ValueError (a refusal of the adapter's saved modules or rows of tokens) gets other_class_hint's
    sentence for the adapter's factor `modules`, as the file names them."""
    try:
        yield
    except ValueError as e:
        hint = other_class_hint(model, modules) if e.args and isinstance(e.args[0], str) else ""
        if hint:
            e.args = (e.args[0] + hint, *e.args[1:])
        raise
